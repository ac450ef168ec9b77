//! A running replica: drives the protocol core with real time, real sockets (`net`) and the
//! key-value service, and serves metrics and status.
//!
//! One task owns the core (it is a plain state machine) and is the only one that touches it:
//! network tasks hand it authenticated frames over a bounded channel, it decodes them, feeds the
//! core, and hands the core's outputs back to the network. No locks on the hot path.

pub mod config;
pub mod metrics;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc, oneshot};

use crate::core::output::{Event, Output};
use crate::core::replica::Replica;
use crate::core::view::View;
use crate::crypto::{Digest, KeyPair};
use crate::net::{
    client_address, ClientListener, ConnId, Inbound, NetConfig, NetStats, PeerNetwork,
};
use crate::service::kv::KvStore;
use crate::service::noop::NoopService;
use crate::service::Service;
use crate::sim::byzantine::{Adversary, Behaviour, Dest, Frame, Position};
use crate::wire::codec::{Decode, Encode};
use crate::wire::ids::{Cid, ReplicaId};
use crate::wire::messages::{ClientId, ReplicaMessage, SignedRequest};

pub use config::{NodeConfig, ProtocolConfig, ViewFile};
pub use metrics::{Metrics, SignedStatus, Status};

/// Inbound events handled per turn before outputs are flushed: batching the flush amortises
/// encoding and syscalls under load without delaying a lone message.
const DRAIN_PER_TURN: usize = 1024;

/// Which service a replica runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ServiceChoice {
    /// The revisioned key-value store.
    #[default]
    Kv,
    /// No-op, for the 0/0 micro-benchmark.
    Noop,
}

