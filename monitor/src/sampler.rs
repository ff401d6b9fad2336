//! Turns raw samples (/proc text, libvirt domain statistics) into [`HostReport`]s with rates.
//! No I/O: the daemon reads and passes in; time is passed in.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use viola_api::manager::{HostReport, HostUsage, LinkUsage, NetUsage, ProbeResult, VmUsage};
use viola_api::overlay::LinkBytes;
use viola_hypervisor::DomainStats;

use crate::proc::{self, CpuTimes};

/// The /proc text of one sample, and the host's cgroup figures when it is a partition.
#[derive(Debug, Clone, Default)]
pub struct ProcText {
    pub stat: String,
    pub meminfo: String,
    pub net_dev: String,
    pub cgroup: Option<CgroupSample>,
    /// `ebtables -t nat -L --Lc` (the VMs' port filters), when the host has VMs with ports.
    pub ebtables: Option<String>,
    /// The overlay daemon's bytes per peer link (read just before /proc), when the monitor
    /// asks it.
    pub overlay_links: Option<BTreeMap<String, LinkBytes>>,
}

/// A host that is a cgroup of a bigger machine: what it may use and what it has used.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CgroupSample {
    /// CPUs' worth of time it may use (`None`: no quota, the whole machine).
    pub capacity: Option<f64>,
    /// CPU time used by everything in it so far (ns).
    pub usage_ns: u64,
}

/// Keeps the previous sample to compute rates.
#[derive(Debug)]
pub struct Sampler {
    host: String,
    site: String,
    seq: u64,
    prev_cpu: Option<CpuTimes>,
    prev_cgroup_ns: Option<u64>,
    prev_net: HashMap<String, (u64, u64)>,
    /// The links' (rx, tx) bytes at the last reading.
    prev_links: HashMap<String, (u64, u64)>,
    prev_vm_cpu: HashMap<String, u64>,
    /// When /proc and the cgroup were last read.
    prev_at: Option<Instant>,
    /// When libvirt's statistics last came back (the VMs' CPU times).
    prev_vms_at: Option<Instant>,
    /// Per VM: its port-filter drops when last logged, and when.
    drops_logged: HashMap<String, (u64, Instant)>,
}

