//! State transfer: which checkpoint to fetch, from whom, and its assembly from chunks.
//!
//! Replicas advertise the checkpoints they hold. A checkpoint is worth fetching only when f+1
//! distinct members advertise identical metadata (CID, view, digest, length): one of them is
//! correct, so the digest is the real state's. Its bytes come from one of those replicas, a few
//! chunks in flight at a time (pulled, so a slow link or a full queue never loses the transfer),
//! and are installed only if they hash to the agreed digest. A source that stalls or sends bytes
//! that do not hash right is dropped for the next supporter.

use std::collections::{BTreeMap, BTreeSet};

use crate::crypto::Digest;
use crate::view::View;
use crate::wire::ids::{Cid, ReplicaId};
use crate::wire::limits;
use crate::wire::messages::{CheckpointMeta, ReplicaMessage};

/// The most a fetch reserves up front (the largest checkpoint a replica produces, plus its
/// ordering state).
const RESERVE_LIMIT: usize = crate::core::state::MAX_SERVICE_SNAPSHOT + (64 << 20);

/// What to send after an input.
pub type Requests = Vec<(ReplicaId, ReplicaMessage)>;

/// The outcome of a chunk.
#[derive(Debug)]
pub enum ChunkOutcome {
    /// Not part of the current fetch (late, duplicate, or unsolicited).
    Ignored,
    /// Stored; ask for these next.
    More(Requests),
    /// The checkpoint is complete and hashes to the agreed digest.
    Complete(CheckpointMeta, Vec<u8>),
    /// The source sent bytes that do not fit or do not hash right; it is dropped and the fetch
    /// restarts from another supporter with these requests. `proven`: every byte came from
    /// it, so it is to blame; after a stalled source was replaced, a bad digest could be the
    /// earlier source's doing.
    BadSource {
        source: ReplicaId,
        proven: bool,
        requests: Requests,
    },
}

#[derive(Debug)]
struct Fetch {
    meta: CheckpointMeta,
    sources: Vec<ReplicaId>,
    source: ReplicaId,
    assembled: Vec<u8>,
    /// Chunks that arrived ahead of `assembled`, by offset.
    ahead: BTreeMap<u64, Vec<u8>>,
    outstanding: BTreeSet<u64>,
    next_offset: u64,
    last_progress_us: u64,
    /// Bytes from more than one source are in `assembled`.
    mixed: bool,
}

#[derive(Debug)]
pub struct Transfer {
    chunk_bytes: u32,
    window: usize,
    stall_us: u64,
    /// The checkpoints each replica last advertised, and the first CID it still logs.
    infos: BTreeMap<ReplicaId, Vec<CheckpointMeta>>,
    first_logged: BTreeMap<ReplicaId, Option<Cid>>,
    fetch: Option<Fetch>,
    /// Sources caught sending bad bytes, per checkpoint: never asked again for it.
    bad: BTreeSet<(CheckpointMeta, ReplicaId)>,
}

impl Transfer {
    pub fn new(chunk_bytes: usize, window: usize, stall_us: u64) -> Self {
        Transfer {
            chunk_bytes: chunk_bytes.clamp(1, limits::MAX_CHUNK) as u32,
            window: window.max(1),
            stall_us: stall_us.max(1),
            infos: BTreeMap::new(),
            first_logged: BTreeMap::new(),
            fetch: None,
            bad: BTreeSet::new(),
        }
    }

    pub fn in_progress(&self) -> Option<&CheckpointMeta> {
        self.fetch.as_ref().map(|f| &f.meta)
    }

    /// Bytes received so far of the current fetch.
    pub fn progress(&self) -> Option<(u64, u64)> {
        self.fetch
            .as_ref()
            .map(|f| (f.assembled.len() as u64, f.meta.len))
    }

    pub fn record(
        &mut self,
        from: ReplicaId,
        mut metas: Vec<CheckpointMeta>,
        first_logged: Option<Cid>,
    ) {
        metas.truncate(limits::MAX_CHECKPOINTS_ADVERTISED);
        self.infos.insert(from, metas);
        self.first_logged.insert(from, first_logged);
    }

    /// How many members other than `me` said they can no longer send the decision of `cid`.
    pub fn trimmed_past(&self, view: &View, me: ReplicaId, cid: Cid) -> usize {
        self.first_logged
            .iter()
            .filter(|(id, f)| **id != me && view.contains(**id) && f.is_none_or(|f| f > cid))
            .count()
    }

