//! Backups of the service state: the file `kmmr-replica snapshot save` writes and a new cluster
//! starts from, and the admin's permission to read a replica's state for it.
//!
//! A backup file is a header, the service snapshot as the replicas encode it, and a checksum:
//!
//! ```text
//! magic "KMMRSNAP" | version u16 | service u8 | flags u8 (bit 0: cid present)
//! | view id u32 | cluster fingerprint [32] | cid u64 | revision u64 | keys u64
//! | vouchers u8, then that many replica ids u32 | digest [32] | body length u64
//! | body | checksum [32]
//! ```
//!
//! Integers are little-endian. `digest` is the blake3 digest of the body, the value f+1
//! replicas signed as their state digest; `checksum` is blake3 over every byte before it, so a
//! flipped bit anywhere, header included, is caught even where the digest would not see it.
//! Decoding reads untrusted bytes: it never allocates from a length field (the body is a slice
//! of the input, checked against what is there) and never panics.
//!
//! This module does no network I/O; it must never trust a file it did not verify.

use std::path::Path;

use kmmr_protocol::crypto::{Digest, Domain, KeyPair, PublicKey, Signature};
use kmmr_protocol::view::View;

/// The first bytes of every backup file.
pub const MAGIC: [u8; 8] = *b"KMMRSNAP";
/// The layout above. A reader refuses other versions rather than guess.
pub const VERSION: u16 = 1;
/// The largest body accepted: the state of a control plane is far smaller, and a corrupt or
/// hostile length must not make a reader take more memory than this.
pub const MAX_BODY: u64 = 2 << 30;
/// At most this many replicas are named as vouchers (the field is one byte).
pub const MAX_VOUCHERS: usize = 255;
/// Bytes after the body.
const CHECKSUM_LEN: usize = 32;
/// The header up to the vouchers: magic, version, service, flags, view, fingerprint, cid,
/// revision, keys, voucher count.
const FIXED_LEN: usize = 8 + 2 + 1 + 1 + 4 + 32 + 8 + 8 + 8 + 1;
/// The flags bit saying the state follows a decision (a cluster that decided nothing has none).
const HAS_CID: u8 = 1;
/// The largest backup file: a reader refuses anything larger before reading it.
pub const MAX_FILE: u64 = MAX_BODY + (FIXED_LEN + 4 * MAX_VOUCHERS + 40 + CHECKSUM_LEN) as u64;

/// Which service the state belongs to; a replica refuses a backup of another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    Kv,
}

impl ServiceKind {
    fn tag(self) -> u8 {
        match self {
            ServiceKind::Kv => 1,
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        (tag == 1).then_some(ServiceKind::Kv)
    }
}

/// What a backup says about the state it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub service: ServiceKind,
    /// The view of the replicas that vouched for the state.
    pub view_id: u32,
    /// Which cluster: see [`cluster_fingerprint`].
    pub cluster: Digest,
    /// The last decided instance the state follows; `None` before any decision.
    pub cid: Option<u64>,
    /// The key-value store's revision.
    pub revision: u64,
    /// Keys held at `revision`.
    pub keys: u64,
    /// The replicas whose signed statuses gave `digest` as their state at `cid`.
    pub vouchers: Vec<u32>,
    /// blake3 of the body.
    pub digest: Digest,
}

/// A verified backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub header: Header,
    /// The service snapshot (`Service::snapshot`).
    pub body: Vec<u8>,
}

/// Why bytes are not a backup this version can use. Each names what is wrong, for the person
/// who has to decide what to do with the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a KmMR snapshot file (wrong magic bytes)")]
    BadMagic,
    #[error("the file is truncated: {0}")]
    Truncated(&'static str),
    #[error("unsupported snapshot format version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u16),
    #[error("unknown service tag {0}")]
    UnknownService(u8),
    #[error("unknown flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("the body length {0} exceeds the limit of {MAX_BODY} bytes")]
    BodyTooLarge(u64),
    #[error("{0} bytes follow the checksum: the file is not one backup")]
    TrailingBytes(u64),
    #[error("checksum mismatch: the file is corrupted")]
    ChecksumMismatch,
    #[error("the snapshot's digest {actual} is not the {expected} the replicas vouched for: the file is corrupted")]
    DigestMismatch { expected: String, actual: String },
    #[error("{0} vouchers exceed the limit of {MAX_VOUCHERS}")]
    TooManyVouchers(usize),
}

/// Why a backup file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is {len} bytes, more than a backup of at most {MAX_BODY} bytes of state")]
    TooLarge { path: String, len: u64 },
    #[error("{path}: {source}")]
    Format { path: String, source: FormatError },
}

