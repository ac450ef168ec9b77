//! The client proxy: an async handle over a `ClientSession` that dials every replica of the view
//! with mutual TLS (`net::ClientConnector`), sends each request to all of them, and resolves when
//! enough distinct replicas agreed on the result. Many requests may be in flight at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::Clock;
use crate::session::{ClientError, ClientSession, ReadOutcomes};
use kmmr_net::{ClientConnector, FromReplica, NetConfig, NetStats, ReplicaLink};
use kmmr_protocol::crypto::KeyPair;
use kmmr_protocol::service::kv::{KvRequest, KvResponse};
use kmmr_protocol::view::View;
use kmmr_protocol::wire::codec::{Decode, Encode};
use kmmr_protocol::wire::ids::ReplicaId;
use kmmr_protocol::wire::limits;
use kmmr_protocol::wire::messages::{ClientId, Reply, RequestKind};

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Resend a request that has not gathered enough replies after this long.
    pub retransmit: Duration,
    /// Give up on a request after this long.
    pub timeout: Duration,
    /// Pause between attempts to re-dial a replica that is down.
    pub redial: Duration,
    /// Wait for a quorum of replies to ordered requests (instead of f+1), which lets reads skip
    /// the total order and stay linearizable. Without it `kv_read` orders its reads.
    pub linearizable_unordered_reads: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            retransmit: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
            redial: Duration::from_millis(500),
            linearizable_unordered_reads: false,
        }
    }
}

enum Cmd {
    Invoke {
        kind: RequestKind,
        payload: Vec<u8>,
        done: oneshot::Sender<Result<Vec<u8>, ClientError>>,
    },
    /// A newer view learnt from a reconfiguration's agreed outcome.
    InstallView(View),
}

/// A connected client. Cloning shares the session.
///
/// One key, one process: the replicas keep a single session per client key, and a newer
/// session of a key (another process started with it) ends the older one. Requests of the
/// ended session then fail at once with the replicas' reason instead of executing.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Cmd>,
    view: watch::Receiver<View>,
    id: ClientId,
    timeout: Duration,
    unordered_reads: bool,
    unreachable: Arc<Vec<(ReplicaId, String)>>,
    /// Replicas with an open link, as the proxy task last counted them.
    connected: Arc<AtomicUsize>,
    reads: Arc<ReadOutcomes>,
}

impl Client {
    /// Dials every replica of `view` (replicas that are down are re-dialled in the background).
    pub async fn connect(key: KeyPair, view: View, opts: ClientOptions) -> Result<Client> {
        let stats = Arc::new(NetStats::default());
        let connector = Arc::new(
            ClientConnector::new(&key, NetConfig::default(), stats).context("client TLS setup")?,
        );
        let id = key.public();
        let clock = Clock::new();
        // Sessions must grow across restarts of a client with the same key: the start time does.
        let mut session = ClientSession::new(
            key,
            clock.now_us(),
            view,
            opts.retransmit.as_micros() as u64,
        );
        session.set_quorum_writes(opts.linearizable_unordered_reads);
        let reads = session.read_outcomes();
        let (tx, rx) = mpsc::channel(1024);
        let (ev_tx, ev_rx) = mpsc::channel(4096);
        let (dialed_tx, mut dialed_rx) = mpsc::channel(64);
        let (view_tx, view_rx) = watch::channel(session.view().clone());
        let mut task = ProxyTask {
            view_tx,
            session,
            connector,
            links: BTreeMap::new(),
            dialing: HashSet::new(),
            dialed_tx,
            pending: HashMap::new(),
            ev_tx,
            clock,
            redial: opts.redial,
            connected: Arc::new(AtomicUsize::new(0)),
        };
        task.dial_missing();
        let unreachable = Arc::new(task.first_dials(&mut dialed_rx).await);
        let connected = task.connected.clone();
        task.count_links();
        tokio::spawn(task.run(rx, ev_rx, dialed_rx));
        Ok(Client {
            tx,
            view: view_rx,
            id,
            timeout: opts.timeout,
            unordered_reads: opts.linearizable_unordered_reads,
            unreachable,
            connected,
            reads,
        })
    }

    /// How this client's reads outside the order ended so far (see `ReadOutcomes`).
    pub fn read_outcomes(&self) -> &ReadOutcomes {
        &self.reads
    }

    /// The replicas that could not be reached when this client connected, and why (those that
    /// had not answered yet when a quorum of others had are among them). They are re-dialled
    /// in the background; a caller may tell its user, or give up when none answered.
    pub fn unreachable_at_connect(&self) -> &[(ReplicaId, String)] {
        &self.unreachable
    }

    pub fn id(&self) -> ClientId {
        self.id
    }

