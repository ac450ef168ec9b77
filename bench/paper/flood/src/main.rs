//! kmmr-flood: a bounded flooder for the paper's DDoS experiments (issue 17).
//!
//! Every flood is bounded in rate (--mbit), time (--seconds) and count (--max-packets), stops
//! by itself at the first bound reached, and prints one JSON line. It refuses to run unless
//! the destination is inside --allow and the process is inside a network namespace other than
//! the initial one (see safety.rs).
//!
//! Exit codes: 0 flood ran (or --check-only passed); 2 bad input or a refused flood (clap's
//! usage errors use 2 as well); 1 the flood could not start (e.g. no raw-socket permission).

mod connect;
mod flood;
mod packet;
mod rate;
mod rng;
mod safety;
mod summary;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::flood::Bounds;

/// Rate ceiling: well past what a veth pair on a small machine carries; a typo like
/// `--mbit 100000` is refused rather than silently capped.
const MAX_MBIT: f64 = 10_000.0;
const MAX_SECONDS: f64 = 600.0;
const MAX_PACKETS: u64 = 1_000_000_000;
/// Largest UDP payload in one IPv4 datagram (65535 - 20 - 8).
const MAX_UDP_PAYLOAD: usize = 65_507;
const MAX_REQUEST_BYTES: usize = 1 << 20;
const MAX_OPEN: usize = 512;
const MAX_CONN_RATE: f64 = 100_000.0;
const MAX_HOLD_MS: u64 = 60_000;

#[derive(Parser, Debug)]
#[command(
    name = "kmmr-flood",
    version,
    about = "Bounded UDP / TCP SYN / request flooder for network-namespace DDoS experiments",
    long_about = "Bounded UDP / TCP SYN / request flooder for network-namespace DDoS \
                  experiments. Runs only inside a network namespace other than the initial one \
                  (e.g. under `ip netns exec NS`), only toward addresses inside --allow, and \
                  stops by itself at --seconds or --max-packets, whichever comes first, \
                  printing one JSON summary line on stdout."
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// UDP datagrams of --size payload bytes to TARGET.
    Udp {
        #[command(flatten)]
        common: Common,
        /// UDP payload bytes per datagram (0..=65507; above the path MTU they fragment).
        #[arg(long, default_value_t = 1200)]
        size: usize,
    },
    /// TCP SYNs built by hand on a raw socket (needs CAP_NET_RAW).
    Syn {
        #[command(flatten)]
        common: Common,
        /// Source address written into the SYNs; must itself be inside --allow, since the
        /// victim answers it. Default: this namespace's address toward TARGET.
        #[arg(long)]
        source: Option<String>,
    },
    /// Request flood: connect, write a request, (hold,) close; bounded open connections.
    Connect {
        #[command(flatten)]
        common: Common,
        /// New connections per second at most.
        #[arg(long, default_value_t = 100.0)]
        conn_rate: f64,
        /// Connections open at once at most (1..=512).
        #[arg(long, default_value_t = 32)]
        max_open: usize,
        /// Request to send, as text (\r and \n are not interpreted; use --payload-hex).
        #[arg(long, conflicts_with_all = ["payload_hex", "size"])]
        payload_text: Option<String>,
        /// Request to send, as hex digits (e.g. 0d0a).
        #[arg(long, conflicts_with = "size")]
        payload_hex: Option<String>,
        /// Without a given payload: this many random bytes per connection.
        #[arg(long)]
        size: Option<usize>,
        /// Milliseconds to keep each connection open after writing (0..=60000).
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Milliseconds to wait for a connection to be accepted.
        #[arg(long, default_value_t = 1000)]
        connect_timeout_ms: u64,
    },
}

