//! A running replica: drives the protocol core with real time, real sockets (`net`) and the
//! key-value service, and serves metrics and status.
//!
//! One task owns the core (it is a plain state machine) and is the only one that touches it:
//! network tasks hand it authenticated frames over a bounded channel, it decodes them, feeds the
//! core, and hands the core's outputs back to the network. No locks on the hot path.
//!
//! With durability on (`protocol.durable`), decisions, checkpoints and views go to the storage
//! threads (`durability`), and every vote is promised to disk before it is sent (see `local`):
//! a value is decided only once a quorum holds it durably, so a client that saw an answer can
//! count on it surviving a crash of every replica. Replies still wait for the log
//! (`Replica::log_durable`): a replica's reply counts in its client's quorum, and one that came
//! back from a crash without the decision behind it would break that quorum's promise to the
//! client's later unordered reads.
//!
//! The one write the loop does itself is the promise (`storage::promise`): a vote must be on
//! disk before the message that casts it leaves, and the messages behind it wait anyway, so
//! handing it to a thread would only add a wake-up to every instance.

mod accuse;
pub mod config;
mod contention;
mod digest;
pub mod durability;
mod encoder;
mod fds;
mod pause;
pub use kmmr_net::http;
pub mod metrics;
mod poll;
mod promised;
mod report;
mod snapshot;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc, watch};

use crate::storage::promise::PromiseFile;
use kmmr_byzantine::{Adversary, Behaviour, Dest, Frame, Position};
use kmmr_client::clock::{now_us, Clock};
use kmmr_client::files::{load_key, ViewFile};
use kmmr_net::{
    client_address, ClientListener, ConnId, Inbound, NetStats, PeerNetwork, PeerProtocol,
};
use kmmr_protocol::core::output::{Event, Output};
use kmmr_protocol::core::promise::MAX_PROMISED_DECISIONS;
use kmmr_protocol::core::replica::{FromDisk, Replica};
use kmmr_protocol::core::state::EncodedCheckpoint;
use kmmr_protocol::crypto::KeyPair;
use kmmr_protocol::service::kv::KvStore;
use kmmr_protocol::service::noop::NoopService;
use kmmr_protocol::service::Service;
use kmmr_protocol::view::View;
use kmmr_protocol::wire::codec::{Decode, Encode};
use kmmr_protocol::wire::ids::{Cid, ReplicaId};
use kmmr_protocol::wire::messages::{ClientId, ReplicaMessage, SignedRequest};

use durability::{Durability, Stored};

pub use config::{NodeConfig, ProtocolConfig};
pub use metrics::Metrics;

/// How long replicas removed from the view stay connected to catch up on their removal.
const REMOVED_GRACE: Duration = Duration::from_secs(30);

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

