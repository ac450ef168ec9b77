//! The replica's storage (`crate::storage`) driven from the node.
//!
//! The node loop never touches the disk. Log appends, trims and view writes go, in the order the
//! core emitted them, to one thread that owns the `Storage`; checkpoint files, which can be
//! gigabytes, go to a second thread, so that writing one holds up neither ordering nor the
//! appends behind it.
//!
//! What is durable comes back on a watch channel: the group-commit thread publishes each fsynced
//! CID, the checkpoint thread each checkpoint written (a checkpoint makes every CID it covers
//! durable). A promise carries the decisions after the published CID (see the node).
//!
//! Each checkpoint written also comes back, opened for reading, on the `stored` channel: the
//! core then serves state transfer from the file and drops its in-memory copy, so a replica
//! holds its state once, not once more per checkpoint kept.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};

use crate::storage::{
    CheckpointWriter, Recovered, SnapshotFile, SnapshotLocation, Storage, StorageConfig,
    StorageError,
};
use kmmr_protocol::core::state::{Checkpoint, StoredCheckpoint};
use kmmr_protocol::crypto::Digest;
use kmmr_protocol::view::View;
use kmmr_protocol::wire::ids::Cid;
use kmmr_protocol::wire::messages::Decision;

impl StoredCheckpoint for SnapshotFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        SnapshotFile::read_at(self, offset, buf)
    }
}

/// A checkpoint on disk, ready to serve from: its CID and digest, and its file opened.
pub struct Stored {
    pub cid: Cid,
    pub digest: Digest,
    pub file: Arc<dyn StoredCheckpoint>,
}

impl Stored {
    pub fn open(cid: Cid, digest: Digest, at: &SnapshotLocation) -> std::io::Result<Stored> {
        Ok(Stored {
            cid,
            digest,
            file: Arc::new(SnapshotFile::open(at)?),
        })
    }
}

/// Work for the thread that owns the log.
enum LogCmd {
    Append(Decision),
    /// A checkpoint was written: drop log segments before this CID, as far as the older
    /// checkpoint on disk allows.
    Trim(Cid),
    /// A transferred checkpoint at this CID replaced the state: the log continues after it.
    RestartAfter(Cid),
    View(View),
}

struct CheckpointJob {
    checkpoint: Checkpoint,
    view: View,
    /// For a checkpoint taken here: the log before this CID is no longer needed.
    trim_before: Option<Cid>,
}

/// Combines the log's durable CID with the checkpoints written into one published value.
struct Publisher {
    tx: watch::Sender<Option<Cid>>,
    state: Mutex<PublishState>,
    /// Signalled on every update, for the checkpoint thread waiting for the log.
    updated: Condvar,
}

/// How long the log gathers decisions before an fsync, and how many bytes end that early.
/// Replies leave behind the promise of the replica's ACCEPT, not behind the log, so a log fsync
/// per decision only queued on the device ahead of the next instance's promises: with 5 ms, one
/// client's median fell from 1.10 to 1.00 ms at n=4 (4 interleaved rounds; 10 ms measured the
/// same as 5). What does wait: a reply from an instance this replica caught up on instead of
/// voting in (`Replica::log_durable`; the other replicas' replies usually come first), and a
/// checkpoint.
const LOG_WINDOW: Duration = Duration::from_millis(5);
const LOG_WINDOW_BYTES: u64 = 256 << 10;

/// How long a checkpoint waits for the log to hold its decision durably. Longer means the log
/// thread stopped on a storage error (reported on its own), and the checkpoint is not written.
const CHECKPOINT_LOG_WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct PublishState {
    log: Option<Cid>,
    checkpoint: Option<Cid>,
    /// A transferred checkpoint at this CID is not on disk yet. The log restarts after it, so
    /// until it is written a durable log record proves nothing: a crash would lose the state the
    /// record builds on.
    gate: Option<Cid>,
}

impl Publisher {
    fn update(&self, f: impl FnOnce(&mut PublishState)) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        self.updated.notify_all();
        if let Some(g) = s.gate {
            if s.checkpoint >= Some(g) {
                s.gate = None;
            } else {
                return;
            }
        }
        let value = s.log.max(s.checkpoint);
        drop(s);
        // Monotonic: readers compare reply CIDs against it.
        self.tx.send_if_modified(|d| {
            if value > *d {
                *d = value;
                true
            } else {
                false
            }
        });
    }
}

