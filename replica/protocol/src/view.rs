//! Views (membership) and quorum arithmetic, implemented once.
//!
//! With n replicas of which at most f are faulty (n >= 3f+1), the decision quorum is
//! Q = floor((n+f)/2) + 1: any two quorums intersect in at least f+1 replicas, so in at least
//! one correct replica. A replica joins a leader change after f+1 STOPs (at least one correct
//! replica suspects the leader) and installs it after 2f+1 (a correct majority of the rest).

use crate::crypto::{parse_key, ParsedKey, PublicKey};
use crate::wire::codec::{Decode, DecodeError, Encode, Reader, Writer};
use crate::wire::ids::{Regency, ReplicaId, ViewId};
use crate::wire::limits;

/// One replica as listed in the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: ReplicaId,
    /// `host:port` of its replica listener.
    pub address: String,
    pub key: PublicKey,
}

impl Encode for Member {
    fn encode(&self, w: &mut Writer) {
        self.id.encode(w);
        w.bytes(self.address.as_bytes());
        self.key.encode(w);
    }
}

impl Decode for Member {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let id = ReplicaId::decode(r)?;
        let address = std::str::from_utf8(r.bytes("address", limits::MAX_ADDRESS)?)
            .map_err(|_| DecodeError::Invalid("address is not UTF-8"))?
            .to_owned();
        let key = PublicKey::decode(r)?;
        Ok(Member { id, address, key })
    }
}

/// Why a view is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("a view needs n >= 3f+1 replicas: n={n}, f={f}")]
    TooFewReplicas { n: usize, f: usize },
    #[error("replica id {0} appears twice in the view")]
    DuplicateId(ReplicaId),
    #[error("the view has {0} replicas, more than the limit {max}", max = limits::MAX_REPLICAS)]
    TooManyReplicas(usize),
}

/// The membership: an ordered list of replicas and the number of faults tolerated.
#[derive(Debug, Clone)]
pub struct View {
    pub id: ViewId,
    pub f: usize,
    pub members: Vec<Member>,
    /// The admin principal whose signature reconfiguration requests need (BFT-SMaRt's trusted
    /// third party); `None` = this view cannot be reconfigured.
    pub admin: Option<PublicKey>,
    /// Members' keys parsed once, in member order (`None` for a key that is not a valid point,
    /// whose signatures then never verify).
    parsed: Vec<Option<ParsedKey>>,
}

impl PartialEq for View {
    fn eq(&self, o: &Self) -> bool {
        (self.id, self.f, &self.members, &self.admin) == (o.id, o.f, &o.members, &o.admin)
    }
}

impl Eq for View {}

/// The largest f that n replicas tolerate in BFT mode.
pub fn default_f(n: usize) -> usize {
    n.saturating_sub(1) / 3
}

impl View {
    pub fn new(id: ViewId, f: usize, members: Vec<Member>) -> Result<Self, ViewError> {
        let parsed = members.iter().map(|m| parse_key(&m.key)).collect();
        let v = View {
            id,
            f,
            members,
            admin: None,
            parsed,
        };
        v.validate()?;
        Ok(v)
    }

    /// A view that skips validation, for tests that must encode an invalid one to check that
    /// decoding refuses it. Never use it on a path that runs the protocol.
    pub fn new_unvalidated(id: ViewId, f: usize, members: Vec<Member>) -> Self {
        let parsed = members.iter().map(|m| parse_key(&m.key)).collect();
        View {
            id,
            f,
            members,
            admin: None,
            parsed,
        }
    }

    /// The same view with `admin` as the key that may reconfigure it.
    pub fn with_admin(mut self, admin: Option<PublicKey>) -> Self {
        self.admin = admin;
        self
    }

    /// A member's parsed key.
    pub fn verifying_key(&self, id: ReplicaId) -> Option<&ParsedKey> {
        self.position(id).and_then(|i| self.parsed.get(i)?.as_ref())
    }

    pub fn validate(&self) -> Result<(), ViewError> {
        let n = self.members.len();
        if n > limits::MAX_REPLICAS {
            return Err(ViewError::TooManyReplicas(n));
        }
        if n < 3 * self.f + 1 || n == 0 {
            return Err(ViewError::TooFewReplicas { n, f: self.f });
        }
        let mut ids: Vec<ReplicaId> = self.members.iter().map(|m| m.id).collect();
        ids.sort();
        for w in ids.windows(2) {
            if w[0] == w[1] {
                return Err(ViewError::DuplicateId(w[0]));
            }
        }
        Ok(())
    }

    pub fn n(&self) -> usize {
        self.members.len()
    }

    /// Q = floor((n+f)/2) + 1: WRITE and ACCEPT quorums, proofs, state-transfer agreement.
    pub fn quorum(&self) -> usize {
        quorum(self.n(), self.f)
    }

    /// f+1: at least one correct replica.
    pub fn weak(&self) -> usize {
        self.f + 1
    }

