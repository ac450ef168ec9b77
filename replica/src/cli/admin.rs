//! `kmmr-replica admin`: membership changes signed with the admin key.

use super::out::outln;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use kmmr_client::files::{load_key, parse_public_key, ViewFile};
use kmmr_client::{Admin, AdminError, ClientOptions};
use kmmr_protocol::core::reconfig::ViewChange;
use kmmr_protocol::view::{Member, View};
use kmmr_protocol::wire::ids::ReplicaId;

use kmmr::node::NodeConfig;

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// A cluster directory made by `kmmr-replica local` (view.toml, admin.key).
    #[arg(long, env = "KMMR_CLUSTER", default_value = "kmmr-local")]
    pub cluster: PathBuf,
    /// The view file (default: <cluster>/view.toml). Rewritten with the new view on success.
    #[arg(long)]
    pub view: Option<PathBuf>,
    /// The admin's private key (default: <cluster>/admin.key).
    #[arg(long)]
    pub admin_key: Option<PathBuf>,
    /// Leave the view file as it is.
    #[arg(long)]
    pub no_write_view: bool,
    #[command(subcommand)]
    pub change: ChangeCmd,
}

#[derive(Subcommand, Debug)]
pub enum ChangeCmd {
    /// Add a replica. In a cluster directory made by `local`, also writes its config,
    /// `<cluster>/r<ID>.toml`, and prints the command that starts it.
    Add {
        #[arg(long)]
        id: u32,
        /// Its replica listener, host:port (clients use port + 1000; in a `local` layout its
        /// HTTP port is port + 2000).
        #[arg(long)]
        address: String,
        /// Its ed25519 public key, hex (as printed by `kmmr-replica keygen`).
        #[arg(
            long,
            required_unless_present = "key_file",
            conflicts_with = "key_file"
        )]
        public_key: Option<String>,
        /// Its private key file (made by `kmmr-replica keygen --out FILE`): the public key is
        /// read from it, and the config written for the replica points at it.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// f of the new view (default: keep f if the new n allows it).
        #[arg(long)]
        f: Option<u32>,
    },
    /// Remove a replica; it stops once the new view is installed.
    Remove {
        #[arg(long)]
        id: u32,
        #[arg(long)]
        f: Option<u32>,
    },
    /// Change f, keeping the members.
    SetF {
        #[arg(long)]
        f: u32,
    },
}

pub async fn run(args: AdminArgs) -> Result<()> {
    let view_path = args
        .view
        .clone()
        .unwrap_or_else(|| args.cluster.join("view.toml"));
    let view = ViewFile::load(&view_path)?;
    let key_path = args
        .admin_key
        .clone()
        .unwrap_or_else(|| args.cluster.join("admin.key"));
    let key = load_key(&key_path)
        .with_context(|| format!("loading the admin key {}", key_path.display()))?;
    let mut joiner = None;
    let change = match args.change {
        ChangeCmd::Add {
            id,
            address,
            public_key,
            key_file,
            f,
        } => {
            let key = match (&public_key, &key_file) {
                (Some(hex), _) => parse_public_key(hex).context("--public-key")?,
                (None, Some(path)) => load_key(path)
                    .with_context(|| format!("--key-file {}", path.display()))?
                    .public(),
                (None, None) => bail!("give the new replica's --public-key or --key-file"),
            };
            joiner = Some(Joiner {
                id,
                address: address.clone(),
                key_file,
            });
            ViewChange::Add {
                member: Member {
                    id: ReplicaId(id),
                    address,
                    key,
                },
                f,
            }
        }
        ChangeCmd::Remove { id, f } => ViewChange::Remove {
            id: ReplicaId(id),
            f,
        },
        ChangeCmd::SetF { f } => ViewChange::SetF { f },
    };
    let admin = Admin::connect(key, view.clone(), ClientOptions::default()).await?;
    match admin.apply(change).await {
        Ok(new) => {
            print_view(&view, &new);
            if !args.no_write_view {
                ViewFile::save(&new, &view_path)?;
                outln!("wrote {}", view_path.display());
                if let Some(j) = joiner {
                    write_joiner_config(&args.cluster, &j)?;
                }
            }
            Ok(())
        }
        Err(AdminError::Refused(why)) => bail!("refused by the replicas: {why}"),
        Err(AdminError::Unknown(e)) => bail!(
            "{e:#}\nthe change may or may not be installed: check `kmmr-replica status` before trying again"
        ),
    }
}

fn print_view(old: &View, new: &View) {
    outln!(
        "installed view {} (n={}, f={}, quorum {}), was view {} (n={}, f={})",
        new.id.0,
        new.n(),
        new.f,
        new.quorum(),
        old.id.0,
        old.n(),
        old.f
    );
    for m in &new.members {
        let tag = if old.contains(m.id) { " " } else { "+" };
        outln!("{tag} replica {} at {}", m.id.0, m.address);
    }
    for m in old.members.iter().filter(|m| !new.contains(m.id)) {
        outln!("- replica {} at {}", m.id.0, m.address);
    }
}

/// A replica being added, as `admin add` was told of it.
struct Joiner {
    id: u32,
    address: String,
    key_file: Option<PathBuf>,
}

/// Writes the config of a replica just added to a cluster directory made by `local`, modelled
/// on a member's config there (same protocol settings, the `local` port layout), and prints
/// how to start it. Elsewhere (no member config to follow) it prints what to do instead. An
/// existing file is never overwritten.
fn write_joiner_config(cluster: &Path, j: &Joiner) -> Result<()> {
    let path = cluster.join(format!("r{}.toml", j.id));
    let template = std::fs::read_dir(cluster)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p != &path && p.extension().is_some_and(|x| x == "toml"))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find_map(|t| toml::from_str::<NodeConfig>(&t).ok());
    let (Some(template), false) = (template, path.exists()) else {
        outln!(
            "no config written ({}): write one for replica {} (see `kmmr-replica run --help`) \
             with this view, then start it; it catches up by state transfer",
            if path.exists() {
                format!("{} exists", path.display())
            } else {
                format!("{} holds no replica config to follow", cluster.display())
            },
            j.id
        );
        return Ok(());
    };
    let (host, port) = j
        .address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .with_context(|| format!("--address {} is not host:port", j.address))?;
    let http_port = port
        .checked_add(2000)
        .with_context(|| format!("--address {}: no room for its HTTP port", j.address))?;
    let key_file = match &j.key_file {
        Some(k) => std::path::absolute(k)?,
        None => PathBuf::from(format!("r{}.key", j.id)),
    };
    let config = NodeConfig {
        id: j.id,
        key_file: key_file.clone(),
        view_file: PathBuf::from("view.toml"),
        data_dir: PathBuf::from(format!("data/r{}", j.id)),
        listen: None,
        client_listen: None,
        http_listen: format!("{host}:{http_port}"),
        ..template
    };
    std::fs::write(&path, toml::to_string_pretty(&config)?)
        .with_context(|| format!("writing {}", path.display()))?;
    outln!("wrote {}", path.display());
    if j.key_file.is_none() {
        outln!(
            "put replica {}'s private key in {} (made with `kmmr-replica keygen --out`)",
            j.id,
            cluster.join(&key_file).display()
        );
    }
    outln!(
        "start it with: kmmr-replica run --config {}",
        std::path::absolute(&path).unwrap_or(path).display()
    );
    Ok(())
}
