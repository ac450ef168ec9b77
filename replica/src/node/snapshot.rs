//! `GET /snapshot`: this replica's service state at its last decision, for `kmmr-replica
//! snapshot save`. Only the view's admin may read it (the state holds every key and value, and
//! the HTTP port is the one metrics scrapers reach). One replica's answer proves nothing: the
//! reader checks it against the state digest that f+1 replicas signed in their statuses.
//!
//! The replica loop freezes the state at its last decision, as for a checkpoint, and a blocking
//! thread encodes it: a backup of a large state does not stall ordering.

use kmmr_byzantine::Behaviour;
use kmmr_client::clock::now_us;

use super::NodeLoop;
use crate::backup::{check_token, served_prefix, TokenError};

/// A request for the state, from the HTTP server to the replica loop.
pub struct SnapshotAsk {
    /// The `token` query parameter (see [`crate::backup::read_token`]).
    pub token: String,
    pub reply: tokio::sync::oneshot::Sender<Result<Vec<u8>, TokenError>>,
}

impl NodeLoop {
    pub(super) fn serve_snapshot(&self, ask: SnapshotAsk) {
        let me = self.core.id().0;
        if let Err(e) = check_token(self.view.admin.as_ref(), me, now_us() / 1000, &ask.token) {
            tracing::warn!(error = %e, "refused a request for the state");
            let _ = ask.reply.send(Err(e));
            return;
        }
        let cid = self.core.last_decided().map(|c| c.0);
        let frozen = self.core.service().freeze();
        // Test mode: a corrupting replica hands out a state other than the one it vouched for,
        // which the reader must catch and fetch elsewhere.
        let corrupt = self
            .adversary
            .as_ref()
            .is_some_and(|a| matches!(a.behaviour, Behaviour::Corrupt | Behaviour::Mixed));
        tokio::task::spawn_blocking(move || {
            let mut out = served_prefix(cid).to_vec();
            frozen.write_snapshot(&mut |piece| out.extend_from_slice(piece));
            if corrupt {
                if let Some(b) = out.last_mut() {
                    *b ^= 0x01;
                }
            }
            tracing::info!(cid = ?cid, bytes = out.len() - crate::backup::SERVED_PREFIX_LEN, "served the state for a backup");
            let _ = ask.reply.send(Ok(out));
        });
    }
}

/// Sets `service` to the state of the backup at `path` (`NodeConfig::initial_state`), refusing
/// a file that does not verify, a backup of another service, and a state the service does not
/// reproduce byte for byte (replicas must start identical).
pub(super) fn start_from(
    path: &std::path::Path,
    choice: super::ServiceChoice,
    service: &mut dyn kmmr_protocol::service::Service,
) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    let backup = crate::backup::Backup::read(path).context("initial_state")?;
    if choice != super::ServiceChoice::Kv {
        bail!(
            "initial_state {} holds key-value state; run this replica with --service kv",
            path.display()
        );
    }
    service
        .restore(&backup.body)
        .with_context(|| format!("initial_state {}", path.display()))?;
    let digest = service.state_digest();
    if digest != backup.header.digest {
        bail!(
            "initial_state {}: the restored state has digest {digest}, not the file's {}; this \
             build encodes the state differently from the one that saved it",
            path.display(),
            backup.header.digest
        );
    }
    tracing::info!(
        path = %path.display(),
        revision = backup.header.revision,
        digest = %digest,
        "started from a backup"
    );
    Ok(())
}
