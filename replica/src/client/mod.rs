//! The client side of the protocol. `session` is the sans-I/O state machine (signing, matching
//! replies from distinct replicas, retransmission, following views); `proxy` drives it over the
//! network.

pub mod admin;
pub mod proxy;
pub mod session;

pub use admin::{Admin, AdminError};
pub use proxy::{Client, ClientOptions};
pub use session::{ClientError, ClientSession, Completion};
