//! Unit tests: one per semantic the store promises.

use super::*;
use crate::service::{ExecContext, Service};
use crate::wire::codec::{Decode, DecodeError, Encode, Writer};

fn ctx(timestamp_ms: u64) -> ExecContext {
    ExecContext {
        cid: 1,
        timestamp_ms,
        index: 0,
    }
}

fn exec(s: &mut KvStore, req: KvRequest) -> KvResponse {
    exec_at(s, 0, req)
}

fn exec_at(s: &mut KvStore, ts: u64, req: KvRequest) -> KvResponse {
    // Go through the byte interface so every test also exercises the codec.
    let reply = s.execute(&ctx(ts), &req.to_bytes());
    KvResponse::from_bytes(&reply).expect("store replies decode")
}

fn put(s: &mut KvStore, k: &str, v: &str) -> PutResponse {
    match exec(s, KvRequest::put(k, v)) {
        KvResponse::Put(p) => p,
        other => panic!("put failed: {other:?}"),
    }
}

fn put_lease(s: &mut KvStore, k: &str, v: &str, lease: i64) -> KvResponse {
    exec(
        s,
        KvRequest::Put(PutRequest {
            key: k.into(),
            value: v.into(),
            lease,
            prev_kv: false,
        }),
    )
}

fn delete(s: &mut KvStore, k: &str) -> DeleteRangeResponse {
    match exec(s, KvRequest::delete(k)) {
        KvResponse::DeleteRange(d) => d,
        other => panic!("delete failed: {other:?}"),
    }
}

fn range(s: &mut KvStore, req: RangeRequest) -> RangeResponse {
    match exec(s, KvRequest::Range(req)) {
        KvResponse::Range(r) => r,
        other => panic!("range failed: {other:?}"),
    }
}

fn range_err(s: &mut KvStore, req: RangeRequest) -> KvError {
    match exec(s, KvRequest::Range(req)) {
        KvResponse::Error(e) => e.error,
        other => panic!("expected an error: {other:?}"),
    }
}

fn get(s: &mut KvStore, k: &str) -> Option<KeyValue> {
    range(s, RangeRequest::key(k)).kvs.into_iter().next()
}

fn keys(r: &RangeResponse) -> Vec<String> {
    r.kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

fn txn(s: &mut KvStore, t: TxnRequest) -> KvResponse {
    exec(s, KvRequest::Txn(t))
}

fn txn_ok(s: &mut KvStore, t: TxnRequest) -> TxnResponse {
    match txn(s, t) {
        KvResponse::Txn(t) => t,
        other => panic!("txn failed: {other:?}"),
    }
}

fn put_op(k: &str, v: &str) -> RequestOp {
    RequestOp::Put(PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    })
}

fn poll(s: &mut KvStore, req: WatchPollRequest) -> Result<WatchPollResponse, KvError> {
    match exec(s, KvRequest::WatchPoll(req)) {
        KvResponse::WatchPoll(w) => Ok(w),
        KvResponse::Error(e) => Err(e.error),
        other => panic!("unexpected reply {other:?}"),
    }
}

fn watch_all(after: u64) -> WatchPollRequest {
    WatchPollRequest {
        key: vec![0],
        range_end: vec![0],
        after_revision: after,
        ..Default::default()
    }
}

fn grant(s: &mut KvStore, ts: u64, id: i64, ttl: i64) -> KvResponse {
    exec_at(s, ts, KvRequest::LeaseGrant(LeaseGrantRequest { id, ttl }))
}

fn lease_id(r: KvResponse) -> i64 {
    match r {
        KvResponse::LeaseGrant(g) => g.id,
        other => panic!("grant failed: {other:?}"),
    }
}

#[test]
fn fresh_store_is_at_revision_one_and_empty() {
    let mut s = KvStore::new(100);
    assert_eq!(INITIAL_REVISION, 1, "etcd's empty store is at revision 1");
    assert_eq!(s.revision(), INITIAL_REVISION);
    assert_eq!(s.compact_revision(), NEVER_COMPACTED);
    assert_eq!(get(&mut s, "a"), None);
    assert_eq!(
        range(&mut s, RangeRequest::key("a")).header.revision,
        INITIAL_REVISION
    );
    let at_initial = RangeRequest {
        revision: INITIAL_REVISION,
        ..RangeRequest::key("a")
    };
    assert_eq!(range(&mut s, at_initial).count, 0);
    // A fresh store's snapshot restores (onto a store that has been written to, too).
    let snap = s.snapshot();
    let mut r = KvStore::new(100);
    put(&mut r, "x", "1");
    r.restore(&snap).expect("a fresh store's snapshot restores");
    assert_eq!(r, s);
    assert_eq!(r.snapshot(), snap);
}

#[test]
fn each_put_bumps_revision_and_tracks_create_mod_and_version() {
    let mut s = KvStore::new(100);
    let first = INITIAL_REVISION + 1;
    assert_eq!(put(&mut s, "a", "1").header.revision, first);
    assert_eq!(put(&mut s, "b", "1").header.revision, first + 1);
    assert_eq!(put(&mut s, "a", "2").header.revision, first + 2);
    let a = get(&mut s, "a").expect("a exists");
    assert_eq!(
        (a.create_revision, a.mod_revision, a.version, a.value),
        (first, first + 2, 2, b"2".to_vec())
    );
}

#[test]
fn delete_then_recreate_resets_version_and_create_revision() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1"); // 2
    put(&mut s, "a", "2"); // 3
    assert_eq!(delete(&mut s, "a").deleted, 1); // 4
    put(&mut s, "a", "3"); // 5
    let a = get(&mut s, "a").expect("a exists");
    assert_eq!((a.create_revision, a.mod_revision, a.version), (5, 5, 1));
}

#[test]
fn deleting_nothing_does_not_bump_the_revision() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1");
    let d = delete(&mut s, "zz");
    assert_eq!((d.deleted, d.header.revision, s.revision()), (0, 2, 2));
}

