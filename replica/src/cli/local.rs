//! `kmmr-replica local`: an n-replica cluster on loopback, each replica its own process with its
//! own generated key, some of them optionally Byzantine; and a checked workload against it.

use super::out::outln;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use tokio::process::Child;

use kmmr_client::{Client, ClientOptions};
use kmmr_linearizability::{self as linearizability, CheckResult, Operation};
use kmmr_protocol::crypto::KeyPair;
use kmmr_protocol::service::kv::KvRequest;
use kmmr_protocol::view::View;

use kmmr::cluster::{http_port, prepare, spawn_replica, wait_healthy, ClusterSpec};
use kmmr::node::ProtocolConfig;
use kmmr_client::status::fetch_status;

use super::{ByzantineMode, ServiceArg};

#[derive(Args, Debug, Clone)]
pub struct LocalArgs {
    /// Replicas (n >= 3f+1 with f = floor((n-1)/3)).
    #[arg(long, default_value_t = 4)]
    pub n: usize,
    /// Directory for keys, configs, logs and data. An earlier local cluster's directory is
    /// replaced, unless that cluster is still running; any other non-empty directory is refused.
    #[arg(long, env = "KMMR_CLUSTER", default_value = "kmmr-local")]
    pub dir: PathBuf,
    /// Replica i listens on base-port+i, its clients on base-port+1000+i, HTTP on +2000+i.
    #[arg(long, default_value_t = 17000)]
    pub base_port: u16,
    /// How many replicas run a Byzantine test mode: replicas 0, 1, ... (replica 0 leads first).
    #[arg(long, default_value_t = 0)]
    pub byzantine: usize,
    #[arg(long, value_enum, default_value = "equivocate")]
    pub byzantine_mode: ByzantineMode,
    #[arg(long, value_enum, default_value = "kv")]
    pub service: ServiceArg,
    /// Run a workload of this many key-value operations from 4 concurrent clients, check every
    /// result (linearizability, replica agreement) and print what happened.
    #[arg(long)]
    pub workload: Option<usize>,
    /// Keep the cluster running until interrupted (otherwise it stops after the workload).
    #[arg(long)]
    pub keep_running: bool,
    /// Request timeout of the replicas, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub request_timeout_ms: u64,
    /// Runtime worker threads per replica process.
    #[arg(long, default_value_t = 1)]
    pub replica_threads: usize,
    /// Write nothing to disk and never wait for it (replicas recover by state transfer only).
    #[arg(long)]
    pub no_durable: bool,
    /// A checkpoint every this many consensus instances.
    #[arg(long, default_value_t = ProtocolConfig::default().checkpoint_period)]
    pub checkpoint_period: u64,
    /// Rotate a leader that is slow but not silent only once a request waited this long (and
    /// eight times the recent baseline).
    #[arg(long, default_value_t = ProtocolConfig::default().slow_leader_floor_ms)]
    pub slow_leader_floor_ms: u64,
    /// Never rotate a leader for slowness alone (only the request timeout does).
    #[arg(long)]
    pub no_slow_leader: bool,
    /// How long to wait for the last ACCEPTs once a quorum arrived, in microseconds (all n
    /// need no signature check to decide; 0 checks every ACCEPT on arrival).
    #[arg(long, default_value_t = ProtocolConfig::default().accept_grace_us)]
    pub accept_grace_us: u64,
    /// After network input, how long a replica polls for more before it sleeps, in
    /// microseconds (0: never; at most 10000).
    #[arg(long, default_value_t = kmmr::node::config::DEFAULT_BUSY_POLL_US)]
    pub busy_poll_us: u64,
    /// Start every replica from this backup (`kmmr-replica snapshot save`), a file or
    /// s3://BUCKET/KEY: the new cluster holds its keys, values and revisions. The backup is
    /// verified before anything is written.
    #[arg(long, value_name = "BACKUP")]
    pub from_snapshot: Option<super::snapshot_s3::Location>,
    #[command(flatten)]
    pub s3: super::snapshot_s3::S3Args,
}

/// A running local cluster; its processes die with it (kill on drop).
pub struct LocalCluster {
    pub view: View,
    pub _children: BTreeMap<u32, Child>,
    pub byzantine: Vec<u32>,
}

impl LocalCluster {
    /// Kills every replica and waits until each has exited: dropping the children only sends
    /// the signal, and a cluster started right after on the same ports would race the dying
    /// processes for them ("address already in use").
    pub async fn stop(mut self) {
        for (i, child) in self._children.iter_mut() {
            let _ = child.start_kill();
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                eprintln!("replica {i} did not exit within 10 s of SIGKILL");
            }
        }
    }
}

impl LocalCluster {
    /// Waits for replicas that exit (a replica removed from the view stops by itself) and says
    /// so: a child nobody waits for would stay a zombie process until the cluster stops.
    async fn reap_forever(&mut self) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let exited: Vec<(u32, String)> = self
                ._children
                .iter_mut()
                .filter_map(|(id, c)| match c.try_wait() {
                    Ok(Some(status)) => Some((*id, status.to_string())),
                    Ok(None) => None,
                    Err(e) => Some((*id, e.to_string())),
                })
                .collect();
            for (id, status) in exited {
                self._children.remove(&id);
                eprintln!("replica {id} exited ({status})");
            }
        }
    }
}

