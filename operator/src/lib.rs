//! The KmMR operator's pure parts: everything a reconcile builds from a `BftCluster` as plain
//! data, with no cluster access, so that each child object is unit-tested without an apiserver.
//!
//! - [`names`]: child names and labels.
//! - [`keys`]: ed25519 key pairs per replica and for the admin, generated or user-supplied.
//! - [`config`]: the view and per-replica configuration files the replicas read.
//! - [`children`]: the StatefulSets, Services, ConfigMap, PodDisruptionBudget and Secrets.
//!
//! This crate must never talk to the apiserver from these modules: the controller (kube-runtime)
//! applies what they build with server-side apply and computes status from what it observes.

pub mod children;
pub mod config;
pub mod keys;
pub mod names;

pub use children::{build_children, build_children_for, BuildError, Children};
pub use config::Membership;
pub use keys::{KeyError, Keys};
