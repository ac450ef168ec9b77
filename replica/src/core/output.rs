//! What the core asks its driver to do, and what it reports.

use crate::core::promise::Promise;
use crate::core::state::Checkpoint;
use crate::core::view::View;
use crate::crypto::Digest;
use crate::wire::ids::{Cid, Regency, ReplicaId, ViewId};
use crate::wire::messages::{ClientId, Decision, ReplicaMessage, Reply};

/// An action for the driver.
#[derive(Debug, Clone)]
pub enum Output {
    /// Send to one replica.
    Send { to: ReplicaId, msg: ReplicaMessage },
    /// Send to every other replica of the view.
    Broadcast { msg: ReplicaMessage },
    /// Answer a client.
    Reply { client: ClientId, reply: Reply },
    /// Append a decided instance to the log (only with `Config::persist`), in CID order.
    Persist(Decision),
    /// Make this promise durable before sending any output after it (only with
    /// `Config::persist`): it replaces the previous one.
    Promise(Promise),
    /// A checkpoint was taken after executing `checkpoint.meta.cid`: store it; the log up to
    /// `trim_before` is no longer needed.
    Checkpoint {
        checkpoint: Checkpoint,
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
}

/// Whether a rejection `reason` (of a message from a replica) proves that replica faulty: a
/// correct replica never sends such a message, whatever the timing. Reasons a correct replica
/// can cause (it is ahead, behind, or asked for a checkpoint just trimmed) are not listed, nor
/// are proofs that failed against a view the rejecting replica does not hold for them
/// (`*_in_unheld_view`: made in an older or newer view, they may be sound there).
pub fn proves_misbehaviour(reason: &str) -> bool {
    matches!(
        reason,
        "forged_accept"
            | "forged_relayed_request"
            | "forged_request_in_batch"
            | "equivocating_propose"
            | "equivocating_write"
            | "equivocating_accept"
            | "propose_from_non_leader"
            | "invalid_collect"
            | "invalid_decision_proof"
            | "unproven_last_decision"
            | "bad_checkpoint_bytes"
            | "batch_too_large"
            | "unordered_request_in_batch"
            | "duplicate_request_in_batch"
            | "replayed_request"
            | "sync_unproven_last"
            | "sync_collect_wrong_regency"
            | "sync_duplicate_collect"
            | "sync_forged_collect"
            | "sync_collects_not_sound"
            | "sync_dropped_bound_value"
    )
}

#[cfg(test)]
mod tests {
    use super::proves_misbehaviour;

    #[test]
    fn only_what_a_correct_replica_never_sends_is_evidence() {
        assert!(proves_misbehaviour("forged_accept"));
        assert!(proves_misbehaviour("equivocating_propose"));
        // A correct replica ahead of this one, or asking for a checkpoint just trimmed.
        assert!(!proves_misbehaviour("too_far_ahead"));
        assert!(!proves_misbehaviour("unknown_checkpoint"));
        assert!(!proves_misbehaviour("future_buffer_full"));
        // Proofs judged against a view that may not be theirs: a joiner shown the SYNC of a
        // regency installed views ago, a laggard sent decisions of a view it has not reached.
        assert!(!proves_misbehaviour("sync_in_unheld_view"));
        assert!(!proves_misbehaviour("decision_in_unheld_view"));
        assert!(!proves_misbehaviour("stopdata_last_in_unheld_view"));
    }
}
