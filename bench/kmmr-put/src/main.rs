//! kmmr-put-bench: closed-loop KV Put load against a KmMR cluster made by `kmmr-replica local`,
//! with the options, semantics and output of `kmmr-replica bench`; the only difference is the
//! request: a KV Put of a `--request-size`-byte value (empty by default) to a key of its own
//! client, so the KV service executes and stores every request (as etcd does for its Puts).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;

use kmmr_client::files::ViewFile;
use kmmr_client::{Client, ClientOptions};
use kmmr_protocol::crypto::KeyPair;
use kmmr_protocol::service::kv::{KvRequest, KvResponse};

#[derive(Parser, Debug)]
#[command(
    name = "kmmr-put-bench",
    about = "KV Put load generator for a KmMR cluster"
)]
struct Args {
    /// A cluster directory made by `kmmr-replica local` (its view.toml is read).
    #[arg(long, default_value = "kmmr-local")]
    cluster: PathBuf,
    /// Concurrent clients, each with its own key and connections.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Requests each client keeps in flight.
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Bytes of each Put's value.
    #[arg(long, default_value_t = 0)]
    request_size: usize,
    /// Keys are <prefix>c<client number>.
    #[arg(long, default_value = "bench/")]
    key_prefix: String,
    /// Runtime worker threads (as `kmmr-replica --threads`, default 2).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Print one machine-readable JSON line instead of text.
    #[arg(long)]
    json: bool,
}

/// The fields of `kmmr-replica bench --json`.
#[derive(serde::Serialize)]
struct BenchResult {
    clients: usize,
    window: usize,
    request_size: usize,
    ops: usize,
    seconds: f64,
    ops_per_sec: f64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    max_us: u64,
    errors: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let r = rt.block_on(measure(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} clients x {} in flight, {}-byte requests: {:.0} ops/s over {:.1} s; latency p50 {} us, p90 {} us, p99 {} us, max {} us; {} errors",
            r.clients, r.window, r.request_size, r.ops_per_sec, r.seconds, r.p50_us, r.p90_us, r.p99_us, r.max_us, r.errors
        );
    }
    Ok(())
}

/// One Put; a reply other than a Put response (an error reply) counts as a failure.
async fn put(client: &Client, key: &[u8], value: &[u8]) -> Result<()> {
    match client
        .kv(&KvRequest::put(key.to_vec(), value.to_vec()))
        .await?
    {
        KvResponse::Put(_) => Ok(()),
        other => anyhow::bail!("Put answered with {other:?}"),
    }
}

async fn measure(args: &Args) -> Result<BenchResult> {
    let view_path = args.cluster.join("view.toml");
    let view =
        ViewFile::load(&view_path).with_context(|| format!("loading {}", view_path.display()))?;
    let value = vec![0u8; args.request_size];
    let mut clients = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let key = KeyPair::generate(&mut rand::rngs::OsRng);
        let client = Client::connect(key, view.clone(), ClientOptions::default())
            .await
            .with_context(|| format!("client {i}: connecting"))?;
        // Every client must work before the clock starts: one Put each.
        let k = format!("{}c{i}", args.key_prefix).into_bytes();
        put(&client, &k, &value)
            .await
            .with_context(|| format!("client {i}: first Put"))?;
        clients.push((client, k));
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    for (client, key) in clients {
        for _ in 0..args.window.max(1) {
            let client = client.clone();
            let key = key.clone();
            let value = value.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0usize;
                while Instant::now() < end {
                    let t0 = Instant::now();
                    let ok = put(&client, &key, &value).await.is_ok();
                    let t1 = Instant::now();
                    if t0 >= measure_from && t1 <= end {
                        if ok {
                            lat.push((t1 - t0).as_micros() as u64);
                        } else {
                            errors += 1;
                        }
                    }
                }
                (lat, errors)
            }));
        }
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| -> u64 {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Ok(BenchResult {
        clients: args.clients,
        window: args.window,
        request_size: args.request_size,
        ops: all.len(),
        seconds: args.duration,
        ops_per_sec: all.len() as f64 / args.duration,
        p50_us: pct(0.5),
        p90_us: pct(0.9),
        p99_us: pct(0.99),
        max_us: all.last().copied().unwrap_or(0),
        errors,
    })
}
