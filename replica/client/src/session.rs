//! A client session as a state machine: it signs requests, accepts a result once enough
//! distinct replicas sent the same one (f+1 for ordered requests, a quorum for unordered
//! reads), retransmits on timeout, and installs a newer view when f+1 replicas report it.

use std::collections::BTreeMap;

use kmmr_protocol::crypto::{Digest, KeyPair};
use kmmr_protocol::view::View;
use kmmr_protocol::wire::codec::Encode;
use kmmr_protocol::wire::ids::ReplicaId;
use kmmr_protocol::wire::messages::{Reply, ReplyBody, Request, RequestKind, SignedRequest};

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// f+1 replicas refused the request, with this reason.
    Rejected(String),
}

/// A finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub sequence: u64,
    pub result: Result<Vec<u8>, ClientError>,
}

#[derive(Debug)]
struct Outstanding {
    /// The sequence number `invoke` returned, which the completion carries. It differs from the
    /// request's own once an unordered read was reissued as ordered under a fresh one.
    caller: u64,
    request: SignedRequest,
    /// Reply digests by replica: one vote per replica, the first one counts.
    votes: BTreeMap<ReplicaId, Digest>,
    bodies: BTreeMap<Digest, ReplyBody>,
    retransmit_at: u64,
    /// An unordered read that failed to gather a quorum is retried as ordered.
    deadline_unordered: Option<u64>,
}

/// One client process's session with the replicas.
#[derive(Debug)]
pub struct ClientSession {
    key: KeyPair,
    session: u64,
    next_sequence: u64,
    view: View,
    retransmit_us: u64,
    outstanding: BTreeMap<u64, Outstanding>,
    /// Requests to (re)send to every replica of the current view.
    to_send: Vec<SignedRequest>,
    /// Ordered requests wait for a quorum of matching replies instead of f+1. This is what
    /// makes unordered reads linearizable: a completed write is then executed by a quorum, and
    /// any two quorums share a correct replica, so a read's quorum of matching replies cannot
    /// all predate it (with f+1, a lagging quorum plus a lying replica could serve a stale value).
    quorum_writes: bool,
}

impl ClientSession {
    /// `session` must exceed any session this key used before (a start timestamp works): the
    /// replicas refuse older sessions so that old requests cannot be replayed.
    pub fn new(key: KeyPair, session: u64, view: View, retransmit_us: u64) -> Self {
        ClientSession {
            key,
            session,
            next_sequence: 1,
            view,
            retransmit_us,
            outstanding: BTreeMap::new(),
            to_send: Vec::new(),
            quorum_writes: false,
        }
    }

    /// See `quorum_writes`: required for linearizable unordered reads.
    pub fn set_quorum_writes(&mut self, on: bool) {
        self.quorum_writes = on;
    }

    pub fn quorum_writes(&self) -> bool {
        self.quorum_writes
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    /// Adopts a newer view learnt elsewhere (the outcome of a reconfiguration this client made,
    /// which f+1 replicas already vouched for).
    pub fn install_view(&mut self, view: View) {
        if view.id > self.view.id {
            self.view = view;
        }
    }

    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    pub fn in_flight(&self) -> usize {
        self.outstanding.len()
    }

    /// One line per request in flight, for diagnostics: sequence, kind, view, votes.
    pub fn describe_in_flight(&self) -> Vec<String> {
        self.outstanding
            .iter()
            .map(|(seq, o)| {
                format!(
                    "seq {seq} {:?} view {} votes {:?} bodies {:?}",
                    o.request.request.kind,
                    o.request.request.view.0,
                    o.votes
                        .iter()
                        .map(|(r, d)| (r.0, d.short()))
                        .collect::<Vec<_>>(),
                    o.bodies
                        .iter()
                        .map(|(d, b)| (
                            d.short(),
                            format!("{b:?}").chars().take(120).collect::<String>()
                        ))
                        .collect::<Vec<_>>()
                )
            })
            .collect()
    }

    /// Starts a request; returns its sequence number. The signed request is queued in
    /// `take_to_send`.
    pub fn invoke(&mut self, now: u64, kind: RequestKind, payload: Vec<u8>) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let request = SignedRequest::sign(
            Request {
                client: self.key.public(),
                session: self.session,
                sequence,
                kind,
                view: self.view.id,
                payload,
            },
            &self.key,
        );
        self.to_send.push(request.clone());
        let deadline_unordered =
            (kind == RequestKind::Unordered).then_some(now + self.retransmit_us);
        self.outstanding.insert(
            sequence,
            Outstanding {
                caller: sequence,
                request,
                votes: BTreeMap::new(),
                bodies: BTreeMap::new(),
                retransmit_at: now + self.retransmit_us,
                deadline_unordered,
            },
        );
        sequence
    }

