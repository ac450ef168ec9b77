//! Canonical encodings of the KV service's records, requests and responses.
//!
//! Every variant has a fixed tag, every field a fixed position, so equal values encode to equal
//! bytes (replies from different replicas are compared byte for byte). Decoding enforces the
//! limits in [`super::types`] before allocating anything.

use super::types::*;
use crate::wire::codec::{Decode, DecodeError, Encode, Reader, Writer};

/// No count in these encodings may exceed what a `u32` prefix can carry; the codec's
/// `min_elem` check is what actually bounds allocation.
const ANY_COUNT: usize = u32::MAX as usize;
/// Smallest encoding of a [`KeyValue`]: two empty byte strings and four 8-byte integers.
const KV_MIN_LEN: usize = 4 + 8 + 8 + 8 + 4 + 8;

fn key(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<u8>, DecodeError> {
    r.bytes_vec(what, MAX_KEY_LEN)
}

impl Encode for KeyValue {
    fn encode(&self, w: &mut Writer) {
        w.bytes(&self.key)
            .u64(self.create_revision)
            .u64(self.mod_revision)
            .u64(self.version)
            .bytes(&self.value)
            .i64(self.lease);
    }
}

impl Decode for KeyValue {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(KeyValue {
            key: key(r, "key")?,
            create_revision: r.u64()?,
            mod_revision: r.u64()?,
            version: r.u64()?,
            value: r.bytes_vec("value", MAX_VALUE_LEN)?,
            lease: r.i64()?,
        })
    }
}

fn kvs(r: &mut Reader<'_>) -> Result<Vec<KeyValue>, DecodeError> {
    r.vec("kvs", ANY_COUNT, KV_MIN_LEN, KeyValue::decode)
}

fn encode_kvs(w: &mut Writer, kvs: &[KeyValue]) {
    w.len(kvs.len());
    for kv in kvs {
        kv.encode(w);
    }
}

impl Encode for Event {
    fn encode(&self, w: &mut Writer) {
        w.u8(match self.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        self.kv.encode(w);
        w.option(self.prev_kv.as_ref(), |w, kv| kv.encode(w));
    }
}

impl Decode for Event {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let kind = match r.u8()? {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            tag => return Err(DecodeError::UnknownTag { what: "event", tag }),
        };
        Ok(Event {
            kind,
            kv: KeyValue::decode(r)?,
            prev_kv: r.option(KeyValue::decode)?,
        })
    }
}

/// Smallest encoding of an [`Event`].
pub(super) const EVENT_MIN_LEN: usize = 1 + KV_MIN_LEN + 1;

impl Encode for ResponseHeader {
    fn encode(&self, w: &mut Writer) {
        w.u64(self.revision);
    }
}

impl Decode for ResponseHeader {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(ResponseHeader { revision: r.u64()? })
    }
}

impl Encode for RangeRequest {
    fn encode(&self, w: &mut Writer) {
        w.bytes(&self.key)
            .bytes(&self.range_end)
            .u64(self.revision)
            .u64(self.limit)
            .bool(self.keys_only)
            .bool(self.count_only);
    }
}

impl Decode for RangeRequest {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(RangeRequest {
            key: key(r, "key")?,
            range_end: key(r, "range_end")?,
            revision: r.u64()?,
            limit: r.u64()?,
            keys_only: r.bool()?,
            count_only: r.bool()?,
        })
    }
}

impl Encode for RangeResponse {
    fn encode(&self, w: &mut Writer) {
        self.header.encode(w);
        encode_kvs(w, &self.kvs);
        w.bool(self.more).u64(self.count);
    }
}

impl Decode for RangeResponse {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(RangeResponse {
            header: ResponseHeader::decode(r)?,
            kvs: kvs(r)?,
            more: r.bool()?,
            count: r.u64()?,
        })
    }
}

impl Encode for PutRequest {
    fn encode(&self, w: &mut Writer) {
        w.bytes(&self.key)
            .bytes(&self.value)
            .i64(self.lease)
            .bool(self.prev_kv);
    }
}

impl Decode for PutRequest {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(PutRequest {
            key: key(r, "key")?,
            value: r.bytes_vec("value", MAX_VALUE_LEN)?,
            lease: r.i64()?,
            prev_kv: r.bool()?,
        })
    }
}

