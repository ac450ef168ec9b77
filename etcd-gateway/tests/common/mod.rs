//! What the gateway's tests run against: a KmMR cluster of real replicas (each on its own runtime
//! and thread, talking over loopback sockets, some optionally Byzantine), a gateway serving the
//! etcd API over it, and a real etcd with etcdctl of the same version, built from their Go
//! modules by `e2e/testbed/build.sh etcd`.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmmr::cluster::{prepare_at_free_ports, ClusterSpec};
use kmmr::node::{NodeConfig, ProtocolConfig, ServiceChoice};
use kmmr_byzantine::Behaviour;
use kmmr_client::{Client, ClientOptions};
use kmmr_etcd_gateway::gateway::Gateway;
use kmmr_etcd_gateway::server::{serve, Limits};
use kmmr_protocol::crypto::KeyPair;

/// Prints past libtest's output capture, so that skips show in every run.
pub fn loud(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "\n*** {msg} ***\n");
}

/// Whether this run must not skip for lack of a tool (CI, or the test bed's test command),
/// unless it was told to leave the test bed out (`KMMR_SKIP_TESTBED=1`).
pub fn strict() -> bool {
    let skipping = std::env::var("KMMR_SKIP_TESTBED").is_ok_and(|v| v == "1");
    !skipping && (std::env::var_os("CI").is_some() || std::env::var_os("KMMR_TESTBED").is_some())
}

/// Binaries the test bed builds into its cache (`KMMR_TESTBED_CACHE`, else
/// `~/.cache/kmmr-testbed`), in `subdir`, as `target` of `e2e/testbed/build.sh` makes them. None,
/// said loudly, when one is missing and the run may skip.
pub fn testbed_tools<const N: usize>(
    test: &str,
    subdir: &str,
    names: [&str; N],
    target: &str,
) -> Option<[PathBuf; N]> {
    let cache = std::env::var_os("KMMR_TESTBED_CACHE")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from(std::env::var_os("HOME")?).join(".cache/kmmr-testbed")));
    let dir = cache.unwrap_or_default().join(subdir);
    let paths = names.map(|n| dir.join(n));
    if paths.iter().all(|p| p.is_file()) {
        return Some(paths);
    }
    let msg = format!(
        "{test}: {} not all in {}; build them with `e2e/testbed/build.sh {target}`",
        names.join(", "),
        dir.display()
    );
    assert!(!strict(), "{msg}");
    loud(&format!("SKIPPED {msg}"));
    None
}

/// etcd and etcdctl v3.6.16.
pub fn etcd_tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    let [etcd, etcdctl] = testbed_tools(test, "etcd-v3.6.16/bin", ["etcd", "etcdctl"], "etcd")?;
    Some((etcd, etcdctl))
}

