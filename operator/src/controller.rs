//! The BftCluster controller: the reconcile pipeline and its wiring into kube-runtime.
//!
//! A reconcile observes, decides, then acts. It observes the spec, the view the operator
//! recorded (the ConfigMap), the keys and every member's signed status; it follows a newer view
//! f+1 members run if an answer was lost. It decides the next membership step
//! (`membership::plan`, pure) and takes it through the protocol, then computes the status once
//! (`observe::compute`, pure) from what it saw. It acts last: every child by server-side apply
//! under one field manager, departed members removed, at most one rolling restart, and the
//! status written if it changed. Waiting is a requeue, never a sleep. Status writes do not
//! trigger reconciles (generation and annotation predicates); replicas are polled by
//! requeueing instead.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kmmr_crds::{condition_types, BftCluster, BftClusterStatus};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{predicates, watcher, Controller, Predicate, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;

use crate::config::{Membership, VIEW_ENTRY};
use crate::error::Error;
use crate::keys::{self, Keys};
use crate::membership::{plan, Joining, Plan, ReconfigError, Reconfigurer, Step, Target};
use crate::metrics::Metrics;
use crate::names;
use crate::observe::{self, Reconfiguration};
use kmmr_client::status::{self as probe, Probe};

mod apply;
mod backup;
mod etcd_api;
mod secrets;
mod view;

use apply::{apply_children, cleanup, owned_by, probe_members, remove_departed, roll_one};
use secrets::{joining_seed, load_keys, stored_seed};
use view::{change_view, read_view, recover_view};
pub use view::{parse_view, CurrentView};

/// Finalizer on every BftCluster: deleting one first removes its volumes.
pub const FINALIZER: &str = "kmmr.io/cleanup";
/// Annotation that pauses reconciliation when "true", like spec.paused, for tools that must not
/// change the spec.
pub const PAUSE_ANNOTATION: &str = "kmmr.io/paused";

/// How the controller reaches a replica's HTTP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeVia {
    /// The pod's IP from its status (no DNS involved).
    PodIp,
    /// The pod's stable DNS name under the headless Service.
    Dns,
}

/// What every reconcile shares.
pub struct Context {
    /// The apiserver.
    pub client: Client,
    /// Publishes Events (events.k8s.io/v1).
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Carries out membership steps.
    pub reconfigurer: Arc<dyn Reconfigurer>,
    /// Per-replica time limit of a /status probe.
    pub probe_timeout: Duration,
    /// How replicas are reached.
    pub probe_via: ProbeVia,
    /// Honour the test-only `kmmr.io/byzantine-test-mode` annotation ([`crate::testmode`]).
    pub allow_byzantine_test_modes: bool,
    /// Consecutive failures per cluster, for the back-off.
    failures: Mutex<HashMap<ObjectRef<BftCluster>, u32>>,
}

