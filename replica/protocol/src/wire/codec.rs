//! Canonical binary encoding primitives.
//!
//! Every value has exactly one encoding: fixed-width little-endian integers, `u32` length
//! prefixes, no optional padding. Decoding reads untrusted bytes, so it never panics and never
//! allocates more than the input could possibly describe: a length is checked against the bytes
//! that remain before any buffer is reserved.

use thiserror::Error;

/// Why a byte string could not be decoded. Each variant is a label for rejected-message metrics.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("truncated: needed {needed} more bytes, {remaining} left")]
    Truncated { needed: usize, remaining: usize },
    #[error("length {len} exceeds the limit {limit} for {what}")]
    TooLong {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("invalid value: {0}")]
    Invalid(&'static str),
}

impl DecodeError {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::TooLong { .. } => "too_long",
            DecodeError::UnknownTag { .. } => "unknown_tag",
            DecodeError::TrailingBytes(_) => "trailing_bytes",
            DecodeError::Invalid(_) => "invalid",
        }
    }
}

/// Appends canonical encodings to a buffer.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(cap: usize) -> Self {
        Self {
            buf: Vec::with_capacity(cap),
        }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(v as u8)
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Fixed-size bytes (digests, keys, signatures): no length prefix.
    pub fn array(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// Variable-size bytes with a `u32` length prefix.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        // Lengths are bounded by frame limits far below 4 GiB; saturating keeps this total.
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.buf.extend_from_slice(v);
        self
    }

    /// A count prefix for a sequence that follows.
    pub fn len(&mut self, n: usize) -> &mut Self {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX))
    }

    pub fn option<T>(&mut self, v: Option<&T>, f: impl FnOnce(&mut Self, &T)) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(x) => {
                self.u8(1);
                f(self, x);
                self
            }
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads canonical encodings from untrusted bytes.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated {
                needed: n,
                remaining: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid("bool must be 0 or 1")),
        }
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.array::<4>()?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.array::<8>()?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        let b = self.array::<8>()?;
        Ok(i64::from_le_bytes(b))
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let s = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    /// Length-prefixed bytes, at most `limit` long.
    pub fn bytes(&mut self, what: &'static str, limit: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        if len > limit {
            return Err(DecodeError::TooLong { what, len, limit });
        }
        self.take(len)
    }

    pub fn bytes_vec(&mut self, what: &'static str, limit: usize) -> Result<Vec<u8>, DecodeError> {
        Ok(self.bytes(what, limit)?.to_vec())
    }

    /// A sequence count, at most `limit`, and small enough that `count` elements of at least
    /// `min_elem` bytes each fit in what remains: this is what keeps a forged count from
    /// reserving memory the frame cannot back.
    pub fn len(
        &mut self,
        what: &'static str,
        limit: usize,
        min_elem: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > limit {
            return Err(DecodeError::TooLong {
                what,
                len: n,
                limit,
            });
        }
        let need = n.saturating_mul(min_elem.max(1));
        if need > self.buf.len() {
            return Err(DecodeError::Truncated {
                needed: need,
                remaining: self.buf.len(),
            });
        }
        Ok(n)
    }

    pub fn vec<T>(
        &mut self,
        what: &'static str,
        limit: usize,
        min_elem: usize,
        mut f: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let n = self.len(what, limit, min_elem)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(f(self)?);
        }
        Ok(out)
    }

    pub fn option<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(f(self)?)),
            tag => Err(DecodeError::UnknownTag {
                what: "option",
                tag,
            }),
        }
    }

    /// Fails unless every byte was consumed: canonical encodings have no trailing garbage.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

/// Types with a canonical encoding.
pub trait Encode {
    fn encode(&self, w: &mut Writer);

    fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.encode(&mut w);
        w.finish()
    }
}

/// Types decodable from untrusted bytes.
pub trait Decode: Sized {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError>;

    /// Decodes a whole buffer, rejecting trailing bytes.
    fn from_bytes(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(b);
        let v = Self::decode(&mut r)?;
        r.finish()?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_count_cannot_reserve_memory_beyond_the_input() {
        let mut w = Writer::new();
        w.u32(1_000_000);
        let bytes = w.finish();
        let mut r = Reader::new(&bytes);
        let e = r.vec("items", 10_000_000, 8, |r| r.u64()).unwrap_err();
        assert!(matches!(e, DecodeError::Truncated { .. }));
    }

    #[test]
    fn oversized_bytes_are_rejected_before_reading() {
        let mut w = Writer::new();
        w.bytes(&[7u8; 100]);
        let bytes = w.finish();
        let e = Reader::new(&bytes).bytes("value", 99).unwrap_err();
        assert_eq!(
            e,
            DecodeError::TooLong {
                what: "value",
                len: 100,
                limit: 99
            }
        );
    }
}
