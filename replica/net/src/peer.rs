//! The replica mesh: one listener for inbound replica links, one dialer per other view member.
//!
//! Links are unidirectional (BFT-SMaRt's model, which avoids the tie-breaking of simultaneous
//! dials): what replica A sends to B travels on the connection A dialed, and the connection B
//! dialed carries B's messages to A. The listener learns the peer's identity from the key it
//! proved, so a replica cannot deliver messages in another's name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::conn::{self, account, Ended};
use super::slots::{Slot, Slots};
use super::stats::{NetStats, OpenGuard, Side};
use super::tls::{self, KeyPolicy, PeerProtocol, TlsIdentity};
use super::{Inbound, NetConfig, NetError, RejectReason, SendError};
use kmmr_protocol::crypto::{KeyPair, PublicKey};
use kmmr_protocol::view::View;
use kmmr_protocol::wire::frame::encode_frame;
use kmmr_protocol::wire::ids::ReplicaId;

/// Locks without propagating poison: every critical section here leaves the maps consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// The keys of the current view, shared with the listener's certificate verifier.
#[derive(Debug, Default)]
struct Members {
    me: ReplicaId,
    by_key: HashMap<PublicKey, ReplicaId>,
}

impl Members {
    fn of(view: &View, me: ReplicaId) -> Self {
        Members {
            me,
            by_key: view.members.iter().map(|m| (m.key, m.id)).collect(),
        }
    }

    /// The replica that holds `key`, if it is another member of the view.
    fn peer(&self, key: &PublicKey) -> Option<ReplicaId> {
        self.by_key.get(key).copied().filter(|id| *id != self.me)
    }
}

/// Admits a key iff it belongs to another member of the current view.
struct ViewPolicy(Arc<RwLock<Members>>);

impl KeyPolicy for ViewPolicy {
    fn allows(&self, key: &PublicKey) -> bool {
        read(&self.0).peer(key).is_some()
    }
}

/// One dialed peer: its queue and the task that drains it.
struct Outbound {
    key: PublicKey,
    address: String,
    queue: mpsc::Sender<Bytes>,
    task: JoinHandle<()>,
    /// The protocol its last link agreed on (`PeerProtocol::number`); 0 before the first.
    protocol: Arc<AtomicU8>,
}

impl Drop for Outbound {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The authenticated inbound connection of one peer.
struct InboundLink {
    serial: u64,
    key: PublicKey,
    close: Arc<Notify>,
}

struct Inner {
    me: ReplicaId,
    identity: TlsIdentity,
    config: NetConfig,
    stats: Arc<NetStats>,
    inbound: mpsc::Sender<Inbound>,
    members: Arc<RwLock<Members>>,
    outbound: RwLock<HashMap<ReplicaId, Outbound>>,
    inbound_links: Mutex<HashMap<ReplicaId, InboundLink>>,
    next_serial: AtomicU64,
    runtime: tokio::runtime::Handle,
    /// The listener's handshake slots; the view members' hosts are trusted with reserved ones.
    handshakes: Slots,
}

/// The replica-to-replica network of one replica. See the [module docs](crate::net).
pub struct PeerNetwork {
    inner: Arc<Inner>,
    accept_task: Option<JoinHandle<()>>,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for PeerNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerNetwork")
            .field("me", &self.inner.me)
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl PeerNetwork {
    /// Listens on `listen` (e.g. `"0.0.0.0:7000"`, or the view address of `me`) and dials every
    /// other member of `view`. Inbound frames go to `inbound`.
    pub async fn bind(
        key: &KeyPair,
        me: ReplicaId,
        view: &View,
        listen: &str,
        config: NetConfig,
        inbound: mpsc::Sender<Inbound>,
        stats: Arc<NetStats>,
    ) -> Result<Self, NetError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| NetError::Bind {
                addr: listen.to_owned(),
                source,
            })?;
        Self::with_listener(key, me, view, listener, config, inbound, stats)
    }

