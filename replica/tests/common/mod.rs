//! The multi-process test harness shared by `replica/tests`: a cluster of real `kmmr-replica`
//! processes on loopback, laid out by `kmmr::cluster` at ports the OS says are free, with the
//! helpers the tests need to start, kill and read them.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kmmr::cluster::{
    http_get, http_port, prepare_at_free_ports, spawn_replica, wait_healthy, ClusterSpec,
};
use kmmr::node::{ProtocolConfig, ServiceChoice};
use kmmr_client::status::{fetch_status, SignedStatus};
use kmmr_client::{Client, ClientOptions};
use kmmr_protocol::crypto::KeyPair;
use kmmr_protocol::view::View;
use kmmr_protocol::wire::ids::ReplicaId;
use tokio::process::Child;

pub const EXE: &str = env!("CARGO_BIN_EXE_kmmr-replica");

/// The client options of most tests: quick retransmission, patient timeout.
pub fn client_options() -> ClientOptions {
    ClientOptions {
        retransmit: Duration::from_millis(300),
        timeout: Duration::from_secs(20),
        redial: Duration::from_millis(200),
        linearizable_unordered_reads: false,
    }
}

pub struct TestCluster {
    pub dir: PathBuf,
    pub base: u16,
    /// The view the cluster was laid out with.
    pub view: View,
    procs: BTreeMap<u32, Child>,
}

impl TestCluster {
    /// Lays out `n` replicas (and ports for `spare` more ids, for replicas that join later) at
    /// free ports, without starting any.
    pub fn lay_out(
        name: &str,
        n: usize,
        spare: usize,
        protocol: ProtocolConfig,
        byzantine: &[u32],
    ) -> TestCluster {
        let dir = std::env::temp_dir().join(format!("kmmr-test-{name}-{}", std::process::id()));
        let mut spec = ClusterSpec {
            n,
            dir: dir.clone(),
            base_port: 0,
            byzantine: byzantine.to_vec(),
            busy_poll_us: kmmr::node::config::DEFAULT_BUSY_POLL_US,
            protocol,
        };
        let view = prepare_at_free_ports(&mut spec, spare).expect("cluster files");
        TestCluster {
            dir,
            base: spec.base_port,
            view,
            procs: BTreeMap::new(),
        }
    }

    /// Lays out `n` replicas, starts them (those in `byzantine` in the given test mode) and
    /// waits until every one is healthy.
    pub async fn start(
        name: &str,
        n: usize,
        protocol: ProtocolConfig,
        byzantine: &[(u32, &str)],
    ) -> TestCluster {
        let ids: Vec<u32> = byzantine.iter().map(|(i, _)| *i).collect();
        let mut c = TestCluster::lay_out(name, n, 0, protocol, &ids);
        for i in 0..n as u32 {
            let mode = byzantine.iter().find(|(b, _)| *b == i).map(|(_, m)| *m);
            c.spawn_mode(i, mode);
        }
        for i in 0..n as u32 {
            c.wait_healthy(i).await;
        }
        c
    }

    pub fn spawn(&mut self, i: u32) {
        self.spawn_mode(i, None);
    }

    pub fn spawn_mode(&mut self, i: u32, byzantine: Option<&str>) {
        let child = spawn_replica(EXE.as_ref(), &self.dir, i, ServiceChoice::Kv, byzantine, 1)
            .expect("replica starts");
        self.procs.insert(i, child);
    }