/// Wall-clock microseconds that never go backwards within the process: the wall clock at start
/// plus a monotonic elapsed time. Leader timestamps are compared across replicas, so they must
/// be wall-clock based; timers must not jump when NTP steps the clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall_at_start_us: u64,
    start: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            wall_at_start_us: metrics::now_us(),
            start: Instant::now(),
        }
    }

    pub fn now_us(&self) -> u64 {
        self.wall_at_start_us + self.start.elapsed().as_micros() as u64
    }

    pub fn instant_at(&self, us: u64) -> Instant {
        self.start + Duration::from_micros(us.saturating_sub(self.wall_at_start_us))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts a replica and runs it until `shutdown` resolves.
pub async fn run(
    cfg: NodeConfig,
    service: ServiceChoice,
    byzantine: Option<Behaviour>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let key = config::load_key(&cfg.key_file)?;
    let view = ViewFile::load(&cfg.view_file)?;
    let me = ReplicaId(cfg.id);
    let Some(member) = view.members.iter().find(|m| m.id == me) else {
        bail!(
            "id = {} is not a member of the view in {}",
            cfg.id,
            cfg.view_file.display()
        );
    };
    if member.key != key.public() {
        bail!(
            "key_file {} does not hold the key the view lists for replica {}",
            cfg.key_file.display(),
            cfg.id
        );
    }
    let listen = cfg.listen.clone().unwrap_or_else(|| member.address.clone());
    let client_listen = match &cfg.client_listen {
        Some(a) => a.clone(),
        None => client_address(&member.address)?,
    };
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;

    let stats = Arc::new(NetStats::default());
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = mpsc::channel(10_000);
    let peers = PeerNetwork::bind(
        &key,
        me,
        &view,
        &listen,
        NetConfig::default(),
        tx.clone(),
        stats.clone(),
    )
    .await
    .context("starting the replica network")?;
    let clients = ClientListener::bind(
        &key,
        &client_listen,
        NetConfig::default(),
        tx,
        stats.clone(),
    )
    .await
    .context("starting the client listener")?;
    let http = tokio::net::TcpListener::bind(&cfg.http_listen)
        .await
        .with_context(|| format!("http_listen {}", cfg.http_listen))?;
    let (status_tx, status_rx) = mpsc::channel(16);
    tokio::spawn(metrics::serve_http(http, metrics.clone(), status_tx));

    let svc: Box<dyn Service> = match service {
        ServiceChoice::Kv => Box::new(KvStore::new(cfg.protocol.checkpoint_history)),
        ServiceChoice::Noop => Box::new(NoopService::default()),
    };
    if let Some(b) = &byzantine {
        tracing::warn!(
            replica = cfg.id,
            mode = ?b,
            "THIS REPLICA IS BYZANTINE: it deliberately breaks the protocol (test mode)"
        );
    }
    let core = Replica::new(me, key.clone(), view.clone(), cfg.protocol.core(), svc);
    tracing::info!(
        replica = cfg.id,
        %listen,
        %client_listen,
        http = %cfg.http_listen,
        n = view.n(),
        f = view.f,
        "replica started"
    );
    let adversary = byzantine.map(|b| Adversary::new(b, me, key.clone()));
    let mut node = NodeLoop {
        core,
        key,
        view,
        peers: Arc::new(peers),
        clients: Arc::new(clients),
        metrics,
        stats,
        conns: HashMap::new(),
        adversary,
        rng: ChaCha8Rng::seed_from_u64(metrics::now_us()),
        clock: Clock::new(),
        digest_cache: None,
        rejections: HashMap::new(),
    };
    node.run(rx, status_rx, shutdown).await;
    Ok(())
}

struct NodeLoop {
    core: Replica,
    key: KeyPair,
    view: View,
    peers: Arc<PeerNetwork>,
    clients: Arc<ClientListener>,
    metrics: Arc<Metrics>,
    stats: Arc<NetStats>,
    /// The latest connection of each client: where its replies go.
    conns: HashMap<ClientId, ConnId>,
    adversary: Option<Adversary>,
    rng: ChaCha8Rng,
    clock: Clock,
    digest_cache: Option<(Option<Cid>, Digest)>,
    rejections: HashMap<&'static str, u64>,
}

impl NodeLoop {
    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Inbound>,
        mut status_rx: mpsc::Receiver<oneshot::Sender<SignedStatus>>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let deadline = self.core.next_deadline();
            let sleep = tokio::time::sleep_until(
                deadline
                    .map(|d| self.clock.instant_at(d))
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
                    .into(),
            );
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    self.handle(ev);
                    for _ in 0..DRAIN_PER_TURN {
                        match rx.try_recv() {
                            Ok(ev) => self.handle(ev),
                            Err(_) => break,
                        }
                    }
                }
                _ = sleep, if deadline.is_some() => {
                    let now = self.clock.now_us();
                    self.core.on_timeout(now);
                }
                Some(reply) = status_rx.recv() => {
                    let _ = reply.send(self.status());
                }
                _ = tick.tick() => self.refresh_gauges(),
            }
            self.flush();
        }
        tracing::info!(replica = self.core.id().0, "replica stopping");
    }

    fn handle(&mut self, ev: Inbound) {
        let now = self.clock.now_us();
        match ev {
            Inbound::Peer { from, frame } => match ReplicaMessage::from_bytes(&frame) {
                Ok(msg) => self.core.on_message(now, from, msg),
                Err(e) => {
                    self.metrics.reject(e.reason());
                    tracing::info!(%from, error = %e, "undecodable replica frame");
                }
            },
            Inbound::Client {
                conn,
                client,
                frame,
            } => match SignedRequest::from_bytes(&frame) {
                Ok(req) => {
                    self.conns.insert(client, conn);
                    self.core.on_request(now, Some(client), req);
                }
                Err(e) => {
                    self.metrics.reject(e.reason());
                    tracing::info!(?conn, ?client, error = %e, "undecodable client frame");
                }
            },
            Inbound::ClientGone { conn, client } => {
                if self.conns.get(&client) == Some(&conn) {
                    self.conns.remove(&client);
                }
            }
        }
    }

    fn flush(&mut self) {
        for out in self.core.take_outputs() {
            match self.adversary.as_mut() {
                None => self.send_honest(out),
                Some(adv) => {
                    let pos = Position {
                        view: &self.view,
                        regency: self.core.regency(),
                        last_decided: self.core.last_decided(),
                    };
                    let frames = adv.transform(&mut self.rng, out, &pos);
                    for f in frames {
                        self.send_frame(f);
                    }
                }
            }
        }
        for ev in self.core.take_events() {
            self.record(ev);
        }
        self.metrics
            .heartbeat_us
            .store(metrics::now_us(), std::sync::atomic::Ordering::Relaxed);
    }

    fn send_honest(&mut self, out: Output) {
        match out {
            Output::Send { to, msg } => {
                let _ = self.peers.send(to, &msg.to_bytes());
            }
            Output::Broadcast { msg } => {
                self.peers.broadcast(&msg.to_bytes());
            }
            Output::Reply { client, reply } => {
                if let Some(conn) = self.conns.get(&client) {
                    let _ = self.clients.send(*conn, &reply.to_bytes());
                }
            }
            Output::Persist(_)
            | Output::Checkpoint { .. }
            | Output::StateInstalled(_)
            | Output::ViewChanged(_) => {}
        }
    }

    /// A frame from the Byzantine test mode, possibly delayed.
    fn send_frame(&mut self, f: Frame) {
        let conn = match &f.dest {
            Dest::Client(c) => self.conns.get(c).copied(),
            _ => None,
        };
        let peers = self.peers.clone();
        let clients = self.clients.clone();
        let send = move || match f.dest {
            Dest::Replica(to) => {
                let _ = peers.send(to, &f.bytes);
            }
            Dest::AllReplicas => {
                peers.broadcast(&f.bytes);
            }
            Dest::Client(_) => {
                if let Some(conn) = conn {
                    let _ = clients.send(conn, &f.bytes);
                }
            }
            Dest::Nowhere => {}
        };
        if f.extra_delay_us == 0 {
            send();
        } else {
            let delay = Duration::from_micros(f.extra_delay_us);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                send();
            });
        }
    }

    fn record(&mut self, ev: Event) {
        match ev {
            Event::Decided {
                cid,
                requests,
                latency_us,
                ..
            } => {
                self.metrics.decided.inc();
                self.metrics.executed_requests.inc_by(requests as u64);
                self.metrics.batch_size.observe(requests as f64);
                self.metrics.last_decided.set(cid.0 as i64);
                if let Some(l) = latency_us {
                    self.metrics.consensus_latency.observe(l as f64 / 1e6);
                }
            }
            Event::RegencyInstalled { regency, leader } => {
                self.metrics.leader_changes.inc();
                self.metrics.regency.set(regency.0 as i64);
                tracing::info!(
                    regency = regency.0,
                    leader = leader.0,
                    "new regency installed"
                );
            }
            Event::Rejected { from, reason } => {
                self.metrics.reject(reason);
                // Logged, but a flood of one kind must not flood the log: the first of each
                // reason and then every thousandth.
                let n = self.rejections.entry(reason).or_insert(0);
                *n += 1;
                if *n == 1 || *n % 1000 == 0 {
                    tracing::info!(?from, reason, count = *n, "rejected a message");
                }
            }
            Event::Suspected { regency, why } => {
                tracing::warn!(regency = regency.0, why, "asking for a leader change");
            }
            _ => {}
        }
    }

    fn refresh_gauges(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        self.metrics.set_network(
            "peer_in",
            s.peer_bytes_in.load(Relaxed),
            s.peer_frames_in.load(Relaxed),
        );
        self.metrics.set_network(
            "peer_out",
            s.peer_bytes_out.load(Relaxed),
            s.peer_frames_out.load(Relaxed),
        );
        self.metrics.set_network(
            "client_in",
            s.client_bytes_in.load(Relaxed),
            s.client_frames_in.load(Relaxed),
        );
        self.metrics.set_network(
            "client_out",
            s.client_bytes_out.load(Relaxed),
            s.client_frames_out.load(Relaxed),
        );
        for (reason, count) in s.rejected_by_reason() {
            if count > 0 {
                let g = self.metrics.rejected.get_or_create(&metrics::ReasonLabel {
                    reason: format!("net_{}", reason.as_str()),
                });
                let have = g.get();
                if count > have {
                    g.inc_by(count - have);
                }
            }
        }
        self.metrics.view_id.set(self.view.id.0 as i64);
        self.metrics
            .pending_requests
            .set(self.core.pending_requests() as i64);
        self.metrics.heartbeat_us.store(metrics::now_us(), Relaxed);
    }

    fn status(&mut self) -> SignedStatus {
        let last = self.core.last_decided();
        let digest = match self.digest_cache {
            Some((c, d)) if c == last => d,
            _ => {
                let d = self.core.state_digest();
                self.digest_cache = Some((last, d));
                d
            }
        };
        let status = Status {
            id: self.core.id().0,
            view_id: self.view.id.0,
            n: self.view.n(),
            f: self.view.f,
            regency: self.core.regency().0,
            leader: self.core.leader().0,
            synchronizing: self.core.is_synchronizing(),
            last_decided: last.map(|c| c.0),
            state_digest: digest.to_string(),
            pending_requests: self.core.pending_requests(),
            byzantine: self
                .adversary
                .as_ref()
                .map(|a| format!("{:?}", a.behaviour)),
        };
        SignedStatus::sign(status, &self.key)
    }
}
