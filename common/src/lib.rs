//! Viola's shared ground: what every daemon needs and nothing more.
//!
//! - [`config`]: defaults, then a TOML file, then the command line, unknown keys rejected.
//! - [`enrol`]: a new host's certificates and configurations as one bundle.
//! - [`errors`]: printing an error with its whole source chain, and a binary's exit code.
//! - [`shutdown`]: SIGINT/SIGTERM turned into a cancellation token.
//! - [`metrics`]: a minimal Prometheus text endpoint.

pub mod config;
pub mod enrol;
pub mod errors;
pub mod fuzz_seeds;
pub mod identity;
pub mod metrics;
pub mod shutdown;
