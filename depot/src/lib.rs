//! Viola depot: content-addressed VM image parts, verified transfers and deadline-aware staging.

pub mod chunker;
pub mod hash;
pub mod manifest;
pub mod part;
pub mod store;
