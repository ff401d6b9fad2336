//! The monitor's loop: every interval read /proc and libvirt, run probes, push one report to
//! the manager (the report is the heartbeat), update the Prometheus gauges.
//!
//! A failed push is logged and counted; the next interval tries again with a fresh connection.
//! Reports are never queued: the next one carries newer figures anyway.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use viola_api::client::Client;
use viola_api::manager::{HostReport, Request, Response};
use viola_common::identity::Identity;
use viola_hypervisor::{Connector, Hypervisor, blocking};

use crate::probe::{ProbeConfig, run_probe};
use crate::proc;
use crate::sampler::{CgroupSample, ProcText, Sampler};

/// `viola-monitor` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    pub host: String,
    pub site: String,
    /// The manager's endpoint.
    pub manager: SocketAddr,
    /// The other managers of a replicated manager (its `[replication]`): only the leader
    /// answers, so reports go to the first of `manager` and these that does.
    pub manager_replicas: Vec<SocketAddr>,
    pub identity_dir: PathBuf,
    pub libvirt_uri: String,
    pub interval_ms: u64,
    pub metrics_listen: SocketAddr,
    /// Where /proc is (a test can point this at captured files).
    pub proc_root: PathBuf,
    /// When the host is a partition of a bigger machine: its cgroup directories (cgroup v1:
    /// the cpu and cpuacct hierarchies' ones; v2: its one directory). The host's capacity is
    /// then the cgroup's CPU quota and its busy time the cgroup's CPU time.
    pub cgroup_dirs: Vec<PathBuf>,
    pub probes: Vec<ProbeConfig>,
    /// The host's overlay daemon's control socket (its `control_socket`): each report then
    /// carries the bytes and rates of the host's overlay links, per peer.
    pub overlay_socket: Option<PathBuf>,
    /// Serve the shepherd channels of the host's VMs (`crate::guest_channel`).
    pub guest_channels: bool,
    /// Where the host's `/var/lib/libvirt` and `/run/libvirt` are as this monitor sees them
    /// (libvirt puts the channels' sockets in one of them, by version); other paths only when
    /// the monitor runs outside the host's mount namespace, as in the lab.
    pub libvirt_state_dir: PathBuf,
    pub libvirt_run_dir: PathBuf,
}

/// How long a manager gets to answer a connection before the next one is tried.
pub const MANAGER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

impl MonitorConfig {
    /// Every manager address, `manager` first.
    pub fn managers(&self) -> Vec<SocketAddr> {
        std::iter::once(self.manager)
            .chain(self.manager_replicas.iter().copied())
            .collect()
    }
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            host: String::new(),
            site: String::new(),
            manager: SocketAddr::from(([127, 0, 0, 1], 7443)),
            manager_replicas: Vec::new(),
            identity_dir: PathBuf::from("/etc/viola/monitor"),
            libvirt_uri: "qemu:///system".into(),
            interval_ms: 1000,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9444)),
            proc_root: PathBuf::from("/proc"),
            cgroup_dirs: Vec::new(),
            probes: Vec::new(),
            overlay_socket: None,
            guest_channels: true,
            libvirt_state_dir: PathBuf::from("/var/lib/libvirt"),
            libvirt_run_dir: PathBuf::from("/run/libvirt"),
        }
    }
}

type VmLabels = Vec<(String, String)>;

/// The monitor's Prometheus metrics.
#[derive(Default)]
pub struct MonitorMetrics {
    pub reports_sent: Counter,
    pub push_failures: Counter,
    pub host_cpu_busy: Gauge<f64, AtomicU64>,
    pub host_mem_available_kib: Gauge,
    pub vm_cpu_busy: Family<VmLabels, Gauge<f64, AtomicU64>>,
    pub vm_memory_kib: Family<VmLabels, Gauge>,
    pub vm_vcpus: Family<VmLabels, Gauge>,
    pub probe_latency_ms: Family<VmLabels, Gauge<f64, AtomicU64>>,
    pub probe_ok: Family<VmLabels, Gauge>,
    pub vm_port_filter_drops: Family<VmLabels, Gauge>,
    pub guest_requests: crate::guest_channel::GuestRequestCounts,
}

