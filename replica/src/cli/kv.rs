//! Client subcommands: put, get, range, delete, cas, watch, writes, status.

use super::out::{outln, raw};
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::json;

use kmmr_client::Client;
use kmmr_protocol::service::kv::{
    prefix_end, KvRequest, KvResponse, RangeRequest, ResponseOp, TxnResponse, MAX_KEY_LEN,
    MAX_VALUE_LEN,
};

use super::render::{self, Format};
use super::ClusterArgs;

#[derive(Subcommand, Debug)]
pub enum KvCmd {
    /// Write a key. The value is VALUE, or stdin when VALUE is `-`, or the contents of --file.
    Put {
        #[command(flatten)]
        cluster: ClusterArgs,
        key: String,
        #[arg(required_unless_present = "file")]
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
    },
    /// Read a key (linearizable: ordered, unless --unordered). A missing key fails the command.
    Get {
        #[command(flatten)]
        cluster: ClusterArgs,
        key: String,
        /// Read from a quorum of matching replicas without ordering.
        #[arg(long)]
        unordered: bool,
        /// Print the value alone, byte for byte (no escaping, no newline): for files and pipes.
        #[arg(long)]
        value_only: bool,
    },
    /// List the keys starting with a prefix, or every key when there is none, in key order, read
    /// page by page at one revision.
    Range {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// The prefix (also --prefix); none lists every key.
        #[arg(value_name = "PREFIX")]
        prefix: Option<String>,
        #[arg(long = "prefix", value_name = "PREFIX", conflicts_with = "prefix")]
        prefix_flag: Option<String>,
        /// Print at most this many keys (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        /// Keys fetched per request.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
        page_size: u64,
        /// Print the keys without their values.
        #[arg(long)]
        keys_only: bool,
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
    /// Print every change to the keys starting with a prefix (every key when it is empty) as it
    /// happens, from now on unless --from says otherwise.
    Watch {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[arg(default_value = "")]
        prefix: String,
        /// Also print the history kept after this revision (0: all of it).
        #[arg(long)]
        from: Option<u64>,
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
        ResponseOp::Range(r) => Some(r.kvs.first().map(|kv| render::text(&kv.value))),
        _ => None,
    });
    match (current.flatten(), expected) {
        (None, Some(_)) => format!("{key} does not exist"),
        (None, None) => format!("{key} does not exist, yet the compare failed"),
        (Some(v), None) => format!("{key} exists (its value is {v:?}) and --absent was given"),
        (Some(v), Some(e)) => format!("the value of {key} is {v:?}, not {e:?}"),
    }
}

/// Refuses, before anything is sent, what the cluster would refuse for its size: a request it
/// cannot decode is dropped, and the client would only learn of it at its timeout.
fn check_sizes(key: &str, value: &[u8]) -> Result<()> {
    if key.len() > MAX_KEY_LEN {
        bail!(
            "the key is {} bytes; the limit is {MAX_KEY_LEN} bytes",
            key.len()
        );
    }
    if value.len() > MAX_VALUE_LEN {
        bail!(
            "the value is {} bytes; the limit is {MAX_VALUE_LEN} bytes ({} KiB)",
            value.len(),
            MAX_VALUE_LEN / 1024
        );
    }
    Ok(())
}

/// The value of `put`: the argument, stdin for `-`, or a file. At most one byte past the
/// limit is read, so an oversized file or stream fails at once without filling memory.
fn read_value(value: Option<String>, file: Option<PathBuf>) -> Result<Vec<u8>> {
    let limit = MAX_VALUE_LEN as u64 + 1;
    let mut buf = Vec::new();
    match (value, file) {
        (_, Some(path)) => {
            std::fs::File::open(&path)
                .with_context(|| format!("reading the value from {}", path.display()))?
                .take(limit)
                .read_to_end(&mut buf)
                .with_context(|| format!("reading the value from {}", path.display()))?;
        }
        (Some(v), None) if v == "-" => {
            std::io::stdin()
                .lock()
                .take(limit)
                .read_to_end(&mut buf)
                .context("reading the value from stdin")?;
        }
        (Some(v), None) => buf = v.into_bytes(),
        (None, None) => bail!("give a VALUE, `-` to read it from stdin, or --file FILE"),
    }
    Ok(buf)
}

/// The response, or the command's failure with the cluster's reason when it refused.
fn expect(resp: KvResponse) -> Result<KvResponse> {
    match resp {
        KvResponse::Error(e) => bail!("{}", e.error),
        other => Ok(other),
    }
}

fn unexpected(what: &str, resp: &KvResponse) -> anyhow::Error {
    anyhow::anyhow!("the cluster answered the {what} with an unexpected {resp:?}")
}

