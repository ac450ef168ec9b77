//! Checkpoints encoded off the event loop.
//!
//! Every correct replica takes a checkpoint at the same CID. Encoding and hashing a large state
//! there (about 20 ms for 30,000 ConfigMaps, `benches/checkpoint.rs`) stalled every replica at
//! once, and with them every client: a Kubernetes watch saw a 25-40 ms hiccup once per
//! checkpoint. The core freezes the state instead (about 1 ms) and this thread encodes it, one
//! checkpoint at a time and in order, so the core gets them back in the order it took them.

use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use kmmr_protocol::core::state::{EncodedCheckpoint, PendingCheckpoint};
use tokio::sync::mpsc;

/// The encoding thread; dropping this stops it once the checkpoints queued are encoded.
pub(super) struct Encoder {
    tx: Option<std_mpsc::Sender<PendingCheckpoint>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Encoder {
    /// Starts the thread; encoded checkpoints arrive on the receiver.
    pub(super) fn start() -> std::io::Result<(Self, mpsc::UnboundedReceiver<EncodedCheckpoint>)> {
        let (tx, rx) = std_mpsc::channel::<PendingCheckpoint>();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("checkpoint-encoder".into())
            .spawn(move || {
                while let Ok(pending) = rx.recv() {
                    let t0 = Instant::now();
                    let encoded = pending.encode();
                    tracing::debug!(
                        cid = pending.cid.0,
                        bytes = encoded.checkpoint.meta.len,
                        ms = t0.elapsed().as_millis() as u64,
                        "checkpoint encoded"
                    );
                    if done_tx.send(encoded).is_err() {
                        // The event loop is gone: nothing waits for the rest.
                        return;
                    }
                }
            })?;
        Ok((
            Encoder {
                tx: Some(tx),
                thread: Some(thread),
            },
            done_rx,
        ))
    }

    pub(super) fn encode(&self, pending: PendingCheckpoint) {
        if let Some(tx) = &self.tx {
            // Only fails once the thread is gone, which it is only after `drop`.
            let _ = tx.send(pending);
        }
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
