//! Backups and restores of a cluster's key-value state: `spec.backup` (where the operator's
//! backup Jobs write, a PersistentVolumeClaim or an S3 bucket, on a schedule or on request),
//! `spec.restoreFrom` (a new cluster whose replicas start from a backup file or object),
//! `status.backup`, and the checks the schema cannot make (a cron schedule's fields) in Rust,
//! for the operator to report.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

pub(crate) const MSG_SCHEDULE: &str =
    "spec.backup.schedule must be a cron schedule of 5 fields (minute hour day-of-month month day-of-week, for example \"0 */6 * * *\") or one of @hourly, @daily, @midnight, @weekly, @monthly, @yearly, @annually";
pub(crate) const MSG_RESTORE_IMMUTABLE: &str =
    "spec.restoreFrom can only be set when the BftCluster is created, and not changed: the replicas' state starts from it once; create a new BftCluster to restore another backup";
pub(crate) const MSG_RESTORE_FILE: &str =
    "spec.restoreFrom.file must be a path relative to the claim's root, without '..' (as status.backup.lastBackup.file shows it, for example demo/kmmr-20260101T000000Z-rev42.kmmr)";
pub(crate) const MSG_BACKUP_ONE_PLACE: &str =
    "spec.backup needs exactly one place for backups: claimName (a PersistentVolumeClaim) or s3 (a bucket of S3-compatible object storage), not both";
pub(crate) const MSG_RESTORE_ONE_SOURCE: &str =
    "spec.restoreFrom needs exactly one backup: claimName with file (a file on a PersistentVolumeClaim) or s3 with bucket and key (an object), not both";
pub(crate) const MSG_S3_ENDPOINT: &str =
    "s3.endpoint must be a URL of the form http(s)://host[:port], without a path (buckets are addressed by path, as MinIO, Ceph and other S3-compatible stores expect)";
pub(crate) const MSG_S3_BUCKET: &str =
    "s3.bucket must be an S3 bucket name: 3 to 63 lower-case letters, digits, '.' and '-'";
pub(crate) const MSG_S3_CA: &str = "s3.ca needs exactly one of secretName or configMapName";

/// The most backups one cluster keeps on its claim.
pub const MAX_KEEP: i32 = 1000;

/// Backups of the key-value state into a PersistentVolumeClaim or an S3 bucket.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.claimName) != has(self.s3)").message(MSG_BACKUP_ONE_PLACE))]
pub struct BackupSpec {
    /// PersistentVolumeClaim, in the cluster's namespace, that backup Jobs write to, under a
    /// directory named after the cluster: <claim>/<cluster>/kmmr-<UTC time>-rev<revision>.kmmr.
    /// Created by you (the operator never deletes it), so backups outlive the cluster. Jobs
    /// run as uid/gid 65532 and must be able to write to it. Exactly one of claimName and s3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: Option<String>,

    /// An S3 bucket (AWS S3 or S3-compatible: MinIO, Ceph, ...) that backup Jobs upload to, as
    /// <prefix><cluster>/kmmr-<UTC time>-rev<revision>.kmmr. Exactly one of claimName and s3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3BackupSpec>,

    /// Cron schedule of backups in the controller manager's time zone (a CronJob named
    /// <cluster>-backup), such as "0 */6 * * *" or "@daily". Unset: backups only on request,
    /// by setting the annotation kmmr.io/backup-request to a new value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 100))]
    #[x_kube(validation = Rule::new("self.matches('^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|[^ ]+( +[^ ]+){4})$')").message(MSG_SCHEDULE))]
    pub schedule: Option<String>,

    /// How many backups to keep for this cluster, 1 to 1000 (default 7): each backup Job
    /// deletes the oldest beyond this (files on the claim, objects under the S3 prefix) after
    /// writing its own.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep: i32,

    /// Stop scheduled backups (the CronJob is suspended); requested ones still run.
    #[serde(default)]
    pub suspend: bool,
}