impl Publisher {
    /// Waits until the log is durable through `cid`; false if `limit` passed first.
    fn wait_for_log(&self, cid: Cid, limit: Duration) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (s, _) = self
            .updated
            .wait_timeout_while(s, limit, |s| s.log < Some(cid))
            .unwrap_or_else(|p| p.into_inner());
        s.log >= Some(cid)
    }
}

/// The storage threads of one replica.
pub struct Durability {
    log: Option<std_mpsc::Sender<LogCmd>>,
    checkpoints: Option<std_mpsc::Sender<CheckpointJob>>,
    publisher: Arc<Publisher>,
    durable: watch::Receiver<Option<Cid>>,
    threads: Vec<JoinHandle<()>>,
}

impl Durability {
    /// Opens (and recovers) the storage in `dir` and starts its threads. A storage failure after
    /// this is reported once on `failures`, and the threads stop: the replica must restart.
    pub fn open(
        dir: &std::path::Path,
        failures: mpsc::UnboundedSender<String>,
        stored: mpsc::UnboundedSender<Stored>,
    ) -> Result<(Durability, Recovered)> {
        let (tx, durable) = watch::channel(None);
        let publisher = Arc::new(Publisher {
            tx,
            state: Mutex::new(PublishState::default()),
            updated: Condvar::new(),
        });
        let p = publisher.clone();
        let config = StorageConfig {
            on_durable: Some(Arc::new(move |c| p.update(|s| s.log = Some(c)))),
            group_window: LOG_WINDOW,
            group_bytes: LOG_WINDOW_BYTES,
            ..StorageConfig::default()
        };
        let (storage, recovered) = Storage::open(dir, config)
            .with_context(|| format!("opening the storage in {}", dir.display()))?;
        let recovered_durable = storage.durable_cid();
        publisher.update(|s| s.log = s.log.max(recovered_durable));
        let writer = storage.checkpoint_writer();
        let (log_tx, log_rx) = std_mpsc::channel();
        let (ck_tx, ck_rx) = std_mpsc::channel();
        let f = failures.clone();
        let log_thread = std::thread::Builder::new()
            .name("kmmr-log".into())
            .spawn(move || run_log(storage, log_rx, f))
            .context("starting the log thread")?;
        let (p, log) = (publisher.clone(), log_tx.clone());
        let ck_thread = std::thread::Builder::new()
            .name("kmmr-checkpoint".into())
            .spawn(move || run_checkpoints(writer, ck_rx, log, p, failures, stored))
            .context("starting the checkpoint thread")?;
        Ok((
            Durability {
                log: Some(log_tx),
                checkpoints: Some(ck_tx),
                publisher,
                durable,
                threads: vec![log_thread, ck_thread],
            },
            recovered,
        ))
    }

    /// The highest CID whose effects are on disk.
    pub fn durable(&self) -> Option<Cid> {
        *self.durable.borrow()
    }

    /// A receiver that wakes on every new durable CID.
    pub fn watch(&self) -> watch::Receiver<Option<Cid>> {
        self.durable.clone()
    }

    // Sends fail only once a thread stopped on a storage error, which `failures` reported.

    pub fn append(&self, decision: Decision) {
        self.send_log(LogCmd::Append(decision));
    }

    pub fn checkpoint(&self, checkpoint: Checkpoint, view: View, trim_before: Cid) {
        self.send_checkpoint(CheckpointJob {
            checkpoint,
            view,
            trim_before: Some(trim_before),
        });
    }

    /// A transferred checkpoint replaced the state. Call before appending what follows it.
    pub fn installed(&self, checkpoint: Checkpoint, view: View) {
        let cid = checkpoint.meta.cid;
        self.publisher
            .update(|s| s.gate = Some(s.gate.map_or(cid, |g| g.max(cid))));
        self.send_log(LogCmd::RestartAfter(cid));
        self.send_checkpoint(CheckpointJob {
            checkpoint,
            view,
            trim_before: None,
        });
    }

    pub fn view(&self, view: View) {
        self.send_log(LogCmd::View(view));
    }

    fn send_log(&self, cmd: LogCmd) {
        if let Some(tx) = &self.log {
            let _ = tx.send(cmd);
        }
    }