    /// Stops retransmitting a request whose caller gave up (`sequence` as `invoke` returned it).
    pub fn abandon(&mut self, sequence: u64) {
        self.outstanding.retain(|_, o| o.caller != sequence);
    }

    /// Requests to send to every replica of `view()`.
    pub fn take_to_send(&mut self) -> Vec<SignedRequest> {
        std::mem::take(&mut self.to_send)
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.outstanding.values().map(|o| o.retransmit_at).min()
    }

    pub fn on_timeout(&mut self, now: u64) {
        let mut upgrade = Vec::new();
        for (seq, o) in self.outstanding.iter_mut() {
            if o.deadline_unordered.is_some_and(|t| now >= t) {
                upgrade.push(*seq);
                continue;
            }
            if now >= o.retransmit_at {
                o.retransmit_at = now + self.retransmit_us;
                self.to_send.push(o.request.clone());
            }
        }
        for seq in upgrade {
            self.reissue_ordered(now, seq);
        }
    }

    /// Re-signs an unordered read as an ordered request under a fresh sequence number. Not
    /// under its own: replicas order a client's requests by sequence and drop, unanswered, an
    /// ordered request whose sequence is below one they already executed, and requests this
    /// session sent after the read (writes, other reads) may have executed by now. The read
    /// would then wait for its caller's timeout.
    fn reissue_ordered(&mut self, now: u64, seq: u64) {
        if let Some(mut o) = self.outstanding.remove(&seq) {
            let sequence = self.next_sequence;
            self.next_sequence += 1;
            let mut r = o.request.request.clone();
            r.kind = RequestKind::Ordered;
            r.view = self.view.id;
            r.sequence = sequence;
            o.request = SignedRequest::sign(r, &self.key);
            o.votes.clear();
            o.bodies.clear();
            o.deadline_unordered = None;
            o.retransmit_at = now + self.retransmit_us;
            self.to_send.push(o.request.clone());
            self.outstanding.insert(sequence, o);
        }
    }

