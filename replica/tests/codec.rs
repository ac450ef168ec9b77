//! Property tests for the canonical wire encoding (`wire::codec`, `wire::messages`,
//! `view`) and the stream framing (`wire::frame`).
//!
//! What is proven, for every wire type:
//!
//! * `round_trips_and_reencodes_identically`: `decode(encode(x)) == x` and re-encoding the
//!   decoded value gives the very same bytes;
//! * `rejects_trailing_bytes`: a valid encoding followed by anything is `TrailingBytes`;
//! * `rejects_every_strict_prefix`: a truncated encoding is `Truncated`, never a shorter value;
//! * `survives_mutations` / `survives_arbitrary_bytes`: decoding bit flips, overwritten bytes
//!   and counts, insertions, deletions, truncations and extensions of valid encodings, or plain
//!   junk, never panics, and whatever is accepted is the canonical encoding of what it decodes
//!   to (`encode(decode(b)) == b`).
//!
//! Forged sequence counts and lengths at every count site are rejected before any buffer is
//! reserved, and the frame decoder reassembles any split of a stream and refuses oversized
//! lengths without panicking.
//!
//! Decoder bugs these tests found are kept as regression tests at the end. Case counts follow
//! proptest's default (256) and can be raised with `PROPTEST_CASES=10000`.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use kmmr_protocol::crypto::{Digest, PublicKey, Signature};
use kmmr_protocol::view::{default_f, Member, View};
use kmmr_protocol::wire::codec::{Decode, DecodeError, Encode, Writer};
use kmmr_protocol::wire::frame::{encode_frame, FrameDecoder, FrameError};
use kmmr_protocol::wire::ids::{Cid, Regency, ReplicaId, ViewId};
use kmmr_protocol::wire::limits;
use kmmr_protocol::wire::messages::{
    Batch, CheckpointMeta, Collect, Decision, Proof, ReplicaMessage, Reply, ReplyBody, Request,
    RequestKind, SignedCollect, SignedRequest, WriteProof,
};
use proptest::collection::{btree_set, vec};
use proptest::prelude::*;
use proptest::sample::Index;

/// Proptest's defaults (256 cases, `PROPTEST_CASES` honoured) without regression files written
/// next to this source file: a failure prints its minimal input instead.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max)
}

fn array32() -> impl Strategy<Value = [u8; 32]> {
    prop::array::uniform32(any::<u8>())
}

fn public_key() -> impl Strategy<Value = PublicKey> {
    array32().prop_map(PublicKey)
}

fn digest() -> impl Strategy<Value = Digest> {
    array32().prop_map(Digest)
}

fn signature() -> impl Strategy<Value = Signature> {
    (array32(), array32()).prop_map(|(a, b)| {
        let mut s = [0u8; 64];
        s[..32].copy_from_slice(&a);
        s[32..].copy_from_slice(&b);
        Signature(s)
    })
}

fn cid() -> impl Strategy<Value = Cid> {
    any::<u64>().prop_map(Cid)
}

fn regency() -> impl Strategy<Value = Regency> {
    any::<u32>().prop_map(Regency)
}

fn replica_id() -> impl Strategy<Value = ReplicaId> {
    any::<u32>().prop_map(ReplicaId)
}

fn view_id() -> impl Strategy<Value = ViewId> {
    any::<u32>().prop_map(ViewId)
}

