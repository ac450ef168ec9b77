//! Prometheus metrics of a replica, and the HTTP endpoints `/metrics`, `/status` (JSON signed by
//! the replica's key, so an operator can cross-check replicas) and `/healthz`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};

use kmmr_client::clock::now_us;
use kmmr_client::status::SignedStatus;

use super::snapshot::SnapshotAsk;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: String,
}

/// Every metric a replica exports.
pub struct Metrics {
    pub registry: Registry,
    pub decided: Counter,
    pub decided_unchecked: Counter,
    pub executed_requests: Counter,
    pub consensus_latency: Histogram,
    pub batch_size: Histogram,
    pub leader_changes: Counter,
    pub regency: Gauge,
    pub view_id: Gauge,
    pub last_decided: Gauge,
    pub pending_requests: Gauge,
    pub pending_bytes: Gauge,
    pub rejected: Family<ReasonLabel, Counter>,
    pub bytes: Family<DirectionLabel, Counter<u64, AtomicU64>>,
    pub frames: Family<DirectionLabel, Counter<u64, AtomicU64>>,
    /// Highest CID on disk (-1: none; stays -1 with durability off).
    pub durable_cid: Gauge,
    /// Other members whose link does not speak the newest replica protocol (or is not up yet).
    pub peers_on_older_protocol: Gauge,
    /// CID of the newest checkpoint held (-1: none).
    pub checkpoint_cid: Gauge,
    pub checkpoints: Counter,
    pub state_transfers: Counter,
    pub transfer_bytes: Counter,
    pub view_installs: Counter,
    pub diverged: Counter,
    /// Leaders not judged slow because this replica's host was short of CPU, by regency.
    pub slow_leader_withheld: Counter,
    /// Time this replica's threads waited for a CPU, per second, over the last window.
    pub cpu_wait: Gauge<f64, AtomicU64>,
    /// Busy polls after input, by whether more input came (`input`) or the budget ran out.
    pub busy_polls: Family<OutcomeLabel, Counter>,
    /// CPU time spent in busy polls (an upper bound: other threads ran during the yields).
    pub busy_poll_seconds: Counter<f64, AtomicU64>,
    /// Writing a promise (votes to disk before they are sent), fsync included.
    pub promise_seconds: Histogram,
    /// Microseconds since the epoch of the node loop's last turn, for `/healthz`.
    pub heartbeat_us: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kmmr");
        let decided = Counter::default();
        let decided_unchecked = Counter::default();
        let executed_requests = Counter::default();
        let consensus_latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        let leader_changes = Counter::default();
        let regency = Gauge::default();
        let view_id = Gauge::default();
        let last_decided = Gauge::default();
        let pending_requests = Gauge::default();
        let pending_bytes = Gauge::default();
        let rejected = Family::<ReasonLabel, Counter>::default();
        let bytes = Family::<DirectionLabel, Counter<u64, AtomicU64>>::default();
        let frames = Family::<DirectionLabel, Counter<u64, AtomicU64>>::default();
        registry.register("decided", "Consensus instances decided", decided.clone());
        registry.register(
            "decided_unchecked",
            "Instances decided on all n ACCEPTs, their signatures checked only when shown",
            decided_unchecked.clone(),
        );
        registry.register(
            "executed_requests",
            "Client requests executed",
            executed_requests.clone(),
        );
        registry.register(
            "consensus_latency_seconds",
            "From holding a proposal to deciding it",
            consensus_latency.clone(),
        );
        registry.register(
            "batch_size",
            "Requests per decided batch",
            batch_size.clone(),
        );
        registry.register(
            "leader_changes",
            "Regencies installed",
            leader_changes.clone(),
        );
        registry.register("regency", "Current regency", regency.clone());
        registry.register("view_id", "Current view id", view_id.clone());
        registry.register("last_decided_cid", "Last decided CID", last_decided.clone());
        registry.register(
            "pending_requests",
            "Requests waiting to be ordered",
            pending_requests.clone(),
        );
        registry.register(
            "pending_bytes",
            "Payload bytes of the requests waiting to be ordered (new ones are refused as pool_full past the bound, 512 MiB)",
            pending_bytes.clone(),
        );
        registry.register(
            "rejected",
            "Messages and requests refused, by reason",
            rejected.clone(),
        );
        let durable_cid = Gauge::default();
        durable_cid.set(-1);
        let peers_on_older_protocol = Gauge::default();
        let checkpoint_cid = Gauge::default();
        checkpoint_cid.set(-1);
        let checkpoints = Counter::default();
        let state_transfers = Counter::default();
        let transfer_bytes = Counter::default();
        let view_installs = Counter::default();
        let diverged = Counter::default();
        let slow_leader_withheld = Counter::default();
        let cpu_wait = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "slow_leader_withheld",
            "Regencies whose leader was not judged slow because this replica itself waited for \
             a CPU too long to tell",
            slow_leader_withheld.clone(),
        );
        registry.register(
            "cpu_wait_ratio",
            "Time this replica's threads spent waiting for a CPU, per second of wall time, over \
             the latest window (Linux schedstat)",
            cpu_wait.clone(),
        );
        let busy_polls = Family::<OutcomeLabel, Counter>::default();
        let busy_poll_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "busy_polls",
            "Polls for more input before sleeping, by outcome (input: it came; idle: budget spent)",
            busy_polls.clone(),
        );
        registry.register(
            "busy_poll_seconds",
            "Time spent polling for input before sleeping",
            busy_poll_seconds.clone(),
        );
        let promise_seconds = Histogram::new(exponential_buckets(0.000_01, 2.0, 18));
        registry.register(
            "promise_write_seconds",
            "Writing the promise of this replica's votes to disk (fdatasync included), before \
             the messages that cast them",
            promise_seconds.clone(),
        );
        registry.register(
            "durable_cid",
            "Highest CID whose decision is on disk (-1: none)",
            durable_cid.clone(),
        );
        registry.register(
            "peers_on_older_protocol",
            "Other members whose link does not speak the newest replica protocol, or is not up: \
             while there are any, WRITEs are unsigned and each waits for its promise",
            peers_on_older_protocol.clone(),
        );
        registry.register(
            "checkpoint_cid",
            "CID of the newest checkpoint (-1: none)",
            checkpoint_cid.clone(),
        );
        registry.register("checkpoints", "Checkpoints taken", checkpoints.clone());
        registry.register(
            "state_transfers",
            "Checkpoints installed by state transfer",
            state_transfers.clone(),
        );
        registry.register(
            "state_transfer_bytes",
            "Bytes of checkpoints installed by state transfer",
            transfer_bytes.clone(),
        );
        registry.register(
            "view_installs",
            "Views installed by reconfiguration",
            view_installs.clone(),
        );
        registry.register(
            "diverged",
            "Own checkpoints found to disagree with f+1 others (then repaired)",
            diverged.clone(),
        );
        registry.register("network_bytes", "Bytes on the network", bytes.clone());
        registry.register("network_frames", "Frames on the network", frames.clone());
        Metrics {
            registry,
            decided,
            decided_unchecked,
            executed_requests,
            consensus_latency,
            batch_size,
            leader_changes,
            regency,
            view_id,
            last_decided,
            pending_requests,
            pending_bytes,
            rejected,
            bytes,
            frames,
            durable_cid,
            peers_on_older_protocol,
            checkpoint_cid,
            checkpoints,
            state_transfers,
            transfer_bytes,
            view_installs,
            diverged,
            slow_leader_withheld,
            cpu_wait,
            busy_polls,
            busy_poll_seconds,
            promise_seconds,
            heartbeat_us: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Brings the network counters up to the sockets' running totals (`kmmr-net` counts them;
    /// a counter only moves forward, so it takes the difference).
    pub fn set_network(&self, direction: &str, bytes: u64, frames: u64) {
        let l = DirectionLabel {
            direction: direction.to_owned(),
        };
        for (counter, total) in [(&self.bytes, bytes), (&self.frames, frames)] {
            let c = counter.get_or_create(&l);
            let have = c.get();
            if total > have {
                c.inc_by(total - have);
            }
        }
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    status: mpsc::Sender<oneshot::Sender<SignedStatus>>,
    snapshot: mpsc::Sender<SnapshotAsk>,
}

/// What the HTTP server asks of the replica loop.
pub struct HttpAsks {
    pub status: mpsc::Receiver<oneshot::Sender<SignedStatus>>,
    pub snapshot: mpsc::Receiver<SnapshotAsk>,
}

/// Starts serving the HTTP endpoints on `listener`; the loop answers what they ask.
pub fn spawn_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    limits: super::http::HttpLimits,
) -> HttpAsks {
    let (status_tx, status) = mpsc::channel(16);
    // Few: each answer holds a copy of the whole state until it is sent.
    let (snapshot_tx, snapshot) = mpsc::channel(2);
    tokio::spawn(serve_http(
        listener,
        metrics,
        status_tx,
        snapshot_tx,
        limits,
    ));
    HttpAsks { status, snapshot }
}

