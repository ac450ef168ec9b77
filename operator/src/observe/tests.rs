use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kmmr_client::status::Status;
use kmmr_crds::{condition_reasons as reason, condition_types as kind};

fn membership() -> Membership {
    Membership {
        view_id: 0,
        f: 1,
        members: vec![0, 1, 2, 3],
    }
}

fn report(id: u32, cid: u64, digest: &str) -> Probe {
    Probe::Verified(Status {
        id,
        view_id: 0,
        n: 4,
        f: 1,
        regency: 0,
        leader: 0,
        synchronizing: false,
        last_decided: Some(cid),
        state_digest: digest.to_string(),
        pending_requests: 0,
        byzantine: None,
        member: true,
        ..Default::default()
    })
}

fn all_healthy() -> BTreeMap<i32, Probe> {
    (0..4)
        .map(|id| (id, report(id as u32, 10, "d10")))
        .collect()
}

fn at(secs: i64) -> Time {
    Time(jiff::Timestamp::from_second(secs).unwrap())
}

fn ctx() -> Context {
    Context {
        generation: Some(1),
        ..Context::default()
    }
}

fn cond<'a>(s: &'a BftClusterStatus, t: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.type_ == t).unwrap()
}

#[test]
fn a_fully_healthy_cluster_is_available_and_not_degraded() {
    let (s, events) = compute(None, &membership(), &all_healthy(), &ctx(), at(100));
    assert_eq!(s.n, Some(4));
    assert_eq!(s.f, Some(1));
    assert_eq!(s.quorum, Some(3));
    assert_eq!(s.healthy, Some(4));
    assert_eq!(s.leader, Some(0));
    assert_eq!(s.view_id, Some(0));
    assert_eq!(s.agreed_state_digest.as_deref(), Some("d10"));
    assert!(s.diverged_replicas.is_empty());
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(s.members[0].role, MemberRole::Leader);
    assert_eq!(s.members[1].role, MemberRole::Follower);
    assert_eq!(cond(&s, kind::AVAILABLE).status, "True");
    assert_eq!(cond(&s, kind::DEGRADED).status, "False");
    assert_eq!(cond(&s, kind::FAULT_TOLERANCE_EXCEEDED).status, "False");
    assert_eq!(
        cond(&s, kind::RECONFIGURING).reason,
        reason::VIEW_MATCHES_SPEC
    );
    assert_eq!(cond(&s, kind::PAUSED).status, "False");
    // The first status announces every condition.
    assert_eq!(events.len(), 5);
    assert!(events.iter().all(|e| !e.warning), "{events:?}");
}

#[test]
fn recomputing_from_the_same_observations_changes_nothing_not_even_timestamps() {
    let (first, _) = compute(None, &membership(), &all_healthy(), &ctx(), at(100));
    let (second, events) = compute(Some(&first), &membership(), &all_healthy(), &ctx(), at(200));
    assert_eq!(first, second);
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn a_new_cluster_is_starting_not_failing() {
    let probes = BTreeMap::from([(0, report(0, 0, "d0"))]);
    let (s, events) = compute(None, &membership(), &probes, &ctx(), at(100));
    assert_eq!(cond(&s, kind::AVAILABLE).reason, reason::STARTING);
    assert_eq!(cond(&s, kind::FAULT_TOLERANCE_EXCEEDED).status, "False");
    assert_eq!(cond(&s, kind::DEGRADED).status, "False");
    assert!(events.iter().all(|e| !e.warning), "{events:?}");
    // Still starting on the next pass.
    let (s2, _) = compute(Some(&s), &membership(), &probes, &ctx(), at(110));
    assert_eq!(cond(&s2, kind::AVAILABLE).reason, reason::STARTING);
}

#[test]
fn one_replica_down_is_degraded_but_available_with_a_warning_event() {
    let (healthy, _) = compute(None, &membership(), &all_healthy(), &ctx(), at(100));
    let mut probes = all_healthy();
    probes.insert(2, Probe::Unreachable("connection refused".into()));
    let (s, events) = compute(Some(&healthy), &membership(), &probes, &ctx(), at(200));
    assert_eq!(s.healthy, Some(3));
    assert_eq!(s.members[2].health, MemberHealth::Unreachable);
    assert_eq!(s.members[2].role, MemberRole::Unknown);
    assert_eq!(cond(&s, kind::AVAILABLE).status, "True");
    // Available did not change status: its transition time stays.
    assert_eq!(cond(&s, kind::AVAILABLE).last_transition_time, at(100));
    let degraded = cond(&s, kind::DEGRADED);
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, reason::REPLICAS_UNHEALTHY);
    assert_eq!(degraded.last_transition_time, at(200));
    assert!(
        degraded.message.contains("replica 2 (connection refused)"),
        "{}",
        degraded.message
    );
    assert!(events
        .iter()
        .any(|e| e.warning && e.reason == reason::REPLICAS_UNHEALTHY));
    assert!(events
        .iter()
        .any(|e| e.warning && e.reason == "MemberUnreachable"));
}

