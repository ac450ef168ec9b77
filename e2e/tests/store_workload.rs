//! A workload through the apiserver of the cluster `KUBECONFIG` names: 1,000 ConfigMaps created
//! by 16 concurrent clients, each updated once, listed in pages (by the client library and by
//! `kubectl --chunk-size`) and watched from before the first create. Everything must read back
//! exactly, and every change must reach the watch once, in order.
//!
//! On the test bed with its state on KmMR (`KMMR_TESTBED_STORE=kmmr .ci/testbed-test`, one of
//! the 4 replicas corrupting what it sends) this is the check that the apiserver sees only what
//! correct replicas decided and misses nothing; on etcd it is the same check against the
//! reference store.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{cluster_or_skip, loud, run, tool, unique, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::Client;
use serde_json::json;

const OBJECTS: usize = 1_000;
const CLIENTS: usize = 16;
const LABEL: &str = "kmmr.dev/workload";

/// One change as the watch delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    value: String,
    revision: u64,
}

fn revision(cm: &ConfigMap) -> Result<u64> {
    let rv = cm
        .metadata
        .resource_version
        .as_deref()
        .ok_or("no resourceVersion")?;
    Ok(rv.parse()?)
}

fn value(cm: &ConfigMap) -> String {
    cm.data
        .as_ref()
        .and_then(|d| d.get("v"))
        .cloned()
        .unwrap_or_default()
}

/// Watches `api` from `from` until `want` changes arrived or `deadline`, resuming from the last
/// revision seen when the server ends a watch (as clients do), so a resumed watch must neither
/// repeat nor skip a change.
async fn watch_all(
    api: Api<ConfigMap>,
    from: String,
    want: usize,
    deadline: Instant,
) -> Result<Vec<(String, Seen)>> {
    let mut seen = Vec::new();
    let mut rv = from;
    while seen.len() < want && Instant::now() < deadline {
        let params = WatchParams::default().labels(LABEL).timeout(120);
        let mut stream = api.watch(&params, &rv).await?.boxed();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(next) = tokio::time::timeout(left, stream.try_next()).await else {
                break;
            };
            let (kind, cm) = match next? {
                None => break,
                Some(WatchEvent::Added(cm)) => ("ADDED", cm),
                Some(WatchEvent::Modified(cm)) => ("MODIFIED", cm),
                Some(WatchEvent::Deleted(cm)) => ("DELETED", cm),
                Some(WatchEvent::Bookmark(b)) => {
                    rv = b.metadata.resource_version;
                    continue;
                }
                Some(WatchEvent::Error(e)) => return Err(format!("watch error: {e:?}").into()),
            };
            let revision = revision(&cm)?;
            rv = revision.to_string();
            let name = cm.metadata.name.clone().ok_or("no name")?;
            seen.push((
                name,
                Seen {
                    kind,
                    value: value(&cm),
                    revision,
                },
            ));
            if seen.len() >= want {
                break;
            }
        }
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_configmaps_read_back_exactly_and_every_change_is_watched_once_in_order(
) -> Result {
    if !cluster_or_skip("the ConfigMap workload") {
        return Ok(());
    }
    let client = Client::try_default().await?;
    let ns = unique("workload");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let start_rv = api
        .list(&ListParams::default().labels(LABEL))
        .await?
        .metadata
        .resource_version
        .ok_or("list without resourceVersion")?;
    let watcher = tokio::spawn(watch_all(
        api.clone(),
        start_rv,
        2 * OBJECTS,
        Instant::now() + Duration::from_secs(600),
    ));

    let names: Vec<String> = (0..OBJECTS).map(|i| format!("cm-{i:04}")).collect();
    let t0 = Instant::now();
    futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            async move {
                let cm: ConfigMap = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {LABEL: "1"}},
                    "data": {"v": format!("{name}/0")}
                }))?;
                api.create(&PostParams::default(), &cm).await?;
                Result::Ok(())
            }
        })
        .buffer_unordered(CLIENTS)
        .try_collect::<Vec<_>>()
        .await?;
    let created = t0.elapsed();
    let t1 = Instant::now();
    futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            async move {
                let patch = json!({"data": {"v": format!("{name}/1")}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                Result::Ok(())
            }
        })
        .buffer_unordered(CLIENTS)
        .try_collect::<Vec<_>>()
        .await?;
    let updated = t1.elapsed();
    loud(&format!(
        "ConfigMap workload: {OBJECTS} creates in {:.1} s ({:.0}/s), {OBJECTS} updates in {:.1} s \
         ({:.0}/s), {CLIENTS} clients",
        created.as_secs_f64(),
        OBJECTS as f64 / created.as_secs_f64(),
        updated.as_secs_f64(),
        OBJECTS as f64 / updated.as_secs_f64()
    ));

    // Read back in pages of 100, following the continue token the apiserver builds from the
    // store's range replies.
    let mut listed = BTreeMap::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut params = ListParams::default().labels(LABEL).limit(100);
        if let Some(t) = &token {
            params = params.continue_token(t);
        }
        let page = api.list(&params).await?;
        assert!(
            page.items.len() <= 100,
            "a page of {} items",
            page.items.len()
        );
        pages += 1;
        for cm in &page.items {
            let name = cm.metadata.name.clone().ok_or("no name")?;
            assert!(
                listed.insert(name, value(cm)).is_none(),
                "a name listed twice"
            );
        }
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    // The namespace's own kube-root-ca.crt sorts after the workload's objects: the store says
    // there is more after the tenth page, and the apiserver's filter leaves an eleventh empty.
    assert!(
        (OBJECTS / 100..=OBJECTS / 100 + 1).contains(&pages),
        "{pages} pages of at most 100"
    );
    let expected: BTreeMap<String, String> = names
        .iter()
        .map(|n| (n.clone(), format!("{n}/1")))
        .collect();
    assert_eq!(
        listed, expected,
        "every object reads back with its last value"
    );

    // kubectl pages the same list itself.
    let kubectl = tool("kubectl").ok_or("kubectl not found")?;
    let out = run(
        &kubectl,
        &[
            "-n",
            &ns,
            "get",
            "configmaps",
            "-l",
            LABEL,
            "--chunk-size=64",
            "-o",
            "name",
        ],
        None,
    )?;
    let by_kubectl: Vec<&str> = out.lines().collect();
    let want: Vec<String> = names.iter().map(|n| format!("configmap/{n}")).collect();
    assert_eq!(
        by_kubectl, want,
        "kubectl --chunk-size=64 lists every object once"
    );

    // Every change once, in order: per object its create then its update, and revisions that
    // only go up along the stream.
    let seen = watcher.await??;
    assert_eq!(seen.len(), 2 * OBJECTS, "changes watched");
    let mut last = 0;
    for (name, s) in &seen {
        assert!(
            s.revision > last,
            "{name}: revision {} after {last}",
            s.revision
        );
        last = s.revision;
    }
    let mut per_object: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for (name, s) in &seen {
        per_object
            .entry(name)
            .or_default()
            .push((s.kind, s.value.as_str()));
    }
    assert_eq!(per_object.len(), OBJECTS);
    for (name, events) in &per_object {
        let v0 = format!("{name}/0");
        let v1 = format!("{name}/1");
        assert_eq!(
            events,
            &vec![("ADDED", v0.as_str()), ("MODIFIED", v1.as_str())],
            "{name}'s changes"
        );
    }

    namespaces.delete(&ns, &DeleteParams::default()).await?;
    Ok(())
}
