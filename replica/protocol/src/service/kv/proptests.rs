//! Property tests: determinism and snapshots, codec round trips and robustness, and a
//! model-based comparison against a plain map.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::service::{ExecContext, Service};
use crate::wire::codec::{Decode, Encode};

const KEYS: &[&str] = &["a", "b", "ba", "c", "d"];

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(KEYS).prop_map(|k| k.as_bytes().to_vec())
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0u8..3, 0..3)
}

/// A range end: none (single key), `[0]` (from key) or a key (half-open, possibly inverted).
fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![Just(vec![]), Just(vec![0]), key()]
}

#[derive(Debug, Clone)]
enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease_slot: Option<u8>,
        prev_kv: bool,
    },
    Delete {
        key: Vec<u8>,
        end: Vec<u8>,
    },
    Range {
        key: Vec<u8>,
        end: Vec<u8>,
        back: u8,
        limit: u8,
    },
    Cas {
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
    },
    MultiWrite {
        a: Vec<u8>,
        b: Vec<u8>,
        value: Vec<u8>,
    },
    Compact {
        back: u8,
    },
    Grant {
        ttl: i64,
        proposed: Option<u8>,
    },
    Revoke {
        slot: u8,
    },
    KeepAlive {
        slot: u8,
    },
    Leases,
    Watch {
        key: Vec<u8>,
        end: Vec<u8>,
        back: u8,
        limit: u8,
    },
    Garbage(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (key(), value(), prop::option::weighted(0.2, 0u8..3), any::<bool>()).prop_map(
            |(key, value, lease_slot, prev_kv)| Op::Put { key, value, lease_slot, prev_kv }
        ),
        2 => (key(), range_end()).prop_map(|(key, end)| Op::Delete { key, end }),
        2 => (key(), range_end(), 0u8..8, 0u8..3)
            .prop_map(|(key, end, back, limit)| Op::Range { key, end, back, limit }),
        2 => (key(), prop::option::of(value()), value())
            .prop_map(|(key, expected, value)| Op::Cas { key, expected, value }),
        1 => (key(), key(), value()).prop_map(|(a, b, value)| Op::MultiWrite { a, b, value }),
        1 => (0u8..8).prop_map(|back| Op::Compact { back }),
        1 => (1i64..4, prop::option::of(1u8..6))
            .prop_map(|(ttl, proposed)| Op::Grant { ttl, proposed }),
        1 => (0u8..4).prop_map(|slot| Op::Revoke { slot }),
        1 => (0u8..4).prop_map(|slot| Op::KeepAlive { slot }),
        1 => Just(Op::Leases),
        1 => (key(), range_end(), 0u8..8, 0u8..4)
            .prop_map(|(key, end, back, limit)| Op::Watch { key, end, back, limit }),
        1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(Op::Garbage),
    ]
}

/// An op and how far consensus time moves before it.
fn step() -> impl Strategy<Value = (Op, u64)> {
    (op(), prop_oneof![3 => Just(0u64), 1 => 0u64..2_500])
}

fn lease_at(s: &KvStore, slot: u8) -> i64 {
    // Slots past the live leases name a lease that does not exist, to exercise refusals.
    s.leases
        .keys()
        .nth(slot as usize)
        .copied()
        .unwrap_or(1_000 + i64::from(slot))
}