    /// As [`PeerNetwork::bind`], on a listener the caller bound (tests bind port 0 first to learn
    /// the addresses that go into the view).
    pub fn with_listener(
        key: &KeyPair,
        me: ReplicaId,
        view: &View,
        listener: TcpListener,
        config: NetConfig,
        inbound: mpsc::Sender<Inbound>,
        stats: Arc<NetStats>,
    ) -> Result<Self, NetError> {
        let local_addr = listener.local_addr().map_err(|source| NetError::Bind {
            addr: "listener".into(),
            source,
        })?;
        let identity = TlsIdentity::new(key)?;
        let members = Arc::new(RwLock::new(Members::of(view, me)));
        let server = tls::server_config(
            &identity,
            ViewPolicy(members.clone()),
            &config.peer_protocol.offers(),
        )?;
        let config_handshakes = config.handshake_slots(config.reserved_peer_handshakes);
        let inner = Arc::new(Inner {
            me,
            identity,
            config,
            stats,
            inbound,
            members,
            outbound: RwLock::new(HashMap::new()),
            inbound_links: Mutex::new(HashMap::new()),
            next_serial: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
            handshakes: config_handshakes,
        });
        inner.trust_members(view);
        inner.sync_outbound(view);
        let accept_task = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(server),
            inner.clone(),
        ));
        tracing::info!(replica = %me, %local_addr, peers = view.n().saturating_sub(1), "replica network up");
        Ok(PeerNetwork {
            inner,
            accept_task: Some(accept_task),
            local_addr,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Queues `payload` (one encoded message) for replica `to`. Never blocks: when the peer's
    /// queue is full the frame is dropped and counted ([`NetStats::peer_queue_drops`]).
    pub fn send(&self, to: ReplicaId, payload: &[u8]) -> Result<(), SendError> {
        let frame = self.frame(payload)?;
        self.send_frame(to, frame)
    }

    /// Queues `payload` for every other member of the view; returns how many queues took it.
    pub fn broadcast(&self, payload: &[u8]) -> usize {
        let Ok(frame) = self.frame(payload) else {
            return 0;
        };
        let ids: Vec<ReplicaId> = read(&self.inner.outbound).keys().copied().collect();
        ids.into_iter()
            .filter(|id| self.send_frame(*id, frame.clone()).is_ok())
            .count()
    }

    /// As [`PeerNetwork::broadcast`], with `v2` for the links that agreed on protocol 2 and
    /// `v1` (the same message as protocol 1 has it) for the others.
    pub fn broadcast_by_protocol(&self, v2: &[u8], v1: &[u8]) -> usize {
        let (Ok(new), Ok(old)) = (self.frame(v2), self.frame(v1)) else {
            return 0;
        };
        let ids: Vec<(ReplicaId, bool)> = read(&self.inner.outbound)
            .iter()
            .map(|(id, o)| {
                let p = PeerProtocol::of_number(o.protocol.load(Ordering::Relaxed));
                (*id, p == Some(PeerProtocol::V2))
            })
            .collect();
        ids.into_iter()
            .filter(|(id, v2)| {
                let frame = if *v2 { new.clone() } else { old.clone() };
                self.send_frame(*id, frame).is_ok()
            })
            .count()
    }

    /// Installs a new view: dials new members, stops dialing removed ones, re-pins keys, and
    /// closes inbound links whose key is no longer the one the view lists for that replica.
    /// Links to members whose key and address did not change are kept (with their queues).
    pub fn update_view(&self, view: &View) {
        *write(&self.inner.members) = Members::of(view, self.inner.me);
        self.inner.trust_members(view);
        self.inner.sync_outbound(view);
        let mut links = lock(&self.inner.inbound_links);
        links.retain(|id, link| {
            let keep = *id != self.inner.me && view.key(*id) == Some(&link.key);
            if !keep {
                link.close.notify_one();
            }
            keep
        });
    }

    /// Replicas with an authenticated inbound link right now.
    pub fn connected_inbound(&self) -> Vec<ReplicaId> {
        let mut ids: Vec<ReplicaId> = lock(&self.inner.inbound_links).keys().copied().collect();
        ids.sort();
        ids
    }

    /// Stops listening and dialing and waits until the listener socket is closed, so that the
    /// address can be bound again at once. Dropping the network does the same without waiting.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
            let _ = task.await;
        }
        // Dropping the dialers aborts them; they hold no socket that must be free at return.
        write(&self.inner.outbound).clear();
    }

    fn frame(&self, payload: &[u8]) -> Result<Bytes, SendError> {
        match encode_frame(payload) {
            Ok(f) => Ok(Bytes::from(f)),
            Err(e) => {
                tracing::warn!(error = %e, "refusing to send an oversized frame");
                self.inner.stats.reject(RejectReason::Oversized);
                Err(SendError::Oversized)
            }
        }
    }

    /// The protocol the link to `to` agreed on when it last came up; `None` before it first
    /// did. Frames for it are encoded for that one: a link that comes back speaking an older
    /// one drops what it cannot read, and the protocol recovers as from any lost message.
    pub fn protocol(&self, to: ReplicaId) -> Option<PeerProtocol> {
        read(&self.inner.outbound)
            .get(&to)
            .and_then(|o| PeerProtocol::of_number(o.protocol.load(Ordering::Relaxed)))
    }

    /// Whether the link to every other member of the view speaks `protocol` or newer.
    pub fn all_speak(&self, protocol: PeerProtocol) -> bool {
        self.count_below(protocol) == 0
    }

    /// Other members whose link speaks an older protocol than `protocol`, or never came up.
    pub fn count_below(&self, protocol: PeerProtocol) -> usize {
        read(&self.inner.outbound)
            .values()
            .filter(|o| {
                PeerProtocol::of_number(o.protocol.load(Ordering::Relaxed)) < Some(protocol)
            })
            .count()
    }

    fn send_frame(&self, to: ReplicaId, frame: Bytes) -> Result<(), SendError> {
        let outbound = read(&self.inner.outbound);
        let Some(peer) = outbound.get(&to) else {
            return Err(SendError::Unknown);
        };
        match peer.queue.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.inner.stats.queue_drop(Side::Peer);
                Err(SendError::QueueFull)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
        }
    }
}

