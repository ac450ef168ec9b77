//! Durable state of one replica: the write-ahead log of decided instances, checkpoints of the
//! service, the current view, and local recovery on restart.
//!
//! It owns one directory and everything in it:
//!
//! ```text
//! wal-<first cid>.log          log segments (see `wal`), 64 MiB by default
//! checkpoint-<cid>.ckpt        the newest two checkpoints (see `checkpoint`)
//! view                         the current view
//! promise-0, promise-1         the last votes in the instance in progress (see `promise`;
//!                              written by the node, not by `Storage`)
//! *.tmp                        leftovers of interrupted atomic writes, removed on open
//! ```
//!
//! It never interprets what it stores: it does not verify proofs, execute batches, restore the
//! service or decide when to checkpoint, and it has no dependency on the protocol core. Nothing
//! it reads from disk is trusted: every file is checksummed and bounded, damage is reported and
//! repaired (torn tails truncated, a damaged checkpoint skipped for the older one), and it never
//! panics on file contents. It uses no async runtime: fsyncs run on its own `std::thread`.
//!
//! How the node drives it:
//!
//! 1. `Storage::open(dir, config)` recovers: the newest valid checkpoint, the decisions after it
//!    (contiguous, ready to replay), the persisted view, and a report of what was repaired.
//! 2. For each decided instance, in CID order, `append(&decision)`. It writes and returns
//!    without waiting for the disk; the group-commit thread fsyncs in batches and advances the
//!    durable CID (`durable_cid()`, `durable_watch()`, or `StorageConfig::on_durable`). The node
//!    sends the decisions not durable yet along with its next promise (`promise`), so it never
//!    waits for the log. `sync()` forces everything appended so far to disk.
//! 3. At each checkpoint: `write_checkpoint(cid, view, snapshot, digest)`, then
//!    `truncate_log_before(c + 1)` where `c` is the *older* retained checkpoint's CID
//!    (`checkpoint_cids()[0]`), so the log can still replay from the fallback checkpoint if the
//!    newest one is ever found damaged. After installing a transferred checkpoint at `cid`,
//!    `write_checkpoint` then `truncate_log_before(cid + 1)` restarts the log after it.
//! 4. On every view change: `write_view(&view)`.
//! 5. To serve state transfer: `load_latest_checkpoint()` and `read_log(from)`.

mod atomic;
pub mod checkpoint;
pub mod commit;
pub mod promise;
pub mod wal;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kmmr_protocol::crypto::Digest;
use kmmr_protocol::view::View;
use kmmr_protocol::wire::codec::Encode;
use kmmr_protocol::wire::ids::Cid;
use kmmr_protocol::wire::messages::Decision;

pub(crate) use atomic::write_atomic;
use atomic::{io_err, remove_temp_files, sync_dir};
pub use checkpoint::{Checkpoint, RejectedFile, SnapshotFile, SnapshotLocation, CHECKPOINTS_KEPT};
use commit::{Committer, Shared};
pub use commit::{DurableCallback, DurableWatch};
use wal::Wal;
pub use wal::{Damage, LogDamage, LogReader, MAX_RECORD};

/// What cannot be recovered from, or was asked wrongly. Damage that recovery repairs is not an
/// error: it is reported in `RecoveryReport`.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("decision for CID {got} appended out of order: the log expects CID {expected}")]
    OutOfOrder { expected: Cid, got: Cid },
    #[error("a log record of {len} bytes exceeds the limit of {limit}")]
    RecordTooLarge { len: usize, limit: usize },
    #[error("a checkpoint of {len} bytes exceeds the limit of {limit} (StorageConfig::max_checkpoint_bytes)")]
    CheckpointTooLarge { len: u64, limit: u64 },
    #[error("checkpoint at CID {cid}: the stated digest {stated} is not the snapshot's digest {computed}")]
    DigestMismatch {
        cid: Cid,
        stated: Digest,
        computed: Digest,
    },
    #[error("{} is corrupt at offset {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("the log can no longer be written ({0}); restart the replica to recover")]
    Failed(String),
    #[error("the storage is closed")]
    Closed,
}

