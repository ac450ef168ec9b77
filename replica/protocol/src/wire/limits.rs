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
/// Payload bytes of the requests a correct replica puts in one STOP or FORWARD (one request is
/// always carried, and is at most [`MAX_PAYLOAD`]). A count alone is no bound: 1,024 legal values
/// of 1 MiB made frames of 135 MB that the 16 MiB frame limit refused, and no leader change
/// completed.
pub const MAX_CARRIED_BYTES: usize = 4 * 1024 * 1024;
/// Largest `max_batch_bytes` a replica may be configured with: a SYNC carries a decision and a
/// batch, a STOPDATA a decision and batches worth [`MAX_STOPDATA_VALUE_BYTES`], and each must
/// fit in [`MAX_FRAME`] with the per-request overhead of up to [`MAX_BATCH_REQUESTS`] requests.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Payload bytes of the batches one STOPDATA carries beside its last decision (the accepted one
/// first, then the newest written); a batch is always carried when it is the first.
pub const MAX_STOPDATA_VALUE_BYTES: usize = 2 * MAX_BATCH_BYTES;
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
