//! The end of a run: the checks over what every replica and client did, and the report.

use super::*;

impl World<'_> {
    pub(super) fn finish(mut self) -> SimReport {
        let (now, gst) = (self.now, self.cfg.gst_us);
        if let Some((node, _)) = self.cfg.diverge {
            let r = &self.nodes[node].replica;
            let repaired = r
                .last_decided()
                .and_then(|cid| self.checker.state_at(cid).map(|d| d == r.state_digest()));
            if repaired != Some(true) {
                self.checker.violate(format!(
                    "node {node} diverged and did not repair itself: at {:?} its state is {} (others: {:?})",
                    r.last_decided(),
                    r.state_digest().short(),
                    r.last_decided().and_then(|c| self.checker.state_at(c)).map(|d| d.short())
                ));
            }
        }
        if let Some(a) = self.admin.as_ref().filter(|a| !a.done()) {
            self.checker.violate(format!(
                "liveness: reconfiguration unfinished at {} ms ({} of {} views installed)",
                self.now / 1000,
                a.installed.len(),
                self.cfg.reconfigs.len()
            ));
        }
        let done = self.clients.iter().all(|c| c.done(now, gst));
        if !done {
            let pending: usize = self
                .clients
                .iter()
                .map(|c| c.issued().max(self.cfg.ops_per_client) - c.completed)
                .sum();
            self.checker.violate(format!(
                "liveness: {pending} operations unfinished at {} ms (GST {} ms)",
                self.now / 1000,
                self.cfg.gst_us / 1000
            ));
        }
        if self.cfg.service == ServiceKind::Kv {
            let history: Vec<_> = self
                .clients
                .iter()
                .flat_map(|c| c.history.iter().cloned())
                .collect();
            match linearizability::check(&history) {
                CheckResult::Linearizable => {}
                CheckResult::NotLinearizable(v) => self.checker.violate(format!(
                    "linearizability: key {:?}: {}",
                    String::from_utf8_lossy(&v.key),
                    v.explanation
                )),
                other => self
                    .checker
                    .violate(format!("linearizability check inconclusive: {other:?}")),
            }
        }
        self.report.violations = std::mem::take(&mut self.checker.violations);
        self.report.decided = self.checker.highest_decided().map_or(0, |c| c.0 + 1);
        self.report.ops_completed = self.clients.iter().map(|c| c.completed).sum();
        self.report.overtaken_reissued = self.clients.iter().map(|c| c.session.overtaken()).sum();
        self.report.ops_total = self
            .clients
            .iter()
            .map(|c| c.issued().max(self.cfg.ops_per_client))
            .sum();
        self.report.end_time_us = self.now;
        self.report.node_summaries = self
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "{:?}{}: regency {} synchronizing {} pending {} last {:?} next deadline {:?} down {}",
                    n.id,
                    if n.faulty { " (faulty)" } else { "" },
                    n.replica.regency().0,
                    n.replica.is_synchronizing(),
                    n.replica.pending_requests(),
                    n.replica.last_decided(),
                    n.replica.next_deadline(),
                    n.down
                )
            })
            .collect();
        for c in &self.clients {
            if c.session.in_flight() > 0 {
                self.report.node_summaries.push(format!(
                    "client {}: view {} completed {}: {:?}",
                    c.index,
                    c.session.view().id.0,
                    c.completed,
                    c.session.describe_in_flight()
                ));
            }
        }
        self.report.node_last_decided = self
            .nodes
            .iter()
            .map(|n| n.replica.last_decided().map(|c| c.0))
            .collect();
        self.report.max_regency = self
            .nodes
            .iter()
            .map(|n| n.replica.regency().0)
            .max()
            .unwrap_or(0);
        let total = |count: fn(&kmmr_protocol::core::replica::Stats) -> u64| -> u64 {
            self.nodes.iter().map(|n| count(n.replica.stats())).sum()
        };
        self.report.state_transfers = total(|s| s.state_transfers);
        self.report.checkpoints = total(|s| s.checkpoints);
        self.report.views_installed = total(|s| s.views_installed);
        self.report.executed_requests = self
            .nodes
            .iter()
            .map(|n| n.replica.stats().executed_requests)
            .max()
            .unwrap_or(0);
        self.report
    }
}

pub(super) fn describe_faults(cfg: &SimConfig) -> String {
    let mut parts = Vec::new();
    for (i, b) in cfg.behaviours.iter().enumerate().take(cfg.n) {
        if *b != Behaviour::Correct {
            parts.push(format!("r{i}:{b:?}"));
        }
    }
    for t in &cfg.twins {
        parts.push(format!("r{t}:Twins"));
    }
    for c in &cfg.crashes {
        parts.push(format!(
            "r{}:{}[{}..{}ms]",
            c.node,
            match (c.amnesia, c.disk, c.at_promise) {
                (false, _, _) => "pause",
                (true, true, false) => "restart from disk",
                (true, true, true) => "restart from disk, crash during a promise write",
                (true, false, _) => "disk loss",
            },
            c.from_us / 1000,
            c.until_us / 1000
        ));
    }
    if !cfg.partitions.is_empty() {
        parts.push(format!("{} partitions", cfg.partitions.len()));
    }
    if !cfg.busy_hosts.is_empty() {
        parts.push(format!("busy hosts {:?}", cfg.busy_hosts));
    }
    for r in &cfg.reconfigs {
        parts.push(format!(
            "{:?}{}@{}ms",
            r.change,
            if r.early_join { " (joiner early)" } else { "" },
            r.at_us / 1000
        ));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// One line for a replica message in a trace: its kind and what identifies its vote.
pub(super) fn trace_message(m: &ReplicaMessage) -> String {
    match m {
        ReplicaMessage::Propose { cid, epoch, batch } => format!(
            "propose cid {} epoch {} {} ({} requests)",
            cid.0,
            epoch.0,
            batch.digest().short(),
            batch.requests.len()
        ),
        ReplicaMessage::Write {
            cid, epoch, digest, ..
        } => {
            format!("write cid {} epoch {} {}", cid.0, epoch.0, digest.short())
        }
        ReplicaMessage::Accept {
            cid, epoch, digest, ..
        } => format!("accept cid {} epoch {} {}", cid.0, epoch.0, digest.short()),
        ReplicaMessage::Stop { regency, .. } => format!("stop regency {}", regency.0),
        ReplicaMessage::StopData {
            regency, collect, ..
        } => format!("stopdata regency {} {:?}", regency.0, collect.collect),
        ReplicaMessage::Sync {
            regency,
            last,
            batch,
            ..
        } => format!(
            "sync regency {} last {:?} batch {}",
            regency.0,
            last.as_ref().map(|d| d.cid.0),
            batch.digest().short()
        ),
        ReplicaMessage::Decided(d) => format!(
            "decided cid {} epoch {} {}",
            d.cid.0,
            d.proof.epoch.0,
            d.batch.digest().short()
        ),
        ReplicaMessage::DecisionRequest { from } => format!("decision request from {}", from.0),
        other => other.kind().to_string(),
    }
}
