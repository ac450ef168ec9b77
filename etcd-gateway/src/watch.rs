//! etcd watches over the KV service's event log, fanned out inside the gateway.
//!
//! One task (the tail) follows the whole key space: it asks the cluster for the events after the
//! last revision it saw and broadcasts each batch, tagged with the revisions it covers. A watch
//! delivers from the batches the events in its range; when it is behind a batch (it started in
//! the past, or it lagged and the channel dropped batches) it first reads its own range from the
//! cluster up to where the batch begins. So every watch gets every event of its range exactly
//! once, in revision order, however many watches there are, and the cluster sees one stream of
//! polls per gateway rather than one per watch. Every answer the tail and the catch-up reads use
//! is matched across replicas by the client library. The events of the gateway's own writes come
//! from those writes' agreed replies (`own_events`), so the tail asks the cluster only for
//! revisions other writers made.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch as signal, Notify};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{self, HeaderIds};
use crate::errors;
use crate::gateway::{revision_probe, Gateway};
use crate::lease_clock::LeaseClock;
use crate::{mvccpb, pb};
use kmmr_client::Client;
use kmmr_protocol::service::kv::{self as kv, KvError, KvRequest, KvResponse};

/// How often the tail asks for new events when nothing wakes it sooner (a write through this
/// gateway does): the delay at which a write through another gateway reaches a watch.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Events asked for per poll; a revision's events are never split.
const POLL_LIMIT: u32 = 1000;
/// Batches the broadcast keeps for a slow watch before it must catch up on its own.
const TAIL_BUFFER: usize = 256;
/// Events in one watch response, so that a burst does not make one huge gRPC message.
const EVENTS_PER_RESPONSE: usize = 1000;

/// Events in `(after, upto]` over the whole key space.
#[derive(Debug)]
struct TailBatch {
    after: u64,
    upto: u64,
    events: Vec<kv::Event>,
}

pub struct Hub {
    client: Client,
    batches: broadcast::Sender<Arc<TailBatch>>,
    /// Every event up to this revision has been broadcast (0 while no tail knows where it
    /// stands). Always set with `send_replace`: `send` stores nothing while no watch holds a
    /// receiver, and a watch subscribing just after then waited for a write to learn it (a
    /// watch of past events with no write after it never caught up: k8s.io/apiserver's
    /// TestWatchError waited 30 s).
    position: signal::Sender<u64>,
    wake: Arc<Notify>,
    /// Told of every lease the tail sees a key written with, so that it expires on time even
    /// when the gateway that granted it went away.
    leases: Arc<LeaseClock>,
    tail: Mutex<Option<JoinHandle<()>>>,
    /// The events of this gateway's own writes by revision, from their agreed replies
    /// (`own_events`), until the tail delivers them or a poll passes them.
    own: Mutex<BTreeMap<u64, Vec<kv::Event>>>,
}

/// Own writes' events kept for the tail at most; more (a tail stuck behind) are left to polls.
const OWN_EVENTS_KEPT: usize = 4096;

impl Hub {
    pub(crate) fn new(client: Client, wake: Arc<Notify>, leases: Arc<LeaseClock>) -> Arc<Hub> {
        let (batches, _) = broadcast::channel(TAIL_BUFFER);
        let (position, _) = signal::channel(0);
        Arc::new(Hub {
            client,
            batches,
            position,
            wake,
            leases,
            tail: Mutex::new(None),
            own: Mutex::new(BTreeMap::new()),
        })
    }

    /// Something was written through this gateway: poll now rather than at the next tick.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A write through this gateway made `revision` with these events (as a quorum of replicas
    /// agreed in its reply): the tail delivers them without asking the cluster when they are
    /// the next revision it has to deliver.
    pub(crate) fn written(&self, revision: u64, events: Vec<kv::Event>) {
        if self.batches.receiver_count() > 0 {
            let mut own = self.own.lock().unwrap_or_else(|e| e.into_inner());
            own.insert(revision, events);
            while own.len() > OWN_EVENTS_KEPT {
                own.pop_first();
            }
        }
        self.wake();
    }

