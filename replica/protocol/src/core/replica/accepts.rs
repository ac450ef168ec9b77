//! Deciding on ACCEPTs whose signatures are not checked yet.
//!
//! Every ACCEPT arrives on its sender's authenticated channel, and that is all deciding needs
//! (BFT-SMaRt decides on channel-authenticated ACCEPTs too). The signatures matter only as a
//! proof shown to others: to a lagging replica, or to the next leader. Such a proof must hold Q
//! valid signatures, and the safety of a leader change rests on it: a replica that decided a
//! CID but cannot prove it would report the CID as still open while having moved past it.
//!
//! So a decision is taken without checking a signature only when every one of the n members'
//! ACCEPTs arrived for the value: at most f of them can be bad, so Q valid ones are there to be
//! picked when the proof is first shown (`prove`). With a quorum but not all n, the replica
//! waits a grace period for the rest, then checks the quorum's signatures, which is how every
//! ACCEPT was handled before. It waits only while the last instance's ACCEPTs all came within
//! the grace: with a member down or slow, ACCEPTs are checked on arrival again, so a missing
//! replica costs verification, not a timer on every decision.

use super::*;

/// How many times the accept grace a replica on a host short of CPU waits.
const BUSY_HOST_GRACE: u64 = 4;

/// The last decided instance's vote, to hear its late ACCEPTs.
#[derive(Debug, Clone)]
pub(super) struct LastRound {
    cid: Cid,
    epoch: Epoch,
    digest: Digest,
    decided_us: u64,
    from: Vec<ReplicaId>,
}

impl Replica {
    pub(super) fn on_accept(
        &mut self,
        from: ReplicaId,
        cid: Cid,
        epoch: Epoch,
        digest: Digest,
        signature: crypto::Signature,
    ) {
        let fresh = self.instance.would_record_accept(epoch, from, self.regency);
        let verified = if fresh && !self.lazy_accepts {
            // Verified on arrival, one at a time: the ACCEPTs before the last one needed are
            // checked while this replica waits anyway.
            let ok = self.view.verifying_key(from).is_some_and(|k| {
                crypto::verify_parsed(
                    k,
                    Domain::Accept,
                    &accept_signing_bytes(cid, epoch, &digest),
                    &signature,
                )
            });
            if !ok {
                self.reject(Some(from), Rejection::ForgedAccept);
                return;
            }
            true
        } else {
            false
        };
        let vote = Vote {
            digest,
            signature,
            verified,
        };
        // A second, different ACCEPT on one authenticated channel is equivocation whatever its
        // signature.
        if self.instance.record_accept(epoch, from, vote, self.regency) == Recorded::Equivocation {
            self.reject(Some(from), Rejection::EquivocatingAccept);
        }
        self.check_accepts(epoch, digest);
    }

    /// Decides once a quorum of ACCEPTs names a batch this replica actually holds (never on a
    /// digest alone: BFT-SMaRt PR #99/#100), and the proof is sure to hold: Q verified
    /// signatures, or all n members' ACCEPTs.
    pub(super) fn check_accepts(&mut self, epoch: Epoch, digest: Digest) {
        let q = self.view.quorum();
        let votes = self.instance.accepts_for(epoch, &digest);
        if votes.len() < q || self.instance.batch_for(&digest).is_none() {
            return;
        }
        let verified: Vec<_> = votes
            .iter()
            .filter(|(_, _, ok)| *ok)
            .map(|(id, sig, _)| (*id, *sig))
            .collect();
        let (accepts, proven) = if verified.len() >= q {
            (verified[..q].to_vec(), true)
        } else if votes.len() >= self.view.n() {
            (
                votes.iter().map(|(id, sig, _)| (*id, *sig)).collect(),
                false,
            )
        } else {
            let unchecked = votes.iter().any(|(_, _, ok)| !ok);
            if unchecked
                && self
                    .settle_at
                    .is_none_or(|(e, d, _)| (e, d) != (epoch, digest))
            {
                let due = self.clock_us.saturating_add(self.accept_grace_us());
                self.settle_at = Some((epoch, digest, due));
            }
            self.settle(self.clock_us);
            return;
        };
        let Some(batch) = self.instance.batch_for(&digest).cloned() else {
            return;
        };
        let cid = self.current_cid();
        let from: Vec<ReplicaId> = votes.iter().map(|(id, _, _)| *id).collect();
        self.lazy_accepts = from.len() >= self.view.n() && self.accept_grace_us() > 0;
        self.decide(
            Decision {
                cid,
                batch,
                proof: Proof { epoch, accepts },
            },
            proven,
        );
        self.last_round = Some(LastRound {
            cid,
            epoch,
            digest,
            decided_us: self.clock_us,
            from,
        });
    }

