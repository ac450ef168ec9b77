//! The BFT-SMaRt protocol as a deterministic state machine.
//!
//! The core never performs I/O, reads no clock and draws no randomness: time and messages come
//! in as inputs, and messages to send, replies and timer deadlines come out. The same core runs
//! under tokio in production and under the seeded simulator in tests.

pub mod clients;
pub mod config;
pub mod instance;
pub mod output;
pub mod promise;
pub mod proof;
pub mod reconfig;
pub mod rejection;
pub mod replica;
pub mod replies;
pub mod state;
pub mod sync;
#[cfg(test)]
mod test_views;
pub mod transfer;
pub mod verified;

pub use config::Config;
pub use output::{Event, Output};
pub use replica::Replica;
