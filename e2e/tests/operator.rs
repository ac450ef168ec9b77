//! The operator end to end, as a user drives it: `helm install` the chart with the locally built
//! images, `kubectl apply` a BftCluster of 4, wait until it is Available with 4 healthy members,
//! write and read through the replicas' client from a pod, kill the leader's pod and check that
//! the cluster recovers without losing an acknowledged write, check `kubectl get` and
//! `kubectl describe`, check that a membership change is refused loudly (not yet supported),
//! pause, and delete everything.
//!
//! Needs `KUBECONFIG`, and the images in `KMMR_REPLICA_IMAGE` and `KMMR_OPERATOR_IMAGE` present
//! on the nodes (`.ci/testbed-test` builds and loads them; on kind, `kind load docker-image`).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{cluster_or_skip, loud, poll, run, strict, tool, unique, Result};
use serde_json::{json, Value};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/kmmr");
const CLUSTER: &str = "demo";

struct Tools {
    kubectl: PathBuf,
    helm: PathBuf,
}

impl Tools {
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        run(&self.kubectl, args, None)
    }
    fn kubectl_in(&self, args: &[&str], stdin: &str) -> Result<String> {
        run(&self.kubectl, args, Some(stdin))
    }
    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&a)?)?)
    }
}

/// Removes what the test created, even when it fails half way.
struct Cleanup<'a> {
    tools: &'a Tools,
    namespace: String,
    operator_namespace: String,
    volumes: Vec<String>,
    host_dir: Option<PathBuf>,
    finished: bool,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if !self.finished && std::env::var_os("KMMR_E2E_KEEP").is_some() {
            loud(&format!(
                "KMMR_E2E_KEEP: left namespaces {} and {} for inspection",
                self.namespace, self.operator_namespace
            ));
            return;
        }
        let k = |args: &[&str]| {
            let _ = self.tools.kubectl(args);
        };
        // The finalizer needs the operator: delete the cluster before uninstalling it.
        k(&[
            "delete",
            "bftclusters",
            "--all",
            "-n",
            &self.namespace,
            "--wait=true",
            "--timeout=60s",
        ]);
        k(&["delete", "namespace", &self.namespace, "--wait=false"]);
        let _ = run(
            &self.tools.helm,
            &[
                "uninstall",
                "kmmr-e2e",
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
        if let Some(dir) = &self.host_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn image_parts(image: &str) -> Result<(&str, &str)> {
    image
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .ok_or_else(|| format!("image {image} has no tag: use a fixed tag").into())
}

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn condition_is(obj: &Value, type_: &str, status: &str) -> bool {
    condition(obj, type_).is_some_and(|c| c["status"] == status)
}

/// A storage class the replicas' volumes can use: the default one, or on the test bed (which has
/// no provisioner) a class of our own with hostPath volumes on this machine, which is the node.
fn storage(tools: &Tools, namespace: &str, cleanup: &mut Cleanup) -> Result<Option<String>> {
    let classes = tools.json(&["get", "storageclasses"])?;
    let has_default = classes["items"].as_array().into_iter().flatten().any(|c| {
        c["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    });
    if has_default {
        return Ok(None);
    }
    if std::env::var_os("KMMR_TESTBED").is_none() {
        return Err(
            "the cluster has no default StorageClass; set one (kind has `standard`)".into(),
        );
    }
    let class = "kmmr-e2e-hostpath";
    tools.kubectl_in(
        &["apply", "-f", "-"],
        &json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": { "name": class },
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Retain"
        })
        .to_string(),
    )?;
    let dir = std::env::temp_dir()
        .join("kmmr-e2e-volumes")
        .join(namespace);
    cleanup.host_dir = Some(dir.clone());
    for i in 0..6 {
        let path = dir.join(i.to_string());
        std::fs::create_dir_all(&path)?;
        // The replica runs as 65532; hostPath volumes get no fsGroup treatment.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        let name = format!("{namespace}-{i}");
        tools.kubectl_in(
            &["apply", "-f", "-"],
            &json!({
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": { "name": name },
                "spec": {
                    "capacity": { "storage": "1Gi" },
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": class,
                    "hostPath": { "path": path.to_string_lossy(), "type": "Directory" }
                }
            })
            .to_string(),
        )?;
        cleanup.volumes.push(name);
    }
    Ok(Some(class.to_string()))
}

/// Runs the replica binary's client in a pod: one init container per put (a put that did not
/// succeed stops the pod, so every later step saw every earlier put acknowledged), then `range`
/// over the prefix. Returns the pod's phase and the range's output.
async fn client_pod(
    tools: &Tools,
    namespace: &str,
    name: &str,
    image: &str,
    puts: &[(String, String)],
) -> Result<(String, String)> {
    let client = |cname: String, args: Vec<String>| {
        let mut full = vec![
            "--view".to_string(),
            "/etc/kmmr/view.toml".to_string(),
            "--client-key".to_string(),
            "/tmp/client.key".to_string(),
        ];
        // Subcommand first, then the cluster options, then its positional arguments.
        let (sub, rest) = args
            .split_first()
            .map(|(s, r)| (s.clone(), r.to_vec()))
            .unwrap_or_default();
        full.insert(0, sub);
        full.extend(rest);
        json!({
            "name": cname,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["kmmr-replica"],
            "args": full,
            "volumeMounts": [{ "name": "view", "mountPath": "/etc/kmmr" }]
        })
    };
    let inits: Vec<Value> = puts
        .iter()
        .enumerate()
        .map(|(i, (k, v))| client(format!("put-{i}"), vec!["put".into(), k.clone(), v.clone()]))
        .collect();
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532 },
            "volumes": [{
                "name": "view",
                "configMap": { "name": format!("{CLUSTER}-config"), "items": [{ "key": "view.toml", "path": "view.toml" }] }
            }],
            "initContainers": inits,
            "containers": [client("range".into(), vec!["range".into(), "e2e/".into()])]
        }
    });
    tools.kubectl_in(&["apply", "-f", "-"], &pod.to_string())?;
    let phase = poll(
        &format!("client pod {name} to finish"),
        Duration::from_secs(180),
        Duration::from_secs(1),
        || async {
            let p = tools.json(&["get", "pod", name, "-n", namespace])?;
            let phase = p["status"]["phase"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            Ok(matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase))
        },
    )
    .await?;
    let logs = tools
        .kubectl(&["logs", name, "-n", namespace, "-c", "range"])
        .unwrap_or_else(|e| format!("(no logs: {e})"));
    if phase != "Succeeded" {
        let all = tools
            .kubectl(&[
                "logs",
                name,
                "-n",
                namespace,
                "--all-containers",
                "--prefix",
            ])
            .unwrap_or_default();
        loud(&format!("client pod {name} {phase}: {all}"));
    }
    Ok((phase, logs))
}

