//! Membership steps through the protocol: the admin client (`kmmr_client::admin`) signs one
//! view change with the cluster's admin key, the replicas order it like any request, and the
//! view they install comes back. The controller writes that view to the ConfigMap and only then
//! creates or removes the replica's StatefulSet.
//!
//! Every outcome the admin client can give is mapped: Installed (the new view), Refused (the view
//! is unchanged) and Unknown (no agreed answer). Unknown is not an error to retry blindly: the
//! next pass asks the replicas for their view ([`Reconfigurer::current_view`]) first.

use std::collections::BTreeMap;
use std::time::Duration;

use kmmr_client::admin::{Admin, AdminError};
use kmmr_client::files::ViewFile;
use kmmr_client::proxy::ClientOptions;
use kmmr_protocol::core::reconfig::ViewChange;
use kmmr_protocol::crypto::{KeyPair, PublicKey};
use kmmr_protocol::view::{Member, View};
use kmmr_protocol::wire::ids::ReplicaId;

use crate::config::Membership;
use crate::membership::{BoxFuture, InstalledView, Joining, ReconfigError, Reconfigurer, Step};

/// Carries out steps with admin-signed reconfiguration requests.
pub struct ThroughAdmin {
    /// How long one change may take to be ordered and installed.
    pub timeout: Duration,
}

impl ThroughAdmin {
    async fn connect(
        &self,
        view_toml: &str,
        admin: &ed25519_dalek::SigningKey,
    ) -> Result<Admin, ReconfigError> {
        let view = parse_view(view_toml)?;
        let opts = ClientOptions {
            timeout: self.timeout,
            ..ClientOptions::default()
        };
        let key = KeyPair::from_seed(admin.to_bytes());
        tokio::time::timeout(self.timeout, Admin::connect(key, view, opts))
            .await
            .map_err(|_| ReconfigError::Unknown("connecting to the replicas timed out".into()))?
            .map_err(|e| ReconfigError::Unknown(format!("connecting to the replicas: {e}")))
    }
}

impl Reconfigurer for ThroughAdmin {
    fn apply<'a>(
        &'a self,
        view_toml: &'a str,
        step: &'a Step,
        joining: Option<&'a Joining>,
        admin: &'a ed25519_dalek::SigningKey,
    ) -> BoxFuture<'a, Result<InstalledView, ReconfigError>> {
        Box::pin(async move {
            let change = change_for(step, joining)?;
            let client = self.connect(view_toml, admin).await?;
            match tokio::time::timeout(self.timeout, client.apply(change)).await {
                Err(_) => Err(ReconfigError::Unknown(format!(
                    "{step} was not answered within {:?}",
                    self.timeout
                ))),
                Ok(Err(AdminError::Refused(why))) => Err(ReconfigError::Refused(why)),
                Ok(Err(AdminError::Unknown(e))) => Err(ReconfigError::Unknown(e.to_string())),
                Ok(Ok(v)) => installed(&v),
            }
        })
    }

    fn current_view<'a>(
        &'a self,
        view_toml: &'a str,
        admin: &'a ed25519_dalek::SigningKey,
    ) -> BoxFuture<'a, Result<InstalledView, ReconfigError>> {
        Box::pin(async move {
            let client = self.connect(view_toml, admin).await?;
            match tokio::time::timeout(self.timeout, client.current_view()).await {
                Err(_) => Err(ReconfigError::Unknown(format!(
                    "the replicas did not say which view they run within {:?}",
                    self.timeout
                ))),
                Ok(Err(e)) => Err(ReconfigError::Unknown(e.to_string())),
                Ok(Ok(v)) => installed(&v),
            }
        })
    }
}

fn parse_view(view_toml: &str) -> Result<View, ReconfigError> {
    // The operator rendered this text itself: failing to read it is a bug, not the replicas'
    // answer, but it is reported rather than panicked on.
    ViewFile::parse(view_toml).map_err(|e| {
        ReconfigError::Refused(format!("the operator's own view does not parse: {e:#}"))
    })
}

fn change_for(step: &Step, joining: Option<&Joining>) -> Result<ViewChange, ReconfigError> {
    let bad = |e: String| ReconfigError::Refused(e);
    Ok(match step {
        Step::Join(id) => {
            let joining = joining
                .ok_or_else(|| bad(format!("no address and key for joining replica {id}")))?;
            let key = hex::decode(&joining.public_key)
                .ok()
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .ok_or_else(|| bad(format!("replica {id}'s public key is not 32 bytes of hex")))?;
            ViewChange::Add {
                member: Member {
                    id: ReplicaId(to_u32(*id)?),
                    address: joining.address.clone(),
                    key: PublicKey(key),
                },
                f: None,
            }
        }
        Step::Leave(id) => ViewChange::Remove {
            id: ReplicaId(to_u32(*id)?),
            f: None,
        },
        Step::SetF(f) => ViewChange::SetF { f: to_u32(*f)? },
    })
}

/// The operator's picture of a view the replicas vouched for.
pub fn installed(view: &View) -> Result<InstalledView, ReconfigError> {
    let out_of_range = |what: String| {
        ReconfigError::Refused(format!(
            "the replicas' view {} has {what}, which the operator cannot represent",
            view.id.0
        ))
    };
    let mut members = Vec::new();
    let mut keys = BTreeMap::new();
    for m in &view.members {
        let id =
            i32::try_from(m.id.0).map_err(|_| out_of_range(format!("member id {}", m.id.0)))?;
        members.push(id);
        keys.insert(id, hex::encode(m.key.0));
    }
    members.sort_unstable();
    Ok(InstalledView {
        membership: Membership {
            view_id: i64::from(view.id.0),
            f: i32::try_from(view.f).map_err(|_| out_of_range(format!("f = {}", view.f)))?,
            members,
        },
        keys,
    })
}

fn to_u32(v: i32) -> Result<u32, ReconfigError> {
    u32::try_from(v).map_err(|_| ReconfigError::Refused(format!("{v} is not a valid id or f")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_become_the_replicas_view_changes() {
        let joining = Joining {
            address: "demo-4-0.demo-replicas.ns.svc:7000".into(),
            public_key: "ab".repeat(32),
        };
        match change_for(&Step::Join(4), Some(&joining)).unwrap() {
            ViewChange::Add { member, f } => {
                assert_eq!((member.id, f), (ReplicaId(4), None));
                assert_eq!(member.key, PublicKey([0xab; 32]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            change_for(&Step::Leave(2), None).unwrap(),
            ViewChange::Remove {
                id: ReplicaId(2),
                f: None
            }
        );
        assert_eq!(
            change_for(&Step::SetF(2), None).unwrap(),
            ViewChange::SetF { f: 2 }
        );
        // Bad input is an error with a message, never a panic.
        assert!(change_for(&Step::Join(4), None).is_err());
        let short = Joining {
            address: "a:1".into(),
            public_key: "abc".into(),
        };
        assert!(change_for(&Step::Join(4), Some(&short)).is_err());
        assert!(change_for(&Step::Leave(-1), None).is_err());
        assert!(parse_view("not a view").is_err());
    }
}
