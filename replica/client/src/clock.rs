//! Time as the protocol's clients and replicas read it.

use std::time::{Duration, Instant};

/// Wall-clock microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Wall-clock microseconds that never go backwards within the process: the wall clock at start
/// plus a monotonic elapsed time. Leader timestamps are compared across replicas, so they must
/// be wall-clock based; timers must not jump when NTP steps the clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall_at_start_us: u64,
    start: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            wall_at_start_us: now_us(),
            start: Instant::now(),
        }
    }

    pub fn now_us(&self) -> u64 {
        self.wall_at_start_us + self.start.elapsed().as_micros() as u64
    }

    pub fn instant_at(&self, us: u64) -> Instant {
        self.start + Duration::from_micros(us.saturating_sub(self.wall_at_start_us))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
