//! Message types and their canonical, bounded binary encoding. No I/O.

pub mod codec;