#[test]
fn txn_with_several_writes_bumps_revision_once() {
    let mut s = KvStore::new(100);
    put(&mut s, "x", "0");
    let t = txn_ok(
        &mut s,
        TxnRequest {
            compare: vec![],
            success: vec![
                put_op("a", "1"),
                put_op("b", "1"),
                RequestOp::DeleteRange(DeleteRangeRequest {
                    key: "x".into(),
                    ..Default::default()
                }),
            ],
            failure: vec![],
        },
    );
    assert!(t.succeeded);
    assert_eq!(t.header.revision, 3);
    assert_eq!(s.revision(), 3);
    assert_eq!(get(&mut s, "a").expect("a").mod_revision, 3);
    assert_eq!(get(&mut s, "b").expect("b").mod_revision, 3);
    assert!(t.responses.iter().all(|r| matches!(r,
        ResponseOp::Put(PutResponse { header, .. }) | ResponseOp::DeleteRange(DeleteRangeResponse { header, .. })
        if header.revision == 3)));
}

#[test]
fn read_only_txn_does_not_bump_the_revision() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1");
    let t = txn_ok(
        &mut s,
        TxnRequest {
            compare: vec![],
            success: vec![RequestOp::Range(RangeRequest::key("a"))],
            failure: vec![],
        },
    );
    assert_eq!((t.header.revision, s.revision()), (2, 2));
}

#[test]
fn range_end_conventions_single_key_from_key_prefix_and_inverted() {
    let mut s = KvStore::new(100);
    for k in ["a", "ab", "abc", "b", "c"] {
        put(&mut s, k, "v");
    }
    assert_eq!(keys(&range(&mut s, RangeRequest::key("ab"))), ["ab"]);
    let from_b = RangeRequest {
        key: "b".into(),
        range_end: vec![0],
        ..Default::default()
    };
    assert_eq!(keys(&range(&mut s, from_b)), ["b", "c"]);
    assert_eq!(
        keys(&range(&mut s, RangeRequest::prefix("ab"))),
        ["ab", "abc"]
    );
    let half_open = RangeRequest {
        key: "a".into(),
        range_end: "b".into(),
        ..Default::default()
    };
    assert_eq!(keys(&range(&mut s, half_open)), ["a", "ab", "abc"]);
    let inverted = RangeRequest {
        key: "c".into(),
        range_end: "a".into(),
        ..Default::default()
    };
    assert_eq!(range(&mut s, inverted.clone()).count, 0);
    let equal = RangeRequest {
        range_end: "c".into(),
        ..inverted
    };
    assert_eq!(range(&mut s, equal).count, 0);
    let all = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    };
    assert_eq!(range(&mut s, all).count, 5);
}

#[test]
fn prefix_end_increments_last_byte_below_ff() {
    assert_eq!(prefix_end(b"ab"), b"ac");
    assert_eq!(prefix_end(&[1, 0xff]), [2]);
    assert_eq!(prefix_end(&[0xff, 0xff]), [0]);
}

#[test]
fn range_limit_reports_more_and_the_total_count() {
    let mut s = KvStore::new(100);
    for k in ["a", "b", "c", "d"] {
        put(&mut s, k, "v");
    }
    let r = range(
        &mut s,
        RangeRequest {
            limit: 2,
            ..RangeRequest::prefix("")
        }
        .with_all_keys(),
    );
    assert_eq!(
        (keys(&r), r.more, r.count),
        (vec!["a".into(), "b".into()], true, 4)
    );
    let r = range(
        &mut s,
        RangeRequest {
            limit: 4,
            ..Default::default()
        }
        .with_all_keys(),
    );
    assert_eq!((r.kvs.len(), r.more, r.count), (4, false, 4));
}

trait AllKeys {
    fn with_all_keys(self) -> Self;
}

impl AllKeys for RangeRequest {
    fn with_all_keys(self) -> Self {
        RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..self
        }
    }
}

#[test]
fn range_count_only_returns_no_kvs_and_keys_only_drops_values() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1");
    put(&mut s, "b", "2");
    let c = range(
        &mut s,
        RangeRequest {
            count_only: true,
            ..Default::default()
        }
        .with_all_keys(),
    );
    assert_eq!((c.kvs.len(), c.count), (0, 2));
    let k = range(
        &mut s,
        RangeRequest {
            keys_only: true,
            ..Default::default()
        }
        .with_all_keys(),
    );
    assert_eq!(keys(&k), ["a", "b"]);
    assert!(k
        .kvs
        .iter()
        .all(|kv| kv.value.is_empty() && kv.version == 1));
}

#[test]
fn range_at_past_revision_sees_the_state_of_that_revision() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1"); // 2
    put(&mut s, "b", "1"); // 3
    put(&mut s, "a", "2"); // 4
    delete(&mut s, "b"); // 5
    put(&mut s, "c", "1"); // 6
    let at = |rev| {
        RangeRequest {
            revision: rev,
            ..Default::default()
        }
        .with_all_keys()
    };
    assert_eq!(
        range(&mut s, at(INITIAL_REVISION)).count,
        0,
        "the initial revision is the empty store"
    );
    let r3 = range(&mut s, at(3));
    assert_eq!(keys(&r3), ["a", "b"]);
    assert_eq!(r3.kvs[0].value, b"1");
    assert_eq!(
        r3.header.revision, 6,
        "the header carries the current revision"
    );
    let r5 = range(&mut s, at(5));
    assert_eq!(keys(&r5), ["a"]);
    assert_eq!(
        (r5.kvs[0].value.as_slice(), r5.kvs[0].version),
        (&b"2"[..], 2)
    );
    assert_eq!(keys(&range(&mut s, at(6))), ["a", "c"]);
    let r1_limited = range(&mut s, RangeRequest { limit: 1, ..at(4) });
    assert_eq!(
        (keys(&r1_limited), r1_limited.more, r1_limited.count),
        (vec!["a".into()], true, 2)
    );
}

#[test]
fn range_at_future_revision_is_refused() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1");
    let e = range_err(
        &mut s,
        RangeRequest {
            revision: 3,
            ..RangeRequest::key("a")
        },
    );
    assert_eq!(
        e,
        KvError::FutureRevision {
            requested: 3,
            current: 2
        }
    );
}

#[test]
fn put_prev_kv_returns_the_replaced_record() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1");
    let req = |v: &str| {
        KvRequest::Put(PutRequest {
            key: "a".into(),
            value: v.into(),
            lease: 0,
            prev_kv: true,
        })
    };
    match exec(&mut s, req("2")) {
        KvResponse::Put(p) => assert_eq!(p.prev_kv.map(|kv| kv.value), Some(b"1".to_vec())),
        other => panic!("{other:?}"),
    }
    assert_eq!(put(&mut s, "new", "x").prev_kv, None);
}