    /// How long to wait for the last ACCEPTs once a quorum is in. On a host short of CPU
    /// (`set_host_busy`) `BUSY_HOST_GRACE` times as long: the last ACCEPTs are late because their
    /// senders wait for a CPU, and checking the quorum's signatures instead would take more of
    /// it from them. Each check costs about 50 us of CPU, four or more an instance at n=7.
    fn accept_grace_us(&self) -> u64 {
        let grace = self.config.accept_grace_us;
        if self.host_busy {
            grace.saturating_mul(BUSY_HOST_GRACE)
        } else {
            grace
        }
    }

    /// When the grace for the missing ACCEPTs ran out: checks the signatures held, and from now
    /// on those arriving, then decides if Q are good.
    pub(super) fn settle(&mut self, now: u64) {
        let Some((epoch, digest, due)) = self.settle_at else {
            return;
        };
        if now < due {
            return;
        }
        self.settle_at = None;
        self.lazy_accepts = false;
        let cid = self.current_cid();
        let msg = accept_signing_bytes(cid, epoch, &digest);
        for (id, sig, ok) in self.instance.accepts_for(epoch, &digest) {
            if ok {
                continue;
            }
            let good = self
                .view
                .verifying_key(id)
                .is_some_and(|k| crypto::verify_parsed(k, Domain::Accept, &msg, &sig));
            if good {
                self.instance.mark_verified(epoch, id);
            } else {
                self.instance.drop_forged(epoch, id);
                self.reject(Some(id), Rejection::ForgedAccept);
            }
        }
        self.check_accepts(epoch, digest);
    }

    /// An ACCEPT for the instance just decided: counted to learn whether all n arrive in time,
    /// and not answered with the decision (its sender has every vote it needs on the way).
    /// Returns whether it was such an ACCEPT.
    pub(super) fn late_accept(
        &mut self,
        from: ReplicaId,
        cid: Cid,
        epoch: Epoch,
        digest: Digest,
    ) -> bool {
        let n = self.view.n();
        let grace = self.accept_grace_us();
        let now = self.clock_us;
        let Some(r) = self.last_round.as_mut() else {
            return false;
        };
        if (r.cid, r.epoch, r.digest) != (cid, epoch, digest) {
            return false;
        }
        if !r.from.contains(&from) {
            r.from.push(from);
        }
        let in_time = now.saturating_sub(r.decided_us) <= grace;
        if r.from.len() >= n && in_time && grace > 0 {
            self.lazy_accepts = true;
        }
        in_time
    }

    /// Makes the logged proof of `cid` one that others accept: Q valid signatures. Decisions
    /// taken on all n unchecked ACCEPTs are checked here, the first time they are shown.
    pub(super) fn prove(&mut self, cid: Cid) -> bool {
        if !self.unproven.contains(&cid) {
            return true;
        }
        let view = self.view_for(cid).clone();
        let Some(d) = self.log.get(&cid) else {
            return false;
        };
        let q = view.quorum();
        let msg = accept_signing_bytes(cid, d.proof.epoch, &d.batch.digest());
        let mut good = Vec::with_capacity(q);
        let mut bad = Vec::new();
        for (id, sig) in &d.proof.accepts {
            if good.len() >= q {
                break;
            }
            let ok = *id == self.me
                || view
                    .verifying_key(*id)
                    .is_some_and(|k| crypto::verify_parsed(k, Domain::Accept, &msg, sig));
            if ok {
                good.push((*id, *sig));
            } else {
                bad.push(*id);
            }
        }
        for id in bad {
            self.reject(Some(id), Rejection::ForgedAccept);
        }
        if good.len() < q {
            // More than f bad signatures among n ACCEPTs: beyond what the protocol tolerates.
            self.reject(None, Rejection::UnprovableDecision);
            return false;
        }
        if let Some(d) = self.log.get_mut(&cid) {
            d.proof.accepts = good;
        }
        self.unproven.remove(&cid);
        true
    }

    /// Forgets unproven marks of decisions no longer held.
    pub(super) fn trim_unproven(&mut self) {
        let first = match (
            self.log.keys().next(),
            self.catchup.decided_ahead.keys().next(),
        ) {
            (Some(a), Some(b)) => Some(*a.min(b)),
            (a, b) => a.or(b).copied(),
        };
        match first {
            Some(first) => {
                while self.unproven.first().is_some_and(|c| *c < first) {
                    self.unproven.pop_first();
                }
            }
            None => self.unproven.clear(),
        }
    }
}
