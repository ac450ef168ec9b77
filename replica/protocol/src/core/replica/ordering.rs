//! Ordering one instance: PROPOSE, WRITE and the checks on a proposed batch, the leader's choice
//! of a batch, deciding, and executing a decided batch in order.

use super::*;

impl Replica {
    pub(super) fn on_consensus(&mut self, now: u64, from: ReplicaId, msg: ReplicaMessage) {
        let epoch = match &msg {
            ReplicaMessage::Propose { epoch, .. }
            | ReplicaMessage::Write { epoch, .. }
            | ReplicaMessage::Accept { epoch, .. } => *epoch,
            _ => return,
        };
        let accept = matches!(msg, ReplicaMessage::Accept { .. });
        if epoch > self.regency || (epoch == self.regency && self.synchronizing && !accept) {
            if self.catchup.future_epoch.len() >= MAX_FUTURE_EPOCH_MESSAGES {
                self.reject(Some(from), Rejection::FutureEpochBufferFull);
            } else {
                self.catchup.future_epoch.push((from, msg));
            }
            return;
        }
        match msg {
            ReplicaMessage::Propose { epoch, batch, .. } => {
                if epoch < self.regency {
                    return;
                }
                if from != self.view.leader(epoch) {
                    self.reject(Some(from), Rejection::ProposeFromNonLeader);
                    return;
                }
                let digest = batch.digest();
                if let Some((d, _)) = self.instance.proposals.get(&epoch) {
                    if *d != digest {
                        self.reject(Some(from), Rejection::EquivocatingPropose);
                    }
                    return;
                }
                if let Err(reason) = self.validate_batch(now, &batch) {
                    self.reject(Some(from), reason);
                    self.suspect(now, self.regency.next(), Suspicion::Rejected(reason));
                    return;
                }
                self.stats.proposals += 1;
                self.hold_and_write(epoch, digest, batch);
            }
            ReplicaMessage::Write {
                epoch,
                digest,
                signature,
                ..
            } => {
                if epoch < self.regency {
                    return;
                }
                // Stored unchecked: only a leader change looks at it, and checks it then.
                if self.instance.record_write(epoch, from, digest, signature)
                    == Recorded::Equivocation
                {
                    self.reject(Some(from), Rejection::EquivocatingWrite);
                }
                self.check_writes(epoch);
            }
            ReplicaMessage::Accept {
                cid,
                epoch,
                digest,
                signature,
            } => self.on_accept(from, cid, epoch, digest, signature),
            _ => {}
        }
    }

    /// Holds a valid proposal for `epoch` and WRITEs it (a replica writes once per epoch).
    pub(super) fn hold_and_write(&mut self, epoch: Epoch, digest: Digest, batch: Batch) {
        self.instance.proposals.insert(epoch, (digest, batch));
        self.instance.started_us.get_or_insert(self.clock_us);
        if self.instance.wrote_in(epoch).is_some() || !self.participating() || self.abstains(epoch)
        {
            return;
        }
        self.instance.my_writes.push((epoch, digest));
        let cid = self.current_cid();
        let signature = self.signs_writes.then(|| {
            self.key
                .sign(Domain::Write, &accept_signing_bytes(cid, epoch, &digest))
        });
        self.instance
            .record_write(epoch, self.me, digest, signature);
        self.broadcast(ReplicaMessage::Write {
            cid,
            epoch,
            digest,
            signature,
        });
        self.check_writes(epoch);
        self.check_accepts(epoch, digest);
    }

    pub(super) fn check_writes(&mut self, epoch: Epoch) {
        if self.synchronizing || epoch != self.regency || !self.participating() {
            return;
        }
        let Some(mine) = self.instance.wrote_in(epoch) else {
            return;
        };
        if self.instance.my_accepted.is_some_and(|(e, _)| e >= epoch) {
            return;
        }
        if self.instance.write_count(epoch, &mine) < self.view.quorum() {
            return;
        }
        let cid = self.current_cid();
        let signature = self
            .key
            .sign(Domain::Accept, &accept_signing_bytes(cid, epoch, &mine));
        self.instance.my_accepted = Some((epoch, mine));
        self.instance.accepted_proof = self.instance.signed_writes(epoch, &mine);
        let vote = Vote {
            digest: mine,
            signature,
            verified: true,
        };
        self.instance
            .record_accept(epoch, self.me, vote, self.regency);
        self.broadcast(ReplicaMessage::Accept {
            cid,
            epoch,
            digest: mine,
            signature,
        });
        self.check_accepts(epoch, mine);
    }

