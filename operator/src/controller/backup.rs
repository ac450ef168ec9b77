//! Acting on backups and restores: the backup ConfigMap and CronJob, a Job per new value of the
//! request annotation, `status.backup` from the Jobs, and the LastBackupSucceeded and Restored
//! conditions. Bad settings and missing claims become conditions, not failed reconciles: the
//! replicas themselves are not affected by them and keep being reconciled.

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kmmr_crds::BackupStatus;

use super::*;
use crate::backup::{self, Wanted};

/// What the backup side adds to a pass's status.
pub(super) struct Observed {
    pub status: Option<BackupStatus>,
    pub conditions: Vec<Wanted>,
    /// Whether a Job was just started for a request (the Event is published by the caller).
    pub requested: Option<String>,
}

/// Reconciles spec.backup and reports spec.restoreFrom. `view` is the view.toml just applied,
/// `None` when paused (then nothing is created or deleted).
pub(super) async fn reconcile_backup(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
    view: Option<&str>,
) -> Result<Observed, Error> {
    let name = cluster.name_any();
    let previous = cluster.status.as_ref().and_then(|s| s.backup.as_ref());
    let mut conditions = Vec::new();
    if let Some(restore) = &cluster.spec.restore_from {
        conditions.push(restore_condition(ctx, cluster, namespace, membership, restore).await?);
    }
    let Some(spec) = &cluster.spec.backup else {
        // Backups switched off: the schedule and its ConfigMap go (backups already written
        // stay on the claim, and in the status). Clusters that never had backups cost no reads.
        if view.is_some() && previous.is_some() {
            let c = &ctx.client;
            let cron = backup::cron_job_name(&name);
            super::etcd_api::delete_owned::<CronJob>(c, cluster, namespace, &cron).await?;
            let cm = backup::config_map_name(&name);
            super::etcd_api::delete_owned::<ConfigMap>(c, cluster, namespace, &cm).await?;
        }
        return Ok(Observed {
            status: previous.cloned(),
            conditions,
            requested: None,
        });
    };
    let place = backup::Place::of(spec);
    let problem = match spec.validate() {
        Err(why) => Some(why),
        Ok(()) => match place {
            backup::Place::Claim(claim) => {
                let claims: Api<PersistentVolumeClaim> =
                    Api::namespaced(ctx.client.clone(), namespace);
                claims.get_opt(claim).await?.is_none().then(|| format!(
                    "PersistentVolumeClaim {claim} (spec.backup.claimName) does not exist in namespace {namespace}: create it (backup Jobs run as uid/gid 65532 and must be able to write to it); no backup runs until it exists"
                ))
            }
            backup::Place::S3(s3) => {
                s3_credentials_problem(ctx, namespace, "spec.backup.s3", &s3.credentials_secret)
                    .await?
            }
        },
    };
    let annotation = cluster
        .annotations()
        .get(backup::REQUEST_ANNOTATION)
        .map(String::as_str);
    let mut request = None;
    if let (Some(view), None) = (view, &problem) {
        let owner = crate::children::owner_reference(cluster)
            .ok_or(Error::MissingMetadata("metadata.uid"))?;
        let c = &ctx.client;
        let cm = backup::config_map(cluster, namespace, view, &membership.members, &owner);
        super::etcd_api::ssa(c, namespace, &cm).await?;
        match &spec.schedule {
            Some(schedule) => {
                let cron = backup::cron_job(cluster, namespace, spec, schedule, &owner);
                super::etcd_api::ssa(c, namespace, &cron).await?;
            }
            None => {
                let cron = backup::cron_job_name(&name);
                super::etcd_api::delete_owned::<CronJob>(c, cluster, namespace, &cron).await?;
            }
        }
        if let Some(r) = backup::pending_request(annotation, previous) {
            let job = backup::request_job(cluster, namespace, spec, r, &owner);
            let jobs: Api<Job> = Api::namespaced(c.clone(), namespace);
            let job_name = job.metadata.name.clone().unwrap_or_default();
            // Created, never patched: a Job's template is immutable, and a Job that exists
            // for this request already runs it.
            if jobs.get_opt(&job_name).await?.is_none() {
                jobs.create(&kube::api::PostParams::default(), &job).await?;
            }
            request = Some(r.to_string());
        }
    }
    let outcomes = job_outcomes(ctx, &name, namespace).await?;
    let status = backup::observe(place, &outcomes, previous, request.as_deref());
    conditions.push(backup::backup_condition(&status, problem));
    Ok(Observed {
        status: Some(status),
        conditions,
        requested: request,
    })
}

