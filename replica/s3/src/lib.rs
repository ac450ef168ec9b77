//! A small client for S3-compatible object storage (AWS S3, MinIO, Ceph RGW, moto), for KmMR's
//! backups: put, get, list and delete objects, signed with AWS Signature Version 4, addressed
//! path-style (`<endpoint>/<bucket>/<key>`, which every S3-compatible server understands), over
//! HTTP/1.1 on TCP or TLS.
//!
//! It owns the wire: signing, framing, timeouts and S3's error answers, which it turns into
//! errors that quote S3's own Code and Message. It knows nothing of backups; what to upload, and
//! that only a verified backup is, is the caller's business. Nothing it reads from the network
//! can make it panic or hold more than the caller's limit.

mod client;
pub mod http;
pub mod sigv4;
pub mod xml;

use std::fmt;
use std::path::{Path, PathBuf};

pub use client::{
    Client, Object, Op, DEFAULT_MULTIPART_THRESHOLD, DEFAULT_PART_SIZE, MAX_SINGLE_PUT,
};
pub use sigv4::Credentials;

/// Why an S3 operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings (endpoint, credentials, CA file, URL) are not usable.
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to the S3 endpoint {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    /// The TLS handshake failed: most often a certificate not signed by a trusted CA, which
    /// trying again does not change.
    #[error("the TLS handshake with the S3 endpoint {endpoint} failed: {reason} (a server whose certificate a CA of your own signed needs that CA trusted as an extra CA file)")]
    Tls { endpoint: String, reason: String },
    #[error("timed out {0}")]
    Timeout(String),
    #[error("{0}")]
    Io(String),
    /// The answer is not HTTP as we speak it.
    #[error("the S3 endpoint's answer is malformed: {0}")]
    Protocol(String),
    #[error("the answer is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// S3 answered with an error: its Code and Message, as it said them.
    #[error("S3 refused {op} (HTTP {status}): {code}: {message}")]
    Refused {
        op: Op,
        status: u16,
        code: String,
        message: String,
    },
}

impl Error {
    /// S3's error code, when S3 answered with one (`NoSuchKey`, `NoSuchBucket`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// http or https.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// Where the S3 API is served: scheme, host and port (no path: buckets are the first segment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// Parses `http://host[:port]` or `https://host[:port]`, with an optional trailing '/'.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Config(format!("S3 endpoint {url:?}: {why}"));
        let (scheme, rest) = if let Some(r) = url.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (Scheme::Http, r)
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(bad(
                "must be scheme://host[:port] only (buckets are addressed by path)",
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            // An IPv6 literal without a port: [::1]
            Some((_, p)) if p.ends_with(']') => (authority, None),
            Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| bad("bad port"))?)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = port.unwrap_or(match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        });
        Ok(Endpoint {
            scheme,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
        })
    }

    /// The Host header: the port only when it is not the scheme's default.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.scheme, self.port) {
            (Scheme::Http, 80) | (Scheme::Https, 443) => host,
            (_, port) => format!("{host}:{port}"),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        write!(f, "{scheme}://{}", self.host_header())
    }
}

/// `s3://bucket/key`: an object, or with a key ending in '/' (or empty), a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub key: String,
}

impl S3Url {
    /// Whether `s` is meant as an S3 URL (and not a file path).
    pub fn is_s3(s: &str) -> bool {
        s.starts_with("s3://")
    }

