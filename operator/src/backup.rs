//! Backups and restores (`spec.backup`, `spec.restoreFrom`) as plain data: the objects that run
//! `kmmr-replica snapshot save` against the replicas, the restore step of a replica's pod, and
//! `status.backup` and the two conditions from what the backup Jobs and replica pods report.
//! Nothing here reads the cluster.
//!
//! Why Jobs running the replica image's own client, not the operator: `snapshot save` believes
//! no single replica (it takes the state f+1 replicas sign, from one of them, and checks its
//! digest), and a Job leaves the operator free of multi-megabyte transfers, with the usual
//! tools (`kubectl logs job/...`) to see what a backup did. The pod reports what it wrote in its
//! termination message, which the operator reads back without the pods/log permission.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, Job, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource, KeyToPath,
    PersistentVolumeClaimVolumeSource, Pod, PodSpec, PodTemplateSpec, SecretKeySelector,
    SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kmmr_crds::{
    condition_reasons as reason, condition_types as kind, BackupFailure, BackupRecord, BackupSpec,
    BackupStatus, BftCluster, RestoreSpec, S3BackupSpec, S3Connection,
};

use crate::names;

/// Annotation on a BftCluster: each new value starts one backup Job (for example a time stamp:
/// `kubectl annotate bftcluster demo kmmr.io/backup-request="$(date +%s)" --overwrite`).
pub const REQUEST_ANNOTATION: &str = "kmmr.io/backup-request";
/// Component of the backup CronJob, its Jobs and pods, and its ConfigMap.
pub const COMPONENT: &str = "backup";
/// Where a backup pod mounts the claim.
pub const BACKUP_MOUNT: &str = "/backup";
/// Where a backup pod finds view.toml and r<id>.toml (the replicas' HTTP addresses).
const CLUSTER_DIR: &str = "/etc/kmmr-backup/cluster";
/// Where a backup pod finds the admin key, the only key the replicas serve their state to.
const ADMIN_DIR: &str = "/etc/kmmr-backup/admin";
/// Where a replica pod's restore step mounts spec.restoreFrom's claim.
const RESTORE_MOUNT: &str = "/restore";
/// The verified copy of the backup on the replica's own volume, its `initial_state`: the replica
/// reads it at every start (decisions replayed from its log apply to it), so it must not depend
/// on the backup's claim staying the same.
pub const INITIAL_STATE: &str = "/var/lib/kmmr/initial-state.kmmr";
/// Name of the restore init container and of the backup container.
pub const RESTORE_CONTAINER: &str = "restore";
const BACKUP_CONTAINER: &str = "backup";
/// Where a pod reading or writing S3 finds spec...s3.ca's certificates.
const S3_CA_DIR: &str = "/etc/kmmr-backup/s3-ca";
/// The keys of the credentials Secret, given to the pod under the same names, which are the
/// standard AWS environment variables `kmmr-replica` reads.
pub const S3_CREDENTIAL_KEYS: [&str; 2] = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"];
const S3_SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";
/// How long `snapshot save` may look for a state f+1 replicas vouch for.
const SAVE_TIMEOUT_SECONDS: i64 = 120;

/// The CronJob and the requested Jobs of `cluster`.
pub fn cron_job_name(cluster: &str) -> String {
    format!("{cluster}-backup")
}

/// The ConfigMap a backup pod reads the view and the replicas' HTTP addresses from.
pub fn config_map_name(cluster: &str) -> String {
    format!("{cluster}-backup")
}

/// The Job started for one value of the request annotation: named after a hash of the value, so
/// that re-applying the same request is idempotent.
pub fn request_job_name(cluster: &str, request: &str) -> String {
    let hash = blake3::hash(request.as_bytes()).to_hex();
    format!("{cluster}-backup-{}", &hash[..8])
}

/// The directory on the claim holding `cluster`'s backups.
pub fn directory(cluster: &str) -> String {
    cluster.to_string()
}