impl StorageError {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            StorageError::Io { .. } => "io",
            StorageError::OutOfOrder { .. } => "out_of_order",
            StorageError::RecordTooLarge { .. } => "record_too_large",
            StorageError::CheckpointTooLarge { .. } => "checkpoint_too_large",
            StorageError::DigestMismatch { .. } => "digest_mismatch",
            StorageError::Corrupt { .. } => "corrupt",
            StorageError::Failed(_) => "failed",
            StorageError::Closed => "closed",
        }
    }
}

/// When appended records are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// By the group-commit thread, many records per fsync; `append` never waits for the disk.
    #[default]
    Group,
    /// By `append` itself, one fsync per record. Slow; kept as the baseline to measure against.
    PerRecord,
}

/// Tuning of one replica's storage.
#[derive(Clone)]
pub struct StorageConfig {
    /// A new segment starts when the current one would exceed this many bytes.
    pub segment_bytes: u64,
    pub sync: SyncMode,
    /// Extra time the group-commit thread waits before each fsync to gather more records.
    /// Zero (the default) already batches everything written during the previous fsync.
    pub group_window: Duration,
    /// The window ends early once this many bytes wait for their fsync.
    pub group_bytes: u64,
    /// Largest checkpoint file written or read; bounds the memory a load allocates.
    pub max_checkpoint_bytes: u64,
    /// Called from the group-commit thread with each new highest durable CID.
    pub on_durable: Option<DurableCallback>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            segment_bytes: 64 * 1024 * 1024,
            sync: SyncMode::Group,
            group_window: Duration::ZERO,
            group_bytes: 1 << 20,
            max_checkpoint_bytes: 4 * 1024 * 1024 * 1024,
            on_durable: None,
        }
    }
}

impl fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageConfig")
            .field("segment_bytes", &self.segment_bytes)
            .field("sync", &self.sync)
            .field("group_window", &self.group_window)
            .field("group_bytes", &self.group_bytes)
            .field("max_checkpoint_bytes", &self.max_checkpoint_bytes)
            .field("on_durable", &self.on_durable.is_some())
            .finish()
    }
}

/// What local recovery found.
#[derive(Debug)]
pub struct Recovered {
    /// The newest valid checkpoint: restore the service from it.
    pub checkpoint: Option<Checkpoint>,
    /// Where `checkpoint`'s snapshot lies on disk, to serve it from there.
    pub checkpoint_location: Option<SnapshotLocation>,
    /// Every logged decision after the checkpoint (from CID 0 without one), contiguous and in
    /// order: replay them. Their proofs were checked when they were decided, not here.
    pub decisions: Vec<Decision>,
    /// The logged decision at the checkpoint's own CID: its proof shows where the replica
    /// stands in a leader change (a new leader refuses a STOPDATA that cannot prove it).
    pub checkpoint_decision: Option<Decision>,
    /// The persisted view, if one was written and is intact.
    pub view: Option<View>,
    pub report: RecoveryReport,
}

impl Recovered {
    /// The CID the replica runs next once it has replayed `decisions`.
    pub fn next_cid(&self) -> Cid {
        match (self.decisions.last(), &self.checkpoint) {
            (Some(d), _) => d.cid.next(),
            (None, Some(c)) => c.cid.next(),
            (None, None) => Cid(0),
        }
    }
}

/// What recovery repaired or ignored. Empty after a clean shutdown.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Where the log was cut, and what went with it.
    pub log_damage: Option<LogDamage>,
    /// Checkpoint files newer than the one used, and why they were rejected.
    pub rejected_checkpoints: Vec<RejectedFile>,
    /// The view file exists but is damaged (the view must then be learned from peers).
    pub view_error: Option<String>,
    /// Leftover temporary files of interrupted atomic writes, removed.
    pub removed_temp_files: Vec<PathBuf>,
    /// The log did not connect to the checkpoint (it starts after it, or ends before it), so it
    /// could not be replayed and was removed; state transfer fetches what is missing.
    pub log_reset: Option<LogReset>,
}

impl RecoveryReport {
    pub fn is_clean(&self) -> bool {
        self.log_damage.is_none()
            && self.rejected_checkpoints.is_empty()
            && self.view_error.is_none()
            && self.removed_temp_files.is_empty()
            && self.log_reset.is_none()
    }
}

/// A log that could not be replayed on top of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogReset {
    /// The first CID replay needed (the checkpoint's CID + 1, or 0).
    pub needed: Cid,
    /// The CIDs the log held, `[first, end)`.
    pub first: Cid,
    pub end: Cid,
    pub removed_segments: Vec<PathBuf>,
}

