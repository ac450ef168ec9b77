//! Membership steps through the protocol: the admin client (`kmmr::client::admin`) signs one
//! view change with the cluster's admin key, the replicas order it like any request, and the
//! view they install comes back. The controller writes that view to the ConfigMap and only then
//! creates or removes the replica's StatefulSet.

use std::time::Duration;

use kmmr::client::admin::{Admin, AdminError};
use kmmr::client::proxy::ClientOptions;
use kmmr::core::reconfig::ViewChange;
use kmmr::core::view::Member;
use kmmr::crypto::{KeyPair, PublicKey};
use kmmr::node::config::ViewFile;
use kmmr::wire::ids::ReplicaId;

use crate::config::Membership;
use crate::membership::{BoxFuture, Joining, ReconfigError, Reconfigurer, Step};

/// Carries out steps with admin-signed reconfiguration requests.
pub struct ThroughAdmin {
    /// How long one change may take to be ordered and installed.
    pub timeout: Duration,
}

impl Reconfigurer for ThroughAdmin {
    fn apply<'a>(
        &'a self,
        view_toml: &'a str,
        step: &'a Step,
        joining: Option<&'a Joining>,
        admin: &'a ed25519_dalek::SigningKey,
    ) -> BoxFuture<'a, Result<Membership, ReconfigError>> {
        Box::pin(async move {
            let bad = |e: String| ReconfigError::Rejected(e);
            let file: ViewFile = toml::from_str(view_toml)
                .map_err(|e| bad(format!("the current view does not parse: {e}")))?;
            let view = file
                .to_view()
                .map_err(|e| bad(format!("the current view is invalid: {e}")))?;
            let change = match step {
                Step::Join(id) => {
                    let joining = joining.ok_or_else(|| {
                        bad(format!("no address and key for joining replica {id}"))
                    })?;
                    let key = hex::decode(&joining.public_key)
                        .ok()
                        .and_then(|k| <[u8; 32]>::try_from(k).ok())
                        .ok_or_else(|| {
                            bad(format!("replica {id}'s public key is not 32 bytes of hex"))
                        })?;
                    ViewChange::Add {
                        member: Member {
                            id: ReplicaId(id_u32(*id)?),
                            address: joining.address.clone(),
                            key: PublicKey(key),
                        },
                        f: None,
                    }
                }
                Step::Leave(id) => ViewChange::Remove {
                    id: ReplicaId(id_u32(*id)?),
                    f: None,
                },
                Step::SetF(f) => ViewChange::SetF { f: id_u32(*f)? },
            };
            let opts = ClientOptions {
                timeout: self.timeout,
                ..ClientOptions::default()
            };
            let key = KeyPair::from_seed(admin.to_bytes());
            let client = tokio::time::timeout(self.timeout, Admin::connect(key, view, opts))
                .await
                .map_err(|_| bad("connecting to the replicas timed out".to_string()))?
                .map_err(|e| bad(format!("connecting to the replicas: {e}")))?;
            let installed = match tokio::time::timeout(self.timeout, client.apply(change)).await {
                Err(_) => {
                    return Err(bad(format!(
                        "{step:?} was not installed within {:?}",
                        self.timeout
                    )))
                }
                Ok(Err(AdminError::Refused(why))) => {
                    return Err(bad(format!("the replicas refused {step:?}: {why}")))
                }
                Ok(Err(e)) => return Err(bad(e.to_string())),
                Ok(Ok(v)) => v,
            };
            let mut members: Vec<i32> = installed
                .ids()
                .filter_map(|r| i32::try_from(r.0).ok())
                .collect();
            members.sort_unstable();
            Ok(Membership {
                view_id: i64::from(installed.id.0),
                f: i32::try_from(installed.f).map_err(|_| bad("f out of range".to_string()))?,
                members,
            })
        })
    }
}

fn id_u32(v: i32) -> Result<u32, ReconfigError> {
    u32::try_from(v).map_err(|_| ReconfigError::Rejected(format!("{v} is not a valid id or f")))
}