#[test]
fn delete_range_returns_count_and_prev_kvs() {
    let mut s = KvStore::new(100);
    for k in ["p/1", "p/2", "q"] {
        put(&mut s, k, "v");
    }
    let r = exec(
        &mut s,
        KvRequest::DeleteRange(DeleteRangeRequest {
            key: "p/".into(),
            range_end: prefix_end(b"p/"),
            prev_kv: true,
        }),
    );
    let KvResponse::DeleteRange(d) = r else {
        panic!("{r:?}")
    };
    assert_eq!(d.deleted, 2);
    assert_eq!(
        d.prev_kvs
            .iter()
            .map(|kv| kv.key.clone())
            .collect::<Vec<_>>(),
        [b"p/1".to_vec(), b"p/2".to_vec()]
    );
    assert_eq!(d.header.revision, 5, "one revision for the whole delete");
    assert!(get(&mut s, "q").is_some());
}

#[test]
fn empty_keys_are_refused() {
    let mut s = KvStore::new(100);
    for req in [
        KvRequest::put("", "v"),
        KvRequest::get(""),
        KvRequest::delete(""),
    ] {
        assert_eq!(exec(&mut s, req).error(), Some(&KvError::EmptyKey));
    }
    assert_eq!(s.revision(), INITIAL_REVISION);
}

fn cmp(k: &str, result: CompareResult, target: CompareTarget) -> Compare {
    Compare::new(k, result, target)
}

fn holds(s: &mut KvStore, c: Compare) -> bool {
    txn_ok(
        s,
        TxnRequest {
            compare: vec![c],
            success: vec![],
            failure: vec![],
        },
    )
    .succeeded
}

#[test]
fn txn_compares_value_version_create_and_mod_revision() {
    use CompareResult::*;
    use CompareTarget::*;
    let mut s = KvStore::new(100);
    put(&mut s, "other", "x"); // 2
    put(&mut s, "a", "m"); // 3
    put(&mut s, "a", "m"); // 4: version 2, create 3, mod 4
    let cases = [
        (Value(b"m".to_vec()), Equal, true),
        (Value(b"m".to_vec()), NotEqual, false),
        (Value(b"a".to_vec()), Greater, true),
        (Value(b"z".to_vec()), Less, true),
        (Version(2), Equal, true),
        (Version(1), Greater, true),
        (Version(2), Less, false),
        (CreateRevision(3), Equal, true),
        (CreateRevision(4), Less, true),
        (ModRevision(4), Equal, true),
        (ModRevision(4), NotEqual, false),
        (ModRevision(3), Greater, true),
        (Lease(0), Equal, true),
    ];
    for (target, result, expected) in cases {
        let c = cmp("a", result, target);
        assert_eq!(holds(&mut s, c.clone()), expected, "{c:?}");
    }
}

#[test]
fn compare_on_missing_key_reads_zero_and_value_compare_fails() {
    use CompareResult::*;
    use CompareTarget::*;
    let mut s = KvStore::new(100);
    assert!(holds(&mut s, cmp("a", Equal, ModRevision(0))));
    assert!(holds(&mut s, cmp("a", Equal, Version(0))));
    assert!(holds(&mut s, cmp("a", Equal, CreateRevision(0))));
    assert!(!holds(&mut s, cmp("a", Equal, Value(vec![]))));
    assert!(!holds(&mut s, cmp("a", NotEqual, Value(b"x".to_vec()))));
}

#[test]
fn compare_with_range_end_must_hold_for_every_key() {
    let mut s = KvStore::new(100);
    put(&mut s, "p/1", "v");
    put(&mut s, "p/2", "v");
    put(&mut s, "p/2", "v");
    let mut c = cmp("p/", CompareResult::Equal, CompareTarget::Version(1));
    c.range_end = prefix_end(b"p/");
    assert!(!holds(&mut s, c.clone()));
    c.target = CompareTarget::Version(0);
    c.result = CompareResult::Greater;
    assert!(holds(&mut s, c));
}

#[test]
fn txn_failure_branch_runs_when_a_compare_fails() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1");
    let t = txn_ok(
        &mut s,
        TxnRequest {
            compare: vec![
                cmp(
                    "a",
                    CompareResult::Equal,
                    CompareTarget::Value(b"1".to_vec()),
                ),
                cmp("a", CompareResult::Equal, CompareTarget::Version(7)),
            ],
            success: vec![put_op("a", "success")],
            failure: vec![put_op("a", "failure")],
        },
    );
    assert!(!t.succeeded);
    assert_eq!(get(&mut s, "a").expect("a").value, b"failure");
}

#[test]
fn txn_reads_see_earlier_writes_of_the_same_txn() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "old"); // 2
    let t = txn_ok(
        &mut s,
        TxnRequest {
            compare: vec![],
            success: vec![
                put_op("a", "new"),
                RequestOp::Range(RangeRequest::key("a")),
                RequestOp::Range(RangeRequest {
                    revision: 2,
                    ..RangeRequest::key("a")
                }),
            ],
            failure: vec![],
        },
    );
    let values: Vec<_> = t
        .responses
        .iter()
        .filter_map(|r| match r {
            ResponseOp::Range(r) => Some(r.kvs[0].value.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(values, [b"new".to_vec(), b"old".to_vec()]);
}

#[test]
fn txn_with_an_invalid_op_is_refused_whole() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1");
    let before = s.snapshot();
    let r = txn(
        &mut s,
        TxnRequest {
            compare: vec![],
            success: vec![
                put_op("a", "2"),
                RequestOp::Put(PutRequest {
                    key: "b".into(),
                    value: "x".into(),
                    lease: 99,
                    prev_kv: false,
                }),
            ],
            failure: vec![],
        },
    );
    assert_eq!(r.error(), Some(&KvError::LeaseNotFound { id: 99 }));
    assert_eq!(s.snapshot(), before, "nothing of the txn was applied");
}

#[test]
fn cas_writes_only_when_the_expected_value_is_there() {
    let mut s = KvStore::new(100);
    let create = exec(&mut s, KvRequest::cas("k", None, "v1"));
    assert_eq!(create.txn_succeeded(), Some(true));
    let again = exec(&mut s, KvRequest::cas("k", None, "v2"));
    assert_eq!(again.txn_succeeded(), Some(false));
    let KvResponse::Txn(t) = &again else {
        panic!("{again:?}")
    };
    assert!(matches!(&t.responses[..], [ResponseOp::Range(r)] if r.kvs[0].value == b"v1"));
    let swap = exec(&mut s, KvRequest::cas("k", Some(b"v1"), "v3"));
    assert_eq!(swap.txn_succeeded(), Some(true));
    let stale = exec(&mut s, KvRequest::cas("k", Some(b"v1"), "v4"));
    assert_eq!(stale.txn_succeeded(), Some(false));
    assert_eq!(
        exec(&mut s, KvRequest::get("k")).get_value(),
        Some(&b"v3"[..])
    );
}

#[test]
fn events_since_returns_every_event_in_order() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1");
    put(&mut s, "b", "1");
    delete(&mut s, "a");
    put(&mut s, "b", "2");
    let w = poll(&mut s, watch_all(0)).expect("poll");
    let seen: Vec<_> = w
        .events
        .iter()
        .map(|e| (e.kind, e.kv.key.clone(), e.revision()))
        .collect();
    assert_eq!(
        seen,
        [
            (EventKind::Put, b"a".to_vec(), 2),
            (EventKind::Put, b"b".to_vec(), 3),
            (EventKind::Delete, b"a".to_vec(), 4),
            (EventKind::Put, b"b".to_vec(), 5),
        ]
    );
    assert_eq!(w.resume_after, 5);
    let after3 = poll(&mut s, watch_all(3)).expect("poll");
    assert_eq!(after3.events.len(), 2);
    let only_b = poll(
        &mut s,
        WatchPollRequest {
            key: "b".into(),
            ..watch_all(0)
        }
        .single_key(),
    )
    .expect("poll");
    assert!(only_b.events.iter().all(|e| e.kv.key == b"b"));
    assert_eq!((only_b.events.len(), only_b.resume_after), (2, 5));
}

