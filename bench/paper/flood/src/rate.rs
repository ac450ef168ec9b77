//! The token bucket that bounds every flood's rate.
//!
//! Time is passed in (a `Duration` since the flood started) rather than read inside, so the
//! bucket's accuracy can be tested on a simulated clock with simulated oversleeping.

use std::time::Duration;

/// Bytes per second for a rate in Mbit/s (10^6 bits, as tc and iperf count them).
pub fn mbit_to_bytes_per_sec(mbit: f64) -> f64 {
    mbit * 1_000_000.0 / 8.0
}

/// The burst a paced sender needs: enough to absorb the oversleep of `thread::sleep` (tens of
/// microseconds to a few milliseconds on a busy machine) so that the long-run rate stays on
/// target, but small enough that a burst does not overflow the receiver's socket buffer and
/// turn into loss that the experiment would misread as the victim's.
pub fn burst_for(units_per_sec: f64, largest_unit: f64) -> f64 {
    (units_per_sec * 0.005).max(2.0 * largest_unit)
}

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// A bucket that fills at `rate` units per second up to `burst` units. It starts empty, so
    /// a flood never opens with a burst above its rate.
    ///
    /// `rate` must be positive and finite (the CLI checks this); a bad rate gives a bucket
    /// that never releases anything rather than a panic.
    pub fn new(rate: f64, burst: f64) -> Self {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            0.0
        };
        let burst = if burst.is_finite() && burst > 0.0 {
            burst
        } else {
            0.0
        };
        TokenBucket {
            rate,
            burst,
            tokens: 0.0,
            last: Duration::ZERO,
        }
    }

    fn refill(&mut self, now: Duration) {
        // A clock that goes backwards (it cannot with Instant, but the tests drive it) adds
        // nothing rather than removing tokens.
        if now > self.last {
            let dt = (now - self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
            self.last = now;
        }
    }

    /// How long until `amount` units are available, or `None` if they are available now.
    /// Refills first, consumes nothing.
    pub fn wait_for(&mut self, now: Duration, amount: f64) -> Option<Duration> {
        self.refill(now);
        if self.tokens >= amount {
            return None;
        }
        if self.rate <= 0.0 || amount > self.burst {
            // Never satisfiable: report a long wait; the caller's deadline ends the flood.
            return Some(Duration::from_secs(1));
        }
        let secs = (amount - self.tokens) / self.rate;
        // try_from: from_secs_f64 panics on values a float can reach; this never does.
        Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::from_secs(1)))
    }

    /// Removes `amount` units; call only after `wait_for` returned `None` at the same `now`.
    pub fn consume(&mut self, amount: f64) {
        self.tokens -= amount;
    }

    /// Takes `amount` units now, or says how long to wait for them.
    pub fn try_take(&mut self, now: Duration, amount: f64) -> Result<(), Duration> {
        match self.wait_for(now, amount) {
            None => {
                self.consume(amount);
                Ok(())
            }
            Some(wait) => Err(wait),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a bucket the way the flood loop does: send when allowed, otherwise sleep for the
    /// wait plus an oversleep, and returns the bytes sent in `secs` simulated seconds.
    fn simulate(mbit: f64, packet: f64, secs: f64, oversleep: Duration) -> f64 {
        let rate = mbit_to_bytes_per_sec(mbit);
        let mut bucket = TokenBucket::new(rate, burst_for(rate, packet));
        let end = Duration::from_secs_f64(secs);
        let mut now = Duration::ZERO;
        let mut sent = 0.0;
        // Sending itself takes time too: about a microsecond per packet.
        let send_cost = Duration::from_nanos(800);
        while now < end {
            match bucket.try_take(now, packet) {
                Ok(()) => {
                    sent += packet;
                    now += send_cost;
                }
                Err(wait) => now += wait + oversleep,
            }
        }
        sent
    }

    fn achieved_mbit(bytes: f64, secs: f64) -> f64 {
        bytes * 8.0 / secs / 1e6
    }

    #[test]
    fn rate_is_accurate_from_1_to_1000_mbit() {
        for &mbit in &[1.0, 5.0, 20.0, 100.0, 500.0, 1000.0] {
            for &over_us in &[0u64, 60, 1000] {
                let secs = 5.0;
                let sent = simulate(mbit, 1228.0, secs, Duration::from_micros(over_us));
                let got = achieved_mbit(sent, secs);
                let err = (got - mbit).abs() / mbit;
                assert!(
                    err < 0.02,
                    "{mbit} Mbit/s with {over_us} us oversleep: got {got:.3} ({:.2}% off)",
                    err * 100.0
                );
            }
        }
    }

    #[test]
    fn small_packets_at_low_rate() {
        // A SYN flood at 1 Mbit/s: 44-byte packets, about 2,840 per second.
        let sent = simulate(1.0, 44.0, 10.0, Duration::from_micros(80));
        let got = achieved_mbit(sent, 10.0);
        assert!((got - 1.0).abs() < 0.01, "got {got}");
    }

    #[test]
    fn starts_empty_and_never_bursts_past_the_burst() {
        let mut b = TokenBucket::new(1000.0, 100.0);
        assert!(b.try_take(Duration::ZERO, 1.0).is_err(), "starts empty");
        // After a long idle period only `burst` units are available at once.
        let t = Duration::from_secs(3600);
        let mut taken = 0;
        while b.try_take(t, 1.0).is_ok() {
            taken += 1;
        }
        assert_eq!(taken, 100);
    }

    #[test]
    fn wait_is_the_time_to_the_missing_tokens() {
        let mut b = TokenBucket::new(1000.0, 10.0);
        let wait = b
            .wait_for(Duration::ZERO, 5.0)
            .expect("empty bucket must wait");
        assert!((wait.as_secs_f64() - 0.005).abs() < 1e-9, "{wait:?}");
        assert_eq!(b.wait_for(Duration::from_millis(5), 5.0), None);
    }

    #[test]
    fn bad_rates_never_panic_and_never_release() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut b = TokenBucket::new(rate, 10.0);
            assert!(b.try_take(Duration::from_secs(100), 1.0).is_err());
        }
        // An amount larger than the burst can never be had; it must not spin or panic.
        let mut b = TokenBucket::new(10.0, 1.0);
        assert!(b.try_take(Duration::from_secs(100), 2.0).is_err());
        // A clock that goes backwards adds nothing.
        let mut b = TokenBucket::new(10.0, 100.0);
        let _ = b.try_take(Duration::from_secs(5), 1.0);
        assert!(b.try_take(Duration::from_secs(1), 100.0).is_err());
    }
}