    /// The newest view this client follows.
    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    /// Follows `view` if it is newer (for example the outcome of a reconfiguration).
    pub async fn install_view(&self, view: View) -> Result<()> {
        self.tx
            .send(Cmd::InstallView(view))
            .await
            .map_err(|_| anyhow!("client stopped"))
    }

    /// Sends one request and waits for its agreed result.
    pub async fn invoke(&self, kind: RequestKind, payload: Vec<u8>) -> Result<Vec<u8>> {
        // Replicas cannot decode a larger request and drop it unanswered: say so now rather
        // than at the timeout.
        if payload.len() > limits::MAX_PAYLOAD {
            return Err(anyhow!(
                "the request is {} bytes; replicas accept at most {} bytes per request",
                payload.len(),
                limits::MAX_PAYLOAD
            ));
        }
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Invoke {
                kind,
                payload,
                done,
            })
            .await
            .map_err(|_| anyhow!("client stopped"))?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Ok(bytes))) => Ok(bytes),
            Ok(Ok(Err(ClientError::Rejected(reason)))) => Err(anyhow!("rejected: {reason}")),
            Ok(Err(_)) => Err(anyhow!("client stopped")),
            Err(_) => {
                let view = self.view();
                Err(anyhow!(
                    "no agreed reply within {:?}: {} of the {} replicas connected, and an \
                     answer needs {} of them to agree (is a quorum of replicas up?)",
                    self.timeout,
                    self.connected.load(Ordering::Relaxed),
                    view.n(),
                    if self.unordered_reads {
                        view.quorum()
                    } else {
                        view.weak()
                    }
                ))
            }
        }
    }

    /// An ordered key-value operation (linearizable).
    pub async fn kv(&self, req: &KvRequest) -> Result<KvResponse> {
        let bytes = self.invoke(RequestKind::Ordered, req.to_bytes()).await?;
        KvResponse::from_bytes(&bytes).map_err(|e| anyhow!("undecodable reply: {e}"))
    }

    /// A linearizable read: outside the total order from a quorum of matching replicas when the
    /// client runs with `linearizable_unordered_reads` (falling back to ordering when replicas
    /// disagree or are slow), ordered otherwise.
    pub async fn kv_read(&self, req: &KvRequest) -> Result<KvResponse> {
        let kind = if self.unordered_reads {
            RequestKind::Unordered
        } else {
            RequestKind::Ordered
        };
        let bytes = self.invoke(kind, req.to_bytes()).await?;
        KvResponse::from_bytes(&bytes).map_err(|e| anyhow!("undecodable reply: {e}"))
    }
}

/// The outcome of one dial, from the task that made it.
type Dialed = (ReplicaId, Result<ReplicaLink, String>);

/// Once a quorum of replicas is connected, how much longer a new client waits for the rest
/// before it starts (they go on connecting in the background).
const CONNECT_STRAGGLERS: Duration = Duration::from_millis(100);

struct ProxyTask {
    view_tx: watch::Sender<View>,
    session: ClientSession,
    connector: Arc<ClientConnector>,
    links: BTreeMap<ReplicaId, ReplicaLink>,
    /// Replicas with a dial in flight. Dials run on tasks of their own, so that a replica that
    /// does not answer (a blackholed host, a stalled handshake) holds up no request: a dial
    /// awaited here stopped the whole client for up to the connect and handshake timeouts on
    /// every redial tick.
    dialing: HashSet<ReplicaId>,
    dialed_tx: mpsc::Sender<Dialed>,
    pending: HashMap<u64, oneshot::Sender<Result<Vec<u8>, ClientError>>>,
    ev_tx: mpsc::Sender<FromReplica>,
    clock: Clock,
    redial: Duration,
    connected: Arc<AtomicUsize>,
}

impl ProxyTask {
    /// Publishes how many replicas have an open link, for the timeout message.
    fn count_links(&self) {
        let open = self.links.values().filter(|l| !l.is_closed()).count();
        self.connected.store(open, Ordering::Relaxed);
    }

    /// Starts a dial of every member with neither an open link nor a dial in flight.
    fn dial_missing(&mut self) {
        for m in self.session.view().members.clone() {
            if self.links.get(&m.id).is_some_and(|l| !l.is_closed()) || !self.dialing.insert(m.id) {
                continue;
            }
            let (connector, events, dialed) = (
                self.connector.clone(),
                self.ev_tx.clone(),
                self.dialed_tx.clone(),
            );
            tokio::spawn(async move {
                let outcome = connector
                    .dial(&m, events)
                    .await
                    .map_err(|e| format!("{e:#}"));
                let _ = dialed.send((m.id, outcome)).await;
            });
        }
    }

