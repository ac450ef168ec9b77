//! Runs one simulation and prints its report: `cargo run --release -p kmmr-sim --example
//! simrun -- <seed> <n> [clients ops]`. With clients/ops it runs the zero-delay 0/0 benchmark
//! configuration instead of the seed's random faults, which is handy under a profiler.

use kmmr_sim::{run, SimConfig};

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let seed = args.first().copied().unwrap_or(1);
    let n = args.get(1).copied().unwrap_or(4) as usize;
    let cfg = match (args.get(2), args.get(3)) {
        (Some(&clients), Some(&ops)) => {
            SimConfig::zero_delay_benchmark(seed, n, clients as usize, ops as usize)
        }
        _ => SimConfig::random(seed, n),
    };
    let t = std::time::Instant::now();
    let r = run(&cfg);
    let secs = t.elapsed().as_secs_f64();
    println!("{r:#?}");
    println!(
        "{} ops in {:.3} s of CPU: {:.0} ops/s",
        r.ops_completed,
        secs,
        r.ops_completed as f64 / secs
    );
}