    /// Broadcasts the own writes' events that continue `position` without a gap; returns the
    /// new position, and whether events of later revisions still wait for a gap to be polled.
    fn deliver_own(&self, mut position: u64) -> (u64, bool) {
        let mut own = self.own.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(entry) = own.first_entry() {
            let revision = *entry.key();
            if revision <= position {
                entry.remove();
            } else if revision == position + 1 {
                self.broadcast(TailBatch {
                    after: position,
                    upto: revision,
                    events: entry.remove(),
                });
                position = revision;
            } else {
                return (position, true);
            }
        }
        (position, false)
    }

    /// Watches subscribed to the tail: every open watch.
    pub(crate) fn watchers(&self) -> usize {
        self.batches.receiver_count()
    }

    /// The revision through which every event has been broadcast (0 while no tail runs).
    pub(crate) fn tail_revision(&self) -> u64 {
        *self.position.borrow()
    }

    /// Follows the lease of every key these events write, so that it expires on time.
    fn follow_leases(&self, events: &[kv::Event]) {
        for e in events {
            if e.kind == kv::EventKind::Put {
                self.leases.track(e.kv.lease, None);
            }
        }
    }

    /// Broadcasts a batch the tail has, and moves its position past it.
    fn broadcast(&self, batch: TailBatch) {
        self.follow_leases(&batch.events);
        let upto = batch.upto;
        let _ = self.batches.send(Arc::new(batch));
        self.position.send_replace(upto);
    }

    /// Polls the cluster and, while the answer is on its way, goes on delivering the events of
    /// this gateway's own writes as they continue `position`. A poll asked for a gap (another
    /// writer's revision, or an own write whose reply has not come back yet) takes a read
    /// matched across replicas, milliseconds under load, and the own writes behind the gap
    /// usually close it sooner: their events no longer wait for the poll.
    async fn poll_delivering_own(
        &self,
        poll: &KvRequest,
        position: &mut u64,
    ) -> anyhow::Result<KvResponse> {
        let answer = self.client.kv_read(poll);
        tokio::pin!(answer);
        loop {
            tokio::select! {
                biased;
                r = &mut answer => return r,
                _ = self.wake.notified() => {
                    *position = self.deliver_own(*position).0;
                }
            }
        }
    }

    fn subscribe(self: &Arc<Self>) -> broadcast::Receiver<Arc<TailBatch>> {
        let rx = self.batches.subscribe();
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.as_ref().is_none_or(|t| t.is_finished()) {
            *tail = Some(tokio::spawn(self.clone().run_tail()));
        }
        rx
    }

