//! The view: the one the operator recorded (its ConfigMap), the one the replicas run when an
//! answer was lost, and a change asked of the replicas through the admin client.

use super::*;

/// The view the replicas run, read back from the ConfigMap the operator wrote.
pub struct CurrentView {
    /// Members, view id and f.
    pub membership: Membership,
    /// Each member's public key, hex.
    pub keys: BTreeMap<i32, String>,
    /// The admin's public key, hex (absent in views written before it was rendered).
    pub admin: Option<String>,
}

pub(super) async fn read_view(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<CurrentView>, Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let cm_name = names::config_map(name);
    let Some(cm) = api.get_opt(&cm_name).await? else {
        return Ok(None);
    };
    let unreadable = |why: String| Error::ViewUnreadable {
        name: cm_name.clone(),
        why,
    };
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(VIEW_ENTRY))
        .ok_or_else(|| unreadable(format!("no entry {VIEW_ENTRY}")))?;
    parse_view(text).map(Some).map_err(unreadable)
}

/// Parses view.toml with the replica's own type, so the operator reads exactly what replicas do.
pub fn parse_view(text: &str) -> Result<CurrentView, String> {
    let file: kmmr_client::files::ViewFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut members = Vec::new();
    let mut keys = BTreeMap::new();
    for m in &file.members {
        let id = i32::try_from(m.id).map_err(|_| format!("member id {} out of range", m.id))?;
        members.push(id);
        keys.insert(id, m.key.clone());
    }
    members.sort_unstable();
    Ok(CurrentView {
        membership: Membership {
            view_id: i64::from(file.id),
            f: i32::try_from(file.f).map_err(|_| format!("f = {} out of range", file.f))?,
            members,
        },
        keys,
        admin: file.admin_key.clone(),
    })
}

/// Reads the installed view from the replicas and loads the keys of members it names that the
/// recorded view did not (joiners whose addition was installed without the operator hearing of
/// it: their key Secrets were written before the request). The outer error is an API failure;
/// the inner one why the view could not be read.
pub(super) async fn recover_view(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
    keys: &mut Keys,
) -> Result<Result<Membership, String>, Error> {
    let view_toml = crate::config::render_view(cluster, namespace, membership, keys)
        .map_err(|e| Error::Build(e.to_string()))?;
    let installed = match ctx
        .reconfigurer
        .current_view(&view_toml, keys.admin())
        .await
    {
        Ok(v) => v,
        Err(e) => return Ok(Err(e.to_string())),
    };
    if installed.membership.view_id <= membership.view_id {
        return Ok(Err(format!(
            "the admin client still sees view {}",
            installed.membership.view_id
        )));
    }
    for (&id, public) in &installed.keys {
        if keys.replica(id).is_none() {
            let seed = stored_seed(ctx, cluster, namespace, id)
                .await?
                .ok_or_else(|| Error::KeyLost {
                    secret: names::key_secret(&cluster.name_any(), id),
                    who: format!(
                        "replica {id} (a member of the replicas' view {})",
                        installed.membership.view_id
                    ),
                })?;
            keys.insert_replica(id, seed);
        }
        if keys.replica(id).map(keys::public_hex).as_deref() != Some(public.as_str()) {
            return Err(Error::KeyMismatch(format!("replica {id}")));
        }
    }
    Ok(Ok(installed.membership))
}

/// Stores a joining replica's key (before the view can name it), then asks the replicas for
/// the change. The outer error is an API failure; the inner one is the replicas' answer.
pub(super) async fn change_view(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
    keys: &mut Keys,
    step: &Step,
) -> Result<Result<Membership, ReconfigError>, Error> {
    let name = cluster.name_any();
    let joining = match step {
        Step::Join(id) => {
            let seed = joining_seed(ctx, cluster, namespace, *id, membership.view_id).await?;
            keys.insert_replica(*id, seed);
            let key = ed25519_dalek::SigningKey::from_bytes(&seed);
            Some(Joining {
                address: names::member_address(&name, namespace, *id, cluster.spec.ports.replica),
                public_key: keys::public_hex(&key),
            })
        }
        _ => None,
    };
    // The view exactly as the replicas read it from the ConfigMap.
    let view_toml = crate::config::render_view(cluster, namespace, membership, keys)
        .map_err(|e| Error::Build(e.to_string()))?;
    let answer = ctx
        .reconfigurer
        .apply(&view_toml, step, joining.as_ref(), keys.admin())
        .await;
    Ok(answer.map(|installed| installed.membership))
}
