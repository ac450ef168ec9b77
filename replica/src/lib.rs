//! KmMR replica: a Rust port of BFT-SMaRt (Mod-SMaRt over VP-Consensus) and the revisioned
//! key-value service that holds Kubernetes control-plane state.

pub mod client;
pub mod cluster;
pub mod core;
pub mod crypto;
pub mod net;
pub mod node;
pub mod service;
pub mod sim;
pub mod storage;
pub mod wire;
