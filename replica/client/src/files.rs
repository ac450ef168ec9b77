//! The files an operator or an admin writes for a cluster: the view (members, their addresses
//! and public keys, the admin key) as TOML, and key files (a 32-byte seed in hex, readable only by
//! its owner). The replica, the CLI and the Kubernetes operator all read them with this code.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use kmmr_protocol::crypto::{KeyPair, PublicKey};
use kmmr_protocol::view::{Member, View};
use kmmr_protocol::wire::ids::{ReplicaId, ViewId};

/// The view as written on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewFile {
    pub id: u32,
    pub f: usize,
    pub members: Vec<MemberFile>,
    /// Hex ed25519 public key whose signature reconfiguration requests need; without one the
    /// view cannot be reconfigured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberFile {
    pub id: u32,
    pub address: String,
    /// Hex ed25519 public key.
    pub key: String,
}

impl ViewFile {
    pub fn from_view(v: &View) -> Self {
        ViewFile {
            id: v.id.0,
            f: v.f,
            members: v
                .members
                .iter()
                .map(|m| MemberFile {
                    id: m.id.0,
                    address: m.address.clone(),
                    key: hex::encode(m.key.0),
                })
                .collect(),
            admin_key: v.admin.as_ref().map(|k| hex::encode(k.0)),
        }
    }

    pub fn to_view(&self) -> Result<View> {
        let mut members = Vec::with_capacity(self.members.len());
        for m in &self.members {
            members.push(Member {
                id: ReplicaId(m.id),
                address: m.address.clone(),
                key: parse_public_key(&m.key)
                    .with_context(|| format!("members[id={}].key", m.id))?,
            });
        }
        let admin = match &self.admin_key {
            Some(k) => Some(parse_public_key(k).context("admin_key")?),
            None => None,
        };
        let view = View::new(ViewId(self.id), self.f, members)
            .map_err(|e| anyhow::anyhow!("view: {e}"))?;
        Ok(view.with_admin(admin))
    }

    /// A view from the text of a view file, checked as the replica checks it.
    pub fn parse(text: &str) -> Result<View> {
        let vf: ViewFile = toml::from_str(text)?;
        vf.to_view()
    }

    pub fn load(path: &Path) -> Result<View> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the view file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing the view file {}", path.display()))
    }

    pub fn save(view: &View, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(&ViewFile::from_view(view))?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

pub fn parse_public_key(hex_key: &str) -> Result<PublicKey> {
    let bytes = hex::decode(hex_key.trim()).context("a public key is 64 hex digits")?;
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("a public key is 32 bytes (64 hex digits)"))?;
    if kmmr_protocol::crypto::parse_key(&PublicKey(arr)).is_none() {
        bail!("not a valid ed25519 public key");
    }
    Ok(PublicKey(arr))
}

/// Reads a private key file (64 hex digits of the seed).
pub fn load_key(path: &Path) -> Result<KeyPair> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the key file {}", path.display()))?;
    let bytes = hex::decode(text.trim())
        .with_context(|| format!("{}: a key file holds 64 hex digits", path.display()))?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{}: a key file holds 32 bytes", path.display()))?;
    Ok(KeyPair::from_seed(seed))
}

/// Writes a private key file readable only by its owner.
pub fn save_key(key: &KeyPair, path: &Path) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating the key file {}", path.display()))?;
    writeln!(f, "{}", hex::encode(key.seed()))?;
    Ok(())
}
