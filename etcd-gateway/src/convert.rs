//! Translation between etcd's wire messages and the KV service's requests and responses, with
//! the checks etcd makes in its gRPC layer before it proposes anything (empty keys, too many
//! operations, duplicate keys in a transaction, sort options): they need no state, so the gateway
//! refuses such requests itself, with etcd's codes and texts, without a round through consensus.

use std::collections::BTreeSet;

use tonic::Status;

use crate::errors;
use crate::{mvccpb, pb};
use kmmr_protocol::service::kv;

/// A range's sort, as etcd's `RangeRequest` asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortOrder {
    None,
    Ascend,
    Descend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortTarget {
    Key,
    Version,
    Create,
    Mod,
    Value,
}

/// What etcd's range does beyond the store's range: sorting and revision filters, which it
/// applies to the whole matching set before the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeShape {
    pub order: SortOrder,
    pub target: SortTarget,
    pub limit: u64,
    pub min_mod: u64,
    pub max_mod: u64,
    pub min_create: u64,
    pub max_create: u64,
}

impl RangeShape {
    /// Whether the store's own answer (key order, its limit) is already etcd's answer.
    pub fn is_plain(&self) -> bool {
        let key_ascending = self.target == SortTarget::Key
            && matches!(self.order, SortOrder::None | SortOrder::Ascend);
        key_ascending
            && self.min_mod == 0
            && self.max_mod == 0
            && self.min_create == 0
            && self.max_create == 0
    }

    /// Filters, sorts and truncates a complete (unlimited) answer as etcd does.
    pub fn finish(&self, mut resp: kv::RangeResponse) -> kv::RangeResponse {
        let keep = |kv: &kv::KeyValue| {
            (self.min_mod == 0 || kv.mod_revision >= self.min_mod)
                && (self.max_mod == 0 || kv.mod_revision <= self.max_mod)
                && (self.min_create == 0 || kv.create_revision >= self.min_create)
                && (self.max_create == 0 || kv.create_revision <= self.max_create)
        };
        resp.kvs.retain(keep);
        // etcd sorts ascending when a non-key target is asked for with no order.
        let order = match (self.order, self.target) {
            (SortOrder::None, SortTarget::Key) => SortOrder::None,
            (SortOrder::None, _) => SortOrder::Ascend,
            (o, _) => o,
        };
        if order != SortOrder::None {
            // A stable sort on records already in key order breaks ties by key, as etcd's does.
            match self.target {
                SortTarget::Key => resp.kvs.sort_by(|a, b| a.key.cmp(&b.key)),
                SortTarget::Version => resp.kvs.sort_by_key(|kv| kv.version),
                SortTarget::Create => resp.kvs.sort_by_key(|kv| kv.create_revision),
                SortTarget::Mod => resp.kvs.sort_by_key(|kv| kv.mod_revision),
                SortTarget::Value => resp.kvs.sort_by(|a, b| a.value.cmp(&b.value)),
            }
            if order == SortOrder::Descend {
                resp.kvs.reverse();
            }
        }
        if self.limit > 0 && resp.kvs.len() as u64 > self.limit {
            resp.kvs.truncate(self.limit as usize);
            resp.more = true;
        }
        resp
    }
}

fn nonneg(v: i64, what: &str) -> Result<u64, Status> {
    u64::try_from(v)
        .map_err(|_| Status::invalid_argument(format!("etcdserver: {what} is negative")))
}

fn key_given(key: &[u8]) -> Result<(), Status> {
    if key.is_empty() {
        Err(errors::empty_key())
    } else if key.len() > kv::MAX_KEY_LEN {
        Err(errors::too_large())
    } else {
        Ok(())
    }
}

