//! From what each replica says (its verified `/status`, or why there is none) to
//! `BftCluster.status`: members, the f+1-agreed leader, view and state digest, the replicas that
//! diverge from it, and the conditions. Pure: the controller feeds it observations and the
//! previous status, and publishes an Event for every [`Transition`] it returns.
//!
//! A claim counts only when f+1 replicas make it: at most f of them lie, so f+1 matching claims
//! include one from a correct replica. Conditions keep their lastTransitionTime unless their
//! status changes, and nothing here reads the clock except through `now`, so a status computed
//! twice from the same observations is identical and writing it does not trigger anything.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kmmr_crds::{
    quorum_size, BftClusterStatus, MemberHealth, MemberProblem, MemberRole, MemberStatus,
    ReconcileError,
};

use crate::config::Membership;
use kmmr_client::status::{Probe, Status};

/// What the controller knows besides the replicas' answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// metadata.generation of the BftCluster.
    pub generation: Option<i64>,
    /// Reconciliation is paused (spec or annotation).
    pub paused: bool,
    /// The view differs from the spec. `None` when the view is what the spec asks for.
    pub reconfiguration: Option<Reconfiguration>,
    /// The operator changed the view in this pass: the change was decided, and members that
    /// still report an older view are installing it, not faulty.
    pub installing_view: bool,
}

/// The Reconfiguring condition while the view differs from the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconfiguration {
    /// Reconfiguring's status: True while the operator moves the view toward the spec, False
    /// when it cannot (disabled, blocked, paused).
    pub in_progress: bool,
    /// The condition's reason.
    pub reason: &'static str,
    pub message: String,
}

/// Something that changed and deserves an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Warning or Normal.
    pub warning: bool,
    /// The Event reason (a condition reason, or Member*).
    pub reason: String,
    /// The Event note.
    pub note: String,
}

/// What is wrong with a member, if anything, and whether it still counts as healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Problem {
    kind: MemberProblem,
    text: String,
    /// A note on a healthy member (a short leader change, a view being installed).
    healthy: bool,
}

/// Computes the status for `membership` from one probe per member (missing probes count as
/// unreachable), keeping what `previous` had where nothing changed.
pub fn compute(
    previous: Option<&BftClusterStatus>,
    membership: &Membership,
    probes: &BTreeMap<i32, Probe>,
    ctx: &Context,
    now: Time,
) -> (BftClusterStatus, Vec<Transition>) {
    let n = membership.members.len() as i32;
    let f = membership.f;
    let quorum = quorum_size(n, f);
    let unreachable = Probe::Unreachable("not probed".to_string());
    let reports: Vec<(i32, &Probe)> = membership
        .members
        .iter()
        .map(|id| (*id, probes.get(id).unwrap_or(&unreachable)))
        .collect();
    let verified: Vec<(i32, &Status)> = reports
        .iter()
        .filter_map(|(id, p)| match p {
            Probe::Verified(s) => Some((*id, s)),
            _ => None,
        })
        .collect();

    let accused = accusations(membership, &verified);
    let (agreed_state_digest, diverged) = divergence(f, &verified);
    let judge = Judge {
        membership,
        diverged: &diverged,
        accused: &accused,
        progress: progress(f, &verified),
        previous,
        installing_view: ctx.installing_view,
        now: &now,
    };
    let members: Vec<MemberStatus> = reports.iter().map(|(id, p)| judge.member(*id, p)).collect();
    // Evidence of misbehaviour rather than of a crash: f+1 replicas accuse it, its status does
    // not verify, or its own signed status admits to a Byzantine test mode.
    let misbehaving: Vec<i32> = reports
        .iter()
        .filter(|(id, p)| {
            accused.contains_key(id)
                || match p {
                    Probe::Rejected(_) => true,
                    Probe::Verified(s) => s.byzantine.is_some(),
                    Probe::Unreachable(_) => false,
                }
        })
        .map(|(id, _)| *id)
        .collect();
    let healthy = members
        .iter()
        .filter(|m| m.health == MemberHealth::Healthy)
        .count() as i32;
    let not_healthy: Vec<(i32, String)> = members
        .iter()
        .filter(|m| m.health != MemberHealth::Healthy)
        .map(|m| {
            let what = m.problem.as_deref().unwrap_or("not probed");
            (m.id, format!("replica {} ({what})", m.id))
        })
        .collect();
    let facts = conditions::Facts {
        n,
        f,
        quorum,
        healthy,
        diverged: &diverged,
        misbehaving: &misbehaving,
        not_healthy: &not_healthy,
    };
    let (conditions, starting, mut transitions) = conditions::compute(&facts, previous, ctx, &now);
    if !starting {
        transitions.extend(member_transitions(previous, &members, &not_healthy));
    }

    let status = BftClusterStatus {
        observed_generation: ctx.generation,
        n: Some(n),
        f: Some(f),
        healthy: Some(healthy),
        quorum: Some(quorum),
        leader: agreed(f, verified.iter().map(|(_, s)| i64::from(s.leader)))
            .and_then(|l| i32::try_from(l).ok()),
        view_id: agreed(f, verified.iter().map(|(_, s)| i64::from(s.view_id))),
        agreed_state_digest,
        diverged_replicas: diverged,
        members,
        conditions,
        last_error: None,
        // Set by the controller from the gateways' objects (`etcd_api::status`).
        etcd_api: None,
        // Set by the controller from the backup Jobs (`backup::observe`).
        backup: None,
    };
    (status, transitions)
}

