//! Client subcommands: put, get, range, delete, cas, watch, status.

use super::out::outln;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Subcommand;

use kmmr_client::files::ViewFile;
use kmmr_client::status::fetch_status;
use kmmr_protocol::service::kv::{
    prefix_end, KvRequest, KvResponse, RangeRequest, ResponseOp, TxnResponse, WatchPollRequest,
};

use super::ClusterArgs;

#[derive(Subcommand, Debug)]
pub enum KvCmd {
    /// Write a key.
    Put {
        #[command(flatten)]
        cluster: ClusterArgs,
        key: String,
        value: String,
    },
    /// Read a key (linearizable: ordered, unless --unordered).
    Get {
        #[command(flatten)]
        cluster: ClusterArgs,
        key: String,
        /// Read from a quorum of matching replicas without ordering.
        #[arg(long)]
        unordered: bool,
    },
    /// List keys with a prefix.
    Range {
        #[command(flatten)]
        cluster: ClusterArgs,
        prefix: String,
        #[arg(long, default_value_t = 0)]
        limit: u64,
    },
    /// Delete a key.
    Delete {
        #[command(flatten)]
        cluster: ClusterArgs,
        key: String,
    },
    /// Compare-and-swap: set KEY to NEW if its value is EXPECTED (or, with --absent, if it does
    /// not exist).
    Cas {
        #[command(flatten)]
        cluster: ClusterArgs,
        key: String,
        new: String,
        #[arg(long, conflicts_with = "absent")]
        expected: Option<String>,
        #[arg(long)]
        absent: bool,
    },
    /// Print every change to keys with a prefix after a revision, as it happens.
    Watch {
        #[command(flatten)]
        cluster: ClusterArgs,
        prefix: String,
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Stop after this many seconds (default: run until interrupted).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Write <PREFIX><i> = v<i> for i = 0, 1, ... one at a time, each after the previous one was
    /// acknowledged, printing `acked <key> <value>` for each: a checker's record of what the
    /// cluster promised to keep. A write that fails is retried with the same key and value
    /// (writes are idempotent here). Stops after --count writes or --seconds.
    Writes {
        #[command(flatten)]
        cluster: ClusterArgs,
        prefix: String,
        #[arg(long)]
        count: Option<u64>,
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Pause between writes.
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
    },
    /// Every replica's signed status, checked against its key in the view.
    Status {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

/// Why a compare-and-swap did not swap, from the current value its failure branch read.
fn cas_failure(key: &str, expected: Option<&str>, t: &TxnResponse) -> String {
    let current = t.responses.iter().find_map(|r| match r {
        ResponseOp::Range(r) => Some(r.kvs.first().map(|kv| String::from_utf8_lossy(&kv.value))),
        _ => None,
    });
    match (current.flatten(), expected) {
        (None, Some(_)) => format!("{key} does not exist"),
        (None, None) => format!("{key} does not exist, yet the compare failed"),
        (Some(v), None) => format!("{key} exists (its value is {v:?}) and --absent was given"),
        (Some(v), Some(e)) => format!("the value of {key} is {v:?}, not {e:?}"),
    }
}

/// Prints a response for people; an error the cluster agreed on fails the command with its text.
fn print(resp: &KvResponse) -> Result<()> {
    match resp {
        KvResponse::Range(r) => {
            for kv in &r.kvs {
                outln!(
                    "{} = {} (version {}, mod revision {})",
                    String::from_utf8_lossy(&kv.key),
                    String::from_utf8_lossy(&kv.value),
                    kv.version,
                    kv.mod_revision
                );
            }
            if r.kvs.is_empty() {
                outln!("(not found)");
            }
            outln!("revision {}", r.header.revision);
        }
        KvResponse::Put(p) => outln!("ok (revision {})", p.header.revision),
        KvResponse::DeleteRange(d) => {
            outln!("deleted {} (revision {})", d.deleted, d.header.revision)
        }
        KvResponse::Error(e) => bail!("{}", e.error),
        other => outln!("{other:?}"),
    }
    Ok(())
}

pub async fn run(cmd: KvCmd) -> Result<()> {
    match cmd {
        KvCmd::Put {
            cluster,
            key,
            value,
        } => {
            let c = cluster.connect().await?;
            print(&c.kv(&KvRequest::put(key, value)).await?)?;
        }
        KvCmd::Get {
            cluster,
            key,
            unordered,
        } => {
            let c = cluster.connect().await?;
            let req = KvRequest::get(key);
            let resp = if unordered {
                c.kv_read(&req).await?
            } else {
                c.kv(&req).await?
            };
            print(&resp)?;
        }
        KvCmd::Range {
            cluster,
            prefix,
            limit,
        } => {
            let c = cluster.connect().await?;
            let mut r = RangeRequest::prefix(prefix);
            r.limit = limit;
            print(&c.kv(&KvRequest::Range(r)).await?)?;
        }
        KvCmd::Delete { cluster, key } => {
            let c = cluster.connect().await?;
            print(&c.kv(&KvRequest::delete(key)).await?)?;
        }
        KvCmd::Cas {
            cluster,
            key,
            new,
            expected,
            absent,
        } => {
            if expected.is_none() && !absent {
                bail!("say what the value must be: --expected VALUE, or --absent");
            }
            let c = cluster.connect().await?;
            let resp = c
                .kv(&KvRequest::cas(
                    key.clone(),
                    expected.as_deref().map(str::as_bytes),
                    new,
                ))
                .await?;
            match &resp {
                KvResponse::Txn(t) if t.succeeded => {
                    outln!("swapped (revision {})", t.header.revision)
                }
                KvResponse::Txn(t) => {
                    bail!("not swapped: {}", cas_failure(&key, expected.as_deref(), t))
                }
                other => bail!("the cluster answered the compare-and-swap with {other:?}"),
            }
        }
        KvCmd::Watch {
            cluster,
            prefix,
            from,
            seconds,
        } => {
            watch(cluster, prefix, from, seconds).await?;
        }
        KvCmd::Writes {
            cluster,
            prefix,
            count,
            seconds,
            interval_ms,
        } => {
            writes(cluster, prefix, count, seconds, interval_ms).await?;
        }
        KvCmd::Status { cluster } => {
            status(cluster).await?;
        }
    }
    Ok(())
}

/// Polls for the events under `prefix` after revision `from` and prints them, for `seconds` or
/// until interrupted.
async fn watch(
    cluster: ClusterArgs,
    prefix: String,
    from: u64,
    seconds: Option<u64>,
) -> Result<()> {
    let c = cluster.connect().await?;
    let mut after = from;
    let until = seconds.map(|s| std::time::Instant::now() + Duration::from_secs(s));
    loop {
        if until.is_some_and(|u| std::time::Instant::now() >= u) {
            break;
        }
        let req = KvRequest::WatchPoll(WatchPollRequest {
            key: prefix.clone().into_bytes(),
            range_end: prefix_end(prefix.as_bytes()),
            after_revision: after,
            limit: 1000,
            prev_kv: true,
        });
        match c.kv(&req).await? {
            KvResponse::WatchPoll(w) => {
                for e in &w.events {
                    outln!("{e:?}");
                }
                after = w.resume_after;
                if w.events.is_empty() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            other => bail!("watch failed: {other:?}"),
        }
    }
    Ok(())
}

/// Writes `prefix0`, `prefix1`, ... until `count` writes or `seconds` are done, printing each
/// acknowledgement as it comes (a test reads them to check that none is lost).
async fn writes(
    cluster: ClusterArgs,
    prefix: String,
    count: Option<u64>,
    seconds: u64,
    interval_ms: u64,
) -> Result<()> {
    use std::io::Write;
    let c = cluster.connect().await?;
    let until = std::time::Instant::now() + Duration::from_secs(seconds);
    let (mut i, mut failures) = (0_u64, 0_u64);
    while count.is_none_or(|n| i < n) && std::time::Instant::now() < until {
        let (key, value) = (format!("{prefix}{i}"), format!("v{i}"));
        match c.kv(&KvRequest::put(key.clone(), value.clone())).await {
            Ok(KvResponse::Put(_)) => {
                // Flushed per line: a reader of the log sees every acknowledgement.
                let mut out = std::io::stdout().lock();
                writeln!(out, "acked {key} {value}")?;
                out.flush()?;
                i += 1;
            }
            Ok(other) => {
                failures += 1;
                eprintln!("write {key} answered {other:?}; retrying");
            }
            Err(e) => {
                failures += 1;
                eprintln!("write {key} failed: {e}; retrying");
            }
        }
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
    outln!("done: {i} writes acknowledged, {failures} attempts failed");
    Ok(())
}

/// Prints each replica's signed status, with whether its signature checks out.
async fn status(cluster: ClusterArgs) -> Result<()> {
    let view_path = cluster
        .view
        .clone()
        .unwrap_or_else(|| cluster.cluster.join("view.toml"));
    let view = ViewFile::load(&view_path)?;
    let mut verified = 0;
    for m in &view.members {
        let url = status_url(&cluster.cluster, m.id.0);
        match fetch_status(&url).await {
            Ok(s) => {
                let ok = s.verify(&m.key);
                verified += usize::from(ok);
                outln!(
                    "replica {}: {} regency {} leader {} last decided {:?} digest {}{}",
                    m.id.0,
                    if ok {
                        "signature ok,"
                    } else {
                        "BAD SIGNATURE,"
                    },
                    s.status.regency,
                    s.status.leader,
                    s.status.last_decided,
                    s.status.state_digest_prefix(),
                    s.status
                        .byzantine
                        .as_ref()
                        .map(|b| format!(" [BYZANTINE test mode {b}]"))
                        .unwrap_or_default()
                );
            }
            Err(e) => outln!("replica {}: unreachable ({e:#})", m.id.0),
        }
    }
    // For scripts: the command fails when the cluster cannot serve.
    if verified < view.quorum() {
        bail!(
            "only {verified} of {} replicas answered with a status signed by their key; {} are needed for the cluster to serve",
            view.n(),
            view.quorum()
        );
    }
    Ok(())
}

/// The status address of replica `id` in a cluster directory made by `local`.
pub fn status_url(cluster: &std::path::Path, id: u32) -> String {
    let http = std::fs::read_to_string(cluster.join(format!("r{id}.toml")))
        .ok()
        .and_then(|t| toml::from_str::<kmmr::node::NodeConfig>(&t).ok())
        .map(|c| c.http_listen)
        .unwrap_or_default();
    format!("http://{http}/status")
}
