//! The network runtime: TCP + mutual TLS 1.3 pinned to ed25519 identities, length-prefixed
//! framing, bounded per-peer and per-connection queues, reconnection, and counters.
//!
//! # What this module owns
//!
//! Every byte that crosses a socket in a replica or a client proxy. It turns authenticated
//! connections into a stream of [`Inbound`] events carrying whole frames (payloads, without the
//! length header) tagged with the *authenticated* sender, and it sends payloads that the node
//! hands it. It never decodes a message, never retransmits (the protocol recovers lost
//! messages), never blocks a sender (full queues drop and count) and never panics on anything a
//! peer sends: malformed TLS, unknown keys and oversized frames close that one connection and are
//! counted by reason in [`NetStats`].
//!
//! # Why pinned keys and not a CA
//!
//! BFT-SMaRt secures replica links with TLS from one shared keystore, so TLS proves only that the
//! other end holds *some* key of the cluster, not *which* replica it is; a Byzantine replica could
//! then speak as another. Here every principal presents a self-signed certificate generated at
//! start-up from its own ed25519 key ([`kmmr_protocol::crypto::KeyPair`]), and each end accepts the other
//! iff the certificate's SubjectPublicKeyInfo is an ed25519 key that is allowed: for a replica
//! link, the key the current [`View`] lists for that replica; for a client link, any ed25519 key,
//! which then *is* the [`ClientId`]. Names, issuers and validity dates are ignored; the handshake
//! signature (TLS 1.3 `CertificateVerify`) is checked with ring, which proves possession of the
//! private key. Session resumption is disabled so that every connection re-proves its key against
//! the current view.
//!
//! # Shape
//!
//! * Replica mesh, [`PeerNetwork`]: each replica listens on its view address and dials every other
//!   member. Links are unidirectional: the connection a replica dials carries only its outbound
//!   messages, and inbound connections only deliver. One inbound connection per peer is kept (a
//!   newer one from the same replica replaces the older). Each peer has a bounded outbound queue
//!   ([`NetConfig::peer_queue`]); the dialer reconnects with exponential back-off
//!   ([`NetConfig::backoff_min`] doubling to [`NetConfig::backoff_max`]). Frames still queued
//!   while a peer is down are kept (up to the bound) and sent once it is back; frames that were
//!   written to a connection that then broke are not resent.
//! * Client listener, [`ClientListener`]: accepts any ed25519 client key on a separate address
//!   (by convention [`client_address`] of the replica address: port + 1000), gives each
//!   connection a [`ConnId`], delivers its frames with the authenticated [`ClientId`], and lets
//!   the node reply by `ConnId` through a bounded per-connection queue.
//! * Client side, [`ClientConnector`]: a client proxy dials each replica's client address pinned
//!   to the member's key and gets a [`ReplicaLink`] to send on; frames from all replicas go to its
//!   [`LinkEvents`]: one channel of [`FromReplica`] events that the proxy owns, or a handler that
//!   acts on each frame in the link's task.
//!
//! # How the node uses it
//!
//! ```text
//! let stats = Arc::new(NetStats::default());
//! let (tx, mut rx) = tokio::sync::mpsc::channel::<Inbound>(10_000);
//! let cfg = NetConfig::default();
//! let peers = PeerNetwork::bind(&my_key, me, &view, "0.0.0.0:7000", cfg.clone(), tx.clone(),
//!     stats.clone()).await?;
//! let clients = ClientListener::bind(&my_key, "0.0.0.0:8000", cfg, tx, stats.clone()).await?;
//! while let Some(ev) = rx.recv().await {
//!     match ev {
//!         Inbound::Peer { from, frame } => { /* decode; the sender field must equal `from` */ }
//!         Inbound::Client { conn, client, frame } => { /* the request's client must equal `client` */ }
//!         Inbound::ClientGone { conn, .. } => { /* forget `conn` */ }
//!     }
//! }
//! peers.send(to, &payload)?;         // never blocks; Err only says why it was dropped
//! peers.broadcast(&payload);         // every other view member
//! clients.send(conn, &reply)?;       // never blocks
//! peers.update_view(&new_view);      // adds/removes peers, re-pins keys
//! ```
//!
//! # How a client dials
//!
//! ```text
//! let connector = ClientConnector::new(&client_key, NetConfig::default(), stats)?;
//! let (tx, mut rx) = tokio::sync::mpsc::channel::<FromReplica>(1024);
//! let link = connector.dial(&member, tx.clone()).await?; // to client_address(member.address)
//! link.send(&request)?;                                  // never blocks
//! match rx.recv().await {
//!     Some(FromReplica::Frame { from, link, frame }) => { /* a reply from replica `from` */ }
//!     Some(FromReplica::Closed { from, link }) => { /* re-dial `from` if `link` is current */ }
//!     None => {}
//! }
//! ```
//!
//! Inbound delivery applies backpressure instead of dropping: when the node's channel is full,
//! connections stop reading and TCP flow control slows the senders. Outbound sends never wait.
//!
//! Dropping a [`PeerNetwork`], [`ClientListener`] or [`ReplicaLink`] closes its sockets and stops
//! its tasks. Everything here must run inside a tokio runtime.
//!
//! [`View`]: kmmr_protocol::view::View

mod client;
mod conn;
#[cfg(feature = "http")]
pub mod http;
mod peer;
pub mod slots;
mod stats;
mod tls;

use std::time::Duration;

pub use client::{ClientConnector, ClientListener, FromReplica, LinkEvents, LinkId, ReplicaLink};
pub use conn::port_in_time_wait;
pub use peer::PeerNetwork;
pub use stats::{NetStats, RejectReason};
pub use tls::{ed25519_key_of_certificate, server_name, LinkKind, PeerProtocol, TlsIdentity};

