//! The deterministic simulator as the protocol's primary test. Every failing seed prints itself
//! and reruns alone with:
//!
//! ```text
//! KMMR_SIM_SEED=<seed> KMMR_SIM_N=<n> cargo test -p kmmr-replica --test sim replay -- --nocapture
//! ```
//!
//! Random seeds include disk loss, restarts from disk (checkpoints and state transfer) and, in
//! about a third, a replica joining (sometimes before its addition is decided) and one leaving.
//!
//! The soak runs many more seeds on demand, from the first seed after those every run covers
//! or from `KMMR_SIM_SOAK_START`, so that soaks on different machines cover different seeds:
//!
//! ```text
//! KMMR_SIM_SOAK=100000 cargo test --release -p kmmr-replica --test sim soak -- --nocapture
//! KMMR_SIM_SOAK=100000 KMMR_SIM_SOAK_START=1000000 cargo test --release -p kmmr-replica --test sim soak -- --nocapture
//! ```
//!
//! With `KMMR_SIM_DEFER` set, the soak (and `replay`, which takes the number of microseconds
//! the failing run printed) encodes checkpoints off the event loop, as a node does. With
//! `KMMR_SIM_PIPELINED` set, the soak's clients keep several operations in flight, as the etcd
//! gateway does (`replay` takes the window the failing run printed, `KMMR_SIM_WINDOW`).

use kmmr_sim::{run, Crash, SimConfig, SimReport};

fn show(r: &SimReport) -> String {
    format!(
        "seed {} n={}: decided {} instances, {}/{} ops, max regency {}, {} events, {} ms; faults: {}; violations: {:?}",
        r.seed,
        r.n,
        r.decided,
        r.ops_completed,
        r.ops_total,
        r.max_regency,
        r.events,
        r.end_time_us / 1000,
        r.faults,
        r.violations
    )
}

fn sweep(n: usize, seeds: std::ops::Range<u64>) {
    sweep_with(n, seeds, SimConfig::random);
}

fn sweep_with(n: usize, seeds: std::ops::Range<u64>, make: fn(u64, usize) -> SimConfig) {
    let (mut transfers, mut reconfigured, mut encoded_later, mut overtaken) = (0, 0, 0, 0);
    let deferring = make(seeds.start, n).checkpoint_encode_us.is_some();
    let pipelining = make(seeds.start, n).client_window > 1;
    let failures = failing_seeds_with(n, seeds, make, |r| {
        transfers += r.state_transfers;
        reconfigured += (r.views_installed > 0) as u64;
        encoded_later += r.checkpoints_encoded_later;
        overtaken += r.overtaken_reissued;
    });
    assert!(failures.is_empty(), "failing seeds for n={n}: {failures:?}");
    // Disk loss, restarts and joiners must really exercise state transfer and reconfiguration.
    assert!(
        transfers > 0,
        "no seed of this part needed a state transfer"
    );
    assert!(
        reconfigured > 20,
        "only {reconfigured} seeds of this part changed the view"
    );
    if deferring {
        assert!(
            encoded_later > 1_000,
            "only {encoded_later} checkpoints were encoded off the event loop"
        );
    }
    // Pipelining clients must really see requests overtaken, and get them done.
    if pipelining {
        assert!(
            overtaken > 20,
            "only {overtaken} requests of this part were overtaken and sent again"
        );
    }
}

fn failing_seeds(
    n: usize,
    seeds: impl Iterator<Item = u64>,
    each: impl FnMut(&SimReport),
) -> Vec<u64> {
    failing_seeds_with(n, seeds, SimConfig::random, each)
}

