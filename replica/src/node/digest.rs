//! The state digest that `/status` reports. Hashing the state takes time in proportion to its
//! size (0.1 to 2.9 s for a few hundred MB), in the replica loop, where nothing else moves
//! meanwhile; and anyone who reaches the HTTP port may ask for a status. So the digest after the
//! newest decision is computed again only once the time since the last computation is at least
//! [`SPEND`] times what that computation took: at most one part in [`SPEND`] of the loop's time
//! goes to it, however often statuses are asked for. Between computations, the last digest is
//! reported with the instance it belongs to. A small state hashes in microseconds, so its digest
//! is always the newest decision's.

use std::time::{Duration, Instant};

use kmmr_protocol::crypto::Digest;
use kmmr_protocol::wire::ids::Cid;

/// How many times its own duration must pass between two computations of the digest.
pub const SPEND: u32 = 20;

/// The last digest computed, and what it cost.
#[derive(Debug, Default)]
pub struct StatusDigest {
    last: Option<Computed>,
}

#[derive(Debug, Clone, Copy)]
struct Computed {
    /// The digest is of the state after this instance (`None`: before the first decision).
    cid: Option<Cid>,
    digest: Digest,
    at: Instant,
    took: Duration,
}

impl StatusDigest {
    /// The digest to report when `last` is the newest decision, and the instance it is of:
    /// `compute` hashes the state now, and is called only when the budget allows, or when no
    /// digest of any decision is at hand (a state before the first decision is never reported
    /// as the state after one).
    pub fn get(
        &mut self,
        last: Option<Cid>,
        now: Instant,
        compute: impl FnOnce() -> Digest,
    ) -> (Option<Cid>, Digest) {
        if let Some(c) = self.last {
            let fresh = c.cid == last;
            let within_budget = now.saturating_duration_since(c.at) < c.took * SPEND;
            if fresh || (within_budget && c.cid.is_some()) {
                return (c.cid, c.digest);
            }
        }
        let started = Instant::now();
        let digest = compute();
        let took = started.elapsed();
        self.last = Some(Computed {
            cid: last,
            digest,
            at: now + took,
            took,
        });
        (last, digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(b: u8) -> Digest {
        Digest([b; 32])
    }

    fn computed(cid: Option<Cid>, digest: Digest, at: Instant, took: Duration) -> StatusDigest {
        StatusDigest {
            last: Some(Computed {
                cid,
                digest,
                at,
                took,
            }),
        }
    }

    #[test]
    fn a_cheap_digest_is_always_of_the_newest_decision() {
        let mut s = StatusDigest::default();
        let t0 = Instant::now();
        assert_eq!(s.get(Some(Cid(1)), t0, || d(1)), (Some(Cid(1)), d(1)));
        // Computing d(1) took microseconds: 1 ms later the budget allows another.
        let t1 = t0 + Duration::from_millis(1);
        assert_eq!(s.get(Some(Cid(2)), t1, || d(2)), (Some(Cid(2)), d(2)));
    }

    #[test]
    fn an_expensive_digest_is_reused_with_its_instance_until_the_budget_allows_another() {
        let t0 = Instant::now();
        let took = Duration::from_millis(500);
        let mut s = computed(Some(Cid(10)), d(10), t0, took);
        // The same decision: the digest is current, nothing is computed.
        assert_eq!(
            s.get(Some(Cid(10)), t0, || panic!("not due")),
            (Some(Cid(10)), d(10))
        );
        // Newer decisions within SPEND x 500 ms: the old digest, labelled with its instance.
        let soon = t0 + took * (SPEND - 1);
        assert_eq!(
            s.get(Some(Cid(12)), soon, || panic!("not due")),
            (Some(Cid(10)), d(10))
        );
        // Once SPEND times its cost has passed, a new one.
        let later = t0 + took * SPEND;
        assert_eq!(
            s.get(Some(Cid(13)), later, || d(13)),
            (Some(Cid(13)), d(13))
        );
    }

    #[test]
    fn a_digest_from_before_the_first_decision_is_not_reported_after_one() {
        let t0 = Instant::now();
        let mut s = computed(None, d(0), t0, Duration::from_secs(5));
        assert_eq!(s.get(Some(Cid(1)), t0, || d(1)), (Some(Cid(1)), d(1)));
    }
}
