//! The simulated world: an event queue ordered by (time, sequence number) over replica nodes
//! and clients, with a network that follows the run's `SimConfig`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::admin::{AdminAction, SimAdmin};
use crate::checker::Checker;
use crate::config::{ServiceKind, SimConfig};
use crate::workload::SimClient;
use kmmr_byzantine::{honest, Adversary, Behaviour, Dest, Frame, Position};
use kmmr_linearizability::{self as linearizability, CheckResult};
use kmmr_protocol::core::output::{Event, Output};
use kmmr_protocol::core::replica::{FromDisk, Replica};
use kmmr_protocol::core::state::PendingCheckpoint;
use kmmr_protocol::crypto::{Digest, KeyPair};
use kmmr_protocol::service::kv::{KvRequest, KvStore};
use kmmr_protocol::service::noop::NoopService;
use kmmr_protocol::service::Service;
use kmmr_protocol::view::{Member, View};
use kmmr_protocol::wire::codec::{Decode, Encode};
use kmmr_protocol::wire::ids::{Cid, ReplicaId, ViewId};
use kmmr_protocol::wire::limits;
use kmmr_protocol::wire::messages::{ReplicaMessage, Reply, SignedRequest};

mod disk;
mod network;
mod report;

use disk::{SimDisk, LOG_LAG, LOG_SYNC_MAX_US, SLOW_LOG_SYNC_MAX_US};
use report::{describe_faults, trace_message};

/// Steps after which a run is declared livelocked.
const MAX_EVENTS: u64 = 3_000_000;
/// History retained by the simulated KV store.
const KV_HISTORY: u64 = 10_000;

/// What a run did and what it found.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    pub seed: u64,
    pub n: usize,
    pub violations: Vec<String>,
    /// Instances decided (highest CID + 1).
    pub decided: u64,
    /// Requests executed by the replica that executed most.
    pub executed_requests: u64,
    pub ops_completed: usize,
    pub ops_total: usize,
    pub end_time_us: u64,
    pub max_regency: u32,
    pub events: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    pub faults: String,
    /// Each replica node's last decided CID at the end (twin copies after the replicas).
    pub node_last_decided: Vec<Option<u64>>,
    /// One line per replica node at the end: regency, synchronizing, pending requests.
    pub node_summaries: Vec<String>,
    /// Leader-change requests: (time in us, node, regency asked for, why).
    pub suspicions: Vec<(u64, usize, u32, &'static str)>,
    /// State transfers completed, checkpoints taken, and views installed, over all nodes.
    pub state_transfers: u64,
    pub checkpoints: u64,
    pub views_installed: u64,
    /// Checkpoints encoded off the event loop and handed back (`SimConfig::checkpoint_encode_us`).
    pub checkpoints_encoded_later: u64,
    /// Client requests sent again because f+1 replicas said a later one of their session
    /// overtook them (`ReplyBody::Overtaken`).
    pub overtaken_reissued: u64,
    /// Decisions correct replicas took on all n ACCEPTs with their signatures unchecked.
    pub unchecked_decisions: u64,
    /// Replica-to-replica messages delivered, by (sender node, receiver node, kind).
    pub delivered: BTreeMap<(usize, usize, &'static str), u64>,
}

impl SimReport {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Node(usize),
    Client(usize),
    Admin,
}

#[derive(Debug)]
enum Ev {
    Frame {
        to: Endpoint,
        from: Endpoint,
        bytes: Vec<u8>,
    },
    NodeTimer(usize),
    ClientTimer(usize),
    ClientStart(usize),
    AdminStart,
    AdminTimer,
    CrashStart(usize),
    CrashEnd(usize),
    /// Work of one of the node's own threads done, for the incarnation that asked for it.
    NodeThread {
        node: usize,
        incarnation: u64,
        done: ThreadDone,
    },
}

#[derive(Debug)]
enum ThreadDone {
    /// A checkpoint handed out to encode (`SimConfig::checkpoint_encode_us`) comes back.
    Encoded(PendingCheckpoint),
    /// The log synced up to this CID.
    Synced(Cid),
}

struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (time, sequence).
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct Node {
    id: ReplicaId,
    /// For a twin copy, the node index of the original.
    twin_of: Option<usize>,
    key: KeyPair,
    replica: Replica,
    adversary: Option<Adversary>,
    faulty: bool,
    offset_us: u64,
    down: bool,
    timer_at: Option<u64>,
    last_checked: Option<Cid>,
    disk: SimDisk,
    /// A crash waiting for this node's next promise write (`Crash::at_promise`).
    crash_at_promise: bool,
    /// Restarts so far: a checkpoint encoded for an earlier process is not this one's.
    incarnation: u64,
    /// When the last checkpoint handed out to encode comes back.
    encoded_until: u64,
    /// When the log's last sync so far completes.
    synced_until: u64,
    /// The newest state any reply this node sent came from, over all its restarts.
    replied_from: Option<Cid>,
}

struct World<'a> {
    cfg: &'a SimConfig,
    view: View,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    nodes: Vec<Node>,
    clients: Vec<SimClient>,
    /// Node index of each spare, by its index in the configuration (n, n+1, ...).
    spare_nodes: BTreeMap<usize, usize>,
    admin: Option<SimAdmin>,
    rng: ChaCha8Rng,
    /// Encoding delays, drawn apart from `rng` so that a run's schedule stays as it was up to
    /// its first checkpoint.
    encode_rng: ChaCha8Rng,
    /// Log sync delays, likewise apart, and the longest of them.
    sync_rng: ChaCha8Rng,
    sync_max_us: u64,
    checker: Checker,
    report: SimReport,
    /// `KMMR_SIM_TRACE=1`: print every delivered replica message and every core event, to
    /// follow a failing seed step by step.
    trace: bool,
}

