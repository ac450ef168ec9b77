use super::*;
use k8s_openapi::api::batch::v1::JobCondition;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, PodStatus,
};
use kmmr_crds::BftClusterSpec;

fn cluster(extra: serde_json::Value) -> BftCluster {
    let mut spec = serde_json::json!({ "replicas": 4, "image": "kmmr/replica:0.1.0" });
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let spec: BftClusterSpec = serde_json::from_value(spec).unwrap();
    let mut c = BftCluster::new("demo", spec);
    c.metadata.namespace = Some("prod".into());
    c.metadata.uid = Some("5a1c0b7e-0000-4000-8000-000000000001".into());
    c
}

fn backup_spec(c: &BftCluster) -> &BackupSpec {
    c.spec.backup.as_ref().unwrap()
}

fn owner(c: &BftCluster) -> OwnerReference {
    crate::children::owner_reference(c).unwrap()
}

fn scheduled() -> BftCluster {
    cluster(serde_json::json!({
        "backup": { "claimName": "backups", "schedule": "0 */6 * * *", "keep": 3 }
    }))
}

#[test]
fn the_cron_job_runs_snapshot_save_into_the_clusters_directory_with_the_admin_key() {
    let c = scheduled();
    let cron = cron_job(&c, "prod", backup_spec(&c), "0 */6 * * *", &owner(&c));
    assert_eq!(cron.metadata.name.as_deref(), Some("demo-backup"));
    assert_eq!(cron.metadata.owner_references.as_ref().unwrap().len(), 1);
    let spec = cron.spec.unwrap();
    assert_eq!(spec.schedule, "0 */6 * * *");
    assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
    let job = spec.job_template.spec.unwrap();
    let pod = job.template.spec.unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some("kmmr/replica:0.1.0"));
    let args = container.args.clone().unwrap().join(" ");
    assert_eq!(
        args,
        "snapshot save /backup/demo/ --cluster /etc/kmmr-backup/cluster --admin-key /etc/kmmr-backup/admin/key --keep 3 --timeout 120 --report /dev/termination-log -o json"
    );
    let volumes = pod.volumes.unwrap();
    let claim = volumes
        .iter()
        .find_map(|v| v.persistent_volume_claim.as_ref())
        .unwrap();
    assert_eq!(claim.claim_name, "backups");
    // The admin key, and no replica's key.
    let secrets: Vec<_> = volumes
        .iter()
        .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
        .collect();
    assert_eq!(secrets, vec![names::admin_secret("demo")]);
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(
        container.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
}

#[test]
fn the_backup_config_map_gives_each_members_http_address_in_a_file_the_replica_parses() {
    let c = scheduled();
    let cm = config_map(&c, "prod", "id = 0\n", &[0, 2], &owner(&c));
    assert_eq!(cm.metadata.name.as_deref(), Some("demo-backup"));
    let data = cm.data.unwrap();
    assert_eq!(data["view.toml"], "id = 0\n");
    assert!(!data.contains_key("r1.toml"));
    let cfg: kmmr::node::NodeConfig = toml::from_str(&data["r2.toml"]).unwrap();
    assert_eq!(cfg.id, 2);
    assert_eq!(cfg.http_listen, "demo-2-0.demo-replicas.prod.svc:9000");
}

#[test]
fn a_request_starts_one_job_per_new_value_named_after_it() {
    let c = scheduled();
    let job = request_job(&c, "prod", backup_spec(&c), "1700000000", &owner(&c));
    let name = job.metadata.name.clone().unwrap();
    assert!(name.starts_with("demo-backup-") && name.len() == "demo-backup-".len() + 8);
    assert_eq!(name, request_job_name("demo", "1700000000"));
    assert_ne!(name, request_job_name("demo", "1700000001"));
    assert!(job.spec.unwrap().ttl_seconds_after_finished.is_some());

    let done = BackupStatus {
        last_request: Some("1".into()),
        ..BackupStatus::default()
    };
    assert_eq!(pending_request(Some("1"), Some(&done)), None);
    assert_eq!(pending_request(Some("2"), Some(&done)), Some("2"));
    assert_eq!(pending_request(Some(" "), None), None);
    assert_eq!(pending_request(None, None), None);
}