fn request(op: &Op, s: &KvStore) -> Vec<u8> {
    let back = |b: u8| s.revision().saturating_sub(u64::from(b));
    let req = match op.clone() {
        Op::Put {
            key,
            value,
            lease_slot,
            prev_kv,
        } => KvRequest::Put(PutRequest {
            key,
            value,
            lease: lease_slot.map_or(NO_LEASE, |slot| lease_at(s, slot)),
            prev_kv,
        }),
        Op::Delete { key, end } => KvRequest::DeleteRange(DeleteRangeRequest {
            key,
            range_end: end,
            prev_kv: true,
        }),
        Op::Range {
            key,
            end,
            back: b,
            limit,
        } => KvRequest::Range(RangeRequest {
            key,
            range_end: end,
            revision: back(b),
            limit: u64::from(limit),
            ..Default::default()
        }),
        Op::Cas {
            key,
            expected,
            value,
        } => KvRequest::cas(key, expected.as_deref(), value),
        Op::MultiWrite { a, b, value } => KvRequest::Txn(TxnRequest {
            compare: vec![],
            success: vec![
                RequestOp::Put(PutRequest {
                    key: a.clone(),
                    value: value.clone(),
                    ..Default::default()
                }),
                RequestOp::Put(PutRequest {
                    key: b,
                    value,
                    ..Default::default()
                }),
                RequestOp::Range(RangeRequest {
                    key: a,
                    range_end: vec![0],
                    ..Default::default()
                }),
            ],
            failure: vec![],
        }),
        Op::Compact { back: b } => KvRequest::Compact(CompactRequest { revision: back(b) }),
        Op::Grant { ttl, proposed } => KvRequest::LeaseGrant(LeaseGrantRequest {
            id: proposed.map_or(0, i64::from),
            ttl,
        }),
        Op::Revoke { slot } => KvRequest::LeaseRevoke(LeaseRevokeRequest {
            id: lease_at(s, slot),
        }),
        Op::KeepAlive { slot } => KvRequest::LeaseKeepAlive(LeaseKeepAliveRequest {
            id: lease_at(s, slot),
        }),
        Op::Leases => KvRequest::LeaseLeases,
        Op::Watch {
            key,
            end,
            back: b,
            limit,
        } => KvRequest::WatchPoll(WatchPollRequest {
            key,
            range_end: end,
            after_revision: back(b),
            limit: u32::from(limit),
            prev_kv: true,
        }),
        Op::Garbage(bytes) => return bytes,
    };
    req.to_bytes()
}

