//! CPU cost of the protocol core alone: n=4 replicas and their clients in the deterministic
//! simulator with zero network delay, 0-byte requests and replies (the 0/0 micro-benchmark), a
//! no-op service. Everything real but the network: request signing and verification, batching,
//! PROPOSE/WRITE/ACCEPT with signed ACCEPTs, decision proofs checked, execution and replies.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kmmr::sim::{run, NetConfig, ServiceKind, SimConfig};

fn zero_delay(n: usize, clients: usize, ops: usize) -> SimConfig {
    let mut cfg = SimConfig::calm(42, n);
    cfg.net = NetConfig {
        min_delay_us: 0,
        max_delay_us: 0,
        duplicate_prob: 0.0,
        loss_before_gst: 0.0,
    };
    cfg.service = ServiceKind::Noop;
    cfg.payload_bytes = 0;
    cfg.think_us = 0;
    cfg.clients = clients;
    cfg.ops_per_client = ops;
    cfg
}

fn core(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    g.sample_size(10);
    for (n, clients, ops) in [(4, 1, 200), (4, 50, 40), (7, 50, 20)] {
        let cfg = zero_delay(n, clients, ops);
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