/// The arguments every mode has; all bounds are mandatory.
#[derive(Args, Debug)]
struct Common {
    /// Destination IPV4:PORT (a literal address; no host names).
    #[arg(long)]
    target: String,
    /// The only range the destination may be in, e.g. 10.77.0.0/16 (private space only).
    #[arg(long)]
    allow: String,
    /// Rate ceiling in Mbit/s (10^6 bits), counting IP packets (udp, syn) or request bytes
    /// (connect). 0 < MBIT <= 10000.
    #[arg(long, allow_negative_numbers = true)]
    mbit: f64,
    /// Stop after this many seconds (0 < SECONDS <= 600; fractions allowed).
    #[arg(long, allow_negative_numbers = true)]
    seconds: f64,
    /// Stop after this many packets / connection attempts (1..=1000000000).
    #[arg(long)]
    max_packets: u64,
    /// Permit a 127.0.0.0/8 destination (with --allow 127.0.0.0/8) and skip the namespace
    /// check for it. For the crate's own tests only.
    #[arg(long)]
    allow_loopback_for_tests: bool,
    /// Run every check, print what would be sent, and exit without sending.
    #[arg(long)]
    check_only: bool,
}

/// An error with the exit code it deserves.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

fn refuse(message: impl std::fmt::Display) -> Failure {
    Failure {
        code: 2,
        message: format!("refused: {message}"),
    }
}

fn runtime(e: anyhow::Error) -> Failure {
    Failure {
        code: 1,
        message: format!("error: {e:#}"),
    }
}

fn check_bounds(c: &Common) -> Result<Bounds, Failure> {
    if !(c.mbit.is_finite() && c.mbit > 0.0 && c.mbit <= MAX_MBIT) {
        return Err(refuse(format!(
            "--mbit {} must be > 0 and <= {MAX_MBIT}",
            c.mbit
        )));
    }
    if !(c.seconds.is_finite() && c.seconds > 0.0 && c.seconds <= MAX_SECONDS) {
        return Err(refuse(format!(
            "--seconds {} must be > 0 and <= {MAX_SECONDS}",
            c.seconds
        )));
    }
    if !(1..=MAX_PACKETS).contains(&c.max_packets) {
        return Err(refuse(format!(
            "--max-packets {} must be between 1 and {MAX_PACKETS}",
            c.max_packets
        )));
    }
    Ok(Bounds {
        mbit: c.mbit,
        duration: Duration::try_from_secs_f64(c.seconds)
            .map_err(|e| refuse(format!("--seconds: {e}")))?,
        max_packets: c.max_packets,
    })
}

/// Checks the destination and the namespace; returns the target and the allowed range.
fn check_target(c: &Common) -> Result<(SocketAddrV4, safety::Cidr), Failure> {
    let allow = safety::parse_allow(&c.allow, c.allow_loopback_for_tests).map_err(refuse)?;
    let (ip, port) = safety::parse_target(&c.target).map_err(refuse)?;
    safety::check_all(
        ip,
        &allow,
        c.allow_loopback_for_tests,
        safety::observe_namespaces,
    )
    .map_err(refuse)?;
    Ok((SocketAddrV4::new(ip, port), allow))
}

fn parse_hex(s: &str) -> Result<Vec<u8>, Failure> {
    let s = s.trim();
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(refuse("--payload-hex must be an even number of hex digits"));
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| refuse("--payload-hex must be hex digits"))
        })
        .collect()
}

/// The checked, ready-to-run flood.
enum Job {
    Udp { size: usize },
    Syn { source: Ipv4Addr },
    Connect(connect::Plan),
}

