//! Bad input at the gateway: bytes that are not HTTP/2, gRPC messages that are not protobuf,
//! requests over the size limit, unknown RPCs, connections that say nothing. Each is refused
//! on its own, and the gateway keeps serving everyone else, with nothing lost.

mod common;

use std::time::Duration;

use common::{Cluster, GatewayHandle};
use kmmr_etcd_gateway::pb::{self, kv_client::KvClient};
use kmmr_etcd_gateway::server::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn put(
    kv: &mut KvClient<tonic::transport::Channel>,
    key: &str,
    value: Vec<u8>,
) -> Result<i64, tonic::Status> {
    kv.put(pb::PutRequest {
        key: key.into(),
        value,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().header.map(|h| h.revision).unwrap_or(0))
}

/// Sends `bytes` on a fresh connection and reads until the gateway closes it (or 10 s pass).
async fn send_raw(addr: &str, bytes: &[u8]) -> bool {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    let mut buf = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    closed.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversized_and_unknown_requests_are_refused_and_the_gateway_goes_on() {
    let cluster = Cluster::start("hostile", 4, &[]);
    let limits = Limits {
        keepalive: Duration::from_secs(2),
        ..Limits::default()
    };
    let gw = GatewayHandle::start(&cluster, limits).await;
    let addr = gw.endpoint.trim_start_matches("http://").to_owned();
    let mut kv = KvClient::connect(gw.endpoint.clone()).await.expect("kv");
    let before = put(&mut kv, "kept", b"1".to_vec()).await.expect("put");

    // Not HTTP/2 at all: the connection is closed.
    let noise: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert!(
        send_raw(&addr, &noise).await,
        "garbage left the connection open"
    );
    // The HTTP/2 preface, then a frame header announcing 16 MiB of a frame type that does not
    // exist: the connection is closed.
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frames.extend_from_slice(&[0xff, 0xff, 0xff, 0x42, 0, 0, 0, 0, 1]);
    frames.extend_from_slice(&[0u8; 1024]);
    assert!(
        send_raw(&addr, &frames).await,
        "a lying frame left the connection open"
    );

    // A gRPC message that is not a PutRequest.
    let raw = tonic::transport::Channel::from_shared(gw.endpoint.clone())
        .expect("uri")
        .connect()
        .await
        .expect("channel");
    let mut grpc = tonic::client::Grpc::new(raw.clone());
    grpc.ready().await.expect("ready");
    let garbage = pb::Member {
        id: u64::MAX,
        name: "\u{fffd}".repeat(100),
        ..Default::default()
    };
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
    let codec = tonic_prost::ProstCodec::<pb::Member, pb::PutResponse>::default();
    let answer = grpc.unary(tonic::Request::new(garbage), path, codec).await;
    let status = answer.expect_err("a message that is not a PutRequest is refused");
    assert!(
        matches!(
            status.code(),
            tonic::Code::Internal | tonic::Code::InvalidArgument
        ),
        "{status:?}"
    );

    // An unknown method is refused by name.
    let mut grpc = tonic::client::Grpc::new(raw);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/etcdserverpb.Maintenance/Defragment",
    );
    let codec = tonic_prost::ProstCodec::<pb::StatusRequest, pb::StatusResponse>::default();
    let status = grpc
        .unary(tonic::Request::new(pb::StatusRequest {}), path, codec)
        .await
        .expect_err("unknown RPC");
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert_eq!(
        status.message(),
        "etcdserverpb.Maintenance/Defragment is not supported by the KmMR etcd gateway"
    );

    // Values at every limit: the largest value etcd takes goes through, one byte more is etcd's
    // "request is too large", a message over gRPC's limit is refused before it is decoded.
    let max = kmmr_protocol::service::kv::MAX_VALUE_LEN;
    put(&mut kv, "max", vec![b'm'; max])
        .await
        .expect("a value at the limit");
    let over = put(&mut kv, "over", vec![b'o'; max + 1])
        .await
        .expect_err("over the limit");
    assert_eq!(
        (over.code(), over.message()),
        (
            tonic::Code::InvalidArgument,
            "etcdserver: request is too large"
        )
    );
    let huge = put(&mut kv, "huge", vec![b'h'; 3 * 1024 * 1024])
        .await
        .expect_err("over gRPC's limit");
    // etcd (grpc-go) answers ResourceExhausted, and clients read the sizes from its text.
    assert_eq!(huge.code(), tonic::Code::ResourceExhausted, "{huge:?}");
    assert!(
        huge.message()
            .starts_with("grpc: received message larger than max (")
            && huge.message().ends_with(" vs. 2097152)"),
        "{huge:?}"
    );

    // A client that opens HTTP/2 and then never answers (half-open, or hostile) is dropped
    // when it misses the keepalive ping, not kept forever.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 0x04, 0, 0, 0, 0, 0]); // an empty SETTINGS frame
    assert!(send_raw(&addr, &hello).await, "a silent client was kept");

    // Nothing was lost, and the gateway still serves.
    let got = kv
        .range(pb::RangeRequest {
            key: b"kept".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    assert_eq!(got.kvs.len(), 1);
    assert_eq!(got.kvs[0].mod_revision, before);
    let got = kv
        .range(pb::RangeRequest {
            key: b"max".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    assert_eq!(got.kvs[0].value.len(), max);
    put(&mut kv, "after", b"2".to_vec())
        .await
        .expect("still serving");
}
