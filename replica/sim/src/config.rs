//! What one simulated run looks like: cluster size, workload, network, and the faults, all
//! derived from a seed so that any run can be replayed exactly.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::admin::{ReconfigStep, SimChange};
use kmmr_byzantine::Behaviour;
use kmmr_protocol::core::config::{Config, SlowLeader};
use kmmr_protocol::view::default_f;

/// Network behaviour. Before GST messages may also be lost and replicas partitioned; after it,
/// every message between live nodes arrives within `max_delay_us`.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub min_delay_us: u64,
    pub max_delay_us: u64,
    pub duplicate_prob: f64,
    pub loss_before_gst: f64,
}

/// Replicas split into two sides that cannot talk, from `from_us` to `until_us`.
#[derive(Debug, Clone)]
pub struct Partition {
    pub from_us: u64,
    pub until_us: u64,
    /// Node indices on side B; everything else (clients included) is on side A, except that
    /// clients reach both sides.
    pub side_b: Vec<usize>,
}

/// A node stops (dropping what it receives) and later resumes. With `amnesia`, it loses its
/// memory and restarts from what it persisted if `disk` (its promise included, so it is still
/// correct), else from nothing: a lost disk makes it count against f, since it may vote twice
/// in one epoch. Either way it must catch up.
#[derive(Debug, Clone)]
pub struct Crash {
    pub node: usize,
    pub from_us: u64,
    pub until_us: u64,
    pub amnesia: bool,
    pub disk: bool,
    /// Decisions at the end of the log lost with the disk's cache: the log's group commit had
    /// not synced them yet (the promise is synced before the votes go out, so it survives).
    pub lost_tail: usize,
    /// The crash waits for the node's next promise write (from `from_us` on) and happens
    /// during it: that promise is lost, with everything the node would have done after it,
    /// while what it sent before it is out. A leader sends its PROPOSE before its own promise
    /// of it, so this is where it can forget a value it proposed.
    pub at_promise: bool,
}

impl Crash {
    /// The node's process stops from `from_us` until `until_us` and then runs on with all its
    /// state (SIGSTOP, a frozen VM).
    pub fn pause(node: usize, from_us: u64, until_us: u64) -> Crash {
        Crash {
            node,
            from_us,
            until_us,
            amnesia: false,
            disk: false,
            lost_tail: 0,
            at_promise: false,
        }
    }

    /// The node crashes at `from_us` and restarts at `until_us`, from its disk (`disk`) or with
    /// nothing.
    pub fn restart(node: usize, from_us: u64, until_us: u64, disk: bool) -> Crash {
        Crash {
            amnesia: true,
            disk,
            ..Crash::pause(node, from_us, until_us)
        }
    }

    /// Whether the restart loses votes the node may have sent: only without its disk.
    pub fn forgets_votes(&self) -> bool {
        self.amnesia && !self.disk
    }
}

