use super::*;
use kmmr_crds::{BftClusterSpec, KeysSpec};

fn cluster(replicas: i32) -> BftCluster {
    let spec: BftClusterSpec = serde_json::from_value(serde_json::json!({
        "replicas": replicas,
        "image": "kmmr/replica:0.1.0",
    }))
    .unwrap();
    let mut c = BftCluster::new("demo", spec);
    c.metadata.namespace = Some("prod".into());
    c.metadata.uid = Some("5a1c0b7e-0000-4000-8000-000000000001".into());
    c
}

fn build(c: &BftCluster) -> (Children, Keys) {
    let keys = Keys::generate(0..c.spec.replicas);
    (build_children(c, &keys).unwrap(), keys)
}

fn pod_spec(sts: &StatefulSet) -> &PodSpec {
    sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn replica_id(sts: &StatefulSet) -> i32 {
    sts.metadata.labels.as_ref().unwrap()[names::REPLICA_ID_LABEL]
        .parse()
        .unwrap()
}

/// Every Secret a pod can read, through any volume or env source.
fn secrets_read_by(pod: &PodSpec) -> Vec<String> {
    let mut out = Vec::new();
    for v in pod.volumes.iter().flatten() {
        if let Some(s) = &v.secret {
            out.extend(s.secret_name.clone());
        }
        for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(s) = &source.secret {
                out.push(s.name.clone());
            }
        }
    }
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        for e in c.env.iter().flatten() {
            if let Some(r) = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
            {
                out.push(r.name.clone());
            }
        }
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.secret_ref {
                out.push(r.name.clone());
            }
        }
    }
    out
}

fn all_metadata(ch: &Children) -> Vec<&ObjectMeta> {
    let mut metas: Vec<&ObjectMeta> = ch.stateful_sets.iter().map(|s| &s.metadata).collect();
    metas.extend(ch.key_secrets.iter().map(|s| &s.metadata));
    metas.extend([
        &ch.headless_service.metadata,
        &ch.client_service.metadata,
        &ch.config_map.metadata,
        &ch.pod_disruption_budget.metadata,
        &ch.admin_secret.metadata,
    ]);
    metas
}

#[test]
fn one_single_pod_stateful_set_per_replica() {
    let (ch, _) = build(&cluster(7));
    assert_eq!(ch.stateful_sets.len(), 7);
    for (i, sts) in ch.stateful_sets.iter().enumerate() {
        assert_eq!(
            sts.metadata.name.as_deref(),
            Some(format!("demo-{i}").as_str())
        );
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.service_name.as_deref(), Some("demo-replicas"));
        assert_eq!(replica_id(sts), i as i32);
    }
}

#[test]
fn each_replica_pod_mounts_only_its_own_key() {
    let (ch, _) = build(&cluster(4));
    for sts in &ch.stateful_sets {
        let id = replica_id(sts);
        assert_eq!(
            secrets_read_by(pod_spec(sts)),
            vec![format!("demo-{id}-key")]
        );
    }
}

#[test]
fn admin_key_is_in_its_own_secret_and_mounted_by_no_pod() {
    let (ch, keys) = build(&cluster(4));
    assert_eq!(
        ch.admin_secret.metadata.name.as_deref(),
        Some("demo-admin-key")
    );
    let data = ch.admin_secret.data.as_ref().unwrap();
    assert_eq!(
        keys::seed_entry("demo-admin-key", data, keys::SEED_ENTRY).unwrap(),
        keys.admin().to_bytes()
    );
    for sts in &ch.stateful_sets {
        assert!(!secrets_read_by(pod_spec(sts)).contains(&"demo-admin-key".to_string()));
    }
}

#[test]
fn key_secrets_hold_the_seed_whose_public_key_is_in_the_view() {
    let (ch, keys) = build(&cluster(4));
    let view: kmmr_client::files::ViewFile =
        toml::from_str(&ch.config_map.data.as_ref().unwrap()["view.toml"]).unwrap();
    for (secret, member) in ch.key_secrets.iter().zip(&view.members) {
        let name = secret.metadata.name.clone().unwrap();
        let seed =
            keys::seed_entry(&name, secret.data.as_ref().unwrap(), keys::SEED_ENTRY).unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        assert_eq!(keys::public_hex(&key), member.key, "{name}");
        assert_eq!(seed, keys.replica(member.id as i32).unwrap().to_bytes());
    }
}

