//! Client links, both ends: the replica's [`ClientListener`] and the client proxy's
//! [`ClientConnector`].
//!
//! Any ed25519 key may connect as a client: the key it proves in the handshake is its
//! [`ClientId`], so the node can check that every request on a connection was made by the
//! connection's owner. The replica end is pinned by the client to the key its view lists.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::conn::{self, account};
use super::slots::Slot;
use super::stats::{NetStats, OpenGuard, Side};
use super::tls::{self, AnyKey, TlsIdentity, ALPN_CLIENT};
use super::SendError;
use super::{client_address, ClientId, ConnId, Inbound, NetConfig, NetError, RejectReason};
use kmmr_protocol::crypto::{KeyPair, PublicKey};
use kmmr_protocol::view::Member;
use kmmr_protocol::wire::frame::encode_frame;
use kmmr_protocol::wire::ids::ReplicaId;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn frame(payload: &[u8], stats: &NetStats) -> Result<Bytes, SendError> {
    match encode_frame(payload) {
        Ok(f) => Ok(Bytes::from(f)),
        Err(e) => {
            tracing::warn!(error = %e, "refusing to send an oversized frame");
            stats.reject(RejectReason::Oversized);
            Err(SendError::Oversized)
        }
    }
}

fn enqueue(queue: &mpsc::Sender<Bytes>, frame: Bytes, stats: &NetStats) -> Result<(), SendError> {
    match queue.try_send(frame) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(_)) => {
            stats.queue_drop(Side::Client);
            Err(SendError::QueueFull)
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
    }
}

struct ClientConn {
    queue: mpsc::Sender<Bytes>,
    close: Arc<Notify>,
}

struct ListenerInner {
    config: NetConfig,
    stats: Arc<NetStats>,
    inbound: mpsc::Sender<Inbound>,
    conns: Mutex<HashMap<ConnId, ClientConn>>,
    next_conn: AtomicU64,
}

/// A replica's listener for client connections. See the [module docs](crate::net).
pub struct ClientListener {
    inner: Arc<ListenerInner>,
    accept_task: Option<JoinHandle<()>>,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for ClientListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientListener")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl ClientListener {
    /// Listens on `listen` (by convention [`client_address`] of the replica's view address).
    pub async fn bind(
        key: &KeyPair,
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
        Self::with_listener(key, listener, config, inbound, stats)
    }

