//! `kmmr-replica watch`: prints the changes to a key range as they are decided.
//!
//! Each poll is an ordered `WatchPoll`, so every correct replica answers it at the same point of
//! the history and the client gets f+1 identical replies; an empty answer is followed by a
//! short pause. A change is therefore shown within a pause and one round of ordering.

use std::time::Duration;

use anyhow::{bail, Result};
use tokio::time::Instant;

use kmmr_client::Client;
use kmmr_protocol::service::kv::{
    KvError, KvRequest, KvResponse, RangeRequest, WatchPollRequest, WatchPollResponse,
};

use super::kv::prefix_range;
use super::out::outln;
use super::render::{self, Format};

/// Pause after a poll that found nothing: well inside the second in which a change must show.
const IDLE_PAUSE: Duration = Duration::from_millis(200);

/// Events asked for per poll; a revision's events are never split, so one may bring more.
const POLL_LIMIT: u32 = 1000;

/// Prints every change to the keys starting with `prefix` after revision `from` (after the
/// current revision when `None`), until `until` if given, else until interrupted.
pub async fn watch(
    c: &Client,
    prefix: &str,
    from: Option<u64>,
    until: Option<Instant>,
    format: Format,
) -> Result<()> {
    let (key, range_end) = prefix_range(prefix);
    let mut after = match from {
        Some(r) => r,
        None => match bounded(until, current_revision(c, &key, &range_end)).await {
            Some(r) => r?,
            None => return Ok(()),
        },
    };
    if format == Format::Text {
        let what = if prefix.is_empty() {
            "every key".to_string()
        } else {
            format!("keys starting with {}", render::text(prefix.as_bytes()))
        };
        eprintln!("watching {what} for changes after revision {after}");
    }
    loop {
        let req = KvRequest::WatchPoll(WatchPollRequest {
            key: key.clone(),
            range_end: range_end.clone(),
            after_revision: after,
            limit: POLL_LIMIT,
            prev_kv: false,
        });
        let Some(resp) = bounded(until, c.kv(&req)).await else {
            return Ok(());
        };
        let w = poll_result(resp?, after)?;
        for e in &w.events {
            match format {
                Format::Text => outln!("{}", render::event_text(e)),
                Format::Json => outln!("{}", render::event_json(e)),
            }
        }
        // A reply never moves the watch backwards, whatever it says.
        after = after.max(w.resume_after);
        if w.events.is_empty()
            && bounded(until, tokio::time::sleep(IDLE_PAUSE))
                .await
                .is_none()
        {
            return Ok(());
        }
    }
}

/// `fut`'s output, or `None` once `until` passed: `--seconds` bounds the whole command,
/// including a request that is waiting for replies.
async fn bounded<T>(
    until: Option<Instant>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    match until {
        Some(u) => tokio::time::timeout_at(u, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// The revision the cluster is at, read in the total order: a watch from it misses nothing
/// written after the command started.
async fn current_revision(c: &Client, key: &[u8], range_end: &[u8]) -> Result<u64> {
    let req = KvRequest::Range(RangeRequest {
        key: key.to_vec(),
        range_end: range_end.to_vec(),
        count_only: true,
        ..RangeRequest::default()
    });
    match c.kv(&req).await? {
        KvResponse::Range(r) => Ok(r.header.revision),
        KvResponse::Error(e) => bail!("{}", e.error),
        other => bail!("the cluster answered a read with an unexpected {other:?}"),
    }
}

/// The events of a poll, or why there are none to be had.
fn poll_result(resp: KvResponse, after: u64) -> Result<WatchPollResponse> {
    match resp {
        KvResponse::WatchPoll(w) => Ok(w),
        KvResponse::Error(e) => match e.error {
            KvError::Compacted { compact_revision } => bail!(
                "the changes after revision {after} are no longer kept: the history up to \
                 revision {compact_revision} has been compacted. Use --from {compact_revision} \
                 or later, or leave --from out to watch from now"
            ),
            other => bail!("{other}"),
        },
        other => bail!("the cluster answered a watch poll with an unexpected {other:?}"),
    }
}