/// Serves the HTTP endpoints within `limits` until the process ends.
async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    status: mpsc::Sender<oneshot::Sender<SignedStatus>>,
    snapshot: mpsc::Sender<SnapshotAsk>,
    limits: super::http::HttpLimits,
) {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/status", get(status_handler))
        .route("/healthz", get(health_handler))
        .route("/snapshot", get(snapshot_handler))
        .with_state(HttpState {
            metrics,
            status,
            snapshot,
        });
    super::http::serve(listener, app, limits).await
}

async fn metrics_handler(State(s): State<HttpState>) -> impl IntoResponse {
    let mut out = String::new();
    if encode(&mut out, &s.metrics.registry).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, String::new()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

async fn status_handler(State(s): State<HttpState>) -> impl IntoResponse {
    let (tx, rx) = oneshot::channel();
    if s.status.send(tx).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "replica stopped").into_response();
    }
    match tokio::time::timeout(Duration::from_secs(5), rx).await {
        Ok(Ok(st)) => axum::Json(st).into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "replica busy").into_response(),
    }
}

/// `GET /snapshot?token=...`: the state, for a backup (see `node::snapshot`).
async fn snapshot_handler(State(s): State<HttpState>, uri: Uri) -> impl IntoResponse {
    let token = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .unwrap_or_default()
        .to_owned();
    let (reply, rx) = oneshot::channel();
    if s.snapshot.send(SnapshotAsk { token, reply }).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "replica stopped").into_response();
    }
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(Ok(bytes))) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        Ok(Ok(Err(refused))) => (StatusCode::FORBIDDEN, refused.to_string()).into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "replica busy").into_response(),
    }
}

async fn health_handler(State(s): State<HttpState>) -> impl IntoResponse {
    let beat = s.metrics.heartbeat_us.load(Ordering::Relaxed);
    if now_us().saturating_sub(beat) < 5_000_000 {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "replica loop stalled")
    }
}
