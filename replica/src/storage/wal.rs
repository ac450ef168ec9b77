//! The write-ahead log of decided instances: segment files of checksummed records.
//!
//! A segment `wal-<first cid>.log` starts with a header and holds consecutive records:
//!
//! ```text
//! header: magic "KMMRWAL\x01" | first cid u64 | checksum [8]        (24 bytes)
//! record: len u32 | checksum [8] | payload (a `Decision`'s canonical encoding, len bytes)
//! ```
//!
//! Checksums are BLAKE3 truncated to 64 bits, over the length and the payload, so a damaged
//! length is caught as surely as a damaged payload. CIDs run without gaps across the whole log,
//! and a segment's first record has the CID in its name and header. Recovery keeps every record
//! up to the first one that is torn, fails its checksum, does not decode or breaks the sequence,
//! truncates the log there and removes the segments after it: a log with a hole cannot be
//! replayed, and what follows a hole is fetched again by state transfer.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kmmr_protocol::wire::codec::Decode;
use kmmr_protocol::wire::ids::Cid;
use kmmr_protocol::wire::limits;
use kmmr_protocol::wire::messages::Decision;

use super::atomic::{io_err, sync_dir};
use super::commit::Shared;
use super::{StorageError, SyncMode};

const SEGMENT_MAGIC: &[u8; 8] = b"KMMRWAL\x01";
const SEGMENT_PREFIX: &str = "wal-";
const SEGMENT_SUFFIX: &str = ".log";
/// Bytes of a segment header.
pub const SEGMENT_HEADER: u64 = 24;
/// Bytes of a record header (length and checksum).
pub const RECORD_HEADER: u64 = 12;
/// Largest record payload: a decision never exceeds a frame.
pub const MAX_RECORD: usize = limits::MAX_FRAME;

/// What is wrong with the log at the point where recovery stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The segment ends inside its header: it was being created when the process stopped.
    TornHeader,
    /// The segment header has a bad magic, checksum, or a CID other than its name's.
    BadHeader,
    /// The segment ends inside a record: the record was being written when the process stopped.
    TornRecord,
    /// A record length above `MAX_RECORD`.
    BadLength(u32),
    /// A record's checksum does not match its bytes.
    Checksum,
    /// A record's checksum matches but the payload is not a decision.
    Undecodable(String),
    /// A segment or record carries another CID than the one that must come next.
    OutOfSequence { expected: Cid, found: Cid },
}

/// Where recovery stopped and what it dropped to make the log consistent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogDamage {
    pub segment: PathBuf,
    /// Offset in `segment` of the first bad byte; the segment was truncated there (or removed
    /// if the header was bad).
    pub offset: u64,
    pub damage: Damage,
    /// Bytes removed from `segment`.
    pub dropped_bytes: u64,
    /// Later segments removed whole, since they follow a hole.
    pub dropped_segments: Vec<PathBuf>,
}

pub(crate) fn segment_name(first: Cid) -> String {
    format!("{SEGMENT_PREFIX}{:020}{SEGMENT_SUFFIX}", first.0)
}

/// The segments in `dir`, by first CID.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(Cid, PathBuf)>, StorageError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let cid = name
            .to_str()
            .and_then(|n| n.strip_prefix(SEGMENT_PREFIX))
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(cid) = cid {
            out.push((Cid(cid), entry.path()));
        }
    }
    out.sort_by_key(|(cid, _)| *cid);
    Ok(out)
}

fn checksum8(parts: &[&[u8]]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

fn segment_header(first: Cid) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..16].copy_from_slice(&first.0.to_le_bytes());
    let sum = checksum8(&[&h[..16]]);
    h[16..].copy_from_slice(&sum);
    h
}

/// Appends one framed record to `buf`.
pub(crate) fn frame_record(buf: &mut Vec<u8>, payload: &[u8]) {
    // Callers bound payloads by MAX_RECORD, far below 4 GiB.
    let len = (payload.len() as u32).to_le_bytes();
    buf.extend_from_slice(&len);
    buf.extend_from_slice(&checksum8(&[&len, payload]));
    buf.extend_from_slice(payload);
}

/// One step of reading a segment.
enum Next {
    Record(Decision),
    End,
    Damaged(Damage),
}

/// Streams the records of one segment with a bounded buffer.
struct SegmentReader {
    path: PathBuf,
    r: BufReader<File>,
    /// Offset of the next record.
    offset: u64,
    /// Segment length when opened; a concurrent appender's later bytes are not read.
    len: u64,
    payload: Vec<u8>,
}

