//! What a user writes: `BftCluster.spec`, with the admission rules (schema bounds and CEL) that
//! reject what the operator could never run, and `validate()`, the same rules in Rust for the
//! operator to re-check (an object stored before a rule existed is still reported, not run).

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::backup::{BackupSpec, RestoreSpec};
use crate::quorum::{default_f, QuorumError};

/// The smallest n: 3f+1 with f = 1.
pub const MIN_REPLICAS: i32 = 4;
/// The largest n the operator accepts. Every decision waits for 2f+1 replicas and each replica
/// is a StatefulSet of its own, so larger clusters should be split instead.
pub const MAX_REPLICAS: i32 = 100;
/// The longest cluster name: child names append up to 12 characters (`-replicas`, `-99-key`),
/// a StatefulSet's name plus its revision hash must fit a 63-character label, and pod DNS names
/// `<cluster>-<i>-0` must stay a DNS label.
pub const MAX_NAME_LEN: i32 = 40;

pub(crate) const MSG_REPLICAS_MIN: &str =
    "spec.replicas must be at least 4: BFT needs n >= 3f+1 with f >= 1";
pub(crate) const MSG_REPLICAS_MAX: &str =
    "spec.replicas must be at most 100: every decision waits for 2f+1 replicas; split larger workloads across several BftClusters";
pub(crate) const MSG_F: &str =
    "spec.f must be at least 1 and spec.replicas must be at least 3*spec.f+1: raise spec.replicas, lower spec.f, or omit spec.f to use floor((spec.replicas-1)/3)";
pub(crate) const MSG_NAME: &str =
    "metadata.name must be at most 40 characters: child names such as <name>-<i>-0.<name>-replicas must stay valid DNS labels";
pub(crate) const MSG_KEYS_IMMUTABLE: &str =
    "spec.keys cannot be added, removed or changed: replacing keys is a reconfiguration the operator does not support yet; create a new BftCluster";
pub(crate) const MSG_STORAGE_IMMUTABLE: &str =
    "spec.storage is immutable: StatefulSet volume claim templates cannot change; create a new BftCluster to use another storage class or size";
pub(crate) const MSG_PORTS_IMMUTABLE: &str =
    "spec.ports is immutable: the ports are part of every member's address in the view";
pub(crate) const MSG_CLIENT_PORT: &str =
    "spec.ports.client must equal spec.ports.replica + 1000: clients reach each replica at its view address's port plus 1000";
pub(crate) const MSG_PORTS_DISTINCT: &str =
    "spec.ports.http must differ from spec.ports.replica and spec.ports.client";
pub(crate) const MSG_GATEWAYS: &str =
    "spec.etcdAPI.replicas must be between 1 and 9: each gateway is a full client of the cluster (every answer needs a quorum of replicas), and 2 already keeps the API up through a gateway's restart";

/// The most etcd gateways one cluster runs.
pub const MAX_GATEWAYS: i32 = 9;
/// The port the etcd API is served on (the gateway pods and the Service), etcd's client port.
pub const ETCD_API_PORT: i32 = 2379;

/// A Byzantine fault-tolerant KmMR cluster of n = spec.replicas replicas that stays safe and
/// live while up to f of them crash, lie or are flooded.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kmmr.io",
    version = "v1alpha1",
    kind = "BftCluster",
    plural = "bftclusters",
    shortname = "bft",
    category = "kmmr",
    namespaced,
    status = "crate::status::BftClusterStatus",
    derive = "PartialEq",
    doc = "A Byzantine fault-tolerant KmMR cluster: n = 3f+1 replicas, each with its own key, kept at the desired size one reconfiguration at a time.",
    validation = Rule::new("size(self.metadata.name) <= 40").message(MSG_NAME),
    printcolumn(name = "N", type_ = "integer", json_path = ".status.n", description = "Replicas in the current view"),
    printcolumn(name = "F", type_ = "integer", json_path = ".status.f", description = "Faulty replicas tolerated"),
    printcolumn(name = "Healthy", type_ = "integer", json_path = ".status.healthy", description = "Replicas reporting healthy"),
    printcolumn(name = "Leader", type_ = "integer", json_path = ".status.leader", description = "Id of the current leader"),
    printcolumn(name = "View", type_ = "integer", json_path = ".status.viewId", description = "Id of the current view"),
    printcolumn(name = "Etcd", type_ = "string", json_path = ".status.etcdAPI.endpoint", description = "Endpoint of the etcd v3 API (spec.etcdAPI), for kube-apiserver's --etcd-servers"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("self.replicas >= 4").message(MSG_REPLICAS_MIN),
    validation = Rule::new("self.replicas <= 100").message(MSG_REPLICAS_MAX),
    validation = Rule::new("!has(self.f) || (self.f >= 1 && self.replicas >= 3 * self.f + 1)").message(MSG_F),
    validation = Rule::new("has(self.keys) == has(oldSelf.keys) && (!has(self.keys) || self.keys == oldSelf.keys)").message(MSG_KEYS_IMMUTABLE),
    validation = Rule::new("has(self.restoreFrom) == has(oldSelf.restoreFrom) && (!has(self.restoreFrom) || self.restoreFrom == oldSelf.restoreFrom)").message(crate::backup::MSG_RESTORE_IMMUTABLE)
)]
#[serde(rename_all = "camelCase")]
pub struct BftClusterSpec {
    /// Desired number of replicas n. At least 4 (n >= 3f+1 with f >= 1), at most 100. The
    /// operator moves the protocol's view toward n one replica at a time.
    pub replicas: i32,

