//! Identities, digests and signatures.
//!
//! Every principal (replica, client, admin) holds an ed25519 key pair. Signed byte strings are
//! always prefixed with a domain tag so that a signature made for one purpose (an ACCEPT, a
//! client request, a COLLECT) can never be replayed as another. No I/O here.

use std::collections::BTreeMap;
use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand::{CryptoRng, RngCore};

use crate::wire::codec::{Decode, DecodeError, Encode, Reader, Writer};

/// A 32-byte BLAKE3 digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Digest of several parts, each length-delimited so that part boundaries matter.
    pub fn of_parts(parts: &[&[u8]]) -> Self {
        let mut h = blake3::Hasher::new();
        for p in parts {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
        Digest(*h.finalize().as_bytes())
    }

    pub fn short(&self) -> String {
        self.0[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Encode for Digest {
    fn encode(&self, w: &mut Writer) {
        w.array(&self.0);
    }
}

impl Decode for Digest {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Digest(r.array()?))
    }
}

/// An ed25519 public key, stored as bytes: parsing into a curve point happens at verification,
/// so a malformed key from the network is a failed check, never a decode panic.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", Digest(self.0).short())
    }
}

impl Encode for PublicKey {
    fn encode(&self, w: &mut Writer) {
        w.array(&self.0);
    }
}

impl Decode for PublicKey {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(PublicKey(r.array()?))
    }
}

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", Digest::of(&self.0).short())
    }
}

impl Encode for Signature {
    fn encode(&self, w: &mut Writer) {
        w.array(&self.0);
    }
}

impl Decode for Signature {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Signature(r.array()?))
    }
}

/// What a signature is for; part of the signed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    ClientRequest,
    Accept,
    Collect,
    Admin,
    Status,
    Checkpoint,
    /// The admin's permission to read a replica's whole state (`GET /snapshot`, for backups).
    SnapshotRead,
    /// A WRITE: f+1 of them vouch for a value at a leader change (`wire::messages::WriteProof`).
    Write,
}

impl Domain {
    fn tag(self) -> &'static [u8] {
        match self {
            Domain::ClientRequest => b"kmmr/v1/request\0",
            Domain::Accept => b"kmmr/v1/accept\0\0",
            Domain::Collect => b"kmmr/v1/collect\0",
            Domain::Admin => b"kmmr/v1/admin\0\0\0",
            Domain::Status => b"kmmr/v1/status\0\0",
            Domain::Checkpoint => b"kmmr/v1/ckpt\0\0\0\0",
            Domain::SnapshotRead => b"kmmr/v1/snapread",
            Domain::Write => b"kmmr/v2/write\0\0\0",
        }
    }

    /// The exact bytes signed for `msg` in this domain.
    pub fn signing_bytes(self, msg: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + msg.len());
        v.extend_from_slice(self.tag());
        v.extend_from_slice(msg);
        v
    }
}

/// A private signing key with its public half.
#[derive(Clone)]
pub struct KeyPair {
    signing: SigningKey,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPair({:?})", self.public())
    }
}

impl KeyPair {
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self {
            signing: SigningKey::generate(rng),
        }
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    pub fn sign(&self, domain: Domain, msg: &[u8]) -> Signature {
        Signature(self.signing.sign(&domain.signing_bytes(msg)).to_bytes())
    }
}

/// A public key decompressed for verification. Decompression is about a third of the cost of
/// verifying one signature, so keys that recur (view members, active clients) are parsed once.
pub type ParsedKey = VerifyingKey;

pub fn parse_key(key: &PublicKey) -> Option<ParsedKey> {
    VerifyingKey::from_bytes(&key.0).ok()
}

/// A bounded memory of parsed keys.
#[derive(Debug)]
pub struct KeyCache {
    map: BTreeMap<PublicKey, ParsedKey>,
    capacity: usize,
}

