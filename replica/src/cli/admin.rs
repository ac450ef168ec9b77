//! `kmmr-replica admin`: membership changes signed with the admin key.

use super::out::outln;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use kmmr_client::files::{load_key, parse_public_key, ViewFile};
use kmmr_client::{Admin, AdminError, ClientOptions};
use kmmr_protocol::core::reconfig::ViewChange;
use kmmr_protocol::view::{Member, View};
use kmmr_protocol::wire::ids::ReplicaId;

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
    /// Add a replica; start it afterwards with the printed view.
    Add {
        #[arg(long)]
        id: u32,
        /// Its replica listener, host:port (clients use port + 1000).
        #[arg(long)]
        address: String,
        /// Its ed25519 public key, hex (as printed by `kmmr-replica keygen`).
        #[arg(long)]
        public_key: String,
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
    let change = match args.change {
        ChangeCmd::Add {
            id,
            address,
            public_key,
            f,
        } => ViewChange::Add {
            member: Member {
                id: ReplicaId(id),
                address,
                key: parse_public_key(&public_key).context("--public-key")?,
            },
            f,
        },
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
