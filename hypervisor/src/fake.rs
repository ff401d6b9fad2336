//! An in-memory federation of hypervisors for logic tests: hosts hold domains and image files,
//! migrations move domains between hosts, and faults can be injected (destination dies
//! mid-migration, migration refused, no cgroup `cpu` controller, host down).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{
    Connector, CpuTuning, DiskInfo, DomainState, DomainStats, DomainSummary, HostInfo, Hypervisor,
    HypervisorError, JobProgress, MigrationRequest, NicInfo, StorageCopy, xml,
};

#[derive(Debug, Clone)]
struct FakeDomain {
    xml: String,
    summary: DomainSummary,
    tuning: CpuTuning,
    job: Option<JobProgress>,
    completed: Option<JobProgress>,
    abort_requested: bool,
}

#[derive(Debug, Clone)]
struct FakeImage {
    capacity: u64,
    backing: Option<String>,
}

#[derive(Debug, Clone)]
struct FakeHost {
    up: bool,
    cpu_controller: bool,
    /// Domain queries that fail before the host answers them again.
    failing_queries: u32,
    domains: BTreeMap<String, FakeDomain>,
    images: BTreeMap<String, FakeImage>,
}

impl FakeHost {
    fn domain_mut(&mut self, name: &str) -> Result<&mut FakeDomain, HypervisorError> {
        self.domains
            .get_mut(name)
            .ok_or_else(|| HypervisorError::NoSuchDomain(name.to_owned()))
    }
}

/// Faults the next migrations hit.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The next migration fails with this message (the source keeps running).
    pub refuse_migration: Option<String>,
    /// The destination host goes down half way through the next migration, leaving a paused
    /// incoming domain behind there (as a killed libvirtd leaves its QEMU).
    pub destination_dies: bool,
    /// How long a migration takes (it can be aborted meanwhile).
    pub migration_duration: Duration,
}

#[derive(Debug, Default)]
struct World {
    hosts: BTreeMap<String, FakeHost>,
    faults: Faults,
    uuid_counter: u64,
    /// Every migration asked for, in order (what the caller asked libvirt for).
    migrations: Vec<MigrationRequest>,
}

/// The shared world; hand out per-host [`FakeHypervisor`]s with [`FakeCluster::host`].
#[derive(Debug, Clone, Default)]
pub struct FakeCluster {
    world: Arc<Mutex<World>>,
}

/// One host of a [`FakeCluster`].
#[derive(Debug, Clone)]
pub struct FakeHypervisor {
    uri: String,
    world: Arc<Mutex<World>>,
}