trait SingleKey {
    fn single_key(self) -> Self;
}

impl SingleKey for WatchPollRequest {
    fn single_key(self) -> Self {
        WatchPollRequest {
            range_end: vec![],
            ..self
        }
    }
}

#[test]
fn delete_events_carry_the_deleted_record_and_put_prev_kv_is_opt_in() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1");
    put(&mut s, "a", "2");
    delete(&mut s, "a");
    let plain = poll(&mut s, watch_all(0)).expect("poll");
    assert_eq!(plain.events[1].prev_kv, None);
    let del = &plain.events[2];
    assert_eq!(del.kind, EventKind::Delete);
    assert_eq!(
        del.prev_kv.as_ref().map(|kv| kv.value.clone()),
        Some(b"2".to_vec())
    );
    assert_eq!((del.kv.mod_revision, del.kv.version), (4, 0));
    let with_prev = poll(
        &mut s,
        WatchPollRequest {
            prev_kv: true,
            ..watch_all(0)
        },
    )
    .expect("poll");
    assert_eq!(
        with_prev.events[1]
            .prev_kv
            .as_ref()
            .map(|kv| kv.value.clone()),
        Some(b"1".to_vec())
    );
}

#[test]
fn watch_poll_limit_never_splits_a_revision_and_resumes_without_gaps() {
    let mut s = KvStore::new(1000);
    for i in 0..5 {
        // Each txn writes three keys at one revision.
        txn_ok(
            &mut s,
            TxnRequest {
                compare: vec![],
                success: vec![
                    put_op(&format!("{i}/a"), "v"),
                    put_op(&format!("{i}/b"), "v"),
                    put_op(&format!("{i}/c"), "v"),
                ],
                failure: vec![],
            },
        );
    }
    let mut after = 0;
    let mut all = Vec::new();
    loop {
        let w = poll(
            &mut s,
            WatchPollRequest {
                limit: 4,
                ..watch_all(after)
            },
        )
        .expect("poll");
        assert!(w.events.len() % 3 == 0, "a revision was split");
        assert!(w.events.len() <= 4 || w.events.len() == 3);
        if w.events.is_empty() {
            assert_eq!(w.resume_after, s.revision());
            break;
        }
        all.extend(w.events);
        after = w.resume_after;
    }
    let revisions: Vec<u64> = all.iter().map(Event::revision).collect();
    assert_eq!(revisions.len(), 15);
    assert!(revisions.windows(2).all(|w| w[0] <= w[1]));
}

/// etcd's compact revision starts below every revision: compacting a fresh store at its revision
/// 1 succeeds, once, and a second compaction there is refused (etcdctl prints "compacted
/// revision 1", then exits 1 with "required revision has been compacted").
#[test]
fn a_fresh_store_compacts_at_revision_one_once() {
    let mut s = KvStore::new(100);
    let c = exec(&mut s, KvRequest::Compact(CompactRequest { revision: 1 }));
    assert!(matches!(c, KvResponse::Compact(_)), "{c:?}");
    assert_eq!(s.compact_revision(), INITIAL_REVISION);
    let again = exec(&mut s, KvRequest::Compact(CompactRequest { revision: 1 }));
    assert!(
        matches!(
            again,
            KvResponse::Error(ErrorResponse {
                error: KvError::Compacted {
                    compact_revision: 1
                },
                ..
            })
        ),
        "{again:?}"
    );
    put(&mut s, "a", "1"); // 2
    let mut r = KvStore::new(100);
    r.restore(&s.snapshot()).expect("restore");
    assert_eq!((r.compact_revision(), r.revision()), (1, 2));
    let w = poll(&mut s, watch_all(INITIAL_REVISION)).expect("revision 1 held no event");
    assert_eq!(w.events.len(), 1);
}

#[test]
fn watch_below_the_compaction_point_is_refused_with_the_compact_revision() {
    let mut s = KvStore::new(100);
    for i in 0..5 {
        put(&mut s, "a", &i.to_string()); // 2..=6
    }
    exec(&mut s, KvRequest::Compact(CompactRequest { revision: 4 }));
    assert_eq!(
        poll(&mut s, watch_all(2)),
        Err(KvError::Compacted {
            compact_revision: 4
        })
    );
    // etcd 3.6 keeps the compaction revision's writes: a watch may start at it.
    let w = poll(&mut s, watch_all(3)).expect("watch from the compaction point");
    assert_eq!(
        w.events.iter().map(Event::revision).collect::<Vec<_>>(),
        [4, 5, 6]
    );
    let w = poll(&mut s, watch_all(4)).expect("watch after the compaction point");
    assert_eq!(
        w.events.iter().map(Event::revision).collect::<Vec<_>>(),
        [5, 6]
    );
}