fn ctx(cid: u64, timestamp_ms: u64) -> ExecContext {
    ExecContext {
        cid,
        timestamp_ms,
        index: 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Two replicas fed the same ops reply alike and hold byte-identical snapshots; a replica
    /// restored from a snapshot mid-way is indistinguishable from the one that produced it.
    #[test]
    fn same_ops_same_snapshots_and_restore_is_transparent(
        steps in prop::collection::vec(step(), 1..60),
        cut in any::<prop::sample::Index>(),
        history_limit in 0u64..8,
    ) {
        let cut = cut.index(steps.len());
        let mut a = KvStore::new(history_limit);
        let mut b = KvStore::new(history_limit);
        let mut now = 0;
        for (i, (op, advance)) in steps.iter().enumerate() {
            now += advance;
            if i == cut {
                let snap = a.snapshot();
                let mut restored = KvStore::new(history_limit);
                restored.restore(&snap).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(restored.snapshot(), snap.clone());
                prop_assert_eq!(&restored, &a);
                b = restored;
            }
            let req = request(op, &a);
            let ra = a.execute(&ctx(i as u64, now), &req);
            let rb = b.execute(&ctx(i as u64, now), &req);
            prop_assert_eq!(&ra, &rb);
            prop_assert!(KvResponse::from_bytes(&ra).is_ok());
            prop_assert!(a.revision() - a.history_start() <= history_limit);
        }
        prop_assert_eq!(a.snapshot(), b.snapshot());
        prop_assert_eq!(a.state_digest(), b.state_digest());
        // Every reachable state is also restorable.
        let mut c = KvStore::new(history_limit);
        c.restore(&a.snapshot()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(c, a);
    }

    /// A store frozen mid-way encodes, after every later write (puts over frozen records,
    /// deletes, compactions, lease expiry), exactly the snapshot it had when frozen: the
    /// checkpoint a replica encodes on another thread is the one it would have encoded on the
    /// spot.
    #[test]
    fn a_frozen_store_encodes_the_snapshot_it_was_frozen_at(
        steps in prop::collection::vec(step(), 1..60),
        cut in any::<prop::sample::Index>(),
        history_limit in 0u64..8,
    ) {
        let cut = cut.index(steps.len());
        let mut a = KvStore::new(history_limit);
        let mut frozen = None;
        let mut now = 0;
        for (i, (op, advance)) in steps.iter().enumerate() {
            now += advance;
            if i == cut {
                frozen = Some((Service::freeze(&a), a.snapshot()));
            }
            let req = request(op, &a);
            a.execute(&ctx(i as u64, now), &req);
        }
        let (frozen, snap) = frozen.expect("the cut is one of the steps");
        let mut bytes = Vec::new();
        frozen.write_snapshot(&mut |p| bytes.extend_from_slice(p));
        prop_assert_eq!(bytes, snap);
    }

    /// Every reply the store produces decodes back to itself, as does every generated request.
    #[test]
    fn replies_and_requests_round_trip_through_the_codec(
        steps in prop::collection::vec(step(), 1..40),
    ) {
        let mut s = KvStore::new(5);
        let mut now = 0;
        for (i, (op, advance)) in steps.iter().enumerate() {
            now += advance;
            let req = request(op, &s);
            if let Ok(decoded) = KvRequest::from_bytes(&req) {
                prop_assert_eq!(decoded.to_bytes(), req.clone());
            }
            let reply = s.execute(&ctx(i as u64, now), &req);
            let decoded = KvResponse::from_bytes(&reply)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(decoded.to_bytes(), reply);
            let q = s.query(&req);
            prop_assert!(KvResponse::from_bytes(&q).is_ok());
        }
    }

    #[test]
    fn errors_round_trip_through_the_codec(
        which in 0u8..10, n in any::<u64>(), m in any::<u64>(), id in any::<i64>(),
        text in "[a-z ]{0,40}",
    ) {
        let error = match which {
            0 => KvError::Compacted { compact_revision: n },
            1 => KvError::FutureRevision { requested: n, current: m },
            2 => KvError::EmptyKey,
            3 => KvError::LeaseNotFound { id },
            4 => KvError::LeaseExists { id },
            5 => KvError::InvalidLeaseTtl { ttl: id },
            6 => KvError::InvalidLeaseId { id },
            7 => KvError::NotReadOnly,
            8 => KvError::TooLarge { bytes: n, limit: m },
            _ => KvError::Malformed(text),
        };
        let r = KvResponse::Error(ErrorResponse { header: ResponseHeader { revision: n }, error });
        prop_assert_eq!(KvResponse::from_bytes(&r.to_bytes()), Ok(r));
    }

    /// Untrusted bytes never panic the decoders, the service or restore.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = KvRequest::from_bytes(&bytes);
        let _ = KvResponse::from_bytes(&bytes);
        let mut s = KvStore::new(4);
        let _ = s.query(&bytes);
        let reply = s.execute(&ctx(0, 0), &bytes);
        prop_assert!(KvResponse::from_bytes(&reply).is_ok());
        let _ = s.restore(&bytes);
        // Arbitrary bytes behind a valid tag reach deeper into the decoders.
        for tag in [1u8, 2, 3, 4, 10, 255] {
            let mut tagged = vec![tag];
            tagged.extend_from_slice(&bytes);
            let _ = KvRequest::from_bytes(&tagged);
            let _ = KvResponse::from_bytes(&tagged);
        }
    }

    /// A corrupted snapshot is either rejected or describes a state that re-encodes to exactly
    /// the same bytes (the encoding is canonical).
    #[test]
    fn corrupted_snapshots_are_rejected_or_canonical(
        steps in prop::collection::vec(step(), 1..30),
        at in any::<prop::sample::Index>(),
        xor in 1u8..,
    ) {
        let mut s = KvStore::new(4);
        for (i, (op, _)) in steps.iter().enumerate() {
            let req = request(op, &s);
            s.execute(&ctx(i as u64, i as u64 * 700), &req);
        }
        let mut snap = s.snapshot();
        let i = at.index(snap.len());
        snap[i] ^= xor;
        let mut r = KvStore::new(4);
        if r.restore(&snap).is_ok() {
            prop_assert_eq!(r.snapshot(), snap);
        }
    }
}

/// The reference model: a map from key to (value, create, mod, version) and a revision.
struct Model {
    revision: u64,
    kvs: BTreeMap<Vec<u8>, KeyValue>,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            revision: INITIAL_REVISION,
            kvs: BTreeMap::new(),
        }
    }
}

impl Model {
    fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
        match end {
            [] => key == start,
            [0] => key >= start,
            e => key >= start && key < e,
        }
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> u64 {
        self.revision += 1;
        let rev = self.revision;
        let kv = self.kvs.entry(key.to_vec()).or_insert(KeyValue {
            key: key.to_vec(),
            create_revision: rev,
            ..Default::default()
        });
        kv.mod_revision = rev;
        kv.version += 1;
        kv.value = value.to_vec();
        rev
    }

    fn delete(&mut self, start: &[u8], end: &[u8]) -> Vec<KeyValue> {
        let doomed: Vec<Vec<u8>> = self
            .kvs
            .keys()
            .filter(|k| Self::in_range(k, start, end))
            .cloned()
            .collect();
        if !doomed.is_empty() {
            self.revision += 1;
        }
        doomed.iter().filter_map(|k| self.kvs.remove(k)).collect()
    }

