//! Host failure: a host whose heartbeats stop for `timeout` is declared failed and its VMs are
//! re-instantiated on other hosts from their images (the seeds' high-availability behaviour).
//!
//! [`FailureDetector`] and [`plan_restarts`] are pure (time passed in); [`restart_vm`] does the
//! I/O. A restarted VM gets a fresh copy-on-write overlay over its base at the new host: what
//! it had written on the failed host's local disk is lost with that host, as in the seeds.
//! When a failed host returns, the copies it still has of VMs that now run elsewhere are
//! destroyed and undefined ([`fence_returned_host`]), so exactly one copy runs.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::inventory::{HostRecord, HostState, VmRecord};
use crate::migration::BaseStager;
use crate::migration::stage::StageJob;
use viola_hypervisor::{Connector, DomainState, Host, HypervisorError, xml};

/// Liveness changes the detector reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostEvent {
    Failed { host: String, last_seen_ms: u64 },
    Recovered { host: String, down_ms: u64 },
}

#[derive(Debug, Clone)]
struct Liveness {
    last_seen_ms: u64,
    failed_since_ms: Option<u64>,
}

/// Declares hosts failed after `timeout_ms` without a heartbeat.
#[derive(Debug, Clone)]
pub struct FailureDetector {
    timeout_ms: u64,
    hosts: BTreeMap<String, Liveness>,
}

impl FailureDetector {
    pub fn new(timeout_ms: u64) -> Self {
        Self {
            timeout_ms,
            hosts: BTreeMap::new(),
        }
    }

    /// Starts watching `host` as if it had just been seen (a restarted manager gives every
    /// known host a full timeout before declaring it failed).
    pub fn watch(&mut self, host: &str, now_ms: u64, already_failed: bool) {
        self.hosts.entry(host.to_owned()).or_insert(Liveness {
            last_seen_ms: now_ms,
            failed_since_ms: already_failed.then_some(now_ms),
        });
    }

    /// A heartbeat from `host`; reports a recovery if it was failed.
    pub fn heartbeat(&mut self, host: &str, now_ms: u64) -> Option<HostEvent> {
        let l = self.hosts.entry(host.to_owned()).or_insert(Liveness {
            last_seen_ms: now_ms,
            failed_since_ms: None,
        });
        l.last_seen_ms = l.last_seen_ms.max(now_ms);
        l.failed_since_ms.take().map(|since| HostEvent::Recovered {
            host: host.to_owned(),
            down_ms: now_ms.saturating_sub(since),
        })
    }

    /// Hosts that have just crossed the timeout.
    pub fn poll(&mut self, now_ms: u64) -> Vec<HostEvent> {
        let mut out = Vec::new();
        for (host, l) in &mut self.hosts {
            if l.failed_since_ms.is_none()
                && now_ms.saturating_sub(l.last_seen_ms) >= self.timeout_ms
            {
                l.failed_since_ms = Some(now_ms);
                out.push(HostEvent::Failed {
                    host: host.clone(),
                    last_seen_ms: l.last_seen_ms,
                });
            }
        }
        out
    }

    /// When the next host would time out (for the driver's timer).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.hosts
            .values()
            .filter(|l| l.failed_since_ms.is_none())
            .map(|l| l.last_seen_ms + self.timeout_ms)
            .min()
    }
}

/// Where a VM of a failed host goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    pub vm: String,
    pub to_host: String,
}

