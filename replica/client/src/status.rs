//! What a replica says about itself (`GET /status` on its HTTP port), signed with its key, and
//! how a reader checks it: the signature must be the key the view lists for that replica and the
//! status must name that replica. A replica is untrusted input here (up to f of them may lie), so
//! the read is bounded in size and time, and a status is only believed once it checks out.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use kmmr_protocol::crypto::{Domain, KeyPair, PublicKey, Signature};

/// What a replica says about itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub id: u32,
    pub view_id: u32,
    pub n: usize,
    pub f: usize,
    pub regency: u32,
    pub leader: u32,
    pub synchronizing: bool,
    /// `None` before the first decision.
    pub last_decided: Option<u64>,
    /// Hex digest of the service state after `last_decided`, or after `state_digest_cid` when
    /// that is set.
    pub state_digest: String,
    /// Set when `state_digest` is of an earlier instance than `last_decided`: a large state is
    /// hashed again only within a budget of the replica's time. Left out of the JSON otherwise,
    /// so that a status stays byte for byte what readers from before this field verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_digest_cid: Option<u64>,
    pub pending_requests: usize,
    /// Set when this replica runs a Byzantine test mode.
    pub byzantine: Option<String>,
    /// CID of the newest checkpoint held.
    #[serde(default)]
    pub checkpoint_cid: Option<u64>,
    /// Hex digest of that checkpoint (correct replicas agree on it at equal CIDs).
    #[serde(default)]
    pub checkpoint_digest: Option<String>,
    /// Highest CID on disk; `None` with durability off or before the first write.
    #[serde(default)]
    pub durable_cid: Option<u64>,
    /// Waiting for state (joining, or a state transfer in progress).
    #[serde(default)]
    pub transferring: bool,
    /// This replica is in its current view.
    #[serde(default)]
    pub member: bool,
    /// Peers this replica caught sending what no correct replica sends, in the last minute or
    /// so (by id, ascending).
    #[serde(default)]
    pub accusations: Vec<Accusation>,
}

impl Status {
    /// The instance `state_digest` is of: the state after it. Digests are comparable between
    /// replicas only at equal instances.
    pub fn digest_cid(&self) -> Option<u64> {
        self.state_digest_cid.or(self.last_decided)
    }

    /// `state_digest_prefix`, followed by the instance it is of when that is not the last
    /// decided one, for one-line displays.
    pub fn state_digest_label(&self) -> String {
        match self.state_digest_cid {
            Some(cid) => format!("{} (of instance {cid})", self.state_digest_prefix()),
            None => self.state_digest_prefix().to_string(),
        }
    }

    /// The first 16 characters of `state_digest`, for one-line displays. The replica that sent
    /// the status chose the string: slicing it at byte 16 panicked on a multi-byte character.
    pub fn state_digest_prefix(&self) -> &str {
        let s = self.state_digest.as_str();
        s.char_indices().nth(16).map_or(s, |(end, _)| &s[..end])
    }
}

/// Evidence against one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accusation {
    pub replica: u32,
    /// Messages rejected as misbehaviour in the window.
    pub count: u64,
    /// The latest reason, a metric label such as `forged_accept`.
    pub reason: String,
}

/// `/status`: the status and the replica's signature over its JSON bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedStatus {
    pub status: Status,
    /// Hex ed25519 signature, domain `Status`, over `serde_json::to_vec(&status)`.
    pub signature: String,
}

impl SignedStatus {
    pub fn sign(status: Status, key: &KeyPair) -> Self {
        let bytes = serde_json::to_vec(&status).unwrap_or_default();
        let signature = hex::encode(key.sign(Domain::Status, &bytes).0);
        SignedStatus { status, signature }
    }

    /// Checks the signature against the replica's public key.
    pub fn verify(&self, key: &PublicKey) -> bool {
        let Ok(sig) = hex::decode(&self.signature) else {
            return false;
        };
        let Ok(sig): Result<[u8; 64], _> = sig.try_into() else {
            return false;
        };
        let Ok(bytes) = serde_json::to_vec(&self.status) else {
            return false;
        };
        kmmr_protocol::crypto::verify(key, Domain::Status, &bytes, &Signature(sig))
    }
}