    /// Starts replica `i` under a descriptor limit (soft and hard) of `nofile`, through prlimit(1),
    /// which then runs the replica in its own process (so `pid` is the replica's).
    pub fn spawn_with_fd_limit(&mut self, i: u32, nofile: u64) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("r{i}.log")))
            .expect("replica log");
        let child = tokio::process::Command::new("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(EXE)
            .args(["--threads", "1", "run", "--config"])
            .arg(self.dir.join(format!("r{i}.toml")))
            .args(["--service", "kv"])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("prlimit runs the replica");
        self.procs.insert(i, child);
    }

    pub async fn wait_healthy(&self, i: u32) {
        if let Err(e) = wait_healthy(self.base, i as usize, Duration::from_secs(20)).await {
            panic!("{e}; its log:\n{}", self.log(i));
        }
    }

    /// SIGKILL: no clean shutdown, no final fsync. The disk stays.
    pub async fn kill(&mut self, i: u32) {
        if let Some(mut c) = self.procs.remove(&i) {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Sends SIGKILL without waiting for the process to go, so that several die at once.
    pub fn start_kill(&mut self, i: u32) {
        if let Some(c) = self.procs.get_mut(&i) {
            let _ = c.start_kill();
        }
    }

    /// Waits for a removed replica's process to stop on its own, with success.
    pub async fn wait_exit(&mut self, id: u32, within: Duration) {
        let Some(mut child) = self.procs.remove(&id) else {
            return;
        };
        match tokio::time::timeout(within, child.wait()).await {
            Ok(Ok(status)) => assert!(status.success(), "replica {id} exited with {status}"),
            Ok(Err(e)) => panic!("waiting for replica {id}: {e}"),
            Err(_) => panic!(
                "removed replica {id} still runs after {within:?}; its log:\n{}",
                self.log(id)
            ),
        }
    }

    /// Waits for replica `id`'s process to stop on its own and returns its exit status (None if
    /// it still runs after `within`; it is then killed).
    pub async fn exit_status(
        &mut self,
        id: u32,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        let mut child = self.procs.remove(&id)?;
        match tokio::time::timeout(within, child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                None
            }
        }
    }

    pub fn data_dir(&self, i: u32) -> PathBuf {
        self.dir.join(format!("data/r{i}"))
    }

    pub async fn client(&self) -> Client {
        self.client_with(client_options()).await
    }

    pub async fn client_with(&self, opts: ClientOptions) -> Client {
        Client::connect(
            KeyPair::generate(&mut rand::rngs::OsRng),
            self.view.clone(),
            opts,
        )
        .await
        .expect("client connects")
    }

    pub fn status_url(&self, i: u32) -> String {
        format!(
            "http://127.0.0.1:{}/status",
            http_port(self.base, i as usize)
        )
    }

    /// Replica `i`'s status, its signature checked against the key `view` lists for it.
    pub async fn status_in(&self, view: &View, i: u32) -> Option<SignedStatus> {
        let s = fetch_status(&self.status_url(i)).await.ok()?;
        let key = view.key(ReplicaId(i))?;
        assert!(s.verify(key), "replica {i} signs its status");
        Some(s)
    }

    /// Replica `i`'s status, checked against the cluster's first view.
    pub async fn status(&self, i: u32) -> Option<SignedStatus> {
        self.status_in(&self.view, i).await
    }

    /// `/metrics` of replica `i` (empty when it does not answer).
    pub async fn metrics_text(&self, i: u32) -> String {
        let url = format!(
            "http://127.0.0.1:{}/metrics",
            http_port(self.base, i as usize)
        );
        http_get(&url).await.unwrap_or_default()
    }

    /// A counter from `/metrics` (0 when absent).
    pub async fn metric(&self, i: u32, name: &str) -> f64 {
        self.metrics_text(i)
            .await
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == name).then(|| v.parse().ok()).flatten()
            })
            .unwrap_or(0.0)
    }

    /// The sum of a counter family's samples whose labels contain `label` (0 when absent).
    pub async fn metric_sum(&self, i: u32, family: &str, label: &str) -> f64 {
        self.metrics_text(i)
            .await
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(label))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// The process id of replica `i`, while this harness runs it.
    pub fn pid(&self, i: u32) -> Option<u32> {
        self.procs.get(&i)?.id()
    }

    /// How many file descriptors replica `i` has open (0 when it is not running).
    pub fn fd_count(&self, i: u32) -> usize {
        self.pid(i)
            .and_then(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
            .map_or(0, |d| d.count())
    }

    /// Whether replica `i`'s process is still running (it has not exited).
    pub fn running(&mut self, i: u32) -> bool {
        self.procs
            .get_mut(&i)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self, i: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("r{i}.log"))).unwrap_or_default()
    }

    /// Every replica reports the same last decided CID and state digest, in signed statuses.
    pub async fn wait_identical(&self, within: Duration) -> (u64, String) {
        let until = Instant::now() + within;
        loop {
            let mut seen = Vec::new();
            for m in &self.view.members {
                if let Some(s) = self.status(m.id.0).await {
                    seen.push((s.status.last_decided, s.status.state_digest.clone()));
                }
            }
            if seen.len() == self.view.n() && seen.windows(2).all(|w| w[0] == w[1]) {
                if let Some((Some(cid), digest)) = seen.pop() {
                    return (cid, digest);
                }
            }
            if Instant::now() > until {
                panic!(
                    "replicas did not converge within {within:?}: {seen:?}\nlast replica's log:\n{}",
                    self.log(self.view.n() as u32 - 1)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.procs.clear();
        // Kept after a failure, for its logs.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Polls `check` every 100 ms until it holds; fails the test after `within`.
pub async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let until = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