/// Where a cluster's backups go: spec.backup.claimName or spec.backup.s3 (the schema and
/// `BackupSpec::validate` allow exactly one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place<'a> {
    Claim(&'a str),
    S3(&'a S3BackupSpec),
}

impl<'a> Place<'a> {
    pub fn of(spec: &'a BackupSpec) -> Place<'a> {
        match (&spec.s3, &spec.claim_name) {
            (Some(s3), _) => Place::S3(s3),
            (None, Some(claim)) => Place::Claim(claim),
            // Refused by the schema and by `validate`, before any Job is made.
            (None, None) => Place::Claim(""),
        }
    }
}

/// The S3 prefix of `cluster`'s backups: s3://<bucket>/<prefix><cluster>/.
pub fn s3_prefix(s3: &S3BackupSpec, cluster: &str) -> String {
    format!(
        "s3://{}/{}{cluster}/",
        s3.bucket,
        s3.prefix.as_deref().unwrap_or_default()
    )
}

/// The environment that gives `kmmr-replica` its S3 endpoint, region, credentials (from the
/// user's Secret, never copied into an object of ours) and CA.
pub fn s3_env(conn: &S3Connection) -> Vec<EnvVar> {
    let from_secret = |key: &str, optional: bool| EnvVar {
        name: key.to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: conn.credentials_secret.clone(),
                key: key.to_string(),
                optional: optional.then_some(true),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let value = |name: &str, value: String| EnvVar {
        name: name.to_string(),
        value: Some(value),
        ..EnvVar::default()
    };
    let mut env: Vec<EnvVar> = S3_CREDENTIAL_KEYS
        .iter()
        .map(|k| from_secret(k, false))
        .collect();
    env.push(from_secret(S3_SESSION_TOKEN, true));
    if let Some(region) = &conn.region {
        env.push(value("AWS_REGION", region.clone()));
    }
    if let Some(endpoint) = &conn.endpoint {
        env.push(value("AWS_ENDPOINT_URL", endpoint.clone()));
    }
    if let Some(ca) = &conn.ca {
        env.push(value("AWS_CA_BUNDLE", format!("{S3_CA_DIR}/{}", ca.key)));
    }
    env
}

/// The volume and mount of spec...s3.ca, if there is one.
pub fn s3_ca(conn: &S3Connection) -> Option<(Volume, VolumeMount)> {
    let ca = conn.ca.as_ref()?;
    let items = Some(vec![KeyToPath {
        key: ca.key.clone(),
        path: ca.key.clone(),
        mode: None,
    }]);
    let mut volume = Volume {
        name: "s3-ca".to_string(),
        ..Volume::default()
    };
    match (&ca.secret_name, &ca.config_map_name) {
        (Some(secret), _) => {
            volume.secret = Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                items,
                ..SecretVolumeSource::default()
            })
        }
        (None, Some(cm)) => {
            volume.config_map = Some(ConfigMapVolumeSource {
                name: cm.clone(),
                items,
                ..ConfigMapVolumeSource::default()
            })
        }
        (None, None) => return None,
    }
    let mount = VolumeMount {
        name: "s3-ca".to_string(),
        mount_path: S3_CA_DIR.to_string(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    Some((volume, mount))
}

/// The client side's cluster directory: the view the replicas run and, per member, the one
/// setting `snapshot save` reads from a replica's configuration, its HTTP address (the pod's
/// stable DNS name; the replicas' own files bind 0.0.0.0).
pub fn config_map(
    cluster: &BftCluster,
    namespace: &str,
    view: &str,
    members: &[i32],
    owner: &OwnerReference,
) -> ConfigMap {
    let name = cluster.metadata.name.as_deref().unwrap_or_default();
    let mut data = BTreeMap::from([("view.toml".to_string(), view.to_string())]);
    for &id in members {
        let http = names::member_address(name, namespace, id, cluster.spec.ports.http);
        // The replica's NodeConfig parses this file; only http_listen is used.
        data.insert(
            format!("r{id}.toml"),
            format!(
                "id = {id}\nkey_file = \"unused\"\nview_file = \"view.toml\"\ndata_dir = \"unused\"\nhttp_listen = \"{http}\"\n"
            ),
        );
    }
    ConfigMap {
        metadata: meta(config_map_name(name), namespace, name, owner),
        data: Some(data),
        ..ConfigMap::default()
    }
}

fn meta(object: String, namespace: &str, cluster: &str, owner: &OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(object),
        namespace: Some(namespace.to_string()),
        labels: Some(names::common_labels(cluster, COMPONENT)),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// What every backup Job runs: one try per pod, no restart in place (each failure keeps its pod
/// and message), two retries, and a deadline so a Job never hangs on a cluster without quorum.
fn job_spec(cluster: &BftCluster, spec: &BackupSpec) -> JobSpec {
    let name = cluster.metadata.name.as_deref().unwrap_or_default();
    let place = Place::of(spec);
    let destination = match place {
        // A directory: the file is named after the time and revision, kept `keep` deep.
        Place::Claim(_) => format!("{BACKUP_MOUNT}/{}/", directory(name)),
        // Likewise a prefix.
        Place::S3(s3) => s3_prefix(s3, name),
    };
    let args = vec![
        "snapshot".to_string(),
        "save".to_string(),
        destination,
        "--cluster".to_string(),
        CLUSTER_DIR.to_string(),
        "--admin-key".to_string(),
        format!("{ADMIN_DIR}/{}", crate::keys::SEED_ENTRY),
        "--keep".to_string(),
        spec.keep.to_string(),
        "--timeout".to_string(),
        SAVE_TIMEOUT_SECONDS.to_string(),
        "--report".to_string(),
        "/dev/termination-log".to_string(),
        "-o".to_string(),
        "json".to_string(),
    ];
    let mount = |volume: &str, path: &str, read_only: bool| VolumeMount {
        name: volume.to_string(),
        mount_path: path.to_string(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    };
    let mut mounts = vec![
        mount("cluster", CLUSTER_DIR, true),
        mount("admin", ADMIN_DIR, true),
    ];
    let mut volumes = vec![
        Volume {
            name: "cluster".to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "admin".to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names::admin_secret(name)),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let mut env = None;
    match place {
        Place::Claim(claim) => {
            mounts.insert(0, mount("backup", BACKUP_MOUNT, false));
            volumes.insert(
                0,
                Volume {
                    name: "backup".to_string(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.to_string(),
                        read_only: Some(false),
                    }),
                    ..Volume::default()
                },
            );
        }
        Place::S3(s3) => {
            let conn = s3.connection();
            env = Some(s3_env(&conn));
            if let Some((volume, m)) = s3_ca(&conn) {
                volumes.push(volume);
                mounts.push(m);
            }
        }
    }
    let container = Container {
        name: BACKUP_CONTAINER.to_string(),
        image: Some(cluster.spec.image.clone()),
        image_pull_policy: Some(cluster.spec.image_pull_policy.as_str().to_string()),
        command: Some(vec!["kmmr-replica".to_string()]),
        args: Some(args),
        env,
        volume_mounts: Some(mounts),
        // A failure's message is the end of what it printed (the reason it gave up).
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        security_context: Some(crate::children::restricted_container_security()),
        ..Container::default()
    };
    JobSpec {
        backoff_limit: Some(2),
        active_deadline_seconds: Some(900),
        template: PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(names::common_labels(name, COMPONENT)),
                ..ObjectMeta::default()
            }),
            spec: Some(PodSpec {
                containers: vec![container],
                volumes: Some(volumes),
                restart_policy: Some("Never".to_string()),
                // The Job talks to the replicas only, never to the Kubernetes API.
                automount_service_account_token: Some(false),
                enable_service_links: Some(false),
                security_context: Some(crate::children::restricted_pod_security()),
                affinity: cluster.spec.affinity.clone(),
                tolerations: cluster.spec.tolerations.clone(),
                ..PodSpec::default()
            }),
        },
        ..JobSpec::default()
    }
}

/// The scheduled backups. One at a time (`Forbid`): two saves at once would only race for the
/// same state. A run missed by more than ten minutes (the controller manager was down) is
/// skipped rather than run late.
pub fn cron_job(
    cluster: &BftCluster,
    namespace: &str,
    spec: &BackupSpec,
    schedule: &str,
    owner: &OwnerReference,
) -> CronJob {
    let name = cluster.metadata.name.as_deref().unwrap_or_default();
    CronJob {
        metadata: meta(cron_job_name(name), namespace, name, owner),
        spec: Some(CronJobSpec {
            schedule: schedule.to_string(),
            suspend: Some(spec.suspend),
            concurrency_policy: Some("Forbid".to_string()),
            starting_deadline_seconds: Some(600),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(names::common_labels(name, COMPONENT)),
                    ..ObjectMeta::default()
                }),
                spec: Some(job_spec(cluster, spec)),
            },
            ..CronJobSpec::default()
        }),
        ..CronJob::default()
    }
}

