//! The store's canonical snapshot and its validation on restore.
//!
//! Layout: format tag, revision, compact revision, consensus time, next lease id, then the kvs in
//! key order, the changes in log order (kind, key, revision, the replaced record) and the leases
//! in id order. A put's new record is not in the log: it is the next record on its key, so every
//! version of a value is encoded once. Derived indexes (lease key sets, the expiry queue) are
//! rebuilt rather than stored, so they cannot disagree with what they index. Restore checks every
//! invariant execution maintains, including that undoing the log from the current kvs is
//! consistent, so a snapshot that decodes is one the store could have produced.
//!
//! The encoding is produced in pieces (`write_snapshot`), so that it can be hashed or copied
//! into a larger buffer without an intermediate copy of the whole state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::store::{Change, KvStore, Lease, INITIAL_REVISION};
use super::types::*;
use crate::service::RestoreError;
use crate::wire::codec::{Decode, DecodeError, Encode, Reader, Writer};

/// Format 1 stored each put's new record in the log as well, twice the bytes for fresh puts.
const FORMAT: u8 = 2;
/// Encoded records are handed out in pieces of about this size.
const PIECE: usize = 256 * 1024;
/// Smallest encoding of a change: kind, empty key, revision, no previous record.
const CHANGE_MIN_LEN: usize = 1 + 4 + 8 + 1;

impl KvStore {
    pub(super) fn encode_snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_snapshot(&mut |piece| out.extend_from_slice(piece));
        out
    }

    /// Hands the canonical snapshot to `out` in order, in pieces.
    pub(super) fn write_snapshot(&self, out: &mut dyn FnMut(&[u8])) {
        let leases = self
            .leases
            .iter()
            .map(|(id, l)| (*id, l.ttl, l.deadline_ms));
        write_parts(
            &self.snapshot_header(),
            &self.kvs,
            &self.history,
            leases,
            out,
        );
    }

    fn snapshot_header(&self) -> Header {
        Header {
            revision: self.revision,
            compact_revision: self.compact_revision,
            now_ms: self.now_ms,
            next_lease_id: self.next_lease_id,
        }
    }

    /// The state as it is now, for a checkpoint encoded on another thread. Records and history
    /// batches are shared, not copied: the store copies one before it changes it while frozen.
    /// What is copied is the maps' nodes, the keys and the leases (a few milliseconds for the
    /// 30,000 keys of `benches/checkpoint.rs`, against tens for encoding them).
    pub(super) fn freeze(&self) -> Frozen {
        Frozen {
            header: self.snapshot_header(),
            kvs: self.kvs.clone(),
            history: self.history.clone(),
            leases: self
                .leases
                .iter()
                .map(|(id, l)| (*id, l.ttl, l.deadline_ms))
                .collect(),
        }
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
        let changes = r
            .vec(
                "snapshot changes",
                u32::MAX as usize,
                CHANGE_MIN_LEN,
                Change::decode,
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
            s.kvs.insert(kv.key.clone(), Arc::new(kv));
        }

        // History covers every revision from the compaction revision's (or, in a snapshot
        // taken before its writes were kept, the next) to the current one, each a write. The
        // empty store's revision 1 has no write, so before compacting past it history starts
        // at 2.
        let compacted = s.compact_revision > INITIAL_REVISION;
        let oldest = if compacted {
            s.compact_revision
        } else {
            INITIAL_REVISION + 1
        };
        let mut last_rev = None;
        for c in changes {
            let rev = c.revision;
            if rev < oldest || rev > s.revision {
                return Err(bad("event outside the retained history"));
            }
            let in_order = match last_rev {
                None => rev == oldest || rev == s.history_start() + 1,
                Some(last) => rev == last || rev == last + 1,
            };
            if !in_order {
                return Err(bad("events out of order or with a gap"));
            }
            last_rev = Some(rev);
            if c.key.is_empty() {
                return Err(bad("empty key in the history"));
            }
            Arc::make_mut(s.history.entry(rev).or_default()).push(c);
        }
        if last_rev.unwrap_or(s.history_start()) != s.revision {
            return Err(bad("event history does not reach the revision"));
        }
        check_undo(&s).map_err(bad)?;
        Ok(s)
    }
}

/// The scalar part of a snapshot.
#[derive(Debug, Clone, Copy)]
struct Header {
    revision: u64,
    compact_revision: u64,
    now_ms: u64,
    next_lease_id: i64,
}

/// A store frozen at one revision (see [`KvStore::freeze`]); it encodes the bytes the store
/// would have encoded then.
#[derive(Debug)]
pub struct Frozen {
    header: Header,
    kvs: BTreeMap<Vec<u8>, Arc<KeyValue>>,
    history: BTreeMap<u64, Arc<Vec<Change>>>,
    leases: Vec<(i64, i64, u64)>,
}