impl MonitorMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "viola_monitor_reports_sent",
            "Reports delivered to the manager",
            self.reports_sent.clone(),
        );
        r.register(
            "viola_monitor_push_failures",
            "Reports the manager did not get",
            self.push_failures.clone(),
        );
        r.register(
            "viola_monitor_host_cpu_busy",
            "Host CPUs busy (CPUs)",
            self.host_cpu_busy.clone(),
        );
        r.register(
            "viola_monitor_host_mem_available_kib",
            "Host memory available",
            self.host_mem_available_kib.clone(),
        );
        r.register(
            "viola_monitor_vm_cpu_busy",
            "VM CPU use (vCPUs busy)",
            self.vm_cpu_busy.clone(),
        );
        r.register(
            "viola_monitor_vm_memory_kib",
            "VM memory (balloon)",
            self.vm_memory_kib.clone(),
        );
        r.register(
            "viola_monitor_vm_vcpus",
            "VM vCPUs online",
            self.vm_vcpus.clone(),
        );
        r.register(
            "viola_monitor_probe_latency_ms",
            "Service probe latency",
            self.probe_latency_ms.clone(),
        );
        r.register(
            "viola_monitor_probe_ok",
            "Service probe success (1/0)",
            self.probe_ok.clone(),
        );
        r.register(
            "viola_monitor_vm_port_filter_drops",
            "Frames the host's bridge dropped from the VM so far (its nwfilter: another MAC or address than its own, or a protocol the filter refuses)",
            self.vm_port_filter_drops.clone(),
        );
        r.register(
            "viola_monitor_guest_requests",
            "Requests read from the VMs' shepherd channels, by outcome",
            self.guest_requests.clone(),
        );
    }

    fn observe(&self, report: &HostReport) {
        self.host_cpu_busy.set(report.usage.cpu_busy);
        self.host_mem_available_kib
            .set(report.usage.mem_available_kib as i64);
        self.vm_cpu_busy.clear();
        self.vm_memory_kib.clear();
        self.vm_vcpus.clear();
        self.vm_port_filter_drops.clear();
        for vm in &report.vms {
            let l = vec![("vm".to_owned(), vm.name.clone())];
            self.vm_cpu_busy.get_or_create(&l).set(vm.cpu_busy);
            self.vm_memory_kib
                .get_or_create(&l)
                .set(vm.balloon_kib.unwrap_or(vm.memory_kib) as i64);
            self.vm_vcpus.get_or_create(&l).set(i64::from(vm.vcpus));
            if let Some(dropped) = vm.port_filter_drops {
                self.vm_port_filter_drops
                    .get_or_create(&l)
                    .set(i64::try_from(dropped).unwrap_or(i64::MAX));
            }
        }
        for p in &report.probes {
            let l = vec![("probe".to_owned(), p.name.clone())];
            self.probe_ok.get_or_create(&l).set(i64::from(p.ok));
            if let Some(ms) = p.latency_ms {
                self.probe_latency_ms.get_or_create(&l).set(ms);
            }
        }
    }
}

/// Reads the three /proc files the sampler needs.
pub fn read_proc(root: &std::path::Path) -> std::io::Result<ProcText> {
    Ok(ProcText {
        stat: std::fs::read_to_string(root.join("stat"))?,
        meminfo: std::fs::read_to_string(root.join("meminfo"))?,
        net_dev: std::fs::read_to_string(root.join("net/dev"))?,
        cgroup: None,
        ebtables: None,
        overlay_links: None,
    })
}

/// Why a host's cgroup could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CgroupReadError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: proc::CgroupParseError,
    },
    #[error("no CPU quota file (cpu.cfs_quota_us or cpu.max) in {0:?}")]
    NoQuota(Vec<PathBuf>),
    #[error("no CPU time file (cpuacct.usage or cpu.stat with usage_usec) in {0:?}")]
    NoUsage(Vec<PathBuf>),
}