fn prepare(mode: &Mode) -> Result<(&'static str, &Common, Bounds, SocketAddrV4, Job), Failure> {
    let (name, common) = match mode {
        Mode::Udp { common, .. } => ("udp", common),
        Mode::Syn { common, .. } => ("syn", common),
        Mode::Connect { common, .. } => ("connect", common),
    };
    let bounds = check_bounds(common)?;
    let (target, allow) = check_target(common)?;
    let job = match mode {
        Mode::Udp { size, .. } => {
            if *size > MAX_UDP_PAYLOAD {
                return Err(refuse(format!(
                    "--size {size} exceeds the IPv4 UDP maximum {MAX_UDP_PAYLOAD}"
                )));
            }
            Job::Udp { size: *size }
        }
        Mode::Syn { source, .. } => {
            let source = match source {
                Some(s) => s
                    .trim()
                    .parse::<Ipv4Addr>()
                    .map_err(|_| refuse(format!("--source {s:?} is not an IPv4 address")))?,
                None => flood::source_for(*target.ip()).map_err(runtime)?,
            };
            // The victim's SYN-ACKs go to the source: it must be inside the range too.
            safety::check_address(source, &allow, common.allow_loopback_for_tests)
                .map_err(|e| refuse(format!("SYN source: {e}")))?;
            Job::Syn { source }
        }
        Mode::Connect {
            conn_rate,
            max_open,
            payload_text,
            payload_hex,
            size,
            hold_ms,
            connect_timeout_ms,
            ..
        } => {
            if !(conn_rate.is_finite() && *conn_rate > 0.0 && *conn_rate <= MAX_CONN_RATE) {
                return Err(refuse(format!(
                    "--conn-rate {conn_rate} must be > 0 and <= {MAX_CONN_RATE}"
                )));
            }
            if !(1..=MAX_OPEN).contains(max_open) {
                return Err(refuse(format!(
                    "--max-open {max_open} must be between 1 and {MAX_OPEN}"
                )));
            }
            if *hold_ms > MAX_HOLD_MS {
                return Err(refuse(format!("--hold-ms {hold_ms} exceeds {MAX_HOLD_MS}")));
            }
            if !(1..=60_000).contains(connect_timeout_ms) {
                return Err(refuse("--connect-timeout-ms must be between 1 and 60000"));
            }
            let payload = match (payload_text, payload_hex, size) {
                (Some(t), _, _) => connect::Payload::Fixed(t.as_bytes().to_vec()),
                (_, Some(h), _) => connect::Payload::Fixed(parse_hex(h)?),
                (_, _, Some(n)) => connect::Payload::Random(*n),
                (None, None, None) => connect::Payload::Random(256),
            };
            let len = match &payload {
                connect::Payload::Fixed(b) => b.len(),
                connect::Payload::Random(n) => *n,
            };
            if len == 0 || len > MAX_REQUEST_BYTES {
                return Err(refuse(format!(
                    "the request must be 1..={MAX_REQUEST_BYTES} bytes, not {len}"
                )));
            }
            Job::Connect(connect::Plan {
                target,
                payload,
                conn_rate: *conn_rate,
                max_open: *max_open,
                hold: Duration::from_millis(*hold_ms),
                connect_timeout: Duration::from_millis(*connect_timeout_ms),
            })
        }
    };
    Ok((name, common, bounds, target, job))
}

