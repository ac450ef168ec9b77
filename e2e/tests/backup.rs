//! Backups and restores through the operator, as a user drives them: a BftCluster with
//! `spec.backup` on a PersistentVolumeClaim and a schedule, keys written, a backup requested
//! with the `kmmr.io/backup-request` annotation and shown in `status.backup`; bad settings (a
//! cron schedule out of range, a missing claim) reported by the condition, a scheduled backup run
//! by the CronJob; then the cluster deleted and a new one created with `spec.restoreFrom` that
//! serves every key with the same value, while another restored from a damaged copy of the file
//! is refused with a message saying so. The same cluster then backs up to S3 (moto's server, in
//! the test bed's network namespace), and a third cluster restored from that object serves every
//! key too.
//!
//! Needs `KUBECONFIG` and the images in `KMMR_REPLICA_IMAGE` and `KMMR_OPERATOR_IMAGE` on the
//! nodes, as `tests/operator.rs` does. On the test bed (no provisioner) the volumes are hostPath
//! PersistentVolumes on this machine, which is the node, so the test also reads the backup file
//! the Job wrote and damages a copy of it; elsewhere that needs a node's file system, and the
//! damaged-file part is skipped loudly.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    cluster_or_skip, images_or_skip, loud, poll, run, strict, testbed_netns, tool, unique, Result,
};
use serde_json::{json, Value};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/kmmr");
const CLUSTER: &str = "demo";
const BROKEN: &str = "broken";
const FROM_S3: &str = "from-s3";
const CLAIM: &str = "backups";
const CLASS: &str = "kmmr-e2e-hostpath";
const KEYS: usize = 30;

struct Tools {
    kubectl: PathBuf,
    helm: PathBuf,
}

impl Tools {
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        run(&self.kubectl, args, None)
    }
    fn apply(&self, manifest: &Value) -> Result<String> {
        run(
            &self.kubectl,
            &["apply", "-f", "-"],
            Some(&manifest.to_string()),
        )
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
    host_dir: PathBuf,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("KMMR_E2E_KEEP").is_some() {
            loud(&format!(
                "KMMR_E2E_KEEP: left namespaces {} and {} for inspection",
                self.namespace, self.operator_namespace
            ));
            return;
        }
        let k = |args: &[&str]| {
            let _ = self.tools.kubectl(args);
        };
        // The finalizer needs the operator: delete the clusters before uninstalling it.
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
        let _ = std::fs::remove_dir_all(&self.host_dir);
    }
}

/// nsenter's option for the test bed's network namespace, and the node's address in it.
fn netns() -> String {
    format!("--net={}", testbed_netns().display())
}
const NODE_IP: &str = "10.250.0.10";
const BUCKET: &str = "kmmr-e2e";
const S3_SECRET: &str = "s3-creds";

/// moto's S3 server (PyPI `moto[server]`, installed by replica/scripts/install-moto.sh) inside
/// the test bed's network namespace on the node's address, where pods reach it as they would an
/// S3 service of their own; killed on drop. The test reads the bucket with boto3 (which moto
/// depends on), a client that is not ours, from the same namespace.
struct Moto {
    child: Child,
    python: PathBuf,
    endpoint: String,
    log: PathBuf,
}

