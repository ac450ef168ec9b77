//! Records, requests, responses and errors of the KV service, and the limits that bound them.
//!
//! The shapes follow etcd's v3 API (`mvccpb.KeyValue`, `RangeRequest`, `TxnRequest`, ...)
//! closely enough that a gRPC facade can translate field for field. Two deliberate differences:
//! revisions are `u64` (etcd uses `int64` but never hands out negatives), and `0` in a request's
//! `revision` field means "latest", as in etcd.

use thiserror::Error;

/// Longest key accepted, in bytes. etcd has no hard key limit, but Kubernetes keys are paths of a
/// few hundred bytes; 4 KiB leaves ample room while keeping forged lengths cheap to reject.
pub const MAX_KEY_LEN: usize = 4 * 1024;
/// Longest value accepted: etcd's default `--max-request-bytes` is 1.5 MiB.
pub const MAX_VALUE_LEN: usize = 1536 * 1024;
/// Most operations in one branch of a transaction (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;
/// Most comparisons in one transaction.
pub const MAX_TXN_COMPARES: usize = 128;
/// Longest lease TTL accepted, in seconds (etcd's `MaxLeaseTTL`).
pub const MAX_LEASE_TTL_SECS: i64 = 9_000_000_000;
/// Longest error text carried in a reply.
pub const MAX_ERROR_TEXT: usize = 1024;
/// Bytes of records one reply carries at most (ranges, previous records, watch events), beside
/// the first record, which is always carried. A range that matched more answers `more`, and its
/// reader continues after its last key at the reply's revision; a watch poll stops at a revision
/// boundary. Half the wire's result limit, so that a reply always fits in it: a reply over that
/// limit would be refused by every client and, cached for retransmission, make the replicas'
/// checkpoints undecodable.
pub const REPLY_BUDGET: usize = 4 * 1024 * 1024;
/// Lease id meaning "no lease" (etcd's `NoLease`).
pub const NO_LEASE: i64 = 0;

/// A key's current (or historical) record, as etcd's `mvccpb.KeyValue`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    pub key: Vec<u8>,
    /// Revision of the write that created the key since it last did not exist.
    pub create_revision: u64,
    /// Revision of the last write to the key.
    pub mod_revision: u64,
    /// Number of writes since creation; 1 right after creation, reset by a delete.
    pub version: u64,
    pub value: Vec<u8>,
    /// Lease the key is attached to, or [`NO_LEASE`].
    pub lease: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change in the event log.
///
/// For a put, `kv` is the new record. For a delete, `kv` holds only the key and, in
/// `mod_revision`, the revision of the delete (etcd's tombstone shape). The store always records
/// `prev_kv`; watch replies strip it from puts unless the watcher asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub prev_kv: Option<KeyValue>,
}

impl Event {
    /// The revision of the write that produced this event.
    pub fn revision(&self) -> u64 {
        self.kv.mod_revision
    }
}

/// Carried by every response: the store's revision once the request was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResponseHeader {
    pub revision: u64,
}

/// Reads `[key, range_end)` with etcd's conventions: empty `range_end` reads `key` alone,
/// `range_end == [0]` reads every key `>= key`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeRequest {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    /// Read the state as of this revision; 0 reads the latest.
    pub revision: u64,
    /// At most this many kvs are returned; 0 means no limit.
    pub limit: u64,
    pub keys_only: bool,
    pub count_only: bool,
}

impl RangeRequest {
    /// Reads one key at the latest revision.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        RangeRequest {
            key: key.into(),
            ..Default::default()
        }
    }

    /// Reads every key starting with `prefix` at the latest revision.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let key = prefix.into();
        let range_end = prefix_end(&key);
        RangeRequest {
            key,
            range_end,
            ..Default::default()
        }
    }
}