fn failing_seeds_with(
    n: usize,
    seeds: impl Iterator<Item = u64>,
    make: fn(u64, usize) -> SimConfig,
    mut each: impl FnMut(&SimReport),
) -> Vec<u64> {
    let mut failures = Vec::new();
    for seed in seeds {
        let cfg = make(seed, n);
        let r = run(&cfg);
        each(&r);
        if !r.ok() {
            let mut defer = cfg
                .checkpoint_encode_us
                .map_or(String::new(), |us| format!("KMMR_SIM_DEFER={us} "));
            if cfg.client_window > 1 {
                defer += &format!("KMMR_SIM_WINDOW={} ", cfg.client_window);
            }
            eprintln!("FAILED {}", show(&r));
            eprintln!(
                "  rerun: {defer}KMMR_SIM_SEED={seed} KMMR_SIM_N={n} cargo test -p kmmr-replica --test sim replay -- --nocapture"
            );
            failures.push(seed);
        }
    }
    failures
}

/// Seeds per sweep test; several tests so that the harness spreads them over the cores.
const SEEDS_PER_PART: u64 = 250;

macro_rules! sweeps {
    ($($name:ident: $n:expr, $part:expr;)*) => {$(
        #[test]
        fn $name() {
            sweep($n, $part * SEEDS_PER_PART..($part + 1) * SEEDS_PER_PART);
        }
    )*};
}

// 2,000 random seeds on every run: n=4 (f=1) and n=7 (f=2), each with up to f faulty
// replicas drawn from Twins, equivocation, forgery, replay, corruption, oversized frames,
// silence, slowness and amnesia, over lossy, duplicating, partitioned networks.
sweeps! {
    random_seeds_n4_part0: 4, 0;
    random_seeds_n4_part1: 4, 1;
    random_seeds_n4_part2: 4, 2;
    random_seeds_n4_part3: 4, 3;
    random_seeds_n7_part0: 7, 0;
    random_seeds_n7_part1: 7, 1;
    random_seeds_n7_part2: 7, 2;
    random_seeds_n7_part3: 7, 3;
}

/// A random seed with checkpoints encoded off the event loop, as a node encodes them: each
/// comes back up to 0, 10, 20 or 30 ms later (by seed), so several can be in flight at once,
/// across leader changes, state transfers, restarts and membership changes.
fn deferred(seed: u64, n: usize) -> SimConfig {
    SimConfig::random(seed, n).deferring_checkpoints((seed % 4) * 10_000)
}

/// Seeds of the deferred-checkpoint sweeps, apart from the random sweep's.
const DEFERRED_START: u64 = 20_000_000;

macro_rules! deferred_sweeps {
    ($($name:ident: $n:expr, $part:expr;)*) => {$(
        #[test]
        fn $name() {
            let first = DEFERRED_START + $part * SEEDS_PER_PART;
            sweep_with($n, first..first + SEEDS_PER_PART, deferred);
        }
    )*};
}

// 1,000 more random seeds with checkpoints encoded as a node encodes them.
deferred_sweeps! {
    deferred_checkpoint_seeds_n4_part0: 4, 0;
    deferred_checkpoint_seeds_n4_part1: 4, 1;
    deferred_checkpoint_seeds_n7_part0: 7, 0;
    deferred_checkpoint_seeds_n7_part1: 7, 1;
}

/// A random seed whose clients pipeline as the etcd gateway does: two or three operations in
/// flight (by seed), so that a request lost on its way to the leader before GST can be
/// overtaken by a later one of its session.
fn pipelined(seed: u64, n: usize) -> SimConfig {
    SimConfig::random(seed, n).pipelining(2 + (seed % 2) as usize)
}

/// Seeds of the pipelined-client sweeps, apart from the others.
const PIPELINED_START: u64 = 30_000_000;

macro_rules! pipelined_sweeps {
    ($($name:ident: $n:expr, $part:expr;)*) => {$(
        #[test]
        fn $name() {
            let first = PIPELINED_START + $part * SEEDS_PER_PART;
            sweep_with($n, first..first + SEEDS_PER_PART, pipelined);
        }
    )*};
}

// 1,000 more random seeds with pipelining clients.
pipelined_sweeps! {
    pipelined_client_seeds_n4_part0: 4, 0;
    pipelined_client_seeds_n4_part1: 4, 1;
    pipelined_client_seeds_n7_part0: 7, 0;
    pipelined_client_seeds_n7_part1: 7, 1;
}