#[test]
fn more_than_f_down_loses_the_quorum_and_exceeds_fault_tolerance_stickily() {
    let (healthy, _) = compute(None, &membership(), &all_healthy(), &ctx(), at(100));
    let mut probes = all_healthy();
    probes.insert(1, Probe::Unreachable("timeout".into()));
    probes.insert(2, Probe::Rejected("bad signature".into()));
    let (s, _) = compute(Some(&healthy), &membership(), &probes, &ctx(), at(200));
    assert_eq!(cond(&s, kind::AVAILABLE).reason, reason::QUORUM_LOST);
    assert_eq!(cond(&s, kind::FAULT_TOLERANCE_EXCEEDED).status, "True");
    assert_eq!(s.members[2].health, MemberHealth::Unhealthy);
    // One comes back: within f again, but the condition stays until all are healthy.
    probes.insert(1, report(1, 10, "d10"));
    let (s2, _) = compute(Some(&s), &membership(), &probes, &ctx(), at(300));
    assert_eq!(cond(&s2, kind::AVAILABLE).status, "True");
    assert_eq!(cond(&s2, kind::FAULT_TOLERANCE_EXCEEDED).status, "True");
    let (s3, events) = compute(Some(&s2), &membership(), &all_healthy(), &ctx(), at(400));
    assert_eq!(cond(&s3, kind::FAULT_TOLERANCE_EXCEEDED).status, "False");
    assert!(events
        .iter()
        .any(|e| e.reason == reason::WITHIN_FAULT_TOLERANCE));
}

#[test]
fn a_replica_whose_digest_differs_from_f_plus_one_at_the_same_instance_is_diverged() {
    let mut probes = all_healthy();
    probes.insert(3, report(3, 10, "evil"));
    let (s, _) = compute(None, &membership(), &probes, &ctx(), at(100));
    assert_eq!(s.diverged_replicas, vec![3]);
    assert_eq!(s.agreed_state_digest.as_deref(), Some("d10"));
    assert_eq!(s.members[3].health, MemberHealth::Unhealthy);
    assert_eq!(cond(&s, kind::DEGRADED).reason, reason::STATE_DIVERGED);
}

#[test]
fn a_digest_of_an_earlier_instance_is_compared_at_that_instance() {
    // Replica 3 decided instance 10 too, but its large state was last hashed after instance 8.
    let mut probes = all_healthy();
    let stale = |digest: &str| {
        let Probe::Verified(mut s) = report(3, 10, digest) else {
            unreachable!()
        };
        s.state_digest_cid = Some(8);
        Probe::Verified(s)
    };
    probes.insert(3, stale("d8"));
    let (s, _) = compute(None, &membership(), &probes, &ctx(), at(100));
    assert!(s.diverged_replicas.is_empty(), "{:?}", s.diverged_replicas);
    assert_eq!(s.agreed_state_digest.as_deref(), Some("d10"));
    // Another replica's digest of instance 8 as well, and they differ: one of them is wrong,
    // but with only two reports of instance 8 (f+1 = 2 agree on neither) nobody is named.
    let Probe::Verified(mut two) = report(2, 10, "x8") else {
        unreachable!()
    };
    two.state_digest_cid = Some(8);
    probes.insert(2, Probe::Verified(two));
    let (s, _) = compute(None, &membership(), &probes, &ctx(), at(100));
    assert!(s.diverged_replicas.is_empty(), "{:?}", s.diverged_replicas);
}

