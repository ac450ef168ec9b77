//! Recent evidence of misbehaviour by peers, for the signed status.
//!
//! Counts are kept per peer in two buckets of `BUCKET`, so that what is reported covers the
//! last one to two buckets: a replica that misbehaved once is not accused forever, and one that
//! keeps misbehaving is accused for as long as it does.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kmmr_client::status::Accusation;
use kmmr_protocol::core::rejection::Rejection;

const BUCKET: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Accusations {
    start: Option<Instant>,
    current: BTreeMap<u32, (u64, Rejection)>,
    previous: BTreeMap<u32, (u64, Rejection)>,
}

impl Accusations {
    fn rotate(&mut self, now: Instant) {
        let start = *self.start.get_or_insert(now);
        let age = now.saturating_duration_since(start);
        if age >= 2 * BUCKET {
            self.previous.clear();
            self.current.clear();
            self.start = Some(now);
        } else if age >= BUCKET {
            self.previous = std::mem::take(&mut self.current);
            self.start = Some(start + BUCKET);
        }
    }

    pub fn record(&mut self, now: Instant, peer: u32, reason: Rejection) {
        self.rotate(now);
        let e = self.current.entry(peer).or_insert((0, reason));
        e.0 += 1;
        e.1 = reason;
    }

    pub fn recent(&mut self, now: Instant) -> Vec<Accusation> {
        self.rotate(now);
        let mut out: BTreeMap<u32, Accusation> = BTreeMap::new();
        for (peer, (count, reason)) in self.previous.iter().chain(self.current.iter()) {
            let a = out.entry(*peer).or_insert_with(|| Accusation {
                replica: *peer,
                count: 0,
                reason: String::new(),
            });
            a.count += count;
            // `current` comes last: its reason is the latest.
            a.reason = reason.label().to_string();
        }
        out.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_is_reported_while_recent_then_forgotten() {
        let t0 = Instant::now();
        let mut a = Accusations::default();
        a.record(t0, 2, Rejection::ForgedAccept);
        a.record(t0 + Duration::from_secs(1), 2, Rejection::EquivocatingWrite);
        a.record(t0 + Duration::from_secs(2), 3, Rejection::ForgedAccept);
        let r = a.recent(t0 + Duration::from_secs(3));
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].replica, r[0].count), (2, 2));
        assert_eq!(r[0].reason, "equivocating_write");
        // Still there one bucket on, with a new one added.
        a.record(
            t0 + BUCKET + Duration::from_secs(1),
            2,
            Rejection::ForgedAccept,
        );
        let r = a.recent(t0 + BUCKET + Duration::from_secs(2));
        assert_eq!((r[0].replica, r[0].count), (2, 3));
        // Two quiet buckets later, nothing.
        assert!(a.recent(t0 + 4 * BUCKET).is_empty());
    }
}
