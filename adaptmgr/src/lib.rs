//! Viola adaptation manager: the mechanisms that act on VMs (hypervisor trait over libvirt,
//! orchestrated cross-domain live migration, inventory, host-failure handling) and the policies
//! that decide (pure, deterministic, shared by the live manager and the trace-driven simulator).
pub mod announce;
pub mod control;
pub mod dashboard;
pub mod deadlines;
#[cfg(test)]
mod fixtures;
pub mod guest_requests;
pub mod ha;
pub mod history;
pub mod images;
pub mod inventory;
pub mod lifecycle;
pub mod manager;
pub mod migration;
pub mod observe;
pub mod policy;
pub mod policy_loop;
pub mod replication;
pub mod sim;
pub mod tenants;