    /// 2f+1: STOPs needed to install a new regency.
    pub fn strong(&self) -> usize {
        2 * self.f + 1
    }

    /// Collects the new leader needs before choosing a value: n - f.
    pub fn collect_quorum(&self) -> usize {
        self.n() - self.f
    }

    pub fn contains(&self, id: ReplicaId) -> bool {
        self.position(id).is_some()
    }

    pub fn position(&self, id: ReplicaId) -> Option<usize> {
        self.members.iter().position(|m| m.id == id)
    }

    pub fn key(&self, id: ReplicaId) -> Option<&PublicKey> {
        self.members.iter().find(|m| m.id == id).map(|m| &m.key)
    }

    pub fn leader(&self, regency: Regency) -> ReplicaId {
        // n >= 1 is guaranteed by validate().
        self.members[regency.0 as usize % self.n()].id
    }

    pub fn ids(&self) -> impl Iterator<Item = ReplicaId> + '_ {
        self.members.iter().map(|m| m.id)
    }
}

/// Q = floor((n+f)/2) + 1.
pub fn quorum(n: usize, f: usize) -> usize {
    (n + f) / 2 + 1
}

impl Encode for View {
    fn encode(&self, w: &mut Writer) {
        self.id.encode(w);
        w.u32(self.f as u32);
        w.len(self.members.len());
        for m in &self.members {
            m.encode(w);
        }
        w.option(self.admin.as_ref(), |w, k| k.encode(w));
    }
}

impl Decode for View {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let id = ViewId::decode(r)?;
        let f = r.u32()? as usize;
        let members = r.vec("members", limits::MAX_REPLICAS, 40, Member::decode)?;
        let admin = r.option(PublicKey::decode)?;
        View::new(id, f, members)
            .map(|v| v.with_admin(admin))
            .map_err(|_| DecodeError::Invalid("view violates n >= 3f+1 or has duplicate ids"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view(n: usize, f: usize) -> View {
        let members = (0..n)
            .map(|i| Member {
                id: ReplicaId(i as u32),
                address: format!("127.0.0.1:{}", 7000 + i),
                key: PublicKey([i as u8; 32]),
            })
            .collect();
        View::new(ViewId(0), f, members).expect("valid view")
    }

    #[test]
    fn quorum_matches_the_paper_for_every_n_from_4_to_16() {
        let expected = [
            (4, 1, 3),
            (5, 1, 4),
            (6, 1, 4),
            (7, 2, 5),
            (8, 2, 6),
            (9, 2, 6),
            (10, 3, 7),
            (11, 3, 8),
            (12, 3, 8),
            (13, 4, 9),
            (14, 4, 10),
            (15, 4, 10),
            (16, 5, 11),
        ];
        for (n, f, q) in expected {
            assert_eq!(default_f(n), f, "f for n={n}");
            let v = view(n, f);
            assert_eq!(v.quorum(), q, "Q for n={n}");
            assert_eq!(
                v.quorum(),
                (n + f + 1).div_ceil(2),
                "Q = ceil((n+f+1)/2) for n={n}"
            );
            assert_eq!(v.weak(), f + 1);
            assert_eq!(v.strong(), 2 * f + 1);
        }
    }

    #[test]
    fn any_two_quorums_share_a_correct_replica_for_every_n_from_4_to_16() {
        for n in 4..=16 {
            for f in 0..=default_f(n) {
                let q = quorum(n, f);
                // Two quorums of size q overlap in 2q - n replicas; f of them may be faulty.
                assert!(2 * q > n + f, "n={n} f={f} q={q}");
                // A quorum is always reachable with f replicas silent.
                assert!(q <= n - f, "n={n} f={f} q={q}");
                // n - f collects hold a quorum of correct-or-faulty replicas.
                assert!(n - f >= q);
            }
        }
    }

    #[test]
    fn views_below_3f_plus_1_are_rejected() {
        let members = view(6, 1).members;
        assert_eq!(
            View::new(ViewId(0), 2, members),
            Err(ViewError::TooFewReplicas { n: 6, f: 2 })
        );
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let mut members = view(4, 1).members;
        members[3].id = ReplicaId(0);
        assert_eq!(
            View::new(ViewId(0), 1, members),
            Err(ViewError::DuplicateId(ReplicaId(0)))
        );
    }

    #[test]
    fn leader_rotates_in_view_order() {
        let v = view(4, 1);
        let leaders: Vec<u32> = (0..6).map(|r| v.leader(Regency(r)).0).collect();
        assert_eq!(leaders, vec![0, 1, 2, 3, 0, 1]);
    }

    proptest! {
        #[test]
        fn view_codec_round_trips(n in 4usize..=16) {
            let v = view(n, default_f(n));
            prop_assert_eq!(View::from_bytes(&v.to_bytes()).expect("decodes"), v);
        }
    }
}