    fn range(&self, start: &[u8], end: &[u8]) -> Vec<KeyValue> {
        self.kvs
            .values()
            .filter(|kv| Self::in_range(&kv.key, start, end))
            .cloned()
            .collect()
    }
}

#[derive(Debug, Clone)]
enum ModelOp {
    Put(Vec<u8>, Vec<u8>),
    Get(Vec<u8>),
    Delete(Vec<u8>, Vec<u8>),
    Range(Vec<u8>, Vec<u8>),
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        3 => (key(), value()).prop_map(|(k, v)| ModelOp::Put(k, v)),
        2 => key().prop_map(ModelOp::Get),
        2 => (key(), range_end()).prop_map(|(k, e)| ModelOp::Delete(k, e)),
        2 => (key(), range_end()).prop_map(|(k, e)| ModelOp::Range(k, e)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The store agrees with a plain map on every reply to put/get/delete/range, including
    /// revisions and versions.
    #[test]
    fn store_matches_the_reference_model(ops in prop::collection::vec(model_op(), 1..80)) {
        let mut s = KvStore::new(1_000);
        let mut m = Model::default();
        let c = ctx(0, 0);
        for op in ops {
            match op {
                ModelOp::Put(k, v) => {
                    let r = s.apply(&c, &KvRequest::put(k.clone(), v.clone()));
                    let rev = m.put(&k, &v);
                    prop_assert!(matches!(r, KvResponse::Put(p) if p.header.revision == rev));
                }
                ModelOp::Get(k) => {
                    let r = s.apply(&c, &KvRequest::get(k.clone()));
                    let KvResponse::Range(r) = r else { return Err(TestCaseError::fail("get")) };
                    prop_assert_eq!(r.kvs, m.kvs.get(&k).cloned().into_iter().collect::<Vec<_>>());
                    prop_assert_eq!(r.header.revision, m.revision);
                }
                ModelOp::Delete(k, e) => {
                    let r = s.apply(&c, &KvRequest::DeleteRange(DeleteRangeRequest {
                        key: k.clone(), range_end: e.clone(), prev_kv: true,
                    }));
                    let deleted = m.delete(&k, &e);
                    let KvResponse::DeleteRange(d) = r else {
                        return Err(TestCaseError::fail("delete"))
                    };
                    prop_assert_eq!(d.deleted, deleted.len() as u64);
                    prop_assert_eq!(d.prev_kvs, deleted);
                    prop_assert_eq!(d.header.revision, m.revision);
                }
                ModelOp::Range(k, e) => {
                    let r = s.apply(&c, &KvRequest::Range(RangeRequest {
                        key: k.clone(), range_end: e.clone(), ..Default::default()
                    }));
                    let KvResponse::Range(r) = r else { return Err(TestCaseError::fail("range")) };
                    let expected = m.range(&k, &e);
                    prop_assert_eq!(r.count, expected.len() as u64);
                    prop_assert_eq!(r.kvs, expected);
                }
            }
        }
        prop_assert_eq!(s.revision(), m.revision);
    }

    /// Reads at every retained past revision agree with a model snapshot taken at that revision.
    #[test]
    fn past_reads_match_model_snapshots(ops in prop::collection::vec(model_op(), 1..50)) {
        let mut s = KvStore::new(1_000);
        let mut m = Model::default();
        let mut states = BTreeMap::new();
        states.insert(m.revision, m.kvs.clone());
        let c = ctx(0, 0);
        for op in ops {
            match op {
                ModelOp::Put(k, v) => {
                    s.apply(&c, &KvRequest::put(k.clone(), v.clone()));
                    m.put(&k, &v);
                }
                ModelOp::Delete(k, e) => {
                    s.apply(&c, &KvRequest::DeleteRange(DeleteRangeRequest {
                        key: k.clone(), range_end: e.clone(), prev_kv: false,
                    }));
                    m.delete(&k, &e);
                }
                ModelOp::Get(_) | ModelOp::Range(..) => {}
            }
            states.insert(m.revision, m.kvs.clone());
        }
        for (rev, kvs) in states {
            let r = s.range(&RangeRequest {
                key: vec![0], range_end: vec![0], revision: rev, ..Default::default()
            });
            let r = r.map_err(|e| TestCaseError::fail(e.to_string()))?;
            // The empty initial state is readable too: it has a revision of its own.
            prop_assert_eq!(r.kvs, kvs.into_values().collect::<Vec<_>>());
        }
    }
}
