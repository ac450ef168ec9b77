//! A node's simulated disk: what survives its crash.

use kmmr_protocol::core::output::Output;
use kmmr_protocol::core::promise::Promise;
use kmmr_protocol::core::replica::Replica;
use kmmr_protocol::wire::ids::Cid;
use kmmr_protocol::wire::messages::Decision;

/// Decisions the simulated log may lose in a crash (`Crash::lost_tail` is at most this, and
/// only those not synced yet are lost).
pub(super) const LOG_LAG: usize = 3;
/// A decision appended to the log is synced within this long (the node's group commit), or,
/// on the slow disks of some seeds, within `SLOW_LOG_SYNC_MAX_US`: long enough for a crash to
/// catch decisions a replica acted on that its log does not hold yet.
pub(super) const LOG_SYNC_MAX_US: u64 = 2_000;
pub(super) const SLOW_LOG_SYNC_MAX_US: u64 = 20_000;

/// What a node persisted: its newest checkpoint and the decision at its CID, the decisions
/// logged after it, its promise.
#[derive(Default)]
pub(super) struct SimDisk {
    pub(super) checkpoint: Option<Vec<u8>>,
    /// A checkpoint this replica took is written only once the log holds its decision durably
    /// (as the node's checkpoint thread waits for the log), so no crash loses this one.
    pub(super) checkpoint_decision: Option<Decision>,
    pub(super) decisions: Vec<Decision>,
    pub(super) promise: Option<Promise>,
    /// Every decision up to this CID is synced (in the log, or in a checkpoint).
    pub(super) synced: Option<Cid>,
}

impl SimDisk {
    pub(super) fn apply(&mut self, out: &Output, replica: &Replica) {
        match out {
            Output::Persist(d) if self.decisions.last().is_none_or(|l| l.cid.next() == d.cid) => {
                self.decisions.push(d.clone());
            }
            Output::Promise(p) => {
                // The log syncs in groups: the last few decisions may not be durable when the
                // promise is (a crash's `lost_tail`), so the promise carries them, as the node
                // does for those its log has not synced.
                let mut p = p.clone();
                replica.complete_promise(&mut p, self.synced);
                self.promise = Some(p);
            }
            Output::Checkpoint { checkpoint: cp, .. } | Output::StateInstalled(cp) => {
                let cid = cp.meta.cid;
                self.checkpoint = Some(cp.bytes.as_ref().clone());
                self.checkpoint_decision = self.decisions.iter().find(|d| d.cid == cid).cloned();
                self.decisions.retain(|d| d.cid > cid);
                self.synced = self.synced.max(Some(cid));
                if matches!(out, Output::StateInstalled(_)) {
                    self.checkpoint_decision = None;
                    self.decisions.clear();
                    self.synced = Some(cid);
                }
            }
            _ => {}
        }
    }
}
