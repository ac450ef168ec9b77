//! Moving the view toward spec.replicas and spec.f: which single step comes next ([`plan`], pure)
//! and who carries it out (a [`Reconfigurer`]).
//!
//! The protocol's view, not the pod count, is the membership: a replica joins or leaves only
//! through an admin-signed reconfiguration that the replicas order, and only then does the
//! controller create or delete its StatefulSet. [`crate::admin::ThroughAdmin`] does that with
//! `kmmr_client::admin`; [`NotSupported`] (`--no-reconfiguration`) refuses every step.
//!
//! The answer to a view change can be lost (a timeout, the operator restarting), so the view the
//! controller wrote down is only a hint: [`Reconfigurer::current_view`] asks the replicas which
//! view they run, and the controller follows that.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use kmmr_crds::{condition_reasons as reason, quorum_size};

use crate::config::Membership;

/// A boxed future, so that a `Reconfigurer` can be held as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the spec asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// spec.replicas.
    pub replicas: i32,
    /// spec.f, or its default.
    pub f: i32,
}

/// One reconfiguration: the protocol changes one member (or f) per view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Add a replica with this (new, never used) id.
    Join(i32),
    /// Remove the replica with this id.
    Leave(i32),
    /// Change f, keeping the members.
    SetF(i32),
}

impl std::fmt::Display for Step {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Join(id) => write!(out, "adding replica {id}"),
            Step::Leave(id) => write!(out, "removing replica {id}"),
            Step::SetF(f) => write!(out, "changing f to {f}"),
        }
    }
}

/// The next step, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The view is what the spec asks for.
    InSync,
    /// This step comes next.
    Next(Step),
    /// A step is needed and safe once the view settles (a joiner catching up, a pod
    /// restarting): why it waits.
    Wait(String),
    /// A step is needed but would be unsafe now: (condition reason, message).
    Blocked(&'static str, String),
}

/// Decides the next step from the current view, the target and which members are healthy.
///
/// Scale-out adds the lowest unused id above every member; scale-in removes the highest id, an
/// unhealthy one first. A join or an f change waits until every member is healthy, so that a
/// joiner has caught up before the next one comes and no step starts from a weakened view. A
/// removal only needs the view after it to keep a quorum of healthy replicas (removing an
/// unhealthy member is how a broken cluster shrinks back to health).
pub fn plan(current: &Membership, target: Target, healthy: &[i32]) -> Plan {
    let n = current.members.len() as i32;
    let is_healthy = |id: &i32| healthy.contains(id);
    let healthy_members = current.members.iter().filter(|id| is_healthy(id)).count() as i32;
    let step = if target.replicas > n {
        let next = current.members.iter().max().map_or(0, |m| m + 1);
        Step::Join(next)
    } else if target.replicas < n {
        let leaving = current
            .members
            .iter()
            .rev()
            .find(|id| !is_healthy(id))
            .or_else(|| current.members.iter().max())
            .copied()
            .unwrap_or_default();
        Step::Leave(leaving)
    } else if target.f != current.f {
        Step::SetF(target.f)
    } else {
        return Plan::InSync;
    };
    let unhealthy: Vec<i32> = current
        .members
        .iter()
        .copied()
        .filter(|id| !is_healthy(id))
        .collect();
    if !matches!(step, Step::Leave(_)) && !unhealthy.is_empty() {
        return Plan::Wait(format!(
            "{step} is next, once every member is healthy; not healthy now: {unhealthy:?} (a joiner still catching up, a restarting pod, or a faulty replica: scale in to remove a replica that stays unhealthy)"
        ));
    }
    let (n_after, f_after, healthy_after) = match &step {
        Step::Join(_) => (n + 1, current.f, healthy_members),
        Step::Leave(id) => (
            n - 1,
            current.f.min(kmmr_crds::max_f(n - 1)),
            healthy_members - i32::from(is_healthy(id)),
        ),
        Step::SetF(f) => (n, *f, healthy_members),
    };
    let needed = quorum_size(n_after, f_after);
    if healthy_after < needed {
        return Plan::Blocked(
            reason::RECONFIGURATION_BLOCKED,
            format!(
                "{step} would leave {healthy_after} healthy replicas where the new view needs {needed}: waiting until more replicas are healthy"
            ),
        );
    }
    Plan::Next(step)
}

/// A view as the replicas installed it: its members, f and id, and each member's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledView {
    /// Members, view id and f.
    pub membership: Membership,
    /// Each member's public key, hex, as the view lists it.
    pub keys: BTreeMap<i32, String>,
}

