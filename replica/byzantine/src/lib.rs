//! Byzantine replicas: a real core whose outputs an adversary rewrites before they reach the
//! network. The adversary holds the replica's own key, so everything it signs is a valid
//! signature of that replica; what it cannot do is sign for anyone else or break the channel
//! authentication that names the sender.

use std::collections::{BTreeMap, VecDeque};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use kmmr_protocol::core::output::Output;
use kmmr_protocol::crypto::{Digest, Domain, KeyPair, Signature};
use kmmr_protocol::view::View;
use kmmr_protocol::wire::codec::{Encode, Writer};
use kmmr_protocol::wire::ids::{Cid, Regency, ReplicaId, ViewId};
use kmmr_protocol::wire::limits;
use kmmr_protocol::wire::messages::{
    accept_signing_bytes, Batch, ClientId, Collect, Decision, Proof, ReplicaMessage, Reply,
    ReplyBody, Request, RequestKind, SignedCollect, SignedRequest, WriteProof,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    Correct,
    /// Sends nothing.
    Silent,
    /// Sends everything late, but not so late as to look crashed.
    Slow {
        extra_us: u64,
    },
    /// Proposes different batches to the two halves of the view and votes for both.
    Equivocate,
    /// Flips bits in frames and lies in replies to clients.
    Corrupt,
    /// Injects messages with forged signatures, unproven claims and forged client requests.
    Forge,
    /// Re-sends old frames.
    Replay,
    /// Sends frames above the size limit and frames whose length fields lie.
    Oversize,
    /// Any of the above, chosen per message.
    Mixed,
    /// As leader, proposes one batch to the first half of the view and another to the second,
    /// then votes for the second batch towards everyone: the first half receives a quorum of
    /// votes for a batch it does not hold (BFT-SMaRt PR #99/#100).
    SplitProposal,
    /// In every STOPDATA claims a decision several instances beyond its own, without a proof.
    LyingStopData,
    /// Votes like a correct replica but signs its ACCEPTs of odd CIDs with garbage: they count
    /// on the authenticated channel, and poison the proof of any decision that holds them. The
    /// good ones in between let the others trust ACCEPTs unchecked again.
    BadAcceptSignatures,
}

/// Where a frame goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    Replica(ReplicaId),
    /// Every other replica of the view.
    AllReplicas,
    Client(ClientId),
    /// Not a network output (storage, view change): handled by the driver, never sent.
    Nowhere,
}

/// A frame leaving a node, with extra delay on top of the network's.
#[derive(Debug, Clone)]
pub struct Frame {
    pub dest: Dest,
    pub bytes: Vec<u8>,
    pub extra_delay_us: u64,
}

/// What the adversary knows of its replica's position.
pub struct Position<'a> {
    pub view: &'a View,
    pub regency: Regency,
    pub last_decided: Option<Cid>,
}

pub struct Adversary {
    pub behaviour: Behaviour,
    id: ReplicaId,
    key: KeyPair,
    /// Equivocation: the digest each half saw in place of the original.
    alt: BTreeMap<Digest, Digest>,
    sent: VecDeque<(Dest, Vec<u8>)>,
    oversize_sent: u32,
}

const REPLAY_HISTORY: usize = 64;

fn frame(dest: Dest, msg: &impl Encode) -> Frame {
    Frame {
        dest,
        bytes: msg.to_bytes(),
        extra_delay_us: 0,
    }
}

/// The frames a correct node sends for `out`.
pub fn honest(out: &Output) -> Frame {
    match out {
        Output::Send { to, msg } => frame(Dest::Replica(*to), msg),
        Output::Broadcast { msg } => frame(Dest::AllReplicas, msg),
        Output::Reply { client, reply, .. } => frame(Dest::Client(*client), reply),
        Output::Persist(_)
        | Output::Promise(_)
        | Output::EncodeCheckpoint(_)
        | Output::Checkpoint { .. }
        | Output::StateInstalled(_)
        | Output::ViewChanged(_) => Frame {
            dest: Dest::Nowhere,
            bytes: Vec::new(),
            extra_delay_us: 0,
        },
    }
}

impl Adversary {
    pub fn new(behaviour: Behaviour, id: ReplicaId, key: KeyPair) -> Self {
        Adversary {
            behaviour,
            id,
            key,
            alt: BTreeMap::new(),
            sent: VecDeque::new(),
            oversize_sent: 0,
        }
    }

