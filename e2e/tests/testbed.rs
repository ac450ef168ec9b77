//! Tests against the real Kubernetes that `KUBECONFIG` names: the KmMR test bed
//! (`e2e/testbed/up.sh`), or kind in users' CI.
//!
//! Without `KUBECONFIG` every test here returns early with a loud message, so that a plain
//! `cargo test --workspace` on a machine without a cluster still passes. The test command that CI
//! runs (`.ci/testbed-test`) brings the test bed up and sets `KUBECONFIG`, so there they run.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, LogParams, Patch, PatchParams, PostParams,
};
use kube::core::ApiResource;
use kube::Client;
use serde_json::json;

const FIELD_MANAGER: &str = "kmmr-e2e";
const GROUP: &str = "testbed.kmmr.dev";
const CRD_NAME: &str = "probes.testbed.kmmr.dev";

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Prints past libtest's output capture (which swallows `eprintln!` of passing tests), so that a
/// skipped test is visible in every run.
fn loud(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "\n*** {msg} ***\n");
}

/// The client for the cluster `KUBECONFIG` names, or `None` (after saying so loudly) when it is unset.
async fn client_or_skip(test: &str) -> Option<Client> {
    if std::env::var_os("KUBECONFIG").is_none_or(|v| v.is_empty()) {
        loud(&format!(
            "SKIPPED {test}: KUBECONFIG is unset. These tests need a real Kubernetes; \
             run .ci/testbed-test (or e2e/testbed/up.sh and export KUBECONFIG) to run them."
        ));
        return None;
    }
    match Client::try_default().await {
        Ok(c) => Some(c),
        Err(e) => panic!("KUBECONFIG is set but no client could be built from it: {e}"),
    }
}

/// A name no earlier run against the same cluster used.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// Polls `check` once a second until it returns `Some`, for at most `timeout`.
async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    while start.elapsed() < timeout {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e.to_string()),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(format!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})").into())
}

fn probe_crd() -> serde_json::Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": CRD_NAME },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": { "plural": "probes", "singular": "probe", "kind": "Probe", "listKind": "ProbeList" },
            "versions": [{
                "name": "v1alpha1",
                "served": true,
                "storage": true,
                "subresources": { "status": {} },
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["message", "replicas"],
                            "properties": {
                                "message": { "type": "string", "maxLength": 64 },
                                "replicas": { "type": "integer", "minimum": 1 }
                            },
                            // CEL, evaluated by the apiserver itself.
                            "x-kubernetes-validations": [{
                                "rule": "self.replicas % 3 == 1",
                                "message": "replicas must be 3f+1"
                            }]
                        },
                        "status": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
                    }
                }}
            }]
        }
    })
}

async fn install_crd(client: &Client) -> Result<ApiResource> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(probe_crd())?;
    crds.patch(
        CRD_NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await?;
    poll("the CRD to be established", Duration::from_secs(60), || {
        let crds = crds.clone();
        async move {
            let crd = crds.get(CRD_NAME).await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(established.then_some(()))
        }
    })
    .await?;
    Ok(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v1alpha1", "Probe"),
        "probes",
    ))
}

#[tokio::test]
async fn server_is_v1_34() -> Result {
    let Some(client) = client_or_skip("server_is_v1_34").await else {
        return Ok(());
    };
    let info = client.apiserver_version().await?;
    loud(&format!(
        "server version: {} (go {}, built {})",
        info.git_version, info.go_version, info.build_date
    ));
    if std::env::var_os("KMMR_TESTBED").is_some() {
        assert_eq!(info.major, "1");
        assert_eq!(info.minor, "34", "the test bed must serve Kubernetes 1.34");
        assert!(
            info.git_version.starts_with("v1.34."),
            "git version {}",
            info.git_version
        );
    }
    Ok(())
}

#[tokio::test]
async fn crd_install_create_and_read_back() -> Result {
    let Some(client) = client_or_skip("crd_install_create_and_read_back").await else {
        return Ok(());
    };
    let ar = install_crd(&client).await?;
    let probes: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);

    let name = unique("probe");
    let mut obj = DynamicObject::new(&name, &ar);
    obj.data = json!({ "spec": { "message": "hello from kmmr-e2e", "replicas": 4 } });
    // The CRD was just established: discovery may lag a moment, so retry the first create.
    poll("the first create", Duration::from_secs(30), || {
        let (probes, obj) = (probes.clone(), obj.clone());
        async move { Ok(Some(probes.create(&PostParams::default(), &obj).await?)) }
    })
    .await?;

    let back = probes.get(&name).await?;
    assert_eq!(back.data["spec"]["message"], "hello from kmmr-e2e");
    assert_eq!(back.data["spec"]["replicas"], 4);
    assert!(back.metadata.uid.is_some(), "the server assigns a uid");

    // The status subresource: writes to it are kept, writes of spec through it are not.
    let status = json!({ "status": { "phase": "Observed" }, "spec": { "message": "ignored", "replicas": 7 } });
    probes
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    let back = probes.get(&name).await?;
    assert_eq!(back.data["status"]["phase"], "Observed");
    assert_eq!(
        back.data["spec"]["replicas"], 4,
        "spec must not change through /status"
    );

    // CEL validation runs in the apiserver: 3 replicas is not 3f+1.
    let mut bad = DynamicObject::new(&unique("bad-probe"), &ar);
    bad.data = json!({ "spec": { "message": "x", "replicas": 3 } });
    let err = probes
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("CEL must reject replicas=3");
    assert!(err.to_string().contains("3f+1"), "unexpected error: {err}");

    probes.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}