    /// As [`ClientListener::bind`], on a listener the caller bound.
    pub fn with_listener(
        key: &KeyPair,
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
        let server = tls::server_config(&identity, AnyKey, &[ALPN_CLIENT])?;
        let inner = Arc::new(ListenerInner {
            config,
            stats,
            inbound,
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        });
        let accept_task = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(server),
            inner.clone(),
        ));
        tracing::info!(%local_addr, "client listener up");
        Ok(ClientListener {
            inner,
            accept_task: Some(accept_task),
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Queues a reply on connection `conn`. Never blocks: a client that does not read fills its
    /// queue and loses replies, counted in [`NetStats::client_queue_drops`].
    pub fn send(&self, conn: ConnId, payload: &[u8]) -> Result<(), SendError> {
        let frame = frame(payload, &self.inner.stats)?;
        let conns = lock(&self.inner.conns);
        let Some(c) = conns.get(&conn) else {
            return Err(SendError::Unknown);
        };
        enqueue(&c.queue, frame, &self.inner.stats)
    }

    /// Closes connection `conn` (e.g. its client misbehaved); an [`Inbound::ClientGone`] follows.
    pub fn close(&self, conn: ConnId) {
        if let Some(c) = lock(&self.inner.conns).get(&conn) {
            c.close.notify_one();
        }
    }

    /// Open authenticated client connections.
    pub fn connections(&self) -> usize {
        lock(&self.inner.conns).len()
    }

    /// Stops listening, closes every client connection, and waits until the socket is closed.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for ClientListener {
    fn drop(&mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, inner: Arc<ListenerInner>) {
    let serve = |tcp, addr, slot| serve_client(tcp, addr, acceptor.clone(), inner.clone(), slot);
    let handshakes = inner.config.handshake_slots(0);
    conn::accept_loop(listener, handshakes, &inner.stats, Side::Client, serve).await;
}

async fn serve_client(
    tcp: TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    inner: Arc<ListenerInner>,
    slot: Slot,
) {
    let stats = &inner.stats;
    let Some((tls, client)) = conn::handshake(
        tcp,
        addr,
        &acceptor,
        &inner.config,
        stats,
        Side::Client,
        slot,
    )
    .await
    else {
        return;
    };
    let conn = ConnId(inner.next_conn.fetch_add(1, Ordering::Relaxed));
    let close = Arc::new(Notify::new());
    let (queue, mut rx) = mpsc::channel(inner.config.client_queue.max(1));
    {
        let mut conns = lock(&inner.conns);
        if conns.len() >= inner.config.max_client_connections {
            drop(conns);
            stats.reject(RejectReason::TooManyConnections);
            tracing::debug!(%addr, "too many client connections; refusing");
            return;
        }
        conns.insert(
            conn,
            ClientConn {
                queue,
                close: close.clone(),
            },
        );
    }
    stats.client_accepts.fetch_add(1, Ordering::Relaxed);
    let open = OpenGuard::new(&stats.client_open);
    tracing::debug!(?conn, ?client, %addr, "client connected");

    let inbound = &inner.inbound;
    let deliver = |frame: Vec<u8>| async move {
        inbound
            .send(Inbound::Client {
                conn,
                client,
                frame,
            })
            .await
            .is_ok()
    };
    let ended = conn::run_duplex(
        tls,
        &mut rx,
        &inner.config,
        stats,
        Side::Client,
        &close,
        deliver,
    )
    .await;
    account(stats, ended);
    drop(open);
    lock(&inner.conns).remove(&conn);
    tracing::debug!(?conn, ?ended, "client gone");
    let _ = inner
        .inbound
        .send(Inbound::ClientGone { conn, client })
        .await;
}

/// Identifies one [`ReplicaLink`] among the links of a [`ClientConnector`], so that a proxy that
/// re-dials a replica can tell the old link's [`FromReplica::Closed`] from the new one's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkId(pub u64);

/// What a client proxy receives from the replicas it dialed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromReplica {
    /// A frame from replica `from`, authenticated by its pinned key.
    Frame {
        from: ReplicaId,
        link: LinkId,
        frame: Vec<u8>,
    },
    /// The link closed (replica gone, network error, or a misbehaving frame); dial again.
    Closed { from: ReplicaId, link: LinkId },
}

/// Where a [`ReplicaLink`] delivers what it hears, in the link's own task: a channel of
/// [`FromReplica`] that a proxy drains, or a handler that acts on each reply where it arrives
/// (which spares a wake-up of another task per reply).
pub trait LinkEvents: Send + Sync + 'static {
    /// A frame from replica `from`, authenticated by its pinned key. False closes the link.
    fn frame(
        &self,
        from: ReplicaId,
        link: LinkId,
        frame: Vec<u8>,
    ) -> impl std::future::Future<Output = bool> + Send;

    /// The link closed (not sent for a link its owner dropped).
    fn closed(&self, from: ReplicaId, link: LinkId)
        -> impl std::future::Future<Output = ()> + Send;
}

impl LinkEvents for mpsc::Sender<FromReplica> {
    async fn frame(&self, from: ReplicaId, link: LinkId, frame: Vec<u8>) -> bool {
        self.send(FromReplica::Frame { from, link, frame })
            .await
            .is_ok()
    }

    async fn closed(&self, from: ReplicaId, link: LinkId) {
        let _ = self.send(FromReplica::Closed { from, link }).await;
    }
}

