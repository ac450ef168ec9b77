//! The operations: PutObject (one PUT, or a multipart upload above a threshold), GetObject,
//! ListObjectsV2 and DeleteObject, each one signed request per HTTP exchange.
//!
//! An object appears under its key whole or not at all: a single PUT is atomic in S3, and a
//! multipart upload is visible only once completed; a failed one is aborted, so its parts do not
//! linger (and cost) on the server.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::http::{self, Request, Response, Timeouts};
use crate::sigv4::{self, AmzDate, Signable};
use crate::{xml, Config, Error, S3Url, Scheme};

/// S3's limit on one PUT.
pub const MAX_SINGLE_PUT: u64 = 5 << 30;
/// Above this, uploads are multipart: a failed part is retried alone, not the whole backup.
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 64 << 20;
/// The size of each part but the last.
pub const DEFAULT_PART_SIZE: u64 = 64 << 20;
/// S3's smallest part but the last, and its most parts.
const MIN_PART_SIZE: u64 = 5 << 20;
const MAX_PARTS: u64 = 10_000;
/// The most bytes of an answer that is not an object (errors, listings, upload ids).
const MAX_XML: u64 = 16 << 20;
/// How many objects a listing may return before it is refused as not a backup prefix.
const MAX_LISTED: usize = 100_000;
/// Tries of each request that failed before S3 answered (connect, timeout, broken connection).
const TRIES: u32 = 3;

/// What was being done, for errors: "S3 refused the upload to s3://b/k".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Upload(String),
    Download(String),
    List(String),
    Delete(String),
    Create(String),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Upload(u) => write!(f, "the upload to {u}"),
            Op::Download(u) => write!(f, "the download of {u}"),
            Op::List(u) => write!(f, "the listing of {u}"),
            Op::Delete(u) => write!(f, "the deletion of {u}"),
            Op::Create(u) => write!(f, "the creation of {u}"),
        }
    }
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub key: String,
    pub size: u64,
    /// As S3 gives it, ISO 8601.
    pub last_modified: String,
}

/// A client for one endpoint and one set of credentials.
pub struct Client {
    config: Config,
    tls: Option<Arc<rustls::ClientConfig>>,
    pub timeouts: Timeouts,
    /// Uploads larger than this are multipart.
    pub multipart_threshold: u64,
    /// Parts of a multipart upload, at least 5 MiB (S3's minimum).
    pub part_size: u64,
}

