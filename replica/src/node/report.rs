//! What a replica reports about itself: the gauges refreshed each tick, and the signed status
//! that `/status` serves and the operator and the CLI compare across replicas.

use std::time::Instant;

use kmmr_client::clock::now_us;
use kmmr_client::status::{SignedStatus, Status};

use super::{metrics, NodeLoop};

impl NodeLoop {
    pub(super) fn refresh_gauges(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics
            .peers_on_older_protocol
            .set(self.peers.count_below(kmmr_net::PeerProtocol::NEWEST) as i64);
        let s = &self.stats;
        for (direction, bytes, frames) in [
            ("peer_in", &s.peer_bytes_in, &s.peer_frames_in),
            ("peer_out", &s.peer_bytes_out, &s.peer_frames_out),
            ("client_in", &s.client_bytes_in, &s.client_frames_in),
            ("client_out", &s.client_bytes_out, &s.client_frames_out),
        ] {
            self.metrics
                .set_network(direction, bytes.load(Relaxed), frames.load(Relaxed));
        }
        for (reason, count) in s.rejected_by_reason() {
            if count > 0 {
                let g = self.metrics.rejected.get_or_create(&metrics::ReasonLabel {
                    reason: format!("net_{}", reason.as_str()),
                });
                let have = g.get();
                if count > have {
                    g.inc_by(count - have);
                }
            }
        }
        self.metrics.view_id.set(self.view.id.0 as i64);
        if let Some(d) = self.durable_cid() {
            self.metrics.durable_cid.set(d.0 as i64);
        }
        if let Some(c) = self.core.latest_checkpoint() {
            self.metrics.checkpoint_cid.set(c.cid.0 as i64);
        }
        self.metrics
            .pending_requests
            .set(self.core.pending_requests() as i64);
        self.metrics
            .pending_bytes
            .set(self.core.pending_bytes() as i64);
        self.host_busy();
        self.metrics.heartbeat_us.store(now_us(), Relaxed);
    }

    /// Whether this replica's host is short of CPU now, the wait it measured exported.
    pub(super) fn host_busy(&mut self) -> bool {
        let busy = self.contention.busy(Instant::now());
        self.metrics.cpu_wait.set(self.contention.last_fraction);
        busy
    }

    pub(super) fn status(&mut self) -> SignedStatus {
        let last = self.core.last_decided();
        let core = &self.core;
        let (digest_cid, digest) = self
            .status_digest
            .get(last, Instant::now(), || core.state_digest());
        let status = Status {
            id: self.core.id().0,
            view_id: self.view.id.0,
            n: self.view.n(),
            f: self.view.f,
            regency: self.core.regency().0,
            leader: self.core.leader().0,
            synchronizing: self.core.is_synchronizing(),
            last_decided: last.map(|c| c.0),
            state_digest: digest.to_string(),
            state_digest_cid: if digest_cid == last {
                None
            } else {
                digest_cid.map(|c| c.0)
            },
            pending_requests: self.core.pending_requests(),
            byzantine: self
                .adversary
                .as_ref()
                .map(|a| format!("{:?}", a.behaviour)),
            checkpoint_cid: self.core.latest_checkpoint().map(|c| c.cid.0),
            checkpoint_digest: self.core.latest_checkpoint().map(|c| c.digest.to_string()),
            durable_cid: self.durable_cid().map(|c| c.0),
            transferring: self.core.is_transferring(),
            member: self.view.contains(self.core.id()),
            accusations: self.accusations.recent(Instant::now()),
        };
        SignedStatus::sign(status, &self.key)
    }
}
