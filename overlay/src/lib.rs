//! Viola overlay: violins (isolated virtual Ethernets) carried between hosts as QUIC datagrams.
//!
//! - [`wire`]: the datagram format (violin id, fragments, relay) and Ethernet/ARP parsing.
//! - [`control`]: control messages (membership, MAC announcements, relay) and their framing.
//! - [`reassembly`]: memory-bounded reassembly of fragmented frames.
//! - [`switch`]: the switching core without I/O (learning, flooding, isolation, moves).
//! - [`config`], [`daemon`]: the `viola-overlay` daemon around the core.
//! - [`sparse`], [`local_runtime`]: keeping the sparse-packet path short (see each module).
//! - [`cpu_latency`]: the optional CPU wake-up latency request (PM QoS) for the lowest RTT.

use std::sync::Arc;

pub mod control;
pub mod reassembly;
pub mod switch;
pub mod wire;

#[cfg(test)]
mod fuzz_seeds;
#[cfg(test)]
mod sim;

/// A host's name, `site/host`.
pub type HostId = Arc<str>;
pub mod config;
pub mod cpu_latency;
pub mod daemon;
pub mod local_runtime;
pub mod sparse;
