//! The BftCluster controller: the reconcile pipeline and its wiring into kube-runtime.
//!
//! A reconcile reads the spec and the view the replicas run (the ConfigMap), loads or generates
//! keys, asks every member for its signed status, decides the next membership step, applies every
//! child with server-side apply under one field manager, and writes the status computed from what
//! the replicas said. Status writes do not trigger reconciles (generation and annotation
//! predicates); replicas are polled by requeueing instead.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
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
use crate::observe;
use kmmr_client::status::{self as probe, Probe};

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
        .owns(api::<Secret>(&client, namespace), ours)
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
    };
    // The ConfigMap holds the view of the last change whose answer came back. If f+1 members
    // run a newer one, an answer was lost (a timeout, or this operator restarted mid-change):
    // ask the replicas for their view and follow it, even while paused, so the status is right.
    let mut view_unconfirmed = None;
    if view.is_some() {
        if let Some(newer) = observe::agreed_newer_view(&membership, &probes) {
            match recover_view(ctx, cluster, &namespace, &membership, &mut keys).await? {
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
                    membership = installed;
                    probes = probe_members(ctx, cluster, &namespace, &membership, &keys).await;
                }
                Err(why) => {
                    tracing::warn!(cluster = %name, %namespace, newer, error = %why, "reading the installed view back");
                    view_unconfirmed = Some(format!(
                        "f+1 replicas run view {newer}, newer than the recorded view {}, but the view itself could not be read from them yet ({why}); no change is made until it is",
                        membership.view_id
                    ));
                }
            }
        }
    }
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
    let now =
        Time(jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).unwrap_or_default());
    let (first, _) = observe::compute(previous, &membership, &probes, &obs, now.clone());
    let mut healthy: Vec<i32> = healthy_ids(&first);
    let mut leader = first.leader;
    let target = Target {
        replicas: cluster.spec.replicas,
        f: cluster.spec.fault_tolerance(),
    };
    // Only a view read back from the running cluster can be changed through the protocol; a
    // cluster whose first view has not been written yet simply starts with the spec's.
    let mut requeue_soon = false;
    if view.is_some() {
        let planned = plan(&membership, target, &healthy);
        let unsupported = (planned != Plan::InSync)
            .then(|| ctx.reconfigurer.unsupported(&membership, target))
            .flatten();
        obs.reconfiguration = match planned {
            Plan::InSync => None,
            _ if unsupported.is_some() => unsupported.map(|m| {
                (
                    false,
                    kmmr_crds::condition_reasons::RECONFIGURATION_DISABLED,
                    m,
                )
            }),
            _ if view_unconfirmed.is_some() => {
                requeue_soon = true;
                view_unconfirmed.map(|m| (true, progress_reason(&membership, target), m))
            }
            Plan::Blocked(reason, message) => Some((false, reason, message)),
            Plan::Wait(message) => Some((true, progress_reason(&membership, target), message)),
            Plan::Next(step) if paused => Some((
                false,
                kmmr_crds::condition_reasons::PAUSED,
                format!("{step} is next, but reconciliation is paused"),
            )),
            Plan::Next(step) => {
                requeue_soon = true;
                match change_view(ctx, cluster, &namespace, &membership, &mut keys, &step).await? {
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
                        membership = next;
                        // The probes before the change describe the old view, and the members
                        // install the new one a moment apart: wait (briefly) until those that
                        // were healthy report it, rather than report them out of date.
                        probes =
                            settle(ctx, cluster, &namespace, &membership, &keys, &healthy).await;
                        let (again, _) =
                            observe::compute(previous, &membership, &probes, &obs, now.clone());
                        healthy = healthy_ids(&again);
                        leader = again.leader;
                        progress(
                            &membership,
                            target,
                            &format!("{step} done (view {})", membership.view_id),
                        )
                    }
                    Err(ReconfigError::NotSupported(m)) => Some((
                        false,
                        kmmr_crds::condition_reasons::RECONFIGURATION_DISABLED,
                        m,
                    )),
                    Err(e @ ReconfigError::Refused(_)) => Some((
                        false,
                        kmmr_crds::condition_reasons::RECONFIGURATION_BLOCKED,
                        format!("{step}: {e}"),
                    )),
                    Err(e @ ReconfigError::Unknown(_)) => Some((
                        true,
                        progress_reason(&membership, target),
                        format!("{step}: {e}"),
                    )),
                }
            }
        };
    }

    if !paused {
        let children =
            crate::children::build_children_with(cluster, &membership, &keys, &test_modes)?;
        apply_children(ctx, &namespace, children).await?;
        for id in remove_departed(ctx, cluster, &namespace, &membership).await? {
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
        if view.is_some() {
            let quorum = kmmr_crds::quorum_size(membership.members.len() as i32, membership.f);
            if let Some(id) = roll_one(
                ctx,
                &name,
                &namespace,
                &membership,
                &healthy,
                quorum,
                leader,
            )
            .await?
            {
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
        }
    }

    let (status, transitions) = observe::compute(previous, &membership, &probes, &obs, now);
    if previous != Some(&status) {
        write_status(ctx, &namespace, &name, &status).await?;
    }
    for t in transitions {
        publish(ctx, cluster, t.warning, &t.reason, &t.note, "Observe").await;
    }

    let settled = status.conditions.iter().all(|c| match c.type_.as_str() {
        condition_types::AVAILABLE => c.status == "True",
        condition_types::DEGRADED => c.status == "False",
        condition_types::RECONFIGURING => c.status == "False",
        _ => true,
    });
    Ok(Action::requeue(if requeue_soon {
        Duration::from_secs(1)
    } else if settled {
        Duration::from_secs(15)
    } else {
        Duration::from_secs(3)
    }))
}

/// Probes the members of a view just installed until every member in `were_healthy` reports
/// it, for at most a few seconds, and returns the last probes.
async fn settle(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
    keys: &Keys,
    were_healthy: &[i32],
) -> BTreeMap<i32, Probe> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let probes = probe_members(ctx, cluster, namespace, membership, keys).await;
        let installed = membership
            .members
            .iter()
            .filter(|id| were_healthy.contains(id))
            .all(|id| {
                matches!(probes.get(id), Some(Probe::Verified(s)) if i64::from(s.view_id) >= membership.view_id)
            });
        if installed || tokio::time::Instant::now() >= deadline {
            return probes;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
fn progress(
    membership: &Membership,
    target: Target,
    done: &str,
) -> Option<(bool, &'static str, String)> {
    let n = membership.members.len() as i32;
    (n != target.replicas || membership.f != target.f).then(|| {
        (
            true,
            progress_reason(membership, target),
            format!(
                "{done}; the view has {n} replicas with f = {}, the spec asks for {} with f = {}: one step at a time, each once every member is healthy",
                membership.f, target.replicas, target.f
            ),
        )
    })
}

/// Reads the installed view from the replicas and loads the keys of members it names that the
/// recorded view did not (joiners whose addition was installed without the operator hearing of
/// it: their key Secrets were written before the request). The outer error is an API failure;
/// the inner one why the view could not be read.
async fn recover_view(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
    keys: &mut Keys,
) -> Result<Result<Membership, String>, Error> {
    let view_toml = crate::config::render_view(cluster, namespace, membership, keys)
        .map_err(|e| Error::Build(e.to_string()))?;
    let installed = match ctx
        .reconfigurer
        .current_view(&view_toml, keys.admin())
        .await
    {
        Ok(v) => v,
        Err(e) => return Ok(Err(e.to_string())),
    };
    if installed.membership.view_id <= membership.view_id {
        return Ok(Err(format!(
            "the admin client still sees view {}",
            installed.membership.view_id
        )));
    }
    for (&id, public) in &installed.keys {
        if keys.replica(id).is_none() {
            let seed = stored_seed(ctx, cluster, namespace, id)
                .await?
                .ok_or_else(|| Error::KeyLost {
                    secret: names::key_secret(&cluster.name_any(), id),
                    who: format!(
                        "replica {id} (a member of the replicas' view {})",
                        installed.membership.view_id
                    ),
                })?;
            keys.insert_replica(id, seed);
        }
        if keys.replica(id).map(keys::public_hex).as_deref() != Some(public.as_str()) {
            return Err(Error::KeyMismatch(format!("replica {id}")));
        }
    }
    Ok(Ok(installed.membership))
}

/// Stores a joining replica's key (before the view can name it), then asks the replicas for
/// the change. The outer error is an API failure; the inner one is the replicas' answer.
async fn change_view(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
    keys: &mut Keys,
    step: &Step,
) -> Result<Result<Membership, ReconfigError>, Error> {
    let name = cluster.name_any();
    let joining = match step {
        Step::Join(id) => {
            let seed = joining_seed(ctx, cluster, namespace, *id, membership.view_id).await?;
            keys.insert_replica(*id, seed);
            let key = ed25519_dalek::SigningKey::from_bytes(&seed);
            Some(Joining {
                address: names::member_address(&name, namespace, *id, cluster.spec.ports.replica),
                public_key: keys::public_hex(&key),
            })
        }
        _ => None,
    };
    // The view exactly as the replicas read it from the ConfigMap.
    let view_toml = crate::config::render_view(cluster, namespace, membership, keys)
        .map_err(|e| Error::Build(e.to_string()))?;
    let answer = ctx
        .reconfigurer
        .apply(&view_toml, step, joining.as_ref(), keys.admin())
        .await;
    Ok(answer.map(|installed| installed.membership))
}

/// A replica key that was stored earlier: the user's, or ours from its Secret.
async fn stored_seed(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    id: i32,
) -> Result<Option<[u8; 32]>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    if let Some(user) = &cluster.spec.keys {
        let secret = secrets
            .get_opt(&user.secret_name)
            .await?
            .ok_or_else(|| Error::KeySecretMissing(user.secret_name.clone()))?;
        return Ok(Some(keys::seed_entry(
            &user.secret_name,
            &secret.data.unwrap_or_default(),
            &keys::user_entry(id),
        )?));
    }
    let secret_name = names::key_secret(&cluster.name_any(), id);
    match secrets.get_opt(&secret_name).await? {
        Some(s) if owned_by(&s, cluster) => Ok(Some(keys::seed_entry(
            &secret_name,
            &s.data.unwrap_or_default(),
            keys::SEED_ENTRY,
        )?)),
        _ => Ok(None),
    }
}

/// A joining replica's key: the user's, or ours, stored in its Secret before the request so that
/// a retry in the same view (after a lost answer or a restart) names the same key. A Secret left
/// from a request in an older view is never installed any more: it is replaced, so that an id is
/// never given a key it had before.
async fn joining_seed(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    id: i32,
    view_id: i64,
) -> Result<[u8; 32], Error> {
    if cluster.spec.keys.is_some() {
        return stored_seed(ctx, cluster, namespace, id)
            .await?
            .ok_or_else(|| Error::Build(format!("no key for replica {id}")));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret_name = names::key_secret(&cluster.name_any(), id);
    if let Some(s) = secrets.get_opt(&secret_name).await? {
        let same_view = s
            .annotations()
            .get(names::JOIN_VIEW_ANNOTATION)
            .is_some_and(|v| *v == view_id.to_string());
        if owned_by(&s, cluster) && same_view {
            return Ok(keys::seed_entry(
                &secret_name,
                &s.data.unwrap_or_default(),
                keys::SEED_ENTRY,
            )?);
        }
        if owned_by(&s, cluster) {
            secrets
                .delete(&secret_name, &DeleteParams::default())
                .await?;
        } else {
            return Err(Error::Build(format!(
                "Secret {secret_name} exists but does not belong to this BftCluster: the operator will not take it over as replica {id}'s key; delete or rename it"
            )));
        }
    }
    let key = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
    let mut secret = crate::children::replica_key_secret(cluster, id, &key)?;
    secret
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(names::JOIN_VIEW_ANNOTATION.to_string(), view_id.to_string());
    secrets
        .create(&kube::api::PostParams::default(), &secret)
        .await?;
    Ok(key.to_bytes())
}

/// Deletes the StatefulSet, volume and key Secret of every replica id that is not in the view
/// (after it left through the protocol, or a join that was never installed): a later replica
/// with the same id must start with a new key and an empty volume. The Secret goes last, so an
/// interrupted pass finds the replica again by what is left; a joiner's Secret is kept while its
/// request can still be installed (the view it was made in is current).
async fn remove_departed(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
) -> Result<Vec<i32>, Error> {
    let name = cluster.name_any();
    let selector = format!(
        "app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={}",
        names::MANAGER
    );
    let list = ListParams::default().labels(&selector);
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), namespace);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let label_id = |labels: &BTreeMap<String, String>| {
        labels
            .get(names::REPLICA_ID_LABEL)
            .and_then(|v| v.parse::<i32>().ok())
    };
    let outside = |id: &i32| !membership.members.contains(id);
    let mut departed = std::collections::BTreeSet::new();
    for set in sets.list(&list).await?.items {
        if let Some(id) = label_id(set.labels()).filter(outside) {
            if owned_by(&set, cluster) {
                departed.insert(id);
            }
        }
    }
    // Claims belong to no owner (the StatefulSets' retention keeps them): found by name.
    for claim in pvcs.list(&list).await?.items {
        if let Some(id) = names::data_claim_id(&name, &claim.name_any()).filter(outside) {
            departed.insert(id);
        }
    }
    let mut stale_keys = Vec::new();
    if cluster.spec.keys.is_none() {
        for s in secrets.list(&list).await?.items {
            let Some(id) = label_id(s.labels()).filter(outside) else {
                continue;
            };
            let pending = s
                .annotations()
                .get(names::JOIN_VIEW_ANNOTATION)
                .is_some_and(|v| *v == membership.view_id.to_string());
            if owned_by(&s, cluster) && !pending {
                stale_keys.push(id);
            }
        }
    }
    let gone = |r: Result<(), kube::Error>| match r {
        Ok(()) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    };
    for &id in &departed {
        gone(
            sets.delete(&names::stateful_set(&name, id), &DeleteParams::background())
                .await
                .map(|_| ()),
        )?;
        gone(
            pvcs.delete(&names::data_claim(&name, id), &DeleteParams::default())
                .await
                .map(|_| ()),
        )?;
    }
    for &id in departed.iter().chain(&stale_keys) {
        if cluster.spec.keys.is_some() {
            continue;
        }
        gone(
            secrets
                .delete(&names::key_secret(&name, id), &DeleteParams::default())
                .await
                .map(|_| ()),
        )?;
    }
    Ok(departed.into_iter().collect())
}