    /// Number of faulty replicas to tolerate. Defaults to floor((replicas-1)/3), the most n
    /// replicas can tolerate. Must be at least 1 with replicas >= 3f+1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f: Option<i32>,

    /// Replica container image, with a fixed tag or digest (for example kmmr/replica:0.1.0).
    #[schemars(length(min = 1))]
    pub image: String,

    /// Image pull policy of the replica container: Always, IfNotPresent (the default) or Never.
    #[serde(default)]
    pub image_pull_policy: PullPolicy,

    /// Compute resources of each replica container. Defaults to requests of 100m CPU and
    /// 128Mi memory, no limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Persistent volume of each replica (its log and checkpoints). Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message(MSG_STORAGE_IMMUTABLE))]
    pub storage: StorageSpec,

    /// Scheduling constraints of the replica pods. Spread replicas over failure domains so
    /// that one node or zone outage takes down at most f of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Tolerations of the replica pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Topology spread constraints of the replica pods. Their label selectors may use
    /// app.kubernetes.io/instance=<cluster name> and app.kubernetes.io/component=replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,

    /// Priority class of the replica pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// Ports the replicas listen on. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message(MSG_PORTS_IMMUTABLE))]
    pub ports: Ports,

    /// Stop reconciling: while true the operator changes none of this cluster's children (for
    /// manual repair) but keeps reporting status.
    #[serde(default)]
    pub paused: bool,

    /// User-supplied keys. When unset the operator generates an ed25519 key pair per replica
    /// and an admin key pair. Cannot be added, removed or changed after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<KeysSpec>,

    /// Protocol tunables passed to every replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ProtocolSpec>,

    /// The etcd v3 API, off unless enabled: gateways (kmmr-etcd-gateway, from spec.image) behind
    /// the Service <name>-etcd, serving etcd's gRPC API with mutual TLS, so that a
    /// kube-apiserver (a hosted control plane, for example) keeps its state on this cluster
    /// with --etcd-servers. The CA, the server certificate and a client certificate for the
    /// apiserver are generated into Secrets named in status.etcdAPI.
    #[serde(default, rename = "etcdAPI", skip_serializing_if = "Option::is_none")]
    pub etcd_api: Option<EtcdApiSpec>,

    /// Backups of the key-value state, as f+1 replicas vouch for it, into a
    /// PersistentVolumeClaim: on a schedule (a CronJob <name>-backup) and whenever the
    /// annotation kmmr.io/backup-request gets a new value (a Job). The newest backup is shown
    /// in status.backup and the LastBackupSucceeded condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,

    /// Start this new cluster from a backup file instead of empty: every replica verifies the
    /// file and starts from its state (condition Restored). Only at creation; immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<RestoreSpec>,
}

/// The etcd v3 API of a cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.replicas >= 1 && self.replicas <= 9").message(MSG_GATEWAYS)
)]
pub struct EtcdApiSpec {
    /// Serve the etcd API. Turning it off deletes the gateways, their Service and the
    /// certificates' Secrets (a later enable issues new ones).
    #[serde(default)]
    pub enabled: bool,
    /// Number of gateway pods behind the Service, 1 to 9; defaults to 2, so that the API stays
    /// up while one restarts (the gateways restart when the view changes).
    #[serde(default = "default_gateways")]
    pub replicas: i32,
    /// Type of the Service <name>-etcd: ClusterIP (the default), NodePort or LoadBalancer.
    #[serde(default)]
    pub service_type: EtcdServiceType,
}

