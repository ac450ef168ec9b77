//! The client key of one CLI run.
//!
//! Two constraints meet here. Replicas keep one session per client key and a newer session
//! ends the older ones, so two commands running at once must not share a key (a `put` beside a
//! `watch` ended the watch). And the session table is replicated state that keeps every key it
//! has seen with its last reply, so a new key per run would grow it by one entry, and up to a
//! cached reply of megabytes, with every command a script ever ran.
//!
//! So a cluster directory holds a pool of keys, `client-keys/<i>.key`, each taken by a run
//! through a lock file holding its pid: a run uses the first key no live process holds. The
//! table grows with how many commands ever ran at once, not with how many ran. A lock left by a
//! process that died is taken over. Two runs that take over the same dead lock at the same
//! instant could end up sharing a key; the loser's requests then fail with the replicas'
//! "newer session" reason, never silently.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Result;
use kmmr_protocol::crypto::KeyPair;

use super::load_or_create_key;

/// Keys in a pool: more commands at once than this get keys of their own.
const POOL: usize = 64;

/// The locks this process holds, released by [`release_all`].
static HELD: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A key for this run from the pool of `cluster`, or a new key when the pool cannot be used
/// (the directory is not writable, or every pooled key is in use).
pub fn take(cluster: &Path) -> KeyPair {
    match take_pooled(cluster) {
        Ok(Some(key)) => key,
        Ok(None) | Err(_) => KeyPair::generate(&mut rand::rngs::OsRng),
    }
}

fn take_pooled(cluster: &Path) -> Result<Option<KeyPair>> {
    let dir = cluster.join("client-keys");
    std::fs::create_dir_all(&dir)?;
    for i in 0..POOL {
        let lock = dir.join(format!("{i}.lock"));
        if !try_lock(&lock)? {
            continue;
        }
        match load_or_create_key(&dir.join(format!("{i}.key"))) {
            Ok(key) => {
                HELD.lock().unwrap_or_else(|e| e.into_inner()).push(lock);
                return Ok(Some(key));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&lock);
                return Err(e);
            }
        }
    }
    Ok(None)
}

/// Takes the lock file at `path`, taking over one whose process is gone.
fn try_lock(path: &Path) -> Result<bool> {
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(mut f) => {
                write!(f, "{}", std::process::id())?;
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(path).unwrap_or_default();
                if holder_alive(holder.trim()) {
                    return Ok(false);
                }
                let _ = std::fs::remove_file(path);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

/// Whether the process named in a lock file still runs. Where that cannot be told (no /proc),
/// or the file is being written, it counts as running: a key in use is never taken.
fn holder_alive(pid: &str) -> bool {
    let proc = Path::new("/proc");
    match pid.parse::<u32>() {
        Ok(pid) if proc.exists() => proc.join(pid.to_string()).exists(),
        _ => true,
    }
}

/// Gives back the keys this process took. A process that ends without it (killed, or ended by
/// a closed pipe) leaves locks the next run takes over.
pub fn release_all() {
    let held = std::mem::take(&mut *HELD.lock().unwrap_or_else(|e| e.into_inner()));
    for lock in held {
        let _ = std::fs::remove_file(lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_at_once_get_different_keys_and_a_released_key_is_reused() {
        let dir = std::env::temp_dir().join(format!("kmmr-keys-{}", std::process::id()));
        let a = take_pooled(&dir).unwrap().unwrap();
        let b = take_pooled(&dir).unwrap().unwrap();
        assert_ne!(a.public(), b.public());
        release_all();
        let again = take_pooled(&dir).unwrap().unwrap();
        assert_eq!(again.public(), a.public());
        release_all();
        // A lock left by a process that is gone is taken over.
        std::fs::write(dir.join("client-keys/0.lock"), "4000000000").unwrap();
        assert_eq!(take_pooled(&dir).unwrap().unwrap().public(), a.public());
        release_all();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
