//! Group commit: a background thread that makes written log records durable in batches.
//!
//! The appending thread writes records into the page cache and returns at once; this thread
//! fsyncs whatever was written since its last fsync, then publishes the highest CID that is now
//! durable. Records written while one fsync runs are covered by the next, so under load one
//! fsync serves many decisions without any timer. It is a plain `std::thread` so it works under
//! any async runtime, or none.
//!
//! An fsync failure is sticky: after one, the kernel may have dropped the dirty pages, so no
//! later fsync can prove that earlier records reached the disk (PostgreSQL's "fsyncgate").
//! Every later append, sync and wait then fails, and the node must restart and recover.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kmmr_protocol::wire::ids::Cid;

use super::atomic::sync_dir;
use super::StorageError;

/// Called from the group-commit thread with each new highest durable CID, in increasing order.
/// It must not block: forward it (a `tokio::sync::watch::Sender::send_replace`, an atomic, a
/// non-blocking channel send) and return.
pub type DurableCallback = Arc<dyn Fn(Cid) + Send + Sync>;

/// What the appender and the group-commit thread share.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Wakes the group-commit thread.
    work: Condvar,
    /// Wakes threads waiting for durability.
    durable_changed: Condvar,
    /// Highest durable CID + 1; 0 while nothing is durable. Read without the lock.
    durable: AtomicU64,
    callback: Option<DurableCallback>,
    dir: PathBuf,
}

#[derive(Default)]
struct State {
    /// Highest CID written to a segment (page cache), not necessarily durable.
    written: Option<Cid>,
    /// Highest CID known durable.
    durable: Option<Cid>,
    /// The segment being appended to.
    current: Option<Arc<File>>,
    /// Segments closed since the last fsync, with records not yet synced.
    closed: Vec<Arc<File>>,
    /// A segment was created since the last fsync: its directory entry must be synced too.
    dir_dirty: bool,
    /// Bytes written since the last fsync began.
    unsynced_bytes: u64,
    /// Someone waits in `sync`: no extra batching window.
    urgent: bool,
    /// The first fsync failure; sticky.
    failed: Option<String>,
    shutdown: bool,
}

impl State {
    fn pending(&self) -> bool {
        self.written > self.durable || self.dir_dirty
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock is a bug elsewhere; the state itself stays consistent
    // (every update is a single assignment), so keep going rather than cascade the panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn new(
        dir: PathBuf,
        durable: Option<Cid>,
        callback: Option<DurableCallback>,
    ) -> Self {
        Shared {
            state: Mutex::new(State {
                written: durable,
                durable,
                ..State::default()
            }),
            work: Condvar::new(),
            durable_changed: Condvar::new(),
            durable: AtomicU64::new(encode(durable)),
            callback,
            dir,
        }
    }

    pub(crate) fn durable(&self) -> Option<Cid> {
        decode(self.durable.load(Ordering::Acquire))
    }

    pub(crate) fn check(&self) -> Result<(), StorageError> {
        match &lock(&self.state).failed {
            Some(e) => Err(StorageError::Failed(e.clone())),
            None => Ok(()),
        }
    }

    /// Records that `cid` was written to `file` (the current segment); `new_segment` says the
    /// file was just created. Wakes the group-commit thread.
    pub(crate) fn written(&self, cid: Cid, file: &Arc<File>, new_segment: bool, bytes: u64) {
        let mut s = lock(&self.state);
        s.unsynced_bytes = s.unsynced_bytes.saturating_add(bytes);
        if new_segment {
            if let Some(old) = s.current.replace(file.clone()) {
                s.closed.push(old);
            }
            s.dir_dirty = true;
        } else if s.current.is_none() {
            s.current = Some(file.clone());
        }
        s.written = Some(cid);
        drop(s);
        self.work.notify_one();
    }

    /// Records that everything up to `cid` is durable because the appender synced it itself.
    pub(crate) fn synced_inline(&self, cid: Cid, file: &Arc<File>) {
        let mut s = lock(&self.state);
        s.current = Some(file.clone());
        s.closed.clear();
        s.dir_dirty = false;
        s.written = Some(cid);
        drop(s);
        self.publish(Some(cid));
    }

    /// The segments were removed: forget their handles (an fsync of an unlinked file is
    /// harmless, but holding them keeps their blocks allocated).
    pub(crate) fn segments_removed(&self) {
        let mut s = lock(&self.state);
        s.current = None;
        s.closed.clear();
    }

    pub(crate) fn fail(&self, reason: String) {
        let mut s = lock(&self.state);
        s.failed.get_or_insert(reason);
        drop(s);
        self.durable_changed.notify_all();
    }

    /// Publishes `cid` as durable (if it is news) and wakes every waiter either way: a waiter
    /// may be waiting for a directory sync that did not move the durable CID. The callback runs
    /// first, so whoever `sync` or `wait_for` releases knows the callback has seen the CID.
    /// Only one thread publishes (the group-commit thread, or the appender with `PerRecord`),
    /// which keeps the callback's CIDs increasing.
    fn publish(&self, cid: Option<Cid>) {
        let news = cid.filter(|c| lock(&self.state).durable < Some(*c));
        if let (Some(c), Some(cb)) = (news, &self.callback) {
            cb(c);
        }
        let mut s = lock(&self.state);
        if let Some(c) = news {
            s.durable = Some(c);
            self.durable.store(encode(Some(c)), Ordering::Release);
        }
        drop(s);
        self.durable_changed.notify_all();
    }

