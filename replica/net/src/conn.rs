//! The loops that move frames over one established TLS connection: reading frames into the
//! node, and writing queued frames in batches. Shared by replica and client links.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::slots::{Slot, SlotRefusal, Slots};
use super::stats::{NetStats, Side};
use super::tls;
use super::{NetConfig, RejectReason};
use kmmr_protocol::crypto::PublicKey;
use kmmr_protocol::wire::frame::{FrameDecoder, FrameError};

/// Plaintext read size. rustls hands out at most one record (16 KiB) per read anyway, and a small
/// buffer keeps the frame decoder's per-frame compaction cheap.
const READ_BUF: usize = 8 * 1024;

/// Why a connection loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The other end closed or reset the connection.
    PeerClosed,
    /// Every sender of our outbound queue is gone: this link is no longer wanted.
    QueueClosed,
    /// The consumer of inbound frames is gone (the node is shutting down).
    ReceiverGone,
    /// We closed it for this counted reason.
    Rejected(RejectReason),
}

/// Counts `Ended::Rejected` in `stats`.
pub(crate) fn account(stats: &NetStats, ended: Ended) {
    if let Ended::Rejected(r) = ended {
        stats.reject(r);
    }
}

/// How a read error ends a connection: a reset or a close without TLS close_notify is an
/// ordinary disconnect; anything else (malformed TLS records, for one) is counted.
fn read_error(e: &io::Error) -> Ended {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Ended::PeerClosed,
        _ => Ended::Rejected(RejectReason::Io),
    }
}

/// Reads frames until the stream ends or misbehaves, handing each to `deliver`, which returns
/// false once its consumer is gone.
pub(crate) async fn read_frames<R, F, Fut>(
    rd: &mut R,
    max_frame: usize,
    stats: &NetStats,
    side: Side,
    mut deliver: F,
) -> Ended
where
    R: AsyncRead + Unpin,
    F: FnMut(Vec<u8>) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut decoder = FrameDecoder::new(max_frame);
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => return Ended::PeerClosed,
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "read failed");
                return read_error(&e);
            }
        };
        stats.bytes_in(side, n);
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    stats.frame_in(side);
                    if !deliver(frame).await {
                        return Ended::ReceiverGone;
                    }
                }
                Ok(None) => break,
                Err(FrameError::Oversized { len, limit }) => {
                    tracing::warn!(len, limit, "oversized frame; closing the connection");
                    return Ended::Rejected(RejectReason::Oversized);
                }
            }
        }
    }
}

/// Writes `first` and whatever else is already queued (up to `cfg.write_batch_bytes`) in one
/// `write_all`, so that a burst of small frames costs one TLS record run and one syscall.
pub(crate) async fn write_batch<W>(
    wr: &mut W,
    first: Bytes,
    rx: &mut mpsc::Receiver<Bytes>,
    batch: &mut Vec<u8>,
    cfg: &NetConfig,
    stats: &NetStats,
    side: Side,
) -> Result<(), Ended>
where
    W: AsyncWrite + Unpin,
{
    batch.clear();
    batch.extend_from_slice(&first);
    let mut frames = 1;
    while batch.len() < cfg.write_batch_bytes {
        match rx.try_recv() {
            Ok(f) => {
                batch.extend_from_slice(&f);
                frames += 1;
            }
            Err(_) => break,
        }
    }
    let write = async {
        wr.write_all(batch).await?;
        wr.flush().await
    };
    match tokio::time::timeout(cfg.write_timeout, write).await {
        Ok(Ok(())) => {
            stats.sent(side, frames, batch.len());
            // A maximal frame must not pin 16 MiB per idle connection.
            if batch.capacity() > 4 * cfg.write_batch_bytes {
                *batch = Vec::new();
            }
            Ok(())
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "write failed");
            Err(read_error(&e))
        }
        Err(_) => Err(Ended::Rejected(RejectReason::WriteTimeout)),
    }
}

