//! The KmMR client library: what talks to a cluster without running a replica. `session` is the
//! sans-I/O state machine (signing, matching replies from distinct replicas, retransmission,
//! following views); `proxy` drives it over the network; `admin` signs membership changes;
//! `status` reads and verifies what a replica says about itself; `files` reads and writes the
//! view and key files. The CLI, the Kubernetes operator and the etcd gateway share it; it links
//! no replica runtime (no storage, no HTTP server, no simulator).

pub mod admin;
pub mod clock;
pub mod files;
pub mod proxy;
pub mod session;
pub mod status;

pub use admin::{Admin, AdminError};
pub use proxy::{Client, ClientOptions};
pub use session::{ClientError, ClientSession, Completion, ReadOutcomes};
