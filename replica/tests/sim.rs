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
//! The soak runs many more seeds on demand:
//!
//! ```text
//! KMMR_SIM_SOAK=100000 cargo test --release -p kmmr-replica --test sim soak -- --nocapture
//! ```

use kmmr::sim::{run, SimConfig, SimReport};

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
    let (mut transfers, mut reconfigured) = (0, 0);
    let failures = failing_seeds(n, seeds, |r| {
        transfers += r.state_transfers;
        reconfigured += (r.views_installed > 0) as u64;
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
}

fn failing_seeds(
    n: usize,
    seeds: impl Iterator<Item = u64>,
    mut each: impl FnMut(&SimReport),
) -> Vec<u64> {
    let mut failures = Vec::new();
    for seed in seeds {
        let r = run(&SimConfig::random(seed, n));
        each(&r);
        if !r.ok() {
            eprintln!("FAILED {}", show(&r));
            eprintln!(
                "  rerun: KMMR_SIM_SEED={seed} KMMR_SIM_N={n} cargo test -p kmmr-replica --test sim replay -- --nocapture"
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

/// The long soak, on demand: `KMMR_SIM_SOAK=<seeds>` (split evenly over n=4 and n=7), starting
/// after the seeds every run covers.
#[test]
fn soak() {
    let Some(total) = std::env::var("KMMR_SIM_SOAK")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let start = 4 * SEEDS_PER_PART;
    let half = total / 2;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let t0 = std::time::Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                for n in [4usize, 7] {
                    let seeds = (start + t..start + half).step_by(threads as usize);
                    failed.extend(failing_seeds(n, seeds, |_| {}).into_iter().map(|s| (n, s)));
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
        "soak: {half} seeds at n=4 and {half} at n=7 passed in {:?}",
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
    let cfg = SimConfig::random(seed, n);
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
    use kmmr::sim::admin::{ReconfigStep, SimChange};
    use kmmr::sim::byzantine::Behaviour;
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