impl Drop for PeerNetwork {
    fn drop(&mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
        // Outbound tasks do not hold `Inner`; dropping them here aborts them.
        write(&self.inner.outbound).clear();
        for link in lock(&self.inner.inbound_links).values() {
            link.close.notify_one();
        }
    }
}

impl Inner {
    /// Trusts the hosts of `view`'s members with the reserved handshake slots: addresses given
    /// as IPs at once, names once resolved (in the background; until then, a member's host is
    /// trusted from its first authenticated connection on).
    fn trust_members(&self, view: &View) {
        let mut literal = Vec::new();
        for m in &view.members {
            match m.address.parse::<SocketAddr>() {
                Ok(a) => literal.push(a.ip()),
                Err(_) => {
                    let slots = self.handshakes.clone();
                    let address = m.address.clone();
                    self.runtime.spawn(async move {
                        if let Ok(addrs) = tokio::net::lookup_host(address).await {
                            for a in addrs {
                                slots.trust(a.ip());
                            }
                        }
                    });
                }
            }
        }
        self.handshakes.set_trusted(literal);
    }

    /// Makes the set of dialers match `view`.
    fn sync_outbound(&self, view: &View) {
        let mut outbound = write(&self.outbound);
        outbound.retain(|id, o| {
            view.members
                .iter()
                .any(|m| m.id == *id && m.id != self.me && m.key == o.key && m.address == o.address)
        });
        for m in &view.members {
            if m.id == self.me || outbound.contains_key(&m.id) {
                continue;
            }
            let offers = self.config.peer_protocol.offers();
            let client = match tls::client_config(&self.identity, m.key, &offers) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(peer = %m.id, error = %e, "cannot build TLS config; not dialing");
                    continue;
                }
            };
            let (queue, rx) = mpsc::channel(self.config.peer_queue.max(1));
            let protocol = Arc::new(AtomicU8::new(0));
            let ends = Ends {
                me: self.me,
                peer: m.id,
                address: m.address.clone(),
            };
            let task = self.runtime.spawn(dial_loop(
                ends,
                TlsConnector::from(client),
                rx,
                self.config.clone(),
                self.stats.clone(),
                protocol.clone(),
            ));
            outbound.insert(
                m.id,
                Outbound {
                    key: m.key,
                    address: m.address.clone(),
                    queue,
                    task,
                    protocol,
                },
            );
        }
    }
}

/// Who an outbound link is for: this replica's id, the peer's and its address.
struct Ends {
    me: ReplicaId,
    peer: ReplicaId,
    address: String,
}

/// Keeps one outbound link to `peer` up, draining its queue into it, and records the protocol
/// each link agreed on in `protocol`.
async fn dial_loop(
    ends: Ends,
    connector: TlsConnector,
    mut rx: mpsc::Receiver<Bytes>,
    cfg: NetConfig,
    stats: Arc<NetStats>,
    protocol: Arc<AtomicU8>,
) {
    let Ends { me, peer, address } = ends;
    let mut delay = cfg.backoff_min;
    loop {
        match dial(&address, &connector, &cfg).await {
            Ok(stream) => {
                // A listener that agreed on no name is one from before versions had names.
                let agreed = stream
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .and_then(PeerProtocol::of_alpn)
                    .unwrap_or(PeerProtocol::V1);
                protocol.store(agreed.number(), Ordering::Relaxed);
                stats.peer_dials.fetch_add(1, Ordering::Relaxed);
                let _open = OpenGuard::new(&stats.peer_outbound_open);
                tracing::info!(replica = %me, %peer, %address, "outbound link up");
                let since = Instant::now();
                let ended = run_outbound(stream, &mut rx, &cfg, &stats).await;
                account(&stats, ended);
                tracing::info!(replica = %me, %peer, ?ended, "outbound link down");
                if ended == Ended::QueueClosed {
                    return;
                }
                // A link that lived a while earns a fast first retry; one that dies at once
                // (a peer that accepts and then drops us) keeps backing off.
                if since.elapsed() >= cfg.backoff_max {
                    delay = cfg.backoff_min;
                }
            }
            Err(DialError::Connect(e)) => {
                stats.peer_dial_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(replica = %me, %peer, %address, error = %e, "dial failed");
            }
            Err(DialError::Rejected(reason)) => {
                stats.peer_dial_failures.fetch_add(1, Ordering::Relaxed);
                stats.reject(reason);
                tracing::warn!(replica = %me, %peer, %address, reason = reason.as_str(), "handshake with peer failed");
            }
        }
        tokio::time::sleep(delay).await;
        delay = delay.saturating_mul(2).min(cfg.backoff_max);
    }
}