/// Drives a connection that both delivers frames and sends queued ones, until either direction
/// ends or `close` fires.
pub(crate) async fn run_duplex<S, F, Fut>(
    stream: S,
    rx: &mut mpsc::Receiver<Bytes>,
    cfg: &NetConfig,
    stats: &NetStats,
    side: Side,
    close: &tokio::sync::Notify,
    deliver: F,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Vec<u8>) -> Fut,
    Fut: Future<Output = bool>,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let reader = read_frames(&mut rd, cfg.max_frame, stats, side, deliver);
    let writer = async {
        let mut batch = Vec::new();
        loop {
            let Some(first) = rx.recv().await else {
                return Ended::QueueClosed;
            };
            if let Err(ended) = write_batch(&mut wr, first, rx, &mut batch, cfg, stats, side).await
            {
                return ended;
            }
        }
    };
    let ended = tokio::select! {
        e = reader => e,
        e = writer => e,
        _ = close.notified() => Ended::QueueClosed,
    };
    // Best effort: tell the other end we are done (TLS close_notify), without waiting long.
    let mut stream = rd.unsplit(wr);
    let _ = tokio::time::timeout(Duration::from_millis(100), stream.shutdown()).await;
    ended
}

/// Connects with a bound on the time, and turns off Nagle: frames are small and latency-bound,
/// and batching is done above TCP.
pub(crate) async fn connect(addr: &str, cfg: &NetConfig) -> io::Result<TcpStream> {
    let tcp = tokio::time::timeout(cfg.connect_timeout, dial(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.set_nodelay(true)?;
    tune_timers(&tcp, cfg);
    Ok(tcp)
}

/// `TcpStream::connect` from a socket with SO_REUSEADDR. An outgoing connection's local port
/// comes from the kernel's ephemeral range, where users also pick listening ports, and the end
/// that closes first holds that port in TIME_WAIT for a minute. A TIME_WAIT left by a socket
/// without SO_REUSEADDR keeps every listener off the port meanwhile; one with it does not
/// (listeners here bind with SO_REUSEADDR too), so a client that just stopped, or a replica's
/// dial to a peer, never stops a replica from starting on that port.
async fn dial(addr: &str) -> io::Result<TcpStream> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let sock = if a.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        match sock.connect(a).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// Whether a TCP connection whose local port is `port` is in TIME_WAIT (from /proc/net/tcp and
/// tcp6, where the local address ends in the port in hex and state 06 is TIME_WAIT).
pub fn port_in_time_wait(port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let mut fields = line.split_whitespace().skip(1);
                let local = fields.next().unwrap_or("");
                let state = fields.nth(1).unwrap_or("");
                local.ends_with(&suffix) && state == "06"
            })
        })
    })
}

/// Applies [`NetConfig::tcp_timers`] to a link, best effort: a kernel without the options (or
/// a socket that refuses them) keeps its defaults, which cost latency on a lossy link, not
/// correctness.
fn tune_timers(tcp: &TcpStream, cfg: &NetConfig) {
    use kmmr_sockopt::{set, unsupported, TcpOption};
    let Some(t) = cfg.tcp_timers else { return };
    for (option, value) in [
        (TcpOption::RtoMin, t.rto_min),
        (TcpOption::DelackMax, t.delack_max),
    ] {
        if let Err(e) = set(tcp, option, value) {
            if !unsupported(&e) {
                tracing::debug!(?option, error = %e, "cannot set a TCP timer");
            }
        }
    }
}

/// Accepts connections on `listener` until the task is dropped and runs `serve` on each, with a
/// slot of `handshakes` held while its TLS handshake is in progress: a flood of connections that
/// never finish their handshake is refused and counted instead of holding every task and socket,
/// and since one source address may hold only its share of the slots (and view members have
/// slots strangers cannot take), one attacking host cannot starve new clients or a rejoining
/// replica. Replica links and client links share it; `side` names which in logs and counters.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    handshakes: Slots,
    stats: &NetStats,
    side: Side,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, addr)) => {
                    let slot = match handshakes.try_acquire(addr.ip()) {
                        Ok(s) => s,
                        Err(why) => {
                            stats.reject(RejectReason::TooManyConnections);
                            let whose = match why {
                                SlotRefusal::SourceFull => "from this address",
                                SlotRefusal::PoolFull => "",
                            };
                            log(side, format_args!("{addr}: too many {} handshakes in progress {whose}; refusing", noun(side)));
                            continue;
                        }
                    };
                    conns.spawn(serve(tcp, addr, slot));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, ?side, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

/// The server side of a TLS handshake on an accepted connection, within
/// `config.handshake_timeout`, and the ed25519 key the peer's certificate names. A failure is
/// counted by its reason, logged, and gives `None`. The handshake slot is released once the
/// handshake is over, whatever its outcome.
pub(crate) async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    acceptor: &TlsAcceptor,
    config: &NetConfig,
    stats: &NetStats,
    side: Side,
    slot: Slot,
) -> Option<(TlsStream<TcpStream>, PublicKey)> {
    let _ = tcp.set_nodelay(true);
    tune_timers(&tcp, config);
    let accepted = tokio::time::timeout(config.handshake_timeout, acceptor.accept(tcp)).await;
    drop(slot);
    let tls = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = tls::classify_handshake_error(&e);
            stats.reject(reason);
            log(
                side,
                format_args!(
                    "{addr}: {} handshake refused ({}): {e}",
                    noun(side),
                    reason.as_str()
                ),
            );
            return None;
        }
        Err(_) => {
            stats.reject(RejectReason::HandshakeTimeout);
            log(
                side,
                format_args!("{addr}: {} handshake timed out", noun(side)),
            );
            return None;
        }
    };
    match tls::peer_key(tls.get_ref().1.peer_certificates()) {
        Ok(key) => Some((tls, key)),
        Err(e) => {
            stats.reject(RejectReason::BadCertificate);
            log(
                side,
                format_args!("{addr}: {} certificate unreadable: {e}", noun(side)),
            );
            None
        }
    }
}

