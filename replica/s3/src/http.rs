//! One HTTP/1.1 exchange per connection (`Connection: close`), over TCP or TLS, with a timeout
//! on the connect and on every read and write, and limits on what an answer may make us hold.
//! A backup is sent a few times a day: reusing connections would save nothing worth the state.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::{Endpoint, Error, Scheme};

/// The most bytes of status line and headers accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Bytes written per write call, each under the write timeout, so a stalled server is noticed
/// within one timeout rather than after a whole part.
const WRITE_CHUNK: usize = 256 * 1024;

/// Timeouts of one exchange.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// For each read and each write: a server that says nothing this long is given up on.
    pub io: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            io: Duration::from_secs(60),
        }
    }
}

/// A request ready to go: the target is the encoded path and query as signed.
pub struct Request<'a> {
    pub method: &'a str,
    pub target: String,
    pub headers: Vec<(String, String)>,
    /// The body in pieces, sent one after another.
    pub body: &'a [&'a [u8]],
}

/// An answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `req` to `endpoint` and reads the answer, whose body may be at most `max_body` bytes.
pub async fn exchange(
    endpoint: &Endpoint,
    tls: Option<&Arc<rustls::ClientConfig>>,
    req: &Request<'_>,
    max_body: u64,
    t: Timeouts,
) -> Result<Response, Error> {
    let addr = format!("{}:{}", endpoint.host, endpoint.port);
    let tcp = timeout(t.connect, TcpStream::connect(&addr))
        .await
        .map_err(|_| Error::Timeout(format!("connecting to {addr}")))?
        .map_err(|e| Error::Connect {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    match (endpoint.scheme, tls) {
        (Scheme::Http, _) => over(tcp, req, max_body, t).await,
        (Scheme::Https, Some(cfg)) => {
            let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                .map_err(|e| Error::Config(format!("{}: {e}", endpoint.host)))?;
            let connector = tokio_rustls::TlsConnector::from(cfg.clone());
            let stream = timeout(t.connect, connector.connect(name, tcp))
                .await
                .map_err(|_| Error::Timeout(format!("the TLS handshake with {addr}")))?
                .map_err(|e| Error::Tls {
                    endpoint: endpoint.to_string(),
                    reason: e.to_string(),
                })?;
            over(stream, req, max_body, t).await
        }
        (Scheme::Https, None) => Err(Error::Config(
            "an https endpoint without a TLS configuration".into(),
        )),
    }
}

async fn over<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    req: &Request<'_>,
    max_body: u64,
    t: Timeouts,
) -> Result<Response, Error> {
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.target);
    for (k, v) in &req.headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    write_all(&mut stream, head.as_bytes(), t.io).await?;
    for piece in req.body {
        for chunk in piece.chunks(WRITE_CHUNK) {
            write_all(&mut stream, chunk, t.io).await?;
        }
    }
    timeout(t.io, stream.flush())
        .await
        .map_err(|_| Error::Timeout("sending the request".into()))?
        .map_err(|e| Error::Io(format!("sending the request: {e}")))?;
    let mut r = Reader {
        stream,
        buf: Vec::new(),
        pos: 0,
        io: t.io,
    };
    loop {
        let (status, headers) = r.head().await?;
        // An interim answer (100 Continue) is followed by the real one.
        if (100..200).contains(&status) {
            continue;
        }
        let body = if req.method == "HEAD" || status == 204 || status == 304 {
            Vec::new()
        } else {
            r.body(&headers, max_body).await?
        };
        return Ok(Response {
            status,
            headers,
            body,
        });
    }
}

async fn write_all<S: AsyncWrite + Unpin>(
    s: &mut S,
    bytes: &[u8],
    io: Duration,
) -> Result<(), Error> {
    timeout(io, s.write_all(bytes))
        .await
        .map_err(|_| Error::Timeout("sending the request".into()))?
        .map_err(|e| Error::Io(format!("sending the request: {e}")))
}

/// Buffered reads off the connection, each under the I/O timeout.
struct Reader<S> {
    stream: S,
    buf: Vec<u8>,
    pos: usize,
    io: Duration,
}