/// Starts a replica and runs it until `shutdown` resolves.
pub async fn run(
    cfg: NodeConfig,
    service: ServiceChoice,
    byzantine: Option<Behaviour>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let key = load_key(&cfg.key_file)?;
    let view = ViewFile::load(&cfg.view_file)?;
    let me = ReplicaId(cfg.id);
    let configured_address = own_address(&cfg, &view, &key)?;
    let client_listen = match &cfg.client_listen {
        Some(a) => a.clone(),
        None => client_address(&configured_address)?,
    };
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    let Started {
        core,
        durability,
        promises,
        recovered_until,
        failures_rx,
        stored_rx,
    } = start_core(&cfg, me, &key, view, service)?;
    let view = core.view().clone();
    if !view.contains(me) {
        tracing::warn!(
            replica = cfg.id,
            view = view.id.0,
            "this replica was removed from the view before it stopped; it stays stopped"
        );
        if let Some(d) = durability {
            d.close();
        }
        return Ok(());
    }
    // A recovered view may have moved this replica.
    let listen = match &cfg.listen {
        Some(l) => l.clone(),
        None => view
            .members
            .iter()
            .find(|m| m.id == me)
            .map_or(configured_address, |m| m.address.clone()),
    };

    let stats = Arc::new(NetStats::default());
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = mpsc::channel(10_000);
    let fd_limit = fds::raise_limit();
    let mut budget = fds::budget(fd_limit, view.n());
    budget.peers.peer_protocol = cfg.peer_protocol()?;
    tracing::info!(
        fd_limit,
        listeners = budget.listeners,
        "descriptors for listeners"
    );
    let peers = PeerNetwork::bind(
        &key,
        me,
        &view,
        &listen,
        budget.peers,
        tx.clone(),
        stats.clone(),
    )
    .await
    .context("starting the replica network")?;
    let clients = ClientListener::bind(&key, &client_listen, budget.clients, tx, stats.clone())
        .await
        .context("starting the client listener")?;
    let http = tokio::net::TcpListener::bind(&cfg.http_listen)
        .await
        .with_context(|| format!("http_listen {}", cfg.http_listen))?;
    let http_asks = metrics::spawn_http(http, metrics.clone(), budget.http);

    if let Some(b) = &byzantine {
        tracing::warn!(
            replica = cfg.id,
            mode = ?b,
            "THIS REPLICA IS BYZANTINE: it deliberately breaks the protocol (test mode)"
        );
    }
    tracing::info!(
        replica = cfg.id,
        %listen,
        %client_listen,
        http = %cfg.http_listen,
        n = view.n(),
        f = view.f,
        view = view.id.0,
        last_decided = ?core.last_decided().map(|c| c.0),
        checkpoint = ?core.latest_checkpoint().map(|c| c.cid.0),
        durable = cfg.protocol.durable,
        "replica started"
    );
    let adversary = byzantine.map(|b| Adversary::new(b, me, key.clone()));
    let (encoder, encoded_rx) =
        encoder::Encoder::start().context("starting the checkpoint encoder thread")?;
    let mut node = NodeLoop {
        core,
        encoder,
        key,
        view,
        peers: Arc::new(peers),
        clients: Arc::new(clients),
        metrics,
        stats,
        conns: HashMap::new(),
        adversary,
        rng: ChaCha8Rng::seed_from_u64(now_us()),
        clock: Clock::new(),
        status_digest: digest::StatusDigest::default(),
        contention: contention::Contention::new(),
        pauses: pause::Pauses::watch(),
        rejections: HashMap::new(),
        accusations: accuse::Accusations::default(),
        durability,
        promises,
        recovered_until,
        fatal: None,
        removed: false,
        removed_grace_until: None,
        busy_poll: Duration::from_micros(cfg.busy_poll_us),
    };
    let result = node
        .run(rx, http_asks, failures_rx, stored_rx, encoded_rx, shutdown)
        .await;
    if let Some(d) = node.durability.take() {
        // Blocks for the final fsync; the loop is over, nothing else waits on this thread.
        d.close();
    }
    if node.removed {
        // The replies just handed to the client connections need a moment to be written out.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    result
}

/// The address the view lists for this replica, once the view is known to list it with the key
/// in `key_file`.
fn own_address(cfg: &NodeConfig, view: &View, key: &KeyPair) -> Result<String> {
    let Some(member) = view.members.iter().find(|m| m.id == ReplicaId(cfg.id)) else {
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
    Ok(member.address.clone())
}

/// The core, recovered from the data directory when durability is on, and the durable side
/// that the loop drives.
struct Started {
    core: Replica,
    durability: Option<Durability>,
    promises: Option<PromiseFile>,
    /// The last CID the log held at start-up.
    recovered_until: Option<Cid>,
    failures_rx: mpsc::UnboundedReceiver<String>,
    stored_rx: mpsc::UnboundedReceiver<Stored>,
}

fn start_core(
    cfg: &NodeConfig,
    me: ReplicaId,
    key: &KeyPair,
    view: View,
    service: ServiceChoice,
) -> Result<Started> {
    let mut svc: Box<dyn Service> = match service {
        ServiceChoice::Kv => Box::new(KvStore::new(cfg.protocol.checkpoint_history)),
        ServiceChoice::Noop => Box::new(NoopService::default()),
    };
    if let Some(path) = &cfg.initial_state {
        // Before recovery: decisions replayed from CID 0 apply to this state; a recovered
        // checkpoint replaces it.
        snapshot::start_from(path, service, svc.as_mut())?;
    }
    let (failures_tx, failures_rx) = mpsc::unbounded_channel();
    let (stored_tx, stored_rx) = mpsc::unbounded_channel();
    if cfg.protocol.durable {
        let (d, recovered) = Durability::open(&cfg.data_dir, failures_tx, stored_tx)?;
        let next = recovered.next_cid();
        let recovered_until = (next > Cid(0)).then(|| Cid(next.0 - 1));
        let mut opened = promised::open_promise(cfg)?;
        let core = recover(me, key, view, cfg, svc, recovered, &mut opened)?;
        return Ok(Started {
            core,
            durability: Some(d),
            promises: Some(opened.file),
            recovered_until,
            failures_rx,
            stored_rx,
        });
    }
    tracing::warn!(
        replica = cfg.id,
        "durability is off (protocol.durable = false): nothing is written to disk, and a \
         restarted replica recovers its state from the others"
    );
    Ok(Started {
        core: Replica::new(me, key.clone(), view, cfg.protocol.core(), svc),
        durability: None,
        promises: None,
        recovered_until: None,
        failures_rx,
        stored_rx,
    })
}

/// Rebuilds the replica from what its storage recovered, and says what recovery repaired.
fn recover(
    me: ReplicaId,
    key: &KeyPair,
    configured: View,
    cfg: &NodeConfig,
    service: Box<dyn Service>,
    recovered: crate::storage::Recovered,
    opened: &mut promised::Opened,
) -> Result<Replica> {
    let report = &recovered.report;
    if let Some(d) = &report.log_damage {
        tracing::warn!(damage = ?d, "recovery: the log was damaged and cut at the damage");
    }
    for r in &report.rejected_checkpoints {
        tracing::warn!(path = %r.path.display(), reason = %r.reason, "recovery: skipped a damaged checkpoint");
    }
    if let Some(e) = &report.view_error {
        tracing::warn!(error = %e, "recovery: the stored view is damaged; using the configured one");
    }
    if !report.removed_temp_files.is_empty() {
        tracing::info!(
            files = report.removed_temp_files.len(),
            "recovery: removed leftovers of interrupted writes"
        );
    }
    if let Some(r) = &report.log_reset {
        tracing::warn!(
            needed = r.needed.0,
            first = r.first.0,
            end = r.end.0,
            "recovery: the log does not continue the checkpoint and was dropped; state transfer \
             fetches what is missing"
        );
    }
    // Replay starts from the checkpoint's own view, or from the configured one at CID 0; a
    // stored view matters only when there is nothing to replay (a joiner that never got state).
    let nothing = recovered.checkpoint.is_none() && recovered.decisions.is_empty();
    let view = match recovered.view {
        Some(v) if nothing && v.id > configured.id => v,
        _ => configured,
    };
    let checkpoint_cid = recovered.checkpoint.as_ref().map(|c| c.cid.0);
    let replayed = recovered.decisions.len();
    // Opened before the replay: the file the checkpoint was read from is not pruned until a
    // newer one is written, which only this replica's own storage threads do, later.
    let stored = match (&recovered.checkpoint, &recovered.checkpoint_location) {
        (Some(c), Some(at)) => match Stored::open(c.cid, c.digest, at) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot reopen the recovered checkpoint; serving it from memory");
                None
            }
        },
        _ => None,
    };
    let mut core = Replica::recover(
        me,
        key.clone(),
        view,
        cfg.protocol.core(),
        service,
        FromDisk {
            checkpoint: recovered.checkpoint.map(|c| c.snapshot),
            checkpoint_decision: recovered.checkpoint_decision,
            decisions: recovered.decisions,
            promise: opened.promise.take(),
            ran_before: opened.ran_before,
        },
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot rebuild the replica from {}: {e}; move that directory away to start empty \
             and catch up by state transfer",
            cfg.data_dir.display()
        )
    })?;
    if let Some(s) = stored {
        core.checkpoint_stored(s.cid, s.digest, s.file);
    }
    tracing::info!(
        checkpoint = ?checkpoint_cid,
        replayed,
        last_decided = ?core.last_decided().map(|c| c.0),
        clean = report.is_clean(),
        "recovered from disk"
    );
    Ok(core)
}