fn request_kind() -> impl Strategy<Value = RequestKind> {
    prop_oneof![
        Just(RequestKind::Ordered),
        Just(RequestKind::Unordered),
        Just(RequestKind::Reconfig)
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (
        public_key(),
        any::<u64>(),
        any::<u64>(),
        request_kind(),
        view_id(),
        bytes(48),
    )
        .prop_map(|(client, session, sequence, kind, view, payload)| Request {
            client,
            session,
            sequence,
            kind,
            view,
            payload,
        })
}

fn signed_request() -> impl Strategy<Value = SignedRequest> {
    (request(), signature()).prop_map(|(request, signature)| SignedRequest { request, signature })
}

fn batch() -> impl Strategy<Value = Batch> {
    (any::<u64>(), any::<u64>(), vec(signed_request(), 0..4)).prop_map(
        |(timestamp_ms, nonce, requests)| Batch {
            timestamp_ms,
            nonce,
            requests,
        },
    )
}

fn proof() -> impl Strategy<Value = Proof> {
    (regency(), vec((replica_id(), signature()), 0..5))
        .prop_map(|(epoch, accepts)| Proof { epoch, accepts })
}

fn decision() -> impl Strategy<Value = Decision> {
    (cid(), batch(), proof()).prop_map(|(cid, batch, proof)| Decision { cid, batch, proof })
}

fn collect_with(
    accepted: impl Strategy<Value = Option<(Regency, Digest)>>,
) -> impl Strategy<Value = Collect> {
    (
        regency(),
        replica_id(),
        cid(),
        accepted,
        vec((regency(), digest()), 0..4),
    )
        .prop_map(|(regency, replica, cid, accepted, writes)| Collect {
            regency,
            replica,
            cid,
            accepted,
            writes,
        })
}

fn collect() -> impl Strategy<Value = Collect> {
    collect_with(prop::option::of((regency(), digest())))
}

fn signed_collect_with(
    collect: impl Strategy<Value = Collect>,
) -> impl Strategy<Value = SignedCollect> {
    (collect, signature()).prop_map(|(collect, signature)| SignedCollect {
        collect,
        signature,
        proof: WriteProof::default(),
    })
}

/// A signed collect as STOPDATA and SYNC carry it in protocol 2: with or without a proof.
fn proven_collect() -> impl Strategy<Value = SignedCollect> {
    (signed_collect(), vec((replica_id(), signature()), 0..4)).prop_map(|(mut c, proof)| {
        c.proof = WriteProof(proof);
        c
    })
}

fn signed_collect() -> impl Strategy<Value = SignedCollect> {
    signed_collect_with(collect())
}

fn replica_message() -> impl Strategy<Value = ReplicaMessage> {
    prop_oneof![
        (cid(), regency(), batch()).prop_map(|(cid, epoch, batch)| ReplicaMessage::Propose {
            cid,
            epoch,
            batch
        }),
        (cid(), regency(), digest(), prop::option::of(signature())).prop_map(
            |(cid, epoch, digest, signature)| ReplicaMessage::Write {
                cid,
                epoch,
                digest,
                signature,
            }
        ),
        (cid(), regency(), digest(), signature()).prop_map(|(cid, epoch, digest, signature)| {
            ReplicaMessage::Accept {
                cid,
                epoch,
                digest,
                signature,
            }
        }),
        vec(signed_request(), 0..4).prop_map(|requests| ReplicaMessage::Forward { requests }),
        (regency(), vec(signed_request(), 0..4))
            .prop_map(|(regency, requests)| ReplicaMessage::Stop { regency, requests }),
        (
            regency(),
            prop::option::of(decision()),
            proven_collect(),
            vec(batch(), 0..3)
        )
            .prop_map(
                |(regency, last, collect, values)| ReplicaMessage::StopData {
                    regency,
                    last,
                    collect,
                    values,
                }
            ),
        (
            regency(),
            prop::option::of(decision()),
            vec(proven_collect(), 0..5),
            batch()
        )
            .prop_map(|(regency, last, collects, batch)| ReplicaMessage::Sync {
                regency,
                last,
                collects,
                batch,
            }),
        decision().prop_map(ReplicaMessage::Decided),
        cid().prop_map(|from| ReplicaMessage::DecisionRequest { from }),
        Just(ReplicaMessage::CheckpointQuery),
        (
            vec(checkpoint_meta(), 0..=limits::MAX_CHECKPOINTS_ADVERTISED),
            prop::option::of(cid())
        )
            .prop_map(
                |(checkpoints, first_logged)| ReplicaMessage::CheckpointInfo {
                    checkpoints,
                    first_logged
                }
            ),
        (cid(), digest(), any::<u64>(), any::<u32>()).prop_map(|(cid, digest, offset, len)| {
            ReplicaMessage::ChunkRequest {
                cid,
                digest,
                offset,
                len,
            }
        }),
        (cid(), digest(), any::<u64>(), bytes(300)).prop_map(|(cid, digest, offset, data)| {
            ReplicaMessage::Chunk {
                cid,
                digest,
                offset,
                data,
            }
        }),
    ]
}

fn checkpoint_meta() -> impl Strategy<Value = CheckpointMeta> {
    (cid(), view_id(), digest(), any::<u64>()).prop_map(|(cid, view, digest, len)| CheckpointMeta {
        cid,
        view,
        digest,
        len,
    })
}

/// A valid view (per `View::new`) of 4..=16 members with distinct ids in arbitrary order,
/// any f the size allows, and arbitrary UTF-8 addresses.
fn view() -> impl Strategy<Value = View> {
    (4usize..=16)
        .prop_flat_map(|n| {
            (
                view_id(),
                0..=default_f(n),
                btree_set(any::<u32>(), n),
                vec(("\\PC{0,16}", public_key()), n),
            )
        })
        .prop_flat_map(|(id, f, ids, rest)| {
            let members: Vec<Member> = ids
                .into_iter()
                .zip(rest)
                .map(|(id, (address, key))| Member {
                    id: ReplicaId(id),
                    address,
                    key,
                })
                .collect();
            (
                Just(id),
                Just(f),
                Just(members).prop_shuffle(),
                prop::option::of(public_key()),
            )
        })
        .prop_map(|(id, f, members, admin)| {
            View::new(id, f, members)
                .expect("generated view is valid")
                .with_admin(admin)
        })
}

fn reply_body() -> impl Strategy<Value = ReplyBody> {
    prop_oneof![
        bytes(64).prop_map(ReplyBody::Result),
        view().prop_map(ReplyBody::NewView),
        // At most 32 chars of at most 4 bytes: within the decoder's 1024-byte reason limit.
        "\\PC{0,32}".prop_map(ReplyBody::Rejected),
        Just(ReplyBody::Overtaken),
        Just(ReplyBody::Past),
    ]
}

fn reply() -> impl Strategy<Value = Reply> {
    (
        replica_id(),
        any::<u64>(),
        any::<u64>(),
        request_kind(),
        reply_body(),
    )
        .prop_map(|(replica, session, sequence, kind, body)| Reply {
            replica,
            session,
            sequence,
            kind,
            body,
        })
}

/// Untrusted input: junk whose first byte is often a valid message tag.
fn junk() -> impl Strategy<Value = Vec<u8>> {
    (prop_oneof![0u8..=14, any::<u8>()], bytes(512)).prop_map(|(first, mut rest)| {
        rest.insert(0, first);
        rest
    })
}

// ---------------------------------------------------------------------------------------------
// Mutations of valid encodings
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    /// Overwrites four bytes with a count or length: the places forged counts hide.
    SetU32(Index, u32),
    Truncate(Index),
    Append(Vec<u8>),
    Insert(Index, Vec<u8>),
    Remove(Index, usize),
}

fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(2),
        Just(limits::MAX_REPLICAS as u32),
        Just(limits::MAX_REPLICAS as u32 + 1),
        Just(limits::MAX_BATCH_REQUESTS as u32),
        Just(limits::MAX_BATCH_REQUESTS as u32 + 1),
        Just(limits::MAX_PAYLOAD as u32 + 1),
        Just(limits::MAX_FRAME as u32 + 1),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, v)| Mutation::SetByte(i, v)),
        (any::<Index>(), interesting_u32()).prop_map(|(i, v)| Mutation::SetU32(i, v)),
        any::<Index>().prop_map(Mutation::Truncate),
        bytes(16).prop_map(Mutation::Append),
        (any::<Index>(), bytes(8)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

fn apply(b: &mut Vec<u8>, m: &Mutation) {
    let len = b.len();
    match m {
        Mutation::Append(extra) => b.extend_from_slice(extra),
        _ if len == 0 => {}
        Mutation::FlipBit(i, bit) => b[i.index(len)] ^= 1 << bit,
        Mutation::SetByte(i, v) => b[i.index(len)] = *v,
        Mutation::SetU32(i, v) => {
            let at = i.index(len);
            for (k, byte) in v.to_le_bytes().into_iter().enumerate() {
                if let Some(slot) = b.get_mut(at + k) {
                    *slot = byte;
                }
            }
        }
        Mutation::Truncate(i) => b.truncate(i.index(len)),
        Mutation::Insert(i, extra) => {
            let at = i.index(len + 1);
            b.splice(at..at, extra.iter().copied());
        }
        Mutation::Remove(i, n) => {
            let at = i.index(len);
            b.drain(at..(at + n).min(len));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------------------------

fn check_round_trip<T: Encode + Decode + PartialEq + Debug>(x: &T) -> Result<(), TestCaseError> {
    let encoded = x.to_bytes();
    let decoded = T::from_bytes(&encoded)
        .map_err(|e| TestCaseError::fail(format!("valid encoding refused: {e}; value {x:?}")))?;
    prop_assert_eq!(&decoded, x, "decode(encode(x)) != x");
    prop_assert_eq!(
        decoded.to_bytes(),
        encoded,
        "re-encoding the decoded value changed the bytes"
    );
    Ok(())
}

/// Decodes untrusted bytes (a panic fails the test by itself). If they are accepted they must
/// be canonical: re-encoding gives the same bytes.
fn check_untrusted<T: Encode + Decode + PartialEq + Debug>(
    b: &[u8],
    canonical: bool,
) -> Result<(), TestCaseError> {
    if let Ok(v) = T::from_bytes(b) {
        let again = v.to_bytes();
        if canonical {
            prop_assert_eq!(
                &again[..],
                b,
                "accepted bytes are not the canonical encoding of {:?}",
                v
            );
        } else {
            let back = T::from_bytes(&again);
            prop_assert_eq!(back.as_ref(), Ok(&v));
        }
    }
    Ok(())
}

macro_rules! codec_properties {
    ($($module:ident: $ty:ty = $strategy:expr, canonical = $canonical:expr;)*) => {$(
        mod $module {
            use super::*;

            proptest! {
                #![proptest_config(config())]

                #[test]
                fn round_trips_and_reencodes_identically(x in $strategy) {
                    check_round_trip::<$ty>(&x)?;
                }

                #[test]
                fn rejects_trailing_bytes(x in $strategy, extra in vec(any::<u8>(), 1..32)) {
                    let mut b = x.to_bytes();
                    b.extend_from_slice(&extra);
                    prop_assert_eq!(
                        <$ty>::from_bytes(&b),
                        Err(DecodeError::TrailingBytes(extra.len()))
                    );
                }

                #[test]
                fn rejects_every_strict_prefix(x in $strategy, cut in any::<Index>()) {
                    let b = x.to_bytes();
                    let prefix = &b[..cut.index(b.len())];
                    let r = <$ty>::from_bytes(prefix);
                    prop_assert!(
                        matches!(r, Err(DecodeError::Truncated { .. })),
                        "prefix of {} of {} bytes decoded as {:?}",
                        prefix.len(),
                        b.len(),
                        r
                    );
                }

                #[test]
                fn survives_mutations(x in $strategy, ms in vec(mutation(), 1..4)) {
                    let mut b = x.to_bytes();
                    for m in &ms {
                        apply(&mut b, m);
                    }
                    check_untrusted::<$ty>(&b, $canonical)?;
                }

                #[test]
                fn survives_arbitrary_bytes(b in junk()) {
                    check_untrusted::<$ty>(&b, $canonical)?;
                }
            }
        }
    )*};
}

codec_properties! {
    replica_message: ReplicaMessage = replica_message(), canonical = true;
    request: Request = request(), canonical = true;
    signed_request: SignedRequest = signed_request(), canonical = true;
    batch: Batch = batch(), canonical = true;
    proof: Proof = proof(), canonical = true;
    decision: Decision = decision(), canonical = true;
    collect: Collect = collect(), canonical = true;
    signed_collect: SignedCollect = signed_collect(), canonical = true;
    view: View = view(), canonical = true;
    reply: Reply = reply(), canonical = true;
}

proptest! {
    #![proptest_config(config())]

    /// The variant strategy really reaches every variant (guards the coverage of the above).
    #[test]
    fn every_replica_message_variant_is_generated_and_tagged_1_to_16(m in replica_message()) {
        let tag = m.to_bytes()[0];
        let expected = match &m {
            ReplicaMessage::Propose { .. } => 1,
            ReplicaMessage::Write { signature: None, .. } => 2,
            ReplicaMessage::Write { signature: Some(_), .. } => 14,
            ReplicaMessage::Accept { .. } => 3,
            ReplicaMessage::Forward { .. } => 4,
            ReplicaMessage::Stop { .. } => 5,
            ReplicaMessage::StopData { collect, .. } if collect.proof.0.is_empty() => 6,
            ReplicaMessage::StopData { .. } => 15,
            ReplicaMessage::Sync { collects, .. }
                if collects.iter().all(|c| c.proof.0.is_empty()) => 7,
            ReplicaMessage::Sync { .. } => 16,
            ReplicaMessage::Decided(_) => 8,
            ReplicaMessage::DecisionRequest { .. } => 9,
            ReplicaMessage::CheckpointQuery => 10,
            ReplicaMessage::CheckpointInfo { .. } => 11,
            ReplicaMessage::ChunkRequest { .. } => 12,
            ReplicaMessage::Chunk { .. } => 13,
        };
        prop_assert_eq!(tag, expected);
    }

    /// What a protocol-1 peer is sent: the same message without signed WRITEs and proofs,
    /// under the tags protocol 1 has (1 to 13), and nothing else changed.
    #[test]
    fn the_protocol_1_form_drops_only_what_protocol_2_added(m in replica_message()) {
        let bytes = m.to_bytes();
        match m.protocol_1() {
            None => prop_assert!(bytes[0] <= 13),
            Some(old) => {
                prop_assert!(bytes[0] >= 14);
                let old_bytes = old.to_bytes();
                prop_assert!(old_bytes[0] <= 13);
                prop_assert_eq!(old.protocol_1(), None);
                // Equal to the original once its additions are taken away.
                let mut stripped = m.clone();
                match &mut stripped {
                    ReplicaMessage::Write { signature, .. } => *signature = None,
                    ReplicaMessage::StopData { collect, .. } => collect.proof = WriteProof::default(),
                    ReplicaMessage::Sync { collects, .. } => {
                        collects.iter_mut().for_each(|c| c.proof = WriteProof::default())
                    }
                    _ => prop_assert!(false, "{} has nothing protocol 2 added", m.kind()),
                }
                prop_assert_eq!(old, stripped);
            }
        }
    }

    /// Messages whose decoding reads several lengths in a row still decode exactly when
    /// carried back to back in a frame stream.
    #[test]
    fn decoded_frames_of_messages_equal_the_messages_sent(
        msgs in vec(replica_message(), 0..6),
        cuts in vec(any::<Index>(), 0..12),
    ) {
        let payloads: Vec<Vec<u8>> = msgs.iter().map(Encode::to_bytes).collect();
        let frames = reassemble(&stream_of(&payloads), &cuts, limits::MAX_FRAME)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let decoded: Vec<ReplicaMessage> = frames
            .iter()
            .map(|f| ReplicaMessage::from_bytes(f).expect("frame holds a valid message"))
            .collect();
        prop_assert_eq!(decoded, msgs);
    }
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

fn stream_of(payloads: &[Vec<u8>]) -> Vec<u8> {
    payloads
        .iter()
        .flat_map(|p| encode_frame(p).expect("payload under the frame limit"))
        .collect()
}

/// Feeds `stream` to a decoder in chunks cut at `cuts` (positions taken modulo the length),
/// draining complete frames after every push.
fn reassemble(stream: &[u8], cuts: &[Index], max: usize) -> Result<Vec<Vec<u8>>, FrameError> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
    at.push(0);
    at.push(stream.len());
    at.sort_unstable();
    let mut d = FrameDecoder::new(max);
    let mut out = Vec::new();
    for w in at.windows(2) {
        d.push(&stream[w[0]..w[1]]);
        while let Some(f) = d.next_frame()? {
            out.push(f);
        }
    }
    assert_eq!(d.buffered(), 0, "a complete stream leaves nothing buffered");
    Ok(out)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_split_of_a_frame_stream_yields_the_same_frames(
        payloads in vec(bytes(300), 0..10),
        cuts in vec(any::<Index>(), 0..24),
    ) {
        let stream = stream_of(&payloads);
        let frames = reassemble(&stream, &cuts, 300)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(frames, payloads);
    }

    #[test]
    fn byte_at_a_time_delivery_yields_the_same_frames(payloads in vec(bytes(64), 0..6)) {
        let stream = stream_of(&payloads);
        let cuts: Vec<Index> = Vec::new();
        let whole = reassemble(&stream, &cuts, 64).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut d = FrameDecoder::new(64);
        let mut single = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().expect("within limit") {
                single.push(f);
            }
        }
        prop_assert_eq!(&single, &payloads);
        prop_assert_eq!(whole, payloads);
    }

    /// A length above the limit is an error as soon as the header is complete, whatever came
    /// before it and however much of the payload has arrived; the error persists.
    #[test]
    fn a_length_above_the_limit_is_refused_as_soon_as_its_header_is_complete(
        limit in 32usize..=4096,
        excess in any::<u32>(),
        before in vec(bytes(32), 0..4),
        tail in bytes(64),
        cuts in vec(any::<Index>(), 0..8),
    ) {
        let len = u32::try_from(limit as u64 + 1 + u64::from(excess)).unwrap_or(u32::MAX);
        let mut stream = stream_of(&before);
        let header_end = stream.len() + 4;
        stream.extend_from_slice(&len.to_le_bytes());
        stream.extend_from_slice(&tail);
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        at.push(0);
        at.push(stream.len());
        at.sort_unstable();
        let mut d = FrameDecoder::new(limit);
        let mut frames = Vec::new();
        let mut error = None;
        'outer: for w in at.windows(2) {
            d.push(&stream[w[0]..w[1]]);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => {
                        prop_assert!(w[1] < header_end, "no error once the header was complete");
                        break;
                    }
                    Err(e) => {
                        prop_assert!(w[1] >= header_end, "error before the header was complete");
                        error = Some(e);
                        break 'outer;
                    }
                }
            }
        }
        prop_assert_eq!(frames, before);
        let expected = FrameError::Oversized { len: len as usize, limit };
        prop_assert_eq!(error, Some(expected.clone()));
        prop_assert_eq!(d.next_frame(), Err(expected), "the stream stays failed");
    }

    #[test]
    fn a_length_above_the_default_limit_is_refused(
        excess in 1u32..=(u32::MAX - limits::MAX_FRAME as u32),
    ) {
        let len = limits::MAX_FRAME as u32 + excess;
        let mut d = FrameDecoder::default();
        d.push(&len.to_le_bytes());
        prop_assert_eq!(
            d.next_frame(),
            Err(FrameError::Oversized { len: len as usize, limit: limits::MAX_FRAME })
        );
    }

    /// Arbitrary bytes in arbitrary chunks: the decoder and every message decoder behind it
    /// return, never panic.
    #[test]
    fn arbitrary_streams_never_panic_the_frame_or_message_decoders(
        max in 0usize..=1024,
        stream in bytes(2048),
        cuts in vec(any::<Index>(), 0..16),
    ) {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        at.push(0);
        at.push(stream.len());
        at.sort_unstable();
        let mut d = FrameDecoder::new(max);
        'outer: for w in at.windows(2) {
            d.push(&stream[w[0]..w[1]]);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => {
                        prop_assert!(f.len() <= max);
                        check_untrusted::<ReplicaMessage>(&f, true)?;
                        check_untrusted::<SignedRequest>(&f, true)?;
                        check_untrusted::<Reply>(&f, true)?;
                    }
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
        }
    }
}

