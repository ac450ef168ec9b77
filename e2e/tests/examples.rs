//! Every BftCluster in `examples/` applies and becomes Available, one after the other, through
//! the chart installed with `helm install` as the README says (with the test-only Byzantine modes
//! allowed, for `byzantine-demo.yaml`). Prints `kubectl get bftclusters` and `kubectl describe`
//! of each, which is where the README's sample output comes from.
//!
//! What the test changes in an example, and why (each said loudly when it happens):
//! - `spec.image` becomes `KMMR_REPLICA_IMAGE`, the image the nodes hold for this run.
//! - On a cluster with fewer schedulable nodes than an example's replicas (the single-node test
//!   bed, a one-node kind), a required pod anti-affinity becomes a preferred one with the same
//!   term: otherwise all but one replica would stay Pending, by design.
//! - On the test bed, which has no volume provisioner, StorageClasses of the names the examples
//!   use (`standard`, and a default class) are created with pre-made hostPath volumes, as kind
//!   provides `standard` as its default class.
//!
//! Needs `KUBECONFIG`, and the images in `KMMR_REPLICA_IMAGE` and `KMMR_OPERATOR_IMAGE` present
//! on the nodes (`.ci/testbed-test` builds and loads them; on kind, `e2e/kind/run.sh`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{cluster_or_skip, images_or_skip, loud, poll, run, strict, tool, unique, Result};
use serde_json::{json, Value};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/kmmr");
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
const RELEASE: &str = "kmmr-examples";

struct Kube {
    kubectl: PathBuf,
    helm: PathBuf,
}

impl Kube {
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        run(&self.kubectl, args, None)
    }
    fn apply(&self, namespace: &str, manifest: &Value) -> Result<String> {
        run(
            &self.kubectl,
            &["apply", "-n", namespace, "-f", "-"],
            Some(&manifest.to_string()),
        )
    }
    fn get(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&a)?)?)
    }
}

/// What the test made outside its namespace, removed even when it fails half way.
struct Cleanup<'a> {
    kube: &'a Kube,
    namespace: String,
    operator_namespace: String,
    classes: Vec<String>,
    volumes: Vec<String>,
    host_dir: Option<PathBuf>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let k = |args: &[&str]| {
            let _ = self.kube.kubectl(args);
        };
        // The finalizer needs the operator: delete the clusters before uninstalling it.
        k(&[
            "delete",
            "bftclusters",
            "--all",
            "-n",
            &self.namespace,
            "--wait=true",
            "--timeout=90s",
        ]);
        k(&["delete", "namespace", &self.namespace, "--wait=false"]);
        let _ = run(
            &self.kube.helm,
            &[
                "uninstall",
                RELEASE,
                "-n",
                &self.operator_namespace,
                "--wait",
                "--timeout",
                "60s",
            ],
            None,
        );
        k(&[
            "delete",
            "namespace",
            &self.operator_namespace,
            "--wait=false",
        ]);
        for pv in &self.volumes {
            k(&["delete", "pv", pv, "--wait=false"]);
        }
        for class in &self.classes {
            k(&["delete", "storageclass", class, "--wait=false"]);
        }
        if let Some(dir) = &self.host_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The examples: every `*.yaml` directly in `examples/`, in name order, parsed.
fn examples() -> Result<Vec<(String, Value)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(EXAMPLES)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p)?;
            let doc: Value = serde_saphyr::from_str(&text)
                .map_err(|e| format!("{} does not parse: {e}", p.display()))?;
            let name = file_name(&p);
            Ok((name, doc))
        })
        .collect()
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn every_example_is_a_valid_bftcluster_with_a_fixed_tag() -> Result {
    let all = examples()?;
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["byzantine-demo.yaml", "minimal.yaml", "production.yaml"],
        "the README lists these examples: update it with the folder"
    );
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    for (name, doc) in &all {
        assert_eq!(doc["apiVersion"], "kmmr.io/v1alpha1", "{name}");
        assert_eq!(doc["kind"], "BftCluster", "{name}");
        let spec: kmmr_crds::BftClusterSpec = serde_json::from_value(doc["spec"].clone())
            .map_err(|e| format!("{name}: spec is not a BftCluster spec: {e}"))?;
        spec.validate()
            .map_err(|e| format!("{name}: spec refused: {e}"))?;
        let image = &spec.image;
        assert!(
            image.contains(':') && !image.ends_with(":latest"),
            "{name}: {image} needs a fixed tag"
        );
        // Unknown fields would be pruned silently by the apiserver: compare with the typed spec.
        let back = serde_json::to_value(&spec)?;
        for key in doc["spec"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            assert!(
                back.get(key).is_some(),
                "{name}: spec.{key} is not a BftCluster field"
            );
        }
        assert!(
            readme.contains(&format!("examples/{name}")),
            "the README does not mention examples/{name}"
        );
    }
    Ok(())
}

