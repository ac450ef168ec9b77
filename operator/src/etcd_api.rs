//! The etcd v3 API of a BftCluster (`spec.etcdAPI`), as plain data: the gateways' Deployment and
//! Service, the certificates and their Secrets, which certificates must be (re)issued, and the
//! status. The controller (`controller/etcd_api.rs`) reads and applies; nothing here talks to
//! the apiserver, and every decision is a function of what was read.
//!
//! The gateway (`kmmr-etcd-gateway`, shipped in the replica image) is a client of the cluster
//! that trusts no single replica, so it may run anywhere; here it runs as a Deployment of its
//! own, mounting only the view (never a replica's key) and its server certificate. Clients must
//! present a certificate from the cluster's own CA (mutual TLS): the etcd API can write every
//! key, so the Secret with the client certificate is what grants it.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction, KeyToPath, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, Secret, SecretVolumeSource, Service, ServicePort,
    ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kmmr_crds::{BftCluster, EtcdApiSpec, EtcdApiStatus, ETCD_API_PORT};
use kube::Resource;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::config;
use crate::names;

/// Entries of the certificate Secrets, as `kubernetes.io/tls` Secrets name them (and cert-manager
/// adds `ca.crt`).
pub const CERT_ENTRY: &str = "tls.crt";
/// The private key's entry.
pub const KEY_ENTRY: &str = "tls.key";
/// The CA certificate's entry.
pub const CA_ENTRY: &str = "ca.crt";
/// Where the gateway pod mounts its server certificate.
pub const TLS_DIR: &str = "/etc/kmmr-etcd";
/// The common name of the client certificate: what etcd would log as the user.
pub const CLIENT_COMMON_NAME: &str = "kube-apiserver-etcd-client";
/// Validity of the CA and of the certificates it issues. Rotation is by deleting the Secrets
/// (the operator issues new ones); there is no automatic rotation yet.
const VALIDITY_YEARS: i16 = 10;

/// Why certificates could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters or failed to sign (a name that is not a DNS name, a bug).
    #[error("issuing the etcd API's certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The CA Secret holds a key that does not parse.
    #[error("Secret {secret}: {entry} is not a PEM private key ({why}); delete the Secret and the operator issues a new CA (the client certificates handed out so far stop working)")]
    BadCaKey {
        secret: String,
        entry: &'static str,
        why: rcgen::Error,
    },
}

/// PEM-encoded certificates and keys of the etcd API. Its `Debug` shows none of the keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// Its private key (PKCS#8).
    pub key: String,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        out.debug_struct("Pem")
            .field("cert", &self.cert.len())
            .finish_non_exhaustive()
    }
}

/// Which certificates this pass must issue; the rest are kept as they are in their Secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CertPlan {
    /// A new CA: none is stored, or it is incomplete. Everything it signed is re-issued with it.
    pub ca: bool,
    /// A new server certificate: none is stored, or it names other addresses than the Service's.
    pub server: bool,
    /// A new client certificate: none is stored.
    pub client: bool,
}

impl CertPlan {
    /// Whether anything is issued.
    pub fn any(self) -> bool {
        self.ca || self.server || self.client
    }
}

/// What the three Secrets hold now, as read from the apiserver (`None`: no such Secret).
#[derive(Debug, Default, Clone, Copy)]
pub struct StoredCerts<'a> {
    /// `<name>-etcd-ca`.
    pub ca: Option<&'a Secret>,
    /// `<name>-etcd-server`.
    pub server: Option<&'a Secret>,
    /// `<name>-etcd-client`.
    pub client: Option<&'a Secret>,
}

/// Decides which certificates to issue. A new CA invalidates everything it signed, so it brings
/// a new server and client certificate; a server certificate is re-issued (by the same CA, so
/// clients keep working) when the Service's addresses changed, e.g. a new cluster IP after the
/// Service was re-created.
pub fn plan_certs(stored: StoredCerts<'_>, wanted_sans: &[String]) -> CertPlan {
    let complete = |s: Option<&Secret>, entries: &[&str]| {
        s.and_then(|s| s.data.as_ref()).is_some_and(|d| {
            entries
                .iter()
                .all(|e| d.get(*e).is_some_and(|v| !v.0.is_empty()))
        })
    };
    let pair = [CERT_ENTRY, KEY_ENTRY, CA_ENTRY];
    if !complete(stored.ca, &[CERT_ENTRY, KEY_ENTRY]) {
        return CertPlan {
            ca: true,
            server: true,
            client: true,
        };
    }
    let ca_cert = entry(stored.ca, CERT_ENTRY);
    // A leaf whose ca.crt is not the stored CA was signed by a CA that is gone.
    let signed_by_ca = |s: Option<&Secret>| entry(s, CA_ENTRY) == ca_cert;
    let sans = stored
        .server
        .and_then(|s| s.metadata.annotations.as_ref())
        .and_then(|a| a.get(names::ETCD_SANS_ANNOTATION));
    CertPlan {
        ca: false,
        server: !complete(stored.server, &pair)
            || !signed_by_ca(stored.server)
            || sans.map(String::as_str) != Some(wanted_sans.join(",").as_str()),
        client: !complete(stored.client, &pair) || !signed_by_ca(stored.client),
    }
}