/// Scripted loss: drops replica-to-replica messages of one kind (`ReplicaMessage::kind`, or
/// "any") between the given nodes (`None` = any node) during a window. Kind "request" with no
/// `from` drops clients' requests to `to` instead (a replica its clients have not reconnected
/// to yet); kind "client_request" drops those of client `from` alone.
#[derive(Debug, Clone)]
pub struct DropRule {
    pub from: Option<usize>,
    pub to: Option<usize>,
    pub kind: &'static str,
    pub from_us: u64,
    pub until_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    Kv,
    Noop,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub n: usize,
    pub f: usize,
    pub clients: usize,
    pub ops_per_client: usize,
    pub keys: usize,
    pub payload_bytes: usize,
    pub service: ServiceKind,
    /// Behaviour per replica index; index beyond n are ignored.
    pub behaviours: Vec<Behaviour>,
    /// Replica indices that run twice, each copy with the same identity.
    pub twins: Vec<usize>,
    pub net: NetConfig,
    pub partitions: Vec<Partition>,
    pub crashes: Vec<Crash>,
    pub drops: Vec<DropRule>,
    /// Per-replica clock offsets.
    pub clock_offsets_us: Vec<u64>,
    pub gst_us: u64,
    /// Extra nodes (indices n, n+1, ...) outside the initial view, for reconfiguration to add.
    pub spares: usize,
    /// Membership changes the admin makes, one at a time, in order.
    pub reconfigs: Vec<ReconfigStep>,
    /// (node, cid): that node's service silently changes its state while executing that CID
    /// (a rogue write, bit rot). The node runs correct protocol code and must repair itself.
    pub diverge: Option<(usize, u64)>,
    /// Replica indices whose host is short of CPU for the whole run: their driver says so
    /// before every timeout (`Replica::set_host_busy`), as a replica process does when its
    /// threads wait for a CPU.
    pub busy_hosts: Vec<usize>,
    /// The run fails for liveness if clients have not finished by then.
    pub max_time_us: u64,
    /// How long the run goes on, idle, once every client (and the admin) finished: 0 ends it
    /// there. Scenarios set it to check what replicas do in a quiet cluster, such as whether
    /// one left behind still catches up when nothing new is ordered.
    pub settle_us: u64,
    pub client_retransmit_us: u64,
    /// Clients wait up to this long between operations, and start within this window.
    pub think_us: u64,
    /// Clients wait for a quorum of replies to writes and send some reads unordered.
    pub unordered_reads: bool,
    /// Operations each client keeps in flight, as the etcd gateway pipelines its callers'
    /// requests: with more than one, a request lost on its way to the leader can be overtaken
    /// by a later one of the same session.
    pub client_window: usize,
    /// Checkpoints encoded off the event loop, as the node does (`Config::defer_checkpoints`),
    /// each coming back within this many microseconds; `None` encodes them on the spot.
    pub checkpoint_encode_us: Option<u64>,
    pub core: Config,
}

impl SimConfig {
    /// This configuration with checkpoints encoded off the event loop, as a node encodes them,
    /// each taking up to `max_us` (0: back before anything else happens).
    pub fn deferring_checkpoints(mut self, max_us: u64) -> Self {
        self.core.defer_checkpoints = true;
        self.checkpoint_encode_us = Some(max_us);
        self
    }

    /// This configuration with every client keeping `window` operations in flight, over
    /// enough keys that the linearizability check of each key stays within its budget (its
    /// search grows with the operations that overlap on one key).
    pub fn pipelining(mut self, window: usize) -> Self {
        self.client_window = window.max(1);
        self.keys = self.keys.max(2 * self.client_window);
        self
    }

    /// A fault-free cluster: the base of scripted scenarios.
    pub fn calm(seed: u64, n: usize) -> Self {
        let f = default_f(n);
        SimConfig {
            seed,
            n,
            f,
            clients: 3,
            ops_per_client: 10,
            keys: 3,
            payload_bytes: 0,
            service: ServiceKind::Kv,
            behaviours: vec![Behaviour::Correct; n],
            twins: Vec::new(),
            net: NetConfig {
                min_delay_us: 100,
                max_delay_us: 2_000,
                duplicate_prob: 0.0,
                loss_before_gst: 0.0,
            },
            partitions: Vec::new(),
            crashes: Vec::new(),
            drops: Vec::new(),
            clock_offsets_us: vec![0; n],
            gst_us: 0,
            spares: 0,
            reconfigs: Vec::new(),
            busy_hosts: Vec::new(),
            diverge: None,
            max_time_us: 120_000_000,
            settle_us: 0,
            client_retransmit_us: 400_000,
            think_us: 2_000,
            unordered_reads: false,
            client_window: 1,
            checkpoint_encode_us: None,
            core: sim_core_config(2_000),
        }
    }

    /// The 0/0 micro-benchmark: no faults, zero network delay, a no-op service, 0-byte
    /// requests, clients that never pause. What it measures is CPU alone.
    pub fn zero_delay_benchmark(seed: u64, n: usize, clients: usize, ops: usize) -> Self {
        let mut c = SimConfig::calm(seed, n);
        c.net = NetConfig {
            min_delay_us: 0,
            max_delay_us: 0,
            duplicate_prob: 0.0,
            loss_before_gst: 0.0,
        };
        c.service = ServiceKind::Noop;
        c.payload_bytes = 0;
        c.think_us = 0;
        c.clients = clients;
        c.ops_per_client = ops;
        c
    }