    /// A dial ended: keep the link if the replica is still a member; returns why it failed.
    fn on_dialed(&mut self, (id, outcome): Dialed) -> Option<String> {
        self.dialing.remove(&id);
        match outcome {
            Ok(link) if self.session.view().contains(id) => {
                // What this replica missed while it had no link goes first, in sequence order,
                // ahead of anything newer (see `ClientSession::unanswered`).
                for req in self.session.unanswered() {
                    let _ = link.send(&req.to_bytes());
                }
                self.links.insert(id, link);
                None
            }
            Ok(_) => None,
            Err(why) => {
                tracing::debug!(replica = id.0, error = %why, "replica unreachable");
                self.links.remove(&id);
                Some(why)
            }
        }
    }

    /// The first dials of a new client: waits until every one ended, or a quorum is connected
    /// and the others had [`CONNECT_STRAGGLERS`] more; returns the replicas not connected, and
    /// why.
    async fn first_dials(
        &mut self,
        dialed: &mut mpsc::Receiver<Dialed>,
    ) -> Vec<(ReplicaId, String)> {
        let mut failed = Vec::new();
        let quorum = self.session.view().quorum();
        let mut stragglers: Option<tokio::time::Instant> = None;
        while !self.dialing.is_empty() {
            let deadline = stragglers
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                d = dialed.recv() => match d {
                    Some(d) => {
                        let id = d.0;
                        if let Some(why) = self.on_dialed(d) {
                            failed.push((id, why));
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
            if stragglers.is_none() && self.links.len() >= quorum {
                stragglers = Some(tokio::time::Instant::now() + CONNECT_STRAGGLERS);
            }
        }
        let mut waiting: Vec<ReplicaId> = self.dialing.iter().copied().collect();
        waiting.sort();
        failed.extend(
            waiting
                .into_iter()
                .map(|id| (id, "no answer yet (still connecting)".to_string())),
        );
        failed.sort_by_key(|(id, _)| *id);
        failed
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Cmd>,
        mut events: mpsc::Receiver<FromReplica>,
        mut dialed: mpsc::Receiver<Dialed>,
    ) {
        let mut redial = tokio::time::interval(self.redial);
        loop {
            let deadline = self.session.next_deadline();
            let sleep = tokio::time::sleep_until(
                deadline
                    .map(|d| self.clock.instant_at(d))
                    .unwrap_or_else(|| std::time::Instant::now() + Duration::from_secs(3600))
                    .into(),
            );
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => break,
                    Some(Cmd::Invoke { kind, payload, done }) => {
                        let seq = self.session.invoke(self.clock.now_us(), kind, payload);
                        self.pending.insert(seq, done);
                    }
                    Some(Cmd::InstallView(v)) => {
                        let before = self.session.view().id;
                        self.session.install_view(v);
                        self.view_changed(before);
                        self.dial_missing();
                    }
                },
                Some(ev) = events.recv() => self.on_event(ev),
                Some(d) = dialed.recv() => {
                    self.on_dialed(d);
                }
                _ = sleep, if deadline.is_some() => {
                    self.session.on_timeout(self.clock.now_us());
                }
                _ = redial.tick() => self.dial_missing(),
            }
            self.flush();
            self.count_links();
        }
    }

    fn on_event(&mut self, ev: FromReplica) {
        match ev {
            FromReplica::Frame { from, frame, .. } => {
                let Ok(reply) = Reply::from_bytes(&frame) else {
                    tracing::debug!(replica = from.0, "undecodable reply");
                    return;
                };
                let view_before = self.session.view().id;
                if let Some(done) = self.session.on_reply(self.clock.now_us(), from, reply) {
                    if let Some(tx) = self.pending.remove(&done.sequence) {
                        let _ = tx.send(done.result);
                    }
                }
                self.view_changed(view_before);
            }
            FromReplica::Closed { from, link } => {
                if self.links.get(&from).is_some_and(|l| l.id() == link) {
                    self.links.remove(&from);
                }
            }
        }
    }

    /// Membership changed: drop links to removed replicas; new ones are dialled on the next tick.
    fn view_changed(&mut self, before: kmmr_protocol::wire::ids::ViewId) {
        if self.session.view().id == before {
            return;
        }
        let ids: Vec<ReplicaId> = self.session.view().ids().collect();
        self.links.retain(|id, _| ids.contains(id));
        let _ = self.view_tx.send(self.session.view().clone());
    }

    fn flush(&mut self) {
        for req in self.session.take_to_send() {
            let bytes = req.to_bytes();
            for link in self.links.values() {
                let _ = link.send(&bytes);
            }
        }
        // Requests whose caller gave up are forgotten.
        let session = &mut self.session;
        self.pending.retain(|seq, tx| {
            let alive = !tx.is_closed();
            if !alive {
                session.abandon(*seq);
            }
            alive
        });
    }
}
