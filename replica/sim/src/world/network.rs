//! The simulated network: where a frame goes (partitions, scripted drops, Byzantine routes),
//! and when it arrives (delay, loss before GST, duplication).

use super::*;

impl World<'_> {
    pub(super) fn route(&mut self, from: usize, f: Frame) {
        match f.dest {
            Dest::Client(key)
                if self
                    .admin
                    .as_ref()
                    .is_some_and(|a| a.session.key().public() == key) =>
            {
                self.transmit(
                    Endpoint::Node(from),
                    Endpoint::Admin,
                    f.bytes,
                    f.extra_delay_us,
                );
            }
            Dest::Client(key) => {
                if let Some(c) = self
                    .clients
                    .iter()
                    .position(|c| c.session.key().public() == key)
                {
                    self.transmit(
                        Endpoint::Node(from),
                        Endpoint::Client(c),
                        f.bytes,
                        f.extra_delay_us,
                    );
                }
            }
            Dest::Replica(id) => {
                for j in 0..self.nodes.len() {
                    if self.nodes[j].id == id && j != from {
                        self.transmit(
                            Endpoint::Node(from),
                            Endpoint::Node(j),
                            f.bytes.clone(),
                            f.extra_delay_us,
                        );
                    }
                }
            }
            Dest::Nowhere => {}
            Dest::AllReplicas => {
                let me = self.nodes[from].id;
                for j in 0..self.nodes.len() {
                    if self.nodes[j].id != me {
                        self.transmit(
                            Endpoint::Node(from),
                            Endpoint::Node(j),
                            f.bytes.clone(),
                            f.extra_delay_us,
                        );
                    }
                }
            }
        }
    }

    /// Which side of partition `p` a node is on; a twin copy sits opposite its original.
    pub(super) fn side_b(&self, node: usize, p: &crate::config::Partition) -> bool {
        match self.nodes[node].twin_of {
            Some(orig) => !p.side_b.contains(&orig),
            None => p.side_b.contains(&node),
        }
    }

    pub(super) fn transmit(&mut self, from: Endpoint, to: Endpoint, bytes: Vec<u8>, extra: u64) {
        let now = self.now;
        if let (Endpoint::Node(a), Endpoint::Node(b)) = (from, to) {
            let cut = self.cfg.partitions.iter().any(|p| {
                now >= p.from_us && now < p.until_us && self.side_b(a, p) != self.side_b(b, p)
            });
            if cut || self.scripted_drop(a, b, &bytes) {
                return;
            }
        }
        if let (Endpoint::Client(c), Endpoint::Node(b)) = (from, to) {
            if self.client_request_dropped(c, b) {
                return;
            }
        }
        let net = &self.cfg.net;
        if now < self.cfg.gst_us
            && net.loss_before_gst > 0.0
            && self.rng.gen_bool(net.loss_before_gst)
        {
            return;
        }
        let copies = if net.duplicate_prob > 0.0 && self.rng.gen_bool(net.duplicate_prob) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self
                .rng
                .gen_range(net.min_delay_us..=net.max_delay_us.max(net.min_delay_us));
            self.schedule(
                now + delay + extra,
                Ev::Frame {
                    to,
                    from,
                    bytes: bytes.clone(),
                },
            );
        }
    }

    /// Whether a "request" drop rule cuts clients off from node `to` now, or a
    /// "client_request" rule client `client` alone.
    fn client_request_dropped(&self, client: usize, to: usize) -> bool {
        let now = self.now;
        self.cfg.drops.iter().any(|r| {
            ((r.kind == "request" && r.from.is_none())
                || (r.kind == "client_request" && r.from == Some(client)))
                && r.to.is_none_or(|t| t == to)
                && now >= r.from_us
                && now < r.until_us
        })
    }

    pub(super) fn scripted_drop(&self, from: usize, to: usize, bytes: &[u8]) -> bool {
        let now = self.now;
        let mut rules = self.cfg.drops.iter().filter(|r| {
            now >= r.from_us
                && now < r.until_us
                && r.from.is_none_or(|f| f == from)
                && r.to.is_none_or(|t| t == to)
        });
        rules.any(|r| {
            r.kind == "any" || ReplicaMessage::from_bytes(bytes).is_ok_and(|m| m.kind() == r.kind)
        })
    }
}