/// Makes StorageClasses `standard` (and a default one, for examples that name no class) with
/// hostPath volumes on the test bed, which has no provisioner; elsewhere requires them to exist.
fn storage(kube: &Kube, cleanup: &mut Cleanup, needed: usize) -> Result {
    let classes = kube.get(&["get", "storageclasses"])?;
    let items = classes["items"].as_array().cloned().unwrap_or_default();
    let has_default = items.iter().any(|c| {
        c["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    });
    let has_standard = items.iter().any(|c| c["metadata"]["name"] == "standard");
    if has_default && has_standard {
        return Ok(());
    }
    if std::env::var_os("KMMR_TESTBED").is_none() {
        return Err(
            "the examples need a default StorageClass and one named standard (kind has \
                    standard as its default)"
                .into(),
        );
    }
    if has_standard {
        return Err(
            "the test bed has a class standard but no default class: left over from an \
                    earlier run? delete it"
                .into(),
        );
    }
    loud("examples: the test bed has no provisioner: making StorageClass standard (default) with hostPath volumes");
    kube.apply(
        "default",
        &json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": "standard",
                "annotations": { "storageclass.kubernetes.io/is-default-class": (!has_default).to_string() }
            },
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Retain"
        }),
    )?;
    cleanup.classes.push("standard".into());
    let dir = std::env::temp_dir()
        .join("kmmr-e2e-volumes")
        .join(&cleanup.namespace);
    cleanup.host_dir = Some(dir.clone());
    for i in 0..needed {
        let path = dir.join(i.to_string());
        std::fs::create_dir_all(&path)?;
        // The replica runs as 65532; hostPath volumes get no fsGroup treatment.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        let name = format!("{}-{i}", cleanup.namespace);
        kube.apply(
            "default",
            &json!({
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": { "name": name },
                "spec": {
                    "capacity": { "storage": "20Gi" },
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "standard",
                    "hostPath": { "path": path.to_string_lossy(), "type": "Directory" }
                }
            }),
        )?;
        cleanup.volumes.push(name);
    }
    Ok(())
}

/// Required anti-affinity terms become preferred ones (weight 100) when the cluster has fewer
/// nodes than replicas. Returns whether anything changed.
fn soften_anti_affinity(spec: &mut Value) -> bool {
    let anti = &mut spec["affinity"]["podAntiAffinity"];
    let Some(required) = anti
        .get_mut("requiredDuringSchedulingIgnoredDuringExecution")
        .map(Value::take)
    else {
        return false;
    };
    let terms = required.as_array().cloned().unwrap_or_default();
    if let Some(obj) = anti.as_object_mut() {
        obj.remove("requiredDuringSchedulingIgnoredDuringExecution");
        let preferred: Vec<Value> = terms
            .into_iter()
            .map(|t| json!({ "weight": 100, "podAffinityTerm": t }))
            .collect();
        obj.insert(
            "preferredDuringSchedulingIgnoredDuringExecution".into(),
            Value::Array(preferred),
        );
    }
    true
}