#[test]
fn key_is_projected_owner_read_only_next_to_the_config() {
    let (ch, _) = build(&cluster(4));
    let pod = pod_spec(&ch.stateful_sets[2]);
    let projected = pod.volumes.as_ref().unwrap()[0].projected.as_ref().unwrap();
    let sources = projected.sources.as_ref().unwrap();
    let cm_items = sources[0]
        .config_map
        .as_ref()
        .unwrap()
        .items
        .as_ref()
        .unwrap();
    let paths: Vec<_> = cm_items
        .iter()
        .map(|i| (i.key.as_str(), i.path.as_str()))
        .collect();
    assert_eq!(
        paths,
        vec![
            ("view.toml", "view.toml"),
            ("replica-2.toml", "replica.toml")
        ]
    );
    let key_item = &sources[1].secret.as_ref().unwrap().items.as_ref().unwrap()[0];
    assert_eq!(
        (key_item.path.as_str(), key_item.mode),
        ("key", Some(0o400))
    );
    let mount = &pod.containers[0].volume_mounts.as_ref().unwrap()[0];
    assert_eq!(mount.mount_path, "/etc/kmmr");
    assert_eq!(
        pod.containers[0].args.as_ref().unwrap(),
        &vec![
            "run".to_string(),
            "--config".into(),
            "/etc/kmmr/replica.toml".into()
        ]
    );
}

#[test]
fn view_lists_every_member_at_its_stable_dns_name_and_the_replica_accepts_it() {
    let (ch, keys) = build(&cluster(4));
    let text = &ch.config_map.data.as_ref().unwrap()["view.toml"];
    let file: kmmr_client::files::ViewFile = toml::from_str(text).unwrap();
    assert_eq!((file.id, file.f), (0, 1));
    for (i, m) in file.members.iter().enumerate() {
        assert_eq!(m.id, i as u32);
        assert_eq!(m.address, format!("demo-{i}-0.demo-replicas.prod.svc:7000"));
        assert_eq!(m.key, keys::public_hex(keys.replica(i as i32).unwrap()));
    }
    file.to_view().expect("the replica accepts the view");
}

#[test]
fn replica_config_is_accepted_by_the_replica() {
    let mut c = cluster(4);
    c.spec.protocol = Some(kmmr_crds::ProtocolSpec {
        request_timeout_ms: Some(500),
    });
    let (ch, _) = build(&c);
    for id in 0..4 {
        let text = &ch.config_map.data.as_ref().unwrap()[&format!("replica-{id}.toml")];
        let cfg: kmmr::node::NodeConfig = toml::from_str(text).unwrap();
        assert_eq!(cfg.id, id as u32);
        assert_eq!(cfg.key_file.to_str(), Some("/etc/kmmr/key"));
        assert_eq!(cfg.view_file.to_str(), Some("/etc/kmmr/view.toml"));
        assert_eq!(cfg.data_dir.to_str(), Some("/var/lib/kmmr"));
        assert_eq!(cfg.listen.as_deref(), Some("0.0.0.0:7000"));
        assert_eq!(cfg.client_listen.as_deref(), Some("0.0.0.0:8000"));
        assert_eq!(cfg.http_listen, "0.0.0.0:9000");
        assert_eq!(cfg.protocol.request_timeout_ms, 500);
        cfg.protocol
            .validate()
            .expect("the replica accepts the protocol settings");
    }
}

fn template_annotations(sts: &StatefulSet) -> BTreeMap<String, String> {
    sts.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap()
}

