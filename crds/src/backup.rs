//! Backups and restores of a cluster's key-value state: `spec.backup` (where the operator's
//! backup Jobs write, on a schedule or on request), `spec.restoreFrom` (a new cluster whose
//! replicas start from a backup file), `status.backup`, and the checks the schema cannot make
//! (a cron schedule's fields) in Rust, for the operator to report.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

pub(crate) const MSG_SCHEDULE: &str =
    "spec.backup.schedule must be a cron schedule of 5 fields (minute hour day-of-month month day-of-week, for example \"0 */6 * * *\") or one of @hourly, @daily, @midnight, @weekly, @monthly, @yearly, @annually";
pub(crate) const MSG_RESTORE_IMMUTABLE: &str =
    "spec.restoreFrom can only be set when the BftCluster is created, and not changed: the replicas' state starts from it once; create a new BftCluster to restore another backup";
pub(crate) const MSG_RESTORE_FILE: &str =
    "spec.restoreFrom.file must be a path relative to the claim's root, without '..' (as status.backup.lastBackup.file shows it, for example demo/kmmr-20260101T000000Z-rev42.kmmr)";

/// The most backups one cluster keeps on its claim.
pub const MAX_KEEP: i32 = 1000;

/// Backups of the key-value state into a PersistentVolumeClaim.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// PersistentVolumeClaim, in the cluster's namespace, that backup Jobs write to, under a
    /// directory named after the cluster: <claim>/<cluster>/kmmr-<UTC time>-rev<revision>.kmmr.
    /// Created by you (the operator never deletes it), so backups outlive the cluster. Jobs
    /// run as uid/gid 65532 and must be able to write to it.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,

    /// Cron schedule of backups in the controller manager's time zone (a CronJob named
    /// <cluster>-backup), such as "0 */6 * * *" or "@daily". Unset: backups only on request,
    /// by setting the annotation kmmr.io/backup-request to a new value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 100))]
    #[x_kube(validation = Rule::new("self.matches('^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|[^ ]+( +[^ ]+){4})$')").message(MSG_SCHEDULE))]
    pub schedule: Option<String>,

    /// How many backup files to keep on the claim for this cluster, 1 to 1000 (default 7):
    /// each backup Job deletes the oldest beyond this after writing its own.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep: i32,

    /// Stop scheduled backups (the CronJob is suspended); requested ones still run.
    #[serde(default)]
    pub suspend: bool,
}

fn default_keep() -> i32 {
    7
}

/// A backup file a new cluster starts from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// PersistentVolumeClaim, in the cluster's namespace, holding the backup. Every replica's
    /// pod mounts it read-only at start-up, so on more than one node it must allow that
    /// (ReadOnlyMany or ReadWriteMany). It must stay while the cluster exists.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,

    /// Path of the backup file inside the claim, as status.backup.lastBackup.file of the
    /// cluster that wrote it shows it. Each replica verifies it (checksum and state digest)
    /// before starting from it; a damaged file is refused and the cluster does not start.
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message(MSG_RESTORE_FILE))]
    #[schemars(length(min = 1, max = 1024))]
    pub file: String,
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

/// One backup file.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackupRecord {
    /// When its Job finished, RFC 3339.
    pub time: String,
    /// The claim it is on.
    pub claim_name: String,
    /// Its path inside the claim: spec.restoreFrom.file of a cluster restored from it.
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
    /// The schema's rule on the file, in Rust.
    pub fn validate(&self) -> Result<(), String> {
        if self.file.is_empty() || self.file.starts_with('/') || self.file.contains("..") {
            return Err(format!(
                "spec.restoreFrom.file {:?}: {MSG_RESTORE_FILE}",
                self.file
            ));
        }
        Ok(())
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
            claim_name: "b".into(),
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
            claim_name: "b".into(),
            file: file.into(),
        };
        assert_eq!(r("demo/kmmr-1-rev2.kmmr").validate(), Ok(()));
        for bad in ["/etc/passwd", "../x", "a/../../x", ""] {
            assert!(
                r(bad).validate().unwrap_err().contains(MSG_RESTORE_FILE),
                "{bad}"
            );
        }
    }
}
