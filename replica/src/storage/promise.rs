//! The replica's last promise: what it wrote and accepted in the consensus instance in
//! progress, and the regency it is in, made durable before any message that reveals it.
//!
//! Without it a correct replica that restarts forgets its votes and can vote differently in the
//! same epoch (a restarted leader proposes another batch; a follower writes what a Byzantine
//! leader now shows it; a new leader's collect misses its accepted value), so every restart
//! would count as one of the f faults the protocol tolerates. Raft persists its vote for the
//! same reason.
//!
//! Two files, written in turn, so that a crash in the middle of a write leaves the other one:
//!
//! ```text
//! promise-0, promise-1: magic "KMMRPRM\x01" | sequence u64 | len u32 | checksum [8] | payload
//! ```
//!
//! Recovery takes the valid file with the higher sequence: a damaged other file held a write that
//! never finished, whose votes were never sent (they go out only once the write is synced). When
//! something was written but neither file is intact, the last promise is lost, and recovery says
//! so ([`PromiseState::Lost`]) instead of reading it as "never promised anything": a replica that
//! forgets its votes can vote twice in one epoch. The payload is opaque here (the
//! core's encoding of the promise). Each write is one `pwrite` and one `fdatasync` (~70 us on
//! this project's test machines), done by the node before it sends the messages behind it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::atomic::{io_err, sync_dir};
use super::StorageError;

const MAGIC: &[u8; 8] = b"KMMRPRM\x01";
const HEADER: usize = 8 + 8 + 4 + 8;
/// Bounds what recovery reads from a damaged file; a promise holds at most a few batches.
pub const MAX_PROMISE: usize = 256 << 20;

pub struct PromiseFile {
    files: [File; 2],
    paths: [PathBuf; 2],
    seq: u64,
    buf: Vec<u8>,
}

/// What `open` found.
#[derive(Debug, Default)]
pub struct RecoveredPromise {
    /// The newest intact promise's payload.
    pub payload: Option<Vec<u8>>,
    /// Files that were damaged or unreadable (a torn last write is expected after a crash).
    pub damaged: Vec<String>,
    /// Both files were there already: a replica ran from this directory before.
    pub existed: bool,
}

/// What the two files say about the last promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromiseState<'a> {
    /// Both files are empty: no vote was ever promised here.
    Never,
    /// The newest intact promise's payload.
    Newest(&'a [u8]),
    /// Something was written, but no intact promise is left: the last votes are unknown.
    Lost,
}

impl RecoveredPromise {
    pub fn state(&self) -> PromiseState<'_> {
        match &self.payload {
            Some(p) => PromiseState::Newest(p),
            None if self.damaged.is_empty() => PromiseState::Never,
            None => PromiseState::Lost,
        }
    }
}

impl PromiseFile {
    pub fn open(dir: &Path) -> Result<(PromiseFile, RecoveredPromise), StorageError> {
        let paths = [dir.join("promise-0"), dir.join("promise-1")];
        let mut found: Option<(u64, Vec<u8>)> = None;
        let mut damaged = Vec::new();
        let mut created = false;
        let mut open = |p: &Path| -> Result<File, StorageError> {
            created |= !p.exists();
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(io_err("open", p))
        };
        let files = [open(&paths[0])?, open(&paths[1])?];
        for (f, p) in files.iter().zip(&paths) {
            match read_one(f) {
                Ok(None) => {}
                Ok(Some((seq, payload))) => {
                    if found.as_ref().is_none_or(|(s, _)| seq > *s) {
                        found = Some((seq, payload));
                    }
                }
                Err(why) => damaged.push(format!("{}: {why}", p.display())),
            }
        }
        if created {
            sync_dir(dir)?;
        }
        let seq = found.as_ref().map_or(0, |(s, _)| *s);
        Ok((
            PromiseFile {
                files,
                paths,
                seq,
                buf: Vec::new(),
            },
            RecoveredPromise {
                payload: found.map(|(_, p)| p),
                damaged,
                existed: !created,
            },
        ))
    }

    /// Makes `payload` the newest promise, durably, overwriting the older of the two files.
    pub fn write(&mut self, payload: &[u8]) -> Result<(), StorageError> {
        if payload.len() > MAX_PROMISE {
            return Err(StorageError::RecordTooLarge {
                len: payload.len(),
                limit: MAX_PROMISE,
            });
        }
        let seq = self.seq + 1;
        let slot = (seq % 2) as usize;
        self.buf.clear();
        self.buf.extend_from_slice(MAGIC);
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&checksum(seq, payload));
        self.buf.extend_from_slice(payload);
        let (f, p) = (&self.files[slot], &self.paths[slot]);
        f.write_all_at(&self.buf, 0).map_err(io_err("write", p))?;
        // The length is in the header, so a longer old tail needs no truncation (and no
        // metadata write); fdatasync covers a file that grew.
        f.sync_data().map_err(io_err("fdatasync", p))?;
        self.seq = seq;
        Ok(())
    }
}