/// StatefulSets use `OnDelete`, so a changed pod template reaches a replica only when its pod is
/// deleted. Deletes at most one pod that runs an outdated revision and returns its replica id.
/// With every member healthy any of them may go (followers first, the leader last: each leader
/// restart costs a leader change). With exactly one unhealthy member, only its pod, and only
/// while a quorum is healthy: this is how a replica switched into (or out of) a test mode, or
/// stuck on a bad template, gets the new one.
async fn roll_one(
    ctx: &Context,
    name: &str,
    namespace: &str,
    membership: &Membership,
    healthy: &[i32],
    quorum: i32,
    leader: Option<i32>,
) -> Result<Option<i32>, Error> {
    let unhealthy: Vec<i32> = membership
        .members
        .iter()
        .copied()
        .filter(|id| !healthy.contains(id))
        .collect();
    // Restarting the one unhealthy member costs nothing the cluster has; with two unhealthy,
    // one of them may be a working voter in a passing state (a leader change, catching up
    // after its own restart), and restarting it would take two down at once.
    let restartable = |id: i32| unhealthy.is_empty() || unhealthy == [id];
    if unhealthy.len() > 1 || (healthy.len() as i32) < quorum {
        return Ok(None);
    }
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let mut outdated = Vec::new();
    for &id in &membership.members {
        let Some(set) = sets.get_opt(&names::stateful_set(name, id)).await? else {
            continue;
        };
        let status = set.status.as_ref();
        // The StatefulSet controller has not yet computed the revision of the newest template.
        if status.and_then(|s| s.observed_generation) != set.metadata.generation {
            return Ok(None);
        }
        let Some(update) = status.and_then(|s| s.update_revision.clone()) else {
            continue;
        };
        let Some(pod) = pods.get_opt(&names::pod(name, id)).await? else {
            return Ok(None);
        };
        if pod.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        if pod.labels().get("controller-revision-hash") != Some(&update) && restartable(id) {
            outdated.push(id);
        }
    }
    outdated.sort_by_key(|id| (Some(*id) == leader, *id));
    let Some(&id) = outdated.first() else {
        return Ok(None);
    };
    pods.delete(&names::pod(name, id), &DeleteParams::default())
        .await?;
    Ok(Some(id))
}

