//! Protocol messages: client requests and replies, and the replica-to-replica messages of
//! Mod-SMaRt (PROPOSE, WRITE, ACCEPT), the synchronization phase (STOP, STOPDATA, SYNC) and
//! decision transfer.

use crate::crypto::{self, Digest, Domain, KeyPair, PublicKey, Signature};
use crate::view::View;
use crate::wire::codec::{Decode, DecodeError, Encode, Reader, Writer};
use crate::wire::ids::{Cid, Epoch, Regency, ReplicaId, ViewId};
use crate::wire::limits;

/// A client is identified by its public key: a request is authentic iff its signature verifies
/// under the key it names, so no replica, leader included, can forge one.
pub type ClientId = PublicKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RequestKind {
    /// Totally ordered through consensus.
    Ordered,
    /// Read-only, answered by each replica directly.
    Unordered,
    /// A view change signed by the admin key, ordered like `Ordered` and executed by the
    /// ordering layer itself rather than the service.
    Reconfig,
}

impl Encode for RequestKind {
    fn encode(&self, w: &mut Writer) {
        w.u8(match self {
            RequestKind::Ordered => 0,
            RequestKind::Unordered => 1,
            RequestKind::Reconfig => 2,
        });
    }
}

impl Decode for RequestKind {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.u8()? {
            0 => Ok(RequestKind::Ordered),
            1 => Ok(RequestKind::Unordered),
            2 => Ok(RequestKind::Reconfig),
            tag => Err(DecodeError::UnknownTag {
                what: "request kind",
                tag,
            }),
        }
    }
}

/// What a client asks for. `session` must grow across client restarts: replicas refuse a
/// session older than the one they know, which is what stops a leader replaying an old
/// session's signed requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub client: ClientId,
    pub session: u64,
    pub sequence: u64,
    pub kind: RequestKind,
    pub view: ViewId,
    pub payload: Vec<u8>,
}

impl Encode for Request {
    fn encode(&self, w: &mut Writer) {
        self.client.encode(w);
        w.u64(self.session).u64(self.sequence);
        self.kind.encode(w);
        self.view.encode(w);
        w.bytes(&self.payload);
    }
}

impl Decode for Request {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Request {
            client: PublicKey::decode(r)?,
            session: r.u64()?,
            sequence: r.u64()?,
            kind: RequestKind::decode(r)?,
            view: ViewId::decode(r)?,
            payload: r.bytes_vec("payload", limits::MAX_PAYLOAD)?,
        })
    }
}

/// A request with the client's signature over its canonical encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest {
    pub request: Request,
    pub signature: Signature,
}

/// Smallest possible encoding of a signed request: used to bound counts when decoding.
const MIN_SIGNED_REQUEST: usize = 32 + 8 + 8 + 1 + 4 + 4 + 64;

impl SignedRequest {
    pub fn sign(request: Request, key: &KeyPair) -> Self {
        let signature = key.sign(Domain::ClientRequest, &request.to_bytes());
        SignedRequest { request, signature }
    }

    /// Digest of the signed request (request and signature): identifies it in pools and caches.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.to_bytes())
    }

    pub fn verify(&self) -> bool {
        crypto::verify(
            &self.request.client,
            Domain::ClientRequest,
            &self.request.to_bytes(),
            &self.signature,
        )
    }
}

impl Encode for SignedRequest {
    fn encode(&self, w: &mut Writer) {
        self.request.encode(w);
        self.signature.encode(w);
    }
}

impl Decode for SignedRequest {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(SignedRequest {
            request: Request::decode(r)?,
            signature: Signature::decode(r)?,
        })
    }
}

/// The value a consensus instance decides: the leader's timestamp, a seed for deterministic
/// nonces, and the requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub timestamp_ms: u64,
    pub nonce: u64,
    pub requests: Vec<SignedRequest>,
}

impl Batch {
    pub fn digest(&self) -> Digest {
        Digest::of(&self.to_bytes())
    }

    pub fn payload_bytes(&self) -> usize {
        self.requests.iter().map(|r| r.request.payload.len()).sum()
    }
}

impl Encode for Batch {
    fn encode(&self, w: &mut Writer) {
        w.u64(self.timestamp_ms).u64(self.nonce);
        w.len(self.requests.len());
        for r in &self.requests {
            r.encode(w);
        }
    }
}