/// The store's range request for an etcd range, and what the gateway must still do to its
/// answer. A shaped range reads every matching key (limit 0) and is finished here.
pub fn range(r: &pb::RangeRequest) -> Result<(kv::RangeRequest, RangeShape), Status> {
    key_given(&r.key)?;
    let order = match pb::range_request::SortOrder::try_from(r.sort_order) {
        Ok(pb::range_request::SortOrder::None) => SortOrder::None,
        Ok(pb::range_request::SortOrder::Ascend) => SortOrder::Ascend,
        Ok(pb::range_request::SortOrder::Descend) => SortOrder::Descend,
        Err(_) => return Err(errors::invalid_sort()),
    };
    let target = match pb::range_request::SortTarget::try_from(r.sort_target) {
        Ok(pb::range_request::SortTarget::Key) => SortTarget::Key,
        Ok(pb::range_request::SortTarget::Version) => SortTarget::Version,
        Ok(pb::range_request::SortTarget::Create) => SortTarget::Create,
        Ok(pb::range_request::SortTarget::Mod) => SortTarget::Mod,
        Ok(pb::range_request::SortTarget::Value) => SortTarget::Value,
        Err(_) => return Err(errors::invalid_sort()),
    };
    let shape = RangeShape {
        order,
        target,
        limit: nonneg(r.limit, "limit")?,
        min_mod: nonneg(r.min_mod_revision, "min_mod_revision")?,
        max_mod: nonneg(r.max_mod_revision, "max_mod_revision")?,
        min_create: nonneg(r.min_create_revision, "min_create_revision")?,
        max_create: nonneg(r.max_create_revision, "max_create_revision")?,
    };
    let req = kv::RangeRequest {
        key: r.key.clone(),
        range_end: r.range_end.clone(),
        revision: nonneg(r.revision, "revision")?,
        limit: if shape.is_plain() { shape.limit } else { 0 },
        keys_only: r.keys_only,
        count_only: r.count_only,
    };
    Ok((req, shape))
}

/// What a put with etcd's `ignore_value` or `ignore_lease` keeps of the key's current record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    pub value: bool,
    pub lease: bool,
}

/// A put, and what it keeps of the current record if it asked to (`None`: a plain put).
pub fn put(r: &pb::PutRequest) -> Result<(kv::PutRequest, Option<Keep>), Status> {
    key_given(&r.key)?;
    if r.ignore_value && !r.value.is_empty() {
        return Err(Status::invalid_argument("etcdserver: value is provided"));
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Status::invalid_argument("etcdserver: lease is provided"));
    }
    if r.value.len() > kv::MAX_VALUE_LEN {
        return Err(errors::too_large());
    }
    let keep = (r.ignore_value || r.ignore_lease).then_some(Keep {
        value: r.ignore_value,
        lease: r.ignore_lease,
    });
    let put = kv::PutRequest {
        key: r.key.clone(),
        value: r.value.clone(),
        lease: r.lease,
        prev_kv: r.prev_kv,
    };
    Ok((put, keep))
}

pub fn delete(r: &pb::DeleteRangeRequest) -> Result<kv::DeleteRangeRequest, Status> {
    key_given(&r.key)?;
    Ok(kv::DeleteRangeRequest {
        key: r.key.clone(),
        range_end: r.range_end.clone(),
        prev_kv: r.prev_kv,
    })
}

