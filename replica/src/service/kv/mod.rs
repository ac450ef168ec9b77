//! The revisioned key-value store (being written).