/// The Job one value of the request annotation starts. Kept a day after it finishes, for
/// `kubectl logs`; its outcome stays in status.backup.
pub fn request_job(
    cluster: &BftCluster,
    namespace: &str,
    spec: &BackupSpec,
    request: &str,
    owner: &OwnerReference,
) -> Job {
    let name = cluster.metadata.name.as_deref().unwrap_or_default();
    let mut metadata = meta(request_job_name(name, request), namespace, name, owner);
    metadata.annotations = Some(BTreeMap::from([(
        REQUEST_ANNOTATION.to_string(),
        request.to_string(),
    )]));
    let mut job = job_spec(cluster, spec);
    job.ttl_seconds_after_finished = Some(86_400);
    Job {
        metadata,
        spec: Some(job),
        ..Job::default()
    }
}

/// The value of the request annotation that has not been acted on yet, if any.
pub fn pending_request<'a>(
    annotation: Option<&'a str>,
    previous: Option<&BackupStatus>,
) -> Option<&'a str> {
    let value = annotation.map(str::trim).filter(|v| !v.is_empty())?;
    (previous.and_then(|p| p.last_request.as_deref()) != Some(value)).then_some(value)
}

/// A replica pod's restore step: verify spec.restoreFrom's file (checksum, then the state's
/// digest) and copy it to the replica's volume, or fail with the reason, which becomes the
/// container's termination message and the Restored condition. A replica that already holds a
/// verified copy keeps it without reading the claim's file again.
pub fn restore_init_container(cluster: &BftCluster, restore: &RestoreSpec) -> Container {
    let data = VolumeMount {
        name: "data".to_string(),
        mount_path: crate::config::DATA_DIR.to_string(),
        ..VolumeMount::default()
    };
    let (source, mut mounts, env) = match (&restore.s3, &restore.file) {
        (Some(s3), _) => {
            let conn = s3.connection();
            let mounts = s3_ca(&conn).map(|(_, m)| m).into_iter().collect();
            (
                format!("s3://{}/{}", s3.bucket, s3.key),
                mounts,
                Some(s3_env(&conn)),
            )
        }
        (None, file) => (
            format!("{RESTORE_MOUNT}/{}", file.as_deref().unwrap_or_default()),
            vec![VolumeMount {
                name: "restore".to_string(),
                mount_path: RESTORE_MOUNT.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            }],
            None,
        ),
    };
    mounts.push(data);
    Container {
        name: RESTORE_CONTAINER.to_string(),
        image: Some(cluster.spec.image.clone()),
        image_pull_policy: Some(cluster.spec.image_pull_policy.as_str().to_string()),
        command: Some(vec!["kmmr-replica".to_string()]),
        args: Some(vec![
            "snapshot".to_string(),
            "status".to_string(),
            source,
            "--copy-to".to_string(),
            INITIAL_STATE.to_string(),
        ]),
        env,
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        security_context: Some(crate::children::restricted_container_security()),
        ..Container::default()
    }
}

