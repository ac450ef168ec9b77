//! The Helm chart: `helm lint` and `helm template` pass, the rendered CRD is the one generated
//! from the Rust types and survives `helm uninstall`, RBAC grants what the operator calls, and
//! images use fixed tags. Needs only the helm binary, no cluster.

mod common;

use common::{loud, run, strict, tool, Result};
use serde_json::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/kmmr");

fn helm_or_skip(test: &str) -> Option<std::path::PathBuf> {
    let helm = tool("helm");
    if helm.is_none() {
        let msg = format!(
            "{test}: no helm binary (looked on PATH and in ~/.cache/kmmr-testbed/helm-v3.19.5/bin); \
             build it with e2e/testbed/build.sh helm"
        );
        assert!(!strict(), "{msg}");
        loud(&format!("SKIPPED {msg}"));
    }
    helm
}

fn render(helm: &std::path::PathBuf, extra: &[&str]) -> Result<Vec<Value>> {
    let mut args = vec!["template", "kmmr", CHART, "--namespace", "kmmr-system"];
    args.extend_from_slice(extra);
    let text = run(helm, &args, None)?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn chart_lints_strictly() -> Result {
    let Some(helm) = helm_or_skip("chart_lints_strictly") else {
        return Ok(());
    };
    let out = run(&helm, &["lint", CHART, "--strict"], None)?;
    assert!(out.contains("0 chart(s) failed"), "{out}");
    // A moving tag is refused with a message that says why and what to set instead.
    for tag in ["latest", "Latest"] {
        let err = run(
            &helm,
            &[
                "template",
                "kmmr",
                CHART,
                "--set",
                &format!("image.tag={tag}"),
            ],
            None,
        )
        .expect_err("a moving tag must be refused")
        .to_string();
        assert!(
            err.contains("at '/image/tag': value must be 'a fixed tag such as 0.1.0 (the moving tag latest defeats")
                && !err.contains("'not' failed"),
            "{err}"
        );
        // lint prints the same message on stdout.
        assert!(lint_refuses(&helm, &format!("image.tag={tag}")));
        // Past the schema (--skip-schema-validation), the template refuses it too.
        let err = run(
            &helm,
            &[
                "template",
                "kmmr",
                CHART,
                "--skip-schema-validation",
                "--set",
                &format!("image.tag={tag}"),
            ],
            None,
        )
        .expect_err("the template must refuse a moving tag")
        .to_string();
        assert!(
            err.contains(&format!("image.tag={tag} is refused: a moving tag")),
            "{err}"
        );
    }
    // values.schema.json refuses unknown values.
    assert!(run(
        &helm,
        &["lint", CHART, "--strict", "--set", "bogus=1"],
        None
    )
    .is_err());
    Ok(())
}

#[test]
fn rendered_crd_is_the_generated_one_and_is_kept_on_uninstall() -> Result {
    let Some(helm) = helm_or_skip("rendered_crd_is_the_generated_one_and_is_kept_on_uninstall")
    else {
        return Ok(());
    };
    let docs = render(&helm, &[])?;
    let crds = find(&docs, "CustomResourceDefinition");
    assert_eq!(crds.len(), 1);
    let crd = crds[0];
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "helm uninstall must not delete the CRD (and every BftCluster with it)"
    );
    let generated = serde_json::to_value(kmmr_crds::crd())?;
    if let Some(diff) = first_difference(&crd["spec"], &generated["spec"], "spec") {
        panic!("the chart's CRD differs from the generated one at {diff}");
    }
    assert_eq!(crd["metadata"]["name"], generated["metadata"]["name"]);
    // Without the CRD (installed some other way) nothing else changes.
    let docs = render(&helm, &["--set", "crd.install=false"])?;
    assert!(find(&docs, "CustomResourceDefinition").is_empty());
    Ok(())
}

