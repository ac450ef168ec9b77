//! Every child object of a `BftCluster`, built as plain data. The controller applies the result
//! with server-side apply under one field manager; nothing here reads the cluster.
//!
//! Why one StatefulSet per replica (replicas: 1) rather than one of n: each replica's private key
//! must be mounted into that replica's pod only, and any replica, not just the highest ordinal,
//! must be removable. StatefulSets use `OnDelete`: a changed configuration hash does not restart
//! anything by itself; the controller restarts pods one at a time while the rest hold a quorum.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapProjection, Container, ContainerPort, EmptyDirVolumeSource,
    HTTPGetAction, KeyToPath, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    Secret, SecretProjection, SecurityContext, Service, ServicePort, ServiceSpec, Volume,
    VolumeMount, VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kmmr_crds::{BftCluster, QuorumError};
use kube::Resource;

use crate::config::{self, ConfigError, Membership};
use crate::keys::{self, Keys};
use crate::names;

/// The unprivileged user and group the replica runs as (distroless `nonroot`).
pub const REPLICA_UID: i64 = 65532;

/// Everything the operator creates for one `BftCluster`. Its `Debug` names the objects only:
/// the Secrets hold private keys, which must never reach a log.
#[derive(Clone)]
pub struct Children {
    /// One per member of the view, in id order.
    pub stateful_sets: Vec<StatefulSet>,
    /// Stable DNS names for the replica pods.
    pub headless_service: Service,
    /// The client port of every replica behind one ClusterIP.
    pub client_service: Service,
    /// view.toml and replica-<id>.toml.
    pub config_map: ConfigMap,
    /// At most f replica pods voluntarily disrupted at a time.
    pub pod_disruption_budget: PodDisruptionBudget,
    /// One per member of the view, in id order, each mounted by that replica's pod only.
    pub key_secrets: Vec<Secret>,
    /// The admin key, mounted by no pod.
    pub admin_secret: Secret,
}

impl std::fmt::Debug for Children {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |meta: &ObjectMeta| meta.name.clone().unwrap_or_default();
        out.debug_struct("Children")
            .field(
                "stateful_sets",
                &self
                    .stateful_sets
                    .iter()
                    .map(|s| name(&s.metadata))
                    .collect::<Vec<_>>(),
            )
            .field("headless_service", &name(&self.headless_service.metadata))
            .field("client_service", &name(&self.client_service.metadata))
            .field("config_map", &name(&self.config_map.metadata))
            .field(
                "pod_disruption_budget",
                &name(&self.pod_disruption_budget.metadata),
            )
            .field(
                "key_secrets",
                &self
                    .key_secrets
                    .iter()
                    .map(|s| name(&s.metadata))
                    .collect::<Vec<_>>(),
            )
            .field("admin_secret", &name(&self.admin_secret.metadata))
            .finish()
    }
}

/// Why children could not be built; each is reported as a condition and an Event reason.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The object was not read from the apiserver (no uid for owner references, or no namespace).
    #[error(
        "the BftCluster has no {0}: build children only from an object read from the apiserver"
    )]
    MissingMetadata(&'static str),
    /// The spec breaks a rule the CRD enforces at admission (stored before the rule existed).
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] QuorumError),
    /// A configuration file could not be rendered.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The children of a new cluster: the initial view of ids 0..spec.replicas.
pub fn build_children(cluster: &BftCluster, keys: &Keys) -> Result<Children, BuildError> {
    build_children_for(cluster, &Membership::initial(cluster), keys)
}

/// The children for a given view (the controller passes the view the replicas report).
pub fn build_children_for(
    cluster: &BftCluster,
    membership: &Membership,
    keys: &Keys,
) -> Result<Children, BuildError> {
    build_children_with(cluster, membership, keys, &BTreeMap::new())
}

