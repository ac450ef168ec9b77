//! One replica's protocol state machine: Mod-SMaRt ordering over VP-Consensus, the
//! synchronization phase, decision transfer, deduplication and execution.
//!
//! Inputs: client requests, replica messages (from an authenticated peer), and timeouts, each
//! with the driver's current time. Outputs: messages, replies, events, and the next deadline.
//! Never any I/O, clock or randomness of its own.

mod accepts;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::core::clients::{Freshness, Pool, Sessions};
use crate::core::config::Config;
use crate::core::instance::{Instance, Recorded, Vote};
use crate::core::output::{Event, Output};
use crate::core::promise::{Promise, PromiseKey};
use crate::core::reconfig::{self, ReconfigOutcome, ReconfigRequest};
use crate::core::rejection::Rejection;
use crate::core::state::{
    encode_state, Checkpoint, HeldBytes, OrderingState, ReplicaState, StoredCheckpoint,
};
use crate::core::sync::{self, Choice};
use crate::core::transfer::{ChunkOutcome, Transfer};
use crate::core::verified::Verified;
use crate::core::view::View;
use crate::crypto::{self, Digest, Domain, KeyCache, KeyPair};
use crate::service::{ExecContext, Service};
use crate::wire::codec::{Decode, Encode};
use crate::wire::ids::{Cid, Epoch, Regency, ReplicaId, ViewId};
use crate::wire::limits;
use crate::wire::messages::{
    accept_signing_bytes, Batch, CheckpointMeta, ClientId, Collect, Decision, Proof,
    ReplicaMessage, Reply, ReplyBody, RequestKind, SignedCollect, SignedRequest,
};

/// Regency-change messages buffered for epochs this replica has not installed yet.
const MAX_FUTURE_EPOCH_MESSAGES: usize = 256;
/// Requests carried in one STOP or FORWARD.
const MAX_CARRIED: usize = 1024;
/// Per-regency latency estimates kept for the slow-leader baseline.
const LATENCY_HISTORY: usize = 8;
/// Checkpoints kept in memory to serve state transfer (the newest and the one before).
const CHECKPOINTS_KEPT: usize = 2;
/// Request bytes of decisions sent in answer to one request (past the first decision). A
/// laggard asks again every catch-up interval: replies of `max_decisions_per_reply` large
/// batches each piled up in the peers' send queues, gigabytes while a replica caught up.
const DECISION_REPLY_BYTES: usize = 4 << 20;
/// Start-up requests for decisions, one per catch-up interval, until a peer answers with a
/// decision or its checkpoints (the first ones may precede the links; a replica that is not
/// behind gets no answer and stops after these).
const STARTUP_PROBES: u32 = 40;

/// Counters for metrics.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub decided: u64,
    pub executed_requests: u64,
    pub proposals: u64,
    pub regencies_installed: u64,
    pub checkpoints: u64,
    pub state_transfers: u64,
    pub views_installed: u64,
    pub rejected: BTreeMap<Rejection, u64>,
}

/// A STOPDATA the new leader has accepted.
#[derive(Debug, Clone)]
struct StopData {
    last: Option<Decision>,
    collect: SignedCollect,
    values: Vec<Batch>,
}

/// What a restarted replica finds on its disk: the newest checkpoint (the bytes of a
/// `ReplicaState`) and the decision at its CID, the decisions logged after it, replayed without
/// re-checking their proofs (they were checked when decided, and the log is checksummed), and
/// its last promise.
#[derive(Debug, Default)]
pub struct FromDisk {
    pub checkpoint: Option<Vec<u8>>,
    /// The decision at the checkpoint's CID: without it a restarted replica cannot prove where
    /// it stands to a new leader, and if every correct replica restarted so, no leader change
    /// could complete (seed 27973 n=4).
    pub checkpoint_decision: Option<Decision>,
    pub decisions: Vec<Decision>,
    pub promise: Option<Promise>,
}

pub struct Replica {
    me: ReplicaId,
    key: KeyPair,
    view: View,
    config: Config,
    service: Box<dyn Service>,
    sessions: Sessions,
    pool: Pool,
    /// Requests known to come from their client: received on the client's own authenticated
    /// channel, or signature checked.
    authentic: Verified,
    /// Requests whose signature this replica checked. A leader proposes only these, so that a
    /// client that signs badly but sends on its channel cannot frame the leader before replicas
    /// that must check the signature (Aardvark's lesson).
    sig_checked: Verified,
    keys: KeyCache,

    last_decided: Option<Cid>,
    last_timestamp_ms: u64,
    log: BTreeMap<Cid, Decision>,
    /// Logged (or replayable) decisions whose proofs hold signatures not checked yet.
    unproven: BTreeSet<Cid>,
    instance: Instance,
    /// Take ACCEPTs without checking their signatures: all n came in time last instance.
    lazy_accepts: bool,
    /// A quorum of ACCEPTs for (epoch, digest) but not all n: when to stop waiting and check.
    settle_at: Option<(Epoch, Digest, u64)>,
    last_round: Option<accepts::LastRound>,
    future: BTreeMap<Cid, Vec<(ReplicaId, ReplicaMessage)>>,
    future_epoch: Vec<(ReplicaId, ReplicaMessage)>,
    decided_ahead: BTreeMap<Cid, Decision>,
    peer_progress: BTreeMap<ReplicaId, Cid>,
    helped: BTreeMap<ReplicaId, Cid>,
    last_catchup_us: Option<u64>,

    /// Checkpoints kept to serve state transfer, oldest first: in memory until the driver
    /// says where it stored them.
    checkpoints: VecDeque<(CheckpointMeta, HeldBytes)>,
    transfer: Transfer,
    /// Given a view with history but no state: take no part until a checkpoint of that view
    /// (or a later one) is installed.
    joining: bool,
    /// Replaying the local log at start-up: its decisions are on disk already and their replies
    /// long sent.
    replaying: bool,
    /// A view installed by the batch being executed, taking effect after it.
    pending_view: Option<View>,
    /// What the last `Output::Promise` said (only with `Config::persist`).
    promised: Option<PromiseKey>,
    /// A promise recovered from disk for an instance not reached yet (the log lost its tail in
    /// the crash): this replica takes no part until it gets there, then restores it.
    restored: Option<Promise>,
    /// Start-up probes left: a replica that (re)starts asks the others where they are, since in
    /// an idle cluster nothing else would tell it that it is behind.
    startup_probes: u32,
    /// The first CID ordered in `view`, and the view before (which proved earlier decisions).
    view_since: Cid,
    previous_view: Option<View>,

