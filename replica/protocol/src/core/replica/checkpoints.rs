//! Checkpoints and state transfer: a checkpoint every `checkpoint_period` decisions, advertised
//! to peers; a replica behind the newest checkpoint that f+1 replicas vouch for fetches it in
//! chunks, checks its digest and installs it (or repairs its own diverged state with it).

use super::*;

impl Replica {
    pub(super) fn take_checkpoint(&mut self, cid: Cid) {
        self.bytes_since_checkpoint = 0;
        let ordering = OrderingState {
            cid,
            timestamp_ms: self.last_timestamp_ms,
            view: &self.view,
            view_since: self.views.view_since,
            previous_view: self.views.previous_view.as_ref(),
            sessions: &self.sessions,
        };
        // A restarted replica replaying its log is not ordering yet: nothing waits on it.
        if self.config.defer_checkpoints && !self.replaying {
            let pending =
                PendingCheckpoint::freeze(&ordering, &*self.service, self.checkpoint_epoch);
            self.outputs.push(Output::EncodeCheckpoint(pending));
            return;
        }
        let bytes = encode_state(&ordering, &*self.service);
        let view = self.view.clone();
        self.checkpoint_taken(Checkpoint::new(cid, &view, bytes), view);
    }

    /// A checkpoint handed out with `Output::EncodeCheckpoint`, encoded. Encodings come back
    /// in the order they were handed out; one of a state replaced since is dropped.
    pub fn on_checkpoint_encoded(&mut self, encoded: EncodedCheckpoint) {
        if encoded.epoch != self.checkpoint_epoch {
            return;
        }
        self.checkpoint_taken(encoded.checkpoint, encoded.view);
    }

    fn checkpoint_taken(&mut self, cp: Checkpoint, view: View) {
        let cid = cp.meta.cid;
        self.events.push(Event::CheckpointTaken {
            cid,
            digest: cp.meta.digest,
        });
        self.stats.checkpoints += 1;
        self.keep_checkpoint(&cp);
        let oldest = self.checkpoints.front().map_or(cid, |(m, _)| m.cid);
        // Decisions from the older checkpoint on stay: laggards can still replay them, and the
        // checkpoint's own decision proves where this replica stands in a leader change.
        self.log = self.log.split_off(&oldest);
        self.trim_unproven();
        self.outputs.push(Output::Checkpoint {
            checkpoint: cp,
            view,
            trim_before: oldest,
        });
        if !self.replaying {
            // Lets the others check their state against this one (and this one against theirs).
            self.advertise(None);
        }
    }

    pub(super) fn keep_checkpoint(&mut self, cp: &Checkpoint) {
        self.checkpoints.retain(|(m, _)| m.cid != cp.meta.cid);
        self.checkpoints
            .push_back((cp.meta, HeldBytes::Memory(cp.bytes.clone())));
        while self.checkpoints.len() > CHECKPOINTS_KEPT {
            self.checkpoints.pop_front();
        }
    }

    /// Tells one replica (or all) which checkpoints this one can serve.
    pub(super) fn advertise(&mut self, to: Option<ReplicaId>) {
        if self.checkpoints.is_empty() {
            return;
        }
        let checkpoints: Vec<CheckpointMeta> = self.checkpoints.iter().map(|(m, _)| *m).collect();
        let msg = ReplicaMessage::CheckpointInfo {
            checkpoints,
            first_logged: self.log.keys().next().copied(),
        };
        match to {
            Some(id) => self.send(id, msg),
            None => self.broadcast(msg),
        }
    }

    /// Starts a state transfer if this replica needs one and f+1 replicas vouch for a
    /// checkpoint that would do.
    pub(super) fn consider_transfer(&mut self, now: u64) {
        if self.transfer.in_progress().is_some() {
            return;
        }
        let current = self.current_cid();
        let far = self.config.checkpoint_period.max(1);
        let joining = self.joining;
        let min_view = self.view.id;
        // Decisions are cheaper to replay than state to copy, while enough replicas still log
        // them; past a checkpoint period, or once they trimmed them, state it is.
        let trimmed = self.transfer.trimmed_past(&self.view, self.me, current) >= self.view.weak();
        let choice = self.transfer.choose(&self.view, self.me, |m| {
            if joining {
                m.view >= min_view && m.cid >= current
            } else {
                m.cid >= current && (trimmed || m.cid.0 >= current.0.saturating_add(far))
            }
        });
        let choice = match choice {
            Some(c) => Some(c),
            None => match self.checkpoints.back().map(|(m, _)| *m) {
                Some(mine) => {
                    let c = self.transfer.contradicted(&self.view, self.me, &mine);
                    if c.is_some() {
                        self.events.push(Event::Diverged { cid: mine.cid });
                        self.reject(None, Rejection::DivergedCheckpoint);
                    }
                    c
                }
                None => None,
            },
        };
        let Some((meta, sources)) = choice else {
            return;
        };
        let reqs = self.transfer.start(now, meta, sources);
        if let Some((from, _)) = reqs.first() {
            self.events.push(Event::TransferStarted {
                cid: meta.cid,
                len: meta.len,
                from: *from,
            });
        }
        for (to, msg) in reqs {
            self.send(to, msg);
        }
    }

