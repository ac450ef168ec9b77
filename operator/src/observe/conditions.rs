//! The conditions of `BftCluster.status` from the facts `compute` established, each with a
//! reason and a message saying what to do, and an Event for every condition that changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kmmr_crds::{condition_reasons as reason, condition_types as kind, BftClusterStatus};

use super::{Context, Transition};

/// What the conditions are decided on.
pub(super) struct Facts<'a> {
    pub n: i32,
    pub f: i32,
    pub quorum: i32,
    pub healthy: i32,
    pub diverged: &'a [i32],
    pub misbehaving: &'a [i32],
    /// Members that are not healthy, with a line each ("replica <id> (<problem>)").
    pub not_healthy: &'a [(i32, String)],
}

/// One condition as it should be now.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Desired {
    kind: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
}

impl Desired {
    fn new(kind: &'static str, status: bool, reason: &'static str, message: String) -> Self {
        Desired {
            kind,
            status,
            reason,
            message,
        }
    }

    /// A change to this deserves a Warning rather than a Normal Event.
    fn is_bad(&self) -> bool {
        let bad_state = matches!(
            (self.kind, self.status),
            (kind::AVAILABLE, false)
                | (kind::DEGRADED, true)
                | (kind::FAULT_TOLERANCE_EXCEEDED, true)
        );
        bad_state && self.reason != reason::STARTING
            || self.reason == reason::RECONFIGURATION_DISABLED
            || self.reason == reason::RECONFIGURATION_BLOCKED
    }
}

/// The conditions, whether the cluster is still starting (never available yet), and the
/// transitions. Conditions keep their lastTransitionTime unless their status changes.
pub(super) fn compute(
    facts: &Facts<'_>,
    previous: Option<&BftClusterStatus>,
    ctx: &Context,
    now: &Time,
) -> (Vec<Condition>, bool, Vec<Transition>) {
    let prev_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let prev_cond = |t: &str| prev_conditions.iter().find(|c| c.type_ == t);
    // Until the cluster has been available once, missing replicas are starting, not failing.
    let ever_available = prev_cond(kind::AVAILABLE)
        .is_some_and(|c| c.status == "True" || c.reason != reason::STARTING);
    let starting = !ever_available && facts.healthy < facts.quorum;
    // Sticky: once more than f replicas failed, the condition stays until every replica is
    // healthy again, so a brief recovery between failures cannot hide it.
    let was_exceeded =
        prev_cond(kind::FAULT_TOLERANCE_EXCEEDED).is_some_and(|c| c.status == "True");
    let desired = [
        available(facts, starting),
        degraded(facts, starting),
        fault_tolerance(facts, starting, was_exceeded),
        reconfiguring(facts, ctx),
        paused(ctx),
    ];

    let mut transitions = Vec::new();
    let conditions = desired
        .into_iter()
        .map(|d| {
            let status = if d.status { "True" } else { "False" };
            let prev = prev_cond(d.kind);
            if prev.is_none_or(|p| p.status != status || p.reason != d.reason) {
                transitions.push(Transition {
                    warning: d.is_bad(),
                    reason: d.reason.to_string(),
                    note: format!("{}={status}: {}", d.kind, d.message),
                });
            }
            Condition {
                last_transition_time: match prev {
                    Some(p) if p.status == status => p.last_transition_time.clone(),
                    _ => now.clone(),
                },
                message: d.message,
                observed_generation: ctx.generation,
                reason: d.reason.to_string(),
                status: status.to_string(),
                type_: d.kind.to_string(),
            }
        })
        .collect();
    (conditions, starting, transitions)
}