impl SegmentReader {
    /// Opens a segment and checks its header against `first`.
    fn open(path: &Path, first: Cid) -> Result<(Self, Option<Damage>), StorageError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        let mut r = SegmentReader {
            path: path.to_path_buf(),
            r: BufReader::with_capacity(1 << 16, file),
            offset: 0,
            len,
            payload: Vec::new(),
        };
        if len < SEGMENT_HEADER {
            return Ok((r, Some(Damage::TornHeader)));
        }
        let mut h = [0u8; 24];
        r.read_exact(&mut h)?;
        if h != segment_header(first) {
            return Ok((r, Some(Damage::BadHeader)));
        }
        r.offset = SEGMENT_HEADER;
        Ok((r, None))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), StorageError> {
        self.r.read_exact(buf).map_err(io_err("read", &self.path))
    }

    fn next(&mut self) -> Result<Next, StorageError> {
        let remaining = self.len - self.offset;
        if remaining == 0 {
            return Ok(Next::End);
        }
        if remaining < RECORD_HEADER {
            return Ok(Next::Damaged(Damage::TornRecord));
        }
        let mut head = [0u8; 12];
        self.read_exact(&mut head)?;
        let mut len = [0u8; 4];
        len.copy_from_slice(&head[..4]);
        let n = u32::from_le_bytes(len);
        if n as usize > MAX_RECORD {
            return Ok(Next::Damaged(Damage::BadLength(n)));
        }
        if u64::from(n) > remaining - RECORD_HEADER {
            return Ok(Next::Damaged(Damage::TornRecord));
        }
        // Bounded by MAX_RECORD and by the bytes the file holds; reused across records.
        self.payload.resize(n as usize, 0);
        let mut payload = std::mem::take(&mut self.payload);
        let read = self.read_exact(&mut payload);
        self.payload = payload;
        read?;
        if checksum8(&[&len, &self.payload]) != head[4..] {
            return Ok(Next::Damaged(Damage::Checksum));
        }
        match Decision::from_bytes(&self.payload) {
            Ok(d) => {
                self.offset += RECORD_HEADER + u64::from(n);
                Ok(Next::Record(d))
            }
            Err(e) => Ok(Next::Damaged(Damage::Undecodable(e.to_string()))),
        }
    }
}

/// What recovery found: the surviving segments and where the log ends.
pub(crate) struct Scanned {
    pub segments: Vec<(Cid, PathBuf)>,
    /// Length of the last surviving segment.
    pub last_len: u64,
    pub last: Option<Cid>,
    pub damage: Option<LogDamage>,
}

/// Reads the whole log, handing each good record to `on_record` in CID order, and repairs it:
/// truncates at the first bad record and removes the segments after it.
pub(crate) fn recover(
    dir: &Path,
    mut on_record: impl FnMut(Decision),
) -> Result<Scanned, StorageError> {
    let all = list_segments(dir)?;
    let mut kept: Vec<(Cid, PathBuf)> = Vec::new();
    let mut next: Option<Cid> = None;
    let mut last = None;
    let mut last_len = 0;
    let mut damage = None;
    for (i, (first, path)) in all.iter().enumerate() {
        let (mut reader, header_damage) = SegmentReader::open(path, *first)?;
        let header_damage = header_damage.or_else(|| {
            next.filter(|n| n != first)
                .map(|expected| Damage::OutOfSequence {
                    expected,
                    found: *first,
                })
        });
        let stop = if let Some(d) = header_damage {
            Some((d, 0))
        } else {
            next = Some(*first);
            loop {
                let at = reader.offset;
                match reader.next()? {
                    Next::End => break None,
                    Next::Damaged(d) => break Some((d, at)),
                    Next::Record(rec) => {
                        let expected = next.unwrap_or(*first);
                        if rec.cid != expected {
                            break Some((
                                Damage::OutOfSequence {
                                    expected,
                                    found: rec.cid,
                                },
                                at,
                            ));
                        }
                        last = Some(rec.cid);
                        next = Some(rec.cid.next());
                        on_record(rec);
                    }
                }
            }
        };
        let Some((d, offset)) = stop else {
            kept.push((*first, path.clone()));
            last_len = reader.len;
            continue;
        };
        let len = reader.len;
        drop(reader);
        if offset == 0 {
            // Nothing of this segment survives, not even its header.
            fs::remove_file(path).map_err(io_err("remove", path))?;
        } else {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_err("open", path))?;
            f.set_len(offset).map_err(io_err("truncate", path))?;
            f.sync_all().map_err(io_err("fsync", path))?;
            kept.push((*first, path.clone()));
            last_len = offset;
        }
        let mut dropped_segments = Vec::new();
        for (_, later) in &all[i + 1..] {
            fs::remove_file(later).map_err(io_err("remove", later))?;
            dropped_segments.push(later.clone());
        }
        sync_dir(dir)?;
        damage = Some(LogDamage {
            segment: path.clone(),
            offset,
            damage: d,
            dropped_bytes: len - offset.min(len),
            dropped_segments,
        });
        break;
    }
    if kept.is_empty() {
        last_len = 0;
    }
    Ok(Scanned {
        segments: kept,
        last_len,
        last,
        damage,
    })
}

