//! The synchronization phase: suspecting the leader (timeouts, a slow leader), STOP votes and
//! the move to a new regency, STOPDATA to the new leader, its SYNC and the checks every replica
//! makes on it, and the latency the slow-leader rule measures.

use super::*;

/// A leader change as this replica sees it: the STOP votes it holds, its own push for a change,
/// the STOPDATAs it collects as a new leader and the SYNC it sent, received or relays.
#[derive(Default)]
pub(super) struct LeaderChange {
    pub(super) stop_votes: BTreeMap<ReplicaId, Regency>,
    pub(super) stop_sent: Regency,
    /// This replica is pushing for a leader change (retransmitting STOP, escalating).
    pub(super) stop_active: bool,
    pub(super) stop_started_us: u64,
    pub(super) stop_retransmit_at: Option<u64>,
    pub(super) stopdata: BTreeMap<ReplicaId, (Regency, StopData)>,
    pub(super) sync_sent: bool,
    /// The new leader cannot choose yet: it misses decisions its STOPDATAs prove.
    pub(super) sync_behind: bool,
    /// The SYNC this replica processed for its regency, relayed to replicas left behind.
    pub(super) current_sync: Option<ReplicaMessage>,
    pub(super) sync_relayed: BTreeMap<ReplicaId, Regency>,
    /// A valid SYNC that needs decisions this replica lacks.
    pub(super) pending_sync: Option<(ReplicaId, ReplicaMessage)>,
}

impl LeaderChange {
    /// The largest regency above `current` that at least `k` replicas want, counting this
    /// replica's own STOP among the votes.
    pub(super) fn kth_vote(&self, current: Regency, k: usize) -> Option<Regency> {
        let mut votes: Vec<Regency> = self
            .stop_votes
            .values()
            .copied()
            .filter(|r| *r > current)
            .collect();
        votes.sort_unstable_by(|a, b| b.cmp(a));
        votes.get(k.checked_sub(1)?).copied()
    }
}

impl Replica {
    /// Moves the clock to the driver's `now`. The first reading also starts the regency the
    /// replica began in: until then `regency_started_us` is 0, the driver's clock is not (it
    /// counts from the epoch), and the slow-leader grace would be over before the replica
    /// started. A replica just started would then judge the leader slow 100 ms after the first
    /// request came, while its client was still connecting to the leader; with a Byzantine
    /// replica joining that suspicion, the f+1 STOPs installed a Byzantine leader at start-up.
    pub(super) fn observe_clock(&mut self, now: u64) {
        if !self.clock_started {
            self.clock_started = true;
            self.regency_started_us = self.regency_started_us.max(now);
        }
        self.clock_us = self.clock_us.max(now);
    }

    pub(super) fn sample_latency(&mut self, us: u64) {
        self.regency_latency_us = Some(match self.regency_latency_us {
            None => us,
            Some(avg) => (avg * 7 + us) / 8,
        });
    }

    /// Runs everything an input made possible: buffered decisions and messages for the next
    /// instance, a SYNC that waited for catch-up, a new proposal. Iterative, not recursive, so a
    /// long catch-up cannot grow the stack.
    pub(super) fn advance(&mut self, now: u64) {
        self.observe_clock(now);
        loop {
            let current = self.current_cid();
            if let Some(d) = self.catchup.decided_ahead.remove(&current) {
                // Verified on arrival, unless it is one of this replica's own logged ones.
                let proven = !self.unproven.contains(&current);
                self.decide(d, proven);
                continue;
            }
            if let Some((from, msg)) = self.lc.pending_sync.take() {
                let target = sync_target(&msg);
                if self.current_cid().0 + 1 >= target.0 {
                    self.on_sync(now, from, msg);
                    continue;
                }
                self.lc.pending_sync = Some((from, msg));
            }
            if let Some(msgs) = self.catchup.future.remove(&current) {
                for (from, msg) in msgs {
                    self.dispatch(now, from, msg);
                }
                continue;
            }
            if !self.synchronizing && !self.catchup.future_epoch.is_empty() {
                let ready: Vec<_>;
                (ready, self.catchup.future_epoch) = std::mem::take(&mut self.catchup.future_epoch)
                    .into_iter()
                    .partition(|(_, m)| msg_epoch(m).is_some_and(|e| e <= self.regency));
                if !ready.is_empty() {
                    for (from, msg) in ready {
                        self.dispatch(now, from, msg);
                    }
                    continue;
                }
            }
            break;
        }
        if self.synchronizing && self.is_leader() {
            self.try_sync(now);
        }
        self.maybe_propose(now);
        self.note_position(now);
    }

