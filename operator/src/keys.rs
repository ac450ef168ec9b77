//! ed25519 identities of a cluster: one key pair per replica and one admin key pair, which signs
//! reconfiguration requests. Keys are generated with the OS's CSPRNG or supplied by the user;
//! either way each replica's seed ends up in a Secret that only that replica's pod mounts.
//!
//! The seed encoding is the replica's key file format: 64 hex digits (a trailing newline is
//! accepted). Never log or format a seed: `Keys` has no `Debug` that would print one.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use k8s_openapi::ByteString;
use rand_core::OsRng;

/// Entry of a key Secret (ours or the user's, see [`user_entry`]) holding a seed.
pub const SEED_ENTRY: &str = "key";
/// Entry of a key Secret holding the public key, hex (published for convenience; the view is
/// the authority).
pub const PUBLIC_ENTRY: &str = "public";
/// Entry of the user's Secret holding the admin seed.
pub const USER_ADMIN_ENTRY: &str = "admin.key";

/// Entry of the user's Secret (`spec.keys.secretName`) holding replica `id`'s seed.
pub fn user_entry(id: i32) -> String {
    format!("replica-{id}.key")
}

/// Why keys could not be read. Messages name the Secret entry and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// An entry is missing.
    #[error(
        "Secret {secret} has no entry {entry}: add the 64 hex digits of an ed25519 seed under it"
    )]
    Missing { secret: String, entry: String },
    /// An entry is not 64 hex digits.
    #[error(
        "Secret {secret} entry {entry} is not an ed25519 seed: it must hold exactly 64 hex digits"
    )]
    Malformed { secret: String, entry: String },
    /// Two principals share a key, which would let one impersonate the other.
    #[error("Secret {secret}: entries {first} and {second} hold the same key; every replica and the admin need their own")]
    Duplicate {
        secret: String,
        first: String,
        second: String,
    },
}

/// The key pairs of a cluster's replicas (by replica id) and of its admin.
#[derive(Clone)]
pub struct Keys {
    replicas: BTreeMap<i32, SigningKey>,
    admin: SigningKey,
}

impl Keys {
    /// Fresh key pairs for `ids` and the admin, from the OS's CSPRNG.
    pub fn generate(ids: impl IntoIterator<Item = i32>) -> Keys {
        Keys {
            replicas: ids
                .into_iter()
                .map(|id| (id, SigningKey::generate(&mut OsRng)))
                .collect(),
            admin: SigningKey::generate(&mut OsRng),
        }
    }

    /// Keys from known seeds (for example read back from the Secrets the operator created).
    pub fn from_seeds(replicas: BTreeMap<i32, [u8; 32]>, admin: [u8; 32]) -> Keys {
        Keys {
            replicas: replicas
                .into_iter()
                .map(|(id, seed)| (id, SigningKey::from_bytes(&seed)))
                .collect(),
            admin: SigningKey::from_bytes(&admin),
        }
    }

    /// Keys from the user's Secret named in `spec.keys.secretName`: `replica-<id>.key` for every
    /// id and `admin.key`, each 64 hex digits.
    pub fn from_user_secret(
        secret: &str,
        data: &BTreeMap<String, ByteString>,
        ids: impl IntoIterator<Item = i32>,
    ) -> Result<Keys, KeyError> {
        let mut replicas = BTreeMap::new();
        let mut seen: BTreeMap<[u8; 32], String> = BTreeMap::new();
        let mut read = |entry: String| -> Result<SigningKey, KeyError> {
            let seed = seed_entry(secret, data, &entry)?;
            if let Some(first) = seen.insert(seed, entry.clone()) {
                return Err(KeyError::Duplicate {
                    secret: secret.to_string(),
                    first,
                    second: entry,
                });
            }
            Ok(SigningKey::from_bytes(&seed))
        };
        for id in ids {
            replicas.insert(id, read(user_entry(id))?);
        }
        let admin = read(USER_ADMIN_ENTRY.to_string())?;
        Ok(Keys { replicas, admin })
    }

    /// Adds (or replaces) replica `id`'s key: a replica about to join the view.
    pub fn insert_replica(&mut self, id: i32, seed: [u8; 32]) {
        self.replicas.insert(id, SigningKey::from_bytes(&seed));
    }