impl Context {
    /// A context with no failures recorded.
    pub fn new(
        client: Client,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        reconfigurer: Arc<dyn Reconfigurer>,
        probe_timeout: Duration,
        probe_via: ProbeVia,
    ) -> Context {
        Context {
            client,
            recorder,
            metrics,
            reconfigurer,
            probe_timeout,
            probe_via,
            allow_byzantine_test_modes: false,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// TEST ONLY: lets clusters ask for replicas in a Byzantine mode by annotation.
    pub fn allowing_byzantine_test_modes(mut self, allowed: bool) -> Context {
        self.allow_byzantine_test_modes = allowed;
        self
    }

    fn failure_count(&self, obj: &ObjectRef<BftCluster>, failed: bool) -> u32 {
        let mut map = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if failed {
            let n = map.entry(obj.clone()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        } else {
            map.remove(obj);
            0
        }
    }
}

/// The back-off after the `failures`-th consecutive failure: doubling from 2 s (30 s for a
/// user's mistake, which a retry cannot fix) up to 5 minutes.
pub fn backoff(failures: u32, user_error: bool) -> Duration {
    let base: u64 = if user_error { 30 } else { 2 };
    let exp = failures.saturating_sub(1).min(10);
    Duration::from_secs((base << exp).min(300))
}

/// Runs the controller until `shutdown` resolves, then finishes the reconciles in flight.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let ours = watcher::Config::default()
        .labels(&format!("app.kubernetes.io/managed-by={}", names::MANAGER));
    let (reader, writer) = reflector::store();
    // Status writes bump neither the generation, the annotations nor the finalizers, so they
    // never come back as triggers; a spec change or the pause annotation does, and so does
    // adding the finalizer (after which the finalizer helper waits for a change to carry on).
    let clusters = watcher(
        api::<BftCluster>(&client, namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects()
    .predicate_filter(
        predicates::generation
            .combine(predicates::annotations)
            .combine(predicates::finalizers),
        Default::default(),
    );
    Controller::for_stream(clusters, reader)
        .owns(api::<StatefulSet>(&client, namespace), ours.clone())
        .owns(api::<Service>(&client, namespace), ours.clone())
        .owns(api::<ConfigMap>(&client, namespace), ours.clone())
        .owns(api::<PodDisruptionBudget>(&client, namespace), ours.clone())
        // The etcd gateways (spec.etcdAPI): their readiness goes into status.etcdAPI.
        .owns(api::<Deployment>(&client, namespace), ours.clone())
        .owns(api::<Secret>(&client, namespace), ours.clone())
        .owns(
            api::<k8s_openapi::api::batch::v1::CronJob>(&client, namespace),
            ours,
        )
        // Backup Jobs belong to the CronJob or, when requested, to the cluster: map them by
        // their instance label so that a finished backup is reported at once.
        .watches(
            api::<k8s_openapi::api::batch::v1::Job>(&client, namespace),
            watcher::Config::default().labels(&format!(
                "app.kubernetes.io/name={},app.kubernetes.io/component={}",
                names::APP_NAME,
                crate::backup::COMPONENT
            )),
            |job| {
                let instance = job.labels().get("app.kubernetes.io/instance").cloned();
                let ns = job.namespace();
                instance
                    .and_then(|name| ns.map(|ns| ObjectRef::<BftCluster>::new(&name).within(&ns)))
            },
        )
        // Pods belong to the StatefulSets, not to the cluster: map them by their instance label so
        // a replica that dies or comes back is reported at once.
        .watches(
            api::<Pod>(&client, namespace),
            watcher::Config::default().labels(&format!(
                "app.kubernetes.io/name={},app.kubernetes.io/component={}",
                names::APP_NAME,
                names::COMPONENT_REPLICA
            )),
            |pod| {
                let instance = pod.labels().get("app.kubernetes.io/instance").cloned();
                let ns = pod.namespace();
                instance
                    .and_then(|name| ns.map(|ns| ObjectRef::<BftCluster>::new(&name).within(&ns)))
            },
        )
        .with_config(
            kube::runtime::controller::Config::default().debounce(Duration::from_millis(500)),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                // Already counted, logged and published by reconcile.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(e) => tracing::warn!(error = %e, "controller"),
                Ok(_) => {}
            }
        })
        .await;
}

/// Reconciles one BftCluster.
pub async fn reconcile(cluster: Arc<BftCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.start();
    let namespace = cluster
        .namespace()
        .ok_or(Error::MissingMetadata("metadata.namespace"))?;
    let api: Api<BftCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, cluster.clone(), |event| async {
        match event {
            Finalizer::Apply(c) => apply(&c, &ctx).await,
            Finalizer::Cleanup(c) => cleanup(&c, &ctx).await,
        }
    })
    .await
    .map_err(Error::from);
    let failed = result.is_err();
    ctx.failure_count(&ObjectRef::from_obj(&*cluster), failed);
    if let Err(e) = &result {
        ctx.metrics.failed(e);
        tracing::warn!(cluster = %cluster.name_any(), %namespace, reason = e.reason(), error = %e, "reconcile failed");
        record_error(&ctx, &cluster, &namespace, e).await;
        publish(
            &ctx,
            &cluster,
            true,
            e.reason(),
            &e.to_string(),
            "Reconcile",
        )
        .await;
    }
    result
}

/// Puts what stopped a reconcile into `status.lastError`, so that `kubectl describe` shows it
/// beside the Event (the next reconcile that gets through clears it). A failure to write it is
/// logged: the error itself is already reported.
async fn record_error(ctx: &Context, cluster: &BftCluster, namespace: &str, e: &Error) {
    let now = now_seconds();
    let previous = cluster.status.clone().unwrap_or_default();
    let status = observe::with_error(&previous, e.reason(), &e.to_string(), now);
    if status != previous {
        if let Err(w) = write_status(ctx, namespace, &cluster.name_any(), &status).await {
            tracing::warn!(cluster = %cluster.name_any(), %namespace, error = %w, "writing status.lastError");
        }
    }
}

/// The time now, to the second: status times change only on transitions, and a second is as
/// fine as the Condition schema shows.
fn now_seconds() -> Time {
    Time(jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).unwrap_or_default())
}

