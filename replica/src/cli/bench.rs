//! The load generator: closed-loop clients (each with `window` requests in flight) sending
//! requests of a given size for a given time; prints throughput and latency percentiles. With
//! `local --service noop` and `--request-size 0` it is BFT-SMaRt's 0/0 ThroughputLatency
//! micro-benchmark.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;

use kmmr::client::{Client, ClientOptions};
use kmmr::crypto::KeyPair;
use kmmr::node::config::ViewFile;
use kmmr::wire::messages::RequestKind;

use super::ClusterArgs;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Concurrent clients, each with its own key and connections.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Requests each client keeps in flight.
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Request payload bytes.
    #[arg(long, default_value_t = 0)]
    pub request_size: usize,
    /// Print one machine-readable JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub clients: usize,
    pub window: usize,
    pub request_size: usize,
    pub ops: usize,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub errors: usize,
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let r = measure(&args).await?;
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

pub async fn measure(args: &BenchArgs) -> Result<BenchResult> {
    let view_path = args
        .cluster
        .view
        .clone()
        .unwrap_or_else(|| args.cluster.cluster.join("view.toml"));
    let view = ViewFile::load(&view_path)?;
    let mut clients = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        let key = KeyPair::generate(&mut rand::rngs::OsRng);
        clients.push(Client::connect(key, view.clone(), ClientOptions::default()).await?);
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let payload = Arc::new(vec![0u8; args.request_size]);
    let mut tasks = Vec::new();
    for c in clients {
        for _ in 0..args.window.max(1) {
            let c = c.clone();
            let payload = payload.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0usize;
                while Instant::now() < end {
                    let t0 = Instant::now();
                    let ok = c
                        .invoke(RequestKind::Ordered, payload.as_ref().clone())
                        .await
                        .is_ok();
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
        if all.is_empty() {
            0
        } else {
            all[((all.len() as f64 * p) as usize).min(all.len() - 1)]
        }
    };
    let seconds = args.duration;
    Ok(BenchResult {
        clients: args.clients,
        window: args.window,
        request_size: args.request_size,
        ops: all.len(),
        seconds,
        ops_per_sec: all.len() as f64 / seconds,
        p50_us: pct(0.5),
        p90_us: pct(0.9),
        p99_us: pct(0.99),
        max_us: all.last().copied().unwrap_or(0),
        errors,
    })
}