impl Moto {
    fn start() -> Result<Moto> {
        let server = match std::env::var("KMMR_MOTO_SERVER") {
            Ok(p) if !p.is_empty() => p,
            _ => {
                let script = concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../replica/scripts/install-moto.sh"
                );
                run(&PathBuf::from(script), &[], None)?.trim().to_string()
            }
        };
        let python = Path::new(&server)
            .parent()
            .ok_or("moto_server's path has no directory")?
            .join("python");
        let nsenter = PathBuf::from("nsenter");
        let log = std::env::temp_dir().join(format!("kmmr-e2e-moto-{}.log", std::process::id()));
        // A port the namespace's kernel says is free; nothing else binds there meanwhile but
        // the test bed's own few servers, so a second try is the most it should take.
        for _ in 0..3 {
            let port = run(
                &nsenter,
                &[
                    &netns(),
                    &python.to_string_lossy(),
                    "-c",
                    &format!(
                        "import socket; s=socket.socket(); s.bind(('{NODE_IP}', 0)); print(s.getsockname()[1])"
                    ),
                ],
                None,
            )?;
            let port = port.trim().to_string();
            let out = std::fs::File::create(&log)?;
            let child = Command::new("nsenter")
                .args([&netns(), &server, "-H", NODE_IP, "-p", &port])
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .map_err(|e| format!("starting moto_server in the test bed's namespace: {e}"))?;
            let mut moto = Moto {
                child,
                python: python.clone(),
                endpoint: format!("http://{NODE_IP}:{port}"),
                log: log.clone(),
            };
            let until = Instant::now() + Duration::from_secs(60);
            while Instant::now() < until {
                if let Ok(Some(_)) = moto.child.try_wait() {
                    break;
                }
                if moto.boto3("s3.create_bucket(Bucket=BUCKET)").is_ok() {
                    return Ok(moto);
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            let _ = moto.child.kill();
        }
        Err(format!(
            "moto_server did not come up in the test bed's namespace: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
        .into())
    }

    /// Runs Python `code` with `s3` a boto3 client of this server and `BUCKET` the bucket, in
    /// the test bed's namespace; gives what it printed.
    fn boto3(&self, code: &str) -> Result<String> {
        let prelude = format!(
            "import boto3, json\n\
             s3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
             aws_access_key_id='AKIAKMMRE2E', aws_secret_access_key='kmmr-e2e-secret')\n\
             BUCKET = '{BUCKET}'\n",
            self.endpoint
        );
        run(
            &PathBuf::from("nsenter"),
            &[
                &netns(),
                &self.python.to_string_lossy(),
                "-c",
                &(prelude + code),
            ],
            None,
        )
    }

    /// The keys in the bucket.
    fn keys(&self) -> Result<Vec<String>> {
        let out = self.boto3(
            "print(json.dumps([o['Key'] for o in s3.list_objects_v2(Bucket=BUCKET).get('Contents', [])]))",
        )?;
        Ok(serde_json::from_str(out.trim())?)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn condition(obj: &Value, type_: &str) -> Value {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or(Value::Null)
}

/// A directory of the machine for a hostPath volume, writable by the pods' user 65532.
fn host_dir(path: &Path) -> Result {
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    Ok(())
}

/// Volumes on the test bed, which has no provisioner: `replicas` hostPath volumes of the class
/// the replicas claim, and the backup claim bound to a volume of its own.
fn volumes(tools: &Tools, namespace: &str, cleanup: &mut Cleanup, replicas: usize) -> Result {
    tools.apply(&json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": { "name": CLASS },
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "WaitForFirstConsumer",
        "reclaimPolicy": "Retain"
    }))?;
    let pv = |name: &str, path: &Path, class: &str, claim: Option<&str>| {
        let mut spec = json!({
            "capacity": { "storage": "1Gi" },
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": class,
            "hostPath": { "path": path.to_string_lossy(), "type": "Directory" }
        });
        if let Some(claim) = claim {
            spec["claimRef"] = json!({ "namespace": namespace, "name": claim });
        }
        json!({ "apiVersion": "v1", "kind": "PersistentVolume", "metadata": { "name": name }, "spec": spec })
    };
    for i in 0..replicas {
        let path = cleanup.host_dir.join(format!("replica-{i}"));
        host_dir(&path)?;
        let name = format!("{namespace}-{i}");
        tools.apply(&pv(&name, &path, CLASS, None))?;
        cleanup.volumes.push(name);
    }
    let path = cleanup.host_dir.join("backups");
    host_dir(&path)?;
    let name = format!("{namespace}-backups");
    tools.apply(&pv(&name, &path, "", Some(CLAIM)))?;
    cleanup.volumes.push(name.clone());
    tools.apply(&json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": { "name": CLAIM, "namespace": namespace },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "volumeName": name,
            "resources": { "requests": { "storage": "1Gi" } }
        }
    }))?;
    Ok(())
}