/// A number from the environment; a value that is set but not a number stops the test rather
/// than silently running something else.
fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse::<u64>() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={v:?} is not a number of seeds: {e}"),
    }
}

/// Seeds far above the random sweep's, kept when they combine what the soak failures of the
/// 100,000-seed run combined: a correct replica restarted from its disk, and a membership
/// change, a paused replica or a partition. About two seeds in five qualify.
fn stress_seeds(n: usize, part: u64) -> Vec<u64> {
    let first = STRESS_START + part * STRESS_SCAN;
    (first..first + STRESS_SCAN)
        .filter(|seed| {
            let c = SimConfig::random(*seed, n);
            c.crashes.iter().any(|c| c.amnesia && c.disk)
                && (!c.reconfigs.is_empty()
                    || !c.partitions.is_empty()
                    || c.crashes.iter().any(|c| !c.amnesia))
        })
        .collect()
}

const STRESS_START: u64 = 10_000_000;
/// Seeds scanned per stress part (about 250 of them qualify).
const STRESS_SCAN: u64 = 625;

macro_rules! stress {
    ($($name:ident: $n:expr, $part:expr;)*) => {$(
        #[test]
        fn $name() {
            let seeds = stress_seeds($n, $part);
            assert!(seeds.len() > 150, "only {} stress seeds", seeds.len());
            let failures = failing_seeds($n, seeds.into_iter(), |_| {});
            assert!(failures.is_empty(), "failing stress seeds for n={}: {failures:?}", $n);
        }
    )*};
}

// About 2,000 more seeds on every run, each restarting a correct replica from disk beside
// membership changes, pauses or partitions.
stress! {
    stress_seeds_n4_part0: 4, 0;
    stress_seeds_n4_part1: 4, 1;
    stress_seeds_n4_part2: 4, 2;
    stress_seeds_n4_part3: 4, 3;
    stress_seeds_n7_part0: 7, 0;
    stress_seeds_n7_part1: 7, 1;
    stress_seeds_n7_part2: 7, 2;
    stress_seeds_n7_part3: 7, 3;
}

/// The long soak, on demand: `KMMR_SIM_SOAK=<seeds>` (split evenly over n=4 and n=7), starting
/// at `KMMR_SIM_SOAK_START`, or after the seeds every run covers.
#[test]
fn soak() {
    let Some(total) = env_number("KMMR_SIM_SOAK") else {
        return;
    };
    let start = env_number("KMMR_SIM_SOAK_START").unwrap_or(4 * SEEDS_PER_PART);
    assert!(
        start.checked_add(total).is_some(),
        "KMMR_SIM_SOAK_START + KMMR_SIM_SOAK overflows"
    );
    let half = total / 2;
    let defer = std::env::var_os("KMMR_SIM_DEFER").is_some();
    let pipelining = std::env::var_os("KMMR_SIM_PIPELINED").is_some();
    assert!(
        !(defer && pipelining),
        "KMMR_SIM_DEFER and KMMR_SIM_PIPELINED are separate soaks: set one"
    );
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let t0 = std::time::Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                for n in [4usize, 7] {
                    let seeds = (start + t..start + half).step_by(threads as usize);
                    let make = match (defer, pipelining) {
                        (true, _) => deferred,
                        (_, true) => pipelined,
                        _ => SimConfig::random,
                    };
                    failed.extend(
                        failing_seeds_with(n, seeds, make, |_| {})
                            .into_iter()
                            .map(|s| (n, s)),
                    );
                }
                failed
            })
        })
        .collect();
    let mut failed = Vec::new();
    for h in handles {
        failed.extend(h.join().expect("soak thread"));
    }
    assert!(failed.is_empty(), "failing (n, seed): {failed:?}");
    eprintln!(
        "soak: seeds {start}..{} at n=4 and at n=7 ({half} each) passed in {:?}",
        start + half,
        t0.elapsed()
    );
}