/// Reads a partition's CPU quota and CPU time from its cgroup directories.
pub fn read_cgroup(dirs: &[PathBuf]) -> Result<CgroupSample, CgroupReadError> {
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path)
            .map_err(|source| CgroupReadError::Read {
                path: path.clone(),
                source,
            })
            .map(|text| (path, text))
    };
    let parse = |path: PathBuf| move |source| CgroupReadError::Parse { path, source };
    let mut capacity = None;
    let mut usage_ns = None;
    for dir in dirs {
        if capacity.is_none() && dir.join("cpu.cfs_quota_us").exists() {
            let (_, quota) = read(dir.join("cpu.cfs_quota_us"))?;
            let (path, period) = read(dir.join("cpu.cfs_period_us"))?;
            capacity = Some(proc::parse_cfs_quota(&quota, &period).map_err(parse(path))?);
        } else if capacity.is_none() && dir.join("cpu.max").exists() {
            let (path, text) = read(dir.join("cpu.max"))?;
            capacity = Some(proc::parse_cpu_max(&text).map_err(parse(path))?);
        }
        if dir.join("cpuacct.usage").exists() {
            let (path, text) = read(dir.join("cpuacct.usage"))?;
            usage_ns = Some(proc::parse_cpuacct_usage(&text).map_err(parse(path))?);
        } else if usage_ns.is_none() && dir.join("cpu.stat").exists() {
            // cgroup v1's cpu.stat has only throttling figures: not an error, just not this.
            let (_, text) = read(dir.join("cpu.stat"))?;
            usage_ns = proc::parse_cpu_stat_usage(&text).ok();
        }
    }
    Ok(CgroupSample {
        capacity: capacity.ok_or_else(|| CgroupReadError::NoQuota(dirs.to_vec()))?,
        usage_ns: usage_ns.ok_or_else(|| CgroupReadError::NoUsage(dirs.to_vec()))?,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every running VM's statistics, with their CPU times all read at the returned instant: by
/// one quick pass over the domains' summaries before the slow one (block, interface and
/// balloon statistics wait while a migration holds a domain's job), whose own CPU times are
/// replaced. Divided by the wrong interval, a CPU time read early in a slow call made a VM
/// capped at 40 % look like two busy CPUs in the demo.
fn stats_on_one_clock(
    h: &dyn Hypervisor,
) -> Result<(Vec<viola_hypervisor::DomainStats>, Instant), viola_hypervisor::HypervisorError> {
    let summaries = h.list_domains()?;
    let at = Instant::now();
    let mut stats = h.stats()?;
    for s in &mut stats {
        if let Some(quick) = summaries.iter().find(|q| q.uuid == s.summary.uuid) {
            s.summary.cpu_time_ns = quick.cpu_time_ns;
        }
    }
    Ok((stats, at))
}

/// The nat table of the host's ebtables, where libvirt's nwfilter keeps the VMs' port
/// filters; `None` (logged once) where ebtables is missing or refuses.
fn read_ebtables() -> Option<String> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let out = std::process::Command::new("ebtables")
        .args(["--concurrent", "-t", "nat", "-L", "--Lc"])
        .output();
    match out {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => {
            WARNED.call_once(|| {
                tracing::warn!(stderr = %String::from_utf8_lossy(&o.stderr).trim(),
                    "ebtables failed: the VMs' port-filter drops are not reported")
            });
            None
        }
        Err(e) => {
            WARNED.call_once(|| {
                tracing::warn!(error = %e, "cannot run ebtables: the VMs' port-filter drops are not reported")
            });
            None
        }
    }
}

/// The overlay daemon's bytes per peer link, or `None` (logged once per outage) when it does not
/// answer: the report then has no links rather than zero rates.
async fn overlay_links(
    socket: &std::path::Path,
) -> Option<std::collections::BTreeMap<String, viola_api::overlay::LinkBytes>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use viola_api::overlay::{ControlReply, ControlRequest, request_unix};
    static DOWN: AtomicBool = AtomicBool::new(false);
    match request_unix(socket, &ControlRequest::Status).await {
        Ok(ControlReply::Status(status)) => {
            if DOWN.swap(false, Ordering::Relaxed) {
                tracing::info!(socket = %socket.display(), "overlay daemon answers again");
            }
            Some(status.link_bytes)
        }
        Ok(other) => {
            if !DOWN.swap(true, Ordering::Relaxed) {
                tracing::warn!(socket = %socket.display(), ?other, "overlay daemon gave no status: no link figures");
            }
            None
        }
        Err(e) => {
            if !DOWN.swap(true, Ordering::Relaxed) {
                tracing::warn!(socket = %socket.display(), error = %viola_common::errors::chain(&e), "overlay daemon unreachable: no link figures");
            }
            None
        }
    }
}