/// The client side of client links: dials replicas with the client's key. Cheap to share.
#[derive(Debug)]
pub struct ClientConnector {
    identity: TlsIdentity,
    config: NetConfig,
    stats: Arc<NetStats>,
    next_link: AtomicU64,
}

impl ClientConnector {
    pub fn new(key: &KeyPair, config: NetConfig, stats: Arc<NetStats>) -> Result<Self, NetError> {
        Ok(ClientConnector {
            identity: TlsIdentity::new(key)?,
            config,
            stats,
            next_link: AtomicU64::new(1),
        })
    }

    /// The client's identity as replicas will see it.
    pub fn client_id(&self) -> ClientId {
        self.identity.public()
    }

    /// Dials `member`'s client listener at [`client_address`]`(member.address)`, accepting only
    /// `member.key`. Frames from it, and its closing, go to `events`.
    pub async fn dial(
        &self,
        member: &Member,
        events: impl LinkEvents,
    ) -> Result<ReplicaLink, NetError> {
        let addr = client_address(&member.address)?;
        self.dial_addr(member.id, member.key, &addr, events).await
    }

    /// Dials a replica's client listener at an explicit address.
    pub async fn dial_addr(
        &self,
        replica: ReplicaId,
        key: PublicKey,
        addr: &str,
        events: impl LinkEvents,
    ) -> Result<ReplicaLink, NetError> {
        let config = tls::client_config(&self.identity, key, &[ALPN_CLIENT])?;
        let tcp = conn::connect(addr, &self.config)
            .await
            .map_err(|source| NetError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let tls = match tokio::time::timeout(
            self.config.handshake_timeout,
            TlsConnector::from(config).connect(tls::server_name(), tcp),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                self.stats.reject(tls::classify_handshake_error(&source));
                return Err(NetError::Handshake {
                    addr: addr.to_owned(),
                    source,
                });
            }
            Err(_) => {
                self.stats.reject(RejectReason::HandshakeTimeout);
                return Err(NetError::Timeout {
                    what: "TLS handshake",
                    addr: addr.to_owned(),
                });
            }
        };
        let link = LinkId(self.next_link.fetch_add(1, Ordering::Relaxed));
        let (queue, mut rx) = mpsc::channel(self.config.client_queue.max(1));
        let config = self.config.clone();
        let stats = self.stats.clone();
        self.stats.client_accepts.fetch_add(1, Ordering::Relaxed);
        let task = tokio::spawn(async move {
            let _open = OpenGuard::new(&stats.client_open);
            let close = Notify::new();
            let events_ref = &events;
            let deliver = |frame: Vec<u8>| events_ref.frame(replica, link, frame);
            let ended =
                conn::run_duplex(tls, &mut rx, &config, &stats, Side::Client, &close, deliver)
                    .await;
            account(&stats, ended);
            tracing::debug!(%replica, ?link, ?ended, "replica link closed");
            events.closed(replica, link).await;
        });
        Ok(ReplicaLink {
            replica,
            link,
            queue,
            stats: self.stats.clone(),
            task,
        })
    }
}

/// A client's connection to one replica. Dropping it closes the connection (no
/// [`FromReplica::Closed`] is sent for a link its owner dropped).
#[derive(Debug)]
pub struct ReplicaLink {
    replica: ReplicaId,
    link: LinkId,
    queue: mpsc::Sender<Bytes>,
    stats: Arc<NetStats>,
    task: JoinHandle<()>,
}

impl ReplicaLink {
    pub fn replica(&self) -> ReplicaId {
        self.replica
    }

    pub fn id(&self) -> LinkId {
        self.link
    }

    /// Queues `payload` for the replica. Never blocks; a full queue drops and counts.
    pub fn send(&self, payload: &[u8]) -> Result<(), SendError> {
        let frame = frame(payload, &self.stats)?;
        enqueue(&self.queue, frame, &self.stats)
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for ReplicaLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