#[test]
fn replicas_at_different_instances_are_not_called_diverged() {
    let mut probes = all_healthy();
    probes.insert(3, report(3, 11, "d11"));
    let (s, _) = compute(None, &membership(), &probes, &ctx(), at(100));
    assert!(s.diverged_replicas.is_empty());
    assert_eq!(s.healthy, Some(4));
}

#[test]
fn a_lone_liar_cannot_name_the_leader_or_view() {
    let mut probes: BTreeMap<i32, Probe> = BTreeMap::new();
    probes.insert(0, report(0, 10, "d10"));
    let mut lie = Status {
        id: 1,
        view_id: 0,
        n: 4,
        f: 1,
        regency: 9,
        leader: 3,
        synchronizing: false,
        last_decided: Some(10),
        state_digest: "d10".into(),
        pending_requests: 0,
        byzantine: None,
        member: true,
        ..Default::default()
    };
    probes.insert(1, Probe::Verified(lie.clone()));
    let (s, _) = compute(None, &membership(), &probes, &ctx(), at(100));
    assert_eq!(
        s.leader, None,
        "0 and 3 are each named once; f+1 = 2 are needed"
    );
    lie.id = 2;
    lie.leader = 0;
    probes.insert(2, Probe::Verified(lie));
    let (s, _) = compute(None, &membership(), &probes, &ctx(), at(100));
    assert_eq!(s.leader, Some(0));
}

#[test]
fn a_replica_in_another_view_or_byzantine_mode_is_unhealthy() {
    let mut probes = all_healthy();
    if let Some(Probe::Verified(s)) = probes.get_mut(&1) {
        s.view_id = 5;
    }
    if let Some(Probe::Verified(s)) = probes.get_mut(&2) {
        s.byzantine = Some("Equivocate".into());
    }
    let (before, _) = compute(None, &membership(), &all_healthy(), &ctx(), at(100));
    let (s, _) = compute(Some(&before), &membership(), &probes, &ctx(), at(200));
    assert_eq!(s.healthy, Some(2));
    let msg = &cond(&s, kind::AVAILABLE).message;
    assert!(msg.contains("Byzantine test mode"), "{msg}");
}

#[test]
fn a_pending_reconfiguration_and_pause_are_reported_with_warnings() {
    let c = Context {
        generation: Some(2),
        paused: true,
        reconfiguration: Some(Reconfiguration {
            in_progress: false,
            reason: reason::RECONFIGURATION_DISABLED,
            message: "not applied".into(),
        }),
        installing_view: false,
    };
    let (s, events) = compute(None, &membership(), &all_healthy(), &c, at(100));
    let r = cond(&s, kind::RECONFIGURING);
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", reason::RECONFIGURATION_DISABLED)
    );
    assert_eq!(r.observed_generation, Some(2));
    assert_eq!(cond(&s, kind::PAUSED).status, "True");
    assert!(events
        .iter()
        .any(|e| e.warning && e.reason == reason::RECONFIGURATION_DISABLED));
}

#[test]
fn a_view_moving_toward_the_spec_is_reconfiguring_without_a_warning() {
    let c = Context {
        generation: Some(3),
        paused: false,
        reconfiguration: Some(Reconfiguration {
            in_progress: true,
            reason: reason::SCALING_OUT,
            message: "adding replica 4".into(),
        }),
        installing_view: false,
    };
    let (s, events) = compute(None, &membership(), &all_healthy(), &c, at(100));
    let r = cond(&s, kind::RECONFIGURING);
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("True", reason::SCALING_OUT)
    );
    assert!(events
        .iter()
        .any(|e| !e.warning && e.reason == reason::SCALING_OUT));
}