fn default_gateways() -> i32 {
    2
}

impl Default for EtcdApiSpec {
    fn default() -> Self {
        EtcdApiSpec {
            enabled: false,
            replicas: default_gateways(),
            service_type: EtcdServiceType::default(),
        }
    }
}

/// How the etcd API's Service is exposed.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum EtcdServiceType {
    // Reachable inside the cluster only.
    #[default]
    ClusterIP,
    // Also on a port of every node.
    NodePort,
    // Also through the cloud's load balancer.
    LoadBalancer,
}

impl EtcdServiceType {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EtcdServiceType::ClusterIP => "ClusterIP",
            EtcdServiceType::NodePort => "NodePort",
            EtcdServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Image pull policy.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum PullPolicy {
    // Pull on every start.
    Always,
    // Pull only when the node lacks the image.
    #[default]
    IfNotPresent,
    // Never pull.
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// The persistent volume claimed for each replica.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Storage class of the volume. Defaults to the cluster's default storage class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Size of the volume, a Kubernetes quantity such as 1Gi or 500Mi. Defaults to 1Gi.
    #[serde(default = "default_storage_size")]
    #[schemars(schema_with = "quantity_schema")]
    pub size: Quantity,
}

/// A quantity that must be present: k8s-openapi's schema for `Quantity` is marked nullable, and a
/// stored null would fail to deserialize in the operator.
fn quantity_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-int-or-string": true })
}

fn default_storage_size() -> Quantity {
    Quantity("1Gi".to_string())
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            class_name: None,
            size: default_storage_size(),
        }
    }
}

/// Ports of each replica. The client port is always the replica port plus 1000, because
/// clients derive it from the replica's address in the view.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new("self.client == self.replica + 1000").message(MSG_CLIENT_PORT),
    validation = Rule::new("self.http != self.replica && self.http != self.client").message(MSG_PORTS_DISTINCT)
)]
pub struct Ports {
    /// Replica-to-replica port, part of each member's address in the view. Defaults to 7000.
    #[serde(default = "default_replica_port")]
    #[schemars(range(min = 1, max = 64535))]
    pub replica: i32,
    /// Client port: the replica port plus 1000. Defaults to 8000.
    #[serde(default = "default_client_port")]
    #[schemars(range(min = 1001, max = 65535))]
    pub client: i32,
    /// HTTP port serving /metrics, /status and /healthz. Defaults to 9000.
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub http: i32,
}

fn default_replica_port() -> i32 {
    7000
}
fn default_client_port() -> i32 {
    8000
}
fn default_http_port() -> i32 {
    9000
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            replica: default_replica_port(),
            client: default_client_port(),
            http: default_http_port(),
        }
    }
}

/// Keys supplied by the user instead of generated by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeysSpec {
    /// Name of a Secret in the cluster's namespace holding `replica-<i>.key` for every replica
    /// id i in 0..replicas and `admin.key`, each the 64 hex digits of an ed25519 seed. The
    /// operator copies each replica's key into a Secret mounted by that replica only.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// Protocol tunables.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolSpec {
    /// Milliseconds a replica waits for a request to be ordered before suspecting the leader.
    /// Between 10 and 60000 (the replica's ceiling for its growing timeout); defaults to 2000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 60000))]
    pub request_timeout_ms: Option<i64>,
}

impl BftClusterSpec {
    /// The fault tolerance in force: `spec.f`, or floor((replicas-1)/3) when unset.
    pub fn fault_tolerance(&self) -> i32 {
        self.f.unwrap_or_else(|| default_f(self.replicas))
    }

    /// The etcd API's settings when it is enabled.
    pub fn etcd_api_enabled(&self) -> Option<&EtcdApiSpec> {
        self.etcd_api.as_ref().filter(|e| e.enabled)
    }