async fn wait_healthy(tools: &Tools, namespace: &str, timeout: Duration) -> Result<Value> {
    poll(
        "the BftCluster to be Available with 4 healthy members",
        timeout,
        Duration::from_millis(500),
        || async {
            let c = tools.json(&["get", "bftcluster", CLUSTER, "-n", namespace])?;
            let ok = condition_is(&c, "Available", "True")
                && condition_is(&c, "Degraded", "False")
                && c["status"]["healthy"] == 4;
            Ok(ok.then_some(c))
        },
    )
    .await
}

#[tokio::test]
async fn bftcluster_lifecycle_through_helm_and_kubectl() -> Result {
    let test = "bftcluster_lifecycle_through_helm_and_kubectl";
    if !cluster_or_skip(test) {
        return Ok(());
    }
    let images = (
        std::env::var("KMMR_REPLICA_IMAGE")
            .ok()
            .filter(|s| !s.is_empty()),
        std::env::var("KMMR_OPERATOR_IMAGE")
            .ok()
            .filter(|s| !s.is_empty()),
    );
    let (Some(replica_image), Some(operator_image)) = images else {
        loud(&format!(
            "SKIPPED {test}: KMMR_REPLICA_IMAGE and KMMR_OPERATOR_IMAGE must name images the nodes \
             hold (.ci/testbed-test builds and loads them; needs the test bed's node, tier b)"
        ));
        return Ok(());
    };
    let (Some(kubectl), Some(helm)) = (tool("kubectl"), tool("helm")) else {
        let msg = format!("{test}: kubectl and helm are needed on PATH");
        assert!(!strict(), "{msg}");
        loud(&format!("SKIPPED {msg}"));
        return Ok(());
    };
    let tools = Tools { kubectl, helm };
    let namespace = unique("kmmr-e2e");
    let operator_namespace = unique("kmmr-op");
    let mut cleanup = Cleanup {
        tools: &tools,
        namespace: namespace.clone(),
        operator_namespace: operator_namespace.clone(),
        volumes: Vec::new(),
        host_dir: None,
        finished: false,
    };

    // The CRD may exist already (the crds crate's admission tests install it): let this release
    // adopt it, as a user moving to the chart would.
    if tools
        .kubectl(&["get", "crd", "bftclusters.kmmr.io"])
        .is_ok()
    {
        tools.kubectl(&[
            "annotate",
            "--overwrite",
            "crd",
            "bftclusters.kmmr.io",
            "meta.helm.sh/release-name=kmmr-e2e",
            &format!("meta.helm.sh/release-namespace={operator_namespace}"),
        ])?;
        tools.kubectl(&[
            "label",
            "--overwrite",
            "crd",
            "bftclusters.kmmr.io",
            "app.kubernetes.io/managed-by=Helm",
        ])?;
    }
    let (repo, tag) = image_parts(&operator_image)?;
    let t_install = Instant::now();
    run(
        &tools.helm,
        &[
            "upgrade",
            "--install",
            "kmmr-e2e",
            CHART,
            "--namespace",
            &operator_namespace,
            "--create-namespace",
            "--set",
            &format!("image.repository={repo}"),
            "--set",
            &format!("image.tag={tag}"),
            "--set",
            "image.pullPolicy=IfNotPresent",
            "--set",
            "resources.requests.cpu=10m",
            "--wait",
            "--timeout",
            "180s",
        ],
        None,
    )?;
    loud(&format!(
        "helm install: operator ready after {:.1?}",
        t_install.elapsed()
    ));

    tools.kubectl(&["create", "namespace", &namespace])?;
    let class = storage(&tools, &namespace, &mut cleanup)?;
    let mut storage_spec = json!({ "size": "64Mi" });
    if let Some(class) = &class {
        storage_spec["className"] = json!(class);
    }
    let manifest = json!({
        "apiVersion": "kmmr.io/v1alpha1",
        "kind": "BftCluster",
        "metadata": { "name": CLUSTER, "namespace": namespace },
        "spec": {
            "replicas": 4,
            "image": replica_image,
            "imagePullPolicy": "IfNotPresent",
            "storage": storage_spec,
            "resources": { "requests": { "cpu": "10m", "memory": "32Mi" } }
        }
    });

    // 1. Apply -> Available with 4 healthy members.
    let t_apply = Instant::now();
    tools.kubectl_in(&["apply", "-f", "-"], &manifest.to_string())?;
    let c = wait_healthy(&tools, &namespace, Duration::from_secs(300)).await?;
    let to_available = t_apply.elapsed();
    loud(&format!(
        "MEASURED apply -> Available with 4 healthy: {to_available:.1?}"
    ));
    let status = &c["status"];
    assert_eq!(status["n"], 4);
    assert_eq!(status["f"], 1);
    assert_eq!(status["quorum"], 3);
    assert_eq!(status["viewId"], 0);
    assert_eq!(status["observedGeneration"], c["metadata"]["generation"]);
    assert!(status["leader"].is_i64(), "{status}");
    assert!(c["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "kmmr.io/cleanup")));
    let members = status["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 4);
    assert!(
        members.iter().all(|m| m["health"] == "Healthy"),
        "{members:?}"
    );
    assert_eq!(
        members.iter().filter(|m| m["role"] == "Leader").count(),
        1,
        "{members:?}"
    );

    // Every replica has its own key Secret, mounted by its pod only.
    for id in 0..4 {
        let pod = tools.json(&["get", "pod", &format!("{CLUSTER}-{id}-0"), "-n", &namespace])?;
        let secrets: Vec<String> = pod["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|v| {
                v["projected"]["sources"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|s| s["secret"]["name"].as_str().map(str::to_string))
            .collect();
        assert_eq!(secrets, vec![format!("{CLUSTER}-{id}-key")]);
    }
    tools.kubectl(&[
        "get",
        "secret",
        &format!("{CLUSTER}-admin-key"),
        "-n",
        &namespace,
    ])?;

    // 2. kubectl get shows the printer columns with live values.
    let table = tools.kubectl(&["get", "bftclusters", "-n", &namespace])?;
    loud(&format!("kubectl get bftclusters:\n{table}"));
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "N", "F", "HEALTHY", "LEADER", "VIEW", "AGE"]
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row[..4], [CLUSTER, "4", "1", "4"], "{table}");
    assert_eq!(row[4], status["leader"].to_string());
    assert_eq!(row[5], "0");

    // 3. Writes and reads through the client, from a pod that reaches the replicas.
    let first: Vec<(String, String)> = (0..5)
        .map(|i| (format!("e2e/k{i}"), format!("v{i}")))
        .collect();
    let (phase, out) = client_pod(&tools, &namespace, "client-1", &replica_image, &first).await?;
    assert_eq!(phase, "Succeeded", "{out}");
    for (k, v) in &first {
        assert!(
            out.contains(&format!("{k} = {v} ")),
            "{k} missing from {out}"
        );
    }

    // 4. Kill the leader's pod; write while it is gone; it is replaced and nothing is lost.
    let leader = status["leader"].as_i64().unwrap_or(0);
    let victim = format!("{CLUSTER}-{leader}-0");
    let old_uid =
        tools.json(&["get", "pod", &victim, "-n", &namespace])?["metadata"]["uid"].clone();
    let t_kill = Instant::now();
    tools.kubectl(&["delete", "pod", &victim, "-n", &namespace, "--wait=false"])?;
    let degraded = poll(
        "the status to notice the killed replica",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let c = tools.json(&["get", "bftcluster", CLUSTER, "-n", &namespace])?;
            Ok((c["status"]["healthy"].as_i64().is_some_and(|h| h < 4)).then_some(c))
        },
    )
    .await;
    let noticed = t_kill.elapsed();
    let second: Vec<(String, String)> = (5..10)
        .map(|i| (format!("e2e/k{i}"), format!("v{i}")))
        .collect();
    let (phase, out) = client_pod(&tools, &namespace, "client-2", &replica_image, &second).await?;
    assert_eq!(
        phase, "Succeeded",
        "writes while one replica is down must succeed: {out}"
    );
    let c = wait_healthy(&tools, &namespace, Duration::from_secs(240)).await?;
    let replaced = t_kill.elapsed();
    let new_uid =
        tools.json(&["get", "pod", &victim, "-n", &namespace])?["metadata"]["uid"].clone();
    assert_ne!(old_uid, new_uid, "the pod must have been replaced");
    loud(&format!(
        "MEASURED killed leader replica {leader}: status showed it {} after {noticed:.1?}; \
         replaced and all 4 healthy again after {replaced:.1?}; new leader {}",
        if degraded.is_ok() {
            "unhealthy"
        } else {
            "(never seen unhealthy)"
        },
        c["status"]["leader"]
    ));
    let (phase, out) = client_pod(&tools, &namespace, "client-3", &replica_image, &[]).await?;
    assert_eq!(phase, "Succeeded", "{out}");
    for (k, v) in first.iter().chain(&second) {
        assert!(
            out.contains(&format!("{k} = {v} ")),
            "acknowledged write {k} lost: {out}"
        );
    }

    // 5. kubectl describe shows the conditions and the Events of the transitions.
    let describe = tools.kubectl(&["describe", "bftcluster", CLUSTER, "-n", &namespace])?;
    for needle in [
        "Conditions:",
        "Available",
        "FaultToleranceExceeded",
        "Events:",
        "QuorumHealthy",
        "KeysGenerated",
    ] {
        assert!(
            describe.contains(needle),
            "kubectl describe lacks {needle}:\n{describe}"
        );
    }
    let events = tools.kubectl(&[
        "get",
        "events",
        "-n",
        &namespace,
        "--field-selector",
        &format!("involvedObject.name={CLUSTER}"),
    ])?;
    loud(&format!("events of {CLUSTER}:\n{events}"));
    assert!(
        events.contains("MemberUnreachable")
            || events.contains("MemberUnhealthy")
            || events.contains("ReplicasUnhealthy"),
        "{events}"
    );

    // 6. Scaling goes through the protocol: 4 -> 5 adds replica 4 with an admin-signed view
    //    change (view 1), then 5 -> 4 removes it again (view 2); data survives both.
    let scale = |n: i64, view: i64| {
        let namespace = namespace.clone();
        let tools = &tools;
        async move {
            tools.kubectl(&[
                "patch",
                "bftcluster",
                CLUSTER,
                "-n",
                &namespace,
                "--type=merge",
                "-p",
                &format!(r#"{{"spec":{{"replicas":{n}}}}}"#),
            ])?;
            let t = Instant::now();
            poll(
                &format!("view {view} with {n} healthy members"),
                Duration::from_secs(300),
                Duration::from_millis(500),
                || async {
                    let c = tools.json(&["get", "bftcluster", CLUSTER, "-n", &namespace])?;
                    let s = &c["status"];
                    let ok = s["n"] == n
                        && s["healthy"] == n
                        && s["viewId"] == view
                        && condition_is(&c, "Available", "True")
                        && condition(&c, "Reconfiguring")
                            .is_some_and(|r| r["reason"] == "ViewMatchesSpec");
                    Ok(ok.then_some(()))
                },
            )
            .await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(t.elapsed())
        }
    };
    let grew = scale(5, 1).await?;
    let (phase, out) = client_pod(
        &tools,
        &namespace,
        "client-5",
        &replica_image,
        &[("e2e/k10".into(), "v10".into())],
    )
    .await?;
    assert_eq!(phase, "Succeeded", "{out}");
    for (k, v) in first.iter().chain(&second) {
        assert!(
            out.contains(&format!("{k} = {v} ")),
            "acknowledged write {k} lost by scaling out: {out}"
        );
    }
    let shrank = scale(4, 2).await?;
    loud(&format!(
        "MEASURED scale 4 -> 5 through the protocol: {grew:.1?}; 5 -> 4: {shrank:.1?}"
    ));
    poll(
        "replica 4's StatefulSet to be removed",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            Ok(tools
                .kubectl(&[
                    "get",
                    "statefulset",
                    &format!("{CLUSTER}-4"),
                    "-n",
                    &namespace,
                ])
                .is_err()
                .then_some(()))
        },
    )
    .await?;
    let describe = tools.kubectl(&["describe", "bftcluster", CLUSTER, "-n", &namespace])?;
    for needle in ["ViewChanged", "MemberRemoved"] {
        assert!(
            describe.contains(needle),
            "kubectl describe lacks {needle}:\n{describe}"
        );
    }
    let (phase, out) = client_pod(&tools, &namespace, "client-6", &replica_image, &[]).await?;
    assert_eq!(phase, "Succeeded", "{out}");
    assert!(
        out.contains("e2e/k10 = v10 "),
        "the write made at n=5 is lost: {out}"
    );

    // 7. Pause by annotation: reported, and a deleted child is not recreated until unpaused.
    tools.kubectl(&[
        "annotate",
        "bftcluster",
        CLUSTER,
        "-n",
        &namespace,
        "kmmr.io/paused=true",
    ])?;
    poll(
        "Paused=True",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            let c = tools.json(&["get", "bftcluster", CLUSTER, "-n", &namespace])?;
            Ok(condition_is(&c, "Paused", "True").then_some(()))
        },
    )
    .await?;
    let pdb = format!("{CLUSTER}-pdb");
    tools.kubectl(&["delete", "pdb", &pdb, "-n", &namespace])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        tools
            .kubectl(&["get", "pdb", &pdb, "-n", &namespace])
            .is_err(),
        "a paused cluster's children must be left alone"
    );
    tools.kubectl(&[
        "annotate",
        "bftcluster",
        CLUSTER,
        "-n",
        &namespace,
        "kmmr.io/paused-",
    ])?;
    poll(
        "the PodDisruptionBudget to come back",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            Ok(tools
                .kubectl(&["get", "pdb", &pdb, "-n", &namespace])
                .ok()
                .map(|_| ()))
        },
    )
    .await?;

    // 8. A new pod template (here: resources) reaches the replicas one at a time: never more
    //    than one replica down, and no acknowledged write lost.
    let revision_of = |sts: &Value| sts["status"]["updateRevision"].as_str().map(str::to_string);
    let before = tools.json(&[
        "get",
        "statefulset",
        &format!("{CLUSTER}-0"),
        "-n",
        &namespace,
    ])?;
    tools.kubectl(&[
        "patch",
        "bftcluster",
        CLUSTER,
        "-n",
        &namespace,
        "--type=merge",
        "-p",
        r#"{"spec":{"resources":{"requests":{"cpu":"11m","memory":"32Mi"}}}}"#,
    ])?;
    let t_roll = Instant::now();
    let lowest_healthy = std::cell::Cell::new(4_i64);
    poll(
        "every replica to run the new template",
        Duration::from_secs(300),
        Duration::from_millis(500),
        || {
            let namespace = namespace.clone();
            let before = before.clone();
            let tools = &tools;
            let lowest = &lowest_healthy;
            async move {
                let c = tools.json(&["get", "bftcluster", CLUSTER, "-n", &namespace])?;
                if let Some(h) = c["status"]["healthy"].as_i64() {
                    lowest.set(lowest.get().min(h));
                }
                for id in 0..4 {
                    let sts = tools.json(&[
                        "get",
                        "statefulset",
                        &format!("{CLUSTER}-{id}"),
                        "-n",
                        &namespace,
                    ])?;
                    let Some(update) = revision_of(&sts) else {
                        return Ok(None);
                    };
                    if Some(&update) == revision_of(&before).as_ref() {
                        return Ok(None);
                    }
                    let pod = tools.json(&[
                        "get",
                        "pod",
                        &format!("{CLUSTER}-{id}-0"),
                        "-n",
                        &namespace,
                    ])?;
                    if pod["metadata"]["labels"]["controller-revision-hash"] != update.as_str() {
                        return Ok(None);
                    }
                }
                let settled = condition_is(&c, "Available", "True") && c["status"]["healthy"] == 4;
                Ok(settled.then_some(()))
            }
        },
    )
    .await?;
    loud(&format!(
        "MEASURED rolling restart of 4 replicas for a new pod template: {:.1?}, lowest healthy count seen {}",
        t_roll.elapsed(),
        lowest_healthy.get()
    ));
    assert!(
        lowest_healthy.get() >= 3,
        "the roll took down more than one replica at a time"
    );
    let (phase, out) = client_pod(&tools, &namespace, "client-4", &replica_image, &[]).await?;
    assert_eq!(phase, "Succeeded", "{out}");
    for (k, v) in first.iter().chain(&second) {
        assert!(
            out.contains(&format!("{k} = {v} ")),
            "acknowledged write {k} lost in the roll: {out}"
        );
    }
    let describe = tools.kubectl(&["describe", "bftcluster", CLUSTER, "-n", &namespace])?;
    assert!(describe.contains("RollingRestart"), "{describe}");

    // 9. The operator's metrics, through the apiserver's service proxy.
    let metrics = tools.kubectl(&[
        "get", "--raw",
        &format!("/api/v1/namespaces/{operator_namespace}/services/kmmr-e2e-metrics:metrics/proxy/metrics"),
    ])?;
    for name in [
        "kmmr_operator_reconciles_total",
        "kmmr_operator_reconcile_duration_seconds",
        "kmmr_operator_reconcile_failures_total",
        "kmmr_operator_leader 1",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }

    // 10. Deleting the BftCluster removes everything it made, volumes included.
    let t_delete = Instant::now();
    tools.kubectl(&[
        "delete",
        "bftcluster",
        CLUSTER,
        "-n",
        &namespace,
        "--wait=true",
        "--timeout=120s",
    ])?;
    let selector = format!("app.kubernetes.io/instance={CLUSTER}");
    poll("every child to be gone", Duration::from_secs(180), Duration::from_secs(1), || async {
        let left = tools.kubectl(&[
            "get", "statefulsets,services,configmaps,secrets,poddisruptionbudgets,persistentvolumeclaims,pods",
            "-n", &namespace, "-l", &selector, "-o", "name",
        ])?;
        Ok(left.trim().is_empty().then_some(()))
    })
    .await?;
    loud(&format!(
        "MEASURED delete -> every child gone: {:.1?}",
        t_delete.elapsed()
    ));

    // The CRD outlives helm uninstall (resource-policy keep).
    cleanup.finished = true;
    drop(cleanup);
    tools.kubectl(&["get", "crd", "bftclusters.kmmr.io"])?;
    Ok(())
}