/// The largest `/status` response read. A replica's status is a few hundred bytes.
pub const MAX_RESPONSE: usize = 64 * 1024;

/// The largest `/metrics` response read.
pub const MAX_METRICS_RESPONSE: usize = 4 * 1024 * 1024;

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
    match http_get(addr, "/status", timeout, MAX_RESPONSE).await {
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

/// Why a GET gave no body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GetError {
    /// No answer: no address, connection refused, a timeout.
    #[error("{0}")]
    Unreachable(String),
    /// An answer that is not a 200 with a body within the limit.
    #[error("{0}")]
    Bad(String),
}

/// `GET path` from `addr` (`host:port`) over plain HTTP/1.0, reading at most `max` bytes, all
/// within `timeout`. HTTP/1.0 so that the server neither keeps the connection open nor chunks the
/// body, which keeps the parsing to a status line and a blank line.
pub async fn http_get(
    addr: &str,
    path: &str,
    timeout: Duration,
    max: usize,
) -> Result<Vec<u8>, GetError> {
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| GetError::Unreachable(format!("connecting to {addr}: {e}")))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        let mut buf = Vec::with_capacity(1024);
        let io = async {
            stream.write_all(request.as_bytes()).await?;
            // One byte past the limit tells an oversized response from one of exactly the limit.
            (&mut stream)
                .take(max as u64 + 1)
                .read_to_end(&mut buf)
                .await
        };
        io.await
            .map_err(|e| GetError::Unreachable(format!("reading from {addr}: {e}")))?;
        Ok::<_, GetError>(buf)
    };
    let buf = tokio::time::timeout(timeout, read).await.map_err(|_| {
        GetError::Unreachable(format!("{addr} did not answer within {timeout:?}"))
    })??;
    parse_response_within(&buf, path, max).map_err(GetError::Bad)
}

/// `http://host:port/path` split into `host:port` and `/path`.
pub fn split_url(url: &str) -> Result<(&str, String), GetError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| GetError::Bad(format!("{url}: only http:// URLs")))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    Ok((host, format!("/{path}")))
}

/// `GET /status` from `url` (`http://host:port/status`), parsed but not yet verified: the caller
/// checks it against the view with [`SignedStatus::verify`] or uses [`probe`].
pub async fn fetch_status(url: &str) -> Result<SignedStatus, GetError> {
    let (addr, path) = split_url(url)?;
    let body = http_get(addr, &path, STATUS_TIMEOUT, MAX_RESPONSE).await?;
    serde_json::from_slice(&body).map_err(|e| GetError::Bad(format!("malformed /status: {e}")))
}

/// How long a status read may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// The body of a 200 `/status` response, or why there is none.
#[cfg(test)]
fn parse_response(buf: &[u8]) -> Result<Vec<u8>, String> {
    parse_response_within(buf, "/status", MAX_RESPONSE)
}

/// The body of a 200 response of at most `max` bytes, or why there is none.
fn parse_response_within(buf: &[u8], path: &str, max: usize) -> Result<Vec<u8>, String> {
    if buf.len() > max {
        return Err(format!("response larger than {max} bytes"));
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
            "{path} answered {:?}",
            status_line.chars().take(100).collect::<String>()
        ));
    }
    Ok(buf[split + 4..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn with_digest(d: &str) -> Status {
        Status {
            state_digest: d.to_owned(),
            ..Status::default()
        }
    }

    #[test]
    fn a_digest_prefix_never_splits_a_character_a_byzantine_replica_sent() {
        // Byte 16 falls inside the euro sign: the old `[..16]` slice panicked here.
        let s = with_digest("0123456789abcde\u{20ac}tail");
        assert_eq!(s.state_digest_prefix(), "0123456789abcde\u{20ac}");
        let s = with_digest(&"\u{1f600}".repeat(20));
        assert_eq!(s.state_digest_prefix(), "\u{1f600}".repeat(16));
    }

    #[test]
    fn a_digest_prefix_is_the_first_sixteen_hex_digits_or_the_whole_short_string() {
        let hex = "00112233445566778899aabbccddeeff";
        assert_eq!(with_digest(hex).state_digest_prefix(), "0011223344556677");
        assert_eq!(with_digest("abc").state_digest_prefix(), "abc");
        assert_eq!(with_digest("").state_digest_prefix(), "");
    }
}
