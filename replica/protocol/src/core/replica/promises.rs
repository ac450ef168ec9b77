//! Votes promised before they are cast: a replica with `Config::persist` hands the driver a
//! `Promise` (its votes in the instance in progress and its regency) before any message that
//! casts them, and a restarted replica restores one recovered from disk when it gets back to that
//! instance, so that it never votes twice.

use super::*;

impl Replica {
    /// Messages that show this replica's votes or regency go out only after a promise that
    /// covers them. PROPOSE and SYNC are promised by their maker with the value they carry
    /// (`promise_proposal`), before that value is recorded as written.
    pub(super) fn promise_before(&mut self, msg: &ReplicaMessage) {
        if matches!(
            msg,
            ReplicaMessage::Write { .. }
                | ReplicaMessage::Accept { .. }
                | ReplicaMessage::StopData { .. }
        ) {
            self.promise(None);
        }
    }

    /// Promises `batch` as this replica's write in `epoch` of the current instance, about to be
    /// proposed (as leader, or in a SYNC).
    pub(super) fn promise_proposal(&mut self, epoch: Epoch, batch: &Batch) {
        self.promise(Some((epoch, batch)));
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
            self.instance.record_write(*epoch, self.me, *digest);
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
        }
        self.promised = Some(p.key());
    }

    // ----- timers ----------------------------------------------------------------------------
}
