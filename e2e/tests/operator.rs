//! The operator end to end, as a user drives it: `helm install` the chart with the locally built
//! images, `kubectl apply` a BftCluster of 4, wait until it is Available with 4 healthy members,
//! write and read through the replicas' client from a pod, kill the leader's pod and check that
//! the cluster recovers without losing an acknowledged write, check `kubectl get` and
//! `kubectl describe`, scale 4 -> 7 -> 4 through the protocol one view at a time while a client
//! keeps writing (with a view change made behind the operator's back and the operator restarted
//! in between, which it must repair), switch one replica into a Byzantine mode and check that
//! the status names it while clients stay correct, pause, roll a new pod template, and delete
//! everything.
//!
//! Needs `KUBECONFIG`, and the images in `KMMR_REPLICA_IMAGE` and `KMMR_OPERATOR_IMAGE` present
//! on the nodes (`.ci/testbed-test` builds and loads them; on kind, `kind load docker-image`).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{cluster_or_skip, images_or_skip, loud, poll, run, strict, tool, unique, Result};
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
    // Ids 0-7 are used over the test (4 -> 7, replica 3 removed and replaced, back to 4); a
    // released volume is not reused, so each id needs its own, plus spares.
    for i in 0..10 {
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

/// A container running the replica binary's client subcommand `args[0]` against the cluster's
/// view, with its own throw-away key, followed by the rest of `args`.
fn kmmr_container(name: &str, image: &str, args: Vec<String>) -> Value {
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
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["kmmr-replica"],
        "args": full,
        "volumeMounts": [{ "name": "view", "mountPath": "/etc/kmmr" }]
    })
}

/// A one-shot, non-root pod with the cluster's view mounted for `kmmr_container`s.
fn kmmr_client_pod(
    namespace: &str,
    name: &str,
    inits: Vec<Value>,
    containers: Vec<Value>,
) -> Value {
    json!({
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
            "containers": containers
        }
    })
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
    let client = |cname: String, args: Vec<String>| kmmr_container(&cname, image, args);
    let inits: Vec<Value> = puts
        .iter()
        .enumerate()
        .map(|(i, (k, v))| client(format!("put-{i}"), vec!["put".into(), k.clone(), v.clone()]))
        .collect();
    let pod = kmmr_client_pod(
        namespace,
        name,
        inits,
        vec![client("range".into(), vec!["range".into(), "e2e/".into()])],
    );
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

/// Everything that explains a failure of a step: the cluster's status and Events, the pods, and
/// the logs of every replica (and of its previous container) and of the operator. Written to a
/// file whose path is printed, and its tail printed too.
fn diagnose(tools: &Tools, namespace: &str, operator_namespace: &str, why: &str) {
    let mut out = format!("=== {why}\n");
    let mut section = |title: &str, args: &[&str]| {
        out.push_str(&format!("\n=== {title}\n"));
        match tools.kubectl(args) {
            Ok(text) => out.push_str(&text),
            Err(e) => out.push_str(&format!("({e})\n")),
        }
    };
    section(
        "bftcluster",
        &["get", "bftcluster", CLUSTER, "-n", namespace, "-o", "yaml"],
    );
    section("pods", &["get", "pods", "-n", namespace, "-o", "wide"]);
    section(
        "configmap",
        &[
            "get",
            "configmap",
            &format!("{CLUSTER}-config"),
            "-n",
            namespace,
            "-o",
            "yaml",
        ],
    );
    section(
        "events",
        &["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"],
    );
    let pods = tools
        .kubectl(&[
            "get",
            "pods",
            "-n",
            namespace,
            "-l",
            "app.kubernetes.io/component=replica",
            "-o",
            "name",
        ])
        .unwrap_or_default();
    for pod in pods.lines() {
        section(
            &format!("logs {pod}"),
            &["logs", pod, "-n", namespace, "--tail=300"],
        );
        section(
            &format!("previous logs {pod}"),
            &["logs", pod, "-n", namespace, "--previous", "--tail=100"],
        );
    }
    section(
        "operator logs",
        &[
            "logs",
            "-n",
            operator_namespace,
            "-l",
            "app.kubernetes.io/name=kmmr-operator",
            "--tail=400",
        ],
    );
    let path = std::env::temp_dir().join(format!("kmmr-e2e-diagnosis-{namespace}.txt"));
    let _ = std::fs::write(&path, &out);
    let tail: String = out
        .lines()
        .rev()
        .take(60)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    loud(&format!(
        "DIAGNOSIS ({why}) written to {}; its end:\n{tail}",
        path.display()
    ));
}

