//! From the inventory to the policies' [`ObservedState`]: the one place where the live system's
//! records become what a policy sees. Pure (no I/O, no clock: `now_ms` is passed in), so the
//! policy loop, its benchmark and the parity test with the simulator all build the state the
//! same way.
//!
//! The mapping, and what it cannot know:
//! - A host's capacity is `cpus` × [`ObserveParams::pe_mips`] MIPS (one host CPU is worth
//!   `pe_mips`; the monitors report CPUs' worth of busy time, not MIPS) and its memory; it is
//!   `powered_on` when the failure detector has it up and the manager can reach its libvirtd.
//!   No power meter is read: every host gets the HP ML110 G5 curve, so power-aware policies
//!   rank hosts by capacity only.
//! - A VM's size is its vCPUs at `pe_mips` each and its memory; its demand is the monitor's last
//!   `cpu_busy` (vCPUs' worth) in MIPS; its `history` is one value per control period, the mean
//!   of the monitor's samples in that period over its vCPUs, newest first (periods without a
//!   sample are left out), as the simulator keeps one trace value per interval.
//! - A VM that is not running has no host and is `suspended`; one the loop holds (moving, or in
//!   its cool-down after a move) is `in_migration`, which every policy leaves alone.
//! - A VM's `cpu_cap_mips` is the cap the manager last set on it (`viola vm resize
//!   --cap-percent`, or the policy loop), in percent of one CPU at `pe_mips`; a cap set outside
//!   Viola is not known.
//! - A VM's `service` is its job deadline's level (`viola vm deadline`, `deadlines`): x =
//!   projected completion / deadline from the job's progress reports; `None` for VMs without a
//!   deadline or before the job's speed is known. Probed response times are not turned into
//!   service levels (no model maps a share to a response time yet).

use std::collections::{BTreeMap, BTreeSet};

use viola_api::domain::DomainState;

use crate::inventory::{HostRecord, HostState, Sample, SampleHistories, ViolinRecord, VmRecord};
use crate::policy::{
    HISTORY_LENGTH, HostObs, ObservedState, PowerModel, SiteObs, ViolinObs, VmObs,
};

/// What the inventory does not say and the state needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObserveParams {
    /// The control period: one history value per period.
    pub period_ms: u64,
    /// MIPS of one host CPU (and so of one vCPU).
    pub pe_mips: f64,
    /// Each host's NIC, Mbit/s.
    pub bw_mbps: f64,
    /// Bandwidth of one cross-site migration, Mbit/s.
    pub wan_mbps: f64,
}

/// The state a policy sees at `now_ms`. Hosts, VMs and sites are in name order (the
/// inventory's order), so the same records always give the same indices.
pub fn observed_state(
    hosts: &[HostRecord],
    vms: &[VmRecord],
    violins: &[ViolinRecord],
    samples: &SampleHistories,
    held: &BTreeSet<String>,
    now_ms: u64,
    params: &ObserveParams,
) -> ObservedState {
    let site_names: BTreeSet<&str> = hosts.iter().map(|h| h.site.as_str()).collect();
    let site_index: BTreeMap<&str, usize> = site_names
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, i))
        .collect();
    let host_index: BTreeMap<&str, usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.name.as_str(), i))
        .collect();
    let violin_index: BTreeMap<&str, usize> = violins
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.as_str(), i))
        .collect();
    let mut host_obs: Vec<HostObs> = hosts
        .iter()
        .map(|h| {
            let (pes, pe_mips, cpus) = host_capacity(h, params.pe_mips);
            HostObs {
                name: h.name.clone(),
                site: site_index[h.site.as_str()],
                pes,
                pe_mips,
                ram_mb: h.memory_kib as f64 / 1024.0,
                bw_mbps: params.bw_mbps,
                ram_used_mb: 0.0,
                bw_used_mbps: 0.0,
                power: PowerModel::hp_ml110_g5(),
                vms: Vec::new(),
                utilization: h
                    .usage
                    .as_ref()
                    .map_or(0.0, |u| (u.cpu_busy / cpus).clamp(0.0, 1.0)),
                powered_on: h.state == HostState::Up && !h.libvirt_uri.is_empty(),
            }
        })
        .collect();
    let mut vm_obs = Vec::with_capacity(vms.len());
    for (i, v) in vms.iter().enumerate() {
        let running = v.state == DomainState::Running;
        let host = host_index.get(v.host.as_str()).copied().filter(|_| running);
        let pes = v.vcpus.max(1);
        let ram_mb = v.memory_kib as f64 / 1024.0;
        let history = samples
            .vms
            .get(&v.name)
            .map(|s| per_period(s, now_ms, params.period_ms, HISTORY_LENGTH))
            .unwrap_or_default()
            .into_iter()
            .map(|busy| busy / f64::from(pes))
            .collect();
        let demand = v.cpu_busy * params.pe_mips;
        if let Some(h) = host {
            host_obs[h].vms.push(i);
            host_obs[h].ram_used_mb += ram_mb;
        }
        vm_obs.push(VmObs {
            name: v.name.clone(),
            violin: v
                .violin
                .as_deref()
                .and_then(|n| violin_index.get(n).copied()),
            host,
            pes,
            mips: params.pe_mips,
            ram_mb,
            ram_reserved_mb: ram_mb,
            bw_reserved_mbps: 0.0,
            requested_mips: if running { demand } else { 0.0 },
            allocated_mips: if running { demand } else { 0.0 },
            cpu_cap_mips: v.cap_percent.map(|c| f64::from(c) / 100.0 * params.pe_mips),
            history,
            in_migration: held.contains(&v.name),
            suspended: !running,
            service: v.deadline.as_ref().and_then(|d| d.service(now_ms)),
        });
    }
    ObservedState {
        time_s: now_ms as f64 / 1000.0,
        interval_s: params.period_ms as f64 / 1000.0,
        sites: site_names
            .iter()
            .map(|s| SiteObs {
                name: (*s).to_owned(),
                wan_mbps: if site_names.len() == 1 {
                    f64::INFINITY
                } else {
                    params.wan_mbps
                },
            })
            .collect(),
        violins: violins
            .iter()
            .map(|v| ViolinObs {
                name: v.name.clone(),
            })
            .collect(),
        hosts: host_obs,
        vms: vm_obs,
    }
}

