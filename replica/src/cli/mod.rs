//! Command-line interface of `kmmr-replica`.

mod admin;
mod bench;
mod keys;
mod kv;
mod local;
mod out;
mod render;
mod snapshot;
mod snapshot_s3;
mod status;
mod watch;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use kmmr::node::{NodeConfig, ServiceChoice};
use kmmr_byzantine::Behaviour;
use kmmr_client::files::{load_key, save_key, ViewFile};
use kmmr_client::{Client, ClientOptions};
use kmmr_protocol::crypto::KeyPair;
use out::outln;

#[derive(Parser, Debug)]
#[command(
    name = "kmmr-replica",
    version,
    about = "KmMR: a BFT-SMaRt replica with a revisioned key-value store"
)]
pub struct Cli {
    /// Runtime worker threads.
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Output of client commands: text for people, or one JSON object per line for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "text")]
    pub output: render::Format,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Generate an ed25519 key pair; prints the public key.
    Keygen {
        /// Where to write the private key (created with mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a replica.
    Run {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "kv")]
        service: ServiceArg,
        /// TEST ONLY: make this replica Byzantine. Requires --i-know-this-breaks-the-replica.
        #[arg(long, value_enum)]
        byzantine: Option<ByzantineMode>,
        /// Confirms --byzantine: the replica will lie, equivocate or misbehave on purpose.
        #[arg(long)]
        i_know_this_breaks_the_replica: bool,
    },
    /// Start an n-replica cluster on loopback with generated keys, optionally with Byzantine
    /// replicas, and optionally run a checked workload against it.
    Local(local::LocalArgs),
    /// Client operations against a cluster.
    #[command(flatten)]
    Kv(kv::KvCmd),
    /// Load generator: ops/s and latency percentiles (BFT-SMaRt's ThroughputLatency).
    Bench(bench::BenchArgs),
    /// Membership changes signed with the admin key: add, remove, set-f.
    Admin(admin::AdminArgs),
    /// Backups: save the state f+1 replicas vouch for, inspect a file, restore it into a new
    /// cluster.
    Snapshot(snapshot::SnapshotArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceArg {
    Kv,
    Noop,
}

impl From<ServiceArg> for ServiceChoice {
    fn from(s: ServiceArg) -> Self {
        match s {
            ServiceArg::Kv => ServiceChoice::Kv,
            ServiceArg::Noop => ServiceChoice::Noop,
        }
    }
}

/// Byzantine test modes.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByzantineMode {
    /// As leader, propose different batches to the two halves and vote for both.
    Equivocate,
    /// Flip bits in frames and lie in replies to clients.
    Corrupt,
    /// Send nothing.
    Silent,
    /// Delay everything by 50 ms.
    Slow,
    /// Send oversized frames and frames whose length fields lie.
    Garbage,
    /// Send forged signatures, unproven claims, forged client requests.
    Forge,
    /// Re-send old frames.
    Replay,
    /// A mix of all of the above.
    Mixed,
}

impl ByzantineMode {
    pub fn behaviour(self) -> Behaviour {
        match self {
            ByzantineMode::Equivocate => Behaviour::Equivocate,
            ByzantineMode::Corrupt => Behaviour::Corrupt,
            ByzantineMode::Silent => Behaviour::Silent,
            ByzantineMode::Slow => Behaviour::Slow { extra_us: 50_000 },
            ByzantineMode::Garbage => Behaviour::Oversize,
            ByzantineMode::Forge => Behaviour::Forge,
            ByzantineMode::Replay => Behaviour::Replay,
            ByzantineMode::Mixed => Behaviour::Mixed,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ByzantineMode::Equivocate => "equivocate",
            ByzantineMode::Corrupt => "corrupt",
            ByzantineMode::Silent => "silent",
            ByzantineMode::Slow => "slow",
            ByzantineMode::Garbage => "garbage",
            ByzantineMode::Forge => "forge",
            ByzantineMode::Replay => "replay",
            ByzantineMode::Mixed => "mixed",
        }
    }
}

/// Where a client finds a cluster: a directory made by `local` (view.toml and the replicas'
/// configs), or explicit files.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// A cluster directory made by `kmmr-replica local`.
    #[arg(long, env = "KMMR_CLUSTER", default_value = "kmmr-local")]
    pub cluster: PathBuf,
    /// The view file (default: <cluster>/view.toml).
    #[arg(long)]
    pub view: Option<PathBuf>,
    /// A private key for this client, created if missing (default: one of the cluster
    /// directory's client-keys/ that no running command holds). Two processes running at once
    /// must not share one: the newer one's session ends the older one's.
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    /// Give up on a request that has no agreed answer after this many seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