impl crate::service::FrozenState for Frozen {
    fn write_snapshot(&self, out: &mut dyn FnMut(&[u8])) {
        write_parts(
            &self.header,
            &self.kvs,
            &self.history,
            self.leases.iter().copied(),
            out,
        );
    }
}

/// The canonical encoding, handed to `out` in pieces of about [`PIECE`] bytes.
fn write_parts(
    h: &Header,
    kvs: &BTreeMap<Vec<u8>, Arc<KeyValue>>,
    history: &BTreeMap<u64, Arc<Vec<Change>>>,
    leases: impl ExactSizeIterator<Item = (i64, i64, u64)>,
    out: &mut dyn FnMut(&[u8]),
) {
    let mut w = Writer::with_capacity(PIECE + 4096);
    let mut flush = |w: &mut Writer, force: bool| {
        if force || w.as_slice().len() >= PIECE {
            out(w.as_slice());
            *w = Writer::with_capacity(PIECE + 4096);
        }
    };
    w.u8(FORMAT)
        .u64(h.revision)
        .u64(h.compact_revision)
        .u64(h.now_ms)
        .i64(h.next_lease_id);
    w.len(kvs.len());
    for kv in kvs.values() {
        kv.encode(&mut w);
        flush(&mut w, false);
    }
    w.len(history.values().map(|b| b.len()).sum());
    for c in history.values().flat_map(|b| b.iter()) {
        c.encode(&mut w);
        flush(&mut w, false);
    }
    w.len(leases.len());
    for (id, ttl, deadline_ms) in leases {
        w.i64(id).i64(ttl).u64(deadline_ms);
        flush(&mut w, false);
    }
    flush(&mut w, true);
}

impl Encode for Change {
    fn encode(&self, w: &mut Writer) {
        w.u8(match self.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        })
        .bytes(&self.key)
        .u64(self.revision)
        .option(self.prev.as_ref(), |w, kv| kv.encode(w));
    }
}

impl Decode for Change {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let kind = match r.u8()? {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "change",
                    tag,
                })
            }
        };
        Ok(Change {
            kind,
            key: r.bytes_vec("key", MAX_KEY_LEN)?,
            revision: r.u64()?,
            prev: r.option(|r| KeyValue::decode(r).map(Arc::new))?,
        })
    }
}

/// Whether a put at `rev` that produced `kv` over `prev` is one execution could have made.
fn put_follows(rev: u64, kv: &KeyValue, prev: Option<&KeyValue>) -> bool {
    if kv.mod_revision != rev || kv.version == 0 || kv.create_revision == 0 {
        return false;
    }
    match prev {
        None => kv.version == 1 && kv.create_revision == rev,
        Some(p) => {
            p.version.checked_add(1) == Some(kv.version) && p.create_revision == kv.create_revision
        }
    }
}

/// Undoes every retained change, newest first, from the current kvs: a put must find the record
/// it produced (which is what makes that record its new value), a delete must find the key
/// absent. This is what past reads and watches rely on.
fn check_undo(s: &KvStore) -> Result<(), &'static str> {
    let mut overlay: BTreeMap<&[u8], Option<&KeyValue>> = BTreeMap::new();
    for c in s.history.values().flat_map(|v| v.iter()).rev() {
        let key = c.key.as_slice();
        let current = match overlay.get(key) {
            Some(v) => *v,
            None => s.kvs.get(key).map(|kv| &**kv),
        };
        // The compaction revision's writes lost the records they replaced from before it; the
        // ones a transaction wrote at that revision itself remain.
        let at_compaction =
            c.revision == s.compact_revision && s.compact_revision > INITIAL_REVISION;
        let consistent = match (c.kind, current) {
            (EventKind::Put, Some(kv)) if at_compaction && c.prev.is_none() => {
                kv.mod_revision == c.revision && kv.version > 0 && kv.create_revision > 0
            }
            (EventKind::Put, Some(kv)) => put_follows(c.revision, kv, c.prev.as_deref()),
            (EventKind::Delete, None) => c.prev.is_some() || at_compaction,
            _ => false,
        };
        if !consistent {
            return Err("event log is inconsistent with the current kvs");
        }
        if at_compaction && c.prev.as_ref().is_some_and(|p| p.mod_revision < c.revision) {
            return Err("a record from before the compaction revision is kept");
        }
        // A record is replaced at or after the revision that wrote it (at it when a transaction
        // writes the same key twice).
        if let Some(p) = &c.prev {
            if p.key != c.key || p.mod_revision > c.revision {
                return Err("previous record does not precede its replacement");
            }
        }
        overlay.insert(key, c.prev.as_deref());
    }
    // What remains is the state at the compaction point: nothing in it may be newer.
    let untouched = s
        .kvs
        .values()
        .map(|kv| &**kv)
        .filter(|kv| !overlay.contains_key(kv.key.as_slice()));
    if untouched
        .chain(overlay.values().flatten().copied())
        .any(|kv| kv.mod_revision > s.compact_revision)
    {
        return Err("a record newer than the compaction point has no event");
    }
    Ok(())
}