#[test]
fn a_misbehaving_replica_is_named_with_its_evidence() {
    let (before, _) = compute(None, &membership(), &all_healthy(), &ctx(), at(100));
    // Replica 2 admits to a test mode in its signed status; replica 3's status does not verify.
    let mut probes = all_healthy();
    if let Some(Probe::Verified(s)) = probes.get_mut(&2) {
        s.byzantine = Some("Mixed".into());
    }
    let (s, _) = compute(Some(&before), &membership(), &probes, &ctx(), at(200));
    let d = cond(&s, kind::DEGRADED);
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", reason::REPLICAS_MISBEHAVING)
    );
    assert!(
        d.message.contains("replicas [2] misbehave")
            && d.message
                .contains("replica 2 (runs the Byzantine test mode Mixed)"),
        "{}",
        d.message
    );
    let m2 = s.members.iter().find(|m| m.id == 2).unwrap();
    assert_eq!(m2.health, MemberHealth::Unhealthy);
    assert!(m2.problem.as_deref().unwrap().contains("Mixed"));
    assert!(s
        .members
        .iter()
        .filter(|m| m.id != 2)
        .all(|m| m.problem.is_none()));
    // Still available: 3 of 4 healthy, and clients need only f+1 matching replies.
    assert_eq!(cond(&s, kind::AVAILABLE).status, "True");

    probes.insert(
        3,
        Probe::Rejected("/status is not signed by replica 3's key in the view".into()),
    );
    let (s, _) = compute(Some(&before), &membership(), &probes, &ctx(), at(200));
    let d = cond(&s, kind::DEGRADED);
    assert!(
        d.message.contains("replicas [2, 3] misbehave"),
        "{}",
        d.message
    );
    assert!(
        d.message.contains("not signed by replica 3's key"),
        "{}",
        d.message
    );
    // An unreachable replica is a crash, not misbehaviour.
    let mut probes = all_healthy();
    probes.insert(1, Probe::Unreachable("connection refused".into()));
    let (s, _) = compute(Some(&before), &membership(), &probes, &ctx(), at(200));
    assert_eq!(cond(&s, kind::DEGRADED).reason, reason::REPLICAS_UNHEALTHY);
}

#[test]
fn a_replica_accused_by_f_plus_one_others_is_named_one_accuser_is_not_enough() {
    use kmmr_client::status::Accusation;
    let accuse = |probes: &mut BTreeMap<i32, Probe>, by: i32, target: u32| {
        if let Some(Probe::Verified(s)) = probes.get_mut(&by) {
            s.accusations = vec![Accusation {
                replica: target,
                count: 7,
                reason: "forged_accept".into(),
            }];
        }
    };
    let (before, _) = compute(None, &membership(), &all_healthy(), &ctx(), at(100));
    // One accuser may be the liar itself: not enough.
    let mut probes = all_healthy();
    accuse(&mut probes, 3, 1);
    let (s, _) = compute(Some(&before), &membership(), &probes, &ctx(), at(200));
    assert!(s.members.iter().all(|m| m.health == MemberHealth::Healthy));
    assert_eq!(cond(&s, kind::DEGRADED).status, "False");
    // A second accuser that is still fetching state (or outside its view) may judge by a view
    // it does not hold (joiners did, on the test bed): its word does not count.
    accuse(&mut probes, 0, 1);
    let unsure = |probes: &mut BTreeMap<i32, Probe>, transferring: bool, member: bool| {
        if let Some(Probe::Verified(s)) = probes.get_mut(&0) {
            (s.transferring, s.member) = (transferring, member);
        }
    };
    for (transferring, member) in [(true, true), (false, false)] {
        unsure(&mut probes, transferring, member);
        let (s, _) = compute(Some(&before), &membership(), &probes, &ctx(), at(200));
        let m1 = s.members.iter().find(|m| m.id == 1).unwrap();
        assert!(
            m1.problem.as_deref().is_none_or(|p| !p.contains("accused")),
            "{m1:?}"
        );
    }
    // f+1 = 2 up-to-date accusers: one of them is correct.
    unsure(&mut probes, false, true);
    let (s, _) = compute(Some(&before), &membership(), &probes, &ctx(), at(200));
    let m1 = s.members.iter().find(|m| m.id == 1).unwrap();
    assert_eq!(m1.health, MemberHealth::Unhealthy);
    let p = m1.problem.as_deref().unwrap();
    assert!(
        p.contains("accused by 2 replicas [0, 3]: 14 of its messages rejected as misbehaviour")
            && p.contains("forged_accept"),
        "{p}"
    );
    let d = cond(&s, kind::DEGRADED);
    assert_eq!(d.reason, reason::REPLICAS_MISBEHAVING);
    assert!(
        d.message.contains("replicas [1] misbehave"),
        "{}",
        d.message
    );
    assert_eq!(cond(&s, kind::AVAILABLE).status, "True");
}