struct NodeLoop {
    core: Replica,
    encoder: encoder::Encoder,
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
    /// The digest `/status` reports, computed within a budget of the loop's time.
    status_digest: digest::StatusDigest,
    /// How long this replica waits for a CPU: a busy host judges no leader slow.
    contention: contention::Contention,
    /// Whether this process stopped running for a while (its timers cannot judge that time).
    pauses: pause::Pauses,
    rejections: HashMap<kmmr_protocol::core::rejection::Rejection, u64>,
    /// Evidence against peers: rejections that only a faulty sender causes, recent ones only,
    /// for the signed status (the operator names a replica that f+1 others accuse).
    accusations: accuse::Accusations,
    durability: Option<Durability>,
    /// Where votes are promised (with durability).
    promises: Option<PromiseFile>,
    /// The last CID in the log at start-up (durable, whatever the log thread reports).
    recovered_until: Option<Cid>,
    /// A promise could not be written: nothing more may be sent, the replica stops.
    fatal: Option<String>,
    /// This replica is not in its view any more: it answers what it can and stops.
    removed: bool,
    /// Until then, replicas removed by the last view change stay connected (see `view_changed`).
    removed_grace_until: Option<Instant>,
    /// How long to poll for more input after handling some (see `poll`).
    busy_poll: Duration,
}

