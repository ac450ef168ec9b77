use super::*;
use kmmr_protocol::service::kv::{
    DeleteRangeRequest, DeleteRangeResponse, KeyValue, KvStore, ResponseHeader, TxnResponse,
};
use kmmr_protocol::service::ExecContext;
use rand::{Rng, SeedableRng};

fn found(value: &str, version: u64) -> KvResponse {
    KvResponse::Range(RangeResponse {
        header: ResponseHeader::default(),
        kvs: vec![KeyValue {
            key: b"k".to_vec(),
            value: value.into(),
            version,
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        }],
        more: false,
        count: 1,
    })
}

fn not_found() -> KvResponse {
    KvResponse::Range(RangeResponse::default())
}

fn put_ok() -> KvResponse {
    KvResponse::Put(PutResponse::default())
}

fn deleted(n: u64) -> KvResponse {
    KvResponse::DeleteRange(DeleteRangeResponse {
        deleted: n,
        ..Default::default()
    })
}

fn txn(succeeded: bool, responses: Vec<ResponseOp>) -> KvResponse {
    KvResponse::Txn(TxnResponse {
        header: ResponseHeader::default(),
        succeeded,
        responses,
    })
}

fn op(client: u64, invoke: u64, complete: u64, request: KvRequest, r: KvResponse) -> Operation {
    Operation {
        client,
        invoke,
        complete: Some(complete),
        request,
        response: Some(r),
    }
}

fn pending(client: u64, invoke: u64, request: KvRequest) -> Operation {
    Operation {
        client,
        invoke,
        complete: None,
        request,
        response: None,
    }
}

fn violation(r: CheckResult) -> Violation {
    match r {
        CheckResult::NotLinearizable(v) => v,
        other => panic!("expected a violation, got {other:?}"),
    }
}

#[test]
fn sequential_history_is_linearizable() {
    let h = vec![
        op(1, 0, 1, KvRequest::put("k", "a"), put_ok()),
        op(1, 2, 3, KvRequest::get("k"), found("a", 1)),
        op(2, 4, 5, KvRequest::put("k", "b"), put_ok()),
        op(2, 6, 7, KvRequest::get("k"), found("b", 2)),
        op(1, 8, 9, KvRequest::delete("k"), deleted(1)),
        op(1, 10, 11, KvRequest::get("k"), not_found()),
        op(1, 12, 13, KvRequest::delete("k"), deleted(0)),
    ];
    assert_eq!(check(&h), CheckResult::Linearizable);
}

#[test]
fn a_read_concurrent_with_a_write_may_see_either_value() {
    for seen in [found("a", 1), found("b", 2)] {
        let h = vec![
            op(1, 0, 1, KvRequest::put("k", "a"), put_ok()),
            op(1, 2, 10, KvRequest::put("k", "b"), put_ok()),
            op(2, 3, 5, KvRequest::get("k"), seen),
        ];
        assert!(check(&h).is_linearizable());
    }
}

#[test]
fn reads_that_go_back_in_time_are_not_linearizable_even_when_concurrent() {
    // Both reads overlap the write, but once one sees "b" a later one cannot see "a".
    let h = vec![
        op(1, 0, 1, KvRequest::put("k", "a"), put_ok()),
        op(1, 2, 20, KvRequest::put("k", "b"), put_ok()),
        op(2, 3, 5, KvRequest::get("k"), found("b", 2)),
        op(3, 6, 8, KvRequest::get("k"), found("a", 1)),
    ];
    assert!(!check(&h).is_linearizable());
}

#[test]
fn stale_read_after_a_completed_write_is_a_violation() {
    let h = vec![
        op(1, 0, 10, KvRequest::put("k", "1"), put_ok()),
        op(1, 20, 30, KvRequest::put("k", "2"), put_ok()),
        op(2, 40, 50, KvRequest::get("k"), found("1", 1)),
    ];
    let v = violation(check(&h));
    assert_eq!(v.key, b"k");
    assert!(v.operations.contains(&2), "{v:?}");
    assert!(v.explanation.contains("#2 client 2"), "{}", v.explanation);
    assert!(v.explanation.contains("read \\\"1\\\"") || v.explanation.contains("read \"1\""));
}

