//! The load generator against a real `local` cluster: closed loop with a reply size, open
//! loop at a fixed rate, and a clear error for a KV Put sent to the no-op service.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

const EXE: &str = env!("CARGO_BIN_EXE_kmmr-replica");

fn bench(dir: &PathBuf, extra: &[&str]) -> (bool, String) {
    let out = Command::new(EXE)
        .args(["bench", "--cluster"])
        .arg(dir)
        .args(["--warmup", "0.5", "--json"])
        .args(extra)
        .stderr(Stdio::piped())
        .output()
        .expect("bench runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A field of the one JSON line among the output's lines (progress lines come on stderr).
fn field(output: &str, name: &str) -> f64 {
    let json = output
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("a JSON line in {output}"));
    let v: serde_json::Value = serde_json::from_str(json).expect("one JSON line");
    v[name]
        .as_f64()
        .unwrap_or_else(|| panic!("{name} in {json}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_and_open_loop_against_a_local_cluster() {
    let dir = std::env::temp_dir().join(format!("kmmr-test-bench-{}", std::process::id()));
    let base = kmmr::cluster::free_base_port(4).expect("free ports");
    let mut local = tokio::process::Command::new(EXE)
        .args([
            "local",
            "--n",
            "4",
            "--service",
            "noop",
            "--no-durable",
            "--keep-running",
        ])
        .args(["--base-port", &base.to_string(), "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("local starts");
    let mut lines = BufReader::new(local.stdout.take().expect("stdout")).lines();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let line = tokio::time::timeout_at(until.into(), lines.next_line())
            .await
            .expect("cluster up within 60 s")
            .expect("reading local's output")
            .expect("local exited before it was up");
        if line.starts_with("running") {
            break;
        }
    }
    let d = dir.clone();
    let (closed, open, put) = tokio::task::spawn_blocking(move || {
        let closed = bench(&d, &["--duration", "1", "--reply-size", "1000"]);
        let open = bench(&d, &["--duration", "2", "--rate", "200", "--clients", "4"]);
        let put = bench(&d, &["--duration", "1", "--op", "put"]);
        (closed, open, put)
    })
    .await
    .expect("bench thread");

    assert!(closed.0, "{}", closed.1);
    assert!(field(&closed.1, "ops") >= 10.0, "{}", closed.1);
    assert_eq!(field(&closed.1, "errors"), 0.0, "{}", closed.1);
    assert_eq!(field(&closed.1, "request_size"), 4.0, "{}", closed.1);

    // Open loop: what was offered is what got through, within what a shared machine allows.
    assert!(open.0, "{}", open.1);
    let rate = field(&open.1, "ops_per_sec");
    assert!((140.0..=210.0).contains(&rate), "{}", open.1);
    assert_eq!(field(&open.1, "errors"), 0.0, "{}", open.1);

    assert!(!put.0, "a Put to the no-op service must fail: {}", put.1);
    assert!(put.1.contains("first Put"), "{}", put.1);

    // SIGTERM, as a user's `kill` would: `local` takes its replicas down with it.
    let pid = local.id().expect("local still running").to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let _ = tokio::time::timeout(Duration::from_secs(10), local.wait()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = Command::new("pgrep")
        .args(["-f", &dir.display().to_string()])
        .output()
        .expect("pgrep");
    assert!(
        left.stdout.is_empty(),
        "replicas outlived local: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