/// A watch from the compaction revision gets every write of that revision, deletions and a
/// transaction's writes to the same key included, with the records written at it; the records
/// they replaced from before it are compacted away, so those events carry none (as etcd's do).
#[test]
fn a_watch_from_the_compaction_revision_gets_its_writes_without_what_they_replaced() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1"); // 2
    put(&mut s, "b", "1"); // 3
    put(&mut s, "c", "1"); // 4
    let txn = |ops: Vec<RequestOp>| {
        KvRequest::Txn(TxnRequest {
            compare: vec![],
            success: ops,
            failure: vec![],
        })
    };
    let r = exec(
        &mut s,
        txn(vec![
            put_op("a", "2"),
            RequestOp::DeleteRange(DeleteRangeRequest {
                key: b"b".to_vec(),
                ..Default::default()
            }),
            put_op("c", "2"),
            put_op("c", "3"),
            put_op("d", "1"),
        ]),
    ); // 5
    assert!(matches!(r, KvResponse::Txn(_)), "{r:?}");
    put(&mut s, "a", "3"); // 6
    exec(&mut s, KvRequest::Compact(CompactRequest { revision: 5 }));
    let mut w = watch_all(4);
    w.prev_kv = true;
    let got = poll(&mut s, w).expect("watch from the compaction revision");
    let seen: Vec<_> = got
        .events
        .iter()
        .map(|e| {
            (
                e.kind,
                String::from_utf8_lossy(&e.kv.key).into_owned(),
                String::from_utf8_lossy(&e.kv.value).into_owned(),
                e.kv.mod_revision,
                e.prev_kv
                    .as_ref()
                    .map(|p| String::from_utf8_lossy(&p.value).into_owned()),
            )
        })
        .collect();
    let s_ = |x: &str| x.to_owned();
    assert_eq!(
        seen,
        [
            (EventKind::Put, s_("a"), s_("2"), 5, None),
            (EventKind::Delete, s_("b"), s_(""), 5, None),
            (EventKind::Put, s_("c"), s_("2"), 5, None),
            // Written at the compaction revision itself, so still known.
            (EventKind::Put, s_("c"), s_("3"), 5, Some(s_("2"))),
            (EventKind::Put, s_("d"), s_("1"), 5, None),
            (EventKind::Put, s_("a"), s_("3"), 6, Some(s_("2"))),
        ]
    );
    // The kept writes survive a snapshot, and so does what reads at the revision see.
    let mut r = KvStore::new(100);
    r.restore(&s.snapshot()).expect("restore");
    assert_eq!(r, s);
    let mut w = watch_all(4);
    w.prev_kv = true;
    assert_eq!(poll(&mut r, w).expect("poll").events, got.events);
    assert_eq!(
        poll(&mut r, watch_all(3)),
        Err(KvError::Compacted {
            compact_revision: 5
        })
    );
    // A snapshot that kept a record from before the compaction revision is not one the store
    // makes.
    let mut t = s.clone();
    let kept = KeyValue {
        key: b"a".to_vec(),
        create_revision: 2,
        mod_revision: 2,
        version: 1,
        value: b"1".to_vec(),
        lease: NO_LEASE,
    };
    std::sync::Arc::make_mut(t.history.get_mut(&5).expect("batch 5"))[0].prev =
        Some(std::sync::Arc::new(kept));
    assert!(KvStore::new(100).restore(&t.snapshot()).is_err());
}

/// A snapshot taken before the compaction revision's writes were kept (history from the revision
/// after it) still restores, and a watch from the compaction revision there is refused rather
/// than given that revision's events incomplete.
#[test]
fn a_store_restored_without_the_compaction_revisions_writes_refuses_a_watch_from_it() {
    let mut s = KvStore::new(100);
    for i in 0..5 {
        put(&mut s, "a", &i.to_string()); // 2..=6
    }
    exec(&mut s, KvRequest::Compact(CompactRequest { revision: 4 }));
    s.history.remove(&4);
    let mut r = KvStore::new(100);
    r.restore(&s.snapshot()).expect("the older layout restores");
    assert_eq!(
        poll(&mut r, watch_all(3)),
        Err(KvError::Compacted {
            compact_revision: 4
        })
    );
    assert_eq!(
        poll(&mut r, watch_all(4))
            .expect("poll")
            .events
            .iter()
            .map(Event::revision)
            .collect::<Vec<_>>(),
        [5, 6]
    );
}

#[test]
fn a_watch_from_before_the_first_write_is_refused_only_once_history_was_compacted() {
    let revisions = |w: WatchPollResponse| w.events.iter().map(Event::revision).collect::<Vec<_>>();
    // Revision 0 is before the empty store's; no write has either, so nothing is lost.
    let mut s = KvStore::new(100);
    for after in [0, INITIAL_REVISION] {
        let w = poll(&mut s, watch_all(after)).expect("a fresh store has lost no event");
        assert_eq!((w.events.len(), w.resume_after), (0, INITIAL_REVISION));
    }
    for i in 0..3 {
        put(&mut s, "a", &i.to_string()); // 2..=4
    }
    for after in [0, INITIAL_REVISION] {
        let w = poll(&mut s, watch_all(after)).expect("nothing was compacted");
        assert_eq!((revisions(w.clone()), w.resume_after), (vec![2, 3, 4], 4));
    }
    let c = exec(&mut s, KvRequest::Compact(CompactRequest { revision: 3 }));
    assert!(matches!(c, KvResponse::Compact(_)), "{c:?}");
    for after in [0, INITIAL_REVISION] {
        assert_eq!(
            poll(&mut s, watch_all(after)),
            Err(KvError::Compacted {
                compact_revision: 3
            }),
            "after {after}"
        );
    }
    assert_eq!(revisions(poll(&mut s, watch_all(2)).expect("poll")), [3, 4]);
    assert_eq!(revisions(poll(&mut s, watch_all(3)).expect("poll")), [4]);
    // Retention compaction too: once the first write's revision is dropped, a watch from the
    // start has lost it.
    let mut r = KvStore::new(2);
    for i in 0..3 {
        put(&mut r, "a", &i.to_string()); // 2..=4
    }
    assert_eq!(r.compact_revision(), INITIAL_REVISION + 1);
    assert_eq!(
        poll(&mut r, watch_all(0)),
        Err(KvError::Compacted {
            compact_revision: INITIAL_REVISION + 1
        })
    );
    // The compaction revision's write is kept: a watch may start at it.
    assert_eq!(
        revisions(poll(&mut r, watch_all(INITIAL_REVISION)).expect("poll")),
        [2, 3, 4]
    );
    assert_eq!(revisions(poll(&mut r, watch_all(2)).expect("poll")), [3, 4]);
}

