//! One replica's protocol state machine: Mod-SMaRt ordering over VP-Consensus, the
//! synchronization phase, decision transfer, deduplication and execution.
//!
//! Inputs: client requests, replica messages (from an authenticated peer), and timeouts, each
//! with the driver's current time. Outputs: messages, replies, events, and the next deadline.
//! Never any I/O, clock or randomness of its own.

mod accepts;
mod catchup;
mod checkpoints;
mod leader_change;
mod membership;
mod ordering;
mod promises;
mod release;
mod requests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::core::clients::{Freshness, Pool, Sessions};
use crate::core::config::Config;
use crate::core::instance::{Instance, Recorded, Vote};
use crate::core::output::{Event, Output, Suspicion};
use crate::core::promise::{Promise, PromiseKey};
use crate::core::reconfig::{self, ReconfigOutcome, ReconfigRequest};
use crate::core::rejection::Rejection;
use crate::core::replies::RecentReplies;
use crate::core::state::{
    encode_state, Checkpoint, EncodedCheckpoint, HeldBytes, OrderingState, PendingCheckpoint,
    ReplicaState, StoredCheckpoint,
};
use crate::core::sync::{self, Choice};
use crate::core::transfer::{ChunkOutcome, Transfer};
use crate::core::verified::Verified;
use crate::crypto::{self, Digest, Domain, KeyCache, KeyPair};
use crate::service::{ExecContext, Service};
use crate::view::View;
use crate::wire::codec::{Decode, Encode};
use crate::wire::ids::{Cid, Epoch, Regency, ReplicaId, ViewId};
use crate::wire::limits;
use crate::wire::messages::{
    accept_signing_bytes, Batch, CheckpointMeta, ClientId, Collect, Decision, Proof,
    ReplicaMessage, Reply, ReplyBody, RequestKind, SignedCollect, SignedRequest, WriteProof,
};

/// Regency-change messages buffered for epochs this replica has not installed yet.
const MAX_FUTURE_EPOCH_MESSAGES: usize = 256;
/// Requests carried in one STOP or FORWARD.
const MAX_CARRIED: usize = 1024;
/// Under load a request can wait longer than the request timeout behind a leader that serves
/// every client in turn; however the leader serves, a request that waits this many times the
/// timeout still gets it suspected.
const OVERLOAD_PATIENCE: u64 = 30;
/// Payload bytes of requests a repeated or escalated STOP carries (but always the oldest
/// request): the first STOP of a leader change carried up to `limits::MAX_CARRIED_BYTES`.
const STOP_RESENT_BYTES: usize = 256 * 1024;
/// A leader counts as stalled after this many typical batch intervals without one...
const STALL_FACTOR: u64 = 4;
/// ...but never more than this many timeouts.
const STALL_CAP: u64 = 8;
/// Per-regency latency estimates kept for the slow-leader baseline.
const LATENCY_HISTORY: usize = 8;
/// Checkpoints kept in memory to serve state transfer (the newest and the one before).
const CHECKPOINTS_KEPT: usize = 2;
/// Replies kept for retransmissions (`RecentReplies`): a client's requests in flight are at most
/// `max_pending_per_client` (256 by default), so this covers 64 such clients at once.
const RECENT_REPLIES: usize = 16 * 1024;
/// At most this many bytes of them.
const RECENT_REPLY_BYTES: usize = 16 << 20;
/// Request bytes of decisions sent in answer to one request (past the first decision). A
/// laggard asks again every catch-up interval: replies of `max_decisions_per_reply` large
/// batches each piled up in the peers' send queues, gigabytes while a replica caught up.
const DECISION_REPLY_BYTES: usize = 4 << 20;
/// Start-up requests for decisions, one per catch-up interval, until a peer answers with a
/// decision or its checkpoints (the first ones may precede the links; a replica that is not
/// behind gets no answer and stops after these). A finished state transfer asks the same way.
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
    /// The replica ran from this disk before (its promise files existed). It may then have
    /// proposed in the regency it stopped in without a promise: a leader promises its own value
    /// only after its PROPOSE went out, so that the promise's fsync runs beside the others'
    /// instead of before them. It leads again only in a later regency.
    pub ran_before: bool,
}

