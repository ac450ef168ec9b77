//! What the core asks its driver to do, and what it reports.

use crate::crypto::Digest;
use crate::wire::ids::{Cid, Regency, ReplicaId};
use crate::wire::messages::{ClientId, ReplicaMessage, Reply};

/// An action for the driver.
#[derive(Debug, Clone)]
pub enum Output {
    /// Send to one replica.
    Send { to: ReplicaId, msg: ReplicaMessage },
    /// Send to every other replica of the view.
    Broadcast { msg: ReplicaMessage },
    /// Answer a client.
    Reply { client: ClientId, reply: Reply },
}

/// Something that happened, for metrics, logs and the simulator's checkers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Decided {
        cid: Cid,
        digest: Digest,
        requests: usize,
        timestamp_ms: u64,
        /// From holding the first proposal to deciding, if this replica saw a proposal.
        latency_us: Option<u64>,
    },
    RegencyInstalled {
        regency: Regency,
        leader: ReplicaId,
    },
    /// A message or request was refused; `reason` is a stable metric label.
    Rejected {
        from: Option<ReplicaId>,
        reason: &'static str,
    },
    /// This replica asked for a leader change.
    Suspected {
        regency: Regency,
        why: &'static str,
    },
}