fn bftcluster(namespace: &str, name: &str, image: &str, extra: Value) -> Value {
    let mut spec = json!({
        "replicas": 4,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "storage": { "size": "64Mi", "className": CLASS },
        "resources": { "requests": { "cpu": "10m", "memory": "32Mi" } }
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    json!({
        "apiVersion": "kmmr.io/v1alpha1",
        "kind": "BftCluster",
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec
    })
}

/// A one-shot pod running the replica binary's client against `cluster`'s view: the
/// containers' arguments follow the subcommand, before the subcommand's own positionals.
fn client_pod(namespace: &str, cluster: &str, pod: &str, image: &str, runs: &[Vec<&str>]) -> Value {
    let containers: Vec<Value> = runs
        .iter()
        .enumerate()
        .map(|(i, args)| {
            let mut full: Vec<String> = vec![
                args[0].to_string(),
                "--view".into(),
                "/etc/kmmr/view.toml".into(),
                "--client-key".into(),
                "/tmp/client.key".into(),
                "--timeout".into(),
                "60".into(),
            ];
            full.extend(args[1..].iter().map(|a| a.to_string()));
            json!({
                "name": format!("c{i}"),
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["kmmr-replica"],
                "args": full,
                "volumeMounts": [
                    { "name": "view", "mountPath": "/etc/kmmr" },
                    { "name": "tmp", "mountPath": "/tmp" }
                ]
            })
        })
        .collect();
    // Every container but the last runs first, in order, as an init container.
    let (last, inits) = containers.split_last().expect("at least one run");
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": pod, "namespace": namespace },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532 },
            "volumes": [
                { "name": "view", "configMap": { "name": format!("{cluster}-config"), "items": [{ "key": "view.toml", "path": "view.toml" }] } },
                { "name": "tmp", "emptyDir": {} }
            ],
            "initContainers": inits,
            "containers": [last]
        }
    })
}

/// Runs a client pod to its end and gives the last container's output.
async fn run_client(tools: &Tools, namespace: &str, pod: &Value) -> Result<String> {
    let name = pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    tools.apply(pod)?;
    let phase = poll(
        &format!("client pod {name} to finish"),
        Duration::from_secs(240),
        Duration::from_secs(1),
        || async {
            let p = tools.json(&["get", "pod", &name, "-n", namespace])?;
            let phase = p["status"]["phase"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            Ok(matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase))
        },
    )
    .await?;
    if phase != "Succeeded" {
        let all = tools
            .kubectl(&[
                "logs",
                &name,
                "-n",
                namespace,
                "--all-containers",
                "--prefix",
            ])
            .unwrap_or_default();
        return Err(format!("client pod {name} {phase}: {all}").into());
    }
    let last = pod["spec"]["containers"][0]["name"]
        .as_str()
        .unwrap_or("c0");
    tools.kubectl(&["logs", &name, "-n", namespace, "-c", last])
}

/// Every key under e2e/ and its value, as `range -o json` prints them.
fn parse_range(out: &str) -> Result<BTreeMap<String, String>> {
    let mut kvs = BTreeMap::new();
    for line in out.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line)?;
        let (Some(k), Some(val)) = (v["key"].as_str(), v["value"].as_str()) else {
            return Err(format!("a range line without a text key and value: {line}").into());
        };
        kvs.insert(k.to_string(), val.to_string());
    }
    Ok(kvs)
}

async fn wait_for(
    tools: &Tools,
    namespace: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let t = Instant::now();
    let c = poll(what, timeout, Duration::from_millis(500), || async {
        let c = tools.json(&["get", "bftcluster", name, "-n", namespace])?;
        Ok(ok(&c).then_some(c))
    })
    .await
    .inspect_err(|_| {
        if let Ok(c) = tools.json(&["get", "bftcluster", name, "-n", namespace]) {
            loud(&format!("{what}: timed out; status: {}", c["status"]));
        }
    })?;
    loud(&format!("MEASURED {what}: {:.1?}", t.elapsed()));
    Ok(c)
}

