//! A bounded memory of client signatures already verified, so that each request is checked
//! once per replica whether it arrives from the client, in a FORWARD, a STOP or a proposal.

use std::collections::{BTreeSet, VecDeque};

use crate::crypto::Digest;

#[derive(Debug)]
pub struct Verified {
    set: BTreeSet<Digest>,
    order: VecDeque<Digest>,
    capacity: usize,
}

impl Verified {
    pub fn new(capacity: usize) -> Self {
        Verified {
            set: BTreeSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.set.contains(d)
    }

    pub fn insert(&mut self, d: Digest) {
        if !self.set.insert(d) {
            return;
        }
        self.order.push_back(d);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}