fn lock(world: &Mutex<World>) -> MutexGuard<'_, World> {
    // A test thread that panicked while holding the lock leaves consistent data: keep going.
    world
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeCluster {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or returns) a host reachable as `uri`.
    pub fn host(&self, uri: &str) -> FakeHypervisor {
        lock(&self.world)
            .hosts
            .entry(uri.to_owned())
            .or_insert_with(|| FakeHost {
                up: true,
                cpu_controller: true,
                failing_queries: 0,
                domains: BTreeMap::new(),
                images: BTreeMap::new(),
            });
        FakeHypervisor {
            uri: uri.to_owned(),
            world: Arc::clone(&self.world),
        }
    }

    pub fn set_faults(&self, faults: Faults) {
        lock(&self.world).faults = faults;
    }

    /// Takes a host down or brings it back (its domains are kept, as on a reboot they'd be
    /// defined but not running).
    pub fn set_host_up(&self, uri: &str, up: bool) {
        if let Some(h) = lock(&self.world).hosts.get_mut(uri) {
            h.up = up;
            if !up {
                for d in h.domains.values_mut() {
                    d.summary.state = DomainState::ShutOff;
                }
            }
        }
    }

    /// The host's next `n` domain queries fail, as a just restarted libvirtd's can while it is
    /// still recovering its domains.
    pub fn fail_domain_queries(&self, uri: &str, n: u32) {
        if let Some(h) = lock(&self.world).hosts.get_mut(uri) {
            h.failing_queries = n;
        }
    }

    pub fn set_cpu_controller(&self, uri: &str, present: bool) {
        if let Some(h) = lock(&self.world).hosts.get_mut(uri) {
            h.cpu_controller = present;
        }
    }

    /// Puts an image file on a host (a base image, say).
    pub fn add_image(&self, uri: &str, path: &str, capacity: u64, backing: Option<&str>) {
        if let Some(h) = lock(&self.world).hosts.get_mut(uri) {
            h.images.insert(
                path.to_owned(),
                FakeImage {
                    capacity,
                    backing: backing.map(str::to_owned),
                },
            );
        }
    }

    /// Which hosts run (state Running or Paused) a domain named `name`.
    pub fn hosts_running(&self, name: &str) -> Vec<String> {
        lock(&self.world)
            .hosts
            .iter()
            .filter(|(_, h)| {
                h.domains.get(name).is_some_and(|d| {
                    matches!(d.summary.state, DomainState::Running | DomainState::Paused)
                })
            })
            .map(|(uri, _)| uri.clone())
            .collect()
    }

    /// Whether a host has any trace of `name` (domain defined) or an image at `path`.
    /// Every migration request made so far, in order.
    pub fn migration_requests(&self) -> Vec<MigrationRequest> {
        lock(&self.world).migrations.clone()
    }

    pub fn has_domain(&self, uri: &str, name: &str) -> bool {
        lock(&self.world)
            .hosts
            .get(uri)
            .is_some_and(|h| h.domains.contains_key(name))
    }

    pub fn has_image(&self, uri: &str, path: &str) -> bool {
        lock(&self.world)
            .hosts
            .get(uri)
            .is_some_and(|h| h.images.contains_key(path))
    }
}

impl Connector for FakeCluster {
    fn open(&self, uri: &str) -> Result<Arc<dyn Hypervisor>, HypervisorError> {
        let world = lock(&self.world);
        match world.hosts.get(uri) {
            Some(h) if h.up => Ok(Arc::new(FakeHypervisor {
                uri: uri.to_owned(),
                world: Arc::clone(&self.world),
            })),
            _ => Err(HypervisorError::Failed {
                op: "connect",
                domain: uri.to_owned(),
                reason: "host unreachable".into(),
            }),
        }
    }
}

impl FakeHypervisor {
    fn with_host<T>(
        &self,
        f: impl FnOnce(&mut FakeHost) -> Result<T, HypervisorError>,
    ) -> Result<T, HypervisorError> {
        let mut world = lock(&self.world);
        match world.hosts.get_mut(&self.uri) {
            Some(h) if h.up => f(h),
            _ => Err(HypervisorError::Failed {
                op: "connect",
                domain: self.uri.clone(),
                reason: "host unreachable".into(),
            }),
        }
    }

    fn with_domain<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut FakeDomain) -> Result<T, HypervisorError>,
    ) -> Result<T, HypervisorError> {
        self.with_host(|h| f(h.domain_mut(name)?))
    }
}

fn xml_err(domain: &str, e: xml::XmlError) -> HypervisorError {
    HypervisorError::Xml {
        domain: domain.to_owned(),
        reason: e.to_string(),
    }
}

impl Hypervisor for FakeHypervisor {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn host_info(&self) -> Result<HostInfo, HypervisorError> {
        self.with_host(|h| {
            let used: u64 = h
                .domains
                .values()
                .filter(|d| d.summary.state == DomainState::Running)
                .map(|d| d.summary.memory_kib)
                .sum();
            Ok(HostInfo {
                hostname: self.uri.clone(),
                cpus: 8,
                memory_kib: 16 * 1024 * 1024,
                free_memory_kib: (16 * 1024 * 1024u64).saturating_sub(used),
            })
        })
    }