/// As [`build_children_for`], with replicas run in a Byzantine test mode (replica id -> mode,
/// already checked by [`crate::testmode::requested`]).
pub fn build_children_with(
    cluster: &BftCluster,
    membership: &Membership,
    keys: &Keys,
    test_modes: &BTreeMap<i32, String>,
) -> Result<Children, BuildError> {
    cluster.spec.validate()?;
    let name = cluster
        .metadata
        .name
        .as_deref()
        .ok_or(BuildError::MissingMetadata("metadata.name"))?;
    let namespace = cluster
        .metadata
        .namespace
        .as_deref()
        .ok_or(BuildError::MissingMetadata("metadata.namespace"))?;
    let owner = cluster
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingMetadata("metadata.uid"))?;
    let meta = |child: String, component: &str| ObjectMeta {
        name: Some(child),
        namespace: Some(namespace.to_string()),
        labels: Some(names::common_labels(name, component)),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };

    let view = config::render_view(cluster, namespace, membership, keys)?;
    let mut config_data = BTreeMap::from([(config::VIEW_ENTRY.to_string(), view.clone())]);
    let mut stateful_sets = Vec::new();
    let mut key_secrets = Vec::new();
    for &id in &membership.members {
        let replica = config::render_replica(cluster, id)?;
        let hash = config::config_hash(&replica, &keys::public_hex(keys.admin()));
        config_data.insert(names::replica_config_entry(id), replica);
        let key = keys.replica(id).ok_or(ConfigError::MissingKey(id))?;
        let mut secret_meta = meta(names::key_secret(name, id), "replica-key");
        add_replica_label(&mut secret_meta, id);
        key_secrets.push(key_secret(secret_meta, key));
        let mut sts_meta = meta(names::stateful_set(name, id), names::COMPONENT_REPLICA);
        add_replica_label(&mut sts_meta, id);
        stateful_sets.push(stateful_set(
            cluster,
            name,
            id,
            sts_meta,
            &hash,
            test_modes.get(&id).map(String::as_str),
        ));
    }

    Ok(Children {
        stateful_sets,
        headless_service: headless_service(
            cluster,
            meta(names::headless_service(name), names::COMPONENT_REPLICA),
            name,
        ),
        client_service: client_service(cluster, meta(names::client_service(name), "client"), name),
        config_map: ConfigMap {
            metadata: meta(names::config_map(name), "config"),
            data: Some(config_data),
            ..ConfigMap::default()
        },
        pod_disruption_budget: pod_disruption_budget(
            meta(names::pod_disruption_budget(name), names::COMPONENT_REPLICA),
            name,
            membership.f,
        ),
        key_secrets,
        admin_secret: key_secret(meta(names::admin_secret(name), "admin-key"), keys.admin()),
    })
}

/// Replica `id`'s key Secret alone, exactly as [`build_children_for`] makes it: the controller
/// stores a joining replica's key before asking the replicas to add it.
pub fn replica_key_secret(
    cluster: &BftCluster,
    id: i32,
    key: &ed25519_dalek::SigningKey,
) -> Result<Secret, BuildError> {
    let name = cluster
        .metadata
        .name
        .as_deref()
        .ok_or(BuildError::MissingMetadata("metadata.name"))?;
    let owner = cluster
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingMetadata("metadata.uid"))?;
    let mut meta = ObjectMeta {
        name: Some(names::key_secret(name, id)),
        namespace: cluster.metadata.namespace.clone(),
        labels: Some(names::common_labels(name, "replica-key")),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    };
    add_replica_label(&mut meta, id);
    Ok(key_secret(meta, key))
}

fn add_replica_label(meta: &mut ObjectMeta, id: i32) {
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(names::REPLICA_ID_LABEL.to_string(), id.to_string());
}

fn key_secret(metadata: ObjectMeta, key: &ed25519_dalek::SigningKey) -> Secret {
    Secret {
        metadata,
        type_: Some("Opaque".to_string()),
        immutable: Some(true),
        data: Some(BTreeMap::from([
            (
                keys::SEED_ENTRY.to_string(),
                ByteString(keys::seed_file(key).into_bytes()),
            ),
            (
                keys::PUBLIC_ENTRY.to_string(),
                ByteString(keys::public_hex(key).into_bytes()),
            ),
        ])),
        ..Secret::default()
    }
}