#[test]
fn a_newer_view_counts_only_when_f_plus_one_members_report_it() {
    let m = membership();
    assert_eq!(agreed_newer_view(&m, &all_healthy()), None);
    let mut probes = all_healthy();
    let set_view = |p: &mut BTreeMap<i32, Probe>, id: i32, v: u32| {
        if let Some(Probe::Verified(s)) = p.get_mut(&id) {
            s.view_id = v;
        }
    };
    set_view(&mut probes, 1, 7);
    assert_eq!(agreed_newer_view(&m, &probes), None, "one replica may lie");
    set_view(&mut probes, 2, 3);
    assert_eq!(
        agreed_newer_view(&m, &probes),
        Some(3),
        "two say the view moved on, at least to 3"
    );
}

#[test]
fn a_joiner_without_the_state_is_catching_up_not_healthy() {
    let (before, _) = compute(None, &membership(), &all_healthy(), &ctx(), at(100));
    let mut probes = all_healthy();
    // It reports the right view from its configuration but has decided nothing yet.
    if let Some(Probe::Verified(s)) = probes.get_mut(&3) {
        s.last_decided = None;
    }
    let (s, _) = compute(Some(&before), &membership(), &probes, &ctx(), at(200));
    let m3 = s.members.iter().find(|m| m.id == 3).unwrap();
    assert_eq!(m3.health, MemberHealth::Unhealthy);
    assert!(
        m3.problem.as_deref().unwrap().contains("catching up"),
        "{m3:?}"
    );
    // Far behind is catching up too; a few instances behind is in step.
    for (cid, healthy) in [(10 + MAX_LAG + 500, false), (10 + MAX_LAG / 2, true)] {
        let mut probes = all_healthy();
        for id in 0..3 {
            if let Some(Probe::Verified(s)) = probes.get_mut(&id) {
                s.last_decided = Some(cid);
            }
        }
        let (s, _) = compute(Some(&before), &membership(), &probes, &ctx(), at(200));
        let m3 = s.members.iter().find(|m| m.id == 3).unwrap();
        assert_eq!(m3.health == MemberHealth::Healthy, healthy, "{cid}: {m3:?}");
    }
}

#[test]
fn a_leader_change_counts_against_a_member_only_if_it_lasts() {
    let (before, _) = compute(None, &membership(), &all_healthy(), &ctx(), at(100));
    let mut probes = all_healthy();
    for id in 0..4 {
        if let Some(Probe::Verified(s)) = probes.get_mut(&id) {
            s.synchronizing = true;
        }
    }
    let (once, events) = compute(Some(&before), &membership(), &probes, &ctx(), at(200));
    assert_eq!(once.healthy, Some(4), "a leader change is not a fault");
    assert!(events.iter().all(|e| !e.warning), "{events:?}");
    assert!(once.members.iter().all(|m| m.problem.is_some()));
    let (again, _) = compute(Some(&once), &membership(), &probes, &ctx(), at(210));
    assert_eq!(
        again, once,
        "nothing changes while it lasts less than the grace"
    );
    let (long, _) = compute(Some(&again), &membership(), &probes, &ctx(), at(216));
    assert_eq!(long.healthy, Some(0), "one that does not end is");
    assert_eq!(cond(&long, kind::AVAILABLE).status, "False");
    // Over, then a new one: its clock starts again.
    let (over, _) = compute(Some(&long), &membership(), &all_healthy(), &ctx(), at(220));
    let (new, _) = compute(Some(&over), &membership(), &probes, &ctx(), at(300));
    assert_eq!(new.healthy, Some(4));
}