pub async fn start(args: &LocalArgs) -> Result<LocalCluster> {
    let byzantine: Vec<u32> = (0..args.byzantine as u32).collect();
    // Verified before the directory is touched: a bad backup leaves everything as it was.
    let initial = match &args.from_snapshot {
        Some(file) if args.service != ServiceArg::Kv => bail!(
            "--from-snapshot {file} holds key-value state: it cannot start a --service noop cluster"
        ),
        Some(file) => Some(super::snapshot::read_location(file, &args.s3).await?),
        None => None,
    };
    let view = prepare(&ClusterSpec {
        n: args.n,
        dir: args.dir.clone(),
        base_port: args.base_port,
        byzantine: byzantine.clone(),
        busy_poll_us: args.busy_poll_us,
        protocol: ProtocolConfig {
            request_timeout_ms: args.request_timeout_ms,
            checkpoint_period: args.checkpoint_period,
            durable: !args.no_durable,
            slow_leader: !args.no_slow_leader,
            slow_leader_floor_ms: args.slow_leader_floor_ms,
            accept_grace_us: args.accept_grace_us,
            ..ProtocolConfig::default()
        },
    })?;
    if let Some(b) = &initial {
        // The verified bytes, not the file again: it could have changed since it was read.
        kmmr::cluster::set_initial_state(&args.dir, args.n, &b.encode())?;
    }
    let exe = std::env::current_exe().context("locating kmmr-replica")?;
    // Start-up takes a second or more: say what is happening meanwhile.
    eprintln!(
        "starting {} replicas (files and logs in {})",
        args.n,
        args.dir.display()
    );
    let mut children = BTreeMap::new();
    for i in 0..args.n as u32 {
        let mode = byzantine.contains(&i).then_some(args.byzantine_mode.name());
        children.insert(
            i,
            spawn_replica(
                &exe,
                &args.dir,
                i,
                args.service.into(),
                mode,
                args.replica_threads,
            )?,
        );
    }
    for (i, member) in view.members.iter().enumerate() {
        if let Some(c) = children.get_mut(&(i as u32)) {
            wait_started(args.base_port, i, c, &args.dir).await?;
        }
        // Whatever answers on the port must be this replica, not one left over from another
        // cluster on the same ports: its status is signed with the key just generated for it.
        let url = format!("http://127.0.0.1:{}/status", http_port(args.base_port, i));
        let ours = fetch_status(&url)
            .await
            .is_ok_and(|s| s.verify(&member.key));
        let exited = match children.get_mut(&(i as u32)) {
            Some(c) => c.try_wait()?.is_some(),
            None => true,
        };
        if exited || !ours {
            bail!(
                "replica {i} did not start: {}; see {}",
                if exited {
                    "it exited"
                } else {
                    "another process answers on its status port"
                },
                args.dir.join(format!("r{i}.log")).display()
            );
        }
    }
    Ok(LocalCluster {
        view,
        _children: children,
        byzantine,
    })
}

/// Waits until replica `i` answers on its HTTP port. A replica that exits first (a port taken
/// by another program between the check and its bind, say) fails the start at once with the
/// last line of its log, instead of after the 15 s a slow machine may need.
async fn wait_started(
    base_port: u16,
    i: usize,
    child: &mut Child,
    dir: &std::path::Path,
) -> Result<()> {
    let log = dir.join(format!("r{i}.log"));
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        if wait_healthy(base_port, i, Duration::from_millis(200))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            bail!(
                "replica {i} exited ({status}) before it was up: {last}; see {}",
                log.display()
            );
        }
        if Instant::now() > until {
            bail!(
                "replica {i} did not become healthy within 15s; see {}",
                log.display()
            );
        }
    }
}

pub async fn run(args: LocalArgs) -> Result<()> {
    let mut cluster = start(&args).await?;
    outln!(
        "local cluster: n = {}, f = {}, replicas on 127.0.0.1:{}..{}, files in {}",
        cluster.view.n(),
        cluster.view.f,
        args.base_port,
        args.base_port + args.n as u16 - 1,
        args.dir.display()
    );
    if let Some(file) = &args.from_snapshot {
        outln!("every replica started from the backup {file}");
    }
    for b in &cluster.byzantine {
        outln!(
            "replica {b} is BYZANTINE ({}): it misbehaves on purpose",
            args.byzantine_mode.name()
        );
    }
    let mut ok = true;
    if let Some(ops) = args.workload {
        ok = workload(&args, &cluster, ops).await?;
    }
    if args.keep_running {
        let dir = std::path::absolute(&args.dir).unwrap_or_else(|_| args.dir.clone());
        outln!(
            "running (Ctrl-C stops). From any shell: export KMMR_CLUSTER={}; then try: \
             kmmr-replica put k v",
            dir.display()
        );
        tokio::select! {
            _ = super::interrupted() => {}
            _ = cluster.reap_forever() => {}
        }
    }
    cluster.stop().await;
    if !ok {
        bail!("the workload found a problem (see above)");
    }
    Ok(())
}

