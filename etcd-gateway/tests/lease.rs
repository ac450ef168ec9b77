//! Leases expire on time through the gateway even when nothing else is written: the replicas
//! expire leases by consensus time only, so without a request after the deadline a lease and
//! its keys lived on (found by k8s.io/apiserver's TestCreateWithTTL, which waits 30 s for the
//! DELETE of a key created with a TTL of 1 s).

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, GatewayHandle};
use kmmr_byzantine::Behaviour;
use kmmr_etcd_gateway::pb::{self, kv_client::KvClient, lease_client::LeaseClient};
use kmmr_etcd_gateway::server::Limits;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_key_is_deleted_when_its_ttl_runs_out_with_no_other_traffic() {
    let cluster = Cluster::start("lease-expiry", 4, &[(1, Behaviour::Corrupt)]);
    let gw = GatewayHandle::start(&cluster, Limits::default()).await;
    let mut lease = LeaseClient::connect(gw.endpoint.clone())
        .await
        .expect("lease client");
    let mut kv = KvClient::connect(gw.endpoint.clone())
        .await
        .expect("kv client");
    let granted = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: 2, id: 0 })
        .await
        .expect("grant")
        .into_inner();
    let put_at = Instant::now();
    kv.put(pb::PutRequest {
        key: b"/registry/ttl/a".to_vec(),
        value: b"v".to_vec(),
        lease: granted.id,
        ..Default::default()
    })
    .await
    .expect("put");

    // Reads only from here on: they order nothing, so they cannot advance the cluster's clock.
    let deadline = put_at + Duration::from_secs(15);
    loop {
        let r = kv
            .range(pb::RangeRequest {
                key: b"/registry/ttl/a".to_vec(),
                ..Default::default()
            })
            .await
            .expect("range")
            .into_inner();
        if r.count == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the key of a 2 s lease is still there {:?} after the put",
            put_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        put_at.elapsed() >= Duration::from_millis(1500),
        "the lease must not expire before its TTL ({:?})",
        put_at.elapsed()
    );
    let ttl = lease
        .lease_time_to_live(pb::LeaseTimeToLiveRequest {
            id: granted.id,
            keys: false,
        })
        .await
        .expect("time to live")
        .into_inner();
    assert_eq!(ttl.ttl, -1, "the lease is gone: {ttl:?}");
}