#[test]
fn a_restored_cluster_verifies_and_copies_the_backup_before_each_replica_starts() {
    let c = cluster(serde_json::json!({
        "restoreFrom": { "claimName": "backups", "file": "old/kmmr-20260101T000000Z-rev7.kmmr" }
    }));
    let keys = crate::Keys::generate(0..4);
    let children = crate::build_children(&c, &keys).unwrap();
    let pod = children.stateful_sets[1]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    let init = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(
        init.args.clone().unwrap().join(" "),
        "snapshot status /restore/old/kmmr-20260101T000000Z-rev7.kmmr --copy-to /var/lib/kmmr/initial-state.kmmr"
    );
    let restore = pod
        .volumes
        .unwrap()
        .into_iter()
        .find_map(|v| v.persistent_volume_claim)
        .unwrap();
    assert_eq!(
        (restore.claim_name.as_str(), restore.read_only),
        ("backups", Some(true))
    );
    // The replica starts from the copy on its own volume.
    let text = &children.config_map.data.as_ref().unwrap()["replica-1.toml"];
    let cfg: kmmr::node::NodeConfig = toml::from_str(text).unwrap();
    assert_eq!(
        cfg.initial_state.as_deref(),
        Some(std::path::Path::new(INITIAL_STATE))
    );

    // Without restoreFrom: no init container, no initial state.
    let plain = crate::build_children(&cluster(serde_json::json!({})), &keys).unwrap();
    let pod = plain.stateful_sets[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert!(pod.init_containers.is_none());
    assert!(!plain.config_map.data.unwrap()["replica-0.toml"].contains("initial_state"));
}

fn job(name: &str, kind: &str, at: &str) -> Job {
    let mut j = Job::default();
    j.metadata.name = Some(name.into());
    j.status = Some(k8s_openapi::api::batch::v1::JobStatus {
        conditions: Some(vec![JobCondition {
            type_: kind.into(),
            status: "True".into(),
            last_transition_time: Some(Time(at.parse().unwrap())),
            ..JobCondition::default()
        }]),
        ..Default::default()
    });
    j
}

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

fn pod_of(job: &str, message: &str, exit_code: i32) -> Pod {
    let mut p = Pod::default();
    p.metadata.labels = Some(BTreeMap::from([(
        "batch.kubernetes.io/job-name".to_string(),
        job.to_string(),
    )]));
    p.status = Some(PodStatus {
        container_statuses: Some(vec![ContainerStatus {
            name: "backup".into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code,
                    message: Some(message.into()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]),
        ..PodStatus::default()
    });
    p
}

const REPORT: &str = r#"{"file":"/backup/demo/kmmr-20261203T070000Z-rev42.kmmr","cid":41,"revision":42,"keys":10,"bytes":900,"digest":"ab12","vouchers":[0,1],"view_id":0}"#;

#[test]
fn status_shows_the_newest_backup_from_the_jobs_report_and_a_newer_failure() {
    let ok = job("demo-backup-1", "Complete", "2026-12-03T07:00:05Z");
    let pods = [pod_of("demo-backup-1", REPORT, 0)];
    let o = outcome(&ok, &pods).unwrap();
    assert!(o.succeeded);
    let status = observe(
        Place::Claim("backups"),
        std::slice::from_ref(&o),
        None,
        Some("r1"),
    );
    let b = status.last_backup.clone().unwrap();
    assert_eq!(b.file, "demo/kmmr-20261203T070000Z-rev42.kmmr");
    assert_eq!(
        (
            b.revision,
            b.keys,
            b.claim_name.as_deref(),
            b.bucket.as_deref()
        ),
        (42, 10, Some("backups"), None)
    );
    assert_eq!(b.job, "demo-backup-1");
    assert_eq!(status.last_request.as_deref(), Some("r1"));
    let cond = backup_condition(&status, None);
    assert!(
        cond.status && cond.reason == reason::BACKUP_SUCCEEDED,
        "{cond:?}"
    );
    assert!(cond.message.contains("revision 42"), "{}", cond.message);

    // A later failure shows, with what the pod said; an earlier one does not.
    let failed = job("demo-backup-2", "Failed", "2026-12-03T08:00:00Z");
    let pods = [pod_of(
        "demo-backup-2",
        "Error: no state that f+1 = 2 replicas vouch for",
        1,
    )];
    let f = outcome(&failed, &pods).unwrap();
    let status = observe(
        Place::Claim("backups"),
        std::slice::from_ref(&f),
        Some(&status),
        None,
    );
    let cond = backup_condition(&status, None);
    assert_eq!((cond.status, cond.reason), (false, reason::BACKUP_FAILED));
    assert!(
        cond.message.contains("f+1 = 2 replicas vouch"),
        "{}",
        cond.message
    );
    assert!(cond.is_bad());
    let mut old = f;
    old.time = "2026-12-03T06:00:00Z".into();
    let status = observe(Place::Claim("backups"), &[old, o], None, None);
    assert!(status.last_failure.is_none());
    // A misconfiguration wins over history.
    let cond = backup_condition(&status, Some("no claim".into()));
    assert_eq!(
        (cond.status, cond.reason),
        (false, reason::BACKUP_MISCONFIGURED)
    );
    // Unfinished Jobs are not outcomes.
    assert!(outcome(&Job::default(), &[]).is_none());
    let none = backup_condition(&BackupStatus::default(), None);
    assert!(
        none.message.contains(REQUEST_ANNOTATION),
        "{}",
        none.message
    );
}

fn restore_pod(terminated: Option<(i32, &str)>, waiting: bool) -> Pod {
    let term = |(exit_code, message): (i32, &str)| ContainerStateTerminated {
        exit_code,
        message: Some(message.into()),
        ..ContainerStateTerminated::default()
    };
    let mut status = ContainerStatus {
        name: RESTORE_CONTAINER.into(),
        ..ContainerStatus::default()
    };
    if waiting {
        status.state = Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("CrashLoopBackOff".into()),
                ..ContainerStateWaiting::default()
            }),
            ..ContainerState::default()
        });
        status.last_state = terminated.map(|t| ContainerState {
            terminated: Some(term(t)),
            ..ContainerState::default()
        });
    } else {
        status.state = terminated.map(|t| ContainerState {
            terminated: Some(term(t)),
            ..ContainerState::default()
        });
    }
    Pod {
        status: Some(PodStatus {
            init_container_statuses: Some(vec![status]),
            ..PodStatus::default()
        }),
        ..Pod::default()
    }
}

