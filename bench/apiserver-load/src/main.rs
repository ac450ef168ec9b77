//! kmmr-apiserver-load: what a kube-apiserver's store costs its clients, measured through the
//! apiserver with the client library its users have (kube-rs). Three figures, each of a
//! namespace of its own that the run creates and deletes:
//!
//! - `create`: `--clients` clients, each with its own connection, create ConfigMaps in a closed
//!   loop; requests that start after `--warmup` and end within the next `--duration` seconds
//!   count (the semantics of `kmmr-replica bench`).
//! - `list`: `--list-objects` ConfigMaps are created (by the same clients; the rate is reported
//!   as a second create figure), then listed whole, without a limit, `--list-reps` times.
//! - `watch`: one client writes a ConfigMap `--watch-writes` times, one write at a time with
//!   `--watch-gap-ms` between them, while another watches; the delay of a write is from the
//!   moment its request was sent to the moment its event arrived.
//!
//! With `--json` it prints one JSON line that `bench/apiserver-compare.sh` collects.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::Serialize;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "kmmr-apiserver-load",
    about = "ConfigMap creates, a large LIST and write-to-watch delays through a kube-apiserver"
)]
struct Args {
    /// The kubeconfig of the apiserver to load.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Measured seconds of the create figure (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Bytes of each ConfigMap's value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Objects in the listed namespace (0 skips the list figure).
    #[arg(long, default_value_t = 10_000)]
    list_objects: usize,
    /// LISTs timed; the figure is their median.
    #[arg(long, default_value_t = 15)]
    list_reps: usize,
    /// Writes whose watch events are timed (0 skips the watch figure).
    #[arg(long, default_value_t = 200)]
    watch_writes: usize,
    #[arg(long, default_value_t = 20)]
    watch_gap_ms: u64,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Debug, Default)]
struct Latencies {
    count: usize,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
}

impl Latencies {
    fn of(mut us: Vec<u64>) -> Latencies {
        us.sort_unstable();
        let at = |q: f64| {
            us.get(((us.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(0)
        };
        Latencies {
            count: us.len(),
            p50_us: at(0.50),
            p99_us: at(0.99),
            max_us: us.last().copied().unwrap_or(0),
        }
    }
}

#[derive(Serialize, Debug)]
struct Creates {
    ops_per_sec: f64,
    errors: usize,
    #[serde(flatten)]
    latency: Latencies,
}

#[derive(Serialize, Debug)]
struct Lists {
    objects: usize,
    bytes: usize,
    fill_per_sec: f64,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

#[derive(Serialize, Debug)]
struct Report {
    clients: usize,
    value_size: usize,
    create: Creates,
    list: Option<Lists>,
    watch: Option<Latencies>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = rt.block_on(run(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report:#?}");
    }
    Ok(())
}

async fn client(args: &Args) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("the kubeconfig")?;
    Client::try_from(config).context("a client for the kubeconfig")
}

async fn clients(args: &Args) -> Result<Vec<Client>> {
    let mut out = Vec::with_capacity(args.clients);
    for _ in 0..args.clients.max(1) {
        out.push(client(args).await?);
    }
    Ok(out)
}

/// A namespace of the run's own, created now and deleted (without waiting) when dropped.
struct Scratch {
    client: Client,
    name: String,
}

impl Scratch {
    async fn create(client: &Client, what: &str) -> Result<Scratch> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("load-{what}-{nanos:x}");
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(Scratch {
            client: client.clone(),
            name,
        })
    }

    fn api(&self, client: &Client) -> Api<ConfigMap> {
        Api::namespaced(client.clone(), &self.name)
    }

    async fn delete(self) {
        let _ = Api::<Namespace>::all(self.client)
            .delete(&self.name, &DeleteParams::background())
            .await;
    }
}

fn config_map(name: &str, value: &str) -> Result<ConfigMap> {
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name}, "data": {"v": value}}),
    )?)
}

async fn run(args: &Args) -> Result<Report> {
    let all = clients(args).await?;
    let first = all[0].clone();
    let create = creates(args, &all).await?;
    let list = if args.list_objects > 0 {
        Some(lists(args, &all).await?)
    } else {
        None
    };
    let watch = if args.watch_writes > 0 {
        Some(watch_delays(args, &first).await?)
    } else {
        None
    };
    Ok(Report {
        clients: all.len(),
        value_size: args.value_size,
        create,
        list,
        watch,
    })
}