/// Places the VMs of `failed` on the hosts that are up: biggest VMs first, each on the host
/// with the most free memory that fits it (room for growth), preferring the failed host's
/// site. Returns the placements and the VMs that fit nowhere.
pub fn plan_restarts(
    failed: &str,
    hosts: &[HostRecord],
    vms: &[VmRecord],
) -> (Vec<Restart>, Vec<String>) {
    let failed_site = hosts
        .iter()
        .find(|h| h.name == failed)
        .map(|h| h.site.clone());
    let mut free: BTreeMap<&str, (i64, i64, &str)> = hosts
        .iter()
        .filter(|h| h.name != failed && h.state == HostState::Up)
        .map(|h| {
            (
                h.name.as_str(),
                (h.memory_kib as i64, i64::from(h.cpus) * 4, h.site.as_str()),
            )
        })
        .collect();
    for vm in vms.iter().filter(|v| v.host != failed) {
        if let Some(f) = free.get_mut(vm.host.as_str())
            && matches!(vm.state, DomainState::Running | DomainState::Paused)
        {
            f.0 -= vm.memory_kib as i64;
            f.1 -= i64::from(vm.vcpus);
        }
    }
    let mut victims: Vec<&VmRecord> = vms
        .iter()
        .filter(|v| v.host == failed && v.domain_xml.is_some())
        .collect();
    victims.sort_by(|a, b| {
        b.max_memory_kib
            .cmp(&a.max_memory_kib)
            .then(a.name.cmp(&b.name))
    });
    let mut placed = Vec::new();
    let mut unplaced = Vec::new();
    for vm in victims {
        let need_mem = vm.max_memory_kib as i64;
        let need_cpu = i64::from(vm.vcpus.max(1));
        let best = free
            .iter()
            .filter(|(_, (mem, cpu, _))| *mem >= need_mem && *cpu >= need_cpu)
            .max_by_key(|(name, (mem, _, site))| {
                (
                    Some(*site) == failed_site.as_deref(),
                    *mem,
                    std::cmp::Reverse(*name),
                )
            })
            .map(|(name, _)| *name);
        match best {
            Some(host) => {
                if let Some(f) = free.get_mut(host) {
                    f.0 -= need_mem;
                    f.1 -= need_cpu;
                }
                placed.push(Restart {
                    vm: vm.name.clone(),
                    to_host: host.to_owned(),
                });
            }
            None => unplaced.push(vm.name.clone()),
        }
    }
    (placed, unplaced)
}

/// Why a VM could not be restarted.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("{vm} has no recorded domain XML to re-instantiate it from")]
    NoDefinition { vm: String },
    #[error("{vm}: invalid recorded domain XML")]
    Xml {
        vm: String,
        #[source]
        source: xml::XmlError,
    },
    #[error(
        "{vm}: {path} has no backing image; a VM without a base image cannot be re-instantiated"
    )]
    NoBase { vm: String, path: String },
    #[error("{vm}: base {base} is neither at {host} nor stageable from any live host")]
    BaseUnavailable {
        vm: String,
        base: String,
        host: String,
    },
    #[error("{vm}: {path} already exists at {host}; refusing to overwrite it")]
    OverlayExists {
        vm: String,
        path: String,
        host: String,
    },
    #[error("{vm}: hypervisor call at {host} failed")]
    Hypervisor {
        vm: String,
        host: String,
        #[source]
        source: HypervisorError,
    },
}

/// What a failed host's hypervisor says of one of its VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The hypervisor answers and the VM runs (or is paused) there: do not restart it.
    Running,
    /// The hypervisor answers and the VM is not running there.
    NotRunning,
    /// No connection within [`PROBE_TIMEOUT`]: the host is taken as down.
    Unreachable,
    /// The hypervisor answers, but with an error: the host is alive and the VM's state unknown,
    /// so it is not restarted.
    Unsure,
}

/// How long the fencing probe waits for a silent host's hypervisor. A dead host's TCP connect
/// fails or hangs; a live one answers within a second.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Asks `host`'s hypervisor whether `vm` still runs there (fencing before a restart).
pub async fn probe_vm_at(
    connector: &Arc<dyn Connector>,
    host: Option<&HostRecord>,
    vm: &str,
) -> Probe {
    let Some(host) = host.filter(|h| !h.libvirt_uri.is_empty()) else {
        return Probe::Unreachable;
    };
    let ask = async {
        let hv = Host::open(connector, &host.libvirt_uri).await?;
        hv.list_domains().await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, ask).await {
        Ok(Ok(domains)) => {
            if domains.iter().any(|d| {
                d.name == vm && matches!(d.state, DomainState::Running | DomainState::Paused)
            }) {
                Probe::Running
            } else {
                Probe::NotRunning
            }
        }
        Ok(Err(e)) if !e.is_connection_error() => Probe::Unsure,
        Ok(Err(_)) | Err(_) => Probe::Unreachable,
    }
}