/// A fresh directory under the system's temporary directory.
pub fn scratch(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("kmmr-gw-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// A port the OS says is free now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A replica running on its own thread and runtime until the cluster is dropped.
struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct Cluster {
    pub dir: PathBuf,
    replicas: Vec<Running>,
}

impl Cluster {
    /// `n` replicas; those named in `byzantine` run that behaviour.
    pub fn start(name: &str, n: usize, byzantine: &[(u32, Behaviour)]) -> Cluster {
        // RUST_LOG=info shows the replicas' and the gateway's logs beside a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .with_thread_names(true)
            .try_init();
        let dir = scratch(name);
        let mut spec = ClusterSpec {
            n,
            dir: dir.clone(),
            base_port: 0,
            byzantine: byzantine.iter().map(|(i, _)| *i).collect(),
            protocol: ProtocolConfig::default(),
            busy_poll_us: 0,
        };
        prepare_at_free_ports(&mut spec, 0).expect("cluster laid out");
        let mut replicas = Vec::new();
        for i in 0..n as u32 {
            let cfg = NodeConfig::load(&dir.join(format!("r{i}.toml"))).expect("config");
            let behaviour = byzantine
                .iter()
                .find(|(b, _)| *b == i)
                .map(|(_, m)| m.clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            // Named, so that RUST_LOG's lines say which replica wrote them.
            let name = format!("replica-{i}");
            let thread = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(1)
                        .thread_name(name)
                        .enable_all()
                        .build()
                        .expect("runtime");
                    let shutdown = async {
                        let _ = stopped.await;
                    };
                    if let Err(e) =
                        rt.block_on(kmmr::node::run(cfg, ServiceChoice::Kv, behaviour, shutdown))
                    {
                        eprintln!("replica {i} stopped: {e:#}");
                    }
                });
            let thread = thread.expect("a replica thread");
            replicas.push(Running {
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Cluster { dir, replicas }
    }

    /// Stops replica `i` (and waits for it to end).
    pub fn stop(&mut self, i: usize) {
        if let Some(r) = self.replicas.get_mut(i) {
            drop(std::mem::replace(
                r,
                Running {
                    stop: None,
                    thread: None,
                },
            ));
        }
    }

    /// A client of its own: replicas serve only the newest session of a key, so two running
    /// clients never share one.
    pub async fn client(&self) -> Client {
        let view = kmmr_client::files::ViewFile::load(&self.dir.join("view.toml")).expect("view");
        let key = KeyPair::generate(&mut rand::rngs::OsRng);
        let opts = ClientOptions {
            linearizable_unordered_reads: true,
            ..ClientOptions::default()
        };
        Client::connect(key, view, opts).await.expect("client")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.replicas.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A gateway serving the etcd API over `cluster` on a free loopback port, in this process.
pub struct GatewayHandle {
    pub endpoint: String,
    pub gateway: Arc<Gateway>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl GatewayHandle {
    pub async fn start(cluster: &Cluster, limits: Limits) -> GatewayHandle {
        let client = cluster.client().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listener");
        let endpoint = format!("http://{}", listener.local_addr().expect("address"));
        let gateway = Gateway::new(client, endpoint.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let g = gateway.clone();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = serve(g, listener, None, limits, shutdown).await {
                eprintln!("gateway stopped: {e:#}");
            }
        });
        GatewayHandle {
            endpoint,
            gateway,
            stop: Some(stop),
        }
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A real etcd on free loopback ports, in a fresh data directory, with fsync as shipped.
pub struct Etcd {
    pub endpoint: String,
    child: Child,
    dir: PathBuf,
}

impl Etcd {
    /// Starts etcd and waits until `etcdctl endpoint health` succeeds, before the test binds
    /// anything else: the ports are free when picked but only etcd's once it binds them, and a
    /// replica binding port 0 meanwhile can take one. An etcd that exits (a port taken) is
    /// started again on new ports, up to three times; a failure shows the end of its log.
    pub fn start_healthy(bin: &Path, ctl: &Path, within: Duration) -> Etcd {
        let deadline = Instant::now() + within;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut etcd = Etcd::start(bin);
            loop {
                let o = etcdctl(
                    ctl,
                    &etcd.endpoint,
                    &["endpoint".into(), "health".into()],
                    None,
                );
                if o.code == 0 {
                    return etcd;
                }
                let exited = matches!(etcd.child.try_wait(), Ok(Some(_)));
                if exited && attempts < 3 {
                    break;
                }
                assert!(
                    !exited && Instant::now() < deadline,
                    "etcd at {} not healthy within {within:?} (attempt {attempts}, exited: \
                     {exited}): {o:?}; its log ends:\n{}",
                    etcd.endpoint,
                    etcd.log_tail()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn start(bin: &Path) -> Etcd {
        let dir = scratch("etcd");
        let client = free_port();
        let peer = free_port();
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.join("etcd.log")).expect("etcd log");
        let child = Command::new(bin)
            .arg("--name=kmmr-compare")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=kmmr-compare={peer_url}"))
            .arg("--listen-metrics-urls=")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        Etcd {
            endpoint,
            child,
            dir,
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one etcdctl run printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    /// The `Error: ...` line etcdctl prints on failure (its log lines are left out: they carry
    /// times and addresses).
    pub error: String,
}

impl Outcome {
    pub fn of(out: std::process::Output) -> Outcome {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Outcome {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            error: stderr
                .lines()
                .filter(|l| l.starts_with("Error:"))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

pub fn etcdctl(bin: &Path, endpoint: &str, args: &[String], stdin: Option<&[u8]>) -> Outcome {
    let mut child = Command::new(bin)
        .arg(format!("--endpoints={endpoint}"))
        .arg("--command-timeout=20s")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl starts");
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input).expect("etcdctl stdin");
    }
    Outcome::of(child.wait_with_output().expect("etcdctl runs"))
}

/// Polls until `etcdctl endpoint health` succeeds.
pub fn wait_healthy(bin: &Path, endpoint: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let o = etcdctl(bin, endpoint, &["endpoint".into(), "health".into()], None);
        if o.code == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{endpoint} not healthy within {within:?}: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A request that creates a watch of `[key, range_end)` from `start` (0: from now).
pub fn watch_create(
    key: &str,
    range_end: &str,
    start: i64,
    prev_kv: bool,
) -> kmmr_etcd_gateway::pb::WatchRequest {
    use kmmr_etcd_gateway::pb;
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: key.into(),
                range_end: range_end.into(),
                start_revision: start,
                prev_kv,
                ..Default::default()
            },
        )),
    }
}