fn compare(c: &pb::Compare) -> Result<kv::Compare, Status> {
    use pb::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    key_given(&c.key)?;
    let result = match R::try_from(c.result) {
        Ok(R::Equal) => kv::CompareResult::Equal,
        Ok(R::NotEqual) => kv::CompareResult::NotEqual,
        Ok(R::Less) => kv::CompareResult::Less,
        Ok(R::Greater) => kv::CompareResult::Greater,
        Err(_) => {
            return Err(Status::invalid_argument(
                "etcdserver: invalid compare result",
            ))
        }
    };
    // etcd reads the operand that matches the target and treats a missing one as its zero.
    let int = |v: Option<i64>| v.unwrap_or(0);
    let (version, create, modr, value, lease) = match &c.target_union {
        Some(U::Version(v)) => (Some(*v), None, None, None, None),
        Some(U::CreateRevision(v)) => (None, Some(*v), None, None, None),
        Some(U::ModRevision(v)) => (None, None, Some(*v), None, None),
        Some(U::Value(v)) => (None, None, None, Some(v.clone()), None),
        Some(U::Lease(v)) => (None, None, None, None, Some(*v)),
        None => (None, None, None, None, None),
    };
    let target = match T::try_from(c.target) {
        Ok(T::Version) => kv::CompareTarget::Version(nonneg(int(version), "version")?),
        Ok(T::Create) => kv::CompareTarget::CreateRevision(nonneg(int(create), "create_revision")?),
        Ok(T::Mod) => kv::CompareTarget::ModRevision(nonneg(int(modr), "mod_revision")?),
        Ok(T::Value) => kv::CompareTarget::Value(value.unwrap_or_default()),
        Ok(T::Lease) => kv::CompareTarget::Lease(int(lease)),
        Err(_) => {
            return Err(Status::invalid_argument(
                "etcdserver: invalid compare target",
            ))
        }
    };
    Ok(kv::Compare {
        key: c.key.clone(),
        range_end: c.range_end.clone(),
        result,
        target,
    })
}

/// A transaction operation, and for a range the shaping the gateway applies to its answer.
fn op(o: &pb::RequestOp) -> Result<(kv::RequestOp, Option<RangeShape>), Status> {
    use pb::request_op::Request;
    match &o.request {
        Some(Request::RequestRange(r)) => {
            let (req, shape) = range(r)?;
            Ok((kv::RequestOp::Range(req), Some(shape)))
        }
        Some(Request::RequestPut(p)) => match put(p)? {
            (p, None) => Ok((kv::RequestOp::Put(p), None)),
            (_, Some(_)) => Err(Status::unimplemented(
                "a put with ignore_value or ignore_lease inside a transaction is not supported \
                 by the KmMR etcd gateway (outside one it is)",
            )),
        },
        Some(Request::RequestDeleteRange(d)) => Ok((kv::RequestOp::DeleteRange(delete(d)?), None)),
        Some(Request::RequestTxn(_)) => Err(Status::unimplemented(
            "nested transactions are not supported by the KmMR etcd gateway",
        )),
        // etcd's own check answers an empty operation this way.
        None => Err(Status::invalid_argument("etcdserver: key not found")),
    }
}

/// Keys written in one branch must not overlap (etcd's `checkIntervals`): two puts of one key,
/// or a put inside a deleted range.
fn check_duplicates(ops: &[kv::RequestOp]) -> Result<(), Status> {
    let mut puts = BTreeSet::new();
    for o in ops {
        if let kv::RequestOp::Put(p) = o {
            if !puts.insert(p.key.as_slice()) {
                return Err(errors::duplicate_key());
            }
        }
    }
    for o in ops {
        if let kv::RequestOp::DeleteRange(d) = o {
            let covered = |k: &[u8]| {
                if d.range_end.is_empty() {
                    k == d.key.as_slice()
                } else if d.range_end == [0] {
                    k >= d.key.as_slice()
                } else {
                    k >= d.key.as_slice() && k < d.range_end.as_slice()
                }
            };
            if puts.iter().any(|k| covered(k)) {
                return Err(errors::duplicate_key());
            }
        }
    }
    Ok(())
}

/// The shapes of the ranges in each branch, to finish the answer with.
pub struct TxnShapes {
    pub success: Vec<Option<RangeShape>>,
    pub failure: Vec<Option<RangeShape>>,
}