    // ----- synchronization phase -------------------------------------------------------------

    /// Asks to move to `target` (or joins others asking): STOP to all, retransmitted until the
    /// regency changes. A replica never votes for a lower regency than it voted for before.
    pub(super) fn suspect(&mut self, now: u64, target: Regency, why: Suspicion) {
        if !self.participating() {
            return;
        }
        let target = target.max(self.regency.next()).max(self.lc.stop_sent);
        if target == self.lc.stop_sent && self.lc.stop_active {
            return;
        }
        self.events.push(Event::Suspected {
            regency: target,
            why,
        });
        // The first STOP of a leader change hands the waiting requests to every replica, the
        // next leaders included; one that escalates it, or repeats it, needs carry no more than
        // the oldest few: megabytes more per peer each second would only queue ahead of the
        // leader change's own messages (values of 1 MiB from many clients, issue 15).
        let carried = if self.lc.stop_active {
            STOP_RESENT_BYTES
        } else {
            limits::MAX_CARRIED_BYTES
        };
        self.lc.stop_sent = target;
        self.lc.stop_active = true;
        self.lc.stop_started_us = now;
        self.lc.stop_votes.insert(self.me, target);
        let requests = self.pool.oldest(MAX_CARRIED, carried);
        self.broadcast(ReplicaMessage::Stop {
            regency: target,
            requests,
        });
        self.lc.stop_retransmit_at = Some(now + self.config.stop_retransmit_us);
        self.check_stops(now);
    }

    pub(super) fn on_stop(&mut self, now: u64, from: ReplicaId, regency: Regency) {
        if regency <= self.regency {
            // The sender is behind: show it where the cluster is.
            self.relay_sync(from);
            if let Some(last) = self.last_decided {
                self.help(from, last);
            }
            return;
        }
        let e = self.lc.stop_votes.entry(from).or_insert(regency);
        if regency > *e {
            *e = regency;
        }
        self.check_stops(now);
    }

    /// The largest regency that at least `k` replicas (counting this one's own STOP) want.
    pub(super) fn kth_vote(&self, k: usize) -> Option<Regency> {
        self.lc.kth_vote(self.regency, k)
    }

    pub(super) fn check_stops(&mut self, now: u64) {
        // f+1 replicas want to leave: at least one is correct, so join them (PBFT's rule).
        if let Some(r) = self.kth_vote(self.view.weak()) {
            if r > self.lc.stop_sent {
                self.suspect(now, r, Suspicion::JoinedLeaderChange);
                return;
            }
        }
        if let Some(r) = self.kth_vote(self.view.strong()) {
            if r > self.regency && self.lc.stop_sent >= r {
                self.install(now, r);
            }
        }
    }

    pub(super) fn install(&mut self, now: u64, regency: Regency) {
        if let Some(l) = self.regency_latency_us.take() {
            self.latency_history.push_back(l);
            while self.latency_history.len() > LATENCY_HISTORY {
                self.latency_history.pop_front();
            }
        }
        if !self.progress_in_regency {
            self.timeout_us = (self.timeout_us * 2).min(self.config.max_request_timeout_us);
        }
        self.regency = regency;
        self.synchronizing = true;
        self.lc.sync_sent = false;
        self.lc.sync_behind = false;
        self.progress_in_regency = false;
        self.regency_started_us = now;
        self.lc.stop_active = self.lc.stop_sent > regency;
        if !self.lc.stop_active {
            self.lc.stop_retransmit_at = None;
        }
        self.lc.stop_votes.retain(|_, r| *r > regency);
        self.lc.stopdata.retain(|_, (r, _)| *r == regency);
        self.lc.current_sync = None;
        self.pool.restart_timers(now);
        self.stats.regencies_installed += 1;
        let leader = self.view.leader(regency);
        self.events
            .push(Event::RegencyInstalled { regency, leader });
        if !self.participating() {
            return;
        }
        let (last, collect, values) = self.own_stopdata();
        if leader == self.me {
            self.lc.stopdata.insert(
                self.me,
                (
                    regency,
                    StopData {
                        last,
                        collect,
                        values,
                    },
                ),
            );
            self.try_sync(now);
        } else {
            self.send(
                leader,
                ReplicaMessage::StopData {
                    regency,
                    last,
                    collect,
                    values,
                },
            );
        }
    }