/// The finished backup Jobs of `cluster` and what their pods said.
async fn job_outcomes(
    ctx: &Context,
    name: &str,
    namespace: &str,
) -> Result<Vec<backup::Outcome>, Error> {
    let selector = format!(
        "app.kubernetes.io/instance={name},app.kubernetes.io/component={}",
        backup::COMPONENT
    );
    let lp = ListParams::default().labels(&selector);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let jobs = jobs.list(&lp).await?.items;
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let pods = pods.list(&lp).await?.items;
    Ok(jobs
        .iter()
        .filter_map(|j| backup::outcome(j, &pods))
        .collect())
}

/// Restored, from every member pod's restore step.
async fn restore_condition(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
    restore: &kmmr_crds::RestoreSpec,
) -> Result<Wanted, Error> {
    let was_restored = cluster.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == condition_types::RESTORED && c.status == "True")
    });
    if was_restored {
        return Ok(backup::restore_condition(restore, None, &[], true));
    }
    let source_problem = match (&restore.s3, &restore.claim_name) {
        (Some(s3), _) => s3_credentials_problem(
            ctx,
            namespace,
            "spec.restoreFrom.s3",
            &s3.credentials_secret,
        )
        .await?
        .map(|p| format!("{p}; the replicas cannot start until then")),
        (None, claim) => {
            let claim = claim.as_deref().unwrap_or_default();
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
            claims.get_opt(claim).await?.is_none().then(|| format!(
                "PersistentVolumeClaim {claim} (spec.restoreFrom.claimName) does not exist in the cluster's namespace: the replicas cannot start until it does"
            ))
        }
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let name = cluster.name_any();
    let mut steps = Vec::new();
    for &id in &membership.members {
        let pod = pods.get_opt(&names::pod(&name, id)).await?;
        steps.push((id, backup::restore_step(pod.as_ref())));
    }
    Ok(backup::restore_condition(
        restore,
        source_problem,
        &steps,
        false,
    ))
}

/// Why the S3 credentials Secret `name` cannot serve, if it cannot: missing, or without one of
/// the keys the pods' environment takes from it.
async fn s3_credentials_problem(
    ctx: &Context,
    namespace: &str,
    field: &str,
    name: &str,
) -> Result<Option<String>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(secret) = secrets.get_opt(name).await? else {
        return Ok(Some(format!(
            "Secret {name} ({field}.credentialsSecret) does not exist in namespace {namespace}: create it with the keys {}",
            backup::S3_CREDENTIAL_KEYS.join(" and ")
        )));
    };
    let has = |key: &str| {
        secret.data.as_ref().is_some_and(|d| d.contains_key(key))
            || secret
                .string_data
                .as_ref()
                .is_some_and(|d| d.contains_key(key))
    };
    let missing: Vec<&str> = backup::S3_CREDENTIAL_KEYS
        .iter()
        .copied()
        .filter(|k| !has(k))
        .collect();
    Ok((!missing.is_empty()).then(|| {
        format!(
            "Secret {name} ({field}.credentialsSecret) has no key {}: it needs {}",
            missing.join(" nor "),
            backup::S3_CREDENTIAL_KEYS.join(" and ")
        )
    }))
}

/// Adds the backup side's conditions to `status`, keeping a condition's lastTransitionTime
/// while its status stays, and gives the transitions to publish as Events.
pub(super) fn merge_conditions(
    status: &mut BftClusterStatus,
    previous: Option<&BftClusterStatus>,
    wanted: Vec<Wanted>,
    generation: Option<i64>,
    now: &Time,
) -> Vec<observe::Transition> {
    let mut transitions = Vec::new();
    for w in wanted {
        let state = if w.status { "True" } else { "False" };
        let prev = previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == w.type_));
        if prev.is_none_or(|p| p.status != state || p.reason != w.reason) {
            transitions.push(observe::Transition {
                warning: w.is_bad(),
                reason: w.reason.to_string(),
                note: format!("{}={state}: {}", w.type_, w.message),
            });
        }
        let condition = Condition {
            last_transition_time: match prev {
                Some(p) if p.status == state => p.last_transition_time.clone(),
                _ => now.clone(),
            },
            message: w.message,
            observed_generation: generation,
            reason: w.reason.to_string(),
            status: state.to_string(),
            type_: w.type_.to_string(),
        };
        status.conditions.retain(|c| c.type_ != condition.type_);
        status.conditions.push(condition);
    }
    transitions
}