#[test]
fn lost_write_is_a_violation() {
    let h = vec![
        op(1, 0, 10, KvRequest::put("k", "1"), put_ok()),
        op(2, 20, 30, KvRequest::get("k"), not_found()),
    ];
    assert!(!check(&h).is_linearizable());
}

#[test]
fn two_creates_cannot_both_win() {
    let create = |v: &str| KvRequest::cas("k", None, v);
    let won = txn(true, vec![ResponseOp::Put(PutResponse::default())]);
    let h = vec![
        op(1, 0, 10, create("a"), won.clone()),
        op(2, 0, 10, create("b"), won.clone()),
    ];
    let v = violation(check(&h));
    assert!(
        v.explanation.contains("comparisons held"),
        "{}",
        v.explanation
    );
    let lost = txn(
        false,
        vec![ResponseOp::Range(match found("a", 1) {
            KvResponse::Range(r) => r,
            _ => unreachable!(),
        })],
    );
    let h = vec![
        op(1, 0, 10, create("a"), won),
        op(2, 0, 10, create("b"), lost),
    ];
    assert!(check(&h).is_linearizable());
}

#[test]
fn wrong_delete_count_is_a_violation() {
    let h = vec![
        op(1, 0, 1, KvRequest::put("k", "1"), put_ok()),
        op(1, 2, 3, KvRequest::delete("k"), deleted(0)),
    ];
    assert!(!check(&h).is_linearizable());
}

#[test]
fn version_must_follow_the_writes() {
    let h = vec![
        op(1, 0, 1, KvRequest::put("k", "1"), put_ok()),
        op(1, 2, 3, KvRequest::put("k", "1"), put_ok()),
        op(1, 4, 5, KvRequest::get("k"), found("1", 1)),
    ];
    assert!(!check(&h).is_linearizable());
}

#[test]
fn a_pending_write_may_take_effect_late_or_never() {
    let took_effect = vec![
        pending(1, 0, KvRequest::put("k", "1")),
        op(2, 10, 20, KvRequest::get("k"), not_found()),
        op(2, 30, 40, KvRequest::get("k"), found("1", 1)),
    ];
    assert!(check(&took_effect).is_linearizable());
    let never = vec![
        pending(1, 0, KvRequest::put("k", "1")),
        op(2, 10, 20, KvRequest::get("k"), not_found()),
    ];
    assert!(check(&never).is_linearizable());
}

#[test]
fn a_pending_write_cannot_take_effect_before_it_was_invoked_or_be_undone() {
    let before_invoke = vec![
        op(2, 0, 5, KvRequest::get("k"), found("1", 1)),
        pending(1, 10, KvRequest::put("k", "1")),
    ];
    assert!(!check(&before_invoke).is_linearizable());
    let undone = vec![
        pending(1, 0, KvRequest::put("k", "1")),
        op(2, 10, 20, KvRequest::get("k"), found("1", 1)),
        op(2, 30, 40, KvRequest::get("k"), not_found()),
    ];
    assert!(!check(&undone).is_linearizable());
}

#[test]
fn error_replies_and_pending_reads_are_ignored() {
    let h = vec![
        op(
            1,
            0,
            1,
            KvRequest::put("k", "1"),
            KvResponse::Error(kmmr_protocol::service::kv::ErrorResponse {
                header: ResponseHeader::default(),
                error: kmmr_protocol::service::kv::KvError::NotReadOnly,
            }),
        ),
        pending(2, 0, KvRequest::get("k")),
        op(1, 2, 3, KvRequest::get("k"), not_found()),
    ];
    assert!(check(&h).is_linearizable());
}

