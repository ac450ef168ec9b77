//! A service that does nothing: the 0/0 micro-benchmark's service (BFT-SMaRt's
//! ThroughputLatency server), so measurements show the protocol alone. The reply is empty,
//! unless the request asks for `n` bytes in its first four (little-endian): then `n` zero bytes,
//! at most `MAX_REPLY`, for the benchmark's reply size. A zero-filled request of any size gets
//! an empty reply.

use super::{ExecContext, RestoreError, Service};
use crate::crypto::Digest;

/// The largest reply a request can ask for.
pub const MAX_REPLY: usize = 1 << 20;

/// The reply size a request asks for.
pub fn reply_size(request: &[u8]) -> usize {
    match request.get(..4) {
        Some(b) => (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize).min(MAX_REPLY),
        None => 0,
    }
}

/// A request of `size` bytes (at least 4 if it asks for a reply) that asks for `reply` bytes.
pub fn request(size: usize, reply: usize) -> Vec<u8> {
    let mut r = vec![0u8; if reply > 0 { size.max(4) } else { size }];
    if reply > 0 {
        r[..4].copy_from_slice(&(reply.min(MAX_REPLY) as u32).to_le_bytes());
    }
    r
}

#[derive(Debug, Default, Clone)]
pub struct NoopService {
    executed: u64,
}

impl Service for NoopService {
    fn execute(&mut self, _ctx: &ExecContext, request: &[u8]) -> Vec<u8> {
        self.executed += 1;
        vec![0; reply_size(request)]
    }

    fn query(&self, request: &[u8]) -> Vec<u8> {
        vec![0; reply_size(request)]
    }

    fn snapshot(&self) -> Vec<u8> {
        self.executed.to_le_bytes().to_vec()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        let b: [u8; 8] = snapshot
            .try_into()
            .map_err(|_| RestoreError("noop snapshot must be 8 bytes".into()))?;
        self.executed = u64::from_le_bytes(b);
        Ok(())
    }

    fn state_digest(&self) -> Digest {
        Digest::of(&self.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_as_large_as_asked_and_bounded() {
        let ctx = ExecContext {
            cid: 0,
            timestamp_ms: 0,
            index: 0,
        };
        let mut s = NoopService::default();
        assert!(s.execute(&ctx, &[]).is_empty());
        assert!(s.execute(&ctx, &[0; 1024]).is_empty());
        assert!(s.execute(&ctx, &[7, 0]).is_empty());
        assert_eq!(s.execute(&ctx, &request(0, 100)).len(), 100);
        assert_eq!(request(0, 100).len(), 4);
        assert_eq!(request(64, 100).len(), 64);
        assert_eq!(s.query(&[0xff; 4]).len(), MAX_REPLY);
        assert_eq!(s.snapshot(), 4u64.to_le_bytes());
    }
}
