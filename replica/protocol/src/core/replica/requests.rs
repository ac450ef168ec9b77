//! Client requests: signatures checked once (or trusted from the client's own channel), the
//! pool, and requests adopted from peers that forwarded or carried them.

use super::*;
use crate::wire::messages::Request;

/// What a client of a superseded session is told. Whether its last requests executed before the
/// newer session began is not known to it, so this says only what is certain.
const SUPERSEDED_SESSION: &str = "a newer session of this client key has executed requests \
     since this session began, so the replicas no longer execute this one's (are two processes \
     using the same client key? each needs its own)";

impl Replica {
    /// A request straight from a client. `channel` is the client identity the connection
    /// authenticated (its TLS key), if any: a request on its own client's channel needs no
    /// signature check here.
    pub fn on_request(&mut self, now: u64, channel: Option<ClientId>, req: SignedRequest) {
        self.observe_clock(now);
        let r = &req.request;
        if r.view < self.view.id {
            self.answer(r, ReplyBody::NewView(self.view.clone()));
            return;
        }
        let digest = req.digest();
        if channel == Some(r.client) {
            self.authentic.insert(digest);
        } else if !self.check_signature(&req, &digest) {
            self.reject(None, Rejection::BadRequestSignature);
            return;
        }
        match r.kind {
            RequestKind::Unordered if self.last_decided < self.read_fence => {
                // Not answered: the client orders the read once its patience runs out.
            }
            RequestKind::Unordered => {
                let result = self.service.query(&r.payload);
                self.answer(r, ReplyBody::Result(result));
            }
            RequestKind::Ordered | RequestKind::Reconfig => {
                match self.sessions.freshness(&r.client, r.session, r.sequence) {
                    Freshness::New => self.pool_insert(now, req, digest),
                    Freshness::Repeat => {
                        if let Some(last) =
                            self.sessions.get(&r.client).map(|s| s.last_reply.clone())
                        {
                            self.answer(r, ReplyBody::Result(last));
                        }
                    }
                    Freshness::Stale => self.refuse_stale(r),
                }
            }
        }
        self.advance(now);
    }

    /// A request the session table says can never execute. One from an older session than
    /// the client's newest is answered: the replicas keep one session per client key, so when
    /// two processes share a key the newer one's first request ends the older one's session, and
    /// a silent drop would leave that process retransmitting until its timeout with no hint of
    /// why. An older sequence of the current session is answered from the replies this replica
    /// gave lately (`RecentReplies`), as overtaken if a later one skipped it, and otherwise as
    /// `Past`: this replica's state holds whatever it did, which a client waiting for a quorum of
    /// replicas to hold its write may count.
    fn refuse_stale(&mut self, r: &Request) {
        let superseded = self
            .sessions
            .get(&r.client)
            .is_some_and(|s| r.session < s.session);
        if !superseded {
            // Counted as refused either way: the request does not execute again.
            self.reject(None, Rejection::StaleRequest);
            let body = self
                .recent_replies
                .get(&r.client, r.session, r.sequence)
                .unwrap_or(ReplyBody::Past);
            self.answer(r, body);
            return;
        }
        self.reject(None, Rejection::SupersededSession);
        self.answer(r, ReplyBody::Rejected(SUPERSEDED_SESSION.to_string()));
    }

    /// Sends `body` to the client of `r` as this replica's reply to it.
    fn answer(&mut self, r: &Request, body: ReplyBody) {
        let reply = Reply {
            replica: self.me,
            session: r.session,
            sequence: r.sequence,
            kind: r.kind,
            body,
        };
        self.reply(self.last_decided, r.client, reply);
    }

    /// Checks a request's signature (once: the result is remembered).
    pub(super) fn check_signature(&mut self, req: &SignedRequest, digest: &Digest) -> bool {
        if self.sig_checked.contains(digest) {
            return true;
        }
        let ok = self.keys.get(&req.request.client).is_some_and(|k| {
            crypto::verify_parsed(
                &k,
                Domain::ClientRequest,
                &req.request.to_bytes(),
                &req.signature,
            )
        });
        if ok {
            self.sig_checked.insert(*digest);
            self.authentic.insert(*digest);
        }
        ok
    }

    /// Batch-checks the signatures of `reqs` not checked yet; returns which are valid.
    pub(super) fn check_signatures(&mut self, reqs: &[SignedRequest]) -> Vec<bool> {
        let digests: Vec<Digest> = reqs.iter().map(|r| r.digest()).collect();
        let todo: Vec<usize> = (0..reqs.len())
            .filter(|i| !self.sig_checked.contains(&digests[*i]))
            .collect();
        if todo.is_empty() {
            return vec![true; reqs.len()];
        }
        let encoded: Vec<Vec<u8>> = todo.iter().map(|i| reqs[*i].request.to_bytes()).collect();
        let mut items = Vec::with_capacity(todo.len());
        let mut parse_failed = false;
        for (i, m) in todo.iter().zip(&encoded) {
            match self.keys.get(&reqs[*i].request.client) {
                Some(k) => items.push((k, Domain::ClientRequest, &m[..], reqs[*i].signature)),
                None => parse_failed = true,
            }
        }
        if !parse_failed && crypto::verify_batch_parsed(&items) {
            for i in todo {
                self.sig_checked.insert(digests[i]);
                self.authentic.insert(digests[i]);
            }
            return vec![true; reqs.len()];
        }
        // Some signature is bad: find which, one by one.
        (0..reqs.len())
            .map(|i| self.check_signature(&reqs[i], &digests[i]))
            .collect()
    }

    pub(super) fn pool_insert(&mut self, now: u64, req: SignedRequest, digest: Digest) {
        if let Err(e) = self.pool.insert(
            req,
            digest,
            now,
            self.config.max_pending_per_client,
            self.config.max_pending_total,
        ) {
            match e {
                crate::core::clients::PoolRefusal::Duplicate => {}
                crate::core::clients::PoolRefusal::ClientFull => {
                    self.reject(None, Rejection::ClientQueueFull)
                }
                crate::core::clients::PoolRefusal::PoolFull => {
                    self.reject(None, Rejection::PoolFull)
                }
            }
        }
    }

    /// Requests relayed by a replica (FORWARD, STOP): verified like a client's own.
    pub(super) fn adopt_requests(
        &mut self,
        now: u64,
        from: ReplicaId,
        requests: Vec<SignedRequest>,
    ) {
        for req in requests {
            let r = &req.request;
            if r.kind == RequestKind::Unordered
                || self.sessions.freshness(&r.client, r.session, r.sequence) != Freshness::New
            {
                continue;
            }
            let digest = req.digest();
            if self.pool.contains(&digest) {
                continue;
            }
            if !self.check_signature(&req, &digest) {
                self.reject(Some(from), Rejection::ForgedRelayedRequest);
                continue;
            }
            self.pool_insert(now, req, digest);
        }
    }

    // ----- replica messages ------------------------------------------------------------------
}