fn stateful_set(
    cluster: &BftCluster,
    name: &str,
    id: i32,
    metadata: ObjectMeta,
    config_hash: &str,
    test_mode: Option<&str>,
) -> StatefulSet {
    let spec = &cluster.spec;
    let selector = names::replica_pod_selector(name, id);
    let mut pod_labels = names::common_labels(name, names::COMPONENT_REPLICA);
    pod_labels.extend(selector.clone());

    let config_volume = config_volume(name, id);
    let tmp_volume = Volume {
        name: "tmp".to_string(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };

    let container = replica_container(spec, test_mode);

    let mut pod_annotations = BTreeMap::from([(
        names::CONFIG_HASH_ANNOTATION.to_string(),
        config_hash.to_string(),
    )]);
    if let Some(mode) = test_mode {
        // Seen in `kubectl describe pod`: this pod misbehaves on purpose.
        pod_annotations.insert(crate::testmode::ANNOTATION.to_string(), mode.to_string());
    }
    let mut volumes = vec![config_volume, tmp_volume];
    // A restored cluster's replicas verify the backup and copy it to their volume before they
    // start (see `backup::restore_init_container`).
    let init_containers = spec.restore_from.as_ref().map(|restore| {
        volumes.extend(crate::backup::restore_volumes(restore));
        vec![crate::backup::restore_init_container(cluster, restore)]
    });
    let pod_spec = PodSpec {
        init_containers,
        containers: vec![container],
        volumes: Some(volumes),
        // Replicas never call the Kubernetes API: no token to steal.
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(restricted_pod_security()),
        affinity: spec.affinity.clone(),
        tolerations: spec.tolerations.clone(),
        topology_spread_constraints: spec.topology_spread_constraints.clone(),
        priority_class_name: spec.priority_class_name.clone(),
        ..PodSpec::default()
    };

    let claim = data_claim(name, spec);

    StatefulSet {
        metadata,
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(names::headless_service(name)),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            // The controller rolls replicas one at a time, only while the others hold a quorum.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".to_string()),
                ..StatefulSetUpdateStrategy::default()
            }),
            // A replica's state is only discarded by a decision of the controller (replacing a
            // diverged replica), never by deleting its StatefulSet.
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Retain".to_string()),
                    when_scaled: Some("Retain".to_string()),
                },
            ),
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

fn config_volume(name: &str, id: i32) -> Volume {
    // One projected volume: the shared view, this replica's configuration and this replica's
    // key, and nothing of any other replica.
    Volume {
        name: "config".to_string(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: names::config_map(name),
                        items: Some(vec![
                            key_to_path(config::VIEW_ENTRY, "view.toml", None),
                            key_to_path(&names::replica_config_entry(id), "replica.toml", None),
                        ]),
                        optional: Some(false),
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    secret: Some(SecretProjection {
                        name: names::key_secret(name, id),
                        items: Some(vec![key_to_path(keys::SEED_ENTRY, "key", Some(0o400))]),
                        optional: Some(false),
                    }),
                    ..VolumeProjection::default()
                },
            ]),
            default_mode: Some(0o444),
        }),
        ..Volume::default()
    }
}