    /// Checks a proposed batch against the state after the previous instance.
    pub(super) fn validate_batch(&mut self, now: u64, batch: &Batch) -> Result<(), Rejection> {
        if batch.requests.len() > self.config.max_batch_requests {
            return Err(Rejection::BatchTooLarge);
        }
        if batch.timestamp_ms < self.last_timestamp_ms {
            return Err(Rejection::TimestampWentBackwards);
        }
        if batch.timestamp_ms > now_ms(now).saturating_add(self.config.max_clock_skew_ms) {
            return Err(Rejection::TimestampInFuture);
        }
        let mut last_in_batch: BTreeMap<ClientId, (u64, u64)> = BTreeMap::new();
        let mut unverified: Vec<SignedRequest> = Vec::new();
        for req in batch.requests.iter() {
            let r = &req.request;
            if r.kind == RequestKind::Unordered {
                return Err(Rejection::UnorderedRequestInBatch);
            }
            let key = (r.session, r.sequence);
            if let Some(prev) = last_in_batch.get(&r.client) {
                if key <= *prev {
                    return Err(Rejection::DuplicateRequestInBatch);
                }
            } else if self.sessions.freshness(&r.client, r.session, r.sequence) != Freshness::New {
                return Err(Rejection::ReplayedRequest);
            }
            last_in_batch.insert(r.client, key);
            if !self.authentic.contains(&req.digest()) {
                unverified.push(req.clone());
            }
        }
        if self.check_signatures(&unverified).iter().all(|ok| *ok) {
            Ok(())
        } else {
            Err(Rejection::ForgedRequestInBatch)
        }
    }

    pub(super) fn maybe_propose(&mut self, now: u64) {
        if !self.may_lead()
            || !self.participating()
            || self.synchronizing
            || self.pool.is_empty()
            || self.instance.proposals.contains_key(&self.regency)
            || self.instance.wrote_in(self.regency).is_some()
        {
            return;
        }
        let requests = self.checked_selection();
        if requests.is_empty() {
            return;
        }
        let batch = self.fresh_batch(now, requests);
        let digest = batch.digest();
        let cid = self.current_cid();
        let epoch = self.regency;
        // The PROPOSE leaves before the leader's own promise of it: its fsync then overlaps
        // the network and the followers' fsyncs instead of preceding them. A leader that crashes
        // before the promise is durable may have proposed a value it no longer knows, which is
        // why a restarted replica never leads in the regency it restarted in (`lead_after`).
        self.broadcast(ReplicaMessage::Propose {
            cid,
            epoch,
            batch: batch.clone(),
        });
        self.promise_proposal(epoch, &batch);
        self.stats.proposals += 1;
        self.hold_and_write(epoch, digest, batch);
    }

    /// Requests for the next batch, each with a checked signature; forgeries leave the pool.
    pub(super) fn checked_selection(&mut self) -> Vec<SignedRequest> {
        // Clamped: a bigger batch could not travel in a SYNC or STOPDATA.
        let max_bytes = self.config.max_batch_bytes.min(limits::MAX_BATCH_BYTES);
        let requests = self.pool.select(self.config.max_batch_requests, max_bytes);
        let ok = self.check_signatures(&requests);
        let mut out = Vec::with_capacity(requests.len());
        for (req, ok) in requests.into_iter().zip(ok) {
            if ok {
                out.push(req);
            } else {
                self.pool.remove(&req.digest());
                self.reject(None, Rejection::BadRequestSignature);
            }
        }
        out
    }

    pub(super) fn fresh_batch(&self, now: u64, requests: Vec<SignedRequest>) -> Batch {
        let timestamp_ms = now_ms(now).max(self.last_timestamp_ms);
        // The nonce seed is fixed by the instance so that replicas need not trust the leader
        // for it beyond the decided value itself.
        let nonce = u64::from_le_bytes(
            Digest::of_parts(&[
                &self.current_cid().0.to_le_bytes(),
                &timestamp_ms.to_le_bytes(),
            ])
            .0[..8]
                .try_into()
                .unwrap_or([0; 8]),
        );
        Batch {
            timestamp_ms,
            nonce,
            requests,
        }
    }

    // ----- decision and execution ------------------------------------------------------------

    /// Executes the next decision. `proven`: its proof was checked (else `prove` checks it
    /// before it is shown to anyone).
    pub(super) fn decide(&mut self, decision: Decision, proven: bool) {
        let cid = decision.cid;
        debug_assert_eq!(
            Some(cid),
            self.last_decided.map_or(Some(Cid(0)), |c| Some(c.next()))
        );
        let digest = decision.batch.digest();
        self.execute(cid, &decision.batch);
        let payload: u64 = decision
            .batch
            .requests
            .iter()
            .map(|r| r.request.payload.len() as u64)
            .sum();
        self.bytes_since_checkpoint = self.bytes_since_checkpoint.saturating_add(payload);
        self.events.push(Event::Decided {
            cid,
            digest,
            requests: decision.batch.requests.len(),
            timestamp_ms: decision.batch.timestamp_ms,
            latency_us: self
                .instance
                .started_us
                .map(|t| self.clock_us.saturating_sub(t)),
            unchecked: !proven,
        });
        self.stats.decided += 1;
        self.learn_regency(decision.proof.epoch);
        self.last_decided = Some(cid);
        self.last_timestamp_ms = self.last_timestamp_ms.max(decision.batch.timestamp_ms);
        if self.config.persist && !self.replaying {
            self.outputs.push(Output::Persist(decision.clone()));
        }
        self.log.insert(cid, decision);
        if proven {
            self.unproven.remove(&cid);
        } else {
            self.unproven.insert(cid);
        }
        while self.log.len() as u64 > self.config.log_retention {
            self.log.pop_first();
        }
        self.instance = Instance::new(cid.next());
        self.reach_restored();
        self.settle_at = None;
        self.last_round = None;
        self.catchup.future = self.catchup.future.split_off(&cid.next());
        self.catchup.decided_ahead = self.catchup.decided_ahead.split_off(&cid.next());
        self.trim_unproven();
        let reconfigured = match self.views.pending_view.take() {
            Some(v) => {
                self.install_view(cid, v);
                true
            }
            None => false,
        };
        // After a view change too, so that a joiner finds a checkpoint of the view naming it.
        if reconfigured
            || (cid.0 + 1) % self.config.checkpoint_period.max(1) == 0
            || self.bytes_since_checkpoint >= self.config.checkpoint_bytes.max(1)
        {
            self.take_checkpoint(cid);
        }
        self.drop_overtaken_transfer();
        if !self.synchronizing {
            self.progress_in_regency = true;
            self.timeout_us = self.config.request_timeout_us;
            // Progress: a suspicion of this leader was wrong. The vote stands (votes never go
            // down) but is no longer pushed.
            self.lc.stop_active = false;
            self.lc.stop_retransmit_at = None;
        }
    }