/// The `range_end` that makes a range cover every key starting with `prefix` (etcd's
/// `GetPrefixRangeEnd`): the prefix with its last non-0xff byte incremented, or `[0]` (all keys
/// from `prefix` on) when the prefix is all 0xff.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeResponse {
    pub header: ResponseHeader,
    /// Matching kvs in key order, at most `limit`; empty for `count_only`.
    pub kvs: Vec<KeyValue>,
    /// More keys matched than were returned.
    pub more: bool,
    /// How many keys matched, regardless of `limit`.
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PutRequest {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Lease to attach the key to, or [`NO_LEASE`] (which also detaches a previous lease).
    pub lease: i64,
    /// Return the record the put replaced.
    pub prev_kv: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PutResponse {
    pub header: ResponseHeader,
    pub prev_kv: Option<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteRangeRequest {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    /// Return the deleted records.
    pub prev_kv: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteRangeResponse {
    pub header: ResponseHeader,
    pub deleted: u64,
    pub prev_kvs: Vec<KeyValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareResult {
    Equal,
    NotEqual,
    Less,
    Greater,
}

/// What a comparison looks at, with the operand it is compared against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    Version(u64),
    CreateRevision(u64),
    ModRevision(u64),
    Value(Vec<u8>),
    Lease(i64),
}

/// `target(key) result operand`, e.g. `mod_revision("/a") == 7`. With a `range_end`, every key in
/// the range must satisfy it. On a missing key the numeric targets read 0 and a value comparison
/// is false (etcd's rule: a missing value cannot be told from an empty one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub result: CompareResult,
    pub target: CompareTarget,
}

impl Compare {
    pub fn new(key: impl Into<Vec<u8>>, result: CompareResult, target: CompareTarget) -> Self {
        Compare {
            key: key.into(),
            range_end: Vec::new(),
            result,
            target,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
}

/// If every comparison holds, apply `success` in order, else `failure`. The whole transaction
/// takes one revision if it writes anything; reads inside it see its earlier writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnResponse {
    pub header: ResponseHeader,
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompactRequest {
    /// Drop history before this revision; reads at it and later stay possible.
    pub revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompactResponse {
    pub header: ResponseHeader,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseGrantRequest {
    /// Proposed id (> 0), or 0 to let the store choose one.
    pub id: i64,
    pub ttl: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseGrantResponse {
    pub header: ResponseHeader,
    pub id: i64,
    pub ttl: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseRevokeRequest {
    pub id: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseRevokeResponse {
    pub header: ResponseHeader,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseKeepAliveRequest {
    pub id: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseKeepAliveResponse {
    pub header: ResponseHeader,
    pub id: i64,
    /// The TTL the lease was renewed for, in seconds.
    pub ttl: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseTimeToLiveRequest {
    pub id: i64,
    /// Also list the keys attached to the lease.
    pub keys: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseTimeToLiveResponse {
    pub header: ResponseHeader,
    pub id: i64,
    /// Seconds left, measured against the last consensus timestamp the store executed at.
    pub ttl: i64,
    pub granted_ttl: i64,
    pub keys: Vec<Vec<u8>>,
}

/// Every lease the store holds, in id order (etcd's LeaseLeases).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseLeasesResponse {
    pub header: ResponseHeader,
    pub ids: Vec<i64>,
}

/// Asks for the events after `after_revision` on `[key, range_end)` (etcd's range conventions).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchPollRequest {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub after_revision: u64,
    /// Soft cap on events returned; 0 means no cap. A revision's events are never split, so a
    /// reply may exceed the cap by the events of one revision.
    pub limit: u32,
    /// Include `prev_kv` on put events (delete events always carry it).
    pub prev_kv: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchPollResponse {
    pub header: ResponseHeader,
    pub events: Vec<Event>,
    /// Every matching event up to and including this revision has been delivered: poll again
    /// with `after_revision = resume_after`.
    pub resume_after: u64,
}

/// Why a request was refused. Refusals change nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KvError {
    #[error("required revision has been compacted (compacted at {compact_revision})")]
    Compacted { compact_revision: u64 },
    #[error("required revision {requested} is a future revision (current {current})")]
    FutureRevision { requested: u64, current: u64 },
    #[error("key is not provided")]
    EmptyKey,
    #[error("requested lease {id} not found")]
    LeaseNotFound { id: i64 },
    #[error("lease {id} already exists")]
    LeaseExists { id: i64 },
    #[error("lease TTL {ttl} out of range")]
    InvalidLeaseTtl { ttl: i64 },
    #[error("lease id {id} is not a positive id")]
    InvalidLeaseId { id: i64 },
    #[error("request changes state and must be ordered")]
    NotReadOnly,
    #[error("malformed request: {0}")]
    Malformed(String),
    /// What a request asked for does not fit in one reply even after [`REPLY_BUDGET`] bounded
    /// it (one revision's watch events over the wire's limit, for example).
    #[error("reply of {bytes} bytes is over the {limit}-byte limit")]
    TooLarge { bytes: u64, limit: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    pub header: ResponseHeader,
    pub error: KvError,
}

/// A request to the KV service; its canonical encoding is what clients submit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvRequest {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactRequest),
    LeaseGrant(LeaseGrantRequest),
    LeaseRevoke(LeaseRevokeRequest),
    LeaseKeepAlive(LeaseKeepAliveRequest),
    LeaseTimeToLive(LeaseTimeToLiveRequest),
    WatchPoll(WatchPollRequest),
    /// Lists the leases (read-only). Replicas of releases before it answer it with a decode
    /// error, so it needs a cluster whose replicas all run a release that has it.
    LeaseLeases,
}

impl KvRequest {
    /// Reads one key.
    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        KvRequest::Range(RangeRequest::key(key))
    }

    /// Writes one key without a lease.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        KvRequest::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
    }

    /// Deletes one key.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        KvRequest::DeleteRange(DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        })
    }

    /// Compare-and-swap on one key: writes `new` if the key's value is `expected`, or, with
    /// `expected == None`, if the key does not exist. On failure the transaction reads the key,
    /// so the reply shows what was there instead.
    pub fn cas(key: impl Into<Vec<u8>>, expected: Option<&[u8]>, new: impl Into<Vec<u8>>) -> Self {
        let key = key.into();
        let compare = match expected {
            Some(v) => Compare::new(
                key.clone(),
                CompareResult::Equal,
                CompareTarget::Value(v.to_vec()),
            ),
            None => Compare::new(
                key.clone(),
                CompareResult::Equal,
                CompareTarget::CreateRevision(0),
            ),
        };
        KvRequest::Txn(TxnRequest {
            compare: vec![compare],
            success: vec![RequestOp::Put(PutRequest {
                key: key.clone(),
                value: new.into(),
                ..Default::default()
            })],
            failure: vec![RequestOp::Range(RangeRequest::key(key))],
        })
    }

    /// Whether the request can be answered without changing state (and so through `query`).
    pub fn is_read_only(&self) -> bool {
        match self {
            KvRequest::Range(_)
            | KvRequest::WatchPoll(_)
            | KvRequest::LeaseTimeToLive(_)
            | KvRequest::LeaseLeases => true,
            KvRequest::Txn(t) => t
                .success
                .iter()
                .chain(&t.failure)
                .all(|op| matches!(op, RequestOp::Range(_))),
            _ => false,
        }
    }
}

/// The reply to a [`KvRequest`]: the matching variant, or `Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvResponse {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    LeaseKeepAlive(LeaseKeepAliveResponse),
    LeaseTimeToLive(LeaseTimeToLiveResponse),
    WatchPoll(WatchPollResponse),
    LeaseLeases(LeaseLeasesResponse),
    Error(ErrorResponse),
}

impl KvResponse {
    pub fn header(&self) -> &ResponseHeader {
        match self {
            KvResponse::Range(r) => &r.header,
            KvResponse::Put(r) => &r.header,
            KvResponse::DeleteRange(r) => &r.header,
            KvResponse::Txn(r) => &r.header,
            KvResponse::Compact(r) => &r.header,
            KvResponse::LeaseGrant(r) => &r.header,
            KvResponse::LeaseRevoke(r) => &r.header,
            KvResponse::LeaseKeepAlive(r) => &r.header,
            KvResponse::LeaseTimeToLive(r) => &r.header,
            KvResponse::WatchPoll(r) => &r.header,
            KvResponse::LeaseLeases(r) => &r.header,
            KvResponse::Error(r) => &r.header,
        }
    }

    pub fn error(&self) -> Option<&KvError> {
        match self {
            KvResponse::Error(e) => Some(&e.error),
            _ => None,
        }
    }

    /// For a single-key get: `Some(value)` if the key was found, `None` if not or if this is not
    /// a range reply.
    pub fn get_value(&self) -> Option<&[u8]> {
        match self {
            KvResponse::Range(r) => r.kvs.first().map(|kv| kv.value.as_slice()),
            _ => None,
        }
    }

    /// For a transaction (e.g. [`KvRequest::cas`]): whether the comparisons held.
    pub fn txn_succeeded(&self) -> Option<bool> {
        match self {
            KvResponse::Txn(t) => Some(t.succeeded),
            _ => None,
        }
    }
}

impl ResponseOp {
    pub(crate) fn header_mut(&mut self) -> &mut ResponseHeader {
        match self {
            ResponseOp::Range(r) => &mut r.header,
            ResponseOp::Put(r) => &mut r.header,
            ResponseOp::DeleteRange(r) => &mut r.header,
        }
    }
}