/// Where two JSON values first differ; numbers compare by value (YAML has no int/float split).
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            (x.as_f64() != y.as_f64()).then(|| format!("{path}: {x} vs {y}"))
        }
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                let d = first_difference(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    &format!("{path}.{k}"),
                );
                if d.is_some() {
                    return d;
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, &format!("{path}[{i}]"))),
        _ => (a != b).then(|| format!("{path}: {a} vs {b}")),
    }
}

fn allows(rules: &Value, group: &str, resource: &str, verb: &str) -> bool {
    rules.as_array().into_iter().flatten().any(|r| {
        let has = |field: &str, v: &str| {
            r[field]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == v || x == "*"))
        };
        has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
    })
}

#[test]
fn rbac_grants_every_call_the_operator_makes() -> Result {
    let Some(helm) = helm_or_skip("rbac_grants_every_call_the_operator_makes") else {
        return Ok(());
    };
    let docs = render(&helm, &[])?;
    let cluster_roles = find(&docs, "ClusterRole");
    assert_eq!(cluster_roles.len(), 1);
    let rules = &cluster_roles[0]["rules"];
    for (group, resource, verbs) in [
        (
            "kmmr.io",
            "bftclusters",
            &["get", "list", "watch", "patch"][..],
        ),
        ("kmmr.io", "bftclusters/status", &["patch"][..]),
        ("kmmr.io", "bftclusters/finalizers", &["update"][..]),
        (
            "apps",
            "statefulsets",
            &["get", "list", "watch", "patch", "delete"][..],
        ),
        // The etcd gateways of spec.etcdAPI.
        (
            "apps",
            "deployments",
            &["get", "list", "watch", "patch", "delete"][..],
        ),
        (
            "",
            "services",
            &["get", "list", "watch", "patch", "delete"][..],
        ),
        ("", "configmaps", &["get", "list", "watch", "patch"][..]),
        (
            "",
            "secrets",
            &["get", "list", "watch", "create", "patch", "delete"][..],
        ),
        ("", "pods", &["list", "watch", "delete"][..]),
        (
            "",
            "persistentvolumeclaims",
            &["list", "delete", "deletecollection"][..],
        ),
        (
            "policy",
            "poddisruptionbudgets",
            &["list", "watch", "patch"][..],
        ),
        ("events.k8s.io", "events", &["create", "patch"][..]),
        // spec.backup: the CronJob, a Job per request, and their outcome.
        (
            "batch",
            "cronjobs",
            &["get", "list", "watch", "patch", "delete"][..],
        ),
        ("batch", "jobs", &["get", "list", "watch", "create"][..]),
        ("", "persistentvolumeclaims", &["get"][..]),
    ] {
        for verb in verbs {
            assert!(
                allows(rules, group, resource, verb),
                "ClusterRole lacks {verb} on {group}/{resource}"
            );
        }
    }
    let leader = find(&docs, "Role")
        .into_iter()
        .find(|r| allows(&r["rules"], "coordination.k8s.io", "leases", "update"))
        .expect("a Role for the leader Lease");
    assert_eq!(leader["metadata"]["namespace"], "kmmr-system");

    // Scoped to one namespace, the operator gets a Role there instead.
    let docs = render(&helm, &["--set", "watchNamespace=apps"])?;
    assert!(find(&docs, "ClusterRole").is_empty());
    assert!(find(&docs, "Role")
        .iter()
        .any(|r| r["metadata"]["namespace"] == "apps"));
    Ok(())
}

