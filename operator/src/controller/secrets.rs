//! Replica keys: the user's, or the operator's own read back from the Secrets it wrote, and
//! those of joining replicas, stored before the view can name them.

use super::*;

/// The cluster's keys: the user's, or ours read back from the Secrets we wrote, generating only
/// those of members no view has named yet. Returns what was generated, for an Event.
pub(super) async fn load_keys(
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

/// A replica key that was stored earlier: the user's, or ours from its Secret.
pub(super) async fn stored_seed(
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
pub(super) async fn joining_seed(
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