#[test]
fn compaction_drops_history_but_keeps_reads_at_the_compact_revision() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1"); // 2
    put(&mut s, "a", "2"); // 3
    put(&mut s, "a", "3"); // 4
    let c = exec(&mut s, KvRequest::Compact(CompactRequest { revision: 3 }));
    assert!(matches!(c, KvResponse::Compact(CompactResponse { header }) if header.revision == 4));
    assert_eq!(s.revision(), 4, "compaction is not a write");
    let at3 = range(
        &mut s,
        RangeRequest {
            revision: 3,
            ..RangeRequest::key("a")
        },
    );
    assert_eq!(at3.kvs[0].value, b"2");
    assert_eq!(
        range_err(
            &mut s,
            RangeRequest {
                revision: 2,
                ..RangeRequest::key("a")
            }
        ),
        KvError::Compacted {
            compact_revision: 3
        }
    );
}

#[test]
fn compacting_at_or_below_the_compaction_point_or_in_the_future_is_refused() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1"); // 2
    put(&mut s, "a", "2"); // 3
    let compact = |s: &mut KvStore, revision| {
        exec(s, KvRequest::Compact(CompactRequest { revision }))
            .error()
            .cloned()
    };
    assert_eq!(compact(&mut s, 2), None);
    assert_eq!(
        compact(&mut s, 2),
        Some(KvError::Compacted {
            compact_revision: 2
        })
    );
    assert_eq!(
        compact(&mut s, 4),
        Some(KvError::FutureRevision {
            requested: 4,
            current: 3
        })
    );
}

#[test]
fn retention_keeps_at_most_the_configured_revisions_of_history() {
    let mut s = KvStore::new(3);
    for i in 0..10 {
        put(&mut s, "a", &i.to_string()); // 2..=11
    }
    assert_eq!(s.compact_revision(), 8);
    // Three revisions after the compaction point, and the compaction revision's own writes.
    assert_eq!(s.history.len(), 4);
    let w = poll(&mut s, watch_all(8)).expect("poll");
    assert_eq!(
        w.events.iter().map(Event::revision).collect::<Vec<_>>(),
        [9, 10, 11]
    );
    let mut none = KvStore::new(0);
    put(&mut none, "a", "1");
    assert_eq!((none.compact_revision(), none.history.len()), (2, 1));
}

#[test]
fn lease_ids_are_chosen_deterministically_or_taken_from_the_client() {
    let mut s = KvStore::new(100);
    assert_eq!(lease_id(grant(&mut s, 0, 2, 10)), 2);
    assert_eq!(lease_id(grant(&mut s, 0, 0, 10)), 1);
    // 2 is taken, so the next chosen id skips it.
    assert_eq!(lease_id(grant(&mut s, 0, 0, 10)), 3);
    assert_eq!(
        grant(&mut s, 0, 3, 10).error(),
        Some(&KvError::LeaseExists { id: 3 })
    );
    assert_eq!(
        grant(&mut s, 0, -4, 10).error(),
        Some(&KvError::InvalidLeaseId { id: -4 })
    );
    assert_eq!(
        grant(&mut s, 0, 0, 0).error(),
        Some(&KvError::InvalidLeaseTtl { ttl: 0 })
    );
    assert_eq!(
        s.revision(),
        INITIAL_REVISION,
        "lease grants are not key writes"
    );
}

#[test]
fn leases_expire_only_by_consensus_time_and_delete_their_keys_in_one_revision() {
    let mut s = KvStore::new(100);
    let id = lease_id(grant(&mut s, 1_000, 0, 5)); // deadline 6_000
    assert!(matches!(
        put_lease(&mut s, "a", "1", id),
        KvResponse::Put(_)
    ));
    assert!(matches!(
        put_lease(&mut s, "b", "1", id),
        KvResponse::Put(_)
    ));
    put(&mut s, "c", "1");
    assert_eq!(s.revision(), 4);
    // Still alive one millisecond before the deadline.
    exec_at(&mut s, 5_999, KvRequest::get("a"));
    assert!(s.get(b"a").is_some());
    let r = exec_at(&mut s, 6_000, KvRequest::get("a"));
    assert_eq!(r.get_value(), None, "expired before the request ran");
    assert_eq!(s.revision(), 5, "both keys deleted at one revision");
    assert!(s.get(b"b").is_none() && s.get(b"c").is_some());
    let w = poll(&mut s, watch_all(4)).expect("poll");
    assert_eq!(
        w.events
            .iter()
            .map(|e| (e.kind, e.kv.key.clone(), e.revision()))
            .collect::<Vec<_>>(),
        [
            (EventKind::Delete, b"a".to_vec(), 5),
            (EventKind::Delete, b"b".to_vec(), 5)
        ]
    );
    assert_eq!(
        exec_at(
            &mut s,
            6_000,
            KvRequest::LeaseKeepAlive(LeaseKeepAliveRequest { id })
        )
        .error(),
        Some(&KvError::LeaseNotFound { id })
    );
}

#[test]
fn leases_expire_in_deadline_order_each_at_its_own_revision() {
    let mut s = KvStore::new(100);
    let late = lease_id(grant(&mut s, 0, 1, 20));
    let early = lease_id(grant(&mut s, 0, 2, 10));
    put_lease(&mut s, "late", "v", late); // 2
    put_lease(&mut s, "early", "v", early); // 3
    exec_at(&mut s, 30_000, KvRequest::get("x"));
    let w = poll(&mut s, watch_all(3)).expect("poll");
    assert_eq!(
        w.events
            .iter()
            .map(|e| (e.kv.key.clone(), e.revision()))
            .collect::<Vec<_>>(),
        [(b"early".to_vec(), 4), (b"late".to_vec(), 5)]
    );
}

#[test]
fn a_malformed_request_still_advances_consensus_time() {
    let mut s = KvStore::new(100);
    let id = lease_id(grant(&mut s, 0, 0, 1));
    put_lease(&mut s, "a", "v", id);
    let reply = s.execute(&ctx(1_000), &[0xee]);
    let r = KvResponse::from_bytes(&reply).expect("reply decodes");
    assert!(matches!(r.error(), Some(KvError::Malformed(_))));
    assert!(s.get(b"a").is_none());
}