    /// Up to f faulty replicas of random kinds, random delays, duplication, loss, partitions and
    /// pauses before GST.
    pub fn random(seed: u64, n: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut c = SimConfig::calm(seed, n);
        let max_delay = rng.gen_range(500..=15_000u64);
        c.net = NetConfig {
            min_delay_us: rng.gen_range(50..=max_delay / 2),
            max_delay_us: max_delay,
            duplicate_prob: if rng.gen_bool(0.5) {
                rng.gen_range(0.0..0.05)
            } else {
                0.0
            },
            loss_before_gst: if rng.gen_bool(0.6) {
                rng.gen_range(0.0..0.25)
            } else {
                0.0
            },
        };
        c.core = sim_core_config(max_delay);
        c.clients = rng.gen_range(2..=5);
        c.ops_per_client = rng.gen_range(4..=12);
        c.keys = rng.gen_range(1..=4);
        c.unordered_reads = rng.gen_bool(0.5);
        c.clock_offsets_us = (0..n).map(|_| rng.gen_range(0..=5_000)).collect();
        c.gst_us = rng.gen_range(0..=2_000_000);

        let faulty = rng.gen_range(0..=c.f);
        let mut idx: Vec<usize> = (0..n).collect();
        // Shuffle deterministically so that faulty replicas are sometimes the first leader.
        for i in (1..idx.len()).rev() {
            let j = rng.gen_range(0..=i);
            idx.swap(i, j);
        }
        c.draw_faults(&mut rng, &idx[..faulty], max_delay);
        let correct: Vec<usize> = idx[faulty..].to_vec();
        c.draw_partitions_and_pauses(&mut rng, &correct);
        // Twins talk to different halves for a while: that is when they can equivocate.
        for &t in &c.twins {
            let from = rng.gen_range(0..=c.gst_us.max(1));
            let until = from + rng.gen_range(10_000..=1_000_000);
            let side_b: Vec<usize> = (0..n).filter(|i| *i != t && rng.gen_bool(0.5)).collect();
            c.partitions.push(Partition {
                from_us: from,
                until_us: until,
                side_b,
            });
        }
        // Drawn last, so that the schedules of older seeds stay as they were.
        for crash in c.crashes.iter_mut().filter(|x| x.amnesia) {
            crash.disk = rng.gen_bool(0.5);
        }
        c.core.checkpoint_period = rng.gen_range(4..=16);
        c.core.chunk_bytes = rng.gen_range(64..=2048);
        c.draw_membership_changes(&mut rng);
        c.draw_restarts(&mut rng, &correct);
        // From a stream of its own, so that the schedule above stays what older seeds drew.
        let mut later = ChaCha8Rng::seed_from_u64(seed ^ 0x05EE_D0F9_A0A1);
        for crash in c.crashes.iter_mut().filter(|x| x.amnesia && x.disk) {
            crash.at_promise = later.gen_bool(0.5);
        }
        // Hosts short of CPU, in a third of the seeds: their replicas judge no leader slow and
        // wait longer for the last ACCEPTs before checking signatures.
        if later.gen_bool(0.3) {
            c.busy_hosts = (0..n).filter(|_| later.gen_bool(0.5)).collect();
        }
        c.gst_us = c
            .partitions
            .iter()
            .map(|p| p.until_us)
            .chain(c.crashes.iter().map(|x| x.until_us))
            .fold(c.gst_us, u64::max);
        c
    }

    /// What each faulty replica does: a twin, a Byzantine behaviour, or a crash with amnesia.
    fn draw_faults(&mut self, rng: &mut ChaCha8Rng, faulty: &[usize], max_delay: u64) {
        let c = self;
        for &r in faulty {
            match rng.gen_range(0..12) {
                0 | 1 => c.twins.push(r),
                2 => c.behaviours[r] = Behaviour::Silent,
                3 => {
                    c.behaviours[r] = Behaviour::Slow {
                        extra_us: rng.gen_range(max_delay..=max_delay * 10),
                    }
                }
                4 => c.behaviours[r] = Behaviour::Equivocate,
                5 => c.behaviours[r] = Behaviour::Corrupt,
                6 => c.behaviours[r] = Behaviour::Forge,
                7 => c.behaviours[r] = Behaviour::Replay,
                8 => c.behaviours[r] = Behaviour::Oversize,
                9 => c.behaviours[r] = Behaviour::Mixed,
                10 => c.behaviours[r] = Behaviour::BadAcceptSignatures,
                _ => {
                    let from = rng.gen_range(0..=c.gst_us.max(1));
                    c.crashes.push(Crash {
                        node: r,
                        from_us: from,
                        until_us: from + rng.gen_range(1_000..=500_000),
                        amnesia: true,
                        disk: false,
                        lost_tail: 0,
                        at_promise: false,
                    });
                }
            }
        }
    }

