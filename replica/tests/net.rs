//! The network runtime on loopback: mutual TLS pinned to the view's keys, framing limits,
//! reconnection and bounded queues. Every test binds 127.0.0.1 only and is bounded in time.

// clippy.toml allows unwrap in #[test] functions; the helpers below are test code too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmmr_net::{
    server_name, ClientConnector, ClientListener, FromReplica, Inbound, LinkKind, NetConfig,
    NetStats, PeerNetwork, PeerProtocol, RejectReason, SendError, TlsIdentity,
};
use kmmr_protocol::crypto::KeyPair;
use kmmr_protocol::view::{Member, View};
use kmmr_protocol::wire::ids::{ReplicaId, ViewId};
use kmmr_protocol::wire::limits::MAX_FRAME;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

const LIMIT: Duration = Duration::from_secs(20);

/// Runs a test body with a hard time bound, so a hang fails instead of stalling CI.
async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(LIMIT, body)
        .await
        .expect("test exceeded its time bound");
}

fn key(i: u8) -> KeyPair {
    KeyPair::from_seed([i + 1; 32])
}

fn fast() -> NetConfig {
    NetConfig {
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
        handshake_timeout: Duration::from_secs(2),
        ..NetConfig::default()
    }
}

async fn loopback_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

fn view_of(listeners: &[TcpListener]) -> View {
    let members = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| Member {
            id: ReplicaId(i as u32),
            address: l.local_addr().unwrap().to_string(),
            key: key(i as u8).public(),
        })
        .collect::<Vec<_>>();
    let f = (members.len() - 1) / 3;
    View::new(ViewId(0), f, members).unwrap()
}

struct Node {
    net: PeerNetwork,
    rx: mpsc::Receiver<Inbound>,
    stats: Arc<NetStats>,
}

fn start(i: usize, view: &View, listener: TcpListener, cfg: NetConfig) -> Node {
    let stats = Arc::new(NetStats::default());
    let (tx, rx) = mpsc::channel(100_000);
    let net = PeerNetwork::with_listener(
        &key(i as u8),
        ReplicaId(i as u32),
        view,
        listener,
        cfg,
        tx,
        stats.clone(),
    )
    .unwrap();
    Node { net, rx, stats }
}

async fn mesh(n: usize, cfg: NetConfig) -> (View, Vec<Node>) {
    let mut listeners = Vec::new();
    for _ in 0..n {
        listeners.push(loopback_listener().await);
    }
    let view = view_of(&listeners);
    let nodes = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| start(i, &view, l, cfg.clone()))
        .collect();
    (view, nodes)
}

/// The next peer frame, or `None` if none arrives within `wait`.
async fn next_peer(
    rx: &mut mpsc::Receiver<Inbound>,
    wait: Duration,
) -> Option<(ReplicaId, Vec<u8>)> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Inbound::Peer { from, frame })) => return Some((from, frame)),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A raw TLS stream to a listener, presenting `me` and pinning `server`.
async fn raw_tls(
    me: &KeyPair,
    server: &KeyPair,
    kind: LinkKind,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let cfg = TlsIdentity::new(me)
        .unwrap()
        .client_config(server.public(), kind)
        .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(cfg)
        .connect(server_name(), tcp)
        .await
        .unwrap()
}

