//! Backups in S3, against a real S3 server on loopback: moto's (PyPI `moto[server]`, installed
//! by replica/scripts/install-moto.sh, which test.sh runs; KMMR_MOTO_SERVER names its
//! `moto_server`, else the script is run here). Each test starts its own server on a port the
//! OS says is free and stops it at the end.
//!
//! A backup saved to S3 from a running cluster restores every key into a new one; `--keep`
//! prunes the oldest objects of a prefix; a corrupted object is refused with the words a
//! corrupted file gets; S3's refusals (no such bucket, no such key, bad credentials) reach the
//! user with S3's own code and a non-zero exit; large uploads go up in parts.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;

use common::{client_options, TestCluster, EXE};
use kmmr::backup::{Backup, Header, ServiceKind};
use kmmr::cluster::{free_base_port, wait_healthy};
use kmmr_client::files::ViewFile;
use kmmr_client::status::fetch_status;
use kmmr_client::Client;
use kmmr_protocol::crypto::{Digest, KeyPair};
use kmmr_protocol::service::kv::{KeyValue, KvRequest, KvResponse, KvStore};
use kmmr_protocol::service::{ExecContext, Service};
use kmmr_s3::{Config, Credentials, Endpoint, S3Url};

/// The `moto_server` executable: KMMR_MOTO_SERVER, or what the install script prints.
fn moto_server() -> &'static str {
    static EXE_PATH: OnceLock<String> = OnceLock::new();
    EXE_PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("KMMR_MOTO_SERVER") {
            if !p.is_empty() {
                return p;
            }
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install-moto.sh");
        let out = Command::new(script)
            .stderr(Stdio::inherit())
            .output()
            .expect("replica/scripts/install-moto.sh runs");
        assert!(
            out.status.success(),
            "moto's S3 server is needed for these tests and could not be installed: run \
             replica/scripts/install-moto.sh and set KMMR_MOTO_SERVER to the path it prints"
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
}

/// A moto S3 server on 127.0.0.1, killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
    log: std::path::PathBuf,
}

impl Moto {
    fn start(name: &str) -> Moto {
        Moto::start_with(name, &[], &[])
    }

