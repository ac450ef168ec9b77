//! etcdctl v3.6.16, unmodified, against the gateway and against a real etcd v3.6.16 with the same
//! script: every output (JSON where etcdctl has it), exit code and error line must match, once
//! the fields that name a particular server are set aside (cluster, member and raft term ids,
//! lease ids that etcd draws at random, and the seconds a lease has left). Then the same script
//! against a cluster with a Byzantine replica, which must not change a byte.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{etcd_tools, etcdctl, wait_healthy, Cluster, Etcd, GatewayHandle, Outcome};
use kmmr_byzantine::Behaviour;
use kmmr_etcd_gateway::server::Limits;
use serde_json::Value;

/// One etcdctl invocation. `{lease}` in an argument is the id the last `lease grant` returned on
/// that server.
struct Step {
    args: &'static str,
    stdin: Option<Vec<u8>>,
    /// The remaining TTL depends on when the command ran; only its presence is compared.
    fuzzy_ttl: bool,
}

fn step(args: &'static str) -> Step {
    Step {
        args,
        stdin: None,
        fuzzy_ttl: false,
    }
}

fn with_stdin(args: &'static str, stdin: &str) -> Step {
    Step {
        args,
        stdin: Some(stdin.as_bytes().to_vec()),
        fuzzy_ttl: false,
    }
}

fn script() -> Vec<Step> {
    let mut s = vec![
        // A fresh store compacts at its revision 1 once, then refuses it as compacted.
        step("compaction 1"),
        step("compaction 1"),
        step("put foo bar -w json"),
        step("get foo -w json"),
        step("put foo baz --prev-kv -w json"),
        step("put foo2 x -w json"),
        step("put fop y -w json"),
        step("put zed z"),
        step("get foo --prefix -w json"),
        step("get foo --prefix --limit 1 -w json"),
        step("get foo --prefix"),
        step("get  --from-key --keys-only"),
        step("get foo --prefix --count-only -w json"),
        step("get foo --rev 2 -w json"),
        step("get foo --rev 3 -w json"),
        step("get f --prefix --sort-by=MODIFY --order=DESCEND -w json"),
        step("get f --prefix --order=DESCEND --keys-only"),
        step("get f --prefix --sort-by=VALUE -w json"),
        step("get f --prefix --sort-by=CREATE --order=ASCEND --limit 2 -w json"),
        step("get nothing -w json"),
        step("del fop --prev-kv -w json"),
        step("del nothing -w json"),
        step("put fop again -w json"),
        step("del fo --prefix -w json"),
        with_stdin(
            "txn -w json",
            "create(\"t1\") = \"0\"\n\nput t1 one\nget t1\n\nget t1\n\n",
        ),
        with_stdin(
            "txn -w json",
            "create(\"t1\") = \"0\"\n\nput t1 two\n\nget t1\n\n",
        ),
        with_stdin(
            "txn -w json",
            "value(\"t1\") = \"one\"\nmod(\"t1\") > \"1\"\n\nput t1 three\ndel zed\n\n\n",
        ),
        with_stdin(
            "txn -w json",
            "version(\"t1\") != \"5\"\n\nput a 1\nput a 2\n\n\n",
        ),
        with_stdin("txn -w json", "\n\ndel t --prefix\nput t1 four\n\n\n"),
        step("put  empty"),
        step("watch foo --rev 2 -w json"),
        step("watch t1 --rev 1 --prev-kv"),
        step("lease grant 60 -w json"),
        step("put leased v --lease={lease} -w json"),
        step("lease keep-alive --once {lease} -w json"),
        Step {
            args: "lease timetolive {lease} --keys -w json",
            stdin: None,
            fuzzy_ttl: true,
        },
        step("lease list -w json"),
        // A put that keeps the lease, then one that keeps the value (and so drops the lease).
        step("put leased w2 --ignore-lease -w json"),
        step("get leased -w json"),
        step("put leased --ignore-value --prev-kv -w json"),
        step("get leased -w json"),
        step("put absent --ignore-value"),
        step("put leased x --ignore-lease --lease={lease}"),
        step("put leased x --lease={lease} -w json"),
        step("lease revoke {lease} -w json"),
        step("lease list -w json"),
        step("get leased -w json"),
        step("lease timetolive {lease}"),
        step("lease revoke {lease}"),
        step("put x y --lease=1234"),
        step("lease grant 0 -w json"),
        step("compaction 5"),
        step("compaction 5"),
        // The compaction revision's writes are kept: a watch from it misses none of them.
        step("watch f --prefix --rev 5 -w json"),
        step("watch f --prefix --rev 4 -w json"),
        step("get foo --rev 3"),
        step("get foo --rev 4 -w json"),
        step("get foo --rev 10000"),
        step("compaction 10000"),
        step("watch foo --rev 3"),
    ];
    // A value over etcd's 1.5 MiB request limit, read from stdin as etcdctl does without one.
    s.push(Step {
        args: "put big",
        stdin: Some(vec![b'v'; 1600 * 1024]),
        fuzzy_ttl: false,
    });
    s.push(Step {
        args: "put big-ok -w json",
        stdin: Some(vec![b'v'; 1000 * 1024]),
        fuzzy_ttl: false,
    });
    s
}

