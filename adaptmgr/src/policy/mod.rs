//! Adaptation policies: pure, deterministic decision cores shared by the live manager and the
//! trace-driven simulator.
//!
//! # The interface
//!
//! A policy sees one [`ObservedState`] per control period and returns a [`Decision`]: a list of
//! [`Action`]s (migrate, resize, suspend/resume, power a host on/off), each with a human-readable
//! reason. Nothing here does I/O, reads a clock or draws unseeded randomness: the caller passes the
//! time in the state, and the same state (plus the policy's own remembered history) always gives
//! the same decision.
//!
//! Feeding it from the live system: `crate::observe` builds the state from the inventory (the
//! monitors' samples) and `crate::policy_loop` runs the policy every control period. Per host,
//! fill [`HostObs`] with the capacity (`pes` × `pe_mips`, `ram_mb`), the power curve if known (else any monotone curve), `vms` (the
//! VMs resident on it, oldest first), and `utilization` (CPU in use / capacity at the last sample).
//! Per VM, fill [`VmObs`] with its size (`mips` per vCPU, `ram_mb`), what it currently reserves on
//! its host (`ram_reserved_mb`, `bw_reserved_mbps`), its current CPU demand `requested_mips`, what
//! it got (`allocated_mips`), and `history`: its CPU demand as a fraction of `mips`, newest first,
//! one sample per control period (at most [`HISTORY_LENGTH`] are used). VMs that are mid-migration
//! have `in_migration` set and are never chosen again until they land. Sites carry the cost of a
//! cross-site (WAN) migration.
//!
//! Executing a decision: actions are meant to be applied in order; migrations of one decision may
//! run in parallel up to the limit the caller's executor imposes, and [`planning`] turns a target
//! placement into a capacity-safe ordered plan when a policy wants to move many VMs at once.
//! Requests that come from inside a VM (untrusted) go through [`shepherd`] first.
//!
//! Indices: `host`, `vm`, `site`, `violin` fields are indices into the state's vectors, so an action
//! is only meaningful together with the state it was computed from (names are in the state).

// Placement code indexes several parallel per-host and per-VM vectors by the same index.
#![allow(clippy::needless_range_loop)]

pub mod beloglazov;
pub mod marinescu;
pub mod planning;
pub mod shepherd;
pub mod shirako;
pub mod vertical;
pub mod viola;
pub mod violin;
pub mod vservices;

use serde::{Deserialize, Serialize};

/// Samples of utilisation history a policy looks at (CloudSim's `PowerVm.HISTORY_LENGTH`).
pub const HISTORY_LENGTH: usize = 30;

/// Piecewise-linear power curve: watts at 0 %, 10 %, …, 100 % CPU (SPECpower style).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PowerModel {
    pub watts: [f64; 11],
}

impl PowerModel {
    /// HP ProLiant ML110 G4 (CloudSim `PowerModelSpecPowerHpProLiantMl110G4Xeon3040`).
    pub fn hp_ml110_g4() -> Self {
        Self {
            watts: [
                86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0,
            ],
        }
    }
    /// HP ProLiant ML110 G5 (CloudSim `PowerModelSpecPowerHpProLiantMl110G5Xeon3075`).
    pub fn hp_ml110_g5() -> Self {
        Self {
            watts: [
                93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0,
            ],
        }
    }
    /// Power at `utilization` in [0, 1] (clamped), interpolated exactly as CloudSim's
    /// `PowerModelSpecPower.getPower`.
    pub fn power(&self, utilization: f64) -> f64 {
        let u = utilization.clamp(0.0, 1.0);
        if u % 0.1 == 0.0 {
            return self.watts[(u * 10.0) as usize];
        }
        let lo = (u * 10.0).floor() as usize;
        let hi = (u * 10.0).ceil() as usize;
        let p1 = self.watts[lo];
        let p2 = self.watts[hi.min(10)];
        let delta = (p2 - p1) / 10.0;
        p1 + delta * (u - lo as f64 / 10.0) * 100.0
    }
}

/// A site (administrative domain). Migrations between sites cross the WAN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteObs {
    pub name: String,
    /// Bandwidth available to one migration leaving or entering this site over the WAN, Mbit/s.
    pub wan_mbps: f64,
}

/// A violin: one tenant's virtual LAN and its VMs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViolinObs {
    pub name: String,
}

/// What the manager knows about a physical host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostObs {
    pub name: String,
    pub site: usize,
    pub pes: u32,
    pub pe_mips: f64,
    pub ram_mb: f64,
    pub bw_mbps: f64,
    /// Memory and bandwidth currently reserved by the resident VMs.
    pub ram_used_mb: f64,
    pub bw_used_mbps: f64,
    pub power: PowerModel,
    /// Resident VMs (indices into `ObservedState::vms`), oldest first.
    pub vms: Vec<usize>,
    /// CPU in use / capacity at the last sample (0 for a host that is off or idle).
    pub utilization: f64,
    /// False when the host is powered off (or suspended).
    pub powered_on: bool,
}

