//! Viola depot: content-addressed VM image parts, verified transfers and deadline-aware staging.

pub mod api;
pub mod bound;
pub mod chunker;
pub mod client;
pub mod daemon;
pub mod hash;
pub mod image;
pub mod manifest;
pub mod part;
pub mod planner;
pub mod qemu;
pub mod scenario_gen;
pub mod store;
pub mod transfer;
pub mod upload;
pub mod wire;

#[cfg(test)]
mod fuzz_seeds;