    pub(super) fn own_stopdata(&mut self) -> (Option<Decision>, SignedCollect, Vec<Batch>) {
        if let Some(c) = self.last_decided {
            self.prove(c);
        }
        let last = self.last_decided.and_then(|c| self.log.get(&c).cloned());
        let collect = Collect {
            regency: self.regency,
            replica: self.me,
            cid: self.current_cid(),
            accepted: self.instance.my_accepted,
            writes: self.instance.my_writes.clone(),
        };
        let mut signed = SignedCollect::sign(collect, &self.key);
        if self.instance.my_accepted.is_some() {
            signed.proof = self.instance.accepted_proof.clone();
        }
        (last, signed, self.instance.collect_values())
    }

    pub(super) fn on_stopdata(
        &mut self,
        now: u64,
        from: ReplicaId,
        regency: Regency,
        last: Option<Decision>,
        collect: SignedCollect,
        values: Vec<Batch>,
    ) {
        if self.view.leader(regency) != self.me || regency < self.regency {
            self.reject(Some(from), Rejection::MisdirectedStopdata);
            return;
        }
        let c = &collect.collect;
        if c.replica != from || c.regency != regency || !collect.verify(&self.view) {
            self.reject(Some(from), Rejection::InvalidCollect);
            return;
        }
        let last_ok = match &last {
            None => c.cid == Cid(0),
            Some(d) => d.cid.next() == c.cid && d.verify(self.view_for(d.cid)),
        };
        if !last_ok {
            // Includes a STOPDATA claiming a higher decision it cannot prove.
            let reason = match &last {
                Some(d) if d.cid.next() == c.cid && !self.holds_view_for(d.cid) => {
                    Rejection::StopdataLastInUnheldView
                }
                // A replica that installed a checkpoint holds no decision for its CID until a
                // peer sends it one: it cannot prove where it stands, which is no lie.
                None => Rejection::StopdataWithoutLast,
                _ => Rejection::UnprovenLastDecision,
            };
            self.reject(Some(from), reason);
            return;
        }
        let named: Vec<Digest> = c
            .writes
            .iter()
            .map(|(_, d)| *d)
            .chain(c.accepted.map(|(_, d)| d))
            .collect();
        let values: Vec<Batch> = values
            .into_iter()
            .filter(|b| named.contains(&b.digest()))
            .collect();
        self.lc.stopdata.insert(
            from,
            (
                regency,
                StopData {
                    last,
                    collect,
                    values,
                },
            ),
        );
        if regency == self.regency {
            self.try_sync(now);
        }
    }

    /// The new leader: once the collects are sound, choose the value and send SYNC.
    pub(super) fn try_sync(&mut self, now: u64) {
        if !self.synchronizing || self.lc.sync_sent || !self.may_lead() || !self.participating() {
            return;
        }
        // Decisions learnt since installing make this replica's own STOPDATA stale.
        let own_cid = self
            .lc
            .stopdata
            .get(&self.me)
            .map(|(_, s)| s.collect.collect.cid);
        if own_cid != Some(self.current_cid()) {
            let (last, collect, values) = self.own_stopdata();
            self.lc.stopdata.insert(
                self.me,
                (
                    self.regency,
                    StopData {
                        last,
                        collect,
                        values,
                    },
                ),
            );
        }
        let data: Vec<&StopData> = self
            .lc
            .stopdata
            .values()
            .filter(|(r, _)| *r == self.regency)
            .map(|(_, s)| s)
            .collect();
        if data.len() < self.view.collect_quorum() {
            return;
        }
        let best = data
            .iter()
            .filter_map(|s| s.last.as_ref())
            .max_by_key(|d| d.cid)
            .cloned();
        let target = best.as_ref().map_or(Cid(0), |d| d.cid.next());
        let states: Vec<sync::State> = data
            .iter()
            .filter_map(|s| sync::project(&self.view, &s.collect, target))
            .collect();
        let Some(choice) = sync::choose(&self.view, &states) else {
            return;
        };
        // The leader must stand at `target` to validate a fresh batch.
        if self.current_cid() < target {
            if let Some(b) = &best {
                if self.current_cid() == b.cid {
                    self.decide(b.clone(), true);
                    return self.try_sync(now);
                }
            }
            self.lc.sync_behind = true;
            if self.catchup_due(now) {
                self.request_decisions(now, None);
            }
            return;
        }
        self.lc.sync_behind = false;
        let collects: Vec<SignedCollect> = data.iter().map(|s| s.collect.clone()).collect();
        let bound = match choice {
            Choice::Bound(_, digest) => Some(
                data.iter()
                    .flat_map(|s| s.values.iter())
                    .find(|b| b.digest() == digest)
                    .cloned()
                    .or_else(|| self.instance.batch_for(&digest).cloned()),
            ),
            Choice::Free => None,
        };
        let batch = match bound {
            Some(Some(b)) => b,
            // Bound, but no STOPDATA carried the batch: wait for more.
            Some(None) => return,
            None => {
                let requests = self.checked_selection();
                self.fresh_batch(now, requests)
            }
        };
        if self.current_cid() == target {
            self.promise_proposal(self.regency, &batch);
        } else {
            // About an instance decided here already: only the regency is new.
            self.promise(None);
        }
        let msg = ReplicaMessage::Sync {
            regency: self.regency,
            last: best,
            collects,
            batch,
        };
        self.lc.sync_sent = true;
        self.broadcast(msg.clone());
        self.on_sync(now, self.me, msg);
    }

