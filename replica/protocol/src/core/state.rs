//! The replicated state as a checkpoint: everything a replica needs to continue ordering after
//! a CID, in one canonical encoding whose digest f+1 replicas must vouch for.
//!
//! The service snapshot alone is not enough: which requests execute depends on the session
//! table, and which replicas vote depends on the view, and the next batch's timestamp must not go
//! below the last one. All of it is deterministic, so correct replicas encode identical bytes.

use std::sync::Arc;

use crate::core::clients::Sessions;
use crate::crypto::Digest;
use crate::service::{FrozenState, Service};
use crate::view::View;
use crate::wire::codec::{Decode, DecodeError, Encode, Reader, Writer};
use crate::wire::ids::Cid;
use crate::wire::messages::CheckpointMeta;

/// Largest service snapshot a checkpoint holds (the length prefix is 32 bits).
pub const MAX_SERVICE_SNAPSHOT: usize = u32::MAX as usize;

/// A decoded checkpoint, borrowing the service snapshot from the checkpoint's bytes (which can
/// be gigabytes: a copy would double what installing one costs).
#[derive(Debug, Clone)]
pub struct ReplicaState<'a> {
    /// The last CID executed.
    pub cid: Cid,
    pub timestamp_ms: u64,
    pub view: View,
    /// The first CID ordered in `view`.
    pub view_since: Cid,
    /// The view before it, which proved the decisions before `view_since`.
    pub previous_view: Option<View>,
    pub sessions: Sessions,
    pub service: &'a [u8],
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

/// Encodes a checkpoint, the service writing its snapshot straight into the checkpoint's
/// buffer: the state is never held twice.
pub fn encode_state(o: &OrderingState<'_>, service: &dyn Service) -> Vec<u8> {
    finish_state(encode_ordering(o), |out| service.write_snapshot(out))
}

/// The ordering layer's part of a checkpoint, which comes first.
fn encode_ordering(o: &OrderingState<'_>) -> Vec<u8> {
    let mut w = Writer::new();
    w.u8(STATE_VERSION);
    o.cid.encode(&mut w);
    w.u64(o.timestamp_ms);
    o.view.encode(&mut w);
    o.view_since.encode(&mut w);
    w.option(o.previous_view, |w, v| v.encode(w));
    o.sessions.encode(&mut w);
    w.finish()
}

/// Appends the service's snapshot, written by `snapshot`, to the ordering part.
fn finish_state(mut buf: Vec<u8>, snapshot: impl FnOnce(&mut dyn FnMut(&[u8]))) -> Vec<u8> {
    // The snapshot's length prefix, filled in once the snapshot is written.
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    snapshot(&mut |piece| buf.extend_from_slice(piece));
    // Saturating like `Writer::bytes`: a snapshot past 4 GiB does not decode (MAX_SERVICE_SNAPSHOT).
    let len = u32::try_from(buf.len() - at - 4).unwrap_or(u32::MAX);
    buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    buf
}

/// A checkpoint frozen at its CID and not yet encoded: the replica hands it to its driver,
/// which encodes and hashes it on another thread ([`PendingCheckpoint::encode`]) and gives the
/// result back ([`Replica::on_checkpoint_encoded`](crate::core::Replica::on_checkpoint_encoded)).
/// The bytes are those the replica would have encoded at the CID, so correct replicas still
/// agree on them, while ordering goes on meanwhile.
#[derive(Clone)]
pub struct PendingCheckpoint {
    pub cid: Cid,
    pub view: View,
    /// The state the replica froze it from; a state transfer installed before the encoding
    /// comes back moves the replica on, and makes this checkpoint moot.
    pub(crate) epoch: u64,
    ordering: Vec<u8>,
    service: Arc<dyn FrozenState>,
}

impl std::fmt::Debug for PendingCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingCheckpoint")
            .field("cid", &self.cid)
            .field("view", &self.view.id)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl PendingCheckpoint {
    pub(crate) fn freeze(o: &OrderingState<'_>, service: &dyn Service, epoch: u64) -> Self {
        PendingCheckpoint {
            cid: o.cid,
            view: o.view.clone(),
            epoch,
            ordering: encode_ordering(o),
            service: Arc::from(service.freeze()),
        }
    }

    /// Encodes and hashes the checkpoint: the slow part, for any thread.
    pub fn encode(&self) -> EncodedCheckpoint {
        let service = &self.service;
        let bytes = finish_state(self.ordering.clone(), |out| service.write_snapshot(out));
        EncodedCheckpoint {
            checkpoint: Checkpoint::new(self.cid, &self.view, bytes),
            view: self.view.clone(),
            epoch: self.epoch,
        }
    }
}

/// A [`PendingCheckpoint`] encoded, for the replica that froze it.
#[derive(Debug, Clone)]
pub struct EncodedCheckpoint {
    pub checkpoint: Checkpoint,
    pub view: View,
    pub(crate) epoch: u64,
}

const STATE_VERSION: u8 = 1;

impl<'a> ReplicaState<'a> {
    /// Decodes a whole checkpoint (trailing bytes are an error).
    pub fn decode_from(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let st = Self::decode_reader(&mut r)?;
        r.finish()?;
        Ok(st)
    }

    fn decode_reader(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
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
            service: r.bytes("service snapshot", MAX_SERVICE_SNAPSHOT)?,
        })
    }
}

/// Where the driver stored a checkpoint's bytes, so that the core can serve state transfer from
/// there instead of keeping them in memory (see `Replica::checkpoint_stored`). Reads are of
/// bytes the driver already holds (a local file): short, and never of the network.
pub trait StoredCheckpoint: Send + Sync + std::fmt::Debug {
    /// Fills `buf` with the checkpoint's bytes from `offset` on.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// A checkpoint's bytes as the core keeps them to serve state transfer.
#[derive(Debug, Clone)]
pub enum HeldBytes {
    Memory(Arc<Vec<u8>>),
    Stored(Arc<dyn StoredCheckpoint>),
}

impl HeldBytes {
    /// `len` bytes from `offset`, or `None` if the store cannot read them.
    pub fn read(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        match self {
            HeldBytes::Memory(b) => {
                let start = usize::try_from(offset).ok()?;
                b.get(start..start.checked_add(len)?).map(<[u8]>::to_vec)
            }
            HeldBytes::Stored(s) => {
                let mut buf = vec![0; len];
                s.read_at(offset, &mut buf).ok()?;
                Some(buf)
            }
        }
    }
}

/// A checkpoint this replica took or installed, handed to the driver to store.
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