    /// Partitions and pauses of correct replicas, all healed by GST.
    fn draw_partitions_and_pauses(&mut self, rng: &mut ChaCha8Rng, correct: &[usize]) {
        let n = self.n;
        let c = self;
        if c.gst_us > 0 {
            for _ in 0..rng.gen_range(0..=2) {
                let from = rng.gen_range(0..c.gst_us);
                let until = rng.gen_range(from..=c.gst_us);
                let side_b: Vec<usize> = (0..n).filter(|_| rng.gen_bool(0.4)).collect();
                c.partitions.push(Partition {
                    from_us: from,
                    until_us: until,
                    side_b,
                });
            }
            for _ in 0..rng.gen_range(0..=3) {
                // Leaders of the first regencies are the interesting ones to stop.
                let leaders: Vec<usize> = correct.iter().copied().filter(|i| *i < 3).collect();
                let node = if !leaders.is_empty() && rng.gen_bool(0.7) {
                    leaders[rng.gen_range(0..leaders.len())]
                } else {
                    correct[rng.gen_range(0..correct.len())]
                };
                let from = rng.gen_range(0..c.gst_us);
                let until = rng.gen_range(from..=c.gst_us);
                c.crashes.push(Crash::pause(node, from, until));
            }
        }
    }

    fn draw_membership_changes(&mut self, rng: &mut ChaCha8Rng) {
        let n = self.n;
        let c = self;
        // A replica joins under the faults above, racing its own addition half the time, and
        // sometimes one leaves again (the first leader, in half of those): f never changes, so
        // the faulty budget holds in every view.
        if rng.gen_bool(0.3) {
            c.spares = 1;
            let at = rng.gen_range(0..=c.gst_us + 100_000);
            c.reconfigs.push(ReconfigStep {
                at_us: at,
                change: SimChange::Add { node: n },
                early_join: rng.gen_bool(0.5),
            });
            if rng.gen_bool(0.5) {
                let node = if rng.gen_bool(0.5) {
                    0
                } else {
                    rng.gen_range(0..n)
                };
                c.reconfigs.push(ReconfigStep {
                    at_us: at + rng.gen_range(0..=200_000),
                    change: SimChange::Remove { node },
                    early_join: false,
                });
            }
        }
    }

    fn draw_restarts(&mut self, rng: &mut ChaCha8Rng, correct: &[usize]) {
        let c = self;
        // Correct replicas restart from their disks (pods rescheduled, nodes rebooted), beyond
        // the f faults: a restart that keeps the disk must not cost the protocol its safety.
        if rng.gen_bool(0.4) {
            for _ in 0..rng.gen_range(1..=2) {
                let node = correct[rng.gen_range(0..correct.len())];
                let from = rng.gen_range(0..=c.gst_us.max(1));
                c.crashes.push(Crash {
                    node,
                    from_us: from,
                    until_us: from + rng.gen_range(1_000..=300_000),
                    amnesia: true,
                    disk: true,
                    lost_tail: rng.gen_range(0..=3),
                    at_promise: false,
                });
            }
        }
    }

    pub fn faulty_budget_used(&self) -> usize {
        let byz = self
            .behaviours
            .iter()
            .take(self.n)
            .filter(|b| **b != Behaviour::Correct)
            .count();
        let amnesia = self.crashes.iter().filter(|c| c.forgets_votes()).count();
        byz + self.twins.len() + amnesia
    }
}

/// Protocol timings scaled to the simulated network.
pub fn sim_core_config(max_delay_us: u64) -> Config {
    let timeout = (max_delay_us * 40).max(100_000);
    Config {
        request_timeout_us: timeout,
        max_request_timeout_us: timeout * 64,
        stop_retransmit_us: timeout / 2,
        slow_leader: Some(SlowLeader {
            factor: 4,
            floor_us: timeout / 2,
            grace_us: timeout,
        }),
        checkpoint_period: 8,
        chunk_bytes: 512,
        transfer_stall_us: timeout,
        persist: true,
        ..Config::default()
    }
}
