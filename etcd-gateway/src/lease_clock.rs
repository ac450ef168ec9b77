//! Makes leases the gateway granted expire on time when nothing else is written.
//!
//! The replicas expire a lease only by consensus time: when they execute an ordered request
//! whose timestamp is past the lease's deadline. In a store nobody writes to, no such request
//! comes, and an expired lease and its keys stayed forever, although etcd deletes them once
//! the TTL ran out (k8s.io/apiserver's TestCreateWithTTL waits for that DELETE). So for every
//! lease it grants, the gateway orders a request when the lease should have run out: a
//! TimeToLive of that lease, which executes at a fresh consensus time (expiring the lease if it
//! is due) and tells how long is left if it was kept alive meanwhile.

use std::sync::Arc;
use std::time::Duration;

use kmmr_protocol::service::kv::{self as kv, KvError, KvRequest, KvResponse};

use crate::gateway::Gateway;

/// Added to each wait, so that the leader's consensus time, which the deadline is measured
/// against, has passed the deadline too when the request executes (clocks of one host or of a
/// cluster's hosts differ by less).
const MARGIN: Duration = Duration::from_millis(250);

/// Wait after a failed attempt (the cluster unreachable for a while).
const RETRY: Duration = Duration::from_secs(1);

/// Orders a TimeToLive of lease `id` once its `ttl` seconds ran out, and again for as long as
/// it lives on (kept alive), until the cluster no longer knows it.
pub(crate) fn expire_when_due(gateway: Arc<Gateway>, id: i64, ttl: i64) {
    tokio::spawn(async move {
        let mut wait = secs(ttl);
        loop {
            tokio::time::sleep(wait + MARGIN).await;
            let req = KvRequest::LeaseTimeToLive(kv::LeaseTimeToLiveRequest { id, keys: false });
            wait = match gateway.client.kv(&req).await {
                Ok(KvResponse::LeaseTimeToLive(t)) => {
                    // Kept alive since: wait for what is left. The answer is in whole seconds,
                    // rounded down, so a lease with less than a second left is asked about
                    // again after the margin alone.
                    secs(t.ttl)
                }
                Ok(KvResponse::Error(e)) if matches!(e.error, KvError::LeaseNotFound { .. }) => {
                    // Expired (by this request or another) or revoked: its keys' DELETE events
                    // are in the log now; tell the watches' tail to look.
                    gateway.hub.wake();
                    return;
                }
                Ok(other) => {
                    tracing::warn!(lease = id, reply = ?other.error(), "lease expiry: unexpected answer");
                    RETRY
                }
                Err(e) => {
                    tracing::warn!(lease = id, error = %e, "lease expiry: the cluster did not answer");
                    RETRY
                }
            };
        }
    });
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}
