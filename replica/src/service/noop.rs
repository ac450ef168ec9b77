//! A service that does nothing and answers with an empty reply: the 0/0 micro-benchmark's
//! service (BFT-SMaRt's ThroughputLatency server), so measurements show the protocol alone.

use super::{ExecContext, RestoreError, Service};
use crate::crypto::Digest;

#[derive(Debug, Default, Clone)]
pub struct NoopService {
    executed: u64,
}

impl Service for NoopService {
    fn execute(&mut self, _ctx: &ExecContext, _request: &[u8]) -> Vec<u8> {
        self.executed += 1;
        Vec::new()
    }

    fn query(&self, _request: &[u8]) -> Vec<u8> {
        Vec::new()
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
