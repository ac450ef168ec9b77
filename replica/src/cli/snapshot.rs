//! `kmmr-replica snapshot save|status|restore`: backups of the key-value state.
//!
//! `save` believes no single replica. It reads every replica's signed status, takes a state
//! (instance and digest) that f+1 replicas of the view sign as theirs, so at least one correct
//! replica holds it, then fetches that state from one of those replicas and keeps it only if its
//! digest is the vouched one; a replica that sends anything else is skipped for the next. The
//! file is written atomically, so an interrupted save leaves no half backup. `restore` is
//! `local --from-snapshot`: every replica of a new cluster starts from the verified file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use kmmr::backup::{self, Backup, Header, ServiceKind};
use kmmr_client::files::{load_key, ViewFile};
use kmmr_client::status::{fetch_status, http_get, split_url, GetError, Status};
use kmmr_protocol::crypto::{Digest, KeyPair};
use kmmr_protocol::service::kv::{KvStore, RangeRequest, DEFAULT_HISTORY_LIMIT};
use kmmr_protocol::service::Service;
use kmmr_protocol::view::View;

use super::out::outln;
use super::render::Format;
use super::snapshot_s3::{self, Location, S3Args};
use super::status::status_url;
use super::ClusterArgs;

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub cmd: SnapshotCmd,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Save the cluster's key-value state, as f+1 replicas vouch for it, to a file or to S3.
    Save {
        /// Where to write the backup (an existing file is replaced atomically). An existing
        /// directory, or a path ending in '/', gets a new file kmmr-<UTC time>-rev<revision>.kmmr
        /// (the directory is created if missing): what scheduled backups need, with no shell.
        /// s3://BUCKET/KEY writes that object, s3://BUCKET/PREFIX/ a new object named as in a
        /// directory; credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
        file: Location,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// The admin key, which may read the replicas' state (default: <cluster>/admin.key).
        #[arg(long)]
        admin_key: Option<PathBuf>,
        /// Saving into a directory or an S3 prefix: afterwards keep only its newest N backups
        /// (kmmr-*.kmmr).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        keep: Option<u32>,
        /// Also write the JSON report to this file, for example /dev/termination-log, where
        /// Kubernetes shows it in the pod's status for the operator to read.
        #[arg(long)]
        report: Option<PathBuf>,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Verify a backup (a file or an s3:// object) and print what it holds.
    Status {
        /// A backup written by `snapshot save`: a file or s3://BUCKET/KEY.
        file: Location,
        /// Once the backup verifies, copy it to this path atomically (a replica's
        /// `initial_state`, from a pod with no shell). A path already holding a verified backup
        /// is kept as it is and the backup is not read, so a replica's restart does not depend
        /// on it.
        #[arg(long)]
        copy_to: Option<PathBuf>,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Start a new local cluster whose replicas all start from a backup (same as
    /// `local --from-snapshot BACKUP --keep-running`).
    Restore {
        /// A backup written by `snapshot save` (a file or s3://BUCKET/KEY); verified before
        /// anything is written.
        file: Location,
        #[command(flatten)]
        local: super::local::LocalArgs,
    },
}

pub async fn run(args: SnapshotArgs, format: Format) -> Result<()> {
    match args.cmd {
        SnapshotCmd::Save {
            file,
            cluster,
            admin_key,
            keep,
            report,
            s3,
        } => {
            let to = Target { file, keep, report };
            save(&to, &cluster, admin_key, &s3, format).await
        }
        SnapshotCmd::Status { file, copy_to, s3 } => match copy_to {
            Some(dest) if Backup::read(&dest).is_ok() => {
                status(&Location::File(dest), format, &s3).await
            }
            Some(dest) => {
                read_location(&file, &s3).await?.write(&dest)?;
                status(&Location::File(dest), format, &s3).await
            }
            None => status(&file, format, &s3).await,
        },
        SnapshotCmd::Restore { file, mut local } => {
            if let Some(other) = &local.from_snapshot {
                bail!("restore takes one backup: {file} or --from-snapshot {other}, not both");
            }
            local.from_snapshot = Some(file);
            local.keep_running = true;
            super::local::run(local).await
        }
    }
}

/// Reads and verifies a backup wherever it is, refused with the same messages for both.
pub async fn read_location(at: &Location, s3: &S3Args) -> Result<Backup> {
    match at {
        Location::File(path) => read_backup(path),
        Location::S3(url) => snapshot_s3::read(&s3.client()?, url).await,
    }
}

/// Reads and verifies a backup file, with the message a person needs when it is refused.
pub fn read_backup(file: &Path) -> Result<Backup> {
    Backup::read(file)
        .map_err(|e| anyhow::anyhow!("refusing the backup: {e}; nothing was restored or changed"))
}

async fn status(file: &Location, format: Format, s3: &S3Args) -> Result<()> {
    let b = read_location(file, s3).await?;
    let h = &b.header;
    match format {
        Format::Json => outln!(
            "{}",
            json!({
                "file": file.to_string(),
                "format_version": backup::VERSION,
                "service": h.service,
                "view_id": h.view_id,
                "cluster": h.cluster.to_string(),
                "cid": h.cid,
                "revision": h.revision,
                "keys": h.keys,
                "vouchers": h.vouchers,
                "digest": h.digest.to_string(),
                "bytes": b.body.len(),
            })
        ),
        Format::Text => {
            outln!("{file}: a verified KmMR backup");
            outln!(
                "  revision {}, {} keys, {} bytes of state",
                h.revision,
                h.keys,
                b.body.len()
            );
            outln!(
                "  taken at instance {} of view {}, vouched for by replicas {:?}",
                h.cid.map_or_else(|| "none".to_string(), |c| c.to_string()),
                h.view_id,
                h.vouchers
            );
            outln!("  digest {}", h.digest);
        }
    }
    Ok(())
}

/// A state f+1 replicas sign as theirs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Vouched {
    view_id: u32,
    cid: Option<u64>,
    digest: Digest,
    /// The replicas that vouch for it, ascending.
    replicas: Vec<u32>,
}

/// Where `save` writes, and what it keeps.
struct Target {
    file: Location,
    keep: Option<u32>,
    report: Option<PathBuf>,
}

impl Target {
    /// The name of a new backup of `b` in a directory or under a prefix: the time, then the
    /// revision, so that names sort by time.
    fn new_name(b: &Backup) -> String {
        let secs = kmmr_client::clock::now_us() / 1_000_000;
        format!(
            "{BACKUP_PREFIX}{}-rev{}{BACKUP_SUFFIX}",
            utc_stamp(secs),
            b.header.revision
        )
    }

    /// Writes `b` where it belongs, keeps the newest `keep`, and says where it went.
    async fn store(&self, b: &Backup, s3: Option<&kmmr_s3::Client>) -> Result<String> {
        match (&self.file, s3) {
            (Location::File(path), _) => {
                let dir = Dir(path);
                let file = if dir.is_dir() {
                    std::fs::create_dir_all(path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    path.join(Self::new_name(b))
                } else {
                    path.clone()
                };
                b.write(&file)?;
                if let Some(keep) = self.keep.filter(|_| dir.is_dir()) {
                    dir.prune(keep)?;
                }
                Ok(file.display().to_string())
            }
            (Location::S3(url), Some(client)) => {
                let to = snapshot_s3::object_for(url, &Self::new_name(b));
                snapshot_s3::upload(client, &to, b).await?;
                if let Some(keep) = self.keep.filter(|_| url.is_prefix()) {
                    snapshot_s3::prune(client, url, keep).await?;
                }
                Ok(to.to_string())
            }
            (Location::S3(url), None) => bail!("no S3 client for {url}"),
        }
    }
}

/// A directory `save` writes new backups into.
struct Dir<'a>(&'a Path);

impl Dir<'_> {
    fn is_dir(&self) -> bool {
        self.0.is_dir() || self.0.as_os_str().to_string_lossy().ends_with('/')
    }

    /// Deletes the oldest backups of the directory beyond `keep`; their names sort by time.
    fn prune(&self, keep: u32) -> Result<()> {
        let mut names: Vec<String> = std::fs::read_dir(self.0)
            .with_context(|| format!("listing {}", self.0.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(BACKUP_PREFIX) && n.ends_with(BACKUP_SUFFIX))
            .collect();
        names.sort();
        let excess = names.len().saturating_sub(keep as usize);
        for name in &names[..excess] {
            let path = self.0.join(name);
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            eprintln!("removed {} (keeping the newest {keep})", path.display());
        }
        Ok(())
    }
}

pub(super) const BACKUP_PREFIX: &str = "kmmr-";
pub(super) const BACKUP_SUFFIX: &str = ".kmmr";

/// `20260131T235959Z` for seconds since the epoch (UTC, proleptic Gregorian calendar): the
/// form S3's signatures use, so one calendar conversion serves both.
fn utc_stamp(secs: u64) -> String {
    kmmr_s3::sigv4::AmzDate::from_unix(secs).stamp
}

async fn save(
    to: &Target,
    cluster: &ClusterArgs,
    admin_key: Option<PathBuf>,
    s3: &S3Args,
    format: Format,
) -> Result<()> {
    // S3's settings are checked before any replica is asked: a missing credential is not worth
    // fetching a state for.
    let s3 = match &to.file {
        Location::S3(_) => Some(s3.client()?),
        Location::File(_) => None,
    };
    let view_path = cluster
        .view
        .clone()
        .unwrap_or_else(|| cluster.cluster.join("view.toml"));
    let view = ViewFile::load(&view_path).with_context(|| {
        format!(
            "no cluster at {}: point --cluster (or KMMR_CLUSTER) at its directory",
            cluster.cluster.display()
        )
    })?;
    let key_path = admin_key.unwrap_or_else(|| cluster.cluster.join(kmmr::cluster::ADMIN_KEY_FILE));
    let admin = load_key(&key_path).with_context(|| {
        format!(
            "reading the admin key {} (only the admin may read the replicas' state; pass \
             --admin-key)",
            key_path.display()
        )
    })?;
    if view.admin != Some(admin.public()) {
        bail!(
            "{} is not the admin key of the view in {}",
            key_path.display(),
            view_path.display()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(cluster.timeout);
    loop {
        let problem = match attempt(&cluster.cluster, &view, &admin).await {
            Ok(b) => {
                let file = to.store(&b, s3.as_ref()).await?;
                report(&file, &b, format);
                if let Some(path) = &to.report {
                    std::fs::write(path, format!("{}\n", report_json(&file, &b)))
                        .with_context(|| format!("writing the report to {}", path.display()))?;
                }
                return Ok(());
            }
            Err(problem) => problem,
        };
        if Instant::now() >= deadline {
            bail!(
                "no state that f+1 = {} replicas vouch for could be fetched within {} s: {problem}",
                view.weak(),
                cluster.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn report_json(file: &str, b: &Backup) -> serde_json::Value {
    let h = &b.header;
    json!({
        "file": file,
        "cid": h.cid,
        "revision": h.revision,
        "keys": h.keys,
        "bytes": b.body.len(),
        "digest": h.digest.to_string(),
        "vouchers": h.vouchers,
        "view_id": h.view_id,
    })
}

fn report(file: &str, b: &Backup, format: Format) {
    let h = &b.header;
    match format {
        Format::Json => outln!("{}", report_json(file, b)),
        Format::Text => outln!(
            "saved {}: revision {}, {} keys, {} bytes of state, digest {}, vouched for by \
             replicas {:?}",
            file,
            h.revision,
            h.keys,
            b.body.len(),
            h.digest.short(),
            h.vouchers
        ),
    }
}

/// One try: the statuses, a vouched state, and that state from a replica that vouched for it.
/// The error says why nothing was saved this time (state moving on, replicas down or lying).
async fn attempt(dir: &Path, view: &View, admin: &KeyPair) -> Result<Backup, String> {
    let statuses = signed_statuses(dir, view).await;
    let Some(vouched) = choose(view, &statuses) else {
        return Err(format!(
            "{} of {} replicas answered with a verified status, and no f+1 of them report the \
             same state",
            statuses.len(),
            view.n()
        ));
    };
    let mut problems = Vec::new();
    for &id in &vouched.replicas {
        match fetch_state(dir, id, admin, &vouched).await {
            Ok(body) => return build(view, &vouched, body),
            Err(e) => {
                eprintln!("warning: replica {id}: {e}; trying another replica");
                problems.push(format!("replica {id}: {e}"));
            }
        }
    }
    Err(problems.join("; "))
}

/// The statuses that verify against the view, by replica.
async fn signed_statuses(dir: &Path, view: &View) -> BTreeMap<u32, Status> {
    let mut reads = tokio::task::JoinSet::new();
    for m in view.members.clone() {
        let url = status_url(dir, m.id.0);
        reads.spawn(async move { (m.clone(), fetch_status(&url).await) });
    }
    let mut out = BTreeMap::new();
    while let Some(joined) = reads.join_next().await {
        let Ok((m, Ok(s))) = joined else { continue };
        if s.verify(&m.key) && s.status.id == m.id.0 {
            out.insert(m.id.0, s.status);
        }
    }
    out
}

/// The state, of the newest instance, that at least f+1 replicas report: at most f lie, so one
/// of them is correct and the digest is the cluster's state at that instance.
fn choose(view: &View, statuses: &BTreeMap<u32, Status>) -> Option<Vouched> {
    let mut groups: BTreeMap<(u32, Option<u64>, [u8; 32]), Vec<u32>> = BTreeMap::new();
    for (id, s) in statuses {
        let Some(digest) = parse_digest(&s.state_digest) else {
            continue;
        };
        if s.transferring || !s.member || s.view_id != view.id.0 {
            continue;
        }
        groups
            .entry((s.view_id, s.digest_cid(), digest))
            .or_default()
            .push(*id);
    }
    groups
        .into_iter()
        .filter(|(_, ids)| ids.len() >= view.weak())
        .max_by_key(|((_, cid, _), _)| *cid)
        .map(|((view_id, cid, digest), replicas)| Vouched {
            view_id,
            cid,
            digest: Digest(digest),
            replicas,
        })
}

fn parse_digest(hex_digest: &str) -> Option<[u8; 32]> {
    hex::decode(hex_digest).ok()?.try_into().ok()
}

/// Why a replica's state was not taken.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("{0}")]
    Http(#[from] GetError),
    #[error("its answer is not a served state")]
    NotServed,
    #[error("it moved on to instance {got:?} from the vouched {vouched:?}")]
    MovedOn {
        got: Option<u64>,
        vouched: Option<u64>,
    },
    #[error("it sent a state whose digest {got} is not the {vouched} that f+1 replicas vouch for")]
    WrongDigest { got: String, vouched: String },
}

/// The state replica `id` serves, if it is the vouched one.
async fn fetch_state(
    dir: &Path,
    id: u32,
    admin: &KeyPair,
    vouched: &Vouched,
) -> Result<Vec<u8>, FetchError> {
    let status = status_url(dir, id);
    let (addr, _) = split_url(&status)?;
    let now_ms = kmmr_client::clock::now_us() / 1000;
    let path = format!("/snapshot?token={}", backup::read_token(admin, id, now_ms));
    let max = usize::try_from(backup::MAX_BODY)
        .unwrap_or(usize::MAX)
        .saturating_add(backup::SERVED_PREFIX_LEN);
    let mut served = http_get(addr, &path, FETCH_TIMEOUT, max).await?;
    let (cid, body) = backup::decode_served(&served).ok_or(FetchError::NotServed)?;
    if cid != vouched.cid {
        return Err(FetchError::MovedOn {
            got: cid,
            vouched: vouched.cid,
        });
    }
    let digest = Digest::of(body);
    if digest != vouched.digest {
        return Err(FetchError::WrongDigest {
            got: digest.short(),
            vouched: vouched.digest.short(),
        });
    }
    // The state in place, without a second copy of it.
    served.drain(..backup::SERVED_PREFIX_LEN);
    Ok(served)
}

/// How long fetching one replica's state may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// The backup of a fetched, digest-checked state, with what the store says about itself.
fn build(view: &View, vouched: &Vouched, body: Vec<u8>) -> Result<Backup, String> {
    let mut store = KvStore::new(DEFAULT_HISTORY_LIMIT);
    // Vouched for by f+1 replicas, so it restores; a failure here is a bug, said as such.
    store
        .restore(&body)
        .map_err(|e| format!("the vouched state does not restore: {e}"))?;
    let all = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        count_only: true,
        ..RangeRequest::default()
    };
    let keys = store.range(&all).map(|r| r.count).unwrap_or(0);
    let header = Header {
        service: ServiceKind::Kv,
        view_id: vouched.view_id,
        cluster: backup::cluster_fingerprint(view),
        cid: vouched.cid,
        revision: store.revision(),
        keys,
        vouchers: vouched.replicas.clone(),
        digest: vouched.digest,
    };
    Backup::new(header, body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmmr_protocol::view::Member;
    use kmmr_protocol::wire::ids::{ReplicaId, ViewId};

    fn view() -> View {
        let members = (0..4)
            .map(|i| Member {
                id: ReplicaId(i),
                address: format!("127.0.0.1:{}", 1000 + i),
                key: KeyPair::from_seed([i as u8; 32]).public(),
            })
            .collect();
        View::new(ViewId(2), 1, members).expect("a valid view")
    }

    fn status(cid: u64, digest: u8) -> Status {
        Status {
            view_id: 2,
            last_decided: Some(cid),
            state_digest: hex::encode([digest; 32]),
            member: true,
            ..Status::default()
        }
    }

    #[test]
    fn backup_names_carry_the_utc_time_and_sort_by_it() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_798_761_599), "20261231T235959Z");
        assert!(utc_stamp(1_000_000_000) < utc_stamp(1_700_000_000));
    }

    #[test]
    fn one_replica_alone_cannot_choose_the_state() {
        // Replica 0 claims a newer state; only f+1 = 2 matching statuses count.
        let statuses = BTreeMap::from([
            (0, status(9, 0xee)),
            (1, status(5, 0xaa)),
            (2, status(5, 0xaa)),
            (3, status(5, 0xbb)),
        ]);
        let v = choose(&view(), &statuses).expect("f+1 agree on one state");
        assert_eq!(
            (v.cid, v.digest, v.replicas),
            (Some(5), Digest([0xaa; 32]), vec![1, 2])
        );
    }

    #[test]
    fn the_newest_state_f_plus_one_report_is_chosen() {
        let statuses = BTreeMap::from([
            (0, status(5, 0xaa)),
            (1, status(5, 0xaa)),
            (2, status(6, 0xcc)),
            (3, status(6, 0xcc)),
        ]);
        let v = choose(&view(), &statuses).expect("a vouched state");
        assert_eq!((v.cid, v.replicas), (Some(6), vec![2, 3]));
    }

    #[test]
    fn statuses_of_another_view_in_transfer_or_with_a_malformed_digest_do_not_vouch() {
        let mut other_view = status(5, 0xaa);
        other_view.view_id = 3;
        let mut transferring = status(5, 0xaa);
        transferring.transferring = true;
        let mut malformed = status(5, 0xaa);
        malformed.state_digest = "not hex".into();
        let statuses = BTreeMap::from([
            (0, status(5, 0xaa)),
            (1, other_view),
            (2, transferring),
            (3, malformed),
        ]);
        assert_eq!(choose(&view(), &statuses), None);
    }
}