    pub fn transform(&mut self, rng: &mut ChaCha8Rng, out: Output, pos: &Position) -> Vec<Frame> {
        if out.is_local() {
            return Vec::new();
        }
        let behaviour = match &self.behaviour {
            Behaviour::Mixed => match rng.gen_range(0..7) {
                0 => Behaviour::Correct,
                1 => Behaviour::Equivocate,
                2 => Behaviour::Corrupt,
                3 => Behaviour::Forge,
                4 => Behaviour::Replay,
                5 => Behaviour::Oversize,
                _ => Behaviour::Silent,
            },
            b => b.clone(),
        };
        let frames = match behaviour {
            Behaviour::Correct => vec![honest(&out)],
            Behaviour::Silent => Vec::new(),
            Behaviour::Slow { extra_us } => {
                let mut f = honest(&out);
                f.extra_delay_us = extra_us;
                vec![f]
            }
            Behaviour::Equivocate => self.equivocate(rng, out, pos),
            Behaviour::Corrupt => vec![self.corrupt(rng, out)],
            Behaviour::BadAcceptSignatures => match &out {
                Output::Broadcast {
                    msg: ReplicaMessage::Accept { cid, .. },
                } if cid.0 % 2 == 1 => vec![self.poison_accept(rng, &out)],
                _ => vec![honest(&out)],
            },
            Behaviour::Forge => {
                let mut v = if rng.gen_bool(0.5) {
                    vec![self.poison_accept(rng, &out)]
                } else {
                    vec![honest(&out)]
                };
                if rng.gen_bool(0.3) {
                    v.extend(self.forge(rng, pos));
                }
                v
            }
            Behaviour::Replay => {
                let mut v = vec![honest(&out)];
                if !self.sent.is_empty() && rng.gen_bool(0.3) {
                    let i = rng.gen_range(0..self.sent.len());
                    let (_, bytes) = self.sent[i].clone();
                    let to = pos.view.members[rng.gen_range(0..pos.view.n())].id;
                    v.push(Frame {
                        dest: Dest::Replica(to),
                        bytes,
                        extra_delay_us: 0,
                    });
                }
                v
            }
            Behaviour::Oversize => {
                let mut v = vec![honest(&out)];
                v.extend(self.oversize(rng, pos));
                v
            }
            Behaviour::SplitProposal => self.split_proposal(out, pos),
            Behaviour::LyingStopData => vec![self.lie_in_stopdata(rng, out, pos)],
            Behaviour::Mixed => unreachable!("resolved above"),
        };
        for f in &frames {
            if !matches!(f.dest, Dest::Client(_)) {
                self.sent.push_back((f.dest.clone(), f.bytes.clone()));
                if self.sent.len() > REPLAY_HISTORY {
                    self.sent.pop_front();
                }
            }
        }
        frames
    }

    /// `out` as a correct replica sends it, except that an ACCEPT's signature is garbage.
    fn poison_accept(&self, rng: &mut ChaCha8Rng, out: &Output) -> Frame {
        match out {
            Output::Broadcast {
                msg:
                    ReplicaMessage::Accept {
                        cid, epoch, digest, ..
                    },
            } => frame(
                Dest::AllReplicas,
                &ReplicaMessage::Accept {
                    cid: *cid,
                    epoch: *epoch,
                    digest: *digest,
                    signature: Signature([rng.gen(); 64]),
                },
            ),
            _ => honest(out),
        }
    }

    fn halves(&self, view: &View) -> (Vec<ReplicaId>, Vec<ReplicaId>) {
        let others: Vec<ReplicaId> = view.ids().filter(|i| *i != self.id).collect();
        let mid = others.len() / 2;
        (others[..mid].to_vec(), others[mid..].to_vec())
    }

    fn sign_accept(&self, cid: Cid, epoch: Regency, d: &Digest) -> Signature {
        self.key
            .sign(Domain::Accept, &accept_signing_bytes(cid, epoch, d))
    }

    /// Signs a WRITE as the honest one was (signed or not), with its own key: the lie is
    /// in the value, and the signature proves only who wrote it.
    fn sign_write(
        &self,
        honest: &Option<Signature>,
        cid: Cid,
        epoch: Regency,
        d: &Digest,
    ) -> Option<Signature> {
        honest.map(|_| {
            self.key
                .sign(Domain::Write, &accept_signing_bytes(cid, epoch, d))
        })
    }