async fn cleanup(cluster: &BftCluster, ctx: &Context) -> Result<Action, Error> {
    let name = cluster.name_any();
    let namespace = cluster
        .namespace()
        .ok_or(Error::MissingMetadata("metadata.namespace"))?;
    // Everything else carries an owner reference and goes with the cluster; the replicas'
    // volumes are kept by their StatefulSets' retention policy, so they are removed here.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = format!(
        "app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={}",
        names::MANAGER
    );
    pvcs.delete_collection(
        &DeleteParams::background(),
        &ListParams::default().labels(&selector),
    )
    .await?;
    publish(
        ctx,
        cluster,
        false,
        "Deleted",
        "the cluster is being deleted: its replicas' volumes are removed and every other object goes with it",
        "Delete",
    )
    .await;
    Ok(Action::await_change())
}

/// The view the replicas run, read back from the ConfigMap the operator wrote.
pub struct CurrentView {
    /// Members, view id and f.
    pub membership: Membership,
    /// Each member's public key, hex.
    pub keys: BTreeMap<i32, String>,
    /// The admin's public key, hex (absent in views written before it was rendered).
    pub admin: Option<String>,
}

async fn read_view(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<CurrentView>, Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let cm_name = names::config_map(name);
    let Some(cm) = api.get_opt(&cm_name).await? else {
        return Ok(None);
    };
    let unreadable = |why: String| Error::ViewUnreadable {
        name: cm_name.clone(),
        why,
    };
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(VIEW_ENTRY))
        .ok_or_else(|| unreadable(format!("no entry {VIEW_ENTRY}")))?;
    parse_view(text).map(Some).map_err(unreadable)
}