    fn list_domains(&self) -> Result<Vec<DomainSummary>, HypervisorError> {
        self.with_host(|h| Ok(h.domains.values().map(|d| d.summary.clone()).collect()))
    }

    fn domain(&self, name: &str) -> Result<Option<DomainSummary>, HypervisorError> {
        self.with_host(|h| {
            if h.failing_queries > 0 {
                h.failing_queries -= 1;
                return Err(HypervisorError::Failed {
                    op: "get info",
                    domain: name.to_owned(),
                    reason: "domain is being recovered".into(),
                });
            }
            Ok(h.domains.get(name).map(|d| d.summary.clone()))
        })
    }

    fn stats(&self) -> Result<Vec<DomainStats>, HypervisorError> {
        self.with_host(|h| {
            Ok(h.domains
                .values()
                .filter(|d| d.summary.state == DomainState::Running)
                .map(|d| DomainStats {
                    summary: d.summary.clone(),
                    balloon_current_kib: Some(d.summary.memory_kib),
                    rss_kib: None,
                    disks: Vec::new(),
                    nics: Vec::new(),
                })
                .collect())
        })
    }

    fn domain_xml(&self, name: &str) -> Result<String, HypervisorError> {
        self.with_domain(name, |d| Ok(d.xml.clone()))
    }

    fn disks(&self, name: &str) -> Result<Vec<DiskInfo>, HypervisorError> {
        let desc = self.domain_xml(name)?;
        xml::disks(&desc).map_err(|e| xml_err(name, e))
    }

    fn nics(&self, name: &str) -> Result<Vec<NicInfo>, HypervisorError> {
        let desc = self.domain_xml(name)?;
        xml::nics(&desc).map_err(|e| xml_err(name, e))
    }

