//! Acting on the etcd API (`spec.etcdAPI`): the Service first (its cluster IP goes into the
//! server certificate), then whatever certificates `etcd_api::plan_certs` asks for, then the
//! gateways' Deployment; and `status.etcdAPI` from what was applied. Switched off, its objects
//! are deleted. Paused, nothing is changed and the status is read from what exists.

use k8s_openapi::api::apps::v1::Deployment;

use super::*;
use crate::etcd_api::{self, StoredCerts};

/// Server-side applies `obj` and gives back the object as stored.
pub(super) async fn ssa<K>(client: &Client, namespace: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Serialize
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    <K as Resource>::DynamicType: Default,
{
    let name = obj
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingMetadata("child name"))?;
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams::apply(names::MANAGER).force();
    Ok(api.patch(&name, &params, &Patch::Apply(obj)).await?)
}

/// Deletes `name` if it exists and belongs to `cluster`.
pub(super) async fn delete_owned<K>(
    client: &Client,
    cluster: &BftCluster,
    namespace: &str,
    name: &str,
) -> Result<bool, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    <K as Resource>::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await? {
        Some(obj) if owned_by(&obj, cluster) => {
            api.delete(name, &DeleteParams::background()).await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The current year, the only clock the certificates need (their validity is in whole years).
fn this_year() -> i16 {
    jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .year()
}

/// Reconciles the etcd API and gives `status.etcdAPI`. `view` is the view.toml just applied, or
/// `None` when paused (then nothing is changed).
pub(super) async fn reconcile_etcd_api(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    view: Option<&str>,
) -> Result<Option<kmmr_crds::EtcdApiStatus>, Error> {
    let name = cluster.name_any();
    let client = &ctx.client;
    let Some(spec) = cluster.spec.etcd_api_enabled() else {
        // Only a cluster whose status still shows the API has anything to remove: the status is
        // cleared only after the removal went through, so a failed one is retried, and clusters
        // that never had the API cost no extra reads. (Owner references remove the objects
        // with the cluster in any case.)
        let was_on = cluster
            .status
            .as_ref()
            .is_some_and(|s| s.etcd_api.is_some());
        if view.is_some() && was_on {
            turn_off(ctx, cluster, namespace).await?;
        }
        return Ok(None);
    };
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let Some(view) = view else {
        let service = services.get_opt(&names::etcd_service(&name)).await?;
        let deployment = deployments.get_opt(&names::etcd_gateway(&name)).await?;
        return Ok(Some(etcd_api::status(
            &name,
            namespace,
            spec,
            service.as_ref(),
            deployment.as_ref(),
        )));
    };

    let service = ssa(client, namespace, &etcd_api::service(cluster, spec)).await?;
    let cluster_ip = service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref());
    let sans = etcd_api::server_sans(&name, namespace, cluster_ip);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let ca = secrets.get_opt(&names::etcd_ca_secret(&name)).await?;
    let server = secrets.get_opt(&names::etcd_server_secret(&name)).await?;
    let client_secret = secrets.get_opt(&names::etcd_client_secret(&name)).await?;
    let stored = StoredCerts {
        ca: ca.as_ref(),
        server: server.as_ref(),
        client: client_secret.as_ref(),
    };
    let plan = etcd_api::plan_certs(stored, &sans);
    let server_cert = if plan.any() {
        let certs = etcd_api::issue(&name, namespace, plan, stored, &sans, this_year())?;
        // Applied every time they change only: an unchanged Secret is never rewritten, so the
        // gateways' certificate hash, and so their pods, stay as they are.
        for secret in etcd_api::secrets(cluster, &certs, &sans) {
            ssa(client, namespace, &secret).await?;
        }
        publish(
            ctx,
            cluster,
            false,
            "EtcdCertificatesIssued",
            &issued_note(&name, plan, &sans),
            "EtcdAPI",
        )
        .await;
        certs.server.cert
    } else {
        etcd_api::entry(stored.server, etcd_api::CERT_ENTRY).to_string()
    };
    let deployment = ssa(
        client,
        namespace,
        &etcd_api::deployment(cluster, spec, view, &server_cert),
    )
    .await?;
    Ok(Some(etcd_api::status(
        &name,
        namespace,
        spec,
        Some(&service),
        Some(&deployment),
    )))
}

fn issued_note(name: &str, plan: etcd_api::CertPlan, sans: &[String]) -> String {
    let mut what = Vec::new();
    if plan.ca {
        what.push(format!("a new CA (Secret {})", names::etcd_ca_secret(name)));
    }
    if plan.server {
        what.push(format!(
            "the gateways' server certificate for {} (Secret {})",
            sans.join(", "),
            names::etcd_server_secret(name)
        ));
    }
    if plan.client {
        what.push(format!(
            "a client certificate for kube-apiserver (Secret {})",
            names::etcd_client_secret(name)
        ));
    }
    format!("issued {}", what.join("; "))
}

/// spec.etcdAPI switched off (or removed): the gateways, their Service and the certificates go.
async fn turn_off(ctx: &Context, cluster: &BftCluster, namespace: &str) -> Result<(), Error> {
    let name = cluster.name_any();
    let c = &ctx.client;
    let mut removed =
        delete_owned::<Deployment>(c, cluster, namespace, &names::etcd_gateway(&name)).await?;
    removed |= delete_owned::<Service>(c, cluster, namespace, &names::etcd_service(&name)).await?;
    for secret in [
        names::etcd_server_secret(&name),
        names::etcd_client_secret(&name),
        names::etcd_ca_secret(&name),
    ] {
        removed |= delete_owned::<Secret>(c, cluster, namespace, &secret).await?;
    }
    if removed {
        publish(
            ctx,
            cluster,
            false,
            "EtcdAPIRemoved",
            "spec.etcdAPI is not enabled: the etcd gateways, their Service and the certificates' Secrets are deleted",
            "EtcdAPI",
        )
        .await;
    }
    Ok(())
}
