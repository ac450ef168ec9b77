//! The gateway's shared state and its unary services: KV, Lease, Cluster and Maintenance.
//!
//! Every answer comes from the KmMR client library, which accepts a result only when enough
//! replicas sent the same one (f+1 for ordered requests, a quorum for reads outside the order),
//! so no single replica, however Byzantine, can put a value or a revision in front of the
//! gateway's callers.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{self, HeaderIds};
use crate::errors;
use crate::lease_clock::LeaseClock;
use crate::own_events;
use crate::pb;
use crate::watch::Hub;
use kmmr_client::proxy::Client;
use kmmr_protocol::service::kv::{self as kv, KvRequest, KvResponse};

/// etcd raises a lease TTL below its minimum (1.5 election timeouts, 2 s with its defaults) to
/// that minimum, and answers with the raised TTL; clients rely on getting a lease, not an error.
pub const MIN_LEASE_TTL_SECS: i64 = 2;

/// Reads and conditional writes a put keeping its key's value or lease makes at most.
const KEEP_ATTEMPTS: usize = 32;

/// The etcd version the gateway reports. kube-apiserver turns on the features that depend on
/// watch progress requests (consistent lists from its cache, WatchList) from 3.5.13 on; the
/// gateway answers progress requests with the revision every watch on the stream has delivered,
/// never more, which is what those features need.
pub const ETCD_VERSION: &str = "3.6.0";

pub struct Gateway {
    pub(crate) client: Client,
    pub(crate) ids: HeaderIds,
    pub(crate) hub: Arc<Hub>,
    pub(crate) leases: Arc<LeaseClock>,
    pub(crate) metrics: crate::metrics::Metrics,
    /// The URL clients reach this gateway at, reported as its member's client URL.
    advertise: String,
}