    /// With `extra` arguments to moto_server (for TLS: -c CERT -k KEY) and environment.
    fn start_with(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Moto {
        let scheme = if extra.is_empty() { "http" } else { "https" };
        let log =
            std::env::temp_dir().join(format!("kmmr-test-moto-{name}-{}.log", std::process::id()));
        // A port the OS says is free; another process could take it before moto binds it, so
        // a server that does not come up is started again on another.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let out = std::fs::File::create(&log).expect("moto's log");
            let err = out.try_clone().expect("moto's log");
            let mut child = Command::new(moto_server())
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .args(extra)
                .envs(env.iter().copied())
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("moto_server starts");
            let until = Instant::now() + Duration::from_secs(60);
            while Instant::now() < until {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Moto {
                        child,
                        endpoint: format!("{scheme}://127.0.0.1:{port}"),
                        log,
                    };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "moto_server did not come up: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn config(&self) -> Config {
        Config {
            endpoint: Endpoint::parse(&self.endpoint).expect("moto's endpoint"),
            region: "us-east-1".into(),
            credentials: Credentials {
                access_key_id: "AKIAKMMRTEST".into(),
                secret_access_key: "kmmr-test-secret".into(),
                session_token: None,
            },
            extra_ca: None,
        }
    }

    fn client(&self) -> kmmr_s3::Client {
        kmmr_s3::Client::new(self.config()).expect("a client")
    }

    /// Runs `kmmr-replica <args>` against this server: (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(EXE)
            .args(args)
            .env_remove("KMMR_CLUSTER")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_CA_BUNDLE")
            .env_remove("AWS_ENDPOINT_URL_S3")
            .env("AWS_ACCESS_KEY_ID", "AKIAKMMRTEST")
            .env("AWS_SECRET_ACCESS_KEY", "kmmr-test-secret")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .output()
            .expect("the command runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn url(s: &str) -> S3Url {
    S3Url::parse(s).expect("a valid s3 URL")
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
async fn a_backup_saved_to_s3_restores_every_key_into_a_new_cluster_and_keep_prunes() {
    let moto = Moto::start("restore");
    let s3 = moto.client();
    s3.create_bucket("backups")
        .await
        .expect("create the bucket");
    let c = TestCluster::start(
        "s3-src",
        4,
        kmmr::node::ProtocolConfig::default(),
        &[(0, "corrupt")],
    )
    .await;
    let client = c.client().await;
    let keys: Vec<String> = (0..20).map(|i| format!("s3/k{i:02}")).collect();
    for (i, k) in keys.iter().enumerate() {
        let req = KvRequest::put(k.as_bytes(), format!("v{i}").into_bytes());
        client.kv(&req).await.expect("put");
    }
    client
        .kv(&KvRequest::delete(keys[5].as_bytes()))
        .await
        .expect("delete");

    // Three saves under one prefix, a second apart (names carry the time to the second), the
    // newest two kept; an object of another kind under the prefix is left alone.
    s3.put_object(&url("s3://backups/demo/notes.txt"), &[&b"not a backup"[..]])
        .await
        .expect("put");
    let mut reports = Vec::new();
    for round in 0..3 {
        client
            .kv(&KvRequest::put(
                &b"s3/round"[..],
                format!("{round}").into_bytes(),
            ))
            .await
            .expect("put");
        c.wait_identical(Duration::from_secs(20)).await;
        let dir = c.dir.clone();
        let (ok, out, err) = tokio::task::block_in_place(|| {
            moto.run(&[
                "snapshot",
                "save",
                "s3://backups/demo/",
                "--cluster",
                arg(&dir),
                "--keep",
                "2",
                "-o",
                "json",
            ])
        });
        assert!(ok, "save {round}: {out}\n{err}");
        let report: serde_json::Value = serde_json::from_str(out.trim()).expect("a JSON report");
        reports.push(report);
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let mut keys = keys;
    keys.push("s3/round".into());
    keys.push("s3/never-written".into());
    let before = read_all(&client, &keys).await;
    drop(client);

    let listed: Vec<String> = s3
        .list("backups", "demo/")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect();
    let newest = reports[2]["file"].as_str().expect("file").to_string();
    let second = reports[1]["file"].as_str().expect("file").to_string();
    let expect: Vec<String> = [second.as_str(), newest.as_str()]
        .iter()
        .map(|f| f.trim_start_matches("s3://backups/").to_string())
        .chain(["demo/notes.txt".to_string()])
        .collect();
    let mut expect = expect;
    expect.sort();
    assert_eq!(
        listed, expect,
        "the newest two backups and the other object stay"
    );
    assert!(newest.starts_with("s3://backups/demo/kmmr-") && newest.ends_with(".kmmr"));

    let (ok, out, err) = moto.run(&["snapshot", "status", &newest, "-o", "json"]);
    assert!(ok, "{out}\n{err}");
    let status: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(status["digest"], reports[2]["digest"], "{status}");
    assert_eq!(status["file"], newest.as_str());
    let object = s3.get_object(&url(&newest), 1 << 30).await.expect("get");
    let saved = Backup::decode(&object).expect("the saved object verifies");
    assert_eq!(saved.header.keys, 20, "{:?}", saved.header);

    let old_dir = c.dir.clone();
    drop(c);
    let _ = std::fs::remove_dir_all(&old_dir);

    let new_dir =
        std::env::temp_dir().join(format!("kmmr-test-s3-restored-{}", std::process::id()));
    let base = free_base_port(4).expect("free ports");
    let log_path =
        std::env::temp_dir().join(format!("kmmr-test-s3-restore-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).expect("restore log");
    let mut restore = Command::new(EXE)
        .args(["snapshot", "restore", &newest, "--dir", arg(&new_dir)])
        .args([
            "--base-port",
            &base.to_string(),
            "--s3-endpoint",
            &moto.endpoint,
        ])
        .env_remove("KMMR_CLUSTER")
        .env_remove("AWS_ENDPOINT_URL")
        .env("AWS_ACCESS_KEY_ID", "AKIAKMMRTEST")
        .env("AWS_SECRET_ACCESS_KEY", "kmmr-test-secret")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("restore starts");
    let result = check_restored(&new_dir, base, &keys, &before, &saved).await;
    let _ = Command::new("kill")
        .args(["-TERM", &restore.id().to_string()])
        .status();
    let _ = restore.wait();
    if let Err(e) = result {
        panic!(
            "the cluster restored from S3 does not hold the saved state: {e}\nrestore's output:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default(),
        );
    }
    let _ = std::fs::remove_dir_all(&new_dir);
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
    Ok(())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_object_is_refused_with_the_words_a_corrupted_file_gets() {
    let moto = Moto::start("corrupt");
    let s3 = moto.client();
    s3.create_bucket("backups")
        .await
        .expect("create the bucket");
    let good = small_backup().encode();
    s3.put_object(&url("s3://backups/good.kmmr"), &[good.as_slice()])
        .await
        .expect("put");
    let (ok, out, err) = moto.run(&["snapshot", "status", "s3://backups/good.kmmr"]);
    assert!(ok && out.contains("a verified KmMR backup"), "{out}\n{err}");

    let mut flipped = good.clone();
    let at = good.len() - 40;
    flipped[at] ^= 0x10;
    s3.put_object(&url("s3://backups/bad.kmmr"), &[flipped.as_slice()])
        .await
        .expect("put");
    let file = std::env::temp_dir().join(format!("kmmr-test-s3-bad-{}.kmmr", std::process::id()));
    std::fs::write(&file, &flipped).expect("write");
    let (ok, _, file_err) = moto.run(&["snapshot", "status", arg(&file)]);
    assert!(!ok);
    let (ok, _, s3_err) =
        tokio::task::block_in_place(|| moto.run(&["snapshot", "status", "s3://backups/bad.kmmr"]));
    assert!(!ok, "a corrupted object must be refused");
    let said = |err: &str, name: &str| {
        err.lines()
            .find(|l| l.contains("refusing the backup"))
            .map(|l| l.replace(name, "NAME"))
            .unwrap_or_else(|| panic!("no refusal in {err}"))
    };
    assert_eq!(
        said(&s3_err, "s3://backups/bad.kmmr"),
        said(&file_err, arg(&file)),
        "the same refusal for an object as for a file"
    );
    assert!(
        s3_err.contains("checksum mismatch: the file is corrupted"),
        "{s3_err}"
    );

    // Nor does a cluster start from it, or from an object that is not there.
    let new_dir =
        std::env::temp_dir().join(format!("kmmr-test-s3-bad-cluster-{}", std::process::id()));
    let base = free_base_port(4).expect("free ports").to_string();
    for (backup, says) in [
        ("s3://backups/bad.kmmr", "checksum mismatch"),
        ("s3://backups/missing.kmmr", "NoSuchKey"),
    ] {
        for cmd in [
            vec!["local", "--from-snapshot", backup],
            vec!["snapshot", "restore", backup],
        ] {
            let mut args = cmd.clone();
            args.extend(["--dir", arg(&new_dir), "--base-port", &base]);
            let (ok, out, err) = tokio::task::block_in_place(|| moto.run(&args));
            assert!(!ok, "{cmd:?} must fail: {out}\n{err}");
            assert!(
                err.contains(says) && err.contains("refusing the backup"),
                "{cmd:?}: {err}"
            );
            assert!(!new_dir.exists(), "{cmd:?} wrote {new_dir:?}");
        }
    }
    // --copy-to writes only a verified backup.
    let dest = std::env::temp_dir().join(format!("kmmr-test-s3-copy-{}.kmmr", std::process::id()));
    let (ok, _, err) = moto.run(&[
        "snapshot",
        "status",
        "s3://backups/bad.kmmr",
        "--copy-to",
        arg(&dest),
    ]);
    assert!(!ok && !dest.exists(), "{err}");
    let (ok, _, err) = moto.run(&[
        "snapshot",
        "status",
        "s3://backups/good.kmmr",
        "--copy-to",
        arg(&dest),
    ]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&dest).expect("the copy"), good);
    let _ = std::fs::remove_file(&dest);
    let _ = std::fs::remove_file(&file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_refusals_quote_s3s_code_and_message_and_exit_non_zero() {
    let moto = Moto::start("refusals");
    let c = TestCluster::start("s3-refusals", 4, kmmr::node::ProtocolConfig::default(), &[]).await;
    let dir = c.dir.clone();
    let (ok, out, err) = tokio::task::block_in_place(|| {
        moto.run(&[
            "snapshot",
            "save",
            "s3://no-such-bucket/x.kmmr",
            "--cluster",
            arg(&dir),
        ])
    });
    assert!(!ok, "{out}");
    assert!(
        err.contains("S3 refused the upload to s3://no-such-bucket/x.kmmr (HTTP 404): NoSuchBucket: The specified bucket does not exist"),
        "{err}"
    );
    // No credentials: said before any replica is asked.
    let out = Command::new(EXE)
        .args(["snapshot", "save", "s3://b/x.kmmr", "--cluster", arg(&dir)])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_ENDPOINT_URL", &moto.endpoint)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("AWS_ACCESS_KEY_ID"),
        "{err}"
    );
    // Nothing listens here: a clear connection error, not a hang.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port")
        .port();
    let out = Command::new(EXE)
        .args(["snapshot", "status", "s3://b/x.kmmr"])
        .args(["--s3-endpoint", &format!("http://127.0.0.1:{closed}")])
        .env("AWS_ACCESS_KEY_ID", "a")
        .env("AWS_SECRET_ACCESS_KEY", "s")
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot connect to the S3 endpoint"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_goes_up_in_parts_and_comes_back_whole() {
    let moto = Moto::start("multipart");
    let mut s3 = moto.client();
    s3.create_bucket("big").await.expect("create the bucket");
    s3.multipart_threshold = 6 << 20;
    s3.part_size = 5 << 20;
    let data: Vec<u8> = (0..(13u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (a, b) = data.split_at(3 << 20);
    let target = url("s3://big/dir/large.bin");
    s3.put_object(&target, &[a, b])
        .await
        .expect("a multipart upload");
    let back = s3.get_object(&target, 64 << 20).await.expect("get");
    assert!(back == data, "the object comes back as it went up");
    let listed = s3.list("big", "dir/").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].key.as_str(), listed[0].size),
        ("dir/large.bin", data.len() as u64)
    );
    // A limit below the object's size is refused, not read past.
    let err = s3.get_object(&target, 1 << 20).await.unwrap_err();
    assert!(err.to_string().contains("larger than the limit"), "{err}");
    // A multipart upload into a bucket that is not there fails with S3's word and leaves nothing.
    let err = s3
        .put_object(&url("s3://nowhere/large.bin"), &[data.as_slice()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("NoSuchBucket"), "{err}");
    s3.delete_object(&target).await.expect("delete");
    assert!(s3.list("big", "").await.expect("list").is_empty());
}

/// Standard base64 with padding, for PEM.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = base64(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_endpoint_with_its_own_ca_is_trusted_through_the_ca_file_only() {
    // A CA of our own and a certificate it signs for 127.0.0.1, as a self-hosted S3 would have.
    let ca_key = rcgen::KeyPair::generate().expect("a key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("the CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().expect("a key");
    let server_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&server_key, &issuer)
        .expect("the server's certificate");
    let dir = std::env::temp_dir().join(format!("kmmr-test-s3-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&ca, pem("CERTIFICATE", ca_cert.der())).expect("write");
    std::fs::write(&cert, pem("CERTIFICATE", server_cert.der())).expect("write");
    std::fs::write(&key, pem("PRIVATE KEY", &server_key.serialize_der())).expect("write");

    let moto = Moto::start_with("tls", &["-c", arg(&cert), "-k", arg(&key)], &[]);
    assert!(moto.endpoint.starts_with("https://"));
    let mut config = moto.config();
    config.extra_ca = Some(ca.clone());
    let s3 = kmmr_s3::Client::new(config).expect("a client");
    s3.create_bucket("secure")
        .await
        .expect("create the bucket over TLS");
    let good = small_backup().encode();
    s3.put_object(&url("s3://secure/b.kmmr"), &[good.as_slice()])
        .await
        .expect("put over TLS");
    assert_eq!(
        s3.get_object(&url("s3://secure/b.kmmr"), 1 << 20)
            .await
            .expect("get"),
        good
    );
    // Without the CA the server is not trusted, and nothing is sent.
    let (ok, _, err) = moto.run(&["snapshot", "status", "s3://secure/b.kmmr"]);
    assert!(!ok && err.contains("TLS"), "{err}");
    let (ok, out, err) = moto.run(&[
        "snapshot",
        "status",
        "s3://secure/b.kmmr",
        "--s3-ca-file",
        arg(&ca),
    ]);
    assert!(ok && out.contains("a verified KmMR backup"), "{out}\n{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One IAM Query API call to moto (form-encoded POST, SigV4 for service "iam"): its XML answer.
async fn iam(endpoint: &str, params: &[(&str, &str)]) -> String {
    use kmmr_s3::http::{exchange, Request, Timeouts};
    use kmmr_s3::sigv4::{self, AmzDate, Signable};
    let ep = Endpoint::parse(endpoint).expect("endpoint");
    let mut form: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    form.push(("Version".into(), "2010-05-08".into()));
    let body = sigv4::canonical_query(&form);
    let payload = sigv4::sha256_hex(&[body.as_bytes()]);
    let date = AmzDate::now();
    let mut headers = vec![
        ("Host".to_string(), ep.host_header()),
        (
            "Content-Type".to_string(),
            "application/x-www-form-urlencoded".to_string(),
        ),
        ("x-amz-date".to_string(), date.stamp.clone()),
        ("x-amz-content-sha256".to_string(), payload.clone()),
        ("Content-Length".to_string(), body.len().to_string()),
    ];
    let creds = Credentials {
        access_key_id: "AKIABOOTSTRAP".into(),
        secret_access_key: "bootstrap".into(),
        session_token: None,
    };
    let auth = sigv4::authorization(
        &creds,
        "us-east-1",
        "iam",
        &date,
        &Signable {
            method: "POST",
            path: "/",
            query: &[],
            headers: &headers,
            payload_sha256: &payload,
        },
    );
    headers.push(("Authorization".to_string(), auth));
    headers.push(("Connection".to_string(), "close".to_string()));
    let pieces = [body.as_bytes()];
    let req = Request {
        method: "POST",
        target: "/".to_string(),
        headers,
        body: &pieces,
    };
    let answer = exchange(&ep, None, &req, 1 << 20, Timeouts::default())
        .await
        .expect("moto answers");
    let text = String::from_utf8_lossy(&answer.body).into_owned();
    assert_eq!(answer.status, 200, "{params:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_checks_signatures_accepts_ours_and_refuses_wrong_credentials() {
    // moto checks every request's SigV4 signature (with botocore's signer) after the first
    // three, which make a user, its access key and a policy letting it use S3.
    let moto = Moto::start_with("auth", &[], &[("INITIAL_NO_AUTH_ACTION_COUNT", "3")]);
    iam(
        &moto.endpoint,
        &[("Action", "CreateUser"), ("UserName", "kmmr")],
    )
    .await;
    let key = iam(
        &moto.endpoint,
        &[("Action", "CreateAccessKey"), ("UserName", "kmmr")],
    )
    .await;
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}"#;
    iam(
        &moto.endpoint,
        &[
            ("Action", "PutUserPolicy"),
            ("UserName", "kmmr"),
            ("PolicyName", "s3"),
            ("PolicyDocument", policy),
        ],
    )
    .await;
    let id = kmmr_s3::xml::first(&key, "AccessKeyId").expect("an access key id");
    let secret = kmmr_s3::xml::first(&key, "SecretAccessKey").expect("a secret");
    let mut config = moto.config();
    config.credentials = Credentials {
        access_key_id: id.clone(),
        secret_access_key: secret.clone(),
        session_token: None,
    };
    let mut s3 = kmmr_s3::Client::new(config.clone()).expect("a client");
    // Every operation, single and multipart, signed as the server expects.
    s3.create_bucket("checked")
        .await
        .expect("create the bucket, signed");
    s3.multipart_threshold = 6 << 20;
    s3.part_size = 5 << 20;
    let big: Vec<u8> = (0..(11u32 << 20)).map(|i| (i % 251) as u8).collect();
    let good = small_backup().encode();
    s3.put_object(&url("s3://checked/a b/big.bin"), &[big.as_slice()])
        .await
        .expect("a signed multipart upload (a key with a space)");
    s3.put_object(&url("s3://checked/demo/good.kmmr"), &[good.as_slice()])
        .await
        .expect("a signed put");
    assert!(
        s3.get_object(&url("s3://checked/a b/big.bin"), 64 << 20)
            .await
            .expect("get")
            == big
    );
    let listed = s3.list("checked", "demo/").await.expect("a signed listing");
    assert_eq!(listed.len(), 1);
    s3.delete_object(&url("s3://checked/a b/big.bin"))
        .await
        .expect("a signed delete");

    let run = |id: &str, secret: &str| {
        let out = Command::new(EXE)
            .args(["snapshot", "status", "s3://checked/demo/good.kmmr"])
            .env("AWS_ACCESS_KEY_ID", id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_ENDPOINT_URL", &moto.endpoint)
            .env_remove("AWS_SESSION_TOKEN")
            .output()
            .expect("runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = tokio::task::block_in_place(|| run(&id, &secret));
    assert!(ok && out.contains("a verified KmMR backup"), "{out}\n{err}");
    let (ok, _, err) = tokio::task::block_in_place(|| run(&id, "not-the-secret"));
    assert!(!ok && err.contains("SignatureDoesNotMatch"), "{err}");
    let (ok, _, err) = tokio::task::block_in_place(|| run("AKIANOBODY", &secret));
    assert!(!ok && err.contains("InvalidAccessKeyId"), "{err}");
}
