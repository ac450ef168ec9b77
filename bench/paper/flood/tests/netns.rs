//! The flooder between two network namespaces made for this test and joined by a veth pair:
//! a UDP flood whose received rate is measured in the victim namespace, and a SYN flood whose
//! arrival (and valid checksums) the victim's TCP counters show.
//!
//! Needs root and `ip netns`. Without them it fails when CI is set and skips otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::field;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kmmr-flood");

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().expect("run ip")
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the namespaces when the test ends, however it ends; deleting a namespace also
/// deletes the veth end inside it, and with it the pair.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Why this environment cannot run the test, if it cannot.
fn unsupported() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string));
    if euid.as_deref() != Some("0") {
        return Some(format!("not running as root (euid {euid:?})"));
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`ip netns list` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("`ip` is not available: {e}")),
    }
}

/// The `Tcp:` counters of a namespace's /proc/net/snmp, by name.
fn tcp_counters(ns: &str) -> std::collections::HashMap<String, i64> {
    let out = ip(&["netns", "exec", ns, "cat", "/proc/net/snmp"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut rows = text.lines().filter(|l| l.starts_with("Tcp:"));
    let names = rows.next().expect("Tcp header");
    let values = rows.next().expect("Tcp values");
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(-1)))
        .collect()
}

/// A UDP receiver bound inside namespace `ns`: a thread that enters the namespace with
/// setns(2) and binds there, then counts until idle. Returns its port and the join handle.
fn udp_receiver_in(ns: &str, addr: Ipv4Addr) -> (u16, std::thread::JoinHandle<common::Received>) {
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let f = File::open(&path).expect("open netns");
        rustix::thread::move_into_link_name_space(
            f.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns");
        let sock = UdpSocket::bind(SocketAddrV4::new(addr, 0)).expect("bind in netns");
        tx.send(sock.local_addr().unwrap().port()).unwrap();
        common::receive(sock, Duration::from_secs(1), Duration::from_secs(30))
    });
    let port = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("receiver bound");
    (port, handle)
}

#[test]
fn floods_between_two_namespaces() {
    if let Some(why) = unsupported() {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but the namespace test cannot run: {why}");
        }
        println!("SKIPPED floods_between_two_namespaces because {why}");
        return;
    }
    let pid = std::process::id();
    let a = format!("kmmr-flood-test-{pid}-a");
    let b = format!("kmmr-flood-test-{pid}-b");
    // The guard exists before the first namespace does, so a failure anywhere below still
    // removes whatever was made.
    let _guard = Namespaces(vec![a.clone(), b.clone()]);
    ip_ok(&["netns", "add", &a]);
    ip_ok(&["netns", "add", &b]);
    // The pair is made inside A with its peer sent straight into B: nothing touches the
    // host's own namespace, and the interface names only need to be unique per namespace.
    ip_ok(&[
        "-n", &a, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b", "netns", &b,
    ]);
    // The third octet varies by pid only so that parallel runs are easy to tell apart in
    // captures; the namespaces isolate them anyway.
    let octet = (pid % 250) as u8;
    let addr_a = Ipv4Addr::new(10, 77, octet, 1);
    let addr_b = Ipv4Addr::new(10, 77, octet, 2);
    ip_ok(&[
        "-n",
        &a,
        "addr",
        "add",
        &format!("{addr_a}/24"),
        "dev",
        "veth-a",
    ]);
    ip_ok(&[
        "-n",
        &b,
        "addr",
        "add",
        &format!("{addr_b}/24"),
        "dev",
        "veth-b",
    ]);
    for (ns, dev) in [(&a, "veth-a"), (&b, "veth-b")] {
        ip_ok(&["-n", ns, "link", "set", "lo", "up"]);
        ip_ok(&["-n", ns, "link", "set", dev, "up"]);
    }

    // --- UDP at 20 Mbit/s for 2 s, measured by the receiver in B.
    let (port, receiver) = udp_receiver_in(&b, addr_b);
    let target = format!("{addr_b}:{port}");
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &a, BIN, "udp", "--target", &target])
        .args(["--allow", "10.77.0.0/16", "--mbit", "20", "--seconds", "2"])
        .args(["--max-packets", "1000000", "--size", "1200"])
        .output()
        .unwrap();
    let exited = Instant::now();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "udp flood failed: {stderr}");
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(json.contains("\"stopped_by\":\"time\""), "{json}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the flood did not stop by itself in time"
    );
    let (n, bytes, first, last) = receiver.join().unwrap();
    let (first, last) = (first.expect("nothing received"), last.unwrap());
    assert!(last <= exited, "datagrams arrived after the flooder exited");
    let sent = field(&json, "packets");
    let flooder_mbit = field(&json, "achieved_mbit");
    // Count the IP and UDP headers too, as the flooder's --mbit does.
    let rx_mbit = (bytes + 28 * n) as f64 * 8.0 / (last - first).as_secs_f64() / 1e6;
    println!(
        "netns udp: sent {sent}, received {n} datagrams over {:.3} s; flooder {flooder_mbit:.2} \
         Mbit/s, receiver {rx_mbit:.2} Mbit/s",
        (last - first).as_secs_f64()
    );
    assert!(
        (15.0..=25.0).contains(&rx_mbit),
        "received {rx_mbit:.2} Mbit/s, not within 25% of 20"
    );
    assert!(n as f64 >= 0.9 * sent, "received {n} of {sent}");

    // --- SYN: 500 SYNs to a closed port; B's kernel must accept each as a valid segment
    // (no checksum errors) and answer it with a RST, which A's kernel then receives, which
    // also shows that the default source address was A's own.
    let before_a = tcp_counters(&a);
    let before_b = tcp_counters(&b);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &a,
            BIN,
            "syn",
            "--target",
            &format!("{addr_b}:9"),
        ])
        .args(["--allow", "10.77.0.0/16", "--mbit", "1", "--seconds", "3"])
        .args(["--max-packets", "500"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "syn flood failed: {stderr}");
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(json.contains("\"stopped_by\":\"max_packets\""), "{json}");
    assert_eq!(field(&json, "packets"), 500.0, "{json}");
    // Let the RSTs drain.
    std::thread::sleep(Duration::from_millis(300));
    let after_a = tcp_counters(&a);
    let after_b = tcp_counters(&b);
    let delta = |after: &std::collections::HashMap<String, i64>,
                 before: &std::collections::HashMap<String, i64>,
                 k: &str| after[k] - before[k];
    let in_segs = delta(&after_b, &before_b, "InSegs");
    let csum = delta(&after_b, &before_b, "InCsumErrors");
    let rsts = delta(&after_b, &before_b, "OutRsts");
    let back = delta(&after_a, &before_a, "InSegs");
    println!(
        "netns syn: sent 500, victim InSegs +{in_segs}, InCsumErrors +{csum}, OutRsts +{rsts}; \
         attacker InSegs +{back}; flooder {:.3} Mbit/s",
        field(&json, "achieved_mbit")
    );
    assert!(in_segs >= 500, "victim saw {in_segs} TCP segments");
    assert_eq!(csum, 0, "checksum errors at the victim");
    assert!(rsts >= 450, "victim answered {rsts} RSTs");
    assert!(back >= 450, "attacker received {back} RSTs");
}
