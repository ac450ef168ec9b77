//! Tunables of the protocol core. Times are in microseconds of the driver's clock.

/// Detection of a leader that is slow but not silent (Aardvark, Prime, RBFT): a leader whose
/// requests wait far longer than under recent leaders is rotated before the request timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlowLeader {
    /// Suspect when the oldest pending request waited this many times the recent baseline.
    pub factor: u64,
    /// Never suspect below this wait, whatever the baseline.
    pub floor_us: u64,
    /// A new leader gets this long before it can be judged slow.
    pub grace_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Base request timeout: forward after one, suspect the leader after two.
    pub request_timeout_us: u64,
    /// The back-off cap: the timeout doubles per regency that fails to decide, up to this.
    pub max_request_timeout_us: u64,
    /// Retransmission period of STOP while the regency has not changed.
    pub stop_retransmit_us: u64,
    pub max_batch_requests: usize,
    pub max_batch_bytes: usize,
    pub max_pending_per_client: usize,
    pub max_pending_total: usize,
    /// Payload bytes of requests waiting to be ordered: past it new ones are refused
    /// (`pool_full`) until some execute.
    pub max_pending_bytes: usize,
    /// Consensus messages are buffered for at most this many instances ahead.
    pub future_window: u64,
    /// Messages buffered per future instance.
    pub max_buffered_per_instance: usize,
    /// Decided instances kept for lagging replicas.
    pub log_retention: u64,
    /// Decisions sent in answer to one request.
    pub max_decisions_per_reply: u64,
    /// A leader's timestamp may lead the follower's clock by at most this much.
    pub max_clock_skew_ms: u64,
    /// Signatures remembered as verified, so each request is checked once per replica.
    pub verified_cache: usize,
    pub slow_leader: Option<SlowLeader>,
    /// A checkpoint is taken after every CID c with (c+1) % checkpoint_period == 0, and after
    /// every view change; the log is trimmed to what follows the older of the two kept.
    pub checkpoint_period: u64,
    /// A checkpoint is also taken after the CID at which the payload bytes decided since the
    /// last one reach this: decisions are held in memory from the older kept checkpoint on, and
    /// 1,024 batches of 4 MiB would be 4 GiB of them. Deterministic like the period (every
    /// correct replica decides the same batches).
    pub checkpoint_bytes: u64,
    /// Bytes asked for per state-transfer chunk, and chunks in flight.
    pub chunk_bytes: usize,
    pub transfer_window: usize,
    /// A state-transfer source that sends nothing for this long is replaced.
    pub transfer_stall_us: u64,
    /// Emit `Output::Persist` for every decision (the driver has a log to write).
    pub persist: bool,
    /// Hand checkpoints to the driver to encode (`Output::EncodeCheckpoint`) instead of
    /// encoding them on the spot: every correct replica takes a checkpoint at the same CID, and
    /// encoding a large state there (tens of milliseconds for a Kubernetes control plane's)
    /// would stall the whole cluster at once.
    pub defer_checkpoints: bool,
    /// With a quorum of ACCEPTs but not all n, wait this long for the rest before checking the
    /// quorum's signatures (all n need no check to decide; see `replica/accepts.rs`). 0 checks
    /// every ACCEPT on arrival.
    pub accept_grace_us: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            request_timeout_us: 2_000_000,
            max_request_timeout_us: 60_000_000,
            stop_retransmit_us: 1_000_000,
            max_batch_requests: 1024,
            max_batch_bytes: 4 * 1024 * 1024,
            max_pending_per_client: 256,
            max_pending_total: 100_000,
            max_pending_bytes: 512 * 1024 * 1024,
            future_window: 64,
            max_buffered_per_instance: 256,
            log_retention: 100_000,
            max_decisions_per_reply: 64,
            max_clock_skew_ms: 30_000,
            verified_cache: 200_000,
            slow_leader: Some(SlowLeader {
                factor: 8,
                floor_us: 200_000,
                grace_us: 1_000_000,
            }),
            checkpoint_period: 1024,
            checkpoint_bytes: 256 * 1024 * 1024,
            chunk_bytes: 1024 * 1024,
            transfer_window: 4,
            transfer_stall_us: 2_000_000,
            persist: false,
            defer_checkpoints: false,
            accept_grace_us: 500,
        }
    }
}