enum DialError {
    Connect(std::io::Error),
    Rejected(RejectReason),
}

async fn dial(
    address: &str,
    connector: &TlsConnector,
    cfg: &NetConfig,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, DialError> {
    let tcp = conn::connect(address, cfg)
        .await
        .map_err(DialError::Connect)?;
    match tokio::time::timeout(
        cfg.handshake_timeout,
        connector.connect(tls::server_name(), tcp),
    )
    .await
    {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(DialError::Rejected(tls::classify_handshake_error(&e))),
        Err(_) => Err(DialError::Rejected(RejectReason::HandshakeTimeout)),
    }
}

/// Sends queued frames until the link breaks. The peer must send nothing on this connection;
/// reading only watches for its close.
async fn run_outbound(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    rx: &mut mpsc::Receiver<Bytes>,
    cfg: &NetConfig,
    stats: &NetStats,
) -> Ended {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut batch = Vec::new();
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some(first) = m else { return Ended::QueueClosed };
                if let Err(ended) =
                    conn::write_batch(&mut wr, first, rx, &mut batch, cfg, stats, Side::Peer).await
                {
                    return ended;
                }
            }
            r = rd.read(&mut scratch) => {
                return match r {
                    Ok(0) => Ended::PeerClosed,
                    Ok(_) => Ended::Rejected(RejectReason::UnexpectedData),
                    Err(e) => {
                        tracing::debug!(error = %e, "outbound link read failed");
                        Ended::PeerClosed
                    }
                };
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, inner: Arc<Inner>) {
    let serve = |tcp, addr, slot| serve_inbound(tcp, addr, acceptor.clone(), inner.clone(), slot);
    conn::accept_loop(
        listener,
        inner.handshakes.clone(),
        &inner.stats,
        Side::Peer,
        serve,
    )
    .await;
}

/// Authenticates one inbound replica connection and delivers its frames.
async fn serve_inbound(
    tcp: TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    inner: Arc<Inner>,
    slot: Slot,
) {
    let stats = &inner.stats;
    let Some((tls, key)) =
        conn::handshake(tcp, addr, &acceptor, &inner.config, stats, Side::Peer, slot).await
    else {
        return;
    };
    // The verifier checked the key against the view, but the view may have changed since.
    let Some(from) = read(&inner.members).peer(&key) else {
        stats.reject(RejectReason::UnknownKey);
        tracing::warn!(%addr, ?key, "replica key not in the view");
        return;
    };
    let serial = inner.next_serial.fetch_add(1, Ordering::Relaxed);
    let close = Arc::new(Notify::new());
    {
        let mut links = lock(&inner.inbound_links);
        let link = InboundLink {
            serial,
            key,
            close: close.clone(),
        };
        // One inbound link per replica: a reconnecting peer replaces its stale link, and a
        // Byzantine one cannot hold many.
        if let Some(old) = links.insert(from, link) {
            old.close.notify_one();
        }
    }
    // A host that proved a member's key is a member's host, even when the view names it by a
    // name we could not resolve: its next handshakes (after a restart) take reserved slots.
    inner.handshakes.trust(addr.ip());
    stats.peer_accepts.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard::new(&stats.peer_inbound_open);
    tracing::info!(replica = %inner.me, peer = %from, %addr, "inbound link up");

    let mut tls = tls;
    let inbound = &inner.inbound;
    let deliver =
        |frame: Vec<u8>| async move { inbound.send(Inbound::Peer { from, frame }).await.is_ok() };
    let ended = tokio::select! {
        e = conn::read_frames(&mut tls, inner.config.max_frame, stats, Side::Peer, deliver) => e,
        _ = close.notified() => Ended::QueueClosed,
    };
    account(stats, ended);
    tracing::info!(replica = %inner.me, peer = %from, ?ended, "inbound link down");
    let mut links = lock(&inner.inbound_links);
    if links.get(&from).is_some_and(|l| l.serial == serial) {
        links.remove(&from);
    }
}
