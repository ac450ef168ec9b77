//! Length-prefixed framing of a byte stream: `[len: u32 little-endian][payload]`, with a hard
//! maximum. A decoder never buffers more than one maximal frame plus its header, and an oversized
//! length is an error before any payload is read, so a peer cannot make a replica allocate.

use thiserror::Error;

use crate::wire::limits;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    Oversized { len: usize, limit: usize },
}

/// Prepends the length header.
pub fn encode_frame(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    if payload.len() > limits::MAX_FRAME {
        return Err(FrameError::Oversized {
            len: payload.len(),
            limit: limits::MAX_FRAME,
        });
    }
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Splits a byte stream into frames.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(limits::MAX_FRAME)
    }
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max: max.min(limits::MAX_FRAME),
        }
    }

    /// Bytes held waiting for the rest of a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if any. After an error the stream is unusable: close it.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(FrameError::Oversized {
                len,
                limit: self.max,
            });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let payload = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_reads_are_reassembled() {
        let a = encode_frame(b"hello").unwrap();
        let b = encode_frame(b"").unwrap();
        let stream: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        let mut d = FrameDecoder::default();
        let mut out = Vec::new();
        for chunk in stream.chunks(3) {
            d.push(chunk);
            while let Some(f) = d.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, vec![b"hello".to_vec(), Vec::new()]);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn oversized_length_is_refused_before_the_payload_arrives() {
        let mut d = FrameDecoder::new(1024);
        d.push(&2048u32.to_le_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::Oversized {
                len: 2048,
                limit: 1024
            })
        );
    }
}