pub async fn run(cmd: KvCmd, format: Format) -> Result<()> {
    match cmd {
        KvCmd::Put {
            cluster,
            key,
            value,
            file,
        } => {
            let value = read_value(value, file)?;
            check_sizes(&key, &value)?;
            let c = cluster.connect().await?;
            match expect(c.kv(&KvRequest::put(key, value)).await?)? {
                KvResponse::Put(p) => match format {
                    Format::Text => outln!("ok (revision {})", p.header.revision),
                    Format::Json => outln!("{}", json!({ "revision": p.header.revision })),
                },
                other => return Err(unexpected("put", &other)),
            }
        }
        KvCmd::Get {
            cluster,
            key,
            unordered,
            value_only,
        } => {
            check_sizes(&key, &[])?;
            let c = cluster.connect().await?;
            let req = KvRequest::get(key.clone());
            let resp = if unordered {
                c.kv_read(&req).await?
            } else {
                c.kv(&req).await?
            };
            let KvResponse::Range(r) = expect(resp)? else {
                bail!("the cluster answered the get with something else than a read");
            };
            let Some(kv) = r.kvs.first() else {
                bail!("key not found: {key} (at revision {})", r.header.revision);
            };
            match (value_only, format) {
                (true, _) => raw(&kv.value),
                (false, Format::Text) => outln!("{}", render::kv_text(kv)),
                (false, Format::Json) => outln!("{}", render::kv_json(kv)),
            }
        }
        KvCmd::Range {
            cluster,
            prefix,
            prefix_flag,
            limit,
            page_size,
            keys_only,
        } => {
            let prefix = prefix.or(prefix_flag).unwrap_or_default();
            let c = cluster.connect().await?;
            range(&c, &prefix, limit, page_size, keys_only, format).await?;
        }
        KvCmd::Delete { cluster, key } => {
            check_sizes(&key, &[])?;
            let c = cluster.connect().await?;
            match expect(c.kv(&KvRequest::delete(key)).await?)? {
                KvResponse::DeleteRange(d) => match format {
                    Format::Text => outln!(
                        "deleted {} (revision {})",
                        if d.deleted == 1 {
                            "1 key".to_string()
                        } else {
                            format!("{} keys", d.deleted)
                        },
                        d.header.revision
                    ),
                    Format::Json => outln!(
                        "{}",
                        json!({ "deleted": d.deleted, "revision": d.header.revision })
                    ),
                },
                other => return Err(unexpected("delete", &other)),
            }
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
            check_sizes(&key, new.as_bytes())?;
            let c = cluster.connect().await?;
            let resp = c
                .kv(&KvRequest::cas(
                    key.clone(),
                    expected.as_deref().map(str::as_bytes),
                    new,
                ))
                .await?;
            match expect(resp)? {
                KvResponse::Txn(t) if t.succeeded => match format {
                    Format::Text => outln!("swapped (revision {})", t.header.revision),
                    Format::Json => outln!(
                        "{}",
                        json!({ "swapped": true, "revision": t.header.revision })
                    ),
                },
                KvResponse::Txn(t) => {
                    bail!(
                        "not swapped: {}",
                        cas_failure(&key, expected.as_deref(), &t)
                    )
                }
                other => return Err(unexpected("compare-and-swap", &other)),
            }
        }
        KvCmd::Watch {
            cluster,
            prefix,
            from,
            seconds,
        } => {
            let until = seconds.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
            let c = cluster.connect().await?;
            super::watch::watch(&c, &prefix, from, until, format).await?;
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
            super::status::status(cluster, format).await?;
        }
    }
    Ok(())
}

/// The key range of a prefix in etcd's conventions: the empty prefix is every key.
pub fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        (vec![0], vec![0])
    } else {
        (prefix.as_bytes().to_vec(), prefix_end(prefix.as_bytes()))
    }
}

/// Prints the keys starting with `prefix`, `page_size` per request, every page read at the
/// revision of the first so that the listing is one consistent snapshot.
async fn range(
    c: &Client,
    prefix: &str,
    limit: u64,
    page_size: u64,
    keys_only: bool,
    format: Format,
) -> Result<()> {
    let (mut start, end) = prefix_range(prefix);
    let (mut revision, mut printed) = (0, 0u64);
    loop {
        let page = match limit {
            0 => page_size,
            l => page_size.min(l - printed),
        };
        let req = KvRequest::Range(RangeRequest {
            key: start.clone(),
            range_end: end.clone(),
            revision,
            limit: page,
            keys_only,
            count_only: false,
        });
        let KvResponse::Range(r) = expect(c.kv(&req).await?)? else {
            bail!("the cluster answered a range with something else than a read");
        };
        revision = r.header.revision;
        for kv in &r.kvs {
            match (format, keys_only) {
                (Format::Text, true) => outln!("{}", render::text(&kv.key)),
                (Format::Text, false) => outln!("{}", render::kv_text(kv)),
                (Format::Json, _) => outln!("{}", render::kv_json(kv)),
            }
        }
        printed += r.kvs.len() as u64;
        let Some(last) = r.kvs.last() else {
            break;
        };
        if !r.more || (limit > 0 && printed >= limit) {
            break;
        }
        // The next page starts right after the last key: the smallest key greater than it.
        start = last.key.iter().copied().chain([0]).collect();
    }
    if format == Format::Text {
        let what = if prefix.is_empty() {
            "keys".to_string()
        } else {
            format!("keys starting with {}", render::text(prefix.as_bytes()))
        };
        eprintln!("{printed} {what} at revision {revision}");
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
            Ok(KvResponse::Error(e)) => {
                failures += 1;
                eprintln!("write {key} refused: {}; retrying", e.error);
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
