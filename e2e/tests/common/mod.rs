//! Helpers shared by the e2e tests that drive the cluster through kubectl and helm, as a user
//! would: skipping loudly without a cluster, polling, and running the tools.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Prints past libtest's output capture, so that skips and measurements show in every run.
pub fn loud(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "\n*** {msg} ***\n");
}

/// Whether `KUBECONFIG` names a cluster; says loudly when not.
pub fn cluster_or_skip(test: &str) -> bool {
    if std::env::var_os("KUBECONFIG").is_none_or(|v| v.is_empty()) {
        loud(&format!(
            "SKIPPED {test}: KUBECONFIG is unset. These tests need a real Kubernetes; \
             run .ci/testbed-test (or e2e/testbed/up.sh --node and export KUBECONFIG) to run them."
        ));
        return false;
    }
    true
}

/// Whether this run must not skip for lack of a tool (CI, or the test bed's test command),
/// unless the run was told to leave the test bed out (`KMMR_SKIP_TESTBED=1`).
pub fn strict() -> bool {
    let skipping = std::env::var("KMMR_SKIP_TESTBED").is_ok_and(|v| v == "1");
    !skipping && (std::env::var_os("CI").is_some() || std::env::var_os("KMMR_TESTBED").is_some())
}

/// A name no earlier run against the same cluster used (a DNS label).
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}", (nanos / 1000) % 100_000_000)
}

/// The replica and operator images the nodes hold (`KMMR_REPLICA_IMAGE`, `KMMR_OPERATOR_IMAGE`),
/// or `None` after saying loudly that `test` is skipped; `where_from` says how a run gets them.
pub fn images_or_skip(test: &str, where_from: &str) -> Option<(String, String)> {
    let image = |var: &str| std::env::var(var).ok().filter(|s| !s.is_empty());
    match (image("KMMR_REPLICA_IMAGE"), image("KMMR_OPERATOR_IMAGE")) {
        (Some(replica), Some(operator)) => Some((replica, operator)),
        _ => {
            loud(&format!(
                "SKIPPED {test}: KMMR_REPLICA_IMAGE and KMMR_OPERATOR_IMAGE must name images the \
                 nodes hold ({where_from})"
            ));
            None
        }
    }
}

/// The test bed's network namespace, as e2e/testbed/lib.sh names it (`KMMR_TESTBED_NETNS`,
/// default kmmr-testbed).
pub fn testbed_netns() -> PathBuf {
    let name = std::env::var("KMMR_TESTBED_NETNS")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "kmmr-testbed".to_string());
    PathBuf::from("/run/netns").join(name)
}

/// A tool by name: on PATH, else in the test bed's cache.
pub fn tool(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let home = PathBuf::from(std::env::var_os("HOME")?);
        let cache = home.join(".cache/kmmr-testbed");
        [
            cache.join("helm-v3.19.5/bin").join(name),
            cache.join("kubernetes-v1.34.4/bin").join(name),
        ]
        .into_iter()
        .find(|p| p.is_file())
    })
}

/// Runs a tool, returning its stdout, or an error carrying its stderr.
pub fn run(tool_path: &PathBuf, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new(tool_path)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", tool_path.display()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed ({}): {}",
            tool_path.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` every `every` until it returns `Some`, for at most `timeout`.
pub async fn poll<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    while start.elapsed() < timeout {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e.to_string()),
        }
        tokio::time::sleep(every).await;
    }
    Err(format!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})").into())
}