/// Runs `watch` for long enough to print what it will, then stops it.
fn watch(bin: &Path, endpoint: &str, args: &[String]) -> Outcome {
    let child = Command::new(bin)
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl watch starts");
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        let _ = Command::new("kill")
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status();
    });
    let out = child.wait_with_output().expect("etcdctl watch runs");
    let _ = killer.join();
    // Killed after printing everything is the normal end of a watch: only an earlier exit of
    // its own is worth comparing.
    Outcome::of(out)
}

/// Fields that say which server answered, or that depend on when, set aside; lease ids replaced
/// by the order in which they were first seen.
struct Normalizer {
    leases: HashMap<String, usize>,
}

impl Normalizer {
    fn lease_ordinal(&mut self, id: &str) -> String {
        let n = self.leases.len() + 1;
        format!("<lease {}>", self.leases.entry(id.to_owned()).or_insert(n))
    }

    fn json(&mut self, v: &mut Value, fuzzy_ttl: bool) {
        match v {
            Value::Object(map) => {
                for k in [
                    "cluster_id",
                    "member_id",
                    "raft_term",
                    "ClusterId",
                    "MemberId",
                    "RaftTerm",
                ] {
                    map.remove(k);
                }
                if fuzzy_ttl {
                    for key in ["TTL", "ttl"] {
                        if let Some(ttl) = map.get_mut(key) {
                            *ttl = Value::String("<seconds left>".into());
                        }
                    }
                }
                for (k, val) in map.iter_mut() {
                    let is_lease = matches!(k.as_str(), "ID" | "id" | "lease" | "Lease");
                    match val {
                        Value::Number(n) if is_lease && n.as_i64() != Some(0) => {
                            let hex = format!("{:x}", n.as_i64().unwrap_or(0));
                            *val = Value::String(self.lease_ordinal(&hex));
                        }
                        other => self.json(other, fuzzy_ttl),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| self.json(i, fuzzy_ttl)),
            _ => {}
        }
    }

    fn text(&mut self, line: &str) -> String {
        // `lease 694d8f2ea4e4b10a granted ...` and friends name the lease in hex.
        line.split(' ')
            .map(|w| {
                // etcdctl prints ids zero-padded to 16 digits in some places, not in others.
                let id = w.trim_start_matches('0');
                if w.len() == 16 && self.leases.contains_key(id) {
                    self.lease_ordinal(id)
                } else if self.leases.contains_key(w) {
                    self.lease_ordinal(w)
                } else {
                    w.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn outcome(&mut self, o: &Outcome, fuzzy_ttl: bool) -> Outcome {
        let stdout = o
            .stdout
            .lines()
            .map(|l| match serde_json::from_str::<Value>(l) {
                Ok(mut v) if v.is_object() || v.is_array() => {
                    self.json(&mut v, fuzzy_ttl);
                    v.to_string()
                }
                _ => self.text(l),
            })
            .collect::<Vec<_>>()
            .join("\n");
        Outcome {
            code: o.code,
            stdout,
            error: self.text(&o.error),
        }
    }
}

fn split_args(args: &str, lease: &str) -> Vec<String> {
    args.split(' ')
        .map(|a| a.replace("{lease}", lease))
        .collect()
}

/// Runs the script against one endpoint, normalized.
fn run_script(bin: &Path, endpoint: &str) -> Vec<(String, Outcome)> {
    let mut norm = Normalizer {
        leases: HashMap::new(),
    };
    let mut lease = String::from("0");
    let mut out = Vec::new();
    for s in script() {
        let args = split_args(s.args, &lease);
        let raw = if args[0] == "watch" {
            watch(bin, endpoint, &args)
        } else {
            etcdctl(bin, endpoint, &args, s.stdin.as_deref())
        };
        if s.args.starts_with("lease grant") && raw.code == 0 {
            if let Ok(v) = serde_json::from_str::<Value>(raw.stdout.trim()) {
                if let Some(id) = v.get("ID").and_then(Value::as_i64) {
                    lease = format!("{id:x}");
                    norm.lease_ordinal(&lease);
                }
            }
        }
        out.push((s.args.to_owned(), norm.outcome(&raw, s.fuzzy_ttl)));
    }
    out
}

fn compare(theirs: &[(String, Outcome)], ours: &[(String, Outcome)], label: &str) {
    let mut differences = Vec::new();
    for ((args, e), (_, g)) in theirs.iter().zip(ours) {
        if e != g {
            differences.push(format!(
                "etcdctl {args}\n  etcd:    {e:?}\n  {label}: {g:?}"
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {} etcdctl commands differ:\n{}",
        differences.len(),
        theirs.len(),
        differences.join("\n")
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn etcdctl_sees_the_gateway_as_it_sees_etcd() {
    let Some((etcd_bin, ctl)) = etcd_tools("etcdctl_sees_the_gateway_as_it_sees_etcd") else {
        return;
    };
    let etcd = Etcd::start_healthy(&etcd_bin, &ctl, Duration::from_secs(30));
    let rt = runtime();
    let cluster = Cluster::start("etcdctl", 4, &[]);
    let gateway = rt.block_on(GatewayHandle::start(&cluster, Limits::default()));
    wait_healthy(&ctl, &gateway.endpoint, Duration::from_secs(30));

    let theirs = run_script(&ctl, &etcd.endpoint);
    let ours = run_script(&ctl, &gateway.endpoint);
    compare(&theirs, &ours, "gateway");

    // Commands whose output names the server: both succeed, and the table that divides by the
    // database size does not crash.
    for args in [
        "endpoint status -w json",
        "endpoint status -w table",
        "endpoint health",
        "member list",
    ] {
        let args: Vec<String> = args.split(' ').map(String::from).collect();
        let e = etcdctl(&ctl, &etcd.endpoint, &args, None);
        let g = etcdctl(&ctl, &gateway.endpoint, &args, None);
        assert_eq!(
            (e.code, g.code),
            (0, 0),
            "{args:?}: etcd {e:?}, gateway {g:?}"
        );
    }
    // What the gateway does not serve is refused by name, not with an empty Unimplemented.
    let g = etcdctl(
        &ctl,
        &gateway.endpoint,
        &["user".into(), "list".into()],
        None,
    );
    assert_ne!(g.code, 0);
    assert!(
        g.error
            .contains("etcdserverpb.Auth/UserList is not supported by the KmMR etcd gateway"),
        "{g:?}"
    );
}

#[test]
fn a_corrupt_replica_changes_nothing_etcdctl_sees() {
    let Some((etcd_bin, ctl)) = etcd_tools("a_corrupt_replica_changes_nothing_etcdctl_sees") else {
        return;
    };
    let etcd = Etcd::start_healthy(&etcd_bin, &ctl, Duration::from_secs(30));
    let rt = runtime();
    let cluster = Cluster::start("etcdctl-byz", 4, &[(1, Behaviour::Corrupt)]);
    let gateway = rt.block_on(GatewayHandle::start(&cluster, Limits::default()));
    wait_healthy(&ctl, &gateway.endpoint, Duration::from_secs(60));
    let theirs = run_script(&ctl, &etcd.endpoint);
    let ours = run_script(&ctl, &gateway.endpoint);
    compare(
        &theirs,
        &ours,
        "gateway over a cluster with a corrupt replica",
    );
}
