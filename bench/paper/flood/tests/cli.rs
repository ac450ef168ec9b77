//! The binary as a shell script would drive it, without root: refusals (exit code 2 with a
//! clear message) and real floods to loopback under --allow-loopback-for-tests.
//!
//! Refusal runs all carry --check-only, so that even a broken check could not put a packet
//! toward a 10.x address from the host's own namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::UdpSocket;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{field, receive};

const BIN: &str = env!("CARGO_BIN_EXE_kmmr-flood");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run kmmr-flood")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn text_field<'a>(json: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\":\"");
    let at = json.find(&pat).unwrap_or_else(|| panic!("{key} in {json}")) + pat.len();
    let end = json[at..].find('"').unwrap();
    &json[at..at + end]
}

/// Whether this test process is in the initial network namespace, judged like the binary
/// does (PID 1, or kthreadd when PID 1 is unreadable); None if it cannot be told.
fn in_initial_namespace() -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &str| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let own = id("/proc/self/ns/net")?;
    let kthreadd = std::fs::read_to_string("/proc/2/comm")
        .map(|c| c.trim() == "kthreadd")
        .unwrap_or(false);
    let reference =
        id("/proc/1/ns/net").or_else(|| if kthreadd { id("/proc/2/ns/net") } else { None })?;
    Some(own == reference)
}

#[test]
fn refuses_to_run_in_the_initial_namespace() {
    let out = run(&[
        "udp",
        "--target",
        "10.77.3.2:9000",
        "--allow",
        "10.77.0.0/16",
        "--mbit",
        "1",
        "--seconds",
        "1",
        "--max-packets",
        "1",
        "--check-only",
    ]);
    match in_initial_namespace() {
        Some(true) => {
            assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
            assert!(
                stderr(&out).contains("initial network namespace")
                    && stderr(&out).contains("ip netns exec"),
                "{}",
                stderr(&out)
            );
        }
        Some(false) => println!(
            "SKIPPED refuses_to_run_in_the_initial_namespace because this test already runs \
             outside the initial network namespace (exit {:?})",
            out.status.code()
        ),
        None => {
            // The binary cannot tell either; it must refuse rather than guess.
            assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
        }
    }
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let base = |target: &'static str, allow: &'static str| {
        vec![
            "udp",
            "--target",
            target,
            "--allow",
            allow,
            "--mbit",
            "1",
            "--seconds",
            "1",
            "--max-packets",
            "1",
            "--check-only",
        ]
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            base("127.0.0.1:9", "127.0.0.0/8"),
            "--allow-loopback-for-tests",
        ),
        (
            base("10.78.0.1:9", "10.77.0.0/16"),
            "outside the allowed range",
        ),
        (base("10.77.0.1:9", "0.0.0.0/0"), "private address space"),
        (base("10.77.0.1:9", "10.77.0.0"), "not an IPv4 CIDR"),
        (base("10.77.255.255:9", "10.77.0.0/16"), "broadcast"),
        (base("224.0.0.1:9", "10.77.0.0/16"), "multicast"),
        (base("localhost:9", "10.77.0.0/16"), "not IPV4:PORT"),
        (base("10.77.0.1:0", "10.77.0.0/16"), "port must not be 0"),
        (
            {
                let mut v = base("10.77.0.1:9", "10.77.0.0/16");
                v.push("--allow-loopback-for-tests");
                v
            },
            "only for 127.0.0.0/8",
        ),
        (
            {
                let mut v = base("10.77.0.1:9", "10.77.0.0/16");
                v[6] = "NaN";
                v
            },
            "--mbit",
        ),
        (
            {
                let mut v = base("10.77.0.1:9", "10.77.0.0/16");
                v[8] = "601";
                v
            },
            "--seconds",
        ),
        (
            {
                let mut v = base("10.77.0.1:9", "10.77.0.0/16");
                v[10] = "0";
                v
            },
            "--max-packets",
        ),
    ];
    for (args, want) in cases {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?} printed a summary");
        assert!(!stderr(&out).contains("panicked"), "{args:?}");
    }
    // Missing bounds and garbage numbers are clap usage errors, also exit code 2.
    for args in [
        vec!["udp", "--target", "10.77.0.1:9", "--allow", "10.77.0.0/16"],
        vec!["syn", "--mbit", "x"],
        vec!["nonsense"],
        vec![],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{args:?}");
    }
}

