//! Replies this replica gave recently, kept so that a retransmission of a request that already
//! executed is answered.
//!
//! The replicated session table caches only a client's last reply. A client with many requests
//! in flight (the etcd gateway) retransmits older ones whose replies it missed: a replica it had
//! no link to when they executed, or a reply dropped on a full queue. Without an answer the
//! client waits for its timeout, and when it needs a quorum of matching replies (a Byzantine
//! replica among them) one silent correct replica is enough to stall it.
//!
//! It also knows which numbers a client's session skipped: a pipelining client's request lost
//! on its way to the leader (or relayed late by a Byzantine replica) is overtaken when a later
//! one of its session executes first, and the session table then refuses it for ever. Without an
//! answer its caller waits for its timeout and gets an error; with f+1 `Overtaken` answers it
//! sends the operation again under a new number.
//!
//! This cache is local, not replicated state: replies are deterministic, so any correct replica
//! answers the same bytes, and every correct replica that executed the skipping request knows
//! the same skipped numbers. A replica that knows neither (it restarted, installed a later
//! state, or evicted them) answers `Past` (`Replica::refuse_stale`). Bounded in entries and
//! bytes, oldest out first.

use std::collections::{HashMap, VecDeque};

use crate::wire::messages::{ClientId, ReplyBody};

/// One reply's identity: the client, its session and the request's sequence number.
type Key = (ClientId, u64, u64);

/// Ranges of skipped sequence numbers kept per client session, the oldest dropped first. A
/// request is usually answered `Overtaken` at once, by the replicas that held it when the later
/// one executed; these ranges are for one that reached no replica in time and comes back on the
/// client's retransmission, a few gaps later (each write after unordered reads leaves a gap).
const SKIPPED_RANGES_PER_SESSION: usize = 64;

#[derive(Debug)]
pub struct RecentReplies {
    replies: HashMap<Key, Vec<u8>>,
    /// Insertion order, for eviction.
    order: VecDeque<Key>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    /// Per client session, the sequence numbers (`[from, to)`) that an executed request of a
    /// higher number skipped: none of them ever ran, and none ever will (the session table
    /// refuses what is older than its last delivered request). Kept for as many sessions as
    /// replies, oldest session out first.
    skipped: HashMap<(ClientId, u64), VecDeque<(u64, u64)>>,
    skipped_order: VecDeque<(ClientId, u64)>,
}

