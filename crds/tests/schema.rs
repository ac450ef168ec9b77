//! Properties of the generated schema that the apiserver (or our users) depend on.

use serde_json::Value;

fn schema() -> Value {
    let crd = kmmr_crds::crd();
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the CRD has an openAPIV3Schema");
    serde_json::to_value(schema).expect("the schema serializes")
}

/// Calls `visit(path, node)` on every object node of the schema.
fn walk(path: &str, node: &Value, visit: &mut dyn FnMut(&str, &serde_json::Map<String, Value>)) {
    match node {
        Value::Object(map) => {
            visit(path, map);
            for (k, v) in map {
                walk(&format!("{path}/{k}"), v, visit);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                walk(&format!("{path}/{i}"), v, visit);
            }
        }
        _ => {}
    }
}

fn rules_at<'a>(node: &'a Value, pointer: &str) -> Vec<(&'a str, &'a str)> {
    node.pointer(pointer)
        .and_then(|n| n.get("x-kubernetes-validations"))
        .and_then(Value::as_array)
        .map(|rules| {
            rules
                .iter()
                .map(|r| {
                    (
                        r["rule"].as_str().unwrap_or_default(),
                        r["message"].as_str().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn schema_uses_only_formats_the_apiserver_knows() {
    // schemars writes uint32/uint64/uint for unsigned fields; the apiserver warns on those.
    let known = [
        "int32",
        "int64",
        "float",
        "double",
        "byte",
        "date",
        "date-time",
        "password",
    ];
    let mut unknown = Vec::new();
    walk("", &schema(), &mut |path, map| {
        if let Some(Value::String(format)) = map.get("format") {
            if !known.contains(&format.as_str()) {
                unknown.push(format!("{path}: {format}"));
            }
        }
    });
    assert!(
        unknown.is_empty(),
        "formats the apiserver warns on: {unknown:?}"
    );
}

#[test]
fn schema_is_structural_and_keeps_no_unknown_fields() {
    let mut offending = Vec::new();
    walk("", &schema(), &mut |path, map| {
        for key in [
            "x-kubernetes-preserve-unknown-fields",
            "$ref",
            "oneOf",
            "allOf",
            "not",
        ] {
            if map.contains_key(key) && !path.ends_with("/properties") {
                offending.push(format!("{path}: {key}"));
            }
        }
        let is_schema = map.contains_key("type") || map.contains_key("x-kubernetes-int-or-string");
        if is_schema && map.get("additionalProperties") == Some(&Value::Bool(false)) {
            offending.push(format!("{path}: additionalProperties: false"));
        }
    });
    assert!(
        offending.is_empty(),
        "non-structural or unknown-field-preserving nodes: {offending:?}"
    );
}

#[test]
fn spec_rules_reject_too_few_replicas_and_too_large_f_with_actionable_messages() {
    let schema = schema();
    let rules = rules_at(&schema, "/properties/spec");
    let min = rules
        .iter()
        .find(|(rule, _)| *rule == "self.replicas >= 4")
        .expect("a rule for n >= 4");
    assert_eq!(
        min.1,
        "spec.replicas must be at least 4: BFT needs n >= 3f+1 with f >= 1"
    );
    let f = rules
        .iter()
        .find(|(rule, _)| rule.contains("3 * self.f + 1"))
        .expect("a rule for n >= 3f+1");
    assert!(f.0.contains("self.f >= 1"));
    assert!(
        f.1.contains("spec.f") && f.1.contains("spec.replicas"),
        "{}",
        f.1
    );
}

#[test]
fn storage_ports_and_keys_are_immutable() {
    let schema = schema();
    for pointer in [
        "/properties/spec/properties/storage",
        "/properties/spec/properties/ports",
    ] {
        assert!(
            rules_at(&schema, pointer)
                .iter()
                .any(|(rule, _)| *rule == "self == oldSelf"),
            "{pointer} has no immutability rule"
        );
    }
    assert!(rules_at(&schema, "/properties/spec")
        .iter()
        .any(|(rule, msg)| rule.contains("oldSelf.keys") && msg.starts_with("spec.keys")));
}

#[test]
fn client_port_is_tied_to_the_replica_port() {
    let schema = schema();
    assert!(rules_at(&schema, "/properties/spec/properties/ports")
        .iter()
        .any(|(rule, _)| *rule == "self.client == self.replica + 1000"));
}

#[test]
fn every_spec_field_is_described_for_kubectl_explain() {
    let schema = schema();
    let props = schema
        .pointer("/properties/spec/properties")
        .and_then(Value::as_object)
        .expect("spec has properties");
    let undocumented: Vec<_> = props
        .iter()
        .filter(|(_, v)| {
            v.get("description")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        })
        .map(|(k, _)| k.clone())
        .collect();
    assert!(
        undocumented.is_empty(),
        "spec fields without a description: {undocumented:?}"
    );
}

#[test]
fn printer_columns_show_n_f_healthy_leader_view_etcd_age() {
    let crd = kmmr_crds::crd();
    let columns: Vec<_> = crd.spec.versions[0]
        .additional_printer_columns
        .as_ref()
        .expect("printer columns")
        .iter()
        .map(|c| (c.name.to_uppercase(), c.json_path.clone()))
        .collect();
    let expected = [
        ("N", ".status.n"),
        ("F", ".status.f"),
        ("HEALTHY", ".status.healthy"),
        ("LEADER", ".status.leader"),
        ("VIEW", ".status.viewId"),
        ("ETCD", ".status.etcdAPI.endpoint"),
        ("AGE", ".metadata.creationTimestamp"),
    ];
    let expected: Vec<_> = expected
        .iter()
        .map(|(n, p)| (n.to_string(), p.to_string()))
        .collect();
    assert_eq!(columns, expected);
}

#[test]
fn the_etcd_api_gateway_count_is_bounded_with_an_actionable_message() {
    let schema = schema();
    let rules = rules_at(&schema, "/properties/spec/properties/etcdAPI");
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert!(rules[0].0.contains("self.replicas <= 9"));
    assert!(rules[0]
        .1
        .starts_with("spec.etcdAPI.replicas must be between 1 and 9"));
    let service_types = schema
        .pointer("/properties/spec/properties/etcdAPI/properties/serviceType/enum")
        .and_then(Value::as_array)
        .expect("serviceType is an enum");
    assert_eq!(
        service_types,
        &["ClusterIP", "NodePort", "LoadBalancer"].map(Value::from)
    );
}

#[test]
fn status_is_a_subresource() {
    let crd = kmmr_crds::crd();
    let sub = crd.spec.versions[0]
        .subresources
        .as_ref()
        .expect("subresources");
    assert!(sub.status.is_some());
}

#[test]
fn backup_schedules_and_restore_sources_are_checked_at_admission() {
    let schema = schema();
    let schedule = rules_at(
        &schema,
        "/properties/spec/properties/backup/properties/schedule",
    );
    assert!(
        schedule
            .iter()
            .any(|(rule, msg)| rule.contains("self.matches")
                && msg.starts_with("spec.backup.schedule must be a cron schedule")),
        "{schedule:?}"
    );
    let file = rules_at(
        &schema,
        "/properties/spec/properties/restoreFrom/properties/file",
    );
    assert!(
        file.iter().any(|(rule, _)| rule.contains("'..'")),
        "{file:?}"
    );
    // Set at creation only: the replicas' state starts from it once.
    assert!(rules_at(&schema, "/properties/spec")
        .iter()
        .any(|(rule, msg)| rule.contains("oldSelf.restoreFrom")
            && msg.starts_with("spec.restoreFrom can only be set")));
    // One place for backups, one source for a restore.
    assert!(rules_at(&schema, "/properties/spec/properties/backup")
        .iter()
        .any(|(rule, msg)| *rule == "has(self.claimName) != has(self.s3)"
            && msg.starts_with("spec.backup needs exactly one place")));
    assert!(rules_at(&schema, "/properties/spec/properties/restoreFrom")
        .iter()
        .any(|(rule, msg)| rule.contains("has(self.s3)")
            && msg.starts_with("spec.restoreFrom needs exactly one backup")));
    let keep = schema
        .pointer("/properties/spec/properties/backup/properties/keep")
        .expect("keep");
    assert_eq!(
        (keep["minimum"].as_f64(), keep["maximum"].as_f64()),
        (Some(1.0), Some(1000.0)),
        "{keep}"
    );
}