pub struct Replica {
    me: ReplicaId,
    key: KeyPair,
    view: View,
    config: Config,
    service: Box<dyn Service>,
    sessions: Sessions,
    /// Replies given lately, for retransmissions of requests older than a client's last.
    recent_replies: RecentReplies,
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
    catchup: catchup::CatchUp,

    /// Checkpoints kept to serve state transfer, oldest first: in memory until the driver
    /// says where it stored them.
    checkpoints: VecDeque<(CheckpointMeta, HeldBytes)>,
    transfer: Transfer,
    /// Given a view with history but no state: take no part until a checkpoint of that view
    /// (or a later one) is installed.
    joining: bool,
    views: membership::ViewHistory,
    /// Replaying the local log at start-up: its decisions are on disk already and their replies
    /// long sent.
    replaying: bool,
    /// What the last `Output::Promise` said (only with `Config::persist`).
    promised: Option<PromiseKey>,
    /// A promise recovered from disk for an instance not reached yet (the log lost its tail in
    /// the crash): this replica takes no part until it gets there, then restores it.
    restored: Option<Promise>,
    /// A restarted replica proposes only in regencies after this one (see `FromDisk::ran_before`).
    lead_after: Option<Regency>,
    /// A restarted replica writes nothing new in this regency up to this instance: it may have
    /// written there before the crash without a promise (`write_covered`).
    no_write: Option<(Regency, Cid)>,
    /// Every other member reads protocol 2 (`set_peers_read_signed_writes`): WRITEs are signed,
    /// and may leave before their promise.
    signs_writes: bool,

    /// Payload bytes decided since the last checkpoint (see `Config::checkpoint_bytes`).
    bytes_since_checkpoint: u64,
    /// Bumped by every installed state: a checkpoint frozen before it and encoded after it is
    /// of a state this replica no longer has.
    checkpoint_epoch: u64,

