//! CPU cost of the protocol core alone: n=4 replicas and their clients in the deterministic
//! simulator with zero network delay, 0-byte requests and replies (the 0/0 micro-benchmark), a
//! no-op service. Everything real but the network: request signing and verification, batching,
//! PROPOSE/WRITE/ACCEPT with signed ACCEPTs, decision proofs checked, execution and replies.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kmmr_sim::{run, SimConfig};

fn core(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    g.sample_size(10);
    for (n, clients, ops) in [(4, 1, 200), (4, 50, 40), (7, 50, 20)] {
        let cfg = SimConfig::zero_delay_benchmark(42, n, clients, ops);
        let probe = run(&cfg);
        assert!(probe.ok(), "{:?}", probe.violations);
        g.throughput(Throughput::Elements((clients * ops) as u64));
        g.bench_function(format!("n{n}_{clients}clients_0b"), |b| {
            b.iter(|| {
                let r = run(&cfg);
                assert_eq!(r.ops_completed, clients * ops);
                r.decided
            })
        });
    }
    g.finish();
}

criterion_group!(benches, core);
criterion_main!(benches);
