//! The watch events of the gateway's own writes, read from their agreed replies.
//!
//! A watch learns of a write from the watch tail, which asks the cluster for the events after
//! the last revision it delivered. For a write through this gateway that is one more round trip
//! after the write's own, and under load the replicas, reading outside the order while writes
//! execute, often answer from states a write apart, so the read must be ordered to settle. Yet
//! the write's reply already holds everything its events are made of once the previous records
//! come back with it: every put's new record follows from its request and the record it replaced
//! (create revision and version carry on, the mod revision is the write's), and a delete's event
//! is the deleted record. The reply is one a quorum of replicas agreed on, so these events are
//! what correct replicas decided, exactly as a poll would return them (a test below checks this
//! against the store itself).
//!
//! So the gateway asks for previous records on every put and single-key delete it sends
//! (`ask_prev_kvs`), hides the ones its caller did not ask for (`Asked::restore`), and hands the
//! events (`events_of`) to the tail, which delivers them when they are the very next revision.
//! A delete of a key range is not rewritten: its previous records could be many, so its
//! revision is left to the poll.

use kmmr_protocol::service::kv::{
    self as kv, Event, EventKind, KeyValue, KvRequest, KvResponse, RequestOp, ResponseOp,
};

/// Which of a request's operations asked for previous records themselves, in operation order
/// (a transaction's success branch, then its failure branch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked(Vec<bool>);

/// Turns on previous records for every put and single-key delete of a write, so that its reply
/// carries what its events need. `None` (and the request unchanged) when the request is not one
/// whose events can be rebuilt: a delete of a key range, or not a write.
pub fn ask_prev_kvs(req: &mut KvRequest) -> Option<Asked> {
    let ask = |op: &mut RequestOp| match op {
        RequestOp::Put(p) => std::mem::replace(&mut p.prev_kv, true),
        RequestOp::DeleteRange(d) => std::mem::replace(&mut d.prev_kv, true),
        RequestOp::Range(_) => false,
    };
    match req {
        KvRequest::Put(p) => Some(Asked(vec![std::mem::replace(&mut p.prev_kv, true)])),
        KvRequest::DeleteRange(d) if d.range_end.is_empty() => {
            Some(Asked(vec![std::mem::replace(&mut d.prev_kv, true)]))
        }
        KvRequest::Txn(t) => {
            let ranged =
                |op: &RequestOp| matches!(op, RequestOp::DeleteRange(d) if !d.range_end.is_empty());
            if t.success.iter().chain(&t.failure).any(ranged) {
                return None;
            }
            Some(Asked(
                t.success
                    .iter_mut()
                    .chain(t.failure.iter_mut())
                    .map(ask)
                    .collect(),
            ))
        }
        _ => None,
    }
}

impl Asked {
    /// Drops from a reply the previous records its caller did not ask for.
    pub fn restore(&self, req: &KvRequest, resp: &mut KvResponse) {
        match resp {
            KvResponse::Put(p) if self.0.first() == Some(&false) => p.prev_kv = None,
            KvResponse::DeleteRange(d) if self.0.first() == Some(&false) => d.prev_kvs.clear(),
            KvResponse::Txn(r) => {
                let KvRequest::Txn(t) = req else { return };
                let offset = if r.succeeded { 0 } else { t.success.len() };
                for (i, op) in r.responses.iter_mut().enumerate() {
                    if self.0.get(offset + i) != Some(&false) {
                        continue;
                    }
                    match op {
                        ResponseOp::Put(p) => p.prev_kv = None,
                        ResponseOp::DeleteRange(d) => d.prev_kvs.clear(),
                        ResponseOp::Range(_) => {}
                    }
                }
            }
            _ => {}
        }
    }
}

