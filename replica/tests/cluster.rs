//! Multi-process clusters on loopback: real `kmmr-replica` processes, real TLS sockets, the real
//! client. Each test lays out its own cluster in a temporary directory on its own ports.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kmmr::cluster::http_port;
use kmmr_client::Client;
use kmmr_linearizability::{self as linearizability, CheckResult, Operation};
use kmmr_net::{client_address, LinkKind, TlsIdentity};
use kmmr_protocol::crypto::{KeyPair, Signature};
use kmmr_protocol::service::kv::{KvRequest, KvResponse};
use kmmr_protocol::wire::codec::{Decode, Encode};
use kmmr_protocol::wire::messages::{Reply, ReplyBody, Request, RequestKind, SignedRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

use common::TestCluster;

/// The cluster tests' protocol settings: a short request timeout, so that leader changes are
/// quick.
fn protocol() -> kmmr::node::ProtocolConfig {
    kmmr::node::ProtocolConfig {
        request_timeout_ms: 300,
        ..Default::default()
    }
}

/// A concurrent, checked key-value workload: `ops` operations from `clients` clients, in the
/// background; returns the history.
fn workload(
    clients: Vec<Client>,
    ops: usize,
    t0: Instant,
) -> tokio::task::JoinHandle<Vec<Operation>> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        let per = ops / clients.len().max(1);
        for (c, client) in clients.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let mut h = Vec::new();
                for i in 0..per {
                    let key = format!("k{}", (i + c) % 5).into_bytes();
                    let req = match i % 4 {
                        0 | 1 => KvRequest::put(key, format!("c{c}-{i}").into_bytes()),
                        2 => KvRequest::get(key),
                        _ => KvRequest::cas(key, None, format!("c{c}-{i}").into_bytes()),
                    };
                    let invoke = t0.elapsed().as_micros() as u64;
                    let r = client.kv(&req).await;
                    let complete = t0.elapsed().as_micros() as u64;
                    h.push(Operation {
                        client: c as u64,
                        invoke,
                        complete: r.is_ok().then_some(complete),
                        request: req,
                        response: r.ok(),
                    });
                }
                h
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    })
}

fn assert_all_completed_and_linearizable(history: &[Operation]) {
    let failed = history.iter().filter(|o| o.complete.is_none()).count();
    assert_eq!(failed, 0, "{failed} operations got no agreed reply");
    assert_eq!(
        linearizability::check(history),
        CheckResult::Linearizable,
        "history not linearizable"
    );
}

async fn statuses(c: &TestCluster) -> BTreeMap<u32, kmmr_client::status::SignedStatus> {
    let mut out = BTreeMap::new();
    for m in &c.view.members {
        if let Some(s) = c.status(m.id.0).await {
            out.insert(m.id.0, s);
        }
    }
    out
}