/// Where backups go in S3.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct S3BackupSpec {
    /// The bucket. It must exist: backups never create one.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$')").message(MSG_S3_BUCKET))]
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,

    /// Prepended to every key, for example "kmmr/" (default: none): objects are
    /// <prefix><cluster>/kmmr-<UTC time>-rev<revision>.kmmr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub prefix: Option<String>,

    /// The S3 API's URL, http(s)://host[:port], for example http://minio.storage:9000. Unset:
    /// AWS S3 of the region. Buckets are addressed by path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#@]+/?$')").message(MSG_S3_ENDPOINT))]
    #[schemars(length(min = 8, max = 512))]
    pub endpoint: Option<String>,

    /// The region requests are signed for (default us-east-1; MinIO accepts us-east-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,

    /// A Secret, in the cluster's namespace, with the keys AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials), given to the
    /// backup Jobs (or the restoring replicas) as environment variables.
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: String,

    /// A CA certificate (PEM) to trust for an https endpoint besides the system's roots, for
    /// a self-hosted S3 with its own CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<S3CaSpec>,
}

/// How to reach S3 and as whom: the fields spec.backup.s3 and spec.restoreFrom.s3 share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Connection {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials_secret: String,
    pub ca: Option<S3CaSpec>,
}

/// A PEM file in a Secret or a ConfigMap of the cluster's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretName) != has(self.configMapName)").message(MSG_S3_CA))]
pub struct S3CaSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub config_map_name: Option<String>,
    /// The key holding the PEM certificates (default ca.crt).
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

macro_rules! connection {
    ($t:ty) => {
        impl $t {
            /// Endpoint, region, credentials and CA.
            pub fn connection(&self) -> S3Connection {
                S3Connection {
                    endpoint: self.endpoint.clone(),
                    region: self.region.clone(),
                    credentials_secret: self.credentials_secret.clone(),
                    ca: self.ca.clone(),
                }
            }
        }
    };
}
connection!(S3BackupSpec);
connection!(S3RestoreSpec);

fn default_ca_key() -> String {
    "ca.crt".to_string()
}

/// A backup object in S3 that a new cluster starts from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct S3RestoreSpec {
    /// The bucket.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$')").message(MSG_S3_BUCKET))]
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,

    /// The object's key, as status.backup.lastBackup.file of the cluster that wrote it shows
    /// it, for example demo/kmmr-20260101T000000Z-rev42.kmmr.
    #[schemars(length(min = 1, max = 1024))]
    pub key: String,

    /// The S3 API's URL, http(s)://host[:port], for example http://minio.storage:9000. Unset:
    /// AWS S3 of the region. Buckets are addressed by path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#@]+/?$')").message(MSG_S3_ENDPOINT))]
    #[schemars(length(min = 8, max = 512))]
    pub endpoint: Option<String>,

    /// The region requests are signed for (default us-east-1; MinIO accepts us-east-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,

    /// A Secret, in the cluster's namespace, with the keys AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials), given to the
    /// backup Jobs (or the restoring replicas) as environment variables.
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: String,

    /// A CA certificate (PEM) to trust for an https endpoint besides the system's roots, for
    /// a self-hosted S3 with its own CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<S3CaSpec>,
}

fn default_keep() -> i32 {
    7
}

/// A backup a new cluster starts from: a file on a claim, or an object in S3.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.claimName) ? (has(self.file) && !has(self.s3)) : (has(self.s3) && !has(self.file))").message(MSG_RESTORE_ONE_SOURCE))]
pub struct RestoreSpec {
    /// PersistentVolumeClaim, in the cluster's namespace, holding the backup. Every replica's
    /// pod mounts it read-only at start-up, so on more than one node it must allow that
    /// (ReadOnlyMany or ReadWriteMany). It must stay while the cluster exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: Option<String>,

    /// Path of the backup file inside the claim, as status.backup.lastBackup.file of the
    /// cluster that wrote it shows it. Each replica verifies it (checksum and state digest)
    /// before starting from it; a damaged file is refused and the cluster does not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message(MSG_RESTORE_FILE))]
    #[schemars(length(min = 1, max = 1024))]
    pub file: Option<String>,

    /// An S3 object holding the backup, verified by each replica as a file is. The replicas
    /// download it once, at their first start; later starts use their verified copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3RestoreSpec>,
}

/// Backups as observed from the backup Jobs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// The newest backup that was written and verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupRecord>,
    /// The newest backup Job that failed, if it is newer than lastBackup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<BackupFailure>,
    /// The last value of the kmmr.io/backup-request annotation a Job was started for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_request: Option<String>,
}