impl Client {
    /// A client; for an https endpoint, trusting the system's roots and `config.extra_ca`.
    pub fn new(config: Config) -> Result<Self, Error> {
        let tls = match config.endpoint.scheme {
            Scheme::Https => Some(tls_config(config.extra_ca.as_deref())?),
            Scheme::Http => None,
        };
        Ok(Client {
            config,
            tls,
            timeouts: Timeouts::default(),
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            part_size: DEFAULT_PART_SIZE,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Stores `body` (given in pieces, sent one after another) as the object `url`.
    pub async fn put_object(&self, url: &S3Url, body: &[&[u8]]) -> Result<(), Error> {
        let op = Op::Upload(url.to_string());
        let len: u64 = body.iter().map(|p| p.len() as u64).sum();
        if len <= self.multipart_threshold {
            if len > MAX_SINGLE_PUT {
                return Err(Error::Config(format!(
                    "{url}: {len} bytes exceed S3's limit of {MAX_SINGLE_PUT} bytes for one PUT; \
                     lower the multipart threshold"
                )));
            }
            self.send(&op, "PUT", url, &[], body, MAX_XML).await?;
            return Ok(());
        }
        let part = self.part_size.max(MIN_PART_SIZE);
        if len.div_ceil(part) > MAX_PARTS {
            return Err(Error::Config(format!(
                "{url}: {len} bytes need more than S3's {MAX_PARTS} parts of {part} bytes"
            )));
        }
        let started = self
            .send(&op, "POST", url, &[q("uploads", "")], &[], MAX_XML)
            .await?;
        let text = String::from_utf8_lossy(&started.body);
        let Some(upload_id) = xml::first(&text, "UploadId").filter(|u| !u.is_empty()) else {
            return Err(Error::Protocol(format!(
                "{op}: the answer to starting a multipart upload has no UploadId"
            )));
        };
        match self
            .upload_parts(&op, url, &upload_id, body, len, part)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                // Whatever failed, nothing is visible under the key; the abort only frees the
                // parts, so its own failure does not hide why the upload failed.
                let _ = self
                    .send(
                        &op,
                        "DELETE",
                        url,
                        &[q("uploadId", &upload_id)],
                        &[],
                        MAX_XML,
                    )
                    .await;
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        op: &Op,
        url: &S3Url,
        upload_id: &str,
        body: &[&[u8]],
        len: u64,
        part: u64,
    ) -> Result<(), Error> {
        let mut complete = String::from("<CompleteMultipartUpload>");
        let mut start = 0;
        let mut number = 1u64;
        while start < len {
            let end = (start + part).min(len);
            let pieces = slice(body, start, end);
            let query = [
                q("partNumber", &number.to_string()),
                q("uploadId", upload_id),
            ];
            let answer = self.send(op, "PUT", url, &query, &pieces, MAX_XML).await?;
            let Some(etag) = answer.header("etag").filter(|e| !e.is_empty()) else {
                return Err(Error::Protocol(format!(
                    "{op}: part {number} was stored without an ETag"
                )));
            };
            complete.push_str(&format!(
                "<Part><PartNumber>{number}</PartNumber><ETag>{}</ETag></Part>",
                xml::escape(etag)
            ));
            start = end;
            number += 1;
        }
        complete.push_str("</CompleteMultipartUpload>");
        let done = self
            .send(
                op,
                "POST",
                url,
                &[q("uploadId", upload_id)],
                &[complete.as_bytes()],
                MAX_XML,
            )
            .await?;
        // S3 may answer 200 and still report a failure in the body of a completion.
        let text = String::from_utf8_lossy(&done.body);
        if text.contains("<Error>") {
            return Err(refusal(op, done.status, &text));
        }
        Ok(())
    }

    /// The object `url`, refused if larger than `max` bytes.
    pub async fn get_object(&self, url: &S3Url, max: u64) -> Result<Vec<u8>, Error> {
        let op = Op::Download(url.to_string());
        Ok(self.send(&op, "GET", url, &[], &[], max).await?.body)
    }

    /// Every object of `bucket` whose key starts with `prefix`, in S3's order (by key).
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<Object>, Error> {
        let at = S3Url {
            bucket: bucket.to_string(),
            key: String::new(),
        };
        let op = Op::List(format!("s3://{bucket}/{prefix}"));
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![q("list-type", "2"), q("prefix", prefix)];
            if let Some(t) = &token {
                query.push(q("continuation-token", t));
            }
            let answer = self.send(&op, "GET", &at, &query, &[], MAX_XML).await?;
            let text = String::from_utf8_lossy(&answer.body);
            for entry in xml::all(&text, "Contents") {
                let Some(key) = xml::first(entry, "Key") else {
                    continue;
                };
                out.push(Object {
                    key,
                    size: xml::first(entry, "Size")
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(0),
                    last_modified: xml::first(entry, "LastModified").unwrap_or_default(),
                });
            }
            if out.len() > MAX_LISTED {
                return Err(Error::Protocol(format!(
                    "{op}: more than {MAX_LISTED} objects under the prefix"
                )));
            }
            let truncated = xml::first(&text, "IsTruncated").is_some_and(|t| t.trim() == "true");
            match xml::first(&text, "NextContinuationToken") {
                Some(next) if truncated && !next.is_empty() && token.as_ref() != Some(&next) => {
                    token = Some(next)
                }
                _ if truncated => {
                    return Err(Error::Protocol(format!(
                        "{op}: a truncated listing without a new continuation token"
                    )))
                }
                _ => return Ok(out),
            }
        }
    }

    /// Creates `bucket` in the client's region (for tests and first-time set-up; backups never
    /// create buckets: where they go is the user's choice).
    pub async fn create_bucket(&self, bucket: &str) -> Result<(), Error> {
        let at = S3Url {
            bucket: bucket.to_string(),
            key: String::new(),
        };
        let op = Op::Create(format!("s3://{bucket}"));
        // us-east-1 is the default location and takes no configuration body.
        let body = (self.config.region != "us-east-1").then(|| {
            format!(
                "<CreateBucketConfiguration><LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                xml::escape(&self.config.region)
            )
        });
        let pieces: Vec<&[u8]> = body.iter().map(|b| b.as_bytes()).collect();
        self.send(&op, "PUT", &at, &[], &pieces, MAX_XML).await?;
        Ok(())
    }

    /// Deletes the object `url` (S3 answers success for a key that is not there).
    pub async fn delete_object(&self, url: &S3Url) -> Result<(), Error> {
        let op = Op::Delete(url.to_string());
        self.send(&op, "DELETE", url, &[], &[], MAX_XML).await?;
        Ok(())
    }

    /// One signed request, tried again when no answer came (S3's own refusals are final).
    async fn send(
        &self,
        op: &Op,
        method: &str,
        url: &S3Url,
        query: &[(String, String)],
        body: &[&[u8]],
        max_body: u64,
    ) -> Result<Response, Error> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.send_once(op, method, url, query, body, max_body).await {
                Err(Error::Connect { .. } | Error::Timeout(_) | Error::Io(_)) if tries < TRIES => {
                    tokio::time::sleep(std::time::Duration::from_millis(500 * u64::from(tries)))
                        .await;
                }
                other => return other,
            }
        }
    }