    /// A SYNC is self-certifying (a proven last decision, n-f signed collects, a value the rule
    /// allows), so it is accepted from any replica that relays it.
    pub(super) fn on_sync(&mut self, now: u64, from: ReplicaId, msg: ReplicaMessage) {
        let ReplicaMessage::Sync {
            regency,
            last,
            collects,
            batch,
        } = &msg
        else {
            return;
        };
        let regency = *regency;
        if regency < self.regency || (regency == self.regency && !self.synchronizing) {
            return;
        }
        let target = last.as_ref().map_or(Cid(0), |d| d.cid.next());
        let choice = match self.check_sync(regency, last.as_ref(), collects, batch, target) {
            Ok(c) => c,
            Err(reason) => {
                self.reject(Some(from), reason);
                if from == self.view.leader(regency) && regency == self.regency {
                    self.suspect(now, regency.next(), Suspicion::Rejected(reason));
                }
                return;
            }
        };
        // Catch up to the instance the SYNC is about.
        if self.current_cid() < target {
            if let Some(d) = last {
                if self.current_cid() == d.cid {
                    self.decide(d.clone(), true);
                }
            }
            if self.current_cid() < target {
                self.lc.pending_sync = Some((from, msg.clone()));
                if self.catchup_due(now) {
                    self.request_decisions(now, None);
                }
                return;
            }
        }
        if regency > self.regency {
            // Learnt from the SYNC itself: n-f replicas installed this regency.
            self.regency = regency;
            self.lc.stop_votes.retain(|_, r| *r > regency);
            self.events.push(Event::RegencyInstalled {
                regency,
                leader: self.view.leader(regency),
            });
            self.stats.regencies_installed += 1;
        }
        if self.lc.stop_sent < regency {
            self.lc.stop_sent = regency;
        }
        let batch = batch.clone();
        if self.current_cid() == target && matches!(choice, Choice::Free) {
            if let Err(reason) = self.validate_batch(now, &batch) {
                self.reject(Some(from), reason);
                self.suspect(now, regency.next(), Suspicion::InvalidSyncBatch);
                return;
            }
        }
        self.synchronizing = false;
        self.lc.sync_behind = false;
        self.lc.stop_active = self.lc.stop_sent > regency;
        if !self.lc.stop_active {
            self.lc.stop_retransmit_at = None;
        }
        self.regency_started_us = now;
        self.lc.current_sync = Some(msg.clone());
        self.pool.restart_timers(now);
        if self.current_cid() == target {
            let digest = batch.digest();
            self.hold_and_write(regency, digest, batch);
        }
    }

