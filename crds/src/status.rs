//! What the operator reports: `BftCluster.status`, computed from what the replicas themselves
//! say (their signed `/status`), cross-checked. The status carries no timestamp that changes on
//! every pass (only conditions' lastTransitionTime, which changes on transitions), so it never
//! flaps and writing it does not re-trigger reconciles.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a BftCluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BftClusterStatus {
    /// The metadata.generation this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Number of replicas in the current view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<i32>,

    /// Faulty replicas the current view tolerates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f: Option<i32>,

    /// Replicas that report healthy and agree on the current view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<i32>,

    /// Replicas needed to decide: ceil((n+f+1)/2), 2f+1 when n = 3f+1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<i32>,

    /// Id of the replica that f+1 replicas name as leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<i32>,

    /// Id of the view that f+1 replicas report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view_id: Option<i64>,

    /// State digest that at least f+1 replicas report for the latest common checkpoint (at least
    /// one of them is correct, so this is the correct state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreed_state_digest: Option<String>,

    /// Ids of replicas whose state digest differs from agreedStateDigest: candidates for
    /// replacement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub diverged_replicas: Vec<i32>,

    /// Each member of the current view as it reports itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub members: Vec<MemberStatus>,

    /// Available, Degraded, Reconfiguring and FaultToleranceExceeded, each with a reason and a
    /// message saying what to do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// What stopped the last reconcile, if it failed (cleared by the next one that succeeds):
    /// shown by `kubectl describe` beside the Warning Event of the same reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ReconcileError>,

    /// The etcd v3 API, while spec.etcdAPI is enabled: where it is served and the Secrets a
    /// kube-apiserver needs.
    #[serde(default, rename = "etcdAPI", skip_serializing_if = "Option::is_none")]
    pub etcd_api: Option<EtcdApiStatus>,

    /// Backups (spec.backup): the newest one written, and the newest failure after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<crate::backup::BackupStatus>,
}

/// Where the etcd v3 API is served and how to reach it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EtcdApiStatus {
    /// URL for kube-apiserver's --etcd-servers: https://<name>-etcd.<namespace>.svc:2379.
    pub endpoint: String,
    /// The Service in front of the gateways.
    pub service_name: String,
    /// The Service's cluster IP, once assigned (also in the server certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    /// Secret of type kubernetes.io/tls with the client certificate (tls.crt, tls.key) and the
    /// CA (ca.crt) for kube-apiserver's --etcd-certfile, --etcd-keyfile and --etcd-cafile.
    pub client_secret_name: String,
    /// Secret of type kubernetes.io/tls with the gateways' server certificate, and ca.crt.
    pub server_secret_name: String,
    /// Secret holding the CA's certificate and key; mounted by no pod.
    pub ca_secret_name: String,
    /// Gateway pods asked for.
    pub gateways: i32,
    /// Gateway pods running the current template and ready (listening with the current view
    /// and certificates).
    pub ready_gateways: i32,
}

/// A reconcile that failed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileError {
    /// CamelCase, the reason of the Warning Event and the `error` label of the operator's
    /// failure metric.
    pub reason: String,
    /// What went wrong and what to do about it.
    pub message: String,
    /// When reconciles first failed for this reason (unchanged while they keep failing so).
    pub since: Time,
}

/// One member of the view.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Replica id in the view.
    pub id: i32,
    /// Healthy (answers /healthz and signs a /status that matches the view), Unhealthy (answers
    /// but reports a problem, or its status is not signed by its key in the view) or Unreachable.
    pub health: MemberHealth,
    /// Leader or Follower by the replica's own regency, Unknown if it did not report.
    pub role: MemberRole,
    /// View id the replica reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view_id: Option<i64>,
    /// Last consensus instance (CID) the replica decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decided_cid: Option<i64>,
    /// Digest of the replica's state at its latest checkpoint, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_digest: Option<String>,
    /// Why the member is not Healthy: the evidence against it (unreachable, a status not signed
    /// by its key, another view, catching up, a diverged state, a Byzantine test mode it runs).
    /// A Healthy member may carry a note here too: a leader change it is taking part in, which
    /// makes it unhealthy only if it still shows at the next observation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// What kind of problem `problem` describes, for tools: the text is for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem_reason: Option<MemberProblem>,
    /// When the operator first saw this kind of problem on this member (unchanged while it
    /// lasts, so the status does not change on every pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem_since: Option<Time>,
}

/// What is wrong with a member, or what it is going through.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberProblem {
    // Did not answer its status endpoint.
    Unreachable,
    // Answered with a status that is not signed by its key in the view, or not about itself.
    StatusRejected,
    // Its state differs from the one f+1 replicas agree on.
    StateDiverged,
    // More than f replicas caught it sending what no correct replica sends.
    Accused,
    // Runs a Byzantine test mode.
    ByzantineTestMode,
    // Reports another view than the operator's.
    OtherView,
    // Does not count itself a member of its view.
    NotAMember,
    // Fetching the state from the others.
    TransferringState,
    // Decided well behind what f+1 replicas decided.
    CatchingUp,
    // Taking part in a leader change (Healthy while it is short).
    LeaderChange,
    // Installing the view the operator just changed to (Healthy: the change was decided).
    InstallingView,
}

/// Health of one member.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberHealth {
    // Answers /healthz and signs a /status that matches the view.
    Healthy,
    // Answers but reports a problem, or its status is not signed by its key in the view.
    Unhealthy,
    // Did not answer.
    Unreachable,
}

/// Role of one member.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberRole {
    // The leader of the current regency.
    Leader,
    // Any other member.
    Follower,
    // Not known (the replica did not report).
    Unknown,
}