/// A Secret's entry as text (empty when absent or not UTF-8).
pub fn entry<'a>(secret: Option<&'a Secret>, key: &str) -> &'a str {
    secret
        .and_then(|s| s.data.as_ref()?.get(key))
        .and_then(|v| std::str::from_utf8(&v.0).ok())
        .unwrap_or_default()
}

/// The names the gateways' server certificate is valid for: the Service's DNS names in every
/// form a client may use, its cluster IP once assigned, and loopback (for `kubectl port-forward`
/// to the Service, the way to reach it from outside the cluster).
pub fn server_sans(cluster: &str, namespace: &str, cluster_ip: Option<&str>) -> Vec<String> {
    let svc = names::etcd_service(cluster);
    let mut sans = vec![
        svc.clone(),
        format!("{svc}.{namespace}"),
        format!("{svc}.{namespace}.svc"),
        format!("{svc}.{namespace}.svc.cluster.local"),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    // A headless Service reports "None".
    if let Some(ip) = cluster_ip.filter(|ip| ip.parse::<std::net::IpAddr>().is_ok()) {
        sans.push(ip.to_string());
    }
    sans
}

/// The CA's parameters. The same function rebuilds them to sign with a stored CA key, so the
/// issuer name of a re-issued certificate is the stored CA's subject.
fn ca_params(cluster: &str, namespace: &str, year: i16) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("kmmr etcd API CA {namespace}/{cluster}"),
    );
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, year);
    Ok(params)
}

fn validity(params: &mut CertificateParams, year: i16) {
    // From the start of last year: a node whose clock is a little behind still accepts it.
    params.not_before = rcgen::date_time_ymd(i32::from(year) - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(i32::from(year + VALIDITY_YEARS), 1, 1);
}

fn leaf(
    sans: Vec<String>,
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
    year: i16,
) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, year);
    Ok(params)
}

/// The certificates after this pass: the stored ones where `plan` keeps them, new ones where it
/// issues. `year` is the current year (the only clock this reads, passed in).
#[derive(Debug, Clone)]
pub struct Certs {
    /// The CA.
    pub ca: Pem,
    /// The gateways' server certificate.
    pub server: Pem,
    /// The apiserver's client certificate.
    pub client: Pem,
}

/// Issues what `plan` asks for, keeping the rest from `stored`.
pub fn issue(
    cluster: &str,
    namespace: &str,
    plan: CertPlan,
    stored: StoredCerts<'_>,
    sans: &[String],
    year: i16,
) -> Result<Certs, CertError> {
    let params = ca_params(cluster, namespace, year)?;
    let (ca, ca_key) = if plan.ca {
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        (
            Pem {
                cert: cert.pem(),
                key: key.serialize_pem(),
            },
            key,
        )
    } else {
        let pem = Pem {
            cert: entry(stored.ca, CERT_ENTRY).to_string(),
            key: entry(stored.ca, KEY_ENTRY).to_string(),
        };
        let key = KeyPair::from_pem(&pem.key).map_err(|why| CertError::BadCaKey {
            secret: names::etcd_ca_secret(cluster),
            entry: KEY_ENTRY,
            why,
        })?;
        (pem, key)
    };
    let issuer = Issuer::new(params, ca_key);
    let make = |params: CertificateParams| -> Result<Pem, CertError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    };
    let kept = |s: Option<&Secret>| Pem {
        cert: entry(s, CERT_ENTRY).to_string(),
        key: entry(s, KEY_ENTRY).to_string(),
    };
    let server = if plan.server {
        let common_name = names::etcd_service(cluster);
        make(leaf(
            sans.to_vec(),
            &common_name,
            ExtendedKeyUsagePurpose::ServerAuth,
            year,
        )?)?
    } else {
        kept(stored.server)
    };
    let client = if plan.client {
        make(leaf(
            Vec::new(),
            CLIENT_COMMON_NAME,
            ExtendedKeyUsagePurpose::ClientAuth,
            year,
        )?)?
    } else {
        kept(stored.client)
    };
    Ok(Certs { ca, server, client })
}

