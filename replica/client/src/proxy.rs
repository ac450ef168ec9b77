//! The client proxy: an async handle over a `ClientSession` that dials every replica of the view
//! with mutual TLS (`net::ClientConnector`), sends each request to all of them, and resolves when
//! enough distinct replicas agreed on the result. Many requests may be in flight at once.
//!
//! The session sits behind one lock that three kinds of task take, each briefly and never across
//! an await: the caller of [`Client::invoke`] signs its request and queues it on every link; each
//! link's task counts the replies it reads and completes the request that gathered enough; one
//! background task keeps the timers (retransmission, unordered reads' patience) and the dials.
//! So a request wakes no task between its caller and the links, nor between a reply and its
//! caller: the earlier design routed both through the background task, two wake-ups per request
//! that cost a gateway about a tenth of its CPU.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::clock::Clock;
use crate::session::{ClientError, ClientSession, ReadOutcomes};
use kmmr_net::{ClientConnector, LinkEvents, LinkId, NetConfig, NetStats, ReplicaLink};
use kmmr_protocol::crypto::KeyPair;
use kmmr_protocol::service::kv::{KvRequest, KvResponse};
use kmmr_protocol::view::View;
use kmmr_protocol::wire::codec::{Decode, Encode};
use kmmr_protocol::wire::ids::{ReplicaId, ViewId};
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

type Done = oneshot::Sender<Result<Vec<u8>, ClientError>>;

/// What the lock guards.
struct Core {
    session: ClientSession,
    links: BTreeMap<ReplicaId, ReplicaLink>,
    pending: HashMap<u64, Done>,
    view_tx: watch::Sender<View>,
    /// The deadline the background task sleeps until (`None`: it sleeps with none), so that a
    /// request with an earlier one wakes it.
    armed: Option<u64>,
}

impl Core {
    /// Sends what the session queued to every linked replica.
    fn flush(&mut self) {
        for req in self.session.take_to_send() {
            let bytes = req.to_bytes();
            for link in self.links.values() {
                let _ = link.send(&bytes);
            }
        }
    }

    /// Forgets requests whose caller gave up.
    fn prune(&mut self) {
        let session = &mut self.session;
        self.pending.retain(|seq, tx| {
            let alive = !tx.is_closed();
            if !alive {
                session.abandon(*seq);
            }
            alive
        });
    }

    /// Membership changed: drop links to removed replicas; new ones are dialled on the next tick.
    fn view_changed(&mut self, before: ViewId) {
        if self.session.view().id == before {
            return;
        }
        let ids: Vec<ReplicaId> = self.session.view().ids().collect();
        self.links.retain(|id, _| ids.contains(id));
        let _ = self.view_tx.send(self.session.view().clone());
    }

    /// True when the session's next deadline is earlier than the one the timer sleeps until.
    fn rearm(&mut self) -> bool {
        let next = self.session.next_deadline();
        let earlier = match (next, self.armed) {
            (Some(n), Some(a)) => n < a,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if earlier {
            self.armed = next;
        }
        earlier
    }
}

struct Shared {
    core: Mutex<Core>,
    clock: Clock,
    /// Wakes the background task: a request's deadline is earlier than the one it sleeps until.
    timer: Notify,
    /// Replicas with an open link, as last counted.
    connected: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes how many replicas have an open link, for the timeout message.
    fn count_links(&self, core: &Core) {
        let open = core.links.values().filter(|l| !l.is_closed()).count();
        self.connected.store(open, Ordering::Relaxed);
    }

    fn on_reply(&self, from: ReplicaId, frame: &[u8]) {
        let Ok(reply) = Reply::from_bytes(frame) else {
            tracing::debug!(replica = from.0, "undecodable reply");
            return;
        };
        let mut core = self.lock();
        let view_before = core.session.view().id;
        if let Some(done) = core.session.on_reply(self.clock.now_us(), from, reply) {
            if let Some(tx) = core.pending.remove(&done.sequence) {
                let _ = tx.send(done.result);
            }
        }
        core.view_changed(view_before);
        // A reply may make the session send again (a split read ordered, a request re-signed
        // for a newer view).
        core.flush();
        if core.rearm() {
            self.timer.notify_one();
        }
    }
}

/// The replies of every link, handled in the link's task.
struct Replies(Arc<Shared>);

impl LinkEvents for Replies {
    async fn frame(&self, from: ReplicaId, _link: LinkId, frame: Vec<u8>) -> bool {
        self.0.on_reply(from, &frame);
        true
    }