#[test]
fn keepalive_pushes_the_deadline_from_the_current_consensus_time() {
    let mut s = KvStore::new(100);
    let id = lease_id(grant(&mut s, 0, 0, 10));
    put_lease(&mut s, "a", "v", id);
    let k = exec_at(
        &mut s,
        9_000,
        KvRequest::LeaseKeepAlive(LeaseKeepAliveRequest { id }),
    );
    assert!(matches!(
        k,
        KvResponse::LeaseKeepAlive(LeaseKeepAliveResponse { ttl: 10, .. })
    ));
    exec_at(&mut s, 18_999, KvRequest::get("a"));
    assert!(s.get(b"a").is_some());
    exec_at(&mut s, 19_000, KvRequest::get("a"));
    assert!(s.get(b"a").is_none());
}

#[test]
fn revoke_deletes_attached_keys_and_unknown_leases_are_refused() {
    let mut s = KvStore::new(100);
    let id = lease_id(grant(&mut s, 0, 0, 100));
    put_lease(&mut s, "a", "v", id);
    assert_eq!(
        put_lease(&mut s, "b", "v", 77).error(),
        Some(&KvError::LeaseNotFound { id: 77 })
    );
    let r = exec(&mut s, KvRequest::LeaseRevoke(LeaseRevokeRequest { id }));
    assert!(
        matches!(r, KvResponse::LeaseRevoke(LeaseRevokeResponse { header }) if header.revision == 3)
    );
    assert!(s.get(b"a").is_none());
    assert_eq!(
        exec(&mut s, KvRequest::LeaseRevoke(LeaseRevokeRequest { id })).error(),
        Some(&KvError::LeaseNotFound { id })
    );
}

#[test]
fn revoking_a_lease_without_keys_does_not_bump_the_revision() {
    let mut s = KvStore::new(100);
    let id = lease_id(grant(&mut s, 0, 0, 100));
    exec(&mut s, KvRequest::LeaseRevoke(LeaseRevokeRequest { id }));
    assert_eq!(s.revision(), INITIAL_REVISION);
}

#[test]
fn rewriting_a_key_moves_it_between_leases() {
    let mut s = KvStore::new(100);
    let first = lease_id(grant(&mut s, 0, 0, 100));
    let second = lease_id(grant(&mut s, 0, 0, 100));
    put_lease(&mut s, "a", "1", first);
    put_lease(&mut s, "b", "1", first);
    put_lease(&mut s, "a", "2", second);
    put(&mut s, "b", "2"); // no lease: detached from `first`
    exec(
        &mut s,
        KvRequest::LeaseRevoke(LeaseRevokeRequest { id: first }),
    );
    assert!(s.get(b"a").is_some() && s.get(b"b").is_some());
    exec(
        &mut s,
        KvRequest::LeaseRevoke(LeaseRevokeRequest { id: second }),
    );
    assert!(s.get(b"a").is_none() && s.get(b"b").is_some());
}

#[test]
fn lease_time_to_live_reports_remaining_seconds_and_keys() {
    let mut s = KvStore::new(100);
    let id = lease_id(grant(&mut s, 0, 0, 60));
    put_lease(&mut s, "b", "v", id);
    put_lease(&mut s, "a", "v", id);
    exec_at(&mut s, 15_500, KvRequest::get("x"));
    let r = s.read(&KvRequest::LeaseTimeToLive(LeaseTimeToLiveRequest {
        id,
        keys: true,
    }));
    let KvResponse::LeaseTimeToLive(t) = r else {
        panic!("{r:?}")
    };
    assert_eq!((t.ttl, t.granted_ttl), (44, 60));
    assert_eq!(t.keys, [b"a".to_vec(), b"b".to_vec()]);
}

#[test]
fn lease_leases_lists_the_live_leases_in_id_order_as_a_read() {
    let mut s = KvStore::new(100);
    let granted = [
        lease_id(grant(&mut s, 0, 40, 60)),
        lease_id(grant(&mut s, 0, 7, 1)),
        lease_id(grant(&mut s, 0, 0, 60)),
    ];
    let listed =
        |s: &KvStore| match KvResponse::from_bytes(&s.query(&KvRequest::LeaseLeases.to_bytes()))
            .expect("decodes")
        {
            KvResponse::LeaseLeases(l) => l.ids,
            r => panic!("{r:?}"),
        };
    let mut all = granted.to_vec();
    all.sort_unstable();
    assert_eq!(listed(&s), all);
    assert!(KvRequest::LeaseLeases.is_read_only());
    // Lease 7 runs out at 1 s: the next ordered request expires it, and the list says so.
    let r = exec_at(&mut s, 1_000, KvRequest::LeaseLeases);
    let KvResponse::LeaseLeases(l) = r else {
        panic!("{r:?}")
    };
    assert!(!l.ids.contains(&7), "{l:?}");
    assert_eq!(l.ids.len(), 2);
    exec_at(
        &mut s,
        1_000,
        KvRequest::LeaseRevoke(LeaseRevokeRequest { id: 40 }),
    );
    assert_eq!(listed(&s), [granted[2]]);
}

#[test]
fn query_answers_reads_and_refuses_writes_without_mutating() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1");
    let before = s.snapshot();
    let read = KvResponse::from_bytes(&s.query(&KvRequest::get("a").to_bytes())).expect("decodes");
    assert_eq!(read.get_value(), Some(&b"1"[..]));
    for write in [
        KvRequest::put("a", "2"),
        KvRequest::delete("a"),
        KvRequest::cas("a", Some(b"1"), "2"),
        KvRequest::Compact(CompactRequest { revision: 2 }),
        KvRequest::LeaseGrant(LeaseGrantRequest { id: 0, ttl: 5 }),
    ] {
        let r = KvResponse::from_bytes(&s.query(&write.to_bytes())).expect("decodes");
        assert_eq!(r.error(), Some(&KvError::NotReadOnly), "{write:?}");
    }
    let poll = KvRequest::WatchPoll(watch_all(0));
    let r = KvResponse::from_bytes(&s.query(&poll.to_bytes())).expect("decodes");
    assert!(matches!(r, KvResponse::WatchPoll(w) if w.events.len() == 1));
    let read_txn = KvRequest::Txn(TxnRequest {
        compare: vec![],
        success: vec![RequestOp::Range(RangeRequest::key("a"))],
        failure: vec![],
    });
    let r = KvResponse::from_bytes(&s.query(&read_txn.to_bytes())).expect("decodes");
    assert_eq!(r.txn_succeeded(), Some(true));
    assert_eq!(s.snapshot(), before);
}