/// `previous` with `status.lastError` saying what stopped a reconcile. The time is when
/// reconciles first failed for this reason, so that retries failing the same way leave the
/// status as it is.
pub fn with_error(
    previous: &BftClusterStatus,
    reason: &str,
    message: &str,
    now: Time,
) -> BftClusterStatus {
    let since = previous
        .last_error
        .as_ref()
        .filter(|e| e.reason == reason)
        .map_or(now, |e| e.since.clone());
    BftClusterStatus {
        last_error: Some(ReconcileError {
            reason: reason.to_string(),
            message: message.to_string(),
            since,
        }),
        ..previous.clone()
    }
}

/// Evidence from the replicas themselves: a member that more than f others caught, lately,
/// sending what no correct replica sends (forged signatures, equivocation, proofs unsound in the
/// view the accuser holds for them) is faulty, since at least one of its accusers is correct.
/// An accuser still fetching state or outside its view may judge by the wrong view: replicas do
/// not accuse then, and its word would not count here either. Gives the accused members and
/// what they were accused of.
fn accusations(membership: &Membership, verified: &[(i32, &Status)]) -> BTreeMap<i32, String> {
    let mut accusers: BTreeMap<i32, (Vec<i32>, u64, String)> = BTreeMap::new();
    for (id, s) in verified.iter().filter(|(_, s)| s.member && !s.transferring) {
        for a in &s.accusations {
            let Ok(target) = i32::try_from(a.replica) else {
                continue;
            };
            if target == *id || !membership.members.contains(&target) || a.count == 0 {
                continue;
            }
            let e = accusers.entry(target).or_default();
            if !e.0.contains(id) {
                e.0.push(*id);
            }
            e.1 += a.count;
            e.2.clone_from(&a.reason);
        }
    }
    accusers
        .into_iter()
        .filter(|(_, (by, _, _))| by.len() as i32 > membership.f)
        .map(|(id, (by, count, reason))| {
            (
                id,
                format!(
                    "accused by {} replicas {by:?}: {count} of its messages rejected as misbehaviour in the last minute (latest: {reason})",
                    by.len()
                ),
            )
        })
        .collect()
}

/// The state digest a replica reports is the one after an instance it names (its last decided
/// one, or an earlier one while a large state waits to be hashed again), so only reports of the
/// same instance are comparable. At each instance where f+1 agree, any other
/// digest is a diverged replica; the newest such instance gives the agreed digest shown.
fn divergence(f: i32, verified: &[(i32, &Status)]) -> (Option<String>, Vec<i32>) {
    let mut by_cid: BTreeMap<Option<u64>, BTreeMap<&str, Vec<i32>>> = BTreeMap::new();
    for (id, s) in verified {
        by_cid
            .entry(s.digest_cid())
            .or_default()
            .entry(s.state_digest.as_str())
            .or_default()
            .push(*id);
    }
    let mut agreed_state_digest = None;
    let mut diverged: Vec<i32> = Vec::new();
    for (cid, digests) in &by_cid {
        let Some((digest, _)) = digests.iter().find(|(_, ids)| ids.len() as i32 > f) else {
            continue;
        };
        if cid.is_some() {
            agreed_state_digest = Some(digest.to_string());
        }
        for (other, ids) in digests {
            if other != digest {
                diverged.extend(ids);
            }
        }
    }
    diverged.sort_unstable();
    (agreed_state_digest, diverged)
}

/// How far the cluster has decided: at least f+1 members (one of them correct) have decided
/// this far, so a member well behind it is still catching up, not a healthy voter.
fn progress(f: i32, verified: &[(i32, &Status)]) -> Option<u64> {
    let mut decided: Vec<u64> = verified
        .iter()
        .filter_map(|(_, s)| s.last_decided)
        .collect();
    decided.sort_unstable_by(|a, b| b.cmp(a));
    usize::try_from(f)
        .ok()
        .and_then(|i| decided.get(i).copied())
}

