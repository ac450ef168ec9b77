//! Per-client state: the session and last delivered sequence (the deduplication that makes
//! requests execute at most once), the reply cache, and the pool of requests waiting to be
//! ordered, drained round-robin across clients so no client starves another.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;

use crate::crypto::Digest;
use crate::wire::codec::{Decode, DecodeError, Encode, Reader, Writer};
use crate::wire::limits;
use crate::wire::messages::{ClientId, SignedRequest};

/// What the replicated state remembers per client. Part of the deterministic state: it decides
/// which requests execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub session: u64,
    pub last_delivered: u64,
    /// The reply to `last_delivered`, resent when the client retransmits it.
    pub last_reply: Vec<u8>,
}

/// How a request stands against the delivered history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Not yet delivered: may be ordered.
    New,
    /// The last delivered request: answer from the cache.
    Repeat,
    /// Older than the last delivered one, or from an older session: a replay.
    Stale,
}

#[derive(Debug, Default, Clone)]
pub struct Sessions {
    by_client: BTreeMap<ClientId, Session>,
}

impl Sessions {
    pub fn freshness(&self, client: &ClientId, session: u64, sequence: u64) -> Freshness {
        match self.by_client.get(client) {
            None => Freshness::New,
            Some(s) if session > s.session => Freshness::New,
            Some(s) if session < s.session => Freshness::Stale,
            Some(s) if sequence > s.last_delivered => Freshness::New,
            Some(s) if sequence == s.last_delivered => Freshness::Repeat,
            Some(_) => Freshness::Stale,
        }
    }

    pub fn get(&self, client: &ClientId) -> Option<&Session> {
        self.by_client.get(client)
    }

    pub fn record(&mut self, client: ClientId, session: u64, sequence: u64, reply: Vec<u8>) {
        self.by_client.insert(
            client,
            Session {
                session,
                last_delivered: sequence,
                last_reply: reply,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }
}

/// In client order (a `BTreeMap`), so that correct replicas encode identical bytes.
impl Encode for Sessions {
    fn encode(&self, w: &mut Writer) {
        w.len(self.by_client.len());
        for (client, s) in &self.by_client {
            client.encode(w);
            w.u64(s.session);
            w.u64(s.last_delivered);
            w.bytes(&s.last_reply);
        }
    }
}

impl Decode for Sessions {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let entries = r.vec("sessions", limits::MAX_SESSIONS, 52, |r| {
            let client = ClientId::decode(r)?;
            let session = Session {
                session: r.u64()?,
                last_delivered: r.u64()?,
                last_reply: r.bytes_vec("cached reply", limits::MAX_RESULT)?,
            };
            Ok((client, session))
        })?;
        let mut by_client = BTreeMap::new();
        let mut prev: Option<ClientId> = None;
        for (client, session) in entries {
            // Strictly increasing keys: the encoding of a session table is canonical.
            if prev.is_some_and(|p| p >= client) {
                return Err(DecodeError::Invalid("session table not in client order"));
            }
            prev = Some(client);
            by_client.insert(client, session);
        }
        Ok(Sessions { by_client })
    }
}

/// A request waiting to be ordered.
#[derive(Debug, Clone)]
pub struct Pending {
    pub request: SignedRequest,
    pub arrived_us: u64,
    pub forwarded: bool,
    /// The pool's batch count when the request arrived (or its timers restarted).
    batches_at_arrival: u64,
    /// Its client's requests ahead of it then: a leader that serves each client once per round
    /// owes it one round per request ahead, and one for itself.
    ahead_in_client: u64,
}

/// Why the pool refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolRefusal {
    Duplicate,
    ClientFull,
    PoolFull,
}

