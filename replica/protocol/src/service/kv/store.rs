//! The store's state and the semantics of every request.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;

use super::types::*;
use crate::service::ExecContext;

/// `[key, range_end)` with etcd's conventions, resolved once so every consumer (reads, deletes,
/// compares, watches) agrees on what a range covers.
#[derive(Debug, Clone, Copy)]
pub(super) struct KeyRange<'a> {
    start: &'a [u8],
    end: End<'a>,
}

#[derive(Debug, Clone, Copy)]
enum End<'a> {
    /// Empty `range_end`: the start key alone.
    Single,
    /// `range_end == [0]`: every key from the start on.
    Unbounded,
    Before(&'a [u8]),
}

impl<'a> KeyRange<'a> {
    pub(super) fn new(key: &'a [u8], range_end: &'a [u8]) -> Self {
        let end = match range_end {
            [] => End::Single,
            [0] => End::Unbounded,
            e => End::Before(e),
        };
        KeyRange { start: key, end }
    }

    pub(super) fn contains(&self, k: &[u8]) -> bool {
        match self.end {
            End::Single => k == self.start,
            End::Unbounded => k >= self.start,
            End::Before(e) => k >= self.start && k < e,
        }
    }

    /// Bounds for `BTreeMap::range`, which panics on inverted bounds: an end at or before the
    /// start becomes the empty range `[start, start)`.
    fn bounds(&self) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
        let lo = Bound::Included(self.start);
        match self.end {
            End::Single => (lo, Bound::Included(self.start)),
            End::Unbounded => (lo, Bound::Unbounded),
            End::Before(e) if e > self.start => (lo, Bound::Excluded(e)),
            End::Before(_) => (lo, Bound::Excluded(self.start)),
        }
    }

    pub(super) fn iter<'m, V>(
        &self,
        map: &'m BTreeMap<Vec<u8>, V>,
    ) -> impl DoubleEndedIterator<Item = (&'m Vec<u8>, &'m V)> + use<'m, 'a, V> {
        map.range::<[u8], _>(self.bounds())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Lease {
    pub(super) ttl: i64,
    pub(super) deadline_ms: u64,
    /// Derived from the kvs' `lease` fields; not part of the snapshot.
    pub(super) keys: BTreeSet<Vec<u8>>,
}

/// One write in the history, as it is kept. A put's new record is not stored with it: it is the
/// record that replaced it on the same key (the next change's `prev`) or, after the last write,
/// the current record in `kvs`. So every version of a value is held, and snapshotted, once: with
/// the new record stored too, a store that is mostly fresh puts held (and transferred) its
/// values twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Change {
    pub(super) kind: EventKind,
    pub(super) key: Vec<u8>,
    pub(super) revision: u64,
    /// The record the write replaced (always present for a delete).
    pub(super) prev: Option<Arc<KeyValue>>,
}

/// The revisioned key-value store that backs Kubernetes control-plane state.
///
/// State is the current kvs plus a log of every write since the compaction point, each carrying
/// the record it replaced. Reads at a past revision start from the current kvs and undo the newer
/// changes, so history is stored once (in the log) and serves both watches and past reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvStore {
    /// Revisions of history retained; configuration, not state (see [`KvStore::new`]).
    pub(super) history_limit: u64,
    pub(super) revision: u64,
    pub(super) compact_revision: u64,
    /// Records and history batches are shared (`Arc`) so that a checkpoint can freeze the state
    /// in a few milliseconds and encode it on another thread; a write that meets a frozen
    /// record or batch copies it (`Arc::make_mut`) instead of changing what was frozen.
    pub(super) kvs: BTreeMap<Vec<u8>, Arc<KeyValue>>,
    /// Changes by revision, covering exactly the revisions `[compact_revision, revision]` once
    /// compacted past the empty store's revision 1 (`(compact_revision, revision]` in a store
    /// restored from a snapshot taken before the compaction revision's writes were kept), and
    /// `[2, revision]` before.
    pub(super) history: BTreeMap<u64, Arc<Vec<Change>>>,
    pub(super) leases: BTreeMap<i64, Lease>,
    /// `(deadline_ms, id)` of every lease: expiry order. Derived, not snapshotted.
    pub(super) lease_deadlines: BTreeSet<(u64, i64)>,
    pub(super) next_lease_id: i64,
    /// Latest consensus timestamp executed at.
    pub(super) now_ms: u64,
}

