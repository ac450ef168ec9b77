use super::*;
use kmmr_crds::BftClusterSpec;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

fn cluster() -> BftCluster {
    let spec: BftClusterSpec = serde_json::from_value(serde_json::json!({
        "replicas": 4,
        "image": "kmmr/replica:0.1.0",
        "etcdAPI": {"enabled": true},
    }))
    .unwrap();
    let mut c = BftCluster::new("demo", spec);
    c.metadata.namespace = Some("prod".into());
    c.metadata.uid = Some("5a1c0b7e-0000-4000-8000-000000000001".into());
    c
}

fn etcd_spec(c: &BftCluster) -> EtcdApiSpec {
    c.spec.etcd_api_enabled().cloned().unwrap()
}

const YEAR: i16 = 2026;

fn fresh(sans: &[String]) -> (Certs, [Secret; 3]) {
    let c = cluster();
    let plan = plan_certs(StoredCerts::default(), sans);
    let certs = issue("demo", "prod", plan, StoredCerts::default(), sans, YEAR).unwrap();
    let secrets = secrets(&c, &certs, sans);
    (certs, secrets)
}

fn stored(s: &[Secret; 3]) -> StoredCerts<'_> {
    StoredCerts {
        ca: Some(&s[0]),
        server: Some(&s[1]),
        client: Some(&s[2]),
    }
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate")
}

fn roots(ca: &str) -> std::sync::Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(ca)).expect("the CA is a valid root");
    std::sync::Arc::new(roots)
}

fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether a TLS client trusting `ca` accepts `server` for `name` (what kube-apiserver checks).
fn server_accepted(ca: &str, server: &str, name: &str) -> bool {
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(ca), provider())
            .build()
            .unwrap();
    let name = ServerName::try_from(name.to_string()).unwrap();
    verifier
        .verify_server_cert(&der(server), &[], &name, &[], UnixTime::now())
        .is_ok()
}

/// Whether a TLS server requiring client certificates from `ca` accepts `client` (what the
/// gateway checks).
fn client_accepted(ca: &str, client: &str) -> bool {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca), provider())
            .build()
            .unwrap();
    verifier
        .verify_client_cert(&der(client), &[], UnixTime::now())
        .is_ok()
}

#[test]
fn the_server_certificate_is_valid_for_the_service_names_its_ip_and_loopback_only() {
    let sans = server_sans("demo", "prod", Some("10.96.7.8"));
    let (certs, _) = fresh(&sans);
    for name in [
        "demo-etcd",
        "demo-etcd.prod",
        "demo-etcd.prod.svc",
        "demo-etcd.prod.svc.cluster.local",
        "10.96.7.8",
        "127.0.0.1",
        "localhost",
    ] {
        assert!(
            server_accepted(&certs.ca.cert, &certs.server.cert, name),
            "{name} must be accepted"
        );
    }
    for name in ["other-etcd.prod.svc", "demo-etcd.other.svc", "10.96.7.9"] {
        assert!(
            !server_accepted(&certs.ca.cert, &certs.server.cert, name),
            "{name} must be refused"
        );
    }
    // The server certificate is no client certificate, and the client's is no server's.
    assert!(!client_accepted(&certs.ca.cert, &certs.server.cert));
    assert!(!server_accepted(
        &certs.ca.cert,
        &certs.client.cert,
        "demo-etcd.prod.svc"
    ));
    assert!(client_accepted(&certs.ca.cert, &certs.client.cert));
}

#[test]
fn another_clusters_ca_is_not_trusted() {
    let sans = server_sans("demo", "prod", None);
    let (a, _) = fresh(&sans);
    let (b, _) = fresh(&sans);
    assert!(!client_accepted(&a.ca.cert, &b.client.cert));
    assert!(!server_accepted(
        &a.ca.cert,
        &b.server.cert,
        "demo-etcd.prod.svc"
    ));
}

#[test]
fn a_headless_or_missing_cluster_ip_is_left_out_of_the_names() {
    assert_eq!(server_sans("demo", "prod", Some("None")).len(), 6);
    assert_eq!(server_sans("demo", "prod", None).len(), 6);
    assert_eq!(server_sans("demo", "prod", Some("fd00::1")).len(), 7);
}

#[test]
fn nothing_is_stored_so_everything_is_issued() {
    let plan = plan_certs(StoredCerts::default(), &server_sans("demo", "prod", None));
    assert_eq!(
        plan,
        CertPlan {
            ca: true,
            server: true,
            client: true
        }
    );
}