/// At most one log line per VM about its port filter's drops in this time.
const DROP_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl Sampler {
    pub fn new(host: &str, site: &str) -> Self {
        Self {
            host: host.to_owned(),
            site: site.to_owned(),
            seq: 0,
            prev_cpu: None,
            prev_cgroup_ns: None,
            prev_net: HashMap::new(),
            prev_links: HashMap::new(),
            prev_vm_cpu: HashMap::new(),
            prev_at: None,
            prev_vms_at: None,
            drops_logged: HashMap::new(),
        }
    }

    /// Logs a VM's new port-filter drops, at most once per [`DROP_LOG_INTERVAL`].
    fn log_drops(&mut self, vm: &str, dropped: u64, now: Instant) {
        match self.drops_logged.get(vm) {
            None => {
                // The first reading is the baseline (a restarted monitor finds old counts).
                self.drops_logged.insert(vm.to_owned(), (dropped, now));
            }
            Some(&(logged, at))
                if dropped > logged && now.duration_since(at) >= DROP_LOG_INTERVAL =>
            {
                tracing::warn!(
                    vm,
                    dropped = dropped - logged,
                    total = dropped,
                    "the bridge's port filter dropped frames from this VM (another MAC or address than its own, or a protocol the filter refuses)"
                );
                self.drops_logged.insert(vm.to_owned(), (dropped, now));
            }
            Some(_) => {}
        }
    }

    /// Builds the next report from readings all taken at `now` (see [`Sampler::sample_at`]).
    pub fn sample(
        &mut self,
        now: Instant,
        now_ms: u64,
        text: &ProcText,
        vms: &[DomainStats],
        probes: Vec<ProbeResult>,
    ) -> HostReport {
        self.sample_at(now, now, now_ms, text, vms, probes)
    }

    /// Builds the next report: `text` was read at `now`, `vms` came back from libvirt at
    /// `vms_at`. Rates are over the time since the previous reading of the same source (zero on
    /// the first). A VM's `cpu_busy` is in vCPUs: 1.0 means one vCPU fully busy.
    ///
    /// Each source has its own clock because the calls between them take variable time (a
    /// libvirt call waits while an incoming migration holds a domain's job; a service probe
    /// waits for its timeout): divided by the time between two reports instead, a VM's CPU
    /// time showed up to 30 CPUs for a 1-vCPU VM in the lab, an overload that was not there.
    pub fn sample_at(
        &mut self,
        now: Instant,
        vms_at: Instant,
        now_ms: u64,
        text: &ProcText,
        vms: &[DomainStats],
        probes: Vec<ProbeResult>,
    ) -> HostReport {
        let vm_secs = self
            .prev_vms_at
            .map(|p| vms_at.saturating_duration_since(p).as_secs_f64())
            .filter(|s| *s > 0.0);
        let secs = self
            .prev_at
            .map(|p| now.saturating_duration_since(p).as_secs_f64())
            .filter(|s| *s > 0.0);
        let (cpu, cpus) = proc::parse_stat(&text.stat).unwrap_or_default();
        // A partition's own busy time, not the machine's: the machine's other partitions are
        // other hosts.
        let cpu_busy = match (&text.cgroup, self.prev_cgroup_ns, self.prev_cpu, secs) {
            (Some(cg), Some(prev), _, Some(secs)) => {
                cg.usage_ns.saturating_sub(prev) as f64 / (secs * 1e9)
            }
            (None, _, Some(prev), Some(_)) => proc::cpu_busy(prev, cpu, cpus),
            _ => 0.0,
        };
        let cpu_capacity = text.cgroup.and_then(|cg| cg.capacity);
        let (mem_total_kib, mem_available_kib) =
            proc::parse_meminfo(&text.meminfo).unwrap_or_default();
        let mut net = Vec::new();
        let mut next_net = HashMap::new();
        for (iface, rx, tx) in proc::parse_net_dev(&text.net_dev) {
            let (rx_bps, tx_bps) = match (self.prev_net.get(&iface), secs) {
                (Some((prx, ptx)), Some(s)) => (
                    rx.saturating_sub(*prx) as f64 * 8.0 / s,
                    tx.saturating_sub(*ptx) as f64 * 8.0 / s,
                ),
                _ => (0.0, 0.0),
            };
            next_net.insert(iface.clone(), (rx, tx));
            net.push(NetUsage {
                iface,
                rx_bytes: rx,
                tx_bytes: tx,
                rx_bps,
                tx_bps,
            });
        }
        // A link's counters restart only with the daemon: a smaller reading is a restart, whose
        // interval counts from zero.
        let mut links = Vec::new();
        let mut next_links = HashMap::new();
        for (peer, bytes) in text.overlay_links.iter().flatten() {
            let (rx_bps, tx_bps) = match (self.prev_links.get(peer), secs) {
                (Some((prx, ptx)), Some(s)) => {
                    let delta = |now: u64, prev: u64| if now >= prev { now - prev } else { now };
                    (
                        delta(bytes.rx, *prx) as f64 * 8.0 / s,
                        delta(bytes.tx, *ptx) as f64 * 8.0 / s,
                    )
                }
                _ => (0.0, 0.0),
            };
            next_links.insert(peer.clone(), (bytes.rx, bytes.tx));
            links.push(LinkUsage {
                peer: peer.clone(),
                rx_bytes: bytes.rx,
                tx_bytes: bytes.tx,
                rx_bps,
                tx_bps,
            });
        }
        let chains = text
            .ebtables
            .as_deref()
            .map(proc::parse_ebtables_drops)
            .unwrap_or_default();
        let mut vm_usage = Vec::new();
        let mut next_vm = HashMap::new();
        for d in vms {
            let s = &d.summary;
            let port_filter_drops = d
                .nics
                .iter()
                .filter_map(|n| proc::port_filter_drops(&chains, &n.tap))
                .reduce(|a, b| a + b);
            if let Some(dropped) = port_filter_drops {
                self.log_drops(&s.name, dropped, vms_at);
            }
            let busy = match (self.prev_vm_cpu.get(&s.uuid), vm_secs) {
                (Some(prev), Some(secs)) => {
                    let rate = s.cpu_time_ns.saturating_sub(*prev) as f64 / (secs * 1e9);
                    // A VM uses at most its vCPUs plus its emulator's thread; more is a
                    // measurement artefact, which a policy would take for an overload (kept
                    // as a bound; the clocks above removed the one cause seen).
                    let most = f64::from(s.vcpus.max(1)) + 1.0;
                    if rate > most {
                        tracing::debug!(vm = %s.name, rate, most, "VM CPU rate above its vCPUs: clamped");
                    }
                    rate.min(most)
                }
                _ => 0.0,
            };
            next_vm.insert(s.uuid.clone(), s.cpu_time_ns);
            vm_usage.push(VmUsage {
                name: s.name.clone(),
                uuid: s.uuid.clone(),
                state: s.state,
                vcpus: s.vcpus,
                max_vcpus: s.max_vcpus,
                cpu_time_ns: s.cpu_time_ns,
                cpu_busy: busy,
                memory_kib: s.memory_kib,
                max_memory_kib: s.max_memory_kib,
                balloon_kib: d.balloon_current_kib,
                rss_kib: d.rss_kib,
                disks: d.disks.clone(),
                nics: d.nics.clone(),
                port_filter_drops,
            });
        }
        self.prev_cpu = Some(cpu);
        self.prev_cgroup_ns = text.cgroup.map(|cg| cg.usage_ns);
        self.prev_net = next_net;
        self.prev_links = next_links;
        self.prev_vm_cpu = next_vm;
        self.prev_at = Some(now);
        self.prev_vms_at = Some(vms_at);
        self.seq += 1;
        HostReport {
            host: self.host.clone(),
            site: self.site.clone(),
            seq: self.seq,
            sent_ms: now_ms,
            usage: HostUsage {
                cpus,
                cpu_capacity,
                cpu_busy,
                mem_total_kib,
                mem_available_kib,
                net,
                links,
            },
            vms: vm_usage,
            probes,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use viola_hypervisor::{DomainState, DomainSummary};

    use super::*;

    /// A VM's CPU use equals `expected` up to rounding.
    fn assert_busy(cpu_busy: f64, expected: f64) {
        assert!((cpu_busy - expected).abs() < 1e-9, "{cpu_busy}");
    }

    fn dom(cpu_time_ns: u64) -> DomainStats {
        DomainStats {
            summary: DomainSummary {
                name: "vm1".into(),
                uuid: "u1".into(),
                state: DomainState::Running,
                persistent: true,
                vcpus: 2,
                max_vcpus: 2,
                memory_kib: 262_144,
                max_memory_kib: 262_144,
                cpu_time_ns,
            },
            balloon_current_kib: Some(200_000),
            rss_kib: None,
            disks: vec![],
            nics: vec![],
        }
    }

    #[test]
    fn link_rates_come_from_the_overlay_s_byte_counts_and_survive_its_restart() {
        let mut s = Sampler::new("a1", "a");
        let t0 = Instant::now();
        let links = |rx: u64, tx: u64| ProcText {
            overlay_links: Some([("b/b1".to_owned(), LinkBytes { tx, rx })].into()),
            ..ProcText::default()
        };
        let first = s.sample_at(t0, t0, 0, &links(1000, 5000), &[], vec![]);
        assert_eq!(first.usage.links[0].tx_bps, 0.0, "no rate from one reading");
        let t1 = t0 + Duration::from_secs(2);
        let r = s.sample_at(t1, t1, 2000, &links(3000, 505_000), &[], vec![]);
        let l = &r.usage.links[0];
        assert_eq!(l.peer, "b/b1");
        assert_eq!((l.rx_bytes, l.tx_bytes), (3000, 505_000));
        assert!((l.tx_bps - 2_000_000.0).abs() < 1.0, "{l:?}");
        assert!((l.rx_bps - 8_000.0).abs() < 1.0, "{l:?}");
        // The daemon restarted: its counters start again from zero.
        let t2 = t1 + Duration::from_secs(1);
        let r = s.sample_at(t2, t2, 3000, &links(100, 1000), &[], vec![]);
        assert!((r.usage.links[0].tx_bps - 8_000.0).abs() < 1.0);
        // Without the overlay's figures, no links.
        let t3 = t2 + Duration::from_secs(1);
        let r = s.sample_at(t3, t3, 4000, &ProcText::default(), &[], vec![]);
        assert!(r.usage.links.is_empty());
    }

    #[test]
    fn vm_cpu_rate_is_in_vcpus_and_seq_increases() {
        let mut s = Sampler::new("a1", "a");
        let t0 = Instant::now();
        let text = ProcText {
            stat: "cpu 1 0 1 10 0 0 0 0\ncpu0 1 0 1 10 0 0 0 0\n".into(),
            meminfo: "MemTotal: 100 kB\nMemAvailable: 50 kB\n".into(),
            net_dev: "h\nh\n eth0: 0 0 0 0 0 0 0 0 0 0\n".into(),
            cgroup: None,
            ebtables: None,
            overlay_links: None,
        };
        let r1 = s.sample(t0, 0, &text, &[dom(0)], vec![]);
        assert_eq!(r1.vms[0].cpu_busy, 0.0);
        // One vCPU busy for 2 s = 2e9 ns of CPU time.
        let r2 = s.sample(
            t0 + Duration::from_secs(2),
            2000,
            &text,
            &[dom(2_000_000_000)],
            vec![],
        );
        assert_busy(r2.vms[0].cpu_busy, 1.0);
        assert_eq!((r1.seq, r2.seq), (1, 2));
        assert_eq!(r2.usage.mem_available_kib, 50);
        assert_eq!(r2.vms[0].balloon_kib, Some(200_000));
    }

    #[test]
    fn a_vm_rate_is_over_the_time_between_its_own_readings() {
        let mut s = Sampler::new("a1", "a");
        let t0 = Instant::now();
        let text = ProcText::default();
        // The first report's host readings came 1.5 s after its VM readings (a slow call in
        // between); the second's both at t0 + 2 s.
        s.sample_at(
            t0 + Duration::from_millis(1500),
            t0,
            0,
            &text,
            &[dom(0)],
            vec![],
        );
        let t2 = t0 + Duration::from_secs(2);
        let r = s.sample_at(t2, t2, 2000, &text, &[dom(800_000_000)], vec![]);
        // 0.8 s of CPU over the VMs' own 2 s: 0.4 (not 1.6 over the host readings' 0.5 s).
        assert_busy(r.vms[0].cpu_busy, 0.4);
    }

    #[test]
    fn a_vms_port_filter_drops_are_its_ports_and_absent_without_a_filter() {
        let mut s = Sampler::new("a1", "a");
        let t0 = Instant::now();
        let text = ProcText {
            ebtables: Some(
                "Bridge chain: libvirt-I-vnet3, entries: 2, policy: ACCEPT\n\
                 -j I-vnet3-mac , pcnt = 9 -- bcnt = 600\n\
                 -j DROP , pcnt = 1 -- bcnt = 60\n\
                 Bridge chain: I-vnet3-mac, entries: 2, policy: ACCEPT\n\
                 -j DROP , pcnt = 40 -- bcnt = 2400\n"
                    .into(),
            ),
            ..ProcText::default()
        };
        let nic = |tap: &str| viola_api::domain::NicCounters {
            tap: tap.into(),
            mac: "52:54:00:0a:00:01".into(),
            rx_bytes: 0,
            tx_bytes: 0,
            rx_packets: 0,
            tx_packets: 0,
        };
        let mut filtered = dom(0);
        filtered.nics = vec![nic("vnet3")];
        let mut open = dom(0);
        open.summary.name = "vm2".into();
        open.summary.uuid = "u2".into();
        open.nics = vec![nic("vnet4")];
        let r = s.sample(t0, 0, &text, &[filtered, open], vec![]);
        assert_eq!(r.vms[0].port_filter_drops, Some(41));
        assert_eq!(r.vms[1].port_filter_drops, None);
    }

    #[test]
    fn a_vm_rate_above_its_vcpus_is_clamped() {
        let mut s = Sampler::new("a1", "a");
        let t0 = Instant::now();
        let text = ProcText::default();
        s.sample(t0, 0, &text, &[dom(0)], vec![]);
        // 30 s of CPU time in 1 s for a 2-vCPU VM (see `sample`): two vCPUs and the emulator.
        let r = s.sample(
            t0 + Duration::from_secs(1),
            1000,
            &text,
            &[dom(30_000_000_000)],
            vec![],
        );
        assert_eq!(r.vms[0].vcpus, 2);
        assert_busy(r.vms[0].cpu_busy, 3.0);
    }

    #[test]
    fn a_partition_reports_its_quota_and_its_own_busy_time() {
        let mut s = Sampler::new("a1", "a");
        let t0 = Instant::now();
        // The machine: two CPUs, both fully busy (other partitions' work).
        let mut text = ProcText {
            stat: "cpu 0 0 0 0 0 0 0 0\ncpu0 0\ncpu1 0\n".into(),
            cgroup: Some(CgroupSample {
                capacity: Some(0.5),
                usage_ns: 1_000_000_000,
            }),
            ..ProcText::default()
        };
        let first = s.sample(t0, 0, &text, &[], vec![]);
        assert_eq!(first.usage.cpu_capacity, Some(0.5));
        assert_eq!(first.usage.cpu_busy, 0.0);
        text.stat = "cpu 400 0 0 0 0 0 0 0\ncpu0 0\ncpu1 0\n".into();
        // The partition used 0.8 s of CPU in 2 s: 0.4 CPUs, not the machine's 2.
        text.cgroup = Some(CgroupSample {
            capacity: Some(0.5),
            usage_ns: 1_800_000_000,
        });
        let second = s.sample(t0 + Duration::from_secs(2), 2000, &text, &[], vec![]);
        assert!(
            (second.usage.cpu_busy - 0.4).abs() < 1e-9,
            "{:?}",
            second.usage
        );
        assert_eq!(second.usage.cpus, 2);
    }
}
