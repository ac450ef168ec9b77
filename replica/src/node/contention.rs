//! How much this replica waits for a CPU: the time its threads spent runnable but not running
//! (Linux's `/proc/self/task/*/schedstat`, second field), per second of wall time.
//!
//! A follower judges the leader slow when requests wait far longer than under recent leaders.
//! On a host whose CPUs are taken by other work, every message waits for a CPU too, so requests
//! wait long under any leader, and rotating leaders only adds leader changes (regency 2 to 14 in
//! 80 s on a machine at load 10-30, issue 15). A replica cannot see the leader's host, but it can
//! see its own: while it waits for a CPU for a large part of the time, it cannot tell a slow
//! leader from its own slowness, and withholds that judgement (the request timeout still
//! applies, so a leader that stops is still replaced).

use std::time::{Duration, Instant};

/// Waiting for a CPU this fraction of the time (summed over the replica's threads) makes the
/// host busy. Replicas sharing two cores with busy loops at their own priority measured 0.7 to
/// 1.4 (`replica/scripts/busy-host.sh`); the threshold sits well below that.
pub const BUSY_WAIT_FRACTION: f64 = 0.25;
/// The window over which the wait is measured (at least this long between two readings).
const WINDOW: Duration = Duration::from_millis(100);
/// A host found busy stays busy this long: CPU contention comes in bursts, and a leader judged
/// slow between two bursts is rotated for nothing.
const HOLD: Duration = Duration::from_secs(2);

/// Readings of this process's CPU wait.
#[derive(Debug)]
pub struct Contention {
    last: Option<(Instant, u64)>,
    busy_until: Option<Instant>,
    /// The fraction measured over the last complete window, for the metrics.
    pub last_fraction: f64,
}

impl Contention {
    pub fn new() -> Self {
        Contention {
            last: None,
            busy_until: None,
            last_fraction: 0.0,
        }
    }

    /// Whether the host is busy at `now`, reading the threads' wait when a window has passed.
    /// Without `/proc` (not Linux, or hidden) the host never counts as busy.
    pub fn busy(&mut self, now: Instant) -> bool {
        let due = self
            .last
            .is_none_or(|(at, _)| now.saturating_duration_since(at) >= WINDOW);
        if due {
            if let Some(waited_ns) = total_wait_ns() {
                self.observe(now, waited_ns);
            }
        }
        self.busy_until.is_some_and(|t| now < t)
    }

    /// Takes one reading: `waited_ns`, the threads' total wait so far.
    fn observe(&mut self, now: Instant, waited_ns: u64) {
        if let Some((at, before)) = self.last {
            let wall = now.saturating_duration_since(at).as_nanos() as f64;
            if wall > 0.0 {
                // Threads that ended take their wait with them, so the total can go down.
                self.last_fraction = waited_ns.saturating_sub(before) as f64 / wall;
                if self.last_fraction >= BUSY_WAIT_FRACTION {
                    self.busy_until = Some(now + HOLD);
                }
            }
        }
        self.last = Some((now, waited_ns));
    }
}

/// The run-queue wait of every thread of this process so far, in nanoseconds.
fn total_wait_ns() -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(task) = task else { continue };
        // A thread may end between the listing and the read: skip it.
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total = total.saturating_add(parse_wait_ns(&stat)?);
    }
    Some(total)
}

/// The second of schedstat's three fields: time spent waiting on a run queue.
fn parse_wait_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_is_read_as_its_second_field_and_garbage_is_refused() {
        assert_eq!(parse_wait_ns("851448 6032679 1\n"), Some(6_032_679));
        assert_eq!(parse_wait_ns("851448"), None);
        assert_eq!(parse_wait_ns("a b c"), None);
    }

    #[test]
    fn a_window_of_long_waits_makes_the_host_busy_for_a_while() {
        let mut c = Contention::new();
        let t0 = Instant::now();
        c.observe(t0, 1_000_000);
        // 10 ms of wait in 100 ms: 10%, not busy.
        c.observe(t0 + Duration::from_millis(100), 11_000_000);
        assert!(c.busy_until.is_none());
        assert!((c.last_fraction - 0.1).abs() < 1e-9);
        // 60 ms in the next 100 ms: busy, and it stays so for HOLD.
        let t2 = t0 + Duration::from_millis(200);
        c.observe(t2, 71_000_000);
        assert_eq!(c.busy_until, Some(t2 + HOLD));
        // A quiet window after that does not end it early.
        c.observe(t2 + Duration::from_millis(100), 71_000_000);
        assert_eq!(c.busy_until, Some(t2 + HOLD));
        // A total that went down (threads ended) is no wait, not an overflow.
        c.observe(t2 + Duration::from_millis(200), 5);
        assert_eq!(c.last_fraction, 0.0);
    }

    #[test]
    fn this_process_can_be_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(total_wait_ns().is_some());
        }
    }
}
