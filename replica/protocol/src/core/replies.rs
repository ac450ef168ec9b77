//! Replies this replica gave recently, kept so that a retransmission of a request that already
//! executed is answered.
//!
//! The replicated session table caches only a client's last reply. A client with many requests
//! in flight (the etcd gateway) retransmits older ones whose replies it missed: a replica it had
//! no link to when they executed, or a reply dropped on a full queue. Without an answer the
//! client waits for its timeout, and when it needs a quorum of matching replies (a Byzantine
//! replica among them) one silent correct replica is enough to stall it.
//!
//! This cache is local, not replicated state: replies are deterministic, so any correct replica
//! answers the same bytes, and a replica that lacks one (it restarted, or evicted it) stays
//! silent as before. Bounded in entries and bytes, oldest out first.

use std::collections::{HashMap, VecDeque};

use crate::wire::messages::ClientId;

/// One reply's identity: the client, its session and the request's sequence number.
type Key = (ClientId, u64, u64);

#[derive(Debug)]
pub struct RecentReplies {
    replies: HashMap<Key, Vec<u8>>,
    /// Insertion order, for eviction.
    order: VecDeque<Key>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl RecentReplies {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        RecentReplies {
            replies: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_entries,
            max_bytes,
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

    pub fn get(&self, client: &ClientId, session: u64, sequence: u64) -> Option<&[u8]> {
        self.replies
            .get(&(*client, session, sequence))
            .map(Vec::as_slice)
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
        assert_eq!(r.get(&client(1), 5, 7), Some(&b"seven"[..]));
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
    fn a_repeated_reply_is_kept_once() {
        let mut r = RecentReplies::new(10, 1000);
        r.remember(client(1), 1, 1, b"abc");
        r.remember(client(1), 1, 1, b"abc");
        assert_eq!((r.len(), r.bytes()), (1, 3));
    }
}