    /// Forgets what replicas outside `view` advertised.
    pub fn retain_members(&mut self, view: &View) {
        self.infos.retain(|id, _| view.contains(*id));
        self.first_logged.retain(|id, _| view.contains(*id));
    }

    /// The replicas (members of `view`, other than `me`) that advertise `meta`.
    pub fn supporters(&self, view: &View, me: ReplicaId, meta: &CheckpointMeta) -> Vec<ReplicaId> {
        self.infos
            .iter()
            .filter(|(id, ms)| **id != me && view.contains(**id) && ms.contains(meta))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The newest checkpoint that f+1 members vouch for and `wanted` accepts, with its
    /// supporters.
    pub fn choose(
        &self,
        view: &View,
        me: ReplicaId,
        wanted: impl Fn(&CheckpointMeta) -> bool,
    ) -> Option<(CheckpointMeta, Vec<ReplicaId>)> {
        let candidates: BTreeSet<CheckpointMeta> = self
            .infos
            .values()
            .flat_map(|ms| ms.iter().copied())
            .filter(|m| wanted(m))
            .collect();
        candidates
            .into_iter()
            .rev()
            .map(|m| (m, self.supporters(view, me, &m)))
            .find(|(_, s)| s.len() >= view.weak())
    }

    /// f+1 members other than `me` advertise a checkpoint at `cid` with another digest: the
    /// one they agree on, if any.
    pub fn contradicted(
        &self,
        view: &View,
        me: ReplicaId,
        mine: &CheckpointMeta,
    ) -> Option<(CheckpointMeta, Vec<ReplicaId>)> {
        self.choose(view, me, |m| m.cid == mine.cid && m != mine)
    }

    /// Starts fetching `meta` from its supporters (replacing any fetch in progress).
    pub fn start(&mut self, now: u64, meta: CheckpointMeta, sources: Vec<ReplicaId>) -> Requests {
        let sources: Vec<ReplicaId> = sources
            .into_iter()
            .filter(|s| !self.bad.contains(&(meta, *s)))
            .collect();
        // Spread the load: a replica with a low id must not serve every transfer.
        let Some(&source) = sources.get((meta.cid.0 as usize) % sources.len().max(1)) else {
            self.fetch = None;
            return Vec::new();
        };
        self.fetch = Some(Fetch {
            meta,
            sources,
            source,
            // f+1 members vouch for the length, so one correct replica does: reserving it spares
            // the copies of a growing buffer (a large state would be copied several times over).
            assembled: Vec::with_capacity(
                usize::try_from(meta.len).map_or(0, |l| l.min(RESERVE_LIMIT)),
            ),
            ahead: BTreeMap::new(),
            outstanding: BTreeSet::new(),
            next_offset: 0,
            last_progress_us: now,
            mixed: false,
        });
        self.fill()
    }

    pub fn cancel(&mut self) {
        self.fetch = None;
    }

    /// Drops the fetch in progress once no member advertises its checkpoint any more: they all
    /// moved past it and trimmed it, so no one would ever serve the missing chunks. Returns
    /// whether it did. A fetch that some member still offers is kept, even below f+1, so one
    /// Byzantine replica withdrawing its support cannot restart a long transfer.
    pub fn abandon_if_unserved(&mut self, view: &View, me: ReplicaId) -> bool {
        let Some(f) = self.fetch.as_ref() else {
            return false;
        };
        let offered = self
            .supporters(view, me, &f.meta)
            .into_iter()
            .any(|s| !self.bad.contains(&(f.meta, s)));
        if !offered {
            self.fetch = None;
        }
        !offered
    }

    /// Requests up to the window.
    fn fill(&mut self) -> Requests {
        let (chunk, window) = (self.chunk_bytes, self.window);
        let Some(f) = self.fetch.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while f.outstanding.len() < window && f.next_offset < f.meta.len {
            let offset = f.next_offset;
            let len = (f.meta.len - offset).min(chunk as u64) as u32;
            f.outstanding.insert(offset);
            f.next_offset += len as u64;
            out.push((
                f.source,
                ReplicaMessage::ChunkRequest {
                    cid: f.meta.cid,
                    digest: f.meta.digest,
                    offset,
                    len,
                },
            ));
        }
        out
    }

    pub fn on_chunk(
        &mut self,
        now: u64,
        from: ReplicaId,
        cid: Cid,
        digest: Digest,
        offset: u64,
        data: Vec<u8>,
    ) -> ChunkOutcome {
        let Some(f) = self.fetch.as_mut() else {
            return ChunkOutcome::Ignored;
        };
        if from != f.source
            || cid != f.meta.cid
            || digest != f.meta.digest
            || !f.outstanding.contains(&offset)
        {
            return ChunkOutcome::Ignored;
        }
        let expected = (f.meta.len - offset).min(self.chunk_bytes as u64);
        if data.len() as u64 != expected {
            return self.drop_source(now, true);
        }
        f.outstanding.remove(&offset);
        f.last_progress_us = now;
        f.ahead.insert(offset, data);
        while let Some(piece) = f.ahead.remove(&(f.assembled.len() as u64)) {
            f.assembled.extend_from_slice(&piece);
        }
        if f.assembled.len() as u64 == f.meta.len {
            let meta = f.meta;
            if Digest::of(&f.assembled) == meta.digest {
                let bytes = std::mem::take(&mut f.assembled);
                self.fetch = None;
                return ChunkOutcome::Complete(meta, bytes);
            }
            let proven = !f.mixed;
            return self.drop_source(now, proven);
        }
        ChunkOutcome::More(self.fill())
    }

    fn drop_source(&mut self, now: u64, proven: bool) -> ChunkOutcome {
        let Some(f) = self.fetch.take() else {
            return ChunkOutcome::Ignored;
        };
        self.bad.insert((f.meta, f.source));
        if self.bad.len() > 1024 {
            self.bad.pop_first();
        }
        let reqs = self.start(now, f.meta, f.sources);
        ChunkOutcome::BadSource {
            source: f.source,
            proven,
            requests: reqs,
        }
    }

    /// When the fetch in progress must show progress by.
    pub fn deadline(&self) -> Option<u64> {
        self.fetch
            .as_ref()
            .map(|f| f.last_progress_us.saturating_add(self.stall_us))
    }

    /// A stalled source is replaced by the next supporter; what was assembled is kept, since
    /// every supporter serves identical bytes and the digest is checked at the end.
    pub fn on_timeout(&mut self, now: u64) -> Requests {
        let Some(f) = self.fetch.as_mut() else {
            return Vec::new();
        };
        if now < f.last_progress_us.saturating_add(self.stall_us) {
            return Vec::new();
        }
        if let Some(i) = f.sources.iter().position(|s| *s == f.source) {
            f.source = f.sources[(i + 1) % f.sources.len()];
        }
        f.last_progress_us = now;
        f.mixed |= !f.assembled.is_empty();
        f.ahead.clear();
        f.outstanding.clear();
        f.next_offset = f.assembled.len() as u64;
        self.fill()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::PublicKey;
    use crate::view::Member;
    use crate::wire::ids::ViewId;

    fn view() -> View {
        let members = (0..4)
            .map(|i| Member {
                id: ReplicaId(i),
                address: format!("a{i}"),
                key: PublicKey([i as u8 + 1; 32]),
            })
            .collect();
        View::new(ViewId(0), 1, members).unwrap()
    }

    fn meta_of(cid: u64, bytes: &[u8]) -> CheckpointMeta {
        CheckpointMeta {
            cid: Cid(cid),
            view: ViewId(0),
            digest: Digest::of(bytes),
            len: bytes.len() as u64,
        }
    }

    fn serve(reqs: &Requests, bytes: &[u8]) -> Vec<(ReplicaId, u64, Vec<u8>)> {
        reqs.iter()
            .map(|(to, m)| match m {
                ReplicaMessage::ChunkRequest { offset, len, .. } => (
                    *to,
                    *offset,
                    bytes[*offset as usize..(*offset + *len as u64) as usize].to_vec(),
                ),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn needs_f_plus_1_matching_advertisements() {
        let v = view();
        let mut t = Transfer::new(4, 2, 1000);
        let good = meta_of(9, b"state");
        let forged = meta_of(99, b"lies");
        t.record(ReplicaId(1), vec![good, forged], None);
        assert!(t.choose(&v, ReplicaId(0), |_| true).is_none());
        // The replica's own advertisement does not count.
        t.record(ReplicaId(0), vec![forged], None);
        assert!(t.choose(&v, ReplicaId(0), |_| true).is_none());
        t.record(ReplicaId(2), vec![good], None);
        let (m, s) = t.choose(&v, ReplicaId(0), |_| true).unwrap();
        assert_eq!(m, good);
        assert_eq!(s, vec![ReplicaId(1), ReplicaId(2)]);
    }

    #[test]
    fn assembles_out_of_order_and_rejects_a_lying_source() {
        let v = view();
        let bytes: Vec<u8> = (0..23u8).collect();
        let meta = meta_of(5, &bytes);
        let mut t = Transfer::new(4, 3, 1000);
        t.record(ReplicaId(1), vec![meta], None);
        t.record(ReplicaId(2), vec![meta], None);
        let (m, s) = t.choose(&v, ReplicaId(0), |_| true).unwrap();
        let mut reqs = t.start(0, m, s);
        let liar = reqs[0].0;
        // The first source lies about one chunk's contents (right length, wrong bytes).
        let mut corrupt = bytes.clone();
        corrupt[1] ^= 1;
        let mut done = None;
        let mut rounds = 0;
        while done.is_none() {
            rounds += 1;
            assert!(rounds < 100);
            let source = reqs[0].0;
            let data = if source == liar { &corrupt } else { &bytes };
            let mut served = serve(&reqs, data);
            served.reverse();
            reqs = Vec::new();
            for (from, offset, d) in served {
                match t.on_chunk(1, from, meta.cid, meta.digest, offset, d) {
                    ChunkOutcome::More(r) => reqs.extend(r),
                    ChunkOutcome::Complete(m, b) => done = Some((m, b)),
                    ChunkOutcome::BadSource {
                        source,
                        proven,
                        requests,
                    } => {
                        assert_eq!(source, liar);
                        assert!(proven);
                        reqs = requests;
                        break;
                    }
                    ChunkOutcome::Ignored => {}
                }
            }
        }
        let (m, b) = done.unwrap();
        assert_eq!(m, meta);
        assert_eq!(b, bytes);
    }

    #[test]
    fn a_stalled_source_is_replaced_keeping_what_arrived() {
        let bytes: Vec<u8> = (0..10u8).collect();
        let meta = meta_of(5, &bytes);
        let mut t = Transfer::new(4, 1, 100);
        let reqs = t.start(0, meta, vec![ReplicaId(1), ReplicaId(2)]);
        let first = reqs[0].0;
        let served = serve(&reqs, &bytes);
        let (from, off, d) = served[0].clone();
        assert!(matches!(
            t.on_chunk(10, from, meta.cid, meta.digest, off, d),
            ChunkOutcome::More(_)
        ));
        assert!(t.on_timeout(50).is_empty());
        let reqs = t.on_timeout(200);
        assert_eq!(reqs.len(), 1);
        assert_ne!(reqs[0].0, first);
        assert!(matches!(
            reqs[0].1,
            ReplicaMessage::ChunkRequest { offset: 4, .. }
        ));
        assert_eq!(t.progress(), Some((4, 10)));
    }

    #[test]
    fn a_fetch_no_one_offers_any_more_is_abandoned() {
        let v = view();
        let old = meta_of(5, b"old state");
        let new = meta_of(13, b"newer state");
        let mut t = Transfer::new(4, 1, 100);
        t.record(ReplicaId(1), vec![old], None);
        t.record(ReplicaId(2), vec![old], None);
        let (m, s) = t.choose(&v, ReplicaId(0), |_| true).unwrap();
        t.start(0, m, s);
        // One supporter moving on is not enough: the other can still serve it.
        t.record(ReplicaId(1), vec![new], Some(Cid(6)));
        assert!(!t.abandon_if_unserved(&v, ReplicaId(0)));
        assert_eq!(t.in_progress(), Some(&old));
        t.record(ReplicaId(2), vec![new], Some(Cid(6)));
        assert!(t.abandon_if_unserved(&v, ReplicaId(0)));
        assert!(t.in_progress().is_none());
        assert_eq!(t.choose(&v, ReplicaId(0), |_| true).unwrap().0, new);
    }
}