    fn define(&self, desc: &str) -> Result<String, HypervisorError> {
        let name = xml::domain_name(desc).map_err(|e| xml_err("?", e))?;
        let (vcpus, max_vcpus) = xml::vcpus(desc).map_err(|e| xml_err(&name, e))?;
        let (memory_kib, max_memory_kib) = xml::memory_kib(desc).map_err(|e| xml_err(&name, e))?;
        let uuid = {
            let mut world = lock(&self.world);
            world.uuid_counter += 1;
            format!("00000000-0000-0000-0000-{:012}", world.uuid_counter)
        };
        self.with_host(|h| {
            if let Some(existing) = h.domains.get(&name)
                && existing.summary.state != DomainState::ShutOff
            {
                return Err(HypervisorError::AlreadyExists { domain: name });
            }
            h.domains.insert(
                name.clone(),
                FakeDomain {
                    xml: desc.to_owned(),
                    summary: DomainSummary {
                        name: name.clone(),
                        uuid,
                        state: DomainState::ShutOff,
                        persistent: true,
                        vcpus,
                        max_vcpus,
                        memory_kib,
                        max_memory_kib,
                        cpu_time_ns: 0,
                    },
                    tuning: CpuTuning::default(),
                    job: None,
                    completed: None,
                    abort_requested: false,
                },
            );
            Ok(name)
        })
    }

    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.with_domain(name, |d| {
            if d.summary.state == DomainState::Running {
                return Err(HypervisorError::Failed {
                    op: "start",
                    domain: d.summary.name.clone(),
                    reason: "domain is already running".into(),
                });
            }
            d.summary.state = DomainState::Running;
            Ok(())
        })
    }

    fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        self.destroy(name)
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        self.with_host(|h| {
            let d = h.domain_mut(name)?;
            d.summary.state = DomainState::ShutOff;
            if !d.summary.persistent {
                h.domains.remove(name);
            }
            Ok(())
        })
    }

    fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        self.with_host(|h| {
            let d = h.domain_mut(name)?;
            if d.summary.state == DomainState::ShutOff {
                h.domains.remove(name);
            } else {
                d.summary.persistent = false;
            }
            Ok(())
        })
    }

    fn set_vcpus(&self, name: &str, vcpus: u32) -> Result<(), HypervisorError> {
        self.with_domain(name, |d| {
            if vcpus == 0 || vcpus > d.summary.max_vcpus {
                return Err(HypervisorError::OutOfRange {
                    op: "set vcpus",
                    domain: name.to_owned(),
                    value: u64::from(vcpus),
                    min: 1,
                    max: u64::from(d.summary.max_vcpus),
                });
            }
            d.summary.vcpus = vcpus;
            Ok(())
        })
    }

    fn set_memory(&self, name: &str, kib: u64) -> Result<(), HypervisorError> {
        self.with_domain(name, |d| {
            if kib < 64 * 1024 || kib > d.summary.max_memory_kib {
                return Err(HypervisorError::OutOfRange {
                    op: "set memory",
                    domain: name.to_owned(),
                    value: kib,
                    min: 64 * 1024,
                    max: d.summary.max_memory_kib,
                });
            }
            d.summary.memory_kib = kib;
            Ok(())
        })
    }

    fn cpu_tuning(&self, name: &str) -> Result<CpuTuning, HypervisorError> {
        self.with_domain(name, |d| Ok(d.tuning))
    }

    fn set_cpu_tuning(&self, name: &str, tuning: CpuTuning) -> Result<(), HypervisorError> {
        self.with_host(|h| {
            if !h.cpu_controller {
                return Err(HypervisorError::Unsupported {
                    op: "set cpu tuning",
                    domain: name.to_owned(),
                    reason: "no cgroup cpu controller (fake host)".into(),
                });
            }
            let d = h.domain_mut(name)?;
            if let Some(s) = tuning.shares {
                d.tuning.shares = Some(s);
            }
            if let Some(c) = tuning.cap {
                d.tuning.cap = (c != crate::CpuCap::UNLIMITED).then_some(c);
            }
            Ok(())
        })
    }

    fn migrate(&self, name: &str, req: &MigrationRequest) -> Result<(), HypervisorError> {
        let fail = |reason: String| HypervisorError::Failed {
            op: "migrate",
            domain: name.to_owned(),
            reason,
        };
        let (faults, disks) = {
            let mut world = lock(&self.world);
            world.migrations.push(req.clone());
            let faults = std::mem::take(&mut world.faults);
            let src = world
                .hosts
                .get_mut(&self.uri)
                .filter(|h| h.up)
                .ok_or_else(|| fail("source unreachable".into()))?;
            let d = src.domain_mut(name)?;
            if d.summary.state != DomainState::Running {
                return Err(fail("domain is not running".into()));
            }
            let disks = xml::disks(&d.xml).map_err(|e| xml_err(name, e))?;
            let total = disks.len() as u64 * (64 << 20) + d.summary.memory_kib * 1024;
            d.job = Some(JobProgress {
                data_total: total,
                data_remaining: total,
                ..JobProgress::default()
            });
            d.abort_requested = false;
            (faults, disks)
        };
        let finish_job = |world: &mut World| {
            if let Some(d) = world
                .hosts
                .get_mut(&self.uri)
                .and_then(|h| h.domains.get_mut(name))
            {
                d.job = None;
            }
        };
        if let Some(msg) = faults.refuse_migration {
            finish_job(&mut lock(&self.world));
            return Err(fail(msg));
        }
        // Preconditions libvirt checks at the destination.
        {
            let mut world = lock(&self.world);
            let dest_ok = world.hosts.get(&req.dest_uri).is_some_and(|h| h.up);
            if !dest_ok {
                finish_job(&mut world);
                return Err(fail(format!("cannot connect to {}", req.dest_uri)));
            }
            let dest = &world.hosts[&req.dest_uri];
            if dest.domains.contains_key(name) {
                finish_job(&mut world);
                return Err(fail("domain already exists at the destination".into()));
            }
            if req.storage == StorageCopy::Incremental {
                for disk in disks.iter().filter(|d| req.disks.contains(&d.target)) {
                    let Some(img) = dest.images.get(&disk.path) else {
                        finish_job(&mut world);
                        return Err(fail("pre-creation of storage targets for incremental storage migration is not supported".into()));
                    };
                    let backing_ok = img
                        .backing
                        .as_ref()
                        .is_some_and(|b| dest.images.contains_key(b));
                    if !backing_ok {
                        finish_job(&mut world);
                        return Err(fail(format!("backing chain of {} missing", disk.path)));
                    }
                }
            }
        }
        // The copy itself: time passes, progress moves, abort is honoured.
        let started = Instant::now();
        loop {
            let elapsed = started.elapsed();
            let mut world = lock(&self.world);
            let d = world
                .hosts
                .get_mut(&self.uri)
                .and_then(|h| h.domains.get_mut(name))
                .ok_or_else(|| fail("domain vanished".into()))?;
            if d.abort_requested {
                d.job = None;
                d.abort_requested = false;
                return Err(fail(
                    "operation aborted: migration job: canceled by client".into(),
                ));
            }
            let frac = if faults.migration_duration.is_zero() {
                1.0
            } else {
                (elapsed.as_secs_f64() / faults.migration_duration.as_secs_f64()).min(1.0)
            };
            if let Some(job) = d.job.as_mut() {
                job.time_elapsed_ms = elapsed.as_millis() as u64;
                job.data_processed = (job.data_total as f64 * frac) as u64;
                job.data_remaining = job.data_total - job.data_processed;
            }
            if faults.destination_dies && frac >= 0.5 {
                d.job = None;
                let incoming = FakeDomain {
                    summary: DomainSummary {
                        state: DomainState::Paused,
                        persistent: false,
                        ..d.summary.clone()
                    },
                    ..d.clone()
                };
                if let Some(dest) = world.hosts.get_mut(&req.dest_uri) {
                    dest.up = false;
                    dest.domains.insert(name.to_owned(), incoming);
                }
                return Err(fail("Lost connection to destination host".into()));
            }
            if frac >= 1.0 {
                break;
            }
            drop(world);
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut world = lock(&self.world);
        let src = world
            .hosts
            .get_mut(&self.uri)
            .ok_or_else(|| fail("source vanished".into()))?;
        let mut dom = src
            .domains
            .remove(name)
            .ok_or_else(|| fail("domain vanished".into()))?;
        let total = dom.job.take().map(|j| j.data_total).unwrap_or(0);
        dom.summary.persistent = true;
        dom.completed = Some(JobProgress {
            time_elapsed_ms: started.elapsed().as_millis() as u64,
            data_total: total,
            data_processed: total,
            downtime_ms: Some(42),
            ..JobProgress::default()
        });
        let dest = world
            .hosts
            .get_mut(&req.dest_uri)
            .ok_or_else(|| fail("destination vanished".into()))?;
        if req.storage == StorageCopy::Full {
            for disk in disks.iter().filter(|d| req.disks.contains(&d.target)) {
                dest.images.insert(
                    disk.path.clone(),
                    FakeImage {
                        capacity: 1 << 30,
                        backing: None,
                    },
                );
            }
        }
        dest.domains.insert(name.to_owned(), dom);
        Ok(())
    }

    fn job_progress(&self, name: &str) -> Result<Option<JobProgress>, HypervisorError> {
        self.with_domain(name, |d| Ok(d.job.clone()))
    }

    fn completed_job(&self, name: &str) -> Result<Option<JobProgress>, HypervisorError> {
        self.with_domain(name, |d| Ok(d.completed.clone()))
    }

    fn abort_job(&self, name: &str) -> Result<(), HypervisorError> {
        self.with_domain(name, |d| {
            if d.job.is_none() {
                return Err(HypervisorError::Failed {
                    op: "abort job",
                    domain: name.to_owned(),
                    reason: "no job is active on the domain".into(),
                });
            }
            d.abort_requested = true;
            Ok(())
        })
    }

    fn image_exists(&self, path: &str) -> Result<bool, HypervisorError> {
        self.with_host(|h| Ok(h.images.contains_key(path)))
    }

    fn create_overlay(
        &self,
        path: &str,
        backing: &str,
        _backing_format: &str,
        capacity_bytes: u64,
    ) -> Result<(), HypervisorError> {
        self.with_host(|h| {
            if h.images.contains_key(path) {
                return Err(HypervisorError::Failed {
                    op: "create overlay",
                    domain: path.to_owned(),
                    reason: "file exists".into(),
                });
            }
            if !h.images.contains_key(backing) {
                return Err(HypervisorError::Failed {
                    op: "create overlay",
                    domain: path.to_owned(),
                    reason: format!("backing file {backing} missing"),
                });
            }
            h.images.insert(
                path.to_owned(),
                FakeImage {
                    capacity: capacity_bytes,
                    backing: Some(backing.to_owned()),
                },
            );
            Ok(())
        })
    }

    fn image_capacity(&self, path: &str) -> Result<u64, HypervisorError> {
        self.with_host(|h| {
            h.images
                .get(path)
                .map(|i| i.capacity)
                .ok_or_else(|| HypervisorError::Failed {
                    op: "image capacity",
                    domain: path.to_owned(),
                    reason: "no such image".into(),
                })
        })
    }

    fn delete_image(&self, path: &str) -> Result<(), HypervisorError> {
        self.with_host(|h| {
            h.images.remove(path);
            Ok(())
        })
    }
}

