//! A replica's promise: its votes in the instance in progress and its regency, persisted
//! before any message that shows them (see `storage::promise` for why).
//!
//! Its content is exactly what the replica would report in a collect (the regency, the CID,
//! what it accepted and every value it wrote) plus the batches of those values, which a new
//! leader may need from it.
//!
//! The driver adds the decisions before the promise's instance that its log has not made
//! durable yet (`decided`). A restarted replica must not vote again in an instance it decided,
//! and it must not wait for others to tell it the decision either: it may be the only one that
//! decided (the others saw too few ACCEPTs), and then its abstention would stall the instance.
//! With them, log and promise together always reach the promise's instance.

use crate::crypto::Digest;
use crate::wire::codec::{Decode, DecodeError, Encode, Reader, Writer};
use crate::wire::ids::{Cid, Epoch, Regency};
use crate::wire::limits;
use crate::wire::messages::{Batch, Collect, Decision, WriteProof};

/// Decisions a promise carries at most; a log further behind than this is a disk failing to
/// keep up, and the node waits for it before promising.
pub const MAX_PROMISED_DECISIONS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promise {
    pub collect: Collect,
    pub batches: Vec<Batch>,
    /// Decided instances just before `collect.cid` not yet durable in the log, in CID order
    /// (added by the driver; the core leaves it empty).
    pub decided: Vec<Decision>,
    /// The signed WRITEs `collect.accepted` was accepted on, for the collect after a restart.
    /// Written last, and only when there is one, so that promises written before it was added
    /// read the same.
    pub proof: WriteProof,
}

/// What a promise says, without its batches: two promises with the same key say the same
/// thing, because an instance's write set only grows and the CID changes with the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromiseKey {
    pub cid: Cid,
    pub regency: Regency,
    pub writes: usize,
    pub accepted: Option<(Epoch, Digest)>,
}

impl Promise {
    pub fn key(&self) -> PromiseKey {
        PromiseKey {
            cid: self.collect.cid,
            regency: self.collect.regency,
            writes: self.collect.writes.len(),
            accepted: self.collect.accepted,
        }
    }

    pub fn batch_for(&self, digest: &Digest) -> Option<&Batch> {
        self.batches.iter().find(|b| b.digest() == *digest)
    }
}

impl Encode for Promise {
    fn encode(&self, w: &mut Writer) {
        self.collect.encode(w);
        w.len(self.batches.len());
        for b in &self.batches {
            b.encode(w);
        }
        w.len(self.decided.len());
        for d in &self.decided {
            d.encode(w);
        }
        if !self.proof.0.is_empty() {
            self.proof.encode(w);
        }
    }
}

impl Decode for Promise {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let collect = Collect::decode(r)?;
        // One batch per value written or accepted.
        let batches = r.vec(
            "promise batches",
            limits::MAX_WRITE_SET + 1,
            20,
            Batch::decode,
        )?;
        let decided = r.vec(
            "promise decisions",
            MAX_PROMISED_DECISIONS,
            20,
            Decision::decode,
        )?;
        let proof = if r.remaining() > 0 {
            WriteProof::decode(r)?
        } else {
            WriteProof::default()
        };
        Ok(Promise {
            collect,
            batches,
            decided,
            proof,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ids::ReplicaId;

    #[test]
    fn round_trips_and_refuses_trailing_bytes() {
        let batch = Batch {
            timestamp_ms: 7,
            nonce: 9,
            requests: Vec::new(),
        };
        let p = Promise {
            collect: Collect {
                regency: Regency(2),
                replica: ReplicaId(1),
                cid: Cid(41),
                accepted: Some((Regency(1), batch.digest())),
                writes: vec![(Regency(1), batch.digest())],
            },
            batches: vec![batch.clone()],
            decided: Vec::new(),
            proof: WriteProof::default(),
        };
        let bytes = p.to_bytes();
        assert_eq!(Promise::from_bytes(&bytes).unwrap(), p);
        assert_eq!(p.batch_for(&batch.digest()), Some(&batch));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Promise::from_bytes(&longer).is_err());
        assert!(Promise::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    }
}