/// A pod that writes e2e keys one at a time for as long as the test runs (`kmmr-replica
/// writes`), printing `acked <key> <value>` for every acknowledged write.
fn start_writer(tools: &Tools, namespace: &str, name: &str, image: &str, prefix: &str) -> Result {
    let args = ["writes", "--interval-ms", "20", "--seconds", "1200", prefix];
    let writer = kmmr_container(
        "writer",
        image,
        args.iter().map(|a| a.to_string()).collect(),
    );
    let pod = kmmr_client_pod(namespace, name, Vec::new(), vec![writer]);
    tools.kubectl_in(&["apply", "-f", "-"], &pod.to_string())?;
    Ok(())
}

/// The writes `start_writer`'s pod has had acknowledged so far, in order.
fn acked(tools: &Tools, namespace: &str, name: &str) -> Result<Vec<(String, String)>> {
    let logs = tools.kubectl(&["logs", name, "-n", namespace])?;
    Ok(logs
        .lines()
        .filter_map(|l| {
            let mut parts = l.strip_prefix("acked ")?.split(' ');
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect())
}

/// One view the status showed while scaling.
#[derive(Debug, Clone, PartialEq)]
struct SeenView {
    view: i64,
    n: i64,
    f: i64,
    members: Vec<i64>,
    /// When the status first showed this view, from the patch.
    first_seen: Duration,
    /// When the status first showed every member of this view healthy, from the patch. The
    /// operator takes the next step in the pass that sees that, so only the last view of a
    /// scaling is seen settled.
    settled: Option<Duration>,
}

/// How the status words a member named by the evidence of f+1 others (operator/src/observe.rs).
const ACCUSED: &str = "accused by ";

/// How many replicas accuse a member, from its problem text (`accused by N replicas [..]`).
fn accusers(problem: &str) -> Option<usize> {
    let rest = &problem[problem.find(ACCUSED)? + ACCUSED.len()..];
    rest.split_once(" replicas")?.0.parse().ok()
}

/// Sets spec.replicas to `n` and follows the status until the view matches the spec, recording
/// each view it passed through and checking at every observation that the cluster stayed
/// Available with a healthy quorum.
async fn scale_and_follow(
    tools: &Tools,
    namespace: &str,
    operator_namespace: &str,
    n: i64,
) -> Result<Vec<SeenView>> {
    let c = tools.json(&["get", "bftcluster", CLUSTER, "-n", namespace])?;
    let before = SeenView {
        view: c["status"]["viewId"]
            .as_i64()
            .ok_or("no view id before scaling")?,
        n: c["status"]["n"].as_i64().unwrap_or(-1),
        f: c["status"]["f"].as_i64().unwrap_or(-1),
        members: c["status"]["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_i64())
            .collect(),
        first_seen: Duration::ZERO,
        settled: Some(Duration::ZERO),
    };
    tools.kubectl(&[
        "patch",
        "bftcluster",
        CLUSTER,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        &format!(r#"{{"spec":{{"replicas":{n}}}}}"#),
    ])?;
    let start = Instant::now();
    let wall_start = jiff::Timestamp::now();
    let mut seen: Vec<SeenView> = vec![before];
    let mut reconfiguring_seen = false;
    let deadline = Duration::from_secs(420);
    loop {
        if start.elapsed() > deadline {
            diagnose(
                tools,
                namespace,
                operator_namespace,
                &format!("scaling to {n}"),
            );
            return Err(format!(
                "scaling to {n} did not finish within {deadline:?}; views seen: {seen:?}"
            )
            .into());
        }
        let c = tools.json(&["get", "bftcluster", CLUSTER, "-n", namespace])?;
        let s = &c["status"];
        let (view, cn, cf) = (
            s["viewId"].as_i64().unwrap_or(-1),
            s["n"].as_i64().unwrap_or(-1),
            s["f"].as_i64().unwrap_or(-1),
        );
        let healthy = s["healthy"].as_i64().unwrap_or(0);
        let quorum = s["quorum"].as_i64().unwrap_or(i64::MAX);
        // Never a step that leaves fewer than a quorum healthy: every observation is Available.
        if !(condition_is(&c, "Available", "True") && healthy >= quorum) {
            diagnose(
                tools,
                namespace,
                operator_namespace,
                "quorum lost while scaling",
            );
            return Err(
                format!("while scaling to {n} the cluster lost its healthy quorum: {s}").into(),
            );
        }
        // No replica runs a Byzantine mode here: any member named by its peers' accusations was
        // judged by a view or state its accusers did not hold (joiners did, once).
        let accused: Vec<&Value> = s["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["problem"].as_str().is_some_and(|p| p.contains(ACCUSED)))
            .collect();
        if !accused.is_empty() {
            diagnose(
                tools,
                namespace,
                operator_namespace,
                "a correct replica accused while scaling",
            );
            return Err(format!(
                "while scaling to {n} correct replicas were named by accusations: {accused:?}"
            )
            .into());
        }
        if condition_is(&c, "Reconfiguring", "True") {
            reconfiguring_seen = true;
        }
        let members: Vec<i64> = s["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_i64())
            .collect();
        if seen.last().is_none_or(|v| v.view != view) && view >= 0 {
            seen.push(SeenView {
                view,
                n: cn,
                f: cf,
                members,
                first_seen: start.elapsed(),
                settled: None,
            });
            loud(&format!(
                "scaling to {n}: view {view} (n={cn}, f={cf}) shown after {:.1?}",
                start.elapsed()
            ));
        }
        let last = seen.last_mut().ok_or("no view in the status")?;
        if last.settled.is_none() && healthy == cn {
            last.settled = Some(start.elapsed());
        }
        let done = cn == n
            && healthy == n
            && condition(&c, "Reconfiguring")
                .is_some_and(|r| r["status"] == "False" && r["reason"] == "ViewMatchesSpec");
        if done && (reconfiguring_seen || seen.len() > 1) {
            fill_from_events(tools, namespace, wall_start, &mut seen)?;
            return Ok(seen);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `view 8 with members [0, 1, 2, 4, 5, 6] and f = 1` out of a ViewChanged Event's message.
fn parse_view_changed(message: &str) -> Option<(i64, Vec<i64>, i64)> {
    let rest = &message[message.find("installed view ")? + "installed view ".len()..];
    let (view, rest) = rest.split_once(" with members [")?;
    let (members, rest) = rest.split_once("] and f = ")?;
    let members = members
        .split(',')
        .map(|m| m.trim())
        .filter(|m| !m.is_empty())
        .map(|m| m.parse().ok())
        .collect::<Option<Vec<i64>>>()?;
    Some((view.parse().ok()?, members, rest.trim().parse().ok()?))
}

/// Adds to `seen` the views that the status polling missed, from the operator's ViewChanged
/// Events (one per step). On a busy machine a view can last less than one poll of the status;
/// the Events are the record of every step.
fn fill_from_events(
    tools: &Tools,
    namespace: &str,
    since: jiff::Timestamp,
    seen: &mut Vec<SeenView>,
) -> Result {
    let (Some(first), Some(last)) = (seen.first().map(|v| v.view), seen.last().map(|v| v.view))
    else {
        return Ok(());
    };
    let events = tools.json(&[
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        &format!("involvedObject.name={CLUSTER},reason=ViewChanged"),
    ])?;
    for e in events["items"].as_array().into_iter().flatten() {
        let Some((view, members, f)) = e["message"].as_str().and_then(parse_view_changed) else {
            continue;
        };
        if view <= first || view >= last || seen.iter().any(|s| s.view == view) {
            continue;
        }
        let Some(at) = seen.iter().position(|s| s.view > view) else {
            continue;
        };
        let (after, before) = (seen[at - 1].first_seen, seen[at].first_seen);
        let announced = e["eventTime"]
            .as_str()
            .or(e["lastTimestamp"].as_str())
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .and_then(|t| Duration::try_from(t.duration_since(since)).ok())
            .unwrap_or(after);
        loud(&format!(
            "view {view} (n={}, f={f}) lasted less than a poll of the status: taken from its \
             ViewChanged Event",
            members.len()
        ));
        seen.insert(
            at,
            SeenView {
                view,
                n: members.len() as i64,
                f,
                members,
                first_seen: announced.clamp(after, before),
                settled: None,
            },
        );
    }
    Ok(())
}

/// Checks the views a scaling passed through: one member (or f) per view, view ids consecutive.
fn assert_single_steps(seen: &[SeenView], expected: &[(i64, i64)]) {
    let got: Vec<(i64, i64)> = seen.iter().skip(1).map(|v| (v.n, v.f)).collect();
    assert_eq!(got, expected, "views seen: {seen:?}");
    for pair in seen.windows(2) {
        assert_eq!(
            pair[1].view,
            pair[0].view + 1,
            "a view was skipped: {seen:?}"
        );
        let (a, b) = (&pair[0].members, &pair[1].members);
        let changed = a.iter().filter(|m| !b.contains(m)).count()
            + b.iter().filter(|m| !a.contains(m)).count();
        assert!(
            changed <= 1,
            "more than one member changed in one step: {seen:?}"
        );
    }
}

/// `kubectl annotate` the test's BftCluster (`key=value`, or `key-` to remove).
fn annotate(tools: &Tools, namespace: &str, annotation: &str) -> Result {
    tools.kubectl(&[
        "annotate",
        "bftcluster",
        CLUSTER,
        "-n",
        namespace,
        annotation,
    ])?;
    Ok(())
}

async fn wait_paused(tools: &Tools, namespace: &str) -> Result {
    poll(
        "Paused=True",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || async {
            let c = tools.json(&["get", "bftcluster", CLUSTER, "-n", namespace])?;
            Ok(condition_is(&c, "Paused", "True").then_some(()))
        },
    )
    .await
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
    let Some((replica_image, operator_image)) = images_or_skip(
        test,
        ".ci/testbed-test builds and loads them; needs the test bed's node, tier b",
    ) else {
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
            // The Byzantine-replica test below needs the test-only annotation honoured.
            "--set",
            "testing.allowByzantineModes=true",
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
        ["NAME", "N", "F", "HEALTHY", "LEADER", "VIEW", "ETCD", "AGE"]
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
    // Writes go on while the replica is down; meanwhile its replacement is timed: a new pod
    // (new uid), Ready, and the status with all 4 healthy again. Whether the status caught the
    // replica down at all depends on how fast the pod came back between two observations.
    let seen_down = std::cell::Cell::new(None::<Duration>);
    let second: Vec<(String, String)> = (5..10)
        .map(|i| (format!("e2e/k{i}"), format!("v{i}")))
        .collect();
    let replacement = poll(
        "the killed replica to be replaced and the cluster healthy",
        Duration::from_secs(240),
        Duration::from_millis(250),
        || async {
            let c = tools.json(&["get", "bftcluster", CLUSTER, "-n", &namespace])?;
            let healthy = c["status"]["healthy"].as_i64().unwrap_or(0);
            if healthy < 4 && seen_down.get().is_none() {
                seen_down.set(Some(t_kill.elapsed()));
            }
            let Ok(pod) = tools.json(&["get", "pod", &victim, "-n", &namespace]) else {
                return Ok(None);
            };
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            let replaced = pod["metadata"]["uid"] != old_uid && ready && healthy == 4;
            Ok(replaced.then(|| (t_kill.elapsed(), c)))
        },
    );
    let writes = client_pod(&tools, &namespace, "client-2", &replica_image, &second);
    let (replacement, writes) = tokio::join!(replacement, writes);
    let (replaced, c) = replacement?;
    let (phase, out) = writes?;
    assert_eq!(
        phase, "Succeeded",
        "writes while one replica is down must succeed: {out}"
    );
    let c = if condition_is(&c, "Available", "True") {
        c
    } else {
        wait_healthy(&tools, &namespace, Duration::from_secs(120)).await?
    };
    loud(&format!(
        "MEASURED killed leader replica {leader}: {}; new pod Ready and all 4 healthy again after {replaced:.1?}; new leader {}",
        match seen_down.get() {
            Some(t) => format!("status showed it down after {t:.1?}"),
            None => "it came back before the status caught it down".to_string(),
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

    // 6. Scaling through the protocol, 4 -> 7 -> 4, one member (or f) per view, while a client
    //    keeps writing; every acknowledged write reads back afterwards.
    start_writer(&tools, &namespace, "writer", &replica_image, "e2e/w/")?;
    poll(
        "the writer's first acknowledged writes",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || async {
            Ok((acked(&tools, &namespace, "writer")
                .unwrap_or_default()
                .len()
                >= 3)
                .then_some(()))
        },
    )
    .await?;
    let acked_before_out = acked(&tools, &namespace, "writer")?.len();
    let grew = scale_and_follow(&tools, &namespace, &operator_namespace, 7).await?;
    assert_single_steps(&grew, &[(5, 1), (6, 1), (7, 1), (7, 2)]);
    assert_eq!(
        grew.last().map(|v| v.members.clone()),
        Some((0..7).collect::<Vec<i64>>())
    );
    let acked_after_out = acked(&tools, &namespace, "writer")?.len();
    assert!(
        acked_after_out > acked_before_out,
        "the writer made no progress while the cluster grew ({acked_before_out} -> {acked_after_out})"
    );
    let c = tools.json(&["get", "bftcluster", CLUSTER, "-n", &namespace])?;
    assert_eq!(
        (
            c["status"]["n"].as_i64(),
            c["status"]["f"].as_i64(),
            c["status"]["quorum"].as_i64()
        ),
        (Some(7), Some(2), Some(5))
    );
    let table = tools.kubectl(&["get", "bftclusters", "-n", &namespace])?;
    loud(&format!("after scaling out:\n{table}"));

    // 6b. A lost answer: a view change the operator never heard of. Paused, the admin key (from
    //     its Secret) removes replica 3 behind the operator's back, leaving the ConfigMap's view
    //     stale. Unpaused, and with the operator itself restarted, the operator must learn the
    //     installed view from the replicas, repair the ConfigMap, delete replica 3's objects,
    //     and grow back to 7 with a new id: converging from the state a crash would leave.
    annotate(&tools, &namespace, "kmmr.io/paused=true")?;
    wait_paused(&tools, &namespace).await?;
    let recorded_view = c["status"]["viewId"].as_i64().ok_or("no view id")?;
    let admin_pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "behind-the-back", "namespace": namespace },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532 },
            "volumes": [
                { "name": "view", "configMap": { "name": format!("{CLUSTER}-config"), "items": [{ "key": "view.toml", "path": "view.toml" }] } },
                { "name": "admin", "secret": { "secretName": format!("{CLUSTER}-admin-key"), "items": [{ "key": "key", "path": "admin.key" }] } }
            ],
            "containers": [{
                "name": "admin",
                "image": replica_image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["kmmr-replica"],
                "args": ["admin", "--view", "/etc/kmmr/view.toml", "--admin-key", "/etc/admin/admin.key", "--no-write-view", "remove", "--id", "3"],
                "volumeMounts": [
                    { "name": "view", "mountPath": "/etc/kmmr" },
                    { "name": "admin", "mountPath": "/etc/admin" }
                ]
            }]
        }
    });
    tools.kubectl_in(&["apply", "-f", "-"], &admin_pod.to_string())?;
    let phase = poll(
        "the admin pod to finish",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || async {
            let p = tools.json(&["get", "pod", "behind-the-back", "-n", &namespace])?;
            let phase = p["status"]["phase"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            Ok(matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase))
        },
    )
    .await?;
    let admin_out = tools
        .kubectl(&["logs", "behind-the-back", "-n", &namespace])
        .unwrap_or_default();
    assert_eq!(
        phase, "Succeeded",
        "the admin's removal failed: {admin_out}"
    );
    let cm = tools.json(&[
        "get",
        "configmap",
        &format!("{CLUSTER}-config"),
        "-n",
        &namespace,
    ])?;
    let cm_view = cm["data"]["view.toml"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        cm_view.starts_with(&format!("id = {recorded_view}\n")),
        "while paused the operator must not have rewritten the view:\n{cm_view}"
    );
    let t_repair = Instant::now();
    annotate(&tools, &namespace, "kmmr.io/paused-")?;
    tools.kubectl(&[
        "delete",
        "pod",
        "-n",
        &operator_namespace,
        "-l",
        "app.kubernetes.io/name=kmmr-operator",
        "--wait=false",
    ])?;
    let repaired = poll(
        "the operator to follow the installed view and grow back to 7 without replica 3",
        Duration::from_secs(300),
        Duration::from_millis(500),
        || async {
            let c = tools.json(&["get", "bftcluster", CLUSTER, "-n", &namespace])?;
            let s = &c["status"];
            let ids: Vec<i64> = s["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["id"].as_i64())
                .collect();
            let ok = s["n"] == 7
                && s["f"] == 2
                && s["healthy"] == 7
                && !ids.contains(&3)
                && condition(&c, "Reconfiguring").is_some_and(|r| r["reason"] == "ViewMatchesSpec");
            Ok(ok.then_some(c))
        },
    )
    .await;
    let repaired = match repaired {
        Ok(c) => c,
        Err(e) => {
            diagnose(
                &tools,
                &namespace,
                &operator_namespace,
                "repairing a stale view",
            );
            return Err(e);
        }
    };
    loud(&format!(
        "MEASURED lost answer repaired (operator restarted, stale view {recorded_view} -> view {} with members {}): {:.1?}",
        repaired["status"]["viewId"],
        repaired["status"]["members"].as_array().map(|m| m.iter().map(|x| x["id"].to_string()).collect::<Vec<_>>().join(",")).unwrap_or_default(),
        t_repair.elapsed()
    ));
    for gone in [
        vec!["statefulset".to_string(), format!("{CLUSTER}-3")],
        vec!["secret".to_string(), format!("{CLUSTER}-3-key")],
        vec!["pvc".to_string(), format!("data-{CLUSTER}-3-0")],
    ] {
        poll(
            &format!("{} {} to be deleted", gone[0], gone[1]),
            Duration::from_secs(60),
            Duration::from_millis(500),
            || async {
                Ok(tools
                    .kubectl(&["get", &gone[0], &gone[1], "-n", &namespace])
                    .is_err()
                    .then_some(()))
            },
        )
        .await?;
    }
    let events = tools.kubectl(&[
        "get",
        "events",
        "-n",
        &namespace,
        "--field-selector",
        &format!("involvedObject.name={CLUSTER}"),
    ])?;
    assert!(events.contains("ViewRecovered"), "{events}");

    // 6c. Back to 4: the highest ids leave one per view.
    let acked_before_in = acked(&tools, &namespace, "writer")?.len();
    let shrank = scale_and_follow(&tools, &namespace, &operator_namespace, 4).await?;
    assert_single_steps(&shrank, &[(6, 1), (5, 1), (4, 1)]);
    assert_eq!(
        shrank.last().map(|v| v.members.clone()),
        Some(vec![0, 1, 2, 4])
    );
    // A step lasts from the view before it appearing to its own view appearing (the joiner
    // catching up is part of the step that follows it, which waits for it); the last one until
    // every member of the final view is healthy.
    let step_times = |seen: &[SeenView]| {
        let mut out = Vec::new();
        for i in 1..seen.len() {
            let from = if i == 1 {
                Duration::ZERO
            } else {
                seen[i - 1].first_seen
            };
            out.push(format!(
                "-> view {} (n={} f={}): {:.1}s",
                seen[i].view,
                seen[i].n,
                seen[i].f,
                (seen[i].first_seen - from).as_secs_f64()
            ));
        }
        if let Some(last) = seen.last() {
            out.push(format!(
                "all {} healthy at {:.1}s",
                last.n,
                last.settled.unwrap_or_default().as_secs_f64()
            ));
        }
        out.join("; ")
    };
    loud(&format!(
        "MEASURED scale 4 -> 7 step by step: {}\nMEASURED scale 7 -> 4 step by step: {}",
        step_times(&grew),
        step_times(&shrank)
    ));
    for id in [5, 6, 7] {
        poll(
            &format!("replica {id}'s StatefulSet to be removed"),
            Duration::from_secs(60),
            Duration::from_millis(500),
            || async {
                Ok(tools
                    .kubectl(&[
                        "get",
                        "statefulset",
                        &format!("{CLUSTER}-{id}"),
                        "-n",
                        &namespace,
                    ])
                    .is_err()
                    .then_some(()))
            },
        )
        .await?;
    }
    let written = acked(&tools, &namespace, "writer")?;
    assert!(
        written.len() > acked_before_in,
        "the writer made no progress while the cluster shrank"
    );
    tools.kubectl(&["delete", "pod", "writer", "-n", &namespace, "--wait=false"])?;
    let describe = tools.kubectl(&["describe", "bftcluster", CLUSTER, "-n", &namespace])?;
    for needle in ["ViewChanged", "MemberRemoved", "ScalingOut", "ScalingIn"] {
        assert!(
            describe.contains(needle),
            "kubectl describe lacks {needle}:\n{describe}"
        );
    }
    let (phase, out) = client_pod(&tools, &namespace, "client-5", &replica_image, &[]).await?;
    assert_eq!(phase, "Succeeded", "{out}");
    for (k, v) in first.iter().chain(&second).chain(&written) {
        assert!(
            out.contains(&format!("{k} = {v} ")),
            "acknowledged write {k} = {v} lost by scaling: {}",
            out.lines().take(20).collect::<Vec<_>>().join("\n")
        );
    }
    loud(&format!(
        "scaling: {} writes acknowledged during 4 -> 7 -> 4 and all read back",
        written.len()
    ));

    // 6d. One replica switched into a Byzantine mode (test-only annotation, honoured because
    //     this operator was installed with testing.allowByzantineModes): the status names it,
    //     from its own signed status, and clients keep getting correct results.
    let c = wait_healthy(&tools, &namespace, Duration::from_secs(120)).await?;
    let leader = c["status"]["leader"].as_i64().unwrap_or(-1);
    let liar = [1_i64, 2, 4]
        .into_iter()
        .find(|id| *id != leader)
        .unwrap_or(1);
    let t_byz = Instant::now();
    annotate(
        &tools,
        &namespace,
        &format!("kmmr.io/byzantine-test-mode={liar}=mixed"),
    )?;
    // When the status first showed the liar admitting its mode (its own word), for comparison.
    let admitted = std::cell::Cell::new(None::<Duration>);
    let named = poll(
        "the status to name the Byzantine replica",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || async {
            let c = tools.json(&["get", "bftcluster", CLUSTER, "-n", &namespace])?;
            let degraded = condition(&c, "Degraded").cloned().unwrap_or_default();
            let member = c["status"]["members"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["id"] == liar)
                .cloned()
                .unwrap_or_default();
            let ok = degraded["status"] == "True"
                && degraded["reason"] == "ReplicasMisbehaving"
                && degraded["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&format!("replica {liar} (")))
                && member["health"] == "Unhealthy"
                // Named by evidence (f+1 replicas caught it), not by its own admission.
                && member["problem"]
                    .as_str()
                    .and_then(accusers)
                    .is_some_and(|by| by >= 2)
                && condition_is(&c, "Available", "True");
            if admitted.get().is_none()
                && member["problem"]
                    .as_str()
                    .is_some_and(|p| p.contains("Byzantine test mode"))
            {
                admitted.set(Some(t_byz.elapsed()));
            }
            Ok(ok.then_some(c))
        },
    )
    .await;
    let named = match named {
        Ok(c) => c,
        Err(e) => {
            diagnose(
                &tools,
                &namespace,
                &operator_namespace,
                "naming a Byzantine replica",
            );
            return Err(e);
        }
    };
    let to_named = t_byz.elapsed();
    // The switch itself is a restart of the liar's pod: time the naming from its container's
    // start too (the kubelet's clock is this machine's, to the second).
    let pod = tools.json(&[
        "get",
        "pod",
        &format!("{CLUSTER}-{liar}-0"),
        "-n",
        &namespace,
    ])?;
    let since_start = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
        .as_str()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map(|t| jiff::Timestamp::now().duration_since(t));
    loud(&format!(
        "MEASURED replica {liar} switched to Byzantine mode mixed (annotation) and named in the status by the evidence of its peers after {to_named:.1?} ({} after its restarted container started; its own status admitted the mode after {}): {}",
        since_start.map_or_else(|| "?".to_string(), |d| format!("{:.1}s", d.as_secs_f64())),
        admitted.get().map_or_else(|| "never seen".to_string(), |d| format!("{d:.1?}")),
        condition(&named, "Degraded").map(|d| d["message"].to_string()).unwrap_or_default()
    ));
    assert!(
        pod["spec"]["containers"][0]["args"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "mixed")),
        "the replica must really run the mode: {}",
        pod["spec"]["containers"][0]["args"]
    );
    let third: Vec<(String, String)> = (20..25)
        .map(|i| (format!("e2e/k{i}"), format!("v{i}")))
        .collect();
    let (phase, out) = client_pod(&tools, &namespace, "client-byz", &replica_image, &third).await?;
    assert_eq!(
        phase, "Succeeded",
        "clients must stay correct with one Byzantine replica: {out}"
    );
    for (k, v) in first.iter().chain(&second).chain(&third).chain(&written) {
        assert!(
            out.contains(&format!("{k} = {v} ")),
            "with a Byzantine replica, {k} = {v} did not read back"
        );
    }
    // Switched back: the operator restarts the unhealthy replica with the honest template.
    annotate(&tools, &namespace, "kmmr.io/byzantine-test-mode-")?;
    wait_healthy(&tools, &namespace, Duration::from_secs(180)).await?;

    // 7. Pause by annotation: reported, and a deleted child is not recreated until unpaused.
    annotate(&tools, &namespace, "kmmr.io/paused=true")?;
    wait_paused(&tools, &namespace).await?;
    let pdb = format!("{CLUSTER}-pdb");
    tools.kubectl(&["delete", "pdb", &pdb, "-n", &namespace])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        tools
            .kubectl(&["get", "pdb", &pdb, "-n", &namespace])
            .is_err(),
        "a paused cluster's children must be left alone"
    );
    annotate(&tools, &namespace, "kmmr.io/paused-")?;
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
    let lowest_status = std::cell::RefCell::new(String::new());
    poll(
        "every replica to run the new template",
        Duration::from_secs(300),
        Duration::from_millis(500),
        || {
            let namespace = namespace.clone();
            let before = before.clone();
            let tools = &tools;
            let lowest = &lowest_healthy;
            let lowest_status = &lowest_status;
            async move {
                let c = tools.json(&["get", "bftcluster", CLUSTER, "-n", &namespace])?;
                if let Some(h) = c["status"]["healthy"].as_i64() {
                    if h < lowest.get() {
                        *lowest_status.borrow_mut() = c["status"]["members"].to_string();
                    }
                    lowest.set(lowest.get().min(h));
                }
                for id in [0, 1, 2, 4] {
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
        "the roll took down more than one replica at a time; members then: {}",
        lowest_status.borrow()
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

#[test]
fn a_view_changed_message_parses() {
    assert_eq!(
        parse_view_changed(
            "remove replica 7: the replicas installed view 8 with members [0, 1, 2, 4, 5, 6] and f = 1"
        ),
        Some((8, vec![0, 1, 2, 4, 5, 6], 1))
    );
    assert_eq!(parse_view_changed("something else"), None);
}