    regency: Regency,
    synchronizing: bool,
    lc: leader_change::LeaderChange,
    timeout_us: u64,
    regency_started_us: u64,
    /// Whether the driver's clock was read yet (`observe_clock`).
    clock_started: bool,
    /// When this replica last resumed after its process did not run (see [`Replica::resumed`]).
    resumed_us: u64,
    progress_in_regency: bool,
    regency_latency_us: Option<u64>,
    latency_history: VecDeque<u64>,
    /// The driver finds its own host short of CPU: slowness is not judged (see
    /// [`Replica::set_host_busy`]).
    host_busy: bool,
    /// The regency in which a slow-leader suspicion was last withheld for a busy host.
    slow_withheld: Option<Regency>,
    /// With `Config::persist`: the last CID the driver reported durable (`log_durable`), and
    /// the replies computed from a state neither it nor a promise keeps yet (see `release`).
    durable: Option<Cid>,
    held_replies: Vec<(Option<Cid>, Output)>,
    /// A replica restarted from its disk answers no unordered read from a state older than
    /// the disk held, nor before it decides its last promise's instance: its replies before
    /// the crash may have come from there, and a read answered from before them could complete
    /// a quorum that predates a write (a restart into a newer view sets the log aside and
    /// starts empty, as a joiner). Promises never go back to an earlier instance (a restored
    /// one stops all voting until it is reached), so the next restart finds one as late.
    read_fence: Option<Cid>,

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
        let max_pending_bytes = config.max_pending_bytes;
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
            recent_replies: RecentReplies::new(RECENT_REPLIES, RECENT_REPLY_BYTES),
            pool: Pool::with_max_bytes(max_pending_bytes),
            last_decided: None,
            last_timestamp_ms: 0,
            log: BTreeMap::new(),
            unproven: BTreeSet::new(),
            instance: Instance::new(Cid(0)),
            lazy_accepts: false,
            settle_at: None,
            last_round: None,
            catchup: catchup::CatchUp::new(),
            checkpoints: VecDeque::new(),
            transfer,
            joining,
            replaying: false,
            views: membership::ViewHistory::default(),
            promised: None,
            restored: None,
            lead_after: None,
            no_write: None,
            signs_writes: false,
            bytes_since_checkpoint: 0,
            checkpoint_epoch: 0,
            regency: Regency(0),
            synchronizing: false,
            lc: leader_change::LeaderChange::default(),
            timeout_us,
            regency_started_us: 0,
            clock_started: false,
            resumed_us: 0,
            progress_in_regency: false,
            regency_latency_us: None,
            latency_history: VecDeque::new(),
            host_busy: false,
            slow_withheld: None,
            durable: None,
            held_replies: Vec::new(),
            read_fence: None,
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
            ran_before,
        } = disk;
        // What the disk held before anything below sets part of it aside (replies came from
        // no later state: they wait for it to be durable).
        let on_disk = decisions.last().map(|d| d.cid).max(
            promise
                .as_ref()
                .and_then(|p| p.decided.last().map(|d| d.cid)),
        );
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
        let promised_regency = promise.as_ref().map(|p| p.collect.regency);
        let promised_cid = promise.as_ref().map(|p| p.collect.cid);
        if let Some(p) = &promise {
            // Set even when the promise is moot: the instance after it may still be open.
            r.no_write = Some((p.collect.regency, p.collect.cid.next()));
        }
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
        if ran_before {
            // Every regency it led after the first began with a promised SYNC, so the last
            // promise's regency is at least the one it stopped in, even when the log went past
            // that promise's instance and the promise itself is moot.
            r.lead_after = Some(r.regency.max(promised_regency.unwrap_or(Regency(0))));
        }
        r.events.clear();
        // Everything recovered was on disk.
        r.durable = r.last_decided;
        r.read_fence = on_disk.max(r.last_decided).max(promised_cid);
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

    /// Payload bytes of the requests waiting to be ordered.
    pub fn pending_bytes(&self) -> usize {
        self.pool.bytes()
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
        self.views.view_since <= cid && cid <= self.current_cid()
    }

    /// The view whose members proved the decision of `cid`.
    fn view_for(&self, cid: Cid) -> &View {
        self.views.view_for(&self.view, cid)
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

    /// Leader, and not in a regency it may have led before a restart without knowing what it
    /// proposed there (`lead_after`); the others' timers then move on to the next regency.
    fn may_lead(&self) -> bool {
        self.is_leader() && self.lead_after.is_none_or(|r| self.regency > r)
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

    /// The earliest time at which `on_timeout` has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut d: Option<u64> = None;
        let mut at = |t: u64| d = Some(d.map_or(t, |x: u64| x.min(t)));
        if let Some((_, _, due)) = self.settle_at {
            at(due);
        }
        if let Some(t) = self.pool.oldest_unforwarded() {
            at(self.request_due(t, 1));
        }
        if let Some(oldest) = self.pool.oldest_arrival() {
            // A replica outside its view (removed, or still joining) suspects nobody.
            if !self.lc.stop_active && self.participating() {
                at(self.request_due(oldest, 2));
                if !self.synchronizing && !self.host_busy {
                    if let Some(slow) = self.slow_threshold_us() {
                        at(oldest
                            .saturating_add(slow)
                            .max(self.regency_started_us + self.slow_grace_us()));
                    }
                }
            }
        }
        if self.lc.stop_active {
            at(self.lc.stop_started_us.saturating_add(2 * self.timeout_us));
            if let Some(t) = self.lc.stop_retransmit_at {
                at(t);
            }
        }
        let waiting = self.catchup_ask_due();
        if self.lc.pending_sync.is_some()
            || !self.catchup.decided_ahead.is_empty()
            || waiting.is_some()
            || self.lc.sync_behind
        {
            let next_ask = self
                .catchup
                .last_catchup_us
                .unwrap_or(0)
                .saturating_add(self.catchup_interval_us());
            at(waiting.map_or(next_ask, |w| w.max(next_ask)));
        }
        if self.behind_peers() {
            at(self.behind_ask_at());
        }
        if self.catchup.startup_probes > 0 {
            at(self
                .catchup
                .last_catchup_us
                .map_or(0, |t| t.saturating_add(self.catchup_interval_us())));
        }
        if let Some(t) = self.transfer.deadline() {
            at(t);
        } else if self.joining {
            at(self
                .catchup
                .last_catchup_us
                .unwrap_or(0)
                .saturating_add(self.catchup_interval_us()));
        }
        d
    }

    fn catchup_due(&self, now: u64) -> bool {
        self.catchup
            .last_catchup_us
            .is_none_or(|t| now >= t.saturating_add(self.catchup_interval_us()))
    }

    /// Since when nothing was executed in this regency.
    fn idle_since(&self) -> u64 {
        self.pool
            .last_batch_us()
            .max(self.regency_started_us)
            .max(self.resumed_us)
    }

    /// When a waiting request makes this replica ask its peers for decisions it may have
    /// missed: once the oldest one waited a timeout and nothing was executed for one (while
    /// batches execute, decisions are not being missed; a long queue is not a reason to ask).
    fn catchup_ask_due(&self) -> Option<u64> {
        let idle = self.idle_since().saturating_add(self.timeout_us);
        self.pool
            .oldest_arrival()
            .map(|t| t.saturating_add(self.timeout_us).max(idle))
    }

    /// When a request that arrived at `arrived_us` is due for stage one of its timer
    /// (forwarding) or stage two (suspecting the leader). A leader that executes nothing for a
    /// timeout (or the longer time batches take under this load: `stall_allowance_us`), or
    /// that lets rounds of other clients' requests go by without the oldest one
    /// (`Pool::rounds_waited`), is due after `stage` timeouts as in BFT-SMaRt. One that keeps
    /// serving every client in turn is not, when the queue alone makes requests wait that long
    /// (many clients of large values: replacing it would only start the queue again under the
    /// next leader), until `OVERLOAD_PATIENCE` times as long.
    fn request_due(&self, arrived_us: u64, stage: u64) -> u64 {
        let due = arrived_us.saturating_add(stage * self.timeout_us);
        if self.pool.rounds_waited() >= stage {
            return due;
        }
        let stalled = self.idle_since().saturating_add(self.stall_allowance_us());
        let patience = arrived_us.saturating_add(stage * OVERLOAD_PATIENCE * self.timeout_us);
        due.max(stalled.min(patience))
    }

    /// How long a leader may execute nothing while requests wait before it counts as stalled:
    /// a timeout, or `STALL_FACTOR` batch intervals when the load makes batches take longer
    /// (values of megabytes from many clients on a busy host take seconds each), at most
    /// `STALL_CAP` timeouts. The intervals come from earlier regencies' leaders once there are
    /// a few, so a leader cannot stretch its own allowance (`Pool::batch_interval`).
    fn stall_allowance_us(&self) -> u64 {
        let t = self.timeout_us;
        self.pool.batch_interval().map_or(t, |i| {
            i.saturating_mul(STALL_FACTOR)
                .clamp(t, STALL_CAP.saturating_mul(t))
        })
    }

    pub(super) fn catchup_interval_us(&self) -> u64 {
        (self.config.request_timeout_us / 8).max(1)
    }

    /// Tells the core that this replica's process did not run for a while (stopped, or its host
    /// did not schedule it): its requests' timers ran meanwhile without it seeing what the
    /// leader did, so they start again and the leader is judged from now. Without this a
    /// replica resumed after a pause asks for a leader change at once, whatever the leader.
    pub fn resumed(&mut self, now: u64) {
        self.observe_clock(now);
        self.resumed_us = now;
        self.pool.restart_timers(now);
    }

    /// Tells the core whether this replica's own host is short of CPU (the driver measures how
    /// long its threads wait for one). Requests then wait long under any leader, so a leader is
    /// not judged slow meanwhile; a leader that stops is still replaced by the request timeout.
    /// The simulator never sets it: its replicas run on a host of their own.
    pub fn set_host_busy(&mut self, busy: bool) {
        self.host_busy = busy;
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
        self.observe_clock(now);
        self.settle(now);
        if self.catchup.startup_probes > 0 && self.catchup_due(now) {
            self.catchup.startup_probes -= 1;
            self.request_decisions(now, None);
        }
        if self.transfer.deadline().is_some_and(|t| now >= t) {
            for (to, msg) in self.transfer.on_timeout(now) {
                self.send(to, msg);
            }
        } else if self.joining && self.transfer.in_progress().is_none() && self.catchup_due(now) {
            // A joiner may start before the members installed the view naming it (they refuse
            // it until then): keep asking.
            self.catchup.last_catchup_us = Some(now);
            self.broadcast(ReplicaMessage::CheckpointQuery);
        }
        // Request timer, stage one: forward what waited a full timeout to the leader, and
        // repeat this replica's votes in case they were lost.
        let cutoff = now.saturating_sub(self.timeout_us);
        if self
            .pool
            .oldest_unforwarded()
            .is_some_and(|t| now >= self.request_due(t, 1))
        {
            let fwd = self
                .pool
                .take_unforwarded(cutoff, MAX_CARRIED, limits::MAX_CARRIED_BYTES);
            if !self.is_leader() {
                let leader = self.leader();
                self.send(leader, ReplicaMessage::Forward { requests: fwd });
            }
            self.repeat_votes();
        }
        // A request waiting a full timeout may mean this replica missed decisions while the
        // others went quiet: nothing else would tell it. Ask, and keep asking while it waits,
        // since the question itself can be lost (seeds 418 n=7 and 15452 n=4 found this).
        if self.catchup_ask_due().is_some_and(|t| now >= t) && self.catchup_due(now) {
            self.request_decisions(now, None);
        }
        // Stage two: the leader is faulty, or merely slow compared with recent leaders.
        if let Some(oldest) = self.pool.oldest_arrival() {
            let age = now.saturating_sub(oldest);
            if !self.lc.stop_active {
                if now >= self.request_due(oldest, 2) {
                    self.suspect(now, self.regency.next(), Suspicion::RequestTimeout);
                } else if !self.synchronizing
                    && now >= self.regency_started_us + self.slow_grace_us()
                    && self.slow_threshold_us().is_some_and(|t| age >= t)
                {
                    if !self.host_busy {
                        self.suspect(now, self.regency.next(), Suspicion::SlowLeader);
                    } else if self.slow_withheld != Some(self.regency) {
                        self.slow_withheld = Some(self.regency);
                        self.events.push(Event::SlowLeaderWithheld {
                            regency: self.regency,
                        });
                    }
                }
            }
        }
        if self.lc.stop_active {
            // A leader change that does not complete escalates to the next regency, with a
            // longer timeout so that a slow network eventually fits in one.
            if now >= self.lc.stop_started_us.saturating_add(2 * self.timeout_us) {
                self.timeout_us = (self.timeout_us * 2).min(self.config.max_request_timeout_us);
                self.suspect(
                    now,
                    self.lc.stop_sent.next(),
                    Suspicion::LeaderChangeTimeout,
                );
            } else if self.lc.stop_retransmit_at.is_some_and(|t| now >= t) {
                let requests = self.pool.oldest(MAX_CARRIED, STOP_RESENT_BYTES);
                self.broadcast(ReplicaMessage::Stop {
                    regency: self.lc.stop_sent,
                    requests,
                });
                self.lc.stop_retransmit_at = Some(now + self.config.stop_retransmit_us);
            }
        }
        if (self.lc.pending_sync.is_some()
            || !self.catchup.decided_ahead.is_empty()
            || self.lc.sync_behind)
            && now
                >= self
                    .catchup
                    .last_catchup_us
                    .unwrap_or(0)
                    .saturating_add(self.catchup_interval_us())
        {
            self.request_decisions(now, None);
        } else if self.behind_peers() && now >= self.behind_ask_at() {
            // Peers are past an instance this replica stalled on and cannot decide alone (its
            // messages were dropped, say during a state transfer): keep asking, once per
            // interval, until it has caught up, even when nothing new is ordered.
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
                signature: self.instance.write_signature(epoch, self.me),
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

    /// A message from replica `from`, as authenticated by the channel.
    pub fn on_message(&mut self, now: u64, from: ReplicaId, msg: ReplicaMessage) {
        self.observe_clock(now);
        // A replica removed while behind must still learn the decisions up to its removal, or
        // it would never know it was removed: it may ask for them, and for nothing else.
        let former = self
            .views
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
            // Nothing else can be checked or answered before the state arrives; but votes
            // dropped here are instances it will have to ask for once it has the state.
            if let ReplicaMessage::Propose { cid, .. }
            | ReplicaMessage::Write { cid, .. }
            | ReplicaMessage::Accept { cid, .. } = msg
            {
                self.note_peer_at(from, cid);
                self.note_lost(from, cid);
            }
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
                self.catchup.startup_probes = 0;
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
                self.catchup.startup_probes = 0;
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
