//! etcd's gRPC errors, code and text exactly as etcd sends them: its clients, and kube-apiserver
//! above them, match on the text (a compacted revision becomes HTTP 410, anything unknown 500).

use tonic::Status;

use kmmr_protocol::service::kv::KvError;

pub const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
pub const FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";
pub const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";

pub fn empty_key() -> Status {
    Status::invalid_argument("etcdserver: key is not provided")
}

pub fn key_not_found() -> Status {
    Status::invalid_argument("etcdserver: key not found")
}

pub fn invalid_sort() -> Status {
    Status::invalid_argument("etcdserver: invalid sort option")
}

pub fn duplicate_key() -> Status {
    Status::invalid_argument("etcdserver: duplicate key given in txn request")
}

pub fn too_large() -> Status {
    Status::invalid_argument("etcdserver: request is too large")
}

/// The cluster did not answer in time. etcd's clients retry this code on reads only, as they
/// do against etcd.
pub fn unavailable(e: &anyhow::Error) -> Status {
    Status::unavailable(format!("etcdserver: request timed out ({e:#})"))
}

/// A refusal the cluster agreed on.
pub fn refused(e: &KvError) -> Status {
    match e {
        KvError::Compacted { .. } => Status::out_of_range(COMPACTED),
        KvError::FutureRevision { .. } => Status::out_of_range(FUTURE_REV),
        KvError::EmptyKey => empty_key(),
        KvError::LeaseNotFound { .. } => Status::not_found(LEASE_NOT_FOUND),
        KvError::LeaseExists { .. } => {
            Status::failed_precondition("etcdserver: lease already exists")
        }
        KvError::InvalidLeaseTtl { ttl } if *ttl > 0 => {
            Status::out_of_range("etcdserver: too large lease TTL")
        }
        KvError::InvalidLeaseTtl { ttl } => {
            Status::invalid_argument(format!("etcdserver: lease TTL {ttl} is not positive"))
        }
        KvError::InvalidLeaseId { id } => {
            Status::invalid_argument(format!("etcdserver: lease id {id} is not a positive id"))
        }
        KvError::NotReadOnly => Status::internal("etcdserver: a write was sent as a read"),
        KvError::TooLarge { bytes, limit } => Status::resource_exhausted(format!(
            "etcdserver: the reply of {bytes} bytes is over the cluster's limit of {limit} bytes \
             (one revision's watch events, or a transaction's previous records, too large to send)"
        )),
        KvError::Malformed(why) if why.contains("exceeds the limit") => too_large(),
        KvError::Malformed(why) => Status::invalid_argument(format!("etcdserver: {why}")),
    }
}
