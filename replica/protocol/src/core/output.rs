//! What the core asks its driver to do, and what it reports.

use crate::core::promise::Promise;
use crate::core::rejection::Rejection;
use crate::core::state::{Checkpoint, PendingCheckpoint};
use crate::crypto::Digest;
use crate::view::View;
use crate::wire::ids::{Cid, Regency, ReplicaId, ViewId};
use crate::wire::messages::{ClientId, Decision, ReplicaMessage, Reply};

/// An action for the driver.
#[derive(Debug, Clone)]
pub enum Output {
    /// Send to one replica.
    Send { to: ReplicaId, msg: ReplicaMessage },
    /// Send to every other replica of the view.
    Broadcast { msg: ReplicaMessage },
    /// Answer a client with a reply computed from the state after `from` (with
    /// `Config::persist`, a state this replica keeps through a crash).
    Reply {
        client: ClientId,
        reply: Reply,
        from: Option<Cid>,
    },
    /// Append a decided instance to the log (only with `Config::persist`), in CID order.
    Persist(Decision),
    /// Make this promise durable before sending any output after it (only with
    /// `Config::persist`): it replaces the previous one.
    Promise(Promise),
    /// Encode this checkpoint off the event loop and hand the result to
    /// `Replica::on_checkpoint_encoded` (only with `Config::defer_checkpoints`).
    EncodeCheckpoint(PendingCheckpoint),
    /// A checkpoint was taken after executing `checkpoint.meta.cid`, in `view`: store it; the
    /// log up to `trim_before` is no longer needed.
    Checkpoint {
        checkpoint: Checkpoint,
        view: View,
        trim_before: Cid,
    },
    /// The state was replaced by a transferred checkpoint: store it and restart the log after it.
    StateInstalled(Checkpoint),
    /// A new view is installed: persist it, connect to new members, drop removed ones.
    ViewChanged(View),
}

impl Output {
    /// Storage and membership actions, as opposed to messages.
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            Output::Persist(_)
                | Output::Promise(_)
                | Output::EncodeCheckpoint(_)
                | Output::Checkpoint { .. }
                | Output::StateInstalled(_)
                | Output::ViewChanged(_)
        )
    }
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
        /// Decided on all n ACCEPTs with their signatures left to check until shown.
        unchecked: bool,
    },
    RegencyInstalled {
        regency: Regency,
        leader: ReplicaId,
    },
    /// A message or request was refused (`from`: the replica that sent it, if one did).
    Rejected {
        from: Option<ReplicaId>,
        reason: Rejection,
    },
    /// This replica asked for a leader change.
    Suspected {
        regency: Regency,
        why: Suspicion,
    },
    /// A reconfiguration installed a new view after `cid`.
    ViewInstalled {
        cid: Cid,
        view: ViewId,
        n: usize,
        f: usize,
        member: bool,
    },
    CheckpointTaken {
        cid: Cid,
        digest: Digest,
    },
    /// State transfer started fetching the checkpoint at `cid`.
    TransferStarted {
        cid: Cid,
        len: u64,
        from: ReplicaId,
    },
    /// A transferred checkpoint was installed.
    StateInstalled {
        cid: Cid,
    },
    /// This replica's own checkpoint at `cid` disagrees with f+1 others: it repairs itself.
    Diverged {
        cid: Cid,
    },
    /// The leader of `regency` would have been judged slow, but this replica's host was short
    /// of CPU (see `Replica::set_host_busy`), so it was not. Once per regency.
    SlowLeaderWithheld {
        regency: Regency,
    },
}

/// Why a replica asks for a leader change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspicion {
    /// A request waited longer than the request timeout.
    RequestTimeout,
    /// The leader is slower than the recent regencies' baseline allows.
    SlowLeader,
    /// The leader change itself did not complete in time: ask for the next regency.
    LeaderChangeTimeout,
    /// f+1 replicas asked for a change, so at least one correct replica did.
    JoinedLeaderChange,
    /// The leader sent what a correct leader never sends.
    Rejected(Rejection),
    /// A SYNC chose a batch that does not pass the checks on a proposed batch.
    InvalidSyncBatch,
}

impl Suspicion {
    /// The stable snake_case label, for logs and reports.
    pub fn label(self) -> &'static str {
        match self {
            Suspicion::RequestTimeout => "request_timeout",
            Suspicion::SlowLeader => "slow_leader",
            Suspicion::LeaderChangeTimeout => "leader_change_timeout",
            Suspicion::JoinedLeaderChange => "joined_leader_change",
            Suspicion::Rejected(r) => r.label(),
            Suspicion::InvalidSyncBatch => "invalid_sync_batch",
        }
    }
}
