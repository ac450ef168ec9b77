//! The admin's client: signs view changes with the admin key and waits for the agreed outcome.
//! The operator scales a cluster with it; `kmmr-replica admin` wraps it for people.
//!
//! A change is signed for the view the admin follows, and replicas execute it only while that
//! view is current: a change prepared from a stale view is refused, never applied on top of one
//! the admin did not see.

use anyhow::anyhow;

use crate::proxy::{Client, ClientOptions};
use kmmr_protocol::core::reconfig::{ReconfigOutcome, ReconfigRequest, ViewChange};
use kmmr_protocol::crypto::KeyPair;
use kmmr_protocol::view::View;
use kmmr_protocol::wire::codec::{Decode, Encode};
use kmmr_protocol::wire::messages::RequestKind;

/// Why a change did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The replicas agreed to refuse it, for this reason; the view is unchanged.
    #[error("the replicas refused the change: {0}")]
    Refused(String),
    /// No agreed answer (a quorum down, a timeout): the change may or may not be installed;
    /// read the view before trying again.
    #[error("no agreed answer: {0}")]
    Unknown(anyhow::Error),
}

/// A connected admin.
#[derive(Clone)]
pub struct Admin {
    client: Client,
}

impl Admin {
    /// Connects with the admin key to the replicas of `view` (whose `admin` must be that key).
    pub async fn connect(
        admin_key: KeyPair,
        view: View,
        opts: ClientOptions,
    ) -> anyhow::Result<Admin> {
        if view.admin != Some(admin_key.public()) {
            return Err(anyhow!(
                "this key is not the view's admin key: the replicas would refuse every change"
            ));
        }
        Ok(Admin {
            client: Client::connect(admin_key, view, opts).await?,
        })
    }

    /// The newest view the admin follows.
    pub fn view(&self) -> View {
        self.client.view()
    }

    /// The view the replicas run now, as f+1 of them report it, without changing anything.
    ///
    /// After an [`AdminError::Unknown`] the change may have been installed or not; this settles
    /// it. It sends a read-only request (an empty unordered query) signed for the view this admin
    /// follows: replicas that moved on answer with their newer view instead, the admin follows
    /// the one f+1 of them vouch for, and the query then completes in that view.
    pub async fn current_view(&self) -> Result<View, AdminError> {
        self.client
            .invoke(RequestKind::Unordered, Vec::new())
            .await
            .map_err(AdminError::Unknown)?;
        Ok(self.client.view())
    }

    /// Applies one change and returns the view it installed.
    pub async fn apply(&self, change: ViewChange) -> Result<View, AdminError> {
        let req = ReconfigRequest {
            view: self.client.view().id,
            change,
        };
        let bytes = self
            .client
            .invoke(RequestKind::Reconfig, req.to_bytes())
            .await
            .map_err(AdminError::Unknown)?;
        match ReconfigOutcome::from_bytes(&bytes) {
            Ok(ReconfigOutcome::Installed(view)) => {
                // f+1 replicas vouched for it: follow it at once rather than on the next refusal.
                self.client
                    .install_view(view.clone())
                    .await
                    .map_err(AdminError::Unknown)?;
                Ok(view)
            }
            Ok(ReconfigOutcome::Refused(why)) => Err(AdminError::Refused(why)),
            Err(e) => Err(AdminError::Unknown(anyhow!(
                "undecodable reconfiguration outcome: {e}"
            ))),
        }
    }
}