/// The volumes of the restore step: spec.restoreFrom's claim, read-only, or the S3 CA.
pub fn restore_volumes(restore: &RestoreSpec) -> Vec<Volume> {
    match (&restore.s3, &restore.claim_name) {
        (Some(s3), _) => s3_ca(&s3.connection())
            .map(|(v, _)| v)
            .into_iter()
            .collect(),
        (None, claim) => vec![Volume {
            name: "restore".to_string(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone().unwrap_or_default(),
                read_only: Some(true),
            }),
            ..Volume::default()
        }],
    }
}

/// What spec.restoreFrom names, for messages.
pub fn restore_source(restore: &RestoreSpec) -> String {
    match (&restore.s3, &restore.claim_name, &restore.file) {
        (Some(s3), _, _) => format!("backup s3://{}/{}", s3.bucket, s3.key),
        (None, claim, file) => format!(
            "backup {} on claim {}",
            file.as_deref().unwrap_or_default(),
            claim.as_deref().unwrap_or_default()
        ),
    }
}

/// How one backup Job ended, as the controller read it from the Job and its pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The Job.
    pub job: String,
    /// When it finished, RFC 3339.
    pub time: String,
    /// Complete (true) or Failed (false).
    pub succeeded: bool,
    /// The termination message of its last pod: the JSON report, or the error.
    pub message: String,
}

