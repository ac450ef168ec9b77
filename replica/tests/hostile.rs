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
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

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
