//! The value-selection rule of the synchronization phase (VP-Consensus, after Cachin's
//! "Yet another visit to Paxos"), as pure functions over collects.
//!
//! A new leader holds n-f collects for the instance in progress. A value is *bound* when it may
//! have been decided and so must be kept: (1) a quorum of collects accepted nothing newer and
//! nothing else at that epoch, and (2) f+1 write sets hold the value at that epoch or later, or
//! one collect proves f+1 signed WRITEs of it, so a correct replica vouches for it. The collects are *unbound* when a quorum accepted nothing
//! at all; then any valid batch may be proposed. Neither: wait for more collects.
//!
//! "Never accepted" is `None`, which sorts below every epoch including epoch 0. BFT-SMaRt uses
//! timestamp 0 for both, which lets a value accepted at epoch 0 count as "nothing".

use crate::crypto::Digest;
use crate::view::View;
use crate::wire::ids::{Cid, Epoch};
use crate::wire::messages::SignedCollect;

/// A collect as it bears on instance `cid`: a replica that had not reached `cid` has neither
/// accepted nor written anything for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub accepted: Option<(Epoch, Digest)>,
    pub writes: Vec<(Epoch, Digest)>,
    /// The collect's proof shows f+1 signed WRITEs of its accepted value at its epoch.
    pub proven: bool,
}

/// Projects a collect onto instance `cid`; `None` if the collect claims a later instance (its
/// sender would then have had to prove a later decision). Checks the signatures of its proof.
pub fn project(view: &View, signed: &SignedCollect, cid: Cid) -> Option<State> {
    let collect = &signed.collect;
    if collect.cid > cid {
        return None;
    }
    if collect.cid < cid {
        return Some(State {
            accepted: None,
            writes: Vec::new(),
            proven: false,
        });
    }
    let proven = collect
        .accepted
        .is_some_and(|(e, d)| signed.proof.vouches(view, cid, e, &d));
    Some(State {
        accepted: collect.accepted,
        writes: collect.writes.clone(),
        proven,
    })
}

/// What the leader must (or may) propose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// This value may have been decided at this epoch: it must be proposed again.
    Bound(Epoch, Digest),
    /// Nothing can have been decided: any valid batch.
    Free,
}

fn quorum_highest(view: &View, states: &[State], ts: Epoch, v: &Digest) -> bool {
    let count = states
        .iter()
        .filter(|s| match s.accepted {
            None => true,
            Some((e, d)) => e < ts || (e == ts && d == *v),
        })
        .count();
    count >= view.quorum()
}

/// f+1 write sets vouch for the value, or one proof of f+1 signed WRITEs does: either way a
/// correct replica wrote it. The proof covers a correct replica that accepted a value whose
/// writers since forgot their WRITEs (sent before their promise, then a crash).
fn certified_value(view: &View, states: &[State], ts: Epoch, v: &Digest) -> bool {
    let count = states
        .iter()
        .filter(|s| s.writes.iter().any(|(e, d)| *e >= ts && d == v))
        .count();
    count >= view.weak()
        || states
            .iter()
            .any(|s| s.proven && s.accepted.is_some_and(|(e, d)| e >= ts && d == *v))
}

/// binds(ts, v, S).
pub fn binds(view: &View, states: &[State], ts: Epoch, v: &Digest) -> bool {
    states.len() >= view.collect_quorum()
        && quorum_highest(view, states, ts, v)
        && certified_value(view, states, ts, v)
}

/// unbound(S): a quorum accepted nothing.
pub fn unbound(view: &View, states: &[State]) -> bool {
    states.len() >= view.collect_quorum()
        && states.iter().filter(|s| s.accepted.is_none()).count() >= view.quorum()
}

