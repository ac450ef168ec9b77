//! The HTTP server of replicas' and gateways' metrics ports: axum's router served connection by
//! connection with bounds, because `axum::serve` has none. An idle connection was never closed,
//! so 4,900 of them took a replica to 4,926 descriptors and 461 MB, and under a 1,024 descriptor
//! limit the write-ahead log failed for want of a descriptor. Here connections are capped (in all and per source address), a
//! request's headers must arrive within `header_timeout` (hyper starts that clock as soon as it
//! waits for a request, so it is also the idle timeout between requests), and no connection
//! lives longer than `lifetime` (a reader that never drains its response pins nothing for long).

use std::net::SocketAddr;
use std::time::Duration;

use crate::slots::{SlotLimits, Slots};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Bounds of the HTTP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Open connections in all.
    pub connections: usize,
    /// Open connections from one source address (a scraper and an operator need a few).
    pub per_source: usize,
    /// Time to receive a request's headers, counted from when the server waits for it.
    pub header_timeout: Duration,
    /// Longest life of one connection; then it is shut down gracefully.
    pub lifetime: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            connections: 128,
            per_source: 16,
            header_timeout: Duration::from_secs(5),
            lifetime: Duration::from_secs(60),
        }
    }
}

/// How long a connection past its lifetime may take to finish the request in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` within `limits` until the task is dropped.
pub async fn serve(listener: TcpListener, app: Router, limits: HttpLimits) {
    let slots = Slots::new(SlotLimits {
        total: limits.connections,
        per_source: limits.per_source,
        reserved: 0,
    });
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, addr)) => {
                    // Refused by closing at once: leaving it in the backlog would hold the
                    // kernel's queue for everyone else.
                    let slot = match slots.try_acquire(addr.ip()) {
                        Ok(s) => s,
                        Err(why) => {
                            tracing::debug!(%addr, ?why, "http connection refused");
                            continue;
                        }
                    };
                    let app = app.clone();
                    conns.spawn(async move {
                        serve_one(tcp, addr, app, limits).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn serve_one(tcp: tokio::net::TcpStream, addr: SocketAddr, app: Router, limits: HttpLimits) {
    let _ = tcp.set_nodelay(true);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app));
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%addr, error = %e, "http connection ended");
            }
            return;
        }
        _ = tokio::time::sleep(limits.lifetime) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
}