#[test]
fn deployment_runs_non_root_with_a_fixed_tag_and_the_downward_api() -> Result {
    let Some(helm) = helm_or_skip("deployment_runs_non_root_with_a_fixed_tag_and_the_downward_api")
    else {
        return Ok(());
    };
    let docs = render(&helm, &[])?;
    let deploy = find(&docs, "Deployment");
    assert_eq!(deploy.len(), 1);
    let pod = &deploy[0]["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let image = c["image"].as_str().unwrap_or_default();
    assert!(
        !image.ends_with(":latest") && image.contains(':'),
        "{image}"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let env: Vec<&str> = c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(
        env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"),
        "{env:?}"
    );
    Ok(())
}

#[test]
fn byzantine_test_modes_are_off_unless_a_test_turns_them_on() -> Result {
    let Some(helm) = helm_or_skip("byzantine_test_modes_are_off_unless_a_test_turns_them_on")
    else {
        return Ok(());
    };
    let args = |extra: &[&str]| -> Result<Vec<String>> {
        let docs = render(&helm, extra)?;
        let deploy = find(&docs, "Deployment");
        Ok(
            deploy[0]["spec"]["template"]["spec"]["containers"][0]["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(str::to_string))
                .collect(),
        )
    };
    let default = args(&[])?;
    assert!(
        !default
            .iter()
            .any(|a| a == "--allow-byzantine-test-modes" || a == "--no-reconfiguration"),
        "{default:?}"
    );
    let testing = args(&["--set", "testing.allowByzantineModes=true"])?;
    assert!(
        testing.iter().any(|a| a == "--allow-byzantine-test-modes"),
        "{testing:?}"
    );
    let fixed = args(&["--set", "reconfiguration.enabled=false"])?;
    assert!(
        fixed.iter().any(|a| a == "--no-reconfiguration"),
        "{fixed:?}"
    );
    Ok(())
}

#[test]
fn monitoring_is_off_by_default_and_scrapes_the_real_ports_when_on() -> Result {
    let Some(helm) =
        helm_or_skip("monitoring_is_off_by_default_and_scrapes_the_real_ports_when_on")
    else {
        return Ok(());
    };
    let docs = render(&helm, &[])?;
    for kind in ["ServiceMonitor", "PodMonitor"] {
        assert!(find(&docs, kind).is_empty(), "{kind} rendered by default");
    }
    assert!(
        !find(&docs, "ConfigMap")
            .iter()
            .any(|c| c["metadata"]["name"] == "kmmr-dashboard"),
        "dashboard rendered by default"
    );
    let docs = render(
        &helm,
        &[
            "--set",
            "monitoring.serviceMonitor.enabled=true",
            "--set",
            "monitoring.podMonitor.enabled=true",
            "--set",
            "monitoring.podMonitor.labels.release=prometheus",
            "--set",
            "monitoring.dashboard.enabled=true",
        ],
    )?;
    // The ServiceMonitor selects the operator's metrics Service by its labels and port name.
    let sm = find(&docs, "ServiceMonitor");
    assert_eq!(sm.len(), 1);
    let service = find(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "kmmr-metrics")
        .expect("the metrics Service");
    for (k, v) in sm[0]["spec"]["selector"]["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
    {
        assert_eq!(&service["metadata"]["labels"][k], v, "label {k}");
    }
    let port = sm[0]["spec"]["endpoints"][0]["port"].clone();
    assert!(
        service["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == port),
        "the ServiceMonitor's port {port} is not a port of {service}"
    );
    // The PodMonitors select the replica pods by the labels the operator sets, on port http
    // (operator/src/names.rs and children.rs), and the etcd gateways on port metrics
    // (etcd_api.rs), in every namespace unless one is watched.
    let pm = find(&docs, "PodMonitor");
    assert_eq!(pm.len(), 2);
    let gateways = &pm[1]["spec"];
    assert_eq!(pm[1]["metadata"]["name"], "kmmr-etcd-gateways");
    assert_eq!(
        gateways["selector"]["matchLabels"]["app.kubernetes.io/component"],
        "etcd-gateway"
    );
    assert_eq!(gateways["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(pm[1]["metadata"]["labels"]["release"], "prometheus");
    let spec = &pm[0]["spec"];
    assert_eq!(
        spec["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "kmmr"
    );
    assert_eq!(
        spec["selector"]["matchLabels"]["app.kubernetes.io/component"],
        "replica"
    );
    assert_eq!(spec["podMetricsEndpoints"][0]["port"], "http");
    assert_eq!(spec["podMetricsEndpoints"][0]["path"], "/metrics");
    assert_eq!(spec["namespaceSelector"]["any"], true);
    assert_eq!(pm[0]["metadata"]["labels"]["release"], "prometheus");
    // The dashboard ConfigMap carries the file, labelled for Grafana's sidecar.
    let cm = find(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "kmmr-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value = serde_json::from_str(cm["data"]["kmmr.json"].as_str().unwrap_or(""))?;
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));

    let docs = render(
        &helm,
        &[
            "--set",
            "monitoring.podMonitor.enabled=true",
            "--set",
            "watchNamespace=apps",
        ],
    )?;
    let pm = find(&docs, "PodMonitor");
    for m in &pm {
        assert_eq!(m["spec"]["namespaceSelector"]["matchNames"][0], "apps");
    }
    // A misspelt setting is refused, not ignored.
    assert!(lint_refuses(&helm, "monitoring.podMonitor.enable=true"));
    Ok(())
}

/// The metric names each binary registers, with the suffixes the exposition adds, read from
/// the code that registers them.
fn exported_metrics() -> Result<Vec<String>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut names = Vec::new();
    for (file, prefix) in [
        ("replica/src/node/metrics.rs", "kmmr_"),
        ("operator/src/metrics.rs", "kmmr_operator_"),
        ("etcd-gateway/src/metrics.rs", "kmmr_etcd_gateway_"),
    ] {
        let code = std::fs::read_to_string(format!("{root}/{file}"))?;
        for part in code.split("registry.register(").skip(1) {
            let args = call_arguments(part);
            let name = args
                .split('"')
                .nth(1)
                .ok_or(format!("{file}: a register call without a name"))?;
            // The metric object: the last argument, `<var>.clone()`, declared `let <var> = ...`.
            let var = args
                .rsplit(',')
                .map(str::trim)
                .find(|a| !a.is_empty())
                .unwrap_or_default()
                .trim_end_matches(".clone()");
            let declared = code
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("let {var} = ")))
                .ok_or(format!("{file}: {name}: no declaration of {var}"))?;
            let base = format!("{prefix}{name}");
            if declared.contains("Histogram") {
                for s in ["_bucket", "_sum", "_count"] {
                    names.push(format!("{base}{s}"));
                }
            } else if declared.contains("Counter") {
                names.push(format!("{base}_total"));
            } else if declared.contains("Gauge") {
                names.push(base);
            } else {
                return Err(format!("{file}: {name}: unknown kind in {declared:?}").into());
            }
        }
    }
    Ok(names)
}

/// The arguments of a call whose text starts at `rest`: up to the `);` that ends it, not one
/// inside a string literal (a help text may hold one).
fn call_arguments(rest: &str) -> &str {
    let (mut in_string, mut escaped) = (false, false);
    for (i, c) in rest.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            ')' if !in_string && rest[i..].starts_with(");") => return &rest[..i],
            _ => {}
        }
    }
    rest
}

#[test]
fn the_dashboard_queries_only_metrics_the_binaries_export() -> Result {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/kmmr/files/grafana-dashboard.json"
    ))?;
    let dashboard: Value = serde_json::from_str(&text)?;
    let exported = exported_metrics()?;
    assert!(
        exported.iter().any(|m| m == "kmmr_decided_total")
            && exported
                .iter()
                .any(|m| m == "kmmr_operator_reconciles_total"),
        "{exported:?}"
    );
    let mut used = 0;
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("kmmr_") {
                    used += 1;
                    assert!(
                        exported.iter().any(|m| m == word),
                        "panel {:?} queries {word}, which no binary exports",
                        panel["title"]
                    );
                }
            }
        }
    }
    assert!(used >= 15, "only {used} metric references in the dashboard");
    Ok(())
}

/// Whether `helm lint --strict` fails the chart with this one `--set`.
fn lint_refuses(helm: &std::path::PathBuf, set: &str) -> bool {
    run(helm, &["lint", CHART, "--strict", "--set", set], None).is_err()
}