/// What the members' reports are judged against.
struct Judge<'a> {
    membership: &'a Membership,
    diverged: &'a [i32],
    accused: &'a BTreeMap<i32, String>,
    progress: Option<u64>,
    previous: Option<&'a BftClusterStatus>,
    installing_view: bool,
    now: &'a Time,
}

impl Judge<'_> {
    /// When this member's problem of `kind` was first seen, if the previous status already
    /// showed it: a problem keeps that time while its kind stays the same.
    fn seen_since(&self, id: i32, kind: MemberProblem) -> Option<&Time> {
        self.previous
            .and_then(|s| s.members.iter().find(|m| m.id == id))
            .filter(|m| m.problem_reason == Some(kind))
            .and_then(|m| m.problem_since.as_ref())
    }

    fn member(&self, id: i32, p: &Probe) -> MemberStatus {
        let problem = self.problem(id, p);
        let healthy = problem.as_ref().is_none_or(|p| p.healthy);
        let since = problem
            .as_ref()
            .map(|p| self.seen_since(id, p.kind).unwrap_or(self.now).clone());
        let (health, role, view_id, last_decided_cid, state_digest) = match p {
            Probe::Verified(s) => (
                if healthy {
                    MemberHealth::Healthy
                } else {
                    MemberHealth::Unhealthy
                },
                if s.leader == s.id {
                    MemberRole::Leader
                } else {
                    MemberRole::Follower
                },
                Some(i64::from(s.view_id)),
                s.last_decided.and_then(|c| i64::try_from(c).ok()),
                Some(s.state_digest.clone()),
            ),
            Probe::Rejected(_) => (
                MemberHealth::Unhealthy,
                MemberRole::Unknown,
                None,
                None,
                None,
            ),
            Probe::Unreachable(_) => (
                MemberHealth::Unreachable,
                MemberRole::Unknown,
                None,
                None,
                None,
            ),
        };
        MemberStatus {
            id,
            health,
            role,
            view_id,
            last_decided_cid,
            state_digest,
            problem_reason: problem.as_ref().map(|p| p.kind),
            problem: problem.map(|p| p.text),
            problem_since: since,
        }
    }

    fn problem(&self, id: i32, p: &Probe) -> Option<Problem> {
        let (kind, e) = match p {
            Probe::Verified(s) => return self.verified_problem(id, s),
            Probe::Rejected(e) => (MemberProblem::StatusRejected, e),
            Probe::Unreachable(e) => (MemberProblem::Unreachable, e),
        };
        let text = match self.accused.get(&id) {
            Some(a) => format!("{e}; {a}"),
            None => e.clone(),
        };
        Some(Problem {
            kind,
            text,
            healthy: false,
        })
    }

    /// What is wrong with a replica whose status checks out, if anything.
    fn verified_problem(&self, id: i32, s: &Status) -> Option<Problem> {
        let membership = self.membership;
        let (n, f) = (membership.members.len() as i64, i64::from(membership.f));
        let fault = |kind, text: String| {
            Some(Problem {
                kind,
                text,
                healthy: false,
            })
        };
        if self.diverged.contains(&id) {
            return fault(MemberProblem::StateDiverged, "state diverged".to_string());
        }
        if let Some(a) = self.accused.get(&id) {
            return fault(MemberProblem::Accused, a.clone());
        }
        if let Some(mode) = &s.byzantine {
            return fault(
                MemberProblem::ByzantineTestMode,
                format!("runs the Byzantine test mode {mode}"),
            );
        }
        let view_differs = i64::from(s.view_id) != membership.view_id;
        if view_differs || s.n as i64 != n || s.f as i64 != f {
            let text = format!(
                "reports view {} with n={} f={}, expected view {} with n={n} f={f}",
                s.view_id, s.n, s.f, membership.view_id
            );
            // The operator just changed the view (the change was decided), or did so lately and
            // this member has been installing it since: a member a view behind is catching up
            // with a decision it takes part in, for a short while.
            let installing_since = self
                .seen_since(id, MemberProblem::InstallingView)
                .map(|t| t.0)
                .or(self.installing_view.then_some(self.now.0));
            if let Some(since) = installing_since {
                if i64::from(s.view_id) < membership.view_id {
                    return Some(Problem {
                        kind: MemberProblem::InstallingView,
                        text: format!("installing view {}: {text}", membership.view_id),
                        healthy: self.now.0.duration_since(since) < VIEW_INSTALL_GRACE,
                    });
                }
            }
            return fault(MemberProblem::OtherView, text);
        }
        if !s.member {
            return fault(
                MemberProblem::NotAMember,
                "does not count itself a member of its view".to_string(),
            );
        }
        if s.transferring {
            return fault(
                MemberProblem::TransferringState,
                "fetching the state from the others (state transfer)".to_string(),
            );
        }
        if let Some(p) = self
            .progress
            .filter(|p| s.last_decided.is_none_or(|d| d + MAX_LAG < *p))
        {
            return fault(
                MemberProblem::CatchingUp,
                format!(
                    "catching up: decided up to {}, f+1 replicas up to {p}",
                    s.last_decided
                        .map_or_else(|| "nothing yet".to_string(), |d| d.to_string())
                ),
            );
        }
        if s.synchronizing {
            // A leader change is normal and short: a member in one stays Healthy, with the
            // leader change noted as its problem, and counts as unhealthy only once it has
            // lasted LEADER_CHANGE_GRACE, so the status does not flap on every leader change (a
            // restarted leader, a joiner arriving).
            let since = self
                .seen_since(id, MemberProblem::LeaderChange)
                .map_or(self.now.0, |t| t.0);
            return Some(Problem {
                kind: MemberProblem::LeaderChange,
                text: SYNCHRONIZING.to_string(),
                healthy: self.now.0.duration_since(since) < LEADER_CHANGE_GRACE,
            });
        }
        None
    }
}

