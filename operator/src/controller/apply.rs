//! Acting on the cluster's children: server-side apply of every object, deletion of departed
//! members, one rolling restart at a time, and cleanup on deletion; and the probes of the members.

use super::*;

pub(super) fn owned_by<K: Resource>(obj: &K, cluster: &BftCluster) -> bool {
    let uid = cluster.meta().uid.as_deref();
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| Some(o.uid.as_str()) == uid)
}

pub(super) async fn probe_members(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
    keys: &Keys,
) -> BTreeMap<i32, Probe> {
    let name = cluster.name_any();
    let http = cluster.spec.ports.http;
    let pods: BTreeMap<i32, Pod> = if ctx.probe_via == ProbeVia::PodIp {
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
        let selector = names::replica_selector(&name)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        match api.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => list
                .items
                .into_iter()
                .filter_map(|p| {
                    let id = p.labels().get(names::REPLICA_ID_LABEL)?.parse().ok()?;
                    Some((id, p))
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing replica pods");
                BTreeMap::new()
            }
        }
    } else {
        BTreeMap::new()
    };
    let probes = membership.members.iter().map(|&id| {
        let addr = match ctx.probe_via {
            ProbeVia::Dns => Some(format!(
                "{}.{}.{namespace}.svc:{http}",
                names::pod(&name, id),
                names::headless_service(&name)
            )),
            ProbeVia::PodIp => pods
                .get(&id)
                .and_then(|p| p.status.as_ref()?.pod_ip.clone())
                .map(|ip| {
                    if ip.contains(':') {
                        format!("[{ip}]:{http}")
                    } else {
                        format!("{ip}:{http}")
                    }
                }),
        };
        let key = keys.replica(id).map(keys::public_hex);
        let timeout = ctx.probe_timeout;
        async move {
            let result = match (addr, key) {
                (None, _) => Probe::Unreachable("no pod address yet".to_string()),
                (_, None) => Probe::Rejected("no key in the view".to_string()),
                (Some(addr), Some(key)) => probe::probe(&addr, id, &key, timeout).await,
            };
            (id, result)
        }
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .collect()
}

pub(super) async fn apply_children(
    ctx: &Context,
    namespace: &str,
    children: crate::children::Children,
) -> Result<(), Error> {
    let params = PatchParams::apply(names::MANAGER).force();
    async fn ssa<K>(
        client: &Client,
        namespace: &str,
        params: &PatchParams,
        obj: &K,
    ) -> Result<(), Error>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Serialize
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
        <K as Resource>::DynamicType: Default,
    {
        let name = obj
            .meta()
            .name
            .clone()
            .ok_or(Error::MissingMetadata("child name"))?;
        let api: Api<K> = Api::namespaced(client.clone(), namespace);
        api.patch(&name, params, &Patch::Apply(obj)).await?;
        Ok(())
    }
    let c = &ctx.client;
    // Keys and configuration first: a pod that starts before its Secret exists only waits, but
    // one that starts with a stale view would have to be restarted.
    for s in &children.key_secrets {
        ssa(c, namespace, &params, s).await?;
    }
    ssa(c, namespace, &params, &children.admin_secret).await?;
    ssa(c, namespace, &params, &children.config_map).await?;
    ssa(c, namespace, &params, &children.headless_service).await?;
    ssa(c, namespace, &params, &children.client_service).await?;
    ssa(c, namespace, &params, &children.pod_disruption_budget).await?;
    for s in &children.stateful_sets {
        ssa(c, namespace, &params, s).await?;
    }
    Ok(())
}

/// Deletes the StatefulSet, volume and key Secret of every replica id that is not in the view
/// (after it left through the protocol, or a join that was never installed): a later replica
/// with the same id must start with a new key and an empty volume. The Secret goes last, so an
/// interrupted pass finds the replica again by what is left; a joiner's Secret is kept while its
/// request can still be installed (the view it was made in is current).
pub(super) async fn remove_departed(
    ctx: &Context,
    cluster: &BftCluster,
    namespace: &str,
    membership: &Membership,
) -> Result<Vec<i32>, Error> {
    let name = cluster.name_any();
    let selector = format!(
        "app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={}",
        names::MANAGER
    );
    let list = ListParams::default().labels(&selector);
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), namespace);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let label_id = |labels: &BTreeMap<String, String>| {
        labels
            .get(names::REPLICA_ID_LABEL)
            .and_then(|v| v.parse::<i32>().ok())
    };
    let outside = |id: &i32| !membership.members.contains(id);
    let mut departed = std::collections::BTreeSet::new();
    for set in sets.list(&list).await?.items {
        if let Some(id) = label_id(set.labels()).filter(outside) {
            if owned_by(&set, cluster) {
                departed.insert(id);
            }
        }
    }
    // Claims belong to no owner (the StatefulSets' retention keeps them): found by name.
    for claim in pvcs.list(&list).await?.items {
        if let Some(id) = names::data_claim_id(&name, &claim.name_any()).filter(outside) {
            departed.insert(id);
        }
    }
    let mut stale_keys = Vec::new();
    if cluster.spec.keys.is_none() {
        for s in secrets.list(&list).await?.items {
            let Some(id) = label_id(s.labels()).filter(outside) else {
                continue;
            };
            let pending = s
                .annotations()
                .get(names::JOIN_VIEW_ANNOTATION)
                .is_some_and(|v| *v == membership.view_id.to_string());
            if owned_by(&s, cluster) && !pending {
                stale_keys.push(id);
            }
        }
    }
    let gone = |r: Result<(), kube::Error>| match r {
        Ok(()) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    };
    for &id in &departed {
        gone(
            sets.delete(&names::stateful_set(&name, id), &DeleteParams::background())
                .await
                .map(|_| ()),
        )?;
        gone(
            pvcs.delete(&names::data_claim(&name, id), &DeleteParams::default())
                .await
                .map(|_| ()),
        )?;
    }
    for &id in departed.iter().chain(&stale_keys) {
        if cluster.spec.keys.is_some() {
            continue;
        }
        gone(
            secrets
                .delete(&names::key_secret(&name, id), &DeleteParams::default())
                .await
                .map(|_| ()),
        )?;
    }
    Ok(departed.into_iter().collect())
}

