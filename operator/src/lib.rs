//! The KmMR operator.
//!
//! Pure parts, unit-tested without an apiserver:
//! - [`names`]: child names and labels.
//! - [`keys`]: ed25519 key pairs per replica and for the admin, generated or user-supplied.
//! - [`config`]: the view and per-replica configuration files the replicas read.
//! - [`children`]: the StatefulSets, Services, ConfigMap, PodDisruptionBudget and Secrets.
//! - [`observe`]: status and conditions from what the replicas report.
//! - [`etcd_api`]: the etcd v3 API (`spec.etcdAPI`): gateways, Service, certificates, status.
//! - [`membership`]: the next membership step and the trait that carries it out.
//! - [`backup`]: backup CronJob and Jobs, the restore step of replica pods, status.backup.
//! - [`testmode`]: the test-only Byzantine modes a cluster's annotation may ask for.
//!
//! Runtime parts:
//! - a replica's signed `/status` is fetched and verified by `kmmr_client::status`.
//! - [`controller`]: the reconcile pipeline on kube-runtime.
//! - [`admin`]: membership steps as admin-signed view changes through `kmmr_client::admin`.
//! - [`leader`]: leader election on a Lease.
//! - [`metrics`]: Prometheus metrics and the operator's HTTP endpoints.
//! - [`error`]: reconcile errors, each a metric label and Event reason.

pub mod admin;
pub mod backup;
pub mod children;
pub mod config;
pub mod controller;
pub mod error;
pub mod etcd_api;
pub mod keys;
pub mod leader;
pub mod membership;
pub mod metrics;
pub mod names;
pub mod observe;
pub mod testmode;

pub use children::{build_children, build_children_for, build_children_with, BuildError, Children};
pub use config::Membership;
pub use keys::{KeyError, Keys};