#[test]
fn stored_certificates_for_the_same_names_are_kept() {
    let sans = server_sans("demo", "prod", Some("10.96.7.8"));
    let (_, s) = fresh(&sans);
    let plan = plan_certs(stored(&s), &sans);
    assert!(!plan.any(), "{plan:?}");
}

#[test]
fn a_new_cluster_ip_reissues_only_the_server_certificate_from_the_same_ca() {
    let old = server_sans("demo", "prod", Some("10.96.7.8"));
    let (certs, s) = fresh(&old);
    let new = server_sans("demo", "prod", Some("10.96.9.9"));
    let plan = plan_certs(stored(&s), &new);
    assert_eq!(
        plan,
        CertPlan {
            ca: false,
            server: true,
            client: false
        }
    );
    let next = issue("demo", "prod", plan, stored(&s), &new, YEAR).unwrap();
    assert_eq!(next.ca, certs.ca, "the CA is kept");
    assert_eq!(next.client, certs.client, "the client certificate is kept");
    assert!(server_accepted(
        &next.ca.cert,
        &next.server.cert,
        "10.96.9.9"
    ));
    assert!(!server_accepted(
        &next.ca.cert,
        &next.server.cert,
        "10.96.7.8"
    ));
    // The apiserver's client certificate still passes the gateways' check.
    assert!(client_accepted(&next.ca.cert, &next.client.cert));
}

#[test]
fn a_lost_client_secret_is_reissued_by_the_stored_ca() {
    let sans = server_sans("demo", "prod", None);
    let (certs, s) = fresh(&sans);
    let only = StoredCerts {
        client: None,
        ..stored(&s)
    };
    let plan = plan_certs(only, &sans);
    assert_eq!(
        plan,
        CertPlan {
            ca: false,
            server: false,
            client: true
        }
    );
    let next = issue("demo", "prod", plan, only, &sans, YEAR).unwrap();
    assert_ne!(next.client, certs.client);
    assert!(client_accepted(&certs.ca.cert, &next.client.cert));
}

#[test]
fn a_lost_ca_reissues_everything() {
    let sans = server_sans("demo", "prod", None);
    let (_, s) = fresh(&sans);
    let plan = plan_certs(
        StoredCerts {
            ca: None,
            ..stored(&s)
        },
        &sans,
    );
    assert!(plan.ca && plan.server && plan.client);
}

#[test]
fn a_leaf_signed_by_another_ca_is_reissued() {
    let sans = server_sans("demo", "prod", None);
    let (_, a) = fresh(&sans);
    let (_, b) = fresh(&sans);
    let mixed = StoredCerts {
        ca: Some(&a[0]),
        server: Some(&b[1]),
        client: Some(&a[2]),
    };
    let plan = plan_certs(mixed, &sans);
    assert_eq!(
        plan,
        CertPlan {
            ca: false,
            server: true,
            client: false
        }
    );
}

#[test]
fn a_corrupt_ca_key_is_reported_naming_the_secret() {
    let sans = server_sans("demo", "prod", None);
    let (_, mut s) = fresh(&sans);
    s[0].data
        .as_mut()
        .unwrap()
        .insert(KEY_ENTRY.into(), ByteString(b"not a key".to_vec()));
    s[1].data.as_mut().unwrap().remove(CERT_ENTRY);
    let plan = plan_certs(stored(&s), &sans);
    let err = issue("demo", "prod", plan, stored(&s), &sans, YEAR).unwrap_err();
    assert!(err.to_string().contains("demo-etcd-ca"), "{err}");
}

#[test]
fn secrets_are_owned_typed_and_only_the_ca_holds_the_ca_key() {
    let sans = server_sans("demo", "prod", None);
    let (certs, s) = fresh(&sans);
    let names: Vec<_> = s.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
    assert_eq!(
        names,
        ["demo-etcd-ca", "demo-etcd-server", "demo-etcd-client"]
    );
    for secret in &s {
        assert_eq!(secret.metadata.owner_references.as_ref().unwrap().len(), 1);
        if secret.metadata.name.as_deref() == Some("demo-etcd-ca") {
            continue;
        }
        // The gateways and the apiservers get these two: neither may sign certificates.
        let data = secret.data.as_ref().unwrap();
        for entry in data.values() {
            assert!(
                !String::from_utf8_lossy(&entry.0).contains(certs.ca.key.trim()),
                "{:?} must not hold the CA key",
                secret.metadata.name
            );
        }
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(entry(Some(secret), CA_ENTRY), certs.ca.cert);
    }
    assert_eq!(entry(Some(&s[0]), KEY_ENTRY), certs.ca.key);
    assert_eq!(
        s[1].metadata.annotations.as_ref().unwrap()[names::ETCD_SANS_ANNOTATION],
        sans.join(",")
    );
}