/// The segment being appended to.
struct Active {
    file: Arc<File>,
    len: u64,
}

/// The appending side of the log. Not shared: the one thread that orders decisions owns it.
pub(crate) struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    /// Every segment on disk, by first CID; the last one is `active` once it is open.
    segments: Vec<(Cid, PathBuf)>,
    active: Option<Active>,
    /// The CID the next append must carry; `None` for an empty log, which takes any.
    next: Option<Cid>,
    buf: Vec<u8>,
}

impl Wal {
    /// Resumes appending after `recover`.
    pub(crate) fn resume(
        dir: &Path,
        segment_bytes: u64,
        scanned: &Scanned,
    ) -> Result<Self, StorageError> {
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            segment_bytes,
            segments: scanned.segments.clone(),
            active: None,
            next: None,
            buf: Vec::new(),
        };
        if let Some((first, path)) = scanned.segments.last() {
            let file = OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(io_err("open", path))?;
            wal.active = Some(Active {
                file: Arc::new(file),
                len: scanned.last_len,
            });
            wal.next = Some(scanned.last.map_or(*first, Cid::next));
        }
        Ok(wal)
    }

    pub(crate) fn next_cid(&self) -> Option<Cid> {
        self.next
    }

    pub(crate) fn first_cid(&self) -> Option<Cid> {
        self.segments.first().map(|(c, _)| *c)
    }

    /// Appends the canonical encoding of the decision for `cid`.
    pub(crate) fn append(
        &mut self,
        cid: Cid,
        payload: &[u8],
        shared: &Shared,
        mode: SyncMode,
    ) -> Result<(), StorageError> {
        if let Some(expected) = self.next {
            if cid != expected {
                return Err(StorageError::OutOfOrder { expected, got: cid });
            }
        }
        if payload.len() > MAX_RECORD {
            return Err(StorageError::RecordTooLarge {
                len: payload.len(),
                limit: MAX_RECORD,
            });
        }
        let record = RECORD_HEADER + payload.len() as u64;
        let rotate = match &self.active {
            None => true,
            // A record larger than a segment still gets one of its own.
            Some(a) => a.len > SEGMENT_HEADER && a.len + record > self.segment_bytes,
        };
        if rotate {
            self.open_segment(cid)?;
        }
        let Some(active) = self.active.as_mut() else {
            return Err(StorageError::Closed);
        };
        self.buf.clear();
        frame_record(&mut self.buf, payload);
        if let Err(e) = (&*active.file).write_all(&self.buf) {
            // A partial record in the middle of the log would hide every later one from
            // recovery: cut it off, and stop appending if even that fails.
            let path = self
                .segments
                .last()
                .map(|(_, p)| p.clone())
                .unwrap_or_default();
            if active.file.set_len(active.len).is_err() {
                shared.fail(format!(
                    "write to {} failed and could not be undone: {e}",
                    path.display()
                ));
            }
            return Err(io_err("write", &path)(e));
        }
        active.len += record;
        self.next = Some(cid.next());
        match mode {
            SyncMode::Group => shared.written(cid, &active.file, rotate, record),
            SyncMode::PerRecord => {
                let path = self
                    .segments
                    .last()
                    .map(|(_, p)| p.clone())
                    .unwrap_or_default();
                if let Err(e) = active.file.sync_data() {
                    shared.fail(format!("fsync of {} failed: {e}", path.display()));
                    return Err(io_err("fsync", &path)(e));
                }
                if rotate {
                    sync_dir(&self.dir)?;
                }
                shared.synced_inline(cid, &active.file);
            }
        }
        Ok(())
    }

    fn open_segment(&mut self, first: Cid) -> Result<(), StorageError> {
        let path = self.dir.join(segment_name(first));
        let mut file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        if let Err(e) = file.write_all(&segment_header(first)) {
            let _ = fs::remove_file(&path);
            return Err(io_err("write", &path)(e));
        }
        self.segments.push((first, path));
        self.active = Some(Active {
            file: Arc::new(file),
            len: SEGMENT_HEADER,
        });
        Ok(())
    }

    /// Removes every segment whose records all have CIDs below `cid`. Returns the removed
    /// paths. If that empties the log, the next append must carry `max(cid, next)`: this is
    /// how a replica that installed a transferred checkpoint restarts its log right after it.
    pub(crate) fn truncate_before(
        &mut self,
        cid: Cid,
        shared: &Shared,
    ) -> Result<Vec<PathBuf>, StorageError> {
        let mut remove = 0;
        for i in 0..self.segments.len() {
            // Exclusive end of the CIDs the segment holds.
            let end = match self.segments.get(i + 1) {
                Some((next_first, _)) => *next_first,
                None => self.next.unwrap_or(self.segments[i].0),
            };
            if end <= cid {
                remove = i + 1;
            } else {
                break;
            }
        }
        let removed: Vec<(Cid, PathBuf)> = self.segments.drain(..remove).collect();
        if self.segments.is_empty() {
            self.active = None;
            shared.segments_removed();
            self.next = Some(self.next.map_or(cid, |n| n.max(cid)));
        }
        let mut paths = Vec::with_capacity(removed.len());
        for (_, p) in removed {
            fs::remove_file(&p).map_err(io_err("remove", &p))?;
            paths.push(p);
        }
        if !paths.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(paths)
    }

    /// Makes an emptied log take `next` as its next CID.
    pub(crate) fn restart_at(&mut self, next: Cid) {
        debug_assert!(
            self.segments.is_empty(),
            "restart_at on a log with segments"
        );
        self.next = Some(next);
    }

    pub(crate) fn segment_paths(&self) -> Vec<(Cid, PathBuf)> {
        self.segments.clone()
    }
}