/// Requests waiting for ordering, indexed by digest, per client in (session, sequence) order,
/// and by arrival time for the request timer.
#[derive(Debug, Default)]
pub struct Pool {
    entries: BTreeMap<Digest, Pending>,
    by_client: BTreeMap<ClientId, BTreeMap<(u64, u64), Digest>>,
    by_arrival: BTreeSet<(u64, Digest)>,
    unforwarded: BTreeSet<(u64, Digest)>,
    /// The client served last in the last batch; the next batch starts after it.
    cursor: Option<ClientId>,
    /// Batches executed, and when the last one was: under load requests wait long behind a
    /// leader that is busy serving everyone in turn, and these tell that leader from one that
    /// stopped or that leaves a request out (see [`Pool::rounds_waited`]).
    batches: u64,
    last_batch_us: u64,
    /// The most clients with a waiting request at once since the timers last restarted: the
    /// longest round a fair leader can need.
    clients_high: usize,
    /// Payload bytes waiting, and the most allowed (None: no bound): the count bounds alone
    /// would let clients park 100,000 requests of the largest value in memory.
    bytes: usize,
    max_bytes: Option<usize>,
    /// The times between executed batches while requests waited, newest last, each with the
    /// timer generation (one per regency) it was measured in: how long this load makes a batch
    /// take, which the request timer allows a leader before it counts as stalled.
    intervals: VecDeque<(u64, u64)>,
    /// Whether requests were waiting when the last batch was executed (the time to the next
    /// one is then a batch interval, not an idle spell).
    waiting_at_last_batch: bool,
    generation: u64,
    /// [`Pool::batch_interval`], kept up to date where the intervals change: the request
    /// timer asks for it every time the replica computes its next deadline.
    interval_estimate: Option<u64>,
}

/// Batch intervals kept for [`Pool::batch_interval`].
const INTERVALS_KEPT: usize = 32;
/// Intervals from earlier regencies needed before they alone make the estimate.
const EARLIER_INTERVALS_NEEDED: usize = 4;

impl Pool {
    pub fn with_max_bytes(max_bytes: usize) -> Self {
        Pool {
            max_bytes: Some(max_bytes),
            ..Pool::default()
        }
    }