/// Correct replicas converge to the same instance and byte-identical state.
async fn assert_correct_replicas_agree(c: &TestCluster, correct: &[u32]) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let st = statuses(c).await;
        let views: Vec<_> = correct
            .iter()
            .filter_map(|i| st.get(i))
            .map(|s| (s.status.last_decided, s.status.state_digest.clone()))
            .collect();
        if views.len() == correct.len() && views.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(
            Instant::now() < until,
            "correct replicas disagree: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_continues_when_a_follower_is_killed() {
    let mut c = TestCluster::start("follower", 4, protocol(), &[]).await;
    let t0 = Instant::now();
    let clients = vec![c.client().await, c.client().await, c.client().await];
    let run = workload(clients, 300, t0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.kill(3).await;
    let history = run.await.expect("workload");
    assert_all_completed_and_linearizable(&history);
    assert_correct_replicas_agree(&c, &[0, 1, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_takes_over_within_bounded_time_when_the_leader_is_killed() {
    let mut c = TestCluster::start("leader", 4, protocol(), &[]).await;
    let client = c.client().await;
    for i in 0..20 {
        client
            .kv(&KvRequest::put(format!("a{i}"), "v"))
            .await
            .expect("put before the crash");
    }
    let leader = statuses(&c).await[&1].status.leader;
    c.kill(leader).await;
    let t = Instant::now();
    client
        .kv(&KvRequest::put("after", "crash"))
        .await
        .expect("put after the leader crashed");
    let took = t.elapsed();
    // Request timeout 300 ms: forward at 300 ms, STOP at 600 ms, then the synchronization.
    assert!(took < Duration::from_secs(5), "new leader took {took:?}");
    let st = statuses(&c).await;
    let alive: Vec<u32> = (0..4).filter(|i| *i != leader).collect();
    for i in &alive {
        assert_ne!(
            st[i].status.leader, leader,
            "replica {i} moved off the dead leader"
        );
    }
    eprintln!("leader {leader} killed: the next write completed after {took:?}");
    assert_correct_replicas_agree(&c, &alive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stay_correct_with_an_equivocating_leader() {
    let c = TestCluster::start("byz", 4, protocol(), &[(0, "equivocate")]).await;
    let t0 = Instant::now();
    let clients = vec![c.client().await, c.client().await];
    let history = workload(clients, 200, t0).await.expect("workload");
    assert_all_completed_and_linearizable(&history);
    assert_correct_replicas_agree(&c, &[1, 2, 3]).await;
    let st = statuses(&c).await;
    assert!(
        st[&0].status.byzantine.is_some(),
        "the Byzantine replica says so"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stay_correct_with_a_replica_that_lies_to_clients_and_forges() {
    let c = TestCluster::start("mixed", 4, protocol(), &[(2, "mixed")]).await;
    let t0 = Instant::now();
    let clients = vec![c.client().await, c.client().await];
    let history = workload(clients, 200, t0).await.expect("workload");
    assert_all_completed_and_linearizable(&history);
    assert_correct_replicas_agree(&c, &[0, 1, 3]).await;
    // The correct replicas caught it and say so in their signed statuses (what the operator
    // names a Byzantine replica by).
    let st = statuses(&c).await;
    let accusers: Vec<u32> = [0, 1, 3]
        .into_iter()
        .filter(|i| {
            st.get(i).is_some_and(|s| {
                s.status
                    .accusations
                    .iter()
                    .any(|a| a.replica == 2 && a.count > 0)
            })
        })
        .collect();
    assert!(
        accusers.len() >= 2,
        "f+1 correct replicas accuse replica 2: {:?}",
        st.values()
            .map(|s| (s.status.id, &s.status.accusations))
            .collect::<Vec<_>>()
    );
    for s in st.values().filter(|s| s.status.id != 2) {
        assert!(
            s.status.accusations.iter().all(|a| a.replica == 2),
            "only the Byzantine replica is accused: {:?}",
            s.status
        );
    }
}

/// Opens a TLS client connection to replica 0's client port with `key`.
async fn tls_to_client_port(
    c: &TestCluster,
    key: &KeyPair,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_to_client_port_of(c, 0, key).await
}

async fn tls_to_client_port_of(
    c: &TestCluster,
    member: usize,
    key: &KeyPair,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let member = &c.view.members[member];
    let cfg = TlsIdentity::new(key)
        .expect("identity")
        .client_config(member.key, LinkKind::Client)
        .expect("tls config");
    let tcp = tokio::net::TcpStream::connect(client_address(&member.address).expect("addr"))
        .await
        .expect("connect");
    tokio_rustls::TlsConnector::from(cfg)
        .connect(kmmr_net::server_name(), tcp)
        .await
        .expect("handshake")
}

/// A client link frame: `key`'s signed ordered put of `key_name` = `seq`, number `seq` of its
/// session 1, as a raw client writes it.
fn put_frame(c: &TestCluster, key: &KeyPair, key_name: &str, seq: u64) -> Vec<u8> {
    let r = SignedRequest::sign(
        Request {
            client: key.public(),
            session: 1,
            sequence: seq,
            kind: RequestKind::Ordered,
            view: c.view.id,
            payload: KvRequest::put(key_name, format!("{seq}")).to_bytes(),
        },
        key,
    );
    let body = r.to_bytes();
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

fn counter(metrics: &str, reason: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.contains(&format!("reason=\"{reason}\"")) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversized_replayed_and_forged_frames_are_rejected_counted_and_survived() {
    let c = TestCluster::start("garbage", 4, protocol(), &[]).await;
    let m0 = &c.view.members[0];
    // Garbage instead of a TLS handshake, on the replica port and on the client port.
    for addr in [
        m0.address.clone(),
        client_address(&m0.address).expect("addr"),
    ] {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let _ = s
            .write_all(b"\x16\x03\x01 this is not TLS at all \xff\xfe")
            .await;
        let _ = s.shutdown().await;
    }
    // Garbage to the HTTP port.
    {
        let mut s = tokio::net::TcpStream::connect(format!("127.0.0.1:{}", http_port(c.base, 0)))
            .await
            .expect("connect");
        let _ = s.write_all(b"\x00\x01\x02 GARBAGE\r\n\r\n").await;
    }
    let key = KeyPair::generate(&mut rand::rngs::OsRng);
    // An authenticated client sends an undecodable frame, then an oversized one.
    {
        let mut tls = tls_to_client_port(&c, &key).await;
        let junk = b"\x07\x00\x00\x00garbage";
        let mut f = (junk.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(junk);
        tls.write_all(&f).await.expect("write");
        tls.write_all(&((kmmr_protocol::wire::limits::MAX_FRAME as u32) + 1).to_le_bytes())
            .await
            .expect("write");
        let _ = tls.flush().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A request whose signature is forged, on the client's own channel: replicas hold it as
    // authentic (the channel proves the sender) but the leader checks signatures before
    // proposing, so it is never ordered.
    {
        let mut tls = tls_to_client_port(&c, &key).await;
        let forged = SignedRequest {
            request: Request {
                client: key.public(),
                session: 1,
                sequence: 1,
                kind: RequestKind::Ordered,
                view: c.view.id,
                payload: KvRequest::put("forged", "x").to_bytes(),
            },
            signature: Signature([7; 64]),
        };
        let body = forged.to_bytes();
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&body);
        tls.write_all(&f).await.expect("write");
        let _ = tls.flush().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A replay: a signed request resent after a newer one of its session executed.
    {
        let replayer = KeyPair::generate(&mut rand::rngs::OsRng);
        let mut tls = tls_to_client_port(&c, &replayer).await;
        let signed = |seq: u64| put_frame(&c, &replayer, "replayed", seq);
        let first = signed(1);
        for frame in [first.clone(), signed(2), first] {
            tls.write_all(&frame).await.expect("write");
            let _ = tls.flush().await;
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    }
    let client = c.client().await;
    // The replica keeps serving, and nothing forged was executed.
    let r = client.kv(&KvRequest::get("forged")).await.expect("get");
    match r {
        KvResponse::Range(r) => assert!(r.kvs.is_empty(), "the forged request was not executed"),
        other => panic!("unexpected {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = c.metrics_text(0).await;
    for reason in [
        "net_handshake",
        "net_oversized",
        "truncated",
        "bad_request_signature",
        "stale_request",
    ] {
        assert!(
            counter(&m, reason) >= 1,
            "replica 0 counts {reason}; metrics:\n{}",
            m.lines()
                .filter(|l| l.contains("rejected"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(!c.log(0).contains("panicked"), "no panic in replica 0");
    assert_correct_replicas_agree(&c, &[0, 1, 2, 3]).await;
}

/// The replicas keep one session per client key. When a second process starts with the key of
/// a first, the first one's requests can no longer execute: they must fail at once with the
/// replicas' reason, not wait out the client's timeout as they did (the replicas dropped them
/// without a word, which is what hung `watch` when a `put` ran beside it with the same key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_by_a_newer_one_of_the_same_key_fails_at_once_with_the_reason() {
    let c = TestCluster::start("superseded", 4, protocol(), &[]).await;
    let key = KeyPair::generate(&mut rand::rngs::OsRng);
    let first = Client::connect(key.clone(), c.view.clone(), common::client_options())
        .await
        .expect("client connects");
    assert!(matches!(
        first.kv(&KvRequest::put("k", "1")).await,
        Ok(KvResponse::Put(_))
    ));
    // The second process's session is newer: its clock started later.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let second = Client::connect(key, c.view.clone(), common::client_options())
        .await
        .expect("client connects");
    assert!(matches!(
        second.kv(&KvRequest::put("k", "2")).await,
        Ok(KvResponse::Put(_))
    ));
    let t = Instant::now();
    let err = first
        .kv(&KvRequest::get("k"))
        .await
        .expect_err("the first session has ended");
    assert!(
        err.to_string()
            .contains("a newer session of this client key"),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    // The newer session carries on.
    assert!(matches!(
        second.kv(&KvRequest::get("k")).await,
        Ok(KvResponse::Range(_))
    ));
}

/// A client with requests in flight loses request 1 on its way to the replicas while request 2
/// executes (here: it sends 2 first). Request 1 can never run now; every replica that executed 2
/// answers it `Overtaken` over the real client links, so the client sends it again under a new
/// number instead of waiting for its timeout, and nothing ran twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_overtaken_by_a_later_one_of_its_session_is_answered_overtaken() {
    let c = TestCluster::start("overtaken", 4, protocol(), &[]).await;
    let key = KeyPair::generate(&mut rand::rngs::OsRng);
    let mut links = Vec::new();
    for i in 0..c.view.members.len() {
        links.push(tls_to_client_port_of(&c, i, &key).await);
    }
    let frame = |seq: u64| put_frame(&c, &key, "overtaken", seq);
    // Each replica's answer to `seq` on its link (None: nothing within 10 s).
    async fn answer(
        link: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        seq: u64,
    ) -> Option<ReplyBody> {
        let read = async {
            loop {
                let mut len = [0u8; 4];
                link.read_exact(&mut len).await.ok()?;
                let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
                link.read_exact(&mut body).await.ok()?;
                let reply = Reply::from_bytes(&body).ok()?;
                if reply.sequence == seq {
                    return Some(reply.body);
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .ok()
            .flatten()
    }
    for seq in [2, 1] {
        for link in links.iter_mut() {
            link.write_all(&frame(seq)).await.expect("write");
            link.flush().await.expect("flush");
        }
        let mut answers = Vec::new();
        for link in links.iter_mut() {
            answers.push(answer(link, seq).await);
        }
        let expected = |a: &Option<ReplyBody>| {
            matches!(
                (seq, a),
                (2, Some(ReplyBody::Result(_))) | (1, Some(ReplyBody::Overtaken))
            )
        };
        assert!(
            answers.iter().filter(|a| expected(a)).count() >= 3,
            "request {seq}: answers {answers:?}"
        );
    }
    // Request 1 never ran: the key holds request 2's value.
    let client = c.client().await;
    match client.kv(&KvRequest::get("overtaken")).await.expect("get") {
        KvResponse::Range(r) => {
            assert_eq!(r.kvs.len(), 1);
            assert_eq!(r.kvs[0].value, b"2".to_vec());
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_correct_replicas_agree(&c, &[0, 1, 2, 3]).await;
}
