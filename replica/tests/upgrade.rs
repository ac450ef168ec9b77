//! A rolling upgrade of the replica protocol, on real processes: a cluster whose replicas all
//! speak protocol 1 (as an older release does) is rolled one replica at a time to protocol 2,
//! serving writes all along. While any link speaks 1, WRITEs stay unsigned and each waits for
//! its own promise; once every link speaks 2, WRITEs are signed and leave before their promise,
//! which shows in the promises written per decided instance.

use std::time::Duration;

use kmmr::node::ProtocolConfig;
use kmmr_client::Client;
use kmmr_protocol::service::kv::{KvRequest, KvResponse};

mod common;

use common::{wait_for, TestCluster};

/// Pins replica `i`'s newest protocol in its configuration file, as an operator would.
fn set_max_peer_protocol(c: &TestCluster, i: u32, version: i64) {
    let path = c.dir.join(format!("r{i}.toml"));
    let text = std::fs::read_to_string(&path).expect("replica config");
    let mut cfg: toml::Table = text.parse().expect("replica config is TOML");
    cfg.insert("max_peer_protocol".into(), toml::Value::Integer(version));
    std::fs::write(&path, toml::to_string(&cfg).expect("config")).expect("config written");
}

/// `count` writes one after the other, each acknowledged; returns what was written.
async fn write(client: &Client, tag: &str, count: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..count {
        let (key, value) = (format!("{tag}/k{i}"), format!("{tag}-v{i}"));
        match client.kv(&KvRequest::put(key.clone(), value.clone())).await {
            Ok(KvResponse::Put(_)) => out.push((key, value)),
            other => panic!("writing {key}: {other:?}"),
        }
    }
    out
}

/// Promises replica `i` wrote per instance it decided, over `count` sequential writes.
async fn promises_per_instance(c: &TestCluster, client: &Client, i: u32, tag: &str) -> f64 {
    let promises = c.metric(i, "kmmr_promise_write_seconds_count").await;
    let decided = c.metric(i, "kmmr_last_decided_cid").await;
    write(client, tag, 100).await;
    // The metrics of the last instance may trail its reply a little.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let promises = c.metric(i, "kmmr_promise_write_seconds_count").await - promises;
    let decided = c.metric(i, "kmmr_last_decided_cid").await - decided;
    assert!(decided >= 100.0, "replica {i} decided {decided} instances");
    promises / decided
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_rolled_from_protocol_1_to_2_serves_throughout_and_then_writes_unpromised() {
    let protocol = ProtocolConfig {
        request_timeout_ms: 500,
        ..ProtocolConfig::default()
    };
    let mut c = TestCluster::lay_out("upgrade", 4, 0, protocol, &[]);
    for i in 0..4 {
        set_max_peer_protocol(&c, i, 1);
        c.spawn(i);
    }
    for i in 0..4 {
        c.wait_healthy(i).await;
    }
    let client = c.client().await;
    let mut acked = write(&client, "old", 20).await;
    for i in 0..4 {
        assert_eq!(
            c.metric(i, "kmmr_peers_on_older_protocol").await,
            3.0,
            "replica {i} speaks protocol 1 with every peer"
        );
    }
    // Replica 1 never leads regency 0: its promises are a follower's.
    let before = promises_per_instance(&c, &client, 1, "v1").await;
    assert!(
        before >= 1.8,
        "a WRITE waits for its promise under protocol 1: {before:.2} promises per instance"
    );

    for i in 0..4 {
        c.kill(i).await;
        set_max_peer_protocol(&c, i, 2);
        c.spawn(i);
        c.wait_healthy(i).await;
        // Three replicas of any mix of releases keep deciding.
        acked.extend(write(&client, &format!("rolled{i}"), 20).await);
    }
    for i in 0..4 {
        wait_for(
            "every link to speak protocol 2",
            Duration::from_secs(20),
            async || c.metric(i, "kmmr_peers_on_older_protocol").await == 0.0,
        )
        .await;
    }
    let after = promises_per_instance(&c, &client, 1, "v2").await;
    assert!(
        after <= 1.3,
        "a signed WRITE leaves before its promise under protocol 2: {after:.2} promises per \
         instance (protocol 1: {before:.2})"
    );

    let (cid, _) = c.wait_identical(Duration::from_secs(30)).await;
    for i in 0..4u32 {
        let twice = c.metric_sum(i, "kmmr_rejected_total", "equivocating").await;
        assert_eq!(twice, 0.0, "replica {i} saw a vote cast twice");
    }
    for (key, value) in &acked {
        match client.kv(&KvRequest::get(key.clone())).await {
            Ok(KvResponse::Range(r)) => assert_eq!(
                r.kvs.first().map(|kv| kv.value.clone()),
                Some(value.clone().into_bytes()),
                "{key}"
            ),
            other => panic!("reading {key} back: {other:?}"),
        }
    }
    eprintln!(
        "rolled 4 replicas from protocol 1 to 2 with {} writes acknowledged and read back, \
         identical state at CID {cid}; promises per instance {before:.2} -> {after:.2}",
        acked.len()
    );
}