/// Parses view.toml with the replica's own type, so the operator reads exactly what replicas do.
pub fn parse_view(text: &str) -> Result<CurrentView, String> {
    let file: kmmr_client::files::ViewFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut members = Vec::new();
    let mut keys = BTreeMap::new();
    for m in &file.members {
        let id = i32::try_from(m.id).map_err(|_| format!("member id {} out of range", m.id))?;
        members.push(id);
        keys.insert(id, m.key.clone());
    }
    members.sort_unstable();
    Ok(CurrentView {
        membership: Membership {
            view_id: i64::from(file.id),
            f: i32::try_from(file.f).map_err(|_| format!("f = {} out of range", file.f))?,
            members,
        },
        keys,
        admin: file.admin_key.clone(),
    })
}

/// The cluster's keys: the user's, or ours read back from the Secrets we wrote, generating only
/// those of members no view has named yet. Returns what was generated, for an Event.
async fn load_keys(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
    view: Option<&CurrentView>,
) -> Result<(Keys, Vec<String>), Error> {
    let name = cluster.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let (keys, generated) = if let Some(user) = &cluster.spec.keys {
        let secret = secrets
            .get_opt(&user.secret_name)
            .await?
            .ok_or_else(|| Error::KeySecretMissing(user.secret_name.clone()))?;
        let data = secret.data.unwrap_or_default();
        (
            Keys::from_user_secret(&user.secret_name, &data, membership.members.iter().copied())?,
            Vec::new(),
        )
    } else {
        let selector = format!(
            "app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={}",
            names::MANAGER
        );
        let existing: BTreeMap<String, Secret> = secrets
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
            .into_iter()
            .filter(|s| owned_by(s, cluster))
            .map(|s| (s.name_any(), s))
            .collect();
        let read = |secret_name: &str| -> Result<Option<[u8; 32]>, Error> {
            match existing.get(secret_name) {
                None => Ok(None),
                Some(s) => Ok(Some(keys::seed_entry(
                    secret_name,
                    &s.data.clone().unwrap_or_default(),
                    keys::SEED_ENTRY,
                )?)),
            }
        };
        let mut generated = Vec::new();
        let mut seeds = BTreeMap::new();
        for &id in &membership.members {
            let secret_name = names::key_secret(&name, id);
            let seed = match read(&secret_name)? {
                Some(seed) => seed,
                None if view.is_some_and(|v| v.keys.contains_key(&id)) => {
                    return Err(Error::KeyLost {
                        secret: secret_name,
                        who: format!("replica {id}"),
                    })
                }
                None => {
                    generated.push(format!("replica {id}"));
                    ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng).to_bytes()
                }
            };
            seeds.insert(id, seed);
        }
        let admin_name = names::admin_secret(&name);
        let admin = match read(&admin_name)? {
            Some(seed) => seed,
            None if view.is_some() => {
                return Err(Error::KeyLost {
                    secret: admin_name,
                    who: "the admin".to_string(),
                })
            }
            None => {
                generated.push("the admin".to_string());
                ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng).to_bytes()
            }
        };
        (Keys::from_seeds(seeds, admin), generated)
    };
    // A key that no longer matches the view would make the replica's signatures invalid to the
    // others, which they would treat as Byzantine: refuse instead.
    if let Some(view) = view {
        for (id, public) in &view.keys {
            let ours = keys.replica(*id).map(keys::public_hex);
            if ours.as_deref() != Some(public.as_str()) {
                return Err(Error::KeyMismatch(format!("replica {id}")));
            }
        }
        if view
            .admin
            .as_ref()
            .is_some_and(|a| *a != keys::public_hex(keys.admin()))
        {
            return Err(Error::KeyMismatch("the admin".to_string()));
        }
    }
    Ok((keys, generated))
}

