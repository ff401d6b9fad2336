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
    }
}