pub fn txn(t: &pb::TxnRequest) -> Result<(kv::TxnRequest, TxnShapes), Status> {
    let max = t.compare.len().max(t.success.len()).max(t.failure.len());
    if max > kv::MAX_TXN_OPS {
        return Err(Status::invalid_argument(
            "etcdserver: too many operations in txn request",
        ));
    }
    let compare = t.compare.iter().map(compare).collect::<Result<_, _>>()?;
    let branch =
        |ops: &[pb::RequestOp]| -> Result<(Vec<kv::RequestOp>, Vec<Option<RangeShape>>), Status> {
            let (ops, shapes): (Vec<_>, Vec<_>) = ops
                .iter()
                .map(op)
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .unzip();
            check_duplicates(&ops)?;
            Ok((ops, shapes))
        };
    let (success, success_shapes) = branch(&t.success)?;
    let (failure, failure_shapes) = branch(&t.failure)?;
    Ok((
        kv::TxnRequest {
            compare,
            success,
            failure,
        },
        TxnShapes {
            success: success_shapes,
            failure: failure_shapes,
        },
    ))
}

fn rev(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub fn key_value(k: kv::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: k.key,
        create_revision: rev(k.create_revision),
        mod_revision: rev(k.mod_revision),
        version: rev(k.version),
        value: k.value,
        lease: k.lease,
    }
}

/// What identifies the gateway in every response header.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeaderIds {
    pub cluster_id: u64,
    pub member_id: u64,
}

impl HeaderIds {
    pub fn header(&self, revision: u64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision: rev(revision),
            raft_term: 0,
        })
    }
}

pub fn range_response(ids: &HeaderIds, r: kv::RangeResponse) -> pb::RangeResponse {
    pb::RangeResponse {
        header: ids.header(r.header.revision),
        kvs: r.kvs.into_iter().map(key_value).collect(),
        more: r.more,
        count: rev(r.count),
    }
}

pub fn put_response(ids: &HeaderIds, r: kv::PutResponse) -> pb::PutResponse {
    pb::PutResponse {
        header: ids.header(r.header.revision),
        prev_kv: r.prev_kv.map(key_value),
    }
}

pub fn delete_response(ids: &HeaderIds, r: kv::DeleteRangeResponse) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header: ids.header(r.header.revision),
        deleted: rev(r.deleted),
        prev_kvs: r.prev_kvs.into_iter().map(key_value).collect(),
    }
}

pub fn txn_response(ids: &HeaderIds, r: kv::TxnResponse, shapes: &TxnShapes) -> pb::TxnResponse {
    use pb::response_op::Response;
    let shapes = if r.succeeded {
        &shapes.success
    } else {
        &shapes.failure
    };
    let responses = r
        .responses
        .into_iter()
        .enumerate()
        .map(|(i, op)| pb::ResponseOp {
            response: Some(match op {
                kv::ResponseOp::Range(rr) => {
                    let rr = match shapes.get(i).copied().flatten() {
                        Some(shape) if !shape.is_plain() => shape.finish(rr),
                        _ => rr,
                    };
                    Response::ResponseRange(range_response(ids, rr))
                }
                kv::ResponseOp::Put(p) => Response::ResponsePut(put_response(ids, p)),
                kv::ResponseOp::DeleteRange(d) => {
                    Response::ResponseDeleteRange(delete_response(ids, d))
                }
            }),
        })
        .collect();
    pb::TxnResponse {
        header: ids.header(r.header.revision),
        succeeded: r.succeeded,
        responses,
    }
}

