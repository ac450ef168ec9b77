//! The gRPC listener: the services, a fallback that names any RPC the gateway does not serve,
//! TLS with client certificates as etcd's `--cert-file`/`--key-file`/`--trusted-ca-file` give
//! it, and limits on connections, messages and idle peers.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::gateway::{ClusterService, Gateway, KvService, LeaseService, MaintenanceService};
use crate::pb;
use crate::watch::{WatchService, PROGRESS_INTERVAL};

/// Largest request accepted: etcd takes 1.5 MiB of request plus gRPC's 512 KiB margin.
pub const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;

/// TLS as etcd configures it: the server's certificate and key, and the CA whose client
/// certificates it accepts (without one, clients need no certificate).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trusted_ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; further ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Streams one connection may have open (a kube-apiserver opens one watch stream per
    /// resource type on one connection).
    pub max_streams_per_connection: u32,
    /// A peer that does not answer an HTTP/2 ping in this time is dropped.
    pub keepalive: Duration,
    /// Interval of progress notifications on quiet watches that asked for them.
    pub progress_every: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_streams_per_connection: 1024,
            keepalive: Duration::from_secs(20),
            progress_every: PROGRESS_INTERVAL,
        }
    }
}

/// Serves the etcd API on `listener` until `shutdown` resolves.
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    tls: Option<TlsFiles>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // Stops with the server, however it ends.
    let _sweep = AbortOnDrop(tokio::spawn(gateway.leases.clone().sweep()));
    let mut routes = Routes::builder();
    routes
        .add_service(
            pb::kv_server::KvServer::new(KvService(gateway.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(pb::watch_server::WatchServer::new(WatchService {
            gateway: gateway.clone(),
            progress_every: limits.progress_every,
        }))
        .add_service(pb::lease_server::LeaseServer::new(LeaseService(
            gateway.clone(),
        )))
        .add_service(pb::cluster_server::ClusterServer::new(ClusterService(
            gateway.clone(),
        )))
        .add_service(pb::maintenance_server::MaintenanceServer::new(
            MaintenanceService(gateway.clone()),
        ));
    let router = routes
        .routes()
        .into_axum_router()
        .layer(axum::middleware::from_fn(name_unimplemented))
        .layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            count_request,
        ));
    let routes = Routes::from(router);
    let mut server = Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(limits.keepalive))
        .http2_keepalive_timeout(Some(limits.keepalive))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        server = server
            .tls_config(tls_config(&tls)?)
            .context("TLS configuration")?;
    }
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let incoming = accept_capped(listener, slots);
    server
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("gRPC server")
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn tls_config(tls: &TlsFiles) -> Result<ServerTlsConfig> {
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?))
        .timeout(Duration::from_secs(10));
    if let Some(ca) = &tls.trusted_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(config)
}

/// Counts each request in the gateway's metrics, with the gRPC code its response starts with
/// (a unary error is a trailers-only response, whose code is in its headers; anything else
/// starts well).
async fn count_request(
    axum::extract::State(gateway): axum::extract::State<Arc<Gateway>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = request.uri().path().to_owned();
    let t0 = std::time::Instant::now();
    let response = next.run(request).await;
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("0");
    gateway.metrics.record(&path, code, t0.elapsed());
    response
}

/// Any method the gateway does not serve (of a service it does not serve, or of one it does)
/// is refused as Unimplemented with the method's name, where gRPC's default says nothing.
async fn name_unimplemented(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = request.uri().path().trim_start_matches('/').to_owned();
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let unimplemented = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"12");
    let silent = headers.get("grpc-message").is_none_or(|m| m.is_empty());
    if unimplemented && silent {
        // grpc-message is percent-encoded outside printable ASCII; the path is a client's.
        let method: String = method
            .chars()
            .filter(|c| c.is_ascii_graphic() && *c != '%')
            .take(200)
            .collect();
        let text = format!("{method} is not supported by the KmMR etcd gateway");
        if let Ok(value) = axum::http::HeaderValue::from_str(&text) {
            headers.insert("grpc-message", value);
        }
    }
    // tonic refuses an oversized request before the handler, in the headers or, once they are
    // sent, in the trailers.
    oversized_in(headers);
    let (parts, body) = response.into_parts();
    let body = body.map_frame(|mut frame| {
        if let Some(trailers) = frame.trailers_mut() {
            oversized_in(trailers);
        }
        frame
    });
    axum::response::Response::from_parts(parts, axum::body::Body::new(body))
}

/// Rewrites tonic's refusal of an oversized request, if these headers or trailers carry one.
fn oversized_in(headers: &mut axum::http::HeaderMap) {
    if let Some(text) = headers
        .get("grpc-message")
        .and_then(|m| oversized_as_grpc_go(m.as_bytes()))
    {
        if let Ok(value) = axum::http::HeaderValue::from_str(&text) {
            headers.insert("grpc-status", axum::http::HeaderValue::from_static("8"));
            headers.insert("grpc-message", value);
        }
    }
}

/// A request over the size limit, in grpc-go's words and code (ResourceExhausted), which etcd's
/// clients see from etcd, instead of tonic's (OutOfRange).
fn oversized_as_grpc_go(message: &[u8]) -> Option<String> {
    let text = percent_decoded(message)?;
    let rest = text.strip_prefix("Error, decoded message length too large: found ")?;
    let (found, rest) = rest.split_once(" bytes, the limit is: ")?;
    let limit = rest.strip_suffix(" bytes")?;
    let (found, limit) = (found.parse::<u64>().ok()?, limit.parse::<u64>().ok()?);
    Some(format!(
        "grpc: received message larger than max ({found} vs. {limit})"
    ))
}

/// grpc-message's percent-encoding undone (tonic encodes spaces among others).
fn percent_decoded(value: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] == b'%' {
            let hex = std::str::from_utf8(value.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(value[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Accepted connections, at most `slots` at a time: each holds a permit until it closes.
fn accept_capped(
    listener: TcpListener,
    slots: Arc<Semaphore>,
) -> impl tokio_stream::Stream<Item = std::io::Result<CappedConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = CappedConn {
                        inner: stream,
                        _permit: permit,
                    };
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // Out of descriptors or a reset before accept: back off, keep serving.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    drop(permit);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A connection holding one of the listener's slots.
pub struct CappedConn {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for CappedConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for CappedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::oversized_as_grpc_go;

    #[test]
    fn tonics_oversize_message_reads_as_grpc_gos() {
        assert_eq!(
            oversized_as_grpc_go(
                b"Error, decoded message length too large: found 3145738 bytes, the limit is: 2097152 bytes"
            )
            .as_deref(),
            Some("grpc: received message larger than max (3145738 vs. 2097152)")
        );
        assert_eq!(
            oversized_as_grpc_go(
                b"Error,%20decoded%20message%20length%20too%20large:%20found%203%20bytes,%20the%20limit%20is:%202%20bytes"
            )
            .as_deref(),
            Some("grpc: received message larger than max (3 vs. 2)")
        );
        assert_eq!(oversized_as_grpc_go(b"%zz"), None);
        assert_eq!(
            oversized_as_grpc_go(b"etcdserver: request is too large"),
            None
        );
        assert_eq!(
            oversized_as_grpc_go(
                b"Error, decoded message length too large: found x bytes, the limit is: 2 bytes"
            ),
            None
        );
    }
}