#[test]
fn config_hash_follows_what_only_a_restart_brings_in() {
    let c = cluster(4);
    let keys = Keys::generate(0..5);
    let hash = |ch: &Children, i: usize| {
        template_annotations(&ch.stateful_sets[i])[names::CONFIG_HASH_ANNOTATION].clone()
    };
    let before = build_children(&c, &keys).unwrap();
    let again = build_children(&c, &keys).unwrap();
    assert_eq!(
        hash(&before, 0),
        hash(&again, 0),
        "the hash is deterministic"
    );
    assert_ne!(
        hash(&before, 0),
        hash(&before, 1),
        "each replica has its own configuration"
    );
    // A new view reaches running replicas through the protocol: no restart.
    let next = Membership {
        view_id: 1,
        f: 1,
        members: vec![0, 1, 2, 3, 4],
    };
    let after = build_children_for(&c, &next, &keys).unwrap();
    for i in 0..4 {
        assert_eq!(hash(&before, i), hash(&after, i), "replica {i}");
    }
    // A protocol setting does need one.
    let mut slower = c.clone();
    slower.spec.protocol =
        serde_json::from_value(serde_json::json!({ "requestTimeoutMs": 900 })).unwrap();
    let changed = build_children(&slower, &keys).unwrap();
    for i in 0..4 {
        assert_ne!(hash(&before, i), hash(&changed, i), "replica {i}");
    }
}

#[test]
fn a_byzantine_test_mode_reaches_only_its_replica_with_the_confirmation_flag() {
    let c = cluster(4);
    let keys = Keys::generate(0..4);
    let modes = BTreeMap::from([(2, "mixed".to_string())]);
    let ch = build_children_with(&c, &Membership::initial(&c), &keys, &modes).unwrap();
    for sts in &ch.stateful_sets {
        let id = replica_id(sts);
        let args = pod_spec(sts).containers[0].args.clone().unwrap();
        let annotated = template_annotations(sts).contains_key(crate::testmode::ANNOTATION);
        if id == 2 {
            assert_eq!(
                args[3..],
                ["--byzantine", "mixed", "--i-know-this-breaks-the-replica"]
            );
            assert!(annotated);
        } else {
            assert_eq!(args, ["run", "--config", config::CONFIG_FILE]);
            assert!(!annotated);
        }
    }
}

#[test]
fn stateful_sets_never_roll_pods_on_their_own() {
    let (ch, _) = build(&cluster(4));
    for sts in &ch.stateful_sets {
        let strategy = sts.spec.as_ref().unwrap().update_strategy.as_ref().unwrap();
        assert_eq!(strategy.type_.as_deref(), Some("OnDelete"));
    }
}

#[test]
fn pod_disruption_budget_allows_at_most_f_disruptions() {
    for (n, f) in [(4, 1), (7, 2), (10, 3)] {
        let (ch, _) = build(&cluster(n));
        let spec = ch.pod_disruption_budget.spec.as_ref().unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(f)), "n = {n}");
        assert_eq!(spec.min_available, None);
        assert_eq!(
            spec.selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap(),
            &names::replica_selector("demo")
        );
    }
}

#[test]
fn pod_disruption_budget_uses_the_explicit_f() {
    let mut c = cluster(7);
    c.spec.f = Some(1);
    let (ch, _) = build(&c);
    let spec = ch.pod_disruption_budget.spec.as_ref().unwrap();
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
}

#[test]
fn every_child_is_owned_by_the_cluster_as_controller() {
    let c = cluster(4);
    let (ch, _) = build(&c);
    let owner = owner_reference(&c).unwrap();
    assert_eq!(owner.controller, Some(true));
    assert_eq!(owner.kind, "BftCluster");
    assert_eq!(owner.api_version, "kmmr.io/v1alpha1");
    for meta in all_metadata(&ch) {
        assert_eq!(
            meta.owner_references.as_deref(),
            Some(std::slice::from_ref(&owner)),
            "{:?}",
            meta.name
        );
        assert_eq!(meta.namespace.as_deref(), Some("prod"));
    }
}

#[test]
fn every_child_carries_the_recommended_labels() {
    let (ch, _) = build(&cluster(4));
    for meta in all_metadata(&ch) {
        let labels = meta.labels.as_ref().unwrap();
        for key in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/part-of",
        ] {
            assert!(labels.contains_key(key), "{:?} lacks {key}", meta.name);
        }
        assert_eq!(labels["app.kubernetes.io/instance"], "demo");
    }
}