impl Backup {
    /// A backup of `body`, whose digest is computed here.
    pub fn new(header: Header, body: Vec<u8>) -> Result<Self, FormatError> {
        if body.len() as u64 > MAX_BODY {
            return Err(FormatError::BodyTooLarge(body.len() as u64));
        }
        if header.vouchers.len() > MAX_VOUCHERS {
            return Err(FormatError::TooManyVouchers(header.vouchers.len()));
        }
        let actual = Digest::of(&body);
        if actual != header.digest {
            return Err(FormatError::DigestMismatch {
                expected: header.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(Backup { header, body })
    }

    /// The header's bytes, up to and including the body length.
    fn encode_header(&self) -> Vec<u8> {
        let h = &self.header;
        let mut w = Vec::with_capacity(FIXED_LEN + 4 * h.vouchers.len() + 40);
        w.extend_from_slice(&MAGIC);
        w.extend_from_slice(&VERSION.to_le_bytes());
        w.push(h.service.tag());
        w.push(if h.cid.is_some() { HAS_CID } else { 0 });
        w.extend_from_slice(&h.view_id.to_le_bytes());
        w.extend_from_slice(&h.cluster.0);
        w.extend_from_slice(&h.cid.unwrap_or(0).to_le_bytes());
        w.extend_from_slice(&h.revision.to_le_bytes());
        w.extend_from_slice(&h.keys.to_le_bytes());
        // `new` bounds the count; a longer list cannot be built.
        w.push(h.vouchers.len().min(MAX_VOUCHERS) as u8);
        for v in h.vouchers.iter().take(MAX_VOUCHERS) {
            w.extend_from_slice(&v.to_le_bytes());
        }
        w.extend_from_slice(&h.digest.0);
        w.extend_from_slice(&(self.body.len() as u64).to_le_bytes());
        w
    }

    /// The file's three parts: header, body, checksum. The body is not copied.
    pub fn parts(&self) -> (Vec<u8>, &[u8], [u8; CHECKSUM_LEN]) {
        let head = self.encode_header();
        let mut h = blake3::Hasher::new();
        h.update(&head);
        h.update(&self.body);
        (head, &self.body, *h.finalize().as_bytes())
    }

    /// The whole file as one buffer.
    pub fn encode(&self) -> Vec<u8> {
        let (head, body, sum) = self.parts();
        [head.as_slice(), body, &sum].concat()
    }

    /// Parses and verifies a whole file: magic, version, lengths, checksum, then the body's
    /// digest. Nothing is trusted before the check that covers it.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut r = Cursor(bytes);
        if r.take(MAGIC.len(), "no room for the magic bytes")
            .map_err(|_| FormatError::BadMagic)?
            != MAGIC
        {
            return Err(FormatError::BadMagic);
        }
        let version = r.u16("the header ends in the version")?;
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let service_tag = r.u8("the header ends in the service tag")?;
        let flags = r.u8("the header ends in the flags")?;
        let view_id = r.u32("the header ends in the view id")?;
        let cluster = Digest(r.array("the header ends in the cluster fingerprint")?);
        let cid = r.u64("the header ends in the instance")?;
        let revision = r.u64("the header ends in the revision")?;
        let keys = r.u64("the header ends in the key count")?;
        let count = usize::from(r.u8("the header ends in the voucher count")?);
        let mut vouchers = Vec::with_capacity(count);
        for _ in 0..count {
            vouchers.push(r.u32("the header ends in the vouchers")?);
        }
        let digest = Digest(r.array("the header ends in the digest")?);
        let body_len = r.u64("the header ends in the body length")?;
        if body_len > MAX_BODY {
            return Err(FormatError::BodyTooLarge(body_len));
        }
        let header_len = bytes.len() - r.0.len();
        // Bounded by MAX_BODY above, so it fits a usize on every platform we build for.
        let body_len =
            usize::try_from(body_len).map_err(|_| FormatError::BodyTooLarge(body_len))?;
        let body = r.take(body_len, "the body is shorter than its length says")?;
        let sum: [u8; CHECKSUM_LEN] = r.array("the checksum is missing")?;
        if !r.0.is_empty() {
            return Err(FormatError::TrailingBytes(r.0.len() as u64));
        }
        let covered = &bytes[..header_len + body_len];
        if *blake3::hash(covered).as_bytes() != sum {
            return Err(FormatError::ChecksumMismatch);
        }
        // The checksum covers the fields below: a mismatch now is a file written wrong, not a
        // flipped bit, and still refused.
        let service =
            ServiceKind::from_tag(service_tag).ok_or(FormatError::UnknownService(service_tag))?;
        if flags & !HAS_CID != 0 {
            return Err(FormatError::UnknownFlags(flags));
        }
        let header = Header {
            service,
            view_id,
            cluster,
            cid: (flags & HAS_CID != 0).then_some(cid),
            revision,
            keys,
            vouchers,
            digest,
        };
        Backup::new(header, body.to_vec())
    }

    /// Reads and verifies the backup at `path`, refusing a file larger than any backup before
    /// reading it.
    pub fn read(path: &Path) -> Result<Self, ReadError> {
        let name = path.display().to_string();
        let io = |source| ReadError::Io {
            path: name.clone(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_FILE {
            return Err(ReadError::TooLarge { path: name, len });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        Backup::decode(&bytes).map_err(|source| ReadError::Format { path: name, source })
    }

    /// Writes the backup to `path` atomically: a temporary file next to it, fsynced, renamed
    /// over `path`, and the directory fsynced. A crash leaves the old file or the new one.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} does not name a file", path.display()))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let (head, body, sum) = self.parts();
        crate::storage::write_atomic(dir, name, &[&head, body, &sum])
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// Identifies a cluster by its members' keys, in view order: a new view id of the same
/// cluster keeps most of them, another cluster shares none.
pub fn cluster_fingerprint(view: &View) -> Digest {
    let keys: Vec<&[u8]> = view.members.iter().map(|m| m.key.0.as_slice()).collect();
    Digest::of_parts(&keys)
}

/// Reads fixed-size fields off untrusted bytes.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        if self.0.len() < n {
            return Err(FormatError::Truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FormatError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
}

/// How far the clocks of the admin's machine and a replica may disagree before a read token
/// is refused; also how long a token can be replayed, which only repeats a read.
pub const TOKEN_WINDOW_MS: u64 = 5 * 60 * 1000;

/// The bytes the admin signs to read replica `replica`'s state at `issued_ms` (Unix time).
fn token_message(replica: u32, issued_ms: u64) -> Vec<u8> {
    let mut m = b"kmmr snapshot read".to_vec();
    m.extend_from_slice(&replica.to_le_bytes());
    m.extend_from_slice(&issued_ms.to_le_bytes());
    m
}

/// The query value of `GET /snapshot?token=...`: `<issued_ms>.<hex signature>`.
pub fn read_token(admin: &KeyPair, replica: u32, issued_ms: u64) -> String {
    let sig = admin.sign(Domain::SnapshotRead, &token_message(replica, issued_ms));
    format!("{issued_ms}.{}", hex::encode(sig.0))
}

/// Why a read token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the view has no admin key: nobody may read the state")]
    NoAdmin,
    #[error("malformed token")]
    Malformed,
    #[error("the token is not signed by the view's admin key")]
    BadSignature,
    #[error("the token was issued more than five minutes from this replica's clock")]
    Stale,
}

/// Checks a token for replica `replica` against the view's admin key at `now_ms`.
pub fn check_token(
    admin: Option<&PublicKey>,
    replica: u32,
    now_ms: u64,
    token: &str,
) -> Result<(), TokenError> {
    let admin = admin.ok_or(TokenError::NoAdmin)?;
    let (issued, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
    let issued: u64 = issued.parse().map_err(|_| TokenError::Malformed)?;
    let sig: [u8; 64] = hex::decode(sig)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or(TokenError::Malformed)?;
    if !kmmr_protocol::crypto::verify(
        admin,
        Domain::SnapshotRead,
        &token_message(replica, issued),
        &Signature(sig),
    ) {
        return Err(TokenError::BadSignature);
    }
    if now_ms.abs_diff(issued) > TOKEN_WINDOW_MS {
        return Err(TokenError::Stale);
    }
    Ok(())
}

/// Bytes before the state in what `GET /snapshot` answers.
pub const SERVED_PREFIX_LEN: usize = 9;

/// What `GET /snapshot` answers: this prefix, then the service snapshot. Byte 0 is 1 when the
/// state follows a decision and 0 before any; bytes 1..9 the CID of that decision.
pub fn served_prefix(cid: Option<u64>) -> [u8; SERVED_PREFIX_LEN] {
    let mut p = [0u8; SERVED_PREFIX_LEN];
    p[0] = u8::from(cid.is_some());
    p[1..].copy_from_slice(&cid.unwrap_or(0).to_le_bytes());
    p
}

/// [`served_prefix`] and `snapshot` in one buffer.
pub fn encode_served(cid: Option<u64>, snapshot: &[u8]) -> Vec<u8> {
    [&served_prefix(cid)[..], snapshot].concat()
}

/// Splits what `GET /snapshot` answered; `None` when it is not that shape.
pub fn decode_served(bytes: &[u8]) -> Option<(Option<u64>, &[u8])> {
    let (&flag, rest) = bytes.split_first()?;
    let (cid, body) = rest.split_first_chunk::<8>()?;
    let cid = u64::from_le_bytes(*cid);
    match flag {
        0 => Some((None, body)),
        1 => Some((Some(cid), body)),
        _ => None,
    }
}

#[cfg(test)]
#[path = "backup_tests.rs"]
mod tests;