    fn equivocate(&mut self, rng: &mut ChaCha8Rng, out: Output, pos: &Position) -> Vec<Frame> {
        let Output::Broadcast { msg } = &out else {
            return vec![honest(&out)];
        };
        let (a, b) = self.halves(pos.view);
        let alt_msg = match msg {
            ReplicaMessage::Propose { cid, epoch, batch } => {
                let mut other = batch.clone();
                // Still a valid batch, with another digest.
                other.timestamp_ms += 1 + rng.gen_range(0..3);
                if other.requests.len() > 1 && rng.gen_bool(0.5) {
                    other.requests.pop();
                }
                self.alt.insert(batch.digest(), other.digest());
                ReplicaMessage::Propose {
                    cid: *cid,
                    epoch: *epoch,
                    batch: other,
                }
            }
            ReplicaMessage::Write {
                cid,
                epoch,
                digest,
                signature,
            } => {
                let d = self
                    .alt
                    .get(digest)
                    .copied()
                    .unwrap_or(Digest([rng.gen(); 32]));
                ReplicaMessage::Write {
                    cid: *cid,
                    epoch: *epoch,
                    digest: d,
                    signature: self.sign_write(signature, *cid, *epoch, &d),
                }
            }
            ReplicaMessage::Accept {
                cid, epoch, digest, ..
            } => {
                let d = self
                    .alt
                    .get(digest)
                    .copied()
                    .unwrap_or(Digest([rng.gen(); 32]));
                ReplicaMessage::Accept {
                    cid: *cid,
                    epoch: *epoch,
                    digest: d,
                    signature: self.sign_accept(*cid, *epoch, &d),
                }
            }
            _ => return vec![honest(&out)],
        };
        let mut v: Vec<Frame> = a
            .into_iter()
            .map(|to| frame(Dest::Replica(to), msg))
            .collect();
        v.extend(b.into_iter().map(|to| frame(Dest::Replica(to), &alt_msg)));
        v
    }

    fn split_proposal(&mut self, out: Output, pos: &Position) -> Vec<Frame> {
        let Output::Broadcast { msg } = &out else {
            return vec![honest(&out)];
        };
        let (a, b) = self.halves(pos.view);
        match msg {
            ReplicaMessage::Propose { cid, epoch, batch } => {
                let mut other = batch.clone();
                other.timestamp_ms += 1;
                self.alt.insert(batch.digest(), other.digest());
                let alt_msg = ReplicaMessage::Propose {
                    cid: *cid,
                    epoch: *epoch,
                    batch: other,
                };
                let mut v: Vec<Frame> = a
                    .into_iter()
                    .map(|to| frame(Dest::Replica(to), msg))
                    .collect();
                v.extend(b.into_iter().map(|to| frame(Dest::Replica(to), &alt_msg)));
                v
            }
            ReplicaMessage::Write {
                cid,
                epoch,
                digest,
                signature,
            } => {
                // Votes for the second batch everywhere, WRITE and ACCEPT at once: its own core
                // holds the first batch and would never accept the second.
                let d = self.alt.get(digest).copied().unwrap_or(*digest);
                let w = ReplicaMessage::Write {
                    cid: *cid,
                    epoch: *epoch,
                    digest: d,
                    signature: self.sign_write(signature, *cid, *epoch, &d),
                };
                let a = ReplicaMessage::Accept {
                    cid: *cid,
                    epoch: *epoch,
                    digest: d,
                    signature: self.sign_accept(*cid, *epoch, &d),
                };
                vec![frame(Dest::AllReplicas, &w), frame(Dest::AllReplicas, &a)]
            }
            ReplicaMessage::Accept { .. } => Vec::new(),
            _ => vec![honest(&out)],
        }
    }

    fn lie_in_stopdata(&mut self, rng: &mut ChaCha8Rng, out: Output, pos: &Position) -> Frame {
        let Output::Send {
            to,
            msg: ReplicaMessage::StopData { regency, last, .. },
        } = &out
        else {
            return honest(&out);
        };
        let claimed = Cid(last.as_ref().map_or(0, |d| d.cid.0) + 5);
        let collect = Collect {
            regency: *regency,
            replica: self.id,
            cid: claimed.next(),
            accepted: None,
            writes: Vec::new(),
        };
        let lie = ReplicaMessage::StopData {
            regency: *regency,
            last: Some(Decision {
                cid: claimed,
                batch: Batch {
                    timestamp_ms: 0,
                    nonce: 0,
                    requests: Vec::new(),
                },
                proof: self.fake_proof(rng, pos.view),
            }),
            collect: SignedCollect::sign(collect, &self.key),
            values: Vec::new(),
        };
        frame(Dest::Replica(*to), &lie)
    }

    fn corrupt(&mut self, rng: &mut ChaCha8Rng, out: Output) -> Frame {
        if let Output::Reply { client, reply, .. } = &out {
            if rng.gen_bool(0.7) {
                let lie = Reply {
                    body: ReplyBody::Result(vec![rng.gen(); rng.gen_range(0..16)]),
                    ..reply.clone()
                };
                return frame(Dest::Client(*client), &lie);
            }
        }
        let mut f = honest(&out);
        if !f.bytes.is_empty() && rng.gen_bool(0.5) {
            for _ in 0..rng.gen_range(1..=3) {
                let i = rng.gen_range(0..f.bytes.len());
                f.bytes[i] ^= 1 << rng.gen_range(0..8);
            }
        }
        f
    }