/// One backup file or object.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackupRecord {
    /// When its Job finished, RFC 3339.
    pub time: String,
    /// The claim it is on (backups to a claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// The bucket it is in (backups to S3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// Its path inside the claim (spec.restoreFrom.file of a cluster restored from it), or its
    /// key in the bucket (spec.restoreFrom.s3.key).
    pub file: String,
    /// The store's revision it holds.
    pub revision: i64,
    /// How many keys it holds.
    pub keys: i64,
    /// The state digest that f+1 replicas vouched for, hex.
    pub digest: String,
    /// The Job that wrote it.
    pub job: String,
}

/// A backup Job that failed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackupFailure {
    /// When the Job failed, RFC 3339.
    pub time: String,
    /// The Job.
    pub job: String,
    /// What it said.
    pub message: String,
}

impl BackupSpec {
    /// The check the schema's pattern cannot make: every cron field in range.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(s) = &self.schedule {
            check_schedule(s)
                .map_err(|why| format!("spec.backup.schedule {s:?}: {why}; {MSG_SCHEDULE}"))?;
        }
        if self.claim_name.is_some() == self.s3.is_some() {
            return Err(MSG_BACKUP_ONE_PLACE.to_string());
        }
        if !(1..=MAX_KEEP).contains(&self.keep) {
            return Err(format!(
                "spec.backup.keep = {}: keep between 1 and {MAX_KEEP} backups",
                self.keep
            ));
        }
        Ok(())
    }
}

impl RestoreSpec {
    /// The schema's rules on the source, in Rust.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.claim_name, &self.file, &self.s3) {
            (Some(_), Some(file), None) => {
                if file.is_empty() || file.starts_with('/') || file.contains("..") {
                    return Err(format!(
                        "spec.restoreFrom.file {file:?}: {MSG_RESTORE_FILE}"
                    ));
                }
                Ok(())
            }
            (None, None, Some(_)) => Ok(()),
            _ => Err(MSG_RESTORE_ONE_SOURCE.to_string()),
        }
    }
}

const DESCRIPTORS: [&str; 7] = [
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];
const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// A schedule as the CronJob controller parses it (robfig/cron's standard parser: five fields of
/// comma-separated `*`, `?`, `n` or `a-b`, each with an optional `/step`; names for months and
/// days), so that a typo is reported on the BftCluster rather than by the CronJob's apply.
pub fn check_schedule(schedule: &str) -> Result<(), String> {
    let s = schedule.trim();
    if s.starts_with('@') {
        return if DESCRIPTORS.contains(&s) {
            Ok(())
        } else {
            Err(format!("unknown descriptor {s}"))
        };
    }
    if s.starts_with("TZ=") || s.starts_with("CRON_TZ=") {
        return Err("time zones in the schedule are not supported by CronJobs".into());
    }
    let fields: Vec<&str> = s.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!("{} fields, not 5", fields.len()));
    }
    let spec: [(&str, u32, u32, &[&str], u32); 5] = [
        ("minute", 0, 59, &[], 0),
        ("hour", 0, 23, &[], 0),
        ("day of month", 1, 31, &[], 0),
        ("month", 1, 12, &MONTHS, 1),
        ("day of week", 0, 7, &DAYS, 0),
    ];
    for (field, (what, min, max, names, first)) in fields.iter().zip(spec) {
        for item in field.split(',') {
            check_item(item, min, max, names, first)
                .map_err(|why| format!("{what} {item:?}: {why}"))?;
        }
    }
    Ok(())
}