impl KeyCache {
    pub fn new(capacity: usize) -> Self {
        KeyCache {
            map: BTreeMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The parsed key, or `None` if the bytes are not a valid point.
    pub fn get(&mut self, key: &PublicKey) -> Option<ParsedKey> {
        if let Some(k) = self.map.get(key) {
            return Some(*k);
        }
        let parsed = parse_key(key)?;
        if self.map.len() >= self.capacity {
            // Crude but bounded and deterministic: start over.
            self.map.clear();
        }
        self.map.insert(*key, parsed);
        Some(parsed)
    }
}

/// Checks one signature. False for malformed keys, wrong domain, or a bad signature.
pub fn verify(key: &PublicKey, domain: Domain, msg: &[u8], sig: &Signature) -> bool {
    parse_key(key).is_some_and(|vk| verify_parsed(&vk, domain, msg, sig))
}

/// Checks one signature under an already parsed key.
pub fn verify_parsed(key: &ParsedKey, domain: Domain, msg: &[u8], sig: &Signature) -> bool {
    let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
    key.verify_strict(&domain.signing_bytes(msg), &sig).is_ok()
}

/// Checks many signatures at once, about twice as fast per signature as one by one. On failure
/// the caller learns only that some signature is bad and must fall back to `verify` to find it.
pub fn verify_batch(items: &[(PublicKey, Domain, &[u8], Signature)]) -> bool {
    let mut parsed = Vec::with_capacity(items.len());
    for (k, d, m, s) in items {
        match parse_key(k) {
            Some(vk) => parsed.push((vk, *d, *m, *s)),
            None => return false,
        }
    }
    verify_batch_parsed(&parsed)
}

/// Fewer signatures than this are verified one by one.
const BATCH_THRESHOLD: usize = 4;

/// `verify_batch` under already parsed keys.
pub fn verify_batch_parsed(items: &[(ParsedKey, Domain, &[u8], Signature)]) -> bool {
    if items.is_empty() {
        return true;
    }
    // Batch verification pays a fixed cost (random scalars, a multiscalar setup) that only
    // amortises over several signatures: below that, one by one is faster.
    if items.len() < BATCH_THRESHOLD {
        return items.iter().all(|(k, d, m, s)| verify_parsed(k, *d, m, s));
    }
    let keys: Vec<VerifyingKey> = items.iter().map(|(k, ..)| *k).collect();
    let msgs: Vec<Vec<u8>> = items
        .iter()
        .map(|(_, d, m, _)| d.signing_bytes(m))
        .collect();
    let msg_refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
    let sigs: Vec<ed25519_dalek::Signature> = items
        .iter()
        .map(|(.., s)| ed25519_dalek::Signature::from_bytes(&s.0))
        .collect();
    ed25519_dalek::verify_batch(&msg_refs, &sigs, &keys).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_from_one_domain_does_not_verify_in_another() {
        let k = KeyPair::from_seed([7; 32]);
        let s = k.sign(Domain::Accept, b"m");
        assert!(verify(&k.public(), Domain::Accept, b"m", &s));
        assert!(!verify(&k.public(), Domain::Collect, b"m", &s));
        assert!(!verify(&k.public(), Domain::Accept, b"n", &s));
    }

    #[test]
    fn batch_verification_rejects_one_bad_signature_among_good_ones() {
        let keys: Vec<KeyPair> = (0..5u8).map(|i| KeyPair::from_seed([i; 32])).collect();
        let msgs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10]).collect();
        let mut items: Vec<(PublicKey, Domain, &[u8], Signature)> = keys
            .iter()
            .zip(&msgs)
            .map(|(k, m)| {
                (
                    k.public(),
                    Domain::ClientRequest,
                    m.as_slice(),
                    k.sign(Domain::ClientRequest, m),
                )
            })
            .collect();
        assert!(verify_batch(&items));
        items[3].3 .0[0] ^= 1;
        assert!(!verify_batch(&items));
    }

    #[test]
    fn malformed_public_key_fails_verification_without_panicking() {
        let k = KeyPair::from_seed([1; 32]);
        let s = k.sign(Domain::Accept, b"m");
        assert!(!verify(&PublicKey([0xff; 32]), Domain::Accept, b"m", &s));
    }
}