impl Gateway {
    pub fn new(client: Client, advertise: String) -> Arc<Gateway> {
        let view = client.view();
        // The cluster id names the cluster, not its current membership: members' keys of the
        // view the gateway was given, hashed. It is informative only (etcdctl prints it).
        let mut h = blake3::Hasher::new();
        for m in &view.members {
            h.update(&m.key.0);
        }
        let cluster_id =
            u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap_or([0; 8]));
        let member_id = u64::from_le_bytes(
            blake3::hash(advertise.as_bytes()).as_bytes()[..8]
                .try_into()
                .unwrap_or([0; 8]),
        );
        let ids = HeaderIds {
            cluster_id,
            member_id,
        };
        let wake = Arc::new(tokio::sync::Notify::new());
        let leases = LeaseClock::new(client.clone(), wake.clone());
        Arc::new(Gateway {
            hub: Hub::new(client.clone(), wake, leases.clone()),
            leases,
            metrics: crate::metrics::Metrics::new(),
            client,
            ids,
            advertise,
        })
    }

    /// An ordered request; a refusal the cluster agreed on becomes etcd's error.
    pub(crate) async fn ordered(&self, req: &KvRequest) -> Result<KvResponse, Status> {
        agreed(self.client.kv(req).await)
    }

    /// A write. Previous records are asked for so that the agreed reply carries the write's
    /// watch events, which go to the watch tail; the caller gets the reply it asked for.
    pub(crate) async fn write(&self, req: KvRequest) -> Result<KvResponse, Status> {
        let mut sent = req;
        let asked = own_events::ask_prev_kvs(&mut sent);
        let answer = self.ordered(&sent).await;
        match (&answer, &asked) {
            (Ok(resp), Some(_)) => match own_events::events_of(&sent, resp) {
                Some((revision, events)) => self.hub.written(revision, events),
                None => self.hub.wake(),
            },
            _ => self.hub.wake(),
        }
        let mut resp = answer?;
        if let Some(asked) = &asked {
            asked.restore(&sent, &mut resp);
        }
        Ok(resp)
    }

    /// A put that keeps the key's current value or lease (etcd's `ignore_value`,
    /// `ignore_lease`), which the replicas do not know of: the record is read, then written
    /// back changed only as asked, on condition that its key was not written in between, and
    /// read again if it was. One atomic put, as in etcd, from requests every release of the
    /// replicas executes alike.
    pub(crate) async fn put_keeping(
        &self,
        mut req: kv::PutRequest,
        keep: convert::Keep,
    ) -> Result<KvResponse, Status> {
        for _ in 0..KEEP_ATTEMPTS {
            let current = self.range(&kv::RangeRequest::key(req.key.clone())).await?;
            let Some(record) = current.kvs.into_iter().next() else {
                return Err(errors::key_not_found());
            };
            if keep.value {
                req.value = record.value;
            }
            if keep.lease {
                req.lease = record.lease;
            }
            let unchanged = kv::Compare::new(
                req.key.clone(),
                kv::CompareResult::Equal,
                kv::CompareTarget::ModRevision(record.mod_revision),
            );
            let txn = kv::TxnRequest {
                compare: vec![unchanged],
                success: vec![kv::RequestOp::Put(req.clone())],
                failure: Vec::new(),
            };
            match self.write(KvRequest::Txn(txn)).await? {
                KvResponse::Txn(t) if t.succeeded => {
                    return match t.responses.into_iter().next() {
                        Some(kv::ResponseOp::Put(p)) => Ok(KvResponse::Put(p)),
                        _ => Err(mismatch("put")),
                    };
                }
                KvResponse::Txn(_) => continue,
                _ => return Err(mismatch("put")),
            }
        }
        Err(Status::aborted(format!(
            "etcdserver: the key was written by others {KEEP_ATTEMPTS} times while this put \
             tried to keep its value or lease; try again"
        )))
    }

    /// A linearizable read.
    pub(crate) async fn read(&self, req: &KvRequest) -> Result<KvResponse, Status> {
        agreed(self.client.kv_read(req).await)
    }

    /// A linearizable range read, whole. The replicas bound each reply (`REPLY_BUDGET`) and
    /// answer `more` with fewer records than the limit when they cut one; the rest is read
    /// after the last key at the first reply's revision, so callers get what etcd answers in
    /// one reply, from one revision.
    pub(crate) async fn range(&self, req: &kv::RangeRequest) -> Result<kv::RangeResponse, Status> {
        match self.read(&KvRequest::Range(req.clone())).await? {
            KvResponse::Range(mut r) => {
                let revision = r.header.revision;
                self.complete(req, &mut r, revision).await?;
                Ok(r)
            }
            _ => Err(mismatch("range")),
        }
    }

    /// Reads the pages of `resp` that the replicas' reply budget cut off, at `revision`.
    async fn complete(
        &self,
        req: &kv::RangeRequest,
        resp: &mut kv::RangeResponse,
        revision: u64,
    ) -> Result<(), Status> {
        let wanted = match req.limit {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        while resp.more && !req.count_only && resp.kvs.len() < wanted {
            let Some(last) = resp.kvs.last() else {
                return Err(Status::internal(
                    "the cluster cut a range reply before its first record",
                ));
            };
            let mut key = last.key.clone();
            key.push(0);
            let page = kv::RangeRequest {
                key,
                range_end: req.range_end.clone(),
                revision,
                limit: match req.limit {
                    0 => 0,
                    n => n - resp.kvs.len() as u64,
                },
                keys_only: req.keys_only,
                count_only: false,
            };
            match self.read(&KvRequest::Range(page)).await? {
                KvResponse::Range(p) if !p.kvs.is_empty() || !p.more => {
                    resp.kvs.extend(p.kvs);
                    resp.more = p.more;
                }
                KvResponse::Range(_) => {
                    return Err(Status::internal(
                        "the cluster answered a range page with no record and more to come",
                    ))
                }
                _ => return Err(mismatch("range")),
            }
        }
        Ok(())
    }

    /// A read-only transaction, its ranges whole (as [`Gateway::range`]), at its revision.
    pub(crate) async fn read_txn(&self, req: &kv::TxnRequest) -> Result<kv::TxnResponse, Status> {
        let mut t = match self.read(&KvRequest::Txn(req.clone())).await? {
            KvResponse::Txn(t) => t,
            _ => return Err(mismatch("transaction")),
        };
        let branch = if t.succeeded {
            &req.success
        } else {
            &req.failure
        };
        let revision = t.header.revision;
        for (op, resp) in branch.iter().zip(t.responses.iter_mut()) {
            if let (kv::RequestOp::Range(r), kv::ResponseOp::Range(resp)) = (op, resp) {
                // A range of a past revision stays at it; the others read the transaction's.
                let at = if r.revision == 0 {
                    revision
                } else {
                    r.revision
                };
                self.complete(r, resp, at).await?;
            }
        }
        Ok(t)
    }

    /// The store's current revision, read linearizably.
    pub(crate) async fn current_revision(&self) -> Result<u64, Status> {
        Ok(self.read(&revision_probe()).await?.header().revision)
    }
}