/// The leader's choice, or `None` while the collects are not yet sound.
///
/// Among bound candidates the one with the highest epoch wins; if a decided value exists it is
/// the only value that can be bound at the highest accepted epoch among correct replicas.
pub fn choose(view: &View, states: &[State]) -> Option<Choice> {
    if states.len() < view.collect_quorum() {
        return None;
    }
    let mut candidates: Vec<(Epoch, Digest)> = states.iter().filter_map(|s| s.accepted).collect();
    candidates.sort();
    candidates.dedup();
    for (ts, v) in candidates.into_iter().rev() {
        if binds(view, states, ts, &v) {
            return Some(Choice::Bound(ts, v));
        }
    }
    if unbound(view, states) {
        return Some(Choice::Free);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::test_views::keyed_view;
    use crate::crypto::{Domain, KeyPair, PublicKey};
    use crate::view::Member;
    use crate::wire::ids::{Regency, ReplicaId, ViewId};
    use crate::wire::messages::{accept_signing_bytes, Collect, WriteProof};

    fn view(n: usize, f: usize) -> View {
        let members = (0..n)
            .map(|i| Member {
                id: ReplicaId(i as u32),
                address: String::new(),
                key: PublicKey([i as u8; 32]),
            })
            .collect();
        View::new(ViewId(0), f, members).expect("valid view")
    }

    fn d(x: u8) -> Digest {
        Digest([x; 32])
    }

    fn wrote_and_accepted(e: u32, v: u8) -> State {
        State {
            accepted: Some((Regency(e), d(v))),
            writes: vec![(Regency(e), d(v))],
            proven: false,
        }
    }

    fn wrote_only(e: u32, v: u8) -> State {
        State {
            accepted: None,
            writes: vec![(Regency(e), d(v))],
            proven: false,
        }
    }

    fn nothing() -> State {
        State {
            accepted: None,
            writes: vec![],
            proven: false,
        }
    }

    /// PROTOCOL.md section 4: n=4, three replicas wrote v at epoch 0 and one decided (so a
    /// quorum accepted v at epoch 0); the new leader hears from two of those and the fourth.
    /// With "never" and "epoch 0" conflated the collects look unbound and v could be replaced.
    #[test]
    fn leader_change_keeps_value_decided_at_epoch_zero() {
        let v4 = view(4, 1);
        let states = vec![
            wrote_and_accepted(0, 7),
            wrote_and_accepted(0, 7),
            nothing(),
        ];
        assert!(!unbound(&v4, &states));
        assert_eq!(choose(&v4, &states), Some(Choice::Bound(Regency(0), d(7))));
    }

    #[test]
    fn nothing_accepted_by_a_quorum_leaves_the_leader_free() {
        let v4 = view(4, 1);
        let states = vec![wrote_only(0, 7), nothing(), nothing()];
        assert_eq!(choose(&v4, &states), Some(Choice::Free));
    }

    #[test]
    fn a_single_faulty_collect_with_a_higher_epoch_cannot_bind_its_value() {
        let v4 = view(4, 1);
        // Two correct replicas accepted 7 at epoch 0; a faulty one claims 9 at epoch 5.
        let states = vec![
            wrote_and_accepted(0, 7),
            wrote_and_accepted(0, 7),
            wrote_and_accepted(5, 9),
        ];
        assert!(!binds(&v4, &states, Regency(5), &d(9)));
        // Not sound with three: the leader must wait for the fourth collect.
        assert_eq!(choose(&v4, &states), None);
        let mut all = states.clone();
        all.push(wrote_and_accepted(0, 7));
        assert_eq!(choose(&v4, &all), Some(Choice::Bound(Regency(0), d(7))));
    }

    #[test]
    fn too_few_collects_choose_nothing() {
        let v7 = view(7, 2);
        let states = vec![nothing(); 4];
        assert_eq!(choose(&v7, &states), None);
        let states = vec![nothing(); 5];
        assert_eq!(choose(&v7, &states), Some(Choice::Free));
    }

    #[test]
    fn collects_from_replicas_behind_count_as_nothing_and_later_ones_are_refused() {
        let v4 = view(4, 1);
        let c = Collect {
            regency: Regency(1),
            replica: ReplicaId(0),
            cid: Cid(3),
            accepted: Some((Regency(0), d(1))),
            writes: vec![(Regency(0), d(1))],
        };
        let c = SignedCollect::sign(c, &KeyPair::from_seed([0; 32]));
        assert_eq!(project(&v4, &c, Cid(4)), Some(nothing()));
        assert_eq!(project(&v4, &c, Cid(2)), None);
        assert_eq!(project(&v4, &c, Cid(3)), Some(wrote_and_accepted(0, 1)));
    }

    /// r2 accepted v at epoch 3 of instance 9 on WRITEs from r0, r2 and r3; r0 and r3 sent
    /// theirs before their promise and came back from a crash without them, r1 is silent. With
    /// write sets alone, v can be neither kept (one vouches) nor replaced (two accepted nothing):
    /// every leader change stalls (simulator seed 1004370 with such WRITEs). r2's proof of the
    /// signed WRITEs keeps it; a proof with a forged or a repeated signature does not.
    #[test]
    fn a_proof_of_signed_writes_keeps_a_value_whose_writers_forgot_them() {
        let (v4, keys) = keyed_view(4, 1);
        let cid = Cid(9);
        let v = d(7);
        let bytes = accept_signing_bytes(cid, Regency(3), &v);
        let sig = |i: usize| (ReplicaId(i as u32), keys[i].sign(Domain::Write, &bytes));
        let collect = |i: usize, accepted: Option<(Epoch, Digest)>| Collect {
            regency: Regency(4),
            replica: ReplicaId(i as u32),
            cid,
            accepted,
            writes: accepted.into_iter().collect(),
        };
        let with_proof = |proof: Vec<(ReplicaId, crate::crypto::Signature)>| {
            let mut c = SignedCollect::sign(collect(2, Some((Regency(3), v))), &keys[2]);
            c.proof = WriteProof(proof);
            let forgot = |i: usize| SignedCollect::sign(collect(i, None), &keys[i]);
            [forgot(0), c, forgot(3)]
                .iter()
                .map(|c| project(&v4, c, cid).expect("same instance"))
                .collect::<Vec<_>>()
        };
        assert_eq!(choose(&v4, &with_proof(vec![])), None);
        assert_eq!(
            choose(&v4, &with_proof(vec![sig(0), sig(2), sig(3)])),
            Some(Choice::Bound(Regency(3), v))
        );
        assert_eq!(
            choose(&v4, &with_proof(vec![sig(0), sig(2)])),
            Some(Choice::Bound(Regency(3), v))
        );
        let mut forged = sig(0);
        forged.1 .0[0] ^= 1;
        assert_eq!(choose(&v4, &with_proof(vec![forged, sig(2)])), None);
        assert_eq!(choose(&v4, &with_proof(vec![sig(2), sig(2)])), None);
        // A signature over another value or epoch vouches for nothing here.
        let other = accept_signing_bytes(cid, Regency(2), &v);
        let stale = (ReplicaId(0), keys[0].sign(Domain::Write, &other));
        assert_eq!(choose(&v4, &with_proof(vec![stale, sig(2)])), None);
        let accept = (ReplicaId(0), keys[0].sign(Domain::Accept, &bytes));
        assert_eq!(choose(&v4, &with_proof(vec![accept, sig(2)])), None);
    }
}
