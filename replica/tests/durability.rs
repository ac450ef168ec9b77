//! Durability and state transfer with real `kmmr-replica` processes on loopback: a replica that
//! lost its disk catches up by state transfer to byte-identical state, and writes a client saw
//! acknowledged survive SIGKILL of every replica, and a restarted replica keeps the votes it
//! promised.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kmmr::node::ProtocolConfig;
use kmmr_client::Client;
use kmmr_protocol::service::kv::{KvRequest, KvResponse};

mod common;

use common::{wait_for, TestCluster};

fn protocol(checkpoint_period: u64) -> ProtocolConfig {
    ProtocolConfig {
        request_timeout_ms: 500,
        checkpoint_period,
        ..ProtocolConfig::default()
    }
}

/// Clients that write until told to stop, remembering every write acknowledged to them.
struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(clients: Vec<Client>, value_bytes: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(c, client)| {
                let (stop, acked) = (stop.clone(), acked.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("c{c}/k{i}");
                        let mut value = format!("c{c}-v{i}-");
                        value.extend(std::iter::repeat_n('x', value_bytes));
                        let req = KvRequest::put(key.clone(), value.clone());
                        if let Ok(KvResponse::Put(_)) = client.kv(&req).await {
                            acked.lock().expect("writers lock").push((key, value));
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        Writers { stop, acked, tasks }
    }

    fn count(&self) -> usize {
        self.acked.lock().expect("writers lock").len()
    }

    async fn stop(self) -> Vec<(String, String)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        std::mem::take(&mut *self.acked.lock().expect("writers lock"))
    }

    /// Stops at once, dropping requests in flight.
    fn abort(self) -> Vec<(String, String)> {
        for t in &self.tasks {
            t.abort();
        }
        std::mem::take(&mut *self.acked.lock().expect("writers lock"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_disk_catches_up_by_state_transfer_to_identical_state() {
    const PERIOD: u64 = 16;
    let mut c = TestCluster::start("wipe", 4, protocol(PERIOD), &[]).await;
    let writers = Writers::start(vec![c.client().await, c.client().await], 512);
    wait_for(
        "writes before the crash",
        Duration::from_secs(30),
        async || writers.count() >= 100,
    )
    .await;

    c.kill(3).await;
    let had = std::fs::read_dir(c.data_dir(3)).map_or(0, |d| d.count());
    assert!(had > 0, "replica 3 had written its data directory");
    std::fs::remove_dir_all(c.data_dir(3)).expect("wipe replica 3's disk");

    // Far enough that the others trimmed their logs past anything replica 3 could replay.
    let before = c.status(0).await.and_then(|s| s.status.last_decided);
    wait_for(
        "the others to move on by several checkpoints",
        Duration::from_secs(60),
        async || {
            let now = c.status(0).await.and_then(|s| s.status.last_decided);
            now >= before.map(|b| b + 4 * PERIOD)
        },
    )
    .await;
    let trimmed = c
        .status(0)
        .await
        .and_then(|s| s.status.checkpoint_cid)
        .expect("replica 0 holds a checkpoint");
    assert!(trimmed > PERIOD, "replica 0 checkpointed at {trimmed}");

    c.spawn(3);
    c.wait_healthy(3).await;
    wait_for(
        "replica 3 to install a transferred checkpoint",
        Duration::from_secs(60),
        async || c.metric(3, "kmmr_state_transfers_total").await >= 1.0,
    )
    .await;
    let acked = writers.stop().await;
    let (cid, digest) = c.wait_identical(Duration::from_secs(30)).await;

    let s3 = c.status(3).await.expect("replica 3 status").status;
    assert!(
        s3.member && !s3.transferring,
        "replica 3 takes part: {s3:?}"
    );
    // Its log syncs in group commits (every 5 ms), so the last decisions, and a checkpoint
    // taken at one of them, may be a sync ahead of it when the status is read.
    let mut s3 = s3;
    let until = Instant::now() + Duration::from_secs(5);
    while s3.durable_cid < s3.checkpoint_cid && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        s3 = c.status(3).await.expect("replica 3 status").status;
    }
    assert!(
        s3.durable_cid >= s3.checkpoint_cid && s3.checkpoint_cid.is_some(),
        "replica 3 stored what it installed: {s3:?}"
    );
    let bytes = c.metric(3, "kmmr_state_transfer_bytes_total").await;
    assert!(bytes > 0.0, "bytes transferred counted");
    assert!(c.log(3).contains("state transfer: installed"));
    eprintln!(
        "{} writes acknowledged; replica 3 lost its disk, installed {bytes} bytes by state \
         transfer, and all four replicas hold state {} at CID {cid}",
        acked.len(),
        &digest[..16]
    );

    // The repaired replica counts: with replica 0 gone it is needed for a quorum.
    c.kill(0).await;
    let client = c.client().await;
    let (key, value) = acked.last().expect("some writes").clone();
    match client.kv(&KvRequest::get(key.clone())).await {
        Ok(KvResponse::Range(r)) => {
            assert_eq!(
                r.kvs.first().map(|kv| kv.value.clone()),
                Some(value.into_bytes())
            )
        }
        other => panic!("reading {key} back: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_sigkill_of_every_replica() {
    let mut c = TestCluster::start("killall", 4, protocol(16), &[]).await;
    let clients = vec![
        c.client().await,
        c.client().await,
        c.client().await,
        c.client().await,
    ];
    let writers = Writers::start(clients, 64);
    wait_for(
        "writes before the crash",
        Duration::from_secs(30),
        async || writers.count() >= 300,
    )
    .await;

    // Every replica at once, with writes in flight.
    for i in 0..4 {
        c.start_kill(i);
    }
    let acked = writers.abort();
    for i in 0..4 {
        c.kill(i).await;
    }
    for i in 0..4 {
        c.spawn(i);
    }
    for i in 0..4 {
        c.wait_healthy(i).await;
    }
    for i in 0..4 {
        assert!(
            c.log(i).contains("recovered from disk"),
            "replica {i} recovered from its disk"
        );
        // Killed with writes in flight, every replica had voted, so promised.
        assert!(
            c.log(i).contains("restored the votes promised"),
            "replica {i} restored its promise:\n{}",
            c.log(i)
        );
    }

    let client = c.client().await;
    let mut missing = Vec::new();
    for (key, value) in &acked {
        match client.kv(&KvRequest::get(key.clone())).await {
            Ok(KvResponse::Range(r))
                if r.kvs.first().map(|kv| kv.value.as_slice()) == Some(value.as_bytes()) => {}
            other => missing.push((key.clone(), format!("{other:?}"))),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost after every replica was killed: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    client
        .kv(&KvRequest::put("after", "restart"))
        .await
        .expect("the cluster serves writes again");
    let (cid, _) = c.wait_identical(Duration::from_secs(30)).await;
    eprintln!(
        "{} acknowledged writes all read back after SIGKILL of every replica; CID {cid}",
        acked.len()
    );
}

/// The leader, killed with SIGKILL under load and restarted at once, again and again: each time
/// it takes back the votes it promised, no other replica ever sees it vote twice, and the
/// replicas end in identical state with every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_and_restarted_under_load_never_votes_twice() {
    let mut c = TestCluster::start("promise", 4, protocol(16), &[]).await;
    let writers = Writers::start(vec![c.client().await, c.client().await], 64);
    let mut restarted = Vec::new();
    for round in 0..3 {
        let target = writers.count() + 100;
        wait_for(
            "writes between restarts",
            Duration::from_secs(60),
            async || writers.count() >= target,
        )
        .await;
        let mut leader = None;
        for i in 0..4 {
            if let Some(s) = c.status(i).await {
                leader = Some(s.status.leader);
                break;
            }
        }
        let leader = leader.expect("a replica reports the leader");
        c.kill(leader).await;
        c.spawn(leader);
        c.wait_healthy(leader).await;
        restarted.push(leader);
        eprintln!("round {round}: killed and restarted leader {leader}");
    }
    let target = writers.count() + 100;
    wait_for(
        "writes after the last restart",
        Duration::from_secs(60),
        async || writers.count() >= target,
    )
    .await;
    let acked = writers.stop().await;
    let (cid, _) = c.wait_identical(Duration::from_secs(30)).await;
    for i in 0..4u32 {
        let twice = c.metric_sum(i, "kmmr_rejected_total", "equivocating").await;
        assert_eq!(twice, 0.0, "replica {i} saw a vote cast twice");
    }
    for i in &restarted {
        assert!(
            c.log(*i).contains("restored the votes promised"),
            "restarted replica {i} restored its promise:\n{}",
            c.log(*i)
        );
    }
    let mut promised = 0.0;
    for i in 0..4u32 {
        promised += c.metric(i, "kmmr_promise_write_seconds_count").await;
    }
    assert!(promised > 0.0, "promises written: {promised}");
    let client = c.client().await;
    let (key, value) = acked.last().expect("some writes").clone();
    match client.kv(&KvRequest::get(key.clone())).await {
        Ok(KvResponse::Range(r)) => assert_eq!(
            r.kvs.first().map(|kv| kv.value.clone()),
            Some(value.into_bytes())
        ),
        other => panic!("reading {key} back: {other:?}"),
    }
    eprintln!(
        "leaders {restarted:?} killed and restarted under load; {} writes acknowledged, no \
         vote cast twice, identical state at CID {cid}",
        acked.len()
    );
}

/// In an idle cluster nothing would tell a restarted replica that it is behind: it asks at
/// start-up, and catches up by state transfer with no client writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_catches_up_in_an_idle_cluster() {
    const PERIOD: u64 = 8;
    let mut c = TestCluster::start("idle", 4, protocol(PERIOD), &[]).await;
    let writers = Writers::start(vec![c.client().await], 64);
    wait_for("writes", Duration::from_secs(30), async || {
        writers.count() >= 6 * PERIOD as usize
    })
    .await;
    c.kill(3).await;
    std::fs::remove_dir_all(c.data_dir(3)).expect("wipe replica 3's disk");
    wait_for("more writes", Duration::from_secs(30), async || {
        writers.count() >= 12 * PERIOD as usize
    })
    .await;
    // Idle from here on.
    writers.stop().await;
    c.spawn(3);
    c.wait_healthy(3).await;
    c.wait_identical(Duration::from_secs(30)).await;
    assert!(c.metric(3, "kmmr_state_transfers_total").await >= 1.0);
}

/// The catch-up benchmark (README, Durability): writes `KMMR_CATCHUP_MIB` MiB (default 1024)
/// of key-value state in 1 MiB values, wipes one replica's disk, restarts it, and times how long
/// until its last decided CID, then its state digest, match the others'. A checkpoint every
/// `KMMR_CATCHUP_PERIOD` CIDs (default 128, about 128 MiB of puts), so the wiped replica
/// installs the newest checkpoint and replays the decisions after it. Each replica holds the
/// state about once (plus up to two checkpoint periods of decisions): about 1.5 GiB of memory
/// per replica at the default size; replica/scripts/bench-catchup.sh samples it.
///
/// `cargo test --release -p kmmr-replica --test durability catch_up -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: minutes, gigabytes"]
async fn catch_up_time_for_a_large_state() {
    let mib: u64 = std::env::var("KMMR_CATCHUP_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let period: u64 = std::env::var("KMMR_CATCHUP_PERIOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let mut c = TestCluster::start("catchup", 4, protocol(period), &[]).await;
    let client = c.client().await;
    let value = vec![b'v'; 1024 * 1024 - 64];
    let t0 = Instant::now();
    for i in 0..mib {
        let mut v = value.clone();
        v.extend_from_slice(format!("{i:08}").as_bytes());
        client
            .kv(&KvRequest::put(format!("big/{i:06}"), v))
            .await
            .expect("load");
    }
    let load = t0.elapsed();
    // Small writes up to the checkpoint. Polled from the metrics: a status carries the digest
    // of the whole state, computed anew for every CID.
    let mut i = 0;
    while c.metric(0, "kmmr_checkpoint_cid").await < 0.0 {
        client
            .kv(&KvRequest::put(format!("small/{i}"), "x"))
            .await
            .expect("small write");
        i += 1;
        assert!(i < 10 * period, "no checkpoint after {i} small writes");
    }
    let s0 = c.status(0).await.expect("status").status;
    eprintln!(
        "loaded {mib} MiB in {:.1} s ({:.1} MiB/s); checkpoint at CID {:?}",
        load.as_secs_f64(),
        mib as f64 / load.as_secs_f64(),
        s0.checkpoint_cid
    );
    let (cid, _) = c.wait_identical(Duration::from_secs(600)).await;

    c.kill(3).await;
    std::fs::remove_dir_all(c.data_dir(3)).expect("wipe replica 3's disk");
    let t1 = Instant::now();
    c.spawn(3);
    c.wait_healthy(3).await;
    // A replica learns it is behind from its peers' traffic: an idle cluster never tells it
    // (see the report in the README), so keep a trickle of small writes going.
    let mut trickle = 0;
    while c.metric(3, "kmmr_state_transfers_total").await < 1.0 {
        client
            .kv(&KvRequest::put("trickle", format!("{trickle}")))
            .await
            .expect("trickle write");
        trickle += 1;
        assert!(t1.elapsed() < Duration::from_secs(600), "no state transfer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The CIDs first, from the metrics, so that the catching-up replica is not asked for the
    // digest of its state at every CID it replays; then the digests, once.
    let target = c.metric(0, "kmmr_last_decided_cid").await;
    wait_for(
        "replica 3 to reach the others' last CID",
        Duration::from_secs(600),
        async || c.metric(3, "kmmr_last_decided_cid").await >= target,
    )
    .await;
    let reached = t1.elapsed();
    let (cid_after, _) = c.wait_identical(Duration::from_secs(600)).await;
    let took = t1.elapsed();
    assert!(
        cid_after >= cid,
        "replica 3 reached CID {cid_after} after {cid}"
    );
    let bytes = c.metric(3, "kmmr_state_transfer_bytes_total").await;
    eprintln!(
        "catch-up: replica 3 restarted with an empty disk, reached the others' CID after {:.2} \
         s and matched their CID {cid_after} and state digest after {:.2} s ({trickle} trickle \
         writes), state transfer of {:.0} MiB ({:.0} MiB/s over the whole catch-up)",
        reached.as_secs_f64(),
        took.as_secs_f64(),
        bytes / 1048576.0,
        bytes / 1048576.0 / took.as_secs_f64()
    );
}