    regency: Regency,
    synchronizing: bool,
    stop_votes: BTreeMap<ReplicaId, Regency>,
    stop_sent: Regency,
    /// This replica is pushing for a leader change (retransmitting STOP, escalating).
    stop_active: bool,
    stop_started_us: u64,
    stop_retransmit_at: Option<u64>,
    stopdata: BTreeMap<ReplicaId, (Regency, StopData)>,
    sync_sent: bool,
    /// The new leader cannot choose yet: it misses decisions its STOPDATAs prove.
    sync_behind: bool,
    /// The SYNC this replica processed for its regency, relayed to replicas left behind.
    current_sync: Option<ReplicaMessage>,
    sync_relayed: BTreeMap<ReplicaId, Regency>,
    /// A valid SYNC that needs decisions this replica lacks.
    pending_sync: Option<(ReplicaId, ReplicaMessage)>,
    timeout_us: u64,
    regency_started_us: u64,
    progress_in_regency: bool,
    regency_latency_us: Option<u64>,
    latency_history: VecDeque<u64>,

    /// The latest time seen in any input.
    clock_us: u64,
    outputs: Vec<Output>,
    events: Vec<Event>,
    stats: Stats,
}

fn now_ms(now_us: u64) -> u64 {
    now_us / 1000
}