    async fn send_once(
        &self,
        op: &Op,
        method: &str,
        url: &S3Url,
        query: &[(String, String)],
        body: &[&[u8]],
        max_body: u64,
    ) -> Result<Response, Error> {
        let mut path = format!("/{}", sigv4::uri_encode(&url.bucket, false));
        if !url.key.is_empty() {
            path.push('/');
            path.push_str(&sigv4::uri_encode(&url.key, true));
        }
        let payload = sigv4::sha256_hex(body);
        let date = AmzDate::now();
        let len: u64 = body.iter().map(|p| p.len() as u64).sum();
        let mut headers = vec![
            ("Host".to_string(), self.config.endpoint.host_header()),
            ("x-amz-date".to_string(), date.stamp.clone()),
            ("x-amz-content-sha256".to_string(), payload.clone()),
        ];
        if method == "PUT" || method == "POST" {
            headers.push(("Content-Length".to_string(), len.to_string()));
        }
        if let Some(token) = &self.config.credentials.session_token {
            headers.push(("x-amz-security-token".to_string(), token.clone()));
        }
        let auth = sigv4::authorization(
            &self.config.credentials,
            &self.config.region,
            "s3",
            &date,
            &Signable {
                method,
                path: &path,
                query,
                headers: &headers,
                payload_sha256: &payload,
            },
        );
        headers.push(("Authorization".to_string(), auth));
        headers.push(("Connection".to_string(), "close".to_string()));
        headers.push(("User-Agent".to_string(), "kmmr-s3".to_string()));
        let query = sigv4::canonical_query(query);
        let target = if query.is_empty() {
            path
        } else {
            format!("{path}?{query}")
        };
        let req = Request {
            method,
            target,
            headers,
            body,
        };
        // An error's body is small; the limit for it is not the object's.
        let answer = http::exchange(
            &self.config.endpoint,
            self.tls.as_ref(),
            &req,
            max_body.max(MAX_XML),
            self.timeouts,
        )
        .await?;
        if !(200..300).contains(&answer.status) {
            return Err(refusal(
                op,
                answer.status,
                &String::from_utf8_lossy(&answer.body),
            ));
        }
        if answer.body.len() as u64 > max_body {
            return Err(Error::TooLarge { limit: max_body });
        }
        Ok(answer)
    }
}

fn q(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

/// S3's error answer as an error, quoting its Code and Message.
fn refusal(op: &Op, status: u16, body: &str) -> Error {
    let code = xml::first(body, "Code").unwrap_or_else(|| match status {
        301 | 307 => "Redirect".to_string(),
        403 => "AccessDenied".to_string(),
        404 => "NotFound".to_string(),
        _ => format!("HTTP{status}"),
    });
    let message = xml::first(body, "Message").unwrap_or_else(|| {
        let text: String = body.trim().chars().take(300).collect();
        if text.is_empty() {
            "(no message)".to_string()
        } else {
            text
        }
    });
    Error::Refused {
        op: op.clone(),
        status,
        code,
        message,
    }
}

/// The bytes `start..end` of the concatenation of `pieces`, as slices of them.
fn slice<'a>(pieces: &[&'a [u8]], start: u64, end: u64) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for p in pieces {
        let (from, to) = (at, at + p.len() as u64);
        at = to;
        let lo = start.max(from);
        let hi = end.min(to);
        if lo < hi {
            out.push(&p[(lo - from) as usize..(hi - from) as usize]);
        }
    }
    out
}

/// Roots: the system's, and those of `extra` (PEM), which must hold at least one certificate.
fn tls_config(extra: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = extra {
        let pem = std::fs::read(path)
            .map_err(|e| Error::Config(format!("reading the CA file {}: {e}", path.display())))?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Config(format!("the CA file {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(Error::Config(format!(
                "the CA file {} holds no PEM certificate",
                path.display()
            )));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                Error::Config(format!(
                    "a certificate of the CA file {}: {e}",
                    path.display()
                ))
            })?;
        }
    }
    if roots.is_empty() {
        return Err(Error::Config(
            "no CA to trust for https: the system has no root certificates; give a CA file".into(),
        ));
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Config(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_exactly_the_range_across_pieces() {
        let pieces: [&[u8]; 3] = [b"abc", b"", b"defgh"];
        let cat = |v: Vec<&[u8]>| v.concat();
        assert_eq!(cat(slice(&pieces, 0, 8)), b"abcdefgh");
        assert_eq!(cat(slice(&pieces, 2, 5)), b"cde");
        assert_eq!(cat(slice(&pieces, 3, 8)), b"defgh");
        assert!(slice(&pieces, 4, 4).is_empty());
    }

    #[test]
    fn refusals_quote_s3s_code_and_message() {
        let op = Op::Upload("s3://nope/k".into());
        let e = refusal(
            &op,
            404,
            "<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>",
        );
        assert_eq!(
            e.to_string(),
            "S3 refused the upload to s3://nope/k (HTTP 404): NoSuchBucket: The specified bucket does not exist"
        );
        assert_eq!(e.code(), Some("NoSuchBucket"));
        let e = refusal(&op, 403, "");
        assert_eq!(e.code(), Some("AccessDenied"));
        assert!(e.to_string().contains("(no message)"));
    }
}