    /// The replica-count rules of the CEL schema, in Rust: the operator re-checks them because
    /// an object may have been stored before a rule existed (or with validation bypassed).
    pub fn validate(&self) -> Result<(), QuorumError> {
        let replicas = self.replicas;
        if replicas < MIN_REPLICAS {
            return Err(QuorumError::TooFewReplicas { replicas });
        }
        if replicas > MAX_REPLICAS {
            return Err(QuorumError::TooManyReplicas { replicas });
        }
        if let Some(f) = self.f {
            if f < 1 || replicas < 3 * f + 1 {
                return Err(QuorumError::FaultToleranceTooHigh { replicas, f });
            }
        }
        if let Some(etcd) = self.etcd_api_enabled() {
            if !(1..=MAX_GATEWAYS).contains(&etcd.replicas) {
                return Err(QuorumError::Gateways {
                    replicas: etcd.replicas,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(replicas: i32, f: Option<i32>) -> BftClusterSpec {
        BftClusterSpec {
            replicas,
            f,
            image: "kmmr/replica:0.1.0".into(),
            image_pull_policy: PullPolicy::default(),
            resources: None,
            storage: StorageSpec::default(),
            affinity: None,
            tolerations: None,
            topology_spread_constraints: None,
            priority_class_name: None,
            ports: Ports::default(),
            paused: false,
            keys: None,
            protocol: None,
            etcd_api: None,
            backup: None,
            restore_from: None,
        }
    }

    #[test]
    fn unset_f_defaults_to_the_most_n_tolerates() {
        assert_eq!(spec(4, None).fault_tolerance(), 1);
        assert_eq!(spec(6, None).fault_tolerance(), 1);
        assert_eq!(spec(7, None).fault_tolerance(), 2);
        assert_eq!(spec(7, Some(1)).fault_tolerance(), 1);
    }

    #[test]
    fn fewer_than_four_replicas_are_rejected_with_the_cel_message() {
        let err = spec(3, None).validate().unwrap_err();
        assert_eq!(err, QuorumError::TooFewReplicas { replicas: 3 });
        assert!(err.to_string().contains(MSG_REPLICAS_MIN));
    }

    #[test]
    fn f_that_needs_more_replicas_is_rejected_naming_both_fields() {
        let err = spec(6, Some(2)).validate().unwrap_err();
        assert_eq!(
            err,
            QuorumError::FaultToleranceTooHigh { replicas: 6, f: 2 }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("spec.replicas = 6") && msg.contains("spec.f = 2"),
            "{msg}"
        );
    }

    #[test]
    fn f_of_zero_is_rejected() {
        assert!(spec(4, Some(0)).validate().is_err());
    }

    #[test]
    fn n_of_exactly_three_f_plus_one_is_accepted() {
        assert_eq!(spec(7, Some(2)).validate(), Ok(()));
        assert_eq!(spec(4, None).validate(), Ok(()));
        assert_eq!(spec(8, Some(1)).validate(), Ok(()));
    }

    #[test]
    fn more_than_the_bound_is_rejected() {
        assert!(spec(MAX_REPLICAS + 1, None).validate().is_err());
        assert!(spec(MAX_REPLICAS, None).validate().is_ok());
    }

    #[test]
    fn a_minimal_manifest_gets_documented_defaults() {
        let s: BftClusterSpec =
            serde_json::from_str(r#"{"replicas": 4, "image": "kmmr/replica:0.1.0"}"#).unwrap();
        assert_eq!(s, spec(4, None));
        assert_eq!(
            s.ports,
            Ports {
                replica: 7000,
                client: 8000,
                http: 9000
            }
        );
        assert_eq!(s.storage.size.0, "1Gi");
        assert_eq!(s.image_pull_policy.as_str(), "IfNotPresent");
    }

    #[test]
    fn the_etcd_api_is_off_unless_enabled_and_defaults_to_two_gateways() {
        let s: BftClusterSpec = serde_json::from_str(
            r#"{"replicas": 4, "image": "i:1", "etcdAPI": {"enabled": true}}"#,
        )
        .unwrap();
        let etcd = s.etcd_api_enabled().expect("enabled");
        assert_eq!(etcd.replicas, 2);
        assert_eq!(etcd.service_type, EtcdServiceType::ClusterIP);
        let off: BftClusterSpec =
            serde_json::from_str(r#"{"replicas": 4, "image": "i:1", "etcdAPI": {}}"#).unwrap();
        assert!(off.etcd_api_enabled().is_none());
        assert!(spec(4, None).etcd_api_enabled().is_none());
    }

    #[test]
    fn gateways_outside_one_to_nine_are_rejected_with_the_cel_message() {
        let mut s = spec(4, None);
        for replicas in [0, MAX_GATEWAYS + 1] {
            s.etcd_api = Some(EtcdApiSpec {
                enabled: true,
                replicas,
                service_type: EtcdServiceType::NodePort,
            });
            let err = s.validate().unwrap_err();
            assert!(err.to_string().contains(MSG_GATEWAYS), "{err}");
        }
        // Switched off, its settings do not matter.
        s.etcd_api = Some(EtcdApiSpec {
            enabled: false,
            replicas: 0,
            service_type: EtcdServiceType::ClusterIP,
        });
        assert_eq!(s.validate(), Ok(()));
    }
}
