//! Views for the core's unit tests.

use crate::crypto::KeyPair;
use crate::view::{Member, View};
use crate::wire::ids::{ReplicaId, ViewId};

/// View 0 of `n` members tolerating `f`, with member i's key pair from seed `[i + 1; 32]`: tests
/// sign as any member with the keys returned beside it.
pub(crate) fn keyed_view(n: usize, f: usize) -> (View, Vec<KeyPair>) {
    let keys: Vec<KeyPair> = (0..n)
        .map(|i| KeyPair::from_seed([i as u8 + 1; 32]))
        .collect();
    let members = keys
        .iter()
        .enumerate()
        .map(|(i, k)| Member {
            id: ReplicaId(i as u32),
            address: String::new(),
            key: k.public(),
        })
        .collect();
    (View::new(ViewId(0), f, members).expect("valid view"), keys)
}