#[test]
fn stateful_set_selector_matches_its_pod_labels_only() {
    let (ch, _) = build(&cluster(4));
    for sts in &ch.stateful_sets {
        let spec = sts.spec.as_ref().unwrap();
        let selector = spec.selector.match_labels.as_ref().unwrap();
        let labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        for (k, v) in selector {
            assert_eq!(labels.get(k), Some(v));
        }
        assert_eq!(
            selector[names::REPLICA_ID_LABEL],
            replica_id(sts).to_string()
        );
    }
}

#[test]
fn headless_service_gives_not_ready_replicas_stable_dns() {
    let (ch, _) = build(&cluster(4));
    let spec = ch.headless_service.spec.as_ref().unwrap();
    assert_eq!(
        ch.headless_service.metadata.name.as_deref(),
        Some("demo-replicas")
    );
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    assert_eq!(
        spec.selector.as_ref().unwrap(),
        &names::replica_selector("demo")
    );
    let ports: Vec<_> = spec
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, vec![7000, 9000]);
}

#[test]
fn client_service_exposes_the_client_port_of_every_replica() {
    let (ch, _) = build(&cluster(4));
    let spec = ch.client_service.spec.as_ref().unwrap();
    assert_eq!(
        ch.client_service.metadata.name.as_deref(),
        Some("demo-client")
    );
    assert_eq!(
        spec.selector.as_ref().unwrap(),
        &names::replica_selector("demo")
    );
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(port.port, 8000);
    assert_eq!(port.target_port, Some(IntOrString::String("client".into())));
}

#[test]
fn pods_run_as_non_root_without_privileges_or_an_api_token() {
    let (ch, _) = build(&cluster(4));
    let pod = pod_spec(&ch.stateful_sets[0]);
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(REPLICA_UID));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    assert_eq!(pod.automount_service_account_token, Some(false));
    let sc = pod.containers[0].security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
        &vec!["ALL".to_string()]
    );
}

#[test]
fn readiness_probe_checks_healthz_on_the_http_port() {
    let (ch, _) = build(&cluster(4));
    let container = &pod_spec(&ch.stateful_sets[0]).containers[0];
    let probe = container
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz"));
    assert_eq!(probe.port, IntOrString::String("http".into()));
    let http = container
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("http"));
    assert_eq!(http.map(|p| p.container_port), Some(9000));
}

#[test]
fn volume_claim_template_follows_spec_storage() {
    let mut c = cluster(4);
    c.spec.storage.class_name = Some("fast-ssd".into());
    c.spec.storage.size = Quantity("5Gi".into());
    let (ch, _) = build(&c);
    let claim = &ch.stateful_sets[0]
        .spec
        .as_ref()
        .unwrap()
        .volume_claim_templates
        .as_ref()
        .unwrap()[0];
    let spec = claim.spec.as_ref().unwrap();
    assert_eq!(spec.storage_class_name.as_deref(), Some("fast-ssd"));
    assert_eq!(
        spec.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"],
        Quantity("5Gi".into())
    );
    let mounts = pod_spec(&ch.stateful_sets[0]).containers[0]
        .volume_mounts
        .as_ref()
        .unwrap();
    assert!(mounts
        .iter()
        .any(|m| m.name == "data" && m.mount_path == "/var/lib/kmmr"));
}

#[test]
fn scheduling_settings_and_image_reach_every_pod() {
    let mut c: BftCluster = cluster(4);
    c.spec = serde_json::from_value(serde_json::json!({
        "replicas": 4,
        "image": "kmmr/replica:1.2.3",
        "imagePullPolicy": "Never",
        "priorityClassName": "critical",
        "tolerations": [{ "key": "dedicated", "operator": "Equal", "value": "bft", "effect": "NoSchedule" }],
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": { "matchLabels": { "app.kubernetes.io/instance": "demo" } }
        }],
        "affinity": { "podAntiAffinity": {} },
        "resources": { "limits": { "memory": "1Gi" } },
    }))
    .unwrap();
    let (ch, _) = build(&c);
    for sts in &ch.stateful_sets {
        let pod = pod_spec(sts);
        assert_eq!(pod.priority_class_name.as_deref(), Some("critical"));
        assert_eq!(pod.tolerations.as_ref().unwrap().len(), 1);
        assert_eq!(pod.topology_spread_constraints.as_ref().unwrap().len(), 1);
        assert!(pod.affinity.as_ref().unwrap().pod_anti_affinity.is_some());
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), Some("kmmr/replica:1.2.3"));
        assert_eq!(container.image_pull_policy.as_deref(), Some("Never"));
        assert_eq!(container.resources, c.spec.resources);
    }
}

