//! The replica's configuration: one typed struct, read from a TOML file and validated at
//! start-up with messages that name the field and the fix.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use kmmr_protocol::core::config::{Config, SlowLeader};

/// `kmmr-replica run --config <file>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This replica's id in the view.
    pub id: u32,
    /// File holding this replica's ed25519 private key (hex seed), readable only by its owner.
    pub key_file: PathBuf,
    /// File holding the view (TOML, see `ViewFile`).
    pub view_file: PathBuf,
    /// Where the replica keeps its state.
    pub data_dir: PathBuf,
    /// Replica-to-replica listener; defaults to this replica's address in the view.
    #[serde(default)]
    pub listen: Option<String>,
    /// Client listener; defaults to the view address with the port plus 1000.
    #[serde(default)]
    pub client_listen: Option<String>,
    /// `/metrics`, `/status`, `/healthz`.
    pub http_listen: String,
    /// After handling network input, poll for more for up to this many microseconds before
    /// sleeping, yielding the CPU to anything else runnable meanwhile. Saves a wake-up per
    /// message delay when messages come in quick succession; 0 turns it off.
    #[serde(default = "default_busy_poll_us")]
    pub busy_poll_us: u64,
    #[serde(default)]
    pub protocol: ProtocolConfig,
    /// A backup (`kmmr-replica snapshot save`) whose state this replica starts from, at CID 0:
    /// every replica of a restored cluster names the same file. Read and verified at every
    /// start, since decisions replayed from the beginning of the log apply to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_state: Option<PathBuf>,
    /// The newest replica-to-replica protocol this replica offers its peers (1 or 2; default
    /// the newest, 2). Links agree on the newest both ends speak, so a cluster part rolled to a
    /// release with protocol 2 keeps working with the rest. Set 1 on every replica to keep a
    /// cluster able to roll back to a release that speaks only 1.
    #[serde(default = "default_max_peer_protocol")]
    pub max_peer_protocol: u8,
}

fn default_max_peer_protocol() -> u8 {
    2
}

/// Measured on loopback with 4 replicas and a client on 2 cores: 60-200 us cut the median
/// single-client latency by about 30% and left throughput as it was; see README.
pub const DEFAULT_BUSY_POLL_US: u64 = 100;

/// Longer polls would hold a thread for no gain: a message delay is tens of microseconds.
pub const MAX_BUSY_POLL_US: u64 = 10_000;

fn default_busy_poll_us() -> u64 {
    DEFAULT_BUSY_POLL_US
}

/// Protocol tunables, in milliseconds where they are times.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolConfig {
    pub request_timeout_ms: u64,
    pub max_request_timeout_ms: u64,
    pub max_batch_requests: usize,
    pub max_batch_bytes: usize,
    pub slow_leader: bool,
    pub slow_leader_floor_ms: u64,
    pub checkpoint_history: u64,
    /// A checkpoint every this many CIDs (and after every view change); the log is trimmed to
    /// what follows the older of the two kept.
    pub checkpoint_period: u64,
    /// Bytes asked for per state-transfer chunk.
    pub chunk_bytes: usize,
    /// Log every decision and checkpoint to `data_dir`, fsynced, and answer a client only once
    /// the decision behind the answer is on disk. Off: nothing is written, nothing waits, and a
    /// restarted replica recovers everything by state transfer.
    pub durable: bool,
    /// Microseconds to wait for the last ACCEPTs of an instance once a quorum arrived: all n
    /// let it decide without checking their signatures first. 0 checks every ACCEPT.
    pub accept_grace_us: u64,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        let c = Config::default();
        ProtocolConfig {
            request_timeout_ms: c.request_timeout_us / 1000,
            max_request_timeout_ms: c.max_request_timeout_us / 1000,
            max_batch_requests: c.max_batch_requests,
            max_batch_bytes: c.max_batch_bytes,
            slow_leader: true,
            // A loaded machine stalls a whole replica for tens of milliseconds now and then
            // (side-by-side runs against etcd on 2 shared cores rotated the leader up to six
            // times in 7 s at a 20 ms floor); a flooded leader costs hundreds.
            slow_leader_floor_ms: 100,
            checkpoint_history: 10_000,
            checkpoint_period: c.checkpoint_period,
            chunk_bytes: c.chunk_bytes,
            durable: true,
            accept_grace_us: c.accept_grace_us,
        }
    }
}

