//! A client session as a state machine: it signs requests, accepts a result once enough
//! distinct replicas sent the same one (f+1 for ordered requests, a quorum for unordered
//! reads), retransmits on timeout, and installs a newer view when f+1 replicas report it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
    /// The number `invoke` returned for this request. It stays the caller's handle when the
    /// request goes out again under another sequence number.
    caller: u64,
    request: SignedRequest,
    /// Reply digests by replica: one vote per replica, the first one counts.
    votes: BTreeMap<ReplicaId, Digest>,
    bodies: BTreeMap<Digest, ReplyBody>,
    retransmit_at: u64,
    /// Times resent for want of replies: each wait doubles, up to `MAX_BACKOFF_SHIFT`.
    resent: u32,
    /// An unordered read that failed to gather a quorum is retried as ordered.
    deadline_unordered: Option<u64>,
    /// When it was first sent, for the unordered reads' patience.
    sent_at: u64,
}

/// Resending a request every interval is what loses the replicas' time once they are
/// overloaded (150 clients of 1 MiB values resent every second are 600 MB/s of copies of
/// requests the replicas already queue), so the wait doubles with each resend, to 8 intervals,
/// and a large request waits an interval more per `RESEND_BYTES_PER_INTERVAL` of payload.
const MAX_BACKOFF_SHIFT: u32 = 3;
const RESEND_BYTES_PER_INTERVAL: usize = 128 * 1024;

fn backoff_us(retransmit_us: u64, payload_len: usize, resent: u32) -> u64 {
    let intervals = 1 + (payload_len / RESEND_BYTES_PER_INTERVAL) as u64;
    retransmit_us
        .saturating_mul(intervals)
        .saturating_mul(1 << resent.min(MAX_BACKOFF_SHIFT))
}

/// How long an unordered read waits for a quorum of matching replies before it is ordered.
///
/// A read outside the order races the writes: replicas that have executed one write more than
/// the others answer differently, and with a Byzantine replica among them (one that lies, or
/// whose reply does not arrive) the correct ones can split 2 to 1 while the missing vote could
/// still make a quorum, so nothing settles the read but a deadline. Waiting the whole retransmit
/// interval (a second) for that made a watch fed by such reads late by a second; ordering the
/// read costs one consensus instance, a few milliseconds. So the deadline follows the reads that
/// did settle: a few times their usual latency, never below a floor that scheduling noise does
/// not cross, never above the retransmit interval.
#[derive(Debug, Clone, Copy)]
struct Patience {
    /// Exponentially weighted mean of settled unordered reads' latency, in microseconds.
    mean_us: u64,
}

impl Patience {
    /// Before any read settled: as if they took this long.
    const INITIAL_MEAN_US: u64 = 25_000;
    /// Patience in multiples of the mean.
    const FACTOR: u64 = 4;
    const FLOOR_US: u64 = 20_000;

    fn new() -> Self {
        Patience {
            mean_us: Self::INITIAL_MEAN_US,
        }
    }

    fn settled(&mut self, latency_us: u64) {
        // Weight 1/8: a burst of slow reads raises the patience within a few reads.
        self.mean_us = (self.mean_us * 7 + latency_us) / 8;
    }

    fn wait_us(&self, retransmit_us: u64) -> u64 {
        (self.mean_us.saturating_mul(Self::FACTOR))
            .max(Self::FLOOR_US)
            .min(retransmit_us)
    }
}