    async fn closed(&self, from: ReplicaId, link: LinkId) {
        let mut core = self.0.lock();
        if core.links.get(&from).is_some_and(|l| l.id() == link) {
            core.links.remove(&from);
        }
        self.0.count_links(&core);
    }
}

enum Cmd {
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
    shared: Arc<Shared>,
    /// Held only to keep the background task alive while a clone of the client is; it ends when
    /// the last one is dropped.
    tx: mpsc::Sender<Cmd>,
    view: watch::Receiver<View>,
    id: ClientId,
    timeout: Duration,
    unordered_reads: bool,
    unreachable: Arc<Vec<(ReplicaId, String)>>,
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
        let (tx, rx) = mpsc::channel(64);
        let (dialed_tx, mut dialed_rx) = mpsc::channel(64);
        let (view_tx, view_rx) = watch::channel(session.view().clone());
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                session,
                links: BTreeMap::new(),
                pending: HashMap::new(),
                view_tx,
                armed: None,
            }),
            clock,
            timer: Notify::new(),
            connected: AtomicUsize::new(0),
        });
        let mut task = ProxyTask {
            shared: shared.clone(),
            connector,
            dialing: HashSet::new(),
            dialed_tx,
            redial: opts.redial,
        };
        task.dial_missing();
        let unreachable = Arc::new(task.first_dials(&mut dialed_rx).await);
        shared.count_links(&shared.lock());
        tokio::spawn(task.run(rx, dialed_rx));
        Ok(Client {
            shared,
            tx,
            view: view_rx,
            id,
            timeout: opts.timeout,
            unordered_reads: opts.linearizable_unordered_reads,
            unreachable,
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
        if self.tx.is_closed() {
            return Err(anyhow!("client stopped"));
        }
        let (done, rx) = oneshot::channel();
        {
            // Signed and queued under the lock: replicas execute a client's requests in
            // sequence order and drop older ones as stale, so requests must reach every link in
            // the order of their numbers.
            let mut core = self.shared.lock();
            let seq = core
                .session
                .invoke(self.shared.clock.now_us(), kind, payload);
            core.pending.insert(seq, done);
            core.flush();
            if core.rearm() {
                self.shared.timer.notify_one();
            }
        }
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
                    self.shared.connected.load(Ordering::Relaxed),
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

/// The background task: timers, dials, views.
struct ProxyTask {
    shared: Arc<Shared>,
    connector: Arc<ClientConnector>,
    /// Replicas with a dial in flight. Dials run on tasks of their own, so that a replica that
    /// does not answer (a blackholed host, a stalled handshake) holds up no request: a dial
    /// awaited here stopped the whole client for up to the connect and handshake timeouts on
    /// every redial tick.
    dialing: HashSet<ReplicaId>,
    dialed_tx: mpsc::Sender<Dialed>,
    redial: Duration,
}

impl ProxyTask {
    /// Starts a dial of every member with neither an open link nor a dial in flight.
    fn dial_missing(&mut self) {
        let members = {
            let core = self.shared.lock();
            core.session
                .view()
                .members
                .iter()
                .filter(|m| core.links.get(&m.id).is_none_or(|l| l.is_closed()))
                .cloned()
                .collect::<Vec<_>>()
        };
        for m in members {
            if !self.dialing.insert(m.id) {
                continue;
            }
            let (connector, events, dialed) = (
                self.connector.clone(),
                Replies(self.shared.clone()),
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
        let mut core = self.shared.lock();
        match outcome {
            Ok(link) if core.session.view().contains(id) => {
                // What this replica missed while it had no link goes first, in sequence order,
                // ahead of anything newer (see `ClientSession::unanswered`).
                for req in core.session.unanswered() {
                    let _ = link.send(&req.to_bytes());
                }
                core.links.insert(id, link);
                None
            }
            Ok(_) => None,
            Err(why) => {
                tracing::debug!(replica = id.0, error = %why, "replica unreachable");
                core.links.remove(&id);
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
        let quorum = self.shared.lock().session.view().quorum();
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
            if stragglers.is_none() && self.shared.lock().links.len() >= quorum {
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

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, mut dialed: mpsc::Receiver<Dialed>) {
        let mut redial = tokio::time::interval(self.redial);
        let clock = self.shared.clock;
        loop {
            let deadline = {
                let mut core = self.shared.lock();
                core.armed = core.session.next_deadline();
                core.armed
            };
            let sleep = tokio::time::sleep_until(
                deadline
                    .map(|d| clock.instant_at(d))
                    .unwrap_or_else(|| std::time::Instant::now() + Duration::from_secs(3600))
                    .into(),
            );
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => break,
                    Some(Cmd::InstallView(v)) => {
                        {
                            let mut core = self.shared.lock();
                            let before = core.session.view().id;
                            core.session.install_view(v);
                            core.view_changed(before);
                        }
                        self.dial_missing();
                    }
                },
                Some(d) = dialed.recv() => {
                    self.on_dialed(d);
                }
                // A request with an earlier deadline than the one slept until.
                _ = self.shared.timer.notified() => {}
                _ = sleep, if deadline.is_some() => {
                    let mut core = self.shared.lock();
                    core.prune();
                    core.session.on_timeout(clock.now_us());
                    core.flush();
                }
                _ = redial.tick() => {
                    self.shared.lock().prune();
                    self.dial_missing();
                }
            }
            self.shared.count_links(&self.shared.lock());
        }
        // The links' tasks hold the shared state: dropping the links ends them.
        self.shared.lock().links.clear();
    }
}