impl<S: AsyncRead + Unpin> Reader<S> {
    /// Reads more into the buffer; `Ok(0)` at the end of the stream.
    async fn fill(&mut self) -> Result<usize, Error> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let mut chunk = vec![0u8; 64 * 1024];
        let n = match timeout(self.io, self.stream.read(&mut chunk)).await {
            Err(_) => return Err(Error::Timeout("waiting for the answer".into())),
            // A TLS peer that closes without close_notify: the end, as for TCP; a body cut
            // short is still caught by its length.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Ok(Err(e)) => return Err(Error::Io(format!("reading the answer: {e}"))),
            Ok(Ok(n)) => n,
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// One line without its CRLF, at most `max` bytes.
    async fn line(&mut self, max: usize) -> Result<String, Error> {
        loop {
            if let Some(i) = self.available().windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.available()[..i]).into_owned();
                self.pos += i + 2;
                return Ok(line);
            }
            if self.available().len() > max {
                return Err(Error::Protocol("a line of the answer is too long".into()));
            }
            if self.fill().await? == 0 {
                return Err(Error::Protocol(
                    "the server closed the connection mid-answer".into(),
                ));
            }
        }
    }

    /// The status code and the headers.
    async fn head(&mut self) -> Result<(u16, Vec<(String, String)>), Error> {
        let status_line = self.line(MAX_HEAD).await?;
        let mut parts = status_line.splitn(3, ' ');
        let status = match (parts.next(), parts.next()) {
            (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
            _ => None,
        }
        .filter(|c| (100..600).contains(c))
        .ok_or_else(|| {
            Error::Protocol(format!(
                "not an HTTP/1.1 status line: {:?}",
                status_line.chars().take(100).collect::<String>()
            ))
        })?;
        let mut headers = Vec::new();
        let mut total = status_line.len();
        loop {
            let line = self.line(MAX_HEAD).await?;
            total += line.len() + 2;
            if total > MAX_HEAD {
                return Err(Error::Protocol("the answer's headers are too long".into()));
            }
            if line.is_empty() {
                return Ok((status, headers));
            }
            let Some((k, v)) = line.split_once(':') else {
                return Err(Error::Protocol(format!(
                    "a malformed header line: {line:?}"
                )));
            };
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }

    /// The body as the headers frame it: chunked, by Content-Length, or up to the close.
    async fn body(&mut self, headers: &[(String, String)], max: u64) -> Result<Vec<u8>, Error> {
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let too_large = || Error::TooLarge { limit: max };
        let mut out = Vec::new();
        if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            loop {
                let size_line = self.line(1024).await?;
                let size = size_line.split(';').next().unwrap_or("").trim();
                let size = u64::from_str_radix(size, 16)
                    .map_err(|_| Error::Protocol(format!("a malformed chunk size {size:?}")))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !self.line(MAX_HEAD).await?.is_empty() {}
                    return Ok(out);
                }
                if (out.len() as u64).saturating_add(size) > max {
                    return Err(too_large());
                }
                self.exact(size, &mut out).await?;
                if !self.line(2).await?.is_empty() {
                    return Err(Error::Protocol("a chunk is longer than its size".into()));
                }
            }
        }
        if let Some(len) = get("content-length") {
            let len: u64 = len
                .parse()
                .map_err(|_| Error::Protocol(format!("a malformed Content-Length {len:?}")))?;
            if len > max {
                return Err(too_large());
            }
            self.exact(len, &mut out).await?;
            return Ok(out);
        }
        loop {
            let take = self.available().len();
            if out.len() as u64 + take as u64 > max {
                return Err(too_large());
            }
            out.extend_from_slice(self.available());
            self.pos += take;
            if self.fill().await? == 0 {
                return Ok(out);
            }
        }
    }

    /// Appends exactly `n` bytes to `out`.
    async fn exact(&mut self, n: u64, out: &mut Vec<u8>) -> Result<(), Error> {
        let mut left = n;
        while left > 0 {
            if self.available().is_empty() && self.fill().await? == 0 {
                return Err(Error::Protocol(format!(
                    "the server closed the connection {left} bytes before the end of the body"
                )));
            }
            let take = self
                .available()
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            out.extend_from_slice(&self.available()[..take]);
            self.pos += take;
            left -= take as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(answer: &'static [u8], max: u64) -> Result<Response, Error> {
        let (mut server, client) = tokio::io::duplex(1 << 20);
        server.write_all(answer).await.expect("write");
        drop(server);
        let mut r = Reader {
            stream: client,
            buf: Vec::new(),
            pos: 0,
            io: Duration::from_secs(5),
        };
        let (status, headers) = r.head().await?;
        let body = r.body(&headers, max).await?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    #[tokio::test]
    async fn content_length_chunked_and_close_framed_bodies_are_read() {
        let r = read(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nETag: \"x\"\r\n\r\nabcdef",
            10,
        )
        .await
        .expect("an answer");
        assert_eq!(
            (r.status, r.body.as_slice(), r.header("etag")),
            (200, &b"abc"[..], Some("\"x\""))
        );
        let r = read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", 10)
            .await
            .expect("an answer");
        assert_eq!(r.body, b"abcde");
        let r = read(b"HTTP/1.0 404 Not Found\r\n\r\nto the end", 100)
            .await
            .expect("an answer");
        assert_eq!((r.status, r.body.as_slice()), (404, &b"to the end"[..]));
    }

    #[tokio::test]
    async fn bad_answers_are_errors_not_panics() {
        for (answer, max) in [
            (&b"SSH-2.0-OpenSSH\r\n\r\n"[..], 10),
            (b"HTTP/1.1 99999 What\r\n\r\n", 10),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nshort", 100),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n01234567890",
                10,
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", 10),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                10,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
                10,
            ),
            (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", 10),
            (b"HTTP/1.1 200 OK\r\nContent", 10),
        ] {
            let Err(e) = read(answer, max).await else {
                panic!("{:?} was accepted", String::from_utf8_lossy(answer));
            };
            assert!(!e.to_string().is_empty());
        }
    }
}