    fn fake_proof(&self, rng: &mut ChaCha8Rng, view: &View) -> Proof {
        Proof {
            epoch: Regency(0),
            accepts: view
                .ids()
                .take(view.quorum())
                .map(|id| (id, Signature([rng.gen(); 64])))
                .collect(),
        }
    }

    fn forged_request(&self, rng: &mut ChaCha8Rng) -> SignedRequest {
        let victim = KeyPair::from_seed([rng.gen(); 32]).public();
        SignedRequest {
            request: Request {
                client: victim,
                session: 1,
                sequence: rng.gen_range(1..1000),
                kind: RequestKind::Ordered,
                view: ViewId(0),
                payload: vec![rng.gen(); 4],
            },
            signature: Signature([rng.gen(); 64]),
        }
    }

    fn forge(&mut self, rng: &mut ChaCha8Rng, pos: &Position) -> Vec<Frame> {
        let next = pos.last_decided.map_or(Cid(0), |c| c.next());
        let view = pos.view;
        let msg = match rng.gen_range(0..7) {
            0 => {
                let d = Digest([rng.gen(); 32]);
                ReplicaMessage::Accept {
                    cid: next,
                    epoch: pos.regency,
                    digest: d,
                    // Signed under another replica's name is impossible; a garbage signature
                    // under our own name is what a forger can send.
                    signature: Signature([rng.gen(); 64]),
                }
            }
            1 => ReplicaMessage::Decided(Decision {
                cid: next,
                batch: Batch {
                    timestamp_ms: 0,
                    nonce: rng.gen(),
                    requests: vec![self.forged_request(rng)],
                },
                proof: self.fake_proof(rng, view),
            }),
            2 => {
                let regency = pos.regency.next();
                let claimed = Cid(next.0 + rng.gen_range(1..10));
                let collect = Collect {
                    regency,
                    replica: self.id,
                    cid: claimed.next(),
                    accepted: None,
                    writes: Vec::new(),
                };
                let stopdata = ReplicaMessage::StopData {
                    regency,
                    last: Some(Decision {
                        cid: claimed,
                        batch: Batch {
                            timestamp_ms: 0,
                            nonce: 0,
                            requests: Vec::new(),
                        },
                        proof: self.fake_proof(rng, view),
                    }),
                    collect: SignedCollect::sign(collect, &self.key),
                    values: Vec::new(),
                };
                return vec![frame(Dest::Replica(view.leader(regency)), &stopdata)];
            }
            3 => ReplicaMessage::Forward {
                requests: vec![self.forged_request(rng)],
            },
            4 => ReplicaMessage::Propose {
                cid: next,
                epoch: pos.regency,
                batch: Batch {
                    timestamp_ms: 0,
                    nonce: rng.gen(),
                    requests: vec![self.forged_request(rng)],
                },
            },
            5 => {
                let regency = pos.regency.next();
                let collects = view
                    .ids()
                    .map(|id| SignedCollect {
                        collect: Collect {
                            regency,
                            replica: id,
                            cid: next,
                            accepted: None,
                            writes: Vec::new(),
                        },
                        signature: Signature([rng.gen(); 64]),
                        proof: WriteProof::default(),
                    })
                    .collect();
                ReplicaMessage::Sync {
                    regency,
                    last: None,
                    collects,
                    batch: Batch {
                        timestamp_ms: 0,
                        nonce: 0,
                        requests: vec![self.forged_request(rng)],
                    },
                }
            }
            _ => ReplicaMessage::Stop {
                regency: Regency(pos.regency.0 + rng.gen_range(1..1000)),
                requests: vec![self.forged_request(rng)],
            },
        };
        vec![frame(Dest::AllReplicas, &msg)]
    }

    fn oversize(&mut self, rng: &mut ChaCha8Rng, pos: &Position) -> Vec<Frame> {
        let to = Dest::AllReplicas;
        if self.oversize_sent < 1 && rng.gen_bool(0.01) {
            self.oversize_sent += 1;
            return vec![Frame {
                dest: to,
                bytes: vec![0; limits::MAX_FRAME + 1],
                extra_delay_us: 0,
            }];
        }
        if !rng.gen_bool(0.2) {
            return Vec::new();
        }
        // A PROPOSE whose batch claims four billion requests.
        let mut w = Writer::new();
        w.u8(1);
        pos.last_decided.map_or(Cid(0), |c| c.next()).encode(&mut w);
        pos.regency.encode(&mut w);
        w.u64(0).u64(0).u32(u32::MAX);
        w.array(&[0u8; 64]);
        vec![Frame {
            dest: to,
            bytes: w.finish(),
            extra_delay_us: 0,
        }]
    }
}