/// The cheapest read the store answers, for its header's revision: one key that cannot be a
/// Kubernetes key, counted.
pub(crate) fn revision_probe() -> KvRequest {
    KvRequest::Range(kv::RangeRequest {
        key: vec![0],
        count_only: true,
        ..Default::default()
    })
}

/// The cluster's answer as etcd gives it: no answer in time is Unavailable, an agreed refusal
/// etcd's error for it.
fn agreed(answer: anyhow::Result<KvResponse>) -> Result<KvResponse, Status> {
    let resp = answer.map_err(|e| errors::unavailable(&e))?;
    match resp.error() {
        Some(e) => Err(errors::refused(e)),
        None => Ok(resp),
    }
}

fn mismatch(what: &str) -> Status {
    Status::internal(format!(
        "the cluster answered a {what} with another kind of reply"
    ))
}

/// The KV service.
pub struct KvService(pub Arc<Gateway>);

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let (req, shape) = convert::range(request.get_ref())?;
        let r = self.0.range(&req).await?;
        let r = if shape.is_plain() { r } else { shape.finish(r) };
        Ok(Response::new(convert::range_response(&self.0.ids, r)))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let resp = match convert::put(request.get_ref())? {
            (req, None) => self.0.write(KvRequest::Put(req)).await?,
            (req, Some(keep)) => self.0.put_keeping(req, keep).await?,
        };
        match resp {
            KvResponse::Put(r) => Ok(Response::new(convert::put_response(&self.0.ids, r))),
            _ => Err(mismatch("put")),
        }
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let req = convert::delete(request.get_ref())?;
        match self.0.write(KvRequest::DeleteRange(req)).await? {
            KvResponse::DeleteRange(r) => {
                Ok(Response::new(convert::delete_response(&self.0.ids, r)))
            }
            _ => Err(mismatch("delete")),
        }
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let (t, shapes) = convert::txn(request.get_ref())?;
        let req = KvRequest::Txn(t);
        let r = match req {
            KvRequest::Txn(t) if req.is_read_only() => self.0.read_txn(&t).await?,
            // A write transaction's ranges are not paged: a later page would read the state
            // after the transaction's writes, not the state its range saw. A range the budget
            // cut answers `more`.
            write => match self.0.write(write).await? {
                KvResponse::Txn(r) => r,
                _ => return Err(mismatch("transaction")),
            },
        };
        Ok(Response::new(convert::txn_response(
            &self.0.ids,
            r,
            &shapes,
        )))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let revision = u64::try_from(request.get_ref().revision)
            .map_err(|_| Status::out_of_range(errors::COMPACTED))?;
        // Compaction in the store is synchronous, so `physical` is always honoured.
        let resp = self
            .0
            .ordered(&KvRequest::Compact(kv::CompactRequest { revision }))
            .await?;
        Ok(Response::new(pb::CompactionResponse {
            header: self.0.ids.header(resp.header().revision),
        }))
    }
}