#[test]
fn calm_cluster_of_four_serves_every_client() {
    let r = run(&SimConfig::calm(1, 4));
    assert!(r.ok(), "{}", show(&r));
    assert_eq!(r.ops_completed, r.ops_total);
    assert_eq!(
        r.max_regency, 0,
        "no leader change without faults: {:?}",
        r.suspicions
    );
}

#[test]
fn calm_cluster_of_seven_serves_every_client() {
    let r = run(&SimConfig::calm(2, 7));
    assert!(r.ok(), "{}", show(&r));
    assert_eq!(r.ops_completed, r.ops_total);
}

#[test]
fn replay() {
    let Ok(seed) = std::env::var("KMMR_SIM_SEED") else {
        return;
    };
    let seed: u64 = seed.parse().expect("KMMR_SIM_SEED is a number");
    let n: usize = std::env::var("KMMR_SIM_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let mut cfg = match env_number("KMMR_SIM_DEFER") {
        Some(us) => SimConfig::random(seed, n).deferring_checkpoints(us),
        None => SimConfig::random(seed, n),
    };
    if let Some(w) = env_number("KMMR_SIM_WINDOW") {
        cfg = cfg.pipelining(w as usize);
    }
    eprintln!("{cfg:#?}");
    let r = run(&cfg);
    eprintln!("{}", show(&r));
    eprintln!("rejected: {:?}", r.rejected);
    for s in &r.suspicions {
        eprintln!("suspicion: {s:?}");
    }
    for s in &r.node_summaries {
        eprintln!("node: {s}");
    }
    for ((from, to, kind), count) in &r.delivered {
        eprintln!("delivered {from} -> {to}: {kind} x{count}");
    }
    assert!(r.ok());
}

/// Regression: two correct replicas missed the first decision, the others went quiet with empty
/// pools, and clients waiting for a quorum of replies could not finish: the lagging replicas now
/// ask for decisions when a request waits a full timeout.
#[test]
fn regression_seed_418_n7_lagging_replicas_catch_up_when_the_others_go_quiet() {
    let r = run(&SimConfig::random(418, 7));
    assert!(r.ok(), "{}", show(&r));
}

/// Regression: a replica paused through the first decisions resumed into a quiet cluster; its
/// one request for decisions was lost, and clients needing a quorum of replies waited forever.
/// Lagging replicas now keep asking while a request waits.
#[test]
fn regression_seed_15452_n4_lagging_replica_keeps_asking_for_decisions() {
    let r = run(&SimConfig::random(15452, 4));
    assert!(r.ok(), "{}", show(&r));
}

/// Correct replicas restarted from their disks, beyond the f faults. Before votes were
/// promised to disk, a restarted leader proposed another batch for the instance it had
/// proposed in (453: its only fault is one restart; 824: two restarts, and no progress), which
/// the others saw as equivocation. 426: two replicas lost the unsynced tail of their logs, one
/// of them the only replica that had decided an instance, and waited for the others to tell
/// it; promises now carry the decisions the log had not synced.
#[test]
fn regression_seeds_restarts_from_disk_keep_their_votes() {
    for seed in [453, 824, 426] {
        let cfg = SimConfig::random(seed, 4);
        assert!(
            cfg.crashes.iter().any(|c| c.amnesia && c.disk),
            "seed {seed} restarts nothing from disk"
        );
        assert_eq!(cfg.faulty_budget_used(), 0, "seed {seed}");
        let r = run(&cfg);
        assert!(r.ok(), "{}", show(&r));
    }
}