/// Runs `ops` operations from 4 concurrent clients and checks them.
pub async fn workload(args: &LocalArgs, cluster: &LocalCluster, ops: usize) -> Result<bool> {
    const CLIENTS: usize = 4;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let key = KeyPair::generate(&mut rand::rngs::OsRng);
        let client = Client::connect(key, cluster.view.clone(), ClientOptions::default()).await?;
        let n_ops = ops / CLIENTS + usize::from(c < ops % CLIENTS);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c as u64);
            let mut history = Vec::new();
            let mut latencies = Vec::new();
            let mut failures = 0usize;
            for i in 0..n_ops {
                let key = format!("wl/k{}", rng.gen_range(0..8)).into_bytes();
                let value = format!("c{c}-{i}").into_bytes();
                let req = match rng.gen_range(0..10) {
                    0..=3 => KvRequest::put(key, value),
                    4..=6 => KvRequest::get(key),
                    7 => KvRequest::delete(key),
                    _ => KvRequest::cas(key, None, value),
                };
                let invoke = t0.elapsed().as_micros() as u64;
                let resp = client.kv(&req).await;
                let complete = t0.elapsed().as_micros() as u64;
                match resp {
                    Ok(r) => {
                        latencies.push(complete - invoke);
                        history.push(Operation {
                            client: c as u64,
                            invoke,
                            complete: Some(complete),
                            request: req,
                            response: Some(r),
                        });
                    }
                    Err(_) => {
                        failures += 1;
                        history.push(Operation {
                            client: c as u64,
                            invoke,
                            complete: None,
                            request: req,
                            response: None,
                        });
                    }
                }
            }
            (history, latencies, failures)
        }));
    }
    let mut history = Vec::new();
    let mut latencies = Vec::new();
    let mut failures = 0;
    for t in tasks {
        let (h, l, f) = t.await?;
        history.extend(h);
        latencies.extend(l);
        failures += f;
    }
    let secs = t0.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let p = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    outln!(
        "workload: {} of {} operations completed in {:.2} s from {} clients ({:.0} ops/s); latency p50 {} us, p99 {} us",
        latencies.len(),
        ops,
        secs,
        CLIENTS,
        latencies.len() as f64 / secs,
        p(0.5),
        p(0.99)
    );
    let mut ok = failures == 0;
    if failures > 0 {
        outln!("FAIL: {failures} operations got no agreed reply");
    }
    match linearizability::check(&history) {
        CheckResult::Linearizable => {
            outln!("linearizability: every result is consistent with one total order")
        }
        other => {
            ok = false;
            outln!("FAIL: linearizability: {other:?}");
        }
    }
    ok &= check_replicas(args, cluster).await?;
    Ok(ok)
}

/// Correct replicas must report the same state digest once their digests are of the same
/// instance.
pub async fn check_replicas(args: &LocalArgs, cluster: &LocalCluster) -> Result<bool> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let mut statuses = BTreeMap::new();
        for m in &cluster.view.members {
            let url = format!(
                "http://127.0.0.1:{}/status",
                http_port(args.base_port, m.id.0 as usize)
            );
            if let Ok(s) = fetch_status(&url).await {
                statuses.insert(m.id.0, (s.verify(&m.key), s));
            }
        }
        let correct: Vec<_> = statuses
            .iter()
            .filter(|(id, _)| !cluster.byzantine.contains(id))
            .collect();
        let same_cid = correct
            .windows(2)
            .all(|w| w[0].1 .1.status.digest_cid() == w[1].1 .1.status.digest_cid());
        if (same_cid && correct.len() == cluster.view.n() - cluster.byzantine.len())
            || Instant::now() > until
        {
            for (id, (sig_ok, s)) in &statuses {
                outln!(
                    "replica {id}: {}regency {}, leader {}, last decided {:?}, state {}{}",
                    if *sig_ok {
                        ""
                    } else {
                        "BAD STATUS SIGNATURE, "
                    },
                    s.status.regency,
                    s.status.leader,
                    s.status.last_decided,
                    s.status.state_digest_label(),
                    if cluster.byzantine.contains(id) {
                        " (Byzantine)"
                    } else {
                        ""
                    }
                );
            }
            let digests: std::collections::BTreeSet<_> = correct
                .iter()
                .map(|(_, (_, s))| s.status.state_digest.clone())
                .collect();
            let agree = same_cid && digests.len() == 1 && correct.iter().all(|(_, (ok, _))| *ok);
            if agree {
                outln!(
                    "agreement: the {} correct replicas hold byte-identical state",
                    correct.len()
                );
            } else {
                outln!("FAIL: correct replicas disagree or lag: {statuses:?}");
            }
            return Ok(agree);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
