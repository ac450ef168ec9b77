//! The simulated admin: the operator's role in reconfiguration. It sends one signed view change
//! at a time, waits for f+1 matching outcomes, and starts a joining replica with the view that
//! names it (or, to race the change, before the change is decided).

use kmmr_client::session::{ClientSession, Completion};
use kmmr_protocol::core::reconfig::{self, ReconfigOutcome, ReconfigRequest, ViewChange};
use kmmr_protocol::crypto::KeyPair;
use kmmr_protocol::view::View;
use kmmr_protocol::wire::codec::{Decode, Encode};
use kmmr_protocol::wire::ids::ReplicaId;
use kmmr_protocol::wire::messages::RequestKind;

/// One membership change, by node index (spares are the nodes after the initial view).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimChange {
    Add { node: usize },
    Remove { node: usize },
    SetF { f: u32 },
}

/// A change and the earliest time it is sent. `early_join` starts a joiner as soon as the
/// request is sent, racing the change.
#[derive(Debug, Clone)]
pub struct ReconfigStep {
    pub at_us: u64,
    pub change: SimChange,
    pub early_join: bool,
}

/// What the world must do after an admin event.
#[derive(Debug)]
pub enum AdminAction {
    /// Start replica `node` with this view.
    Start { node: usize, view: View },
}

#[derive(Debug)]
pub struct SimAdmin {
    pub session: ClientSession,
    steps: Vec<ReconfigStep>,
    next: usize,
    in_flight: Option<(u64, ReconfigStep)>,
    pub installed: Vec<View>,
    pub refusals: Vec<String>,
}

impl SimAdmin {
    pub fn new(key: KeyPair, view: View, steps: Vec<ReconfigStep>, retransmit_us: u64) -> Self {
        SimAdmin {
            session: ClientSession::new(key, 1, view, retransmit_us),
            steps,
            next: 0,
            in_flight: None,
            installed: Vec::new(),
            refusals: Vec::new(),
        }
    }

    pub fn done(&self) -> bool {
        self.next >= self.steps.len() && self.in_flight.is_none()
    }

    /// When the next step may be sent, if one is waiting.
    pub fn next_start(&self) -> Option<u64> {
        if self.in_flight.is_some() {
            return None;
        }
        self.steps.get(self.next).map(|s| s.at_us)
    }

    /// Sends the next change if its time has come.
    pub fn start_next(
        &mut self,
        now: u64,
        member_of: impl Fn(usize) -> (ReplicaId, kmmr_protocol::view::Member),
    ) -> Vec<AdminAction> {
        let Some(step) = self.steps.get(self.next).cloned() else {
            return Vec::new();
        };
        if self.in_flight.is_some() || now < step.at_us {
            return Vec::new();
        }
        self.next += 1;
        let view = self.session.view().clone();
        let change = match step.change {
            SimChange::Add { node } => ViewChange::Add {
                member: member_of(node).1,
                f: None,
            },
            SimChange::Remove { node } => ViewChange::Remove {
                id: member_of(node).0,
                f: None,
            },
            SimChange::SetF { f } => ViewChange::SetF { f },
        };
        let req = ReconfigRequest {
            view: view.id,
            change,
        };
        let mut actions = Vec::new();
        if let (SimChange::Add { node }, true) = (&step.change, step.early_join) {
            // The view the change will install: deterministic, so the joiner can have it early.
            if let Ok(v) = reconfig::apply(&view, &req) {
                actions.push(AdminAction::Start {
                    node: *node,
                    view: v,
                });
            }
        }
        let seq = self
            .session
            .invoke(now, RequestKind::Reconfig, req.to_bytes());
        self.in_flight = Some((seq, step));
        actions
    }

    pub fn on_completion(&mut self, c: Completion) -> Result<Vec<AdminAction>, String> {
        let Some((seq, step)) = self.in_flight.take() else {
            return Ok(Vec::new());
        };
        if c.sequence != seq {
            self.in_flight = Some((seq, step));
            return Ok(Vec::new());
        }
        let bytes = c
            .result
            .map_err(|e| format!("reconfiguration {step:?} rejected: {e:?}"))?;
        match ReconfigOutcome::from_bytes(&bytes) {
            Ok(ReconfigOutcome::Installed(v)) => {
                self.session.install_view(v.clone());
                self.installed.push(v.clone());
                match step.change {
                    SimChange::Add { node } if !step.early_join => {
                        Ok(vec![AdminAction::Start { node, view: v }])
                    }
                    _ => Ok(Vec::new()),
                }
            }
            Ok(ReconfigOutcome::Refused(why)) => {
                self.refusals.push(why.clone());
                Err(format!("reconfiguration {step:?} refused: {why}"))
            }
            Err(e) => Err(format!("undecodable reconfiguration outcome: {e}")),
        }
    }
}
