//! The state of one consensus instance (one CID) at this replica: the proposals it holds per
//! epoch, the WRITEs and ACCEPTs it received, and what it wrote and accepted itself (its
//! collect, should the leader change).

use std::collections::BTreeMap;

use crate::crypto::{Digest, Signature};
use crate::wire::ids::{Cid, Epoch, ReplicaId};
use crate::wire::limits;
use crate::wire::messages::{Batch, WriteProof};

/// Epochs of ACCEPTs kept below the current one; older accepts are useless in practice and
/// keeping them all would let a peer grow memory by inventing epochs.
const ACCEPT_EPOCHS_KEPT: u32 = 8;

#[derive(Debug, Clone)]
pub struct Instance {
    pub cid: Cid,
    /// Valid proposals held, at most one per epoch (from that epoch's leader or its SYNC).
    pub proposals: BTreeMap<Epoch, (Digest, Batch)>,
    /// WRITEs received (this replica's own among them), with their signatures when signed.
    pub writes: BTreeMap<Epoch, BTreeMap<ReplicaId, (Digest, Option<Signature>)>>,
    /// ACCEPTs received, each from the authenticated channel of its sender; the flag says
    /// whether its signature was checked (it need not be to count towards deciding, only to
    /// be shown to others as proof).
    pub accepts: BTreeMap<Epoch, BTreeMap<ReplicaId, Vote>>,
    /// Senders whose ACCEPT in that epoch carried a bad signature: one is enough, their next
    /// one is not looked at.
    pub forged: Vec<(Epoch, ReplicaId)>,
    /// Every (epoch, value) this replica wrote: its write set.
    pub my_writes: Vec<(Epoch, Digest)>,
    /// The last (epoch, value) this replica accepted; `None` = never accepted.
    pub my_accepted: Option<(Epoch, Digest)>,
    /// The signed WRITEs `my_accepted` was accepted on, unchecked (a leader checks them).
    pub accepted_proof: WriteProof,
    /// When this replica first held a proposal for the instance (for the latency metric).
    pub started_us: Option<u64>,
}

/// One ACCEPT: the value, its signature, and whether that signature was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vote {
    pub digest: Digest,
    pub signature: Signature,
    pub verified: bool,
}

/// What recording a vote found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    New,
    Duplicate,
    /// The sender already voted differently in this epoch.
    Equivocation,
}

impl Instance {
    pub fn new(cid: Cid) -> Self {
        Instance {
            cid,
            proposals: BTreeMap::new(),
            writes: BTreeMap::new(),
            accepts: BTreeMap::new(),
            forged: Vec::new(),
            my_writes: Vec::new(),
            my_accepted: None,
            accepted_proof: WriteProof::default(),
            started_us: None,
        }
    }

    pub fn batch_for(&self, digest: &Digest) -> Option<&Batch> {
        self.proposals
            .values()
            .find(|(d, _)| d == digest)
            .map(|(_, b)| b)
    }

    pub fn record_write(
        &mut self,
        epoch: Epoch,
        from: ReplicaId,
        digest: Digest,
        signature: Option<Signature>,
    ) -> Recorded {
        let votes = self.writes.entry(epoch).or_default();
        match votes.get_mut(&from) {
            Some((d, sig)) if *d == digest => {
                // A repeat may bring the signature the first one (protocol 1) lacked.
                if sig.is_none() {
                    *sig = signature;
                }
                Recorded::Duplicate
            }
            Some(_) => Recorded::Equivocation,
            None => {
                votes.insert(from, (digest, signature));
                Recorded::New
            }
        }
    }

    /// The signed WRITEs of `digest` at `epoch`, signatures unchecked.
    pub fn signed_writes(&self, epoch: Epoch, digest: &Digest) -> WriteProof {
        WriteProof(self.writes.get(&epoch).map_or_else(Vec::new, |v| {
            v.iter()
                .filter(|(_, (d, _))| d == digest)
                .filter_map(|(id, (_, sig))| sig.map(|s| (*id, s)))
                .collect()
        }))
    }

    /// The signature of `from`'s WRITE at `epoch`, if it was signed.
    pub fn write_signature(&self, epoch: Epoch, from: ReplicaId) -> Option<Signature> {
        self.writes
            .get(&epoch)
            .and_then(|v| v.get(&from))
            .and_then(|(_, s)| *s)
    }

