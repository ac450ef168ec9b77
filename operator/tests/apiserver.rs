//! The controller and leader election against the real kube-apiserver that `KUBECONFIG` names
//! (the test bed; the control plane alone suffices, since no replica needs to run here). Without
//! `KUBECONFIG` each test says so loudly and passes.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kmmr_crds::BftCluster;
use kmmr_operator::controller::{self, Context, ProbeVia};
use kmmr_operator::leader::{Config, Elector};
use kmmr_operator::membership::NotSupported;
use kmmr_operator::metrics::Metrics;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use serde_json::json;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn loud(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "\n*** {msg} ***\n");
}

async fn client_or_skip(test: &str) -> Option<Client> {
    if std::env::var_os("KUBECONFIG").is_none_or(|v| v.is_empty()) {
        loud(&format!(
            "SKIPPED {test}: KUBECONFIG is unset; run .ci/testbed-test (or e2e/testbed/up.sh) to run it"
        ));
        return None;
    }
    match Client::try_default().await {
        Ok(c) => Some(c),
        Err(e) => panic!("KUBECONFIG is set but no client could be built from it: {e}"),
    }
}

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}", (nanos / 1000) % 100_000_000)
}

async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(format!("timed out after {timeout:?} waiting for {what} (last error: {last:?})").into())
}

async fn namespace(client: &Client, prefix: &str) -> Result<String> {
    let name = unique(prefix);
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": name } }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(name)
}

#[tokio::test(flavor = "multi_thread")]
async fn leader_election_has_one_holder_and_hands_over_on_release() -> Result {
    let Some(client) =
        client_or_skip("leader_election_has_one_holder_and_hands_over_on_release").await
    else {
        return Ok(());
    };
    let ns = namespace(&client, "kmmr-lease").await?;
    let elector = |id: &str| {
        Elector::new(
            client.clone(),
            Config {
                name: "kmmr-operator".into(),
                namespace: ns.clone(),
                identity: id.into(),
                duration: Duration::from_secs(15),
                renew: Duration::from_secs(1),
            },
        )
    };
    let (a, b) = (elector("a"), elector("b"));
    assert!(a.try_acquire().await?, "a free lease is taken");
    assert!(!b.try_acquire().await?, "a held, unexpired lease is not");
    assert!(a.try_acquire().await?, "the holder renews");
    a.release().await?;
    assert!(b.try_acquire().await?, "a released lease is taken at once");
    assert!(!a.try_acquire().await?);
    Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await?;
    Ok(())
}

async fn install_crd(client: &Client) -> Result {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "bftclusters.kmmr.io",
        &PatchParams::apply("kmmr-operator-tests").force(),
        &Patch::Apply(&kmmr_crds::crd()),
    )
    .await?;
    poll("the CRD to be established", Duration::from_secs(60), || {
        let crds = crds.clone();
        async move {
            let crd = crds.get("bftclusters.kmmr.io").await?;
            let ok = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(ok.then_some(()))
        }
    })
    .await
}

