//! `kmmr-replica status`: every replica's signed status, checked against its key in the view.

use anyhow::{bail, Result};
use serde_json::json;

use kmmr_client::files::ViewFile;
use kmmr_client::status::fetch_status;

use super::out::outln;
use super::render::Format;
use super::ClusterArgs;

/// Prints each replica's signed status, with whether its signature checks out; fails when
/// fewer than a quorum answer with a verified status.
pub async fn status(cluster: ClusterArgs, format: Format) -> Result<()> {
    let view_path = cluster
        .view
        .clone()
        .unwrap_or_else(|| cluster.cluster.join("view.toml"));
    let view = ViewFile::load(&view_path)?;
    let mut verified = 0;
    for m in &view.members {
        let url = status_url(&cluster.cluster, m.id.0);
        match fetch_status(&url).await {
            Ok(s) => {
                let ok = s.verify(&m.key);
                verified += usize::from(ok);
                let st = &s.status;
                match format {
                    Format::Json => outln!(
                        "{}",
                        json!({
                            "replica": m.id.0,
                            "reachable": true,
                            "signature_ok": ok,
                            "status": st,
                        })
                    ),
                    Format::Text => outln!(
                        "replica {}: {} regency {} leader {} last decided {} digest {}{}",
                        m.id.0,
                        if ok {
                            "signature ok,"
                        } else {
                            "BAD SIGNATURE,"
                        },
                        st.regency,
                        st.leader,
                        st.last_decided
                            .map_or_else(|| "none".to_string(), |c| c.to_string()),
                        st.state_digest_label(),
                        st.byzantine
                            .as_ref()
                            .map(|b| format!(" [BYZANTINE test mode {b}]"))
                            .unwrap_or_default()
                    ),
                }
            }
            Err(e) => match format {
                Format::Json => outln!(
                    "{}",
                    json!({ "replica": m.id.0, "reachable": false, "error": format!("{e:#}") })
                ),
                Format::Text => outln!("replica {}: unreachable ({e:#})", m.id.0),
            },
        }
    }
    // For scripts: the command fails when the cluster cannot serve.
    if verified < view.quorum() {
        bail!(
            "only {verified} of {} replicas answered with a status signed by their key; {} are needed for the cluster to serve",
            view.n(),
            view.quorum()
        );
    }
    Ok(())
}

/// The status address of replica `id` in a cluster directory made by `local`.
pub fn status_url(cluster: &std::path::Path, id: u32) -> String {
    let http = std::fs::read_to_string(cluster.join(format!("r{id}.toml")))
        .ok()
        .and_then(|t| toml::from_str::<kmmr::node::NodeConfig>(&t).ok())
        .map(|c| c.http_listen)
        .unwrap_or_default();
    format!("http://{http}/status")
}
