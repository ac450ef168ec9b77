//! What taking a checkpoint costs, at the size of a Kubernetes control plane's state (the
//! apiserver benchmark's ConfigMaps: 30,000 keys of 600 bytes with 10,000 revisions of history):
//! encoding and hashing it (done on a worker thread), and freezing it (all that the replica's
//! event loop does).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kmmr_protocol::crypto::Digest;
use kmmr_protocol::service::kv::{KvRequest, KvStore, PutRequest, DEFAULT_HISTORY_LIMIT};
use kmmr_protocol::service::{ExecContext, Service};

fn store(keys: usize, writes: usize, value: usize) -> KvStore {
    let mut s = KvStore::new(DEFAULT_HISTORY_LIMIT);
    for i in 0..writes {
        let ctx = ExecContext {
            cid: i as u64,
            timestamp_ms: i as u64,
            index: 0,
        };
        let req = KvRequest::Put(PutRequest {
            key: format!("/registry/configmaps/bench/cm-{:06}", i % keys).into_bytes(),
            value: vec![b'x'; value],
            lease: 0,
            prev_kv: false,
        });
        s.apply(&ctx, &req);
    }
    s
}

fn checkpoint(c: &mut Criterion) {
    let mut g = c.benchmark_group("checkpoint");
    g.sample_size(10);
    let s = store(30_000, 40_000, 600);
    let len = s.snapshot().len();
    g.throughput(Throughput::Bytes(len as u64));
    g.bench_function("kv_30k_encode_digest", |b| {
        b.iter(|| {
            let mut buf = Vec::new();
            s.write_snapshot(&mut |p| buf.extend_from_slice(p));
            black_box(Digest::of(&buf))
        })
    });
    g.bench_function("kv_30k_encode", |b| {
        b.iter(|| {
            let mut buf = Vec::new();
            s.write_snapshot(&mut |p| buf.extend_from_slice(p));
            black_box(buf.len())
        })
    });
    // What stays on the event loop when the checkpoint is encoded on another thread.
    g.bench_function("kv_30k_freeze", |b| {
        b.iter(|| black_box(Service::freeze(&s)))
    });
    g.finish();
}

criterion_group!(benches, checkpoint);
criterion_main!(benches);