/// How long a restart waits for a VM's base to be staged through a depot.
const RESTART_STAGE_WITHIN: std::time::Duration = std::time::Duration::from_secs(600);

/// Re-instantiates `vm` (from its recorded XML) on `to`: base present (staged from another
/// live host if needed), a fresh overlay over it, define, start.
pub async fn restart_vm<S: BaseStager>(
    connector: &Arc<dyn Connector>,
    stager: &S,
    vm: &VmRecord,
    to: &HostRecord,
    live_hosts: &[HostRecord],
) -> Result<(), RestartError> {
    let desc = vm
        .domain_xml
        .clone()
        .ok_or_else(|| RestartError::NoDefinition {
            vm: vm.name.clone(),
        })?;
    let disks = xml::disks(&desc).map_err(|source| RestartError::Xml {
        vm: vm.name.clone(),
        source,
    })?;
    let hv_err = |source| RestartError::Hypervisor {
        vm: vm.name.clone(),
        host: to.name.clone(),
        source,
    };
    let target = Host::open(connector, &to.libvirt_uri)
        .await
        .map_err(hv_err)?;
    for disk in disks.iter().filter(|d| !d.read_only) {
        let (base, fmt) = disk.backing.clone().ok_or_else(|| RestartError::NoBase {
            vm: vm.name.clone(),
            path: disk.path.clone(),
        })?;
        if !target.image_exists(&base).await.map_err(hv_err)? {
            let mut staged = false;
            for (i, src) in live_hosts.iter().filter(|h| h.name != to.name).enumerate() {
                // First as a VM's base: a depot image is then laid down by the destination's
                // depot (its own agent where it has one), with no other host's files involved.
                // Then as a direct copy from each other live host.
                let result = if i == 0 {
                    let job = StageJob {
                        vm: &vm.name,
                        base_path: &base,
                        source_uri: &src.libvirt_uri,
                        dest_uri: &to.libvirt_uri,
                        domain_xml: &desc,
                        deadline_unix_ms: crate::manager::now_ms()
                            + RESTART_STAGE_WITHIN.as_millis() as u64,
                        progress: &|_| {},
                    };
                    stager.stage_for_vm(&job).await.map(|how| {
                        tracing::info!(vm = %vm.name, host = %to.name, %how, "base staged for a restart");
                    })
                } else {
                    stager
                        .stage(&base, &src.libvirt_uri, &to.libvirt_uri)
                        .await
                        .map(|_| ())
                };
                match result {
                    Ok(()) => {
                        staged = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(vm = %vm.name, from = %src.name, to = %to.name, error = %viola_common::errors::chain(&e), "cannot stage a restarted VM's base this way")
                    }
                }
            }
            if !staged {
                return Err(RestartError::BaseUnavailable {
                    vm: vm.name.clone(),
                    base,
                    host: to.name.clone(),
                });
            }
        }
        if target.image_exists(&disk.path).await.map_err(hv_err)? {
            return Err(RestartError::OverlayExists {
                vm: vm.name.clone(),
                path: disk.path.clone(),
                host: to.name.clone(),
            });
        }
        let capacity = target.image_capacity(&base).await.map_err(hv_err)?;
        target
            .create_overlay(&disk.path, &base, &fmt, capacity)
            .await
            .map_err(hv_err)?;
    }
    target.define(&desc).await.map_err(hv_err)?;
    target.start(&vm.name).await.map_err(hv_err)?;
    Ok(())
}