impl Decode for Batch {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Batch {
            timestamp_ms: r.u64()?,
            nonce: r.u64()?,
            requests: r.vec(
                "batch",
                limits::MAX_BATCH_REQUESTS,
                MIN_SIGNED_REQUEST,
                SignedRequest::decode,
            )?,
        })
    }
}

/// The bytes a replica signs when it ACCEPTs `digest` for (`cid`, `epoch`).
pub fn accept_signing_bytes(cid: Cid, epoch: Epoch, digest: &Digest) -> Vec<u8> {
    let mut w = Writer::with_capacity(48);
    cid.encode(&mut w);
    epoch.encode(&mut w);
    digest.encode(&mut w);
    w.finish()
}

/// Proof that a value was decided: a quorum of signed ACCEPTs for one (cid, epoch, digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    pub epoch: Epoch,
    pub accepts: Vec<(ReplicaId, Signature)>,
}

impl Encode for Proof {
    fn encode(&self, w: &mut Writer) {
        self.epoch.encode(w);
        w.len(self.accepts.len());
        for (id, s) in &self.accepts {
            id.encode(w);
            s.encode(w);
        }
    }
}

impl Decode for Proof {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let epoch = Epoch::decode(r)?;
        let accepts = r.vec("proof", limits::MAX_REPLICAS, 68, |r| {
            Ok((ReplicaId::decode(r)?, Signature::decode(r)?))
        })?;
        Ok(Proof { epoch, accepts })
    }
}

/// A decided instance with its proof; verifiable by anyone who knows the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub cid: Cid,
    pub batch: Batch,
    pub proof: Proof,
}

impl Encode for Decision {
    fn encode(&self, w: &mut Writer) {
        self.cid.encode(w);
        self.batch.encode(w);
        self.proof.encode(w);
    }
}

impl Decode for Decision {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Decision {
            cid: Cid::decode(r)?,
            batch: Batch::decode(r)?,
            proof: Proof::decode(r)?,
        })
    }
}

/// A replica's signed account, for a leader change, of the instance it was running: what it
/// ACCEPTed (if anything) and every (epoch, value) it WROTE. `accepted: None` means "never
/// accepted", which is distinct from "accepted at epoch 0".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collect {
    pub regency: Regency,
    pub replica: ReplicaId,
    /// The instance this collect describes: the replica's last decided CID + 1.
    pub cid: Cid,
    pub accepted: Option<(Epoch, Digest)>,
    pub writes: Vec<(Epoch, Digest)>,
}

impl Encode for Collect {
    fn encode(&self, w: &mut Writer) {
        self.regency.encode(w);
        self.replica.encode(w);
        self.cid.encode(w);
        w.option(self.accepted.as_ref(), |w, (e, d)| {
            e.encode(w);
            d.encode(w);
        });
        w.len(self.writes.len());
        for (e, d) in &self.writes {
            e.encode(w);
            d.encode(w);
        }
    }
}

impl Decode for Collect {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let regency = Regency::decode(r)?;
        let replica = ReplicaId::decode(r)?;
        let cid = Cid::decode(r)?;
        let accepted = r.option(|r| Ok((Epoch::decode(r)?, Digest::decode(r)?)))?;
        let writes = r.vec("write set", limits::MAX_WRITE_SET, 36, |r| {
            Ok((Epoch::decode(r)?, Digest::decode(r)?))
        })?;
        Ok(Collect {
            regency,
            replica,
            cid,
            accepted,
            writes,
        })
    }
}

/// Smallest encoding of a signed collect: never accepted, nothing written.
const MIN_SIGNED_COLLECT: usize = 4 + 4 + 8 + 1 + 4 + 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCollect {
    pub collect: Collect,
    pub signature: Signature,
    /// Signed WRITEs of the value the collect accepted, at its epoch: with f+1 valid ones a
    /// correct replica wrote it, whatever the others' write sets say (a replica restarted from
    /// its disk may have forgotten a WRITE it sent before its promise). Outside the collect's
    /// signature: it proves itself, and a leader may drop it for a peer that cannot read it.
    pub proof: WriteProof,
}

impl SignedCollect {
    pub fn sign(collect: Collect, key: &KeyPair) -> Self {
        let signature = key.sign(Domain::Collect, &collect.to_bytes());
        SignedCollect {
            collect,
            signature,
            proof: WriteProof::default(),
        }
    }