    /// Replica ids that have keys, in order.
    pub fn replica_ids(&self) -> impl Iterator<Item = i32> + '_ {
        self.replicas.keys().copied()
    }

    /// Replica `id`'s key pair.
    pub fn replica(&self, id: i32) -> Option<&SigningKey> {
        self.replicas.get(&id)
    }

    /// The admin key pair.
    pub fn admin(&self) -> &SigningKey {
        &self.admin
    }
}

/// Reads one seed entry of a Secret's data.
pub fn seed_entry(
    secret: &str,
    data: &BTreeMap<String, ByteString>,
    entry: &str,
) -> Result<[u8; 32], KeyError> {
    let value = data.get(entry).ok_or_else(|| KeyError::Missing {
        secret: secret.to_string(),
        entry: entry.to_string(),
    })?;
    let malformed = || KeyError::Malformed {
        secret: secret.to_string(),
        entry: entry.to_string(),
    };
    let text = std::str::from_utf8(&value.0).map_err(|_| malformed())?;
    let bytes = hex::decode(text.trim()).map_err(|_| malformed())?;
    bytes.try_into().map_err(|_| malformed())
}

/// The key file contents for `key`: what the replica's `key_file` holds.
pub fn seed_file(key: &SigningKey) -> String {
    format!("{}\n", hex::encode(key.to_bytes()))
}

/// The public key as the view writes it: 64 hex digits.
pub fn public_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(entries: &[(String, String)]) -> BTreeMap<String, ByteString> {
        entries
            .iter()
            .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
            .collect()
    }

    #[test]
    fn generated_keys_are_distinct_per_replica_and_admin() {
        let keys = Keys::generate(0..4);
        let mut publics: Vec<String> = keys
            .replica_ids()
            .map(|id| public_hex(keys.replica(id).unwrap()))
            .collect();
        publics.push(public_hex(keys.admin()));
        let count = publics.len();
        publics.sort();
        publics.dedup();
        assert_eq!(publics.len(), count);
        assert_eq!(keys.replica_ids().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn seed_file_round_trips_through_a_user_secret() {
        let keys = Keys::generate(0..4);
        let mut entries: Vec<(String, String)> = keys
            .replica_ids()
            .map(|id| (user_entry(id), seed_file(keys.replica(id).unwrap())))
            .collect();
        entries.push((USER_ADMIN_ENTRY.into(), seed_file(keys.admin())));
        let read = Keys::from_user_secret("mine", &data(&entries), 0..4).unwrap();
        for id in 0..4 {
            assert_eq!(
                read.replica(id).unwrap().to_bytes(),
                keys.replica(id).unwrap().to_bytes()
            );
        }
        assert_eq!(read.admin().to_bytes(), keys.admin().to_bytes());
    }

    #[test]
    fn user_secret_missing_a_replica_key_names_the_entry() {
        let entries = vec![
            (user_entry(0), "11".repeat(32)),
            (USER_ADMIN_ENTRY.into(), "22".repeat(32)),
        ];
        let err = Keys::from_user_secret("mine", &data(&entries), 0..2)
            .err()
            .unwrap();
        assert_eq!(
            err,
            KeyError::Missing {
                secret: "mine".into(),
                entry: "replica-1.key".into()
            }
        );
        assert!(err.to_string().contains("replica-1.key"));
    }

    #[test]
    fn user_secret_with_a_short_seed_is_rejected() {
        let entries = vec![
            (user_entry(0), "ab".repeat(31)),
            (USER_ADMIN_ENTRY.into(), "22".repeat(32)),
        ];
        let err = Keys::from_user_secret("mine", &data(&entries), 0..1)
            .err()
            .unwrap();
        assert!(matches!(err, KeyError::Malformed { .. }), "{err}");
    }

    #[test]
    fn user_secret_reusing_a_key_for_two_principals_is_rejected() {
        let entries = vec![
            (user_entry(0), "33".repeat(32)),
            (user_entry(1), "33".repeat(32)),
            (USER_ADMIN_ENTRY.into(), "22".repeat(32)),
        ];
        let err = Keys::from_user_secret("mine", &data(&entries), 0..2)
            .err()
            .unwrap();
        assert!(matches!(err, KeyError::Duplicate { .. }), "{err}");
    }
}
