//! Everything that crosses a Viola process boundary, so that every daemon and the CLI can speak
//! to every other without linking another daemon's internals.
//!
//! - [`wire`]: the framing of control messages on QUIC streams (4-byte length, then JSON).
//! - [`adaptation`]: the policy loop's decision log and the policy in force.
//! - [`manager`]: the adaptation manager's endpoint: requests, responses, monitor reports and
//!   the records as the API shows them; [`client`] is its client.
//! - [`dashboard`]: the JSON the manager's web dashboard serves.
//! - [`domain`], [`migration`]: the hypervisor facts and migration accounts those messages carry.
//! - [`overlay`]: the overlay daemon's control API (typed requests, replies and status) and its
//!   clients (QUIC with mutual TLS, or the host-local unix socket).

pub mod adaptation;
pub mod client;
pub mod dashboard;
pub mod domain;
pub mod manager;
pub mod migration;
pub mod overlay;
pub mod wire;

#[cfg(test)]
mod fuzz_seeds;