use kmmr_protocol::wire::ids::ReplicaId;
use kmmr_protocol::wire::limits;
pub use kmmr_protocol::wire::messages::ClientId;

/// A client connection accepted by a [`ClientListener`]; unique for the listener's lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// What the network delivers to the node, on the one channel given at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A frame from a replica; `from` is proven by the TLS handshake against the view's key.
    Peer { from: ReplicaId, frame: Vec<u8> },
    /// A frame from a client connection; `client` is the key the client proved in the handshake.
    Client {
        conn: ConnId,
        client: ClientId,
        frame: Vec<u8>,
    },
    /// A client connection closed; replies to `conn` are dropped from now on.
    ClientGone { conn: ConnId, client: ClientId },
}

/// Tunables, with defaults for a replica. Every queue is bounded.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Frames queued per peer before new ones are dropped (and counted).
    pub peer_queue: usize,
    /// Frames queued per client connection (replies, or requests on the client side).
    pub client_queue: usize,
    /// Largest frame accepted from the network (at most [`limits::MAX_FRAME`]).
    pub max_frame: usize,
    /// First reconnection delay; doubles on every failure up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// TCP connect bound for dialers.
    pub connect_timeout: Duration,
    /// A TLS handshake (in either role) that takes longer is abandoned and counted.
    pub handshake_timeout: Duration,
    /// A batch write that does not finish in this time closes the connection (a peer that stops
    /// reading must not pin memory forever).
    pub write_timeout: Duration,
    /// Concurrent unauthenticated handshakes per listener; more are refused and counted.
    pub max_handshakes: usize,
    /// Of those, how many one source address (IPv4 host, IPv6 /64) may hold, so that one host
    /// cannot hold them all.
    pub max_handshakes_per_source: usize,
    /// Of those, how many on the replica port only hosts of view members may take (strangers
    /// can never starve a rejoining replica). Members' hosts have no per-source bound there.
    pub reserved_peer_handshakes: usize,
    /// Open client connections per [`ClientListener`]; more are refused and counted.
    pub max_client_connections: usize,
    /// Bytes gathered from queued frames into one write.
    pub write_batch_bytes: usize,
    /// The floor of every link's TCP retransmission timeout, and the longest a link delays an
    /// acknowledgement (kept below that floor), where the kernel lets a socket set them (recent
    /// Linux, 6.18 on this project's machines; older kernels keep their 200 ms). A link carries one small message at a
    /// time, so a lost segment waited for Linux's tail loss probe: 200-250 ms of stalled
    /// consensus per loss on a flooded port (`bench/paper`). `None` leaves the kernel's values.
    pub tcp_timers: Option<TcpTimers>,
    /// The newest replica protocol this replica speaks ([`PeerProtocol::NEWEST`]); an older one
    /// makes it talk as a replica of an older release would, for tests of a rolling upgrade.
    pub peer_protocol: PeerProtocol,
}

/// See [`NetConfig::tcp_timers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpTimers {
    pub rto_min: Duration,
    pub delack_max: Duration,
}

impl Default for TcpTimers {
    fn default() -> Self {
        // LAN values: Linux still keeps the timeout above the smoothed round trip plus four times
        // its variation, so a slower link gets a longer one.
        TcpTimers {
            rto_min: Duration::from_millis(10),
            delack_max: Duration::from_millis(5),
        }
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            peer_queue: 10_000,
            client_queue: 1_000,
            max_frame: limits::MAX_FRAME,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            max_handshakes_per_source: 16,
            reserved_peer_handshakes: 64,
            max_client_connections: 10_000,
            write_batch_bytes: 256 * 1024,
            tcp_timers: Some(TcpTimers::default()),
            peer_protocol: PeerProtocol::NEWEST,
        }
    }
}

impl NetConfig {
    /// The handshake slots of one listener, `reserved` of them for trusted hosts.
    pub(crate) fn handshake_slots(&self, reserved: usize) -> slots::Slots {
        slots::Slots::new(slots::SlotLimits {
            total: self.max_handshakes,
            per_source: self.max_handshakes_per_source,
            reserved,
        })
    }
}

/// Why a network component could not start or a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        addr: String,
        source: std::io::Error,
    },
    #[error("{what} with {addr} timed out")]
    Timeout { what: &'static str, addr: String },
    #[error("cannot build the TLS certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("address {0:?} is not host:port with a port below 64536")]
    BadAddress(String),
}

/// Why a frame was not queued. The frame is dropped; the event is counted in [`NetStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("no such peer or connection")]
    Unknown,
    #[error("the frame exceeds the frame limit")]
    Oversized,
    #[error("the queue is full")]
    QueueFull,
    #[error("the connection is closed")]
    Closed,
}

/// The client listener address of a replica whose replica listener is `member_address`: the same
/// host with the port plus 1000. Everybody (node, client proxy, operator) uses this convention.
pub fn client_address(member_address: &str) -> Result<String, NetError> {
    let bad = || NetError::BadAddress(member_address.to_owned());
    let (host, port) = member_address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let port = port.checked_add(1000).ok_or_else(bad)?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_address_adds_one_thousand_to_the_port() {
        assert_eq!(client_address("127.0.0.1:7000").unwrap(), "127.0.0.1:8000");
        assert_eq!(client_address("[::1]:7001").unwrap(), "[::1]:8001");
        assert_eq!(
            client_address("kmmr-0.kmmr.ns.svc:7000").unwrap(),
            "kmmr-0.kmmr.ns.svc:8000"
        );
        assert!(client_address("127.0.0.1").is_err());
        assert!(client_address("127.0.0.1:65000").is_err());
        assert!(client_address(":7000").is_err());
    }
}
