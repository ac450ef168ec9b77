//! The command line as a script and a person see it: exit codes, messages and output, against
//! clusters laid out on disk (running or not), with each command its own process.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{TestCluster, EXE};
use kmmr_protocol::service::kv::{CompactRequest, KvRequest, MAX_VALUE_LEN};

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
fn a_command_fails_at_once_when_no_replica_answers() {
    let c = laid_out("none");
    let t = Instant::now();
    let (ok, stdout, stderr) = run(&c.dir, &["put", "k", "v"]);
    assert!(!ok, "{stdout}\n{stderr}");
    assert!(stderr.contains("no replica of the cluster at"), "{stderr}");
    assert!(
        stderr.contains("replica 3:"),
        "every replica named: {stderr}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
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

/// What a command did: (success, stdout, stderr).
type Outcome = (bool, String, String);

/// Runs `kmmr-replica <args>` with `stdin` as its input, in `cwd`, with `env` set and
/// `KMMR_CLUSTER` unset unless `env` sets it.
fn run_in(cwd: &Path, args: &[&str], stdin: &[u8], env: &[(&str, &Path)]) -> Outcome {
    let mut cmd = Command::new(EXE);
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("KMMR_CLUSTER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the command runs");
    let mut input = child.stdin.take().expect("stdin");
    // A command that refuses early closes its stdin: a failed write is its answer, not ours.
    let _ = input.write_all(stdin);
    drop(input);
    let out = child.wait_with_output().expect("the command ends");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `kmmr-replica <args> --cluster <dir>` and returns its stdout as bytes, exactly.
fn run_bytes(dir: &Path, args: &[&str]) -> (bool, Vec<u8>) {
    let out = Command::new(EXE)
        .args(args)
        .arg("--cluster")
        .arg(dir)
        .output()
        .expect("the command runs");
    (out.status.success(), out.stdout)
}

/// A `watch` in one process shows a put made by another within a second (the replicas once
/// refused every request of the watch's session as soon as the put, which shared its client
/// key, started a newer one: the watch hung until its 30 s timeout); it starts from now, stops
/// after `--seconds`, prints history with `--from`, and says what to do when the history it
/// asks for is compacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_a_change_made_by_another_process_within_a_second() {
    let c = TestCluster::start("watch", 4, kmmr::node::ProtocolConfig::default(), &[]).await;
    let dir = c.dir.clone();
    let d = dir.clone();
    tokio::task::spawn_blocking(move || {
        let dir = d;
        let before = run(&dir, &["put", "a", "1"]);
        assert!(before.0, "{before:?}");
        let started = Instant::now();
        let mut watch = Command::new(EXE)
            .args(["watch", "a", "--seconds", "6", "--cluster"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("watch runs");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = watch.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send((Instant::now(), line));
            }
        });
        let mut stderr = BufReader::new(watch.stderr.take().expect("stderr"));
        let mut said = String::new();
        while !said.contains("watching") {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            said.push_str(&line);
        }
        assert!(said.contains("watching keys starting with a"), "{said}");
        let put = run(&dir, &["put", "a", "2"]);
        assert!(put.0, "{put:?}");
        let put_done = Instant::now();
        let (at, line) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the watch prints the change made by the other process");
        assert!(line.starts_with("PUT a = 2"), "from now, not a = 1: {line}");
        assert!(
            at.saturating_duration_since(put_done) < Duration::from_secs(1),
            "shown {:?} after the put returned",
            at.saturating_duration_since(put_done)
        );
        let status = watch.wait().expect("watch ends");
        let took = started.elapsed();
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
        assert!(status.success(), "{status}: {rest}");
        assert!(
            took >= Duration::from_secs(6) && took < Duration::from_secs(9),
            "--seconds 6 took {took:?}"
        );
        let history = run(&dir, &["watch", "a", "--from", "0", "--seconds", "2"]);
        assert!(history.0, "{history:?}");
        assert!(
            history.1.contains("PUT a = 1") && history.1.contains("PUT a = 2"),
            "{history:?}"
        );
        let json = run(
            &dir,
            &["-o", "json", "watch", "a", "--from", "0", "--seconds", "2"],
        );
        let first: serde_json::Value =
            serde_json::from_str(json.1.lines().next().unwrap_or_default()).expect("JSON");
        assert_eq!(first["type"], "PUT");
        assert_eq!(first["key"], "a");
        assert_eq!(first["value"], "1");
    })
    .await
    .expect("the commands run");
    // History before revision 2 goes: a watch of it must say so, and how to carry on.
    let client = c.client().await;
    client
        .kv(&KvRequest::Compact(CompactRequest { revision: 2 }))
        .await
        .expect("compacted");
    let d = dir.clone();
    let compacted = tokio::task::spawn_blocking(move || {
        run(&d, &["watch", "a", "--from", "0", "--seconds", "5"])
    })
    .await
    .expect("the command runs");
    // The replicated session table grows with the commands that ran at once (the watch and the
    // put), not with every command run: the keys are pooled and given back.
    let mut pool: Vec<String> = std::fs::read_dir(dir.join("client-keys"))
        .expect("a key pool")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    pool.sort();
    assert_eq!(pool, ["0.key", "1.key"]);
    assert!(!compacted.0, "{compacted:?}");
    assert!(
        compacted.2.contains("compacted") && compacted.2.contains("--from 2"),
        "{compacted:?}"
    );
}

/// Values from a file and from stdin, printed back byte for byte or escaped for people, JSON
/// for scripts, a value over the limit refused at once with the limit named, a missing key
/// failing, listing by prefix and all keys in pages, and a default cluster from KMMR_CLUSTER.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_say_what_they_did_in_text_or_json_and_fail_clearly() {
    let c = TestCluster::start("trust", 4, kmmr::node::ProtocolConfig::default(), &[]).await;
    let dir = c.dir.clone();
    let log0 = c.log(0);
    tokio::task::spawn_blocking(move || {
        let tmp = dir.join("inputs");
        std::fs::create_dir_all(&tmp).unwrap();
        let binary = b"line one\nbinary \xff\x00 tail".to_vec();
        let file = tmp.join("value.bin");
        std::fs::write(&file, &binary).unwrap();
        let from_file = run(&dir, &["put", "bin", "--file", file.to_str().unwrap()]);
        assert!(
            from_file.0 && from_file.1.contains("ok (revision"),
            "{from_file:?}"
        );
        let (ok, exact) = run_bytes(&dir, &["get", "bin", "--value-only"]);
        assert!(ok && exact == binary, "{exact:?}");
        let shown = run(&dir, &["get", "bin"]);
        assert!(
            shown.0 && shown.1.contains(r"bin = line one\nbinary \xff\x00 tail"),
            "{shown:?}"
        );
        let json = run(&dir, &["get", "bin", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(json.1.trim()).expect("JSON");
        assert_eq!(v["key"], "bin");
        assert_eq!(v["value_hex"], hex::encode(&binary));

        let cluster_arg = dir.to_str().unwrap();
        let stdin = run_in(
            &tmp,
            &["put", "piped", "-", "-o", "json", "--cluster", cluster_arg],
            b"from stdin",
            &[],
        );
        assert!(stdin.0, "{stdin:?}");
        let v: serde_json::Value = serde_json::from_str(stdin.1.trim()).expect("JSON");
        assert!(v["revision"].as_u64().is_some_and(|r| r > 0), "{stdin:?}");
        // From anywhere, with the cluster named once in the environment.
        let env = run_in(
            Path::new("/"),
            &["get", "piped"],
            b"",
            &[("KMMR_CLUSTER", &dir)],
        );
        assert!(env.0 && env.1.contains("piped = from stdin"), "{env:?}");
        let nowhere = run_in(&tmp, &["get", "piped"], b"", &[]);
        assert!(
            !nowhere.0 && nowhere.2.contains("KMMR_CLUSTER"),
            "{nowhere:?}"
        );

        let big = tmp.join("big.bin");
        std::fs::write(&big, vec![b'x'; MAX_VALUE_LEN + 1]).unwrap();
        let t = Instant::now();
        let over = run(&dir, &["put", "big", "--file", big.to_str().unwrap()]);
        assert!(!over.0, "{over:?}");
        assert!(
            over.2
                .contains(&format!("the limit is {MAX_VALUE_LEN} bytes")),
            "{over:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );

        let missing = run(&dir, &["get", "nokey"]);
        assert!(
            !missing.0 && missing.2.contains("key not found: nokey"),
            "{missing:?}"
        );

        for i in 1..=5 {
            let p = run(&dir, &["put", &format!("p/{i}"), &format!("v{i}")]);
            assert!(p.0, "{p:?}");
        }
        let paged = run(&dir, &["range", "--prefix", "p/", "--page-size", "2"]);
        let keys: Vec<&str> = paged
            .1
            .lines()
            .filter_map(|l| l.split(" = ").next())
            .collect();
        assert_eq!(keys, ["p/1", "p/2", "p/3", "p/4", "p/5"], "{paged:?}");
        assert!(paged.2.contains("5 keys starting with p/"), "{paged:?}");
        let limited = run(&dir, &["range", "p/", "--limit", "3", "--keys-only"]);
        assert_eq!(limited.1, "p/1\np/2\np/3\n", "{limited:?}");
        let all = run(&dir, &["range", "--page-size", "3", "-o", "json"]);
        let all_keys: Vec<String> = all
            .1
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
                v["key"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        assert_eq!(
            all_keys,
            ["bin", "p/1", "p/2", "p/3", "p/4", "p/5", "piped"],
            "{all:?}"
        );

        let deleted = run(&dir, &["delete", "p/1"]);
        assert!(
            deleted.0 && deleted.1.contains("deleted 1 key (revision"),
            "{deleted:?}"
        );

        let bench = run(
            &dir,
            &["bench", "--op", "put", "--duration", "2", "--warmup", "0"],
        );
        assert!(bench.0, "{bench:?}");
        assert!(
            bench.2.contains("ops/s in the last second"),
            "progress lines: {bench:?}"
        );
    })
    .await
    .expect("the commands run");
    assert!(!log0.contains('\u{1b}'), "colour codes in a log file");
}

/// `local` never replaces the directory of a cluster that runs, nor any directory it did not
/// make, and refuses ports in use before writing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_leaves_a_running_cluster_and_other_directories_alone() {
    let c = TestCluster::start("local", 4, kmmr::node::ProtocolConfig::default(), &[]).await;
    let dir = c.dir.clone();
    let base = c.base;
    tokio::task::spawn_blocking(move || {
        let view_before = std::fs::read(dir.join("view.toml")).unwrap();
        let free = kmmr::cluster::free_base_port(4)
            .expect("free ports")
            .to_string();
        let dir_arg = dir.to_str().unwrap();
        let again = run_in(
            Path::new("/"),
            &[
                "local",
                "--dir",
                dir_arg,
                "--base-port",
                &free,
                "--no-durable",
            ],
            b"",
            &[],
        );
        assert!(!again.0, "{again:?}");
        assert!(
            again.2.contains("belongs to a running cluster"),
            "{again:?}"
        );
        assert_eq!(std::fs::read(dir.join("view.toml")).unwrap(), view_before);

        let fresh = dir.join("fresh");
        let taken = run_in(
            Path::new("/"),
            &[
                "local",
                "--dir",
                fresh.to_str().unwrap(),
                "--base-port",
                &base.to_string(),
            ],
            b"",
            &[],
        );
        assert!(!taken.0 && taken.2.contains("is in use"), "{taken:?}");
        assert!(!fresh.exists(), "nothing written for a refused layout");

        let other = dir.join("not-a-cluster");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("notes.txt"), "mine").unwrap();
        let refused = run_in(
            Path::new("/"),
            &[
                "local",
                "--dir",
                other.to_str().unwrap(),
                "--base-port",
                &free,
            ],
            b"",
            &[],
        );
        assert!(
            !refused.0 && refused.2.contains("is not a cluster directory"),
            "{refused:?}"
        );
        assert_eq!(
            std::fs::read_to_string(other.join("notes.txt")).unwrap(),
            "mine"
        );
    })
    .await
    .expect("the commands run");
}

/// A replica removed from the view stops by itself; `local` waits for it (no zombie process)
/// and says so, and goes on serving with the others.
#[test]
fn local_reaps_a_removed_replica() {
    let dir = std::env::temp_dir().join(format!("kmmr-test-reap-{}", std::process::id()));
    let base = kmmr::cluster::free_base_port(5)
        .expect("free ports")
        .to_string();
    let mut local = Command::new(EXE)
        .args(["local", "--n", "5", "--no-durable", "--keep-running"])
        .args(["--base-port", &base, "--dir"])
        .arg(&dir)
        .env_remove("KMMR_CLUSTER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("local runs");
    let (tx, rx) = std::sync::mpsc::channel();
    let (out, err) = (local.stdout.take(), local.stderr.take());
    for stream in [
        out.map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        err.map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let wait_for = |what: &str, within: Duration| -> Result<(), String> {
        let until = Instant::now() + within;
        let mut seen = String::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(what) => return Ok(()),
                Ok(line) => seen.push_str(&format!("{line}\n")),
                Err(_) => break,
            }
        }
        Err(format!(
            "no line with {what:?} within {within:?}; saw:\n{seen}"
        ))
    };
    let outcome = wait_for("running (Ctrl-C stops)", Duration::from_secs(30)).and_then(|()| {
        let cluster = dir.to_str().unwrap_or_default();
        let removed = run_in(
            Path::new("/"),
            &["admin", "--cluster", cluster, "remove", "--id", "4"],
            b"",
            &[],
        );
        if !removed.0 {
            return Err(format!("admin remove failed: {removed:?}"));
        }
        wait_for("replica 4 exited", Duration::from_secs(20))?;
        let put = run(&dir, &["put", "after", "removal"]);
        if !put.0 {
            return Err(format!("the four left serve: {put:?}"));
        }
        Ok(())
    });
    // SIGTERM, which local answers by stopping its replicas (SIGKILL would orphan them).
    let _ = Command::new("kill")
        .args(["-TERM", &local.id().to_string()])
        .status();
    let stopped = local.wait().expect("local stops");
    outcome.expect("local reaps the removed replica");
    assert!(stopped.success(), "{stopped}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With fewer replicas up than an answer needs, a command names the ones it cannot reach,
/// gives up after --timeout, and says how many were connected and how many must agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_without_a_quorum_names_the_missing_replicas_and_honours_its_timeout() {
    let mut c = TestCluster::start("noquorum", 4, kmmr::node::ProtocolConfig::default(), &[]).await;
    c.kill(2).await;
    c.kill(3).await;
    let dir = c.dir.clone();
    let t = Instant::now();
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || run(&dir, &["put", "k", "v", "--timeout", "2"]))
            .await
            .expect("the command runs");
    assert!(!ok, "{stdout}\n{stderr}");
    assert!(stderr.contains("replica 2 unreachable"), "{stderr}");
    assert!(stderr.contains("replica 3 unreachable"), "{stderr}");
    assert!(
        stderr.contains("2 of the 4 replicas connected, and an answer needs 3"),
        "{stderr}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
}

/// `admin add` with the new replica's key file writes its config next to the others' and says
/// how to start it; started that way, the replica joins and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_add_writes_the_new_replicas_config() {
    let mut c = TestCluster::lay_out("join", 4, 1, kmmr::node::ProtocolConfig::default(), &[]);
    for i in 0..4 {
        c.spawn(i);
    }
    for i in 0..4 {
        c.wait_healthy(i).await;
    }
    let dir = c.dir.clone();
    let address = format!("127.0.0.1:{}", c.base + 4);
    let added = tokio::task::spawn_blocking(move || {
        let cluster = dir.to_str().unwrap_or_default();
        let key = dir.join("r4.key");
        let keygen = run_in(
            Path::new("/"),
            &["keygen", "--out", key.to_str().unwrap_or_default()],
            b"",
            &[],
        );
        assert!(keygen.0, "{keygen:?}");
        let put = run(&dir, &["put", "before", "join"]);
        assert!(put.0, "{put:?}");
        run_in(
            Path::new("/"),
            &[
                "admin",
                "--cluster",
                cluster,
                "add",
                "--id",
                "4",
                "--address",
                &address,
                "--key-file",
                key.to_str().unwrap_or_default(),
            ],
            b"",
            &[],
        )
    })
    .await
    .expect("the commands run");
    assert!(added.0, "{added:?}");
    assert!(
        added.1.contains("start it with: kmmr-replica run --config"),
        "{added:?}"
    );
    c.spawn(4);
    c.wait_healthy(4).await;
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let view = kmmr_client::files::ViewFile::load(&c.dir.join("view.toml")).expect("view");
        let s = c.status_in(&view, 4).await;
        if s.as_ref()
            .is_some_and(|s| s.status.n == 5 && s.status.last_decided.is_some())
        {
            break;
        }
        assert!(
            Instant::now() < until,
            "replica 4 did not join: {s:?}\n{}",
            c.log(4)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
