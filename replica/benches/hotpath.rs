//! The per-message functions on a replica's path, one by one: signing and checking (a request,
//! an ACCEPT, a batch of requests), encoding and decoding a PROPOSE, the batch digest, and
//! framing. Together with `core` (the protocol with no network) and `kmmr-replica bench` (the
//! real cluster) they show where a change moved the time.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kmmr_protocol::crypto::{self, Domain, KeyPair};
use kmmr_protocol::wire::codec::{Decode, Encode};
use kmmr_protocol::wire::frame::{encode_frame, FrameDecoder};
use kmmr_protocol::wire::ids::{Cid, Regency, ViewId};
use kmmr_protocol::wire::limits;
use kmmr_protocol::wire::messages::{
    accept_signing_bytes, Batch, ReplicaMessage, Request, RequestKind, SignedRequest,
};

fn request(key: &KeyPair, sequence: u64) -> SignedRequest {
    SignedRequest::sign(
        Request {
            client: key.public(),
            session: 1,
            sequence,
            kind: RequestKind::Ordered,
            view: ViewId(0),
            payload: Vec::new(),
        },
        key,
    )
}

fn batch(n: usize) -> Batch {
    let key = KeyPair::from_seed([7; 32]);
    Batch {
        timestamp_ms: 1,
        nonce: 2,
        requests: (0..n as u64).map(|s| request(&key, s)).collect(),
    }
}

fn crypto(c: &mut Criterion) {
    let mut g = c.benchmark_group("crypto");
    let key = KeyPair::from_seed([1; 32]);
    let parsed = crypto::parse_key(&key.public()).expect("key");
    let msg = accept_signing_bytes(Cid(9), Regency(0), &kmmr_protocol::crypto::Digest::of(b"v"));
    let sig = key.sign(Domain::Accept, &msg);
    g.bench_function("sign_accept", |b| {
        b.iter(|| key.sign(Domain::Accept, black_box(&msg)))
    });
    g.bench_function("verify_accept", |b| {
        b.iter(|| crypto::verify_parsed(&parsed, Domain::Accept, black_box(&msg), &sig))
    });
    let req = request(&key, 1);
    g.bench_function("verify_request", |b| b.iter(|| black_box(&req).verify()));
    let items: Vec<_> = (0..16)
        .map(|i| {
            let k = KeyPair::from_seed([i as u8 + 2; 32]);
            let m = vec![i as u8; 80];
            let s = k.sign(Domain::ClientRequest, &m);
            (crypto::parse_key(&k.public()).expect("key"), m, s)
        })
        .collect();
    let refs: Vec<_> = items
        .iter()
        .map(|(k, m, s)| (*k, Domain::ClientRequest, &m[..], *s))
        .collect();
    g.throughput(Throughput::Elements(16));
    g.bench_function("verify_batch_16", |b| {
        b.iter(|| crypto::verify_batch_parsed(black_box(&refs)))
    });
    g.finish();
}

fn wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    for n in [1usize, 64] {
        let b = batch(n);
        let propose = ReplicaMessage::Propose {
            cid: Cid(3),
            epoch: Regency(0),
            batch: b.clone(),
        };
        let bytes = propose.to_bytes();
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(format!("propose_{n}_encode"), |bn| {
            bn.iter(|| black_box(&propose).to_bytes())
        });
        g.bench_function(format!("propose_{n}_decode"), |bn| {
            bn.iter(|| ReplicaMessage::from_bytes(black_box(&bytes)).expect("decodes"))
        });
        g.bench_function(format!("batch_{n}_digest"), |bn| {
            bn.iter(|| black_box(&b).digest())
        });
    }
    // A burst of small frames (WRITEs and ACCEPTs) as one read delivers them.
    let write = ReplicaMessage::Write {
        cid: Cid(3),
        epoch: Regency(0),
        digest: kmmr_protocol::crypto::Digest::of(b"v"),
        signature: Some(kmmr_protocol::crypto::Signature([7; 64])),
    }
    .to_bytes();
    let mut stream = Vec::new();
    for _ in 0..32 {
        stream.extend(encode_frame(&write).expect("frame"));
    }
    g.throughput(Throughput::Elements(32));
    g.bench_function("frames_32_decode", |bn| {
        bn.iter(|| {
            let mut d = FrameDecoder::new(limits::MAX_FRAME);
            d.push(black_box(&stream));
            let mut n = 0;
            while let Ok(Some(f)) = d.next_frame() {
                n += f.len();
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, crypto, wire);
criterion_main!(benches);