/// True once the other end closes `stream` (EOF or error) within `wait`.
async fn closed_by_peer<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, wait: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_exchange_frames_in_every_direction() {
    bounded(async {
        let (_view, mut nodes) = mesh(4, fast()).await;
        for i in 0..4u32 {
            for j in 0..4u32 {
                if i != j {
                    let msg = format!("{i}->{j}");
                    nodes[i as usize]
                        .net
                        .send(ReplicaId(j), msg.as_bytes())
                        .unwrap();
                }
            }
        }
        assert_eq!(nodes[0].net.broadcast(b"hello from 0"), 3);
        for (j, node) in nodes.iter_mut().enumerate() {
            let mut got = Vec::new();
            let expected = if j == 0 { 3 } else { 4 };
            for _ in 0..expected {
                let (from, frame) = next_peer(&mut node.rx, Duration::from_secs(10))
                    .await
                    .expect("frame");
                got.push((from.0, String::from_utf8(frame).unwrap()));
            }
            got.sort();
            let mut want: Vec<(u32, String)> = (0..4u32)
                .filter(|i| *i as usize != j)
                .map(|i| (i, format!("{i}->{j}")))
                .collect();
            if j != 0 {
                want.push((0, "hello from 0".into()));
            }
            want.sort();
            assert_eq!(got, want, "replica {j}");
        }
        eventually("inbound links from every other replica", || {
            nodes.iter().all(|n| n.net.connected_inbound().len() == 3)
        })
        .await;
        for n in &nodes {
            assert_eq!(
                n.stats
                    .rejected_by_reason()
                    .iter()
                    .map(|r| r.1)
                    .sum::<u64>(),
                0
            );
        }
        assert_eq!(
            nodes[0].net.send(ReplicaId(0), b"self"),
            Err(SendError::Unknown),
            "a replica does not dial itself"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_presenting_a_key_not_in_the_view_is_refused_and_counted() {
    bounded(async {
        let (view, mut nodes) = mesh(2, fast()).await;
        let addr0 = nodes[0].net.local_addr();

        // An outsider claiming to be replica 1, and someone presenting replica 0's own key.
        for intruder in [key(99), key(0)] {
            let cfg = TlsIdentity::new(&intruder)
                .unwrap()
                .client_config(key(0).public(), LinkKind::Peer(PeerProtocol::NEWEST))
                .unwrap();
            let tcp = TcpStream::connect(addr0).await.unwrap();
            // TLS 1.3 client auth finishes after the client's handshake: the refusal shows up as
            // an alert or a close on the first read.
            if let Ok(mut s) = TlsConnector::from(cfg).connect(server_name(), tcp).await {
                let _ = s.write_all(&5u32.to_le_bytes()).await;
                let _ = s.write_all(b"forge").await;
                let _ = s.flush().await;
                assert!(closed_by_peer(&mut s, Duration::from_secs(5)).await);
            }
        }
        let stats0 = nodes[0].stats.clone();
        eventually("two unknown keys counted", || {
            stats0.rejected(RejectReason::UnknownKey) == 2
        })
        .await;

        // A replica whose view pins another key for replica 0 refuses to talk to it.
        let mut wrong = view.members.clone();
        wrong[0].key = key(42).public();
        let wrong_view = View::new(ViewId(0), 0, wrong).unwrap();
        let l = loopback_listener().await;
        let impostor_view_holder = start(1, &wrong_view, l, fast());
        impostor_view_holder.net.send(ReplicaId(0), b"x").unwrap();
        let s = impostor_view_holder.stats.clone();
        eventually("dialer counts the mismatched server key", || {
            s.rejected(RejectReason::UnknownKey) >= 1
        })
        .await;

        // Only replica 1's own link ever delivers.
        nodes[1].net.send(ReplicaId(0), b"genuine").unwrap();
        let (from, frame) = next_peer(&mut nodes[0].rx, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((from, frame.as_slice()), (ReplicaId(1), &b"genuine"[..]));
        assert!(next_peer(&mut nodes[0].rx, Duration::from_millis(300))
            .await
            .is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_any_key_connects_and_its_frames_carry_its_client_id() {
    bounded(async {
        let replica_key = key(0);
        let stats = Arc::new(NetStats::default());
        let (tx, mut rx) = mpsc::channel(1000);
        let listener = ClientListener::with_listener(
            &replica_key,
            loopback_listener().await,
            fast(),
            tx,
            stats.clone(),
        )
        .unwrap();
        let addr = listener.local_addr().to_string();

        let (events, mut from_replicas) = mpsc::channel(100);
        let alice =
            ClientConnector::new(&KeyPair::from_seed([200; 32]), fast(), stats.clone()).unwrap();
        let bob =
            ClientConnector::new(&KeyPair::from_seed([201; 32]), fast(), stats.clone()).unwrap();
        let a = alice
            .dial_addr(ReplicaId(0), replica_key.public(), &addr, events.clone())
            .await
            .unwrap();
        let b = bob
            .dial_addr(ReplicaId(0), replica_key.public(), &addr, events.clone())
            .await
            .unwrap();
        a.send(b"from alice").unwrap();
        b.send(b"from bob").unwrap();

        let mut conns = std::collections::HashMap::new();
        for _ in 0..2 {
            match rx.recv().await.unwrap() {
                Inbound::Client {
                    conn,
                    client,
                    frame,
                } => {
                    let who = if client == alice.client_id() {
                        "alice"
                    } else {
                        assert_eq!(client, bob.client_id());
                        "bob"
                    };
                    assert_eq!(frame, format!("from {who}").into_bytes());
                    conns.insert(who, conn);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_ne!(conns["alice"], conns["bob"]);
        assert_eq!(listener.connections(), 2);

        listener.send(conns["bob"], b"reply to bob").unwrap();
        match from_replicas.recv().await.unwrap() {
            FromReplica::Frame { from, link, frame } => {
                assert_eq!(
                    (from, link, frame),
                    (ReplicaId(0), b.id(), b"reply to bob".to_vec())
                );
            }
            other => panic!("unexpected {other:?}"),
        }

        drop(a);
        match rx.recv().await.unwrap() {
            Inbound::ClientGone { conn, client } => {
                assert_eq!((conn, client), (conns["alice"], alice.client_id()));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            listener.send(conns["alice"], b"too late"),
            Err(SendError::Unknown)
        );

        // A client that pins another key for the replica refuses the connection.
        let err = alice
            .dial_addr(ReplicaId(0), key(7).public(), &addr, events.clone())
            .await;
        assert!(err.is_err());
        assert!(stats.rejected(RejectReason::UnknownKey) >= 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_above_the_limit_closes_only_that_connection_and_is_counted() {
    bounded(async {
        // Replica links: replica 2 (not running, so no genuine link of its own replaces the raw
        // one) announces a frame one byte over MAX_FRAME on a raw link.
        let listeners = vec![
            loopback_listener().await,
            loopback_listener().await,
            loopback_listener().await,
        ];
        let view = view_of(&listeners);
        let mut nodes: Vec<Node> = listeners
            .into_iter()
            .take(2)
            .enumerate()
            .map(|(i, l)| start(i, &view, l, fast()))
            .collect();
        let mut raw = raw_tls(
            &key(2),
            &key(0),
            LinkKind::Peer(PeerProtocol::NEWEST),
            nodes[0].net.local_addr(),
        )
        .await;
        raw.write_all(&((MAX_FRAME + 1) as u32).to_le_bytes())
            .await
            .unwrap();
        raw.flush().await.unwrap();
        assert!(closed_by_peer(&mut raw, Duration::from_secs(5)).await);
        assert_eq!(nodes[0].stats.rejected(RejectReason::Oversized), 1);
        nodes[1].net.send(ReplicaId(0), b"still here").unwrap();
        let (from, frame) = next_peer(&mut nodes[0].rx, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((from, frame.as_slice()), (ReplicaId(1), &b"still here"[..]));

        // Client links: one client's oversized frame does not disturb another client.
        let stats = Arc::new(NetStats::default());
        let (tx, mut rx) = mpsc::channel(1000);
        let listener = ClientListener::with_listener(
            &key(0),
            loopback_listener().await,
            fast(),
            tx,
            stats.clone(),
        )
        .unwrap();
        let (events, mut replies) = mpsc::channel(100);
        let good = ClientConnector::new(&key(50), fast(), Arc::new(NetStats::default()))
            .unwrap()
            .dial_addr(
                ReplicaId(0),
                key(0).public(),
                &listener.local_addr().to_string(),
                events,
            )
            .await
            .unwrap();
        let mut bad = raw_tls(&key(51), &key(0), LinkKind::Client, listener.local_addr()).await;
        bad.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        bad.flush().await.unwrap();
        assert!(closed_by_peer(&mut bad, Duration::from_secs(5)).await);
        eventually("oversized client frame counted", || {
            stats.rejected(RejectReason::Oversized) == 1
        })
        .await;
        good.send(b"ping").unwrap();
        let conn = loop {
            match rx.recv().await.unwrap() {
                Inbound::Client { conn, frame, .. } => {
                    assert_eq!(frame, b"ping");
                    break conn;
                }
                Inbound::ClientGone { .. } => continue,
                other => panic!("unexpected {other:?}"),
            }
        };
        listener.send(conn, b"pong").unwrap();
        assert!(matches!(
            replies.recv().await.unwrap(),
            FromReplica::Frame { frame, .. } if frame == b"pong"
        ));

        // Our own side refuses to send an oversized frame instead of queuing it.
        let huge = vec![0u8; MAX_FRAME + 1];
        assert_eq!(good.send(&huge), Err(SendError::Oversized));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_a_client_hello_is_counted_and_the_listeners_keep_working() {
    bounded(async {
        let (_view, mut nodes) = mesh(2, fast()).await;
        let stats = Arc::new(NetStats::default());
        let (tx, mut rx) = mpsc::channel(1000);
        let clients = ClientListener::with_listener(
            &key(0),
            loopback_listener().await,
            fast(),
            tx,
            stats.clone(),
        )
        .unwrap();

        for addr in [nodes[0].net.local_addr(), clients.local_addr()] {
            for garbage in [
                &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
                &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00][..],
                &[0u8; 4096][..],
            ] {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                let _ = tcp.write_all(garbage).await;
                let _ = tcp.shutdown().await;
                assert!(closed_by_peer(&mut tcp, Duration::from_secs(5)).await);
            }
        }
        let s0 = nodes[0].stats.clone();
        eventually("garbage counted on the replica listener", || {
            s0.rejected(RejectReason::Handshake) == 3
        })
        .await;
        eventually("garbage counted on the client listener", || {
            stats.rejected(RejectReason::Handshake) == 3
        })
        .await;

        nodes[1].net.send(ReplicaId(0), b"after garbage").unwrap();
        let (from, _) = next_peer(&mut nodes[0].rx, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(from, ReplicaId(1));

        let (events, _replies) = mpsc::channel(10);
        let link = ClientConnector::new(&key(60), fast(), Arc::new(NetStats::default()))
            .unwrap()
            .dial_addr(
                ReplicaId(0),
                key(0).public(),
                &clients.local_addr().to_string(),
                events,
            )
            .await
            .unwrap();
        link.send(b"after garbage").unwrap();
        assert!(matches!(rx.recv().await.unwrap(), Inbound::Client { .. }));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_replica_reconnects_after_its_peer_restarts() {
    bounded(async {
        let (view, mut nodes) = mesh(2, fast()).await;
        nodes[0].net.send(ReplicaId(1), b"before").unwrap();
        let (from, frame) = next_peer(&mut nodes[1].rx, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((from, frame.as_slice()), (ReplicaId(0), &b"before"[..]));

        let addr1 = nodes[1].net.local_addr();
        let old = nodes.pop().unwrap();
        old.net.shutdown().await;
        drop(old.rx);

        let listener = TcpListener::bind(addr1).await.unwrap();
        let mut restarted = start(1, &view, listener, fast());
        // Frames written into the dead connection are lost (no retransmission); keep sending
        // until the re-dialed link delivers.
        let mut k = 0u32;
        let (from, frame) = loop {
            k += 1;
            let _ = nodes[0]
                .net
                .send(ReplicaId(1), format!("after {k}").as_bytes());
            if let Some(got) = next_peer(&mut restarted.rx, Duration::from_millis(50)).await {
                break got;
            }
        };
        assert_eq!(from, ReplicaId(0));
        assert!(String::from_utf8(frame).unwrap().starts_with("after "));
        assert!(
            nodes[0]
                .stats
                .peer_dials
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 2
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queues_drop_and_count_instead_of_blocking() {
    bounded(async {
        // Replica 1 never comes up: replica 0's queue to it fills and then drops.
        let l0 = loopback_listener().await;
        let l1 = loopback_listener().await;
        let view = view_of(&[l0, l1]);
        let l0 = TcpListener::bind(&view.members[0].address).await.unwrap();
        let cfg = NetConfig {
            peer_queue: 100,
            ..fast()
        };
        let node = start(0, &view, l0, cfg);
        let t = Instant::now();
        let results: Vec<_> = (0..10_000)
            .map(|_| node.net.send(ReplicaId(1), &[7u8; 64]))
            .collect();
        assert!(t.elapsed() < Duration::from_secs(1), "send blocked");
        let queued = results.iter().filter(|r| r.is_ok()).count();
        let dropped = results
            .iter()
            .filter(|r| **r == Err(SendError::QueueFull))
            .count();
        assert_eq!((queued, dropped), (100, 9_900));
        assert_eq!(
            node.stats
                .peer_queue_drops
                .load(std::sync::atomic::Ordering::Relaxed),
            9_900
        );

        // A client that does not read loses replies, counted; the replica never blocks.
        let stats = Arc::new(NetStats::default());
        let (tx, mut rx) = mpsc::channel(1000);
        let cfg = NetConfig {
            client_queue: 8,
            ..fast()
        };
        let clients = ClientListener::with_listener(
            &key(0),
            loopback_listener().await,
            cfg,
            tx,
            stats.clone(),
        )
        .unwrap();
        let mut sluggish = raw_tls(&key(70), &key(0), LinkKind::Client, clients.local_addr()).await;
        sluggish.write_all(&3u32.to_le_bytes()).await.unwrap();
        sluggish.write_all(b"req").await.unwrap();
        sluggish.flush().await.unwrap();
        let conn = match rx.recv().await.unwrap() {
            Inbound::Client { conn, .. } => conn,
            other => panic!("unexpected {other:?}"),
        };
        let reply = vec![1u8; 256 * 1024];
        let t = Instant::now();
        let mut full = 0;
        for _ in 0..400 {
            if clients.send(conn, &reply) == Err(SendError::QueueFull) {
                full += 1;
            }
            tokio::task::yield_now().await;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "send blocked");
        assert!(full > 0, "a client that never reads must lose replies");
        assert_eq!(
            stats
                .client_queue_drops
                .load(std::sync::atomic::Ordering::Relaxed),
            full
        );
        drop(sluggish);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_of_64_byte_frames_between_two_replicas() {
    bounded(async {
        let cfg = NetConfig {
            peer_queue: 100_000,
            ..fast()
        };
        let (_view, mut nodes) = mesh(2, cfg).await;
        // Warm up: the link is established.
        nodes[0].net.send(ReplicaId(1), &[0u8; 64]).unwrap();
        next_peer(&mut nodes[1].rx, Duration::from_secs(5))
            .await
            .unwrap();

        let total = 300_000usize;
        let mut receiver = nodes.pop().unwrap();
        let sender = nodes.pop().unwrap();
        let t = Instant::now();
        let recv = tokio::spawn(async move {
            let mut n = 0;
            let deadline = Instant::now() + Duration::from_secs(10);
            while n < total && Instant::now() < deadline {
                if next_peer(&mut receiver.rx, Duration::from_secs(2)).await.is_none() {
                    break;
                }
                n += 1;
            }
            n
        });
        let payload = [42u8; 64];
        let mut sent = 0;
        while sent < total && t.elapsed() < Duration::from_secs(10) {
            match sender.net.send(ReplicaId(1), &payload) {
                Ok(()) => sent += 1,
                Err(SendError::QueueFull) => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        }
        let received = recv.await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "throughput: {received} frames of 64 bytes in {secs:.2} s = {:.0} frames/s (queue drops {})",
            received as f64 / secs,
            sender
                .stats
                .peer_queue_drops
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        assert!(received > 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_view_adds_and_removes_peers_and_repins_keys() {
    bounded(async {
        let listeners = vec![
            loopback_listener().await,
            loopback_listener().await,
            loopback_listener().await,
        ];
        let all = view_of(&listeners);
        let first_two = View::new(ViewId(0), 0, all.members[..2].to_vec()).unwrap();
        let mut it = listeners.into_iter();
        let mut n0 = start(0, &first_two, it.next().unwrap(), fast());
        let n1 = start(1, &first_two, it.next().unwrap(), fast());
        let n2 = start(2, &all, it.next().unwrap(), fast());

        // Replica 2 is not in replica 0's view yet: no queue to it, and its dials are refused.
        assert_eq!(n0.net.send(ReplicaId(2), b"x"), Err(SendError::Unknown));
        n2.net.send(ReplicaId(0), b"early").unwrap();
        let s0 = n0.stats.clone();
        eventually("replica 2 refused before the view change", || {
            s0.rejected(RejectReason::UnknownKey) >= 1
        })
        .await;

        n0.net.update_view(&all);
        n1.net.update_view(&all);
        n0.net.send(ReplicaId(2), b"welcome").unwrap();
        let mut n2 = n2;
        let (from, frame) = next_peer(&mut n2.rx, Duration::from_secs(5)).await.unwrap();
        assert_eq!((from, frame.as_slice()), (ReplicaId(0), &b"welcome"[..]));
        // Replica 2's re-dial is accepted now. Its early frame may be lost (a TLS 1.3 client
        // learns of a refused certificate only after its first write) or, if it was still
        // queued when the re-dial succeeded, delivered now: either is fine, nothing else is.
        let (from, frame) = loop {
            n2.net.send(ReplicaId(0), b"accepted").unwrap();
            match next_peer(&mut n0.rx, Duration::from_millis(50)).await {
                Some((ReplicaId(2), f)) if f.as_slice() == b"early" => continue,
                Some(got) => break got,
                None => {}
            }
        };
        assert_eq!((from, frame.as_slice()), (ReplicaId(2), &b"accepted"[..]));

        // Replica 1 leaves and replica 2 re-keys: links authenticated under the old view close.
        let mut members = vec![all.members[0].clone(), all.members[2].clone()];
        members[1].key = key(9).public();
        let rekeyed = View::new(ViewId(1), 0, members).unwrap();
        let before = n0.stats.rejected(RejectReason::UnknownKey);
        n0.net.update_view(&rekeyed);
        assert_eq!(n0.net.send(ReplicaId(1), b"x"), Err(SendError::Unknown));
        let net0 = &n0.net;
        eventually("old inbound links closed", || {
            net0.connected_inbound().is_empty()
        })
        .await;
        n0.net.send(ReplicaId(2), b"to the new key").unwrap();
        eventually(
            "dial to replica 2 refused: it still proves the old key",
            || s0.rejected(RejectReason::UnknownKey) > before,
        )
        .await;
        assert!(next_peer(&mut n2.rx, Duration::from_millis(300))
            .await
            .is_none());
    })
    .await;
}

/// Links agree on the newest replica protocol both ends speak: a replica of the newest release
/// and one that speaks only protocol 1 (as an older release does) talk protocol 1 both ways,
/// while two of the newest release talk protocol 2; frames flow on every link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_agree_on_the_newest_protocol_both_ends_speak() {
    bounded(async {
        let mut listeners = Vec::new();
        for _ in 0..3 {
            listeners.push(loopback_listener().await);
        }
        let view = view_of(&listeners);
        let old = NetConfig {
            peer_protocol: PeerProtocol::V1,
            ..fast()
        };
        let mut nodes: Vec<Node> = listeners
            .into_iter()
            .enumerate()
            .map(|(i, l)| start(i, &view, l, if i == 2 { old.clone() } else { fast() }))
            .collect();
        for n in &nodes {
            eventually("every link up", || n.net.count_below(PeerProtocol::V1) == 0).await;
        }
        let p = |from: usize, to: u32| nodes[from].net.protocol(ReplicaId(to));
        assert_eq!(p(0, 1), Some(PeerProtocol::V2));
        assert_eq!(p(1, 0), Some(PeerProtocol::V2));
        assert_eq!(p(0, 2), Some(PeerProtocol::V1));
        assert_eq!(p(1, 2), Some(PeerProtocol::V1));
        assert_eq!(p(2, 0), Some(PeerProtocol::V1));
        assert_eq!(p(2, 1), Some(PeerProtocol::V1));
        assert!(!nodes[0].net.all_speak(PeerProtocol::V2));
        assert_eq!(nodes[0].net.count_below(PeerProtocol::V2), 1);
        assert!(nodes[2].net.all_speak(PeerProtocol::V1));

        // Each link gets the frame for its protocol.
        assert_eq!(nodes[0].net.broadcast_by_protocol(b"two", b"one"), 2);
        let got1 = next_peer(&mut nodes[1].rx, LIMIT).await;
        assert_eq!(got1, Some((ReplicaId(0), b"two".to_vec())));
        let got2 = next_peer(&mut nodes[2].rx, LIMIT).await;
        assert_eq!(got2, Some((ReplicaId(0), b"one".to_vec())));
    })
    .await;
}