/// Soak, 2026-12: a slow replica had the other ACCEPTs already when its own completed the
/// quorum; it decided, then went down writing that ACCEPT's promise (`Crash::at_promise`), so
/// its ACCEPT, log record and replies never left. The cluster then rightly chose another value
/// for the instance. The checker had counted the decision no one saw and reported a broken
/// agreement; such decisions are not counted now.
#[test]
fn regression_seed_447408_n4_a_decision_lost_with_its_promise_was_never_taken() {
    let cfg = SimConfig::random(447_408, 4);
    assert!(
        cfg.crashes.iter().any(|c| c.at_promise),
        "no crash during a promise write"
    );
    let r = run(&cfg);
    assert!(r.ok(), "{}", show(&r));
}

/// A leader's PROPOSE leaves before its own promise of it, and a restart may lose that promise
/// (the crash comes during the write, `Crash::at_promise`): a restarted replica therefore leads
/// only in a later regency. Without that rule each of these seeds shows a correct restarted
/// leader proposing a second batch in one epoch (found by planting it: 961 n=4 has one restart
/// from disk and a partition, nothing else).
#[test]
fn regression_seeds_a_restarted_leader_never_proposes_twice() {
    assert_seeds_pass(
        &[(4, 961), (4, 752), (4, 316), (7, 777)],
        "crash during a promise write",
        |c| c.at_promise,
    );
}

/// Soak, 2026-12 (seed 800363 n=4, a linearizability violation): a replica replied to a write,
/// crashed before its log synced the decision, and came back without it; an unordered read then
/// gathered a quorum of replies from before the write. Replies now wait for the state they came
/// from to be durable, and a restarted replica answers no unordered read from a state older than
/// its disk held. With the wait planted away, 10000001 and 10000239 (n=4) show a correct replica
/// that replied from a state its disk did not keep; with the fence planted away, 10002264 (n=7, a
/// restart into a newer view, which sets the log aside) and 10000716 (n=4) do.
#[test]
fn regression_seeds_replies_come_from_state_the_disk_keeps() {
    assert_seeds_pass(
        &[
            (4, 10_000_001),
            (4, 10_000_239),
            (7, 10_002_264),
            (4, 10_000_716),
        ],
        "restart from disk",
        restarts_from_disk,
    );
}

/// A reply leaves once a promise at its instance is on disk, before the log syncs (December
/// 2026). With the restart fence at the last promise's instance planted away, seeds 55 and 74
/// (n=4) show a correct replica that replied from a state it came back without; with replies
/// released one instance past the promise, seed 116 (n=4) does.
#[test]
fn regression_seeds_replies_backed_by_a_promise() {
    assert_seeds_pass(
        &[(4, 55), (4, 74), (4, 116)],
        "restart from disk",
        restarts_from_disk,
    );
}

/// A follower's WRITE goes out only after its promise is on disk. With that promise planted away
/// (`promise_before` not promising a WRITE), each of these stress seeds shows a correct replica,
/// restarted from its disk, writing a second value in one epoch, which the others reject as an
/// `equivocating_write`: a false accusation (found December 2026; 10000023 also decides only one
/// of its operations).
#[test]
fn regression_seeds_a_restarted_replica_never_writes_twice() {
    assert_seeds_pass(
        &[(4, 10_000_570), (7, 10_000_023), (7, 10_001_823)],
        "restart from disk",
        restarts_from_disk,
    );
}

/// A WRITE leaves before its own promise when the last promise was in the same regency and at
/// most one instance back (the ACCEPT's promise then records the write), and a restarted
/// replica writes nothing new where it may have written unpromised. A write a restart forgets
/// no longer vouches for a value in a leader's collects (f+1 write sets): in this seed r1 is
/// silent and r0 and r3 come back from disk without their writes of a value only r2 accepted,
/// which then can be neither kept nor replaced by write sets alone. Tried that way first
/// (December 2026), every leader change stalled and 11 of 12 operations never finished. Now
/// WRITEs are signed, and r2's collect carries the f+1 signed WRITEs it accepted on, which
/// vouch for the value alone. With that proof not counted (`sync::certified_value`), this seed
/// stalls again.
#[test]
fn regression_seed_a_forgotten_write_would_stall_every_leader_change() {
    assert_seeds_pass(&[(4, 1_004_370)], "crash during a promise write", |c| {
        c.at_promise && restarts_from_disk(c)
    });
}