impl ProtocolConfig {
    pub fn validate(&self) -> Result<()> {
        if self.request_timeout_ms < 10 {
            bail!("protocol.request_timeout_ms = {} is too small: use at least 10 (the default is 2000)", self.request_timeout_ms);
        }
        if self.max_request_timeout_ms < self.request_timeout_ms {
            bail!("protocol.max_request_timeout_ms must be >= protocol.request_timeout_ms");
        }
        if self.max_batch_requests == 0
            || self.max_batch_requests > kmmr_protocol::wire::limits::MAX_BATCH_REQUESTS
        {
            bail!(
                "protocol.max_batch_requests must be between 1 and {}",
                kmmr_protocol::wire::limits::MAX_BATCH_REQUESTS
            );
        }
        if self.max_batch_bytes == 0
            || self.max_batch_bytes > kmmr_protocol::wire::limits::MAX_BATCH_BYTES
        {
            bail!(
                "protocol.max_batch_bytes must be between 1 and {} (larger batches could not be sent in a leader change)",
                kmmr_protocol::wire::limits::MAX_BATCH_BYTES
            );
        }
        if self.checkpoint_period == 0 {
            bail!("protocol.checkpoint_period must be at least 1 (the default is 1024)");
        }
        if self.chunk_bytes < 1024 || self.chunk_bytes > kmmr_protocol::wire::limits::MAX_CHUNK {
            bail!(
                "protocol.chunk_bytes = {} must be between 1024 and {} (the default is 1 MiB)",
                self.chunk_bytes,
                kmmr_protocol::wire::limits::MAX_CHUNK
            );
        }
        Ok(())
    }

    pub fn core(&self) -> Config {
        let timeout = self.request_timeout_ms * 1000;
        Config {
            request_timeout_us: timeout,
            max_request_timeout_us: self.max_request_timeout_ms * 1000,
            stop_retransmit_us: timeout / 2,
            max_batch_requests: self.max_batch_requests,
            max_batch_bytes: self.max_batch_bytes,
            slow_leader: self.slow_leader.then(|| SlowLeader {
                factor: 8,
                floor_us: self.slow_leader_floor_ms * 1000,
                grace_us: timeout / 2,
            }),
            checkpoint_period: self.checkpoint_period,
            chunk_bytes: self.chunk_bytes,
            persist: self.durable,
            defer_checkpoints: true,
            accept_grace_us: self.accept_grace_us,
            ..Config::default()
        }
    }
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        let mut c: NodeConfig = toml::from_str(&text)
            .with_context(|| format!("parsing the config file {}", path.display()))?;
        // Relative paths are relative to the config file.
        if let Some(dir) = path.parent() {
            let initial = c.initial_state.iter_mut();
            for p in [&mut c.key_file, &mut c.view_file, &mut c.data_dir]
                .into_iter()
                .chain(initial)
            {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if self.busy_poll_us > MAX_BUSY_POLL_US {
            bail!(
                "busy_poll_us = {} is too large: use at most {MAX_BUSY_POLL_US} (the default is \
                 {DEFAULT_BUSY_POLL_US}; 0 turns busy polling off)",
                self.busy_poll_us
            );
        }
        self.peer_protocol()?;
        self.protocol.validate()
    }

    /// `max_peer_protocol` as the network takes it.
    pub fn peer_protocol(&self) -> Result<kmmr_net::PeerProtocol> {
        match self.max_peer_protocol {
            1 => Ok(kmmr_net::PeerProtocol::V1),
            2 => Ok(kmmr_net::PeerProtocol::V2),
            v => bail!("max_peer_protocol = {v} is not a protocol this release speaks: use 1 or 2"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(dir: &Path, extra: &str) -> PathBuf {
        let path = dir.join("r0.toml");
        std::fs::write(
            &path,
            format!(
                "id = 0\nkey_file = \"r0.key\"\nview_file = \"view.toml\"\ndata_dir = \"data\"\n\
                 http_listen = \"127.0.0.1:0\"\n{extra}"
            ),
        )
        .unwrap();
        path
    }

    #[test]
    fn busy_polling_is_on_by_default_and_bounded() {
        let dir = std::env::temp_dir().join(format!("kmmr-config-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = NodeConfig::load(&write_config(&dir, "")).unwrap();
        assert_eq!(c.busy_poll_us, DEFAULT_BUSY_POLL_US);
        let c = NodeConfig::load(&write_config(&dir, "busy_poll_us = 0\n")).unwrap();
        assert_eq!(c.busy_poll_us, 0);
        let e = NodeConfig::load(&write_config(&dir, "busy_poll_us = 50000\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("busy_poll_us = 50000 is too large"), "{e}");
        assert!(e.contains("0 turns busy polling off"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_initial_state_is_optional_and_relative_to_the_config_file() {
        let dir = std::env::temp_dir().join(format!("kmmr-config-init-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = NodeConfig::load(&write_config(&dir, "")).unwrap();
        assert_eq!(c.initial_state, None);
        let c = NodeConfig::load(&write_config(&dir, "initial_state = \"b.kmmr\"\n")).unwrap();
        assert_eq!(c.initial_state, Some(dir.join("b.kmmr")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
