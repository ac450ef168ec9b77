//! A hosted kube-apiserver on a BftCluster, the way Kamaji or Cluster API run hosted control
//! planes: the operator installed with `helm install`, a BftCluster of 4 with `spec.etcdAPI`
//! on, and a second kube-apiserver (the test bed's binary, started here) whose
//! `--etcd-servers` is the cluster's etcd API, authenticated with the client certificate the
//! operator generated. Namespaces and ConfigMaps are created, listed and watched through it.
//!
//! Where things run: the test bed's pods live in its network namespace, which no IP route joins
//! to the host. The second apiserver runs on the host's loopback, like the test bed's own
//! kubeconfig endpoint, and reaches the gateways through two socat processes joined by a unix
//! socket (as `up.sh` bridges the first apiserver), the inner one dialling the address the
//! Service's EndpointSlice lists for a ready gateway. So the apiserver dials 127.0.0.1, which the
//! server certificate names for `kubectl port-forward`, the way users reach it from outside.
//!
//! Needs `KUBECONFIG`, the images in `KMMR_REPLICA_IMAGE` and `KMMR_OPERATOR_IMAGE` (the replica
//! image with `kmmr-etcd-gateway`), the test bed's network namespace, kube-apiserver in the test
//! bed's cache, socat, nsenter and openssl; `.ci/testbed-test` provides all of them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{
    cluster_or_skip, images_or_skip, loud, poll, run, strict, testbed_netns, tool, unique, Result,
};
use serde_json::{json, Value};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/kmmr");
const RELEASE: &str = "kmmr-etcd-e2e";
const CLUSTER: &str = "hosted";
/// The namespace created through the hosted apiserver.
const TENANT: &str = "tenant-a";

struct Kube {
    kubectl: PathBuf,
    helm: PathBuf,
}

impl Kube {
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        run(&self.kubectl, args, None)
    }
    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&a)?)?)
    }
    fn apply(&self, manifest: &Value) -> Result<String> {
        run(
            &self.kubectl,
            &["apply", "-f", "-"],
            Some(&manifest.to_string()),
        )
    }
}

