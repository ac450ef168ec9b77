//! `FrameDecoder` fed arbitrary bytes in arbitrary chunks, with every frame decoded as a
//! `ReplicaMessage`, a `SignedRequest` and a `Reply`. Nothing may panic, and the chunking must
//! not matter: the frames (and the error, if any) equal those of the same stream pushed whole.
//!
//! Input layout, so that crash files can be read by hand:
//!
//! * bytes 0..2: the decoder limit as a little-endian u16; `0xffff` means
//!   `FrameDecoder::default()` (`limits::MAX_FRAME`);
//! * byte 2: `k`, the number of chunk sizes, taken as `1 + k % 8`;
//! * the next `k` bytes: chunk sizes (0 pushes an empty slice), used cyclically;
//! * the rest: the stream.

#![no_main]

use kmmr_protocol::wire::codec::{Decode, Encode};
use kmmr_protocol::wire::frame::{FrameDecoder, FrameError};
use kmmr_protocol::wire::limits;
use kmmr_protocol::wire::messages::{ReplicaMessage, Reply, SignedRequest};
use libfuzzer_sys::fuzz_target;

fn decoder(limit: u16) -> (FrameDecoder, usize) {
    if limit == u16::MAX {
        (FrameDecoder::default(), limits::MAX_FRAME)
    } else {
        (FrameDecoder::new(limit as usize), limit as usize)
    }
}

/// Drains every complete frame; stops at the first error, which must then persist.
fn drain(d: &mut FrameDecoder, limit: usize, out: &mut Vec<Vec<u8>>) -> Option<FrameError> {
    loop {
        match d.next_frame() {
            Ok(Some(f)) => {
                assert!(f.len() <= limit, "frame of {} bytes over {limit}", f.len());
                out.push(f);
            }
            Ok(None) => return None,
            Err(e) => {
                assert_eq!(
                    d.next_frame(),
                    Err(e.clone()),
                    "a failed stream must stay failed"
                );
                return Some(e);
            }
        }
    }
}

/// Decoding is total; accepted replica messages and requests are canonical. `Reply` is only
/// checked for idempotence: its reject reason is decoded with `from_utf8_lossy`, so it accepts
/// non-canonical bytes (a known issue, pinned by an ignored test in replica/tests/codec.rs).
fn decode_all(frame: &[u8]) {
    if let Ok(m) = ReplicaMessage::from_bytes(frame) {
        assert_eq!(m.to_bytes(), frame, "non-canonical ReplicaMessage {m:?}");
    }
    if let Ok(r) = SignedRequest::from_bytes(frame) {
        assert_eq!(r.to_bytes(), frame, "non-canonical SignedRequest {r:?}");
    }
    if let Ok(r) = Reply::from_bytes(frame) {
        assert_eq!(
            Reply::from_bytes(&r.to_bytes()),
            Ok(r),
            "Reply re-encoding changed it"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let limit = u16::from_le_bytes([data[0], data[1]]);
    let k = 1 + (data[2] % 8) as usize;
    let rest = &data[3..];
    let (sizes, stream) = rest.split_at(k.min(rest.len()));
    let mut sizes: Vec<usize> = sizes.iter().map(|&s| s as usize).collect();
    if sizes.iter().all(|&s| s == 0) {
        sizes.push(1);
    }

    // Reference: the whole stream in one push.
    let (mut whole, max) = decoder(limit);
    whole.push(stream);
    let mut expected = Vec::new();
    let expected_err = drain(&mut whole, max, &mut expected);

    // The same stream in chunks, draining after every push.
    let (mut d, max) = decoder(limit);
    let mut frames = Vec::new();
    let mut err = None;
    let mut at = 0;
    for &size in sizes.iter().cycle() {
        let end = (at + size).min(stream.len());
        d.push(&stream[at..end]);
        at = end;
        err = drain(&mut d, max, &mut frames);
        if err.is_some() || at == stream.len() {
            break;
        }
    }
    assert_eq!(frames, expected, "chunking changed the frames");
    assert_eq!(err, expected_err, "chunking changed the outcome");
    if err.is_none() {
        let framed: usize = frames.iter().map(|f| 4 + f.len()).sum();
        assert_eq!(
            d.buffered(),
            stream.len() - framed,
            "bytes lost or duplicated"
        );
    }

    for f in &frames {
        decode_all(f);
    }
});