/// On a failed host's return: destroys and undefines its copies of VMs that now live
/// elsewhere. Returns the names removed.
pub async fn fence_returned_host(
    connector: &Arc<dyn Connector>,
    host: &HostRecord,
    vms: &[VmRecord],
) -> Result<Vec<String>, HypervisorError> {
    let hv = Host::open(connector, &host.libvirt_uri).await?;
    let present = hv.list_domains().await?;
    let mut removed = Vec::new();
    for d in present {
        let moved = vms.iter().any(|v| v.name == d.name && v.host != host.name);
        if !moved {
            continue;
        }
        if matches!(d.state, DomainState::Running | DomainState::Paused) {
            hv.destroy(&d.name).await?;
        }
        match hv.undefine(&d.name).await {
            Ok(()) => {}
            Err(e) if e.is_no_such_domain() => {}
            Err(e) => return Err(e),
        }
        removed.push(d.name);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::stage::{StageError, StagedBase, StagedHow};
    use crate::migration::testing::FakeStager;
    use viola_hypervisor::Hypervisor;
    use viola_hypervisor::fake::{FakeCluster, sample_domain_xml};

    fn host(name: &str, site: &str, mem_mib: u64, state: HostState) -> HostRecord {
        HostRecord {
            name: name.into(),
            site: site.into(),
            libvirt_uri: format!("fake://{name}"),
            migration_uri: String::new(),
            cpus: 2,
            memory_kib: mem_mib * 1024,
            state,
            last_heartbeat_ms: None,
            last_report_seq: 0,
            usage: None,
        }
    }

    fn vm(name: &str, on: &str, mem_mib: u64) -> VmRecord {
        VmRecord {
            name: name.into(),
            host: on.into(),
            violin: None,
            macs: vec![],
            state: DomainState::Running,
            vcpus: 1,
            max_vcpus: 2,
            memory_kib: mem_mib * 1024,
            max_memory_kib: mem_mib * 1024,
            cpu_busy: 0.0,
            domain_xml: Some(sample_domain_xml(
                name,
                &format!("/img/{name}.qcow2"),
                "/img/base.qcow2",
                "52:54:00:00:00:01",
            )),
            cap_percent: None,
            deadline: None,
            updated_ms: 0,
        }
    }

    #[test]
    fn detector_fails_after_timeout_once_and_recovers() {
        let mut d = FailureDetector::new(3000);
        d.watch("a1", 0, false);
        d.watch("b1", 0, false);
        assert!(d.poll(2999).is_empty());
        assert_eq!(d.heartbeat("b1", 2500), None);
        assert_eq!(
            d.poll(3000),
            vec![HostEvent::Failed {
                host: "a1".into(),
                last_seen_ms: 0
            }]
        );
        assert!(
            d.poll(10_000)
                .iter()
                .all(|e| !matches!(e, HostEvent::Failed { host, .. } if host == "a1"))
        );
        assert_eq!(
            d.heartbeat("a1", 12_000),
            Some(HostEvent::Recovered {
                host: "a1".into(),
                down_ms: 9000
            })
        );
        assert_eq!(d.next_deadline_ms(), Some(15_000));
    }

    #[test]
    fn restarts_prefer_same_site_and_room_and_report_what_does_not_fit() {
        let hosts = [
            host("a1", "a", 4096, HostState::Failed { since_ms: 0 }),
            host("a2", "a", 1024, HostState::Up),
            host("b1", "b", 8192, HostState::Up),
            host("b2", "b", 8192, HostState::Failed { since_ms: 0 }),
        ];
        let vms = [
            vm("big", "a1", 2048),
            vm("small", "a1", 512),
            vm("huge", "a1", 100_000),
        ];
        let (placed, unplaced) = plan_restarts("a1", &hosts, &vms);
        assert_eq!(
            placed,
            vec![
                Restart {
                    vm: "big".into(),
                    to_host: "b1".into()
                },
                Restart {
                    vm: "small".into(),
                    to_host: "a2".into()
                },
            ]
        );
        assert_eq!(unplaced, vec!["huge".to_string()]);
    }

    #[tokio::test]
    async fn restart_recreates_overlay_and_fence_removes_the_stale_copy() {
        let cluster = FakeCluster::new();
        let a1 = cluster.host("fake://a1");
        cluster.host("fake://b1");
        cluster.add_image("fake://a1", "/img/base.qcow2", 1 << 30, None);
        cluster.add_image(
            "fake://a1",
            "/img/vm1.qcow2",
            1 << 30,
            Some("/img/base.qcow2"),
        );
        let mut record = vm("vm1", "a1", 256);
        a1.define(record.domain_xml.as_ref().unwrap()).unwrap();
        a1.start("vm1").unwrap();
        cluster.set_host_up("fake://a1", false);

        let connector: Arc<dyn Connector> = Arc::new(cluster.clone());
        let live = [
            host("b1", "b", 8192, HostState::Up),
            host("a2", "a", 8192, HostState::Up),
        ];
        restart_vm(
            &connector,
            &FakeStager(cluster.clone()),
            &record,
            &live[0],
            &live,
        )
        .await
        .unwrap();
        assert_eq!(cluster.hosts_running("vm1"), vec!["fake://b1".to_string()]);
        assert!(cluster.has_image("fake://b1", "/img/vm1.qcow2"));

        // a1 comes back with its (shut off) definition: fenced.
        cluster.set_host_up("fake://a1", true);
        record.host = "b1".into();
        let removed =
            fence_returned_host(&connector, &host("a1", "a", 4096, HostState::Up), &[record])
                .await
                .unwrap();
        assert_eq!(removed, vec!["vm1".to_string()]);
        assert!(!cluster.has_domain("fake://a1", "vm1"));
        let b1 = cluster.host("fake://b1");
        assert!(b1.domain("vm1").unwrap().is_some());
    }

    /// Stages a base only as a VM's (as a host's depot agent does, from the image the VM's
    /// domain names), never by a direct copy from another host's files.
    struct VmBaseOnlyStager {
        cluster: FakeCluster,
        jobs: std::sync::Mutex<Vec<(String, String)>>,
    }

    impl BaseStager for VmBaseOnlyStager {
        async fn stage(&self, _: &str, src: &str, _: &str) -> Result<StagedBase, StageError> {
            Err(StageError::UnknownHost { uri: src.into() })
        }

        async fn stage_for_vm(&self, job: &StageJob<'_>) -> Result<StagedHow, StageError> {
            assert!(
                job.domain_xml.contains("<name>vm1</name>"),
                "{}",
                job.domain_xml
            );
            self.jobs
                .lock()
                .unwrap()
                .push((job.vm.into(), job.dest_uri.into()));
            self.cluster
                .add_image(job.dest_uri, job.base_path, 1 << 30, None);
            Ok(StagedHow::Depot {
                site: "b".into(),
                image: "guest".into(),
                stage_id: "vm1-1".into(),
                bytes_fetched: 1 << 30,
                chain: vec![job.base_path.into()],
                elapsed_ms: 1,
            })
        }
    }

    #[tokio::test]
    async fn a_restart_stages_the_base_as_the_vms_so_a_depot_can_lay_it_down() {
        let cluster = FakeCluster::new();
        let a1 = cluster.host("fake://a1");
        cluster.host("fake://b1");
        let record = vm("vm1", "a1", 256);
        a1.define(record.domain_xml.as_ref().unwrap()).unwrap();
        cluster.set_host_up("fake://a1", false);
        let stager = VmBaseOnlyStager {
            cluster: cluster.clone(),
            jobs: std::sync::Mutex::default(),
        };
        let connector: Arc<dyn Connector> = Arc::new(cluster.clone());
        let live = [
            host("b1", "b", 8192, HostState::Up),
            host("a2", "a", 8192, HostState::Up),
        ];
        restart_vm(&connector, &stager, &record, &live[0], &live)
            .await
            .unwrap();
        assert_eq!(
            *stager.jobs.lock().unwrap(),
            [("vm1".into(), "fake://b1".into())]
        );
        assert_eq!(cluster.hosts_running("vm1"), vec!["fake://b1".to_string()]);
        assert!(cluster.has_image("fake://b1", "/img/vm1.qcow2"));
    }
}