#[test]
fn loopback_udp_flood_holds_its_rate_and_stops_by_itself() {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = sock.local_addr().unwrap().to_string();
    let receiver = std::thread::spawn(move || {
        receive(sock, Duration::from_millis(800), Duration::from_secs(20))
    });
    let started = Instant::now();
    let out = run(&[
        "udp",
        "--target",
        &target,
        "--allow",
        "127.0.0.0/8",
        "--allow-loopback-for-tests",
        "--mbit",
        "20",
        "--seconds",
        "1.5",
        "--max-packets",
        "1000000",
        "--size",
        "1200",
    ]);
    let exited = Instant::now();
    let wall = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json = String::from_utf8(out.stdout).unwrap();
    assert_eq!(json.lines().count(), 1, "{json}");
    assert_eq!(text_field(&json, "mode"), "udp");
    assert_eq!(text_field(&json, "stopped_by"), "time");
    assert!(wall < Duration::from_secs(4), "ran {wall:?}");
    let sent = field(&json, "packets") as u64;
    let achieved = field(&json, "achieved_mbit");
    let (n, bytes, first, last) = receiver.join().unwrap();
    let (first, last) = (first.unwrap(), last.unwrap());
    assert!(last <= exited, "datagrams arrived after the flooder exited");
    let wire = (bytes + 28 * n) as f64;
    let rx_mbit = wire * 8.0 / (last - first).as_secs_f64() / 1e6;
    println!("loopback udp: sent {sent}, received {n}, flooder {achieved:.2} Mbit/s, receiver {rx_mbit:.2} Mbit/s");
    assert!(
        (achieved - 20.0).abs() <= 2.0,
        "flooder reported {achieved}"
    );
    assert!((rx_mbit - 20.0).abs() <= 5.0, "receiver measured {rx_mbit}");
    assert!(n <= sent && n as f64 >= 0.9 * sent as f64, "{n} of {sent}");
}

#[test]
fn loopback_udp_flood_stops_at_the_packet_cap() {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = sock.local_addr().unwrap().to_string();
    let receiver = std::thread::spawn(move || {
        receive(sock, Duration::from_millis(500), Duration::from_secs(20))
    });
    let out = run(&[
        "udp",
        "--target",
        &target,
        "--allow",
        "127.0.0.0/8",
        "--allow-loopback-for-tests",
        "--mbit",
        "50",
        "--seconds",
        "10",
        "--max-packets",
        "100",
        "--size",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text_field(&json, "stopped_by"), "max_packets", "{json}");
    assert_eq!(field(&json, "packets"), 100.0);
    assert!(field(&json, "seconds") < 2.0, "{json}");
    let (n, bytes, _, _) = receiver.join().unwrap();
    assert_eq!((n, bytes), (100, 100 * 100));
}

#[test]
fn loopback_request_flood_through_the_binary() {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        let mut got = Vec::new();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end && got.len() < 10 {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                    let mut buf = Vec::new();
                    let _ = s.read_to_end(&mut buf);
                    got.push(buf);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        got
    });
    let out = run(&[
        "connect",
        "--target",
        &target,
        "--allow",
        "127.0.0.0/8",
        "--allow-loopback-for-tests",
        "--mbit",
        "1",
        "--seconds",
        "3",
        "--max-packets",
        "10",
        "--conn-rate",
        "50",
        "--max-open",
        "2",
        "--payload-hex",
        "474554202f0d0a0d0a",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text_field(&json, "mode"), "connect");
    assert_eq!(text_field(&json, "stopped_by"), "max_packets", "{json}");
    assert_eq!(field(&json, "packets"), 10.0, "{json}");
    assert_eq!(field(&json, "bytes"), 90.0, "{json}");
    let got = server.join().unwrap();
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|r| r == b"GET /\r\n\r\n"));
}