impl Encode for PutResponse {
    fn encode(&self, w: &mut Writer) {
        self.header.encode(w);
        w.option(self.prev_kv.as_ref(), |w, kv| kv.encode(w));
    }
}

impl Decode for PutResponse {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(PutResponse {
            header: ResponseHeader::decode(r)?,
            prev_kv: r.option(KeyValue::decode)?,
        })
    }
}

impl Encode for DeleteRangeRequest {
    fn encode(&self, w: &mut Writer) {
        w.bytes(&self.key).bytes(&self.range_end).bool(self.prev_kv);
    }
}

impl Decode for DeleteRangeRequest {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(DeleteRangeRequest {
            key: key(r, "key")?,
            range_end: key(r, "range_end")?,
            prev_kv: r.bool()?,
        })
    }
}

impl Encode for DeleteRangeResponse {
    fn encode(&self, w: &mut Writer) {
        self.header.encode(w);
        w.u64(self.deleted);
        encode_kvs(w, &self.prev_kvs);
    }
}

impl Decode for DeleteRangeResponse {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(DeleteRangeResponse {
            header: ResponseHeader::decode(r)?,
            deleted: r.u64()?,
            prev_kvs: kvs(r)?,
        })
    }
}

impl Encode for Compare {
    fn encode(&self, w: &mut Writer) {
        w.bytes(&self.key).bytes(&self.range_end);
        w.u8(match self.result {
            CompareResult::Equal => 0,
            CompareResult::NotEqual => 1,
            CompareResult::Less => 2,
            CompareResult::Greater => 3,
        });
        match &self.target {
            CompareTarget::Version(v) => w.u8(0).u64(*v),
            CompareTarget::CreateRevision(v) => w.u8(1).u64(*v),
            CompareTarget::ModRevision(v) => w.u8(2).u64(*v),
            CompareTarget::Value(v) => w.u8(3).bytes(v),
            CompareTarget::Lease(v) => w.u8(4).i64(*v),
        };
    }
}

impl Decode for Compare {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let key = key(r, "key")?;
        let range_end = key_end(r)?;
        let result = match r.u8()? {
            0 => CompareResult::Equal,
            1 => CompareResult::NotEqual,
            2 => CompareResult::Less,
            3 => CompareResult::Greater,
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "compare result",
                    tag,
                })
            }
        };
        let target = match r.u8()? {
            0 => CompareTarget::Version(r.u64()?),
            1 => CompareTarget::CreateRevision(r.u64()?),
            2 => CompareTarget::ModRevision(r.u64()?),
            3 => CompareTarget::Value(r.bytes_vec("value", MAX_VALUE_LEN)?),
            4 => CompareTarget::Lease(r.i64()?),
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "compare target",
                    tag,
                })
            }
        };
        Ok(Compare {
            key,
            range_end,
            result,
            target,
        })
    }
}

fn key_end(r: &mut Reader<'_>) -> Result<Vec<u8>, DecodeError> {
    key(r, "range_end")
}

impl Encode for RequestOp {
    fn encode(&self, w: &mut Writer) {
        match self {
            RequestOp::Range(x) => {
                w.u8(0);
                x.encode(w)
            }
            RequestOp::Put(x) => {
                w.u8(1);
                x.encode(w)
            }
            RequestOp::DeleteRange(x) => {
                w.u8(2);
                x.encode(w)
            }
        }
    }
}

impl Decode for RequestOp {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.u8()? {
            0 => Ok(RequestOp::Range(RangeRequest::decode(r)?)),
            1 => Ok(RequestOp::Put(PutRequest::decode(r)?)),
            2 => Ok(RequestOp::DeleteRange(DeleteRangeRequest::decode(r)?)),
            tag => Err(DecodeError::UnknownTag {
                what: "request op",
                tag,
            }),
        }
    }
}

impl Encode for ResponseOp {
    fn encode(&self, w: &mut Writer) {
        match self {
            ResponseOp::Range(x) => {
                w.u8(0);
                x.encode(w)
            }
            ResponseOp::Put(x) => {
                w.u8(1);
                x.encode(w)
            }
            ResponseOp::DeleteRange(x) => {
                w.u8(2);
                x.encode(w)
            }
        }
    }
}