/// Why a step was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconfigError {
    /// This operator does not reconfigure the view (`--no-reconfiguration`).
    #[error("{0}")]
    NotSupported(String),
    /// The replicas agreed to refuse the change; the view is unchanged.
    #[error("the replicas refused the change: {0}")]
    Refused(String),
    /// No agreed answer: the change may or may not be installed. The next pass asks the
    /// replicas which view they run before doing anything else.
    #[error("no agreed answer from the replicas ({0}); the change may or may not be installed, and the next pass reads the installed view back from them")]
    Unknown(String),
}

/// Where a joining replica will listen and the public half of its (already stored) key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joining {
    /// Its address in the view.
    pub address: String,
    /// Its public key, hex.
    pub public_key: String,
}

/// Carries out one step through the protocol and returns the view installed by it.
pub trait Reconfigurer: Send + Sync {
    /// Why this reconfigurer can never move `current` toward `target`, whatever the replicas'
    /// health; `None` when it can try. Checked before [`plan`]'s safety rules, so that a user is
    /// told a change is unsupported rather than waiting for a health that would not help.
    fn unsupported(&self, _current: &Membership, _target: Target) -> Option<String> {
        None
    }

    /// Sends the admin-signed request for `step` to the members of the current view (the
    /// `view.toml` the replicas read) and waits until they install the new view.
    fn apply<'a>(
        &'a self,
        view_toml: &'a str,
        step: &'a Step,
        joining: Option<&'a Joining>,
        admin: &'a ed25519_dalek::SigningKey,
    ) -> BoxFuture<'a, Result<InstalledView, ReconfigError>>;

    /// The view the replicas run now, starting from `view_toml` (a view they ran at some point)
    /// and following the newer views f+1 of them vouch for.
    fn current_view<'a>(
        &'a self,
        view_toml: &'a str,
        admin: &'a ed25519_dalek::SigningKey,
    ) -> BoxFuture<'a, Result<InstalledView, ReconfigError>>;
}

/// A `Reconfigurer` that refuses every step (`--no-reconfiguration`, and tests of the refusal
/// path), with a message saying so; nothing changes.
pub struct NotSupported;

impl NotSupported {
    fn message(what: &str) -> String {
        format!("the spec asks for {what}, but this operator runs with reconfiguration disabled (--no-reconfiguration, or the chart's reconfiguration.enabled=false); nothing was changed. Enable it, or set spec.replicas and spec.f back to match the view to clear this")
    }
}

impl Reconfigurer for NotSupported {
    fn unsupported(&self, current: &Membership, target: Target) -> Option<String> {
        Some(Self::message(&format!(
            "{} replicas with f = {} while the view has {} with f = {}",
            target.replicas,
            target.f,
            current.members.len(),
            current.f
        )))
    }