fn condition_is(obj: &Value, type_: &str, status: &str) -> bool {
    obj["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == type_ && c["status"] == status)
}

/// The replica ids the example's annotation runs in a Byzantine test mode.
fn byzantine_ids(doc: &Value) -> Vec<i64> {
    doc["metadata"]["annotations"]["kmmr.io/byzantine-test-mode"]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .filter_map(|part| part.split_once('=')?.0.trim().parse().ok())
        .collect()
}

/// Waits until the example is Available with every correct replica healthy and each Byzantine
/// one named as such by the status.
async fn wait_available(
    kube: &Kube,
    namespace: &str,
    name: &str,
    replicas: i64,
    byzantine: &[i64],
) -> Result<Value> {
    poll(
        &format!("BftCluster {name} to be Available"),
        Duration::from_secs(360),
        Duration::from_secs(1),
        || async {
            let c = kube.get(&["get", "bftcluster", name, "-n", namespace])?;
            let s = &c["status"];
            let members = s["members"].as_array().cloned().unwrap_or_default();
            let named = byzantine.iter().all(|id| {
                members
                    .iter()
                    .any(|m| m["id"] == *id && m["problemReason"] == "ByzantineTestMode")
            });
            let ok = condition_is(&c, "Available", "True")
                && s["n"] == replicas
                && s["healthy"].as_i64() == Some(replicas - byzantine.len() as i64)
                && named;
            Ok(ok.then_some(c))
        },
    )
    .await
}

#[tokio::test]
async fn every_example_applies_and_becomes_available() -> Result {
    let test = "every_example_applies_and_becomes_available";
    if !cluster_or_skip(test) {
        return Ok(());
    }
    let Some((replica_image, operator_image)) = images_or_skip(
        test,
        ".ci/testbed-test builds and loads them; on kind, e2e/kind/run.sh",
    ) else {
        return Ok(());
    };
    let (Some(kubectl), Some(helm)) = (tool("kubectl"), tool("helm")) else {
        let msg = format!("{test}: kubectl and helm are needed on PATH");
        assert!(!strict(), "{msg}");
        loud(&format!("SKIPPED {msg}"));
        return Ok(());
    };
    let kube = Kube { kubectl, helm };
    let all = examples()?;
    let mut cleanup = Cleanup {
        kube: &kube,
        namespace: unique("kmmr-examples"),
        operator_namespace: unique("kmmr-examples-op"),
        classes: Vec::new(),
        volumes: Vec::new(),
        host_dir: None,
    };
    let namespace = cleanup.namespace.clone();
    let operator_namespace = cleanup.operator_namespace.clone();

    // The CRD may belong to another release already (it is kept on uninstall): adopt it, as a
    // user moving between releases would.
    if kube.kubectl(&["get", "crd", "bftclusters.kmmr.io"]).is_ok() {
        kube.kubectl(&[
            "annotate",
            "--overwrite",
            "crd",
            "bftclusters.kmmr.io",
            &format!("meta.helm.sh/release-name={RELEASE}"),
            &format!("meta.helm.sh/release-namespace={operator_namespace}"),
        ])?;
        kube.kubectl(&[
            "label",
            "--overwrite",
            "crd",
            "bftclusters.kmmr.io",
            "app.kubernetes.io/managed-by=Helm",
        ])?;
    }
    let (repo, tag) = operator_image
        .rsplit_once(':')
        .ok_or("KMMR_OPERATOR_IMAGE needs a fixed tag")?;
    run(
        &kube.helm,
        &[
            "install",
            RELEASE,
            CHART,
            "--namespace",
            &operator_namespace,
            "--create-namespace",
            "--set",
            &format!("image.repository={repo}"),
            "--set",
            &format!("image.tag={tag}"),
            "--set",
            "resources.requests.cpu=10m",
            "--set",
            "testing.allowByzantineModes=true",
            "--wait",
            "--timeout",
            "180s",
        ],
        None,
    )?;
    kube.kubectl(&["create", "namespace", &namespace])?;
    let total: i64 = all
        .iter()
        .map(|(_, d)| d["spec"]["replicas"].as_i64().unwrap_or(0))
        .sum();
    storage(&kube, &mut cleanup, total as usize + 2)?;
    let nodes = kube.get(&["get", "nodes"])?["items"]
        .as_array()
        .map_or(0, |a| a.len()) as i64;

    for (file, doc) in &all {
        let mut doc = doc.clone();
        let name = doc["metadata"]["name"]
            .as_str()
            .ok_or(format!("{file}: no metadata.name"))?
            .to_string();
        let replicas = doc["spec"]["replicas"].as_i64().unwrap_or(0);
        doc["spec"]["image"] = json!(replica_image);
        if nodes < replicas && soften_anti_affinity(&mut doc["spec"]) {
            loud(&format!(
                "examples: {file}: {nodes} node(s) for {replicas} replicas: its required pod \
                 anti-affinity is applied as preferred"
            ));
        }
        let byzantine = byzantine_ids(&doc);
        let t = Instant::now();
        kube.apply(&namespace, &doc)?;
        let c = match wait_available(&kube, &namespace, &name, replicas, &byzantine).await {
            Ok(c) => c,
            Err(e) => {
                let describe = kube
                    .kubectl(&["describe", "bftcluster", &name, "-n", &namespace])
                    .unwrap_or_default();
                let pods = kube
                    .kubectl(&["get", "pods,pvc", "-n", &namespace, "-o", "wide"])
                    .unwrap_or_default();
                return Err(format!("{file}: {e}\n{describe}\n{pods}").into());
            }
        };
        loud(&format!(
            "MEASURED examples/{file}: apply -> Available in {:.1?} (n={}, f={}, healthy={}, leader={})",
            t.elapsed(),
            c["status"]["n"],
            c["status"]["f"],
            c["status"]["healthy"],
            c["status"]["leader"]
        ));
        let table = kube.kubectl(&["get", "bftclusters", "-n", &namespace])?;
        let describe = kube.kubectl(&["describe", "bftcluster", &name, "-n", &namespace])?;
        loud(&format!(
            "examples/{file}:\n$ kubectl get bftclusters\n{table}\n$ kubectl describe bftcluster {name}\n{describe}"
        ));
        for needle in ["Conditions:", "Available", "QuorumHealthy", "Events:"] {
            assert!(describe.contains(needle), "{file}: describe lacks {needle}");
        }
        if !byzantine.is_empty() {
            assert!(
                condition_is(&c, "Degraded", "True"),
                "{file}: a Byzantine replica must leave the cluster Degraded: {}",
                c["status"]
            );
        }
        // One example at a time: the test bed is a single node of 2 cores.
        kube.kubectl(&[
            "delete",
            "bftcluster",
            &name,
            "-n",
            &namespace,
            "--wait=true",
            "--timeout=120s",
        ])?;
        let selector = format!("app.kubernetes.io/instance={name}");
        poll(
            &format!("the pods of {name} to be gone"),
            Duration::from_secs(180),
            Duration::from_secs(1),
            || async {
                let left = kube.kubectl(&[
                    "get", "pods", "-n", &namespace, "-l", &selector, "-o", "name",
                ])?;
                Ok(left.trim().is_empty().then_some(()))
            },
        )
        .await?;
    }
    drop(cleanup);
    Ok(())
}
