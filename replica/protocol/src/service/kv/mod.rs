//! The revisioned key-value store: etcd's data model for Kubernetes control-plane state.
//!
//! This module owns the KV service's state machine ([`KvStore`]), its request and response types
//! and their canonical encodings, and its snapshot format. It provides a global revision bumped
//! once per writing request or transaction, per-key create/mod revisions and versions, range
//! reads (also at past revisions), compare-and-swap transactions, an event log answering watch
//! polls, compaction (explicit and bounded automatic retention) and leases that expire only by
//! consensus time. Streaming watches to clients is the network layer's job; the store only
//! answers "what happened after revision r".
//!
//! Entry points: [`KvStore::apply`] (typed, ordered), [`KvStore::read`] (typed, read-only), and
//! the [`Service`] impl, which takes and returns the canonical encodings of [`KvRequest`] and
//! [`KvResponse`].

mod encoding;
mod snapshot;
mod store;
mod types;

#[cfg(test)]
mod budget_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use snapshot::Frozen;
pub use store::{KvStore, WatchBatch, DEFAULT_HISTORY_LIMIT, INITIAL_REVISION, NEVER_COMPACTED};
pub use types::*;

use super::{ExecContext, FrozenState, RestoreError, Service};
use crate::wire::codec::{Decode, Encode};
use crate::wire::limits;

/// The reply's bytes, or a [`KvError::TooLarge`] in their place when they would not fit in a
/// reply on the wire (which every client would refuse, and which, cached for retransmission,
/// would make checkpoints undecodable).
fn bounded(response: KvResponse) -> Vec<u8> {
    let bytes = response.to_bytes();
    if bytes.len() <= limits::MAX_RESULT {
        return bytes;
    }
    KvResponse::Error(ErrorResponse {
        header: *response.header(),
        error: KvError::TooLarge {
            bytes: bytes.len() as u64,
            limit: limits::MAX_RESULT as u64,
        },
    })
    .to_bytes()
}

impl Service for KvStore {
    fn execute(&mut self, ctx: &ExecContext, request: &[u8]) -> Vec<u8> {
        let response = match KvRequest::from_bytes(request) {
            Ok(req) => self.apply(ctx, &req),
            Err(e) => {
                // Leases expire by consensus time whatever the request turns out to be, so a
                // malformed request still advances the clock on every replica alike.
                self.advance_time(ctx.timestamp_ms);
                KvResponse::Error(ErrorResponse {
                    header: ResponseHeader {
                        revision: self.revision(),
                    },
                    error: KvError::Malformed(e.to_string()),
                })
            }
        };
        bounded(response)
    }

    fn query(&self, request: &[u8]) -> Vec<u8> {
        let response = match KvRequest::from_bytes(request) {
            Ok(req) => self.read(&req),
            Err(e) => KvResponse::Error(ErrorResponse {
                header: ResponseHeader {
                    revision: self.revision(),
                },
                error: KvError::Malformed(e.to_string()),
            }),
        };
        bounded(response)
    }

    fn snapshot(&self) -> Vec<u8> {
        self.encode_snapshot()
    }

    fn write_snapshot(&self, out: &mut dyn FnMut(&[u8])) {
        KvStore::write_snapshot(self, out)
    }

    fn freeze(&self) -> Box<dyn FrozenState> {
        Box::new(KvStore::freeze(self))
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        *self = KvStore::decode_snapshot(snapshot, self.history_limit())?;
        Ok(())
    }
}