/// After a failed reconcile: retry with a growing delay.
pub fn error_policy(cluster: Arc<BftCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    // reconcile already counted this failure; read the count without adding to it.
    let key = ObjectRef::from_obj(&*cluster);
    let failures = ctx
        .failures
        .lock()
        .map(|m| m.get(&key).copied().unwrap_or(1))
        .unwrap_or(1);
    Action::requeue(backoff(failures, error.is_user_error()))
}

fn is_paused(cluster: &BftCluster) -> bool {
    cluster.spec.paused
        || cluster
            .annotations()
            .get(PAUSE_ANNOTATION)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

async fn apply(cluster: &BftCluster, ctx: &Context) -> Result<Action, Error> {
    let name = cluster.name_any();
    let namespace = cluster
        .namespace()
        .ok_or(Error::MissingMetadata("metadata.namespace"))?;
    cluster
        .spec
        .validate()
        .map_err(|e| Error::InvalidSpec(e.to_string()))?;
    let paused = is_paused(cluster);

    let view = read_view(ctx, &namespace, &name).await?;
    let mut membership = view
        .as_ref()
        .map(|v| v.membership.clone())
        .unwrap_or_else(|| Membership::initial(cluster));
    let (mut keys, generated) =
        load_keys(ctx, cluster, &namespace, &membership, view.as_ref()).await?;
    if !generated.is_empty() {
        publish(
            ctx,
            cluster,
            false,
            "KeysGenerated",
            &format!(
                "generated ed25519 key pairs for {}; each replica's private key is in a Secret only its pod mounts",
                generated.join(", ")
            ),
            "GenerateKeys",
        )
        .await;
    }

    let mut probes = probe_members(ctx, cluster, &namespace, &membership, &keys).await;
    let mut obs = observe::Context {
        generation: cluster.metadata.generation,
        paused,
        reconfiguration: None,
        installing_view: false,
    };
    let view_unconfirmed = if view.is_some() {
        follow_installed_view(
            ctx,
            cluster,
            &namespace,
            &mut membership,
            &mut keys,
            &mut probes,
        )
        .await?
    } else {
        None
    };
    let test_modes = crate::testmode::requested(
        cluster
            .annotations()
            .get(crate::testmode::ANNOTATION)
            .map(String::as_str),
        ctx.allow_byzantine_test_modes,
        &membership.members,
        membership.f,
    )
    .map_err(Error::ByzantineTestMode)?;

    let previous = cluster.status.as_ref();
    let now = now_seconds();
    let (first, _) = observe::compute(previous, &membership, &probes, &obs, now.clone());
    let mut pass = Pass {
        healthy: healthy_ids(&first),
        leader: first.leader,
        requeue_soon: false,
    };
    // Only a view read back from the running cluster can be changed through the protocol; a
    // cluster whose first view has not been written yet simply starts with the spec's.
    if view.is_some() {
        let before = membership.view_id;
        obs.reconfiguration = reconfigure(
            ctx,
            cluster,
            &namespace,
            &mut membership,
            &mut keys,
            view_unconfirmed,
            &mut pass,
        )
        .await?;
        if membership.view_id != before {
            // The probes before the change describe the old view. The change was decided, so
            // members still reporting an older view are installing it: this pass counts them
            // as such, and the next one (in a second) sees them in the new view. No waiting
            // here.
            probes = probe_members(ctx, cluster, &namespace, &membership, &keys).await;
            obs.installing_view = true;
        }
    }

    // The status this pass reports, computed once from what was observed and decided; the
    // rolling restart below goes by the same health.
    let (mut status, mut transitions) =
        observe::compute(previous, &membership, &probes, &obs, now.clone());
    pass.healthy = healthy_ids(&status);
    pass.leader = status.leader;
    let mut applied_view = None;
    if !paused {
        let children =
            crate::children::build_children_with(cluster, &membership, &keys, &test_modes)?;
        applied_view = children
            .config_map
            .data
            .as_ref()
            .and_then(|d| d.get(VIEW_ENTRY))
            .cloned();
        apply_children(ctx, &namespace, children).await?;
        act_on_members(ctx, cluster, &namespace, &membership, view.is_some(), &pass).await?;
    }
    status.etcd_api =
        etcd_api::reconcile_etcd_api(ctx, cluster, &namespace, applied_view.as_deref()).await?;
    let backups = backup::reconcile_backup(
        ctx,
        cluster,
        &namespace,
        &membership,
        applied_view.as_deref(),
    )
    .await?;
    status.backup = backups.status;
    transitions.extend(backup::merge_conditions(
        &mut status,
        previous,
        backups.conditions,
        cluster.metadata.generation,
        &now,
    ));
    if let Some(request) = backups.requested {
        publish(
            ctx,
            cluster,
            false,
            "BackupRequested",
            &format!(
                "started backup Job {} for {}={request}",
                crate::backup::request_job_name(&name, &request),
                crate::backup::REQUEST_ANNOTATION
            ),
            "Backup",
        )
        .await;
    }
    if previous != Some(&status) {
        write_status(ctx, &namespace, &name, &status).await?;
    }
    for t in transitions {
        publish(ctx, cluster, t.warning, &t.reason, &t.note, "Observe").await;
    }

    let gateways_ready = status
        .etcd_api
        .as_ref()
        .is_none_or(|e| e.ready_gateways >= e.gateways);
    let settled = gateways_ready
        && status.conditions.iter().all(|c| match c.type_.as_str() {
            condition_types::AVAILABLE => c.status == "True",
            condition_types::DEGRADED => c.status == "False",
            condition_types::RECONFIGURING => c.status == "False",
            _ => true,
        });
    Ok(Action::requeue(if pass.requeue_soon {
        Duration::from_secs(1)
    } else if settled {
        Duration::from_secs(15)
    } else {
        Duration::from_secs(3)
    }))
}

/// What one reconcile pass learned about the members and decided about its requeue.
struct Pass {
    healthy: Vec<i32>,
    leader: Option<i32>,
    requeue_soon: bool,
}

/// The ConfigMap holds the view of the last change whose answer came back. If f+1 members run
/// a newer one, an answer was lost (a timeout, or this operator restarted mid-change): ask the
/// replicas for their view and follow it, even while paused, so the status is right. Returns
/// why the newer view could not be followed yet, if it could not.
async fn follow_installed_view(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &mut Membership,
    keys: &mut Keys,
    probes: &mut BTreeMap<i32, Probe>,
) -> Result<Option<String>, Error> {
    let Some(newer) = observe::agreed_newer_view(membership, probes) else {
        return Ok(None);
    };
    match recover_view(ctx, cluster, namespace, membership, keys).await? {
        Ok(installed) => {
            publish(
                ctx,
                cluster,
                false,
                "ViewRecovered",
                &format!(
                    "the replicas run view {} (members {:?}, f = {}), newer than the view {} the operator recorded (the answer to a view change was lost): following it",
                    installed.view_id, installed.members, installed.f, membership.view_id
                ),
                "Reconfigure",
            )
            .await;
            *membership = installed;
            *probes = probe_members(ctx, cluster, namespace, membership, keys).await;
            Ok(None)
        }
        Err(why) => {
            tracing::warn!(cluster = %cluster.name_any(), %namespace, newer, error = %why, "reading the installed view back");
            Ok(Some(format!(
                "f+1 replicas run view {newer}, newer than the recorded view {}, but the view itself could not be read from them yet ({why}); no change is made until it is",
                membership.view_id
            )))
        }
    }
}

/// Moves the view one step toward the spec if it differs and a step can be taken now, and
/// gives the Reconfiguring condition to report.
async fn reconfigure(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &mut Membership,
    keys: &mut Keys,
    view_unconfirmed: Option<String>,
    pass: &mut Pass,
) -> Result<Option<Reconfiguration>, Error> {
    use kmmr_crds::condition_reasons as reason;
    let target = Target {
        replicas: cluster.spec.replicas,
        f: cluster.spec.fault_tolerance(),
    };
    let planned = plan(membership, target, &pass.healthy);
    let unsupported = (planned != Plan::InSync)
        .then(|| ctx.reconfigurer.unsupported(membership, target))
        .flatten();
    let stopped = |reason, message| Some(Reconfiguration::stopped(reason, message));
    let moving = |m: &Membership, message| Some(Reconfiguration::moving(m, target, message));
    Ok(match planned {
        Plan::InSync => None,
        _ if unsupported.is_some() => {
            unsupported.and_then(|m| stopped(reason::RECONFIGURATION_DISABLED, m))
        }
        _ if view_unconfirmed.is_some() => {
            pass.requeue_soon = true;
            view_unconfirmed.and_then(|m| moving(membership, m))
        }
        Plan::Blocked(why, message) => stopped(why, message),
        Plan::Wait(message) => moving(membership, message),
        Plan::Next(step) if is_paused(cluster) => stopped(
            reason::PAUSED,
            format!("{step} is next, but reconciliation is paused"),
        ),
        Plan::Next(step) => {
            pass.requeue_soon = true;
            match change_view(ctx, cluster, namespace, membership, keys, &step).await? {
                Ok(next) => {
                    publish(
                        ctx,
                        cluster,
                        false,
                        "ViewChanged",
                        &format!(
                            "{step}: the replicas installed view {} with members {:?} and f = {}",
                            next.view_id, next.members, next.f
                        ),
                        "Reconfigure",
                    )
                    .await;
                    *membership = next;
                    progress(
                        membership,
                        target,
                        &format!("{step} done (view {})", membership.view_id),
                    )
                }
                Err(ReconfigError::NotSupported(m)) => stopped(reason::RECONFIGURATION_DISABLED, m),
                Err(e @ ReconfigError::Refused(_)) => {
                    stopped(reason::RECONFIGURATION_BLOCKED, format!("{step}: {e}"))
                }
                Err(e @ ReconfigError::Unknown(_)) => moving(membership, format!("{step}: {e}")),
            }
        }
    })
}

impl Reconfiguration {
    /// Reconfiguring=False: the operator cannot move the view now.
    fn stopped(reason: &'static str, message: String) -> Reconfiguration {
        Reconfiguration {
            in_progress: false,
            reason,
            message,
        }
    }

    /// Reconfiguring=True: the view moves toward the spec.
    fn moving(membership: &Membership, target: Target, message: String) -> Reconfiguration {
        Reconfiguration {
            in_progress: true,
            reason: progress_reason(membership, target),
            message,
        }
    }
}

/// Deletes what departed members left and restarts one replica whose pod template changed.
async fn act_on_members(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
    view_recorded: bool,
    pass: &Pass,
) -> Result<(), Error> {
    for id in remove_departed(ctx, cluster, namespace, membership).await? {
        publish(
            ctx,
            cluster,
            false,
            "MemberRemoved",
            &format!("replica {id} is not in view {}: its StatefulSet, volume and key Secret are deleted", membership.view_id),
            "Reconfigure",
        )
        .await;
    }
    if !view_recorded {
        return Ok(());
    }
    let quorum = kmmr_crds::quorum_size(membership.members.len() as i32, membership.f);
    let name = cluster.name_any();
    let restarted = roll_one(
        ctx,
        &name,
        namespace,
        membership,
        &pass.healthy,
        quorum,
        pass.leader,
    )
    .await?;
    if let Some(id) = restarted {
        publish(
            ctx,
            cluster,
            false,
            "RollingRestart",
            &format!(
                "restarting replica {id} to run the new pod template (image, resources, configuration or test mode); the other {} replicas hold the quorum. One replica at a time, unhealthy ones first, the leader last",
                membership.members.len() - 1
            ),
            "Restart",
        )
        .await;
    }
    Ok(())
}

fn healthy_ids(status: &BftClusterStatus) -> Vec<i32> {
    status
        .members
        .iter()
        .filter(|m| m.health == kmmr_crds::MemberHealth::Healthy)
        .map(|m| m.id)
        .collect()
}

/// The Reconfiguring reason while the view moves toward the spec.
fn progress_reason(membership: &Membership, target: Target) -> &'static str {
    use kmmr_crds::condition_reasons as r;
    let n = membership.members.len() as i32;
    if target.replicas > n {
        r::SCALING_OUT
    } else if target.replicas < n {
        r::SCALING_IN
    } else {
        r::CHANGING_FAULT_TOLERANCE
    }
}

