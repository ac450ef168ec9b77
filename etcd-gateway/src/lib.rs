//! KmMR's etcd gateway: the etcd v3 gRPC API (KV, Watch, Lease, and what etcdctl and
//! kube-apiserver read from Cluster and Maintenance) served over a KmMR cluster.
//!
//! The gateway is a client of the cluster, built on `kmmr-client` alone (no replica runtime): it
//! trusts no single replica, because every answer it passes on is one that enough replicas sent
//! alike. `convert` translates etcd's messages to the KV service's and refuses what etcd refuses
//! before consensus; `errors` holds etcd's error codes and texts; `gateway` the unary services;
//! `watch` the watches, fanned out inside the process from one poll stream; `own_events` the
//! events of the gateway's own writes, read from their agreed replies; `lease_clock` the
//! ordered requests that let leases (granted here, kept alive here, or seen on written keys)
//! expire on time; `metrics` the HTTP port's metrics and health; `server` the gRPC listener with its
//! limits and TLS.

pub mod convert;
pub mod errors;
pub mod gateway;
mod lease_clock;
pub mod metrics;
mod own_events;
pub mod server;
pub mod watch;

/// Code generated from `proto/` (etcd's API subset, written for KmMR).
pub mod proto {
    pub mod etcdserverpb {
        #![allow(clippy::all, clippy::unwrap_used, missing_docs)]
        tonic::include_proto!("etcdserverpb");
    }
    pub mod mvccpb {
        #![allow(clippy::all, clippy::unwrap_used, missing_docs)]
        tonic::include_proto!("mvccpb");
    }
}

pub use proto::etcdserverpb as pb;
pub use proto::mvccpb;
