//! Counters of the network runtime, shared with the node for `/metrics`. Relaxed atomics: each
//! counter is independent, and readers only need eventually consistent values.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a connection was closed or refused, or a frame dropped. Doubles as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The TLS handshake failed: garbage instead of a ClientHello, wrong protocol version, bad
    /// handshake signature, or the peer hung up mid-handshake.
    Handshake,
    /// The TLS handshake did not finish within the configured time.
    HandshakeTimeout,
    /// The certificate could not be parsed or does not carry an ed25519 key.
    BadCertificate,
    /// A well-formed ed25519 key that is not allowed here (not in the view, our own key, or not
    /// the key pinned for the replica we dialed).
    UnknownKey,
    /// A frame whose length header exceeds the frame limit (also counted when the node asks to
    /// send one, which is refused).
    Oversized,
    /// A read or write error (including malformed TLS records) on an established connection.
    Io,
    /// A peer sent bytes on a connection that we dialed, which carries only our messages.
    UnexpectedData,
    /// Too many concurrent handshakes or client connections.
    TooManyConnections,
    /// A write of queued frames did not complete in time.
    WriteTimeout,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::Handshake,
        RejectReason::HandshakeTimeout,
        RejectReason::BadCertificate,
        RejectReason::UnknownKey,
        RejectReason::Oversized,
        RejectReason::Io,
        RejectReason::UnexpectedData,
        RejectReason::TooManyConnections,
        RejectReason::WriteTimeout,
    ];

    /// A stable snake_case label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Handshake => "handshake",
            RejectReason::HandshakeTimeout => "handshake_timeout",
            RejectReason::BadCertificate => "bad_certificate",
            RejectReason::UnknownKey => "unknown_key",
            RejectReason::Oversized => "oversized",
            RejectReason::Io => "io",
            RejectReason::UnexpectedData => "unexpected_data",
            RejectReason::TooManyConnections => "too_many_connections",
            RejectReason::WriteTimeout => "write_timeout",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which kind of link a counter is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Peer,
    Client,
}

/// Network counters. Create one `Arc<NetStats>` per process and pass it to every component.
#[derive(Debug, Default)]
pub struct NetStats {
    pub peer_bytes_in: AtomicU64,
    pub peer_bytes_out: AtomicU64,
    pub peer_frames_in: AtomicU64,
    pub peer_frames_out: AtomicU64,
    pub client_bytes_in: AtomicU64,
    pub client_bytes_out: AtomicU64,
    pub client_frames_in: AtomicU64,
    pub client_frames_out: AtomicU64,
    /// Frames dropped because a peer's outbound queue was full.
    pub peer_queue_drops: AtomicU64,
    /// Frames dropped because a client connection's queue was full (the client does not read).
    pub client_queue_drops: AtomicU64,
    /// Outbound peer connections established (handshake done), ever.
    pub peer_dials: AtomicU64,
    /// Dials that did not end in an established link (refused, unreachable, handshake failed).
    pub peer_dial_failures: AtomicU64,
    /// Inbound peer connections authenticated, ever.
    pub peer_accepts: AtomicU64,
    /// Client connections authenticated, ever (on a listener) or established (on a connector).
    pub client_accepts: AtomicU64,
    /// Currently open authenticated connections.
    pub peer_outbound_open: AtomicU64,
    pub peer_inbound_open: AtomicU64,
    pub client_open: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
}

impl NetStats {
    /// Connections closed or refused, and frames refused, for `reason`.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()].load(Ordering::Relaxed)
    }

    /// Every reason with its count, for `/metrics`.
    pub fn rejected_by_reason(&self) -> Vec<(RejectReason, u64)> {
        RejectReason::ALL
            .iter()
            .map(|r| (*r, self.rejected(*r)))
            .collect()
    }

    pub(crate) fn reject(&self, reason: RejectReason) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn bytes_in(&self, side: Side, n: usize) {
        match side {
            Side::Peer => add(&self.peer_bytes_in, n),
            Side::Client => add(&self.client_bytes_in, n),
        }
    }

    pub(crate) fn frame_in(&self, side: Side) {
        match side {
            Side::Peer => add(&self.peer_frames_in, 1),
            Side::Client => add(&self.client_frames_in, 1),
        }
    }

    pub(crate) fn sent(&self, side: Side, frames: usize, bytes: usize) {
        match side {
            Side::Peer => {
                add(&self.peer_frames_out, frames);
                add(&self.peer_bytes_out, bytes);
            }
            Side::Client => {
                add(&self.client_frames_out, frames);
                add(&self.client_bytes_out, bytes);
            }
        }
    }

    pub(crate) fn queue_drop(&self, side: Side) {
        match side {
            Side::Peer => add(&self.peer_queue_drops, 1),
            Side::Client => add(&self.client_queue_drops, 1),
        }
    }
}

fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

/// Decrements an open-connection gauge when dropped, so that every exit path of a connection
/// task (including abort) keeps the gauge right.
pub(crate) struct OpenGuard<'a>(&'a AtomicU64);

impl<'a> OpenGuard<'a> {
    pub(crate) fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        OpenGuard(gauge)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter_and_label() {
        let s = NetStats::default();
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            s.reject(*r);
        }
        assert!(s.rejected_by_reason().iter().all(|(_, n)| *n == 1));
        let mut labels: Vec<_> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), RejectReason::ALL.len());
    }
}