    async fn run_tail(self: Arc<Self>) {
        let mut position = 0;
        loop {
            if self.batches.receiver_count() == 0 {
                // Nobody watches: stop polling until a watch subscribes again. Under the lock a
                // new watch's `subscribe` either came first (and is counted) or finds no tail
                // and starts one. The position goes back to unknown: a watch of the next tail
                // must not catch up only to where this one stopped and then wait for a write.
                let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
                if self.batches.receiver_count() == 0 {
                    *tail = None;
                    self.position.send_replace(0);
                    return;
                }
            }
            if position == 0 {
                match self.client.kv_read(&revision_probe()).await {
                    Ok(r) if r.error().is_none() => {
                        position = r.header().revision;
                        self.position.send_replace(position);
                    }
                    other => {
                        tracing::warn!(error = ?other.err(), "watch tail: no revision yet");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                continue;
            }
            let before = position;
            let (delivered, gap) = self.deliver_own(position);
            position = delivered;
            if delivered > before && !gap {
                // Every revision up to the last own write is delivered: nothing to ask for
                // until the next wake or tick (other writers' revisions make a gap or come at
                // the tick).
                let _ = tokio::time::timeout(POLL_INTERVAL, self.wake.notified()).await;
                continue;
            }
            let poll = KvRequest::WatchPoll(kv::WatchPollRequest {
                key: vec![0],
                range_end: vec![0],
                after_revision: position,
                limit: POLL_LIMIT,
                prev_kv: true,
            });
            let polled_after = position;
            let full = match self.poll_delivering_own(&poll, &mut position).await {
                Ok(KvResponse::WatchPoll(mut w)) => {
                    let full = w.events.len() >= POLL_LIMIT as usize;
                    if w.resume_after > position {
                        // Own writes' events delivered while the poll ran are in it too.
                        w.events.retain(|e| e.revision() > position);
                        self.broadcast(TailBatch {
                            after: position,
                            upto: w.resume_after,
                            events: w.events,
                        });
                        position = w.resume_after;
                    }
                    full
                }
                Ok(KvResponse::Error(e)) => {
                    if let KvError::Compacted { .. } = e.error {
                        // The tail fell behind compaction: start again from now. Watches that
                        // had not seen the lost events find out when they catch up.
                        position = 0;
                        self.position.send_replace(0);
                    } else if position > polled_after {
                        // Own writes' events went past what the poll was refused for (the
                        // revision after `polled_after`): ask again from where they left off.
                    } else if let KvError::TooLarge { bytes, .. } = e.error {
                        // The next revision's events (a range delete of a large prefix) do not
                        // fit in one reply. The tail goes on after it with an empty batch, and
                        // each watch reads that revision for its own range while catching up to
                        // the batch; a watch whose share is still too large is canceled.
                        let skipped = position + 1;
                        tracing::warn!(
                            revision = skipped,
                            bytes,
                            "watch tail: one revision too large for a reply; each watch reads its own range of it"
                        );
                        self.broadcast(TailBatch {
                            after: skipped,
                            upto: skipped,
                            events: Vec::new(),
                        });
                        position = skipped;
                    } else {
                        tracing::warn!(error = %e.error, "watch tail poll refused");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
                Ok(_) => {
                    tracing::warn!("watch tail: the cluster answered a poll with another reply");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watch tail poll failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            // Own writes whose wake the poll took may continue the batch now; if some still
            // wait behind a gap, the revision missing is committed and the next poll has it.
            let (delivered, gap) = self.deliver_own(position);
            position = delivered;
            if !full && !gap {
                let _ = tokio::time::timeout(POLL_INTERVAL, self.wake.notified()).await;
            }
        }
    }
}

/// What one watch delivers.
#[derive(Debug, Clone)]
struct WatchSpec {
    id: i64,
    key: Vec<u8>,
    range_end: Vec<u8>,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
}

impl WatchSpec {
    fn wants(&self, e: &kv::Event) -> bool {
        let k = e.kv.key.as_slice();
        let in_range = if self.range_end.is_empty() {
            k == self.key.as_slice()
        } else if self.range_end == [0] {
            k >= self.key.as_slice()
        } else {
            k >= self.key.as_slice() && k < self.range_end.as_slice()
        };
        let filtered = match e.kind {
            kv::EventKind::Put => self.no_put,
            kv::EventKind::Delete => self.no_delete,
        };
        in_range && !filtered
    }

    fn shape(&self, mut e: kv::Event) -> mvccpb::Event {
        if !self.prev_kv {
            e.prev_kv = None;
        }
        convert::event(e)
    }
}

type Out = mpsc::Sender<Result<pb::WatchResponse, Status>>;

/// One running watch: what it has delivered (for progress answers) and its task.
struct Running {
    delivered: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

/// Why a watch stopped delivering.
enum Stop {
    /// The stream is gone.
    Closed,
    /// Its start is compacted away; the client was told.
    Compacted,
    /// Its events of one revision do not fit in a reply of the cluster; the client was told.
    TooLarge,
}

struct Watcher {
    spec: WatchSpec,
    hub: Arc<Hub>,
    ids: HeaderIds,
    out: Out,
    /// Every event of the range up to here has been sent.
    delivered: Arc<AtomicU64>,
    /// Something was sent since the last progress tick.
    sent: bool,
}

impl Watcher {
    fn position(&self) -> u64 {
        self.delivered.load(Ordering::SeqCst)
    }

    async fn send(&mut self, resp: pb::WatchResponse) -> Result<(), Stop> {
        self.sent = true;
        self.out.send(Ok(resp)).await.map_err(|_| Stop::Closed)
    }

    /// Sends the wanted events of `events` newer than what was delivered, then records `upto`.
    async fn deliver(&mut self, events: &[kv::Event], upto: u64) -> Result<(), Stop> {
        let from = self.position();
        let mut pending: Vec<mvccpb::Event> = Vec::new();
        let mut last_rev = from;
        for e in events.iter().filter(|e| e.revision() > from) {
            if !self.spec.wants(e) {
                continue;
            }
            // A response ends between revisions, never inside one.
            if pending.len() >= EVENTS_PER_RESPONSE && e.revision() != last_rev {
                let batch = std::mem::take(&mut pending);
                self.send_events(batch, last_rev).await?;
            }
            last_rev = e.revision();
            pending.push(self.spec.shape(e.clone()));
        }
        if !pending.is_empty() {
            self.send_events(pending, upto).await?;
        }
        self.delivered.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }

    async fn send_events(&mut self, events: Vec<mvccpb::Event>, revision: u64) -> Result<(), Stop> {
        let resp = pb::WatchResponse {
            header: self.ids.header(revision),
            watch_id: self.spec.id,
            events,
            ..Default::default()
        };
        self.send(resp).await
    }

    /// Reads this watch's own range from the cluster until it has delivered through `target`.
    async fn catch_up(&mut self, target: u64) -> Result<(), Stop> {
        while self.position() < target {
            let poll = KvRequest::WatchPoll(kv::WatchPollRequest {
                key: self.spec.key.clone(),
                range_end: self.spec.range_end.clone(),
                after_revision: self.position(),
                limit: POLL_LIMIT,
                prev_kv: self.spec.prev_kv,
            });
            match self.hub.client.kv_read(&poll).await {
                Ok(KvResponse::WatchPoll(w)) => {
                    // The tail starts at the revision it first finds, so keys written before
                    // (or while it started) reach a watch only here: their leases too need
                    // following.
                    self.hub.follow_leases(&w.events);
                    let upto = w.resume_after.max(self.position());
                    self.deliver(&w.events, upto).await?;
                }
                Ok(KvResponse::Error(e)) => {
                    let ended = match &e.error {
                        // etcd's answer to a watch whose start was compacted: canceled, with
                        // the compaction revision, so the client can re-list and start again.
                        KvError::Compacted { compact_revision } => Some((
                            Stop::Compacted,
                            pb::WatchResponse {
                                compact_revision: i64::try_from(*compact_revision)
                                    .unwrap_or(i64::MAX),
                                ..Default::default()
                            },
                        )),
                        // Nothing this watch can be given whole: cancel it, saying why, rather
                        // than leave it stuck or skip events (the client may watch again from
                        // the revision after).
                        KvError::TooLarge { bytes, limit } => Some((
                            Stop::TooLarge,
                            pb::WatchResponse {
                                cancel_reason: format!(
                                    "etcdserver: the events of revision {} in this watch's range \
                                     ({bytes} bytes with their previous values) are over the \
                                     cluster's reply limit of {limit} bytes",
                                    self.position() + 1
                                ),
                                ..Default::default()
                            },
                        )),
                        _ => None,
                    };
                    if let Some((stop, resp)) = ended {
                        // etcd's compaction cancel comes from the store, with no revision.
                        let revision = match stop {
                            Stop::Compacted => 0,
                            _ => e.header.revision,
                        };
                        let resp = pb::WatchResponse {
                            header: self.ids.header(revision),
                            watch_id: self.spec.id,
                            canceled: true,
                            ..resp
                        };
                        let _ = self.send(resp).await;
                        return Err(stop);
                    }
                    tracing::warn!(watch = self.spec.id, error = %e.error, "watch catch-up refused");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Ok(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                Err(e) => {
                    tracing::warn!(watch = self.spec.id, error = %e, "watch catch-up failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            if self.out.is_closed() {
                return Err(Stop::Closed);
            }
        }
        Ok(())
    }

    async fn run(
        mut self,
        mut batches: broadcast::Receiver<Arc<TailBatch>>,
        progress_every: Duration,
    ) {
        let _ = self.follow(&mut batches, progress_every).await;
    }

    async fn follow(
        &mut self,
        batches: &mut broadcast::Receiver<Arc<TailBatch>>,
        progress_every: Duration,
    ) -> Result<(), Stop> {
        let mut position = self.hub.position.subscribe();
        let mut progress = tokio::time::interval(progress_every);
        progress.tick().await;
        // A watch that starts in the past reads what the tail already passed (once the tail
        // knows where it starts: batches come only when it moves on).
        let tail_at = tokio::select! {
            at = position.wait_for(|p| *p > 0) => at.map(|p| *p).map_err(|_| Stop::Closed)?,
            _ = self.out.closed() => return Err(Stop::Closed),
        };
        self.catch_up(tail_at).await?;
        loop {
            tokio::select! {
                batch = batches.recv() => match batch {
                    Ok(b) => {
                        if b.upto <= self.position() {
                            continue;
                        }
                        if b.after > self.position() {
                            self.catch_up(b.after).await?;
                        }
                        self.deliver(&b.events, b.upto).await?;
                    }
                    // Dropped batches: the next one starts past this watch, which then catches up.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return Err(Stop::Closed),
                },
                _ = progress.tick(), if self.spec.progress_notify => {
                    // etcd's periodic progress notification, for a watch that had nothing to say.
                    if !self.sent && self.position() > 0 {
                        let resp = pb::WatchResponse {
                            header: self.ids.header(self.position()),
                            watch_id: self.spec.id,
                            ..Default::default()
                        };
                        self.send(resp).await?;
                    }
                    self.sent = false;
                }
                _ = self.out.closed() => return Err(Stop::Closed),
            }
        }
    }
}

/// The watches of one gRPC stream.
struct StreamWatches {
    gateway: Arc<Gateway>,
    out: Out,
    watches: Arc<Mutex<HashMap<i64, Running>>>,
    next_id: i64,
    progress_every: Duration,
}

impl StreamWatches {
    async fn create(&mut self, c: pb::WatchCreateRequest) -> Result<(), ()> {
        let ids = self.gateway.ids;
        let id = if c.watch_id > 0 {
            c.watch_id
        } else {
            let mut id = self.next_id;
            while self.lock().contains_key(&id) {
                id += 1;
            }
            self.next_id = id + 1;
            id
        };
        if self.lock().contains_key(&id) {
            let resp = pb::WatchResponse {
                header: ids.header(self.tail_revision()),
                watch_id: id,
                created: true,
                canceled: true,
                cancel_reason: "etcdserver: duplicate watch ID".into(),
                ..Default::default()
            };
            return self.out.send(Ok(resp)).await.map_err(|_| ());
        }
        // etcd's conventions: an empty key is "\0", and a negative start is refused as compacted.
        let key = if c.key.is_empty() { vec![0] } else { c.key };
        if c.start_revision < 0 {
            let resp = pb::WatchResponse {
                header: ids.header(self.tail_revision()),
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: errors::COMPACTED.into(),
                ..Default::default()
            };
            return self.out.send(Ok(resp)).await.map_err(|_| ());
        }
        let current = match self.gateway.current_revision().await {
            Ok(r) => r,
            Err(status) => {
                let _ = self.out.send(Err(status)).await;
                return Err(());
            }
        };
        let start = match c.start_revision {
            0 => current + 1,
            s => s as u64,
        };
        let spec = WatchSpec {
            id,
            key,
            range_end: c.range_end,
            prev_kv: c.prev_kv,
            no_put: c
                .filters
                .contains(&(pb::watch_create_request::FilterType::Noput as i32)),
            no_delete: c
                .filters
                .contains(&(pb::watch_create_request::FilterType::Nodelete as i32)),
            progress_notify: c.progress_notify,
        };
        let created = pb::WatchResponse {
            header: ids.header(current),
            watch_id: id,
            created: true,
            ..Default::default()
        };
        self.out.send(Ok(created)).await.map_err(|_| ())?;
        let delivered = Arc::new(AtomicU64::new(start - 1));
        let batches = self.gateway.hub.subscribe();
        let watcher = Watcher {
            spec,
            hub: self.gateway.hub.clone(),
            ids,
            out: self.out.clone(),
            delivered: delivered.clone(),
            sent: false,
        };
        let watches = self.watches.clone();
        let every = self.progress_every;
        let task = tokio::spawn(async move {
            watcher.run(batches, every).await;
            watches
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
        self.lock().insert(id, Running { delivered, task });
        Ok(())
    }

    /// Where the tail stands, for answers that refuse a watch before it reads anything (never 0,
    /// which clients read as no revision).
    fn tail_revision(&self) -> u64 {
        (*self.gateway.hub.position.borrow()).max(1)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Running>> {
        self.watches.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn cancel(&mut self, id: i64) -> Result<(), ()> {
        let Some(running) = self.lock().remove(&id) else {
            return Ok(());
        };
        running.task.abort();
        let revision = running.delivered.load(Ordering::SeqCst);
        let resp = pb::WatchResponse {
            header: self.gateway.ids.header(revision),
            watch_id: id,
            canceled: true,
            ..Default::default()
        };
        self.out.send(Ok(resp)).await.map_err(|_| ())
    }

    /// etcd's progress answer (watch id -1): a revision every watch of the stream has delivered
    /// through, so that a client that sees it knows it has missed nothing before it.
    async fn progress(&mut self) -> Result<(), ()> {
        let least = self
            .lock()
            .values()
            .map(|r| r.delivered.load(Ordering::SeqCst))
            .min();
        let revision = match least {
            Some(r) => r,
            None => match self.gateway.current_revision().await {
                Ok(r) => r,
                Err(_) => return Ok(()),
            },
        };
        // Revision 0 would read as "no progress" to clients; there is nothing to report yet.
        if revision == 0 {
            return Ok(());
        }
        let resp = pb::WatchResponse {
            header: self.gateway.ids.header(revision),
            watch_id: -1,
            ..Default::default()
        };
        self.out.send(Ok(resp)).await.map_err(|_| ())
    }
}

impl Drop for StreamWatches {
    fn drop(&mut self) {
        for (_, r) in self.lock().drain() {
            r.task.abort();
        }
    }
}

/// etcd's default interval between progress notifications of a quiet watch.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(600);

pub struct WatchService {
    pub gateway: Arc<Gateway>,
    pub progress_every: Duration,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        use pb::watch_request::RequestUnion;
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let mut stream = StreamWatches {
            gateway: self.gateway.clone(),
            out: tx,
            watches: Arc::new(Mutex::new(HashMap::new())),
            next_id: 0,
            progress_every: self.progress_every,
        };
        tokio::spawn(async move {
            while let Some(Ok(req)) = incoming.next().await {
                let step = match req.request_union {
                    Some(RequestUnion::CreateRequest(c)) => stream.create(c).await,
                    Some(RequestUnion::CancelRequest(c)) => stream.cancel(c.watch_id).await,
                    Some(RequestUnion::ProgressRequest(_)) => stream.progress().await,
                    None => Ok(()),
                };
                if step.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