/// Collects one report (no push). A libvirt connection whose statistics call fails is
/// dropped (set to `None`), so the caller reopens it: a libvirtd restart invalidates it.
pub async fn collect(
    cfg: &MonitorConfig,
    sampler: &mut Sampler,
    hv: &mut Option<Arc<dyn Hypervisor>>,
) -> HostReport {
    let overlay_links = match &cfg.overlay_socket {
        Some(socket) => overlay_links(socket).await,
        None => None,
    };
    let root = cfg.proc_root.clone();
    let cgroup_dirs = cfg.cgroup_dirs.clone();
    let mut text = tokio::task::spawn_blocking(move || {
        let mut text: ProcText = read_proc(&root)
            .map_err(|e| tracing::warn!(error = %e, "cannot read /proc"))
            .unwrap_or_default();
        if !cgroup_dirs.is_empty() {
            text.cgroup = read_cgroup(&cgroup_dirs)
                .map_err(|e| {
                    tracing::warn!(error = %viola_common::errors::chain(&e), "cannot read the host's cgroup")
                })
                .ok();
        }
        text
    })
    .await
    .unwrap_or_default();
    text.overlay_links = overlay_links;
    let read_at = Instant::now();
    let (vms, vms_at) = match hv.as_ref() {
        Some(h) => match blocking(h, stats_on_one_clock).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %viola_common::errors::chain(&e), "libvirt stats failed");
                *hv = None;
                (Vec::new(), Instant::now())
            }
        },
        None => (Vec::new(), Instant::now()),
    };
    if vms.iter().any(|v| !v.nics.is_empty()) {
        text.ebtables = tokio::task::spawn_blocking(read_ebtables)
            .await
            .ok()
            .flatten();
    }
    let mut probes = Vec::with_capacity(cfg.probes.len());
    for p in &cfg.probes {
        probes.push(run_probe(p).await);
    }
    sampler.sample_at(read_at, vms_at, now_ms(), &text, &vms, probes)
}

/// Runs until `token` is cancelled: the reports, and the guests' shepherd channels.
pub async fn run(
    cfg: MonitorConfig,
    identity: Identity,
    connector: Arc<dyn Connector>,
    metrics: Arc<MonitorMetrics>,
    token: CancellationToken,
) {
    let channels = async {
        if cfg.guest_channels {
            let channel_cfg = crate::guest_channel::ChannelConfig {
                host: cfg.host.clone(),
                site: cfg.site.clone(),
                managers: cfg.managers(),
                libvirt_uri: cfg.libvirt_uri.clone(),
                libvirt_state_dir: cfg.libvirt_state_dir.clone(),
                libvirt_run_dir: cfg.libvirt_run_dir.clone(),
            };
            crate::guest_channel::run(
                channel_cfg,
                identity.clone(),
                Arc::clone(&connector),
                metrics.guest_requests.clone(),
                token.clone(),
            )
            .await;
        }
    };
    let reports = report_loop(
        cfg.clone(),
        identity.clone(),
        Arc::clone(&connector),
        Arc::clone(&metrics),
        token.clone(),
    );
    tokio::join!(reports, channels);
}

