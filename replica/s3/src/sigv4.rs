//! AWS Signature Version 4 for S3 requests signed in the Authorization header.
//!
//! The canonical request, the string to sign and the derived signing key follow AWS's
//! documentation ("Authenticating Requests: Using the Authorization Header"); the tests check the
//! documented example's signature, so a change that breaks the byte-exact forms fails there
//! rather than as a 403 from a server.

use ring::{digest, hmac};

/// The algorithm name in the string to sign and the Authorization header.
const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// Hex SHA-256 of the empty payload (bodiless GET, DELETE).
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Who signs: the access key and its secret, and the session token of temporary credentials.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    // The secret and the token must not reach a log through a `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// A request time in the two forms SigV4 uses: `20130524T000000Z` and `20130524`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmzDate {
    pub stamp: String,
    pub day: String,
}

impl AmzDate {
    /// The time `secs` seconds after the Unix epoch, UTC.
    pub fn from_unix(secs: u64) -> Self {
        let (y, m, d) = civil(secs / 86_400);
        let rem = secs % 86_400;
        let day = format!("{y:04}{m:02}{d:02}");
        let stamp = format!(
            "{day}T{:02}{:02}{:02}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        );
        AmzDate { stamp, day }
    }

    /// Now, by this machine's clock (a server refuses a signature more than 15 minutes off).
    pub fn now() -> Self {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self::from_unix(secs)
    }
}

/// Year, month, day of `days` since 1970-01-01 (Howard Hinnant's days-to-civil).
fn civil(days: u64) -> (i64, i64, i64) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// What is signed of one request. `path` is already URI-encoded (as it goes on the request
/// line); query names and values are raw and encoded here.
pub struct Signable<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a [(String, String)],
    /// Every header to sign, names in any case; `host`, `x-amz-date` and
    /// `x-amz-content-sha256` among them.
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the body, as sent in `x-amz-content-sha256`.
    pub payload_sha256: &'a str,
}

/// Percent-encoding as SigV4 wants it: everything but `A-Za-z0-9-._~` (and `/` when
/// `keep_slash`, for object keys in paths), upper-case hex.
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(b))
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The query string, sorted by encoded name then value: the same bytes are sent and signed.
pub fn canonical_query(query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Lower-cased names with trimmed values (inner runs of spaces made one), sorted by name.
fn canonical_headers(headers: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| {
            let value = v.split_whitespace().collect::<Vec<_>>().join(" ");
            (k.to_ascii_lowercase(), value)
        })
        .collect();
    out.sort();
    out
}

/// The canonical request and the signed header names (`host;x-amz-date;...`).
pub fn canonical_request(req: &Signable<'_>) -> (String, String) {
    let headers = canonical_headers(req.headers);
    let signed = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let mut lines = String::new();
    for (k, v) in &headers {
        lines.push_str(k);
        lines.push(':');
        lines.push_str(v);
        lines.push('\n');
    }
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        req.path,
        canonical_query(req.query),
        lines,
        signed,
        req.payload_sha256
    );
    (canonical, signed)
}

/// Hex SHA-256 of bytes given in pieces (a backup is header, state and checksum, not copied
/// into one buffer to be hashed).
pub fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    hex::encode(ctx.finish().as_ref())
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&key, data).as_ref().to_vec()
}

/// The Authorization header's value for `req` at `date`.
pub fn authorization(
    creds: &Credentials,
    region: &str,
    service: &str,
    date: &AmzDate,
    req: &Signable<'_>,
) -> String {
    let (canonical, signed) = canonical_request(req);
    let scope = format!("{}/{region}/{service}/aws4_request", date.day);
    let to_sign = format!(
        "{ALGORITHM}\n{}\n{scope}\n{}",
        date.stamp,
        sha256_hex(&[canonical.as_bytes()])
    );
    let k_date = hmac_sha256(
        format!("AWS4{}", creds.secret_access_key).as_bytes(),
        date.day.as_bytes(),
    );
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    let k_signing = hmac_sha256(&k_service, b"aws4_request");
    let signature = hex::encode(hmac_sha256(&k_signing, to_sign.as_bytes()));
    format!(
        "{ALGORITHM} Credential={}/{scope},SignedHeaders={signed},Signature={signature}",
        creds.access_key_id
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    /// The GET Object example of AWS's S3 SigV4 documentation ("Examples of signature
    /// calculations": first 10 bytes of examplebucket/test.txt), with its published signature.
    #[test]
    fn the_documented_get_object_example_signs_as_published() {
        let creds = Credentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        };
        let date = AmzDate {
            stamp: "20130524T000000Z".into(),
            day: "20130524".into(),
        };
        let headers = [
            h("Host", "examplebucket.s3.amazonaws.com"),
            h("Range", "bytes=0-9"),
            h("x-amz-content-sha256", EMPTY_SHA256),
            h("x-amz-date", "20130524T000000Z"),
        ];
        let req = Signable {
            method: "GET",
            path: "/test.txt",
            query: &[],
            headers: &headers,
            payload_sha256: EMPTY_SHA256,
        };
        let (canonical, signed) = canonical_request(&req);
        assert_eq!(
            canonical,
            "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n\
             x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
             x-amz-date:20130524T000000Z\n\nhost;range;x-amz-content-sha256;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(signed, "host;range;x-amz-content-sha256;x-amz-date");
        assert_eq!(
            authorization(&creds, "us-east-1", "s3", &date, &req),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,\
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,\
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn empty_payload_hash_is_sha256_of_nothing() {
        assert_eq!(sha256_hex(&[]), EMPTY_SHA256);
        assert_eq!(sha256_hex(&[b"ab", b"c"]), sha256_hex(&[b"abc"]));
    }

    #[test]
    fn keys_and_query_values_are_encoded_as_sigv4_wants() {
        assert_eq!(uri_encode("a b/c~d*é", true), "a%20b/c~d%2A%C3%A9");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
        let q = [
            ("prefix".to_string(), "demo/".to_string()),
            ("list-type".to_string(), "2".to_string()),
            ("uploads".to_string(), String::new()),
        ];
        assert_eq!(canonical_query(&q), "list-type=2&prefix=demo%2F&uploads=");
    }

    #[test]
    fn header_values_are_trimmed_and_names_lowercased() {
        let headers = [h("X-Amz-Date", "  a   b  "), h("Host", "h")];
        let req = Signable {
            method: "PUT",
            path: "/",
            query: &[],
            headers: &headers,
            payload_sha256: EMPTY_SHA256,
        };
        let (canonical, signed) = canonical_request(&req);
        assert!(
            canonical.contains("host:h\nx-amz-date:a b\n"),
            "{canonical}"
        );
        assert_eq!(signed, "host;x-amz-date");
    }

    #[test]
    fn dates_are_utc_days_and_stamps() {
        assert_eq!(
            AmzDate::from_unix(1_369_353_600),
            AmzDate {
                stamp: "20130524T000000Z".into(),
                day: "20130524".into()
            }
        );
        assert_eq!(AmzDate::from_unix(951_782_399).stamp, "20000228T235959Z");
    }

    #[test]
    fn credentials_do_not_print_their_secret() {
        let c = Credentials {
            access_key_id: "AKID".into(),
            secret_access_key: "very-secret".into(),
            session_token: Some("token".into()),
        };
        let shown = format!("{c:?}");
        assert!(
            shown.contains("AKID") && !shown.contains("very-secret") && !shown.contains("token")
        );
    }
}
