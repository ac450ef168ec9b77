//! Checkpoint files and the persisted current view.
//!
//! A checkpoint file `checkpoint-<cid>.ckpt` holds, in this order:
//!
//! ```text
//! magic "KMMRCKP\x01" | cid u64 | digest [32] | view_len u32 | view | snapshot_len u64 | snapshot
//! | checksum [32]   (BLAKE3 of every byte before it)
//! ```
//!
//! The checksum catches any damaged byte, header included; the digest check
//! (`Digest::of(snapshot) == digest`) additionally proves that the snapshot is the state the
//! replica agreed on, which is what state transfer compares with other replicas. Files are
//! replaced atomically (see `atomic`), so a crash leaves either the old set or the new one.
//!
//! The view file `view` holds `magic "KMMRVIW\x01" | view_len u32 | view | checksum [32]`.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use kmmr_protocol::crypto::Digest;
use kmmr_protocol::view::View;
use kmmr_protocol::wire::codec::{Decode, Encode};
use kmmr_protocol::wire::ids::Cid;
use kmmr_protocol::wire::limits;

use super::atomic::{io_err, write_atomic, TEMP_SUFFIX};
use super::StorageError;

const CHECKPOINT_MAGIC: &[u8; 8] = b"KMMRCKP\x01";
const VIEW_MAGIC: &[u8; 8] = b"KMMRVIW\x01";
const CHECKPOINT_PREFIX: &str = "checkpoint-";
const CHECKPOINT_SUFFIX: &str = ".ckpt";
pub(crate) const VIEW_FILE: &str = "view";
/// How many checkpoints are kept: the newest, and one to fall back to if it is damaged.
pub const CHECKPOINTS_KEPT: usize = 2;
/// Fixed bytes of a checkpoint file around the view and the snapshot.
const CHECKPOINT_OVERHEAD: u64 = 8 + 8 + 32 + 4 + 8 + 32;

/// A validated checkpoint: the service state after executing every CID up to `cid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub cid: Cid,
    pub view: View,
    pub snapshot: Vec<u8>,
    /// `Digest::of(snapshot)`, checked on load.
    pub digest: Digest,
}

/// Where a checkpoint's snapshot lies in its file, to read it back piecemeal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotLocation {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

/// A checkpoint's snapshot read in place from its file. The file stays open, so a checkpoint
/// pruned from the directory (unlinked) still reads back until this is dropped.
#[derive(Debug)]
pub struct SnapshotFile {
    file: File,
    offset: u64,
    len: u64,
}

impl SnapshotFile {
    pub fn open(at: &SnapshotLocation) -> std::io::Result<SnapshotFile> {
        Ok(SnapshotFile {
            file: File::open(&at.path)?,
            offset: at.offset,
            len: at.len,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills `buf` from `offset` within the snapshot; reading past its end is an error.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the snapshot",
            ));
        }
        self.file.read_exact_at(buf, self.offset + offset)
    }
}

/// Offset of the snapshot in a checkpoint file whose view encodes to `view_len` bytes.
fn snapshot_offset(view_len: u64) -> u64 {
    8 + 8 + 32 + 4 + view_len + 8
}

/// A checkpoint file that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedFile {
    pub path: PathBuf,
    pub reason: String,
}

pub(crate) fn checkpoint_name(cid: Cid) -> String {
    format!("{CHECKPOINT_PREFIX}{:020}{CHECKPOINT_SUFFIX}", cid.0)
}

/// The CIDs of the checkpoint files in `dir`, oldest first. Temporary files are not listed.
pub(crate) fn list_checkpoints(dir: &Path) -> Result<Vec<(Cid, PathBuf)>, StorageError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(TEMP_SUFFIX) {
            continue;
        }
        let cid = name
            .strip_prefix(CHECKPOINT_PREFIX)
            .and_then(|n| n.strip_suffix(CHECKPOINT_SUFFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(cid) = cid {
            out.push((Cid(cid), entry.path()));
        }
    }
    out.sort_by_key(|(cid, _)| *cid);
    Ok(out)
}