fn new_service(kind: ServiceKind) -> Box<dyn Service> {
    match kind {
        ServiceKind::Kv => Box::new(KvStore::new(KV_HISTORY)),
        ServiceKind::Noop => Box::new(NoopService::default()),
    }
}

/// A key-value store that writes one key nobody asked for while executing CID `at`: its state
/// diverges from the other replicas' while its protocol behaviour stays correct.
struct Diverging {
    inner: KvStore,
    at: u64,
}

impl Service for Diverging {
    fn execute(&mut self, ctx: &kmmr_protocol::service::ExecContext, request: &[u8]) -> Vec<u8> {
        if ctx.cid == self.at && ctx.index == 0 {
            let rot = KvRequest::put("rot", "bits").to_bytes();
            self.inner.execute(ctx, &rot);
        }
        self.inner.execute(ctx, request)
    }

    fn query(&self, request: &[u8]) -> Vec<u8> {
        self.inner.query(request)
    }

    fn snapshot(&self) -> Vec<u8> {
        self.inner.snapshot()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), kmmr_protocol::service::RestoreError> {
        self.inner.restore(snapshot)
    }
}

/// Runs one simulation to completion (every client done) or to its time limit.
pub fn run(cfg: &SimConfig) -> SimReport {
    let mut w = World::new(cfg);
    w.run();
    w.finish()
}

