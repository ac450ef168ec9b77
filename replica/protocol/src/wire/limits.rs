//! Hard bounds on everything that arrives from outside. Exceeding one is a decode error.

/// Largest frame a peer or client may send.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Largest client operation payload (etcd's default request limit is 1.5 MiB).
pub const MAX_PAYLOAD: usize = 2 * 1024 * 1024;
/// Requests in one batch.
pub const MAX_BATCH_REQUESTS: usize = 4096;
/// Replicas in a view.
pub const MAX_REPLICAS: usize = 64;
/// Bytes of a replica address.
pub const MAX_ADDRESS: usize = 256;
/// Requests carried by a STOP or a FORWARD.
pub const MAX_CARRIED_REQUESTS: usize = 4096;
/// (epoch, value) pairs in one collect's write set.
pub const MAX_WRITE_SET: usize = 1024;
/// Bytes of a reply result.
pub const MAX_RESULT: usize = 8 * 1024 * 1024;
/// Checkpoints one replica advertises in a `CheckpointInfo`.
pub const MAX_CHECKPOINTS_ADVERTISED: usize = 4;
/// Bytes of one state-transfer chunk.
pub const MAX_CHUNK: usize = 4 * 1024 * 1024;
/// Clients remembered in a checkpoint's session table.
pub const MAX_SESSIONS: usize = 16 * 1024 * 1024;