/// The revision a write made and its events, from the request as sent (with previous records
/// asked for) and its agreed reply; `None` when it wrote nothing or the reply does not fit the
/// request (the poll then delivers whatever happened).
pub fn events_of(req: &KvRequest, resp: &KvResponse) -> Option<(u64, Vec<Event>)> {
    let mut events = Vec::new();
    let revision = resp.header().revision;
    match (req, resp) {
        (KvRequest::Put(p), KvResponse::Put(r)) => put_event(p, r, revision, &mut events)?,
        (KvRequest::DeleteRange(d), KvResponse::DeleteRange(r)) => {
            delete_events(d, r, revision, &mut events)?
        }
        (KvRequest::Txn(t), KvResponse::Txn(r)) => {
            let branch = if r.succeeded { &t.success } else { &t.failure };
            if branch.len() != r.responses.len() {
                return None;
            }
            for (op, answer) in branch.iter().zip(&r.responses) {
                match (op, answer) {
                    (RequestOp::Range(_), ResponseOp::Range(_)) => {}
                    (RequestOp::Put(p), ResponseOp::Put(r)) => {
                        put_event(p, r, revision, &mut events)?
                    }
                    (RequestOp::DeleteRange(d), ResponseOp::DeleteRange(r)) => {
                        delete_events(d, r, revision, &mut events)?
                    }
                    _ => return None,
                }
            }
        }
        _ => return None,
    }
    (!events.is_empty()).then_some((revision, events))
}

/// A put's new record: its request's key, value and lease; the create revision and the version
/// carry on from the record it replaced.
fn put_event(
    p: &kv::PutRequest,
    r: &kv::PutResponse,
    revision: u64,
    events: &mut Vec<Event>,
) -> Option<()> {
    if !p.prev_kv {
        return None;
    }
    let prev = r.prev_kv.as_ref();
    events.push(Event {
        kind: EventKind::Put,
        kv: KeyValue {
            key: p.key.clone(),
            create_revision: prev.map_or(revision, |k| k.create_revision),
            mod_revision: revision,
            version: prev.map_or(1, |k| k.version.saturating_add(1)),
            value: p.value.clone(),
            lease: p.lease,
        },
        prev_kv: prev.cloned(),
    });
    Some(())
}