fn lines(not_healthy: &[(i32, String)]) -> String {
    not_healthy
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn available(facts: &Facts<'_>, starting: bool) -> Desired {
    let Facts {
        n, quorum, healthy, ..
    } = *facts;
    if healthy >= quorum {
        Desired::new(
            kind::AVAILABLE,
            true,
            reason::QUORUM_HEALTHY,
            format!("{healthy} of {n} replicas are healthy; a quorum is {quorum}"),
        )
    } else if starting {
        Desired::new(
            kind::AVAILABLE,
            false,
            reason::STARTING,
            format!("waiting for replicas to start: {healthy} of {n} healthy, {quorum} needed"),
        )
    } else {
        Desired::new(
            kind::AVAILABLE,
            false,
            reason::QUORUM_LOST,
            format!(
                "only {healthy} of {n} replicas are healthy and {quorum} are needed: writes stop until enough recover. Not healthy: {}",
                lines(facts.not_healthy)
            ),
        )
    }
}

fn degraded(facts: &Facts<'_>, starting: bool) -> Desired {
    let Facts { n, f, healthy, .. } = *facts;
    let faulty = n - healthy;
    if faulty == 0 {
        Desired::new(
            kind::DEGRADED,
            false,
            reason::ALL_REPLICAS_HEALTHY,
            format!("all {n} replicas are healthy"),
        )
    } else if starting {
        Desired::new(
            kind::DEGRADED,
            false,
            reason::STARTING,
            "replicas are starting".to_string(),
        )
    } else if !facts.diverged.is_empty() {
        Desired::new(
            kind::DEGRADED,
            true,
            reason::STATE_DIVERGED,
            format!(
                "replicas {:?} report a state that differs from the one f+1 replicas agree on: replace each (delete its pod and PersistentVolumeClaim) so it recovers the agreed state",
                facts.diverged
            ),
        )
    } else if !facts.misbehaving.is_empty() {
        let named: Vec<&str> = facts
            .not_healthy
            .iter()
            .filter(|(id, _)| facts.misbehaving.contains(id))
            .map(|(_, l)| l.as_str())
            .collect();
        Desired::new(
            kind::DEGRADED,
            true,
            reason::REPLICAS_MISBEHAVING,
            format!(
                "replicas {:?} misbehave: {}. Clients stay correct while at most f = {f} replicas are faulty ({faulty} of {n} are not healthy now); replace a misbehaving replica (delete its pod and PersistentVolumeClaim) or remove it by scaling in",
                facts.misbehaving,
                named.join(", ")
            ),
        )
    } else {
        Desired::new(
            kind::DEGRADED,
            true,
            reason::REPLICAS_UNHEALTHY,
            format!(
                "{faulty} of {n} replicas are not healthy (tolerated: {f}): {}",
                lines(facts.not_healthy)
            ),
        )
    }
}

fn fault_tolerance(facts: &Facts<'_>, starting: bool, was_exceeded: bool) -> Desired {
    let Facts { n, f, healthy, .. } = *facts;
    let faulty = n - healthy;
    if !starting && (faulty > f || (was_exceeded && faulty > 0)) {
        Desired::new(
            kind::FAULT_TOLERANCE_EXCEEDED,
            true,
            reason::TOO_MANY_FAULTS,
            format!(
                "{faulty} of {n} replicas are not healthy but the view tolerates only {f}: safety is no longer guaranteed. Bring replicas back (kubectl get pods -l app.kubernetes.io/instance=<cluster>); this condition clears when all {n} are healthy"
            ),
        )
    } else if starting {
        Desired::new(
            kind::FAULT_TOLERANCE_EXCEEDED,
            false,
            reason::STARTING,
            "replicas are starting".to_string(),
        )
    } else {
        Desired::new(
            kind::FAULT_TOLERANCE_EXCEEDED,
            false,
            reason::WITHIN_FAULT_TOLERANCE,
            format!("{faulty} of {n} replicas are not healthy; the view tolerates {f}"),
        )
    }
}

fn reconfiguring(facts: &Facts<'_>, ctx: &Context) -> Desired {
    match &ctx.reconfiguration {
        Some(r) => Desired::new(
            kind::RECONFIGURING,
            r.in_progress,
            r.reason,
            r.message.clone(),
        ),
        None => Desired::new(
            kind::RECONFIGURING,
            false,
            reason::VIEW_MATCHES_SPEC,
            format!(
                "the view has the {} replicas and f = {} that the spec asks for",
                facts.n, facts.f
            ),
        ),
    }
}

fn paused(ctx: &Context) -> Desired {
    if ctx.paused {
        Desired::new(
            kind::PAUSED,
            true,
            reason::PAUSED,
            "reconciliation is paused (spec.paused or the kmmr.io/paused annotation): children are not changed; status is still reported".to_string(),
        )
    } else {
        Desired::new(
            kind::PAUSED,
            false,
            reason::RECONCILING,
            "the operator reconciles this cluster".to_string(),
        )
    }
}