pub fn event(e: kv::Event) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match e.kind {
            kv::EventKind::Put => mvccpb::event::EventType::Put as i32,
            kv::EventKind::Delete => mvccpb::event::EventType::Delete as i32,
        },
        kv: Some(key_value(e.kv)),
        prev_kv: e.prev_kv.map(key_value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvr(key: &str, create: u64, m: u64, version: u64, value: &str) -> kv::KeyValue {
        kv::KeyValue {
            key: key.into(),
            create_revision: create,
            mod_revision: m,
            version,
            value: value.into(),
            lease: 0,
        }
    }

    #[test]
    fn sorting_filters_then_sorts_then_truncates_as_etcd_does() {
        let resp = kv::RangeResponse {
            kvs: vec![
                kvr("a", 5, 9, 3, "z"),
                kvr("b", 2, 2, 1, "y"),
                kvr("c", 7, 7, 1, "x"),
            ],
            count: 3,
            ..Default::default()
        };
        let shape = RangeShape {
            order: SortOrder::Descend,
            target: SortTarget::Mod,
            limit: 1,
            min_mod: 3,
            max_mod: 0,
            min_create: 0,
            max_create: 0,
        };
        let out = shape.finish(resp.clone());
        assert_eq!(out.kvs, vec![kvr("a", 5, 9, 3, "z")]);
        assert!(out.more);
        assert_eq!(out.count, 3, "count is the total before filters, as etcd's");
        let by_value = RangeShape {
            order: SortOrder::None,
            target: SortTarget::Value,
            limit: 0,
            min_mod: 0,
            ..shape
        };
        let keys: Vec<_> = by_value
            .finish(resp)
            .kvs
            .into_iter()
            .map(|k| k.key)
            .collect();
        assert_eq!(keys, vec![b"c".to_vec(), b"b".to_vec(), b"a".to_vec()]);
    }

    #[test]
    fn refused_before_consensus_with_etcds_texts() {
        let empty = pb::RangeRequest::default();
        assert_eq!(
            range(&empty).unwrap_err().message(),
            "etcdserver: key is not provided"
        );
        let bad_sort = pb::RangeRequest {
            key: b"k".to_vec(),
            sort_order: 7,
            ..Default::default()
        };
        assert_eq!(
            range(&bad_sort).unwrap_err().message(),
            "etcdserver: invalid sort option"
        );
        let put = |k: &str| pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        };
        let dup = pb::TxnRequest {
            success: vec![put("a"), put("a")],
            ..Default::default()
        };
        assert_eq!(
            txn(&dup).err().unwrap().message(),
            "etcdserver: duplicate key given in txn request"
        );
        let del_over_put = pb::TxnRequest {
            success: vec![
                put("b"),
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestDeleteRange(
                        pb::DeleteRangeRequest {
                            key: b"a".to_vec(),
                            range_end: b"c".to_vec(),
                            prev_kv: false,
                        },
                    )),
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            txn(&del_over_put).err().unwrap().message(),
            "etcdserver: duplicate key given in txn request"
        );
        let many = pb::TxnRequest {
            failure: (0..129).map(|i| put(&format!("k{i}"))).collect(),
            ..Default::default()
        };
        assert_eq!(
            txn(&many).err().unwrap().message(),
            "etcdserver: too many operations in txn request"
        );
        let empty_op = pb::TxnRequest {
            success: vec![pb::RequestOp { request: None }],
            ..Default::default()
        };
        assert_eq!(
            txn(&empty_op).err().unwrap().message(),
            "etcdserver: key not found"
        );
    }

    #[test]
    fn a_put_keeping_its_value_or_lease_says_what_it_keeps() {
        let keeping = |ignore_value, ignore_lease| pb::PutRequest {
            key: b"k".to_vec(),
            ignore_value,
            ignore_lease,
            ..Default::default()
        };
        assert_eq!(put(&keeping(false, false)).unwrap().1, None);
        assert_eq!(
            put(&keeping(true, false)).unwrap().1,
            Some(Keep {
                value: true,
                lease: false
            })
        );
        assert_eq!(
            put(&keeping(true, true)).unwrap().1,
            Some(Keep {
                value: true,
                lease: true
            })
        );
        let given = pb::PutRequest {
            value: b"v".to_vec(),
            ..keeping(true, false)
        };
        assert_eq!(
            put(&given).unwrap_err().message(),
            "etcdserver: value is provided"
        );
        // Inside a transaction it is refused by name, not half done.
        let in_txn = pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(keeping(false, true))),
            }],
            ..Default::default()
        };
        let refused = txn(&in_txn).err().unwrap();
        assert_eq!(refused.code(), tonic::Code::Unimplemented);
        assert!(refused.message().contains("ignore_lease"), "{refused:?}");
    }
}