    fn send_checkpoint(&self, job: CheckpointJob) {
        if let Some(tx) = &self.checkpoints {
            let _ = tx.send(job);
        }
    }

    /// Finishes every write queued so far (the log's final fsync included) and stops the
    /// threads. Blocks.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // The checkpoint thread holds a sender to the log thread, so it stops first.
        self.checkpoints = None;
        self.log = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Durability {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run_log(
    mut storage: Storage,
    rx: std_mpsc::Receiver<LogCmd>,
    failures: mpsc::UnboundedSender<String>,
) {
    while let Ok(cmd) = rx.recv() {
        let result = match cmd {
            LogCmd::Append(d) => storage.append(&d),
            LogCmd::Trim(before) => trim(&mut storage, before),
            LogCmd::RestartAfter(cid) => restart_after(&mut storage, cid),
            LogCmd::View(v) => storage.write_view(&v),
        };
        if let Err(e) = result {
            let _ = failures.send(format!("the write-ahead log failed: {e}"));
            return;
        }
    }
    // Dropping the storage fsyncs whatever is still unsynced.
}

fn trim(storage: &mut Storage, before: Cid) -> Result<(), StorageError> {
    // The log must still replay from the older checkpoint on disk, in case the newest one is
    // ever found damaged.
    let fallback = storage.checkpoint_cids()?.first().map(|c| c.next());
    let before = fallback.map_or(before, |f| f.min(before));
    let removed = storage.truncate_log_before(before)?;
    if !removed.is_empty() {
        tracing::debug!(
            segments = removed.len(),
            before = before.0,
            "log segments removed"
        );
    }
    Ok(())
}

fn restart_after(storage: &mut Storage, cid: Cid) -> Result<(), StorageError> {
    storage.truncate_log_before(cid.next())?;
    if storage.next_cid() != Some(cid.next()) {
        // The log went past the checkpoint: this replica diverged and replays from it.
        storage.restart_log_after(cid)?;
    }
    Ok(())
}

fn run_checkpoints(
    writer: CheckpointWriter,
    rx: std_mpsc::Receiver<CheckpointJob>,
    log: std_mpsc::Sender<LogCmd>,
    publisher: Arc<Publisher>,
    failures: mpsc::UnboundedSender<String>,
    stored: mpsc::UnboundedSender<Stored>,
) {
    while let Ok(mut job) = rx.recv() {
        // While a large checkpoint was written, newer ones may have queued up: only the newest
        // is worth writing, it covers the others.
        let mut skipped = 0;
        while let Ok(newer) = rx.try_recv() {
            job = newer;
            skipped += 1;
        }
        let meta = job.checkpoint.meta;
        let trim_before = job.trim_before;
        // A checkpoint taken here goes to disk only after the decision at its CID: recovery
        // keeps that decision beside the checkpoint, and its proof is how a restarted replica
        // shows a new leader where it stands (if every replica that decided it lost the proof,
        // no leader change could complete).
        if trim_before.is_some() && !publisher.wait_for_log(meta.cid, CHECKPOINT_LOG_WAIT) {
            tracing::warn!(
                cid = meta.cid.0,
                "the log did not make the checkpoint's decision durable in time; checkpoint not written"
            );
            continue;
        }
        let t0 = Instant::now();
        let at = match writer.write(meta.cid, &job.view, &job.checkpoint.bytes, meta.digest) {
            Ok(at) => at,
            Err(e) => {
                let _ = failures.send(format!(
                    "writing the checkpoint at CID {} failed: {e}",
                    meta.cid.0
                ));
                return;
            }
        };
        // This thread's reference goes before the core is told, so the core's is the last.
        drop(job);
        match Stored::open(meta.cid, meta.digest, &at) {
            Ok(s) => {
                let _ = stored.send(s);
            }
            // Not fatal: the core keeps serving from memory.
            Err(e) => tracing::warn!(
                cid = meta.cid.0,
                error = %e,
                "cannot reopen the checkpoint just written; serving it from memory"
            ),
        }
        tracing::info!(
            cid = meta.cid.0,
            bytes = meta.len,
            ms = t0.elapsed().as_millis() as u64,
            skipped,
            "checkpoint stored"
        );
        publisher.update(|s| s.checkpoint = s.checkpoint.max(Some(meta.cid)));
        if let Some(t) = trim_before {
            let _ = log.send(LogCmd::Trim(t));
        }
    }
}
