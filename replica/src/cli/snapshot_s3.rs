//! Backups in S3-compatible object storage: where `snapshot save|status|restore` and `local
//! --from-snapshot` take an `s3://BUCKET/KEY` (or `s3://BUCKET/PREFIX/`) instead of a path.
//!
//! An object is handled exactly as a file is: `save` uploads only a backup it built from a
//! vouched-for, digest-checked state, as one PUT or a multipart upload that becomes visible
//! only once complete, so no half backup ever shows under its key; reading one verifies it
//! (checksum, then the state's digest) with the file's own decoder and the file's messages.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Args;

use kmmr::backup::{self, Backup};
use kmmr_s3::{Client, Config, S3Url};

/// Where a backup is: on this machine, or in S3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    S3(S3Url),
}

impl std::str::FromStr for Location {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if S3Url::is_s3(s) {
            S3Url::parse(s).map(Location::S3).map_err(|e| e.to_string())
        } else {
            Ok(Location::File(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(p) => write!(f, "{}", p.display()),
            Location::S3(u) => write!(f, "{u}"),
        }
    }
}

/// How to reach S3. Credentials and region come from the standard AWS environment variables
/// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or
/// AWS_DEFAULT_REGION), never from flags, so that they stay out of process listings.
#[derive(Args, Debug, Clone, Default)]
pub struct S3Args {
    /// For s3:// backups: the S3 API's URL, such as http://minio.storage:9000 (default:
    /// AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL, then AWS S3 of the region). Buckets are
    /// addressed by path, as MinIO, Ceph and other S3-compatible stores expect.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// For s3:// backups over https: a PEM file of CA certificates to trust besides the
    /// system's (a self-hosted S3's own CA).
    #[arg(long, env = "AWS_CA_BUNDLE", value_name = "FILE")]
    pub s3_ca_file: Option<PathBuf>,
}

impl S3Args {
    pub fn client(&self) -> Result<Client> {
        let config = Config::from_env(self.s3_endpoint.as_deref(), self.s3_ca_file.as_deref())?;
        Ok(Client::new(config)?)
    }
}

/// Downloads and verifies the backup at `url`, refusing it with the message a file would get.
pub async fn read(client: &Client, url: &S3Url) -> Result<Backup> {
    let bytes = client
        .get_object(url, backup::MAX_FILE)
        .await
        .map_err(|e| refuse(&format!("reading {url}: {e}")))?;
    Backup::decode(&bytes).map_err(|e| refuse(&format!("{url}: {e}")))
}

fn refuse(why: &str) -> anyhow::Error {
    anyhow!("refusing the backup: {why}; nothing was restored or changed")
}

/// The object `b` goes to: `url` itself, or under the prefix `url` a new name.
pub fn object_for(url: &S3Url, name: &str) -> S3Url {
    if url.is_prefix() {
        S3Url {
            bucket: url.bucket.clone(),
            key: format!("{}{name}", url.key),
        }
    } else {
        url.clone()
    }
}

/// Uploads the verified backup `b` as `to`.
pub async fn upload(client: &Client, to: &S3Url, b: &Backup) -> Result<()> {
    let (head, body, sum) = b.parts();
    client
        .put_object(to, &[&head, body, &sum])
        .await
        .with_context(|| format!("the backup was verified but not stored as {to}"))
}

/// Deletes the oldest backups under the prefix `url` beyond `keep`; their names sort by time.
/// Only names `save` gives (kmmr-*.kmmr directly under the prefix) are considered.
pub async fn prune(client: &Client, url: &S3Url, keep: u32) -> Result<()> {
    let listed = client.list(&url.bucket, &url.key).await?;
    let mut keys: Vec<String> = listed
        .into_iter()
        .map(|o| o.key)
        .filter(|k| {
            // A listing is the server's word: a key outside the prefix is not ours to delete.
            k.strip_prefix(url.key.as_str()).is_some_and(|name| {
                !name.contains('/')
                    && name.starts_with(super::snapshot::BACKUP_PREFIX)
                    && name.ends_with(super::snapshot::BACKUP_SUFFIX)
            })
        })
        .collect();
    keys.sort();
    let excess = keys.len().saturating_sub(keep as usize);
    for key in &keys[..excess] {
        let old = S3Url {
            bucket: url.bucket.clone(),
            key: key.clone(),
        };
        client.delete_object(&old).await?;
        eprintln!("removed {old} (keeping the newest {keep})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_s3_urls_or_paths() {
        assert_eq!(
            "s3://b/p/".parse::<Location>(),
            Ok(Location::S3(S3Url {
                bucket: "b".into(),
                key: "p/".into()
            }))
        );
        assert_eq!(
            "backup.kmmr".parse::<Location>(),
            Ok(Location::File("backup.kmmr".into()))
        );
        assert!("s3://Bad_Bucket/k".parse::<Location>().is_err());
    }

    #[test]
    fn a_prefix_gets_a_new_name_and_a_key_is_kept() {
        let prefix = S3Url::parse("s3://b/demo/").expect("valid");
        assert_eq!(object_for(&prefix, "kmmr-x.kmmr").key, "demo/kmmr-x.kmmr");
        let key = S3Url::parse("s3://b/one.kmmr").expect("valid");
        assert_eq!(object_for(&key, "kmmr-x.kmmr").key, "one.kmmr");
    }
}