fn run(cli: &Cli) -> Result<(), Failure> {
    let (name, common, bounds, target, job) = prepare(&cli.mode)?;
    if common.check_only {
        eprintln!(
            "kmmr-flood: checks passed; would flood {name} to {target} at <= {} Mbit/s for \
             <= {} s or {} packets (--check-only: nothing sent)",
            bounds.mbit,
            bounds.duration.as_secs_f64(),
            bounds.max_packets
        );
        return Ok(());
    }
    let tally = match job {
        Job::Udp { size } => flood::udp(target, size, bounds),
        Job::Syn { source } => flood::syn(source, target, bounds),
        Job::Connect(plan) => connect::run(&plan, bounds),
    }
    .map_err(runtime)?;
    println!(
        "{}",
        summary::json_line(name, &target.to_string(), bounds.mbit, &tally)
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version exit 0; usage errors exit 2 with clap's message.
        Err(e) => e.exit(),
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("kmmr-flood: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kmmr-flood").chain(args.iter().copied()))
    }

    const BOUNDS: [&str; 8] = [
        "--allow",
        "10.77.0.0/16",
        "--mbit",
        "20",
        "--seconds",
        "2",
        "--max-packets",
        "100",
    ];

    fn args<'a>(mode: &'a str, target: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![mode, "--target", target];
        v.extend_from_slice(&BOUNDS);
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn every_bound_is_mandatory() {
        for drop in [
            "--allow",
            "--mbit",
            "--seconds",
            "--max-packets",
            "--target",
        ] {
            let full = args("udp", "10.77.1.2:9000", &[]);
            let mut v: Vec<&str> = Vec::new();
            let mut skip = false;
            for a in full {
                if skip {
                    skip = false;
                    continue;
                }
                if a == drop {
                    skip = true;
                    continue;
                }
                v.push(a);
            }
            assert!(parse(&v).is_err(), "accepted without {drop}");
        }
    }

    #[test]
    fn out_of_range_bounds_are_refused() {
        for (flag, value) in [
            ("--mbit", "0"),
            ("--mbit", "-5"),
            ("--mbit", "NaN"),
            ("--mbit", "inf"),
            ("--mbit", "10001"),
            ("--seconds", "0"),
            ("--seconds", "-1"),
            ("--seconds", "601"),
            ("--seconds", "nan"),
            ("--max-packets", "0"),
            ("--max-packets", "1000000001"),
        ] {
            let mut v = args("udp", "10.77.1.2:9000", &[]);
            let i = v.iter().position(|a| *a == flag).expect("flag present");
            v[i + 1] = value;
            let cli = parse(&v).expect("clap accepts the number");
            let Mode::Udp { common, .. } = &cli.mode else {
                panic!("udp")
            };
            let err = check_bounds(common).expect_err("refused");
            assert_eq!(err.code, 2);
            assert!(err.message.contains(flag), "{}", err.message);
        }
    }

    #[test]
    fn mode_specific_input_is_checked_before_anything_is_sent() {
        // Loopback + the tests' flag keeps the namespace check out of the way here.
        let lo = ["--allow-loopback-for-tests", "--check-only"];
        let mk = |mode, extra: &[&'static str]| {
            let mut v = vec![mode, "--target", "127.0.0.1:9"];
            v.extend_from_slice(&[
                "--allow",
                "127.0.0.0/8",
                "--mbit",
                "1",
                "--seconds",
                "1",
                "--max-packets",
                "1",
            ]);
            v.extend_from_slice(&lo);
            v.extend_from_slice(extra);
            parse(&v).expect("parses")
        };
        let refused = |cli: Cli| prepare(&cli.mode).err().expect("refused").message;
        assert!(refused(mk("udp", &["--size", "65508"])).contains("--size"));
        assert!(refused(mk("connect", &["--max-open", "0"])).contains("--max-open"));
        assert!(refused(mk("connect", &["--max-open", "513"])).contains("--max-open"));
        assert!(refused(mk("connect", &["--conn-rate", "0"])).contains("--conn-rate"));
        assert!(refused(mk("connect", &["--hold-ms", "60001"])).contains("--hold-ms"));
        assert!(refused(mk("connect", &["--payload-hex", "0g"])).contains("hex"));
        assert!(refused(mk("connect", &["--payload-hex", "abc"])).contains("hex"));
        assert!(refused(mk("connect", &["--size", "0"])).contains("1..="));
        assert!(refused(mk("syn", &["--source", "10.77.1.1"])).contains("SYN source"));
        assert!(refused(mk("syn", &["--source", "nope"])).contains("--source"));
        assert!(prepare(&mk("connect", &["--payload-hex", "0d0A"]).mode).is_ok());
        assert!(prepare(&mk("syn", &["--source", "127.0.0.2"]).mode).is_ok());
    }

    #[test]
    fn hex_payloads() {
        assert_eq!(parse_hex("0d0a").ok(), Some(vec![13, 10]));
        assert_eq!(parse_hex("").ok(), Some(vec![]));
        // Multi-byte UTF-8 must be refused, not split mid-character.
        assert!(parse_hex("é0").is_err());
    }
}