impl Decode for ResponseOp {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.u8()? {
            0 => Ok(ResponseOp::Range(RangeResponse::decode(r)?)),
            1 => Ok(ResponseOp::Put(PutResponse::decode(r)?)),
            2 => Ok(ResponseOp::DeleteRange(DeleteRangeResponse::decode(r)?)),
            tag => Err(DecodeError::UnknownTag {
                what: "response op",
                tag,
            }),
        }
    }
}

fn encode_seq<T: Encode>(w: &mut Writer, items: &[T]) {
    w.len(items.len());
    for x in items {
        x.encode(w);
    }
}

impl Encode for TxnRequest {
    fn encode(&self, w: &mut Writer) {
        encode_seq(w, &self.compare);
        encode_seq(w, &self.success);
        encode_seq(w, &self.failure);
    }
}

impl Decode for TxnRequest {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        // Minimum sizes: a compare is two length prefixes and two tags; an op is a tag and
        // at least two length prefixes.
        Ok(TxnRequest {
            compare: r.vec("txn compares", MAX_TXN_COMPARES, 10, Compare::decode)?,
            success: r.vec("txn success ops", MAX_TXN_OPS, 9, RequestOp::decode)?,
            failure: r.vec("txn failure ops", MAX_TXN_OPS, 9, RequestOp::decode)?,
        })
    }
}

impl Encode for TxnResponse {
    fn encode(&self, w: &mut Writer) {
        self.header.encode(w);
        w.bool(self.succeeded);
        encode_seq(w, &self.responses);
    }
}

impl Decode for TxnResponse {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(TxnResponse {
            header: ResponseHeader::decode(r)?,
            succeeded: r.bool()?,
            responses: r.vec("txn responses", MAX_TXN_OPS, 9, ResponseOp::decode)?,
        })
    }
}

impl Encode for WatchPollRequest {
    fn encode(&self, w: &mut Writer) {
        w.bytes(&self.key)
            .bytes(&self.range_end)
            .u64(self.after_revision)
            .u32(self.limit)
            .bool(self.prev_kv);
    }
}

impl Decode for WatchPollRequest {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(WatchPollRequest {
            key: key(r, "key")?,
            range_end: key_end(r)?,
            after_revision: r.u64()?,
            limit: r.u32()?,
            prev_kv: r.bool()?,
        })
    }
}

impl Encode for WatchPollResponse {
    fn encode(&self, w: &mut Writer) {
        self.header.encode(w);
        encode_seq(w, &self.events);
        w.u64(self.resume_after);
    }
}

impl Decode for WatchPollResponse {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(WatchPollResponse {
            header: ResponseHeader::decode(r)?,
            events: r.vec("events", ANY_COUNT, EVENT_MIN_LEN, Event::decode)?,
            resume_after: r.u64()?,
        })
    }
}

impl Encode for KvError {
    fn encode(&self, w: &mut Writer) {
        match self {
            KvError::Compacted { compact_revision } => w.u8(1).u64(*compact_revision),
            KvError::FutureRevision { requested, current } => w.u8(2).u64(*requested).u64(*current),
            KvError::EmptyKey => w.u8(3),
            KvError::LeaseNotFound { id } => w.u8(4).i64(*id),
            KvError::LeaseExists { id } => w.u8(5).i64(*id),
            KvError::InvalidLeaseTtl { ttl } => w.u8(6).i64(*ttl),
            KvError::InvalidLeaseId { id } => w.u8(7).i64(*id),
            KvError::NotReadOnly => w.u8(8),
            KvError::Malformed(text) => {
                // Truncate on a char boundary so the text still decodes as UTF-8.
                let mut end = text.len().min(MAX_ERROR_TEXT);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                w.u8(9).bytes(&text.as_bytes()[..end])
            }
            KvError::TooLarge { bytes, limit } => w.u8(10).u64(*bytes).u64(*limit),
        };
    }
}