/// Reconfiguring after a step: True while the view still differs from the spec.
fn progress(membership: &Membership, target: Target, done: &str) -> Option<Reconfiguration> {
    let n = membership.members.len() as i32;
    (n != target.replicas || membership.f != target.f).then(|| {
        Reconfiguration::moving(
            membership,
            target,
            format!(
                "{done}; the view has {n} replicas with f = {}, the spec asks for {} with f = {}: one step at a time, each once every member is healthy",
                membership.f, target.replicas, target.f
            ),
        )
    })
}

async fn write_status(
    ctx: &Context,
    namespace: &str,
    name: &str,
    status: &BftClusterStatus,
) -> Result<(), Error> {
    let api: Api<BftCluster> = Api::namespaced(ctx.client.clone(), namespace);
    // Server-side apply rather than a merge patch: a field the operator no longer sets (a leader
    // that f+1 replicas stopped naming) is removed, not left stale.
    let body = serde_json::json!({
        "apiVersion": BftCluster::api_version(&()),
        "kind": BftCluster::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(names::MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Publishes an Event about `cluster`; a failure is logged, never fatal.
async fn publish(
    ctx: &Context,
    cluster: &BftCluster,
    warning: bool,
    reason: &str,
    note: &str,
    action: &str,
) {
    // events.k8s.io limits a note to 1 kB.
    let mut note = note.to_string();
    if note.len() > 1000 {
        let mut cut = 997;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_string(),
        note: Some(note),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
        tracing::warn!(error = %e, %reason, "publishing an Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1, false), Duration::from_secs(2));
        assert_eq!(backoff(2, false), Duration::from_secs(4));
        assert_eq!(backoff(30, false), Duration::from_secs(300));
        assert_eq!(backoff(1, true), Duration::from_secs(30));
        assert_eq!(backoff(0, true), Duration::from_secs(30));
    }

    #[test]
    fn the_view_is_read_with_the_replicas_own_parser() {
        let text = "id = 2\nf = 1\n\n[[members]]\nid = 1\naddress = \"a:7000\"\nkey = \"aa\"\n\n[[members]]\nid = 0\naddress = \"b:7000\"\nkey = \"bb\"\n";
        let v = parse_view(text).unwrap();
        assert_eq!(v.membership.members, vec![0, 1]);
        assert_eq!(v.membership.view_id, 2);
        assert_eq!(v.keys[&1], "aa");
        assert!(parse_view("id = 1\nbogus = 2\n").is_err());
        assert!(parse_view("not toml [").is_err());
    }
}
