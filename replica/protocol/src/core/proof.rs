//! Checking what replicas signed against a view: a decision's proof (a quorum of ACCEPTs from
//! distinct members) and a COLLECT's signature. The messages are plain data in `wire`; whether
//! they are valid depends on the membership, which is the core's business.

use crate::crypto::{self, Digest, Domain};
use crate::view::View;
use crate::wire::codec::Encode;
use crate::wire::ids::{Cid, ReplicaId};
use crate::wire::messages::{accept_signing_bytes, Decision, Proof, SignedCollect};

impl Decision {
    /// True iff the proof holds a quorum of valid ACCEPTs from distinct members of `view` for
    /// this batch's digest.
    pub fn verify(&self, view: &View) -> bool {
        verify_proof(view, self.cid, &self.batch.digest(), &self.proof)
    }
}

/// Checks a decision proof for `digest` at `cid` against `view`.
pub fn verify_proof(view: &View, cid: Cid, digest: &Digest, proof: &Proof) -> bool {
    let msg = accept_signing_bytes(cid, proof.epoch, digest);
    let mut seen: Vec<ReplicaId> = Vec::with_capacity(proof.accepts.len());
    let mut items = Vec::with_capacity(proof.accepts.len());
    for (id, sig) in &proof.accepts {
        let Some(key) = view.verifying_key(*id) else {
            return false;
        };
        if seen.contains(id) {
            return false;
        }
        seen.push(*id);
        items.push((*key, Domain::Accept, msg.as_slice(), *sig));
    }
    seen.len() >= view.quorum() && crypto::verify_batch_parsed(&items)
}

impl SignedCollect {
    pub fn verify(&self, view: &View) -> bool {
        view.key(self.collect.replica).is_some_and(|k| {
            crypto::verify(
                k,
                Domain::Collect,
                &self.collect.to_bytes(),
                &self.signature,
            )
        })
    }
}
