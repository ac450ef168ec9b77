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

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kmmr_crds::{
    condition_reasons as reason, condition_types as kind, quorum_size, BftClusterStatus,
    MemberHealth, MemberRole, MemberStatus,
};

use crate::config::Membership;
use crate::probe::Probe;

/// What the controller knows besides the replicas' answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// metadata.generation of the BftCluster.
    pub generation: Option<i64>,
    /// Reconciliation is paused (spec or annotation).
    pub paused: bool,
    /// The view differs from the spec and the change is not being made: (reason, message).
    pub reconfiguration: Option<(&'static str, String)>,
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
    let verified: Vec<(i32, &kmmr::node::Status)> = reports
        .iter()
        .filter_map(|(id, p)| match p {
            Probe::Verified(s) => Some((*id, s)),
            _ => None,
        })
        .collect();

    // The state digest a replica reports is the one after its last decided instance, so only
    // reports at the same instance are comparable. At each instance where f+1 agree, any other
    // digest is a diverged replica; the newest such instance is the one shown.
    let mut by_cid: BTreeMap<Option<u64>, BTreeMap<&str, Vec<i32>>> = BTreeMap::new();
    for (id, s) in &verified {
        by_cid
            .entry(s.last_decided)
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

    let healthy_report = |id: i32, s: &kmmr::node::Status| {
        i64::from(s.view_id) == membership.view_id
            && s.n as i64 == i64::from(n)
            && s.f as i64 == i64::from(f)
            && !s.synchronizing
            && s.byzantine.is_none()
            && !diverged.contains(&id)
    };
    let members: Vec<MemberStatus> = reports
        .iter()
        .map(|(id, p)| match p {
            Probe::Verified(s) => MemberStatus {
                id: *id,
                health: if healthy_report(*id, s) {
                    MemberHealth::Healthy
                } else {
                    MemberHealth::Unhealthy
                },
                role: if s.leader == s.id {
                    MemberRole::Leader
                } else {
                    MemberRole::Follower
                },
                view_id: Some(i64::from(s.view_id)),
                last_decided_cid: s.last_decided.and_then(|c| i64::try_from(c).ok()),
                state_digest: Some(s.state_digest.clone()),
            },
            Probe::Rejected(_) => blank_member(*id, MemberHealth::Unhealthy),
            Probe::Unreachable(_) => blank_member(*id, MemberHealth::Unreachable),
        })
        .collect();
    let healthy = members
        .iter()
        .filter(|m| m.health == MemberHealth::Healthy)
        .count() as i32;
    let faulty = n - healthy;
    let leader = agreed(f, verified.iter().map(|(_, s)| i64::from(s.leader)));
    let view_id = agreed(f, verified.iter().map(|(_, s)| i64::from(s.view_id)));

    let prev_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let prev_cond = |t: &str| prev_conditions.iter().find(|c| c.type_ == t);
    // Until the cluster has been available once, missing replicas are starting, not failing.
    let ever_available = prev_cond(kind::AVAILABLE)
        .is_some_and(|c| c.status == "True" || c.reason != reason::STARTING);
    let starting = !ever_available && healthy < quorum;

    let not_healthy: Vec<String> = members
        .iter()
        .filter(|m| m.health != MemberHealth::Healthy)
        .map(|m| {
            let why = match &reports.iter().find(|(id, _)| *id == m.id).map(|r| r.1) {
                Some(Probe::Verified(s)) => verified_problem(membership, n, f, &diverged, m.id, s),
                Some(Probe::Rejected(e)) | Some(Probe::Unreachable(e)) => e.clone(),
                None => "not probed".to_string(),
            };
            format!("replica {} ({why})", m.id)
        })
        .collect();

    let mut desired: Vec<(&str, bool, &str, String)> = Vec::new();
    desired.push(if healthy >= quorum {
        (
            kind::AVAILABLE,
            true,
            reason::QUORUM_HEALTHY,
            format!("{healthy} of {n} replicas are healthy; a quorum is {quorum}"),
        )
    } else if starting {
        (
            kind::AVAILABLE,
            false,
            reason::STARTING,
            format!("waiting for replicas to start: {healthy} of {n} healthy, {quorum} needed"),
        )
    } else {
        (
            kind::AVAILABLE,
            false,
            reason::QUORUM_LOST,
            format!(
                "only {healthy} of {n} replicas are healthy and {quorum} are needed: writes stop until enough recover. Not healthy: {}",
                not_healthy.join(", ")
            ),
        )
    });
    desired.push(if faulty == 0 {
        (
            kind::DEGRADED,
            false,
            reason::ALL_REPLICAS_HEALTHY,
            format!("all {n} replicas are healthy"),
        )
    } else if starting {
        (
            kind::DEGRADED,
            false,
            reason::STARTING,
            "replicas are starting".to_string(),
        )
    } else if !diverged.is_empty() {
        (
            kind::DEGRADED,
            true,
            reason::STATE_DIVERGED,
            format!(
                "replicas {diverged:?} report a state that differs from the one f+1 replicas agree on: replace each (delete its pod and PersistentVolumeClaim) so it recovers the agreed state"
            ),
        )
    } else {
        (
            kind::DEGRADED,
            true,
            reason::REPLICAS_UNHEALTHY,
            format!("{faulty} of {n} replicas are not healthy (tolerated: {f}): {}", not_healthy.join(", ")),
        )
    });
    // Sticky: once more than f replicas failed, the condition stays until every replica is
    // healthy again, so a brief recovery between failures cannot hide it.
    let was_exceeded =
        prev_cond(kind::FAULT_TOLERANCE_EXCEEDED).is_some_and(|c| c.status == "True");
    desired.push(if !starting && (faulty > f || (was_exceeded && faulty > 0)) {
        (
            kind::FAULT_TOLERANCE_EXCEEDED,
            true,
            reason::TOO_MANY_FAULTS,
            format!(
                "{faulty} of {n} replicas are not healthy but the view tolerates only {f}: safety is no longer guaranteed. Bring replicas back (kubectl get pods -l app.kubernetes.io/instance=<cluster>); this condition clears when all {n} are healthy"
            ),
        )
    } else if starting {
        (
            kind::FAULT_TOLERANCE_EXCEEDED,
            false,
            reason::STARTING,
            "replicas are starting".to_string(),
        )
    } else {
        (
            kind::FAULT_TOLERANCE_EXCEEDED,
            false,
            reason::WITHIN_FAULT_TOLERANCE,
            format!("{faulty} of {n} replicas are not healthy; the view tolerates {f}"),
        )
    });
    desired.push(match &ctx.reconfiguration {
        Some((why, message)) => (kind::RECONFIGURING, false, *why, message.clone()),
        None => (
            kind::RECONFIGURING,
            false,
            reason::VIEW_MATCHES_SPEC,
            format!("the view has the {n} replicas and f = {f} that the spec asks for"),
        ),
    });
    desired.push(if ctx.paused {
        (
            kind::PAUSED,
            true,
            reason::PAUSED,
            "reconciliation is paused (spec.paused or the kmmr.io/paused annotation): children are not changed; status is still reported".to_string(),
        )
    } else {
        (
            kind::PAUSED,
            false,
            reason::RECONCILING,
            "the operator reconciles this cluster".to_string(),
        )
    });

    let mut transitions = Vec::new();
    let conditions = desired
        .into_iter()
        .map(|(type_, status, why, message)| {
            let status = if status { "True" } else { "False" };
            let prev = prev_cond(type_);
            let changed = prev.is_none_or(|p| p.status != status || p.reason != why);
            if changed {
                let bad = matches!(
                    (type_, status),
                    (kind::AVAILABLE, "False")
                        | (kind::DEGRADED, "True")
                        | (kind::FAULT_TOLERANCE_EXCEEDED, "True")
                ) && why != reason::STARTING
                    || why == reason::RECONFIGURATION_NOT_SUPPORTED
                    || why == reason::RECONFIGURATION_BLOCKED;
                transitions.push(Transition {
                    warning: bad,
                    reason: why.to_string(),
                    note: format!("{type_}={status}: {message}"),
                });
            }
            Condition {
                last_transition_time: match prev {
                    Some(p) if p.status == status => p.last_transition_time.clone(),
                    _ => now.clone(),
                },
                message,
                observed_generation: ctx.generation,
                reason: why.to_string(),
                status: status.to_string(),
                type_: type_.to_string(),
            }
        })
        .collect();

    // Per-member Events, but not for the noise of a cluster coming up.
    if !starting {
        let prev_members: BTreeMap<i32, MemberHealth> = previous
            .map(|p| p.members.iter().map(|m| (m.id, m.health)).collect())
            .unwrap_or_default();
        for m in &members {
            if prev_members.get(&m.id).is_some_and(|h| *h != m.health) {
                let detail = not_healthy
                    .iter()
                    .find(|s| s.starts_with(&format!("replica {} ", m.id)))
                    .cloned()
                    .unwrap_or_else(|| format!("replica {}", m.id));
                transitions.push(Transition {
                    warning: m.health != MemberHealth::Healthy,
                    reason: format!("Member{:?}", m.health),
                    note: format!("{detail} is now {:?}", m.health),
                });
            }
        }
    }

    let status = BftClusterStatus {
        observed_generation: ctx.generation,
        n: Some(n),
        f: Some(f),
        healthy: Some(healthy),
        quorum: Some(quorum),
        leader: leader.and_then(|l| i32::try_from(l).ok()),
        view_id,
        agreed_state_digest,
        diverged_replicas: diverged,
        members,
        conditions,
    };
    (status, transitions)
}

fn blank_member(id: i32, health: MemberHealth) -> MemberStatus {
    MemberStatus {
        id,
        health,
        role: MemberRole::Unknown,
        view_id: None,
        last_decided_cid: None,
        state_digest: None,
    }
}

/// Why a replica whose status checks out is still not healthy.
fn verified_problem(
    membership: &Membership,
    n: i32,
    f: i32,
    diverged: &[i32],
    id: i32,
    s: &kmmr::node::Status,
) -> String {
    if diverged.contains(&id) {
        "state diverged".to_string()
    } else if let Some(mode) = &s.byzantine {
        format!("runs the Byzantine test mode {mode}")
    } else if i64::from(s.view_id) != membership.view_id
        || s.n as i64 != i64::from(n)
        || s.f as i64 != i64::from(f)
    {
        format!(
            "reports view {} with n={} f={}, expected view {} with n={n} f={f}",
            s.view_id, s.n, s.f, membership.view_id
        )
    } else if s.synchronizing {
        "catching up with the others".to_string()
    } else {
        "unknown".to_string()
    }
}

/// The value more than f of `values` share, if any.
fn agreed(f: i32, values: impl Iterator<Item = i64>) -> Option<i64> {
    let mut counts: BTreeMap<i64, i32> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    counts.into_iter().find(|(_, c)| *c > f).map(|(v, _)| v)
}

#[cfg(test)]
mod tests;