/// The seed above with r2, the one replica that accepted the value, also restarting from its
/// disk (instead of pausing) before the leader change: the proof of the signed WRITEs it
/// accepted on must come back with its promise. With the proof left out of the restored
/// promise, every leader change stalls.
#[test]
fn regression_seed_an_acceptor_restarted_keeps_the_proof_of_its_writes() {
    let mut cfg = SimConfig::random(1_004_370, 4);
    let r2 = cfg
        .crashes
        .iter_mut()
        .find(|c| c.node == 2 && !c.amnesia)
        .expect("seed 1004370 pauses r2");
    *r2 = Crash::restart(2, r2.from_us, r2.until_us, true);
    let r = run(&cfg);
    assert!(r.ok(), "{}", show(&r));
}

/// With WRITEs covered by the ACCEPT's promise, that promise is the one fsync left on an
/// instance's path. Planted away (`promise_before` not promising an ACCEPT), this seed has r0
/// come back from disk without an acceptance a decision rested on, and two values are decided
/// for CID 21 (found by a soak, December 2026; the CI seeds above all pass without it).
#[test]
fn regression_seed_1401155_n4_an_acceptance_outlives_a_restart() {
    assert_seeds_pass(&[(4, 1_401_155)], "restart from disk", restarts_from_disk);
}

/// A replica that comes back with only what its disk kept.
fn restarts_from_disk(c: &Crash) -> bool {
    c.amnesia && c.disk
}

/// Runs each `(n, seed)`, first checking that the seed still has the crash it was kept for: a
/// change to `SimConfig::random` must not quietly turn a regression test into one of nothing.
fn assert_seeds_pass(seeds: &[(usize, u64)], kept_for: &str, has: impl Fn(&Crash) -> bool) {
    for &(n, seed) in seeds {
        let cfg = SimConfig::random(seed, n);
        assert!(
            cfg.crashes.iter().any(&has),
            "seed {seed} n={n} has no {kept_for}"
        );
        let r = run(&cfg);
        assert!(r.ok(), "{}", show(&r));
    }
}

/// Regressions from the 100,000-seed soak: correct replicas accused of equivocation. Each had
/// installed a checkpoint behind the instance it was voting in: a state transfer started while
/// it was behind finished after decisions had overtaken it (or a repair of diverged state), the
/// install reset the instance, the replay of its own log brought it back there, and it voted
/// again, differently: a real second PROPOSE or WRITE for one instance and epoch, not a wrong
/// judgement. A transfer overtaken by decisions is now dropped, and an install keeps the votes
/// of the instance in progress. (n=7 40345 and 5173 have no Byzantine replica, no restart:
/// loss and a partition are enough to leave a replica behind.)
#[test]
fn regression_seeds_a_state_install_never_makes_a_replica_vote_twice() {
    let seeds = [
        (4, 1690),
        (4, 10647),
        (4, 18649),
        (4, 28205),
        (4, 36226),
        (4, 37037),
        (4, 36984),
        (7, 5173),
        (7, 19285),
        (7, 25618),
        (7, 32045),
        (7, 33585),
        (7, 38931),
        (7, 40345),
        (7, 40453),
        (7, 42856),
        (7, 49844),
    ];
    for (n, seed) in seeds {
        let r = run(&SimConfig::random(seed, n));
        assert!(r.ok(), "{}", show(&r));
    }
}

