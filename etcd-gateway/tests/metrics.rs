//! The gateway's HTTP port: Prometheus metrics of what it served, and etcd's `/health`, which
//! says whether a quorum of replicas answers (what a Kubernetes readiness probe reads).

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, GatewayHandle};
use kmmr_byzantine::Behaviour;
use kmmr_etcd_gateway::pb::{self, kv_client::KvClient};
use kmmr_etcd_gateway::server::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path` over HTTP/1.1: the status code and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .expect("an answer within 20 s")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_served_and_health_follows_the_quorum() {
    let mut cluster = Cluster::start("gw-metrics", 4, &[(1, Behaviour::Corrupt)]);
    let gw = GatewayHandle::start(&cluster, Limits::default()).await;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = http.local_addr().expect("address");
    tokio::spawn(kmmr_net::http::serve(
        http,
        kmmr_etcd_gateway::metrics::router(gw.gateway.clone()),
        kmmr_net::http::HttpLimits::default(),
    ));

    let mut kv = KvClient::connect(gw.endpoint.clone()).await.expect("kv");
    kv.put(pb::PutRequest {
        key: b"a".to_vec(),
        value: b"1".to_vec(),
        ..Default::default()
    })
    .await
    .expect("put");
    for _ in 0..3 {
        kv.range(pb::RangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range");
    }
    let refused = kv.range(pb::RangeRequest::default()).await;
    assert_eq!(
        refused.expect_err("empty key").code(),
        tonic::Code::InvalidArgument
    );

    let (status, body) = get(addr, "/health").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "{\"health\":\"true\",\"reason\":\"\"}")
    );
    let (status, metrics) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "kmmr_etcd_gateway_requests_total{method=\"etcdserverpb.KV/Put\",code=\"OK\"} 1",
        "kmmr_etcd_gateway_requests_total{method=\"etcdserverpb.KV/Range\",code=\"OK\"} 3",
        "kmmr_etcd_gateway_requests_total{method=\"etcdserverpb.KV/Range\",code=\"InvalidArgument\"} 1",
        "kmmr_etcd_gateway_request_duration_seconds_count{method=\"etcdserverpb.KV/Range\"} 4",
        "kmmr_etcd_gateway_watches 0",
    ] {
        assert!(metrics.contains(line), "no {line:?} in:\n{metrics}");
    }
    // The three good ranges read outside the order; each ended one way or another.
    let reads: u64 = ["settled", "split", "slow"]
        .iter()
        .map(|outcome| {
            let prefix =
                format!("kmmr_etcd_gateway_unordered_reads_total{{outcome=\"{outcome}\"}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .unwrap_or_else(|| panic!("no {prefix:?} in:\n{metrics}"))
                .parse::<u64>()
                .expect("a count")
        })
        .sum();
    assert!(reads >= 3, "{reads} unordered reads counted in:\n{metrics}");
    assert_eq!(get(addr, "/livez").await.0, 200);
    assert_eq!(get(addr, "/nothing").await.0, 404);

    // Two of four replicas down (one of the others lies): no quorum answers, and health says
    // so within the check's timeout and the answer's lifetime.
    cluster.stop(2);
    cluster.stop(3);
    let t0 = Instant::now();
    loop {
        let (status, body) = get(addr, "/health").await;
        if status == 503 {
            assert!(
                body.starts_with("{\"health\":\"false\",\"reason\":\""),
                "{body}"
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "still healthy {:?} after losing the quorum: {body}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(addr, "/livez").await.0, 200, "alive, if not ready");
}
