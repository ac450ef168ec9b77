//! The store's canonical snapshot and its validation on restore.
//!
//! Layout: format tag, revision, compact revision, consensus time, next lease id, then the kvs in
//! key order, the events in log order and the leases in id order. Derived indexes (lease key sets,
//! the expiry queue) are rebuilt rather than stored, so they cannot disagree with what they index.
//! Restore checks every invariant execution maintains, including that undoing the event log from
//! the current kvs is consistent, so a snapshot that decodes is one the store could have produced.

use std::collections::{BTreeMap, BTreeSet};

use super::encoding::EVENT_MIN_LEN;
use super::store::{KvStore, Lease};
use super::types::*;
use crate::service::RestoreError;
use crate::wire::codec::{Decode, Encode, Reader, Writer};

const FORMAT: u8 = 1;

impl KvStore {
    pub(super) fn encode_snapshot(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(FORMAT)
            .u64(self.revision)
            .u64(self.compact_revision)
            .u64(self.now_ms)
            .i64(self.next_lease_id);
        w.len(self.kvs.len());
        for kv in self.kvs.values() {
            kv.encode(&mut w);
        }
        w.len(self.history.values().map(Vec::len).sum());
        for e in self.history.values().flatten() {
            e.encode(&mut w);
        }
        w.len(self.leases.len());
        for (id, l) in &self.leases {
            w.i64(*id).i64(l.ttl).u64(l.deadline_ms);
        }
        w.finish()
    }

    pub(super) fn decode_snapshot(bytes: &[u8], history_limit: u64) -> Result<Self, RestoreError> {
        let bad = |m: &str| RestoreError(m.to_owned());
        let mut r = Reader::new(bytes);
        let dec = |e: crate::wire::codec::DecodeError| RestoreError(e.to_string());
        if r.u8().map_err(dec)? != FORMAT {
            return Err(bad("unknown snapshot format"));
        }
        let mut s = KvStore::new(history_limit);
        s.revision = r.u64().map_err(dec)?;
        s.compact_revision = r.u64().map_err(dec)?;
        s.now_ms = r.u64().map_err(dec)?;
        s.next_lease_id = r.i64().map_err(dec)?;
        if s.compact_revision > s.revision {
            return Err(bad("compact revision is after the revision"));
        }
        if s.next_lease_id <= 0 {
            return Err(bad("next lease id is not positive"));
        }

        let kvs = r
            .vec("snapshot kvs", u32::MAX as usize, 40, KeyValue::decode)
            .map_err(dec)?;
        let events = r
            .vec(
                "snapshot events",
                u32::MAX as usize,
                EVENT_MIN_LEN,
                Event::decode,
            )
            .map_err(dec)?;
        let leases = r
            .vec("snapshot leases", u32::MAX as usize, 24, |r| {
                Ok((r.i64()?, r.i64()?, r.u64()?))
            })
            .map_err(dec)?;
        r.finish().map_err(dec)?;

        for (id, ttl, deadline_ms) in leases {
            if id <= 0 {
                return Err(bad("lease id is not positive"));
            }
            if ttl <= 0 || ttl > MAX_LEASE_TTL_SECS {
                return Err(bad("lease TTL out of range"));
            }
            if s.leases
                .last_key_value()
                .is_some_and(|(&last, _)| last >= id)
            {
                return Err(bad("leases are not in strictly increasing id order"));
            }
            s.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline_ms,
                    keys: BTreeSet::new(),
                },
            );
            s.lease_deadlines.insert((deadline_ms, id));
        }

        for kv in kvs {
            if kv.key.is_empty() {
                return Err(bad("empty key"));
            }
            if kv.create_revision == 0
                || kv.create_revision > kv.mod_revision
                || kv.mod_revision > s.revision
                || kv.version == 0
            {
                return Err(bad("key revisions or version out of order"));
            }
            if s.kvs
                .last_key_value()
                .is_some_and(|(last, _)| *last >= kv.key)
            {
                return Err(bad("kvs are not in strictly increasing key order"));
            }
            if kv.lease != NO_LEASE {
                match s.leases.get_mut(&kv.lease) {
                    Some(l) => {
                        l.keys.insert(kv.key.clone());
                    }
                    None => return Err(bad("key attached to an unknown lease")),
                }
            }
            s.kvs.insert(kv.key.clone(), kv);
        }

        let mut last_rev = s.compact_revision;
        for e in events {
            let rev = e.revision();
            if rev <= s.compact_revision || rev > s.revision {
                return Err(bad("event outside the retained history"));
            }
            // History covers exactly (compact_revision, revision]: every revision is a write.
            if rev != last_rev && rev != last_rev + 1 {
                return Err(bad("events out of order or with a gap"));
            }
            last_rev = rev;
            check_event_shape(&e).map_err(bad)?;
            s.history.entry(rev).or_default().push(e);
        }
        if last_rev != s.revision {
            return Err(bad("event history does not reach the revision"));
        }
        check_undo(&s).map_err(bad)?;
        Ok(s)
    }
}

fn check_event_shape(e: &Event) -> Result<(), &'static str> {
    let rev = e.revision();
    match e.kind {
        EventKind::Put => {
            let kv = &e.kv;
            if kv.key.is_empty() || kv.version == 0 || kv.create_revision == 0 {
                return Err("malformed put event");
            }
            match &e.prev_kv {
                None if kv.version != 1 || kv.create_revision != rev => {
                    Err("put event creating a key has the wrong version or create revision")
                }
                Some(p)
                    if p.version.checked_add(1) != Some(kv.version)
                        || p.create_revision != kv.create_revision =>
                {
                    Err("put event does not follow its previous record")
                }
                _ => Ok(()),
            }
        }
        EventKind::Delete => {
            let tombstone = KeyValue {
                key: e.kv.key.clone(),
                mod_revision: rev,
                ..Default::default()
            };
            if e.kv != tombstone || e.kv.key.is_empty() {
                return Err("malformed delete event");
            }
            match &e.prev_kv {
                Some(p) if p.key == e.kv.key => Ok(()),
                _ => Err("delete event without the deleted record"),
            }
        }
    }
}

/// Undoes every retained event, newest first, from the current kvs: each event must find exactly
/// the record it claims to have produced. This is what past reads rely on.
fn check_undo(s: &KvStore) -> Result<(), &'static str> {
    let mut overlay: BTreeMap<&[u8], Option<&KeyValue>> = BTreeMap::new();
    for e in s.history.values().flat_map(|v| v.iter()).rev() {
        let key = e.kv.key.as_slice();
        let current = match overlay.get(key) {
            Some(v) => *v,
            None => s.kvs.get(key),
        };
        let consistent = match e.kind {
            EventKind::Put => current == Some(&e.kv),
            EventKind::Delete => current.is_none(),
        };
        if !consistent {
            return Err("event log is inconsistent with the current kvs");
        }
        // A record is replaced at or after the revision that wrote it (at it when a transaction
        // writes the same key twice).
        if let Some(p) = &e.prev_kv {
            if p.key != e.kv.key || p.mod_revision > e.revision() {
                return Err("previous record does not precede its replacement");
            }
        }
        overlay.insert(key, e.prev_kv.as_ref());
    }
    // What remains is the state at the compaction point: nothing in it may be newer.
    let untouched = s
        .kvs
        .values()
        .filter(|kv| !overlay.contains_key(kv.key.as_slice()));
    if untouched
        .chain(overlay.values().flatten().copied())
        .any(|kv| kv.mod_revision > s.compact_revision)
    {
        return Err("a record newer than the compaction point has no event");
    }
    Ok(())
}