async fn events(client: &Client, ns: &str, name: &str) -> Result<Vec<String>> {
    let list = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn controller_applies_children_reports_status_refuses_what_it_may_not_do_and_cleans_up(
) -> Result {
    let test =
        "controller_applies_children_reports_status_refuses_what_it_may_not_do_and_cleans_up";
    let Some(client) = client_or_skip(test).await else {
        return Ok(());
    };
    install_crd(&client).await?;
    let ns = namespace(&client, "kmmr-ctrl").await?;
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context::new(
        client.clone(),
        Recorder::new(
            client.clone(),
            Reporter {
                controller: "kmmr-operator".into(),
                instance: Some("tests".into()),
            },
        ),
        metrics.clone(),
        Arc::new(NotSupported),
        Duration::from_millis(500),
        ProbeVia::PodIp,
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let ns_for_run = ns.clone();
    let running = tokio::spawn(async move {
        controller::run(ctx, Some(&ns_for_run), async move {
            let _ = stopped.await;
        })
        .await;
    });

    let clusters: Api<BftCluster> = Api::namespaced(client.clone(), &ns);
    let cluster: BftCluster = serde_json::from_value(json!({
        "apiVersion": "kmmr.io/v1alpha1",
        "kind": "BftCluster",
        "metadata": { "name": "demo", "namespace": ns },
        "spec": { "replicas": 4, "image": "kmmr.local/replica:never-pulled", "imagePullPolicy": "Never" }
    }))?;
    // The CRD may have just been established: discovery can lag a moment.
    poll("the first create", Duration::from_secs(30), || {
        let (clusters, cluster) = (clusters.clone(), cluster.clone());
        async move {
            Ok(Some(
                clusters.create(&PostParams::default(), &cluster).await?,
            ))
        }
    })
    .await?;

    // Children, owned by the cluster and applied under the operator's field manager.
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let list = poll("four StatefulSets", Duration::from_secs(60), || {
        let sets = sets.clone();
        async move {
            let l = sets.list(&ListParams::default()).await?;
            Ok((l.items.len() == 4).then_some(l))
        }
    })
    .await?;
    for s in &list.items {
        let owner = &s.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("BftCluster", Some(true))
        );
        assert!(s
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .any(|m| m.manager.as_deref() == Some("kmmr-operator")
                && m.operation.as_deref() == Some("Apply")));
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for name in ["demo-0-key", "demo-3-key", "demo-admin-key"] {
        let s = secrets.get(name).await?;
        assert_eq!(s.immutable, Some(true));
    }
    let first_key = secrets.get("demo-0-key").await?.data;

    // Status: replicas cannot run here (no image), so the cluster is starting, not failing.
    let c = poll("a status", Duration::from_secs(60), || {
        let clusters = clusters.clone();
        async move {
            let c = clusters.get("demo").await?;
            Ok(c.status
                .as_ref()
                .is_some_and(|s| s.observed_generation == Some(1))
                .then_some(c))
        }
    })
    .await?;
    let status = c.status.unwrap_or_default();
    assert_eq!(
        (status.n, status.f, status.quorum, status.healthy),
        (Some(4), Some(1), Some(3), Some(0))
    );
    let available = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Available")
        .expect("Available");
    assert_eq!(
        (available.status.as_str(), available.reason.as_str()),
        ("False", "Starting")
    );
    assert!(c
        .metadata
        .finalizers
        .unwrap_or_default()
        .contains(&"kmmr.io/cleanup".to_string()));
    // The reconcile publishes KeysGenerated, then Starting when it writes the status: a list
    // between the two is not a failure, so wait for both.
    let reasons = poll("Events", Duration::from_secs(30), || async {
        let r = events(&client, &ns, "demo").await?;
        let has = |reason: &str| r.iter().any(|x| x == reason);
        Ok((has("KeysGenerated") && has("Starting")).then_some(r))
    })
    .await?;
    assert!(reasons.iter().any(|r| r == "Starting"), "{reasons:?}");

    // A second pass keeps the generated keys (they are read back, never regenerated).
    clusters
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": { "touch": "1" } } })),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(secrets.get("demo-0-key").await?.data, first_key);

    // Scaling needs the protocol's reconfiguration, which is not available: refused, reported,
    // and no replica is created outside the view.
    clusters
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 7 } })),
        )
        .await?;
    let c = poll("the refusal", Duration::from_secs(60), || {
        let clusters = clusters.clone();
        async move {
            let c = clusters.get("demo").await?;
            let refused = c.status.as_ref().is_some_and(|s| {
                s.observed_generation == Some(2)
                    && s.conditions.iter().any(|c| {
                        c.type_ == "Reconfiguring" && c.reason == "ReconfigurationDisabled"
                    })
            });
            Ok(refused.then_some(c))
        }
    })
    .await?;
    assert_eq!(c.status.and_then(|s| s.n), Some(4));
    assert!(sets.get_opt("demo-4").await?.is_none());
    // The Event is published after the status is written: wait for it rather than race it.
    poll(
        "the ReconfigurationDisabled Event",
        Duration::from_secs(30),
        || async {
            let r = events(&client, &ns, "demo").await?;
            Ok(r.iter()
                .any(|r| r == "ReconfigurationDisabled")
                .then_some(()))
        },
    )
    .await?;

    // The test-only Byzantine mode annotation: this operator was not started for tests, so it is
    // refused with an error saying so, and no replica is switched.
    clusters
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "annotations": { "kmmr.io/byzantine-test-mode": "1=mixed" } } }),
            ),
        )
        .await?;
    poll(
        "the ByzantineTestModeRefused Event",
        Duration::from_secs(60),
        || async {
            let r = events(&client, &ns, "demo").await?;
            Ok(r.iter()
                .any(|r| r == "ByzantineTestModeRefused")
                .then_some(()))
        },
    )
    .await?;
    let args = sets
        .get("demo-1")
        .await?
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers[0].args.clone().unwrap_or_default())
        .unwrap_or_default();
    assert!(!args.iter().any(|a| a == "--byzantine"), "{args:?}");

    // A user key Secret that does not exist: an error Event, a failure metric, no children.
    let bad: BftCluster = serde_json::from_value(json!({
        "apiVersion": "kmmr.io/v1alpha1",
        "kind": "BftCluster",
        "metadata": { "name": "keyless", "namespace": ns },
        "spec": { "replicas": 4, "image": "kmmr.local/replica:never-pulled", "keys": { "secretName": "absent" } }
    }))?;
    clusters.create(&PostParams::default(), &bad).await?;
    poll(
        "the KeySecretMissing Event",
        Duration::from_secs(60),
        || async {
            let r = events(&client, &ns, "keyless").await?;
            Ok(r.iter().any(|r| r == "KeySecretMissing").then_some(()))
        },
    )
    .await?;
    let text = metrics.encode()?;
    assert!(
        text.lines().any(|l| l
            .starts_with("kmmr_operator_reconcile_failures_total{error=\"KeySecretMissing\"}")
            && !l.ends_with(" 0")),
        "{text}"
    );
    assert!(sets.get_opt("keyless-0").await?.is_none());

    // Deleting runs the finalizer's cleanup, then the objects are gone.
    for name in ["demo", "keyless"] {
        clusters.delete(name, &DeleteParams::default()).await?;
    }
    poll(
        "the clusters to be deleted",
        Duration::from_secs(60),
        || {
            let clusters = clusters.clone();
            async move {
                Ok(clusters
                    .list(&ListParams::default())
                    .await?
                    .items
                    .is_empty()
                    .then_some(()))
            }
        },
    )
    .await?;

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), running).await??;
    Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await?;
    Ok(())
}