    pub(super) fn check_sync(
        &self,
        regency: Regency,
        last: Option<&Decision>,
        collects: &[SignedCollect],
        batch: &Batch,
        target: Cid,
    ) -> Result<Choice, Rejection> {
        let mut signers = BTreeSet::new();
        for c in collects {
            if c.collect.regency != regency {
                return Err(Rejection::SyncCollectWrongRegency);
            }
            if !signers.insert(c.collect.replica) {
                return Err(Rejection::SyncDuplicateCollect);
            }
        }
        // What follows depends on the view that ordered those instances. A regency outlives
        // views, so its SYNC may predate every view this replica held (it is relayed to each
        // joiner): failing there proves nothing against the sender.
        let held = self.holds_view_for(target) && last.is_none_or(|d| self.holds_view_for(d.cid));
        let judged = |reason: Rejection| {
            if held {
                reason
            } else {
                Rejection::SyncInUnheldView
            }
        };
        if let Some(d) = last {
            if !d.verify(self.view_for(d.cid)) {
                return Err(judged(Rejection::SyncUnprovenLast));
            }
        }
        // The instance the SYNC is about may precede a view change: judge it in its own view.
        let view = self.view_for(target);
        if !collects.iter().all(|c| c.verify(view)) {
            return Err(judged(Rejection::SyncForgedCollect));
        }
        let states: Option<Vec<sync::State>> = collects
            .iter()
            .map(|c| sync::project(view, c, target))
            .collect();
        let states = states.ok_or(Rejection::SyncCollectBeyondLast)?;
        match sync::choose(view, &states) {
            None => Err(judged(Rejection::SyncCollectsNotSound)),
            Some(Choice::Bound(e, d)) => {
                if batch.digest() == d {
                    Ok(Choice::Bound(e, d))
                } else {
                    Err(judged(Rejection::SyncDroppedBoundValue))
                }
            }
            Some(Choice::Free) => Ok(Choice::Free),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn votes(v: &[(u32, u32)]) -> LeaderChange {
        LeaderChange {
            stop_votes: v
                .iter()
                .map(|&(id, r)| (ReplicaId(id), Regency(r)))
                .collect(),
            ..LeaderChange::default()
        }
    }

    #[test]
    fn the_kth_vote_is_the_highest_regency_k_replicas_want() {
        let lc = votes(&[(0, 3), (1, 5), (2, 4), (3, 4)]);
        assert_eq!(lc.kth_vote(Regency(0), 1), Some(Regency(5)));
        assert_eq!(lc.kth_vote(Regency(0), 2), Some(Regency(4)));
        assert_eq!(lc.kth_vote(Regency(0), 3), Some(Regency(4)));
        assert_eq!(lc.kth_vote(Regency(0), 4), Some(Regency(3)));
        assert_eq!(lc.kth_vote(Regency(0), 5), None);
    }

    #[test]
    fn votes_for_the_current_regency_or_below_do_not_count() {
        let lc = votes(&[(0, 2), (1, 2), (2, 3)]);
        assert_eq!(lc.kth_vote(Regency(2), 1), Some(Regency(3)));
        assert_eq!(lc.kth_vote(Regency(2), 2), None);
        assert_eq!(lc.kth_vote(Regency(3), 1), None);
    }

    /// A follower of a 4-replica view whose driver's clock reads `T0` (microseconds since the
    /// epoch, as in production) when it starts, with the slow-leader rule as deployed.
    fn follower_started_late() -> Replica {
        use crate::core::config::SlowLeader;
        use crate::core::test_views::keyed_view;
        use crate::service::noop::NoopService;
        let (view, keys) = keyed_view(4, 1);
        let config = Config {
            slow_leader: Some(SlowLeader {
                factor: 8,
                floor_us: 100_000,
                grace_us: 1_000_000,
            }),
            persist: false,
            ..Config::default()
        };
        Replica::new(
            ReplicaId(3),
            keys[3].clone(),
            view,
            config,
            Box::new(NoopService::default()),
        )
    }

    fn slow_leader_suspected(r: &mut Replica) -> bool {
        r.take_events().iter().any(|e| {
            matches!(
                e,
                Event::Suspected {
                    why: Suspicion::SlowLeader,
                    ..
                }
            )
        })
    }

    #[test]
    fn a_replica_just_started_gives_the_leader_the_slow_leader_grace() {
        const T0: u64 = 1_800_000_000_000_000;
        let mut r = follower_started_late();
        let client = KeyPair::from_seed([9; 32]);
        let request = crate::wire::messages::Request {
            client: client.public(),
            session: 1,
            sequence: 1,
            kind: RequestKind::Ordered,
            view: ViewId(0),
            payload: Vec::new(),
        };
        r.on_request(T0, None, SignedRequest::sign(request, &client));
        // The leader never sees the request (its client had no link to it yet): 300 ms is three
        // times the floor, but the replica has run for less than the grace.
        r.on_timeout(T0 + 300_000);
        assert!(!slow_leader_suspected(&mut r));
        // Once the grace is over the rule applies as before.
        r.on_timeout(T0 + 1_200_000);
        assert!(slow_leader_suspected(&mut r));
    }

    #[test]
    fn no_vote_is_the_zeroth() {
        assert_eq!(votes(&[(0, 9)]).kth_vote(Regency(0), 0), None);
        assert_eq!(LeaderChange::default().kth_vote(Regency(0), 1), None);
    }
}
