//! Names and labels of a cluster's children. Every name is derived from the cluster's name, which
//! the CRD limits to 40 characters so that these stay valid DNS labels.

use std::collections::BTreeMap;

/// The `app.kubernetes.io/name` of everything we create.
pub const APP_NAME: &str = "kmmr";
/// The `app.kubernetes.io/managed-by` of everything we create, and the field manager.
pub const MANAGER: &str = "kmmr-operator";
/// Label carrying a replica's id on its StatefulSet, pod and key Secret.
pub const REPLICA_ID_LABEL: &str = "kmmr.io/replica-id";
/// On a joining replica's key Secret: the view id its addition was requested in. The request can
/// only be installed while that view is current, so once the view has moved on without the
/// replica, the Secret is known to be unused and is deleted.
pub const JOIN_VIEW_ANNOTATION: &str = "kmmr.io/join-requested-in-view";
/// Pod annotation with the hash of the replica's configuration (what only a restart brings in).
pub const CONFIG_HASH_ANNOTATION: &str = "kmmr.io/config-hash";

/// Component of replica StatefulSets, their pods and Services.
pub const COMPONENT_REPLICA: &str = "replica";
/// Component of the etcd gateways' Deployment, pods and Service.
pub const COMPONENT_ETCD_GATEWAY: &str = "etcd-gateway";
/// Gateway pod annotation with the hash of the view the gateway starts from (see
/// `etcd_api::deployment`).
pub const VIEW_HASH_ANNOTATION: &str = "kmmr.io/view-hash";
/// Gateway pod annotation with the hash of the server certificate it serves.
pub const ETCD_CERT_HASH_ANNOTATION: &str = "kmmr.io/etcd-cert-hash";
/// On the etcd server certificate's Secret: the subject alternative names it was issued for,
/// comma-separated, so that the operator sees when the Service's address changed.
pub const ETCD_SANS_ANNOTATION: &str = "kmmr.io/etcd-server-sans";

/// Service in front of the etcd gateways.
pub fn etcd_service(cluster: &str) -> String {
    format!("{cluster}-etcd")
}

/// Deployment of the etcd gateways.
pub fn etcd_gateway(cluster: &str) -> String {
    format!("{cluster}-etcd-gateway")
}

/// Secret with the etcd API's CA certificate and key, mounted by no pod.
pub fn etcd_ca_secret(cluster: &str) -> String {
    format!("{cluster}-etcd-ca")
}

/// Secret with the gateways' server certificate, mounted by the gateway pods.
pub fn etcd_server_secret(cluster: &str) -> String {
    format!("{cluster}-etcd-server")
}

/// Secret with a client certificate for kube-apiserver (or etcdctl).
pub fn etcd_client_secret(cluster: &str) -> String {
    format!("{cluster}-etcd-client")
}

/// Selector of the etcd gateway pods of `cluster`.
pub fn etcd_gateway_selector(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP_NAME.to_string()),
        (
            "app.kubernetes.io/instance".to_string(),
            cluster.to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            COMPONENT_ETCD_GATEWAY.to_string(),
        ),
    ])
}

/// StatefulSet of replica `id`: its only pod is `<cluster>-<id>-0`.
pub fn stateful_set(cluster: &str, id: i32) -> String {
    format!("{cluster}-{id}")
}

/// The PersistentVolumeClaim of replica `id` (from its StatefulSet's claim template `data`).
pub fn data_claim(cluster: &str, id: i32) -> String {
    format!("data-{}", pod(cluster, id))
}

/// The replica id of a claim named by [`data_claim`], if `claim` is one of `cluster`'s.
pub fn data_claim_id(cluster: &str, claim: &str) -> Option<i32> {
    claim
        .strip_prefix("data-")?
        .strip_prefix(cluster)?
        .strip_prefix('-')?
        .strip_suffix("-0")?
        .parse()
        .ok()
}

/// The pod of replica `id`.
pub fn pod(cluster: &str, id: i32) -> String {
    format!("{cluster}-{id}-0")
}

