//! The replicated service: what decided batches are executed on.
//!
//! A service is a deterministic state machine. Correct replicas execute the same requests in the
//! same order with the same contexts and must end in byte-identical states, so a service never
//! reads a clock, never draws randomness of its own and never iterates a hash map into its state
//! or its snapshot. Time enters only as the consensus timestamp of the batch.

pub mod kv;
pub mod noop;

use crate::crypto::Digest;

/// What the ordering layer knows about the request being executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecContext {
    /// Consensus instance that decided the batch.
    pub cid: u64,
    /// The leader's timestamp for the batch, in milliseconds, validated by followers and
    /// non-decreasing across CIDs.
    pub timestamp_ms: u64,
    /// Position of the request in the batch.
    pub index: u32,
}

/// Failure to install a snapshot.
#[derive(Debug, thiserror::Error)]
#[error("snapshot rejected: {0}")]
pub struct RestoreError(pub String);

/// A deterministic replicated state machine.
pub trait Service: Send {
    /// Executes one ordered request and returns the reply bytes, at most
    /// [`limits::MAX_RESULT`](crate::wire::limits::MAX_RESULT) of them: every replica caches
    /// the reply for retransmission, in the state its checkpoints carry, and a larger one would
    /// be refused by its client and make those checkpoints undecodable.
    fn execute(&mut self, ctx: &ExecContext, request: &[u8]) -> Vec<u8>;

    /// Answers a read-only request outside the total order (an unordered request). Must not
    /// change state. The reply is bounded as `execute`'s is.
    fn query(&self, request: &[u8]) -> Vec<u8>;

    /// A canonical serialisation of the whole state: byte-identical on correct replicas that
    /// executed the same requests.
    fn snapshot(&self) -> Vec<u8>;

    /// Hands `snapshot()`'s bytes to `out` in order, in pieces. A large state can then be
    /// hashed, or copied into a checkpoint, without first being copied whole into a buffer of
    /// its own; services whose state is small can keep the default.
    fn write_snapshot(&self, out: &mut dyn FnMut(&[u8])) {
        out(&self.snapshot());
    }

    /// The state as it is now, to be encoded later on another thread: what the result writes is
    /// what `write_snapshot` writes now, whatever this service executes meanwhile. Checkpoints
    /// are taken this way, so that encoding a large state does not stall ordering on every
    /// replica at once. The default takes the snapshot's bytes now; a service with a large state
    /// shares it instead (copy-on-write).
    fn freeze(&self) -> Box<dyn FrozenState> {
        Box::new(self.snapshot())
    }

    /// Replaces the state with a snapshot taken by `snapshot`.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError>;

    /// Digest of the state; by default the digest of the snapshot, hashed as it is produced.
    fn state_digest(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        self.write_snapshot(&mut |piece| {
            h.update(piece);
        });
        Digest(*h.finalize().as_bytes())
    }
}

/// A service's state frozen at one moment ([`Service::freeze`]), encoded where and when the
/// replica chooses.
pub trait FrozenState: Send + Sync {
    /// Hands the snapshot's bytes to `out` in order, in pieces.
    fn write_snapshot(&self, out: &mut dyn FnMut(&[u8]));
}

/// A snapshot already encoded.
impl FrozenState for Vec<u8> {
    fn write_snapshot(&self, out: &mut dyn FnMut(&[u8])) {
        out(self);
    }
}