    fn apply<'a>(
        &'a self,
        _view_toml: &'a str,
        step: &'a Step,
        _joining: Option<&'a Joining>,
        _admin: &'a ed25519_dalek::SigningKey,
    ) -> BoxFuture<'a, Result<InstalledView, ReconfigError>> {
        Box::pin(async move {
            Err(ReconfigError::NotSupported(Self::message(&format!(
                "a view change ({step})"
            ))))
        })
    }

    fn current_view<'a>(
        &'a self,
        _view_toml: &'a str,
        _admin: &'a ed25519_dalek::SigningKey,
    ) -> BoxFuture<'a, Result<InstalledView, ReconfigError>> {
        Box::pin(async move {
            Err(ReconfigError::NotSupported(
                "reconfiguration is disabled: the operator does not talk to the replicas as their admin".to_string(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(members: &[i32], f: i32) -> Membership {
        Membership {
            view_id: 3,
            f,
            members: members.to_vec(),
        }
    }

    #[test]
    fn a_view_matching_the_spec_needs_nothing() {
        let t = Target { replicas: 4, f: 1 };
        assert_eq!(
            plan(&view(&[0, 1, 2, 3], 1), t, &[0, 1, 2, 3]),
            Plan::InSync
        );
    }

    #[test]
    fn scale_out_adds_one_new_id_at_a_time() {
        let t = Target { replicas: 7, f: 1 };
        assert_eq!(
            plan(&view(&[0, 1, 3, 4], 1), t, &[0, 1, 3, 4]),
            Plan::Next(Step::Join(5))
        );
    }

    #[test]
    fn the_next_join_waits_for_the_previous_joiner() {
        let t = Target { replicas: 7, f: 2 };
        let got = plan(&view(&[0, 1, 2, 3, 4], 1), t, &[0, 1, 2, 3]);
        assert!(
            matches!(&got, Plan::Wait(m) if m.contains("[4]") && m.contains("adding replica 5")),
            "{got:?}"
        );
        // And so does an f change.
        let all: Vec<i32> = (0..7).collect();
        assert!(matches!(plan(&view(&all, 1), t, &all[..6]), Plan::Wait(_)));
    }

    #[test]
    fn scale_in_removes_an_unhealthy_member_first() {
        let t = Target { replicas: 4, f: 1 };
        let v = view(&[0, 1, 2, 3, 4], 1);
        assert_eq!(plan(&v, t, &[0, 1, 2, 3, 4]), Plan::Next(Step::Leave(4)));
        assert_eq!(plan(&v, t, &[0, 1, 3, 4]), Plan::Next(Step::Leave(2)));
    }

    #[test]
    fn a_step_that_would_break_the_quorum_is_blocked() {
        // 5 members, 2 healthy: even removing an unhealthy one leaves 2 where 3 are needed.
        let t = Target { replicas: 4, f: 1 };
        let got = plan(&view(&[0, 1, 2, 3, 4], 1), t, &[0, 1]);
        assert!(
            matches!(got, Plan::Blocked(reason::RECONFIGURATION_BLOCKED, _)),
            "{got:?}"
        );
        // Adding to a cluster with unhealthy members waits for them.
        let t = Target { replicas: 5, f: 1 };
        assert!(matches!(
            plan(&view(&[0, 1, 2, 3], 1), t, &[0, 1]),
            Plan::Wait(..)
        ));
        // 7 members (f = 2) with 4 and 5 down: the highest unhealthy one leaves first, and the
        // 5 healthy of the 6 left exceed the 4 that n = 6, f = 1 needs.
        let t = Target { replicas: 6, f: 1 };
        let v = view(&[0, 1, 2, 3, 4, 5, 6], 2);
        assert_eq!(plan(&v, t, &[0, 1, 2, 3, 6]), Plan::Next(Step::Leave(5)));
        // 5 members with 3 down: removing one of them leaves 2 healthy of 4, 3 needed.
        let t = Target { replicas: 4, f: 1 };
        assert!(matches!(
            plan(&view(&[0, 1, 2, 3, 4], 1), t, &[0, 1]),
            Plan::Blocked(..)
        ));
    }

    #[test]
    fn scaling_4_to_7_and_back_is_seven_single_steps() {
        // Walk the plan as the controller does, each step installed and every member healthy.
        let mut v = view(&[0, 1, 2, 3], 1);
        let mut steps = Vec::new();
        for target in [Target { replicas: 7, f: 2 }, Target { replicas: 4, f: 1 }] {
            loop {
                let healthy = v.members.clone();
                match plan(&v, target, &healthy) {
                    Plan::InSync => break,
                    Plan::Blocked(_, m) | Plan::Wait(m) => panic!("stuck: {m}"),
                    Plan::Next(step) => {
                        match &step {
                            Step::Join(id) => v.members.push(*id),
                            Step::Leave(id) => {
                                v.members.retain(|m| m != id);
                                v.f = v.f.min(kmmr_crds::max_f(v.members.len() as i32));
                            }
                            Step::SetF(f) => v.f = *f,
                        }
                        v.view_id += 1;
                        steps.push(step);
                    }
                }
                assert!(steps.len() < 20, "no convergence: {steps:?}");
            }
        }
        use Step::*;
        assert_eq!(
            steps,
            [
                Join(4),
                Join(5),
                Join(6),
                SetF(2),
                Leave(6),
                Leave(5),
                Leave(4)
            ]
        );
        assert_eq!((v.members, v.f), (vec![0, 1, 2, 3], 1));
    }

    #[test]
    fn f_changes_after_membership() {
        let t = Target { replicas: 7, f: 2 };
        let all: Vec<i32> = (0..7).collect();
        assert_eq!(plan(&view(&all, 1), t, &all), Plan::Next(Step::SetF(2)));
    }

    #[tokio::test]
    async fn a_disabled_reconfigurer_refuses_and_says_nothing_changed() {
        let admin = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let err = NotSupported
            .apply("", &Step::Join(4), None, &admin)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("adding replica 4") && msg.contains("nothing was changed"),
            "{msg}"
        );
    }
}
