//! Releases as archives: packing a tree (deterministic tar.gz) and extracting an untrusted
//! one into a fresh directory without letting it escape, hang or exhaust memory.

pub mod extract;
pub mod pack;
