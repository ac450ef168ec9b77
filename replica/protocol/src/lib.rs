//! KmMR's protocol, free of I/O: the wire format (`wire`), signatures and digests (`crypto`), views
//! (membership) and quorum arithmetic (`view`), the Mod-SMaRt replica core over VP-Consensus
//! (`core`), and the state machines it orders (`service`: the revisioned key-value store with
//! etcd's semantics, and a no-op service). Every input arrives as a function argument and every
//! effect leaves as a returned value, so the same code runs in a replica process and in the
//! deterministic simulator.
//!
//! Layers, each using only those before it: `crypto`; `wire` (encoding, identifiers, messages as
//! data); `view`; `service`; `core`, which alone decides whether a message is valid
//! (`core::proof` checks signatures against a view).

pub mod core;
pub mod crypto;
pub mod service;
pub mod view;
pub mod wire;