/// A write transaction in progress: every write in it shares one revision, and the store's
/// revision moves only if something was written.
struct WriteTxn {
    rev: u64,
    wrote: bool,
}

/// A validated transaction op: applying it can no longer fail, which is what makes a transaction
/// atomic without an undo path.
enum Prepared<'r> {
    Range(&'r RangeRequest, ReadAt),
    Put(&'r PutRequest),
    Delete(&'r DeleteRangeRequest),
}

#[derive(Debug, Clone, Copy)]
enum ReadAt {
    Latest,
    Revision(u64),
}

/// What is left of one reply's [`REPLY_BUDGET`]. The first record is always admitted, so that a
/// reader continuing after it always moves on; once one is refused, so is every later one, so
/// that what a reply carries is always a prefix of what it would carry unbounded.
struct Budget {
    left: usize,
    admitted: bool,
    spent: bool,
}

impl Budget {
    fn new() -> Self {
        Budget {
            left: REPLY_BUDGET,
            admitted: false,
            spent: false,
        }
    }

    fn admit(&mut self, bytes: usize) -> bool {
        if self.spent || (self.admitted && bytes > self.left) {
            self.spent = true;
            return false;
        }
        self.left = self.left.saturating_sub(bytes);
        self.admitted = true;
        true
    }
}

/// What a record costs a reply: its bytes and a bound on its encoding's overhead.
fn record_bytes(kv: &KeyValue) -> usize {
    kv.key.len() + kv.value.len() + 64
}

/// A batch of watch events and the revision through which it is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    pub events: Vec<Event>,
    pub resume_after: u64,
}

/// History retained by [`KvStore::default`]: enough for watchers that fall a few thousand writes
/// behind to resume; Kubernetes' API server also compacts on its own schedule.
pub const DEFAULT_HISTORY_LIMIT: u64 = 10_000;

/// The revision of an empty store, as in etcd. No write has it, so a store compacted no further
/// has lost no event.
pub const INITIAL_REVISION: u64 = 1;
/// The compact revision of a store never compacted. etcd starts at -1, so that compacting at
/// the empty store's revision 1 succeeds once (and is then refused as already compacted), as
/// etcdctl and the apiserver's compactor see it; 0 is below every revision as well.
pub const NEVER_COMPACTED: u64 = 0;

impl Default for KvStore {
    fn default() -> Self {
        KvStore::new(DEFAULT_HISTORY_LIMIT)
    }
}

impl KvStore {
    /// An empty store at revision 1 (etcd's: its clients and kube-apiserver take revision 1 as
    /// the empty store's, and the first write is revision 2) that keeps at most `history_limit`
    /// revisions of history for past reads and watches; older history is compacted as writes
    /// happen. Every replica must use the same limit, since retention compaction is part of
    /// execution.
    pub fn new(history_limit: u64) -> Self {
        KvStore {
            history_limit,
            revision: INITIAL_REVISION,
            compact_revision: NEVER_COMPACTED,
            kvs: BTreeMap::new(),
            history: BTreeMap::new(),
            leases: BTreeMap::new(),
            lease_deadlines: BTreeSet::new(),
            next_lease_id: 1,
            now_ms: 0,
        }
    }

    /// The revision of the last write ([`INITIAL_REVISION`] before any).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Reads and watches before this revision fail with [`KvError::Compacted`];
    /// [`NEVER_COMPACTED`] until the first compaction.
    pub fn compact_revision(&self) -> u64 {
        self.compact_revision
    }

    /// The revision retention counts from: the compact revision (whose writes are kept without
    /// the records they replaced), or the empty store's revision, which no write has.
    pub(super) fn history_start(&self) -> u64 {
        self.compact_revision.max(INITIAL_REVISION)
    }

    pub fn history_limit(&self) -> u64 {
        self.history_limit
    }

    /// The current record of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&KeyValue> {
        self.kvs.get(key).map(|kv| &**kv)
    }

    fn header(&self) -> ResponseHeader {
        ResponseHeader {
            revision: self.revision,
        }
    }

    fn error(&self, error: KvError) -> KvResponse {
        KvResponse::Error(ErrorResponse {
            header: self.header(),
            error,
        })
    }

    /// Executes one ordered request: first expires every lease whose deadline is at or before
    /// `ctx.timestamp_ms`, then applies the request. Read-only requests are answered here too,
    /// which is what makes them linearizable reads.
    pub fn apply(&mut self, ctx: &ExecContext, req: &KvRequest) -> KvResponse {
        self.advance_time(ctx.timestamp_ms);
        let result = match req {
            KvRequest::Range(r) => self.range(r).map(KvResponse::Range),
            KvRequest::Put(r) => self.put(r).map(KvResponse::Put),
            KvRequest::DeleteRange(r) => self.delete_range(r).map(KvResponse::DeleteRange),
            KvRequest::Txn(t) => self.txn(t).map(KvResponse::Txn),
            KvRequest::Compact(c) => self.compact(c.revision).map(|()| {
                KvResponse::Compact(CompactResponse {
                    header: self.header(),
                })
            }),
            KvRequest::LeaseGrant(g) => self.lease_grant(g).map(KvResponse::LeaseGrant),
            KvRequest::LeaseRevoke(r) => self.lease_revoke(r.id).map(KvResponse::LeaseRevoke),
            KvRequest::LeaseKeepAlive(k) => {
                self.lease_keep_alive(k.id).map(KvResponse::LeaseKeepAlive)
            }
            KvRequest::LeaseTimeToLive(t) => self.lease_ttl(t).map(KvResponse::LeaseTimeToLive),
            KvRequest::WatchPoll(w) => self.watch_poll(w).map(KvResponse::WatchPoll),
            KvRequest::LeaseLeases => Ok(KvResponse::LeaseLeases(self.lease_leases())),
        };
        result.unwrap_or_else(|e| self.error(e))
    }

    /// Answers a read-only request without changing anything; writes are refused with
    /// [`KvError::NotReadOnly`].
    pub fn read(&self, req: &KvRequest) -> KvResponse {
        let result = match req {
            KvRequest::Range(r) => self.range(r).map(KvResponse::Range),
            KvRequest::Txn(t) if req.is_read_only() => self.read_txn(t).map(KvResponse::Txn),
            KvRequest::LeaseTimeToLive(t) => self.lease_ttl(t).map(KvResponse::LeaseTimeToLive),
            KvRequest::WatchPoll(w) => self.watch_poll(w).map(KvResponse::WatchPoll),
            KvRequest::LeaseLeases => Ok(KvResponse::LeaseLeases(self.lease_leases())),
            _ => Err(KvError::NotReadOnly),
        };
        result.unwrap_or_else(|e| self.error(e))
    }

    /// Records the consensus time and expires the leases it has passed, in `(deadline, id)`
    /// order, each as its own revocation (as etcd's lessor does).
    pub(super) fn advance_time(&mut self, timestamp_ms: u64) {
        // Timestamps are non-decreasing by contract; a regression must not move leases' clock
        // backwards, so it is ignored.
        self.now_ms = self.now_ms.max(timestamp_ms);
        while let Some(&(deadline, id)) = self.lease_deadlines.first() {
            if deadline > self.now_ms {
                break;
            }
            self.revoke(id);
        }
    }

    fn begin(&self) -> WriteTxn {
        WriteTxn {
            rev: self.revision.saturating_add(1),
            wrote: false,
        }
    }

    fn commit(&mut self, w: WriteTxn) {
        if !w.wrote {
            return;
        }
        self.revision = w.rev;
        if self.revision - self.history_start() > self.history_limit {
            self.compact_to(self.revision - self.history_limit);
        }
    }

    fn check_lease(&self, lease: i64) -> Result<(), KvError> {
        if lease != NO_LEASE && !self.leases.contains_key(&lease) {
            return Err(KvError::LeaseNotFound { id: lease });
        }
        Ok(())
    }

    fn read_at(&self, revision: u64) -> Result<ReadAt, KvError> {
        if revision == 0 {
            return Ok(ReadAt::Latest);
        }
        if revision > self.revision {
            return Err(KvError::FutureRevision {
                requested: revision,
                current: self.revision,
            });
        }
        if revision < self.compact_revision {
            return Err(KvError::Compacted {
                compact_revision: self.compact_revision,
            });
        }
        Ok(ReadAt::Revision(revision))
    }

    fn prepare<'r>(&self, op: &'r RequestOp) -> Result<Prepared<'r>, KvError> {
        match op {
            RequestOp::Range(r) => {
                non_empty(&r.key)?;
                Ok(Prepared::Range(r, self.read_at(r.revision)?))
            }
            RequestOp::Put(p) => {
                non_empty(&p.key)?;
                self.check_lease(p.lease)?;
                Ok(Prepared::Put(p))
            }
            RequestOp::DeleteRange(d) => {
                non_empty(&d.key)?;
                Ok(Prepared::Delete(d))
            }
        }
    }

    /// A range read. Its records are bounded by [`REPLY_BUDGET`]: a range that matched more
    /// answers `more` with fewer than its `limit` records (or with a limit of 0), and the rest
    /// is read from after its last key at its revision.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, KvError> {
        non_empty(&req.key)?;
        let at = self.read_at(req.revision)?;
        Ok(self.read_range(req, at, &mut Budget::new()))
    }

    fn read_range(&self, req: &RangeRequest, at: ReadAt, budget: &mut Budget) -> RangeResponse {
        let range = KeyRange::new(&req.key, &req.range_end);
        let past = match at {
            ReadAt::Revision(rev) => {
                let mut newer = self
                    .history
                    .range((Bound::Excluded(rev), Bound::Unbounded))
                    .peekable();
                // Nothing was written after `rev`: the current kvs are the state at `rev`.
                newer.peek().is_some().then(|| {
                    let mut view: BTreeMap<Vec<u8>, Arc<KeyValue>> = range
                        .iter(&self.kvs)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    let undo = newer.collect::<Vec<_>>();
                    for (_, changes) in undo.into_iter().rev() {
                        for c in changes.iter().rev().filter(|c| range.contains(&c.key)) {
                            match &c.prev {
                                Some(prev) => view.insert(prev.key.clone(), prev.clone()),
                                None => view.remove(&c.key),
                            };
                        }
                    }
                    view
                })
            }
            ReadAt::Latest => None,
        };
        let limit = match req.limit {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let mut resp = RangeResponse {
            header: self.header(),
            ..Default::default()
        };
        let mut take = |kv: &KeyValue| {
            resp.count += 1;
            if req.count_only {
                return;
            }
            if resp.more {
                return;
            }
            let bytes = if req.keys_only {
                record_bytes(kv) - kv.value.len()
            } else {
                record_bytes(kv)
            };
            if resp.kvs.len() >= limit || !budget.admit(bytes) {
                resp.more = true;
                return;
            }
            let mut kv = kv.clone();
            if req.keys_only {
                kv.value.clear();
            }
            resp.kvs.push(kv);
        };
        match &past {
            Some(view) => view.values().for_each(|kv| take(kv)),
            None => range.iter(&self.kvs).for_each(|(_, kv)| take(kv)),
        }
        resp
    }

    pub fn put(&mut self, req: &PutRequest) -> Result<PutResponse, KvError> {
        non_empty(&req.key)?;
        self.check_lease(req.lease)?;
        let mut w = self.begin();
        let mut resp = self.put_in(&mut w, req, &mut Budget::new());
        self.commit(w);
        resp.header = self.header();
        Ok(resp)
    }

    /// A put; the previous record is answered if asked for and the reply's budget admits it.
    fn put_in(&mut self, w: &mut WriteTxn, req: &PutRequest, budget: &mut Budget) -> PutResponse {
        let prev = self.kvs.get(&req.key);
        let kv = KeyValue {
            key: req.key.clone(),
            create_revision: prev.map_or(w.rev, |p| p.create_revision),
            mod_revision: w.rev,
            version: prev.map_or(1, |p| p.version.saturating_add(1)),
            value: req.value.clone(),
            lease: req.lease,
        };
        // The replaced record moves into the history rather than being copied there.
        let prev = self.kvs.insert(req.key.clone(), Arc::new(kv));
        if let Some(p) = &prev {
            self.detach(p.lease, &p.key);
        }
        if let Some(l) = self.leases.get_mut(&req.lease) {
            l.keys.insert(req.key.clone());
        }
        let prev_kv = match &prev {
            Some(p) if req.prev_kv && budget.admit(record_bytes(p)) => Some(KeyValue::clone(p)),
            _ => None,
        };
        Arc::make_mut(self.history.entry(w.rev).or_default()).push(Change {
            kind: EventKind::Put,
            key: req.key.clone(),
            revision: w.rev,
            prev,
        });
        w.wrote = true;
        PutResponse {
            header: ResponseHeader::default(),
            prev_kv,
        }
    }

    fn detach(&mut self, lease: i64, key: &[u8]) {
        if let Some(l) = self.leases.get_mut(&lease) {
            l.keys.remove(key);
        }
    }

    pub fn delete_range(
        &mut self,
        req: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, KvError> {
        non_empty(&req.key)?;
        let mut w = self.begin();
        let mut resp = self.delete_in(&mut w, req, &mut Budget::new());
        self.commit(w);
        resp.header = self.header();
        Ok(resp)
    }

    /// A range delete; the previous records are answered if asked for, as many as the reply's
    /// budget admits (every key is deleted, and counted, regardless).
    fn delete_in(
        &mut self,
        w: &mut WriteTxn,
        req: &DeleteRangeRequest,
        budget: &mut Budget,
    ) -> DeleteRangeResponse {
        let keys: Vec<Vec<u8>> = KeyRange::new(&req.key, &req.range_end)
            .iter(&self.kvs)
            .map(|(k, _)| k.clone())
            .collect();
        let mut resp = DeleteRangeResponse::default();
        for key in keys {
            if let Some(prev) = self.delete_key(w, &key) {
                resp.deleted += 1;
                if req.prev_kv && budget.admit(record_bytes(prev)) {
                    resp.prev_kvs.push(prev.clone());
                }
            }
        }
        resp
    }

    /// Deletes `key` at the transaction's revision; returns the deleted record, now kept in the
    /// history.
    fn delete_key(&mut self, w: &mut WriteTxn, key: &[u8]) -> Option<&KeyValue> {
        let prev = self.kvs.remove(key)?;
        self.detach(prev.lease, key);
        w.wrote = true;
        let changes = Arc::make_mut(self.history.entry(w.rev).or_default());
        changes.push(Change {
            kind: EventKind::Delete,
            key: key.to_vec(),
            revision: w.rev,
            prev: Some(prev),
        });
        changes.last().and_then(|c| c.prev.as_deref())
    }

    fn compare_holds(&self, c: &Compare) -> bool {
        let range = KeyRange::new(&c.key, &c.range_end);
        let mut matched = range.iter(&self.kvs).peekable();
        if matched.peek().is_none() {
            return match &c.target {
                CompareTarget::Value(_) => false,
                _ => compare_kv(c, &KeyValue::default()),
            };
        }
        matched.all(|(_, kv)| compare_kv(c, kv))
    }

    pub fn txn(&mut self, t: &TxnRequest) -> Result<TxnResponse, KvError> {
        let succeeded = t.compare.iter().all(|c| self.compare_holds(c));
        let branch = if succeeded { &t.success } else { &t.failure };
        let ops = branch
            .iter()
            .map(|op| self.prepare(op))
            .collect::<Result<Vec<_>, _>>()?;
        let mut w = self.begin();
        let mut responses = Vec::with_capacity(ops.len());
        // One budget for the whole reply, which carries every op's records.
        let budget = &mut Budget::new();
        for op in ops {
            responses.push(match op {
                Prepared::Range(r, at) => ResponseOp::Range(self.read_range(r, at, budget)),
                Prepared::Put(p) => ResponseOp::Put(self.put_in(&mut w, p, budget)),
                Prepared::Delete(d) => ResponseOp::DeleteRange(self.delete_in(&mut w, d, budget)),
            });
        }
        self.commit(w);
        Ok(self.finish_txn(succeeded, responses))
    }

    fn read_txn(&self, t: &TxnRequest) -> Result<TxnResponse, KvError> {
        let succeeded = t.compare.iter().all(|c| self.compare_holds(c));
        let branch = if succeeded { &t.success } else { &t.failure };
        let mut responses = Vec::with_capacity(branch.len());
        let budget = &mut Budget::new();
        for op in branch {
            match self.prepare(op)? {
                Prepared::Range(r, at) => {
                    responses.push(ResponseOp::Range(self.read_range(r, at, budget)))
                }
                Prepared::Put(_) | Prepared::Delete(_) => return Err(KvError::NotReadOnly),
            }
        }
        Ok(self.finish_txn(succeeded, responses))
    }

    /// Every nested reply carries the transaction's final revision, as etcd's do.
    fn finish_txn(&self, succeeded: bool, mut responses: Vec<ResponseOp>) -> TxnResponse {
        let header = self.header();
        for r in &mut responses {
            *r.header_mut() = header;
        }
        TxnResponse {
            header,
            succeeded,
            responses,
        }
    }

    /// Drops history before `revision`. Reads at `revision` and watches from it stay possible.
    pub fn compact(&mut self, revision: u64) -> Result<(), KvError> {
        if revision <= self.compact_revision {
            return Err(KvError::Compacted {
                compact_revision: self.compact_revision,
            });
        }
        if revision > self.revision {
            return Err(KvError::FutureRevision {
                requested: revision,
                current: self.revision,
            });
        }
        self.compact_to(revision);
        Ok(())
    }

    fn compact_to(&mut self, revision: u64) {
        // etcd keeps the writes of the compaction revision itself, deletions included (etcd
        // PR 18274), so a watch may start there and miss nothing; the records they replaced
        // are gone, as etcd's are, so their events carry no previous record.
        self.history = self.history.split_off(&revision);
        if let Some(batch) = self.history.get_mut(&revision) {
            for c in Arc::make_mut(batch) {
                if c.prev.as_ref().is_some_and(|p| p.mod_revision < revision) {
                    c.prev = None;
                }
            }
        }
        self.compact_revision = revision;
    }

    /// The oldest revision a watch can start at once history was compacted: the compaction
    /// revision, whose writes are kept, or the one after it for a store restored from a
    /// snapshot taken before they were.
    fn oldest_watchable(&self) -> u64 {
        if self.history.contains_key(&self.compact_revision) {
            self.compact_revision
        } else {
            self.compact_revision.saturating_add(1)
        }
    }

    /// Every event after `after_revision` on `[key, range_end)`, in revision order, with no gaps.
    /// With a nonzero `limit`, stops at a revision boundary once about `limit` events are
    /// collected, and in any case once the events' records (with their previous ones) fill
    /// [`REPLY_BUDGET`]; the first revision with events is always whole. `resume_after` says
    /// where to continue.
    pub fn events_since(
        &self,
        after_revision: u64,
        key: &[u8],
        range_end: &[u8],
        limit: usize,
    ) -> Result<WatchBatch, KvError> {
        // Nothing was ever written at or before the empty store's revision, so a store compacted
        // no further than that has lost no event.
        if self.compact_revision > INITIAL_REVISION
            && after_revision.saturating_add(1) < self.oldest_watchable()
        {
            return Err(KvError::Compacted {
                compact_revision: self.compact_revision,
            });
        }
        let range = KeyRange::new(key, range_end);
        let newer = (Bound::Excluded(after_revision), Bound::Unbounded);
        // Newest first: a put's new record is the one that followed it on its key, so walk back
        // from the current kvs, undoing changes, to find it. Records are borrowed, not copied,
        // until the cut is known.
        let mut after: BTreeMap<&[u8], Option<&KeyValue>> = BTreeMap::new();
        let mut found: Vec<(u64, &Change, Option<&KeyValue>)> = Vec::new();
        for (&rev, batch) in self.history.range(newer).rev() {
            for c in batch.iter().rev().filter(|c| range.contains(&c.key)) {
                let new = match c.kind {
                    EventKind::Put => after
                        .get(c.key.as_slice())
                        .copied()
                        .unwrap_or_else(|| self.kvs.get(&c.key).map(|kv| &**kv)),
                    EventKind::Delete => None,
                };
                found.push((rev, c, new));
                after.insert(&c.key, c.prev.as_deref());
            }
        }
        found.reverse();
        // The cut, at a revision boundary. History has a change at every revision in
        // (after_revision, revision], so everything before a revision `rev` has been scanned
        // once `rev` is reached.
        let mut resume_after = self.revision.max(after_revision);
        let mut take = found.len();
        let (mut count, mut bytes) = (0usize, 0usize);
        let mut i = 0;
        while i < found.len() {
            let rev = found[i].0;
            let end = i + found[i..].iter().take_while(|f| f.0 == rev).count();
            let size: usize = found[i..end]
                .iter()
                .map(|(_, c, new)| {
                    new.map_or(c.key.len() + 64, record_bytes)
                        + c.prev.as_deref().map_or(0, record_bytes)
                })
                .sum();
            let n = end - i;
            let over_count = limit > 0 && count + n > limit;
            if count > 0 && (over_count || bytes + size > REPLY_BUDGET) {
                resume_after = rev - 1;
                take = i;
                break;
            }
            count += n;
            bytes += size;
            i = end;
        }
        let events = found[..take]
            .iter()
            .map(|&(rev, c, new)| Event {
                kind: c.kind,
                kv: match c.kind {
                    // Unreachable default: restore and execution keep every put's record.
                    EventKind::Put => new.cloned().unwrap_or_default(),
                    EventKind::Delete => KeyValue {
                        key: c.key.clone(),
                        mod_revision: rev,
                        ..Default::default()
                    },
                },
                prev_kv: c.prev.as_deref().cloned(),
            })
            .collect();
        Ok(WatchBatch {
            events,
            resume_after,
        })
    }

    fn watch_poll(&self, req: &WatchPollRequest) -> Result<WatchPollResponse, KvError> {
        non_empty(&req.key)?;
        let batch = self.events_since(
            req.after_revision,
            &req.key,
            &req.range_end,
            req.limit as usize,
        )?;
        let mut events = batch.events;
        if !req.prev_kv {
            for e in events.iter_mut().filter(|e| e.kind == EventKind::Put) {
                e.prev_kv = None;
            }
        }
        Ok(WatchPollResponse {
            header: self.header(),
            events,
            resume_after: batch.resume_after,
        })
    }

    fn deadline(&self, ttl: i64) -> u64 {
        // ttl is validated positive; saturation keeps absurd TTLs finite rather than wrapping.
        self.now_ms
            .saturating_add(u64::try_from(ttl).unwrap_or(0).saturating_mul(1000))
    }

    fn lease_grant(&mut self, req: &LeaseGrantRequest) -> Result<LeaseGrantResponse, KvError> {
        if req.ttl <= 0 || req.ttl > MAX_LEASE_TTL_SECS {
            return Err(KvError::InvalidLeaseTtl { ttl: req.ttl });
        }
        let id = match req.id {
            0 => {
                while self.leases.contains_key(&self.next_lease_id) {
                    self.next_lease_id = self.next_lease_id.checked_add(1).unwrap_or(1);
                }
                let id = self.next_lease_id;
                self.next_lease_id = id.checked_add(1).unwrap_or(1);
                id
            }
            id if id < 0 => return Err(KvError::InvalidLeaseId { id }),
            id if self.leases.contains_key(&id) => return Err(KvError::LeaseExists { id }),
            id => id,
        };
        let deadline_ms = self.deadline(req.ttl);
        self.leases.insert(
            id,
            Lease {
                ttl: req.ttl,
                deadline_ms,
                keys: BTreeSet::new(),
            },
        );
        self.lease_deadlines.insert((deadline_ms, id));
        Ok(LeaseGrantResponse {
            header: self.header(),
            id,
            ttl: req.ttl,
        })
    }

    fn lease_revoke(&mut self, id: i64) -> Result<LeaseRevokeResponse, KvError> {
        if !self.revoke(id) {
            return Err(KvError::LeaseNotFound { id });
        }
        Ok(LeaseRevokeResponse {
            header: self.header(),
        })
    }

    /// Removes a lease and deletes its keys in key order, all at one revision.
    fn revoke(&mut self, id: i64) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        self.lease_deadlines.remove(&(lease.deadline_ms, id));
        let mut w = self.begin();
        for key in &lease.keys {
            self.delete_key(&mut w, key);
        }
        self.commit(w);
        true
    }

    fn lease_keep_alive(&mut self, id: i64) -> Result<LeaseKeepAliveResponse, KvError> {
        let Some(ttl) = self.leases.get(&id).map(|l| l.ttl) else {
            return Err(KvError::LeaseNotFound { id });
        };
        let deadline_ms = self.deadline(ttl);
        if let Some(l) = self.leases.get_mut(&id) {
            self.lease_deadlines.remove(&(l.deadline_ms, id));
            l.deadline_ms = deadline_ms;
            self.lease_deadlines.insert((deadline_ms, id));
        }
        Ok(LeaseKeepAliveResponse {
            header: self.header(),
            id,
            ttl,
        })
    }

    fn lease_leases(&self) -> LeaseLeasesResponse {
        LeaseLeasesResponse {
            header: self.header(),
            ids: self.leases.keys().copied().collect(),
        }
    }

    fn lease_ttl(&self, req: &LeaseTimeToLiveRequest) -> Result<LeaseTimeToLiveResponse, KvError> {
        let lease = self
            .leases
            .get(&req.id)
            .ok_or(KvError::LeaseNotFound { id: req.id })?;
        let left_ms = lease.deadline_ms.saturating_sub(self.now_ms);
        Ok(LeaseTimeToLiveResponse {
            header: self.header(),
            id: req.id,
            ttl: i64::try_from(left_ms / 1000).unwrap_or(i64::MAX),
            granted_ttl: lease.ttl,
            keys: if req.keys {
                lease.keys.iter().cloned().collect()
            } else {
                Vec::new()
            },
        })
    }
}

fn non_empty(key: &[u8]) -> Result<(), KvError> {
    if key.is_empty() {
        Err(KvError::EmptyKey)
    } else {
        Ok(())
    }
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let ord = match &c.target {
        CompareTarget::Version(v) => kv.version.cmp(v),
        CompareTarget::CreateRevision(v) => kv.create_revision.cmp(v),
        CompareTarget::ModRevision(v) => kv.mod_revision.cmp(v),
        CompareTarget::Value(v) => kv.value.as_slice().cmp(v.as_slice()),
        CompareTarget::Lease(v) => kv.lease.cmp(v),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Less => ord == Ordering::Less,
        CompareResult::Greater => ord == Ordering::Greater,
    }
}