    /// A decision proven at a later epoch than this replica's regency shows that a quorum
    /// installed that regency and finished its synchronization: take part in it. The SYNC that
    /// installed it may belong to a view this replica never held (a joiner, a restarted
    /// replica), and then this is the only way it learns the regency; without it, it buffers
    /// every message of the regency and takes no part until the next leader change.
    /// The same holds for a decision proven in this replica's own regency while it still waits
    /// for that regency's SYNC (a replica restarted between its STOPDATA and the SYNC).
    pub(super) fn learn_regency(&mut self, epoch: Epoch) {
        if epoch < self.regency || (epoch == self.regency && !self.synchronizing) {
            return;
        }
        let new = epoch > self.regency;
        self.regency = epoch;
        self.synchronizing = false;
        self.lc.sync_behind = false;
        if self
            .lc
            .pending_sync
            .as_ref()
            .is_some_and(|(_, m)| sync_regency(m) <= epoch)
        {
            self.lc.pending_sync = None;
        }
        self.lc.current_sync = None;
        self.lc.stop_votes.retain(|_, r| *r > epoch);
        self.lc.stopdata.retain(|_, (r, _)| *r > epoch);
        self.lc.stop_sent = self.lc.stop_sent.max(epoch);
        self.lc.stop_active = self.lc.stop_sent > epoch;
        if !self.lc.stop_active {
            self.lc.stop_retransmit_at = None;
        }
        self.regency_started_us = self.clock_us;
        self.pool.restart_timers(self.clock_us);
        if new {
            self.stats.regencies_installed += 1;
            self.events.push(Event::RegencyInstalled {
                regency: epoch,
                leader: self.view.leader(epoch),
            });
        }
    }

    pub(super) fn execute(&mut self, cid: Cid, batch: &Batch) {
        for (i, req) in batch.requests.iter().enumerate() {
            let r = &req.request;
            let digest = req.digest();
            if let Some(p) = self.pool.remove(&digest) {
                let waited = self.clock_us.saturating_sub(p.arrived_us);
                self.sample_latency(waited);
            }
            if self.sessions.freshness(&r.client, r.session, r.sequence) != Freshness::New {
                continue;
            }
            let result = if r.kind == RequestKind::Reconfig {
                self.execute_reconfig(&r.client, &r.payload).to_bytes()
            } else {
                let ctx = ExecContext {
                    cid: cid.0,
                    timestamp_ms: batch.timestamp_ms,
                    index: i as u32,
                };
                self.service.execute(&ctx, &r.payload)
            };
            self.stats.executed_requests += 1;
            // Every number of this session that this execution skips can never run now: the
            // client gets `Overtaken` for any it asks about, whether or not this replica ever
            // held it (it may have been lost on its way here).
            let last = self
                .sessions
                .get(&r.client)
                .filter(|s| s.session == r.session)
                .map_or(0, |s| s.last_delivered);
            self.recent_replies
                .remember_skipped(r.client, r.session, last + 1, r.sequence);
            self.sessions
                .record(r.client, r.session, r.sequence, result.clone());
            self.recent_replies
                .remember(r.client, r.session, r.sequence, &result);
            let overtaken = self.pool.prune_client(&r.client, &self.sessions);
            if self.replaying {
                continue;
            }
            for o in overtaken {
                let o = o.request;
                self.reply(
                    Some(cid),
                    o.client,
                    Reply {
                        replica: self.me,
                        session: o.session,
                        sequence: o.sequence,
                        kind: o.kind,
                        body: ReplyBody::Overtaken,
                    },
                );
            }
            self.reply(
                Some(cid),
                r.client,
                Reply {
                    replica: self.me,
                    session: r.session,
                    sequence: r.sequence,
                    kind: r.kind,
                    body: ReplyBody::Result(result),
                },
            );
        }
        self.pool.batch_executed(self.clock_us);
    }

    // ----- reconfiguration -------------------------------------------------------------------
}
