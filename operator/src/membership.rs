//! Moving the view toward spec.replicas and spec.f: which single step comes next ([`plan`], pure)
//! and who carries it out (a [`Reconfigurer`]).
//!
//! The protocol's view, not the pod count, is the membership: a replica joins or leaves only
//! through an admin-signed reconfiguration that the replicas order, and only then does the
//! controller create or delete its StatefulSet. The replica side of that (admin requests) is not
//! available yet, so the only `Reconfigurer` today, [`NotSupported`], refuses every step and the
//! controller reports that nothing was applied. Plugging in the real one changes nothing else.

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

/// The next step, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The view is what the spec asks for.
    InSync,
    /// This step comes next.
    Next(Step),
    /// A step is needed but would be unsafe now: (condition reason, message).
    Blocked(&'static str, String),
}

/// Decides the next step from the current view, the target and which members are healthy.
/// Scale-out adds the lowest unused id above every member; scale-in removes the highest id, an
/// unhealthy one first. A step is only taken when the view after it still has a quorum of
/// healthy replicas, counting a joining replica as not yet healthy.
pub fn plan(current: &Membership, target: Target, healthy: &[i32]) -> Plan {
    let n = current.members.len() as i32;
    let healthy_members = current
        .members
        .iter()
        .filter(|id| healthy.contains(id))
        .count() as i32;
    let step = if target.replicas > n {
        let next = current.members.iter().max().map_or(0, |m| m + 1);
        Step::Join(next)
    } else if target.replicas < n {
        let leaving = current
            .members
            .iter()
            .rev()
            .find(|id| !healthy.contains(id))
            .or_else(|| current.members.iter().max())
            .copied()
            .unwrap_or_default();
        Step::Leave(leaving)
    } else if target.f != current.f {
        Step::SetF(target.f)
    } else {
        return Plan::InSync;
    };
    let (n_after, f_after, healthy_after) = match &step {
        Step::Join(_) => (n + 1, current.f, healthy_members),
        Step::Leave(id) => (
            n - 1,
            current.f.min(kmmr_crds::max_f(n - 1)),
            healthy_members - i32::from(healthy.contains(id)),
        ),
        Step::SetF(f) => (n, *f, healthy_members),
    };
    let needed = quorum_size(n_after, f_after);
    if healthy_after < needed {
        return Plan::Blocked(
            reason::RECONFIGURATION_BLOCKED,
            format!(
                "{step:?} would leave {healthy_after} healthy replicas where the new view needs {needed}: waiting until more replicas are healthy"
            ),
        );
    }
    Plan::Next(step)
}

/// Why a step was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconfigError {
    /// This operator cannot reconfigure the view at all (yet).
    #[error("{0}")]
    NotSupported(String),
    /// The replicas did not accept or order the request.
    #[error("the replicas did not apply the reconfiguration: {0}")]
    Rejected(String),
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
    ) -> BoxFuture<'a, Result<Membership, ReconfigError>>;
}

/// A `Reconfigurer` that refuses every step (`--no-reconfiguration`, and tests of the refusal
/// path), with a message saying so; nothing changes.
pub struct NotSupported;

impl Reconfigurer for NotSupported {
    fn unsupported(&self, current: &Membership, target: Target) -> Option<String> {
        Some(format!(
            "the spec asks for {} replicas with f = {}, but this operator runs with reconfiguration disabled (--no-reconfiguration); nothing was changed and the cluster keeps its view of {} replicas with f = {}. Set spec.replicas and spec.f back to match to clear this",
            target.replicas,
            target.f,
            current.members.len(),
            current.f
        ))
    }

    fn apply<'a>(
        &'a self,
        _view_toml: &'a str,
        step: &'a Step,
        _joining: Option<&'a Joining>,
        _admin: &'a ed25519_dalek::SigningKey,
    ) -> BoxFuture<'a, Result<Membership, ReconfigError>> {
        let what = match step {
            Step::Join(id) => format!("adding replica {id}"),
            Step::Leave(id) => format!("removing replica {id}"),
            Step::SetF(new_f) => format!("changing f to {new_f}"),
        };
        Box::pin(async move {
            Err(ReconfigError::NotSupported(format!(
                "the spec asks for a view change ({what}), but reconfiguration is disabled (--no-reconfiguration); nothing was changed"
            )))
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
        // Adding to a cluster without a healthy quorum is refused too.
        let t = Target { replicas: 5, f: 1 };
        assert!(matches!(
            plan(&view(&[0, 1, 2, 3], 1), t, &[0, 1]),
            Plan::Blocked(..)
        ));
    }

    #[test]
    fn f_changes_after_membership() {
        let t = Target { replicas: 7, f: 2 };
        let all: Vec<i32> = (0..7).collect();
        assert_eq!(plan(&view(&all, 1), t, &all), Plan::Next(Step::SetF(2)));
    }

    #[tokio::test]
    async fn the_current_reconfigurer_refuses_and_says_nothing_changed() {
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