    /// A transfer of a checkpoint this replica has reached by deciding is of no use, unless it
    /// repairs this replica's own diverged checkpoint at that CID: installing it would only roll
    /// the state back (seed 40345 n=7: a transfer started while behind finished 260 ms after
    /// decisions had overtaken it).
    pub(super) fn drop_overtaken_transfer(&mut self) {
        let Some(fetch) = self.transfer.in_progress().copied() else {
            return;
        };
        let reached = self.last_decided.is_some_and(|l| fetch.cid <= l);
        let repair = self
            .checkpoints
            .iter()
            .any(|(m, _)| m.cid == fetch.cid && m.digest != fetch.digest);
        if reached && !repair {
            self.transfer.cancel();
        }
    }

    pub(super) fn serve_chunk(
        &mut self,
        to: ReplicaId,
        cid: Cid,
        digest: Digest,
        offset: u64,
        len: u32,
    ) {
        let Some((meta, bytes)) = self
            .checkpoints
            .iter()
            .find(|(m, _)| m.cid == cid && m.digest == digest)
        else {
            // Most likely trimmed since the requester chose it: tell it what is on offer now,
            // or it would keep asking for a checkpoint no one holds.
            self.reject(Some(to), Rejection::UnknownCheckpoint);
            self.advertise(Some(to));
            return;
        };
        let total = meta.len;
        if offset >= total {
            self.reject(Some(to), Rejection::ChunkOutOfRange);
            return;
        }
        let end = offset
            .saturating_add((len as u64).min(limits::MAX_CHUNK as u64))
            .min(total);
        let Some(data) = bytes.read(offset, (end - offset) as usize) else {
            // The driver's copy failed to read back; the requester moves to another source.
            self.reject(None, Rejection::CheckpointUnreadable);
            return;
        };
        self.send(
            to,
            ReplicaMessage::Chunk {
                cid,
                digest,
                offset,
                data,
            },
        );
    }

    pub(super) fn on_chunk_outcome(&mut self, now: u64, outcome: ChunkOutcome) {
        match outcome {
            ChunkOutcome::Ignored => {}
            ChunkOutcome::More(reqs) => {
                for (to, msg) in reqs {
                    self.send(to, msg);
                }
            }
            ChunkOutcome::BadSource {
                source,
                proven,
                requests,
            } => {
                let reason = if proven {
                    Rejection::BadCheckpointBytes
                } else {
                    Rejection::CheckpointDigestMismatch
                };
                self.reject(Some(source), reason);
                for (to, msg) in requests {
                    self.send(to, msg);
                }
            }
            ChunkOutcome::Complete(meta, bytes) => {
                let cid = meta.cid;
                match self.install_state(bytes, meta, true) {
                    Ok(()) => {
                        self.stats.state_transfers += 1;
                        self.events.push(Event::StateInstalled { cid });
                        // The decision of the checkpoint itself, and whatever followed; asked
                        // again, as at start-up, until a peer answers (this one question may
                        // be lost). Past the first answer, `behind_peers` keeps it asking
                        // while the votes it saw show it is still behind.
                        self.catchup.last_catchup_us = Some(now);
                        self.catchup.startup_probes = STARTUP_PROBES;
                        self.broadcast(ReplicaMessage::DecisionRequest { from: cid });
                    }
                    Err(_) => self.reject(None, Rejection::UndecodableCheckpoint),
                }
            }
        }
    }

    /// Replaces the state with a checkpoint (whose digest was agreed on, or read from this
    /// replica's own disk). `announce` tells the driver to store it.
    pub(super) fn install_state(
        &mut self,
        bytes: Vec<u8>,
        meta: CheckpointMeta,
        announce: bool,
    ) -> Result<(), String> {
        let st = ReplicaState::decode_from(&bytes).map_err(|e| e.to_string())?;
        self.service
            .restore(st.service)
            .map_err(|e| e.to_string())?;
        self.checkpoint_epoch += 1;
        let cid = st.cid;
        let meta = CheckpointMeta {
            cid,
            view: st.view.id,
            ..meta
        };
        let view_changed = st.view != self.view;
        self.sessions = st.sessions;
        self.bytes_since_checkpoint = 0;
        self.view = st.view;
        self.views.view_since = st.view_since;
        self.views.previous_view = st.previous_view;
        self.last_timestamp_ms = st.timestamp_ms;
        // Own decisions after the checkpoint are proven: replay them rather than fetch them.
        let mine = self.log.split_off(&cid.next());
        self.log.clear();
        self.last_decided = Some(cid);
        // A checkpoint at or behind the instance in progress (a repair of diverged state) must
        // not erase this replica's votes there: replaying its log brings it back to that
        // instance, where it would otherwise vote again, and differently (seed 40345 n=7).
        let voted = !self.instance.my_writes.is_empty() || self.instance.my_accepted.is_some();
        if voted && self.instance.cid > cid && self.restored.is_none() {
            self.restored = Some(self.instance_promise(None));
        }
        self.instance = Instance::new(cid.next());
        self.reach_restored();
        self.catchup.future = self.catchup.future.split_off(&cid.next());
        let ahead = std::mem::take(&mut self.catchup.decided_ahead).split_off(&cid.next());
        self.catchup.decided_ahead = mine.into_iter().chain(ahead).collect();
        self.trim_unproven();
        self.lc.pending_sync = None;
        self.pool.prune_all(&self.sessions);
        self.joining = false;
        self.transfer.retain_members(&self.view);
        let cp = Checkpoint {
            meta,
            bytes: Arc::new(bytes),
        };
        self.keep_checkpoint(&cp);
        self.checkpoints.retain(|(m, _)| m.cid <= cid);
        if announce {
            self.outputs.push(Output::StateInstalled(cp));
            if view_changed {
                self.outputs.push(Output::ViewChanged(self.view.clone()));
            }
        }
        Ok(())
    }
}
