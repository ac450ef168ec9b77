//! Safety checks run on every simulated step: agreement (no two correct replicas decide
//! different batches for one CID), validity (every decided request was signed and issued by a
//! client), and identical service state at equal CIDs.

use std::collections::{BTreeMap, BTreeSet};

use kmmr_protocol::crypto::{self, Digest, Domain};
use kmmr_protocol::wire::codec::Encode;
use kmmr_protocol::wire::ids::Cid;
use kmmr_protocol::wire::messages::Batch;

#[derive(Debug, Default)]
pub struct Checker {
    decided: BTreeMap<Cid, (Digest, usize)>,
    states: BTreeMap<Cid, (Digest, usize)>,
    /// Digests of every signed request a client issued.
    pub issued: BTreeSet<Digest>,
    pub violations: Vec<String>,
}

impl Checker {
    pub fn violation(&mut self, v: String) {
        // One violation usually cascades; the first few tell the story.
        if self.violations.len() < 16 {
            self.violations.push(v);
        }
    }

    pub fn on_decided(&mut self, node: usize, cid: Cid, digest: Digest, batch: Option<&Batch>) {
        match self.decided.get(&cid) {
            Some((d, other)) if *d != digest => {
                let other = *other;
                self.violation(format!(
                    "agreement: cid {} decided as {} by node {other} and as {} by node {node}",
                    cid.0,
                    d.short(),
                    digest.short()
                ));
            }
            Some(_) => return,
            None => {
                self.decided.insert(cid, (digest, node));
            }
        }
        // Validity is a property of the value, checked once per instance.
        if let Some(batch) = batch {
            let bodies: Vec<Vec<u8>> = batch
                .requests
                .iter()
                .map(|r| r.request.to_bytes())
                .collect();
            let items: Vec<_> = batch
                .requests
                .iter()
                .zip(&bodies)
                .map(|(r, b)| (r.request.client, Domain::ClientRequest, &b[..], r.signature))
                .collect();
            if !crypto::verify_batch(&items) {
                self.violation(format!(
                    "validity: cid {} holds a request with a forged signature",
                    cid.0
                ));
            }
            if batch
                .requests
                .iter()
                .any(|r| !self.issued.contains(&r.digest()))
            {
                self.violation(format!(
                    "validity: cid {} holds a request no client issued",
                    cid.0
                ));
            }
        }
    }

    pub fn on_state(&mut self, node: usize, cid: Cid, digest: Digest) {
        match self.states.get(&cid) {
            Some((d, other)) if *d != digest => {
                let other = *other;
                self.violation(format!(
                    "state: after cid {} node {other} holds {} but node {node} holds {}",
                    cid.0,
                    d.short(),
                    digest.short()
                ));
            }
            Some(_) => {}
            None => {
                self.states.insert(cid, (digest, node));
            }
        }
    }

    /// The state digest correct replicas reached after `cid`, if one reported it.
    pub fn state_at(&self, cid: Cid) -> Option<Digest> {
        self.states.get(&cid).map(|(d, _)| *d)
    }

    pub fn highest_decided(&self) -> Option<Cid> {
        self.decided.keys().next_back().copied()
    }

    pub fn violate(&mut self, v: String) {
        self.violation(v);
    }
}