/// StatefulSets use `OnDelete`, so a changed pod template reaches a replica only when its pod is
/// deleted. Deletes at most one pod that runs an outdated revision and returns its replica id.
/// With every member healthy any of them may go (followers first, the leader last: each leader
/// restart costs a leader change). With exactly one unhealthy member, only its pod, and only
/// while a quorum is healthy: this is how a replica switched into (or out of) a test mode, or
/// stuck on a bad template, gets the new one.
pub(super) async fn roll_one(
    ctx: &Context,
    name: &str,
    namespace: &str,
    membership: &Membership,
    healthy: &[i32],
    quorum: i32,
    leader: Option<i32>,
) -> Result<Option<i32>, Error> {
    let unhealthy: Vec<i32> = membership
        .members
        .iter()
        .copied()
        .filter(|id| !healthy.contains(id))
        .collect();
    // Restarting the one unhealthy member costs nothing the cluster has; with two unhealthy,
    // one of them may be a working voter in a passing state (a leader change, catching up
    // after its own restart), and restarting it would take two down at once.
    let restartable = |id: i32| unhealthy.is_empty() || unhealthy == [id];
    if unhealthy.len() > 1 || (healthy.len() as i32) < quorum {
        return Ok(None);
    }
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let mut outdated = Vec::new();
    for &id in &membership.members {
        let Some(set) = sets.get_opt(&names::stateful_set(name, id)).await? else {
            continue;
        };
        let status = set.status.as_ref();
        // The StatefulSet controller has not yet computed the revision of the newest template.
        if status.and_then(|s| s.observed_generation) != set.metadata.generation {
            return Ok(None);
        }
        let Some(update) = status.and_then(|s| s.update_revision.clone()) else {
            continue;
        };
        let Some(pod) = pods.get_opt(&names::pod(name, id)).await? else {
            return Ok(None);
        };
        if pod.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        if pod.labels().get("controller-revision-hash") != Some(&update) && restartable(id) {
            outdated.push(id);
        }
    }
    outdated.sort_by_key(|id| (Some(*id) == leader, *id));
    let Some(&id) = outdated.first() else {
        return Ok(None);
    };
    pods.delete(&names::pod(name, id), &DeleteParams::default())
        .await?;
    Ok(Some(id))
}

pub(super) async fn cleanup(cluster: &BftCluster, ctx: &Context) -> Result<Action, Error> {
    let name = cluster.name_any();
    let namespace = cluster
        .namespace()
        .ok_or(Error::MissingMetadata("metadata.namespace"))?;
    // Everything else carries an owner reference and goes with the cluster; the replicas'
    // volumes are kept by their StatefulSets' retention policy, so they are removed here.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = format!(
        "app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={}",
        names::MANAGER
    );
    pvcs.delete_collection(
        &DeleteParams::background(),
        &ListParams::default().labels(&selector),
    )
    .await?;
    publish(
        ctx,
        cluster,
        false,
        "Deleted",
        "the cluster is being deleted: its replicas' volumes are removed and every other object goes with it",
        "Delete",
    )
    .await;
    Ok(Action::await_change())
}
