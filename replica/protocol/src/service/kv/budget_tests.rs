//! Replies stay within the wire's result limit however much a request matches: ranges page,
//! previous records are bounded, watch polls stop at a revision boundary, and what still cannot
//! fit is refused with an error rather than sent (or cached) oversized.

use super::*;
use crate::service::{ExecContext, Service};
use crate::wire::codec::{Decode, Encode};
use crate::wire::limits;

fn ctx() -> ExecContext {
    ExecContext {
        cid: 1,
        timestamp_ms: 0,
        index: 0,
    }
}

/// Executes through the byte interface, checking every reply against the wire's limit.
fn exec(s: &mut KvStore, req: KvRequest) -> KvResponse {
    let reply = s.execute(&ctx(), &req.to_bytes());
    assert!(
        reply.len() <= limits::MAX_RESULT,
        "a reply of {} bytes",
        reply.len()
    );
    KvResponse::from_bytes(&reply).expect("store replies decode")
}

fn query(s: &KvStore, req: KvRequest) -> KvResponse {
    let reply = s.query(&req.to_bytes());
    assert!(reply.len() <= limits::MAX_RESULT);
    KvResponse::from_bytes(&reply).expect("store replies decode")
}

const VALUE: usize = 512 * 1024;

/// `n` keys `k000`.. of half a MiB each: 20 of them are 10 MiB, over the wire's 8.
fn filled(n: usize) -> KvStore {
    let mut s = KvStore::default();
    for i in 0..n {
        let put = KvRequest::put(format!("k{i:03}"), vec![i as u8; VALUE]);
        assert!(matches!(exec(&mut s, put), KvResponse::Put(_)));
    }
    s
}

fn whole(key: &str) -> (Vec<u8>, Vec<u8>) {
    let mut end = key.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    (key.as_bytes().to_vec(), end)
}

#[test]
fn a_range_over_the_budget_answers_more_and_pages_from_its_last_key_at_its_revision() {
    let mut s = filled(20);
    let (key, range_end) = whole("k");
    let first = match exec(
        &mut s,
        KvRequest::Range(RangeRequest {
            key: key.clone(),
            range_end: range_end.clone(),
            ..Default::default()
        }),
    ) {
        KvResponse::Range(r) => r,
        other => panic!("{other:?}"),
    };
    assert!(first.more, "20 half-MiB values do not fit in one reply");
    assert_eq!(first.count, 20, "the count is of every match");
    assert!(!first.kvs.is_empty() && first.kvs.len() < 20);
    let revision = first.header.revision;
    // A write in between: pages read at the first reply's revision do not see it.
    exec(&mut s, KvRequest::put("k005", "changed"));
    let mut all = first.kvs.clone();
    let mut more = first.more;
    while more {
        let mut from = all.last().unwrap().key.clone();
        from.push(0);
        match query(
            &s,
            KvRequest::Range(RangeRequest {
                key: from,
                range_end: range_end.clone(),
                revision,
                ..Default::default()
            }),
        ) {
            KvResponse::Range(r) => {
                assert!(!r.kvs.is_empty(), "every page moves on");
                all.extend(r.kvs);
                more = r.more;
            }
            other => panic!("{other:?}"),
        }
    }
    let keys: Vec<_> = all.iter().map(|kv| kv.key.clone()).collect();
    let want: Vec<_> = (0..20).map(|i| format!("k{i:03}").into_bytes()).collect();
    assert_eq!(keys, want);
    assert!(all.iter().all(|kv| kv.value.len() == VALUE));
}

#[test]
fn a_limit_under_the_budget_still_decides_more() {
    let mut s = filled(4);
    let (key, range_end) = whole("k");
    match exec(
        &mut s,
        KvRequest::Range(RangeRequest {
            key,
            range_end,
            limit: 2,
            ..Default::default()
        }),
    ) {
        KvResponse::Range(r) => {
            assert_eq!(r.kvs.len(), 2);
            assert!(r.more);
            assert_eq!(r.count, 4);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_range_delete_with_previous_records_deletes_everything_and_answers_what_fits() {
    let mut s = filled(20);
    let (key, range_end) = whole("k");
    match exec(
        &mut s,
        KvRequest::DeleteRange(DeleteRangeRequest {
            key: key.clone(),
            range_end: range_end.clone(),
            prev_kv: true,
        }),
    ) {
        KvResponse::DeleteRange(d) => {
            assert_eq!(d.deleted, 20);
            assert!(!d.prev_kvs.is_empty() && d.prev_kvs.len() < 20);
            assert_eq!(d.prev_kvs[0].key, b"k000", "a prefix, in key order");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.revision(), 22, "one revision for the delete");
    assert!(s.get(b"k019").is_none());
}

#[test]
fn a_transaction_shares_one_budget_between_its_reads() {
    let mut s = filled(12);
    let (key, range_end) = whole("k");
    let read = RequestOp::Range(RangeRequest {
        key,
        range_end,
        ..Default::default()
    });
    let t = KvRequest::Txn(TxnRequest {
        success: vec![read.clone(), read],
        ..Default::default()
    });
    match exec(&mut s, t) {
        KvResponse::Txn(t) => {
            let ranges: Vec<_> = t
                .responses
                .iter()
                .map(|r| match r {
                    ResponseOp::Range(r) => r,
                    other => panic!("{other:?}"),
                })
                .collect();
            assert!(ranges.iter().all(|r| r.more && r.count == 12));
            assert!(ranges[0].kvs.len() < 12);
            assert!(ranges[1].kvs.is_empty(), "the first read spent the budget");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn watch_polls_stop_at_a_revision_boundary_within_the_budget_and_resume_without_gaps() {
    let s = filled(30);
    let mut after = 1;
    let mut seen = Vec::new();
    let mut polls = 0;
    while after < s.revision() {
        let req = KvRequest::WatchPoll(WatchPollRequest {
            key: vec![0],
            range_end: vec![0],
            after_revision: after,
            limit: 1000,
            prev_kv: true,
        });
        match query(&s, req) {
            KvResponse::WatchPoll(w) => {
                assert!(w.resume_after > after, "every poll moves on");
                seen.extend(w.events.iter().map(|e| e.kv.mod_revision));
                after = w.resume_after;
            }
            other => panic!("{other:?}"),
        }
        polls += 1;
    }
    assert!(polls > 3, "15 MiB of events took {polls} polls");
    assert_eq!(seen, (2..=31).collect::<Vec<u64>>());
}

#[test]
fn one_revision_over_the_wire_limit_is_refused_not_sent() {
    let mut s = filled(20);
    let (key, range_end) = whole("k");
    exec(
        &mut s,
        KvRequest::DeleteRange(DeleteRangeRequest {
            key,
            range_end,
            prev_kv: false,
        }),
    );
    // The delete's 20 events carry their 10 MiB of previous records: one revision, unsplittable.
    let req = KvRequest::WatchPoll(WatchPollRequest {
        key: vec![0],
        range_end: vec![0],
        after_revision: 21,
        limit: 1000,
        prev_kv: true,
    });
    match query(&s, req.clone()) {
        KvResponse::Error(e) => assert!(
            matches!(e.error, KvError::TooLarge { limit, .. } if limit == limits::MAX_RESULT as u64),
            "{e:?}"
        ),
        other => panic!("{other:?}"),
    }
    match exec(&mut s, req) {
        KvResponse::Error(e) => assert!(matches!(e.error, KvError::TooLarge { .. })),
        other => panic!("{other:?}"),
    }
}
