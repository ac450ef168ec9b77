//! Ranges and watches larger than one reply of the replicas: the replicas cut replies at their
//! budget, and the gateway reads the rest, so clients get what etcd would send (kube-apiserver's
//! watch cache lists 10,000 objects a page, tens of MiB for Pods).

mod common;

use std::time::Duration;

use common::{watch_create, Cluster, GatewayHandle};
use kmmr_byzantine::Behaviour;
use kmmr_etcd_gateway::pb::{self, kv_client::KvClient, watch_client::WatchClient};
use kmmr_etcd_gateway::server::Limits;
use kmmr_protocol::service::kv::KvRequest;

const VALUES: usize = 24;
const VALUE: usize = 512 * 1024;

fn value(i: usize) -> Vec<u8> {
    vec![b'a' + (i % 26) as u8; VALUE]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_and_a_watch_over_many_replies_arrive_whole_with_a_corrupt_replica() {
    let cluster = Cluster::start("large", 4, &[(1, Behaviour::Corrupt)]);
    let gw = GatewayHandle::start(&cluster, Limits::default()).await;

    // Written around the gateway, so that its watches read them from the replicas.
    let client = cluster.client().await;
    let mut last = 0;
    for i in 0..VALUES {
        let resp = client
            .kv(&KvRequest::put(format!("/big/{i:02}"), value(i)))
            .await
            .expect("put");
        last = resp.header().revision;
    }
    assert_eq!(last, 1 + VALUES as u64);

    // 12 MiB in one range, over the replicas' 8 MiB reply limit.
    let mut kv = KvClient::connect(gw.endpoint.clone())
        .await
        .expect("kv")
        .max_decoding_message_size(64 << 20);
    let all = kv
        .range(pb::RangeRequest {
            key: b"/big/".to_vec(),
            range_end: b"/big0".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    assert_eq!(all.count, VALUES as i64);
    assert!(!all.more);
    assert_eq!(all.kvs.len(), VALUES);
    for (i, kv) in all.kvs.iter().enumerate() {
        assert_eq!(kv.key, format!("/big/{i:02}").into_bytes());
        assert_eq!(kv.value, value(i), "value {i}");
        assert_eq!(kv.mod_revision, 2 + i as i64);
    }
    assert_eq!(all.header.expect("header").revision, last as i64);

    // A limit still answers `more` when it, not the reply budget, stopped the range.
    let some = kv
        .range(pb::RangeRequest {
            key: b"/big/".to_vec(),
            range_end: b"/big0".to_vec(),
            limit: 20,
            ..Default::default()
        })
        .await
        .expect("limited range")
        .into_inner();
    assert_eq!((some.kvs.len(), some.more, some.count), (20, true, 24));

    // Every event from the first revision, with previous records, over several polls.
    let mut watch = WatchClient::connect(gw.endpoint.clone())
        .await
        .expect("watch")
        .max_decoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(watch_create("/big/", "/big0", 2, true))
        .await
        .expect("send");
    let mut stream = watch
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("watch stream")
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < VALUES {
        let resp = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("the watch's events within 30 s")
            .expect("stream")
            .expect("open");
        for e in resp.events {
            let kv = e.kv.expect("kv");
            assert_eq!(kv.value.len(), VALUE);
            seen.push(kv.mod_revision);
        }
    }
    assert_eq!(seen, (2..=1 + VALUES as i64).collect::<Vec<_>>());
}

async fn next(stream: &mut tonic::Streaming<pb::WatchResponse>) -> pb::WatchResponse {
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("an answer within 30 s")
        .expect("stream")
        .expect("open")
}

/// One revision whose events cannot fit in any reply (a range delete of 12 MiB of values, which
/// its delete events carry): the watch of that range is canceled, saying why, and every other
/// watch goes on, with nothing skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_too_large_for_any_reply_cancels_only_the_watches_it_is_in() {
    let cluster = Cluster::start("large-revision", 4, &[(1, Behaviour::Corrupt)]);
    let gw = GatewayHandle::start(&cluster, Limits::default()).await;
    let client = cluster.client().await;
    for i in 0..VALUES {
        client
            .kv(&KvRequest::put(format!("/big/{i:02}"), value(i)))
            .await
            .expect("put");
    }
    let mut watch = WatchClient::connect(gw.endpoint.clone())
        .await
        .expect("watch")
        .max_decoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut stream = watch
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("watch stream")
        .into_inner();
    tx.send(watch_create("/big/", "/big0", 0, true))
        .await
        .expect("send");
    let big = next(&mut stream).await;
    assert!(big.created);
    tx.send(watch_create("/other/", "/other0", 0, true))
        .await
        .expect("send");
    let other = next(&mut stream).await;
    assert!(other.created);

    let deleted = client
        .kv(&KvRequest::DeleteRange(
            kmmr_protocol::service::kv::DeleteRangeRequest {
                key: b"/big/".to_vec(),
                range_end: b"/big0".to_vec(),
                prev_kv: false,
            },
        ))
        .await
        .expect("delete")
        .header()
        .revision;
    let after = client
        .kv(&KvRequest::put("/other/x", "after"))
        .await
        .expect("put")
        .header()
        .revision;
    assert_eq!(after, deleted + 1);

    let (mut canceled, mut seen) = (None, Vec::new());
    while canceled.is_none() || seen.is_empty() {
        let resp = next(&mut stream).await;
        if resp.canceled {
            assert_eq!(resp.watch_id, big.watch_id, "{resp:?}");
            canceled = Some(resp.cancel_reason);
        } else {
            assert_eq!(resp.watch_id, other.watch_id, "{resp:?}");
            seen.extend(
                resp.events
                    .into_iter()
                    .map(|e| e.kv.expect("kv").mod_revision),
            );
        }
    }
    let reason = canceled.unwrap_or_default();
    assert!(
        reason.contains(&format!("revision {deleted}")) && reason.contains("reply limit"),
        "{reason}"
    );
    assert_eq!(seen, vec![after as i64]);
}