    /// Payload bytes of the waiting requests.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.entries.contains_key(digest)
    }

    pub fn insert(
        &mut self,
        request: SignedRequest,
        digest: Digest,
        now_us: u64,
        per_client: usize,
        total: usize,
    ) -> Result<(), PoolRefusal> {
        if self.entries.contains_key(&digest) {
            return Err(PoolRefusal::Duplicate);
        }
        let size = request.request.payload.len();
        if self.entries.len() >= total
            || self
                .max_bytes
                .is_some_and(|m| !self.entries.is_empty() && self.bytes.saturating_add(size) > m)
        {
            return Err(PoolRefusal::PoolFull);
        }
        let r = &request.request;
        let q = self.by_client.entry(r.client).or_default();
        let key = (r.session, r.sequence);
        if q.contains_key(&key) {
            // Same client, session and sequence, different bytes: keep the first.
            return Err(PoolRefusal::Duplicate);
        }
        if q.len() >= per_client {
            return Err(PoolRefusal::ClientFull);
        }
        let ahead_in_client = q.range(..key).count() as u64;
        q.insert(key, digest);
        self.bytes = self.bytes.saturating_add(size);
        self.clients_high = self.clients_high.max(self.by_client.len());
        self.by_arrival.insert((now_us, digest));
        self.unforwarded.insert((now_us, digest));
        self.entries.insert(
            digest,
            Pending {
                request,
                arrived_us: now_us,
                forwarded: false,
                batches_at_arrival: self.batches,
                ahead_in_client,
            },
        );
        Ok(())
    }

    /// Removes an executed (or invalidated) request.
    pub fn remove(&mut self, digest: &Digest) -> Option<Pending> {
        let p = self.entries.remove(digest)?;
        self.bytes = self.bytes.saturating_sub(p.request.request.payload.len());
        self.by_arrival.remove(&(p.arrived_us, *digest));
        self.unforwarded.remove(&(p.arrived_us, *digest));
        let r = &p.request.request;
        if let Some(q) = self.by_client.get_mut(&r.client) {
            q.remove(&(r.session, r.sequence));
            if q.is_empty() {
                self.by_client.remove(&r.client);
            }
        }
        Some(p)
    }

    /// Drops the client's requests the session table says can no longer execute, and returns
    /// those of its current session that never did: older than the last one delivered, so a
    /// later request of theirs executed first (`ReplyBody::Overtaken`). Every request in the
    /// pool is unexecuted (execution removes it), so none of these ever ran.
    pub fn prune_client(&mut self, client: &ClientId, sessions: &Sessions) -> Vec<SignedRequest> {
        let Some(q) = self.by_client.get(client) else {
            return Vec::new();
        };
        let current = sessions.get(client).map(|s| (s.session, s.last_delivered));
        let dead: Vec<(bool, Digest)> = q
            .iter()
            .filter(|((session, seq), _)| {
                sessions.freshness(client, *session, *seq) != Freshness::New
            })
            .map(|((session, seq), d)| {
                let overtaken = current.is_some_and(|(s, last)| *session == s && *seq < last);
                (overtaken, *d)
            })
            .collect();
        let mut overtaken = Vec::new();
        for (o, d) in dead {
            if let Some(p) = self.remove(&d) {
                if o {
                    overtaken.push(p.request);
                }
            }
        }
        overtaken
    }

    /// Drops every request the session table says was delivered (after a state transfer).
    pub fn prune_all(&mut self, sessions: &Sessions) {
        let clients: Vec<ClientId> = self.by_client.keys().copied().collect();
        for c in clients {
            // After a state transfer this replica answers nothing for the requests it drops: it
            // did not see the order they were overtaken in.
            let _ = self.prune_client(&c, sessions);
        }
    }

    /// Takes up to `max_requests` / `max_bytes` of requests, one per client per round, starting
    /// after the client served last in the previous batch, so that each batch goes on with the
    /// round where the last one stopped. A request that does not fit in the bytes left waits for
    /// a later batch, and with it its client's later ones (a client's requests go in order),
    /// while other clients' smaller requests still go: a client of small values is never held up
    /// behind a row of values of the maximum size. Requests stay in the pool until executed.
    pub fn select(&mut self, max_requests: usize, max_bytes: usize) -> Vec<SignedRequest> {
        let start = self.cursor;
        let order: Vec<&BTreeMap<(u64, u64), Digest>> = match start {
            Some(c) => self
                .by_client
                .range((Bound::Excluded(c), Bound::Unbounded))
                .chain(self.by_client.range(..=c))
                .map(|(_, q)| q)
                .collect(),
            None => self.by_client.values().collect(),
        };
        let mut iters: Vec<_> = order.into_iter().map(|q| Some(q.values())).collect();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut last: Option<ClientId> = None;
        'rounds: loop {
            let mut any = false;
            for slot in iters.iter_mut() {
                let Some(it) = slot else {
                    continue;
                };
                let Some(d) = it.next() else {
                    *slot = None;
                    continue;
                };
                let Some(p) = self.entries.get(d) else {
                    continue;
                };
                if out.len() >= max_requests {
                    break 'rounds;
                }
                let size = p.request.request.payload.len();
                if bytes + size > max_bytes && !out.is_empty() {
                    *slot = None;
                    continue;
                }
                bytes += size;
                last = Some(p.request.request.client);
                out.push(p.request.clone());
                any = true;
            }
            if !any {
                break;
            }
        }
        if last.is_some() {
            self.cursor = last;
        }
        out
    }

    /// Counts an executed batch (every replica executes the same ones, in the same order).
    pub fn batch_executed(&mut self, now_us: u64) {
        if self.waiting_at_last_batch {
            if self.intervals.len() == INTERVALS_KEPT {
                self.intervals.pop_front();
            }
            self.intervals
                .push_back((self.generation, now_us.saturating_sub(self.last_batch_us)));
            self.interval_estimate = self.estimate_interval();
        }
        self.batches += 1;
        self.last_batch_us = now_us;
        self.waiting_at_last_batch = !self.entries.is_empty();
    }

    /// The median time between executed batches while requests waited: measured under
    /// earlier regencies' leaders once there are a few such intervals, so that a leader
    /// cannot stretch its own allowance by slowing down; before that, under the current one
    /// too. `None` before any.
    pub fn batch_interval(&self) -> Option<u64> {
        self.interval_estimate
    }

    fn estimate_interval(&self) -> Option<u64> {
        let earlier: Vec<u64> = self
            .intervals
            .iter()
            .filter(|(g, _)| *g < self.generation)
            .map(|(_, us)| *us)
            .collect();
        let mut sample = if earlier.len() >= EARLIER_INTERVALS_NEEDED {
            earlier
        } else {
            self.intervals.iter().map(|(_, us)| *us).collect()
        };
        sample.sort_unstable();
        sample.get(sample.len() / 2).copied()
    }

    /// When the last batch was executed (0 before any).
    pub fn last_batch_us(&self) -> u64 {
        self.last_batch_us
    }

    /// How many full rounds of batches the oldest waiting request has seen go by without it,
    /// beyond those its own client's earlier requests account for. A leader serves the clients
    /// with waiting requests one per batch at least, each once per round (`select`), so a round
    /// is at most one batch per client that waited meanwhile. A leader that has the request
    /// and serves fairly leaves it out of at most one round (the one it arrived in at the
    /// leader, which may be later than here); two or more mean it leaves it out.
    pub fn rounds_waited(&self) -> u64 {
        let Some((_, d)) = self.by_arrival.first() else {
            return 0;
        };
        let Some(p) = self.entries.get(d) else {
            return 0;
        };
        let round = self.clients_high as u64 + 1;
        let waited = self.batches.saturating_sub(p.batches_at_arrival);
        (waited / round).saturating_sub(p.ahead_in_client)
    }

    /// The arrival time of the oldest waiting request.
    pub fn oldest_arrival(&self) -> Option<u64> {
        self.by_arrival.first().map(|(t, _)| *t)
    }

    /// The arrival time of the oldest request not yet forwarded to the leader.
    pub fn oldest_unforwarded(&self) -> Option<u64> {
        self.unforwarded.first().map(|(t, _)| *t)
    }

    /// Requests that arrived at or before `cutoff_us` and were not forwarded yet, at most `max`
    /// and `max_bytes` of payload (but always one); marks them. The rest stay due.
    pub fn take_unforwarded(
        &mut self,
        cutoff_us: u64,
        max: usize,
        max_bytes: usize,
    ) -> Vec<SignedRequest> {
        let mut bytes = 0usize;
        let due: Vec<(u64, Digest)> = self
            .unforwarded
            .iter()
            .take_while(|(t, _)| *t <= cutoff_us)
            .take(max)
            .take_while(|(_, d)| self.fits(d, &mut bytes, max_bytes))
            .copied()
            .collect();
        let mut out = Vec::with_capacity(due.len());
        for key in due {
            self.unforwarded.remove(&key);
            if let Some(p) = self.entries.get_mut(&key.1) {
                p.forwarded = true;
                out.push(p.request.clone());
            }
        }
        out
    }

    /// The oldest requests, at most `max` and `max_bytes` of payload (but always one), for a
    /// STOP message.
    pub fn oldest(&self, max: usize, max_bytes: usize) -> Vec<SignedRequest> {
        let mut bytes = 0usize;
        self.by_arrival
            .iter()
            .take(max)
            .take_while(|(_, d)| self.fits(d, &mut bytes, max_bytes))
            .filter_map(|(_, d)| self.entries.get(d).map(|p| p.request.clone()))
            .collect()
    }

    /// Whether the request `d` still fits in `max_bytes` after the `bytes` taken so far (the
    /// first always does); counts it if so.
    fn fits(&self, d: &Digest, bytes: &mut usize, max_bytes: usize) -> bool {
        let size = self
            .entries
            .get(d)
            .map_or(0, |p| p.request.request.payload.len());
        if *bytes > 0 && bytes.saturating_add(size) > max_bytes {
            return false;
        }
        *bytes = bytes.saturating_add(size).max(1);
        true
    }

    /// Restarts every request's clock: after a leader change the new leader gets a full timeout.
    pub fn restart_timers(&mut self, now_us: u64) {
        // The time from the last batch to the new leader's first spans the leader change.
        self.generation += 1;
        self.waiting_at_last_batch = false;
        self.interval_estimate = self.estimate_interval();
        self.by_arrival.clear();
        self.unforwarded.clear();
        self.clients_high = self.by_client.len();
        for q in self.by_client.values() {
            for (ahead, d) in q.values().enumerate() {
                if let Some(p) = self.entries.get_mut(d) {
                    p.arrived_us = now_us;
                    p.forwarded = false;
                    p.batches_at_arrival = self.batches;
                    p.ahead_in_client = ahead as u64;
                }
                self.by_arrival.insert((now_us, *d));
                self.unforwarded.insert((now_us, *d));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{KeyPair, Signature};
    use crate::wire::ids::ViewId;
    use crate::wire::messages::{Request, RequestKind};

    fn req(client: u8, seq: u64, size: usize) -> SignedRequest {
        SignedRequest {
            request: Request {
                client: KeyPair::from_seed([client; 32]).public(),
                session: 1,
                sequence: seq,
                kind: RequestKind::Ordered,
                view: ViewId(0),
                payload: vec![0; size],
            },
            signature: Signature([0; 64]),
        }
    }

    #[test]
    fn pruning_returns_the_requests_a_later_one_of_their_session_overtook() {
        let mut pool = Pool::default();
        let mut older_session = req(1, 9, 0);
        older_session.request.session = 0;
        for r in [
            req(1, 3, 0),
            req(1, 4, 0),
            req(1, 6, 0),
            older_session.clone(),
        ] {
            pool.insert(r.clone(), r.digest(), 0, 10, 100).unwrap();
        }
        let mut sessions = Sessions::default();
        // Request 5 executed while 3 and 4 waited (it was relayed to the leader ahead of them).
        sessions.record(req(1, 5, 0).request.client, 1, 5, Vec::new());
        let overtaken = pool.prune_client(&req(1, 5, 0).request.client, &sessions);
        let seqs: Vec<u64> = overtaken.iter().map(|r| r.request.sequence).collect();
        assert_eq!(seqs, vec![3, 4]);
        // 6 may still run; the older session's request is gone but was superseded, not overtaken.
        assert!(pool.contains(&req(1, 6, 0).digest()));
        assert!(!pool.contains(&older_session.digest()));
        assert!(pool
            .prune_client(&req(1, 5, 0).request.client, &sessions)
            .is_empty());
    }

    #[test]
    fn batches_take_one_request_per_client_per_round() {
        let mut pool = Pool::default();
        for seq in 1..=3 {
            let r = req(1, seq, 0);
            pool.insert(r.clone(), r.digest(), 0, 10, 100).unwrap();
        }
        let r = req(2, 1, 0);
        pool.insert(r.clone(), r.digest(), 0, 10, 100).unwrap();
        let b = pool.select(2, 1 << 20);
        let clients: Vec<_> = b.iter().map(|r| r.request.client).collect();
        assert_ne!(clients[0], clients[1], "two clients share the first round");
    }

    #[test]
    fn round_robin_start_moves_between_batches() {
        let mut pool = Pool::default();
        for c in 1..=3 {
            let r = req(c, 1, 0);
            pool.insert(r.clone(), r.digest(), 0, 10, 100).unwrap();
        }
        let first = pool.select(1, 1 << 20)[0].request.client;
        let second = pool.select(1, 1 << 20)[0].request.client;
        assert_ne!(first, second);
    }

    #[test]
    fn round_robin_survives_the_last_served_client_leaving() {
        let mut pool = Pool::default();
        let a = req(1, 1, 0);
        let b = req(2, 1, 0);
        pool.insert(a.clone(), a.digest(), 0, 10, 100).unwrap();
        pool.insert(b.clone(), b.digest(), 0, 10, 100).unwrap();
        let first = pool.select(1, 1 << 20);
        pool.remove(&first[0].digest());
        assert_eq!(
            pool.select(1, 1 << 20).len(),
            1,
            "the other client is still served"
        );
    }

    #[test]
    fn stop_and_forward_carry_a_bounded_number_of_bytes_but_always_one_request() {
        let mut pool = Pool::default();
        for c in 1..=10 {
            let r = req(c, 1, 1000);
            pool.insert(r.clone(), r.digest(), c.into(), 10, 100)
                .unwrap();
        }
        assert_eq!(pool.oldest(1024, 3500).len(), 3);
        assert_eq!(pool.oldest(1024, 10).len(), 1, "one request always goes");
        assert_eq!(pool.oldest(2, 1 << 20).len(), 2);
        let first = pool.take_unforwarded(100, 1024, 2000);
        assert_eq!(first.len(), 2);
        let rest = pool.take_unforwarded(100, 1024, 1 << 20);
        assert_eq!(rest.len(), 8, "what did not fit is forwarded next time");
    }

    #[test]
    fn a_request_counts_rounds_missed_only_once_each_client_had_its_turn() {
        let mut pool = Pool::default();
        // Ten clients waiting: a round is up to eleven batches.
        for c in 1..=10 {
            let r = req(c, 1, 0);
            pool.insert(r.clone(), r.digest(), 0, 10, 100).unwrap();
        }
        // A second request of the oldest client arrives at once: one round more is its due.
        let second = req(1, 2, 0);
        pool.insert(second.clone(), second.digest(), 0, 10, 100)
            .unwrap();
        for _ in 0..10 {
            pool.batch_executed(1);
        }
        assert_eq!(pool.rounds_waited(), 0, "a fair leader may need these ten");
        for _ in 0..12 {
            pool.batch_executed(2);
        }
        assert_eq!(pool.rounds_waited(), 2, "22 batches are two rounds of 11");
        assert_eq!(pool.last_batch_us(), 2);
        // The new leader's clock starts over, and the client's second request is owed a round
        // more than its first.
        pool.restart_timers(3);
        assert_eq!(pool.rounds_waited(), 0);
        let first = pool.by_arrival.first().map(|(_, d)| *d).unwrap();
        let oldest_is_second = first == second.digest();
        for _ in 0..22 {
            pool.batch_executed(4);
        }
        assert_eq!(pool.rounds_waited(), if oldest_is_second { 1 } else { 2 });
    }

    #[test]
    fn batch_intervals_count_only_while_requests_wait_and_prefer_earlier_regencies() {
        let mut pool = Pool::default();
        assert_eq!(pool.batch_interval(), None);
        // Nothing waited after the batch at 1: the time to the next is idle, not an interval.
        pool.batch_executed(1_000);
        for seq in [1, 2] {
            let r = req(1, seq, 10);
            pool.insert(r.clone(), r.digest(), 2_000, 10, 100).unwrap();
        }
        pool.batch_executed(50_000);
        assert_eq!(pool.batch_interval(), None);
        pool.remove(&req(1, 1, 10).digest());
        pool.batch_executed(50_300);
        assert_eq!(pool.batch_interval(), Some(300));
        // Under a new regency its own intervals count until earlier ones are enough...
        pool.restart_timers(60_000);
        pool.batch_executed(60_100);
        pool.batch_executed(69_100);
        assert_eq!(pool.batch_interval(), Some(9_000));
        // ...after which a leader's own slow batches do not stretch the estimate.
        for t in [70_000, 70_300, 70_600] {
            pool.batch_executed(t);
        }
        pool.restart_timers(80_000);
        for t in [80_100, 100_000, 120_000, 140_000] {
            pool.batch_executed(t);
        }
        assert_eq!(pool.batch_interval(), Some(300), "{:?}", pool.intervals);
    }

    #[test]
    fn batch_respects_the_byte_bound_but_always_takes_one_request() {
        let mut pool = Pool::default();
        for seq in 1..=3 {
            let r = req(1, seq, 100);
            pool.insert(r.clone(), r.digest(), 0, 10, 100).unwrap();
        }
        assert_eq!(pool.select(10, 250).len(), 2);
        assert_eq!(pool.select(10, 50).len(), 1);
    }

    #[test]
    fn a_small_request_is_not_held_up_behind_requests_that_do_not_fit() {
        let mut pool = Pool::default();
        // Four clients of values near the byte bound, and one of a small value that the round
        // reaches last (clients are served in key order): it goes in the first batch all the
        // same.
        let mut seeds: Vec<u8> = (1..=5).collect();
        seeds.sort_by_key(|&c| req(c, 1, 0).request.client);
        for &c in &seeds[..4] {
            let r = req(c, 1, 900);
            pool.insert(r.clone(), r.digest(), 0, 10, 100).unwrap();
        }
        let small = req(seeds[4], 1, 10);
        pool.insert(small.clone(), small.digest(), 0, 10, 100)
            .unwrap();
        let b = pool.select(100, 1000);
        assert_eq!(b.len(), 2, "one large request and the small one");
        assert!(b.iter().any(|r| r.digest() == small.digest()));
    }

    #[test]
    fn a_client_whose_next_request_does_not_fit_sends_none_of_its_later_ones() {
        let mut pool = Pool::default();
        // Whichever client the round starts with, one of the two large requests does not fit.
        let big = req(1, 1, 600);
        let after = req(1, 2, 10);
        let first = req(2, 1, 500);
        for r in [&big, &after, &first] {
            pool.insert(r.clone(), r.digest(), 0, 10, 100).unwrap();
        }
        let b = pool.select(100, 1000);
        let digests: Vec<_> = b.iter().map(|r| r.digest()).collect();
        assert!(
            !digests.contains(&after.digest()) || digests.contains(&big.digest()),
            "client 1's second request went before its first"
        );
    }

    #[test]
    fn each_batch_goes_on_with_the_round_where_the_last_one_stopped() {
        let mut pool = Pool::default();
        for c in 1..=6 {
            let r = req(c, 1, 0);
            pool.insert(r.clone(), r.digest(), 0, 10, 100).unwrap();
        }
        // Nothing is executed meanwhile: every client keeps its request pending.
        let mut seen = BTreeSet::new();
        for _ in 0..3 {
            seen.extend(pool.select(2, 1 << 20).iter().map(|r| r.request.client));
        }
        assert_eq!(seen.len(), 6, "three batches of two served six clients");
    }

    #[test]
    fn per_client_and_total_bounds_refuse_requests() {
        let mut pool = Pool::default();
        let a = req(1, 1, 0);
        let b = req(1, 2, 0);
        let c = req(2, 1, 0);
        pool.insert(a.clone(), a.digest(), 0, 1, 2).unwrap();
        assert_eq!(
            pool.insert(a.clone(), a.digest(), 0, 1, 2),
            Err(PoolRefusal::Duplicate)
        );
        assert_eq!(
            pool.insert(b.clone(), b.digest(), 0, 1, 2),
            Err(PoolRefusal::ClientFull)
        );
        pool.insert(c.clone(), c.digest(), 0, 1, 2).unwrap();
        assert_eq!(pool.remove(&a.digest()).map(|p| p.request), Some(a));
        pool.insert(b.clone(), b.digest(), 0, 1, 2).unwrap();
        let d = req(3, 1, 0);
        assert_eq!(
            pool.insert(d.clone(), d.digest(), 0, 1, 2),
            Err(PoolRefusal::PoolFull)
        );
    }

    #[test]
    fn the_pool_refuses_what_would_take_it_past_its_bytes_but_always_holds_one() {
        let mut pool = Pool::with_max_bytes(2500);
        let big = req(1, 1, 4000);
        pool.insert(big.clone(), big.digest(), 0, 10, 100).unwrap();
        let small = req(2, 1, 10);
        assert_eq!(
            pool.insert(small.clone(), small.digest(), 0, 10, 100),
            Err(PoolRefusal::PoolFull)
        );
        pool.remove(&big.digest());
        assert_eq!(pool.bytes(), 0);
        for c in 2..=3 {
            let r = req(c, 1, 1000);
            pool.insert(r.clone(), r.digest(), 0, 10, 100).unwrap();
        }
        let third = req(4, 1, 1000);
        assert_eq!(
            pool.insert(third.clone(), third.digest(), 0, 10, 100),
            Err(PoolRefusal::PoolFull)
        );
        assert_eq!(pool.bytes(), 2000);
    }

    #[test]
    fn sessions_refuse_replays_and_older_sessions() {
        let mut s = Sessions::default();
        let c = KeyPair::from_seed([1; 32]).public();
        assert_eq!(s.freshness(&c, 5, 1), Freshness::New);
        s.record(c, 5, 3, vec![]);
        assert_eq!(s.freshness(&c, 5, 3), Freshness::Repeat);
        assert_eq!(s.freshness(&c, 5, 2), Freshness::Stale);
        assert_eq!(s.freshness(&c, 5, 4), Freshness::New);
        assert_eq!(s.freshness(&c, 4, 9), Freshness::Stale);
        assert_eq!(s.freshness(&c, 6, 0), Freshness::New);
    }
}
