//! The KmMR replica runtime: a replica process (`node`) that drives the protocol core of
//! `kmmr-protocol` over the network of `kmmr-net`, keeps its log, checkpoints and promises on disk
//! (`storage`), and serves metrics and its signed status over HTTP; plus local clusters of
//! replica processes on loopback (`cluster`) for the CLI, the tests and the benchmarks, and the
//! backup file a new cluster can start from (`backup`).

pub mod backup;
pub mod cluster;
pub mod node;
pub mod storage;