    /// Blocks until everything written so far is durable; returns the durable CID.
    pub(crate) fn sync(&self) -> Result<Option<Cid>, StorageError> {
        let mut s = lock(&self.state);
        let target = s.written;
        s.urgent = true;
        self.work.notify_one();
        loop {
            if let Some(e) = &s.failed {
                return Err(StorageError::Failed(e.clone()));
            }
            if s.durable >= target && !s.dir_dirty {
                return Ok(s.durable);
            }
            if s.shutdown {
                return Err(StorageError::Closed);
            }
            s = self
                .durable_changed
                .wait(s)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks until `cid` is durable or `timeout` passes; `Ok(false)` on timeout.
    pub(crate) fn wait_durable(&self, cid: Cid, timeout: Duration) -> Result<bool, StorageError> {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.state);
        loop {
            if let Some(e) = &s.failed {
                return Err(StorageError::Failed(e.clone()));
            }
            if s.durable >= Some(cid) {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline || s.shutdown {
                return Ok(false);
            }
            s = self
                .durable_changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The group-commit loop: fsync what was written, publish, repeat until shut down with
    /// nothing pending.
    fn run(&self, window: Duration, window_bytes: u64) {
        let mut s = lock(&self.state);
        loop {
            while !s.pending() && !s.shutdown && s.failed.is_none() {
                s = self.work.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            if s.failed.is_some() || !s.pending() {
                return;
            }
            // Optional extra batching: let more records arrive before paying for an fsync,
            // unless enough bytes wait already. Every append wakes this wait.
            let deadline = Instant::now() + window;
            while !s.shutdown && !s.urgent && s.failed.is_none() && s.unsynced_bytes < window_bytes
            {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                s = self
                    .work
                    .wait_timeout(s, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            s.unsynced_bytes = 0;
            s.urgent = false;
            let target = s.written;
            let mut files = std::mem::take(&mut s.closed);
            files.extend(s.current.clone());
            let dir_dirty = std::mem::take(&mut s.dir_dirty);
            drop(s);

            let mut result = Ok(());
            for f in &files {
                if let Err(e) = f.sync_data() {
                    result = Err(format!("fsync of a log segment failed: {e}"));
                    break;
                }
            }
            if result.is_ok() && dir_dirty {
                result = sync_dir(&self.dir).map_err(|e| e.to_string());
            }
            match result {
                Ok(()) => self.publish(target),
                Err(e) => self.fail(e),
            }
            s = lock(&self.state);
        }
    }
}

fn encode(c: Option<Cid>) -> u64 {
    c.map_or(0, |c| c.0.saturating_add(1))
}

fn decode(v: u64) -> Option<Cid> {
    v.checked_sub(1).map(Cid)
}

/// Owns the group-commit thread; stopping it syncs what is pending first.
pub(crate) struct Committer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    pub(crate) fn start(
        shared: Arc<Shared>,
        window: Duration,
        window_bytes: u64,
    ) -> Result<Self, StorageError> {
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kmmr-group-commit".into())
            .spawn(move || s.run(window, window_bytes))
            .map_err(|source| StorageError::Io {
                op: "spawn group-commit thread",
                path: shared.dir.clone(),
                source,
            })?;
        Ok(Committer {
            shared,
            thread: Some(thread),
        })
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.work.notify_one();
        if let Some(t) = self.thread.take() {
            // A panicked commit thread has nothing left to clean up.
            let _ = t.join();
        }
        self.shared.durable_changed.notify_all();
    }
}

/// A cloneable, thread-safe view of the highest durable CID, for whoever needs to know how far
/// the log is on disk.
#[derive(Clone)]
pub struct DurableWatch {
    pub(crate) shared: Arc<Shared>,
}

impl DurableWatch {
    /// The highest CID whose decision, and every one before it, is on disk. Lock-free.
    pub fn get(&self) -> Option<Cid> {
        self.shared.durable()
    }

    /// Blocks until `cid` is durable or `timeout` passes; `Ok(false)` on timeout or when the
    /// storage was closed first.
    pub fn wait_for(&self, cid: Cid, timeout: Duration) -> Result<bool, StorageError> {
        self.shared.wait_durable(cid, timeout)
    }
}

impl std::fmt::Debug for DurableWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableWatch")
            .field("durable", &self.get())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_durable_cid_encoding_keeps_cid_zero_apart_from_none() {
        for c in [None, Some(Cid(0)), Some(Cid(1)), Some(Cid(u64::MAX - 1))] {
            assert_eq!(decode(encode(c)), c);
        }
        assert_eq!(encode(None), 0);
    }

    #[test]
    fn a_failed_fsync_is_sticky_for_every_later_caller() {
        let s = Shared::new(std::env::temp_dir(), None, None);
        s.fail("disk on fire".into());
        s.fail("second failure".into());
        assert!(matches!(s.check(), Err(StorageError::Failed(m)) if m == "disk on fire"));
        assert!(s.sync().is_err());
        assert!(s.wait_durable(Cid(0), Duration::from_secs(5)).is_err());
    }
}
