//! The deterministic simulator: n real replica cores, simulated clients and a seeded network
//! with delays, loss, duplication, reordering, partitions, crashes and Byzantine replicas.
//! Every run is a function of its `SimConfig` (itself a function of the seed), so a failing
//! seed reproduces exactly:
//!
//! ```text
//! KMMR_SIM_SEED=<seed> KMMR_SIM_N=<n> cargo test -p kmmr-replica --test sim replay -- --nocapture
//! ```

pub mod admin;
pub mod checker;
pub mod config;
pub mod workload;
mod world;

pub use config::{Crash, DropRule, NetConfig, Partition, ServiceKind, SimConfig};
pub use world::{run, SimReport};
