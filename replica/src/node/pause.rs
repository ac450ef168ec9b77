//! Whether this replica's process stopped running for a while: stopped by a signal (`SIGSTOP`,
//! a debugger), or not scheduled by a host that froze it. Its timers kept running meanwhile,
//! so on resuming every waiting request looks older than the leader can be blamed for, and
//! without this the replica would ask for a leader change at once (the frozen leaders of
//! `replica/scripts/heavy-values.sh`, issue 15).
//!
//! A thread of its own watches, not the event loop: the loop may be slow to come round under
//! load, which is not a pause, while a thread that sleeps briefly and wakes far too late shows
//! that the whole process did not run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the watchdog wakes.
const NAP: Duration = Duration::from_millis(50);
/// A wake-up this much later than asked for is a pause.
pub const PAUSE: Duration = Duration::from_millis(750);

/// Counts the pauses the watchdog saw.
#[derive(Debug, Clone)]
pub struct Pauses {
    seen: Arc<AtomicU64>,
    taken: u64,
}

impl Pauses {
    /// Starts the watchdog thread; it ends with the process.
    pub fn watch() -> Pauses {
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        let spawned = std::thread::Builder::new()
            .name("kmmr-pause-watch".into())
            .spawn(move || {
                let mut last = Instant::now();
                loop {
                    std::thread::sleep(NAP);
                    let now = Instant::now();
                    if now.saturating_duration_since(last) > NAP + PAUSE {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    last = now;
                }
            });
        if let Err(e) = spawned {
            // Without the watchdog a resumed replica only suspects sooner: say so, run on.
            tracing::warn!(error = %e, "cannot start the pause watchdog");
        }
        Pauses { seen, taken: 0 }
    }

    /// Whether a pause ended since the last call.
    pub fn take(&mut self) -> bool {
        let seen = self.seen.load(Ordering::Relaxed);
        let new = seen != self.taken;
        self.taken = seen;
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_is_taken_once() {
        let mut p = Pauses {
            seen: Arc::new(AtomicU64::new(0)),
            taken: 0,
        };
        assert!(!p.take());
        p.seen.fetch_add(1, Ordering::Relaxed);
        assert!(p.take());
        assert!(!p.take());
    }
}
