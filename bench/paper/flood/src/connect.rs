//! The request flood: connect to the victim's client port, write a request (given bytes or
//! random garbage), optionally hold the connection, close; at a bounded connection rate and
//! byte rate, with at most `max_open` connections open at once.
//!
//! Each open connection is one worker thread, so the cap on open connections is simply the
//! number of workers and needs no poll loop; the counts the CLI allows (up to 512) are small
//! for threads. Workers share the buckets and counters under one mutex: a request costs a
//! connect and a close, far more than the lock.

use std::io::Write;
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::flood::Bounds;
use crate::rate::{burst_for, mbit_to_bytes_per_sec, TokenBucket};
use crate::rng::Rng;
use crate::summary::{StoppedBy, Tally};

/// What each connection writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Fixed(Vec<u8>),
    /// This many random bytes, fresh for each connection.
    Random(usize),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Fixed(b) => b.len(),
            Payload::Random(n) => *n,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub target: SocketAddrV4,
    pub payload: Payload,
    pub conn_rate: f64,
    pub max_open: usize,
    pub hold: Duration,
    pub connect_timeout: Duration,
}

struct Shared {
    conns: TokenBucket,
    bytes: TokenBucket,
    attempts: u64,
    tally: Tally,
}

enum Next {
    Go,
    Wait(Duration),
    Stop,
}

fn next(shared: &Mutex<Shared>, start: Instant, bounds: &Bounds, len: f64) -> Next {
    // A poisoned lock means a worker panicked; the counters are still meaningful.
    let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
    let now = start.elapsed();
    if now >= bounds.duration {
        return Next::Stop;
    }
    if s.attempts >= bounds.max_packets {
        return Next::Stop;
    }
    // Both buckets must allow it before either is charged.
    let w1 = s.conns.wait_for(now, 1.0);
    let w2 = s.bytes.wait_for(now, len);
    match (w1, w2) {
        (None, None) => {
            s.conns.consume(1.0);
            s.bytes.consume(len);
            s.attempts += 1;
            Next::Go
        }
        (a, b) => {
            let wait = a.unwrap_or(Duration::ZERO).max(b.unwrap_or(Duration::ZERO));
            Next::Wait(wait.min(bounds.duration.saturating_sub(now)))
        }
    }
}

/// One connection; returns the bytes written. Every blocking step is bounded by what is
/// left of the flood's time, so a silent victim cannot keep the flooder past its deadline.
fn one_request(plan: &Plan, payload: &[u8], left: Duration) -> std::io::Result<usize> {
    let floor = Duration::from_millis(1); // zero timeouts are rejected by the socket calls
    let mut stream = TcpStream::connect_timeout(
        &SocketAddr::V4(plan.target),
        plan.connect_timeout.min(left).max(floor),
    )?;
    stream.set_write_timeout(Some(left.max(floor)))?;
    stream.write_all(payload)?;
    if !plan.hold.is_zero() {
        std::thread::sleep(plan.hold.min(left));
    }
    Ok(payload.len())
}

fn worker(plan: &Plan, bounds: &Bounds, shared: &Mutex<Shared>, start: Instant, seed: u64) {
    let mut rng = Rng::from_entropy(seed);
    let mut buf = match &plan.payload {
        Payload::Fixed(b) => b.clone(),
        Payload::Random(n) => vec![0u8; *n],
    };
    let len = plan.payload.len() as f64;
    loop {
        match next(shared, start, bounds, len) {
            Next::Stop => return,
            Next::Wait(d) => std::thread::sleep(d),
            Next::Go => {
                if matches!(plan.payload, Payload::Random(_)) {
                    rng.fill(&mut buf);
                }
                let left = bounds.duration.saturating_sub(start.elapsed());
                let result = one_request(plan, &buf, left);
                let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
                match result {
                    Ok(n) => {
                        s.tally.packets += 1;
                        s.tally.bytes += n as u64;
                    }
                    Err(e) => {
                        s.tally.errors += 1;
                        s.tally.last_error = Some(e.to_string());
                    }
                }
            }
        }
    }
}

/// Runs the request flood. "packets" in the tally are requests written on a completed
/// connection; "bytes" are request bytes (the rate bound counts those, not TCP overhead).
pub fn run(plan: &Plan, bounds: Bounds) -> anyhow::Result<Tally> {
    let bytes_rate = mbit_to_bytes_per_sec(bounds.mbit);
    let len = plan.payload.len() as f64;
    let shared = Arc::new(Mutex::new(Shared {
        // A burst of a few connections at most: a connection flood that opens everything at
        // once would measure the burst, not the rate.
        conns: TokenBucket::new(plan.conn_rate, burst_for(plan.conn_rate, 1.0)),
        bytes: TokenBucket::new(bytes_rate, burst_for(bytes_rate, len.max(1.0))),
        attempts: 0,
        tally: Tally::new(),
    }));
    let start = Instant::now();
    let mut handles = Vec::new();
    for i in 0..plan.max_open {
        let (mine, shared) = (plan.clone(), Arc::clone(&shared));
        let spawned = std::thread::Builder::new()
            .name(format!("flood-conn-{i}"))
            .stack_size(128 * 1024)
            .spawn(move || worker(&mine, &bounds, &shared, start, i as u64 + 3));
        match spawned {
            Ok(h) => handles.push(h),
            // Fewer workers only means fewer open connections, which is still within bounds.
            Err(e) if !handles.is_empty() => {
                eprintln!("kmmr-flood: started {i} of {} workers: {e}", plan.max_open);
                break;
            }
            Err(e) => anyhow::bail!("cannot start a worker thread: {e}"),
        }
    }
    let mut panicked = 0;
    for h in handles {
        if h.join().is_err() {
            panicked += 1;
        }
    }
    let elapsed = start.elapsed();
    let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
    if panicked > 0 {
        anyhow::bail!("{panicked} worker threads panicked");
    }
    s.tally.elapsed = elapsed;
    s.tally.stopped_by = if s.attempts >= bounds.max_packets {
        StoppedBy::Packets
    } else {
        StoppedBy::Time
    };
    Ok(s.tally.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{Ipv4Addr, TcpListener};

    #[test]
    fn request_flood_on_loopback_is_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let server = std::thread::spawn(move || {
            let (mut conns, mut bytes) = (0u64, 0u64);
            let end = Instant::now() + Duration::from_secs(4);
            while Instant::now() < end {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        conns += 1;
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                        let mut buf = Vec::new();
                        let _ = s.read_to_end(&mut buf);
                        bytes += buf.len() as u64;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            (conns, bytes)
        });
        let plan = Plan {
            target: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            payload: Payload::Fixed(b"PUT /x HTTP/1.0\r\n\r\n".to_vec()),
            conn_rate: 40.0,
            max_open: 4,
            hold: Duration::ZERO,
            connect_timeout: Duration::from_millis(500),
        };
        let bounds = Bounds {
            mbit: 1.0,
            duration: Duration::from_millis(1500),
            max_packets: 25,
        };
        let t = run(&plan, bounds).expect("run");
        let (conns, bytes) = server.join().expect("server");
        assert_eq!(t.stopped_by, StoppedBy::Packets, "{t:?}");
        assert_eq!(t.packets + t.errors, 25, "{t:?}");
        assert_eq!(t.packets, 25, "{t:?}");
        assert_eq!(conns, 25);
        assert_eq!(bytes, 25 * 19);
        // 25 connections at 40/s take about 0.6 s: the connection rate held.
        assert!(t.elapsed >= Duration::from_millis(450), "{t:?}");
    }
}
