//! Asking a replica what it says about itself: `GET /status` on its HTTP port, and checking that
//! the answer is signed by the key the view lists for that replica. A replica is untrusted input
//! here (up to f of them may lie), so the read is bounded in size and time, and a status is only
//! believed once its signature and its id check out.

use std::time::Duration;

use kmmr::crypto::PublicKey;
use kmmr::node::{SignedStatus, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest `/status` response read. A replica's status is a few hundred bytes.
pub const MAX_RESPONSE: usize = 64 * 1024;

/// What probing one replica gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A status signed by the replica's key in the view, about that replica.
    Verified(Status),
    /// The replica answered, but its status cannot be believed (bad signature, another id,
    /// malformed JSON, an HTTP error). The text says which.
    Rejected(String),
    /// No answer (no pod address, connection refused, timeout).
    Unreachable(String),
}

/// Fetches `http://<addr>/status` and verifies it as replica `id`'s with public key `key_hex`.
pub async fn probe(addr: &str, id: i32, key_hex: &str, timeout: Duration) -> Probe {
    match http_get(addr, "/status", timeout).await {
        Err(GetError::Unreachable(e)) => Probe::Unreachable(e),
        Err(GetError::Bad(e)) => Probe::Rejected(e),
        Ok(body) => verify(&body, id, key_hex),
    }
}

/// Checks a `/status` body: it parses, its signature is the view key's, and it names `id`.
pub fn verify(body: &[u8], id: i32, key_hex: &str) -> Probe {
    let signed: SignedStatus = match serde_json::from_slice(body) {
        Ok(s) => s,
        Err(e) => return Probe::Rejected(format!("malformed /status: {e}")),
    };
    let key = match hex::decode(key_hex)
        .ok()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
    {
        Some(k) => PublicKey(k),
        None => {
            return Probe::Rejected(format!(
                "the view's key of replica {id} is not 32 bytes of hex"
            ))
        }
    };
    if !signed.verify(&key) {
        return Probe::Rejected(format!(
            "/status is not signed by replica {id}'s key in the view"
        ));
    }
    if i64::from(signed.status.id) != i64::from(id) {
        return Probe::Rejected(format!(
            "/status signed by replica {id}'s key claims id {}",
            signed.status.id
        ));
    }
    Probe::Verified(signed.status)
}

enum GetError {
    Unreachable(String),
    Bad(String),
}

/// A minimal HTTP/1.0 GET: HTTP/1.0 so that the server neither keeps the connection open nor
/// chunks the body, which keeps the parsing to a status line and a blank line.
async fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<Vec<u8>, GetError> {
    let mut stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| GetError::Unreachable(format!("connecting to {addr} timed out")))?
        .map_err(|e| GetError::Unreachable(format!("connecting to {addr}: {e}")))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n");
    let read = async {
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(1024);
        // One byte past the limit tells an oversized response from one of exactly the limit.
        (&mut stream)
            .take(MAX_RESPONSE as u64 + 1)
            .read_to_end(&mut buf)
            .await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| GetError::Unreachable(format!("{addr} did not answer within {timeout:?}")))?
        .map_err(|e| GetError::Unreachable(format!("reading from {addr}: {e}")))?;
    parse_response(&buf).map_err(GetError::Bad)
}

/// The body of a 200 response, or why there is none.
fn parse_response(buf: &[u8]) -> Result<Vec<u8>, String> {
    if buf.len() > MAX_RESPONSE {
        return Err(format!("response larger than {MAX_RESPONSE} bytes"));
    }
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| "malformed HTTP response (no end of headers)".to_string())?;
    let head = String::from_utf8_lossy(&buf[..split]);
    let status_line = head.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if !status_line.starts_with("HTTP/1.") || code != "200" {
        return Err(format!(
            "/status answered {:?}",
            status_line.chars().take(100).collect::<String>()
        ));
    }
    Ok(buf[split + 4..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmmr::crypto::KeyPair;

    fn status(id: u32) -> Status {
        Status {
            id,
            view_id: 0,
            n: 4,
            f: 1,
            regency: 0,
            leader: 0,
            synchronizing: false,
            last_decided: Some(7),
            state_digest: "ab".repeat(32),
            pending_requests: 0,
            byzantine: None,
            ..Default::default()
        }
    }

    fn key(seed: u8) -> KeyPair {
        KeyPair::from_seed([seed; 32])
    }

    #[test]
    fn a_status_signed_by_the_view_key_is_believed() {
        let k = key(1);
        let body = serde_json::to_vec(&SignedStatus::sign(status(2), &k)).unwrap();
        assert_eq!(
            verify(&body, 2, &hex::encode(k.public().0)),
            Probe::Verified(status(2))
        );
    }

    #[test]
    fn a_status_signed_by_another_key_is_rejected() {
        let body = serde_json::to_vec(&SignedStatus::sign(status(2), &key(1))).unwrap();
        let got = verify(&body, 2, &hex::encode(key(9).public().0));
        assert!(
            matches!(got, Probe::Rejected(ref m) if m.contains("not signed")),
            "{got:?}"
        );
    }

    #[test]
    fn a_replica_answering_for_another_id_is_rejected() {
        let k = key(1);
        let body = serde_json::to_vec(&SignedStatus::sign(status(3), &k)).unwrap();
        let got = verify(&body, 2, &hex::encode(k.public().0));
        assert!(
            matches!(got, Probe::Rejected(ref m) if m.contains("claims id 3")),
            "{got:?}"
        );
    }

    #[test]
    fn a_tampered_status_is_rejected() {
        let k = key(1);
        let mut signed = SignedStatus::sign(status(2), &k);
        signed.status.last_decided = Some(1_000_000);
        let body = serde_json::to_vec(&signed).unwrap();
        assert!(matches!(
            verify(&body, 2, &hex::encode(k.public().0)),
            Probe::Rejected(_)
        ));
    }

    #[test]
    fn garbage_is_rejected_not_panicked_on() {
        for body in [&b""[..], b"{", b"null", b"{\"status\":1,\"signature\":2}"] {
            assert!(matches!(
                verify(body, 0, &"00".repeat(32)),
                Probe::Rejected(_)
            ));
        }
        assert!(matches!(verify(b"{}", 0, "zz"), Probe::Rejected(_)));
    }

    #[test]
    fn http_responses_are_parsed_strictly() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap(),
            b"{}"
        );
        assert!(parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\nbusy").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(&vec![b'a'; MAX_RESPONSE + 1]).is_err());
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let got = probe(&addr, 0, &"00".repeat(32), Duration::from_secs(1)).await;
        assert!(matches!(got, Probe::Unreachable(_)), "{got:?}");
    }

    #[tokio::test]
    async fn an_endless_response_is_cut_at_the_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            let chunk = vec![b'x'; 8192];
            while s.write_all(&chunk).await.is_ok() {}
        });
        let got = probe(&addr, 0, &"00".repeat(32), Duration::from_secs(5)).await;
        assert!(
            matches!(got, Probe::Rejected(ref m) if m.contains("larger")),
            "{got:?}"
        );
    }
}