/// A process stopped when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the test made on the test bed and on this machine, removed even when it fails.
struct Cleanup<'a> {
    kube: &'a Kube,
    namespace: String,
    operator_namespace: String,
    volumes: Vec<String>,
    dir: PathBuf,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let k = |args: &[&str]| {
            let _ = self.kube.kubectl(args);
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Says why the test cannot run here: a loud skip, or a failure where the test bed is promised.
fn skip(test: &str, why: &str) -> Result {
    let msg = format!("{test}: {why}");
    assert!(!strict(), "{msg}");
    loud(&format!("SKIPPED {msg}"));
    Ok(())
}

/// A port the OS reports free on the host's loopback.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A storage class for the replicas' volumes: the default one, or on the test bed (no
/// provisioner) a class of hostPath volumes in `dir` on this machine, which is the node.
fn storage(kube: &Kube, cleanup: &mut Cleanup, dir: &Path) -> Result<Option<String>> {
    let classes = kube.json(&["get", "storageclasses"])?;
    let has_default = classes["items"].as_array().into_iter().flatten().any(|c| {
        c["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    });
    if has_default {
        return Ok(None);
    }
    let class = "kmmr-etcd-e2e-hostpath";
    kube.apply(&json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": { "name": class },
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "WaitForFirstConsumer",
        "reclaimPolicy": "Retain"
    }))?;
    for i in 0..4 {
        let path = dir.join("volumes").join(i.to_string());
        std::fs::create_dir_all(&path)?;
        // The replica runs as 65532; hostPath volumes get no fsGroup treatment.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        let name = format!("{}-{i}", cleanup.namespace);
        kube.apply(&json!({
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
        }))?;
        cleanup.volumes.push(name);
    }
    Ok(Some(class.to_string()))
}

/// Installs the chart with the operator image (adopting a CRD an earlier test installed).
fn install_operator(kube: &Kube, operator_image: &str, operator_namespace: &str) -> Result {
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
        .ok_or("KMMR_OPERATOR_IMAGE has no tag")?;
    run(
        &kube.helm,
        &[
            "upgrade",
            "--install",
            RELEASE,
            CHART,
            "--namespace",
            operator_namespace,
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
    Ok(())
}

/// Writes the Secret's entry to `dir/<file>` (kubectl decodes it).
fn save_entry(
    kube: &Kube,
    namespace: &str,
    secret: &str,
    entry: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let template = format!("{{{{index .data \"{entry}\" | base64decode}}}}");
    let text = kube.kubectl(&[
        "get",
        "secret",
        secret,
        "-n",
        namespace,
        "-o",
        &format!("go-template={template}"),
    ])?;
    if !text.contains("-----BEGIN") {
        return Err(format!("Secret {secret} has no PEM in {entry}").into());
    }
    let path = dir.join(format!("etcd-client-{entry}"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The address of a ready gateway, from the etcd Service's EndpointSlices: proof that the Service
/// selects the gateways and that one of them passes its readiness probe.
fn ready_gateway_address(kube: &Kube, namespace: &str, service: &str) -> Result<Option<String>> {
    let slices = kube.json(&[
        "get",
        "endpointslices",
        "-n",
        namespace,
        "-l",
        &format!("kubernetes.io/service-name={service}"),
    ])?;
    Ok(slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
        .filter(|e| e["conditions"]["ready"] == true)
        .find_map(|e| e["addresses"][0].as_str().map(str::to_owned)))
}

/// The second apiserver's kubectl: `kubectl --kubeconfig <its kubeconfig>`.
struct Hosted {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl Hosted {
    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<String> {
        let mut all = vec![
            "--kubeconfig".to_string(),
            self.kubeconfig.display().to_string(),
            "--request-timeout=30s".to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        all
    }
    fn run(&self, args: &[&str]) -> Result<String> {
        let all = self.args(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run(&self.kubectl, &refs, None)
    }
}

/// Starts the second kube-apiserver with its state on the etcd API at `etcd`, its own serving and
/// admin certificates (made by the test bed's `certs.sh` into `dir/pki`), on a free port.
fn start_apiserver(
    apiserver: &Path,
    dir: &Path,
    etcd: &str,
    client: &[PathBuf; 3],
) -> Result<(KillOnDrop, u16)> {
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed/certs.sh");
    let status = Command::new("bash")
        .arg(&certs)
        .env("KMMR_TESTBED_RUN", dir)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err("e2e/testbed/certs.sh failed".into());
    }
    let pki = dir.join("pki");
    let p = |name: &str| pki.join(name).display().to_string();
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("kube-apiserver.log"))?;
    let [cert, key, ca] = client;
    let child = Command::new(apiserver)
        .args(["--etcd-servers", etcd])
        .arg(format!("--etcd-certfile={}", cert.display()))
        .arg(format!("--etcd-keyfile={}", key.display()))
        .arg(format!("--etcd-cafile={}", ca.display()))
        .args([
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
        ])
        .args(["--secure-port", &port.to_string()])
        .args(["--tls-cert-file", &p("apiserver.crt")])
        .args(["--tls-private-key-file", &p("apiserver.key")])
        .args(["--client-ca-file", &p("ca.crt")])
        .args([
            "--service-account-issuer",
            "https://kubernetes.default.svc.cluster.local",
        ])
        .args(["--service-account-key-file", &p("sa.pub")])
        .args(["--service-account-signing-key-file", &p("sa.key")])
        .args(["--service-cluster-ip-range", "10.97.0.0/16"])
        .args(["--authorization-mode", "RBAC", "--profiling=false", "--v=1"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", apiserver.display()))?;
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: hosted\n  cluster:\n    server: https://127.0.0.1:{port}\n    \
         certificate-authority: {}\nusers:\n- name: admin\n  user:\n    client-certificate: {}\n    \
         client-key: {}\ncontexts:\n- name: hosted\n  context: {{cluster: hosted, user: admin}}\ncurrent-context: hosted\n",
        p("ca.crt"),
        p("admin.crt"),
        p("admin.key")
    );
    std::fs::write(dir.join("kubeconfig"), kubeconfig)?;
    Ok((KillOnDrop(child), port))
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let mut tail: Vec<_> = log.lines().rev().take(30).collect();
    tail.reverse();
    tail.join("\n")
}

/// The watch's lines (`TYPE name value`) as they come, read on a thread of their own.
fn watch_lines(hosted: &Hosted, namespace: &str) -> Result<(KillOnDrop, mpsc::Receiver<String>)> {
    let args = hosted.args(&[
        "-n",
        namespace,
        "get",
        "configmaps",
        "--watch",
        "--output-watch-events",
        "-o",
        "jsonpath={.type} {.object.metadata.name} {.object.data.v}{\"\\n\"}",
    ]);
    let mut child = Command::new(&hosted.kubectl)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout of the watch")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(std::io::Result::ok)
        {
            if tx.send(line.trim().to_owned()).is_err() {
                return;
            }
        }
    });
    Ok((KillOnDrop(child), rx))
}

/// A namespace and ConfigMaps created, listed and watched through the hosted apiserver only.
fn exercise(hosted: &Hosted) -> Result {
    let tenant = TENANT;
    hosted.run(&["create", "namespace", tenant])?;
    hosted.run(&[
        "-n",
        tenant,
        "create",
        "configmap",
        "c0",
        "--from-literal=v=0",
    ])?;
    // The watch first lists what exists: once it printed c0, it is watching, and every change
    // after that must reach it once, in order.
    let (_watch, events) = watch_lines(hosted, tenant)?;
    assert_eq!(
        events.recv_timeout(Duration::from_secs(30)).ok().as_deref(),
        Some("ADDED c0 0"),
        "the watch's initial list"
    );
    hosted.run(&[
        "-n",
        tenant,
        "create",
        "configmap",
        "c1",
        "--from-literal=v=1",
    ])?;
    hosted.run(&[
        "-n",
        tenant,
        "create",
        "configmap",
        "c2",
        "--from-literal=v=2",
    ])?;
    hosted.run(&[
        "-n",
        tenant,
        "patch",
        "configmap",
        "c1",
        "-p",
        r#"{"data":{"v":"3"}}"#,
    ])?;
    hosted.run(&["-n", tenant, "delete", "configmap", "c2"])?;
    let listed = hosted.run(&["-n", tenant, "get", "configmaps", "-o", "name"])?;
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        ["configmap/c0", "configmap/c1"]
    );
    let value = hosted.run(&[
        "-n",
        tenant,
        "get",
        "configmap",
        "c1",
        "-o",
        "jsonpath={.data.v}",
    ])?;
    assert_eq!(value, "3");
    let namespaces = hosted.run(&["get", "namespaces", "-o", "name"])?;
    assert!(
        namespaces.lines().any(|n| n == "namespace/tenant-a"),
        "{namespaces}"
    );

    let expected = ["ADDED c1 1", "ADDED c2 2", "MODIFIED c1 3", "DELETED c2 2"];
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < expected.len() {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    // Once each: nothing more arrives after the last change.
    if let Ok(extra) = events.recv_timeout(Duration::from_secs(3)) {
        seen.push(extra);
    }
    assert_eq!(seen, expected, "every change once, in order");

    Ok(())
}

/// Waits until the cluster is Available with both gateways ready, checks status.etcdAPI and the
/// printer column, and gives the client Secret's name.
async fn wait_for_etcd_api(kube: &Kube, namespace: &str) -> Result<String> {
    // Available, and both gateways ready: status.etcdAPI says where and with which Secrets.
    let c = poll(
        "the BftCluster Available with 2 ready etcd gateways",
        Duration::from_secs(300),
        Duration::from_millis(500),
        || async {
            let c = kube.json(&["get", "bftcluster", CLUSTER, "-n", namespace])?;
            let available = c["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|x| x["type"] == "Available" && x["status"] == "True");
            let ready = c["status"]["etcdAPI"]["readyGateways"] == 2;
            Ok((available && ready).then_some(c))
        },
    )
    .await?;
    let etcd = &c["status"]["etcdAPI"];
    let service = format!("{CLUSTER}-etcd");
    assert_eq!(
        etcd["endpoint"],
        format!("https://{service}.{namespace}.svc:2379")
    );
    assert_eq!(etcd["serviceName"], service);
    assert_eq!(etcd["gateways"], 2);
    let client_secret = etcd["clientSecretName"]
        .as_str()
        .ok_or("status.etcdAPI.clientSecretName")?
        .to_owned();
    // The printer column shows the endpoint.
    let table = kube.kubectl(&["get", "bftcluster", CLUSTER, "-n", namespace])?;
    loud(&format!("kubectl get bftcluster:\n{table}"));
    assert!(
        table.lines().next().is_some_and(|h| h.contains("ETCD")),
        "{table}"
    );
    assert!(
        table.contains(&format!("https://{service}.{namespace}.svc:2379")),
        "{table}"
    );

    Ok(client_secret)
}

#[tokio::test]
async fn a_hosted_kube_apiserver_keeps_its_state_on_a_bftcluster_through_the_etcd_api() -> Result {
    let test = "a_hosted_kube_apiserver_keeps_its_state_on_a_bftcluster_through_the_etcd_api";
    if !cluster_or_skip(test) {
        return Ok(());
    }
    let Some((replica_image, operator_image)) = images_or_skip(
        test,
        ".ci/testbed-test builds and loads them, the replica image with kmmr-etcd-gateway",
    ) else {
        return Ok(());
    };
    let (Some(kubectl), Some(helm)) = (tool("kubectl"), tool("helm")) else {
        return skip(test, "kubectl and helm are needed on PATH");
    };
    let Some(apiserver) = tool("kube-apiserver") else {
        return skip(
            test,
            "kube-apiserver is needed (e2e/testbed/build.sh control-plane builds it)",
        );
    };
    let netns = testbed_netns();
    if !netns.exists() {
        return skip(
            test,
            "the test bed's network namespace is not there: the host cannot reach the gateways \
             (run .ci/testbed-test, or e2e/testbed/up.sh --node)",
        );
    }
    let (Some(socat), Some(nsenter)) = (tool("socat"), tool("nsenter")) else {
        return skip(
            test,
            "socat and nsenter are needed to reach the test bed's pods",
        );
    };
    let kube = Kube { kubectl, helm };
    let namespace = unique("kmmr-etcd");
    let operator_namespace = unique("kmmr-etcd-op");
    let dir = std::env::temp_dir().join(&namespace);
    std::fs::create_dir_all(&dir)?;
    let mut cleanup = Cleanup {
        kube: &kube,
        namespace: namespace.clone(),
        operator_namespace: operator_namespace.clone(),
        volumes: Vec::new(),
        dir: dir.clone(),
    };

    install_operator(&kube, &operator_image, &operator_namespace)?;
    kube.kubectl(&["create", "namespace", &namespace])?;
    let mut storage_spec = json!({ "size": "64Mi" });
    if let Some(class) = storage(&kube, &mut cleanup, &dir)? {
        storage_spec["className"] = json!(class);
    }
    let t_apply = Instant::now();
    kube.apply(&json!({
        "apiVersion": "kmmr.io/v1alpha1",
        "kind": "BftCluster",
        "metadata": { "name": CLUSTER, "namespace": namespace },
        "spec": {
            "replicas": 4,
            "image": replica_image,
            "imagePullPolicy": "IfNotPresent",
            "storage": storage_spec,
            "resources": { "requests": { "cpu": "10m", "memory": "32Mi" } },
            "etcdAPI": { "enabled": true, "replicas": 2 }
        }
    }))?;

    let client_secret = wait_for_etcd_api(&kube, &namespace).await?;
    loud(&format!(
        "MEASURED apply -> Available with 2 ready etcd gateways: {:.1?}",
        t_apply.elapsed()
    ));
    let service = format!("{CLUSTER}-etcd");
    let client = [
        save_entry(&kube, &namespace, &client_secret, "tls.crt", &dir)?,
        save_entry(&kube, &namespace, &client_secret, "tls.key", &dir)?,
        save_entry(&kube, &namespace, &client_secret, "ca.crt", &dir)?,
    ];
    let gateway = poll(
        "a ready gateway in the Service's EndpointSlices",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async { ready_gateway_address(&kube, &namespace, &service) },
    )
    .await?;

    // host 127.0.0.1:<port> -> unix socket -> (test bed's namespace) gateway pod:2379.
    let sock = dir.join("etcd.sock");
    let _inner = KillOnDrop(
        Command::new(&nsenter)
            .arg(format!("--net={}", netns.display()))
            .arg(&socat)
            .arg(format!("UNIX-LISTEN:{},fork,mode=600", sock.display()))
            .arg(format!("TCP:{gateway}:2379"))
            .stderr(Stdio::null())
            .spawn()?,
    );
    let etcd_port = free_port()?;
    let _outer = KillOnDrop(
        Command::new(&socat)
            .arg(format!(
                "TCP-LISTEN:{etcd_port},bind=127.0.0.1,reuseaddr,fork"
            ))
            .arg(format!("UNIX-CONNECT:{}", sock.display()))
            .stderr(Stdio::null())
            .spawn()?,
    );

    let (_apiserver, _port) = start_apiserver(
        &apiserver,
        &dir,
        &format!("https://127.0.0.1:{etcd_port}"),
        &client,
    )?;
    let hosted = Hosted {
        kubectl: kube.kubectl.clone(),
        kubeconfig: dir.join("kubeconfig"),
    };
    let t_start = Instant::now();
    let ready = poll(
        "the hosted kube-apiserver's /readyz",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || async { Ok(hosted.run(&["get", "--raw", "/readyz"]).ok().map(|_| ())) },
    )
    .await;
    if let Err(e) = ready {
        return Err(format!("{e}\n{}", log_tail(&dir.join("kube-apiserver.log"))).into());
    }
    loud(&format!(
        "MEASURED hosted kube-apiserver ready on the etcd API after {:.1?}",
        t_start.elapsed()
    ));

    exercise(&hosted)?;

    // The state is the BftCluster's, not the test bed's own etcd: the first apiserver has no
    // such namespace.
    assert!(
        kube.kubectl(&["get", "namespace", TENANT]).is_err(),
        "{TENANT} must exist only in the hosted apiserver"
    );
    drop(cleanup);
    Ok(())
}