fn check_item(item: &str, min: u32, max: u32, names: &[&str], first: u32) -> Result<(), String> {
    let (range, step) = match item.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (item, None),
    };
    if let Some(step) = step {
        match step.parse::<u32>() {
            Ok(n) if n >= 1 => {}
            _ => return Err(format!("step {step:?} is not a positive number")),
        }
    }
    if range == "*" || range == "?" {
        return Ok(());
    }
    let value = |v: &str| -> Result<u32, String> {
        let n = match v.parse::<u32>() {
            Ok(n) => n,
            Err(_) => names
                .iter()
                .position(|name| name.eq_ignore_ascii_case(v))
                .map(|i| i as u32 + first)
                .ok_or_else(|| format!("{v:?} is not a number"))?,
        };
        if (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{n} is outside {min}-{max}"))
        }
    };
    match range.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (value(a)?, value(b)?);
            if a > b {
                return Err(format!("range {a}-{b} runs backwards"));
            }
        }
        None => {
            value(range)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_the_cronjob_controller_accepts_pass() {
        for s in [
            "0 */6 * * *",
            "*/15 * * * *",
            "30 2 * * MON-FRI",
            "0 0 1,15 * *",
            "0 12 * JAN,jul sun",
            "5 4 * * 7",
            "@daily",
            "@hourly",
        ] {
            assert_eq!(check_schedule(s), Ok(()), "{s}");
        }
    }

    #[test]
    fn bad_schedules_name_the_field_and_the_problem() {
        for (s, says) in [
            ("every day", "2 fields, not 5"),
            ("60 * * * *", "minute \"60\": 60 is outside 0-59"),
            ("0 24 * * *", "hour \"24\""),
            ("0 0 0 * *", "day of month \"0\""),
            ("0 0 * 13 *", "month \"13\""),
            ("0 0 * * FUNDAY", "day of week \"FUNDAY\""),
            ("*/0 * * * *", "step \"0\""),
            ("5-1 * * * *", "runs backwards"),
            ("@fortnightly", "unknown descriptor"),
            ("TZ=UTC 0 * * * *", "time zones"),
        ] {
            let err = check_schedule(s).unwrap_err();
            assert!(err.contains(says), "{s}: {err}");
        }
        let spec = BackupSpec {
            claim_name: Some("b".into()),
            s3: None,
            schedule: Some("61 * * * *".into()),
            keep: 7,
            suspend: false,
        };
        let err = spec.validate().unwrap_err();
        assert!(
            err.contains("spec.backup.schedule") && err.contains(MSG_SCHEDULE),
            "{err}"
        );
    }

    #[test]
    fn restore_files_must_stay_inside_the_claim() {
        let r = |file: &str| RestoreSpec {
            claim_name: Some("b".into()),
            file: Some(file.into()),
            s3: None,
        };
        assert_eq!(r("demo/kmmr-1-rev2.kmmr").validate(), Ok(()));
        for bad in ["/etc/passwd", "../x", "a/../../x", ""] {
            assert!(
                r(bad).validate().unwrap_err().contains(MSG_RESTORE_FILE),
                "{bad}"
            );
        }
    }

    #[test]
    fn backups_go_to_exactly_one_place_and_restores_come_from_one() {
        let s3 = S3BackupSpec {
            bucket: "kmmr-backups".into(),
            prefix: None,
            endpoint: None,
            region: None,
            credentials_secret: "s3-creds".into(),
            ca: None,
        };
        let spec = |claim: Option<&str>, s3: Option<S3BackupSpec>| BackupSpec {
            claim_name: claim.map(str::to_string),
            s3,
            schedule: None,
            keep: 7,
            suspend: false,
        };
        assert_eq!(spec(None, Some(s3.clone())).validate(), Ok(()));
        assert_eq!(spec(Some("b"), None).validate(), Ok(()));
        for bad in [spec(None, None), spec(Some("b"), Some(s3))] {
            assert_eq!(bad.validate(), Err(MSG_BACKUP_ONE_PLACE.to_string()));
        }
        let object = S3RestoreSpec {
            bucket: "kmmr-backups".into(),
            key: "demo/kmmr-1-rev2.kmmr".into(),
            endpoint: None,
            region: None,
            credentials_secret: "s3-creds".into(),
            ca: None,
        };
        let restore =
            |claim: Option<&str>, file: Option<&str>, s3: Option<S3RestoreSpec>| RestoreSpec {
                claim_name: claim.map(str::to_string),
                file: file.map(str::to_string),
                s3,
            };
        assert_eq!(restore(None, None, Some(object.clone())).validate(), Ok(()));
        for bad in [
            restore(None, None, None),
            restore(Some("b"), None, None),
            restore(Some("b"), Some("f"), Some(object.clone())),
            restore(None, Some("f"), Some(object)),
        ] {
            assert_eq!(bad.validate(), Err(MSG_RESTORE_ONE_SOURCE.to_string()));
        }
    }
}