#[test]
fn resources_default_to_small_requests_without_limits() {
    let (ch, _) = build(&cluster(4));
    let resources = pod_spec(&ch.stateful_sets[0]).containers[0]
        .resources
        .as_ref()
        .unwrap();
    assert!(resources.limits.is_none());
    assert_eq!(
        resources.requests.as_ref().unwrap()["memory"],
        Quantity("128Mi".into())
    );
}

#[test]
fn building_from_an_object_not_read_from_the_apiserver_fails() {
    let mut c = cluster(4);
    c.metadata.uid = None;
    let err = build_children(&c, &Keys::generate(0..4)).unwrap_err();
    assert!(
        matches!(err, BuildError::MissingMetadata("metadata.uid")),
        "{err}"
    );
}

#[test]
fn invalid_spec_builds_nothing() {
    let mut c = cluster(4);
    c.spec.f = Some(2);
    let err = build_children(&c, &Keys::generate(0..4)).unwrap_err();
    assert!(matches!(err, BuildError::InvalidSpec(_)), "{err}");
}

#[test]
fn a_member_without_a_key_is_an_error_not_a_panic() {
    let c = cluster(4);
    let err = build_children(&c, &Keys::generate(0..3)).unwrap_err();
    assert!(err.to_string().contains("replica 3"), "{err}");
}

#[test]
fn user_supplied_keys_end_up_in_per_replica_secrets() {
    let mut c = cluster(4);
    c.spec.keys = Some(KeysSpec {
        secret_name: "my-keys".into(),
    });
    let mut data = BTreeMap::new();
    for id in 0..4 {
        data.insert(
            keys::user_entry(id),
            ByteString(format!("{:02x}", id + 1).repeat(32).into_bytes()),
        );
    }
    data.insert(
        keys::USER_ADMIN_ENTRY.into(),
        ByteString("ff".repeat(32).into_bytes()),
    );
    let keys = Keys::from_user_secret("my-keys", &data, 0..4).unwrap();
    let ch = build_children(&c, &keys).unwrap();
    let seed = keys::seed_entry(
        "demo-3-key",
        ch.key_secrets[3].data.as_ref().unwrap(),
        keys::SEED_ENTRY,
    )
    .unwrap();
    assert_eq!(seed, [4u8; 32]);
}

#[test]
fn debug_output_never_contains_a_private_key() {
    let (ch, keys) = build(&cluster(4));
    let printed = format!("{ch:?}");
    assert!(printed.contains("demo-0-key"));
    assert!(!printed.contains("ByteString"), "{printed}");
    for id in 0..4 {
        assert!(!printed.contains(&hex::encode(keys.replica(id).unwrap().to_bytes())));
    }
    assert!(!printed.contains(&hex::encode(keys.admin().to_bytes())));
}

#[test]
fn the_view_names_the_admin_key_so_replicas_accept_its_view_changes_only() {
    let (ch, keys) = build(&cluster(4));
    let text = &ch.config_map.data.as_ref().unwrap()["view.toml"];
    let file: kmmr_client::files::ViewFile = toml::from_str(text).unwrap();
    assert_eq!(
        file.admin_key.as_deref(),
        Some(keys::public_hex(keys.admin()).as_str())
    );
    // The replica's own conversion accepts it as the view's admin.
    let view = file.to_view().unwrap();
    assert_eq!(
        view.admin.map(|k| hex::encode(k.0)),
        Some(keys::public_hex(keys.admin()))
    );
}