#[test]
fn a_length_exactly_at_the_limit_is_accepted() {
    let mut d = FrameDecoder::new(8);
    d.push(&encode_frame(&[9u8; 8]).expect("small"));
    assert_eq!(d.next_frame(), Ok(Some(vec![9u8; 8])));
    d.push(&9u32.to_le_bytes());
    assert_eq!(
        d.next_frame(),
        Err(FrameError::Oversized { len: 9, limit: 8 })
    );
}

#[test]
fn a_decoder_limit_above_the_frame_maximum_is_clamped_to_it() {
    let mut d = FrameDecoder::new(usize::MAX);
    d.push(&(limits::MAX_FRAME as u32 + 1).to_le_bytes());
    assert_eq!(
        d.next_frame(),
        Err(FrameError::Oversized {
            len: limits::MAX_FRAME + 1,
            limit: limits::MAX_FRAME
        })
    );
}

#[test]
fn encode_frame_refuses_a_payload_above_the_frame_maximum() {
    let big = vec![0u8; limits::MAX_FRAME + 1];
    assert_eq!(
        encode_frame(&big),
        Err(FrameError::Oversized {
            len: limits::MAX_FRAME + 1,
            limit: limits::MAX_FRAME
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Forged counts and lengths
// ---------------------------------------------------------------------------------------------

/// Everything a decoder reads before one count or length field, for each such field.
type Site = (&'static str, Vec<u8>, fn(&[u8]) -> Result<(), DecodeError>);

/// `(what the decoder calls the field, the bytes before it, the decoder)`.
fn count_sites() -> Vec<Site> {
    fn msg(b: &[u8]) -> Result<(), DecodeError> {
        ReplicaMessage::from_bytes(b).map(drop)
    }
    fn req(b: &[u8]) -> Result<(), DecodeError> {
        SignedRequest::from_bytes(b).map(drop)
    }
    fn reply(b: &[u8]) -> Result<(), DecodeError> {
        Reply::from_bytes(b).map(drop)
    }
    let empty_batch = Batch {
        timestamp_ms: 0,
        nonce: 0,
        requests: Vec::new(),
    };
    let minimal_collect = SignedCollect {
        collect: Collect {
            regency: Regency(0),
            replica: ReplicaId(0),
            cid: Cid(0),
            accepted: None,
            writes: Vec::new(),
        },
        signature: Signature([0; 64]),
        proof: WriteProof::default(),
    };

    let mut propose = Writer::new();
    propose.u8(1).u64(0).u32(0).u64(0).u64(0);

    let mut forward = Writer::new();
    forward.u8(4);

    let mut stop = Writer::new();
    stop.u8(5).u32(0);

    let mut proof = Writer::new();
    proof.u8(8).u64(0);
    empty_batch.encode(&mut proof);
    proof.u32(0);

    let mut writes = Writer::new();
    writes.u8(6).u32(0).u8(0).u32(0).u32(0).u64(0).u8(0);

    let mut values = Writer::new();
    values.u8(6).u32(0).u8(0);
    minimal_collect.encode(&mut values);

    let mut collects = Writer::new();
    collects.u8(7).u32(0).u8(0);

    let mut payload = Writer::new();
    payload.array(&[0; 32]).u64(0).u64(0).u8(0).u32(0);

    let mut reply_head = Writer::new();
    reply_head.u32(0).u64(0).u64(0).u8(0);
    let mut result = reply_head.clone();
    result.u8(0);
    let mut reason = reply_head.clone();
    reason.u8(2);
    let mut members = reply_head.clone();
    members.u8(1).u32(0).u32(1);
    let mut address = reply_head;
    // f = 0, one member: its 40-byte minimum must be behind the count, so test with a tail.
    address.u8(1).u32(0).u32(0).u32(1).u32(0);

    vec![
        ("batch", propose.finish(), msg),
        ("carried requests", forward.finish(), msg),
        ("carried requests", stop.finish(), msg),
        ("proof", proof.finish(), msg),
        ("write set", writes.finish(), msg),
        ("collect values", values.finish(), msg),
        ("collects", collects.finish(), msg),
        ("payload", payload.finish(), req),
        ("result", result.finish(), reply),
        ("reason", reason.finish(), reply),
        ("members", members.finish(), reply),
        ("address", address.finish(), reply),
    ]
}

#[test]
fn forged_counts_and_lengths_are_rejected_at_every_site_without_reserving_memory() {
    let start = Instant::now();
    for (site, prefix, decode) in count_sites() {
        let forged = |count: u32, tail: usize| {
            let mut b = prefix.clone();
            b.extend_from_slice(&count.to_le_bytes());
            b.resize(b.len() + tail, 0);
            decode(&b)
        };
        // u32::MAX is above every limit: the error names this very field, so the prefix
        // reaches it.
        let r = forged(u32::MAX, 64);
        assert!(
            matches!(
                r,
                Err(DecodeError::TooLong { what, len, .. }) if what == site && len == u32::MAX as usize
            ),
            "{site}: u32::MAX gave {r:?}"
        );
        // Every count the bytes behind it cannot back is refused before anything is reserved.
        for count in [
            u32::MAX,
            u32::MAX / 2,
            1 << 24,
            limits::MAX_BATCH_REQUESTS as u32 + 1,
            limits::MAX_BATCH_REQUESTS as u32,
            limits::MAX_WRITE_SET as u32 + 1,
            limits::MAX_WRITE_SET as u32,
            limits::MAX_REPLICAS as u32 + 1,
        ] {
            for tail in [0usize, 16, 64] {
                let r = forged(count, tail);
                assert!(
                    matches!(
                        r,
                        Err(DecodeError::TooLong { .. } | DecodeError::Truncated { .. })
                    ),
                    "{site}: count {count} with {tail} bytes behind it gave {r:?}"
                );
            }
        }
    }
    // Each decode bails out before touching memory proportional to the count; a decoder that
    // reserved or looped over a forged u32::MAX count would take seconds or abort.
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "forged counts took {:?}",
        start.elapsed()
    );
}

#[test]
fn a_batch_claiming_u32_max_requests_is_too_long() {
    let mut w = Writer::new();
    w.u64(1).u64(2).u32(u32::MAX);
    assert_eq!(
        Batch::from_bytes(w.as_slice()),
        Err(DecodeError::TooLong {
            what: "batch",
            len: u32::MAX as usize,
            limit: limits::MAX_BATCH_REQUESTS
        })
    );
}

#[test]
fn a_batch_claiming_more_requests_than_its_bytes_can_hold_is_truncated() {
    // 4096 requests need at least 4096 * 121 bytes; 10 KiB of zeros cannot back them.
    let mut w = Writer::new();
    w.u64(1)
        .u64(2)
        .u32(limits::MAX_BATCH_REQUESTS as u32)
        .array(&[0; 10 * 1024]);
    assert!(matches!(
        Batch::from_bytes(w.as_slice()),
        Err(DecodeError::Truncated { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Boundaries and hand-built encodings
// ---------------------------------------------------------------------------------------------

fn member(i: u32, address: String) -> Member {
    Member {
        id: ReplicaId(i),
        address,
        key: PublicKey([i as u8; 32]),
    }
}

#[test]
fn a_member_address_of_exactly_the_limit_round_trips_and_one_more_byte_is_refused() {
    let at_limit = View::new(
        ViewId(3),
        1,
        (0..4)
            .map(|i| member(i, "a".repeat(limits::MAX_ADDRESS)))
            .collect(),
    )
    .expect("valid");
    assert_eq!(View::from_bytes(&at_limit.to_bytes()), Ok(at_limit));

    let over = View::new_unvalidated(
        ViewId(3),
        1,
        (0..4)
            .map(|i| member(i, "a".repeat(limits::MAX_ADDRESS + 1)))
            .collect(),
    );
    assert!(matches!(
        View::from_bytes(&over.to_bytes()),
        Err(DecodeError::TooLong {
            what: "address",
            ..
        })
    ));
}

#[test]
fn views_breaking_n_3f_plus_1_or_with_duplicate_ids_are_refused_on_decode() {
    let members: Vec<Member> = (0..4).map(|i| member(i, format!("h{i}:1"))).collect();
    let too_few = View::new_unvalidated(ViewId(0), 2, members.clone());
    assert!(matches!(
        View::from_bytes(&too_few.to_bytes()),
        Err(DecodeError::Invalid(_))
    ));
    let mut dup = members;
    dup[2].id = ReplicaId(0);
    let dup = View::new_unvalidated(ViewId(0), 1, dup);
    assert!(matches!(
        View::from_bytes(&dup.to_bytes()),
        Err(DecodeError::Invalid(_))
    ));
    let empty = View::new_unvalidated(ViewId(0), 0, Vec::new());
    assert!(View::from_bytes(&empty.to_bytes()).is_err());
}

#[test]
fn a_member_address_that_is_not_utf8_is_refused() {
    let v = View::new(
        ViewId(0),
        1,
        (0..4).map(|i| member(i, "xy".to_owned())).collect(),
    )
    .expect("valid");
    let mut b = v.to_bytes();
    // id(4) f(4) count(4) | member 0: id(4) len(4) "xy"
    b[4 + 4 + 4 + 4 + 4] = 0xff;
    assert_eq!(
        View::from_bytes(&b),
        Err(DecodeError::Invalid("address is not UTF-8"))
    );
}

#[test]
fn bool_and_option_tags_other_than_0_and_1_are_refused() {
    let mut w = Writer::new();
    w.u8(2);
    assert!(kmmr_protocol::wire::codec::Reader::new(w.as_slice())
        .bool()
        .is_err());
    // StopData with an option tag of 2 for `last`.
    let mut w = Writer::new();
    w.u8(6).u32(0).u8(2);
    assert_eq!(
        ReplicaMessage::from_bytes(w.as_slice()),
        Err(DecodeError::UnknownTag {
            what: "option",
            tag: 2
        })
    );
}

#[test]
fn unknown_message_and_reply_tags_are_refused() {
    for tag in [0u8, 17, 255] {
        assert_eq!(
            ReplicaMessage::from_bytes(&[tag]),
            Err(DecodeError::UnknownTag {
                what: "replica message",
                tag
            })
        );
    }
    let mut w = Writer::new();
    w.u32(0).u64(0).u64(0).u8(0).u8(5);
    assert_eq!(
        Reply::from_bytes(w.as_slice()),
        Err(DecodeError::UnknownTag {
            what: "reply body",
            tag: 5
        })
    );
    let mut w = Writer::new();
    w.u32(0).u64(0).u64(0).u8(3);
    assert!(matches!(
        Reply::from_bytes(w.as_slice()),
        Err(DecodeError::UnknownTag {
            what: "request kind",
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Regressions: decoder bugs these tests found, fixed
// ---------------------------------------------------------------------------------------------

fn minimal_collect(replica: u32) -> SignedCollect {
    SignedCollect {
        collect: Collect {
            regency: Regency(1),
            replica: ReplicaId(replica),
            cid: Cid(0),
            accepted: None,
            writes: Vec::new(),
        },
        signature: Signature([0; 64]),
        proof: WriteProof::default(),
    }
}

/// `ReplicaMessage::decode` for SYNC bounds the collect count with a minimum element size of
/// 120 bytes (wire/messages.rs, tag 7: `r.vec("collects", limits::MAX_REPLICAS, 120, ...)`), but
/// a signed collect that never accepted and never wrote is 4+4+8+1+4+64 = 85 bytes. A SYNC
/// after a leader change in which no replica accepted anything (n-f such collects) and whose
/// batch is empty (`Choice::Free` with an empty pool) is refused as `Truncated` by every
/// follower. Minimal reproducer (130 bytes): tag 7, regency, last = None, one such collect,
/// an empty batch.
#[test]
fn sync_carrying_collects_of_replicas_that_never_accepted_decodes() {
    let empty_batch = Batch {
        timestamp_ms: 0,
        nonce: 0,
        requests: Vec::new(),
    };
    assert_eq!(minimal_collect(0).to_bytes().len(), 85);
    for n in 1..=4 {
        let m = ReplicaMessage::Sync {
            regency: Regency(1),
            last: None,
            collects: (0..n).map(minimal_collect).collect(),
            batch: empty_batch.clone(),
        };
        assert_eq!(
            ReplicaMessage::from_bytes(&m.to_bytes()),
            Ok(m),
            "SYNC with {n} minimal collects"
        );
    }
}

/// `Reply::decode` turns a reject reason into a `String` with `String::from_utf8_lossy`
/// (wire/messages.rs, `ReplyBody::Rejected` arm), so bytes that are not UTF-8 are accepted and
/// decode to a value whose encoding differs: the encoding is not canonical (two byte strings,
/// one value). Reproducer: `00000000 0000000000000000 0000000000000000 00 02 01000000 ff`
/// (replica 0, session 0, sequence 0, Ordered, Rejected, length 1, byte 0xff) decodes to
/// `Rejected("\u{fffd}")`, which re-encodes with length 3 and bytes `ef bf bd`.
#[test]
fn reply_reason_that_is_not_utf8_is_refused() {
    let mut w = Writer::new();
    w.u32(0).u64(0).u64(0).u8(0).u8(2).bytes(&[0xff]);
    let b = w.finish();
    let r = Reply::from_bytes(&b);
    assert!(
        r.is_err() || r.as_ref().map(Encode::to_bytes).as_deref() == Ok(&b[..]),
        "accepted non-canonical bytes as {r:?}"
    );
}

/// `ReplyBody::Rejected` encodes a reason of any length, but `Reply::decode` refuses reasons
/// over 1024 bytes (a literal in wire/messages.rs, not in `limits`), so a replica can send a
/// rejection its clients cannot decode.
#[test]
fn long_reject_reason_round_trips() {
    let r = Reply {
        replica: ReplicaId(0),
        session: 1,
        sequence: 2,
        kind: RequestKind::Ordered,
        body: ReplyBody::Rejected("x".repeat(1025)),
    };
    assert_eq!(Reply::from_bytes(&r.to_bytes()), Ok(r));
}