fn noun(side: Side) -> &'static str {
    match side {
        Side::Peer => "replica",
        Side::Client => "client",
    }
}

/// A refused connection: a warning from a replica (which should never happen between correct
/// replicas), a debug line from a client (anyone may dial the client port).
fn log(side: Side, msg: std::fmt::Arguments<'_>) {
    match side {
        Side::Peer => tracing::warn!("{msg}"),
        Side::Client => tracing::debug!("{msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmmr_sockopt::{get, set, unsupported, TcpOption};

    /// Both ends of a link get the configured timers: the dialer in `connect`, the acceptor in
    /// `handshake` (through the same `tune_timers`). A kernel without the options is skipped.
    #[tokio::test]
    async fn a_dialed_link_has_the_configured_tcp_timers() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let raw = std::net::TcpStream::connect(probe.local_addr().expect("addr")).expect("dial");
        if let Err(e) = set(&raw, TcpOption::RtoMin, Duration::from_millis(10)) {
            assert!(unsupported(&e), "{e}");
            return;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let cfg = NetConfig::default();
        let t = cfg.tcp_timers.expect("timers are on by default");
        let (dialed, accepted) = tokio::join!(connect(&addr, &cfg), listener.accept());
        let dialed = dialed.expect("connect");
        let slack = Duration::from_millis(10);
        let rto = get(&dialed, TcpOption::RtoMin).expect("get");
        assert!(
            rto >= t.rto_min && rto <= t.rto_min + slack,
            "rto_min {rto:?}"
        );
        let delack = get(&dialed, TcpOption::DelackMax).expect("get");
        assert!(
            delack >= t.delack_max && delack <= t.delack_max + slack,
            "delack_max {delack:?}"
        );
        // An accepted socket keeps the kernel's 200 ms until it is tuned.
        let (accepted, _) = accepted.expect("accept");
        assert!(get(&accepted, TcpOption::RtoMin).expect("get") >= Duration::from_millis(200));
        tune_timers(&accepted, &cfg);
        assert!(get(&accepted, TcpOption::RtoMin).expect("get") <= t.rto_min + slack);
    }
    /// A dialed link that this end closes first leaves its local port in TIME_WAIT for a
    /// minute; a listener must still be able to bind that port (`dial`'s SO_REUSEADDR).
    #[tokio::test]
    async fn a_closed_dialed_link_keeps_no_listener_off_its_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let cfg = NetConfig::default();
        let (dialed, accepted) = tokio::join!(connect(&addr, &cfg), listener.accept());
        let dialed = dialed.expect("connect");
        let (mut accepted, _) = accepted.expect("accept");
        let port = dialed.local_addr().expect("local addr").port();
        // The dialer closes first; the acceptor reads the end and closes too, so the dialer's
        // side ends in TIME_WAIT.
        drop(dialed);
        let mut rest = Vec::new();
        accepted.read_to_end(&mut rest).await.expect("read to end");
        drop(accepted);
        let until = std::time::Instant::now() + Duration::from_secs(2);
        while !port_in_time_wait(port) && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            port_in_time_wait(port),
            "port {port} never reached TIME_WAIT"
        );
        std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("a listener cannot bind port {port} in TIME_WAIT: {e}"));
    }
}
