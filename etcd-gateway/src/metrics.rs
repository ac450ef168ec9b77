//! The gateway's HTTP port (`--metrics-listen`): Prometheus metrics, and health as etcd's
//! `/health` reports it, which Kubernetes probes and load balancers read.
//!
//! - `/metrics`: requests by etcd method and gRPC code, unary latency, open watches, the
//!   revision the watches' tail has delivered through, leases followed to their expiry.
//! - `/health`: `{"health":"true"}` when a linearizable read of the revision, agreed by a quorum
//!   of replicas, comes back within [`HEALTH_TIMEOUT`]; 503 with the reason otherwise. Answers
//!   are kept for [`HEALTH_CACHE`], so that probes and scrapers cannot turn into load.
//! - `/livez`: the process serves HTTP.
//!
//! The port is served within bounds (connections in all and per source, header and lifetime
//! timeouts), as the replicas' is.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::gateway::Gateway;

/// Longest wait for the cluster's answer to a health check.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a health answer is reused.
pub const HEALTH_CACHE: Duration = Duration::from_secs(1);

/// The etcd methods the gateway serves, as metric labels; any other path counts as `other`, so
/// that clients cannot grow the label set.
const METHODS: &[&str] = &[
    "etcdserverpb.KV/Range",
    "etcdserverpb.KV/Put",
    "etcdserverpb.KV/DeleteRange",
    "etcdserverpb.KV/Txn",
    "etcdserverpb.KV/Compact",
    "etcdserverpb.Watch/Watch",
    "etcdserverpb.Lease/LeaseGrant",
    "etcdserverpb.Lease/LeaseRevoke",
    "etcdserverpb.Lease/LeaseKeepAlive",
    "etcdserverpb.Lease/LeaseTimeToLive",
    "etcdserverpb.Lease/LeaseLeases",
    "etcdserverpb.Cluster/MemberList",
    "etcdserverpb.Maintenance/Status",
    "etcdserverpb.Maintenance/Alarm",
];

/// Methods whose response is a stream: their time to first headers says nothing of latency.
const STREAMS: &[&str] = &[
    "etcdserverpb.Watch/Watch",
    "etcdserverpb.Lease/LeaseKeepAlive",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<MethodLabel, Histogram>,
    watches: Gauge,
    tail_revision: Gauge,
    leases_followed: Gauge,
    reads: Family<OutcomeLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kmmr_etcd_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "etcd API requests answered, by method and gRPC status code",
            requests.clone(),
        );
        let latency = Family::<MethodLabel, Histogram>::new_with_constructor(|| {
            // 0.5 ms to about 8 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0005, 2.0, 15,
            ))
        });
        registry.register(
            "request_duration_seconds",
            "time from an etcd unary request to its answer",
            latency.clone(),
        );
        let watches = Gauge::default();
        registry.register("watches", "watches open on this gateway", watches.clone());
        let tail_revision = Gauge::default();
        registry.register(
            "tail_revision",
            "revision through which the watches' tail has every event (0 while nobody watches)",
            tail_revision.clone(),
        );
        let leases_followed = Gauge::default();
        registry.register(
            "leases_followed",
            "leases this gateway orders a request for when they are due",
            leases_followed.clone(),
        );
        let reads = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "unordered_reads",
            "reads sent outside the order, by outcome: settled when a quorum of replicas \
             matched, split when answers came from different states and the read was ordered, \
             slow when no quorum answered within the patience and the read was ordered",
            reads.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            watches,
            tail_revision,
            leases_followed,
            reads,
        }
    }

    /// Counts one answered request to `path`, with its gRPC status code and, for a unary
    /// method, its latency.
    pub fn record(&self, path: &str, code: &str, took: Duration) {
        let name = path.trim_start_matches('/');
        let method = METHODS
            .iter()
            .copied()
            .find(|m| *m == name)
            .unwrap_or("other");
        self.requests
            .get_or_create(&RequestLabels {
                method,
                code: code_name(code),
            })
            .inc();
        if method != "other" && !STREAMS.contains(&method) {
            self.latency
                .get_or_create(&MethodLabel { method })
                .observe(took.as_secs_f64());
        }
    }

    fn encode(&self, gateway: &Gateway) -> Option<String> {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.watches.set(gauge(gateway.hub.watchers() as u64));
        self.tail_revision.set(gauge(gateway.hub.tail_revision()));
        self.leases_followed
            .set(gauge(gateway.leases.followed() as u64));
        let outcomes = gateway.client.read_outcomes();
        for (outcome, n) in [
            ("settled", &outcomes.settled),
            ("split", &outcomes.split),
            ("slow", &outcomes.slow),
        ] {
            // The session counts; the exposition mirrors its total. fetch_max keeps the
            // counter monotonic when two scrapes race.
            self.reads
                .get_or_create(&OutcomeLabel { outcome })
                .inner()
                .fetch_max(n.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).ok()?;
        Some(out)
    }
}