impl<'a> World<'a> {
    fn new(cfg: &'a SimConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut keys: Vec<KeyPair> = (0..cfg.n).map(|_| KeyPair::from_seed(rng.gen())).collect();
        // Derived without the seeded generator, so that runs without reconfiguration keep the
        // schedules they always had.
        let derived = |what: &str, i: usize| {
            KeyPair::from_seed(
                Digest::of_parts(&[&cfg.seed.to_le_bytes(), what.as_bytes(), &i.to_le_bytes()]).0,
            )
        };
        let admin_key = derived("admin", 0);
        keys.extend((0..cfg.spares).map(|i| derived("spare", i)));
        let members = keys[..cfg.n]
            .iter()
            .enumerate()
            .map(|(i, k)| Member {
                id: ReplicaId(i as u32),
                address: format!("sim:{i}"),
                key: k.public(),
            })
            .collect();
        let view = match View::new(ViewId(0), cfg.f, members) {
            Ok(v) => v.with_admin(Some(admin_key.public())),
            Err(e) => panic!("simulation configured with an invalid view: {e}"),
        };
        let mut nodes = Vec::new();
        let make = |i: usize, twin_of: Option<usize>| {
            let behaviour = cfg.behaviours.get(i).cloned().unwrap_or(Behaviour::Correct);
            let id = ReplicaId(i as u32);
            // A node that loses its memory counts against f but runs correct code: the checks
            // hold it to the same agreement and state as the others.
            let diverging = cfg
                .diverge
                .filter(|(node, _)| *node == i && twin_of.is_none())
                .map(|(_, at)| at);
            // A diverging node is held to the others' state only once it repaired itself.
            let faulty =
                behaviour != Behaviour::Correct || cfg.twins.contains(&i) || diverging.is_some();
            let service: Box<dyn Service> = match diverging {
                Some(at) => Box::new(Diverging {
                    inner: KvStore::new(KV_HISTORY),
                    at,
                }),
                None => new_service(cfg.service),
            };
            Node {
                id,
                twin_of,
                key: keys[i].clone(),
                replica: speaking_protocol_2(Replica::new(
                    id,
                    keys[i].clone(),
                    view.clone(),
                    cfg.core.clone(),
                    service,
                )),
                adversary: (behaviour != Behaviour::Correct)
                    .then(|| Adversary::new(behaviour, id, keys[i].clone())),
                faulty,
                offset_us: cfg.clock_offsets_us.get(i).copied().unwrap_or(0),
                down: false,
                timer_at: None,
                last_checked: None,
                disk: SimDisk::default(),
                crash_at_promise: false,
                incarnation: 0,
                encoded_until: 0,
                synced_until: 0,
                replied_from: None,
            }
        };
        for i in 0..cfg.n {
            nodes.push(make(i, None));
        }
        for &t in &cfg.twins {
            nodes.push(make(t, Some(t)));
        }
        // Spares wait, down, until the admin starts them with the view that names them.
        let mut spare_nodes = BTreeMap::new();
        for k in 0..cfg.spares {
            spare_nodes.insert(cfg.n + k, nodes.len());
            let mut node = make(cfg.n + k, None);
            node.down = true;
            nodes.push(node);
        }
        let admin = (!cfg.reconfigs.is_empty()).then(|| {
            SimAdmin::new(
                admin_key.clone(),
                view.clone(),
                cfg.reconfigs.clone(),
                cfg.client_retransmit_us,
            )
        });
        let clients = (0..cfg.clients)
            .map(|i| {
                SimClient::new(
                    i,
                    cfg.seed,
                    view.clone(),
                    cfg.ops_per_client,
                    cfg.keys,
                    cfg.payload_bytes,
                    cfg.service,
                    cfg.client_retransmit_us,
                    cfg.unordered_reads,
                    cfg.client_window,
                )
            })
            .collect();
        let faults = describe_faults(cfg);
        let mut w = World {
            cfg,
            view,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            clients,
            spare_nodes,
            admin,
            rng,
            encode_rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xC0DE_C4EC_0000_0001),
            sync_rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5EC5_F5C0_0000_0002),
            sync_max_us: LOG_SYNC_MAX_US,
            checker: Checker::default(),
            report: SimReport {
                seed: cfg.seed,
                n: cfg.n,
                ops_total: cfg.clients * cfg.ops_per_client,
                faults,
                ..SimReport::default()
            },
            trace: std::env::var_os("KMMR_SIM_TRACE").is_some(),
        };
        // A slow disk in about a third of the seeds.
        if w.sync_rng.gen_bool(0.3) {
            w.sync_max_us = SLOW_LOG_SYNC_MAX_US;
        }
        for (i, c) in cfg.crashes.iter().enumerate() {
            w.schedule(c.from_us, Ev::CrashStart(i));
            w.schedule(c.until_us.max(c.from_us + 1), Ev::CrashEnd(i));
        }
        for i in 0..cfg.clients {
            let start = w.rng.gen_range(0..=cfg.think_us);
            w.schedule(start, Ev::ClientStart(i));
        }
        if let Some(t) = w.admin.as_ref().and_then(|a| a.next_start()) {
            w.schedule(t, Ev::AdminStart);
        }
        w
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn run(&mut self) {
        let mut settled_at: Option<u64> = None;
        while let Some(s) = self.queue.pop() {
            self.now = s.at;
            self.report.events += 1;
            if self.now > self.cfg.max_time_us || settled_at.is_some_and(|t| self.now > t) {
                break;
            }
            if self.report.events > MAX_EVENTS {
                self.checker
                    .violate(format!("livelock: more than {MAX_EVENTS} events"));
                break;
            }
            self.step(s.ev);
            let (now, gst) = (self.now, self.cfg.gst_us);
            if settled_at.is_none()
                && self.clients.iter().all(|c| c.done(now, gst))
                && self.admin_done()
            {
                if self.cfg.settle_us == 0 {
                    break;
                }
                settled_at = Some(now.saturating_add(self.cfg.settle_us));
            }
            if self.checker.violations.len() >= 4 {
                break;
            }
        }
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Frame { to, from, bytes } => match to {
                Endpoint::Node(i) => self.deliver_to_node(i, from, bytes),
                Endpoint::Client(c) => self.deliver_to_client(c, from, bytes),
                Endpoint::Admin => self.deliver_to_admin(from, bytes),
            },
            Ev::NodeTimer(i) => {
                let n = &mut self.nodes[i];
                if n.timer_at != Some(self.now) {
                    return;
                }
                n.timer_at = None;
                if n.down {
                    return;
                }
                let local = self.now + n.offset_us;
                n.replica.set_host_busy(self.cfg.busy_hosts.contains(&i));
                n.replica.on_timeout(local);
                self.flush_node(i);
            }
            Ev::ClientTimer(c) => {
                let now = self.now;
                self.clients[c].session.on_timeout(now);
                self.flush_client(c);
            }
            Ev::ClientStart(c) => {
                let now = self.now;
                self.clients[c].start_next(now, self.cfg.gst_us);
                self.flush_client(c);
            }
            Ev::AdminStart => {
                let now = self.now;
                let members: Vec<(ReplicaId, Member)> = self.member_table();
                let actions = match self.admin.as_mut() {
                    Some(a) => a.start_next(now, |i| members[i].clone()),
                    None => Vec::new(),
                };
                self.admin_actions(actions);
                self.flush_admin();
            }
            Ev::AdminTimer => {
                let now = self.now;
                if let Some(a) = self.admin.as_mut() {
                    a.session.on_timeout(now);
                }
                self.flush_admin();
            }
            Ev::NodeThread {
                node,
                incarnation,
                done,
            } => {
                let n = &mut self.nodes[node];
                if n.incarnation != incarnation {
                    return;
                }
                if n.down {
                    // The thread finished, but the paused process learns of it when it runs.
                    let at = self.now + 1_000;
                    self.schedule(
                        at,
                        Ev::NodeThread {
                            node,
                            incarnation,
                            done,
                        },
                    );
                    return;
                }
                match done {
                    ThreadDone::Encoded(pending) => {
                        n.replica.on_checkpoint_encoded(pending.encode());
                        self.report.checkpoints_encoded_later += 1;
                    }
                    ThreadDone::Synced(cid) => {
                        n.disk.synced = n.disk.synced.max(Some(cid));
                        n.replica.log_durable(Some(cid));
                    }
                }
                self.flush_node(node);
            }
            Ev::CrashStart(k) => {
                let crash = &self.cfg.crashes[k];
                if crash.at_promise {
                    self.nodes[crash.node].crash_at_promise = true;
                } else {
                    self.nodes[crash.node].down = true;
                }
            }
            Ev::CrashEnd(k) => {
                let crash = &self.cfg.crashes[k];
                let node = crash.node;
                // No promise written meanwhile: the crash happens now, between two steps.
                self.nodes[node].crash_at_promise = false;
                if crash.amnesia {
                    let disk = crash.disk;
                    let d = &mut self.nodes[node].disk;
                    let unsynced = d
                        .decisions
                        .iter()
                        .filter(|x| Some(x.cid) > d.synced)
                        .count();
                    let keep = d
                        .decisions
                        .len()
                        .saturating_sub(crash.lost_tail.min(LOG_LAG).min(unsynced));
                    d.decisions.truncate(keep);
                    let view = self.current_view();
                    let n = &mut self.nodes[node];
                    let fresh = || {
                        Replica::new(
                            n.id,
                            n.key.clone(),
                            view.clone(),
                            self.cfg.core.clone(),
                            new_service(self.cfg.service),
                        )
                    };
                    n.replica = if disk {
                        match Replica::recover(
                            n.id,
                            n.key.clone(),
                            view.clone(),
                            self.cfg.core.clone(),
                            new_service(self.cfg.service),
                            FromDisk {
                                checkpoint: n.disk.checkpoint.clone(),
                                checkpoint_decision: n.disk.checkpoint_decision.clone(),
                                decisions: n.disk.decisions.clone(),
                                promise: n.disk.promise.clone(),
                                ran_before: true,
                            },
                        ) {
                            Ok(r) => r,
                            Err(e) => {
                                self.checker.violate(format!(
                                    "node {node} cannot recover from its disk: {e}"
                                ));
                                fresh()
                            }
                        }
                    } else {
                        n.disk = SimDisk::default();
                        fresh()
                    };
                    n.replica.set_peers_read_signed_writes(true);
                    n.last_checked = None;
                    n.incarnation += 1;
                    // A reply counts in its client's quorum: the state it came from must
                    // survive the crash, or that quorum no longer holds what it acknowledged.
                    let recovered = n.replica.answers_from();
                    if disk && !n.faulty && n.replied_from > recovered {
                        let (from, back) = (n.replied_from, recovered);
                        self.checker.violate(format!(
                            "node {node} replied from the state after {from:?} but came back \
                             from its disk at {back:?}"
                        ));
                    }
                } else {
                    // A pause, not a crash: the driver finds its process did not run.
                    let n = &mut self.nodes[node];
                    n.replica.resumed(self.now + n.offset_us);
                }
                self.nodes[node].down = false;
                self.arm_node_timer(node);
            }
        }
    }

    fn deliver_to_node(&mut self, i: usize, from: Endpoint, bytes: Vec<u8>) {
        if self.nodes[i].down {
            return;
        }
        if bytes.len() > limits::MAX_FRAME {
            *self.report.rejected.entry("oversized_frame").or_insert(0) += 1;
            return;
        }
        let local = self.now + self.nodes[i].offset_us;
        match from {
            Endpoint::Node(s) => {
                let sender = self.nodes[s].id;
                let decoded = ReplicaMessage::from_bytes(&bytes);
                if let Ok(m) = &decoded {
                    *self.report.delivered.entry((s, i, m.kind())).or_insert(0) += 1;
                }
                match decoded {
                    Ok(msg) => {
                        if self.trace {
                            eprintln!("{} {s}->{i} {}", self.now, trace_message(&msg));
                        }
                        self.nodes[i].replica.on_message(local, sender, msg)
                    }
                    Err(e) => {
                        *self.report.rejected.entry(e.reason()).or_insert(0) += 1;
                        return;
                    }
                }
            }
            Endpoint::Client(c) => match SignedRequest::from_bytes(&bytes) {
                Ok(req) => {
                    // The client's channel is authenticated, as a TLS connection would be.
                    let channel = Some(self.clients[c].session.key().public());
                    self.nodes[i].replica.on_request(local, channel, req)
                }
                Err(e) => {
                    *self.report.rejected.entry(e.reason()).or_insert(0) += 1;
                    return;
                }
            },
            Endpoint::Admin => match SignedRequest::from_bytes(&bytes) {
                Ok(req) => {
                    let channel = self.admin.as_ref().map(|a| a.session.key().public());
                    self.nodes[i].replica.on_request(local, channel, req)
                }
                Err(e) => {
                    *self.report.rejected.entry(e.reason()).or_insert(0) += 1;
                    return;
                }
            },
        }
        self.flush_node(i);
    }

    fn admin_done(&self) -> bool {
        self.admin.as_ref().is_none_or(|a| a.done())
    }

    /// Every node's identity as a view member, by configuration index.
    fn member_table(&self) -> Vec<(ReplicaId, Member)> {
        let mut table: Vec<(ReplicaId, Member)> = Vec::new();
        for i in 0..self.cfg.n + self.cfg.spares {
            let node = if i < self.cfg.n {
                i
            } else {
                self.spare_nodes[&i]
            };
            let n = &self.nodes[node];
            table.push((
                n.id,
                Member {
                    id: n.id,
                    address: format!("sim:{i}"),
                    key: n.key.public(),
                },
            ));
        }
        table
    }

    /// The newest view the admin knows: what an operator would hand a restarted replica.
    fn current_view(&self) -> View {
        self.admin
            .as_ref()
            .map_or_else(|| self.view.clone(), |a| a.session.view().clone())
    }

    fn admin_actions(&mut self, actions: Vec<AdminAction>) {
        for AdminAction::Start { node, view } in actions {
            let Some(&i) = self.spare_nodes.get(&node) else {
                continue;
            };
            let n = &mut self.nodes[i];
            n.replica = speaking_protocol_2(Replica::new(
                n.id,
                n.key.clone(),
                view,
                self.cfg.core.clone(),
                new_service(self.cfg.service),
            ));
            n.down = false;
            n.last_checked = None;
            self.arm_node_timer(i);
        }
    }

    fn deliver_to_admin(&mut self, from: Endpoint, bytes: Vec<u8>) {
        let Endpoint::Node(s) = from else {
            return;
        };
        let sender = self.nodes[s].id;
        let Ok(reply) = Reply::from_bytes(&bytes) else {
            return;
        };
        let now = self.now;
        let Some(admin) = self.admin.as_mut() else {
            return;
        };
        if let Some(done) = admin.session.on_reply(now, sender, reply) {
            match admin.on_completion(done) {
                Ok(actions) => self.admin_actions(actions),
                Err(v) => self.checker.violate(v),
            }
            if let Some(t) = self.admin.as_ref().and_then(|a| a.next_start()) {
                self.schedule(t.max(now + 1), Ev::AdminStart);
            }
        }
        self.flush_admin();
    }

    fn flush_admin(&mut self) {
        let Some(admin) = self.admin.as_mut() else {
            return;
        };
        let to_send = admin.session.take_to_send();
        let deadline = admin.session.next_deadline();
        self.send_requests(Endpoint::Admin, to_send);
        if let Some(d) = deadline {
            self.schedule(d.max(self.now + 1), Ev::AdminTimer);
        }
    }

    fn deliver_to_client(&mut self, c: usize, from: Endpoint, bytes: Vec<u8>) {
        let Endpoint::Node(s) = from else {
            return;
        };
        let sender = self.nodes[s].id;
        let Ok(reply) = Reply::from_bytes(&bytes) else {
            *self.report.rejected.entry("client_bad_reply").or_insert(0) += 1;
            return;
        };
        let now = self.now;
        if let Some(done) = self.clients[c].session.on_reply(now, sender, reply) {
            if let Err(v) = self.clients[c].complete(now, done) {
                self.checker.violate(v);
            }
            let think = self.rng.gen_range(0..=self.cfg.think_us);
            self.schedule(now + think, Ev::ClientStart(c));
        }
        self.flush_client(c);
    }

    fn flush_client(&mut self, c: usize) {
        let to_send = self.clients[c].session.take_to_send();
        self.send_requests(Endpoint::Client(c), to_send);
        if let Some(d) = self.clients[c].session.next_deadline() {
            self.schedule(d.max(self.now + 1), Ev::ClientTimer(c));
        }
    }

    /// Sends a client's (or the admin's) requests to every node, recording them as issued.
    fn send_requests(&mut self, from: Endpoint, requests: Vec<SignedRequest>) {
        for req in requests {
            self.checker.issued.insert(req.digest());
            let bytes = req.to_bytes();
            for i in 0..self.nodes.len() {
                self.transmit(from, Endpoint::Node(i), bytes.clone(), 0);
            }
        }
    }

    fn flush_node(&mut self, i: usize) {
        let outputs = self.nodes[i].replica.take_outputs();
        // Decisions of this step that no one ever saw: the node went down writing a promise
        // before their log records and replies, which come after it.
        let mut unseen: Vec<Cid> = Vec::new();
        let mut crashed = false;
        let mut outputs = outputs.into_iter();
        while let Some(out) = outputs.next() {
            if out.is_local() {
                let node = &mut self.nodes[i];
                if node.crash_at_promise && matches!(out, Output::Promise(_)) {
                    // Down in the middle of the write: it never reached the disk, and nothing
                    // after it happened.
                    node.crash_at_promise = false;
                    node.down = true;
                    crashed = true;
                    unseen.extend(outputs.filter_map(|o| match o {
                        Output::Persist(d) => Some(d.cid),
                        _ => None,
                    }));
                    break;
                }
                if let Output::EncodeCheckpoint(pending) = out {
                    self.encode_later(i, pending);
                    continue;
                }
                node.disk.apply(&out, &node.replica);
                match &out {
                    // Appended (not a decision out of order, which the log refuses).
                    Output::Persist(d)
                        if node.disk.decisions.last().map(|l| l.cid) == Some(d.cid) =>
                    {
                        self.sync_later(i, d.cid)
                    }
                    Output::StateInstalled(cp) => self.sync_later(i, cp.meta.cid),
                    _ => {}
                }
                continue;
            }
            if let Output::Reply { from, .. } = &out {
                let n = &mut self.nodes[i];
                n.replied_from = n.replied_from.max(*from);
            }
            let frames = self.frames_for(i, out);
            for f in frames {
                self.route(i, f);
            }
        }
        let events = self.nodes[i].replica.take_events();
        let faulty = self.nodes[i].faulty;
        for e in events {
            if self.trace {
                eprintln!("{} node {i}: {e:?}", self.now);
            }
            match e {
                Event::Decided {
                    cid,
                    digest,
                    unchecked,
                    ..
                } if !faulty && !unseen.contains(&cid) => {
                    self.report.unchecked_decisions += u64::from(unchecked);
                    let batch = self.nodes[i].replica.decision(cid).map(|d| d.batch.clone());
                    self.checker.on_decided(i, cid, digest, batch.as_ref());
                }
                Event::Rejected { reason, from } => {
                    *self.report.rejected.entry(reason.label()).or_insert(0) += 1;
                    // What a replica holds as evidence against a peer (the operator names a
                    // replica by it) must never be held against a correct one.
                    if let Some(j) = from {
                        if !faulty && reason.proves_misbehaviour() && self.correct_id(j) {
                            self.checker.violation(format!(
                                "false accusation at {} us: node {i} rejected a message of \
                                 correct replica {} as {reason}",
                                self.now, j.0
                            ));
                        }
                    }
                }
                Event::Suspected { regency, why } if self.report.suspicions.len() < 64 => {
                    self.report
                        .suspicions
                        .push((self.now, i, regency.0, why.label()));
                }
                _ => {}
            }
        }
        // A node that went down in this step restarts from its disk: what it held in memory
        // was never shown.
        if !faulty && !crashed {
            let last = self.nodes[i].replica.last_decided();
            if last.is_some() && last != self.nodes[i].last_checked {
                self.nodes[i].last_checked = last;
                let d = self.nodes[i].replica.state_digest();
                if let Some(cid) = last {
                    self.checker.on_state(i, cid, d);
                }
            }
        }
        self.arm_node_timer(i);
    }

    /// A replica id run only by correct code that never lost its memory: no twin, no
    /// adversary, no restart without its disk.
    fn correct_id(&self, id: ReplicaId) -> bool {
        let mut nodes = self.nodes.iter().enumerate().filter(|(_, n)| n.id == id);
        let Some((i, first)) = nodes.next() else {
            return false;
        };
        nodes.next().is_none()
            && !first.faulty
            && !self
                .cfg
                .crashes
                .iter()
                .any(|c| c.node == i && c.forgets_votes())
    }

    fn frames_for(&mut self, i: usize, out: Output) -> Vec<Frame> {
        let n = &mut self.nodes[i];
        match n.adversary.as_mut() {
            None => vec![honest(&out)],
            Some(adv) => {
                let pos = Position {
                    view: &self.view,
                    regency: n.replica.regency(),
                    last_decided: n.replica.last_decided(),
                };
                adv.transform(&mut self.rng, out, &pos)
            }
        }
    }

    /// Encodes a checkpoint "on another thread": it comes back after a random delay, and
    /// after any other checkpoint the node handed out before it.
    fn encode_later(&mut self, i: usize, pending: PendingCheckpoint) {
        let max = self.cfg.checkpoint_encode_us.unwrap_or(0);
        let at = self.now + self.encode_rng.gen_range(0..=max);
        // One encoder per node: encodings finish in the order they were handed out.
        let at = at.max(self.nodes[i].encoded_until);
        self.nodes[i].encoded_until = at;
        let incarnation = self.nodes[i].incarnation;
        self.schedule(
            at,
            Ev::NodeThread {
                node: i,
                incarnation,
                done: ThreadDone::Encoded(pending),
            },
        );
    }

    /// Syncs the log up to `cid` after a random delay, after the syncs before it.
    fn sync_later(&mut self, i: usize, cid: Cid) {
        let at = self.now + self.sync_rng.gen_range(0..=self.sync_max_us);
        let at = at.max(self.nodes[i].synced_until);
        self.nodes[i].synced_until = at;
        let incarnation = self.nodes[i].incarnation;
        self.schedule(
            at,
            Ev::NodeThread {
                node: i,
                incarnation,
                done: ThreadDone::Synced(cid),
            },
        );
    }

    fn arm_node_timer(&mut self, i: usize) {
        let n = &self.nodes[i];
        if n.down {
            return;
        }
        let Some(local) = n.replica.next_deadline() else {
            return;
        };
        let at = local.saturating_sub(n.offset_us).max(self.now + 1);
        if n.timer_at.is_some_and(|t| t <= at && t > self.now) {
            return;
        }
        self.nodes[i].timer_at = Some(at);
        self.schedule(at, Ev::NodeTimer(i));
    }
}

/// Every simulated node reads protocol 2, as a node sees it when all its links negotiated it.
fn speaking_protocol_2(mut r: Replica) -> Replica {
    r.set_peers_read_signed_writes(true);
    r
}
