//! Reading back, at start-up, the votes this replica promised before it stopped
//! (`storage::promise`), and refusing to start when they are lost.

use anyhow::Result;

use super::config::NodeConfig;
use crate::storage::promise::{PromiseFile, PromiseState};
use kmmr_protocol::core::promise::Promise;
use kmmr_protocol::wire::codec::Decode;

/// What the promise files held at start-up.
pub(super) struct Opened {
    pub file: PromiseFile,
    pub promise: Option<Promise>,
    /// A replica ran from this directory before (see `FromDisk::ran_before`).
    pub ran_before: bool,
}

/// Opens the promise files and reads the last promise this replica made before it stopped. Any
/// damage that leaves no promise to restore stops the start, whatever its kind.
pub(super) fn open_promise(cfg: &NodeConfig) -> Result<Opened> {
    let (file, found) = PromiseFile::open(&cfg.data_dir)?;
    let ran_before = found.existed;
    let refuse = |what: String| {
        anyhow::anyhow!(
            "{what}; without it this replica could vote twice in one epoch. Move the data \
             directory {} away to start empty, which counts as one of the f faults until it has \
             caught up",
            cfg.data_dir.display()
        )
    };
    let bytes = match found.state() {
        PromiseState::Never => {
            return Ok(Opened {
                file,
                promise: None,
                ran_before,
            })
        }
        PromiseState::Newest(b) => b,
        PromiseState::Lost => {
            let why = found.damaged.join("; ");
            return Err(refuse(format!("no promise file is intact ({why})")));
        }
    };
    for d in &found.damaged {
        // Expected after a crash during a write: that promise was never acted on.
        tracing::warn!(damage = %d, "recovery: a promise file is damaged; using the other one");
    }
    let p = Promise::from_bytes(bytes).map_err(|e| {
        refuse(format!(
            "the last promise passes its checksum but does not decode ({e})"
        ))
    })?;
    tracing::info!(
        cid = p.collect.cid.0,
        regency = p.collect.regency.0,
        writes = p.collect.writes.len(),
        accepted = p.collect.accepted.is_some(),
        "recovery: restored the votes promised before the restart"
    );
    Ok(Opened {
        file,
        promise: Some(p),
        ran_before,
    })
}