    /// The collect with its proof (protocol 2).
    fn encode_v2(&self, w: &mut Writer) {
        self.encode(w);
        self.proof.encode(w);
    }

    fn decode_v2(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut c = SignedCollect::decode(r)?;
        c.proof = WriteProof::decode(r)?;
        Ok(c)
    }
}

/// The collect alone (protocol 1, and what protocol 2 signs).
impl Encode for SignedCollect {
    fn encode(&self, w: &mut Writer) {
        self.collect.encode(w);
        self.signature.encode(w);
    }
}

impl Decode for SignedCollect {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(SignedCollect {
            collect: Collect::decode(r)?,
            signature: Signature::decode(r)?,
            proof: WriteProof::default(),
        })
    }
}

/// WRITEs of one value at one epoch of one instance, each signed by its writer
/// ([`Domain::Write`] over [`accept_signing_bytes`]); which value is said where the proof is
/// used. Empty when there is none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteProof(pub Vec<(ReplicaId, Signature)>);

impl WriteProof {
    /// Whether `f+1` distinct members of `view` signed a WRITE of `digest` at `epoch` of `cid`:
    /// then a correct replica wrote it.
    pub fn vouches(&self, view: &View, cid: Cid, epoch: Epoch, digest: &Digest) -> bool {
        if self.0.len() < view.weak() {
            return false;
        }
        let bytes = accept_signing_bytes(cid, epoch, digest);
        // Each member's first signature only: a proof padded with copies costs one check each.
        let mut seen: Vec<ReplicaId> = Vec::new();
        let mut good = 0;
        for (id, sig) in &self.0 {
            if seen.contains(id) {
                continue;
            }
            seen.push(*id);
            if view
                .verifying_key(*id)
                .is_some_and(|k| crypto::verify_parsed(k, Domain::Write, &bytes, sig))
            {
                good += 1;
                if good >= view.weak() {
                    return true;
                }
            }
        }
        false
    }
}

impl Encode for WriteProof {
    fn encode(&self, w: &mut Writer) {
        w.len(self.0.len());
        for (id, sig) in &self.0 {
            id.encode(w);
            sig.encode(w);
        }
    }
}

impl Decode for WriteProof {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(WriteProof(r.vec(
            "write proof",
            limits::MAX_REPLICAS,
            4 + 64,
            |r| Ok((ReplicaId::decode(r)?, Signature::decode(r)?)),
        )?))
    }
}

/// Messages between replicas. The sender is the authenticated peer of the channel, never a
/// field of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaMessage {
    /// The leader of `epoch` proposes `batch` for `cid`.
    Propose {
        cid: Cid,
        epoch: Epoch,
        batch: Batch,
    },
    /// The sender holds a valid proposal with this digest. Protocol 2 signs it
    /// ([`Domain::Write`] over [`accept_signing_bytes`]), for a [`WriteProof`].
    Write {
        cid: Cid,
        epoch: Epoch,
        digest: Digest,
        signature: Option<Signature>,
    },
    /// The sender saw a quorum of WRITEs for this digest. Signed: a quorum of these is a proof.
    Accept {
        cid: Cid,
        epoch: Epoch,
        digest: Digest,
        signature: Signature,
    },
    /// Requests the sender has been waiting on, for the leader to order.
    Forward { requests: Vec<SignedRequest> },
    /// The sender wants to move to `regency` because the leader is faulty or slow.
    Stop {
        regency: Regency,
        requests: Vec<SignedRequest>,
    },
    /// To the new leader: the sender's last decision with its proof, its signed collect, and
    /// the batches of the values the collect names (checked against their digests).
    StopData {
        regency: Regency,
        last: Option<Decision>,
        collect: SignedCollect,
        values: Vec<Batch>,
    },
    /// From the new leader: the highest proven decision, the collects it chose from, and the
    /// batch to decide next.
    Sync {
        regency: Regency,
        last: Option<Decision>,
        collects: Vec<SignedCollect>,
        batch: Batch,
    },
    /// A decided instance, sent to a replica that is behind.
    Decided(Decision),
    /// The sender is missing decisions from `from` on.
    DecisionRequest { from: Cid },
    /// The sender needs state: every replica answers with `CheckpointInfo`.
    CheckpointQuery,
    /// The checkpoints the sender holds and can serve, oldest first, and the first CID whose
    /// decision it can still send (older ones are trimmed: only state transfer reaches them).
    CheckpointInfo {
        checkpoints: Vec<CheckpointMeta>,
        first_logged: Option<Cid>,
    },
    /// Asks for `len` bytes of a checkpoint from `offset` on.
    ChunkRequest {
        cid: Cid,
        digest: Digest,
        offset: u64,
        len: u32,
    },
    /// A piece of a checkpoint (its whole length is in the `CheckpointMeta` agreed on).
    Chunk {
        cid: Cid,
        digest: Digest,
        offset: u64,
        data: Vec<u8>,
    },
}