/// Domain XML for fake (and real) tests: one qcow2 disk over `base`, one bridged NIC.
pub fn sample_domain_xml(name: &str, overlay: &str, base: &str, mac: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory>\
         <vcpu current='1'>2</vcpu><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{overlay}'/><backingStore type='file'><format type='qcow2'/>\
         <source file='{base}'/></backingStore><target dev='vda' bus='virtio'/></disk>\
         <interface type='bridge'><mac address='{mac}'/><source bridge='vbr-1'/>\
         <model type='virtio'/></interface></devices></domain>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn define_start_resize_and_refuse_beyond_max() {
        let cluster = FakeCluster::new();
        let hv = cluster.host("fake://a1");
        hv.define(&sample_domain_xml(
            "vm1",
            "/img/vm1.qcow2",
            "/img/base.qcow2",
            "52:54:00:00:00:01",
        ))
        .unwrap();
        hv.start("vm1").unwrap();
        hv.set_vcpus("vm1", 2).unwrap();
        assert_eq!(hv.domain("vm1").unwrap().unwrap().vcpus, 2);
        assert!(matches!(
            hv.set_vcpus("vm1", 3),
            Err(HypervisorError::OutOfRange { .. })
        ));
    }

    #[test]
    fn incremental_migration_needs_the_overlay_at_the_destination() {
        let cluster = FakeCluster::new();
        let a = cluster.host("fake://a1");
        let _b = cluster.host("fake://b1");
        a.define(&sample_domain_xml(
            "vm1",
            "/img/vm1.qcow2",
            "/img/base.qcow2",
            "52:54:00:00:00:01",
        ))
        .unwrap();
        a.start("vm1").unwrap();
        let req = MigrationRequest::new("fake://b1", vec!["vda".into()], StorageCopy::Incremental);
        let err = a.migrate("vm1", &req).unwrap_err();
        assert!(err.to_string().contains("migrate"), "{err}");
        assert_eq!(cluster.hosts_running("vm1"), vec!["fake://a1".to_string()]);
        cluster.add_image("fake://b1", "/img/base.qcow2", 1 << 30, None);
        cluster.add_image(
            "fake://b1",
            "/img/vm1.qcow2",
            1 << 30,
            Some("/img/base.qcow2"),
        );
        a.migrate("vm1", &req).unwrap();
        assert_eq!(cluster.hosts_running("vm1"), vec!["fake://b1".to_string()]);
    }
}
