//! Catching up by decisions: messages for instances ahead are buffered, a replica that learns it
//! is behind asks its peers for the decisions it misses (with their proofs), and helps peers that
//! are behind it.

use super::*;

/// What this replica knows about where its peers stand and what it holds for instances it has
/// not reached: the state of catching up by decisions, in either direction.
pub(super) struct CatchUp {
    pub(super) future: BTreeMap<Cid, Vec<(ReplicaId, ReplicaMessage)>>,
    pub(super) future_epoch: Vec<(ReplicaId, ReplicaMessage)>,
    pub(super) decided_ahead: BTreeMap<Cid, Decision>,
    pub(super) peer_progress: BTreeMap<ReplicaId, Cid>,
    /// Per peer, the highest instance whose messages from it this replica dropped (too far
    /// ahead, buffer full, or while joining): it cannot decide that instance from the votes
    /// alone any more, and in an idle cluster nobody sends them again.
    pub(super) lost: BTreeMap<ReplicaId, Cid>,
    /// The instance this replica is on and since when: asking because peers are ahead waits
    /// until it stalled there, so that a replica merely a message delay behind does not ask.
    pub(super) position: (Cid, u64),
    pub(super) helped: BTreeMap<ReplicaId, Cid>,
    pub(super) last_catchup_us: Option<u64>,
    /// Start-up probes left: a replica that (re)starts asks the others where they are, since in
    /// an idle cluster nothing else would tell it that it is behind.
    pub(super) startup_probes: u32,
}

impl CatchUp {
    pub(super) fn new() -> Self {
        CatchUp {
            future: BTreeMap::new(),
            future_epoch: Vec::new(),
            decided_ahead: BTreeMap::new(),
            peer_progress: BTreeMap::new(),
            lost: BTreeMap::new(),
            position: (Cid(0), 0),
            helped: BTreeMap::new(),
            last_catchup_us: None,
            startup_probes: STARTUP_PROBES,
        }
    }
}

impl Replica {
    pub(super) fn buffer_future(&mut self, from: ReplicaId, cid: Cid, msg: ReplicaMessage) {
        if cid.0 > self.current_cid().0 + self.config.future_window {
            self.note_lost(from, cid);
            self.reject(Some(from), Rejection::TooFarAhead);
            return;
        }
        let q = self.catchup.future.entry(cid).or_default();
        if q.len() >= self.config.max_buffered_per_instance {
            self.note_lost(from, cid);
            self.reject(Some(from), Rejection::FutureBufferFull);
            return;
        }
        q.push((from, msg));
    }

    /// Records that a message of `from` for instance `cid` was dropped unused.
    pub(super) fn note_lost(&mut self, from: ReplicaId, cid: Cid) {
        let e = self.catchup.lost.entry(from).or_insert(cid);
        if cid > *e {
            *e = cid;
        }
    }

    /// Records where a peer's vote shows it stands, without acting on it (a joiner, which can
    /// use no vote before its state arrives).
    pub(super) fn note_peer_at(&mut self, from: ReplicaId, cid: Cid) {
        let e = self.catchup.peer_progress.entry(from).or_insert(cid);
        if cid > *e {
            *e = cid;
        }
    }

    /// Notes the instance this replica is on, and when it reached it.
    pub(super) fn note_position(&mut self, now: u64) {
        let current = self.current_cid();
        if self.catchup.position.0 != current {
            self.catchup.position = (current, now);
        }
    }

    /// Whether f+1 peers (so at least one correct) have shown that this replica's current
    /// instance is one it cannot decide by itself: they voted in a later one (so they decided
    /// it), this replica dropped their messages for it or later ones, or they accepted there a
    /// batch this replica does not hold (its PROPOSE was dropped). Nothing else may ever tell
    /// it, once the cluster goes idle: a state transfer that ended behind the others (votes
    /// cast while it ran were dropped as too far ahead) stayed there for good.
    pub(super) fn behind_peers(&self) -> bool {
        let current = self.current_cid();
        let unheld = |id: ReplicaId| {
            self.instance.accepts.values().any(|votes| {
                votes
                    .get(&id)
                    .is_some_and(|v| self.instance.batch_for(&v.digest).is_none())
            })
        };
        let ahead = self
            .view
            .ids()
            .filter(|id| *id != self.me)
            .filter(|id| {
                self.catchup
                    .peer_progress
                    .get(id)
                    .is_some_and(|c| *c > current)
                    || self.catchup.lost.get(id).is_some_and(|c| *c >= current)
                    || unheld(*id)
            })
            .count();
        ahead >= self.view.weak()
    }

    /// When a replica behind its peers (`behind_peers`) asks again: a catch-up interval after it
    /// reached its current instance, and after its last question.
    pub(super) fn behind_ask_at(&self) -> u64 {
        let interval = self.catchup_interval_us();
        let since = self.catchup.position.1.saturating_add(interval);
        let last = self
            .catchup
            .last_catchup_us
            .map_or(0, |t| t.saturating_add(interval));
        since.max(last)
    }