impl HostObs {
    pub fn total_mips(&self) -> f64 {
        f64::from(self.pes) * self.pe_mips
    }
}

/// Service-level observation of a VM's service (Virtual Services), when one is probed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceObs {
    /// Measured parameter x of the service-level function (e.g. response time in s, or the
    /// projected completion time over the deadline for a job).
    pub measured: f64,
    /// Service-level function parameters s(x) = w·a·(b−x)/√(1+(a·(b−x))²) + w.
    pub a: f64,
    pub b: f64,
    pub w: f64,
    /// Relative weight of this service in the aggregate.
    pub weight: f64,
}

/// What the manager knows about a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmObs {
    pub name: String,
    pub violin: Option<usize>,
    pub host: Option<usize>,
    pub pes: u32,
    /// Capacity of one vCPU, MIPS (the VM's size).
    pub mips: f64,
    pub ram_mb: f64,
    /// Memory the VM occupies on its host (what a destination must have free).
    pub ram_reserved_mb: f64,
    pub bw_reserved_mbps: f64,
    /// Current CPU demand, total MIPS (may exceed what it gets).
    pub requested_mips: f64,
    /// CPU the VM currently receives, total MIPS.
    pub allocated_mips: f64,
    /// CPU cap set by a resize (None = uncapped up to its size).
    pub cpu_cap_mips: Option<f64>,
    /// Demand as a fraction of `mips × pes`, newest first.
    pub history: Vec<f64>,
    pub in_migration: bool,
    pub suspended: bool,
    pub service: Option<ServiceObs>,
}

impl VmObs {
    pub fn total_mips(&self) -> f64 {
        f64::from(self.pes) * self.mips
    }
    /// Demand on one vCPU (CloudSim's `getCurrentRequestedMaxMips`).
    pub fn requested_per_pe(&self) -> f64 {
        self.requested_mips / f64::from(self.pes.max(1))
    }
}

/// Everything a policy may look at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObservedState {
    /// Seconds since the start of the run (or the epoch, live).
    pub time_s: f64,
    /// Seconds between decisions.
    pub interval_s: f64,
    pub sites: Vec<SiteObs>,
    pub violins: Vec<ViolinObs>,
    pub hosts: Vec<HostObs>,
    pub vms: Vec<VmObs>,
}

impl ObservedState {
    /// Of `vms`, those not migrating now: the ones a policy may move.
    pub fn movable(&self, vms: &[usize]) -> Vec<usize> {
        vms.iter()
            .copied()
            .filter(|&v| !self.vms[v].in_migration)
            .collect()
    }

    /// Seconds a live migration of `vm` from `from` to `to` takes: RAM over half the NIC inside a
    /// site (CloudSim's model), over the smaller WAN share between sites.
    pub fn migration_time_s(&self, vm: usize, from: usize, to: usize) -> f64 {
        let v = &self.vms[vm];
        let (hf, ht) = (&self.hosts[from], &self.hosts[to]);
        let lan = ht.bw_mbps / 2.0;
        let mbps = if hf.site == ht.site {
            lan
        } else {
            lan.min(self.sites[hf.site].wan_mbps)
                .min(self.sites[ht.site].wan_mbps)
        };
        v.ram_mb * 8.0 / mbps
    }
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ActionKind {
    Migrate {
        vm: usize,
        from: usize,
        to: usize,
    },
    /// Set a VM's CPU cap (MIPS) and/or memory.
    Resize {
        vm: usize,
        cpu_mips: Option<f64>,
        ram_mb: Option<f64>,
    },
    Suspend {
        vm: usize,
    },
    Resume {
        vm: usize,
        host: usize,
    },
    PowerOn {
        host: usize,
    },
    PowerOff {
        host: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    #[serde(flatten)]
    pub kind: ActionKind,
    pub reason: String,
}

impl Action {
    pub fn migrate(vm: usize, from: usize, to: usize, reason: impl Into<String>) -> Self {
        Self {
            kind: ActionKind::Migrate { vm, from, to },
            reason: reason.into(),
        }
    }
}

/// A policy's answer for one period.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub actions: Vec<Action>,
}

/// A pluggable, deterministic adaptation policy.
pub trait Policy: Send {
    /// The name used on the command line and in reports.
    fn name(&self) -> String;
    /// Where to start a new VM (`vm` is in `state.vms` with `host: None`); `None` if it fits
    /// nowhere. The default is CloudSim's power-aware best fit on the VM's full size.
    fn place(&mut self, state: &ObservedState, placed: &Placement, vm: usize) -> Option<usize> {
        beloglazov::pabfd_initial(state, placed, vm, 0.7)
    }
    /// The actions for this period.
    fn decide(&mut self, state: &ObservedState) -> Decision;
}

/// Admission bookkeeping used while placing new VMs one by one (what the new VMs reserve).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Per host: MIPS, RAM and bandwidth reserved by VMs placed so far (at their full size).
    pub mips: Vec<f64>,
    pub ram_mb: Vec<f64>,
    pub bw_mbps: Vec<f64>,
    pub vms: Vec<Vec<usize>>,
}