impl Replica {
    pub fn new(
        me: ReplicaId,
        key: KeyPair,
        view: View,
        config: Config,
        service: Box<dyn Service>,
    ) -> Self {
        let timeout_us = config.request_timeout_us;
        let joining = view.id > ViewId(0);
        let transfer = Transfer::new(
            config.chunk_bytes,
            config.transfer_window,
            config.transfer_stall_us,
        );
        Replica {
            me,
            key,
            view,
            authentic: Verified::new(config.verified_cache),
            sig_checked: Verified::new(config.verified_cache),
            keys: KeyCache::new(config.verified_cache.min(100_000)),
            config,
            service,
            sessions: Sessions::default(),
            pool: Pool::default(),
            last_decided: None,
            last_timestamp_ms: 0,
            log: BTreeMap::new(),
            unproven: BTreeSet::new(),
            instance: Instance::new(Cid(0)),
            lazy_accepts: false,
            settle_at: None,
            last_round: None,
            future: BTreeMap::new(),
            future_epoch: Vec::new(),
            decided_ahead: BTreeMap::new(),
            peer_progress: BTreeMap::new(),
            helped: BTreeMap::new(),
            last_catchup_us: None,
            checkpoints: VecDeque::new(),
            transfer,
            joining,
            replaying: false,
            pending_view: None,
            promised: None,
            restored: None,
            startup_probes: STARTUP_PROBES,
            view_since: Cid(0),
            previous_view: None,
            regency: Regency(0),
            synchronizing: false,
            stop_votes: BTreeMap::new(),
            stop_sent: Regency(0),
            stop_active: false,
            stop_started_us: 0,
            stop_retransmit_at: None,
            stopdata: BTreeMap::new(),
            sync_sent: false,
            sync_behind: false,
            current_sync: None,
            sync_relayed: BTreeMap::new(),
            pending_sync: None,
            timeout_us,
            regency_started_us: 0,
            progress_in_regency: false,
            regency_latency_us: None,
            latency_history: VecDeque::new(),
            clock_us: 0,
            outputs: Vec::new(),
            events: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// A replica restarted from its disk (see `FromDisk`). `view` is the configured view, used
    /// when there is no checkpoint.
    pub fn recover(
        me: ReplicaId,
        key: KeyPair,
        view: View,
        config: Config,
        service: Box<dyn Service>,
        disk: FromDisk,
    ) -> Result<Self, String> {
        let FromDisk {
            checkpoint,
            checkpoint_decision,
            mut decisions,
            promise,
        } = disk;
        if checkpoint.is_none() && view.id > ViewId(0) {
            // A log with no checkpoint begins in view 0, which this replica no longer knows:
            // replayed under the configured (later) view, its decisions and every proof after
            // them would be judged by the wrong members and quorum. The state comes from the
            // others instead, as for a joiner.
            decisions.clear();
        }
        let mut r = Replica::new(me, key, view, config, service);
        if let Some(bytes) = checkpoint {
            let meta = CheckpointMeta {
                cid: Cid(0),
                view: ViewId(0),
                digest: Digest::of(&bytes),
                len: bytes.len() as u64,
            };
            r.install_state(bytes, meta, false)?;
            if let Some(d) = checkpoint_decision.filter(|d| Some(d.cid) == r.last_decided) {
                // Checked when decided, possibly on unchecked ACCEPTs: `prove` checks it before
                // it is shown.
                r.unproven.insert(d.cid);
                r.log.insert(d.cid, d);
            }
        }
        if r.last_decided.is_some() || !decisions.is_empty() {
            r.joining = false;
        }
        r.replaying = true;
        for d in decisions {
            if d.cid == r.current_cid() {
                // Logged as decided, possibly on unchecked ACCEPTs.
                r.decide(d, false);
            }
        }
        r.replaying = false;
        // Replies and log appends of the replay were sent and written before the restart; a
        // checkpoint it crossed may not have been written before the crash, so keep those.
        r.outputs
            .retain(|o| matches!(o, Output::Checkpoint { .. } | Output::ViewChanged(_)));
        if let Some(mut p) = promise {
            // Decided before the crash but not yet in the log: replayed like the log (no
            // replies again: clients that missed one ask, and get it from the session), and
            // logged now.
            r.replaying = true;
            for d in std::mem::take(&mut p.decided) {
                if d.cid == r.current_cid() {
                    if r.config.persist {
                        r.outputs.push(Output::Persist(d.clone()));
                    }
                    r.decide(d, false);
                }
            }
            r.replaying = false;
            r.recover_promise(p);
        }
        r.events.clear();
        Ok(r)
    }

    // ----- accessors -------------------------------------------------------------------------

    /// Decisions this replica holds after `after` (all it holds with `None`), oldest first.
    pub fn decisions_after(&self, after: Option<Cid>) -> Vec<Decision> {
        let from = after.map_or(Cid(0), |c| c.next());
        self.log.range(from..).map(|(_, d)| d.clone()).collect()
    }

    /// Completes a promise this replica emitted with the decisions its log has not made durable
    /// (those after `durable`), so that log and promise together always reach the promise's
    /// instance (see `Promise`). The node calls it with the log's durable end, the simulator
    /// with its model of one, so both run this.
    pub fn complete_promise(&self, promise: &mut Promise, durable: Option<Cid>) {
        promise.decided = self.decisions_after(durable);
    }

    pub fn id(&self) -> ReplicaId {
        self.me
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    pub fn regency(&self) -> Regency {
        self.regency
    }

    pub fn leader(&self) -> ReplicaId {
        self.view.leader(self.regency)
    }

    pub fn last_decided(&self) -> Option<Cid> {
        self.last_decided
    }

    pub fn is_synchronizing(&self) -> bool {
        self.synchronizing
    }

    pub fn pending_requests(&self) -> usize {
        self.pool.len()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn service(&self) -> &dyn Service {
        self.service.as_ref()
    }

    pub fn state_digest(&self) -> Digest {
        self.service.state_digest()
    }

    pub fn decision(&self, cid: Cid) -> Option<&Decision> {
        self.log.get(&cid)
    }

    /// The newest checkpoint held.
    pub fn latest_checkpoint(&self) -> Option<&CheckpointMeta> {
        self.checkpoints.back().map(|(m, _)| m)
    }

    /// The driver stored the checkpoint at `cid` with `digest` and can read it back: serve
    /// state transfer from there and drop the in-memory copy (each is the size of the state).
    pub fn checkpoint_stored(
        &mut self,
        cid: Cid,
        digest: Digest,
        stored: Arc<dyn StoredCheckpoint>,
    ) {
        let held = self
            .checkpoints
            .iter_mut()
            .find(|(m, _)| m.cid == cid && m.digest == digest);
        if let Some((_, bytes)) = held {
            *bytes = HeldBytes::Stored(stored);
        }
    }

    /// True while the replica waits for state before taking part (joining, or state transfer).
    pub fn is_transferring(&self) -> bool {
        self.joining || self.transfer.in_progress().is_some()
    }

    /// Bytes of the state transfer in progress: (received, total).
    pub fn transfer_progress(&self) -> Option<(u64, u64)> {
        self.transfer.progress()
    }

    /// False for a replica removed from the view, or not yet holding the state of its view.
    pub fn participating(&self) -> bool {
        !self.joining && self.view.contains(self.me) && self.restored.is_none()
    }

    /// Whether this replica holds the view that ordered `cid`, and so can tell a bad proof from
    /// one made in a view it never held: its own view covers `view_since` up to the instance in
    /// progress. The previous view is kept without where it began, and a later instance may
    /// follow a reconfiguration not decided here yet (a joiner shown an old SYNC, a laggard
    /// sent decisions of the next view, found both on loopback: tests/reconfig.rs).
    fn holds_view_for(&self, cid: Cid) -> bool {
        self.view_since <= cid && cid <= self.current_cid()
    }

    /// The view whose members proved the decision of `cid`.
    fn view_for(&self, cid: Cid) -> &View {
        match &self.previous_view {
            Some(p) if cid < self.view_since => p,
            _ => &self.view,
        }
    }

    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn current_cid(&self) -> Cid {
        self.instance.cid
    }

    fn is_leader(&self) -> bool {
        self.view.leader(self.regency) == self.me
    }

    fn reject(&mut self, from: Option<ReplicaId>, reason: Rejection) {
        *self.stats.rejected.entry(reason).or_insert(0) += 1;
        self.events.push(Event::Rejected { from, reason });
    }

    fn send(&mut self, to: ReplicaId, msg: ReplicaMessage) {
        if to != self.me {
            self.promise_before(&msg);
            self.outputs.push(Output::Send { to, msg });
        }
    }

    fn broadcast(&mut self, msg: ReplicaMessage) {
        self.promise_before(&msg);
        self.outputs.push(Output::Broadcast { msg });
    }

    // ----- promises (votes persisted before they are sent) -----------------------------------

    /// Messages that show this replica's votes or regency go out only after a promise that
    /// covers them. PROPOSE and SYNC are promised by their maker with the value they carry
    /// (`promise_proposal`), before that value is recorded as written.
    fn promise_before(&mut self, msg: &ReplicaMessage) {
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
    fn promise_proposal(&mut self, epoch: Epoch, batch: &Batch) {
        self.promise(Some((epoch, batch)));
    }

    fn promise(&mut self, proposal: Option<(Epoch, &Batch)>) {
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
    }

    /// This replica's votes in the instance in progress, with `extra` (a value about to be
    /// proposed) as one more write.
    fn instance_promise(&self, extra: Option<(Epoch, Digest, &Batch)>) -> Promise {
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
    fn recover_promise(&mut self, p: Promise) {
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
    fn reach_restored(&mut self) {
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

    /// The earliest time at which `on_timeout` has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut d: Option<u64> = None;
        let mut at = |t: u64| d = Some(d.map_or(t, |x: u64| x.min(t)));
        if let Some((_, _, due)) = self.settle_at {
            at(due);
        }
        if let Some(t) = self.pool.oldest_unforwarded() {
            at(t.saturating_add(self.timeout_us));
        }
        if let Some(oldest) = self.pool.oldest_arrival() {
            // A replica outside its view (removed, or still joining) suspects nobody.
            if !self.stop_active && self.participating() {
                at(oldest.saturating_add(2 * self.timeout_us));
                if !self.synchronizing {
                    if let Some(slow) = self.slow_threshold_us() {
                        at(oldest
                            .saturating_add(slow)
                            .max(self.regency_started_us + self.slow_grace_us()));
                    }
                }
            }
        }
        if self.stop_active {
            at(self.stop_started_us.saturating_add(2 * self.timeout_us));
            if let Some(t) = self.stop_retransmit_at {
                at(t);
            }
        }
        let waiting = self
            .pool
            .oldest_arrival()
            .map(|t| t.saturating_add(self.timeout_us));
        if self.pending_sync.is_some()
            || !self.decided_ahead.is_empty()
            || waiting.is_some()
            || self.sync_behind
        {
            let next_ask = self
                .last_catchup_us
                .unwrap_or(0)
                .saturating_add(self.catchup_interval_us());
            at(waiting.map_or(next_ask, |w| w.max(next_ask)));
        }
        if self.startup_probes > 0 {
            at(self
                .last_catchup_us
                .map_or(0, |t| t.saturating_add(self.catchup_interval_us())));
        }
        if let Some(t) = self.transfer.deadline() {
            at(t);
        } else if self.joining {
            at(self
                .last_catchup_us
                .unwrap_or(0)
                .saturating_add(self.catchup_interval_us()));
        }
        d
    }

    fn catchup_due(&self, now: u64) -> bool {
        self.last_catchup_us
            .is_none_or(|t| now >= t.saturating_add(self.catchup_interval_us()))
    }

    fn catchup_interval_us(&self) -> u64 {
        (self.config.request_timeout_us / 8).max(1)
    }

    fn slow_grace_us(&self) -> u64 {
        self.config.slow_leader.as_ref().map_or(0, |s| s.grace_us)
    }

    /// How long a request may wait before the leader counts as slow, if that check is on.
    fn slow_threshold_us(&self) -> Option<u64> {
        let s = self.config.slow_leader.as_ref()?;
        let mut hist: Vec<u64> = self.latency_history.iter().copied().collect();
        hist.sort_unstable();
        let baseline = hist.get(hist.len() / 2).copied().unwrap_or(0);
        let t = s.floor_us.max(baseline.saturating_mul(s.factor));
        // Slowness only matters below the request timeout; above it the timer takes over.
        (t < 2 * self.timeout_us).then_some(t)
    }

    pub fn on_timeout(&mut self, now: u64) {
        self.clock_us = self.clock_us.max(now);
        self.settle(now);
        if self.startup_probes > 0 && self.catchup_due(now) {
            self.startup_probes -= 1;
            self.request_decisions(now, None);
        }
        if self.transfer.deadline().is_some_and(|t| now >= t) {
            for (to, msg) in self.transfer.on_timeout(now) {
                self.send(to, msg);
            }
        } else if self.joining && self.transfer.in_progress().is_none() && self.catchup_due(now) {
            // A joiner may start before the members installed the view naming it (they refuse
            // it until then): keep asking.
            self.last_catchup_us = Some(now);
            self.broadcast(ReplicaMessage::CheckpointQuery);
        }
        // Request timer, stage one: forward what waited a full timeout to the leader, and
        // repeat this replica's votes in case they were lost.
        let cutoff = now.saturating_sub(self.timeout_us);
        if self.pool.oldest_unforwarded().is_some_and(|t| t <= cutoff) {
            let fwd = self.pool.take_unforwarded(cutoff, MAX_CARRIED);
            if !self.is_leader() {
                let leader = self.leader();
                self.send(leader, ReplicaMessage::Forward { requests: fwd });
            }
            self.repeat_votes();
        }
        // A request waiting a full timeout may mean this replica missed decisions while the
        // others went quiet: nothing else would tell it. Ask, and keep asking while it waits,
        // since the question itself can be lost (seeds 418 n=7 and 15452 n=4 found this).
        if self.pool.oldest_arrival().is_some_and(|t| t <= cutoff) && self.catchup_due(now) {
            self.request_decisions(now, None);
        }
        // Stage two: the leader is faulty, or merely slow compared with recent leaders.
        if let Some(oldest) = self.pool.oldest_arrival() {
            let age = now.saturating_sub(oldest);
            if !self.stop_active {
                if age >= 2 * self.timeout_us {
                    self.suspect(now, self.regency.next(), "request_timeout");
                } else if !self.synchronizing
                    && now >= self.regency_started_us + self.slow_grace_us()
                    && self.slow_threshold_us().is_some_and(|t| age >= t)
                {
                    self.suspect(now, self.regency.next(), "slow_leader");
                }
            }
        }
        if self.stop_active {
            // A leader change that does not complete escalates to the next regency, with a
            // longer timeout so that a slow network eventually fits in one.
            if now >= self.stop_started_us.saturating_add(2 * self.timeout_us) {
                self.timeout_us = (self.timeout_us * 2).min(self.config.max_request_timeout_us);
                self.suspect(now, self.stop_sent.next(), "leader_change_timeout");
            } else if self.stop_retransmit_at.is_some_and(|t| now >= t) {
                let requests = self.pool.oldest(MAX_CARRIED);
                self.broadcast(ReplicaMessage::Stop {
                    regency: self.stop_sent,
                    requests,
                });
                self.stop_retransmit_at = Some(now + self.config.stop_retransmit_us);
            }
        }
        if (self.pending_sync.is_some() || !self.decided_ahead.is_empty() || self.sync_behind)
            && now
                >= self
                    .last_catchup_us
                    .unwrap_or(0)
                    .saturating_add(self.catchup_interval_us())
        {
            self.request_decisions(now, None);
        }
        self.advance(now);
    }

    fn repeat_votes(&mut self) {
        let cid = self.current_cid();
        let epoch = self.regency;
        if let Some(d) = self.instance.wrote_in(epoch) {
            self.broadcast(ReplicaMessage::Write {
                cid,
                epoch,
                digest: d,
            });
        }
        if let Some((e, d)) = self.instance.my_accepted {
            if let Some(sig) = self
                .instance
                .accepts
                .get(&e)
                .and_then(|v| v.get(&self.me))
                .map(|v| v.signature)
            {
                self.broadcast(ReplicaMessage::Accept {
                    cid,
                    epoch: e,
                    digest: d,
                    signature: sig,
                });
            }
        }
    }

    // ----- client requests -------------------------------------------------------------------

    /// A request straight from a client. `channel` is the client identity the connection
    /// authenticated (its TLS key), if any: a request on its own client's channel needs no
    /// signature check here.
    pub fn on_request(&mut self, now: u64, channel: Option<ClientId>, req: SignedRequest) {
        self.clock_us = self.clock_us.max(now);
        let r = &req.request;
        if r.view < self.view.id {
            let reply = Reply {
                replica: self.me,
                session: r.session,
                sequence: r.sequence,
                kind: r.kind,
                body: ReplyBody::NewView(self.view.clone()),
            };
            self.outputs.push(Output::Reply {
                client: r.client,
                reply,
            });
            return;
        }
        let digest = req.digest();
        if channel == Some(r.client) {
            self.authentic.insert(digest);
        } else if !self.check_signature(&req, &digest) {
            self.reject(None, Rejection::BadRequestSignature);
            return;
        }
        match r.kind {
            RequestKind::Unordered => {
                let result = self.service.query(&r.payload);
                let reply = Reply {
                    replica: self.me,
                    session: r.session,
                    sequence: r.sequence,
                    kind: RequestKind::Unordered,
                    body: ReplyBody::Result(result),
                };
                self.outputs.push(Output::Reply {
                    client: r.client,
                    reply,
                });
            }
            RequestKind::Ordered | RequestKind::Reconfig => {
                match self.sessions.freshness(&r.client, r.session, r.sequence) {
                    Freshness::New => self.pool_insert(now, req, digest),
                    Freshness::Repeat => {
                        if let Some(s) = self.sessions.get(&r.client) {
                            let reply = Reply {
                                replica: self.me,
                                session: r.session,
                                sequence: r.sequence,
                                kind: r.kind,
                                body: ReplyBody::Result(s.last_reply.clone()),
                            };
                            self.outputs.push(Output::Reply {
                                client: r.client,
                                reply,
                            });
                        }
                    }
                    Freshness::Stale => {
                        self.reject(None, Rejection::StaleRequest);
                    }
                }
            }
        }
        self.advance(now);
    }

    /// Checks a request's signature (once: the result is remembered).
    fn check_signature(&mut self, req: &SignedRequest, digest: &Digest) -> bool {
        if self.sig_checked.contains(digest) {
            return true;
        }
        let ok = self.keys.get(&req.request.client).is_some_and(|k| {
            crypto::verify_parsed(
                &k,
                Domain::ClientRequest,
                &req.request.to_bytes(),
                &req.signature,
            )
        });
        if ok {
            self.sig_checked.insert(*digest);
            self.authentic.insert(*digest);
        }
        ok
    }

    /// Batch-checks the signatures of `reqs` not checked yet; returns which are valid.
    fn check_signatures(&mut self, reqs: &[SignedRequest]) -> Vec<bool> {
        let digests: Vec<Digest> = reqs.iter().map(|r| r.digest()).collect();
        let todo: Vec<usize> = (0..reqs.len())
            .filter(|i| !self.sig_checked.contains(&digests[*i]))
            .collect();
        if todo.is_empty() {
            return vec![true; reqs.len()];
        }
        let encoded: Vec<Vec<u8>> = todo.iter().map(|i| reqs[*i].request.to_bytes()).collect();
        let mut items = Vec::with_capacity(todo.len());
        let mut parse_failed = false;
        for (i, m) in todo.iter().zip(&encoded) {
            match self.keys.get(&reqs[*i].request.client) {
                Some(k) => items.push((k, Domain::ClientRequest, &m[..], reqs[*i].signature)),
                None => parse_failed = true,
            }
        }
        if !parse_failed && crypto::verify_batch_parsed(&items) {
            for i in todo {
                self.sig_checked.insert(digests[i]);
                self.authentic.insert(digests[i]);
            }
            return vec![true; reqs.len()];
        }
        // Some signature is bad: find which, one by one.
        (0..reqs.len())
            .map(|i| self.check_signature(&reqs[i], &digests[i]))
            .collect()
    }

    fn pool_insert(&mut self, now: u64, req: SignedRequest, digest: Digest) {
        if let Err(e) = self.pool.insert(
            req,
            digest,
            now,
            self.config.max_pending_per_client,
            self.config.max_pending_total,
        ) {
            match e {
                crate::core::clients::PoolRefusal::Duplicate => {}
                crate::core::clients::PoolRefusal::ClientFull => {
                    self.reject(None, Rejection::ClientQueueFull)
                }
                crate::core::clients::PoolRefusal::PoolFull => {
                    self.reject(None, Rejection::PoolFull)
                }
            }
        }
    }

    /// Requests relayed by a replica (FORWARD, STOP): verified like a client's own.
    fn adopt_requests(&mut self, now: u64, from: ReplicaId, requests: Vec<SignedRequest>) {
        for req in requests {
            let r = &req.request;
            if r.kind == RequestKind::Unordered
                || self.sessions.freshness(&r.client, r.session, r.sequence) != Freshness::New
            {
                continue;
            }
            let digest = req.digest();
            if self.pool.contains(&digest) {
                continue;
            }
            if !self.check_signature(&req, &digest) {
                self.reject(Some(from), Rejection::ForgedRelayedRequest);
                continue;
            }
            self.pool_insert(now, req, digest);
        }
    }

    // ----- replica messages ------------------------------------------------------------------

    /// A message from replica `from`, as authenticated by the channel.
    pub fn on_message(&mut self, now: u64, from: ReplicaId, msg: ReplicaMessage) {
        self.clock_us = self.clock_us.max(now);
        // A replica removed while behind must still learn the decisions up to its removal, or
        // it would never know it was removed: it may ask for them, and for nothing else.
        let former = self
            .previous_view
            .as_ref()
            .is_some_and(|v| v.contains(from))
            && matches!(msg, ReplicaMessage::DecisionRequest { .. });
        if from == self.me || !(self.view.contains(from) || former) {
            self.reject(Some(from), Rejection::NotAMember);
            return;
        }
        self.dispatch(now, from, msg);
        self.advance(now);
    }

    fn dispatch(&mut self, now: u64, from: ReplicaId, msg: ReplicaMessage) {
        if self.joining
            && !matches!(
                msg,
                ReplicaMessage::CheckpointInfo { .. } | ReplicaMessage::Chunk { .. }
            )
        {
            // Nothing else can be checked or answered before the state arrives.
            return;
        }
        match msg {
            ReplicaMessage::Propose { cid, epoch, .. }
            | ReplicaMessage::Write { cid, epoch, .. }
            | ReplicaMessage::Accept { cid, epoch, .. } => {
                self.note_progress(now, from, cid);
                if epoch < self.regency && !matches!(msg, ReplicaMessage::Accept { .. }) {
                    self.relay_sync(from);
                }
                let late = match &msg {
                    ReplicaMessage::Accept {
                        cid, epoch, digest, ..
                    } => self.late_accept(from, *cid, *epoch, *digest),
                    _ => false,
                };
                if late {
                    // Its sender is voting on what was just decided; the ACCEPTs it lacks
                    // are on their way to it.
                } else if self.last_decided.is_some_and(|l| cid <= l) {
                    self.help(from, cid);
                } else if cid > self.current_cid() {
                    self.buffer_future(from, cid, msg);
                } else {
                    self.on_consensus(now, from, msg);
                }
            }
            ReplicaMessage::Forward { requests } => self.adopt_requests(now, from, requests),
            ReplicaMessage::Stop { regency, requests } => {
                self.adopt_requests(now, from, requests);
                self.on_stop(now, from, regency);
            }
            ReplicaMessage::StopData {
                regency,
                last,
                collect,
                values,
            } => self.on_stopdata(now, from, regency, last, collect, values),
            msg @ ReplicaMessage::Sync { .. } => self.on_sync(now, from, msg),
            ReplicaMessage::Decided(d) => {
                self.startup_probes = 0;
                self.on_decided(now, from, d)
            }
            ReplicaMessage::DecisionRequest { from: start } => {
                self.on_decision_request(from, start)
            }
            ReplicaMessage::CheckpointQuery => self.advertise(Some(from)),
            ReplicaMessage::CheckpointInfo {
                checkpoints,
                first_logged,
            } => {
                self.startup_probes = 0;
                self.transfer.record(from, checkpoints, first_logged);
                self.transfer.abandon_if_unserved(&self.view, self.me);
                self.consider_transfer(now);
            }
            ReplicaMessage::ChunkRequest {
                cid,
                digest,
                offset,
                len,
            } => self.serve_chunk(from, cid, digest, offset, len),
            ReplicaMessage::Chunk {
                cid,
                digest,
                offset,
                data,
            } => {
                let outcome = self.transfer.on_chunk(now, from, cid, digest, offset, data);
                self.on_chunk_outcome(now, outcome);
            }
        }
    }

    fn buffer_future(&mut self, from: ReplicaId, cid: Cid, msg: ReplicaMessage) {
        if cid.0 > self.current_cid().0 + self.config.future_window {
            self.reject(Some(from), Rejection::TooFarAhead);
            return;
        }
        let q = self.future.entry(cid).or_default();
        if q.len() >= self.config.max_buffered_per_instance {
            self.reject(Some(from), Rejection::FutureBufferFull);
            return;
        }
        q.push((from, msg));
    }

    /// Tracks how far peers are; when f+1 of them are two or more instances ahead, this replica
    /// is behind and asks for decisions.
    fn note_progress(&mut self, now: u64, from: ReplicaId, cid: Cid) {
        let e = self.peer_progress.entry(from).or_insert(cid);
        if cid > *e {
            *e = cid;
        }
        let current = self.current_cid();
        let ahead: Vec<ReplicaId> = self
            .peer_progress
            .iter()
            .filter(|(_, c)| c.0 >= current.0 + 2)
            .map(|(id, _)| *id)
            .collect();
        if ahead.len() >= self.view.weak() {
            let due = self
                .last_catchup_us
                .is_none_or(|t| now >= t + self.catchup_interval_us());
            if due {
                self.request_decisions(now, Some(ahead));
            }
        }
    }

    fn request_decisions(&mut self, now: u64, to: Option<Vec<ReplicaId>>) {
        self.last_catchup_us = Some(now);
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
    fn help(&mut self, to: ReplicaId, cid: Cid) {
        if self.helped.get(&to).is_some_and(|c| *c >= cid) {
            return;
        }
        if !self.prove(cid) {
            return;
        }
        if let Some(d) = self.log.get(&cid) {
            let d = d.clone();
            self.helped.insert(to, cid);
            self.send(to, ReplicaMessage::Decided(d));
        }
    }

    fn relay_sync(&mut self, to: ReplicaId) {
        if self
            .sync_relayed
            .get(&to)
            .is_some_and(|r| *r >= self.regency)
        {
            return;
        }
        if let Some(s) = self.current_sync.clone() {
            self.sync_relayed.insert(to, self.regency);
            self.send(to, s);
        }
    }

    fn on_decision_request(&mut self, from: ReplicaId, start: Cid) {
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

    fn on_decided(&mut self, now: u64, from: ReplicaId, d: Decision) {
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
        if d.cid < current || self.decided_ahead.contains_key(&d.cid) {
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
        self.decided_ahead.insert(d.cid, d);
    }

    // ----- normal case -----------------------------------------------------------------------

    fn on_consensus(&mut self, now: u64, from: ReplicaId, msg: ReplicaMessage) {
        let epoch = match &msg {
            ReplicaMessage::Propose { epoch, .. }
            | ReplicaMessage::Write { epoch, .. }
            | ReplicaMessage::Accept { epoch, .. } => *epoch,
            _ => return,
        };
        let accept = matches!(msg, ReplicaMessage::Accept { .. });
        if epoch > self.regency || (epoch == self.regency && self.synchronizing && !accept) {
            if self.future_epoch.len() >= MAX_FUTURE_EPOCH_MESSAGES {
                self.reject(Some(from), Rejection::FutureEpochBufferFull);
            } else {
                self.future_epoch.push((from, msg));
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
                    self.suspect(now, self.regency.next(), reason.label());
                    return;
                }
                self.stats.proposals += 1;
                self.hold_and_write(epoch, digest, batch);
            }
            ReplicaMessage::Write { epoch, digest, .. } => {
                if epoch < self.regency {
                    return;
                }
                if self.instance.record_write(epoch, from, digest) == Recorded::Equivocation {
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
    fn hold_and_write(&mut self, epoch: Epoch, digest: Digest, batch: Batch) {
        self.instance.proposals.insert(epoch, (digest, batch));
        self.instance.started_us.get_or_insert(self.clock_us);
        if self.instance.wrote_in(epoch).is_some() || !self.participating() {
            return;
        }
        self.instance.my_writes.push((epoch, digest));
        self.instance.record_write(epoch, self.me, digest);
        let cid = self.current_cid();
        self.broadcast(ReplicaMessage::Write { cid, epoch, digest });
        self.check_writes(epoch);
        self.check_accepts(epoch, digest);
    }

    fn check_writes(&mut self, epoch: Epoch) {
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
    fn validate_batch(&mut self, now: u64, batch: &Batch) -> Result<(), Rejection> {
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

    fn maybe_propose(&mut self, now: u64) {
        if !self.is_leader()
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
        self.promise_proposal(epoch, &batch);
        self.broadcast(ReplicaMessage::Propose {
            cid,
            epoch,
            batch: batch.clone(),
        });
        self.stats.proposals += 1;
        self.hold_and_write(epoch, digest, batch);
    }

    /// Requests for the next batch, each with a checked signature; forgeries leave the pool.
    fn checked_selection(&mut self) -> Vec<SignedRequest> {
        let requests = self
            .pool
            .select(self.config.max_batch_requests, self.config.max_batch_bytes);
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

    fn fresh_batch(&self, now: u64, requests: Vec<SignedRequest>) -> Batch {
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
    fn decide(&mut self, decision: Decision, proven: bool) {
        let cid = decision.cid;
        debug_assert_eq!(
            Some(cid),
            self.last_decided.map_or(Some(Cid(0)), |c| Some(c.next()))
        );
        let digest = decision.batch.digest();
        self.execute(cid, &decision.batch);
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
        self.future = self.future.split_off(&cid.next());
        self.decided_ahead = self.decided_ahead.split_off(&cid.next());
        self.trim_unproven();
        let reconfigured = match self.pending_view.take() {
            Some(v) => {
                self.install_view(cid, v);
                true
            }
            None => false,
        };
        // After a view change too, so that a joiner finds a checkpoint of the view naming it.
        if reconfigured || (cid.0 + 1) % self.config.checkpoint_period.max(1) == 0 {
            self.take_checkpoint(cid);
        }
        self.drop_overtaken_transfer();
        if !self.synchronizing {
            self.progress_in_regency = true;
            self.timeout_us = self.config.request_timeout_us;
            // Progress: a suspicion of this leader was wrong. The vote stands (votes never go
            // down) but is no longer pushed.
            self.stop_active = false;
            self.stop_retransmit_at = None;
        }
    }

    /// A decision proven at a later epoch than this replica's regency shows that a quorum
    /// installed that regency and finished its synchronization: take part in it. The SYNC that
    /// installed it may belong to a view this replica never held (a joiner, a restarted
    /// replica), and then this is the only way it learns the regency; without it, it buffers
    /// every message of the regency and takes no part until the next leader change.
    /// The same holds for a decision proven in this replica's own regency while it still waits
    /// for that regency's SYNC (a replica restarted between its STOPDATA and the SYNC).
    fn learn_regency(&mut self, epoch: Epoch) {
        if epoch < self.regency || (epoch == self.regency && !self.synchronizing) {
            return;
        }
        let new = epoch > self.regency;
        self.regency = epoch;
        self.synchronizing = false;
        self.sync_behind = false;
        if self
            .pending_sync
            .as_ref()
            .is_some_and(|(_, m)| sync_regency(m) <= epoch)
        {
            self.pending_sync = None;
        }
        self.current_sync = None;
        self.stop_votes.retain(|_, r| *r > epoch);
        self.stopdata.retain(|_, (r, _)| *r > epoch);
        self.stop_sent = self.stop_sent.max(epoch);
        self.stop_active = self.stop_sent > epoch;
        if !self.stop_active {
            self.stop_retransmit_at = None;
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

    fn execute(&mut self, cid: Cid, batch: &Batch) {
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
            self.sessions
                .record(r.client, r.session, r.sequence, result.clone());
            self.pool.prune_client(&r.client, &self.sessions);
            if self.replaying {
                continue;
            }
            self.outputs.push(Output::Reply {
                client: r.client,
                reply: Reply {
                    replica: self.me,
                    session: r.session,
                    sequence: r.sequence,
                    kind: r.kind,
                    body: ReplyBody::Result(result),
                },
            });
        }
    }

    // ----- reconfiguration -------------------------------------------------------------------

    /// Executes a view change. It takes effect after the batch, so every request of the batch
    /// runs in the view that ordered it.
    fn execute_reconfig(&mut self, client: &ClientId, payload: &[u8]) -> ReconfigOutcome {
        let current = self.pending_view.as_ref().unwrap_or(&self.view);
        if current.admin.as_ref() != Some(client) {
            return ReconfigOutcome::Refused(
                "reconfiguration must be signed by the view's admin key".into(),
            );
        }
        let req = match ReconfigRequest::from_bytes(payload) {
            Ok(r) => r,
            Err(e) => return ReconfigOutcome::Refused(format!("malformed request: {e}")),
        };
        match reconfig::apply(current, &req) {
            Ok(v) => {
                self.pending_view = Some(v.clone());
                ReconfigOutcome::Installed(v)
            }
            Err(why) => ReconfigOutcome::Refused(why),
        }
    }

    fn install_view(&mut self, cid: Cid, view: View) {
        let member = view.contains(self.me);
        self.events.push(Event::ViewInstalled {
            cid,
            view: view.id,
            n: view.n(),
            f: view.f,
            member,
        });
        self.stats.views_installed += 1;
        self.previous_view = Some(std::mem::replace(&mut self.view, view.clone()));
        self.view_since = cid.next();
        self.outputs.push(Output::ViewChanged(view));
        // Votes, buffered messages and proofs count only from members of the new view.
        let v = &self.view;
        for q in self.future.values_mut() {
            q.retain(|(from, _)| v.contains(*from));
        }
        self.future_epoch.retain(|(from, _)| v.contains(*from));
        self.decided_ahead.retain(|_, d| d.verify(v));
        self.stop_votes
            .retain(|id, _| v.contains(*id) || *id == self.me);
        self.stopdata.retain(|id, _| v.contains(*id));
        self.peer_progress.retain(|id, _| v.contains(*id));
        self.helped.retain(|id, _| v.contains(*id));
        self.transfer.retain_members(v);
    }

    // ----- checkpoints and state transfer ----------------------------------------------------

    fn take_checkpoint(&mut self, cid: Cid) {
        let bytes = encode_state(
            &OrderingState {
                cid,
                timestamp_ms: self.last_timestamp_ms,
                view: &self.view,
                view_since: self.view_since,
                previous_view: self.previous_view.as_ref(),
                sessions: &self.sessions,
            },
            &*self.service,
        );
        let cp = Checkpoint::new(cid, &self.view, bytes);
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
            trim_before: oldest,
        });
        if !self.replaying {
            // Lets the others check their state against this one (and this one against theirs).
            self.advertise(None);
        }
    }

    fn keep_checkpoint(&mut self, cp: &Checkpoint) {
        self.checkpoints.retain(|(m, _)| m.cid != cp.meta.cid);
        self.checkpoints
            .push_back((cp.meta, HeldBytes::Memory(cp.bytes.clone())));
        while self.checkpoints.len() > CHECKPOINTS_KEPT {
            self.checkpoints.pop_front();
        }
    }

    /// Tells one replica (or all) which checkpoints this one can serve.
    fn advertise(&mut self, to: Option<ReplicaId>) {
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
    fn consider_transfer(&mut self, now: u64) {
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
    fn drop_overtaken_transfer(&mut self) {
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

    fn serve_chunk(&mut self, to: ReplicaId, cid: Cid, digest: Digest, offset: u64, len: u32) {
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

    fn on_chunk_outcome(&mut self, now: u64, outcome: ChunkOutcome) {
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
                        // The decision of the checkpoint itself, and whatever followed.
                        self.last_catchup_us = Some(now);
                        self.broadcast(ReplicaMessage::DecisionRequest { from: cid });
                    }
                    Err(_) => self.reject(None, Rejection::UndecodableCheckpoint),
                }
            }
        }
    }

    /// Replaces the state with a checkpoint (whose digest was agreed on, or read from this
    /// replica's own disk). `announce` tells the driver to store it.
    fn install_state(
        &mut self,
        bytes: Vec<u8>,
        meta: CheckpointMeta,
        announce: bool,
    ) -> Result<(), String> {
        let st = ReplicaState::decode_from(&bytes).map_err(|e| e.to_string())?;
        self.service
            .restore(st.service)
            .map_err(|e| e.to_string())?;
        let cid = st.cid;
        let meta = CheckpointMeta {
            cid,
            view: st.view.id,
            ..meta
        };
        let view_changed = st.view != self.view;
        self.sessions = st.sessions;
        self.view = st.view;
        self.view_since = st.view_since;
        self.previous_view = st.previous_view;
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
        self.future = self.future.split_off(&cid.next());
        let ahead = std::mem::take(&mut self.decided_ahead).split_off(&cid.next());
        self.decided_ahead = mine.into_iter().chain(ahead).collect();
        self.trim_unproven();
        self.pending_sync = None;
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

    fn sample_latency(&mut self, us: u64) {
        self.regency_latency_us = Some(match self.regency_latency_us {
            None => us,
            Some(avg) => (avg * 7 + us) / 8,
        });
    }

    /// Runs everything an input made possible: buffered decisions and messages for the next
    /// instance, a SYNC that waited for catch-up, a new proposal. Iterative, not recursive, so a
    /// long catch-up cannot grow the stack.
    fn advance(&mut self, now: u64) {
        self.clock_us = self.clock_us.max(now);
        loop {
            let current = self.current_cid();
            if let Some(d) = self.decided_ahead.remove(&current) {
                // Verified on arrival, unless it is one of this replica's own logged ones.
                let proven = !self.unproven.contains(&current);
                self.decide(d, proven);
                continue;
            }
            if let Some((from, msg)) = self.pending_sync.take() {
                let target = sync_target(&msg);
                if self.current_cid().0 + 1 >= target.0 {
                    self.on_sync(now, from, msg);
                    continue;
                }
                self.pending_sync = Some((from, msg));
            }
            if let Some(msgs) = self.future.remove(&current) {
                for (from, msg) in msgs {
                    self.dispatch(now, from, msg);
                }
                continue;
            }
            if !self.synchronizing && !self.future_epoch.is_empty() {
                let ready: Vec<_>;
                (ready, self.future_epoch) = std::mem::take(&mut self.future_epoch)
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
    }

    // ----- synchronization phase -------------------------------------------------------------

    /// Asks to move to `target` (or joins others asking): STOP to all, retransmitted until the
    /// regency changes. A replica never votes for a lower regency than it voted for before.
    fn suspect(&mut self, now: u64, target: Regency, why: &'static str) {
        if !self.participating() {
            return;
        }
        let target = target.max(self.regency.next()).max(self.stop_sent);
        if target == self.stop_sent && self.stop_active {
            return;
        }
        self.events.push(Event::Suspected {
            regency: target,
            why,
        });
        self.stop_sent = target;
        self.stop_active = true;
        self.stop_started_us = now;
        self.stop_votes.insert(self.me, target);
        let requests = self.pool.oldest(MAX_CARRIED);
        self.broadcast(ReplicaMessage::Stop {
            regency: target,
            requests,
        });
        self.stop_retransmit_at = Some(now + self.config.stop_retransmit_us);
        self.check_stops(now);
    }

    fn on_stop(&mut self, now: u64, from: ReplicaId, regency: Regency) {
        if regency <= self.regency {
            // The sender is behind: show it where the cluster is.
            self.relay_sync(from);
            if let Some(last) = self.last_decided {
                self.help(from, last);
            }
            return;
        }
        let e = self.stop_votes.entry(from).or_insert(regency);
        if regency > *e {
            *e = regency;
        }
        self.check_stops(now);
    }

    /// The largest regency that at least `k` replicas (counting this one's own STOP) want.
    fn kth_vote(&self, k: usize) -> Option<Regency> {
        let mut votes: Vec<Regency> = self
            .stop_votes
            .values()
            .copied()
            .filter(|r| *r > self.regency)
            .collect();
        votes.sort_unstable_by(|a, b| b.cmp(a));
        votes.get(k.checked_sub(1)?).copied()
    }

    fn check_stops(&mut self, now: u64) {
        // f+1 replicas want to leave: at least one is correct, so join them (PBFT's rule).
        if let Some(r) = self.kth_vote(self.view.weak()) {
            if r > self.stop_sent {
                self.suspect(now, r, "joined leader change");
                return;
            }
        }
        if let Some(r) = self.kth_vote(self.view.strong()) {
            if r > self.regency && self.stop_sent >= r {
                self.install(now, r);
            }
        }
    }

    fn install(&mut self, now: u64, regency: Regency) {
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
        self.sync_sent = false;
        self.sync_behind = false;
        self.progress_in_regency = false;
        self.regency_started_us = now;
        self.stop_active = self.stop_sent > regency;
        if !self.stop_active {
            self.stop_retransmit_at = None;
        }
        self.stop_votes.retain(|_, r| *r > regency);
        self.stopdata.retain(|_, (r, _)| *r == regency);
        self.current_sync = None;
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
            self.stopdata.insert(
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

    fn own_stopdata(&mut self) -> (Option<Decision>, SignedCollect, Vec<Batch>) {
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
        (
            last,
            SignedCollect::sign(collect, &self.key),
            self.instance.collect_values(),
        )
    }

    fn on_stopdata(
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
        self.stopdata.insert(
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
    fn try_sync(&mut self, now: u64) {
        if !self.synchronizing || self.sync_sent || !self.is_leader() || !self.participating() {
            return;
        }
        // Decisions learnt since installing make this replica's own STOPDATA stale.
        let own_cid = self
            .stopdata
            .get(&self.me)
            .map(|(_, s)| s.collect.collect.cid);
        if own_cid != Some(self.current_cid()) {
            let (last, collect, values) = self.own_stopdata();
            self.stopdata.insert(
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
            .filter_map(|s| sync::project(&s.collect.collect, target))
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
            self.sync_behind = true;
            if self.catchup_due(now) {
                self.request_decisions(now, None);
            }
            return;
        }
        self.sync_behind = false;
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
        self.sync_sent = true;
        self.broadcast(msg.clone());
        self.on_sync(now, self.me, msg);
    }

    /// A SYNC is self-certifying (a proven last decision, n-f signed collects, a value the rule
    /// allows), so it is accepted from any replica that relays it.
    fn on_sync(&mut self, now: u64, from: ReplicaId, msg: ReplicaMessage) {
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
                    self.suspect(now, regency.next(), reason.label());
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
                self.pending_sync = Some((from, msg.clone()));
                if self.catchup_due(now) {
                    self.request_decisions(now, None);
                }
                return;
            }
        }
        if regency > self.regency {
            // Learnt from the SYNC itself: n-f replicas installed this regency.
            self.regency = regency;
            self.stop_votes.retain(|_, r| *r > regency);
            self.events.push(Event::RegencyInstalled {
                regency,
                leader: self.view.leader(regency),
            });
            self.stats.regencies_installed += 1;
        }
        if self.stop_sent < regency {
            self.stop_sent = regency;
        }
        let batch = batch.clone();
        if self.current_cid() == target && matches!(choice, Choice::Free) {
            if let Err(reason) = self.validate_batch(now, &batch) {
                self.reject(Some(from), reason);
                self.suspect(now, regency.next(), "invalid_sync_batch");
                return;
            }
        }
        self.synchronizing = false;
        self.sync_behind = false;
        self.stop_active = self.stop_sent > regency;
        if !self.stop_active {
            self.stop_retransmit_at = None;
        }
        self.regency_started_us = now;
        self.current_sync = Some(msg.clone());
        self.pool.restart_timers(now);
        if self.current_cid() == target {
            let digest = batch.digest();
            self.hold_and_write(regency, digest, batch);
        }
    }

    fn check_sync(
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
            .map(|c| sync::project(&c.collect, target))
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

fn msg_epoch(m: &ReplicaMessage) -> Option<Epoch> {
    match m {
        ReplicaMessage::Propose { epoch, .. }
        | ReplicaMessage::Write { epoch, .. }
        | ReplicaMessage::Accept { epoch, .. } => Some(*epoch),
        _ => None,
    }
}

fn sync_regency(m: &ReplicaMessage) -> Regency {
    match m {
        ReplicaMessage::Sync { regency, .. } => *regency,
        _ => Regency(0),
    }
}

fn sync_target(m: &ReplicaMessage) -> Cid {
    match m {
        ReplicaMessage::Sync { last, .. } => last.as_ref().map_or(Cid(0), |d| d.cid.next()),
        _ => Cid(0),
    }
}