async fn report_loop(
    cfg: MonitorConfig,
    identity: Identity,
    connector: Arc<dyn Connector>,
    metrics: Arc<MonitorMetrics>,
    token: CancellationToken,
) {
    let mut sampler = Sampler::new(&cfg.host, &cfg.site);
    let mut hv: Option<Arc<dyn Hypervisor>> = None;
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms.max(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            _ = tick.tick() => {}
        }
        if hv.is_none() {
            let c = Arc::clone(&connector);
            let uri = cfg.libvirt_uri.clone();
            match tokio::task::spawn_blocking(move || c.open(&uri)).await {
                Ok(Ok(h)) => hv = Some(h),
                Ok(Err(e)) => {
                    tracing::warn!(error = %viola_common::errors::chain(&e), "libvirt unreachable")
                }
                Err(e) => tracing::warn!(error = %e, "libvirt connect task failed"),
            }
        }
        let report = collect(&cfg, &mut sampler, &mut hv).await;
        metrics.observe(&report);
        if client.is_none() {
            match Client::connect_first(&identity, &cfg.managers(), MANAGER_CONNECT_TIMEOUT).await {
                Ok((c, addr)) => {
                    tracing::info!(manager = %addr, "reporting to the manager");
                    client = Some(c);
                }
                Err(e) => {
                    tracing::warn!(error = %viola_common::errors::chain(&e), "manager unreachable")
                }
            }
        }
        let Some(c) = client.as_ref() else {
            metrics.push_failures.inc();
            continue;
        };
        let pushed = tokio::time::timeout(
            Duration::from_secs(5),
            c.call(&Request::Report(report), |_| {}),
        )
        .await;
        match pushed {
            Ok(Ok(Response::Ack)) => {
                metrics.reports_sent.inc();
            }
            Ok(Ok(other)) => {
                metrics.push_failures.inc();
                tracing::warn!(?other, "manager refused the report");
            }
            Ok(Err(e)) => {
                metrics.push_failures.inc();
                tracing::warn!(error = %viola_common::errors::chain(&e), "push failed");
                client = None;
            }
            Err(_) => {
                metrics.push_failures.inc();
                tracing::warn!("push timed out");
                client = None;
            }
        }
    }
    if let Some(c) = client {
        c.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn cgroup_v1_hierarchies_and_v2_directory_are_read() {
        let tmp = tempfile::tempdir().unwrap();
        let (cpu, cpuacct, unified) = (
            tmp.path().join("cpu"),
            tmp.path().join("cpuacct"),
            tmp.path().join("v2"),
        );
        for d in [&cpu, &cpuacct, &unified] {
            std::fs::create_dir(d).unwrap();
        }
        write(&cpu, "cpu.cfs_quota_us", "50000\n");
        write(&cpu, "cpu.cfs_period_us", "100000\n");
        write(
            &cpu,
            "cpu.stat",
            "nr_periods 3\nnr_throttled 1\nthrottled_time 5\n",
        );
        write(&cpuacct, "cpuacct.usage", "7000\n");
        let v1 = read_cgroup(&[cpu.clone(), cpuacct.clone()]).unwrap();
        assert_eq!(
            v1,
            CgroupSample {
                capacity: Some(0.5),
                usage_ns: 7000
            }
        );
        write(&unified, "cpu.max", "max 100000\n");
        write(&unified, "cpu.stat", "usage_usec 3\nuser_usec 2\n");
        let v2 = read_cgroup(std::slice::from_ref(&unified)).unwrap();
        assert_eq!(
            v2,
            CgroupSample {
                capacity: None,
                usage_ns: 3000
            }
        );
        // The cpu hierarchy alone has a quota but no CPU time; a broken quota is named.
        let err = read_cgroup(std::slice::from_ref(&cpu)).unwrap_err();
        assert!(matches!(err, CgroupReadError::NoUsage(_)), "{err}");
        write(&cpu, "cpu.cfs_quota_us", "half\n");
        let err = read_cgroup(&[cpu.clone(), cpuacct]).unwrap_err();
        assert!(
            viola_common::errors::chain(&err).contains("half"),
            "{}",
            viola_common::errors::chain(&err)
        );
        let err = read_cgroup(&[tmp.path().join("missing")]).unwrap_err();
        assert!(matches!(err, CgroupReadError::NoQuota(_)), "{err}");
    }
}