#[test]
fn a_problem_is_typed_and_keeps_the_time_it_was_first_seen() {
    let (healthy, _) = compute(None, &membership(), &all_healthy(), &ctx(), at(100));
    let mut probes = all_healthy();
    probes.insert(2, Probe::Unreachable("connection refused".into()));
    let (s1, _) = compute(Some(&healthy), &membership(), &probes, &ctx(), at(200));
    let m2 = &s1.members[2];
    assert_eq!(m2.problem_reason, Some(MemberProblem::Unreachable));
    assert_eq!(m2.problem_since, Some(at(200)));
    // Still unreachable later: the same time, so the status does not change.
    let (s2, _) = compute(Some(&s1), &membership(), &probes, &ctx(), at(300));
    assert_eq!(s2, s1);
    // Another kind of problem starts its own clock.
    probes.insert(2, Probe::Rejected("bad signature".into()));
    let (s3, _) = compute(Some(&s2), &membership(), &probes, &ctx(), at(400));
    assert_eq!(
        s3.members[2].problem_reason,
        Some(MemberProblem::StatusRejected)
    );
    assert_eq!(s3.members[2].problem_since, Some(at(400)));
    // Healthy again: no problem, no time.
    let (s4, _) = compute(Some(&s3), &membership(), &all_healthy(), &ctx(), at(500));
    assert_eq!(s4.members[2].problem_reason, None);
    assert_eq!(s4.members[2].problem_since, None);
}

#[test]
fn members_installing_a_view_just_changed_to_count_as_healthy_only_then() {
    let next = Membership {
        view_id: 1,
        ..membership()
    };
    // The probes still show view 0.
    let installing = Context {
        installing_view: true,
        ..ctx()
    };
    let (s, events) = compute(None, &next, &all_healthy(), &installing, at(100));
    assert_eq!(s.healthy, Some(4), "{:?}", s.members);
    assert!(s
        .members
        .iter()
        .all(|m| m.problem_reason == Some(MemberProblem::InstallingView)));
    assert!(events.iter().all(|e| !e.warning), "{events:?}");
    // Later passes keep it so for a while (the same status)...
    let (later, _) = compute(Some(&s), &next, &all_healthy(), &ctx(), at(110));
    assert_eq!(later, s);
    // ...then a member still on the old view is a fault.
    let (later, _) = compute(Some(&later), &next, &all_healthy(), &ctx(), at(116));
    assert_eq!(later.healthy, Some(0));
    assert!(later
        .members
        .iter()
        .all(|m| m.problem_reason == Some(MemberProblem::InstallingView)));
    // Without a change in this pass or a recent one, another view is a fault at once.
    let (other, _) = compute(None, &next, &all_healthy(), &ctx(), at(100));
    assert_eq!(other.healthy, Some(0));
    assert!(other
        .members
        .iter()
        .all(|m| m.problem_reason == Some(MemberProblem::OtherView)));
}

#[test]
fn a_failed_reconcile_is_in_the_status_until_one_succeeds() {
    let (s, _) = compute(None, &membership(), &all_healthy(), &ctx(), at(100));
    let failed = with_error(
        &s,
        "KeyMismatch",
        "replica 1's key Secret does not match",
        at(200),
    );
    let e = failed.last_error.as_ref().unwrap();
    assert_eq!(
        (e.reason.as_str(), e.since.clone()),
        ("KeyMismatch", at(200))
    );
    assert_eq!(failed.conditions, s.conditions, "nothing else changes");
    // Failing the same way again leaves the status as it was.
    assert_eq!(
        with_error(
            &failed,
            "KeyMismatch",
            "replica 1's key Secret does not match",
            at(300)
        ),
        failed
    );
    // Another reason starts its own time.
    let other = with_error(&failed, "ViewUnreadable", "x", at(400));
    assert_eq!(other.last_error.unwrap().since, at(400));
    // The next reconcile that gets through clears it.
    let (ok, _) = compute(
        Some(&failed),
        &membership(),
        &all_healthy(),
        &ctx(),
        at(500),
    );
    assert_eq!(ok.last_error, None);
}
