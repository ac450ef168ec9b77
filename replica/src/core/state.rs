//! The replicated state as a checkpoint: everything a replica needs to continue ordering after
//! a CID, in one canonical encoding whose digest f+1 replicas must vouch for.
//!
//! The service snapshot alone is not enough: which requests execute depends on the session
//! table, and which replicas vote depends on the view, and the next batch's timestamp must not go
//! below the last one. All of it is deterministic, so correct replicas encode identical bytes.

use std::sync::Arc;

use crate::core::clients::Sessions;
use crate::core::view::View;
use crate::crypto::Digest;
use crate::wire::codec::{Decode, DecodeError, Encode, Reader, Writer};
use crate::wire::ids::Cid;
use crate::wire::messages::CheckpointMeta;

/// Largest service snapshot a checkpoint holds (the length prefix is 32 bits).
pub const MAX_SERVICE_SNAPSHOT: usize = u32::MAX as usize;

/// A decoded checkpoint.
#[derive(Debug, Clone)]
pub struct ReplicaState {
    /// The last CID executed.
    pub cid: Cid,
    pub timestamp_ms: u64,
    pub view: View,
    /// The first CID ordered in `view`.
    pub view_since: Cid,
    /// The view before it, which proved the decisions before `view_since`.
    pub previous_view: Option<View>,
    pub sessions: Sessions,
    pub service: Vec<u8>,
}

/// The ordering layer's part of a checkpoint.
pub struct OrderingState<'a> {
    pub cid: Cid,
    pub timestamp_ms: u64,
    pub view: &'a View,
    pub view_since: Cid,
    pub previous_view: Option<&'a View>,
    pub sessions: &'a Sessions,
}

/// Encodes a checkpoint without building a `ReplicaState` (the service snapshot can be large).
pub fn encode_state(o: &OrderingState<'_>, service: &[u8]) -> Vec<u8> {
    let mut w = Writer::with_capacity(service.len() + 4096);
    w.u8(STATE_VERSION);
    o.cid.encode(&mut w);
    w.u64(o.timestamp_ms);
    o.view.encode(&mut w);
    o.view_since.encode(&mut w);
    w.option(o.previous_view, |w, v| v.encode(w));
    o.sessions.encode(&mut w);
    w.bytes(service);
    w.finish()
}

const STATE_VERSION: u8 = 1;

impl Decode for ReplicaState {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let version = r.u8()?;
        if version != STATE_VERSION {
            return Err(DecodeError::UnknownTag {
                what: "checkpoint version",
                tag: version,
            });
        }
        Ok(ReplicaState {
            cid: Cid::decode(r)?,
            timestamp_ms: r.u64()?,
            view: View::decode(r)?,
            view_since: Cid::decode(r)?,
            previous_view: r.option(View::decode)?,
            sessions: Sessions::decode(r)?,
            service: r.bytes_vec("service snapshot", MAX_SERVICE_SNAPSHOT)?,
        })
    }
}

/// A checkpoint this replica took or installed, kept in memory to serve state transfer.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub bytes: Arc<Vec<u8>>,
}

impl Checkpoint {
    pub fn new(cid: Cid, view: &View, bytes: Vec<u8>) -> Self {
        let meta = CheckpointMeta {
            cid,
            view: view.id,
            digest: Digest::of(&bytes),
            len: bytes.len() as u64,
        };
        Checkpoint {
            meta,
            bytes: Arc::new(bytes),
        }
    }
}