/// How a Job ended, if it has: its Complete or Failed condition.
pub fn outcome(job: &Job, pods: &[Pod]) -> Option<Outcome> {
    let name = job.metadata.name.clone()?;
    let status = job.status.as_ref()?;
    let done = status
        .conditions
        .iter()
        .flatten()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")?;
    let time = status
        .completion_time
        .as_ref()
        .or(done.last_transition_time.as_ref())
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    // The newest terminated backup container among the Job's pods.
    let mut ended: Vec<(String, String)> = pods
        .iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("batch.kubernetes.io/job-name").or(l.get("job-name")))
                == Some(&name)
        })
        .flat_map(|p| {
            p.status
                .iter()
                .flat_map(|s| s.container_statuses.iter().flatten())
        })
        .filter(|c| c.name == BACKUP_CONTAINER)
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .map(|t| {
            let at = t
                .finished_at
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default();
            (at, t.message.clone().unwrap_or_default())
        })
        .collect();
    ended.sort();
    let message = ended
        .pop()
        .map(|(_, m)| m)
        .filter(|m| !m.trim().is_empty())
        .unwrap_or_else(|| done.message.clone().unwrap_or_default());
    Some(Outcome {
        job: name,
        time,
        succeeded: done.type_ == "Complete",
        message: message.trim().to_string(),
    })
}

/// `status.backup` from the Jobs' outcomes and what the previous status recorded (Jobs are
/// deleted after a while; what they wrote is not forgotten).
pub fn observe(
    place: Place<'_>,
    outcomes: &[Outcome],
    previous: Option<&BackupStatus>,
    request: Option<&str>,
) -> BackupStatus {
    let mut status = previous.cloned().unwrap_or_default();
    if let Some(r) = request {
        status.last_request = Some(r.to_string());
    }
    let mut sorted: Vec<&Outcome> = outcomes.iter().collect();
    sorted.sort_by(|a, b| a.time.cmp(&b.time));
    for o in sorted {
        if o.succeeded {
            let Some(record) = parse_report(place, o) else {
                continue;
            };
            if status
                .last_backup
                .as_ref()
                .is_none_or(|b| b.time <= record.time)
            {
                status.last_backup = Some(record);
            }
        } else if status
            .last_failure
            .as_ref()
            .is_none_or(|f| f.time <= o.time)
        {
            status.last_failure = Some(BackupFailure {
                time: o.time.clone(),
                job: o.job.clone(),
                message: o.message.chars().take(1000).collect(),
            });
        }
    }
    // A failure older than the last success is history, not the state of backups.
    if let (Some(b), Some(f)) = (&status.last_backup, &status.last_failure) {
        if f.time < b.time {
            status.last_failure = None;
        }
    }
    status
}

/// The record of a successful Job, from the JSON report `snapshot save --report` wrote: a path
/// under the claim's mount, or an s3:// URL.
fn parse_report(place: Place<'_>, o: &Outcome) -> Option<BackupRecord> {
    let line = o
        .message
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))?;
    let report: serde_json::Value = serde_json::from_str(line).ok()?;
    let file = report["file"].as_str()?;
    let (claim_name, bucket, file) = match place {
        Place::Claim(claim) => (
            Some(claim.to_string()),
            None,
            file.strip_prefix(BACKUP_MOUNT)
                .unwrap_or(file)
                .trim_start_matches('/'),
        ),
        Place::S3(s3) => {
            let in_bucket = file
                .strip_prefix("s3://")?
                .strip_prefix(s3.bucket.as_str())?;
            (None, Some(s3.bucket.clone()), in_bucket.strip_prefix('/')?)
        }
    };
    Some(BackupRecord {
        time: o.time.clone(),
        claim_name,
        bucket,
        file: file.to_string(),
        revision: report["revision"].as_i64()?,
        keys: report["keys"].as_i64().unwrap_or(0),
        digest: report["digest"].as_str().unwrap_or_default().to_string(),
        job: o.job.clone(),
    })
}

/// A condition the backup side wants: type, status, reason, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Wanted {
    /// Whether a transition to it is a Warning Event.
    pub fn is_bad(&self) -> bool {
        matches!(
            self.reason,
            reason::BACKUP_FAILED | reason::BACKUP_MISCONFIGURED | reason::RESTORE_REFUSED
        )
    }
}

