//! An unmodified kube-apiserver v1.34 keeps its state on a KmMR cluster through the gateway,
//! with one replica corrupting what it sends, and kubectl creates, reads, updates, deletes and
//! watches through it. The binaries are the test bed's (`e2e/testbed/build.sh control-plane`),
//! its certificates come from the test bed's own `certs.sh`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, scratch, testbed_tools, Cluster, GatewayHandle};
use kmmr_byzantine::Behaviour;
use kmmr_etcd_gateway::server::Limits;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let pki = dir.join("pki");
    let b64 = |name: &str| {
        let out = Command::new("base64")
            .arg("-w0")
            .arg(pki.join(name))
            .output()
            .expect("base64");
        String::from_utf8(out.stdout).expect("base64 text")
    };
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kmmr\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    \
         client-key-data: {}\ncontexts:\n- name: kmmr\n  context: {{cluster: kmmr, user: admin}}\ncurrent-context: kmmr\n",
        b64("ca.crt"),
        b64("admin.crt"),
        b64("admin.key")
    );
    let path = dir.join("kubeconfig");
    std::fs::write(&path, text).expect("kubeconfig");
    path
}

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=30s")
            .args(args)
            .output()
            .map_err(|e| format!("kubectl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        self.run(args).unwrap_or_else(|e| panic!("{e}"))
    }
}

#[test]
fn kube_apiserver_keeps_its_state_on_kmmr_with_a_corrupt_replica() {
    let Some([apiserver, kubectl]) = testbed_tools(
        "kube-apiserver on KmMR",
        "kubernetes-v1.34.4/bin",
        ["kube-apiserver", "kubectl"],
        "control-plane",
    ) else {
        return;
    };
    let dir = scratch("apiserver");
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/testbed/certs.sh");
    let status = Command::new("bash")
        .arg(&certs)
        .env("KMMR_TESTBED_RUN", &dir)
        .stdout(Stdio::null())
        .status()
        .expect("certs.sh runs");
    assert!(status.success(), "certs.sh failed");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = Cluster::start("apiserver", 4, &[(2, Behaviour::Corrupt)]);
    let gw = rt.block_on(GatewayHandle::start(&cluster, Limits::default()));

    let port = free_port();
    let pki = dir.join("pki");
    let p = |name: &str| pki.join(name).display().to_string();
    let log = std::fs::File::create(dir.join("kube-apiserver.log")).expect("log");
    let _apiserver = KillOnDrop(
        Command::new(&apiserver)
            .args(["--etcd-servers", &gw.endpoint])
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
            .args(["--service-cluster-ip-range", "10.96.0.0/16"])
            .args(["--authorization-mode", "RBAC", "--profiling=false", "--v=1"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("kube-apiserver starts"),
    );
    let k = Kubectl {
        bin: kubectl.clone(),
        kubeconfig: write_kubeconfig(&dir, &format!("https://127.0.0.1:{port}")),
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        match k.run(&["get", "--raw", "/readyz"]) {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                let log =
                    std::fs::read_to_string(dir.join("kube-apiserver.log")).unwrap_or_default();
                let tail: Vec<_> = log.lines().rev().take(30).collect();
                panic!(
                    "kube-apiserver not ready within 180 s: {e}\n{}",
                    tail.join("\n")
                );
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }

    k.ok(&["create", "namespace", "demo"]);
    // The watch first lists what exists: once it printed the sentinel, it is watching, and every
    // change after that must reach it, in order.
    k.ok(&[
        "-n",
        "demo",
        "create",
        "configmap",
        "c0",
        "--from-literal=s=0",
    ]);
    let mut watch = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(&k.kubeconfig)
        .args(["-n", "demo", "get", "configmaps", "--watch", "-o", "name"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl watch");
    let stdout = watch.stdout.take().expect("watch stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line.trim().to_owned()).is_err() {
                return;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(30));
    assert_eq!(
        first.as_deref(),
        Ok("configmap/c0"),
        "the watch's initial list"
    );
    k.ok(&[
        "-n",
        "demo",
        "create",
        "configmap",
        "c1",
        "--from-literal=a=1",
    ]);
    k.ok(&[
        "-n",
        "demo",
        "create",
        "configmap",
        "c2",
        "--from-literal=b=2",
    ]);
    let before = k.ok(&[
        "-n",
        "demo",
        "get",
        "configmap",
        "c1",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    k.ok(&[
        "-n",
        "demo",
        "patch",
        "configmap",
        "c1",
        "-p",
        r#"{"data":{"a":"3"}}"#,
    ]);
    let after = k.ok(&[
        "-n",
        "demo",
        "get",
        "configmap",
        "c1",
        "-o",
        "jsonpath={.metadata.resourceVersion} {.data.a}",
    ]);
    let (rv, value) = after.split_once(' ').expect("two fields");
    assert_eq!(value, "3");
    assert!(
        rv.parse::<u64>().expect("numeric") > before.parse::<u64>().expect("numeric"),
        "resourceVersion moves forward: {before} -> {rv}"
    );
    // A stale update is refused as a conflict: the apiserver's compare-and-swap on the revision.
    let stale = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"c1","namespace":"demo","resourceVersion":"{before}"}},"data":{{"a":"stale"}}}}"#
    );
    let path = dir.join("stale.json");
    std::fs::write(&path, stale).expect("stale object");
    let refused = k.run(&["replace", "-f", &path.display().to_string()]);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("the object has been modified")),
        "{refused:?}"
    );
    k.ok(&["-n", "demo", "delete", "configmap", "c2"]);
    let names = k.ok(&["-n", "demo", "get", "configmaps", "-o", "name"]);
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        ["configmap/c0", "configmap/c1"]
    );
    // Paged lists use the continue token the apiserver builds from the gateway's range replies.
    let paged = k.ok(&["get", "--raw", "/api/v1/namespaces?limit=2"]);
    assert!(paged.contains("\"continue\""), "{paged}");

    // Added c1, added c2, modified c1, deleted c2.
    let expected = [
        "configmap/c1",
        "configmap/c2",
        "configmap/c1",
        "configmap/c2",
    ];
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while events.len() < expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(event) => events.push(event),
            Err(_) => break,
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(events, expected, "every change, in order");
    let _ = std::fs::remove_dir_all(&dir);
}