/// The Lease service.
pub struct LeaseService(pub Arc<Gateway>);

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::lease_server::Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let r = request.get_ref();
        let req = kv::LeaseGrantRequest {
            id: r.id,
            ttl: r.ttl.max(MIN_LEASE_TTL_SECS),
        };
        match self.0.ordered(&KvRequest::LeaseGrant(req)).await? {
            KvResponse::LeaseGrant(g) => {
                self.0.leases.track(g.id, Some(g.ttl));
                Ok(Response::new(pb::LeaseGrantResponse {
                    header: self.0.ids.header(g.header.revision),
                    id: g.id,
                    ttl: g.ttl,
                    error: String::new(),
                }))
            }
            _ => Err(mismatch("lease grant")),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let req = kv::LeaseRevokeRequest {
            id: request.get_ref().id,
        };
        let resp = self.0.ordered(&KvRequest::LeaseRevoke(req)).await?;
        self.0.hub.wake();
        Ok(Response::new(pb::LeaseRevokeResponse {
            header: self.0.ids.header(resp.header().revision),
        }))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let mut incoming = request.into_inner();
        let gateway = self.0.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(Ok(req)) = incoming.next().await {
                let id = req.id;
                let resp = gateway
                    .client
                    .kv(&KvRequest::LeaseKeepAlive(kv::LeaseKeepAliveRequest { id }))
                    .await;
                let out = match resp {
                    Ok(KvResponse::LeaseKeepAlive(k)) => {
                        // A lease granted elsewhere (another gateway, or this one before a
                        // restart) is followed from now on.
                        gateway.leases.track(k.id, Some(k.ttl));
                        Ok(pb::LeaseKeepAliveResponse {
                            header: gateway.ids.header(k.header.revision),
                            id: k.id,
                            ttl: k.ttl,
                        })
                    }
                    // etcd answers a keep-alive of an unknown lease with TTL 0, not an error.
                    Ok(KvResponse::Error(e))
                        if matches!(e.error, kv::KvError::LeaseNotFound { .. }) =>
                    {
                        Ok(pb::LeaseKeepAliveResponse {
                            header: gateway.ids.header(e.header.revision),
                            id,
                            ttl: 0,
                        })
                    }
                    Ok(KvResponse::Error(e)) => Err(errors::refused(&e.error)),
                    Ok(_) => Err(mismatch("lease keep-alive")),
                    Err(e) => Err(errors::unavailable(&e)),
                };
                if tx.send(out).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let r = request.get_ref();
        let req = KvRequest::LeaseTimeToLive(kv::LeaseTimeToLiveRequest {
            id: r.id,
            keys: r.keys,
        });
        // Ordered, so that the TTL is measured against a fresh consensus time, not the time of
        // whatever request the replicas executed last.
        let resp = self
            .0
            .client
            .kv(&req)
            .await
            .map_err(|e| errors::unavailable(&e))?;
        match resp {
            KvResponse::LeaseTimeToLive(t) => Ok(Response::new(pb::LeaseTimeToLiveResponse {
                header: self.0.ids.header(t.header.revision),
                id: t.id,
                ttl: t.ttl,
                granted_ttl: t.granted_ttl,
                keys: t.keys,
            })),
            // etcd answers an unknown lease with TTL -1, not an error.
            KvResponse::Error(e) if matches!(e.error, kv::KvError::LeaseNotFound { .. }) => {
                Ok(Response::new(pb::LeaseTimeToLiveResponse {
                    header: self.0.ids.header(e.header.revision),
                    id: r.id,
                    ttl: -1,
                    ..Default::default()
                }))
            }
            KvResponse::Error(e) => Err(errors::refused(&e.error)),
            _ => Err(mismatch("lease time-to-live")),
        }
    }

    async fn lease_leases(
        &self,
        _request: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        match self.0.read(&KvRequest::LeaseLeases).await? {
            KvResponse::LeaseLeases(l) => Ok(Response::new(pb::LeaseLeasesResponse {
                header: self.0.ids.header(l.header.revision),
                leases: l.ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
            })),
            _ => Err(mismatch("lease list")),
        }
    }
}

/// The Cluster service: the gateway is the one member its clients see, so that etcdctl's
/// `--cluster` dials gateways, never replicas.
pub struct ClusterService(pub Arc<Gateway>);

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        let mut header = self.0.ids.header(0);
        if let Some(h) = header.as_mut() {
            // etcd's member list header carries no revision.
            h.revision = 0;
        }
        Ok(Response::new(pb::MemberListResponse {
            header,
            members: vec![pb::Member {
                id: self.0.ids.member_id,
                name: "kmmr-etcd-gateway".into(),
                peer_ur_ls: Vec::new(),
                client_ur_ls: vec![self.0.advertise.clone()],
                is_learner: false,
            }],
        }))
    }
}

/// The Maintenance service: status and the alarm list that `etcdctl endpoint health` reads.
pub struct MaintenanceService(pub Arc<Gateway>);

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        request: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        if request.get_ref().action != pb::alarm_request::AlarmAction::Get as i32 {
            return Err(Status::unimplemented(
                "raising or clearing alarms is not supported by the KmMR etcd gateway",
            ));
        }
        let revision = self.0.current_revision().await?;
        Ok(Response::new(pb::AlarmResponse {
            header: self.0.ids.header(revision),
            alarms: Vec::new(),
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let revision = self.0.current_revision().await?;
        Ok(Response::new(pb::StatusResponse {
            header: self.0.ids.header(revision),
            version: ETCD_VERSION.into(),
            // etcdctl's table divides by the size; the gateway holds no database of its own.
            db_size: 1,
            db_size_in_use: 1,
            leader: self.0.ids.member_id,
            raft_index: revision,
            raft_applied_index: revision,
            ..Default::default()
        }))
    }
}