#[test]
fn a_damaged_backup_is_reported_as_refused_with_the_replicas_reason() {
    let restore = RestoreSpec {
        claim_name: Some("backups".into()),
        file: Some("demo/x.kmmr".into()),
        s3: None,
    };
    let refusal = "Error: refusing the backup: /restore/demo/x.kmmr: checksum mismatch; nothing was restored or changed";
    assert_eq!(restore_step(None), RestoreStep::Pending);
    assert_eq!(
        restore_step(Some(&restore_pod(None, false))),
        RestoreStep::Pending
    );
    assert_eq!(
        restore_step(Some(&restore_pod(Some((0, "")), false))),
        RestoreStep::Done
    );
    let crashing = restore_step(Some(&restore_pod(Some((1, refusal)), true)));
    assert_eq!(crashing, RestoreStep::Refused(refusal.into()));

    let steps = [(0, RestoreStep::Done), (1, crashing)];
    let cond = restore_condition(&restore, None, &steps, false);
    assert_eq!((cond.status, cond.reason), (false, reason::RESTORE_REFUSED));
    assert!(
        cond.message
            .contains("replica 1: Error: refusing the backup"),
        "{}",
        cond.message
    );
    assert!(cond.is_bad());

    let all = [(0, RestoreStep::Done), (1, RestoreStep::Done)];
    let cond = restore_condition(&restore, None, &all, false);
    assert_eq!(
        (cond.status, cond.reason),
        (true, reason::RESTORE_SUCCEEDED)
    );
    let half = [(0, RestoreStep::Done), (1, RestoreStep::Pending)];
    assert_eq!(
        restore_condition(&restore, None, &half, false).reason,
        reason::RESTORING
    );
    let missing = restore_condition(&restore, Some("no claim".into()), &half, false);
    assert_eq!(
        (missing.reason, missing.message.as_str()),
        (reason::RESTORE_REFUSED, "no claim")
    );
    // Sticky once every replica started from it.
    assert!(restore_condition(&restore, Some("gone".into()), &[], true).status);
}

fn s3_scheduled() -> BftCluster {
    cluster(serde_json::json!({
        "backup": {
            "s3": {
                "bucket": "kmmr-backups",
                "prefix": "prod/",
                "endpoint": "https://minio.storage:9000",
                "credentialsSecret": "s3-creds",
                "ca": { "configMapName": "minio-ca" }
            },
            "schedule": "@daily",
            "keep": 5
        }
    }))
}

fn env_of(container: &Container) -> BTreeMap<String, String> {
    container
        .env
        .iter()
        .flatten()
        .map(|e| {
            let shown = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    let r = from.secret_key_ref.as_ref().unwrap();
                    format!(
                        "secret {}/{}{}",
                        r.name,
                        r.key,
                        if r.optional == Some(true) { "?" } else { "" }
                    )
                }
                (None, None) => String::new(),
            };
            (e.name.clone(), shown)
        })
        .collect()
}