/// How long a promise waits for a log that is too far behind (see `wait_for_log`).
const LOG_WAIT: Duration = Duration::from_secs(30);

/// Resolves when the durable CID moves; never without durability.
async fn durable_changed(rx: &mut Option<watch::Receiver<Option<Cid>>>) -> bool {
    match rx {
        Some(r) => r.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

impl NodeLoop {
    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Inbound>,
        mut http: metrics::HttpAsks,
        mut failures: mpsc::UnboundedReceiver<String>,
        mut stored: mpsc::UnboundedReceiver<Stored>,
        mut encoded: mpsc::UnboundedReceiver<EncodedCheckpoint>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut durable_rx = self.durability.as_ref().map(|d| d.watch());
        loop {
            let deadline = self.core.next_deadline();
            let sleep = tokio::time::sleep_until(
                deadline
                    .map(|d| self.clock.instant_at(d))
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
                    .into(),
            );
            let mut input = false;
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    input = true;
                    self.learn_peer_protocols();
                    self.handle(ev);
                    for _ in 0..DRAIN_PER_TURN {
                        match rx.try_recv() {
                            Ok(ev) => self.handle(ev),
                            Err(_) => break,
                        }
                    }
                }
                _ = sleep, if deadline.is_some() => {
                    let busy = self.host_busy();
                    self.core.set_host_busy(busy);
                    let now = self.clock.now_us();
                    if self.pauses.take() {
                        tracing::info!(
                            "this replica's process did not run for over {:?}: its request timers start again",
                            pause::PAUSE
                        );
                        self.core.resumed(now);
                    }
                    self.learn_peer_protocols();
                    self.core.on_timeout(now);
                }
                Some(reply) = http.status.recv() => {
                    let _ = reply.send(self.status());
                }
                Some(ask) = http.snapshot.recv() => {
                    self.serve_snapshot(ask);
                }
                _ = tick.tick() => {
                    self.refresh_gauges();
                    if self.removed_grace_until.is_some_and(|t| Instant::now() >= t) {
                        self.removed_grace_until = None;
                        self.peers.update_view(&self.view);
                    }
                }
                ok = durable_changed(&mut durable_rx) => {
                    if ok {
                        let durable = self.durable_cid();
                        if let Some(d) = durable {
                            self.metrics.durable_cid.set(d.0 as i64);
                        }
                        self.core.log_durable(durable);
                    } else {
                        durable_rx = None;
                    }
                }
                Some(e) = encoded.recv() => {
                    self.core.on_checkpoint_encoded(e);
                }
                Some(s) = stored.recv() => {
                    self.core.checkpoint_stored(s.cid, s.digest, s.file);
                }
                Some(why) = failures.recv() => {
                    tracing::error!(error = %why, "storage failed: stopping so that a restart recovers from disk");
                    bail!("{why}");
                }
            }
            self.flush().await;
            if let Some(why) = self.fatal.take() {
                tracing::error!(error = %why, "cannot promise votes: stopping so that a restart recovers from disk");
                bail!("{why}");
            }
            if input && !self.busy_poll.is_zero() {
                self.poll_more(&rx).await;
            }
            if self.removed {
                break;
            }
        }
        tracing::info!(replica = self.core.id().0, "replica stopping");
        Ok(())
    }

    /// Looks for more input before the runtime may sleep: the next message of an instance
    /// usually follows within microseconds, and waking up for it costs more than waiting.
    async fn poll_more(&mut self, rx: &mpsc::Receiver<Inbound>) {
        let start = Instant::now();
        let outcome = match poll::poll_for_input(rx, self.busy_poll).await {
            poll::Polled::Input => "input",
            poll::Polled::Idle => "idle",
        };
        self.metrics
            .busy_poll_seconds
            .inc_by(start.elapsed().as_secs_f64());
        self.metrics
            .busy_polls
            .get_or_create(&metrics::OutcomeLabel { outcome })
            .inc();
    }

    /// The log's durable end, once it is at most `MAX_PROMISED_DECISIONS` behind `cid`; a
    /// promise carries the rest. Waits (without blocking the runtime's thread) while the log is
    /// further behind: the votes cannot go out before their promise anyway, so the loop takes
    /// no input meanwhile. `None` if it stays behind for `LOG_WAIT`.
    async fn wait_for_log(&self, cid: Cid) -> Option<Option<Cid>> {
        let ready = |durable: Option<Cid>| {
            let behind = cid.0.saturating_sub(durable.map_or(0, |d| d.0 + 1));
            (behind as usize <= MAX_PROMISED_DECISIONS).then_some(durable)
        };
        let now = self.durable_cid().max(self.recovered_until);
        if let Some(d) = ready(now) {
            return Some(d);
        }
        // Without storage nothing would ever become durable.
        let mut watch = self.durability.as_ref()?.watch();
        let recovered = self.recovered_until;
        tokio::time::timeout(LOG_WAIT, async move {
            loop {
                if let Some(d) = ready((*watch.borrow_and_update()).max(recovered)) {
                    return Some(d);
                }
                if watch.changed().await.is_err() {
                    // The log thread stopped on an error, which `failures` reports.
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    fn durable_cid(&self) -> Option<Cid> {
        self.durability.as_ref().and_then(|d| d.durable())
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

    async fn flush(&mut self) {
        let outputs = self.core.take_outputs();
        for out in outputs {
            if self.fatal.is_some() {
                // Messages after an unwritten promise must not leave; the loop stops next.
                break;
            }
            if out.is_local() {
                self.local(out).await;
                continue;
            }
            match self.adversary.as_mut() {
                None => self.send_honest(out).await,
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
            .store(now_us(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Tells the core whether every link agreed on protocol 2, which signs WRITEs and lets them
    /// leave before their promise (`Replica::set_peers_read_signed_writes`).
    fn learn_peer_protocols(&mut self) {
        self.core
            .set_peers_read_signed_writes(self.peers.all_speak(PeerProtocol::V2));
    }

    async fn send_honest(&mut self, out: Output) {
        match out {
            Output::Send { to, msg } => {
                let msg = if self.peers.protocol(to) == Some(PeerProtocol::V2) {
                    msg
                } else {
                    msg.protocol_1().unwrap_or(msg)
                };
                let _ = self.peers.send(to, &msg.to_bytes());
            }
            Output::Broadcast { msg } => {
                let old = if self.peers.all_speak(PeerProtocol::V2) {
                    None
                } else {
                    msg.protocol_1()
                };
                match old {
                    None => {
                        self.peers.broadcast(&msg.to_bytes());
                    }
                    Some(old) => {
                        self.peers
                            .broadcast_by_protocol(&msg.to_bytes(), &old.to_bytes());
                    }
                }
            }
            Output::Reply { client, reply, .. } => {
                // The core releases a reply only once its state is kept: by the log's durable
                // watch (`log_durable`), or by a promise at its instance written just before.
                if let Some(conn) = self.conns.get(&client) {
                    let _ = self.clients.send(*conn, &reply.to_bytes());
                } else {
                    tracing::debug!(
                        sequence = reply.sequence,
                        "a reply for a client not connected here"
                    );
                }
            }
            other => self.local(other).await,
        }
    }

    /// Storage and membership outputs.
    async fn local(&mut self, out: Output) {
        match out {
            Output::Promise(mut p) => {
                // What the log holds after a crash now: what it had at start-up, and what it
                // has synced since. The rest goes with the promise.
                let Some(durable) = self.wait_for_log(p.collect.cid).await else {
                    self.fatal = Some(format!(
                        "the log stayed more than {MAX_PROMISED_DECISIONS} decisions behind for \
                         {LOG_WAIT:?}: the disk does not keep up"
                    ));
                    return;
                };
                self.core.complete_promise(&mut p, durable);
                if let Some(file) = &mut self.promises {
                    let start = Instant::now();
                    match file.write(&p.to_bytes()) {
                        Ok(()) => self
                            .metrics
                            .promise_seconds
                            .observe(start.elapsed().as_secs_f64()),
                        Err(e) => self.fatal = Some(e.to_string()),
                    }
                }
            }
            Output::Persist(d) => {
                if let Some(s) = &self.durability {
                    s.append(d);
                }
            }
            Output::EncodeCheckpoint(pending) => self.encoder.encode(pending),
            Output::Checkpoint {
                checkpoint,
                view,
                trim_before,
            } => {
                self.metrics
                    .checkpoint_cid
                    .set(checkpoint.meta.cid.0 as i64);
                if let Some(s) = &self.durability {
                    s.checkpoint(checkpoint, view, trim_before);
                }
            }
            Output::StateInstalled(checkpoint) => {
                let meta = checkpoint.meta;
                self.metrics.state_transfers.inc();
                self.metrics.transfer_bytes.inc_by(meta.len);
                self.metrics.checkpoint_cid.set(meta.cid.0 as i64);
                tracing::info!(
                    cid = meta.cid.0,
                    bytes = meta.len,
                    digest = %meta.digest,
                    view = meta.view.0,
                    "state transfer: installed a checkpoint agreed by f+1 replicas"
                );
                if let Some(s) = &self.durability {
                    s.installed(checkpoint, self.core.view().clone());
                }
            }
            Output::ViewChanged(view) => self.view_changed(view),
            Output::Send { .. } | Output::Broadcast { .. } | Output::Reply { .. } => {}
        }
    }

    fn view_changed(&mut self, view: View) {
        let me = self.core.id();
        let member = view.contains(me);
        tracing::info!(
            view = view.id.0,
            n = view.n(),
            f = view.f,
            member,
            "view installed"
        );
        if let Some(s) = &self.durability {
            s.view(view.clone());
        }
        self.metrics.view_id.set(view.id.0 as i64);
        if member {
            // Replicas just removed stay connected for a while: one that was behind learns the
            // decisions up to its removal (and so that it was removed) before its links go.
            let removed: Vec<_> = self
                .view
                .members
                .iter()
                .filter(|m| !view.contains(m.id))
                .cloned()
                .collect();
            if removed.is_empty() {
                self.peers.update_view(&view);
            } else {
                let mut members = view.members.clone();
                members.extend(removed);
                self.peers
                    .update_view(&View::new_unvalidated(view.id, view.f, members));
                self.removed_grace_until = Some(Instant::now() + REMOVED_GRACE);
            }
        } else {
            tracing::warn!(
                replica = me.0,
                view = view.id.0,
                "THIS REPLICA WAS REMOVED FROM THE VIEW: it answers what is pending and stops"
            );
            self.removed = true;
        }
        self.view = view;
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
                unchecked,
                ..
            } => {
                self.metrics.decided.inc();
                if unchecked {
                    self.metrics.decided_unchecked.inc();
                }
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
                self.metrics.reject(reason.label());
                // Evidence only from a replica that holds the state and view it judged by: one
                // still joining, fetching state or outside its view may be the one mistaken.
                let judge = self.core.participating() && !self.core.is_transferring();
                if let Some(peer) = from.filter(|p| *p != self.core.id()) {
                    if judge && reason.proves_misbehaviour() {
                        self.accusations.record(Instant::now(), peer.0, reason);
                    }
                }
                // Logged, but a flood of one kind must not flood the log: the first of each
                // reason and then every thousandth.
                let n = self.rejections.entry(reason).or_insert(0);
                *n += 1;
                if *n == 1 || *n % 1000 == 0 {
                    tracing::info!(
                        ?from,
                        reason = reason.label(),
                        count = *n,
                        "rejected a message"
                    );
                }
            }
            Event::Suspected { regency, why } => {
                tracing::warn!(
                    regency = regency.0,
                    why = why.label(),
                    "asking for a leader change"
                );
            }
            Event::ViewInstalled {
                cid,
                view,
                n,
                f,
                member,
            } => {
                self.metrics.view_installs.inc();
                tracing::info!(
                    cid = cid.0,
                    view = view.0,
                    n,
                    f,
                    member,
                    "reconfiguration decided"
                );
            }
            Event::CheckpointTaken { cid, digest } => {
                self.metrics.checkpoints.inc();
                tracing::info!(cid = cid.0, %digest, "checkpoint taken");
            }
            Event::TransferStarted { cid, len, from } => {
                tracing::info!(
                    cid = cid.0,
                    bytes = len,
                    from = from.0,
                    "state transfer started"
                );
            }
            Event::StateInstalled { cid } => {
                tracing::info!(cid = cid.0, "state transfer finished");
            }
            Event::SlowLeaderWithheld { regency } => {
                self.metrics.slow_leader_withheld.inc();
                tracing::info!(
                    regency = regency.0,
                    cpu_wait = self.contention.last_fraction,
                    "not judging the leader slow: this replica itself waits for a CPU too long \
                     to tell"
                );
            }
            Event::Diverged { cid } => {
                self.metrics.diverged.inc();
                tracing::error!(
                    cid = cid.0,
                    "this replica's checkpoint disagrees with f+1 others: its state diverged, \
                     repairing it by state transfer"
                );
            }
        }
    }
}
