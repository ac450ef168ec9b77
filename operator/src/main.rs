//! `kmmr-operator`: reconciles BftClusters. Serves metrics on `--metrics-addr`, elects a leader
//! on a Lease so that several instances can run, and on SIGTERM stops taking new work, lets the
//! reconciles in flight finish and hands the lease over.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kmmr_operator::admin::ThroughAdmin;
use kmmr_operator::controller::{self, Context, ProbeVia};
use kmmr_operator::leader::{self, Elector};
use kmmr_operator::membership::{NotSupported, Reconfigurer};
use kmmr_operator::metrics::{self, Metrics};
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(
    name = "kmmr-operator",
    version,
    about = "The KmMR Kubernetes operator"
)]
struct Args {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "KMMR_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "KMMR_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Skip leader election (only when exactly one instance runs).
    #[arg(long, env = "KMMR_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Namespace of the leader Lease (the operator's own; set from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "KMMR_LEASE_NAME", default_value = "kmmr-operator")]
    lease_name: String,
    /// This instance's identity in the Lease and in Events (its pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Reach replicas by their pod DNS names instead of pod IPs.
    #[arg(long)]
    probe_via_dns: bool,
    /// Refuse membership changes (spec.replicas or spec.f differing from the view) instead of
    /// carrying them out through admin-signed reconfiguration.
    #[arg(long)]
    no_reconfiguration: bool,
    /// Time limit of one view change, in seconds.
    #[arg(long, default_value_t = 60)]
    reconfiguration_timeout_secs: u64,
    /// TEST ONLY: honour the kmmr.io/byzantine-test-mode annotation, which runs chosen replicas
    /// in a Byzantine mode that attacks their own cluster. Never set it outside tests.
    #[arg(long, env = "KMMR_ALLOW_BYZANTINE_TEST_MODES")]
    allow_byzantine_test_modes: bool,
    /// Time limit of one replica's /status probe, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    probe_timeout_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KMMR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kmmr-operator: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("kmmr-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(args: Args) -> Result<(), String> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        terminated().await;
        tracing::info!("termination requested: finishing the reconciles in flight");
        let _ = stop_tx.send(true);
    });
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };

    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(&args.metrics_addr)
        .await
        .map_err(|e| format!("binding the metrics address {}: {e}", args.metrics_addr))?;
    let server = tokio::spawn(metrics::serve(listener, metrics.clone(), stopped()));

    let client = Client::try_default()
        .await
        .map_err(|e| format!("connecting to the Kubernetes API (in-cluster or KUBECONFIG): {e}"))?;
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| format!("reaching the Kubernetes API: {e}"))?;
    tracing::info!(server = %version.git_version, "connected to the apiserver");
    metrics.set_ready();

    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "kmmr-operator".to_string());
        format!("{host}-{}", std::process::id())
    });
    let elector = (!args.no_leader_election).then(|| {
        Elector::new(
            client.clone(),
            leader::Config {
                name: args.lease_name.clone(),
                namespace: args.lease_namespace.clone(),
                identity: identity.clone(),
                duration: Duration::from_secs(15),
                renew: Duration::from_secs(3),
            },
        )
    });
    if let Some(e) = &elector {
        tracing::info!(lease = %args.lease_name, namespace = %args.lease_namespace, %identity, "waiting for the leader lease");
        tokio::select! {
            _ = e.acquire() => {}
            _ = stopped() => {
                let _ = server.await;
                return Ok(());
            }
        }
        tracing::info!("leading");
    }
    metrics.leader.set(1);

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "kmmr-operator".to_string(),
            instance: Some(identity),
        },
    );
    let reconfigurer: Arc<dyn Reconfigurer> = if args.no_reconfiguration {
        Arc::new(NotSupported)
    } else {
        Arc::new(ThroughAdmin {
            timeout: Duration::from_secs(args.reconfiguration_timeout_secs),
        })
    };
    if args.allow_byzantine_test_modes {
        tracing::warn!(
            annotation = kmmr_operator::testmode::ANNOTATION,
            "TEST ONLY: --allow-byzantine-test-modes is set: a BftCluster annotation can make its replicas attack their own cluster. Never run an operator like this outside tests"
        );
    }
    let ctx = Arc::new(
        Context::new(
            client,
            recorder,
            metrics.clone(),
            reconfigurer,
            Duration::from_millis(args.probe_timeout_ms),
            if args.probe_via_dns {
                ProbeVia::Dns
            } else {
                ProbeVia::PodIp
            },
        )
        .allowing_byzantine_test_modes(args.allow_byzantine_test_modes),
    );
    let controller = controller::run(ctx, args.watch_namespace.as_deref(), stopped());
    let lost = async {
        match &elector {
            Some(e) => e.keep().await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        _ = controller => Ok(()),
        _ = lost => Err("lost the leader lease: exiting so that only one instance reconciles".to_string()),
    };
    metrics.leader.set(0);
    if result.is_ok() {
        if let Some(e) = &elector {
            if let Err(err) = e.release().await {
                tracing::warn!(error = %err, "releasing the leader lease");
            }
        }
        tracing::info!("stopped");
    }
    server.abort();
    result
}
