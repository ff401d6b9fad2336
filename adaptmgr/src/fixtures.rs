//! Fixtures shared by this crate's unit tests.

use std::sync::Arc;

use viola_api::adaptation::{ActionOutcome, ActionRecord, DecisionRecord, PolicyMode};
use viola_api::manager::{HostReport, HostUsage};
use viola_hypervisor::fake::{FakeCluster, sample_domain_xml};
use viola_hypervisor::{DomainState, Hypervisor};

use crate::inventory::Inventory;
use crate::manager::{HostConfig, Manager, ManagerConfig, ViolinConfig};
use crate::policy_loop::config::PolicyConfig;

/// A decision of the viola policy in act mode, at `ts_ms`, to move vm1 from a1 to a2 in the
/// first stage (the log numbers it: `seq` 0).
pub fn decision_to_move_vm1(ts_ms: u64, reason: &str, outcome: ActionOutcome) -> DecisionRecord {
    DecisionRecord {
        seq: 0,
        ts_ms,
        policy: "viola".into(),
        mode: PolicyMode::Act,
        state: Default::default(),
        actions: vec![ActionRecord::migration(
            Some("vm1".into()),
            Some("a1".into()),
            Some("a2".into()),
            reason.into(),
            Some(0),
            outcome,
        )],
    }
}

/// A host on the fake hypervisor (`fake://NAME`) with no overlay daemon.
pub fn fake_host(name: &str, site: &str) -> HostConfig {
    HostConfig {
        name: name.into(),
        site: site.into(),
        libvirt_uri: format!("fake://{name}"),
        migration_uri: None,
        migration_tls_name: None,
        images_local: None,
        overlay_addr: None,
        depot_agent: None,
    }
}

/// A running VM as a monitor reports it: one vCPU (of at most `max_vcpus`), `memory_kib`,
/// `cpu_busy` vCPUs' worth of CPU use.
pub fn running_vm(
    name: &str,
    max_vcpus: u32,
    memory_kib: u64,
    cpu_busy: f64,
) -> viola_api::manager::VmUsage {
    viola_api::manager::VmUsage {
        name: name.into(),
        uuid: format!("uuid-{name}"),
        state: DomainState::Running,
        vcpus: 1,
        max_vcpus,
        cpu_time_ns: 0,
        cpu_busy,
        memory_kib,
        max_memory_kib: memory_kib,
        balloon_kib: None,
        rss_kib: None,
        disks: vec![],
        nics: vec![],
        port_filter_drops: None,
    }
}

/// Fake hosts a1, b1 and a2, each with the base; vm1 runs on a1 from its overlay.
pub fn federation_with_vm1_on_a1() -> (FakeCluster, viola_hypervisor::fake::FakeHypervisor) {
    let cluster = FakeCluster::new();
    let a1 = cluster.host("fake://a1");
    cluster.host("fake://b1");
    cluster.host("fake://a2");
    for h in ["fake://a1", "fake://b1", "fake://a2"] {
        cluster.add_image(h, "/img/base.qcow2", 1 << 30, None);
    }
    cluster.add_image(
        "fake://a1",
        "/img/vm1.qcow2",
        1 << 30,
        Some("/img/base.qcow2"),
    );
    Hypervisor::define(
        &a1,
        &sample_domain_xml(
            "vm1",
            "/img/vm1.qcow2",
            "/img/base.qcow2",
            "52:54:00:00:00:01",
        ),
    )
    .unwrap();
    Hypervisor::start(&a1, "vm1").unwrap();
    (cluster, a1)
}

/// A monitor's report of `host` (site: its first letter; 8 CPUs, 16 GiB with 8 free) with
/// `vms` running (256 MiB, idle).
pub fn host_report(host: &str, seq: u64, vms: &[&str]) -> HostReport {
    HostReport {
        host: host.into(),
        site: host[..1].into(),
        seq,
        sent_ms: 0,
        usage: HostUsage {
            cpus: 8,
            cpu_capacity: None,
            cpu_busy: 0.1,
            mem_total_kib: 16 << 20,
            mem_available_kib: 8 << 20,
            net: vec![],
            links: vec![],
        },
        vms: vms
            .iter()
            .map(|name| running_vm(name, 2, 262_144, 0.0))
            .collect(),
        probes: vec![],
    }
}

const BASE: &str = "/img/base.qcow2";