/// The replica's container: its ports, its mounts, probes on `/healthz`, and nothing it does
/// not need (no privilege, a read-only root file system, every capability dropped).
fn replica_container(spec: &kmmr_crds::BftClusterSpec, test_mode: Option<&str>) -> Container {
    let http_get = |path: &str| HTTPGetAction {
        path: Some(path.to_string()),
        port: IntOrString::String("http".to_string()),
        ..HTTPGetAction::default()
    };
    Container {
        name: "replica".to_string(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(spec.image_pull_policy.as_str().to_string()),
        command: Some(vec!["kmmr-replica".to_string()]),
        args: Some(replica_args(test_mode)),
        ports: Some(vec![
            container_port("replica", spec.ports.replica),
            container_port("client", spec.ports.client),
            container_port("http", spec.ports.http),
        ]),
        resources: Some(spec.resources.clone().unwrap_or_else(default_resources)),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".to_string(),
                mount_path: config::CONFIG_DIR.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "data".to_string(),
                mount_path: config::DATA_DIR.to_string(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".to_string(),
                mount_path: "/tmp".to_string(),
                ..VolumeMount::default()
            },
        ]),
        // Recovery replays the log before /healthz answers: allow five minutes.
        startup_probe: Some(Probe {
            http_get: Some(http_get("/healthz")),
            period_seconds: Some(5),
            failure_threshold: Some(60),
            ..Probe::default()
        }),
        readiness_probe: Some(Probe {
            http_get: Some(http_get("/healthz")),
            period_seconds: Some(5),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(http_get("/healthz")),
            period_seconds: Some(10),
            failure_threshold: Some(6),
            ..Probe::default()
        }),
        security_context: Some(restricted_container_security()),
        ..Container::default()
    }
}

/// What every KmMR container runs with: no privilege, a read-only root file system, every
/// capability dropped.
pub(crate) fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// The replica's data volume, kept when the StatefulSet goes.
fn data_claim(name: &str, spec: &kmmr_crds::BftClusterSpec) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".to_string()),
            labels: Some(names::common_labels(name, names::COMPONENT_REPLICA)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: spec.storage.class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    spec.storage.size.clone(),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

fn replica_args(test_mode: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "run".to_string(),
        "--config".to_string(),
        config::CONFIG_FILE.to_string(),
    ];
    if let Some(mode) = test_mode {
        args.extend([
            "--byzantine".to_string(),
            mode.to_string(),
            "--i-know-this-breaks-the-replica".to_string(),
        ]);
    }
    args
}

fn key_to_path(key: &str, path: &str, mode: Option<i32>) -> KeyToPath {
    KeyToPath {
        key: key.to_string(),
        path: path.to_string(),
        mode,
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: port,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port,
        target_port: Some(IntOrString::String(name.to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    }
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("100m".to_string())),
            ("memory".to_string(), Quantity("128Mi".to_string())),
        ])),
        ..ResourceRequirements::default()
    }
}

fn headless_service(cluster: &BftCluster, metadata: ObjectMeta, name: &str) -> Service {
    Service {
        metadata,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            // Replicas must find each other before they are ready: readiness needs a view.
            publish_not_ready_addresses: Some(true),
            selector: Some(names::replica_selector(name)),
            ports: Some(vec![
                service_port("replica", cluster.spec.ports.replica),
                service_port("http", cluster.spec.ports.http),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn client_service(cluster: &BftCluster, metadata: ObjectMeta, name: &str) -> Service {
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            selector: Some(names::replica_selector(name)),
            ports: Some(vec![service_port("client", cluster.spec.ports.client)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn pod_disruption_budget(metadata: ObjectMeta, name: &str, f: i32) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(f)),
            selector: Some(LabelSelector {
                match_labels: Some(names::replica_selector(name)),
                ..LabelSelector::default()
            }),
            // A replica that is not ready is not part of any quorum: evicting it costs nothing,
            // and refusing would block node drains behind a crash-looping pod.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".to_string()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The owner reference every child carries (the cluster as controller, blocking deletion of the
/// owner in foreground cascades until children are gone).
pub fn owner_reference(cluster: &BftCluster) -> Option<OwnerReference> {
    cluster.controller_owner_ref(&())
}

/// The pod security every KmMR pod runs with: non-root as the image's user, seccomp's default
/// profile (the restricted Pod Security Standard).
pub(crate) fn restricted_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(REPLICA_UID),
        run_as_group: Some(REPLICA_UID),
        fs_group: Some(REPLICA_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

#[cfg(test)]
mod tests;
