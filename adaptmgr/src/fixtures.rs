//! Fixtures shared by this crate's unit tests.

use viola_api::adaptation::{ActionOutcome, ActionRecord, DecisionRecord, PolicyMode};

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
pub fn fake_host(name: &str, site: &str) -> crate::manager::HostConfig {
    crate::manager::HostConfig {
        name: name.into(),
        site: site.into(),
        libvirt_uri: format!("fake://{name}"),
        migration_uri: None,
        migration_tls_name: None,
        images_local: None,
        overlay_addr: None,
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
        state: viola_api::domain::DomainState::Running,
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
pub fn federation_with_vm1_on_a1() -> (
    viola_hypervisor::fake::FakeCluster,
    viola_hypervisor::fake::FakeHypervisor,
) {
    let cluster = viola_hypervisor::fake::FakeCluster::new();
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
    viola_hypervisor::Hypervisor::define(
        &a1,
        &viola_hypervisor::fake::sample_domain_xml(
            "vm1",
            "/img/vm1.qcow2",
            "/img/base.qcow2",
            "52:54:00:00:00:01",
        ),
    )
    .unwrap();
    viola_hypervisor::Hypervisor::start(&a1, "vm1").unwrap();
    (cluster, a1)
}

/// A monitor's report of `host` (site: its first letter; 8 CPUs, 16 GiB with 8 free) with
/// `vms` running (256 MiB, idle).
pub fn host_report(host: &str, seq: u64, vms: &[&str]) -> viola_api::manager::HostReport {
    viola_api::manager::HostReport {
        host: host.into(),
        site: host[..1].into(),
        seq,
        sent_ms: 0,
        usage: viola_api::manager::HostUsage {
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