impl Decode for KvError {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            1 => KvError::Compacted {
                compact_revision: r.u64()?,
            },
            2 => KvError::FutureRevision {
                requested: r.u64()?,
                current: r.u64()?,
            },
            3 => KvError::EmptyKey,
            4 => KvError::LeaseNotFound { id: r.i64()? },
            5 => KvError::LeaseExists { id: r.i64()? },
            6 => KvError::InvalidLeaseTtl { ttl: r.i64()? },
            7 => KvError::InvalidLeaseId { id: r.i64()? },
            8 => KvError::NotReadOnly,
            9 => {
                let b = r.bytes("error text", MAX_ERROR_TEXT)?;
                let s = std::str::from_utf8(b)
                    .map_err(|_| DecodeError::Invalid("error text is not UTF-8"))?;
                KvError::Malformed(s.to_owned())
            }
            10 => KvError::TooLarge {
                bytes: r.u64()?,
                limit: r.u64()?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "kv error",
                    tag,
                })
            }
        })
    }
}

const REQ_RANGE: u8 = 1;
const REQ_PUT: u8 = 2;
const REQ_DELETE_RANGE: u8 = 3;
const REQ_TXN: u8 = 4;
const REQ_COMPACT: u8 = 5;
const REQ_LEASE_GRANT: u8 = 6;
const REQ_LEASE_REVOKE: u8 = 7;
const REQ_LEASE_KEEP_ALIVE: u8 = 8;
const REQ_LEASE_TIME_TO_LIVE: u8 = 9;
const REQ_WATCH_POLL: u8 = 10;
const REQ_LEASE_LEASES: u8 = 11;
/// Response tags reuse the request tags; this one is reserved for refusals.
const RESP_ERROR: u8 = 255;

impl Encode for KvRequest {
    fn encode(&self, w: &mut Writer) {
        match self {
            KvRequest::Range(x) => {
                w.u8(REQ_RANGE);
                x.encode(w)
            }
            KvRequest::Put(x) => {
                w.u8(REQ_PUT);
                x.encode(w)
            }
            KvRequest::DeleteRange(x) => {
                w.u8(REQ_DELETE_RANGE);
                x.encode(w)
            }
            KvRequest::Txn(x) => {
                w.u8(REQ_TXN);
                x.encode(w)
            }
            KvRequest::Compact(x) => {
                w.u8(REQ_COMPACT).u64(x.revision);
            }
            KvRequest::LeaseGrant(x) => {
                w.u8(REQ_LEASE_GRANT).i64(x.id).i64(x.ttl);
            }
            KvRequest::LeaseRevoke(x) => {
                w.u8(REQ_LEASE_REVOKE).i64(x.id);
            }
            KvRequest::LeaseKeepAlive(x) => {
                w.u8(REQ_LEASE_KEEP_ALIVE).i64(x.id);
            }
            KvRequest::LeaseTimeToLive(x) => {
                w.u8(REQ_LEASE_TIME_TO_LIVE).i64(x.id).bool(x.keys);
            }
            KvRequest::WatchPoll(x) => {
                w.u8(REQ_WATCH_POLL);
                x.encode(w)
            }
            KvRequest::LeaseLeases => {
                w.u8(REQ_LEASE_LEASES);
            }
        }
    }
}

impl Decode for KvRequest {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            REQ_RANGE => KvRequest::Range(RangeRequest::decode(r)?),
            REQ_PUT => KvRequest::Put(PutRequest::decode(r)?),
            REQ_DELETE_RANGE => KvRequest::DeleteRange(DeleteRangeRequest::decode(r)?),
            REQ_TXN => KvRequest::Txn(TxnRequest::decode(r)?),
            REQ_COMPACT => KvRequest::Compact(CompactRequest { revision: r.u64()? }),
            REQ_LEASE_GRANT => KvRequest::LeaseGrant(LeaseGrantRequest {
                id: r.i64()?,
                ttl: r.i64()?,
            }),
            REQ_LEASE_REVOKE => KvRequest::LeaseRevoke(LeaseRevokeRequest { id: r.i64()? }),
            REQ_LEASE_KEEP_ALIVE => {
                KvRequest::LeaseKeepAlive(LeaseKeepAliveRequest { id: r.i64()? })
            }
            REQ_LEASE_TIME_TO_LIVE => KvRequest::LeaseTimeToLive(LeaseTimeToLiveRequest {
                id: r.i64()?,
                keys: r.bool()?,
            }),
            REQ_WATCH_POLL => KvRequest::WatchPoll(WatchPollRequest::decode(r)?),
            REQ_LEASE_LEASES => KvRequest::LeaseLeases,
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "kv request",
                    tag,
                })
            }
        })
    }
}