/// Streams the decisions in the log from a CID on, e.g. to send "the log since the checkpoint"
/// to a replica that is behind. Reads what was on disk when each segment is opened.
pub struct LogReader {
    segments: std::vec::IntoIter<(Cid, PathBuf)>,
    current: Option<SegmentReader>,
    from: Cid,
    done: bool,
}

impl LogReader {
    pub(crate) fn new(mut segments: Vec<(Cid, PathBuf)>, from: Cid) -> Self {
        // Skip segments that end before `from`: those whose successor starts at or below it.
        let start = segments
            .iter()
            .rposition(|(first, _)| *first <= from)
            .unwrap_or(0);
        LogReader {
            segments: {
                segments.drain(..start);
                segments.into_iter()
            },
            current: None,
            from,
            done: false,
        }
    }
}

impl Iterator for LogReader {
    type Item = Result<Decision, StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let reader = match &mut self.current {
                Some(r) => r,
                None => {
                    let (first, path) = self.segments.next()?;
                    match SegmentReader::open(&path, first) {
                        Ok((r, None)) => self.current.insert(r),
                        Ok((_, Some(d))) => {
                            self.done = true;
                            return Some(Err(StorageError::Corrupt {
                                path,
                                offset: 0,
                                reason: format!("{d:?}"),
                            }));
                        }
                        Err(e) => {
                            self.done = true;
                            return Some(Err(e));
                        }
                    }
                }
            };
            let at = reader.offset;
            match reader.next() {
                Ok(Next::Record(d)) if d.cid < self.from => continue,
                Ok(Next::Record(d)) => return Some(Ok(d)),
                Ok(Next::End) => self.current = None,
                Ok(Next::Damaged(d)) => {
                    self.done = true;
                    return Some(Err(StorageError::Corrupt {
                        path: reader.path.clone(),
                        offset: at,
                        reason: format!("{d:?}"),
                    }));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_checksum_covers_its_length_and_every_payload_bit() {
        let payload = [1u8, 2, 3, 4, 5];
        let mut good = Vec::new();
        frame_record(&mut good, &payload);
        assert_eq!(good.len(), RECORD_HEADER as usize + payload.len());
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let mut len = [0u8; 4];
            len.copy_from_slice(&bad[..4]);
            let body = &bad[12..];
            let matches = u32::from_le_bytes(len) as usize == body.len()
                && checksum8(&[&len, body]) == bad[4..12];
            assert!(!matches, "flipping bit {bit} went unnoticed");
        }
    }

    #[test]
    fn a_segment_header_names_its_first_cid() {
        assert_ne!(segment_header(Cid(1)), segment_header(Cid(2)));
        assert_eq!(segment_name(Cid(42)), "wal-00000000000000000042.log");
    }
}