/// One value per control period, newest first: the mean `cpu_busy` of the samples received in
/// each period ending at `now_ms` (period k covers `(now − (k+1)·period, now − k·period]`), for
/// at most `periods` periods; periods without a sample are left out. `samples` are newest first.
pub fn per_period(samples: &[Sample], now_ms: u64, period_ms: u64, periods: usize) -> Vec<f64> {
    let period_ms = period_ms.max(1);
    let mut out = Vec::new();
    let mut bucket: Option<(u64, f64, u32)> = None;
    for s in samples {
        // A sample stamped after `now` (clock skew between calls) counts as the newest period.
        let k = now_ms.saturating_sub(s.ts_ms) / period_ms;
        if k >= periods as u64 {
            break;
        }
        match &mut bucket {
            Some((current, sum, n)) if *current == k => {
                *sum += s.cpu_busy;
                *n += 1;
            }
            _ => {
                if let Some((_, sum, n)) = bucket.take() {
                    out.push(sum / f64::from(n));
                }
                bucket = Some((k, s.cpu_busy, 1));
            }
        }
    }
    if let Some((_, sum, n)) = bucket {
        out.push(sum / f64::from(n));
    }
    out
}

/// A host's CPU capacity in the policies' model: `(pes, pe_mips, cpus)`. A host that is a
/// partition of a bigger machine (its monitor reports a cgroup quota) has the quota's CPUs, as
/// whole PEs of `pe_mips` where the quota is whole CPUs and as smaller PEs otherwise (which a
/// vCPU of full size then does not fit into, so the policies place no VM there); any other
/// host has its CPUs.
fn host_capacity(h: &HostRecord, pe_mips: f64) -> (u32, f64, f64) {
    match h
        .usage
        .as_ref()
        .and_then(|u| u.cpu_capacity)
        .filter(|c| *c > 0.0)
    {
        Some(c) => {
            let pes = (c.ceil() as u32).max(1);
            (pes, pe_mips * c / f64::from(pes), c)
        }
        None => (h.cpus, pe_mips, f64::from(h.cpus.max(1))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::VmRecord;

    fn sample(ts_ms: u64, cpu_busy: f64) -> Sample {
        Sample { ts_ms, cpu_busy }
    }

    #[test]
    fn samples_become_one_mean_per_period_newest_first() {
        // Period 1000 ms, now 10_000: (9000, 10000] is period 0, (8000, 9000] period 1, ...
        // (a sample stamped 9500 is in period 0, one stamped 8200 in period 1).
        let s = [
            sample(10_000, 0.4),
            sample(9_500, 0.2),
            sample(8_200, 1.0),
            sample(7_000, 0.5), // period 3; period 2 had none
            sample(1_000, 0.9), // period 8: beyond the 4 periods asked for
        ];
        assert_eq!(
            per_period(&s, 10_000, 1000, 4),
            vec![0.30000000000000004, 1.0, 0.5]
        );
        assert!(per_period(&[], 10_000, 1000, 4).is_empty());
    }

    #[test]
    fn records_map_to_hosts_and_vms_by_name_with_holds_and_stopped_vms() {
        let host = |name: &str, site: &str, state| HostRecord {
            name: name.into(),
            site: site.into(),
            libvirt_uri: format!("fake://{name}"),
            migration_uri: String::new(),
            cpus: 4,
            memory_kib: 8 << 20,
            state,
            last_heartbeat_ms: None,
            last_report_seq: 0,
            usage: None,
        };
        let vm = |name: &str, host: &str, state, busy| VmRecord {
            name: name.into(),
            host: host.into(),
            violin: Some("lan".into()),
            macs: vec![],
            state,
            vcpus: 2,
            max_vcpus: 2,
            memory_kib: 1 << 20,
            max_memory_kib: 1 << 20,
            cpu_busy: busy,
            domain_xml: None,
            cap_percent: None,
            deadline: None,
            updated_ms: 0,
        };
        let hosts = [
            host("a1", "a", HostState::Up),
            host("b1", "b", HostState::Failed { since_ms: 1 }),
        ];
        let vms = [
            vm("v1", "a1", DomainState::Running, 1.5),
            vm("v2", "b1", DomainState::ShutOff, 0.0),
            vm("v3", "a1", DomainState::Running, 0.5),
        ];
        let violins = [ViolinRecord {
            name: "lan".into(),
            vni: 1,
            vms: vec![],
            ..ViolinRecord::default()
        }];
        let mut samples = SampleHistories::default();
        samples
            .vms
            .insert("v1".into(), vec![sample(59_000, 1.5), sample(1_000, 1.0)]);
        let held = BTreeSet::from(["v3".to_owned()]);
        let params = ObserveParams {
            period_ms: 30_000,
            pe_mips: 1000.0,
            bw_mbps: 1000.0,
            wan_mbps: 100.0,
        };
        let st = observed_state(&hosts, &vms, &violins, &samples, &held, 60_000, &params);
        assert_eq!(st.sites.len(), 2);
        assert_eq!(st.hosts[0].vms, vec![0, 2]);
        assert!(st.hosts[0].powered_on && !st.hosts[1].powered_on);
        assert_eq!(st.hosts[0].total_mips(), 4000.0);
        assert_eq!(st.vms[0].history, vec![0.75, 0.5]);
        assert_eq!(st.vms[0].requested_mips, 1500.0);
        assert_eq!(st.vms[0].violin, Some(0));
        assert!(st.vms[1].suspended && st.vms[1].host.is_none());
        assert!(st.vms[2].in_migration && !st.vms[0].in_migration);
        assert_eq!(st.hosts[0].ram_used_mb, 2048.0);
        assert_eq!(st.time_s, 60.0);
    }

    #[test]
    fn a_partition_has_its_quota_as_capacity_and_is_busy_against_it() {
        let mut h = HostRecord {
            name: "a1".into(),
            site: "a".into(),
            libvirt_uri: "fake://a1".into(),
            migration_uri: String::new(),
            cpus: 2,
            memory_kib: 8 << 20,
            state: HostState::Up,
            last_heartbeat_ms: None,
            last_report_seq: 0,
            usage: Some(viola_api::manager::HostUsage {
                cpus: 2,
                cpu_capacity: Some(1.0),
                cpu_busy: 0.8,
                ..Default::default()
            }),
        };
        assert_eq!(host_capacity(&h, 1000.0), (1, 1000.0, 1.0));
        let params = ObserveParams {
            period_ms: 30_000,
            pe_mips: 1000.0,
            bw_mbps: 1000.0,
            wan_mbps: 100.0,
        };
        let none = SampleHistories::default();
        let st = observed_state(&[h.clone()], &[], &[], &none, &BTreeSet::new(), 0, &params);
        assert_eq!(st.hosts[0].total_mips(), 1000.0);
        assert!((st.hosts[0].utilization - 0.8).abs() < 1e-9);
        // Half a CPU: one smaller PE; no quota: the machine's CPUs.
        h.usage.as_mut().unwrap().cpu_capacity = Some(0.5);
        assert_eq!(host_capacity(&h, 1000.0), (1, 500.0, 0.5));
        h.usage.as_mut().unwrap().cpu_capacity = Some(1.5);
        assert_eq!(host_capacity(&h, 1000.0), (2, 750.0, 1.5));
        h.usage.as_mut().unwrap().cpu_capacity = None;
        assert_eq!(host_capacity(&h, 1000.0), (2, 1000.0, 2.0));
    }
}