/// Writes a checkpoint atomically and removes all but the newest `CHECKPOINTS_KEPT`.
pub(crate) fn write_checkpoint(
    dir: &Path,
    cid: Cid,
    view: &View,
    snapshot: &[u8],
    digest: Digest,
    max_bytes: u64,
) -> Result<SnapshotLocation, StorageError> {
    let computed = Digest::of(snapshot);
    if computed != digest {
        return Err(StorageError::DigestMismatch {
            cid,
            stated: digest,
            computed,
        });
    }
    let view_bytes = view.to_bytes();
    let size = CHECKPOINT_OVERHEAD + view_bytes.len() as u64 + snapshot.len() as u64;
    if size > max_bytes {
        return Err(StorageError::CheckpointTooLarge {
            len: size,
            limit: max_bytes,
        });
    }
    let view_len =
        u32::try_from(view_bytes.len()).map_err(|_| StorageError::CheckpointTooLarge {
            len: size,
            limit: max_bytes,
        })?;
    let mut head = Vec::with_capacity(64 + view_bytes.len() + 8);
    head.extend_from_slice(CHECKPOINT_MAGIC);
    head.extend_from_slice(&cid.0.to_le_bytes());
    head.extend_from_slice(&digest.0);
    head.extend_from_slice(&view_len.to_le_bytes());
    head.extend_from_slice(&view_bytes);
    head.extend_from_slice(&(snapshot.len() as u64).to_le_bytes());
    let mut h = blake3::Hasher::new();
    h.update(&head);
    h.update(snapshot);
    let checksum = h.finalize();
    let path = write_atomic(
        dir,
        &checkpoint_name(cid),
        &[&head, snapshot, checksum.as_bytes()],
    )?;

    let all = list_checkpoints(dir)?;
    let excess = all.len().saturating_sub(CHECKPOINTS_KEPT);
    let mut removed = false;
    for (old, old_path) in all.into_iter().take(excess) {
        // Never remove the checkpoint just written, even if an older run left newer-named ones.
        if old != cid {
            fs::remove_file(&old_path).map_err(io_err("remove", &old_path))?;
            removed = true;
        }
    }
    if removed {
        super::atomic::sync_dir(dir)?;
    }
    Ok(SnapshotLocation {
        path,
        offset: snapshot_offset(view_bytes.len() as u64),
        len: snapshot.len() as u64,
    })
}

/// Reads and validates one checkpoint file. `Err(reason)` for a damaged file; I/O failures other
/// than reading are reported the same way, since the caller falls back either way.
pub(crate) fn read_checkpoint(path: &Path, max_bytes: u64) -> Result<Checkpoint, String> {
    let file = File::open(path).map_err(|e| format!("open: {e}"))?;
    let len = file.metadata().map_err(|e| format!("stat: {e}"))?.len();
    if len > max_bytes {
        return Err(format!("{len} bytes exceeds the limit {max_bytes}"));
    }
    if len < CHECKPOINT_OVERHEAD {
        return Err(format!("{len} bytes is shorter than any checkpoint"));
    }
    let mut r = HashingReader {
        inner: BufReader::with_capacity(1 << 16, file),
        hasher: blake3::Hasher::new(),
    };
    let magic: [u8; 8] = r.array()?;
    if &magic != CHECKPOINT_MAGIC {
        return Err("bad magic".into());
    }
    let cid = Cid(u64::from_le_bytes(r.array()?));
    let digest = Digest(r.array()?);
    let view_len = u32::from_le_bytes(r.array()?) as u64;
    if view_len > limits::MAX_FRAME as u64 || CHECKPOINT_OVERHEAD + view_len > len {
        return Err(format!("view length {view_len} does not fit the file"));
    }
    let view_bytes = r.vec(view_len as usize)?;
    let snapshot_len = u64::from_le_bytes(r.array()?);
    if CHECKPOINT_OVERHEAD + view_len + snapshot_len != len {
        return Err(format!(
            "snapshot length {snapshot_len} disagrees with the file size {len}"
        ));
    }
    let snapshot_len =
        usize::try_from(snapshot_len).map_err(|_| "snapshot too large for memory".to_string())?;
    let snapshot = r.vec(snapshot_len)?;
    let computed = r.hasher.finalize();
    let mut stored = [0u8; 32];
    r.inner
        .read_exact(&mut stored)
        .map_err(|e| format!("read checksum: {e}"))?;
    if computed.as_bytes() != &stored {
        return Err("checksum mismatch".into());
    }
    let view = View::from_bytes(&view_bytes).map_err(|e| format!("view: {e}"))?;
    if Digest::of(&snapshot) != digest {
        return Err("snapshot does not match its digest".into());
    }
    Ok(Checkpoint {
        cid,
        view,
        snapshot,
        digest,
    })
}

