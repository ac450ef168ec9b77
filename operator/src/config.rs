//! The files a replica reads: the view (`view.toml`, shared), written with the replica's own
//! `ViewFile`, and its own configuration (`replica-<id>.toml`, mounted as `replica.toml`), of
//! which the operator writes only what the spec sets; a test parses that with the replica's
//! `NodeConfig`, which rejects unknown fields, so the two cannot drift apart silently.

use kmmr_crds::BftCluster;
use serde::Serialize;

use crate::keys::{public_hex, Keys};
use crate::names;
use kmmr_client::files::{MemberFile, ViewFile};

/// Directory of the projected volume holding view.toml, replica.toml and the key file.
pub const CONFIG_DIR: &str = "/etc/kmmr";
/// The replica's configuration file inside the pod.
pub const CONFIG_FILE: &str = "/etc/kmmr/replica.toml";
/// The view file inside the pod.
pub const VIEW_FILE: &str = "/etc/kmmr/view.toml";
/// The replica's key file inside the pod.
pub const KEY_FILE: &str = "/etc/kmmr/key";
/// The replica's data directory (its persistent volume).
pub const DATA_DIR: &str = "/var/lib/kmmr";
/// The view entry of the ConfigMap.
pub const VIEW_ENTRY: &str = "view.toml";

/// Which replicas form the view. At creation this is ids 0..n in view 0; the controller later
/// passes the view the replicas report after each reconfiguration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The view id.
    pub view_id: i64,
    /// The f the view was installed with.
    pub f: i32,
    /// Member ids, ascending.
    pub members: Vec<i32>,
}

impl Membership {
    /// The first view of a new cluster: ids 0..spec.replicas, f from the spec.
    pub fn initial(cluster: &BftCluster) -> Membership {
        Membership {
            view_id: 0,
            f: cluster.spec.fault_tolerance(),
            members: (0..cluster.spec.replicas).collect(),
        }
    }
}

/// `replica-<id>.toml` as the operator writes it: only what the spec sets, so that a replica keeps
/// its own defaults for the rest (the replica's `NodeConfig` would write every field). A test
/// parses the output with `NodeConfig` itself.
#[derive(Serialize)]
struct ReplicaToml {
    id: i32,
    key_file: &'static str,
    view_file: &'static str,
    data_dir: &'static str,
    listen: String,
    client_listen: String,
    http_listen: String,
    /// spec.restoreFrom: the backup's verified copy on the replica's volume. Before
    /// `protocol`: TOML has no plain values after a table.
    #[serde(skip_serializing_if = "Option::is_none")]
    initial_state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<ProtocolToml>,
}

#[derive(Serialize)]
struct ProtocolToml {
    request_timeout_ms: i64,
}

/// Why a file could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A member of the view has no key.
    #[error("replica {0} is in the view but has no key")]
    MissingKey(i32),
    /// A number does not fit the view file's type (a corrupt status or ConfigMap).
    #[error("{0} out of range for the view file")]
    OutOfRange(&'static str),
    /// TOML serialization failed (a bug).
    #[error("rendering TOML: {0}")]
    Toml(#[from] toml::ser::Error),
}

/// `view.toml`: every member's stable address and public key.
pub fn render_view(
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
    keys: &Keys,
) -> Result<String, ConfigError> {
    let name = cluster_name(cluster);
    let members = membership
        .members
        .iter()
        .map(|&id| {
            let key = keys.replica(id).ok_or(ConfigError::MissingKey(id))?;
            Ok(MemberFile {
                id: to_u32(id)?,
                address: names::member_address(name, namespace, id, cluster.spec.ports.replica),
                key: public_hex(key),
            })
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    // The replica's own file type, so the two cannot drift apart.
    let view = ViewFile {
        id: u32::try_from(membership.view_id).map_err(|_| ConfigError::OutOfRange("view id"))?,
        f: usize::try_from(membership.f).map_err(|_| ConfigError::OutOfRange("f"))?,
        members,
        admin_key: Some(public_hex(keys.admin())),
    };
    Ok(toml::to_string_pretty(&view)?)
}

/// `replica-<id>.toml`. The listeners bind all interfaces rather than the view address: that is
/// a DNS name whose record appears only after the pod starts, so the replica could not bind it.
pub fn render_replica(cluster: &BftCluster, id: i32) -> Result<String, ConfigError> {
    let ports = &cluster.spec.ports;
    let config = ReplicaToml {
        id,
        key_file: KEY_FILE,
        view_file: VIEW_FILE,
        data_dir: DATA_DIR,
        listen: format!("0.0.0.0:{}", ports.replica),
        client_listen: format!("0.0.0.0:{}", ports.client),
        http_listen: format!("0.0.0.0:{}", ports.http),
        initial_state: cluster
            .spec
            .restore_from
            .is_some()
            .then_some(crate::backup::INITIAL_STATE),
        protocol: cluster
            .spec
            .protocol
            .as_ref()
            .and_then(|p| p.request_timeout_ms)
            .map(|request_timeout_ms| ProtocolToml { request_timeout_ms }),
    };
    Ok(toml::to_string_pretty(&config)?)
}

/// Hash of what replica `id` reads at start-up that only a restart brings in, for the pod
/// annotation that marks a pod as running an outdated configuration: its own configuration and
/// the admin key. The members are left out on purpose: a running replica learns every view change
/// through the protocol (it executes the change itself), and a restarted one reads the current
/// view from the ConfigMap or its disk. Hashing them would restart every replica after every
/// membership step, each restart costing the cluster a member while it scales.
pub fn config_hash(replica: &str, admin_public_key: &str) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in [replica, admin_public_key] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().to_hex()[..32].to_string()
}

fn to_u32(id: i32) -> Result<u32, ConfigError> {
    u32::try_from(id).map_err(|_| ConfigError::OutOfRange("member id"))
}

fn cluster_name(cluster: &BftCluster) -> &str {
    cluster.metadata.name.as_deref().unwrap_or_default()
}