/// Regressions from the soak: clusters that stopped deciding after correct replicas restarted
/// from disk. A restarted replica had its checkpoint but not the decision at the checkpoint's
/// CID (recovery replayed only what followed it, and the checkpoint could reach the disk before
/// the log synced that decision), so it could not prove where it stood and every new leader
/// refused its STOPDATA; with one Byzantine replica that left too few for any leader change.
/// 4408, 40394, 42533: peers still held the proof, but the replica never asked for it (it asks
/// now). 27973, 45025: no correct replica held it any more (recovery keeps it now, and a
/// checkpoint is written only after the log holds its decision).
#[test]
fn regression_seeds_restarted_replicas_can_prove_where_they_stand() {
    let seeds = [4408, 40394, 42533, 27973, 45025].map(|seed| (4, seed));
    assert_seeds_pass(&seeds, "restart from disk", restarts_from_disk);
}

/// Regressions found while adding reconfiguration: a client whose votes split between replicas
/// that answered before and after a view change (164 n=7), a late NewView answer counted for the
/// re-signed request (98 n=4), a joiner never learning the regency (205 n=4), a removed replica
/// whose leader-suspicion timer fired forever (2112 n=7, found by the soak).
#[test]
fn regression_seeds_reconfiguration_clients_and_joiners() {
    for (seed, n) in [(164, 7), (98, 4), (205, 4), (166, 4), (2112, 7)] {
        let r = run(&SimConfig::random(seed, n));
        assert!(r.ok(), "{}", show(&r));
        assert!(r.views_installed > 0, "seed {seed} n={n} changed no view");
    }
}

/// Membership 4 -> 5 -> 6 -> 7 -> 4 under a client workload with an equivocating replica and
/// lossy links: f goes to 2 at n=7 and back to 1; the first leader is removed on the way down
/// (the next one takes over without a timeout); the last joiner races its own addition.
#[test]
fn membership_4_5_6_7_4_with_a_byzantine_replica() {
    use kmmr_byzantine::Behaviour;
    use kmmr_sim::admin::{ReconfigStep, SimChange};
    for seed in 0..20u64 {
        let mut c = SimConfig::calm(seed, 4);
        c.behaviours[3] = Behaviour::Equivocate;
        c.net.loss_before_gst = 0.05;
        c.gst_us = 300_000;
        c.clients = 4;
        c.ops_per_client = 30;
        c.think_us = 5_000;
        c.core.checkpoint_period = 8;
        c.spares = 3;
        let step = |at_us, change, early_join| ReconfigStep {
            at_us,
            change,
            early_join,
        };
        c.reconfigs = vec![
            step(20_000, SimChange::Add { node: 4 }, false),
            step(40_000, SimChange::Add { node: 5 }, false),
            step(60_000, SimChange::Add { node: 6 }, true),
            step(80_000, SimChange::SetF { f: 2 }, false),
            step(100_000, SimChange::SetF { f: 1 }, false),
            step(120_000, SimChange::Remove { node: 0 }, false),
            step(140_000, SimChange::Remove { node: 5 }, false),
            step(160_000, SimChange::Remove { node: 4 }, false),
        ];
        let r = run(&c);
        assert!(r.ok(), "{}", show(&r));
        assert_eq!(r.ops_completed, r.ops_total, "{}", show(&r));
        // Every replica that took part counts its installs: at least the 8 views on the 3
        // replicas present from start to end.
        assert!(
            r.views_installed >= 3 * 8,
            "{}: {} installs",
            show(&r),
            r.views_installed
        );
    }
}

/// A replica whose state silently diverges (a write nobody ordered) notices at its next
/// checkpoint that f+1 others agree on another digest, fetches theirs, and ends with the same
/// state as everyone else (the run fails otherwise).
#[test]
fn a_replica_with_diverged_state_repairs_itself_by_state_transfer() {
    let mut repaired = 0;
    for seed in 0..30u64 {
        let mut c = SimConfig::calm(seed, 4);
        c.clients = 3;
        c.ops_per_client = 40;
        c.core.checkpoint_period = 4;
        c.diverge = Some(((seed % 4) as usize, 3 + seed % 5));
        let r = run(&c);
        assert!(r.ok(), "{}", show(&r));
        repaired += r.state_transfers;
    }
    assert!(
        repaired >= 30,
        "{repaired} repairs for 30 diverged replicas"
    );
}