/// Writes checkpoint files into a storage directory; see `Storage::checkpoint_writer`. Only one
/// writer may be used at a time: each write also prunes the older checkpoints.
#[derive(Debug, Clone)]
pub struct CheckpointWriter {
    dir: PathBuf,
    max_bytes: u64,
}

impl CheckpointWriter {
    /// Same as `Storage::write_checkpoint`; says where the snapshot was written.
    pub fn write(
        &self,
        cid: Cid,
        view: &View,
        snapshot: &[u8],
        digest: Digest,
    ) -> Result<SnapshotLocation, StorageError> {
        checkpoint::write_checkpoint(&self.dir, cid, view, snapshot, digest, self.max_bytes)
    }
}

/// The durable state of one replica. Owned by one thread; `durable_watch()` hands out a
/// cloneable handle for others.
pub struct Storage {
    dir: PathBuf,
    config: StorageConfig,
    wal: Wal,
    shared: Arc<Shared>,
    /// The group-commit thread; dropped (after a final fsync) with the storage.
    _committer: Option<Committer>,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("dir", &self.dir)
            .field("next_cid", &self.wal.next_cid())
            .field("durable", &self.shared.durable())
            .finish()
    }
}

impl Storage {
    /// Opens (creating it if needed) the storage in `dir` and recovers its contents.
    pub fn open(
        dir: impl AsRef<Path>,
        config: StorageConfig,
    ) -> Result<(Self, Recovered), StorageError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let mut report = RecoveryReport {
            removed_temp_files: remove_temp_files(&dir)?,
            ..RecoveryReport::default()
        };

        let (loaded, rejected) = checkpoint::load_latest(&dir, config.max_checkpoint_bytes)?;
        let (checkpoint, checkpoint_location) = loaded.unzip();
        report.rejected_checkpoints = rejected;
        let view = match checkpoint::read_view(&dir) {
            Ok(v) => v,
            Err(e) => {
                report.view_error = Some(e);
                None
            }
        };

        // Stream the log, keeping only what replays on top of the checkpoint; records are
        // contiguous, so the first one kept decides whether the log connects.
        let needed = checkpoint.as_ref().map_or(Cid(0), |c| c.cid.next());
        let mut decisions = Vec::new();
        let mut checkpoint_decision = None;
        let mut connects = true;
        let scanned = wal::recover(&dir, |d| {
            if checkpoint.as_ref().is_some_and(|c| c.cid == d.cid) {
                checkpoint_decision = Some(d);
            } else if d.cid >= needed && connects {
                if decisions.is_empty() && d.cid != needed {
                    connects = false;
                } else {
                    decisions.push(d);
                }
            }
        })?;
        report.log_damage = scanned.damage.clone();

        // Records recovered after a process crash may sit in the page cache only: make them
        // durable before reporting them durable.
        for (_, path) in &scanned.segments {
            fs::File::open(path)
                .and_then(|f| f.sync_all())
                .map_err(io_err("fsync", path))?;
        }
        sync_dir(&dir)?;

        let mut wal = Wal::resume(&dir, config.segment_bytes, &scanned)?;
        // Everything the checkpoint covers is durable too.
        let mut durable = scanned.last.max(checkpoint.as_ref().map(|c| c.cid));
        if let (Some(first), Some(end)) = (wal.first_cid(), wal.next_cid()) {
            // The log replays on top of the checkpoint iff `[first, end)` reaches `needed`.
            if !connects || first > needed || end < needed {
                let unused = Shared::new(dir.clone(), None, None);
                let removed_segments = wal.truncate_before(Cid(u64::MAX), &unused)?;
                wal.restart_at(needed);
                decisions.clear();
                // What the checkpoint covers is durable; nothing after it is any more.
                durable = needed.0.checked_sub(1).map(Cid);
                report.log_reset = Some(LogReset {
                    needed,
                    first,
                    end,
                    removed_segments,
                });
            }
        }
        let shared = Arc::new(Shared::new(dir.clone(), durable, config.on_durable.clone()));