fn checksum(seq: u64, payload: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

fn read_one(f: &File) -> Result<Option<(u64, Vec<u8>)>, String> {
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    if size == 0 {
        return Ok(None);
    }
    if size < HEADER as u64 {
        return Err(format!("torn header ({size} of {HEADER} bytes)"));
    }
    let mut header = [0u8; HEADER];
    f.read_exact_at(&mut header, 0).map_err(|e| e.to_string())?;
    if &header[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
    if len > MAX_PROMISE {
        return Err(format!("length {len} over the limit of {MAX_PROMISE}"));
    }
    let have = size - HEADER as u64;
    if have < len as u64 {
        return Err(format!("torn payload ({have} of {len} bytes)"));
    }
    let mut payload = vec![0u8; len];
    f.read_exact_at(&mut payload, HEADER as u64)
        .map_err(|e| e.to_string())?;
    if checksum(seq, &payload) != header[20..28] {
        return Err("checksum mismatch".into());
    }
    Ok(Some((seq, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir() -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "kmmr-promise-unit-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        TempDir(d)
    }

    #[test]
    fn empty_directory_has_no_promise() {
        let d = dir();
        let (_, r) = PromiseFile::open(d.path()).unwrap();
        assert!(r.payload.is_none());
        assert!(r.damaged.is_empty());
    }

    #[test]
    fn the_newest_write_survives_reopening() {
        let d = dir();
        let (mut p, _) = PromiseFile::open(d.path()).unwrap();
        for i in 0..5u8 {
            p.write(&vec![i; 10 + i as usize * 100]).unwrap();
        }
        drop(p);
        let (mut p, r) = PromiseFile::open(d.path()).unwrap();
        assert_eq!(r.payload.unwrap(), vec![4u8; 410]);
        // A shorter payload over a longer old one: the old tail is ignored.
        p.write(b"x").unwrap();
        p.write(b"yz").unwrap();
        let (_, r) = PromiseFile::open(d.path()).unwrap();
        assert_eq!(r.payload.unwrap(), b"yz");
    }

    #[test]
    fn a_torn_or_corrupt_write_falls_back_to_the_other_file() {
        let d = dir();
        let (mut p, _) = PromiseFile::open(d.path()).unwrap();
        p.write(b"first").unwrap(); // seq 1 -> promise-1
        p.write(b"second").unwrap(); // seq 2 -> promise-0
        drop(p);
        // Damage the newer one: a flipped payload byte, then a torn header.
        let newer = d.path().join("promise-0");
        let mut bytes = std::fs::read(&newer).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&newer, &bytes).unwrap();
        let (_, r) = PromiseFile::open(d.path()).unwrap();
        assert_eq!(r.payload.unwrap(), b"first");
        assert_eq!(r.damaged.len(), 1, "{:?}", r.damaged);
        assert!(r.damaged[0].contains("checksum"), "{:?}", r.damaged);
        std::fs::write(&newer, &bytes[..10]).unwrap();
        let (mut p, r) = PromiseFile::open(d.path()).unwrap();
        assert_eq!(r.payload.unwrap(), b"first");
        assert!(r.damaged[0].contains("torn header"), "{:?}", r.damaged);
        // Writing on continues after the surviving sequence and overwrites the damaged file.
        p.write(b"third").unwrap();
        let (_, r) = PromiseFile::open(d.path()).unwrap();
        assert_eq!(r.payload.unwrap(), b"third");
        assert!(r.damaged.is_empty());
    }

    #[test]
    fn every_kind_of_damage_to_both_files_is_a_lost_promise() {
        let d = dir();
        let (mut p, r) = PromiseFile::open(d.path()).unwrap();
        assert_eq!(r.state(), PromiseState::Never);
        p.write(b"first").unwrap();
        p.write(b"second").unwrap();
        drop(p);
        let (_, r) = PromiseFile::open(d.path()).unwrap();
        assert_eq!(r.state(), PromiseState::Newest(b"second"));
        let files = [d.path().join("promise-0"), d.path().join("promise-1")];
        let good: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
        // A flipped payload byte, a torn header, bad magic, a torn payload, in every pairing.
        let damage: [fn(&mut Vec<u8>); 4] = [
            |b| {
                let last = b.len() - 1;
                b[last] ^= 1;
            },
            |b| b.truncate(10),
            |b| b[0] ^= 0xff,
            |b| b.truncate(HEADER + 2),
        ];
        for d0 in &damage {
            for d1 in &damage {
                let mut b0 = good[0].clone();
                let mut b1 = good[1].clone();
                d0(&mut b0);
                d1(&mut b1);
                std::fs::write(&files[0], &b0).unwrap();
                std::fs::write(&files[1], &b1).unwrap();
                let (_, r) = PromiseFile::open(d.path()).unwrap();
                assert_eq!(r.state(), PromiseState::Lost, "{:?}", r.damaged);
                assert_eq!(r.damaged.len(), 2);
            }
        }
        // One damaged file beside an intact one is a write that never finished.
        std::fs::write(&files[0], &good[0][..10]).unwrap();
        std::fs::write(&files[1], &good[1]).unwrap();
        let (_, r) = PromiseFile::open(d.path()).unwrap();
        assert_eq!(r.state(), PromiseState::Newest(b"first"));
    }

    #[test]
    fn a_huge_stated_length_is_refused_without_allocating_it() {
        let d = dir();
        let mut h = Vec::new();
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&1u64.to_le_bytes());
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        h.extend_from_slice(&[0; 8]);
        std::fs::write(d.path().join("promise-1"), &h).unwrap();
        let (_, r) = PromiseFile::open(d.path()).unwrap();
        assert!(r.payload.is_none());
        assert!(r.damaged[0].contains("over the limit"), "{:?}", r.damaged);
        assert_eq!(r.state(), PromiseState::Lost);
    }
}