/// The condition types the operator sets.
pub mod condition_types {
    /// A quorum of healthy replicas agrees on the view and the state.
    pub const AVAILABLE: &str = "Available";
    /// At least one replica is unhealthy, unreachable or diverged, but no more than f.
    pub const DEGRADED: &str = "Degraded";
    /// The view is being moved toward spec.replicas (a member joining or leaving).
    pub const RECONFIGURING: &str = "Reconfiguring";
    /// More than f replicas are faulty: safety is no longer guaranteed. Sticky until a human acts.
    pub const FAULT_TOLERANCE_EXCEEDED: &str = "FaultToleranceExceeded";
    /// Reconciliation is paused (spec.paused or the kmmr.io/paused annotation): children are
    /// left as they are, status is still reported.
    pub const PAUSED: &str = "Paused";
    /// The last reconcile went through (True), or what stopped it (False, with the error's
    /// reason and message).
    pub const RECONCILED: &str = "Reconciled";
    /// The newest backup Job (spec.backup) succeeded (True) or failed (False, with what it
    /// said), or backups cannot run as configured (False).
    pub const LAST_BACKUP_SUCCEEDED: &str = "LastBackupSucceeded";
    /// spec.restoreFrom: every replica started from the backup (True), is still starting from
    /// it (False, Restoring), or refused it (False, RestoreRefused, with the replica's reason).
    pub const RESTORED: &str = "Restored";
}

/// Reasons for the conditions (CamelCase, as the Condition schema requires); each is also an
/// Event reason.
pub mod condition_reasons {
    /// Available=True.
    pub const QUORUM_HEALTHY: &str = "QuorumHealthy";
    /// Available=False: fewer than a quorum of replicas are healthy.
    pub const QUORUM_LOST: &str = "QuorumLost";
    /// Degraded=True: some replicas are unhealthy or unreachable.
    pub const REPLICAS_UNHEALTHY: &str = "ReplicasUnhealthy";
    /// Degraded=True: some replicas' state digest differs from the f+1-agreed one.
    pub const STATE_DIVERGED: &str = "StateDiverged";
    /// Degraded=True: some replicas misbehave: a /status not signed by their key in the view
    /// (or about another replica, or malformed), or a Byzantine test mode they run.
    pub const REPLICAS_MISBEHAVING: &str = "ReplicasMisbehaving";
    /// Degraded=False.
    pub const ALL_REPLICAS_HEALTHY: &str = "AllReplicasHealthy";
    /// Reconfiguring=True: a replica is joining the view.
    pub const SCALING_OUT: &str = "ScalingOut";
    /// Reconfiguring=True: a replica is leaving the view.
    pub const SCALING_IN: &str = "ScalingIn";
    /// Reconfiguring=False.
    pub const VIEW_MATCHES_SPEC: &str = "ViewMatchesSpec";
    /// FaultToleranceExceeded=True.
    pub const TOO_MANY_FAULTS: &str = "TooManyFaults";
    /// FaultToleranceExceeded=False.
    pub const WITHIN_FAULT_TOLERANCE: &str = "WithinFaultTolerance";
    /// Any condition: the spec is invalid (stored before a validation rule existed).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Paused=True: reconciliation is paused by spec.paused or the kmmr.io/paused annotation.
    pub const PAUSED: &str = "Paused";
    /// Paused=False.
    pub const RECONCILING: &str = "Reconciling";
    /// Available, Degraded and FaultToleranceExceeded while no replica has been healthy yet:
    /// a new cluster's pods are starting, which is not a fault.
    pub const STARTING: &str = "Starting";
    /// Reconfiguring=True: f is changing, the members stay.
    pub const CHANGING_FAULT_TOLERANCE: &str = "ChangingFaultTolerance";
    /// Reconfiguring=False: spec.replicas or spec.f differs from the view, but the operator runs
    /// with reconfiguration disabled (`--no-reconfiguration`); nothing was changed.
    pub const RECONFIGURATION_DISABLED: &str = "ReconfigurationDisabled";
    /// Reconfiguring=False: the change would leave fewer healthy replicas than a quorum, so it
    /// waits until enough replicas are healthy; or the replicas refused it.
    pub const RECONFIGURATION_BLOCKED: &str = "ReconfigurationBlocked";
    /// Reconciled=True: the last reconcile applied the spec. (Reconciled=False carries the
    /// reason of the error that stopped it.)
    pub const RECONCILE_SUCCEEDED: &str = "ReconcileSucceeded";
    /// LastBackupSucceeded=True.
    pub const BACKUP_SUCCEEDED: &str = "BackupSucceeded";
    /// LastBackupSucceeded=False: the newest backup Job failed.
    pub const BACKUP_FAILED: &str = "BackupFailed";
    /// LastBackupSucceeded=False: spec.backup cannot run (a bad schedule, a missing claim).
    pub const BACKUP_MISCONFIGURED: &str = "BackupMisconfigured";
    /// LastBackupSucceeded=False: backups are configured, none has finished yet.
    pub const NO_BACKUP_YET: &str = "NoBackupYet";
    /// Restored=False: the replicas are verifying and copying the backup.
    pub const RESTORING: &str = "Restoring";
    /// Restored=True.
    pub const RESTORE_SUCCEEDED: &str = "RestoreSucceeded";
    /// Restored=False: a replica refused the backup file (damaged, missing, not a backup), or
    /// its claim does not exist; the cluster does not start.
    pub const RESTORE_REFUSED: &str = "RestoreRefused";
}