/// What identifies a checkpoint: the state after executing `cid`, in view `view`, whose
/// encoding is `len` bytes with digest `digest`. Correct replicas produce identical metadata
/// for one CID, so f+1 matching ones vouch for a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CheckpointMeta {
    pub cid: Cid,
    pub view: ViewId,
    pub digest: Digest,
    pub len: u64,
}

impl Encode for CheckpointMeta {
    fn encode(&self, w: &mut Writer) {
        self.cid.encode(w);
        self.view.encode(w);
        self.digest.encode(w);
        w.u64(self.len);
    }
}

impl Decode for CheckpointMeta {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(CheckpointMeta {
            cid: Cid::decode(r)?,
            view: ViewId::decode(r)?,
            digest: Digest::decode(r)?,
            len: r.u64()?,
        })
    }
}

impl ReplicaMessage {
    /// The message as a replica speaking only protocol 1 reads it: WRITEs unsigned, collects
    /// without proofs. `None` when it has nothing protocol 1 lacks. Both are for liveness
    /// after a crash only: a peer that cannot read them loses nothing it relies on.
    pub fn protocol_1(&self) -> Option<ReplicaMessage> {
        match self {
            ReplicaMessage::Write {
                cid,
                epoch,
                digest,
                signature: Some(_),
            } => Some(ReplicaMessage::Write {
                cid: *cid,
                epoch: *epoch,
                digest: *digest,
                signature: None,
            }),
            ReplicaMessage::StopData { collect, .. } if !collect.proof.0.is_empty() => {
                let mut m = self.clone();
                if let ReplicaMessage::StopData { collect, .. } = &mut m {
                    collect.proof = WriteProof::default();
                }
                Some(m)
            }
            ReplicaMessage::Sync { collects, .. }
                if collects.iter().any(|c| !c.proof.0.is_empty()) =>
            {
                let mut m = self.clone();
                if let ReplicaMessage::Sync { collects, .. } = &mut m {
                    for c in collects {
                        c.proof = WriteProof::default();
                    }
                }
                Some(m)
            }
            _ => None,
        }
    }

    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ReplicaMessage::Propose { .. } => "propose",
            ReplicaMessage::Write { .. } => "write",
            ReplicaMessage::Accept { .. } => "accept",
            ReplicaMessage::Forward { .. } => "forward",
            ReplicaMessage::Stop { .. } => "stop",
            ReplicaMessage::StopData { .. } => "stopdata",
            ReplicaMessage::Sync { .. } => "sync",
            ReplicaMessage::Decided(_) => "decided",
            ReplicaMessage::DecisionRequest { .. } => "decision_request",
            ReplicaMessage::CheckpointQuery => "checkpoint_query",
            ReplicaMessage::CheckpointInfo { .. } => "checkpoint_info",
            ReplicaMessage::ChunkRequest { .. } => "chunk_request",
            ReplicaMessage::Chunk { .. } => "chunk",
        }
    }
}

fn encode_requests(w: &mut Writer, requests: &[SignedRequest]) {
    w.len(requests.len());
    for r in requests {
        r.encode(w);
    }
}

fn decode_requests(r: &mut Reader<'_>) -> Result<Vec<SignedRequest>, DecodeError> {
    r.vec(
        "carried requests",
        limits::MAX_CARRIED_REQUESTS,
        MIN_SIGNED_REQUEST,
        SignedRequest::decode,
    )
}