/// A checkpoint read from disk, and where its snapshot lies in its file.
pub(crate) type Located = (Checkpoint, SnapshotLocation);

/// The newest valid checkpoint in `dir` and where its snapshot lies, and the newer files that
/// were rejected on the way.
pub(crate) fn load_latest(
    dir: &Path,
    max_bytes: u64,
) -> Result<(Option<Located>, Vec<RejectedFile>), StorageError> {
    let mut rejected = Vec::new();
    for (cid, path) in list_checkpoints(dir)?.into_iter().rev() {
        match read_checkpoint(&path, max_bytes) {
            Ok(c) if c.cid == cid => {
                let at = SnapshotLocation {
                    path,
                    offset: snapshot_offset(c.view.to_bytes().len() as u64),
                    len: c.snapshot.len() as u64,
                };
                return Ok((Some((c, at)), rejected));
            }
            Ok(c) => rejected.push(RejectedFile {
                path,
                reason: format!("holds CID {} but is named for {cid}", c.cid),
            }),
            Err(reason) => rejected.push(RejectedFile { path, reason }),
        }
    }
    Ok((None, rejected))
}

/// Persists the current view atomically.
pub(crate) fn write_view(dir: &Path, view: &View) -> Result<(), StorageError> {
    let bytes = view.to_bytes();
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes();
    let mut h = blake3::Hasher::new();
    h.update(VIEW_MAGIC).update(&len).update(&bytes);
    let checksum = h.finalize();
    write_atomic(
        dir,
        VIEW_FILE,
        &[VIEW_MAGIC, &len, &bytes, checksum.as_bytes()],
    )?;
    Ok(())
}

/// The persisted view: `Ok(None)` if none was ever written, `Err(reason)` if it is damaged.
pub(crate) fn read_view(dir: &Path) -> Result<Option<View>, String> {
    let path = dir.join(VIEW_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("read: {e}")),
    };
    // magic, length, checksum; the view itself is bounded by the frame limit.
    if bytes.len() < 8 + 4 + 32 || bytes.len() > 8 + 4 + 32 + limits::MAX_FRAME {
        return Err(format!("{} bytes is not a view file", bytes.len()));
    }
    let (body, stored) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != stored {
        return Err("checksum mismatch".into());
    }
    if &body[..8] != VIEW_MAGIC {
        return Err("bad magic".into());
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&body[8..12]);
    if u32::from_le_bytes(len) as usize != body.len() - 12 {
        return Err("length disagrees with the file size".into());
    }
    View::from_bytes(&body[12..])
        .map(Some)
        .map_err(|e| format!("view: {e}"))
}

/// Reads through a BLAKE3 hasher, so the checksum is computed in the same pass as the parse.
struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> HashingReader<R> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.inner
            .read_exact(&mut b)
            .map_err(|e| format!("read: {e}"))?;
        self.hasher.update(&b);
        Ok(b)
    }

    /// `len` was checked against the file size before this is called, so the allocation is
    /// backed by bytes that exist.
    fn vec(&mut self, len: usize) -> Result<Vec<u8>, String> {
        let mut v = vec![0u8; len];
        self.inner
            .read_exact(&mut v)
            .map_err(|e| format!("read: {e}"))?;
        self.hasher.update(&v);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_sort_by_cid() {
        let a = checkpoint_name(Cid(9));
        let b = checkpoint_name(Cid(10));
        assert!(a < b, "{a} < {b}");
    }

    #[test]
    fn a_file_too_short_or_too_long_is_rejected_before_reading_it() {
        let dir = std::env::temp_dir().join(format!("kmmr-ckpt-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(checkpoint_name(Cid(1)));
        fs::write(&path, [0u8; 10]).unwrap();
        assert!(read_checkpoint(&path, 1 << 20)
            .unwrap_err()
            .contains("shorter"));
        fs::write(&path, vec![0u8; 4096]).unwrap();
        assert!(read_checkpoint(&path, 1024)
            .unwrap_err()
            .contains("exceeds"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