/// LastBackupSucceeded from `status.backup`, or from why backups cannot run (`problem`).
pub fn backup_condition(status: &BackupStatus, problem: Option<String>) -> Wanted {
    let wanted = |ok, reason, message| Wanted {
        type_: kind::LAST_BACKUP_SUCCEEDED,
        status: ok,
        reason,
        message,
    };
    if let Some(p) = problem {
        return wanted(false, reason::BACKUP_MISCONFIGURED, p);
    }
    match (&status.last_backup, &status.last_failure) {
        (_, Some(f)) => wanted(
            false,
            reason::BACKUP_FAILED,
            format!("backup Job {} failed at {}: {}", f.job, f.time, f.message),
        ),
        (Some(b), None) => wanted(
            true,
            reason::BACKUP_SUCCEEDED,
            format!(
                "{} {}: revision {}, {} keys, written at {} by Job {}",
                b.file,
                match (&b.claim_name, &b.bucket) {
                    (_, Some(bucket)) => format!("in S3 bucket {bucket}"),
                    (claim, None) => format!("on claim {}", claim.as_deref().unwrap_or_default()),
                },
                b.revision,
                b.keys,
                b.time,
                b.job
            ),
        ),
        (None, None) => wanted(
            false,
            reason::NO_BACKUP_YET,
            format!(
                "no backup has finished yet: on schedule, or now with `kubectl annotate bftcluster <name> {REQUEST_ANNOTATION}=\"$(date +%s)\" --overwrite`"
            ),
        ),
    }
}

/// How one replica pod's restore step stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreStep {
    /// Not run yet (no pod, pending, running).
    Pending,
    /// Verified and copied (or already there).
    Done,
    /// Refused, with the step's message.
    Refused(String),
}

/// The restore step of one replica pod, from its init container's status.
pub fn restore_step(pod: Option<&Pod>) -> RestoreStep {
    let Some(statuses) = pod
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.init_container_statuses.as_ref())
    else {
        return RestoreStep::Pending;
    };
    let Some(c) = statuses.iter().find(|c| c.name == RESTORE_CONTAINER) else {
        return RestoreStep::Pending;
    };
    let now = c.state.as_ref().and_then(|s| s.terminated.as_ref());
    if now.is_some_and(|t| t.exit_code == 0) {
        return RestoreStep::Done;
    }
    // Failed now, or waiting to retry (CrashLoopBackOff) after failing.
    let failed = now
        .filter(|t| t.exit_code != 0)
        .or_else(|| c.last_state.as_ref().and_then(|s| s.terminated.as_ref()))
        .filter(|t| t.exit_code != 0);
    match failed {
        Some(t) => RestoreStep::Refused(
            t.message
                .clone()
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| format!("exit code {}", t.exit_code)),
        ),
        None => RestoreStep::Pending,
    }
}

/// Restored, from each member's restore step. Once every replica has started from the backup
/// it stays True: later restarts keep their verified copy.
pub fn restore_condition(
    restore: &RestoreSpec,
    source_problem: Option<String>,
    steps: &[(i32, RestoreStep)],
    was_restored: bool,
) -> Wanted {
    let wanted = |ok, reason, message| Wanted {
        type_: kind::RESTORED,
        status: ok,
        reason,
        message,
    };
    let what = restore_source(restore);
    if was_restored {
        return wanted(
            true,
            reason::RESTORE_SUCCEEDED,
            format!("every replica started from {what}"),
        );
    }
    if let Some(problem) = source_problem {
        return wanted(false, reason::RESTORE_REFUSED, problem);
    }
    let refused: Vec<String> = steps
        .iter()
        .filter_map(|(id, s)| match s {
            RestoreStep::Refused(m) => Some(format!("replica {id}: {m}")),
            _ => None,
        })
        .collect();
    if !refused.is_empty() {
        return wanted(
            false,
            reason::RESTORE_REFUSED,
            format!(
                "the replicas refuse {what}, so the cluster does not start: {}. Delete this BftCluster and create it again from an intact backup",
                refused.join("; ")
            ),
        );
    }
    let done = steps
        .iter()
        .filter(|(_, s)| *s == RestoreStep::Done)
        .count();
    if !steps.is_empty() && done == steps.len() {
        wanted(
            true,
            reason::RESTORE_SUCCEEDED,
            format!("every replica started from {what}"),
        )
    } else {
        wanted(
            false,
            reason::RESTORING,
            format!(
                "{done} of {} replicas verified and copied {what}",
                steps.len()
            ),
        )
    }
}

#[cfg(test)]
mod tests;