impl ClusterArgs {
    pub async fn connect(&self) -> Result<Client> {
        let view_path = self
            .view
            .clone()
            .unwrap_or_else(|| self.cluster.join("view.toml"));
        let view = ViewFile::load(&view_path).with_context(|| {
            format!(
                "no cluster at {}: start one with `kmmr-replica local --keep-running`, or point \
                 --cluster (or KMMR_CLUSTER) at its directory",
                self.cluster.display()
            )
        })?;
        // Commands running at once need different keys (see `keys`): a key of the cluster
        // directory's pool that no running command holds, or, with no directory to keep a
        // pool in (--view alone), a new one.
        let key = match &self.client_key {
            Some(path) => load_or_create_key(path)?,
            None if self.view.is_none() => keys::take(&self.cluster),
            None => KeyPair::generate(&mut rand::rngs::OsRng),
        };
        // The CLI's writes wait for a quorum so that `get --unordered` stays linearizable.
        let opts = ClientOptions {
            linearizable_unordered_reads: true,
            timeout: std::time::Duration::from_secs(self.timeout),
            ..ClientOptions::default()
        };
        let mut client = Client::connect(key.clone(), view.clone(), opts.clone()).await?;
        // None answering is not worth a 30 s wait, but is worth a few seconds: a pod's network
        // or a replica's Service may not answer for the first moments, and a cluster just
        // started may not listen yet.
        let grace = std::time::Instant::now() + CONNECT_GRACE.min(opts.timeout);
        let all_down = |c: &Client| c.unreachable_at_connect().len() == c.view().n();
        while all_down(&client) && std::time::Instant::now() < grace {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            client = Client::connect(key.clone(), view.clone(), opts.clone()).await?;
        }
        let down = client.unreachable_at_connect();
        // Some down is worth knowing while the request goes to the others.
        if !down.is_empty() && down.len() == client.view().n() {
            bail!(
                "no replica of the cluster at {} answers ({}): is it running?",
                self.cluster.display(),
                down.iter()
                    .map(|(id, why)| format!("replica {}: {why}", id.0))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        for (id, why) in down {
            eprintln!(
                "warning: replica {} unreachable ({why}); trying the others",
                id.0
            );
        }
        Ok(client)
    }
}

/// How long a client command keeps dialling when no replica answers at all, before it fails.
const CONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

pub fn load_or_create_key(path: &Path) -> Result<KeyPair> {
    if path.exists() {
        return load_key(path);
    }
    let key = KeyPair::generate(&mut rand::rngs::OsRng);
    save_key(&key, path)?;
    Ok(key)
}

pub async fn main(cli: Cli) -> Result<()> {
    let result = run(cli).await;
    keys::release_all();
    result
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Keygen { out } => {
            if out.exists() {
                bail!("{} exists: refusing to overwrite a key", out.display());
            }
            let key = KeyPair::generate(&mut rand::rngs::OsRng);
            save_key(&key, &out)?;
            outln!("{}", hex::encode(key.public().0));
            Ok(())
        }
        Cmd::Run {
            config,
            service,
            byzantine,
            i_know_this_breaks_the_replica,
        } => {
            if byzantine.is_some() && !i_know_this_breaks_the_replica {
                bail!("--byzantine makes this replica attack its own cluster; it is for tests only. Add --i-know-this-breaks-the-replica to confirm");
            }
            let cfg = NodeConfig::load(&config)
                .with_context(|| format!("loading {}", config.display()))?;
            kmmr::node::run(
                cfg,
                service.into(),
                byzantine.map(|b| b.behaviour()),
                interrupted(),
            )
            .await
        }
        Cmd::Local(args) => local::run(args).await,
        Cmd::Kv(cmd) => kv::run(cmd, cli.output).await,
        Cmd::Bench(args) => bench::run(args).await,
        Cmd::Admin(args) => admin::run(args).await,
        Cmd::Snapshot(args) => snapshot::run(args, cli.output).await,
    }
}

/// Ctrl-C or SIGTERM: how a replica, or a local cluster that must take its replicas down with
/// it, is asked to stop.
pub async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