        let committer = match config.sync {
            SyncMode::Group => Some(Committer::start(
                shared.clone(),
                config.group_window,
                config.group_bytes,
            )?),
            SyncMode::PerRecord => None,
        };
        let storage = Storage {
            dir,
            config,
            wal,
            shared,
            _committer: committer,
        };
        Ok((
            storage,
            Recovered {
                checkpoint,
                checkpoint_location,
                decisions,
                checkpoint_decision,
                view,
                report,
            },
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends a decided instance. Its CID must follow the last one appended (any CID is taken
    /// by an empty log). Returns once the record is written, before it is durable.
    pub fn append(&mut self, decision: &Decision) -> Result<(), StorageError> {
        self.shared.check()?;
        let bytes = decision.to_bytes();
        self.wal
            .append(decision.cid, &bytes, &self.shared, self.config.sync)
    }

    /// The CID the next append must carry, if the log constrains it.
    pub fn next_cid(&self) -> Option<Cid> {
        self.wal.next_cid()
    }

    /// The highest CID whose decision, with every one before it, is on disk.
    pub fn durable_cid(&self) -> Option<Cid> {
        self.shared.durable()
    }

    /// A cloneable handle to the durable CID, for threads or tasks that wait on it.
    pub fn durable_watch(&self) -> DurableWatch {
        DurableWatch {
            shared: self.shared.clone(),
        }
    }

    /// Blocks until everything appended so far is on disk; returns the durable CID.
    pub fn sync(&self) -> Result<Option<Cid>, StorageError> {
        self.shared.sync()
    }

    /// Writes a checkpoint of the service state after executing `cid`, atomically, and keeps
    /// only the newest `CHECKPOINTS_KEPT`. `digest` must be `Digest::of(snapshot)`.
    pub fn write_checkpoint(
        &mut self,
        cid: Cid,
        view: &View,
        snapshot: &[u8],
        digest: Digest,
    ) -> Result<(), StorageError> {
        checkpoint::write_checkpoint(
            &self.dir,
            cid,
            view,
            snapshot,
            digest,
            self.config.max_checkpoint_bytes,
        )?;
        Ok(())
    }

    /// A handle that writes checkpoints from another thread, so that writing a large one does
    /// not hold up appends.
    pub fn checkpoint_writer(&self) -> CheckpointWriter {
        CheckpointWriter {
            dir: self.dir.clone(),
            max_bytes: self.config.max_checkpoint_bytes,
        }
    }

    /// The newest checkpoint that validates (checksum and digest), falling back to older ones.
    pub fn load_latest_checkpoint(&self) -> Result<Option<Checkpoint>, StorageError> {
        let (c, rejected) = checkpoint::load_latest(&self.dir, self.config.max_checkpoint_bytes)?;
        for r in rejected {
            tracing::warn!(path = %r.path.display(), reason = %r.reason, "skipped a damaged checkpoint");
        }
        Ok(c.map(|(c, _)| c))
    }

    /// CIDs of the checkpoint files on disk, oldest first (not validated).
    pub fn checkpoint_cids(&self) -> Result<Vec<Cid>, StorageError> {
        Ok(checkpoint::list_checkpoints(&self.dir)?
            .into_iter()
            .map(|(c, _)| c)
            .collect())
    }

    /// Removes the log segments whose decisions all precede `cid` (whole segments only: a
    /// segment that also holds `cid` or later stays). Returns the removed files.
    pub fn truncate_log_before(&mut self, cid: Cid) -> Result<Vec<PathBuf>, StorageError> {
        self.wal.truncate_before(cid, &self.shared)
    }

    /// Removes the whole log and makes it continue at `cid + 1`. For a transferred checkpoint
    /// at `cid` that replaces a state the log had already gone past (a diverged replica
    /// repairing itself): its old successors must not stay in front of the ones replayed next.
    pub fn restart_log_after(&mut self, cid: Cid) -> Result<Vec<PathBuf>, StorageError> {
        let removed = self.wal.truncate_before(Cid(u64::MAX), &self.shared)?;
        self.wal.restart_at(cid.next());
        Ok(removed)
    }

    /// Persists the current view atomically.
    pub fn write_view(&mut self, view: &View) -> Result<(), StorageError> {
        checkpoint::write_view(&self.dir, view)
    }

    /// Streams the logged decisions from `from` on.
    pub fn read_log(&self, from: Cid) -> LogReader {
        LogReader::new(self.wal.segment_paths(), from)
    }

    /// The log segments on disk, by first CID.
    pub fn segments(&self) -> Vec<(Cid, PathBuf)> {
        self.wal.segment_paths()
    }
}
