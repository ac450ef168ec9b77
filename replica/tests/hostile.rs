//! Hostile and careless clients against real replica processes on loopback (issue 15): idle
//! connections on the HTTP port, held handshake slots, descriptor exhaustion. Attack traffic
//! goes to loopback only, bounded in count and time, and comes from 127.0.0.2 and up so that the
//! replicas can tell it from their peers and clients on 127.0.0.1.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::TestCluster;
use kmmr::cluster::http_port;
use kmmr::node::ProtocolConfig;
use kmmr_protocol::service::kv::{KvRequest, KvResponse};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// Raises this test process's descriptor limit to its hard limit: the attacks hold over a
/// thousand sockets, more than a default soft limit of 1,024.
fn raise_own_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    );
}

/// Opens `count` TCP connections to `port` from `source` and holds them without a byte sent.
/// Connections the server refuses or closes at once are kept too (they read EOF at once).
async fn hold_idle(source: Ipv4Addr, port: u16, count: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let Ok(sock) = TcpSocket::new_v4() else { break };
        if sock.bind(SocketAddr::new(IpAddr::V4(source), 0)).is_err() {
            break;
        }
        let to = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        match tokio::time::timeout(Duration::from_secs(2), sock.connect(to)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    held
}

/// How many of `conns` the server has closed (EOF or reset), waiting at most `within` on each.
async fn closed_by_server(conns: &mut [TcpStream], within: Duration) -> usize {
    let until = Instant::now() + within;
    let mut closed = 0;
    for c in conns.iter_mut() {
        let left = until.saturating_duration_since(Instant::now());
        let mut b = [0u8; 64];
        match tokio::time::timeout(left, c.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            _ => {}
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http_connections_are_capped_and_closed() {
    let cluster = TestCluster::start("hostile-http", 4, ProtocolConfig::default(), &[]).await;
    let port = http_port(cluster.base, 0);
    let baseline = cluster.fd_count(0);
    assert!(baseline > 0, "replica 0's descriptors are readable");

    // 300 idle connections from two hosts: each gets its per-source share, the rest are closed.
    let mut idle = hold_idle(Ipv4Addr::new(127, 0, 0, 2), port, 150).await;
    idle.extend(hold_idle(Ipv4Addr::new(127, 0, 0, 3), port, 150).await);
    assert_eq!(idle.len(), 300, "the kernel accepted every connection");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = cluster.fd_count(0);
    assert!(
        during <= baseline + 64,
        "300 idle connections must not each hold a descriptor: {baseline} -> {during}"
    );
    // The port still answers someone else, during the attack.
    let t = Instant::now();
    assert!(
        cluster.status(0).await.is_some(),
        "/status answers during the attack"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "/status took {:?}",
        t.elapsed()
    );

    // Idle connections are closed by the server within the header timeout (5 s), all of them.
    let closed = closed_by_server(&mut idle, Duration::from_secs(10)).await;
    assert_eq!(
        closed,
        idle.len(),
        "every idle connection is closed by the replica"
    );
    drop(idle);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = cluster.fd_count(0);
    assert!(
        after <= baseline + 8,
        "descriptors return to their baseline: {baseline} -> {during} -> {after}"
    );
    assert!(
        cluster.status(0).await.is_some(),
        "/status answers after the attack"
    );
}

/// Holds connections that never start their TLS handshake: `per_port` to each of `ports` from
/// each of `sources`, until `until`, re-opening those the server closes (at most 32 per port and
/// source every 250 ms, and `max_connects` in all). Says on `filled` when the first round is
/// in place. Returns how many connects it made.
async fn hold_handshakes(
    sources: Vec<Ipv4Addr>,
    ports: Vec<u16>,
    per_port: usize,
    until: Instant,
    max_connects: usize,
    filled: tokio::sync::oneshot::Sender<()>,
) -> usize {
    let mut filled = Some(filled);
    raise_own_fd_limit();
    let mut groups: Vec<(Ipv4Addr, u16, Vec<TcpStream>)> = sources
        .iter()
        .flat_map(|s| ports.iter().map(move |p| (*s, *p, Vec::new())))
        .collect();
    let mut connects = 0;
    let mut first = true;
    while Instant::now() < until && connects < max_connects {
        for (source, port, held) in groups.iter_mut() {
            // A connection the server closed reads EOF (or an error) at once.
            held.retain(|c| {
                let mut b = [0u8; 1];
                matches!(c.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            });
            let cap = if first { per_port } else { 32 };
            let want = per_port.saturating_sub(held.len()).min(cap);
            let more = hold_idle(*source, *port, want).await;
            connects += more.len();
            held.extend(more);
        }
        first = false;
        if let Some(f) = filled.take() {
            let _ = f.send(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    connects
}

/// The last CID replica `i` reports as decided (0 when it does not answer).
async fn last_decided(cluster: &TestCluster, i: u32) -> u64 {
    cluster
        .status(i)
        .await
        .and_then(|s| s.status.last_decided)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_clients_connect_while_one_host_holds_handshake_slots() {
    let cluster = TestCluster::start("hostile-hs-client", 4, ProtocolConfig::default(), &[]).await;
    let ports: Vec<u16> = (0..4).map(|i| cluster.base + 1000 + i).collect();
    // More than every slot of every client port, from one host, for 8 s.
    let (filled, ready) = tokio::sync::oneshot::channel();
    let attack = tokio::spawn(hold_handshakes(
        vec![Ipv4Addr::new(127, 0, 0, 2)],
        ports,
        300,
        Instant::now() + Duration::from_secs(8),
        10_000,
        filled,
    ));
    let _ = ready.await;

    let t = Instant::now();
    let put = async {
        let client = cluster.client().await;
        client.kv(&KvRequest::put("during", "attack")).await
    };
    let done = tokio::time::timeout(Duration::from_secs(2), put).await;
    assert!(
        matches!(done, Ok(Ok(KvResponse::Put(_)))),
        "a new client's put did not finish within 2 s while slots were held: {done:?} after {:?}",
        t.elapsed()
    );
    let connects = attack.await.expect("attacker");
    assert!(
        connects >= 4 * 300,
        "the attack held the slots ({connects} connects)"
    );
    for i in 0..4 {
        assert!(
            cluster.status(i).await.is_some(),
            "replica {i} still answers"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_rejoins_while_strangers_hold_peer_handshake_slots() {
    let mut cluster =
        TestCluster::start("hostile-hs-peer", 4, ProtocolConfig::default(), &[]).await;
    let client = cluster.client().await;
    cluster.kill(3).await;
    for i in 0..20 {
        let r = client.kv(&KvRequest::put(format!("k{i}"), "v")).await;
        assert!(matches!(r, Ok(KvResponse::Put(_))), "put {i}: {r:?}");
    }
    let target = last_decided(&cluster, 0).await;
    assert!(target > 0);

    // Sixteen hosts, 20 unfinished handshakes each, on every replica port (the restarted
    // replica's too): more than all 256 slots of each, for 10 s.
    let sources = (2..18).map(|h| Ipv4Addr::new(127, 0, 0, h)).collect();
    let ports = (0..4).map(|i| cluster.base + i).collect();
    let (filled, ready) = tokio::sync::oneshot::channel();
    let attack = tokio::spawn(hold_handshakes(
        sources,
        ports,
        20,
        Instant::now() + Duration::from_secs(10),
        20_000,
        filled,
    ));
    let _ = ready.await;

    // Rejoined means taking part again: with replica 2 down as well, nothing is decided
    // unless replica 3's votes reach replicas 0 and 1 (their ports under attack) and theirs
    // reach it.
    let t = Instant::now();
    cluster.spawn(3);
    cluster.kill(2).await;
    let mut i = 0;
    loop {
        i += 1;
        let req = KvRequest::put(format!("w{i}"), "v");
        let put = client.kv(&req);
        let ok = matches!(
            tokio::time::timeout(Duration::from_millis(500), put).await,
            Ok(Ok(KvResponse::Put(_)))
        );
        if ok && last_decided(&cluster, 3).await > target {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "replica 3 did not rejoin within 5 s while its peers' slots were held; its log:\n{}",
            cluster.log(3)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rejoined = t.elapsed();
    let connects = attack.await.expect("attacker");
    assert!(
        connects >= 4 * 256,
        "the attack held the slots ({connects} connects)"
    );
    eprintln!("replica 3 rejoined in {rejoined:?} under attack ({connects} connects)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_degrades_listeners_not_storage() {
    // Checkpoints every 16 decisions: storage opens files while the listeners are flooded.
    let protocol = ProtocolConfig {
        checkpoint_period: 16,
        ..ProtocolConfig::default()
    };
    let mut cluster = TestCluster::lay_out("hostile-fds", 4, 0, protocol, &[]);
    let limit = 400;
    cluster.spawn_with_fd_limit(0, limit);
    for i in 1..4 {
        cluster.spawn(i);
    }
    for i in 0..4 {
        cluster.wait_healthy(i).await;
    }
    let client = cluster.client().await;

    // 24 hosts, 20 connections each, on each of replica 0's three ports: 1,440 in all, more
    // than its 400 descriptors.
    let sources = (2..26).map(|h| Ipv4Addr::new(127, 0, 0, h)).collect();
    let ports = vec![
        cluster.base,
        cluster.base + 1000,
        http_port(cluster.base, 0),
    ];
    let (filled, ready) = tokio::sync::oneshot::channel();
    let attack = tokio::spawn(hold_handshakes(
        sources,
        ports,
        20,
        Instant::now() + Duration::from_secs(8),
        20_000,
        filled,
    ));
    let _ = ready.await;
    let mut most = 0;
    for i in 0..100 {
        let r = client.kv(&KvRequest::put(format!("k{i}"), "v")).await;
        assert!(matches!(r, Ok(KvResponse::Put(_))), "put {i}: {r:?}");
        most = most.max(cluster.fd_count(0));
    }
    assert!(
        cluster.running(0),
        "replica 0 exited under the flood; its log:\n{}",
        cluster.log(0)
    );
    let _ = attack.await;
    // Not one EMFILE, anywhere: an accept that meets it means the next file storage opens
    // (a log segment, a checkpoint) may meet it too.
    let log = cluster.log(0);
    assert!(
        !log.contains("Too many open files"),
        "replica 0 ran out of descriptors {} times; log:\n{log}",
        log.matches("Too many open files").count()
    );
    assert!(most < limit as usize, "replica 0 reached its limit: {most}");
    // It took part throughout: it holds every decision, and answers once the flood is over.
    let leader = last_decided(&cluster, 1).await;
    let until = Instant::now() + Duration::from_secs(10);
    while last_decided(&cluster, 0).await < leader {
        assert!(Instant::now() < until, "replica 0 did not keep up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cluster.running(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_promise_files_are_both_damaged_refuses_to_start() {
    let mut cluster =
        TestCluster::start("hostile-promise", 4, ProtocolConfig::default(), &[]).await;
    let client = cluster.client().await;
    for i in 0..10 {
        let r = client.kv(&KvRequest::put(format!("k{i}"), "v")).await;
        assert!(matches!(r, Ok(KvResponse::Put(_))), "put {i}: {r:?}");
    }
    cluster.kill(1).await;
    // Bit rot in both files: each keeps its length, neither passes its checksum. The first
    // payload byte (after the 28-byte header) is always covered, whatever old tail follows.
    for name in ["promise-0", "promise-1"] {
        let path = cluster.data_dir(1).join(name);
        let mut bytes = std::fs::read(&path).expect("replica 1 promised votes");
        assert!(bytes.len() > 40, "{name} holds a promise");
        bytes[28] ^= 0x55;
        std::fs::write(&path, &bytes).expect("damage");
    }
    cluster.spawn(1);
    let status = cluster.exit_status(1, Duration::from_secs(15)).await;
    let log = cluster.log(1);
    assert!(
        status.is_some_and(|s| !s.success()),
        "replica 1 started without its promised votes ({status:?}); its log:\n{log}"
    );
    assert!(
        log.contains("no promise file is intact") && log.contains("away to start empty"),
        "the refusal says why and how to recover; log:\n{log}"
    );
    // The others go on.
    let r = client.kv(&KvRequest::put("after", "v")).await;
    assert!(matches!(r, Ok(KvResponse::Put(_))), "{r:?}");
}

/// A replica whose client port accepts connections and never answers (a stalled host) holds up
/// neither a new client nor the requests of a running one: dials run beside the requests. (A
/// dial awaited in the client's loop stopped every request for the 5 s handshake timeout on
/// each redial tick.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_replica_holds_up_no_client() {
    let mut cluster =
        TestCluster::start("hostile-stalled", 4, ProtocolConfig::default(), &[]).await;
    cluster.kill(3).await;
    let port = cluster.base + 1000 + 3;
    let stall = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind replica 3's client port");
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = stall.accept().await {
            conns.push(c);
        }
    });
    let t0 = Instant::now();
    let client = cluster.client().await;
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "connecting took {:?}",
        t0.elapsed()
    );
    assert!(client
        .unreachable_at_connect()
        .iter()
        .any(|(id, _)| id.0 == 3));
    // 20 puts over more than 2 s: several redial ticks of the stalled replica pass meanwhile.
    for i in 0..20 {
        let t = Instant::now();
        client
            .kv(&KvRequest::put(format!("stalled/{i}"), "v"))
            .await
            .expect("put");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "put {i} took {:?} while replica 3 stalled",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    held.abort();
}

/// `/status`, asked for again and again by whoever reaches the HTTP port, while a client writes
/// to a state of 96 MiB: each replica hashes its state within a budget of its time and meanwhile
/// reports an earlier instance's digest, labelled with that instance, so the writes go on. (Every
/// status used to hash the whole state whenever a decision had come since the last one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_requests_do_not_stall_the_replicas_of_a_large_state() {
    let cluster = TestCluster::start("hostile-status", 4, ProtocolConfig::default(), &[]).await;
    let client = cluster.client().await;
    for i in 0..96u32 {
        let value = vec![(i % 251) as u8; 1 << 20];
        client
            .kv(&KvRequest::put(format!("big/{i:03}"), value))
            .await
            .expect("fill");
    }
    let small_puts = |tag: &'static str, seconds: u64| {
        let client = &client;
        async move {
            let mut took = Vec::new();
            let until = Instant::now() + Duration::from_secs(seconds);
            while Instant::now() < until {
                let t = Instant::now();
                client
                    .kv(&KvRequest::put(format!("small/{tag}/{}", took.len()), "v"))
                    .await
                    .expect("small put");
                took.push(t.elapsed());
            }
            took.sort();
            took
        }
    };
    let quiet = small_puts("quiet", 2).await;
    let attack_for = Duration::from_secs(4);
    let mut askers = tokio::task::JoinSet::new();
    for i in 0..4 {
        let url = format!("http://127.0.0.1:{}/status", http_port(cluster.base, i));
        askers.spawn(async move {
            let (mut answers, mut labelled) = (0u32, 0u32);
            let until = Instant::now() + attack_for;
            while Instant::now() < until {
                if let Ok(s) = kmmr_client::status::fetch_status(&url).await {
                    answers += 1;
                    labelled += u32::from(s.status.state_digest_cid.is_some());
                }
            }
            (answers, labelled)
        });
    }
    let took = small_puts("asked", attack_for.as_secs()).await;
    let (mut answers, mut labelled) = (0, 0);
    while let Some(r) = askers.join_next().await {
        let (a, l) = r.expect("asker");
        answers += a;
        labelled += l;
    }
    let (p50, p99) = (took[took.len() / 2], took[took.len() * 99 / 100]);
    let quiet_p50 = quiet[quiet.len() / 2];
    eprintln!(
        "{} small puts, p50 {p50:?}, p99 {p99:?}, max {:?} (without statuses: p50 {quiet_p50:?}); \
         {answers} statuses, {labelled} of an earlier instance",
        took.len(),
        took[took.len() - 1]
    );
    assert!(answers >= 40, "only {answers} statuses in {attack_for:?}");
    // The state is large enough that hashing it again on every status would not keep up.
    assert!(labelled > 0, "no status named an earlier instance");
    // Hashing on every status made the median 110 ms; with the budget it stays within a small
    // factor of the same puts' without statuses (thousands of signed statuses a second still
    // cost CPU: 21 against 5 ms at load 8).
    assert!(
        p50 < quiet_p50 * 4 + Duration::from_millis(20),
        "small puts p50 {p50:?} while statuses were asked for, {quiet_p50:?} without"
    );
    assert!(
        p99 < Duration::from_millis(500),
        "small puts p99 {p99:?} while statuses were asked for"
    );
    // Once writes stop, every replica's digest comes to be of the same, last instance.
    cluster.wait_identical(Duration::from_secs(60)).await;
}

/// Stops (SIGSTOP) or resumes (SIGCONT) a replica's process: a leader that is alive but says
/// nothing, which only a leader change gets past.
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Many clients putting values of the service's maximum size while the leader is frozen, twice:
/// every leader change completes, and a client putting small values meanwhile is not held up
/// behind them. (A replica used to re-send up to 4,096 pending requests in one STOP with no bound
/// on bytes; with 150 clients of 1 MiB values no leader change completed for minutes, its frames
/// refused as over the 16 MiB limit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_changes_complete_under_values_of_the_maximum_size() {
    use kmmr_protocol::service::kv::MAX_VALUE_LEN;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const HEAVY_CLIENTS: usize = 16;
    let cluster = TestCluster::start("hostile-heavy", 4, ProtocolConfig::default(), &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut heavy = Vec::new();
    for c in 0..HEAVY_CLIENTS {
        let client = cluster.client().await;
        let stop = stop.clone();
        heavy.push(tokio::spawn(async move {
            let value = vec![c as u8; MAX_VALUE_LEN];
            let mut acked = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let put = KvRequest::put(format!("heavy/{c}"), value.clone());
                if matches!(client.kv(&put).await, Ok(KvResponse::Put(_))) {
                    acked += 1;
                }
            }
            acked
        }));
    }
    let small_client = cluster.client().await;
    let small = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut took = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let put = KvRequest::put(format!("small/{}", took.len()), "v");
                match small_client.kv(&put).await {
                    Ok(KvResponse::Put(_)) => took.push(t.elapsed()),
                    other => panic!("small put {}: {other:?}", took.len()),
                }
            }
            (small_client, took)
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut changes = Vec::new();
    for round in 0..2 {
        // Replica 0 is never frozen twice in a row, so it is always a live witness of the regency.
        let witness = if round == 0 { 1 } else { 0 };
        let regency = cluster.metric(witness, "kmmr_regency").await as u64;
        let leader = (regency % 4) as u32;
        let pid = cluster.pid(leader).expect("leader running");
        signal(pid, "STOP");
        let t = Instant::now();
        loop {
            let mut changed = true;
            for i in (0..4).filter(|&i| i != leader) {
                changed &= cluster.metric(i, "kmmr_regency").await as u64 > regency;
            }
            if changed {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "leader change {round} away from frozen replica {leader} did not complete in 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        changes.push(t.elapsed());
        tokio::time::sleep(Duration::from_secs(1)).await;
        signal(pid, "CONT");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut heavy_acked = 0;
    for h in heavy {
        heavy_acked += h.await.expect("heavy client");
    }
    let (small_client, mut took) = small.await.expect("small client");
    took.sort();
    let p99 = took[took.len() * 99 / 100];
    println!(
        "{heavy_acked} puts of {MAX_VALUE_LEN} bytes, {} small puts (p50 {:?}, p99 {p99:?}, max \
         {:?}), leader changes completed in {changes:?}",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1],
    );
    assert!(heavy_acked > 0, "no value of the maximum size was written");
    // The one small put in flight when the leader froze waits for the leader change, so with a
    // few dozen puts the p99 is that wait; the median is the steady cost of sharing batches
    // with values of the maximum size (1.2 s when the round of a batch ended at the first
    // request that did not fit). `replica/scripts/heavy-values.sh` measures the p99 over a
    // long run with 150 clients.
    let p50 = took[took.len() / 2];
    assert!(p50 < Duration::from_millis(600), "small puts' p50 {p50:?}");
    assert!(
        took[took.len() - 1] < Duration::from_secs(5),
        "a small put took {:?}",
        took[took.len() - 1]
    );
    // Every acknowledged small put reads back.
    for i in 0..took.len() {
        match small_client
            .kv(&KvRequest::get(format!("small/{i}")))
            .await
            .expect("get")
        {
            KvResponse::Range(r) => assert_eq!(r.kvs.len(), 1, "small/{i} lost"),
            other => panic!("get small/{i}: {other:?}"),
        }
    }
}
