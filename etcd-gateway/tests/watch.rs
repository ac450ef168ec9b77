//! Watches through the gateway with a gRPC client, as kube-apiserver's etcd client holds them:
//! many watches on one stream, live changes from another client, progress requests, cancels and
//! compaction.

mod common;

use std::time::{Duration, Instant};

use common::{watch_create, Cluster, GatewayHandle};
use kmmr_etcd_gateway::pb::{self, kv_client::KvClient, watch_client::WatchClient};
use kmmr_etcd_gateway::server::Limits;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

fn progress() -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
            pb::WatchProgressRequest {},
        )),
    }
}

fn cancel(id: i64) -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CancelRequest(
            pb::WatchCancelRequest { watch_id: id },
        )),
    }
}

async fn next(stream: &mut Streaming<pb::WatchResponse>, within: Duration) -> pb::WatchResponse {
    tokio::time::timeout(within, stream.message())
        .await
        .expect("a watch response in time")
        .expect("the stream works")
        .expect("the stream is open")
}

async fn put(kv: &mut KvClient<tonic::transport::Channel>, key: &str, value: &str) -> i64 {
    let r = kv
        .put(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await
        .expect("put");
    r.into_inner().header.expect("header").revision
}

/// One gRPC watch stream, as an etcd client holds it: requests in, responses out.
async fn open_stream(
    endpoint: &str,
) -> (mpsc::Sender<pb::WatchRequest>, Streaming<pb::WatchResponse>) {
    let (tx, rx) = mpsc::channel(16);
    let mut watch = WatchClient::connect(endpoint.to_owned())
        .await
        .expect("watch");
    let stream = watch
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch stream")
        .into_inner();
    (tx, stream)
}

/// The mod revisions of a response's events, in order.
fn mod_revisions(r: &pb::WatchResponse) -> Vec<i64> {
    r.events
        .iter()
        .filter_map(|e| e.kv.as_ref().map(|k| k.mod_revision))
        .collect()
}

fn revision(r: &pb::WatchResponse) -> i64 {
    r.header.as_ref().map(|h| h.revision).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_on_one_stream_see_live_changes_and_progress_never_runs_ahead() {
    let cluster = Cluster::start("watch", 4, &[]);
    let gw = GatewayHandle::start(&cluster, Limits::default()).await;
    let mut kv = KvClient::connect(gw.endpoint.clone()).await.expect("kv");
    let first = put(&mut kv, "/registry/pods/a", "1").await;
    assert_eq!(
        first, 2,
        "the first write of an empty store is revision 2, as in etcd"
    );

    let (tx, mut stream) = open_stream(&gw.endpoint).await;

    // One watch on a prefix from now, one on a key from the first write.
    tx.send(watch_create("/registry/pods/", "/registry/pods0", 0, true))
        .await
        .expect("send");
    let created = next(&mut stream, Duration::from_secs(10)).await;
    assert!(created.created && created.watch_id == 0, "{created:?}");
    assert_eq!(revision(&created), first, "created at the current revision");
    tx.send(watch_create("/registry/pods/a", "", first, false))
        .await
        .expect("send");
    let created = next(&mut stream, Duration::from_secs(10)).await;
    assert!(created.created && created.watch_id == 1, "{created:?}");
    let history = next(&mut stream, Duration::from_secs(10)).await;
    assert_eq!(history.watch_id, 1);
    assert_eq!(history.events.len(), 1, "{history:?}");

    // A change made through another client of the cluster (not the gateway) reaches the watch
    // within a second.
    let client = cluster.client().await;
    let t0 = Instant::now();
    let resp = client
        .kv(&kmmr_protocol::service::kv::KvRequest::put(
            &b"/registry/pods/b"[..],
            &b"2"[..],
        ))
        .await
        .expect("put through the client library");
    let written = resp.header().revision as i64;
    let ev = next(&mut stream, Duration::from_secs(5)).await;
    let latency = t0.elapsed();
    assert_eq!(ev.watch_id, 0, "{ev:?}");
    assert_eq!(ev.events.len(), 1);
    let kv0 = ev.events[0].kv.as_ref().expect("kv");
    assert_eq!(
        (kv0.key.as_slice(), kv0.mod_revision),
        (&b"/registry/pods/b"[..], written)
    );
    assert!(
        latency < Duration::from_secs(1),
        "a change reached the watch after {latency:?}"
    );

    // An update carries the previous record to the watch that asked for it.
    let updated = put(&mut kv, "/registry/pods/a", "3").await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(next(&mut stream, Duration::from_secs(5)).await);
    }
    seen.sort_by_key(|r| r.watch_id);
    let with_prev = seen[0].events[0]
        .prev_kv
        .as_ref()
        .expect("prev_kv asked for");
    assert_eq!(with_prev.value, b"1");
    assert!(seen[1].events[0].prev_kv.is_none(), "prev_kv not asked for");
    assert_eq!(
        seen[1].events[0].kv.as_ref().map(|k| k.mod_revision),
        Some(updated)
    );

    // Progress: never 0, never ahead of what the stream delivered, and after everything above.
    tx.send(progress()).await.expect("send");
    let p = next(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(p.watch_id, -1, "{p:?}");
    assert!(p.events.is_empty() && !p.created && !p.canceled);
    assert_eq!(revision(&p), updated, "progress at what was delivered");

    // Cancel one watch; the other goes on.
    tx.send(cancel(1)).await.expect("send");
    let c = next(&mut stream, Duration::from_secs(5)).await;
    assert!(c.canceled && c.watch_id == 1, "{c:?}");
    let last = put(&mut kv, "/registry/pods/a", "4").await;
    let ev = next(&mut stream, Duration::from_secs(5)).await;
    assert_eq!((ev.watch_id, ev.events.len()), (0, 1), "{ev:?}");
    assert_eq!(ev.events[0].kv.as_ref().map(|k| k.mod_revision), Some(last));

    // A watch from before the compaction point is canceled with it.
    kv.compact(pb::CompactionRequest {
        revision: last,
        physical: true,
    })
    .await
    .expect("compact");
    tx.send(watch_create("/registry/pods/a", "", first, false))
        .await
        .expect("send");
    let created = next(&mut stream, Duration::from_secs(5)).await;
    assert!(created.created, "{created:?}");
    let gone = next(&mut stream, Duration::from_secs(5)).await;
    assert!(gone.canceled, "{gone:?}");
    assert_eq!(gone.compact_revision, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_future_revision_waits_for_it() {
    let cluster = Cluster::start("watch-future", 4, &[]);
    let gw = GatewayHandle::start(&cluster, Limits::default()).await;
    let mut kv = KvClient::connect(gw.endpoint.clone()).await.expect("kv");
    let now = put(&mut kv, "k", "0").await;
    let (tx, mut stream) = open_stream(&gw.endpoint).await;
    tx.send(watch_create("k", "", now + 2, false))
        .await
        .expect("send");
    assert!(next(&mut stream, Duration::from_secs(5)).await.created);
    put(&mut kv, "k", "1").await;
    let second = put(&mut kv, "k", "2").await;
    let revs = mod_revisions(&next(&mut stream, Duration::from_secs(5)).await);
    assert_eq!(revs, vec![second], "only events from the start revision on");
}

/// The tail that follows the store stops when its last watch ends. A watch opened after that,
/// from a revision already written, must get it without waiting for another write: it once caught
/// up only to where the stopped tail had been and then waited for a batch that no write made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_of_past_events_after_the_last_watch_ended_gets_them_with_no_write_after() {
    let cluster = Cluster::start("watch-restart", 4, &[]);
    let gw = GatewayHandle::start(&cluster, Limits::default()).await;
    let mut kv = KvClient::connect(gw.endpoint.clone()).await.expect("kv");
    put(&mut kv, "a", "0").await;
    {
        let (tx, mut stream) = open_stream(&gw.endpoint).await;
        tx.send(watch_create("a", "", 0, false))
            .await
            .expect("send");
        assert!(next(&mut stream, Duration::from_secs(5)).await.created);
        // Long enough for the tail to have read where the store stands.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The stream is gone: the tail stops at its next poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = put(&mut kv, "b", "1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (tx, mut stream) = open_stream(&gw.endpoint).await;
    tx.send(watch_create("b", "", written, false))
        .await
        .expect("send");
    assert!(next(&mut stream, Duration::from_secs(5)).await.created);
    let revs = mod_revisions(&next(&mut stream, Duration::from_secs(5)).await);
    assert_eq!(revs, vec![written]);
}