/// gRPC's name of a status code (its number on the wire), for labels.
fn code_name(code: &str) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    code.parse::<usize>()
        .ok()
        .and_then(|c| NAMES.get(c).copied())
        .unwrap_or("Unknown")
}

/// One health answer (the revision read, or why none was) and when it was had.
type Checked = Option<(Instant, Result<u64, String>)>;

#[derive(Clone)]
struct HttpState {
    gateway: Arc<Gateway>,
    /// The last health answer and when it was had. Held across a check, so that a burst of
    /// probes waits for one check rather than each asking the cluster.
    health: Arc<tokio::sync::Mutex<Checked>>,
}

/// The router of the HTTP port.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health", get(health_handler))
        .route("/livez", get(|| async { "ok" }))
        .with_state(HttpState {
            gateway,
            health: Arc::new(tokio::sync::Mutex::new(None)),
        })
}

async fn metrics_handler(State(s): State<HttpState>) -> impl IntoResponse {
    match s.gateway.metrics.encode(&s.gateway) {
        Some(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn health_handler(State(s): State<HttpState>) -> impl IntoResponse {
    let result = {
        let mut last = s.health.lock().await;
        match &*last {
            Some((at, r)) if at.elapsed() < HEALTH_CACHE => r.clone(),
            _ => {
                let r = match tokio::time::timeout(HEALTH_TIMEOUT, s.gateway.current_revision())
                    .await
                {
                    Ok(Ok(revision)) => Ok(revision),
                    Ok(Err(status)) => Err(status.message().to_string()),
                    Err(_) => Err(format!(
                        "no quorum of replicas answered within {HEALTH_TIMEOUT:?}"
                    )),
                };
                *last = Some((Instant::now(), r.clone()));
                r
            }
        }
    };
    let json = |healthy: bool, reason: &str| {
        format!(
            "{{\"health\":\"{healthy}\",\"reason\":{}}}",
            json_string(reason)
        )
    };
    match result {
        Ok(_) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json(true, ""),
        ),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "application/json")],
            json(false, &reason),
        ),
    }
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_codes_named() {
        let m = Metrics::new();
        m.record("/etcdserverpb.KV/Range", "0", Duration::from_millis(2));
        m.record("/etcdserverpb.KV/Range", "14", Duration::from_millis(2));
        m.record("/made.up/Method", "12", Duration::ZERO);
        m.record("/etcdserverpb.Watch/Watch", "0", Duration::from_secs(60));
        let mut out = String::new();
        encode(&mut out, &m.registry).expect("encode");
        assert!(out.contains(
            "kmmr_etcd_gateway_requests_total{method=\"etcdserverpb.KV/Range\",code=\"OK\"} 1"
        ));
        assert!(out.contains("code=\"Unavailable\"} 1"));
        assert!(out.contains("method=\"other\",code=\"Unimplemented\"} 1"));
        assert!(!out.contains("made.up"));
        assert!(
            !out.contains("request_duration_seconds_count{method=\"etcdserverpb.Watch/Watch\"}"),
            "a stream's lifetime is no latency"
        );
        assert_eq!(code_name("99"), "Unknown");
        assert_eq!(code_name("x"), "Unknown");
    }

    #[test]
    fn reasons_are_json_strings() {
        assert_eq!(json_string("a \"b\"\n\\"), "\"a \\\"b\\\"\\u000a\\\\\"");
    }
}
