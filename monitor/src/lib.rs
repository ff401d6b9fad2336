//! Viola monitor: host and VM usage, heartbeats and service probes, pushed to the adaptation
//! manager over QUIC with mutual TLS, and exposed as Prometheus metrics.
//!
//! - [`proc`]: /proc parsers (pure);
//! - [`sampler`]: raw samples to [`HostReport`](viola_api::manager::HostReport)s
//!   with rates (pure, time passed in);
//! - [`probe`]: HTTP service probes;
//! - [`guest_channel`]: the host's end of its VMs' shepherd channels (requests from inside
//!   a VM, forwarded to the manager with the VM as their origin);
//! - [`daemon`]: the loop that reads, samples, probes, pushes and exports.

pub mod daemon;
pub mod guest_channel;
pub mod probe;
pub mod proc;
pub mod sampler;