    pub fn parse(s: &str) -> Result<Self, Error> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| Error::Config(format!("{s:?} is not an s3://BUCKET/KEY URL")))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        // Bucket names are 3-63 of lower-case letters, digits, '.' and '-'; the checks that
        // matter here keep a bucket from changing the request's path.
        if bucket.is_empty()
            || bucket.len() > 63
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        {
            return Err(Error::Config(format!(
                "{s:?}: the bucket {bucket:?} is not a valid S3 bucket name (lower-case letters, digits, '.' and '-')"
            )));
        }
        if key.len() > 1024 {
            return Err(Error::Config(format!(
                "{s:?}: an S3 key is at most 1024 bytes"
            )));
        }
        Ok(S3Url {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// Whether this names a prefix to put new objects under, not one object.
    pub fn is_prefix(&self) -> bool {
        self.key.is_empty() || self.key.ends_with('/')
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

impl std::str::FromStr for S3Url {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        S3Url::parse(s)
    }
}

/// Everything a client needs: where, as whom, in which region, trusting which CAs.
#[derive(Debug, Clone)]
pub struct Config {
    pub endpoint: Endpoint,
    pub region: String,
    pub credentials: Credentials,
    /// PEM certificates trusted besides the system's roots (a self-hosted S3's own CA).
    pub extra_ca: Option<PathBuf>,
}

/// The region when neither AWS_REGION nor AWS_DEFAULT_REGION says one.
pub const DEFAULT_REGION: &str = "us-east-1";

impl Config {
    /// From the standard AWS environment variables: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_SESSION_TOKEN (optional), AWS_REGION or AWS_DEFAULT_REGION (default us-east-1), and
    /// the endpoint from `endpoint`, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else AWS
    /// S3 of the region.
    pub fn from_env(endpoint: Option<&str>, extra_ca: Option<&Path>) -> Result<Self, Error> {
        Self::from_lookup(|name| std::env::var(name).ok(), endpoint, extra_ca)
    }

    /// [`Config::from_env`] with the variables read through `var` (for tests).
    pub fn from_lookup(
        var: impl Fn(&str) -> Option<String>,
        endpoint: Option<&str>,
        extra_ca: Option<&Path>,
    ) -> Result<Self, Error> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let (Some(access_key_id), Some(secret_access_key)) =
            (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(Error::Config(
                "S3 needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and \
                 AWS_SESSION_TOKEN for temporary ones)"
                    .into(),
            ));
        };
        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        let url = endpoint
            .map(str::to_string)
            .or_else(|| var("AWS_ENDPOINT_URL_S3"))
            .or_else(|| var("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        Ok(Config {
            endpoint: Endpoint::parse(url.trim())?,
            region,
            credentials: Credentials {
                access_key_id,
                secret_access_key,
                session_token: var("AWS_SESSION_TOKEN"),
            },
            extra_ca: extra_ca.map(Path::to_path_buf),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_default_ports() {
        let e = Endpoint::parse("http://127.0.0.1:9000/").expect("valid");
        assert_eq!(
            (e.scheme, e.host.as_str(), e.port),
            (Scheme::Http, "127.0.0.1", 9000)
        );
        assert_eq!(e.host_header(), "127.0.0.1:9000");
        let e = Endpoint::parse("https://s3.eu-west-1.amazonaws.com").expect("valid");
        assert_eq!(
            (e.port, e.host_header()),
            (443, "s3.eu-west-1.amazonaws.com".to_string())
        );
        let e = Endpoint::parse("http://[::1]:9000").expect("valid");
        assert_eq!(
            (e.host.as_str(), e.host_header()),
            ("::1", "[::1]:9000".to_string())
        );
        for bad in [
            "ftp://x",
            "x:9000",
            "http://",
            "http://h:port",
            "http://h/base",
            "http://u@h",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn s3_urls_name_a_bucket_and_a_key_or_prefix() {
        let u = S3Url::parse("s3://backups/demo/kmmr-1.kmmr").expect("valid");
        assert_eq!(
            (u.bucket.as_str(), u.key.as_str(), u.is_prefix()),
            ("backups", "demo/kmmr-1.kmmr", false)
        );
        assert!(S3Url::parse("s3://backups/demo/")
            .expect("valid")
            .is_prefix());
        assert!(S3Url::parse("s3://backups").expect("valid").is_prefix());
        for bad in [
            "s3://",
            "s3://Upper/k",
            "s3://a?b/k",
            "/tmp/x",
            "s3://a%2F/k",
        ] {
            assert!(S3Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_comes_from_the_standard_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = Config::from_lookup(
            env(&[("AWS_ACCESS_KEY_ID", "a"), ("AWS_SECRET_ACCESS_KEY", "s")]),
            None,
            None,
        )
        .expect("enough");
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.endpoint.to_string(), "https://s3.us-east-1.amazonaws.com");
        let c = Config::from_lookup(
            env(&[
                ("AWS_ACCESS_KEY_ID", "a"),
                ("AWS_SECRET_ACCESS_KEY", "s"),
                ("AWS_DEFAULT_REGION", "eu-west-3"),
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
                ("AWS_SESSION_TOKEN", "t"),
            ]),
            None,
            None,
        )
        .expect("enough");
        assert_eq!((c.region.as_str(), c.endpoint.port), ("eu-west-3", 5000));
        assert_eq!(c.credentials.session_token.as_deref(), Some("t"));
        let flag = Config::from_lookup(
            env(&[
                ("AWS_ACCESS_KEY_ID", "a"),
                ("AWS_SECRET_ACCESS_KEY", "s"),
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
            ]),
            Some("http://127.0.0.1:6000"),
            None,
        )
        .expect("enough");
        assert_eq!(flag.endpoint.port, 6000);
        let err = Config::from_lookup(env(&[("AWS_ACCESS_KEY_ID", "a")]), None, None).unwrap_err();
        assert!(err.to_string().contains("AWS_SECRET_ACCESS_KEY"), "{err}");
    }
}