#[test]
fn s3_backup_jobs_save_under_the_prefix_with_credentials_from_the_users_secret() {
    let c = s3_scheduled();
    let cron = cron_job(&c, "prod", backup_spec(&c), "@daily", &owner(&c));
    let pod = cron
        .spec
        .unwrap()
        .job_template
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    let container = &pod.containers[0];
    assert_eq!(
        container.args.clone().unwrap().join(" "),
        "snapshot save s3://kmmr-backups/prod/demo/ --cluster /etc/kmmr-backup/cluster --admin-key /etc/kmmr-backup/admin/key --keep 5 --timeout 120 --report /dev/termination-log -o json"
    );
    let env = env_of(container);
    assert_eq!(
        env["AWS_ACCESS_KEY_ID"],
        "secret s3-creds/AWS_ACCESS_KEY_ID"
    );
    assert_eq!(
        env["AWS_SECRET_ACCESS_KEY"],
        "secret s3-creds/AWS_SECRET_ACCESS_KEY"
    );
    assert_eq!(
        env["AWS_SESSION_TOKEN"],
        "secret s3-creds/AWS_SESSION_TOKEN?"
    );
    assert_eq!(env["AWS_ENDPOINT_URL"], "https://minio.storage:9000");
    assert_eq!(env["AWS_CA_BUNDLE"], "/etc/kmmr-backup/s3-ca/ca.crt");
    assert!(!env.contains_key("AWS_REGION"));
    let volumes = pod.volumes.unwrap();
    // No claim; the CA from the ConfigMap, mounted where AWS_CA_BUNDLE points.
    assert!(volumes.iter().all(|v| v.persistent_volume_claim.is_none()));
    let ca = volumes
        .iter()
        .find_map(|v| v.config_map.as_ref().filter(|cm| cm.name == "minio-ca"));
    assert!(ca.is_some(), "{volumes:?}");
    assert!(container
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.mount_path == "/etc/kmmr-backup/s3-ca"));
}

#[test]
fn s3_reports_become_the_bucket_and_key_a_restore_names() {
    let c = s3_scheduled();
    let Some(BackupSpec { s3: Some(s3), .. }) = c.spec.backup.as_ref() else {
        panic!("an s3 backup spec");
    };
    let ok = job("demo-backup-1", "Complete", "2026-12-03T07:00:05Z");
    let report = r#"{"file":"s3://kmmr-backups/prod/demo/kmmr-20261203T070000Z-rev42.kmmr","revision":42,"keys":10,"digest":"ab12"}"#;
    let o = outcome(&ok, &[pod_of("demo-backup-1", report, 0)]).unwrap();
    let status = observe(Place::S3(s3), &[o], None, None);
    let b = status.last_backup.clone().unwrap();
    assert_eq!(
        (
            b.bucket.as_deref(),
            b.claim_name.as_deref(),
            b.file.as_str()
        ),
        (
            Some("kmmr-backups"),
            None,
            "prod/demo/kmmr-20261203T070000Z-rev42.kmmr"
        )
    );
    let cond = backup_condition(&status, None);
    assert!(
        cond.message.contains("in S3 bucket kmmr-backups"),
        "{}",
        cond.message
    );
}

#[test]
fn a_cluster_restored_from_s3_downloads_and_verifies_the_object_before_each_replica_starts() {
    let c = cluster(serde_json::json!({
        "restoreFrom": { "s3": {
            "bucket": "kmmr-backups",
            "key": "prod/demo/kmmr-20261203T070000Z-rev42.kmmr",
            "region": "eu-west-3",
            "credentialsSecret": "s3-creds"
        } }
    }));
    let keys = crate::Keys::generate(0..4);
    let children = crate::build_children(&c, &keys).unwrap();
    let pod = children.stateful_sets[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    let init = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(
        init.args.clone().unwrap().join(" "),
        "snapshot status s3://kmmr-backups/prod/demo/kmmr-20261203T070000Z-rev42.kmmr --copy-to /var/lib/kmmr/initial-state.kmmr"
    );
    let env = env_of(init);
    assert_eq!(env["AWS_REGION"], "eu-west-3");
    assert_eq!(
        env["AWS_SECRET_ACCESS_KEY"],
        "secret s3-creds/AWS_SECRET_ACCESS_KEY"
    );
    // Only the restore step gets the credentials, and no claim is mounted.
    assert!(pod.containers.iter().all(|c| c
        .env
        .iter()
        .flatten()
        .all(|e| !e.name.starts_with("AWS_"))));
    assert!(pod
        .volumes
        .iter()
        .flatten()
        .all(|v| v.persistent_volume_claim.is_none()));
    let restore = c.spec.restore_from.as_ref().unwrap();
    let cond = restore_condition(restore, None, &[(0, RestoreStep::Pending)], false);
    assert!(
        cond.message
            .contains("s3://kmmr-backups/prod/demo/kmmr-20261203T070000Z-rev42.kmmr"),
        "{}",
        cond.message
    );
}