    /// Tracks how far peers are; when f+1 of them are two or more instances ahead, this replica
    /// is behind and asks for decisions.
    pub(super) fn note_progress(&mut self, now: u64, from: ReplicaId, cid: Cid) {
        self.note_peer_at(from, cid);
        let current = self.current_cid();
        let ahead: Vec<ReplicaId> = self
            .catchup
            .peer_progress
            .iter()
            .filter(|(_, c)| c.0 >= current.0 + 2)
            .map(|(id, _)| *id)
            .collect();
        if ahead.len() >= self.view.weak() {
            let due = self
                .catchup
                .last_catchup_us
                .is_none_or(|t| now >= t + self.catchup_interval_us());
            if due {
                self.request_decisions(now, Some(ahead));
            }
        }
    }

    pub(super) fn request_decisions(&mut self, now: u64, to: Option<Vec<ReplicaId>>) {
        self.catchup.last_catchup_us = Some(now);
        if self.joining {
            // Decisions before this replica's view cannot be checked against it: state first.
            if self.transfer.in_progress().is_none() {
                self.broadcast(ReplicaMessage::CheckpointQuery);
            }
            return;
        }
        // From the last decision on if its proof is missing (a checkpoint restored from disk
        // whose decision the log lost, or one just transferred): without it this replica
        // cannot show where it stands to a new leader, whose STOPDATA count it may be needed
        // for (seed 4408 n=4: two such replicas and a silent one stalled every leader change).
        let from = match self.last_decided {
            Some(last) if !self.log.contains_key(&last) => last,
            _ => self.current_cid(),
        };
        match to {
            Some(ids) => {
                for id in ids {
                    self.send(id, ReplicaMessage::DecisionRequest { from });
                }
            }
            None => self.broadcast(ReplicaMessage::DecisionRequest { from }),
        }
    }

    /// Sends a lagging peer the decision it is still voting on.
    pub(super) fn help(&mut self, to: ReplicaId, cid: Cid) {
        if self.catchup.helped.get(&to).is_some_and(|c| *c >= cid) {
            return;
        }
        if !self.prove(cid) {
            return;
        }
        if let Some(d) = self.log.get(&cid) {
            let d = d.clone();
            self.catchup.helped.insert(to, cid);
            self.send(to, ReplicaMessage::Decided(d));
        }
    }

    pub(super) fn relay_sync(&mut self, to: ReplicaId) {
        if self
            .lc
            .sync_relayed
            .get(&to)
            .is_some_and(|r| *r >= self.regency)
        {
            return;
        }
        if let Some(s) = self.lc.current_sync.clone() {
            self.lc.sync_relayed.insert(to, self.regency);
            self.send(to, s);
        }
    }

    pub(super) fn on_decision_request(&mut self, from: ReplicaId, start: Cid) {
        let Some(last) = self.last_decided else {
            return;
        };
        self.relay_sync(from);
        if start <= last && !self.log.contains_key(&start) {
            // Trimmed below a checkpoint: the requester needs state, not decisions.
            self.advertise(Some(from));
            return;
        }
        let end = last.0.min(
            start
                .0
                .saturating_add(self.config.max_decisions_per_reply)
                .saturating_sub(1),
        );
        let mut cid = start.0;
        let mut bytes = 0;
        while cid <= end && bytes < DECISION_REPLY_BYTES {
            if !self.prove(Cid(cid)) {
                break;
            }
            if let Some(d) = self.log.get(&Cid(cid)) {
                bytes += d
                    .batch
                    .requests
                    .iter()
                    .map(|r| r.request.payload.len())
                    .sum::<usize>();
                let d = d.clone();
                self.send(from, ReplicaMessage::Decided(d));
            }
            cid += 1;
        }
    }

    pub(super) fn on_decided(&mut self, now: u64, from: ReplicaId, d: Decision) {
        let _ = now;
        let current = self.current_cid();
        if Some(d.cid) == self.last_decided && !self.log.contains_key(&d.cid) {
            // The decision of the checkpoint this replica installed: it proves this replica's
            // position in a later leader change.
            if d.verify(self.view_for(d.cid)) {
                self.log.insert(d.cid, d);
            }
            return;
        }
        if d.cid < current || self.catchup.decided_ahead.contains_key(&d.cid) {
            return;
        }
        if d.cid.0 > current.0 + self.config.future_window {
            self.reject(Some(from), Rejection::TooFarAhead);
            return;
        }
        if !d.verify(self.view_for(d.cid)) {
            let reason = if self.holds_view_for(d.cid) {
                Rejection::InvalidDecisionProof
            } else {
                Rejection::DecisionInUnheldView
            };
            self.reject(Some(from), reason);
            return;
        }
        self.unproven.remove(&d.cid);
        self.catchup.decided_ahead.insert(d.cid, d);
    }

    // ----- normal case -----------------------------------------------------------------------
}