impl RecentReplies {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        RecentReplies {
            replies: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_entries,
            max_bytes,
            skipped: HashMap::new(),
            skipped_order: VecDeque::new(),
        }
    }

    /// Remembers the reply to `(client, session, sequence)`. A reply larger than the whole
    /// budget is not kept.
    pub fn remember(&mut self, client: ClientId, session: u64, sequence: u64, reply: &[u8]) {
        if self.max_entries == 0 || reply.len() > self.max_bytes {
            return;
        }
        let key = (client, session, sequence);
        if self.replies.contains_key(&key) {
            return;
        }
        while self.order.len() >= self.max_entries || self.bytes + reply.len() > self.max_bytes {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(r) = self.replies.remove(&old) {
                self.bytes -= r.len();
            }
        }
        self.bytes += reply.len();
        self.replies.insert(key, reply.to_vec());
        self.order.push_back(key);
    }

    /// Remembers that an executed request of `(client, session)` skipped the numbers in
    /// `[from, to)`: they will never execute (`ReplyBody::Overtaken`).
    pub fn remember_skipped(&mut self, client: ClientId, session: u64, from: u64, to: u64) {
        if self.max_entries == 0 || from >= to {
            return;
        }
        let key = (client, session);
        if !self.skipped.contains_key(&key) {
            while self.skipped_order.len() >= self.max_entries {
                let Some(old) = self.skipped_order.pop_front() else {
                    break;
                };
                self.skipped.remove(&old);
            }
            self.skipped_order.push_back(key);
        }
        let ranges = self.skipped.entry(key).or_default();
        if ranges.len() >= SKIPPED_RANGES_PER_SESSION {
            ranges.pop_front();
        }
        ranges.push_back((from, to));
    }

    /// The answer this replica gave, or would give, to `(client, session, sequence)`, if it
    /// still knows it.
    pub fn get(&self, client: &ClientId, session: u64, sequence: u64) -> Option<ReplyBody> {
        if let Some(result) = self.replies.get(&(*client, session, sequence)) {
            return Some(ReplyBody::Result(result.clone()));
        }
        let ranges = self.skipped.get(&(*client, session))?;
        ranges
            .iter()
            .any(|(from, to)| (*from..*to).contains(&sequence))
            .then_some(ReplyBody::Overtaken)
    }

    pub fn len(&self) -> usize {
        self.replies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replies.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeyPair;

    fn client(i: u8) -> ClientId {
        KeyPair::from_seed([i; 32]).public()
    }

    #[test]
    fn a_reply_is_found_by_client_session_and_sequence() {
        let mut r = RecentReplies::new(10, 1000);
        r.remember(client(1), 5, 7, b"seven");
        assert_eq!(
            r.get(&client(1), 5, 7),
            Some(ReplyBody::Result(b"seven".to_vec()))
        );
        assert_eq!(r.get(&client(1), 5, 8), None);
        assert_eq!(r.get(&client(1), 4, 7), None);
        assert_eq!(r.get(&client(2), 5, 7), None);
    }

    #[test]
    fn the_oldest_go_first_when_entries_or_bytes_run_out() {
        let mut r = RecentReplies::new(3, 1000);
        for seq in 1..=4 {
            r.remember(client(1), 1, seq, b"x");
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.get(&client(1), 1, 1), None);
        assert!(r.get(&client(1), 1, 4).is_some());

        let mut r = RecentReplies::new(100, 10);
        r.remember(client(1), 1, 1, &[0; 6]);
        r.remember(client(1), 1, 2, &[0; 6]);
        assert_eq!(r.get(&client(1), 1, 1), None);
        assert_eq!(r.bytes(), 6);
        // Larger than the whole budget: not kept, and nothing evicted for it.
        r.remember(client(1), 1, 3, &[0; 11]);
        assert_eq!(r.get(&client(1), 1, 3), None);
        assert!(r.get(&client(1), 1, 2).is_some());
    }

    #[test]
    fn numbers_a_later_request_skipped_are_answered_as_overtaken() {
        let mut r = RecentReplies::new(2, 1000);
        r.remember(client(1), 1, 5, b"five");
        r.remember_skipped(client(1), 1, 2, 5);
        assert_eq!(r.get(&client(1), 1, 1), None);
        for seq in 2..5 {
            assert_eq!(r.get(&client(1), 1, seq), Some(ReplyBody::Overtaken));
        }
        assert_eq!(
            r.get(&client(1), 1, 5),
            Some(ReplyBody::Result(b"five".to_vec()))
        );
        assert_eq!(r.get(&client(1), 2, 3), None);
        assert_eq!(r.get(&client(2), 1, 3), None);
        // Sessions are bounded like replies, oldest out first; ranges per session too.
        r.remember_skipped(client(2), 1, 1, 2);
        r.remember_skipped(client(3), 1, 1, 2);
        assert_eq!(r.get(&client(1), 1, 3), None);
        assert_eq!(r.get(&client(3), 1, 1), Some(ReplyBody::Overtaken));
        for i in 0..SKIPPED_RANGES_PER_SESSION as u64 {
            r.remember_skipped(client(3), 1, 10 + 2 * i, 11 + 2 * i);
        }
        assert_eq!(r.get(&client(3), 1, 1), None);
        assert_eq!(r.get(&client(3), 1, 10), Some(ReplyBody::Overtaken));
        assert_eq!(r.get(&client(3), 1, 11), None);
    }

    #[test]
    fn a_repeated_reply_is_kept_once() {
        let mut r = RecentReplies::new(10, 1000);
        r.remember(client(1), 1, 1, b"abc");
        r.remember(client(1), 1, 1, b"abc");
        assert_eq!((r.len(), r.bytes()), (1, 3));
    }
}
