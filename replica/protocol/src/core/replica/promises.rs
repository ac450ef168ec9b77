//! Votes promised before they are cast: a replica with `Config::persist` hands the driver a
//! `Promise` (its votes in the instance in progress and its regency) before any message that
//! casts them, and a restarted replica restores one recovered from disk when it gets back to that
//! instance, so that it never votes twice.

use super::*;

impl Replica {
    /// Messages that show this replica's votes or regency go out only after a promise that
    /// covers them. PROPOSE and SYNC are promised by their maker with the value they carry
    /// (`promise_proposal`), before that value is recorded as written. A WRITE the last promise
    /// covers (`write_covered`) needs none of its own: the ACCEPT's promise records it.
    pub(super) fn promise_before(&mut self, msg: &ReplicaMessage) {
        match msg {
            ReplicaMessage::Write { epoch, .. } if self.write_covered(*epoch) => {}
            ReplicaMessage::Write { .. }
            | ReplicaMessage::Accept { .. }
            | ReplicaMessage::StopData { .. } => self.promise(None),
            _ => {}
        }
    }

    /// Promises `batch` as this replica's write in `epoch` of the current instance, about to be
    /// proposed (as leader, or in a SYNC).
    pub(super) fn promise_proposal(&mut self, epoch: Epoch, batch: &Batch) {
        if !self.write_covered(epoch) {
            self.promise(Some((epoch, batch)));
        }
    }

    /// Whether a write in `epoch` of the current instance may leave before a promise of it:
    /// every other member reads signed WRITEs, and the last promise is in that regency and at
    /// most one instance back. That takes one fsync off every instance's path: the ACCEPT's
    /// promise, written before anything shows the acceptance, records the write with it.
    ///
    /// A replica restarted from its disk then knows every instance where it may have written
    /// unpromised (the promise's and the next, in the promise's regency) and writes nothing new
    /// there (`abstains`), so it never writes twice. What it forgot can no longer vouch for a
    /// value at a leader change (`sync::certified_value`); the signatures of the WRITEs a
    /// correct replica accepted on, kept in its promise and shown in its collect, vouch instead.
    pub(super) fn write_covered(&self, epoch: Epoch) -> bool {
        self.signs_writes
            && self
                .promised
                .is_some_and(|k| k.regency == epoch && k.cid.next() >= self.current_cid())
    }

    /// A restarted replica's abstention: no new write in an instance where it may have written
    /// before the crash without a promise (`write_covered`). Its regency changes with the next
    /// leader, and the others' timers bring that about if they need its vote.
    pub(super) fn abstains(&self, epoch: Epoch) -> bool {
        self.no_write
            .is_some_and(|(r, upto)| epoch == r && self.current_cid() <= upto)
    }

    /// Whether every other member of the view reads protocol 2, as the driver sees its links.
    /// Only then are WRITEs signed and sent before their promise: a protocol-1 replica gets
    /// them unsigned and writes unsigned, so a value accepted on its WRITEs may lack the f+1
    /// signatures that vouch for it once its other writers forgot theirs.
    pub fn set_peers_read_signed_writes(&mut self, all: bool) {
        self.signs_writes = all;
    }

    pub(super) fn promise(&mut self, proposal: Option<(Epoch, &Batch)>) {
        if !self.config.persist || self.replaying {
            return;
        }
        let extra = proposal
            .filter(|(e, _)| self.instance.wrote_in(*e).is_none())
            .map(|(e, b)| (e, b.digest(), b));
        let key = PromiseKey {
            cid: self.current_cid(),
            regency: self.regency,
            writes: self.instance.my_writes.len() + usize::from(extra.is_some()),
            accepted: self.instance.my_accepted,
        };
        if self.promised == Some(key) {
            return;
        }
        self.promised = Some(key);
        let p = self.instance_promise(extra);
        self.outputs.push(Output::Promise(p));
        self.promised_at(key.cid);
    }

    /// This replica's votes in the instance in progress, with `extra` (a value about to be
    /// proposed) as one more write.
    pub(super) fn instance_promise(&self, extra: Option<(Epoch, Digest, &Batch)>) -> Promise {
        let mut writes = self.instance.my_writes.clone();
        if let Some((e, d, _)) = extra {
            writes.push((e, d));
        }
        let mut batches: Vec<Batch> = Vec::new();
        let wanted = writes
            .iter()
            .map(|(_, d)| *d)
            .chain(self.instance.my_accepted.map(|(_, d)| d));
        for d in wanted {
            if batches.iter().any(|b| b.digest() == d) {
                continue;
            }
            let batch = match extra {
                Some((_, ed, b)) if ed == d => Some(b),
                _ => self.instance.batch_for(&d),
            };
            if let Some(b) = batch {
                batches.push(b.clone());
            }
        }
        Promise {
            collect: Collect {
                regency: self.regency,
                replica: self.me,
                cid: self.current_cid(),
                accepted: self.instance.my_accepted,
                writes,
            },
            batches,
            decided: Vec::new(),
            proof: if self.instance.my_accepted.is_some() {
                self.instance.accepted_proof.clone()
            } else {
                WriteProof::default()
            },
        }
    }

    /// Start-up: take back the votes promised before the restart. A promise for an instance
    /// already decided (and logged) is moot; one for a later instance than the log reaches
    /// waits, and the replica votes in nothing until it gets there.
    pub(super) fn recover_promise(&mut self, p: Promise) {
        if p.collect.cid < self.current_cid() {
            return;
        }
        let regency = p.collect.regency;
        if regency > self.regency {
            self.learn_regency(regency);
            // Without a write in it, the promise may be the STOPDATA's and the SYNC not seen
            // yet: wait for it, or for a decision proven in this regency (`learn_regency`).
            self.synchronizing = !p.collect.writes.iter().any(|(e, _)| *e == regency);
        }
        self.promised = Some(p.key());
        self.restored = Some(p);
        self.reach_restored();
    }

    /// Restores a recovered promise once the instance it is about is the current one.
    pub(super) fn reach_restored(&mut self) {
        let current = self.current_cid();
        let Some(p) = self.restored.take_if(|p| p.collect.cid <= current) else {
            return;
        };
        if p.collect.cid < self.current_cid() {
            return;
        }
        for (epoch, digest) in &p.collect.writes {
            if let Some(b) = p.batch_for(digest) {
                self.instance
                    .proposals
                    .entry(*epoch)
                    .or_insert_with(|| (*digest, b.clone()));
            }
            self.instance.record_write(*epoch, self.me, *digest, None);
        }
        self.instance.my_writes = p.collect.writes.clone();
        if let Some((epoch, digest)) = p.collect.accepted {
            let cid = self.current_cid();
            let signature = self
                .key
                .sign(Domain::Accept, &accept_signing_bytes(cid, epoch, &digest));
            let vote = Vote {
                digest,
                signature,
                verified: true,
            };
            self.instance
                .record_accept(epoch, self.me, vote, self.regency);
            self.instance.my_accepted = Some((epoch, digest));
            self.instance.accepted_proof = p.proof.clone();
        }
        self.promised = Some(p.key());
    }

    // ----- timers ----------------------------------------------------------------------------
}