impl Encode for ReplicaMessage {
    fn encode(&self, w: &mut Writer) {
        match self {
            ReplicaMessage::Propose { cid, epoch, batch } => {
                w.u8(1);
                cid.encode(w);
                epoch.encode(w);
                batch.encode(w);
            }
            ReplicaMessage::Write {
                cid,
                epoch,
                digest,
                signature,
            } => {
                w.u8(if signature.is_some() { 14 } else { 2 });
                cid.encode(w);
                epoch.encode(w);
                digest.encode(w);
                if let Some(s) = signature {
                    s.encode(w);
                }
            }
            ReplicaMessage::Accept {
                cid,
                epoch,
                digest,
                signature,
            } => {
                w.u8(3);
                cid.encode(w);
                epoch.encode(w);
                digest.encode(w);
                signature.encode(w);
            }
            ReplicaMessage::Forward { requests } => {
                w.u8(4);
                encode_requests(w, requests);
            }
            ReplicaMessage::Stop { regency, requests } => {
                w.u8(5);
                regency.encode(w);
                encode_requests(w, requests);
            }
            ReplicaMessage::StopData {
                regency,
                last,
                collect,
                values,
            } => {
                let v2 = !collect.proof.0.is_empty();
                w.u8(if v2 { 15 } else { 6 });
                regency.encode(w);
                w.option(last.as_ref(), |w, d| d.encode(w));
                if v2 {
                    collect.encode_v2(w);
                } else {
                    collect.encode(w);
                }
                w.len(values.len());
                for b in values {
                    b.encode(w);
                }
            }
            ReplicaMessage::Sync {
                regency,
                last,
                collects,
                batch,
            } => {
                let v2 = collects.iter().any(|c| !c.proof.0.is_empty());
                w.u8(if v2 { 16 } else { 7 });
                regency.encode(w);
                w.option(last.as_ref(), |w, d| d.encode(w));
                w.len(collects.len());
                for c in collects {
                    if v2 {
                        c.encode_v2(w);
                    } else {
                        c.encode(w);
                    }
                }
                batch.encode(w);
            }
            ReplicaMessage::Decided(d) => {
                w.u8(8);
                d.encode(w);
            }
            ReplicaMessage::DecisionRequest { from } => {
                w.u8(9);
                from.encode(w);
            }
            ReplicaMessage::CheckpointQuery => {
                w.u8(10);
            }
            ReplicaMessage::CheckpointInfo {
                checkpoints,
                first_logged,
            } => {
                w.u8(11);
                w.len(checkpoints.len());
                for c in checkpoints {
                    c.encode(w);
                }
                w.option(first_logged.as_ref(), |w, c| c.encode(w));
            }
            ReplicaMessage::ChunkRequest {
                cid,
                digest,
                offset,
                len,
            } => {
                w.u8(12);
                cid.encode(w);
                digest.encode(w);
                w.u64(*offset);
                w.u32(*len);
            }
            ReplicaMessage::Chunk {
                cid,
                digest,
                offset,
                data,
            } => {
                w.u8(13);
                cid.encode(w);
                digest.encode(w);
                w.u64(*offset);
                w.bytes(data);
            }
        }
    }
}