    /// A reply from replica `from` (authenticated by the channel).
    pub fn on_reply(&mut self, now: u64, from: ReplicaId, reply: Reply) -> Option<Completion> {
        if !self.view.contains(from) || reply.replica != from || reply.session != self.session {
            return None;
        }
        let seq = reply.sequence;
        let o = self.outstanding.get_mut(&seq)?;
        if reply.kind != o.request.request.kind {
            return None;
        }
        if let ReplyBody::NewView(v) = &reply.body {
            // A late answer to this request as signed for an older view: not a vote.
            if v.id <= o.request.request.view {
                return None;
            }
        }
        let digest = Digest::of(&reply.body.to_bytes());
        // A replica's latest answer counts: one that moved to a newer view since it answered
        // must be able to say so. Changing its own vote gives no replica more than one.
        if o.votes.get(&from) == Some(&digest) {
            return None;
        }
        o.votes.insert(from, digest);
        o.bodies.entry(digest).or_insert(reply.body);
        let matching = o.votes.values().filter(|d| **d == digest).count();
        let needed = match (&o.bodies[&digest], o.request.request.kind) {
            // One correct replica among f+1 vouches for a view; results may need more.
            (ReplyBody::NewView(_), _) => self.view.weak(),
            (_, RequestKind::Ordered | RequestKind::Reconfig) if self.quorum_writes => {
                self.view.quorum()
            }
            (_, RequestKind::Ordered | RequestKind::Reconfig) => self.view.weak(),
            (_, RequestKind::Unordered) => self.view.quorum(),
        };
        // No answer can reach the threshold any more, counting replicas yet to answer.
        let best = o
            .votes
            .values()
            .fold(BTreeMap::<Digest, usize>::new(), |mut m, d| {
                *m.entry(*d).or_default() += 1;
                m
            })
            .into_values()
            .max()
            .unwrap_or(0);
        let hopeless = best + self.view.n().saturating_sub(o.votes.len()) < needed;
        if matching < needed {
            if hopeless {
                if o.request.request.kind == RequestKind::Unordered {
                    self.reissue_ordered(now, seq);
                } else {
                    // Answers split, e.g. some replicas replied before a view change and some
                    // after: one vote per replica would leave it stuck, so ask again.
                    o.votes.clear();
                    o.bodies.clear();
                    o.retransmit_at = now + self.retransmit_us;
                    self.to_send.push(o.request.clone());
                }
            }
            return None;
        }
        let body = o.bodies.get(&digest).cloned()?;
        match body {
            ReplyBody::Result(bytes) => {
                let o = self.outstanding.remove(&seq)?;
                Some(Completion {
                    sequence: o.caller,
                    result: Ok(bytes),
                })
            }
            ReplyBody::Rejected(reason) => {
                let o = self.outstanding.remove(&seq)?;
                Some(Completion {
                    sequence: o.caller,
                    result: Err(ClientError::Rejected(reason)),
                })
            }
            ReplyBody::NewView(view) => {
                if view.id > self.view.id {
                    self.view = view;
                }
                // Every request signed for an older view is re-signed for the current one, this
                // one included even if the view it was told about is already installed (learnt
                // from another request): its votes are spent on the old view.
                for s in self.outstanding.keys().copied().collect::<Vec<_>>() {
                    if let Some(o) = self.outstanding.get_mut(&s) {
                        if o.request.request.view >= self.view.id && s != seq {
                            continue;
                        }
                        let mut r = o.request.request.clone();
                        r.view = self.view.id;
                        o.request = SignedRequest::sign(r, &self.key);
                        o.votes.clear();
                        o.bodies.clear();
                        o.retransmit_at = now + self.retransmit_us;
                        self.to_send.push(o.request.clone());
                    }
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmmr_protocol::view::Member;
    use kmmr_protocol::wire::ids::ViewId;

    fn session() -> ClientSession {
        let members = (0..4u8)
            .map(|i| Member {
                id: ReplicaId(u32::from(i)),
                address: format!("127.0.0.1:{}", 17000 + u16::from(i)),
                key: KeyPair::from_seed([i; 32]).public(),
            })
            .collect();
        let view = View::new(ViewId(0), 1, members).expect("view");
        let mut s = ClientSession::new(KeyPair::from_seed([9; 32]), 1, view, 1_000);
        s.set_quorum_writes(true);
        s
    }

    fn reply(from: u32, sequence: u64, kind: RequestKind, result: &[u8]) -> Reply {
        Reply {
            replica: ReplicaId(from),
            session: 1,
            sequence,
            kind,
            body: ReplyBody::Result(result.to_vec()),
        }
    }

    /// A read sent before a write, and retried as ordered once the write executed, must get a
    /// sequence above the write's: replicas silently drop an ordered request whose sequence is
    /// below one they executed, and the read then hung until its caller's timeout (seen as a
    /// watch of the etcd gateway that started 30 s late in k8s.io/apiserver's storage tests).
    #[test]
    fn an_unordered_read_retried_as_ordered_gets_a_fresh_sequence() {
        let mut s = session();
        let read = s.invoke(0, RequestKind::Unordered, b"read".to_vec());
        let write = s.invoke(0, RequestKind::Ordered, b"write".to_vec());
        s.take_to_send();
        for r in 0..3 {
            let done = s.on_reply(
                1,
                ReplicaId(r),
                reply(r, write, RequestKind::Ordered, b"ok"),
            );
            assert_eq!(done.is_some(), r == 2, "the write completes on a quorum");
        }
        // The replicas answer the read from different states: no quorum can match any more.
        for r in 0..4u32 {
            let answer = format!("state {r}");
            let got = s.on_reply(
                2,
                ReplicaId(r),
                reply(r, read, RequestKind::Unordered, answer.as_bytes()),
            );
            assert!(got.is_none());
        }
        let sent = s.take_to_send();
        assert_eq!(sent.len(), 1, "the read is sent again, ordered");
        let retried = &sent[0].request;
        assert_eq!(retried.kind, RequestKind::Ordered);
        assert_eq!(retried.payload, b"read");
        assert!(
            retried.sequence > write,
            "retried as sequence {} though {write} was executed",
            retried.sequence
        );
        // Its answer completes the call the caller made, under the sequence it was given.
        let mut done = None;
        for r in 1..4 {
            done = done.or(s.on_reply(
                3,
                ReplicaId(r),
                reply(r, retried.sequence, RequestKind::Ordered, b"value"),
            ));
        }
        assert_eq!(
            done,
            Some(Completion {
                sequence: read,
                result: Ok(b"value".to_vec())
            })
        );
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn abandoning_a_retried_read_stops_it() {
        let mut s = session();
        let read = s.invoke(0, RequestKind::Unordered, b"read".to_vec());
        s.on_timeout(5_000);
        assert_eq!(s.in_flight(), 1, "retried as ordered");
        s.abandon(read);
        assert_eq!(s.in_flight(), 0);
    }
}