/// Per-member Events when a member's health changed.
fn member_transitions(
    previous: Option<&BftClusterStatus>,
    members: &[MemberStatus],
    not_healthy: &[(i32, String)],
) -> Vec<Transition> {
    let prev_members: BTreeMap<i32, MemberHealth> = previous
        .map(|p| p.members.iter().map(|m| (m.id, m.health)).collect())
        .unwrap_or_default();
    members
        .iter()
        .filter(|m| prev_members.get(&m.id).is_some_and(|h| *h != m.health))
        .map(|m| {
            let detail = not_healthy
                .iter()
                .find(|(id, _)| *id == m.id)
                .map_or_else(|| format!("replica {}", m.id), |(_, d)| d.clone());
            Transition {
                warning: m.health != MemberHealth::Healthy,
                reason: format!("Member{:?}", m.health),
                note: format!("{detail} is now {:?}", m.health),
            }
        })
        .collect()
}

/// The newest view that more than f members of `membership` report, when it is newer than
/// `membership`'s own: proof (one of them is correct) that the recorded view is out of date.
pub fn agreed_newer_view(membership: &Membership, probes: &BTreeMap<i32, Probe>) -> Option<i64> {
    let mut newer: Vec<i64> = membership
        .members
        .iter()
        .filter_map(|id| match probes.get(id) {
            Some(Probe::Verified(s)) => Some(i64::from(s.view_id)),
            _ => None,
        })
        .filter(|v| *v > membership.view_id)
        .collect();
    // The (f+1)-th highest: at least f+1 members report this view or a newer one.
    newer.sort_unstable_by(|a, b| b.cmp(a));
    newer.get(usize::try_from(membership.f).ok()?).copied()
}

/// The problem of a member in a leader change.
const SYNCHRONIZING: &str = "in a leader change (synchronization phase)";

/// How long a member may stay in one leader change and still count as healthy: a leader change
/// after a crash takes a request timeout and a synchronization, a few seconds.
pub const LEADER_CHANGE_GRACE: jiff::SignedDuration = jiff::SignedDuration::from_secs(15);

/// How long a member may report the view before the one the operator just changed to and still
/// count as healthy: it executes the change in the same batch the others do, so this only
/// covers a member that is slow or briefly behind.
pub const VIEW_INSTALL_GRACE: jiff::SignedDuration = jiff::SignedDuration::from_secs(15);

/// How many instances a member may be behind the f+1-agreed progress and still count as caught
/// up: the probes of one pass are concurrent, not simultaneous, and replicas decide under load.
pub const MAX_LAG: u64 = 64;

/// The value more than f of `values` share, if any.
fn agreed(f: i32, values: impl Iterator<Item = i64>) -> Option<i64> {
    let mut counts: BTreeMap<i64, i32> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    // The most reported value (the newer on a tie): a member a view behind the others must not
    // outvote them merely by sorting first.
    counts
        .into_iter()
        .filter(|(_, c)| *c > f)
        .max_by_key(|(v, c)| (*c, *v))
        .map(|(v, _)| v)
}

mod conditions;

#[cfg(test)]
mod tests;
