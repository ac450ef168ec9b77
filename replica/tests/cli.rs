//! The command line as a script sees it: exit codes and a closed pipe, against a cluster laid
//! out on disk whose replicas are not running.

use std::process::{Command, Stdio};

mod common;

use common::{TestCluster, EXE};

/// Runs `kmmr-replica <args> --cluster <dir>`: (success, stdout, stderr).
fn run(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(EXE)
        .args(args)
        .arg("--cluster")
        .arg(dir)
        .output()
        .expect("the command runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A cluster of 4 replicas laid out at free ports, none of them started.
fn laid_out(name: &str) -> TestCluster {
    TestCluster::lay_out(name, 4, 0, kmmr::node::ProtocolConfig::default(), &[])
}

#[test]
fn status_fails_when_no_quorum_of_replicas_answers() {
    let c = laid_out("down");
    let dir = c.dir.clone();
    let (ok, stdout, stderr) = run(&dir, &["status"]);
    assert!(!ok, "{stdout}\n{stderr}");
    assert_eq!(stdout.matches("unreachable").count(), 4, "{stdout}");
    assert!(stderr.contains("only 0 of 4 replicas answered"), "{stderr}");
}

#[test]
fn a_closed_pipe_ends_the_output_without_a_panic() {
    let c = laid_out("pipe");
    let dir = c.dir.clone();
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_or_a_compare_and_swap_that_does_not_swap_fails_and_says_why() {
    let c = TestCluster::start("cas", 4, kmmr::node::ProtocolConfig::default(), &[]).await;
    let dir = c.dir.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let put = run(&dir, &["put", "k", "v"]);
        let wrong = run(&dir, &["cas", "k", "new", "--expected", "wrong"]);
        let missing = run(&dir, &["cas", "nokey", "new", "--expected", "x"]);
        let exists = run(&dir, &["cas", "k", "new", "--absent"]);
        let right = run(&dir, &["cas", "k", "new", "--expected", "v"]);
        let empty = run(&dir, &["put", "", "v"]);
        (put, wrong, missing, exists, right, empty)
    })
    .await
    .expect("the commands run");
    let (put, wrong, missing, exists, right, empty) = outcome;
    assert!(put.0 && put.1.contains("ok (revision"), "{put:?}");
    assert!(
        !empty.0 && empty.2.contains("key is not provided"),
        "{empty:?}"
    );
    assert!(!wrong.0, "{wrong:?}");
    assert!(
        wrong
            .2
            .contains(r#"not swapped: the value of k is "v", not "wrong""#),
        "{wrong:?}"
    );
    assert!(
        !missing.0 && missing.2.contains("nokey does not exist"),
        "{missing:?}"
    );
    assert!(!exists.0 && exists.2.contains("k exists"), "{exists:?}");
    assert!(
        right.0 && right.1.contains("swapped (revision"),
        "{right:?}"
    );
}
