//! Makes leases expire on time when nothing else is written, whichever gateway granted them.
//!
//! The replicas expire a lease only by consensus time: when they execute an ordered request
//! whose timestamp is past the lease's deadline. In a store nobody writes to, no such request
//! comes, and an expired lease and its keys stayed forever, although etcd deletes them once
//! the TTL ran out (k8s.io/apiserver's TestCreateWithTTL waits for that DELETE). So for every
//! lease it knows of, the gateway orders a request when the lease should have run out: a
//! TimeToLive of that lease, which executes at a fresh consensus time (expiring the lease if it
//! is due) and tells how long is left if it was kept alive meanwhile.
//!
//! A gateway knows the leases it granted, those it keeps alive for its clients, those of every
//! key its watches see written (from the tail, or read while a watch catches up), and every
//! lease the cluster lists (`sweep`: when it starts and every [`SWEEP_INTERVAL`]): so a lease
//! granted through a gateway that then went away (with its kube-apiserver) still expires,
//! through the gateways that remain or one started later, whether or not it has watches.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use kmmr_client::proxy::Client;
use kmmr_protocol::service::kv::{self as kv, KvError, KvRequest, KvResponse};

/// Added to each wait, so that the leader's consensus time, which the deadline is measured
/// against, has passed the deadline too when the request executes (clocks of one host or of a
/// cluster's hosts differ by less).
const MARGIN: Duration = Duration::from_millis(250);

/// Wait after a failed attempt (the cluster unreachable for a while).
const RETRY: Duration = Duration::from_secs(1);

/// How often the gateway lists the cluster's leases to follow those it has not heard of.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Leases followed at once at most; more are left to the other gateways and to writes.
const MAX_TRACKED: usize = 100_000;

/// TimeToLive requests in flight at once: a sweep that finds many leases at startup spreads
/// its asks rather than ordering them all at the same moment.
const MAX_ASKING: usize = 64;

pub(crate) struct LeaseClock {
    client: Client,
    asking: tokio::sync::Semaphore,
    /// Leases with a task waiting for their deadline.
    tracked: Mutex<HashSet<i64>>,
    /// Woken when a lease ended, for the watches' tail to read its keys' deletions.
    tail: Arc<Notify>,
}

impl LeaseClock {
    pub(crate) fn new(client: Client, tail: Arc<Notify>) -> Arc<LeaseClock> {
        Arc::new(LeaseClock {
            client,
            asking: tokio::sync::Semaphore::new(MAX_ASKING),
            tracked: Mutex::new(HashSet::new()),
            tail,
        })
    }

    /// Leases followed now.
    pub(crate) fn followed(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.tracked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows lease `id` until the cluster no longer knows it: asks after `ttl` seconds when
    /// they are known (the lease was just granted or kept alive), at once otherwise, and again
    /// for as long as it lives on. A lease already followed is left to its task.
    pub(crate) fn track(self: &Arc<Self>, id: i64, ttl: Option<i64>) {
        if id == kv::NO_LEASE {
            return;
        }
        {
            let mut tracked = self.lock();
            if tracked.len() >= MAX_TRACKED || !tracked.insert(id) {
                return;
            }
        }
        let clock = self.clone();
        tokio::spawn(async move {
            clock
                .follow(id, ttl.map_or(Duration::ZERO, |t| secs(t) + MARGIN))
                .await;
            clock.lock().remove(&id);
        });
    }

    /// Lists the cluster's leases now and every [`SWEEP_INTERVAL`], and follows each: one
    /// linearizable read per sweep, and one ordered TimeToLive per lease not followed yet.
    pub(crate) async fn sweep(self: Arc<Self>) {
        loop {
            match self.client.kv_read(&KvRequest::LeaseLeases).await {
                Ok(KvResponse::LeaseLeases(l)) => {
                    for id in l.ids {
                        self.track(id, None);
                    }
                }
                Ok(other) => {
                    tracing::warn!(reply = ?other.error(), "listing the leases: unexpected answer");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listing the leases: the cluster did not answer");
                }
            }
            tokio::time::sleep(SWEEP_INTERVAL).await;
        }
    }

    async fn follow(&self, id: i64, mut wait: Duration) {
        loop {
            tokio::time::sleep(wait).await;
            let req = KvRequest::LeaseTimeToLive(kv::LeaseTimeToLiveRequest { id, keys: false });
            let answer = match self.asking.acquire().await {
                Ok(_slot) => self.client.kv(&req).await,
                // Never closed: the semaphore lives as long as the clock.
                Err(_) => return,
            };
            wait = match answer {
                // Kept alive since: wait for what is left. The answer is in whole seconds,
                // rounded down, so a lease with less than a second left is asked about again
                // after the margin alone.
                Ok(KvResponse::LeaseTimeToLive(t)) => secs(t.ttl) + MARGIN,
                Ok(KvResponse::Error(e)) if matches!(e.error, KvError::LeaseNotFound { .. }) => {
                    // Expired (by this request or another) or revoked: its keys' DELETE events
                    // are in the log now.
                    self.tail.notify_one();
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
    }
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}