impl Decode for ReplicaMessage {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            1 => ReplicaMessage::Propose {
                cid: Cid::decode(r)?,
                epoch: Epoch::decode(r)?,
                batch: Batch::decode(r)?,
            },
            tag @ (2 | 14) => ReplicaMessage::Write {
                cid: Cid::decode(r)?,
                epoch: Epoch::decode(r)?,
                digest: Digest::decode(r)?,
                signature: if tag == 14 {
                    Some(Signature::decode(r)?)
                } else {
                    None
                },
            },
            3 => ReplicaMessage::Accept {
                cid: Cid::decode(r)?,
                epoch: Epoch::decode(r)?,
                digest: Digest::decode(r)?,
                signature: Signature::decode(r)?,
            },
            4 => ReplicaMessage::Forward {
                requests: decode_requests(r)?,
            },
            5 => ReplicaMessage::Stop {
                regency: Regency::decode(r)?,
                requests: decode_requests(r)?,
            },
            tag @ (6 | 15) => ReplicaMessage::StopData {
                regency: Regency::decode(r)?,
                last: r.option(Decision::decode)?,
                collect: if tag == 15 {
                    SignedCollect::decode_v2(r)?
                } else {
                    SignedCollect::decode(r)?
                },
                values: r.vec("collect values", limits::MAX_WRITE_SET, 20, Batch::decode)?,
            },
            tag @ (7 | 16) => ReplicaMessage::Sync {
                regency: Regency::decode(r)?,
                last: r.option(Decision::decode)?,
                collects: r.vec(
                    "collects",
                    limits::MAX_REPLICAS,
                    MIN_SIGNED_COLLECT,
                    if tag == 16 {
                        SignedCollect::decode_v2
                    } else {
                        SignedCollect::decode
                    },
                )?,
                batch: Batch::decode(r)?,
            },
            8 => ReplicaMessage::Decided(Decision::decode(r)?),
            9 => ReplicaMessage::DecisionRequest {
                from: Cid::decode(r)?,
            },
            10 => ReplicaMessage::CheckpointQuery,
            11 => ReplicaMessage::CheckpointInfo {
                checkpoints: r.vec(
                    "checkpoints",
                    limits::MAX_CHECKPOINTS_ADVERTISED,
                    52,
                    CheckpointMeta::decode,
                )?,
                first_logged: r.option(Cid::decode)?,
            },
            12 => ReplicaMessage::ChunkRequest {
                cid: Cid::decode(r)?,
                digest: Digest::decode(r)?,
                offset: r.u64()?,
                len: r.u32()?,
            },
            13 => ReplicaMessage::Chunk {
                cid: Cid::decode(r)?,
                digest: Digest::decode(r)?,
                offset: r.u64()?,
                data: r.bytes_vec("chunk", limits::MAX_CHUNK)?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "replica message",
                    tag,
                })
            }
        })
    }
}

/// What a replica tells a client about its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    /// The service's result.
    Result(Vec<u8>),
    /// The request named an older view; here is the current one. The client installs it once
    /// f+1 replicas send the same view.
    NewView(View),
    /// The request was refused before ordering (stale session, too large, bad signature...).
    Rejected(String),
    /// The request never executed and never will: a later request of the same session executed
    /// first (a replica relayed it to the leader ahead of this one), and a client's requests
    /// execute in sequence order. f+1 replicas saying so include a correct one, so the client
    /// may send the operation again under a new sequence number without running it twice.
    Overtaken,
    /// The replica executed past the request (its session's last executed request is later)
    /// and keeps no reply for it: it installed a later state, or evicted the reply. Not a
    /// result; a client waiting for a quorum of replicas to hold a write counts it toward that
    /// quorum once f+1 others agree on the result.
    Past,
}

/// A replica's answer to one request. Authenticated by the channel it travels on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub replica: ReplicaId,
    pub session: u64,
    pub sequence: u64,
    pub kind: RequestKind,
    pub body: ReplyBody,
}

impl Encode for Reply {
    fn encode(&self, w: &mut Writer) {
        self.replica.encode(w);
        w.u64(self.session).u64(self.sequence);
        self.kind.encode(w);
        self.body.encode(w);
    }
}

impl Encode for ReplyBody {
    fn encode(&self, w: &mut Writer) {
        match self {
            ReplyBody::Result(b) => {
                w.u8(0).bytes(b);
            }
            ReplyBody::NewView(v) => {
                w.u8(1);
                v.encode(w);
            }
            ReplyBody::Rejected(s) => {
                w.u8(2).bytes(s.as_bytes());
            }
            ReplyBody::Overtaken => {
                w.u8(3);
            }
            ReplyBody::Past => {
                w.u8(4);
            }
        }
    }
}

impl Decode for Reply {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let replica = ReplicaId::decode(r)?;
        let session = r.u64()?;
        let sequence = r.u64()?;
        let kind = RequestKind::decode(r)?;
        let body = match r.u8()? {
            0 => ReplyBody::Result(r.bytes_vec("result", limits::MAX_RESULT)?),
            1 => ReplyBody::NewView(View::decode(r)?),
            2 => ReplyBody::Rejected(
                std::str::from_utf8(r.bytes("reason", limits::MAX_RESULT)?)
                    .map_err(|_| DecodeError::Invalid("reject reason is not UTF-8"))?
                    .to_owned(),
            ),
            3 => ReplyBody::Overtaken,
            4 => ReplyBody::Past,
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "reply body",
                    tag,
                })
            }
        };
        Ok(Reply {
            replica,
            session,
            sequence,
            kind,
            body,
        })
    }
}