/// The closed-loop create figure.
async fn creates(args: &Args, all: &[Client]) -> Result<Creates> {
    let scratch = Scratch::create(&all[0], "create").await?;
    let value = "x".repeat(args.value_size);
    let start = Instant::now();
    let measured_from = start + Duration::from_secs_f64(args.warmup);
    let until = measured_from + Duration::from_secs_f64(args.duration);
    let tasks: Vec<_> = all
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let api = scratch.api(c);
            let value = value.clone();
            tokio::spawn(async move {
                let (mut lat, mut errors) = (Vec::new(), 0usize);
                let mut k = 0u64;
                while Instant::now() < until {
                    let cm = config_map(&format!("c{i}-{k}"), &value)?;
                    k += 1;
                    let sent = Instant::now();
                    let ok = api.create(&PostParams::default(), &cm).await.is_ok();
                    let done = Instant::now();
                    if sent >= measured_from && done <= until {
                        if ok {
                            lat.push(done.duration_since(sent).as_micros() as u64);
                        } else {
                            errors += 1;
                        }
                    }
                }
                anyhow::Ok((lat, errors))
            })
        })
        .collect();
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await??;
        lat.extend(l);
        errors += e;
    }
    scratch.delete().await;
    Ok(Creates {
        ops_per_sec: lat.len() as f64 / args.duration,
        errors,
        latency: Latencies::of(lat),
    })
}

/// Fills a namespace with `--list-objects` ConfigMaps, then times whole LISTs of it.
async fn lists(args: &Args, all: &[Client]) -> Result<Lists> {
    let scratch = Scratch::create(&all[0], "list").await?;
    let value = Arc::new("x".repeat(args.value_size));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let tasks: Vec<_> = all
        .iter()
        .map(|c| {
            let (api, value, next, n) = (
                scratch.api(c),
                value.clone(),
                next.clone(),
                args.list_objects,
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return anyhow::Ok(());
                    }
                    let cm = config_map(&format!("o{i:06}"), &value)?;
                    // A create that fails is retried: the list must hold exactly n objects.
                    let mut tries = 0;
                    while let Err(e) = api.create(&PostParams::default(), &cm).await {
                        tries += 1;
                        if matches!(&e, kube::Error::Api(s) if s.code == 409) {
                            break;
                        }
                        if tries >= 5 {
                            return Err(anyhow!("creating o{i:06}: {e}"));
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let fill_per_sec = args.list_objects as f64 / t0.elapsed().as_secs_f64();
    let path = format!("/api/v1/namespaces/{}/configmaps", scratch.name);
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..args.list_reps.max(1) {
        let req = kube::core::Request::new(&path)
            .list(&ListParams::default())
            .map_err(|e| anyhow!("building the list request: {e}"))?;
        let sent = Instant::now();
        let text = all[0].request_text(req).await.context("the LIST")?;
        times.push(sent.elapsed().as_secs_f64() * 1e3);
        bytes = text.len();
        let items = serde_json::from_str::<serde_json::Value>(&text)?["items"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0);
        if items != args.list_objects {
            bail!(
                "the LIST returned {items} objects, not {}",
                args.list_objects
            );
        }
    }
    scratch.delete().await;
    times.sort_by(f64::total_cmp);
    Ok(Lists {
        objects: args.list_objects,
        bytes,
        fill_per_sec,
        median_ms: times[times.len() / 2],
        min_ms: times[0],
        max_ms: times[times.len() - 1],
    })
}

/// One write at a time, each timed from its request to its watch event.
async fn watch_delays(args: &Args, client: &Client) -> Result<Latencies> {
    let scratch = Scratch::create(client, "watch").await?;
    let api = scratch.api(client);
    let created = api
        .create(&PostParams::default(), &config_map("w", "start")?)
        .await?;
    let from = created
        .metadata
        .resource_version
        .clone()
        .ok_or_else(|| anyhow!("a create without resourceVersion"))?;
    let mut stream = api
        .watch(&WatchParams::default().timeout(290), &from)
        .await?
        .boxed();
    let writes = args.watch_writes;
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let writer_api = api.clone();
    let gap = Duration::from_millis(args.watch_gap_ms);
    let writer = tokio::spawn(async move {
        let mut cm = created;
        for k in 0..writes {
            let value = format!("w{k}");
            cm.data = Some([("v".to_string(), value.clone())].into());
            let _ = sent_tx.send((value, Instant::now()));
            cm = writer_api.replace("w", &PostParams::default(), &cm).await?;
            tokio::time::sleep(gap).await;
        }
        anyhow::Ok(())
    });
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut delays = Vec::with_capacity(writes);
    let deadline = Instant::now() + Duration::from_secs(60 + writes as u64);
    while delays.len() < writes {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, stream.try_next())
            .await
            .map_err(|_| anyhow!("{} of {writes} watch events in time", delays.len()))??
            .ok_or_else(|| anyhow!("the watch ended after {} events", delays.len()))?;
        let arrived = Instant::now();
        while let Ok((v, t)) = sent_rx.try_recv() {
            sent.insert(v, t);
        }
        if let WatchEvent::Modified(cm) = event {
            let v = cm
                .data
                .as_ref()
                .and_then(|d| d.get("v"))
                .cloned()
                .unwrap_or_default();
            let t = sent.remove(&v).ok_or_else(|| {
                anyhow!("an event for {v:?}, which was not written or came twice")
            })?;
            delays.push(arrived.duration_since(t).as_micros() as u64);
        }
    }
    writer.await??;
    scratch.delete().await;
    Ok(Latencies::of(delays))
}