#[test]
fn the_gateways_mount_the_view_and_the_server_certificate_and_nothing_else() {
    let c = cluster();
    let d = deployment(&c, &etcd_spec(&c), "id = 0\n", "CERT");
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().unwrap();
    let secrets: Vec<_> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
        .collect();
    assert_eq!(secrets, ["demo-etcd-server"]);
    let view = pod
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.config_map.as_ref());
    assert_eq!(view.unwrap().name, "demo-config");
    let container = &pod.containers[0];
    let args = container.args.as_ref().unwrap().join(" ");
    assert!(
        args.contains("--trusted-ca-file /etc/kmmr-etcd/ca.crt"),
        "{args}"
    );
    assert!(args.contains("--cluster /etc/kmmr"), "{args}");
    assert!(
        args.contains("--advertise-client-url https://demo-etcd.prod.svc:2379"),
        "{args}"
    );
    // A fresh client key on every start: replicas serve only a key's newest session.
    assert!(!args.contains("--client-key"), "{args}");
    assert_eq!(pod.automount_service_account_token, Some(false));
    let selector = spec.selector.match_labels.as_ref().unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    // The replicas' Services must not select gateways.
    assert_ne!(
        labels["app.kubernetes.io/component"],
        names::COMPONENT_REPLICA
    );
}

#[test]
fn gateways_are_ready_while_a_quorum_answers_them_on_their_metrics_port() {
    let c = cluster();
    let d = deployment(&c, &etcd_spec(&c), "id = 0\n", "CERT");
    let pod = d.spec.unwrap().template.spec.unwrap();
    let container = &pod.containers[0];
    let args = container.args.as_ref().unwrap().join(" ");
    assert!(args.contains("--metrics-listen 0.0.0.0:2381"), "{args}");
    let ports: Vec<_> = container
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [("etcd".to_string(), 2379), ("metrics".to_string(), 2381)]
    );
    let get = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let h = p.as_ref().unwrap().http_get.as_ref().unwrap();
        (h.path.clone().unwrap(), h.port.clone())
    };
    let metrics =
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".to_string());
    assert_eq!(
        get(&container.readiness_probe),
        ("/health".to_string(), metrics.clone())
    );
    assert_eq!(
        get(&container.liveness_probe),
        ("/livez".to_string(), metrics)
    );
}

#[test]
fn a_new_view_or_certificate_rolls_the_gateways_and_nothing_else_does() {
    let c = cluster();
    let spec = etcd_spec(&c);
    let annotations = |view: &str, cert: &str| {
        deployment(&c, &spec, view, cert)
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()
    };
    let base = annotations("id = 0\n", "CERT");
    assert_eq!(base, annotations("id = 0\n", "CERT"));
    assert_ne!(base, annotations("id = 1\n", "CERT"));
    assert_ne!(base, annotations("id = 0\n", "CERT2"));
}

#[test]
fn the_service_selects_the_gateways_on_the_etcd_port_with_the_asked_type() {
    let mut c = cluster();
    c.spec.etcd_api.as_mut().unwrap().service_type = kmmr_crds::EtcdServiceType::NodePort;
    let svc = service(&c, &etcd_spec(&c));
    let spec = svc.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(spec.ports.unwrap()[0].port, 2379);
    assert_eq!(spec.selector.unwrap(), names::etcd_gateway_selector("demo"));
    assert_eq!(svc.metadata.name.as_deref(), Some("demo-etcd"));
}

#[test]
fn status_counts_only_ready_gateways_of_the_current_template() {
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    let c = cluster();
    let spec = etcd_spec(&c);
    let mut d = deployment(&c, &spec, "v", "c");
    d.metadata.generation = Some(3);
    let with = |observed, updated, ready| {
        let mut d = d.clone();
        d.status = Some(DeploymentStatus {
            observed_generation: Some(observed),
            updated_replicas: Some(updated),
            ready_replicas: Some(ready),
            ..DeploymentStatus::default()
        });
        status("demo", "prod", &spec, None, Some(&d)).ready_gateways
    };
    assert_eq!(with(3, 2, 2), 2);
    assert_eq!(with(3, 1, 2), 1, "an old pod still ready during a rollout");
    assert_eq!(with(2, 2, 2), 0, "counts of an older generation");
    let st = status("demo", "prod", &spec, None, None);
    assert_eq!(st.ready_gateways, 0);
    assert_eq!(st.gateways, 2);
    assert_eq!(st.endpoint, "https://demo-etcd.prod.svc:2379");
    assert_eq!(st.client_secret_name, "demo-etcd-client");
    assert_eq!(st.cluster_ip, None);
}