/// The note of an Event of `reason` about `cluster` (Events are published after the status).
async fn event(tools: &Tools, namespace: &str, cluster: &str, reason: &str) -> Result<String> {
    let selector = format!("involvedObject.name={cluster},reason={reason}");
    poll(
        &format!("an Event {reason}"),
        Duration::from_secs(30),
        Duration::from_secs(1),
        || async {
            let events = tools.json(&[
                "get",
                "events",
                "-n",
                namespace,
                "--field-selector",
                &selector,
            ])?;
            Ok(events["items"][0]["message"].as_str().map(str::to_string))
        },
    )
    .await
}

/// Asks for a backup of CLUSTER now, as a user does: a new value of the annotation.
fn request_backup(tools: &Tools, namespace: &str, request: &str) -> Result {
    tools.kubectl(&[
        "annotate",
        "--overwrite",
        "bftcluster",
        CLUSTER,
        "-n",
        namespace,
        &format!("kmmr.io/backup-request={request}"),
    ])?;
    Ok(())
}

fn healthy(c: &Value) -> bool {
    condition(c, "Available")["status"] == "True" && c["status"]["healthy"] == 4
}

#[tokio::test]
async fn backup_delete_restore_reads_every_key_back_and_a_damaged_backup_is_refused() -> Result {
    let test = "backup_delete_restore_reads_every_key_back_and_a_damaged_backup_is_refused";
    if !cluster_or_skip(test) {
        return Ok(());
    }
    let Some((image, operator_image)) = images_or_skip(
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
    if std::env::var_os("KMMR_TESTBED").is_none() {
        // hostPath volumes stand in for a provisioner, and the damaged copy is made on the
        // node's disk: both need the test bed, whose node is this machine.
        loud(&format!(
            "SKIPPED {test}: needs the test bed (KMMR_TESTBED=1), whose node is this machine"
        ));
        return Ok(());
    }
    let t0 = Instant::now();
    let tools = Tools { kubectl, helm };
    let namespace = unique("kmmr-backup");
    let operator_namespace = unique("kmmr-op");
    let mut cleanup = Cleanup {
        tools: &tools,
        namespace: namespace.clone(),
        operator_namespace: operator_namespace.clone(),
        volumes: Vec::new(),
        host_dir: std::env::temp_dir()
            .join("kmmr-e2e-backup")
            .join(&namespace),
    };

    // The operator, adopting a CRD an earlier test left, as tests/operator.rs does.
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
    let (repo, tag) = operator_image
        .rsplit_once(':')
        .ok_or("KMMR_OPERATOR_IMAGE has no tag")?;
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
    tools.kubectl(&["create", "namespace", &namespace])?;
    // 4 replicas backed up, 4 restored, 4 refusing the damaged file, 4 restored from S3.
    volumes(&tools, &namespace, &mut cleanup, 16)?;

    // 1. A cluster with scheduled backups, Available.
    let backup = json!({ "backup": { "claimName": CLAIM, "schedule": "*/1 * * * *", "keep": 5 } });
    tools.apply(&bftcluster(&namespace, CLUSTER, &image, backup.clone()))?;
    wait_for(
        &tools,
        &namespace,
        CLUSTER,
        "backed-up cluster Available",
        Duration::from_secs(300),
        healthy,
    )
    .await?;
    let cron = tools.json(&[
        "get",
        "cronjob",
        &format!("{CLUSTER}-backup"),
        "-n",
        &namespace,
    ])?;
    assert_eq!(cron["spec"]["schedule"], "*/1 * * * *");

    // 2. Keys written through the replicas' client: e2e/k0..k29 = v0..v29 and one with spaces.
    let count = KEYS.to_string();
    run_client(
        &tools,
        &namespace,
        &client_pod(
            &namespace,
            CLUSTER,
            "writer",
            &image,
            &[
                vec!["writes", "--count", &count, "--interval-ms", "0", "e2e/k"],
                vec!["put", "e2e/spaced", "a value with spaces"],
            ],
        ),
    )
    .await?;
    let mut expected: BTreeMap<String, String> = (0..KEYS)
        .map(|i| (format!("e2e/k{i}"), format!("v{i}")))
        .collect();
    expected.insert("e2e/spaced".into(), "a value with spaces".into());

    // 3. A backup on request, shown in the status.
    let request = format!("e2e-{}", t0.elapsed().as_millis());
    request_backup(&tools, &namespace, &request)?;
    let c = wait_for(
        &tools,
        &namespace,
        CLUSTER,
        "requested backup in status.backup",
        Duration::from_secs(180),
        |c| {
            let b = &c["status"]["backup"];
            b["lastRequest"] == request.as_str()
                && b["lastBackup"]["keys"].as_i64() == Some(expected.len() as i64)
                && condition(c, "LastBackupSucceeded")["status"] == "True"
        },
    )
    .await?;
    let last = c["status"]["backup"]["lastBackup"].clone();
    loud(&format!("status.backup.lastBackup: {last}"));
    let file = last["file"].as_str().ok_or("lastBackup.file")?.to_string();
    assert!(
        file.starts_with(&format!("{CLUSTER}/kmmr-")) && file.ends_with(".kmmr"),
        "{file}"
    );
    assert_eq!(last["claimName"], CLAIM);
    assert!(
        last["revision"].as_i64() >= Some(expected.len() as i64),
        "{last}"
    );
    assert!(
        last["digest"].as_str().is_some_and(|d| d.len() == 64),
        "{last}"
    );
    event(&tools, &namespace, CLUSTER, "BackupRequested").await?;
    let on_disk = cleanup.host_dir.join("backups").join(&file);
    assert!(
        on_disk.is_file(),
        "{} is not on the claim's volume",
        on_disk.display()
    );

    // 4. Bad settings are reported by the condition, naming the problem.
    let patch = |spec: Value| {
        tools.kubectl(&[
            "patch",
            "bftcluster",
            CLUSTER,
            "-n",
            &namespace,
            "--type=merge",
            "-p",
            &json!({ "spec": { "backup": spec } }).to_string(),
        ])
    };
    let refused = patch(json!({ "claimName": CLAIM, "schedule": "every day" }))
        .expect_err("the schema refuses a schedule that is not 5 fields");
    assert!(
        refused
            .to_string()
            .contains("spec.backup.schedule must be a cron schedule"),
        "{refused}"
    );
    patch(json!({ "claimName": CLAIM, "schedule": "61 * * * *" }))?;
    let c = wait_for(
        &tools,
        &namespace,
        CLUSTER,
        "a bad schedule reported",
        Duration::from_secs(60),
        |c| condition(c, "LastBackupSucceeded")["reason"] == "BackupMisconfigured",
    )
    .await?;
    let message = condition(&c, "LastBackupSucceeded")["message"].to_string();
    assert!(
        message.contains("minute \\\"61\\\": 61 is outside 0-59"),
        "{message}"
    );
    patch(json!({ "claimName": "no-such-claim", "schedule": "*/1 * * * *" }))?;
    let c = wait_for(
        &tools,
        &namespace,
        CLUSTER,
        "a missing claim reported",
        Duration::from_secs(60),
        |c| {
            condition(c, "LastBackupSucceeded")["message"]
                .as_str()
                .is_some_and(|m| m.contains("no-such-claim"))
        },
    )
    .await?;
    assert!(condition(&c, "LastBackupSucceeded")["message"]
        .as_str()
        .is_some_and(|m| m.contains("does not exist")));
    patch(backup["backup"].clone())?;

    // 5. The CronJob runs backups on its own.
    poll(
        "a scheduled backup Job to complete",
        Duration::from_secs(150),
        Duration::from_secs(2),
        || async {
            let jobs = tools.json(&[
                "get",
                "jobs",
                "-n",
                &namespace,
                "-l",
                "app.kubernetes.io/component=backup",
            ])?;
            let done = jobs["items"].as_array().into_iter().flatten().any(|j| {
                j["metadata"]["ownerReferences"][0]["kind"] == "CronJob"
                    && j["status"]["succeeded"] == 1
            });
            Ok(done.then_some(()))
        },
    )
    .await?;
    loud(&format!(
        "a scheduled backup completed at +{:.1?}",
        t0.elapsed()
    ));

    // 6. Backups to S3: a Secret of credentials, the bucket in spec.backup.s3, a backup on
    // request that lands under the prefix, listed by boto3; a missing Secret named.
    let moto = Moto::start()?;
    loud(&format!("moto's S3 server at {}", moto.endpoint));
    tools.apply(&json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": S3_SECRET, "namespace": namespace },
        "stringData": {
            "AWS_ACCESS_KEY_ID": "AKIAKMMRE2E",
            "AWS_SECRET_ACCESS_KEY": "kmmr-e2e-secret"
        }
    }))?;
    let s3 = |secret: &str| {
        // A merge patch: the claim is removed (a backup goes to one place), and the schedule
        // suspended so that only the requested backup runs.
        json!({ "claimName": null, "suspend": true, "s3": {
            "bucket": BUCKET,
            "prefix": "e2e/",
            "endpoint": moto.endpoint,
            "credentialsSecret": secret
        } })
    };
    patch(s3("no-such-secret"))?;
    wait_for(
        &tools,
        &namespace,
        CLUSTER,
        "a missing S3 Secret reported",
        Duration::from_secs(60),
        |c| {
            condition(c, "LastBackupSucceeded")["message"]
                .as_str()
                .is_some_and(|m| {
                    m.contains("Secret no-such-secret") && m.contains("does not exist")
                })
        },
    )
    .await?;
    patch(s3(S3_SECRET))?;
    let request = format!("e2e-s3-{}", t0.elapsed().as_millis());
    request_backup(&tools, &namespace, &request)?;
    let c = wait_for(
        &tools,
        &namespace,
        CLUSTER,
        "requested S3 backup in status.backup",
        Duration::from_secs(180),
        |c| {
            let b = &c["status"]["backup"];
            b["lastRequest"] == request.as_str()
                && b["lastBackup"]["bucket"] == BUCKET
                && condition(c, "LastBackupSucceeded")["status"] == "True"
        },
    )
    .await?;
    let last = c["status"]["backup"]["lastBackup"].clone();
    loud(&format!("status.backup.lastBackup (S3): {last}"));
    assert_eq!(last["keys"].as_i64(), Some(expected.len() as i64), "{last}");
    let object = last["file"].as_str().ok_or("lastBackup.file")?.to_string();
    assert!(
        object.starts_with(&format!("e2e/{CLUSTER}/kmmr-")) && object.ends_with(".kmmr"),
        "{object}"
    );
    let listed = moto.keys()?;
    assert!(
        listed.contains(&object),
        "boto3 lists {listed:?} in the bucket, without {object}"
    );

    // 7. The cluster goes; the backup stays on the claim.
    tools.kubectl(&[
        "delete",
        "bftcluster",
        CLUSTER,
        "-n",
        &namespace,
        "--wait=true",
        "--timeout=120s",
    ])?;
    assert!(on_disk.is_file(), "deleting the cluster removed its backup");
    // Its children go in the background: the new cluster of the same name waits for them.
    let instance = format!("app.kubernetes.io/instance={CLUSTER}");
    poll(
        "the deleted cluster's pods, StatefulSets and claims to go",
        Duration::from_secs(120),
        Duration::from_secs(1),
        || async {
            let left = tools.kubectl(&[
                "get",
                "pods,statefulsets,pvc",
                "-n",
                &namespace,
                "-l",
                &instance,
                "-o",
                "name",
            ])?;
            Ok(left.trim().is_empty().then_some(()))
        },
    )
    .await?;
    // A damaged copy: one bit of the state flipped, as a disk or a copy might.
    let damaged = format!("{CLUSTER}/damaged.kmmr");
    let mut bytes = std::fs::read(&on_disk)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(cleanup.host_dir.join("backups").join(&damaged), bytes)?;

    // 8. New clusters from the backups: from the intact file, from the damaged copy, and from
    // the S3 object.
    let t_restore = Instant::now();
    tools.apply(&bftcluster(
        &namespace,
        CLUSTER,
        &image,
        json!({ "restoreFrom": { "claimName": CLAIM, "file": file } }),
    ))?;
    tools.apply(&bftcluster(
        &namespace,
        BROKEN,
        &image,
        json!({ "restoreFrom": { "claimName": CLAIM, "file": damaged } }),
    ))?;
    tools.apply(&bftcluster(
        &namespace,
        FROM_S3,
        &image,
        json!({ "restoreFrom": { "s3": {
            "bucket": BUCKET,
            "key": object,
            "endpoint": moto.endpoint,
            "credentialsSecret": S3_SECRET
        } } }),
    ))?;
    let c = wait_for(
        &tools,
        &namespace,
        CLUSTER,
        "restored cluster Available and Restored",
        Duration::from_secs(300),
        |c| healthy(c) && condition(c, "Restored")["status"] == "True",
    )
    .await?;
    loud(&format!(
        "restored: {} after {:.1?}",
        condition(&c, "Restored")["message"],
        t_restore.elapsed()
    ));

    // 9. Every key reads back with its value, and the restored cluster takes new writes.
    let out = run_client(
        &tools,
        &namespace,
        &client_pod(
            &namespace,
            CLUSTER,
            "reader",
            &image,
            &[
                vec!["put", "e2e/after-restore", "yes"],
                vec!["range", "-o", "json", "e2e/"],
            ],
        ),
    )
    .await?;
    let mut read = parse_range(&out)?;
    assert_eq!(read.remove("e2e/after-restore").as_deref(), Some("yes"));
    assert_eq!(
        read, expected,
        "the restored cluster's keys differ from what was written"
    );

    // 10. The damaged copy is refused, with the replicas' reason, and that cluster never starts.
    let c = wait_for(
        &tools,
        &namespace,
        BROKEN,
        "the damaged backup refused",
        Duration::from_secs(180),
        |c| condition(c, "Restored")["reason"] == "RestoreRefused",
    )
    .await?;
    let message = condition(&c, "Restored")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    loud(&format!("Restored=False: {message}"));
    assert!(message.contains("refusing the backup"), "{message}");
    assert!(message.contains("damaged.kmmr"), "{message}");
    assert_ne!(condition(&c, "Available")["status"], "True");
    let note = event(&tools, &namespace, BROKEN, "RestoreRefused").await?;
    assert!(note.contains("refusing the backup"), "{note}");

    // 11. The cluster restored from S3 serves the same keys.
    let c = wait_for(
        &tools,
        &namespace,
        FROM_S3,
        "cluster restored from S3 Available and Restored",
        Duration::from_secs(300),
        |c| healthy(c) && condition(c, "Restored")["status"] == "True",
    )
    .await?;
    loud(&format!(
        "restored from S3: {}",
        condition(&c, "Restored")["message"]
    ));
    let out = run_client(
        &tools,
        &namespace,
        &client_pod(
            &namespace,
            FROM_S3,
            "s3-reader",
            &image,
            &[vec!["range", "-o", "json", "e2e/"]],
        ),
    )
    .await?;
    assert_eq!(
        parse_range(&out)?,
        expected,
        "the cluster restored from S3 holds other keys than were written"
    );
    drop(moto);
    loud(&format!("MEASURED {test}: {:.1?} in all", t0.elapsed()));
    drop(cleanup);
    Ok(())
}
