//! What both integration tests need: a UDP receiver that counts what arrives, and a reader of
//! the flooder's one-line JSON summary.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

/// (datagrams, payload bytes, first arrival, last arrival).
pub type Received = (u64, u64, Option<Instant>, Option<Instant>);

/// Receives on `sock` until it has been idle for `idle` after the first datagram, or until
/// `give_up` has passed with nothing, so that a flood that never comes fails the test instead
/// of hanging it.
pub fn receive(sock: UdpSocket, idle: Duration, give_up: Duration) -> Received {
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let mut buf = vec![0u8; 65536];
    let (mut n, mut bytes, mut first, mut last) = (0u64, 0u64, None, None);
    let give_up = Instant::now() + give_up;
    loop {
        match sock.recv(&mut buf) {
            Ok(len) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                n += 1;
                bytes += len as u64;
            }
            Err(_) => {
                let quiet = last.is_some_and(|l: Instant| l.elapsed() > idle);
                if quiet || Instant::now() > give_up {
                    return (n, bytes, first, last);
                }
            }
        }
    }
}

/// The number after `"key":` in the summary line.
pub fn field(json: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\":");
    let at = json.find(&pat).unwrap_or_else(|| panic!("{key} in {json}")) + pat.len();
    let rest = &json[at..];
    let end = rest.find([',', '}']).expect("end of the value");
    rest[..end].trim_matches('"').parse().expect("a number")
}
