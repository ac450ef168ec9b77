//! The replica's file descriptors, split between its storage and its listeners so that running
//! out of them degrades the listeners, never the write-ahead log.
//!
//! Under a 1,024 descriptor limit, idle connections to one port took every descriptor, and the
//! replica exited when its log could not open a file ("Too many open files"). Now, at start-up,
//! the soft limit is raised to the hard one (as Go's runtime does), a fixed share is kept for what
//! is not a listener's (storage files, links to peers, the runtime), and each listener's bounds
//! are cut so that together they can never take more than the rest. A listener at its bound
//! refuses new connections (counted), so `accept` never meets EMFILE while storage needs one.

use kmmr_net::NetConfig;

use super::http::HttpLimits;

/// Descriptors kept for everything but the listeners' accepted connections: the write-ahead
/// log, checkpoints being written and served, the promise files, directory syncs, logs, the
/// runtime's own (epoll, eventfd), and slack.
const STORAGE_AND_RUNTIME: u64 = 160;

/// Descriptors per other member of the view: the link we dial and the one it dials to us.
const PER_PEER: u64 = 2;

/// The soft limit after raising it as far as the hard limit allows (None: unlimited).
pub fn raise_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let raised = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => lim = raised,
            Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit"),
        }
    }
    lim.current
}

/// The bounds of the replica's listeners (the replica port, the client port, HTTP) under a
/// descriptor limit of `limit`, in a view of `n` members.
#[derive(Debug, Clone)]
pub struct ListenerBudget {
    pub peers: NetConfig,
    pub clients: NetConfig,
    pub http: HttpLimits,
    /// Descriptors the listeners may take together, at most.
    pub listeners: u64,
}

/// Cuts the default bounds of the listeners to fit `limit` (None: no limit, the defaults).
pub fn budget(limit: Option<u64>, n: usize) -> ListenerBudget {
    let peers = NetConfig::default();
    let clients = NetConfig::default();
    let http = HttpLimits::default();
    let wanted = (peers.max_handshakes + clients.max_handshakes) as u64
        + clients.max_client_connections as u64
        + http.connections as u64;
    let kept = STORAGE_AND_RUNTIME + PER_PEER * n as u64;
    let listeners = match limit {
        // The listeners get what is left, and always a little: a replica that cannot take a
        // connection is no use either (the limit is then too low, and we say so).
        Some(l) => l.saturating_sub(kept).max(16),
        None => wanted,
    };
    let mut b = ListenerBudget {
        peers,
        clients,
        http,
        listeners,
    };
    if listeners >= wanted {
        return b;
    }
    // Handshakes and HTTP first, an eighth each at most (they are short-lived and their bounds
    // are per source as well); established client connections get the rest.
    let eighth = (listeners / 8).max(1) as usize;
    b.peers.max_handshakes = b.peers.max_handshakes.min(eighth);
    b.peers.reserved_peer_handshakes = b
        .peers
        .reserved_peer_handshakes
        .min(b.peers.max_handshakes / 4);
    b.clients.max_handshakes = b.clients.max_handshakes.min(eighth);
    b.http.connections = b.http.connections.min(eighth);
    let taken = (b.peers.max_handshakes + b.clients.max_handshakes + b.http.connections) as u64;
    b.clients.max_client_connections = listeners.saturating_sub(taken).max(1) as usize;
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(b: &ListenerBudget) -> u64 {
        (b.peers.max_handshakes + b.clients.max_handshakes + b.clients.max_client_connections)
            as u64
            + b.http.connections as u64
    }

    #[test]
    fn listeners_never_take_what_storage_needs() {
        for limit in [256u64, 400, 1024, 4096, 20_000] {
            for n in [4usize, 7, 31] {
                let b = budget(Some(limit), n);
                assert!(
                    total(&b) + STORAGE_AND_RUNTIME + PER_PEER * n as u64 <= limit,
                    "limit {limit}, n {n}: {b:?}"
                );
                assert!(b.peers.reserved_peer_handshakes <= b.peers.max_handshakes);
                assert!(b.clients.max_client_connections >= 1);
            }
        }
    }

    #[test]
    fn a_generous_limit_keeps_the_defaults() {
        let b = budget(Some(1 << 20), 4);
        assert_eq!(b.clients.max_client_connections, 10_000);
        assert_eq!(b.http, HttpLimits::default());
        assert_eq!(budget(None, 4).peers.max_handshakes, 256);
    }
}