fn owned_by<K: Resource>(obj: &K, cluster: &BftCluster) -> bool {
    let uid = cluster.meta().uid.as_deref();
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| Some(o.uid.as_str()) == uid)
}

async fn probe_members(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
    keys: &Keys,
) -> BTreeMap<i32, Probe> {
    let name = cluster.name_any();
    let http = cluster.spec.ports.http;
    let pods: BTreeMap<i32, Pod> = if ctx.probe_via == ProbeVia::PodIp {
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
        let selector = names::replica_selector(&name)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        match api.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => list
                .items
                .into_iter()
                .filter_map(|p| {
                    let id = p.labels().get(names::REPLICA_ID_LABEL)?.parse().ok()?;
                    Some((id, p))
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing replica pods");
                BTreeMap::new()
            }
        }
    } else {
        BTreeMap::new()
    };
    let probes = membership.members.iter().map(|&id| {
        let addr = match ctx.probe_via {
            ProbeVia::Dns => Some(format!(
                "{}.{}.{namespace}.svc:{http}",
                names::pod(&name, id),
                names::headless_service(&name)
            )),
            ProbeVia::PodIp => pods
                .get(&id)
                .and_then(|p| p.status.as_ref()?.pod_ip.clone())
                .map(|ip| {
                    if ip.contains(':') {
                        format!("[{ip}]:{http}")
                    } else {
                        format!("{ip}:{http}")
                    }
                }),
        };
        let key = keys.replica(id).map(keys::public_hex);
        let timeout = ctx.probe_timeout;
        async move {
            let result = match (addr, key) {
                (None, _) => Probe::Unreachable("no pod address yet".to_string()),
                (_, None) => Probe::Rejected("no key in the view".to_string()),
                (Some(addr), Some(key)) => probe::probe(&addr, id, &key, timeout).await,
            };
            (id, result)
        }
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .collect()
}

async fn apply_children(
    ctx: &Context,
    namespace: &str,
    children: crate::children::Children,
) -> Result<(), Error> {
    let params = PatchParams::apply(names::MANAGER).force();
    async fn ssa<K>(
        client: &Client,
        namespace: &str,
        params: &PatchParams,
        obj: &K,
    ) -> Result<(), Error>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Serialize
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
        <K as Resource>::DynamicType: Default,
    {
        let name = obj
            .meta()
            .name
            .clone()
            .ok_or(Error::MissingMetadata("child name"))?;
        let api: Api<K> = Api::namespaced(client.clone(), namespace);
        api.patch(&name, params, &Patch::Apply(obj)).await?;
        Ok(())
    }
    let c = &ctx.client;
    // Keys and configuration first: a pod that starts before its Secret exists only waits, but
    // one that starts with a stale view would have to be restarted.
    for s in &children.key_secrets {
        ssa(c, namespace, &params, s).await?;
    }
    ssa(c, namespace, &params, &children.admin_secret).await?;
    ssa(c, namespace, &params, &children.config_map).await?;
    ssa(c, namespace, &params, &children.headless_service).await?;
    ssa(c, namespace, &params, &children.client_service).await?;
    ssa(c, namespace, &params, &children.pod_disruption_budget).await?;
    for s in &children.stateful_sets {
        ssa(c, namespace, &params, s).await?;
    }
    Ok(())
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
