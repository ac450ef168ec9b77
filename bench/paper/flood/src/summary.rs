//! The one JSON line a flood prints when it stops, for the harness to parse.
//!
//! Written by hand: it is one flat object, and serde would be the crate's largest dependency.

use std::fmt::Write as _;
use std::time::Duration;

/// Why a flood stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoppedBy {
    Time,
    Packets,
}

impl StoppedBy {
    fn as_str(self) -> &'static str {
        match self {
            StoppedBy::Time => "time",
            StoppedBy::Packets => "max_packets",
        }
    }
}

/// What a flood did. "packets" are datagrams (udp), SYNs (syn) or requests on completed
/// connections (connect); "bytes" are what the rate bound counts (see the README).
#[derive(Debug, Clone, PartialEq)]
pub struct Tally {
    pub packets: u64,
    pub bytes: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub stopped_by: StoppedBy,
    pub last_error: Option<String>,
}

impl Tally {
    /// Nothing sent yet; a flood that is not stopped early stops by time.
    pub fn new() -> Tally {
        Tally {
            packets: 0,
            bytes: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            stopped_by: StoppedBy::Time,
            last_error: None,
        }
    }

    pub fn achieved_mbit(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.bytes as f64 * 8.0 / secs / 1e6
        } else {
            0.0
        }
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// The summary line, without a trailing newline.
pub fn json_line(mode: &str, target: &str, mbit_limit: f64, t: &Tally) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "{{\"mode\":\"{}\",\"target\":\"{}\",\"seconds\":{:.3},\"packets\":{},\"bytes\":{},\
         \"mbit_limit\":{},\"achieved_mbit\":{:.3},\"errors\":{},\"stopped_by\":\"{}\"",
        escape(mode),
        escape(target),
        t.elapsed.as_secs_f64(),
        t.packets,
        t.bytes,
        mbit_limit,
        t.achieved_mbit(),
        t.errors,
        t.stopped_by.as_str(),
    );
    match &t.last_error {
        Some(e) => {
            let _ = write!(s, ",\"last_error\":\"{}\"}}", escape(e));
        }
        None => s.push('}'),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_one_line_of_json() {
        let t = Tally {
            packets: 10,
            bytes: 1_250_000,
            errors: 1,
            elapsed: Duration::from_secs(1),
            stopped_by: StoppedBy::Time,
            last_error: Some("No buffer space \"x\"\n\u{1}".into()),
        };
        let line = json_line("udp", "10.77.1.2:9000", 10.0, &t);
        assert!(!line.contains('\n'));
        assert_eq!(
            line,
            "{\"mode\":\"udp\",\"target\":\"10.77.1.2:9000\",\"seconds\":1.000,\"packets\":10,\
             \"bytes\":1250000,\"mbit_limit\":10,\"achieved_mbit\":10.000,\"errors\":1,\
             \"stopped_by\":\"time\",\"last_error\":\"No buffer space \\\"x\\\"\\n\\u0001\"}"
        );
    }

    #[test]
    fn zero_elapsed_gives_zero_rate() {
        let t = Tally {
            packets: 0,
            bytes: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            stopped_by: StoppedBy::Packets,
            last_error: None,
        };
        assert_eq!(t.achieved_mbit(), 0.0);
        assert!(json_line("syn", "x", 1.5, &t).ends_with("\"stopped_by\":\"max_packets\"}"));
    }
}
