//! The command line as a script sees it: exit codes and a closed pipe, against a cluster laid
//! out on disk whose replicas are not running.

use std::process::{Command, Stdio};

use kmmr::cluster::{free_base_port, prepare, ClusterSpec};

const EXE: &str = env!("CARGO_BIN_EXE_kmmr-replica");

/// A cluster directory for 4 replicas at free ports, none of them started.
fn laid_out(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kmmr-test-cli-{name}-{}", std::process::id()));
    prepare(&ClusterSpec {
        n: 4,
        dir: dir.clone(),
        base_port: free_base_port(4).expect("free ports"),
        byzantine: Vec::new(),
        busy_poll_us: kmmr::node::config::DEFAULT_BUSY_POLL_US,
        protocol: kmmr::node::ProtocolConfig::default(),
    })
    .expect("cluster files");
    dir
}

#[test]
fn status_fails_when_no_quorum_of_replicas_answers() {
    let dir = laid_out("down");
    let out = Command::new(EXE)
        .args(["status", "--cluster"])
        .arg(&dir)
        .output()
        .expect("status runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.matches("unreachable").count(), 4, "{stdout}");
    assert!(stderr.contains("only 0 of 4 replicas answered"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_closed_pipe_ends_the_output_without_a_panic() {
    let dir = laid_out("pipe");
    let mut child = Command::new(EXE)
        .args(["status", "--cluster"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("status runs");
    // The reader goes away before reading anything, as `| head -0` would.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("status ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Success when the closed pipe ended it, the status error when the lines fit in the pipe
    // before it closed; never a crash.
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{:?}: {stderr}",
        out.status
    );
    let _ = std::fs::remove_dir_all(&dir);
}