/// The image of the project's own that the test bed's node holds (`KMMR_E2E_IMAGE`), or `None`
/// (after saying so loudly) when there is no node with locally built images.
fn image_or_skip(test: &str) -> Option<String> {
    let image = std::env::var("KMMR_E2E_IMAGE")
        .ok()
        .filter(|v| !v.is_empty());
    if image.is_none() {
        loud(&format!(
            "SKIPPED {test}: KMMR_E2E_IMAGE is unset \
             (no node with locally built images; start the test bed with --node)."
        ));
    }
    image
}

/// Runs one pod with `image` and `args` to completion in a fresh namespace, and returns its
/// final phase and its logs (read through the apiserver and kubelet, as `kubectl logs` does).
async fn run_pod(
    client: &Client,
    prefix: &str,
    image: &str,
    args: &[&str],
) -> Result<(String, String)> {
    let nodes: Api<Node> = Api::all(client.clone());
    poll("a Ready node", Duration::from_secs(120), || {
        let nodes = nodes.clone();
        async move {
            let list = nodes.list(&Default::default()).await?;
            let ready = list.items.iter().any(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            });
            Ok(ready.then_some(()))
        }
    })
    .await?;

    let ns_name = unique(prefix);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": ns_name } }))?;
    namespaces.create(&PostParams::default(), &ns).await?;
    // Pods need the namespace's default service account, which the controller manager creates.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns_name);
    poll(
        "the default service account",
        Duration::from_secs(60),
        || {
            let sas = sas.clone();
            async move { Ok(sas.get_opt("default").await?.map(|_| ())) }
        },
    )
    .await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "run" },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "run",
                "image": image,
                "imagePullPolicy": "Never",
                "args": args
            }]
        }
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let phase = poll("the pod to finish", Duration::from_secs(180), || {
        let pods = pods.clone();
        async move {
            let p = pods.get("run").await?;
            let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
            Ok(matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase))
        }
    })
    .await?;
    let logs = pods.logs("run", &LogParams::default()).await?;
    loud(&format!("pod {ns_name}/run: phase {phase}, logs: {logs:?}"));
    namespaces
        .delete(&ns_name, &DeleteParams::default())
        .await?;
    Ok((phase, logs))
}

/// Tier B: a pod from a locally built image (imported into the node's containerd, no registry)
/// runs to completion and its output is readable through the apiserver, like `kubectl logs`.
#[tokio::test]
async fn pod_from_local_image_runs_to_completion() -> Result {
    let test = "pod_from_local_image_runs_to_completion";
    let Some(client) = client_or_skip(test).await else {
        return Ok(());
    };
    let Some(image) = image_or_skip(test) else {
        return Ok(());
    };
    let token = unique("token");
    let (phase, logs) = run_pod(&client, "e2e-echo", &image, &["kmmr-e2e says", &token]).await?;
    assert_eq!(phase, "Succeeded");
    assert!(logs.contains(&token), "logs {logs:?} must contain {token}");
    Ok(())
}

/// Tier B: inside a pod, cluster DNS resolves the `kubernetes` service and kube-proxy carries a
/// connection to its ClusterIP through to the apiserver, as an operator's client would.
#[tokio::test]
async fn pod_reaches_apiserver_by_service_dns() -> Result {
    let test = "pod_reaches_apiserver_by_service_dns";
    let Some(client) = client_or_skip(test).await else {
        return Ok(());
    };
    let Some(image) = image_or_skip(test) else {
        return Ok(());
    };
    let target = "kubernetes.default.svc.cluster.local:443";
    let (phase, logs) = run_pod(&client, "e2e-dns", &image, &["--connect", target]).await?;
    assert_eq!(phase, "Succeeded", "logs: {logs:?}");
    assert!(
        logs.contains(&format!("connected {target}")),
        "logs {logs:?}"
    );
    Ok(())
}