    /// Whether an ACCEPT from `from` in `epoch` would be stored: not for an epoch too old to
    /// keep, nor a second one from the same sender. Checked before the signature, so that
    /// repeats cost no verification.
    pub fn would_record_accept(&self, epoch: Epoch, from: ReplicaId, current: Epoch) -> bool {
        epoch.0.saturating_add(ACCEPT_EPOCHS_KEPT) >= current.0
            && !self
                .accepts
                .get(&epoch)
                .is_some_and(|v| v.contains_key(&from))
            && !self.forged.contains(&(epoch, from))
    }

    pub fn record_accept(
        &mut self,
        epoch: Epoch,
        from: ReplicaId,
        vote: Vote,
        current: Epoch,
    ) -> Recorded {
        if epoch.0.saturating_add(ACCEPT_EPOCHS_KEPT) < current.0
            || self.forged.contains(&(epoch, from))
        {
            return Recorded::Duplicate;
        }
        let votes = self.accepts.entry(epoch).or_default();
        let r = match votes.get(&from) {
            Some(v) if v.digest == vote.digest => Recorded::Duplicate,
            Some(_) => Recorded::Equivocation,
            None => {
                votes.insert(from, vote);
                Recorded::New
            }
        };
        let floor = crate::wire::ids::Regency(current.0.saturating_sub(ACCEPT_EPOCHS_KEPT));
        self.accepts = self.accepts.split_off(&floor);
        self.forged.retain(|(e, _)| *e >= floor);
        r
    }

    pub fn write_count(&self, epoch: Epoch, digest: &Digest) -> usize {
        self.writes
            .get(&epoch)
            .map_or(0, |v| v.values().filter(|(d, _)| d == digest).count())
    }

    /// ACCEPTs for `digest` at `epoch`: (sender, signature, verified).
    pub fn accepts_for(&self, epoch: Epoch, digest: &Digest) -> Vec<(ReplicaId, Signature, bool)> {
        self.accepts.get(&epoch).map_or_else(Vec::new, |v| {
            v.iter()
                .filter(|(_, v)| v.digest == *digest)
                .map(|(id, v)| (*id, v.signature, v.verified))
                .collect()
        })
    }

    pub fn mark_verified(&mut self, epoch: Epoch, from: ReplicaId) {
        if let Some(v) = self.accepts.get_mut(&epoch).and_then(|m| m.get_mut(&from)) {
            v.verified = true;
        }
    }

    /// Drops an ACCEPT whose signature failed, and refuses its sender's next one in that epoch.
    pub fn drop_forged(&mut self, epoch: Epoch, from: ReplicaId) {
        if let Some(m) = self.accepts.get_mut(&epoch) {
            m.remove(&from);
        }
        if !self.forged.contains(&(epoch, from)) {
            self.forged.push((epoch, from));
        }
    }

    pub fn wrote_in(&self, epoch: Epoch) -> Option<Digest> {
        self.my_writes
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|(_, d)| *d)
    }

    /// Batches of every value in this replica's collect, for the new leader.
    /// The batches this replica's collect names, for its STOPDATA: the accepted one first, then
    /// the written ones newest epoch first, while they fit in
    /// [`limits::MAX_STOPDATA_VALUE_BYTES`] (the first always goes). The value a new leader
    /// must re-propose is the accepted or the newest written one; several distinct older ones
    /// appear only after equivocation, and must not make the message too big to send.
    pub fn collect_values(&self) -> Vec<Batch> {
        let mut out: Vec<Batch> = Vec::new();
        let mut seen: Vec<Digest> = Vec::new();
        let mut writes = self.my_writes.clone();
        writes.sort_by_key(|w| std::cmp::Reverse(w.0));
        let wanted = self
            .my_accepted
            .map(|(_, d)| d)
            .into_iter()
            .chain(writes.into_iter().map(|(_, d)| d));
        let mut bytes = 0usize;
        for d in wanted {
            if seen.contains(&d) {
                continue;
            }
            seen.push(d);
            if let Some(b) = self.batch_for(&d) {
                let size = b.payload_bytes();
                if !out.is_empty() && bytes.saturating_add(size) > limits::MAX_STOPDATA_VALUE_BYTES
                {
                    continue;
                }
                bytes = bytes.saturating_add(size);
                out.push(b.clone());
            }
        }
        out
    }
}
