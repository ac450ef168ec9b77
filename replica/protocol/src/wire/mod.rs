//! Message types and their canonical, bounded binary encoding. No I/O.

pub mod codec;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod messages;