/// A delete's events: one per deleted record, in the order the reply lists them (key order).
fn delete_events(
    d: &kv::DeleteRangeRequest,
    r: &kv::DeleteRangeResponse,
    revision: u64,
    events: &mut Vec<Event>,
) -> Option<()> {
    if !d.prev_kv || !d.range_end.is_empty() || r.prev_kvs.len() as u64 != r.deleted {
        return None;
    }
    for prev in &r.prev_kvs {
        events.push(Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: prev.key.clone(),
                mod_revision: revision,
                ..Default::default()
            },
            prev_kv: Some(prev.clone()),
        });
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmmr_protocol::service::kv::{
        Compare, CompareResult, CompareTarget, DeleteRangeRequest, KvStore, LeaseGrantRequest,
        PutRequest, RangeRequest, TxnRequest,
    };
    use kmmr_protocol::service::ExecContext;

    fn put(key: &str, value: &str, prev_kv: bool) -> RequestOp {
        RequestOp::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            lease: 0,
            prev_kv,
        })
    }

    fn delete(key: &str, prev_kv: bool) -> RequestOp {
        RequestOp::DeleteRange(DeleteRangeRequest {
            key: key.into(),
            range_end: Vec::new(),
            prev_kv,
        })
    }

    fn get(key: &str) -> RequestOp {
        RequestOp::Range(RangeRequest {
            key: key.into(),
            ..Default::default()
        })
    }

    fn created(key: &str) -> Compare {
        Compare::new(key, CompareResult::Equal, CompareTarget::ModRevision(0))
    }

    /// Applies `req` as the gateway sends it and checks that the events rebuilt from the reply
    /// are exactly what a poll of the store returns for that revision, and that the reply the
    /// caller sees is the one it would have had without the rewrite.
    fn check(store: &mut KvStore, mut twin: KvStore, original: KvRequest) -> Option<u64> {
        let ctx = ExecContext {
            cid: 1,
            timestamp_ms: 1,
            index: 0,
        };
        let mut sent = original.clone();
        let asked = ask_prev_kvs(&mut sent);
        let mut resp = store.apply(&ctx, &sent);
        let expected = twin.apply(&ctx, &original);
        let rebuilt = asked.as_ref().and_then(|_| events_of(&sent, &resp));
        if let Some(a) = &asked {
            a.restore(&sent, &mut resp);
        }
        assert_eq!(resp, expected, "the caller's reply is unchanged");
        let (revision, events) = rebuilt?;
        let polled = store
            .events_since(revision - 1, &[0], &[0], 0)
            .expect("a poll");
        assert_eq!(polled.resume_after, revision, "one revision");
        assert_eq!(events, polled.events, "rebuilt events are the polled ones");
        Some(revision)
    }

    fn apply(store: &mut KvStore, req: &KvRequest) {
        let ctx = ExecContext {
            cid: 1,
            timestamp_ms: 1,
            index: 0,
        };
        store.apply(&ctx, req);
    }

    #[test]
    fn the_events_of_every_kind_of_write_are_the_ones_a_poll_returns() {
        let mut store = KvStore::new(1000);
        apply(
            &mut store,
            &KvRequest::LeaseGrant(LeaseGrantRequest { id: 7, ttl: 60 }),
        );
        let requests = vec![
            // A create as kube-apiserver sends it, then the same again (fails, writes nothing).
            KvRequest::Txn(TxnRequest {
                compare: vec![created("/registry/a")],
                success: vec![put("/registry/a", "1", false)],
                failure: vec![get("/registry/a")],
            }),
            KvRequest::Txn(TxnRequest {
                compare: vec![created("/registry/a")],
                success: vec![put("/registry/a", "1", false)],
                failure: vec![get("/registry/a")],
            }),
            // An update, a put with the caller asking for the previous record, one with a lease.
            KvRequest::Txn(TxnRequest {
                compare: vec![],
                success: vec![put("/registry/a", "2", false), get("/registry/a")],
                failure: vec![],
            }),
            KvRequest::Put(PutRequest {
                key: b"/registry/b".to_vec(),
                value: b"x".to_vec(),
                lease: 7,
                prev_kv: true,
            }),
            KvRequest::Put(PutRequest {
                key: b"/registry/b".to_vec(),
                value: b"y".to_vec(),
                lease: 0,
                prev_kv: false,
            }),
            // Two puts of one key and a new key in one transaction.
            KvRequest::Txn(TxnRequest {
                compare: vec![],
                success: vec![
                    put("/registry/c", "1", false),
                    put("/registry/c", "2", true),
                    put("/registry/d", "1", false),
                ],
                failure: vec![],
            }),
            // The failure branch writes.
            KvRequest::Txn(TxnRequest {
                compare: vec![created("/registry/c")],
                success: vec![],
                failure: vec![put("/registry/e", "1", false), delete("/registry/d", false)],
            }),
            // Deletes: of a key that exists, of one that does not (writes nothing), in a txn.
            KvRequest::DeleteRange(DeleteRangeRequest {
                key: b"/registry/a".to_vec(),
                range_end: Vec::new(),
                prev_kv: false,
            }),
            KvRequest::DeleteRange(DeleteRangeRequest {
                key: b"/registry/none".to_vec(),
                range_end: Vec::new(),
                prev_kv: false,
            }),
            KvRequest::Txn(TxnRequest {
                compare: vec![],
                success: vec![delete("/registry/b", true), put("/registry/b", "z", false)],
                failure: vec![],
            }),
        ];
        let mut rebuilt = Vec::new();
        for req in requests {
            let twin = store.clone();
            rebuilt.push(check(&mut store, twin, req).is_some());
        }
        assert_eq!(
            rebuilt,
            [true, false, true, true, true, true, true, true, false, true],
            "which writes had events"
        );
    }

    #[test]
    fn a_delete_of_a_key_range_is_left_to_the_poll_and_sent_as_it_was() {
        let mut req = KvRequest::Txn(TxnRequest {
            compare: vec![],
            success: vec![
                put("a", "1", false),
                RequestOp::DeleteRange(DeleteRangeRequest {
                    key: b"b".to_vec(),
                    range_end: b"c".to_vec(),
                    prev_kv: false,
                }),
            ],
            failure: vec![],
        });
        let before = req.clone();
        assert_eq!(ask_prev_kvs(&mut req), None);
        assert_eq!(req, before);
        assert_eq!(
            ask_prev_kvs(&mut KvRequest::Range(Default::default())),
            None
        );
    }

    #[test]
    fn a_reply_that_does_not_fit_its_request_gives_no_events() {
        let mut req = KvRequest::Txn(TxnRequest {
            compare: vec![],
            success: vec![put("a", "1", false), put("b", "1", false)],
            failure: vec![],
        });
        ask_prev_kvs(&mut req);
        let short = KvResponse::Txn(kv::TxnResponse {
            header: kv::ResponseHeader { revision: 5 },
            succeeded: true,
            responses: vec![ResponseOp::Put(kv::PutResponse::default())],
        });
        assert_eq!(events_of(&req, &short), None);
        let wrong_kind = KvResponse::Put(kv::PutResponse::default());
        assert_eq!(events_of(&req, &wrong_kind), None);
    }
}