impl Encode for KvResponse {
    fn encode(&self, w: &mut Writer) {
        match self {
            KvResponse::Range(x) => {
                w.u8(REQ_RANGE);
                x.encode(w)
            }
            KvResponse::Put(x) => {
                w.u8(REQ_PUT);
                x.encode(w)
            }
            KvResponse::DeleteRange(x) => {
                w.u8(REQ_DELETE_RANGE);
                x.encode(w)
            }
            KvResponse::Txn(x) => {
                w.u8(REQ_TXN);
                x.encode(w)
            }
            KvResponse::Compact(x) => {
                w.u8(REQ_COMPACT);
                x.header.encode(w)
            }
            KvResponse::LeaseGrant(x) => {
                w.u8(REQ_LEASE_GRANT);
                x.header.encode(w);
                w.i64(x.id).i64(x.ttl);
            }
            KvResponse::LeaseRevoke(x) => {
                w.u8(REQ_LEASE_REVOKE);
                x.header.encode(w)
            }
            KvResponse::LeaseKeepAlive(x) => {
                w.u8(REQ_LEASE_KEEP_ALIVE);
                x.header.encode(w);
                w.i64(x.id).i64(x.ttl);
            }
            KvResponse::LeaseTimeToLive(x) => {
                w.u8(REQ_LEASE_TIME_TO_LIVE);
                x.header.encode(w);
                w.i64(x.id).i64(x.ttl).i64(x.granted_ttl);
                w.len(x.keys.len());
                for k in &x.keys {
                    w.bytes(k);
                }
            }
            KvResponse::WatchPoll(x) => {
                w.u8(REQ_WATCH_POLL);
                x.encode(w)
            }
            KvResponse::LeaseLeases(x) => {
                w.u8(REQ_LEASE_LEASES);
                x.header.encode(w);
                w.len(x.ids.len());
                for id in &x.ids {
                    w.i64(*id);
                }
            }
            KvResponse::Error(x) => {
                w.u8(RESP_ERROR);
                x.header.encode(w);
                x.error.encode(w)
            }
        }
    }
}

impl Decode for KvResponse {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            REQ_RANGE => KvResponse::Range(RangeResponse::decode(r)?),
            REQ_PUT => KvResponse::Put(PutResponse::decode(r)?),
            REQ_DELETE_RANGE => KvResponse::DeleteRange(DeleteRangeResponse::decode(r)?),
            REQ_TXN => KvResponse::Txn(TxnResponse::decode(r)?),
            REQ_COMPACT => KvResponse::Compact(CompactResponse {
                header: ResponseHeader::decode(r)?,
            }),
            REQ_LEASE_GRANT => KvResponse::LeaseGrant(LeaseGrantResponse {
                header: ResponseHeader::decode(r)?,
                id: r.i64()?,
                ttl: r.i64()?,
            }),
            REQ_LEASE_REVOKE => KvResponse::LeaseRevoke(LeaseRevokeResponse {
                header: ResponseHeader::decode(r)?,
            }),
            REQ_LEASE_KEEP_ALIVE => KvResponse::LeaseKeepAlive(LeaseKeepAliveResponse {
                header: ResponseHeader::decode(r)?,
                id: r.i64()?,
                ttl: r.i64()?,
            }),
            REQ_LEASE_TIME_TO_LIVE => KvResponse::LeaseTimeToLive(LeaseTimeToLiveResponse {
                header: ResponseHeader::decode(r)?,
                id: r.i64()?,
                ttl: r.i64()?,
                granted_ttl: r.i64()?,
                keys: r.vec("lease keys", ANY_COUNT, 4, |r| key(r, "key"))?,
            }),
            REQ_WATCH_POLL => KvResponse::WatchPoll(WatchPollResponse::decode(r)?),
            REQ_LEASE_LEASES => KvResponse::LeaseLeases(LeaseLeasesResponse {
                header: ResponseHeader::decode(r)?,
                ids: r.vec("lease ids", ANY_COUNT, 8, Reader::i64)?,
            }),
            RESP_ERROR => KvResponse::Error(ErrorResponse {
                header: ResponseHeader::decode(r)?,
                error: KvError::decode(r)?,
            }),
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "kv response",
                    tag,
                })
            }
        })
    }
}