/// Headless Service giving each replica pod a stable DNS name.
pub fn headless_service(cluster: &str) -> String {
    format!("{cluster}-replicas")
}

/// ClusterIP Service on the client port of every replica.
pub fn client_service(cluster: &str) -> String {
    format!("{cluster}-client")
}

/// ConfigMap holding view.toml and one replica-<id>.toml per replica.
pub fn config_map(cluster: &str) -> String {
    format!("{cluster}-config")
}

/// PodDisruptionBudget of the replica pods.
pub fn pod_disruption_budget(cluster: &str) -> String {
    format!("{cluster}-pdb")
}

/// Secret holding replica `id`'s private key, mounted by that replica's pod only.
pub fn key_secret(cluster: &str, id: i32) -> String {
    format!("{cluster}-{id}-key")
}

/// Secret holding the admin key, which signs reconfiguration requests; mounted by no pod.
pub fn admin_secret(cluster: &str) -> String {
    format!("{cluster}-admin-key")
}

/// The entry of replica `id`'s configuration in the ConfigMap.
pub fn replica_config_entry(id: i32) -> String {
    format!("replica-{id}.toml")
}

/// Replica `id`'s address in the view: the stable DNS name of its pod and its replica port.
pub fn member_address(cluster: &str, namespace: &str, id: i32, port: i32) -> String {
    format!(
        "{pod}.{svc}.{namespace}.svc:{port}",
        pod = pod(cluster, id),
        svc = headless_service(cluster)
    )
}

/// Labels shared by every child of `cluster`.
pub fn common_labels(cluster: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP_NAME.to_string()),
        (
            "app.kubernetes.io/instance".to_string(),
            cluster.to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
        (
            "app.kubernetes.io/part-of".to_string(),
            APP_NAME.to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGER.to_string(),
        ),
    ])
}

/// Selector of all replica pods of `cluster` (Services, PodDisruptionBudget).
pub fn replica_selector(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP_NAME.to_string()),
        (
            "app.kubernetes.io/instance".to_string(),
            cluster.to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            COMPONENT_REPLICA.to_string(),
        ),
    ])
}

/// Selector of replica `id`'s pod (its StatefulSet).
pub fn replica_pod_selector(cluster: &str, id: i32) -> BTreeMap<String, String> {
    let mut labels = replica_selector(cluster);
    labels.insert(REPLICA_ID_LABEL.to_string(), id.to_string());
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_name_gives_back_its_replica_id_and_only_its_cluster_s() {
        assert_eq!(data_claim_id("demo", &data_claim("demo", 12)), Some(12));
        // "demo-1" is another cluster whose names start like demo's.
        assert_eq!(data_claim_id("demo", &data_claim("demo-1", 3)), None);
        assert_eq!(data_claim_id("demo", "data-demo-x-0"), None);
        assert_eq!(data_claim_id("demo", "other"), None);
    }

    #[test]
    fn longest_allowed_cluster_name_keeps_every_child_name_a_dns_label() {
        let cluster = "c".repeat(kmmr_crds::MAX_NAME_LEN as usize);
        let id = kmmr_crds::MAX_REPLICAS - 1;
        // A StatefulSet's pods carry controller-revision-hash = <name>-<hash of up to 10>.
        assert!(stateful_set(&cluster, id).len() + 11 <= 63);
        for name in [
            pod(&cluster, id),
            headless_service(&cluster),
            client_service(&cluster),
            key_secret(&cluster, id),
            admin_secret(&cluster),
            config_map(&cluster),
            pod_disruption_budget(&cluster),
            etcd_service(&cluster),
            etcd_gateway(&cluster),
            etcd_ca_secret(&cluster),
            etcd_server_secret(&cluster),
            etcd_client_secret(&cluster),
        ] {
            assert!(name.len() <= 63, "{name} is longer than a DNS label");
        }
    }

    #[test]
    fn member_address_is_the_pods_stable_dns_name() {
        assert_eq!(
            member_address("demo", "prod", 2, 7000),
            "demo-2-0.demo-replicas.prod.svc:7000"
        );
    }
}
