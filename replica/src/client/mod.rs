//! The client side of the protocol. `session` is the sans-I/O state machine (signing, matching
//! replies from distinct replicas, retransmission, following views); the network proxy drives it.

pub mod session;

pub use session::{ClientError, ClientSession, Completion};
