//! `kmmr-etcd-gateway`: serves the etcd v3 API over a KmMR cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use kmmr_client::files::{load_key, save_key, ViewFile};
use kmmr_client::{Client, ClientOptions};
use kmmr_etcd_gateway::gateway::Gateway;
use kmmr_etcd_gateway::server::{serve, Limits, TlsFiles};
use kmmr_protocol::crypto::KeyPair;

/// Serves the etcd v3 gRPC API (KV, Watch, Lease, Cluster.MemberList, Maintenance.Status and
/// Alarm) over a KmMR cluster, trusting no single replica: every answer is one enough replicas
/// agreed on. Point etcdctl or kube-apiserver's --etcd-servers at --listen.
#[derive(Parser, Debug)]
#[command(name = "kmmr-etcd-gateway", version)]
struct Args {
    /// Directory of the cluster (as `kmmr-replica local` lays it out): its view.toml is read.
    #[arg(long)]
    cluster: PathBuf,
    /// The view file, if not CLUSTER/view.toml.
    #[arg(long)]
    view: Option<PathBuf>,
    /// A client key for the gateway (created if missing). By default each start draws a fresh
    /// one: replicas know a client by its key and serve only the newest session of a key, so a
    /// key file must never be shared by two running clients.
    #[arg(long)]
    client_key: Option<PathBuf>,
    /// Address to serve the etcd API on. Without TLS it must be a loopback address.
    #[arg(long, default_value = "127.0.0.1:2379")]
    listen: SocketAddr,
    /// URL clients reach this gateway at (what `etcdctl member list` shows); by default built
    /// from --listen.
    #[arg(long)]
    advertise_client_url: Option<String>,
    /// TLS certificate of the server (PEM), as etcd's --cert-file.
    #[arg(long, requires = "key_file")]
    cert_file: Option<PathBuf>,
    /// TLS key of the server (PEM), as etcd's --key-file.
    #[arg(long, requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// CA (PEM) whose client certificates are required, as etcd's --trusted-ca-file.
    #[arg(long, requires = "cert_file")]
    trusted_ca_file: Option<PathBuf>,
    /// Address of the HTTP port: `/metrics` (Prometheus), `/health` (etcd's: whether a quorum
    /// of replicas answers) and `/livez`. Plain HTTP, as etcd's --listen-metrics-urls; off by
    /// default.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Most client connections served at once.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Interval of progress notifications on quiet watches that asked for them, as etcd's flag
    /// of the same name takes it (a Go duration: `10m`, `1s`, `1m30s`, `500ms`).
    #[arg(long, default_value = "10m", value_parser = parse_go_duration)]
    watch_progress_notify_interval: Duration,
    /// Runtime worker threads. With one (the default) the etcd connections, the replica links
    /// and every request's handler share a thread, so no step of a request waits for another
    /// thread to wake up: through a kube-apiserver on two cores that made 7-10% more creates/s
    /// than a runtime with a thread per core, at lower latency and less CPU. A gateway busy
    /// enough to need more than one core can have more.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: u16,
}

/// A duration as Go's time.ParseDuration reads it (what etcd's flags take and what Go callers
/// print): decimal numbers with units ns, us, µs, ms, s, m, h, in sequence (`1m30s`), or `0`.
fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let bad =
        || format!("invalid duration {text:?}: expected a Go duration such as 10m, 1s or 500ms");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

fn load_or_create_key(path: &Path) -> Result<KeyPair> {
    if path.exists() {
        return load_key(path);
    }
    let key = KeyPair::generate(&mut rand::rngs::OsRng);
    save_key(&key, path)?;
    Ok(key)
}

async fn run(args: Args) -> Result<()> {
    let tls = match (&args.cert_file, &args.key_file) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            trusted_ca: args.trusted_ca_file.clone(),
        }),
        _ => None,
    };
    if tls.is_none() && !args.listen.ip().is_loopback() {
        bail!(
            "--listen {} is not a loopback address: serving the etcd API beyond this host needs TLS \
             (--cert-file, --key-file and, to require client certificates, --trusted-ca-file)",
            args.listen
        );
    }
    let view_path = args
        .view
        .clone()
        .unwrap_or_else(|| args.cluster.join("view.toml"));
    let view = ViewFile::load(&view_path)?;
    let key = match &args.client_key {
        Some(path) => load_or_create_key(path)?,
        None => KeyPair::generate(&mut rand::rngs::OsRng),
    };
    let options = ClientOptions {
        // Reads outside the total order from a quorum, falling back to ordering: linearizable
        // without a consensus instance per read when the replicas agree.
        linearizable_unordered_reads: true,
        ..ClientOptions::default()
    };
    let client = Client::connect(key, view, options)
        .await
        .context("connecting to the cluster")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let advertise = args
        .advertise_client_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{local}"));
    let gateway = Gateway::new(client, advertise.clone());
    if let Some(addr) = args.metrics_listen {
        let http = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
        tracing::info!(listen = %http.local_addr()?, "metrics and health up");
        tokio::spawn(kmmr_net::http::serve(
            http,
            kmmr_etcd_gateway::metrics::router(gateway.clone()),
            kmmr_net::http::HttpLimits::default(),
        ));
    }
    tracing::info!(listen = %local, advertise = %advertise, "etcd API up");
    // One line on stdout that scripts and tests wait for.
    println!("serving the etcd API on {advertise}");
    if args.watch_progress_notify_interval.is_zero() {
        bail!("--watch-progress-notify-interval must be above zero");
    }
    let limits = Limits {
        max_connections: args.max_connections,
        progress_every: args.watch_progress_notify_interval,
        ..Limits::default()
    };
    // Kubernetes stops a pod with SIGTERM, a terminal with SIGINT: both end the gateway. Open
    // streams (watches, keep-alives) get a grace period to end, not forever.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stop_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = serve(gateway, listener, tls, limits, stopped(stop_rx.clone()));
    tokio::select! {
        result = server => result,
        () = async {
            stopped(stop_rx).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::info!("streams still open after the grace period: stopping anyway");
            Ok(())
        }
    }
}

/// How long open streams may take to end once the gateway is told to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let mut builder = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(usize::from(args.threads));
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// k8s.io/apiserver's progress-notification tests set etcd's
    /// --watch-progress-notify-interval to 1s; the storage suite passes it on to the gateway.
    #[test]
    fn the_progress_notification_interval_is_set_as_etcd_takes_it() {
        let args = Args::try_parse_from([
            "kmmr-etcd-gateway",
            "--cluster",
            "c",
            "--watch-progress-notify-interval",
            "1s",
        ])
        .expect("the flag parses");
        assert_eq!(args.watch_progress_notify_interval, Duration::from_secs(1));
        let default = Args::try_parse_from(["kmmr-etcd-gateway", "--cluster", "c"]).expect("args");
        assert_eq!(
            default.watch_progress_notify_interval,
            kmmr_etcd_gateway::watch::PROGRESS_INTERVAL
        );
    }

    #[test]
    fn go_durations_parse_as_go_reads_them() {
        for (text, want) in [
            ("1s", Duration::from_secs(1)),
            ("10m0s", Duration::from_secs(600)),
            ("1m30s", Duration::from_secs(90)),
            ("500ms", Duration::from_millis(500)),
            ("1.5h", Duration::from_secs(5400)),
            ("0", Duration::ZERO),
        ] {
            assert_eq!(parse_go_duration(text), Ok(want), "{text}");
        }
        for text in ["", "1", "s", "1x", "-1s", "1s2"] {
            assert!(parse_go_duration(text).is_err(), "{text} must be refused");
        }
    }
}