#[test]
fn keys_are_checked_independently_and_the_violating_key_is_named() {
    let on = |k: &str, v: &str| KvRequest::put(k, v);
    let h = vec![
        op(1, 0, 1, on("x", "1"), put_ok()),
        op(1, 0, 1, on("k", "1"), put_ok()),
        op(2, 5, 6, KvRequest::get("x"), not_found()),
    ];
    let v = violation(check(&h));
    assert_eq!(v.key, b"x");
    assert_eq!(v.operations, vec![0, 2]);
}

#[test]
fn multi_key_and_leased_operations_are_reported_unsupported() {
    let prefix = KvRequest::Range(kmmr_protocol::service::kv::RangeRequest::prefix("k"));
    let h = vec![op(1, 0, 1, prefix, not_found())];
    assert!(matches!(
        check(&h),
        CheckResult::Unsupported { operation: 0, .. }
    ));
    let range_delete = KvRequest::DeleteRange(DeleteRangeRequest {
        key: "a".into(),
        range_end: "b".into(),
        prev_kv: false,
    });
    assert!(matches!(
        check(&[op(1, 0, 1, range_delete, deleted(0))]),
        CheckResult::Unsupported { .. }
    ));
}

#[test]
fn the_step_budget_turns_a_hard_search_into_unknown() {
    // Many concurrent writes and a read of a value none of them wrote: exhaustive search.
    let mut h: Vec<Operation> = (0..14)
        .map(|i| op(i, 0, 100, KvRequest::put("k", i.to_string()), put_ok()))
        .collect();
    h.push(op(99, 0, 100, KvRequest::get("k"), found("none", 1)));
    assert!(matches!(
        check_with_budget(&h, 1_000),
        CheckResult::Unknown { .. }
    ));
}

/// Runs random single-key ops through the real store, one at a time, and gives each an
/// interval around its execution: the checker must accept every such history.
#[test]
fn histories_produced_by_the_store_are_linearizable() {
    for seed in 0..200u64 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut store = KvStore::new(100);
        let mut h = Vec::new();
        for t in 0..30u64 {
            let key = if rng.gen_bool(0.5) { "k" } else { "j" };
            let v = rng.gen_range(0..3u8).to_string();
            let req = match rng.gen_range(0..5) {
                0 => KvRequest::put(key, v),
                1 => KvRequest::get(key),
                2 => KvRequest::delete(key),
                3 => KvRequest::cas(key, Some(v.as_bytes()), "x"),
                _ => KvRequest::cas(key, None, v),
            };
            let resp = store.apply(
                &ExecContext {
                    cid: t,
                    timestamp_ms: 0,
                    index: 0,
                },
                &req,
            );
            // Executed at time 10t; the interval straddles it by a random margin.
            let invoke = (10 * t).saturating_sub(rng.gen_range(0..40));
            let complete = 10 * t + rng.gen_range(0..40);
            let mut o = op(t % 4, invoke, complete, req, resp);
            if rng.gen_bool(0.1) {
                o.complete = None;
                o.response = None;
            }
            h.push(o);
        }
        assert_eq!(check(&h), CheckResult::Linearizable, "seed {seed}");
    }
}

/// The same kind of history, run sequentially, with one read's value forged: the checker
/// must catch every forgery.
#[test]
fn a_forged_read_in_a_store_history_is_caught() {
    for seed in 0..100u64 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut store = KvStore::new(100);
        let mut h = Vec::new();
        for t in 0..20u64 {
            let req = match rng.gen_range(0..3) {
                0 => KvRequest::put("k", rng.gen_range(0..3u8).to_string()),
                1 => KvRequest::delete("k"),
                _ => KvRequest::get("k"),
            };
            let ctx = ExecContext {
                cid: t,
                timestamp_ms: 0,
                index: 0,
            };
            let resp = store.apply(&ctx, &req);
            h.push(op(1, 10 * t, 10 * t + 5, req, resp));
        }
        h.push(op(2, 1_000, 1_001, KvRequest::get("k"), found("forged", 1)));
        assert!(!check(&h).is_linearizable(), "seed {seed}");
    }
}