impl Placement {
    pub fn new(hosts: usize) -> Self {
        Self {
            mips: vec![0.0; hosts],
            ram_mb: vec![0.0; hosts],
            bw_mbps: vec![0.0; hosts],
            vms: vec![Vec::new(); hosts],
        }
    }
    pub fn fits(&self, state: &ObservedState, host: usize, vm: usize) -> bool {
        let (h, v) = (&state.hosts[host], &state.vms[vm]);
        h.pe_mips >= v.mips
            && h.total_mips() - self.mips[host] >= v.total_mips()
            && h.ram_mb - self.ram_mb[host] >= v.ram_mb
            && h.bw_mbps - self.bw_mbps[host] >= v.bw_reserved_mbps
    }
    pub fn add(&mut self, state: &ObservedState, host: usize, vm: usize) {
        let v = &state.vms[vm];
        self.mips[host] += v.total_mips();
        self.ram_mb[host] += v.ram_mb;
        self.bw_mbps[host] += v.bw_reserved_mbps;
        self.vms[host].push(vm);
    }
}

/// Every policy name the simulator and the manager accept.
pub const POLICY_NAMES: &[&str] = &[
    "dvfs",
    "thr-mmt-0.8",
    "iqr-mmt-1.5",
    "mad-mmt-2.5",
    "lr-mmt-1.2",
    "lrr-mmt-1.2",
    "thr-mc-0.8",
    "thr-rs-0.8",
    "violin",
    "marinescu-a",
    "marinescu-b",
    "shirako-energy-aware",
    "shirako-room-for-growth",
    "viola",
];

/// Errors from looking a policy up by name.
#[derive(Debug, thiserror::Error)]
pub enum PolicyNameError {
    #[error("unknown policy {0:?} (known: {known})", known = POLICY_NAMES.join(", "))]
    Unknown(String),
    #[error("bad parameter in policy name {name:?}")]
    BadParameter {
        name: String,
        #[source]
        source: std::num::ParseFloatError,
    },
}

/// Builds a policy from its name: `dvfs`, `<thr|iqr|mad|lr|lrr>-<mmt|mc|rs>-<param>`, `viola`,
/// `violin`, `marinescu-a`, `marinescu-b`, `shirako-energy-aware`.
pub fn by_name(name: &str) -> Result<Box<dyn Policy>, PolicyNameError> {
    match name {
        "dvfs" => return Ok(Box::new(beloglazov::Dvfs)),
        "viola" => return Ok(Box::new(viola::Viola::default())),
        "violin" => return Ok(Box::new(violin::Violin::default())),
        "marinescu-a" => return Ok(Box::new(marinescu::ClusterPolicy::algorithm_a())),
        "marinescu-b" => return Ok(Box::new(marinescu::ClusterPolicy::algorithm_b())),
        "shirako-energy-aware" => return Ok(Box::new(shirako::Fit::Best)),
        "shirako-room-for-growth" => return Ok(Box::new(shirako::Fit::Worst)),
        _ => {}
    }
    let parts: Vec<&str> = name.split('-').collect();
    if parts.len() == 3 {
        let param: f64 = parts[2]
            .parse()
            .map_err(|source| PolicyNameError::BadParameter {
                name: name.to_string(),
                source,
            })?;
        let detector = match parts[0] {
            "thr" => beloglazov::Detector::Thr(param),
            "iqr" => beloglazov::Detector::Iqr(param),
            "mad" => beloglazov::Detector::Mad(param),
            "lr" => beloglazov::Detector::Lr(param),
            "lrr" => beloglazov::Detector::Lrr(param),
            _ => return Err(PolicyNameError::Unknown(name.to_string())),
        };
        let selection = match parts[1] {
            "mmt" => beloglazov::Selection::Mmt,
            "mc" => beloglazov::Selection::Mc,
            "rs" => beloglazov::Selection::Rs,
            _ => return Err(PolicyNameError::Unknown(name.to_string())),
        };
        return Ok(Box::new(beloglazov::Beloglazov::new(
            name, detector, selection,
        )));
    }
    Err(PolicyNameError::Unknown(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_curve_matches_the_spec_points_and_interpolates() {
        let g4 = PowerModel::hp_ml110_g4();
        assert_eq!(g4.power(0.0), 86.0);
        assert_eq!(g4.power(1.0), 117.0);
        assert!((g4.power(0.05) - 87.7).abs() < 1e-9);
        assert!((PowerModel::hp_ml110_g5().power(0.95) - 134.0).abs() < 1e-9);
    }

    #[test]
    fn every_listed_name_builds_and_unknown_names_are_refused() {
        for n in POLICY_NAMES {
            assert_eq!(by_name(n).map(|p| p.name()).ok().as_deref(), Some(*n));
        }
        assert!(by_name("nope").is_err());
        assert!(matches!(
            by_name("thr-mmt-x"),
            Err(PolicyNameError::BadParameter { .. })
        ));
    }
}
