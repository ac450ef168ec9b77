//! Backup and restore through the command line, with real replica processes: a backup saved
//! from a cluster with a Byzantine replica restores into a new cluster with every key, value
//! and revision; a damaged backup file is refused, by name, before anything is written.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{client_options, TestCluster, EXE};
use kmmr::backup::{read_token, Backup, Header, ServiceKind};
use kmmr::cluster::{free_base_port, wait_healthy};
use kmmr_client::clock::now_us;
use kmmr_client::files::ViewFile;
use kmmr_client::status::{fetch_status, http_get, GetError};
use kmmr_client::Client;
use kmmr_protocol::crypto::{Digest, KeyPair};
use kmmr_protocol::service::kv::{KeyValue, KvRequest, KvResponse, KvStore};
use kmmr_protocol::service::{ExecContext, Service};

/// Runs `kmmr-replica <args>`: (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(EXE)
        .args(args)
        .env_remove("KMMR_CLUSTER")
        .output()
        .expect("the command runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn arg(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// Every key's record, as the cluster reads it.
async fn read_all(client: &Client, keys: &[String]) -> Vec<Option<KeyValue>> {
    let mut out = Vec::new();
    for k in keys {
        match client.kv(&KvRequest::get(k.as_bytes())).await.expect("get") {
            KvResponse::Range(r) => out.push(r.kvs.into_iter().next()),
            other => panic!("get {k}: {other:?}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_saved_past_a_byzantine_replica_restores_every_key_into_a_new_cluster() {
    let c = TestCluster::start(
        "backup-src",
        4,
        kmmr::node::ProtocolConfig::default(),
        &[(0, "corrupt")],
    )
    .await;
    let client = c.client().await;
    let keys: Vec<String> = (0..20).map(|i| format!("backup/k{i:02}")).collect();
    for (i, k) in keys.iter().enumerate() {
        let req = KvRequest::put(k.as_bytes(), format!("v{i}").into_bytes());
        client.kv(&req).await.expect("put");
    }
    // Versions above 1, a key deleted and one absent: all must come back as they were.
    client
        .kv(&KvRequest::put(keys[3].as_bytes(), &b"again"[..]))
        .await
        .expect("put");
    client
        .kv(&KvRequest::delete(keys[5].as_bytes()))
        .await
        .expect("delete");
    let mut keys = keys;
    keys.push("backup/never-written".into());
    let before = read_all(&client, &keys).await;
    drop(client);
    // All four at one state, so the corrupting replica 0 is among those that vouch for it and
    // is asked first.
    let (_, digest) = c.wait_identical(Duration::from_secs(20)).await;
    // The state is the admin's to read: not without a token, nor with one of another key.
    let addr = format!("127.0.0.1:{}", kmmr::cluster::http_port(c.base, 1));
    let stranger = KeyPair::generate(&mut rand::rngs::OsRng);
    for path in [
        "/snapshot".to_string(),
        format!(
            "/snapshot?token={}",
            read_token(&stranger, 1, now_us() / 1000)
        ),
    ] {
        let got = http_get(&addr, &path, Duration::from_secs(5), 1 << 20).await;
        assert!(
            matches!(got, Err(GetError::Bad(ref m)) if m.contains("403")),
            "{path}: {got:?}"
        );
    }

    let file = std::env::temp_dir().join(format!("kmmr-test-backup-{}.kmmr", std::process::id()));
    let (dir, f) = (c.dir.clone(), file.clone());
    let save = tokio::task::spawn_blocking(move || {
        run(&["snapshot", "save", arg(&f), "--cluster", arg(&dir)])
    })
    .await
    .expect("save runs");
    assert!(save.0, "{save:?}");
    assert!(
        save.2.contains("replica 0: it sent a state whose digest"),
        "the corrupted state of replica 0 is caught: {save:?}"
    );
    let saved = Backup::read(&file).expect("the saved file verifies");
    assert_eq!(saved.header.digest.to_string(), digest, "the agreed state");
    assert_eq!(saved.header.keys, 19);
    assert!(saved.header.vouchers.len() >= 2, "{:?}", saved.header);

    // The old cluster is gone, files and all (dropping it kills it and removes its directory).
    let old_dir = c.dir.clone();
    drop(c);
    let _ = std::fs::remove_dir_all(&old_dir);
    assert!(!old_dir.exists());

    let new_dir = std::env::temp_dir().join(format!("kmmr-test-restored-{}", std::process::id()));
    let base = free_base_port(4).expect("free ports");
    let log_path =
        std::env::temp_dir().join(format!("kmmr-test-restore-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).expect("restore log");
    let mut restore = Command::new(EXE)
        .args(["snapshot", "restore", arg(&file), "--dir", arg(&new_dir)])
        .args(["--base-port", &base.to_string()])
        .env_remove("KMMR_CLUSTER")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("restore starts");
    let result = check_restored(&new_dir, base, &keys, &before, &saved).await;
    // SIGTERM, so that `local` stops its replicas before it exits.
    let _ = Command::new("kill")
        .args(["-TERM", &restore.id().to_string()])
        .status();
    let _ = restore.wait();
    if let Err(e) = result {
        panic!(
            "the restored cluster does not hold the saved state: {e}\nrestore's output:\n{}\nreplica 1's log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default(),
            std::fs::read_to_string(new_dir.join("r1.log")).unwrap_or_default()
        );
    }
    let _ = std::fs::remove_dir_all(&new_dir);
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&log_path);
}

async fn check_restored(
    dir: &Path,
    base: u16,
    keys: &[String],
    before: &[Option<KeyValue>],
    saved: &Backup,
) -> Result<(), String> {
    for i in 0..4 {
        wait_healthy(base, i, Duration::from_secs(30))
            .await
            .map_err(|e| e.to_string())?;
    }
    // Every replica starts from the same bytes: one digest, the file's.
    for i in 0..4 {
        let url = format!(
            "http://127.0.0.1:{}/status",
            kmmr::cluster::http_port(base, i)
        );
        let s = fetch_status(&url).await.map_err(|e| e.to_string())?;
        if s.status.state_digest != saved.header.digest.to_string() {
            return Err(format!("replica {i} starts at {}", s.status.state_digest));
        }
    }
    let view = ViewFile::load(&dir.join("view.toml")).map_err(|e| e.to_string())?;
    let client = Client::connect(
        KeyPair::generate(&mut rand::rngs::OsRng),
        view,
        client_options(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let after = read_all(&client, keys).await;
    if after != before {
        return Err(format!("read back {after:?}\nsaved {before:?}"));
    }
    // Revisions continue from the saved one.
    match client
        .kv(&KvRequest::put(&b"backup/new"[..], &b"x"[..]))
        .await
    {
        Ok(KvResponse::Put(p)) if p.header.revision == saved.header.revision + 1 => Ok(()),
        other => Err(format!(
            "a put after revision {} answered {other:?}",
            saved.header.revision
        )),
    }
}

/// A valid backup of a small store, made without a cluster.
fn small_backup() -> Backup {
    let mut store = KvStore::new(1000);
    for i in 0..5u64 {
        let ctx = ExecContext {
            cid: i,
            timestamp_ms: 1_000 + i,
            index: 0,
        };
        store.apply(&ctx, &KvRequest::put(format!("k{i}"), format!("v{i}")));
    }
    let body = store.snapshot();
    Backup::new(
        Header {
            service: ServiceKind::Kv,
            view_id: 0,
            cluster: Digest([1; 32]),
            cid: Some(4),
            revision: store.revision(),
            keys: 5,
            vouchers: vec![1, 2],
            digest: Digest::of(&body),
        },
        body,
    )
    .expect("a valid backup")
}

#[test]
fn a_damaged_backup_is_refused_by_name_and_nothing_is_written() {
    let tmp = std::env::temp_dir().join(format!("kmmr-test-damaged-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let good = small_backup().encode();
    let good_path = tmp.join("good.kmmr");
    std::fs::write(&good_path, &good).expect("write");
    let (ok, stdout, stderr) = run(&["snapshot", "status", arg(&good_path), "-o", "json"]);
    assert!(ok, "{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(v["revision"], 6, "{v}");
    assert_eq!(v["keys"], 5, "{v}");

    let body_at = good.len() - 32 - small_backup().body.len();
    let mut damaged: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut body_flip = good.clone();
    body_flip[body_at + 7] ^= 0x10;
    damaged.push(("body", body_flip, "checksum mismatch"));
    let mut header_flip = good.clone();
    header_flip[60] ^= 0x01; // in the revision field
    damaged.push(("header", header_flip, "checksum mismatch"));
    damaged.push(("truncated", good[..good.len() - 10].to_vec(), "truncated"));
    let mut magic = good.clone();
    magic[..8].copy_from_slice(b"NOTKMMR!");
    damaged.push(("magic", magic, "not a KmMR snapshot file"));

    for (what, bytes, says) in damaged {
        let path = tmp.join(format!("{what}.kmmr"));
        std::fs::write(&path, bytes).expect("write");
        let (ok, out, err) = run(&["snapshot", "status", arg(&path)]);
        assert!(!ok && err.contains(says), "status of {what}: {out}\n{err}");
        let new_dir: PathBuf = tmp.join(format!("cluster-{what}"));
        let base = free_base_port(4).expect("free ports").to_string();
        for cmd in [
            vec!["local", "--from-snapshot", arg(&path)],
            vec!["snapshot", "restore", arg(&path)],
        ] {
            let mut args = cmd.clone();
            args.extend(["--dir", arg(&new_dir), "--base-port", &base]);
            let (ok, out, err) = run(&args);
            assert!(!ok, "{cmd:?} of {what} must fail: {out}\n{err}");
            assert!(
                err.contains(says) && err.contains("refusing the backup"),
                "{cmd:?} of {what}: {err}"
            );
            assert!(!new_dir.exists(), "{cmd:?} of {what} wrote {new_dir:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_initial_state_was_damaged_refuses_to_start() {
    let mut c = TestCluster::lay_out(
        "backup-damaged-start",
        4,
        0,
        kmmr::node::ProtocolConfig::default(),
        &[],
    );
    let mut bytes = small_backup().encode();
    kmmr::cluster::set_initial_state(&c.dir, 4, &bytes).expect("initial state");
    // Damaged after the cluster was made, as a disk could: every start checks it again.
    let last = bytes.len() - 40;
    bytes[last] ^= 0x01;
    std::fs::write(c.dir.join(kmmr::cluster::INITIAL_STATE_FILE), &bytes).expect("damage");
    c.spawn(0);
    let exit = c.exit_status(0, Duration::from_secs(20)).await;
    assert!(exit.is_some_and(|s| !s.success()), "{exit:?}");
    let log = c.log(0);
    assert!(
        log.contains("initial_state") && log.contains("checksum mismatch"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_replica_restarted_replays_its_log_onto_the_backup() {
    let mut c = TestCluster::lay_out(
        "backup-restart",
        4,
        0,
        kmmr::node::ProtocolConfig::default(),
        &[],
    );
    let backup = small_backup();
    kmmr::cluster::set_initial_state(&c.dir, 4, &backup.encode()).expect("initial state");
    for i in 0..4 {
        c.spawn(i);
    }
    for i in 0..4 {
        c.wait_healthy(i).await;
    }
    let client = c.client().await;
    match client.kv(&KvRequest::put(&b"after"[..], &b"x"[..])).await {
        Ok(KvResponse::Put(p)) => assert_eq!(p.header.revision, backup.header.revision + 1),
        other => panic!("{other:?}"),
    }
    let (_, before) = c.wait_identical(Duration::from_secs(20)).await;
    // From its disk: the backup, then the decisions since (no checkpoint covers them yet).
    c.kill(1).await;
    c.spawn(1);
    c.wait_healthy(1).await;
    let (_, after) = c.wait_identical(Duration::from_secs(20)).await;
    assert_eq!(before, after);
    let got = read_all(&client, &["k0".into(), "after".into()]).await;
    assert_eq!(
        got[0].as_ref().map(|kv| kv.value.clone()),
        Some(b"v0".to_vec())
    );
    assert_eq!(
        got[1].as_ref().map(|kv| kv.value.clone()),
        Some(b"x".to_vec())
    );
}