/// How this session's reads outside the order ended, counted since it began: answered by a
/// quorum of matching replies, or reissued in the order because the answers split (replicas at
/// different states) or a quorum did not answer within the patience.
#[derive(Debug, Default)]
pub struct ReadOutcomes {
    pub settled: AtomicU64,
    pub split: AtomicU64,
    pub slow: AtomicU64,
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
    patience: Patience,
    reads: Arc<ReadOutcomes>,
    /// Requests sent again under a new number because f+1 replicas said a later one of this
    /// session overtook them.
    overtaken: u64,
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
            reads: Arc::default(),
            patience: Patience::new(),
            overtaken: 0,
        }
    }

    /// The outcomes of this session's unordered reads, shared (for metrics).
    pub fn read_outcomes(&self) -> Arc<ReadOutcomes> {
        self.reads.clone()
    }

    /// See `quorum_writes`: required for linearizable unordered reads.
    pub fn set_quorum_writes(&mut self, on: bool) {
        self.quorum_writes = on;
    }

    pub fn quorum_writes(&self) -> bool {
        self.quorum_writes
    }

    /// How many requests went out again because a later one of this session overtook them.
    pub fn overtaken(&self) -> u64 {
        self.overtaken
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
        let first_wait = backoff_us(self.retransmit_us, request.request.payload.len(), 0);
        let deadline_unordered = (kind == RequestKind::Unordered)
            .then(|| now + self.patience.wait_us(self.retransmit_us));
        self.outstanding.insert(
            sequence,
            Outstanding {
                caller: sequence,
                request,
                votes: BTreeMap::new(),
                bodies: BTreeMap::new(),
                retransmit_at: now + first_wait,
                resent: 0,
                deadline_unordered,
                sent_at: now,
            },
        );
        sequence
    }

    /// Stops retransmitting a request whose caller gave up (`sequence` as `invoke` returned it).
    pub fn abandon(&mut self, sequence: u64) {
        self.outstanding.retain(|_, o| o.caller != sequence);
    }

    /// Every request still waiting for its answer, in sequence order: what a replica whose link
    /// just came up has missed. Replicas execute a client's requests in sequence order and
    /// drop older ones as stale, so a request held back until its retransmission, while later
    /// ones went straight to the leader, would never execute.
    pub fn unanswered(&self) -> Vec<SignedRequest> {
        self.outstanding
            .values()
            .map(|o| o.request.clone())
            .collect()
    }

    /// Requests to send to every replica of `view()`.
    pub fn take_to_send(&mut self) -> Vec<SignedRequest> {
        std::mem::take(&mut self.to_send)
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.outstanding
            .values()
            .map(|o| {
                o.deadline_unordered
                    .unwrap_or(u64::MAX)
                    .min(o.retransmit_at)
            })
            .min()
    }

    pub fn on_timeout(&mut self, now: u64) {
        let mut upgrade = Vec::new();
        for (seq, o) in self.outstanding.iter_mut() {
            if o.deadline_unordered.is_some_and(|t| now >= t) {
                upgrade.push(*seq);
                continue;
            }
            if now >= o.retransmit_at {
                o.resent = o.resent.saturating_add(1);
                o.retransmit_at = now
                    + backoff_us(
                        self.retransmit_us,
                        o.request.request.payload.len(),
                        o.resent,
                    );
                self.to_send.push(o.request.clone());
            }
        }
        for seq in upgrade {
            self.reads.slow.fetch_add(1, Ordering::Relaxed);
            self.reissue_ordered(now, seq);
        }
    }

    /// Re-signs an unordered read as an ordered request under a new sequence number. Its own
    /// number is older than ordered requests sent since: the replicas execute a client's
    /// requests in sequence order and answer nothing older than the last one executed, so under
    /// the old number a read that needed ordering behind a later write was never answered.
    fn reissue_ordered(&mut self, now: u64, seq: u64) {
        self.reissue(now, seq, RequestKind::Ordered);
    }

    /// Sends the request `seq` again as a new request of `kind` with the next sequence number;
    /// its caller gets the new one's result.
    fn reissue(&mut self, now: u64, seq: u64, kind: RequestKind) {
        if let Some(mut o) = self.outstanding.remove(&seq) {
            let sequence = self.next_sequence;
            self.next_sequence += 1;
            let mut r = o.request.request.clone();
            r.kind = kind;
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
        let mut counts = BTreeMap::<Digest, usize>::new();
        for d in o.votes.values() {
            *counts.entry(*d).or_default() += 1;
        }
        let kind = o.request.request.kind;
        let writes_quorum =
            self.quorum_writes && matches!(kind, RequestKind::Ordered | RequestKind::Reconfig);
        let is_past = |d: &Digest| matches!(o.bodies.get(d), Some(ReplyBody::Past));
        // A replica that executed past the request and kept no reply for it (it installed a
        // later state, or evicted the reply) vouches that its state holds the write, which is
        // what a write's quorum is for; the result itself still needs f+1 matching.
        let past = counts
            .iter()
            .filter(|(d, _)| is_past(d))
            .map(|(_, c)| *c)
            .sum::<usize>();
        // The answer to judge: this one or, for a `Past`, the one most replicas gave.
        let best = counts
            .iter()
            .filter(|(d, _)| !is_past(d))
            .max_by_key(|(_, c)| **c)
            .map(|(d, c)| (*d, *c));
        let (digest, matching) = match best {
            Some(b) if is_past(&digest) => b,
            _ => (digest, counts.get(&digest).copied().unwrap_or(0)),
        };
        let body = o.bodies.get(&digest);
        let needed = match (body, kind) {
            // One correct replica among f+1 vouches for a view, or for a request that can never
            // execute; results may need more.
            (Some(ReplyBody::NewView(_) | ReplyBody::Overtaken), _) => self.view.weak(),
            (_, RequestKind::Ordered | RequestKind::Reconfig) if self.quorum_writes => {
                self.view.quorum()
            }
            (_, RequestKind::Ordered | RequestKind::Reconfig) => self.view.weak(),
            (_, RequestKind::Unordered) => self.view.quorum(),
        };
        let enough = match body {
            Some(ReplyBody::Past) | None => false,
            Some(ReplyBody::Result(_)) if writes_quorum => {
                matching >= self.view.weak() && matching + past >= needed
            }
            Some(_) => matching >= needed,
        };
        // No answer can reach the threshold any more, counting replicas yet to answer and those
        // that said `Past` (they say it again when asked again: never a reason to ask at once).
        let undecided = self.view.n().saturating_sub(o.votes.len()) + past;
        let hopeless = best.map_or(0, |(_, c)| c) + undecided < needed;
        tracing::debug!(
            replica = from.0,
            sequence = seq,
            matching,
            past,
            needed,
            hopeless,
            "reply"
        );
        if !enough {
            if hopeless {
                if o.request.request.kind == RequestKind::Unordered {
                    self.reads.split.fetch_add(1, Ordering::Relaxed);
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
        let caller = o.caller;
        if o.request.request.kind == RequestKind::Unordered {
            self.patience.settled(now.saturating_sub(o.sent_at));
            self.reads.settled.fetch_add(1, Ordering::Relaxed);
        }
        match body {
            ReplyBody::Result(bytes) => {
                self.outstanding.remove(&seq);
                Some(Completion {
                    sequence: caller,
                    result: Ok(bytes),
                })
            }
            ReplyBody::Rejected(reason) => {
                self.outstanding.remove(&seq);
                Some(Completion {
                    sequence: caller,
                    result: Err(ClientError::Rejected(reason)),
                })
            }
            // Never enough on its own (above).
            ReplyBody::Past => None,
            ReplyBody::Overtaken => {
                // It never ran and never will (a later request of this session ran first):
                // the same operation under a new sequence number runs once.
                self.overtaken += 1;
                self.reissue(now, seq, kind);
                None
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

    fn view(n: u32) -> View {
        let members = (0..n)
            .map(|i| Member {
                id: ReplicaId(i),
                address: format!("127.0.0.1:{}", 1000 + i),
                key: KeyPair::from_seed([i as u8 + 1; 32]).public(),
            })
            .collect();
        View::new(ViewId(0), 1, members).expect("valid view")
    }

    fn reply(from: u32, sequence: u64, kind: RequestKind, body: &[u8]) -> Reply {
        Reply {
            replica: ReplicaId(from),
            session: 7,
            sequence,
            kind,
            body: ReplyBody::Result(body.to_vec()),
        }
    }

    /// A read that could not gather a quorum unordered goes out again ordered behind the write
    /// sent after it: under its own, older number the replicas would never answer it.
    #[test]
    fn the_unanswered_requests_come_in_sequence_order_without_the_answered_ones() {
        let mut s = ClientSession::new(KeyPair::from_seed([9; 32]), 7, view(4), 1_000);
        let first = s.invoke(0, RequestKind::Ordered, b"a".to_vec());
        let second = s.invoke(0, RequestKind::Ordered, b"b".to_vec());
        let third = s.invoke(0, RequestKind::Ordered, b"c".to_vec());
        for from in 0..2 {
            let _ = s.on_reply(
                0,
                ReplicaId(from),
                reply(from, second, RequestKind::Ordered, b"ok"),
            );
        }
        let left: Vec<u64> = s.unanswered().iter().map(|r| r.request.sequence).collect();
        assert_eq!(left, [first, third]);
    }

    /// A write a later one overtook (relayed to the leader ahead of it) never runs: once f+1
    /// replicas say so it goes out again under a new number, and its caller gets that result.
    #[test]
    fn an_overtaken_write_is_sent_again_once_f_plus_1_replicas_say_so() {
        let mut s = ClientSession::new(KeyPair::from_seed([9; 32]), 7, view(4), 1_000);
        s.set_quorum_writes(true);
        let put = s.invoke(0, RequestKind::Ordered, b"put".to_vec());
        let later = s.invoke(0, RequestKind::Ordered, b"later".to_vec());
        assert_eq!(s.take_to_send().len(), 2);
        let overtaken = |from: u32| Reply {
            body: ReplyBody::Overtaken,
            ..reply(from, put, RequestKind::Ordered, b"")
        };
        // One replica alone (it may be Byzantine) is not enough.
        assert_eq!(s.on_reply(0, ReplicaId(1), overtaken(1)), None);
        assert!(s.take_to_send().is_empty());
        assert_eq!(s.on_reply(0, ReplicaId(2), overtaken(2)), None);
        let again = s.take_to_send();
        assert_eq!(again.len(), 1);
        let resent = &again[0].request;
        assert_eq!(
            (resent.kind, &resent.payload[..]),
            (RequestKind::Ordered, &b"put"[..])
        );
        assert!(resent.sequence > later, "{} after {later}", resent.sequence);
        // Its result, from a quorum, completes the caller's original number.
        let mut done = None;
        for from in 0..3 {
            done = done.or(s.on_reply(
                0,
                ReplicaId(from),
                reply(from, resent.sequence, RequestKind::Ordered, b"ok"),
            ));
        }
        let done = done.expect("completed");
        assert_eq!(done.sequence, put);
        assert_eq!(done.result.expect("a result"), b"ok".to_vec());
    }

    /// A write whose reply only two replicas kept (n=4): a third that installed a later state
    /// says `Past`, which makes the quorum of replicas holding the write, but never a result on
    /// its own; nor does it make the answers look split (asking again would get it again).
    #[test]
    fn past_answers_count_toward_a_writes_quorum_never_toward_its_result() {
        let mut s = ClientSession::new(KeyPair::from_seed([9; 32]), 7, view(4), 1_000);
        s.set_quorum_writes(true);
        let put = s.invoke(0, RequestKind::Ordered, b"put".to_vec());
        s.take_to_send();
        let past = |from: u32| Reply {
            body: ReplyBody::Past,
            ..reply(from, put, RequestKind::Ordered, b"")
        };
        assert_eq!(s.on_reply(0, ReplicaId(0), past(0)), None);
        assert_eq!(s.on_reply(0, ReplicaId(1), past(1)), None);
        assert_eq!(
            s.on_reply(0, ReplicaId(2), reply(2, put, RequestKind::Ordered, b"ok")),
            None,
            "one result is not f+1"
        );
        assert!(s.take_to_send().is_empty(), "not hopeless: nothing resent");
        let done = s
            .on_reply(0, ReplicaId(3), reply(3, put, RequestKind::Ordered, b"ok"))
            .expect("two results and two replicas past it make a quorum of 3");
        assert_eq!(done.result.expect("a result"), b"ok".to_vec());

        // Without a quorum of writes (f+1 results suffice) `Past` changes nothing.
        let mut s = ClientSession::new(KeyPair::from_seed([9; 32]), 7, view(4), 1_000);
        let put = s.invoke(0, RequestKind::Ordered, b"put".to_vec());
        s.take_to_send();
        for from in 0..3 {
            let body = Reply {
                body: ReplyBody::Past,
                ..reply(from, put, RequestKind::Ordered, b"")
            };
            assert_eq!(s.on_reply(0, ReplicaId(from), body), None);
        }
        assert!(s.take_to_send().is_empty());
        assert_eq!(s.outstanding.len(), 1);
    }

    #[test]
    fn a_read_retried_as_ordered_takes_a_new_sequence_and_completes_under_its_callers_number() {
        let mut s = ClientSession::new(KeyPair::from_seed([9; 32]), 7, view(4), 1_000);
        s.set_quorum_writes(true);
        let read = s.invoke(0, RequestKind::Unordered, b"get".to_vec());
        let write = s.invoke(0, RequestKind::Ordered, b"put".to_vec());
        assert_eq!(s.take_to_send().len(), 2);
        // Three different answers: no quorum can match any more.
        for (from, body) in [(0, b"a"), (1, b"b"), (2, b"c")] {
            assert_eq!(
                s.on_reply(
                    0,
                    ReplicaId(from),
                    reply(from, read, RequestKind::Unordered, body)
                ),
                None
            );
        }
        let again = s.take_to_send();
        assert_eq!(again.len(), 1);
        let retried = &again[0].request;
        assert_eq!(retried.kind, RequestKind::Ordered);
        assert!(
            retried.sequence > write,
            "{} after {write}",
            retried.sequence
        );
        // Late unordered answers under the old number no longer count.
        assert_eq!(
            s.on_reply(
                0,
                ReplicaId(3),
                reply(3, read, RequestKind::Unordered, b"a")
            ),
            None
        );
        let mut done = None;
        for from in 0..3 {
            done = done.or(s.on_reply(
                0,
                ReplicaId(from),
                reply(from, retried.sequence, RequestKind::Ordered, b"v"),
            ));
        }
        assert_eq!(
            done,
            Some(Completion {
                sequence: read,
                result: Ok(b"v".to_vec())
            })
        );
        assert_eq!(s.in_flight(), 1, "the write is still in flight");
        s.abandon(write);
        assert_eq!(s.in_flight(), 0);
    }

    /// Correct replicas split 2 to 1 by a write one of them has not executed, and the fourth
    /// vote (a Byzantine replica's) never comes: the read is ordered after a few times the
    /// latency of the reads that settled, not after the retransmit interval.
    #[test]
    fn a_split_unordered_read_is_ordered_after_a_few_times_the_usual_latency() {
        let second = 1_000_000;
        let mut s = ClientSession::new(KeyPair::from_seed([9; 32]), 7, view(4), second);
        s.set_quorum_writes(true);
        let mut now = 0;
        // Reads that settle in 1 ms teach the session their latency.
        for _ in 0..40 {
            let read = s.invoke(now, RequestKind::Unordered, b"get".to_vec());
            now += 1_000;
            let mut done = None;
            for from in 0..3 {
                done = done.or(s.on_reply(
                    now,
                    ReplicaId(from),
                    reply(from, read, RequestKind::Unordered, b"v"),
                ));
            }
            assert!(done.is_some());
        }
        s.take_to_send();
        let read = s.invoke(now, RequestKind::Unordered, b"get".to_vec());
        s.take_to_send();
        for (from, body) in [(0, b"new"), (1, b"new"), (2, b"old")] {
            assert_eq!(
                s.on_reply(
                    now,
                    ReplicaId(from),
                    reply(from, read, RequestKind::Unordered, body)
                ),
                None
            );
        }
        let deadline = s.next_deadline().expect("a deadline");
        assert!(
            deadline - now <= Patience::FLOOR_US,
            "ordered after {} us",
            deadline - now
        );
        s.on_timeout(deadline);
        let sent = s.take_to_send();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].request.kind, RequestKind::Ordered);
    }

    #[test]
    fn the_unordered_patience_stays_within_its_floor_and_the_retransmit_interval() {
        let mut p = Patience::new();
        assert_eq!(p.wait_us(1_000_000), 4 * Patience::INITIAL_MEAN_US);
        for _ in 0..100 {
            p.settled(0);
        }
        assert_eq!(p.wait_us(1_000_000), Patience::FLOOR_US);
        for _ in 0..100 {
            p.settled(10_000_000);
        }
        assert_eq!(p.wait_us(1_000_000), 1_000_000);
        assert_eq!(p.wait_us(1_000), 1_000);
    }

    #[test]
    fn abandoning_a_retried_read_by_its_callers_number_stops_it() {
        let mut s = ClientSession::new(KeyPair::from_seed([9; 32]), 7, view(4), 1_000);
        let read = s.invoke(0, RequestKind::Unordered, b"get".to_vec());
        s.take_to_send();
        s.on_timeout(1_000);
        assert_eq!(s.take_to_send()[0].request.kind, RequestKind::Ordered);
        s.abandon(read);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn resends_of_an_unanswered_request_back_off_to_eight_intervals() {
        let mut s = ClientSession::new(KeyPair::from_seed([9; 32]), 7, view(4), 1_000);
        s.invoke(0, RequestKind::Ordered, b"put".to_vec());
        s.take_to_send();
        let mut sent_at = Vec::new();
        for now in (0..=40_000).step_by(100) {
            if s.next_deadline().is_some_and(|d| now >= d) {
                s.on_timeout(now);
            }
            if !s.take_to_send().is_empty() {
                sent_at.push(now);
            }
        }
        assert_eq!(
            sent_at,
            [1_000, 3_000, 7_000, 15_000, 23_000, 31_000, 39_000]
        );
    }
}
