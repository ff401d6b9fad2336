//! Viola overlay: violins (isolated virtual Ethernets) carried between hosts as QUIC datagrams.
//!
//! - [`wire`]: the datagram format (violin id, fragments, relay) and Ethernet/ARP parsing.
//! - [`control`]: control messages (membership, MAC announcements, relay) and their framing.
//! - [`reassembly`]: memory-bounded reassembly of fragmented frames.
//! - [`switch`]: the switching core without I/O (learning, flooding, isolation, moves).
//! - [`mss`]: TCP MSS clamping, so that full segments fit one datagram.
//! - [`offload`]: TAP offloads without I/O (virtio-net header, segmentation, coalescing);
//!   [`tap`] opens a TAP with them.
//! - [`dhcp`]: DHCPv4 formats for the switch's answers to managed VMs.
//! - [`spec`]: checking the control plane's violins, and the state file keeping them.
//! - [`config`], [`daemon`]: the `viola-overlay` daemon around the core.
//! - [`sparse`], [`local_runtime`]: keeping the sparse-packet path short (see each module).
//! - [`cpu_latency`]: the optional CPU wake-up latency request (PM QoS) for the lowest RTT.

use std::sync::Arc;

/// Declares a fieldless enum together with `ALL` (every variant) and `as_str` (each variant's
/// label), so that lists of every reason (metrics export, tests) cannot fall behind the enum.
macro_rules! labelled_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $label:literal, )*
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )*
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),*];

            /// The variant's snake_case label (status keys, metrics labels).
            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $label,)*
                }
            }
        }
    };
}

pub mod control;
pub mod dhcp;
pub mod mss;
pub mod offload;
pub mod reassembly;
pub mod spec;
pub mod switch;
pub mod wire;

pub mod config;
pub mod cpu_latency;
pub mod daemon;
pub mod local_runtime;
pub mod sparse;
pub mod tap;

#[cfg(test)]
mod fuzz_seeds;
#[cfg(test)]
mod sim;

/// A host's name, `site/host`.
pub type HostId = Arc<str>;