#[test]
fn malformed_requests_get_an_error_reply() {
    let mut s = KvStore::new(100);
    for bytes in [
        &[][..],
        &[0xff],
        &[2, 1, 0],
        &[5, 0, 0, 0, 0, 0, 0, 0, 0, 9],
    ] {
        let r = KvResponse::from_bytes(&s.execute(&ctx(0), bytes)).expect("decodes");
        assert!(
            matches!(r.error(), Some(KvError::Malformed(_))),
            "{bytes:?}"
        );
        let q = KvResponse::from_bytes(&s.query(bytes)).expect("decodes");
        assert!(matches!(q.error(), Some(KvError::Malformed(_))));
    }
}

#[test]
fn oversized_keys_values_and_txns_are_rejected_while_decoding() {
    let too_long_key = KvRequest::put(vec![b'k'; MAX_KEY_LEN + 1], "v").to_bytes();
    assert!(matches!(
        KvRequest::from_bytes(&too_long_key),
        Err(DecodeError::TooLong { what: "key", .. })
    ));
    let too_long_value = KvRequest::put("k", vec![0; MAX_VALUE_LEN + 1]).to_bytes();
    assert!(matches!(
        KvRequest::from_bytes(&too_long_value),
        Err(DecodeError::TooLong { what: "value", .. })
    ));
    let big_txn = KvRequest::Txn(TxnRequest {
        compare: vec![],
        success: vec![put_op("k", "v"); MAX_TXN_OPS + 1],
        failure: vec![],
    })
    .to_bytes();
    assert!(matches!(
        KvRequest::from_bytes(&big_txn),
        Err(DecodeError::TooLong { .. })
    ));
    // A forged count cannot make the decoder reserve memory the input does not back.
    let mut w = Writer::new();
    w.u8(1).u64(0).u32(u32::MAX);
    assert!(KvResponse::from_bytes(&w.finish()).is_err());
}

#[test]
fn every_response_carries_the_current_revision() {
    let mut s = KvStore::new(100);
    put(&mut s, "a", "1");
    put(&mut s, "b", "1");
    let id = lease_id(grant(&mut s, 0, 0, 100));
    for req in [
        KvRequest::get("a"),
        KvRequest::get(""),
        KvRequest::LeaseKeepAlive(LeaseKeepAliveRequest { id }),
        KvRequest::WatchPoll(watch_all(0)),
        KvRequest::Compact(CompactRequest { revision: 2 }),
    ] {
        assert_eq!(exec(&mut s, req).header().revision, 3);
    }
}

fn busy_store() -> KvStore {
    let mut s = KvStore::new(4);
    let id = lease_id(grant(&mut s, 0, 0, 100));
    put_lease(&mut s, "leased", "v", id);
    for i in 0..6 {
        put(&mut s, &format!("k{}", i % 3), &i.to_string());
    }
    delete(&mut s, "k1");
    s
}

#[test]
fn snapshot_restore_round_trip_preserves_state_history_and_leases() {
    let s = busy_store();
    let snap = s.snapshot();
    let mut r = KvStore::new(4);
    r.restore(&snap).expect("restores");
    assert_eq!(r, s);
    assert_eq!(r.snapshot(), snap);
    assert_eq!(r.state_digest(), s.state_digest());
    // The restored lease still owns its key.
    let mut r2 = r.clone();
    exec_at(&mut r2, 100_000, KvRequest::get("x"));
    assert!(r2.get(b"leased").is_none());
}

#[test]
fn restore_rejects_malformed_snapshots_and_keeps_the_old_state() {
    let s = busy_store();
    let snap = s.snapshot();
    let mut target = KvStore::new(4);
    put(&mut target, "mine", "v");
    let before = target.clone();
    let mut bad_format = snap.clone();
    bad_format[0] = 9;
    let mut trailing = snap.clone();
    trailing.push(0);
    for bad in [
        &snap[..snap.len() - 1],
        &trailing[..],
        &bad_format[..],
        &[][..],
    ] {
        assert!(target.restore(bad).is_err());
        assert_eq!(target, before);
    }
}

#[test]
fn restore_rejects_snapshots_whose_history_contradicts_the_kvs() {
    let s = busy_store();
    type Tamper = Box<dyn Fn(&mut KvStore)>;
    // A forged current value is not among them: the history does not repeat a put's new
    // record, so that snapshot is simply another state, which only its digest can refute.
    let tampered: Vec<Tamper> = vec![
        Box::new(|s| {
            if let Some(kv) = s.kvs.get_mut(&b"k2"[..]) {
                std::sync::Arc::make_mut(kv).version += 1;
            }
        }),
        Box::new(|s| {
            s.history.pop_last();
        }),
        Box::new(|s| {
            if let Some(kv) = s.kvs.get_mut(&b"k0"[..]) {
                std::sync::Arc::make_mut(kv).lease = 12345;
            }
        }),
        Box::new(|s| s.compact_revision = s.revision + 1),
        Box::new(|s| {
            s.kvs.insert(
                b"ghost".to_vec(),
                std::sync::Arc::new(KeyValue {
                    key: b"ghost".to_vec(),
                    create_revision: s.revision,
                    mod_revision: s.revision,
                    version: 1,
                    value: vec![],
                    lease: 0,
                }),
            );
        }),
    ];
    for (i, tamper) in tampered.iter().enumerate() {
        let mut t = s.clone();
        tamper(&mut t);
        let mut r = KvStore::new(4);
        assert!(r.restore(&t.snapshot()).is_err(), "tampering #{i} accepted");
    }
}

#[test]
fn a_snapshot_holds_each_value_once_and_streams_the_same_bytes() {
    let mut s = KvStore::new(1000);
    let value = "v".repeat(10_000);
    for i in 0..20 {
        put(&mut s, &format!("k{i}"), &value);
    }
    // Overwrites keep the replaced values in the history: those count once more each.
    for i in 0..5 {
        put(&mut s, &format!("k{i}"), &value);
    }
    let snap = s.snapshot();
    let values = 25 * value.len();
    assert!(
        snap.len() >= values && snap.len() < values + values / 20,
        "{} bytes for {values} bytes of values",
        snap.len()
    );
    let mut pieces = Vec::new();
    s.write_snapshot(&mut |p| pieces.extend_from_slice(p));
    assert_eq!(pieces, snap);
    assert_eq!(s.state_digest(), crate::crypto::Digest::of(&snap));
}
