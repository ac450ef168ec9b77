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
use kmmr_client::status::Probe;

/// What the controller knows besides the replicas' answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// metadata.generation of the BftCluster.
    pub generation: Option<i64>,
    /// Reconciliation is paused (spec or annotation).
    pub paused: bool,
    /// The view differs from the spec: (Reconfiguring's status, reason, message). `None` when
    /// the view is what the spec asks for.
    pub reconfiguration: Option<(bool, &'static str, String)>,
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
    let verified: Vec<(i32, &kmmr_client::status::Status)> = reports
        .iter()
        .filter_map(|(id, p)| match p {
            Probe::Verified(s) => Some((*id, s)),
            _ => None,
        })
        .collect();

    // Evidence from the replicas themselves: a member that more than f others caught, lately,
    // sending what no correct replica sends (forged signatures, equivocation, proofs unsound in
    // the view the accuser holds for them) is faulty, since at least one of its accusers is
    // correct. An accuser still fetching state or outside its view may judge by the wrong view:
    // replicas do not accuse then, and its word would not count here either.
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
    let accused: BTreeMap<i32, String> = accusers
        .into_iter()
        .filter(|(_, (by, _, _))| by.len() as i32 > f)
        .map(|(id, (by, count, reason))| {
            (
                id,
                format!(
                    "accused by {} replicas {by:?}: {count} of its messages rejected as misbehaviour in the last minute (latest: {reason})",
                    by.len()
                ),
            )
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

    // How far the cluster has decided: at least f+1 members (one of them correct) have decided
    // this far, so a member well behind it is still catching up, not a healthy voter.
    let mut decided: Vec<u64> = verified
        .iter()
        .filter_map(|(_, s)| s.last_decided)
        .collect();
    decided.sort_unstable_by(|a, b| b.cmp(a));
    let progress = usize::try_from(f)
        .ok()
        .and_then(|i| decided.get(i).copied());
    // A leader change is normal and short: a member in one stays Healthy, with the leader
    // change and when it was first seen noted as its problem, and counts as unhealthy only once
    // the leader change has lasted LEADER_CHANGE_GRACE, so the status does not flap on every
    // leader change (a restarted leader, a joiner arriving).
    let synchronizing_since = |id: i32| {
        previous.and_then(|p| {
            p.members
                .iter()
                .find(|m| m.id == id)
                .and_then(|m| m.problem.as_deref())
                .and_then(|t| t.strip_prefix(SYNCHRONIZING))
                .and_then(|t| t.strip_prefix(" since "))
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        })
    };
    let problem_of = |id: i32, p: &Probe| -> (bool, Option<String>) {
        match p {
            Probe::Verified(s) => verified_problem(
                membership,
                &diverged,
                accused.get(&id).map(String::as_str),
                progress,
                synchronizing_since(id),
                &now,
                id,
                s,
            ),
            Probe::Rejected(e) | Probe::Unreachable(e) => match accused.get(&id) {
                Some(a) => (false, Some(format!("{e}; {a}"))),
                None => (false, Some(e.clone())),
            },
        }
    };
    let members: Vec<MemberStatus> = reports
        .iter()
        .map(|(id, p)| {
            let (fine, problem) = problem_of(*id, p);
            match p {
                Probe::Verified(s) => MemberStatus {
                    id: *id,
                    health: if fine {
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
                    problem,
                },
                Probe::Rejected(_) => blank_member(*id, MemberHealth::Unhealthy, problem),
                Probe::Unreachable(_) => blank_member(*id, MemberHealth::Unreachable, problem),
            }
        })
        .collect();
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
            format!(
                "replica {} ({})",
                m.id,
                m.problem.as_deref().unwrap_or("not probed")
            )
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
    } else if !misbehaving.is_empty() {
        let named: Vec<&String> = not_healthy
            .iter()
            .filter(|t| misbehaving.iter().any(|id| t.starts_with(&format!("replica {id} "))))
            .collect();
        (
            kind::DEGRADED,
            true,
            reason::REPLICAS_MISBEHAVING,
            format!(
                "replicas {misbehaving:?} misbehave: {}. Clients stay correct while at most f = {f} replicas are faulty ({faulty} of {n} are not healthy now); replace a misbehaving replica (delete its pod and PersistentVolumeClaim) or remove it by scaling in",
                named.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
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
        Some((active, why, message)) => (kind::RECONFIGURING, *active, *why, message.clone()),
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
                    || why == reason::RECONFIGURATION_DISABLED
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

fn blank_member(id: i32, health: MemberHealth, problem: Option<String>) -> MemberStatus {
    MemberStatus {
        id,
        health,
        role: MemberRole::Unknown,
        view_id: None,
        last_decided_cid: None,
        state_digest: None,
        problem,
    }
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

/// How many instances a member may be behind the f+1-agreed progress and still count as caught
/// up: the probes of one pass are concurrent, not simultaneous, and replicas decide under load.
pub const MAX_LAG: u64 = 64;

/// Whether a replica whose status checks out is healthy, and what is wrong with it, if anything.
#[allow(clippy::too_many_arguments)]
fn verified_problem(
    membership: &Membership,
    diverged: &[i32],
    accused: Option<&str>,
    progress: Option<u64>,
    synchronizing_since: Option<jiff::Timestamp>,
    now: &Time,
    id: i32,
    s: &kmmr_client::status::Status,
) -> (bool, Option<String>) {
    let (n, f) = (membership.members.len() as i64, i64::from(membership.f));
    let problem = if diverged.contains(&id) {
        "state diverged".to_string()
    } else if let Some(a) = accused {
        a.to_string()
    } else if let Some(mode) = &s.byzantine {
        format!("runs the Byzantine test mode {mode}")
    } else if i64::from(s.view_id) != membership.view_id || s.n as i64 != n || s.f as i64 != f {
        format!(
            "reports view {} with n={} f={}, expected view {} with n={n} f={f}",
            s.view_id, s.n, s.f, membership.view_id
        )
    } else if !s.member {
        "does not count itself a member of its view".to_string()
    } else if s.transferring {
        "fetching the state from the others (state transfer)".to_string()
    } else if let Some(p) = progress.filter(|p| s.last_decided.is_none_or(|d| d + MAX_LAG < *p)) {
        format!(
            "catching up: decided up to {}, f+1 replicas up to {p}",
            s.last_decided
                .map_or_else(|| "nothing yet".to_string(), |d| d.to_string())
        )
    } else if s.synchronizing {
        let since = synchronizing_since.unwrap_or(now.0);
        let note = format!("{SYNCHRONIZING} since {since}");
        if now.0.duration_since(since) < LEADER_CHANGE_GRACE {
            return (true, Some(note));
        }
        note
    } else {
        return (true, None);
    };
    (false, Some(problem))
}

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

#[cfg(test)]
mod tests;