fn meta(cluster: &BftCluster, name: String, component: &str) -> ObjectMeta {
    let cluster_name = cluster.metadata.name.clone().unwrap_or_default();
    ObjectMeta {
        name: Some(name),
        namespace: cluster.metadata.namespace.clone(),
        labels: Some(names::common_labels(&cluster_name, component)),
        owner_references: cluster.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn tls_secret(metadata: ObjectMeta, pem: &Pem, ca: &Pem) -> Secret {
    Secret {
        metadata,
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(BTreeMap::from([
            (
                CERT_ENTRY.to_string(),
                ByteString(pem.cert.clone().into_bytes()),
            ),
            (
                KEY_ENTRY.to_string(),
                ByteString(pem.key.clone().into_bytes()),
            ),
            (
                CA_ENTRY.to_string(),
                ByteString(ca.cert.clone().into_bytes()),
            ),
        ])),
        ..Secret::default()
    }
}

/// The three Secrets: CA (mounted by no pod), server (mounted by the gateways), client (for
/// kube-apiserver). `sans` is recorded on the server's, for [`plan_certs`].
pub fn secrets(cluster: &BftCluster, certs: &Certs, sans: &[String]) -> [Secret; 3] {
    let name = cluster.metadata.name.clone().unwrap_or_default();
    let ca = Secret {
        metadata: meta(cluster, names::etcd_ca_secret(&name), "etcd-ca"),
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([
            (
                CERT_ENTRY.to_string(),
                ByteString(certs.ca.cert.clone().into_bytes()),
            ),
            (
                KEY_ENTRY.to_string(),
                ByteString(certs.ca.key.clone().into_bytes()),
            ),
        ])),
        ..Secret::default()
    };
    let mut server_meta = meta(cluster, names::etcd_server_secret(&name), "etcd-server");
    server_meta.annotations = Some(BTreeMap::from([(
        names::ETCD_SANS_ANNOTATION.to_string(),
        sans.join(","),
    )]));
    [
        ca,
        tls_secret(server_meta, &certs.server, &certs.ca),
        tls_secret(
            meta(cluster, names::etcd_client_secret(&name), "etcd-client"),
            &certs.client,
            &certs.ca,
        ),
    ]
}

/// The Service in front of the gateways.
pub fn service(cluster: &BftCluster, spec: &EtcdApiSpec) -> Service {
    let name = cluster.metadata.name.clone().unwrap_or_default();
    Service {
        metadata: meta(
            cluster,
            names::etcd_service(&name),
            names::COMPONENT_ETCD_GATEWAY,
        ),
        spec: Some(ServiceSpec {
            type_: Some(spec.service_type.as_str().to_string()),
            selector: Some(names::etcd_gateway_selector(&name)),
            ports: Some(vec![ServicePort {
                name: Some("etcd".to_string()),
                port: ETCD_API_PORT,
                target_port: Some(IntOrString::String("etcd".to_string())),
                protocol: Some("TCP".to_string()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The URL kube-apiserver's `--etcd-servers` takes.
pub fn endpoint(cluster: &str, namespace: &str) -> String {
    format!(
        "https://{}.{namespace}.svc:{ETCD_API_PORT}",
        names::etcd_service(cluster)
    )
}

/// A short hash of `text` for a pod annotation.
fn short_hash(text: &str) -> String {
    blake3::hash(text.as_bytes()).to_hex()[..16].to_string()
}

/// The gateways' HTTP port: `/metrics`, `/health` (a quorum answers) and `/livez`; etcd's
/// metrics port number.
pub const GATEWAY_METRICS_PORT: i32 = 2381;

/// The gateways' Deployment. `view` is the view.toml the replicas run (the ConfigMap's entry)
/// and `server_cert` the server certificate the pods mount.
///
/// Why a restart on every view change (the hash annotation): a running gateway follows view
/// changes through the protocol itself, but it reads view.toml only when it starts, and a
/// gateway started from a stale view cannot reach the members that joined since, nor trust
/// their answers. Rolling the pods whenever the view changes keeps every gateway's starting
/// point current; the rolling update keeps one serving meanwhile (maxUnavailable 0). The
/// certificate hash rolls them onto a re-issued certificate the same way.
pub fn deployment(
    cluster: &BftCluster,
    spec: &EtcdApiSpec,
    view: &str,
    server_cert: &str,
) -> Deployment {
    let name = cluster.metadata.name.clone().unwrap_or_default();
    let namespace = cluster.metadata.namespace.clone().unwrap_or_default();
    let selector = names::etcd_gateway_selector(&name);
    let mut pod_labels = names::common_labels(&name, names::COMPONENT_ETCD_GATEWAY);
    pod_labels.extend(selector.clone());
    let annotations = BTreeMap::from([
        (names::VIEW_HASH_ANNOTATION.to_string(), short_hash(view)),
        (
            names::ETCD_CERT_HASH_ANNOTATION.to_string(),
            short_hash(server_cert),
        ),
    ]);
    let volumes = vec![
        Volume {
            name: "view".to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::config_map(&name),
                items: Some(vec![KeyToPath {
                    key: config::VIEW_ENTRY.to_string(),
                    path: "view.toml".to_string(),
                    mode: None,
                }]),
                default_mode: Some(0o444),
                optional: Some(false),
            }),
            ..Volume::default()
        },
        Volume {
            name: "tls".to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names::etcd_server_secret(&name)),
                default_mode: Some(0o400),
                optional: Some(false),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let pod_spec = PodSpec {
        containers: vec![gateway_container(cluster, &endpoint(&name, &namespace))],
        volumes: Some(volumes),
        // The gateway never calls the Kubernetes API.
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(crate::children::restricted_pod_security()),
        tolerations: cluster.spec.tolerations.clone(),
        priority_class_name: cluster.spec.priority_class_name.clone(),
        ..PodSpec::default()
    };
    Deployment {
        metadata: meta(
            cluster,
            names::etcd_gateway(&name),
            names::COMPONENT_ETCD_GATEWAY,
        ),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_string()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

fn gateway_container(cluster: &BftCluster, advertise: &str) -> Container {
    let tls = |entry: &str| format!("{TLS_DIR}/{entry}");
    let http_probe = |path: &str, period, failures| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("metrics".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        // The health check waits up to 5 s for a quorum of replicas.
        timeout_seconds: Some(6),
        failure_threshold: Some(failures),
        ..Probe::default()
    };
    Container {
        name: "gateway".to_string(),
        image: Some(cluster.spec.image.clone()),
        image_pull_policy: Some(cluster.spec.image_pull_policy.as_str().to_string()),
        command: Some(vec!["kmmr-etcd-gateway".to_string()]),
        // No --client-key: each start draws a fresh client key, because replicas serve only the
        // newest session of a key and two gateways (or a gateway and its successor during a
        // rollout) must never share one.
        args: Some(vec![
            "--cluster".to_string(),
            config::CONFIG_DIR.to_string(),
            "--listen".to_string(),
            format!("0.0.0.0:{ETCD_API_PORT}"),
            "--advertise-client-url".to_string(),
            advertise.to_string(),
            "--cert-file".to_string(),
            tls(CERT_ENTRY),
            "--key-file".to_string(),
            tls(KEY_ENTRY),
            "--trusted-ca-file".to_string(),
            tls(CA_ENTRY),
            "--metrics-listen".to_string(),
            format!("0.0.0.0:{GATEWAY_METRICS_PORT}"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("etcd".to_string()),
                container_port: ETCD_API_PORT,
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".to_string()),
                container_port: GATEWAY_METRICS_PORT,
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
        ]),
        // Ready while a quorum of replicas answers it (etcd's /health); alive while it serves.
        readiness_probe: Some(http_probe("/health", 2, 3)),
        liveness_probe: Some(http_probe("/livez", 10, 6)),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("50m".to_string())),
                ("memory".to_string(), Quantity("64Mi".to_string())),
            ])),
            ..ResourceRequirements::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "view".to_string(),
                mount_path: config::CONFIG_DIR.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tls".to_string(),
                mount_path: TLS_DIR.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        security_context: Some(crate::children::restricted_container_security()),
        ..Container::default()
    }
}

/// `status.etcdAPI` from the Service and Deployment as read back (either may be missing while
/// they are being created).
pub fn status(
    cluster: &str,
    namespace: &str,
    spec: &EtcdApiSpec,
    service: Option<&Service>,
    deployment: Option<&Deployment>,
) -> EtcdApiStatus {
    let cluster_ip = service
        .and_then(|s| s.spec.as_ref()?.cluster_ip.clone())
        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok());
    EtcdApiStatus {
        endpoint: endpoint(cluster, namespace),
        service_name: names::etcd_service(cluster),
        cluster_ip,
        client_secret_name: names::etcd_client_secret(cluster),
        server_secret_name: names::etcd_server_secret(cluster),
        ca_secret_name: names::etcd_ca_secret(cluster),
        gateways: spec.replicas,
        ready_gateways: deployment.map_or(0, ready_gateways),
    }
}

/// Pods that run the Deployment's current template and are ready. Until the Deployment
/// controller has seen the current generation, its counts describe an older template.
fn ready_gateways(deployment: &Deployment) -> i32 {
    let Some(status) = deployment.status.as_ref() else {
        return 0;
    };
    let current = match (status.observed_generation, deployment.metadata.generation) {
        (Some(seen), Some(generation)) => seen >= generation,
        _ => false,
    };
    if !current {
        return 0;
    }
    let updated = status.updated_replicas.unwrap_or(0);
    let ready = status.ready_replicas.unwrap_or(0);
    // During a rollout old pods are ready too; at most `updated` of the ready ones are new.
    updated.min(ready)
}

#[cfg(test)]
mod tests;