/// A federation of fake hosts `(name, site)`, every one with the base image, and VMs
/// `(name, host)` running from overlays on it, all in violin "lan".
pub struct Federation {
    pub cluster: FakeCluster,
    pub manager: Arc<Manager>,
    pub hosts: Vec<(String, String)>,
    /// Report sequence number per host (the next one to send).
    pub seq: u64,
    _dir: tempfile::TempDir,
}

impl Federation {
    pub fn new(hosts: &[(&str, &str)], vms: &[(&str, &str)], policy: PolicyConfig) -> Self {
        Self::with(hosts, vms, policy, |_| {})
    }

    /// [`Self::new`] with `tweak` applied to the manager's configuration.
    pub fn with(
        hosts: &[(&str, &str)],
        vms: &[(&str, &str)],
        policy: PolicyConfig,
        tweak: impl FnOnce(&mut ManagerConfig),
    ) -> Self {
        let cluster = FakeCluster::new();
        for (h, _) in hosts {
            cluster.host(&format!("fake://{h}"));
            cluster.add_image(&format!("fake://{h}"), BASE, 1 << 30, None);
        }
        for (i, (vm, h)) in vms.iter().enumerate() {
            let uri = format!("fake://{h}");
            let overlay = format!("/img/{vm}.qcow2");
            cluster.add_image(&uri, &overlay, 1 << 30, Some(BASE));
            let hv = cluster.host(&uri);
            hv.define(&sample_domain_xml(
                vm,
                &overlay,
                BASE,
                &format!("52:54:00:00:00:{:02x}", i + 1),
            ))
            .unwrap();
            hv.start(vm).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = ManagerConfig {
            hosts: hosts
                .iter()
                .map(|(h, site)| HostConfig {
                    name: (*h).into(),
                    site: (*site).into(),
                    libvirt_uri: format!("fake://{h}"),
                    migration_uri: None,
                    migration_tls_name: None,
                    images_local: None,
                    // No overlay daemons: the move is not announced (the announcer's own tests
                    // cover that); the VM must still be in a violin.
                    overlay_addr: None,
                    depot_agent: None,
                })
                .collect(),
            violins: vec![ViolinConfig {
                name: "lan".into(),
                id: 42,
                vms: vms.iter().map(|(v, _)| (*v).to_owned()).collect(),
            }],
            identity_dir: dir.path().join("no-identity"),
            policy,
            ..ManagerConfig::default()
        };
        let mut cfg = cfg;
        tweak(&mut cfg);
        let inventory = Arc::new(Inventory::open(&dir.path().join("inv.redb")).unwrap());
        let manager = Arc::new(Manager::new(cfg, inventory, Arc::new(cluster.clone())).unwrap());
        Self {
            cluster,
            manager,
            hosts: hosts
                .iter()
                .map(|(h, s)| ((*h).to_owned(), (*s).to_owned()))
                .collect(),
            seq: 1,
            _dir: dir,
        }
    }

    /// What each host's monitor would report, with `busy(vm)` as each VM's CPU use.
    pub fn reports(&mut self, busy: &dyn Fn(&str) -> f64) -> Vec<HostReport> {
        let seq = self.seq;
        self.seq += 1;
        self.hosts
            .iter()
            .map(|(h, site)| {
                let hv = self.cluster.host(&format!("fake://{h}"));
                let vms = hv
                    .list_domains()
                    .unwrap()
                    .into_iter()
                    .filter(|d| d.state == DomainState::Running)
                    .map(|d| running_vm(&d.name, 1, 512 << 10, busy(&d.name)))
                    .collect();
                HostReport {
                    host: h.clone(),
                    site: site.clone(),
                    seq,
                    sent_ms: 0,
                    usage: HostUsage {
                        cpus: 2,
                        cpu_capacity: None,
                        cpu_busy: 0.0,
                        mem_total_kib: 4 << 20,
                        mem_available_kib: 2 << 20,
                        net: vec![],
                        links: vec![],
                    },
                    vms,
                    probes: vec![],
                }
            })
            .collect()
    }

    /// Every monitor reports through the manager's front door (as over QUIC).
    pub async fn report(&mut self, busy: &dyn Fn(&str) -> f64) {
        for r in self.reports(busy) {
            self.manager.handle_report(r).await.unwrap();
        }
    }

    pub fn running(&self, vm: &str) -> Vec<String> {
        self.cluster.hosts_running(vm)
    }

    pub fn decisions(&self) -> Vec<DecisionRecord> {
        self.manager
            .inventory
            .decisions_after(0, usize::MAX)
            .unwrap()
    }
}
