//! The libvirt backend of [`Hypervisor`], through the `virt` crate (0.4.3).
//!
//! Where the crate is unsafe or incomplete we call `virt::sys` directly, each time for a stated
//! reason: `get_job_stats` builds a `Vec` from libvirt's allocation (UB when no job runs), and
//! there is no safe `abort_job`. Image files on a (possibly remote) host are handled through
//! libvirt's storage API, so the manager needs no agent of its own there: a transient `dir` pool
//! is created for an image directory when none covers it.

use std::os::raw::{c_int, c_ulonglong};
use std::path::Path;
use std::sync::{Arc, Once};

use virt::connect::Connect;
use virt::domain::{Domain, MigrateParameters, SchedBandwidth, SchedulerInfo};
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

use crate::{
    Connector, CpuCap, CpuTuning, DiskCounters, DiskInfo, DomainState, DomainStats, DomainSummary,
    HostInfo, Hypervisor, HypervisorError, JobProgress, MigrationRequest, NicCounters, NicInfo,
    StorageCopy, xml,
};

/// A libvirt connection closed when dropped (the 0.4 crate's `Connect` has no `Drop`).
struct Conn(Connect);

impl Drop for Conn {
    fn drop(&mut self) {
        if let Err(err) = self.0.close() {
            tracing::warn!(error = %err, "closing libvirt connection failed");
        }
    }
}

static SILENCE: Once = Once::new();

/// One host's libvirtd.
pub struct LibvirtHypervisor {
    uri: String,
    conn: Conn,
}

/// Opens [`LibvirtHypervisor`]s by URI.
#[derive(Debug, Default, Clone)]
pub struct LibvirtConnector;

impl Connector for LibvirtConnector {
    fn open(&self, uri: &str) -> Result<Arc<dyn Hypervisor>, HypervisorError> {
        Ok(Arc::new(LibvirtHypervisor::open(uri)?))
    }
}

fn state_of(raw: sys::virDomainState) -> DomainState {
    match raw {
        sys::VIR_DOMAIN_RUNNING => DomainState::Running,
        sys::VIR_DOMAIN_PAUSED => DomainState::Paused,
        sys::VIR_DOMAIN_SHUTOFF => DomainState::ShutOff,
        sys::VIR_DOMAIN_CRASHED => DomainState::Crashed,
        _ => DomainState::Other,
    }
}

fn check_c_string(op: &'static str, domain: &str, text: &str) -> Result<(), HypervisorError> {
    if text.contains('\0') {
        return Err(HypervisorError::Failed {
            op,
            domain: domain.to_owned(),
            reason: "argument contains a NUL byte".into(),
        });
    }
    Ok(())
}

/// Turns libvirt's cgroup complaints into an error that says what the host lacks.
fn scheduler_error(op: &'static str, domain: &str, err: virt::error::Error) -> HypervisorError {
    let msg = err.message().to_owned();
    if msg.contains("cgroup") && (msg.contains("not mounted") || msg.contains("controller")) {
        return HypervisorError::Unsupported {
            op,
            domain: domain.to_owned(),
            reason: format!(
                "libvirtd manages no cgroup `cpu` controller for this VM ({msg}); on a cgroup v1 \
                 host without systemd libvirt places VMs under /machine in the mounted \
                 controllers listed in qemu.conf `cgroup_controllers`, so the cap and shares need \
                 the `cpu` controller mounted and listed there"
            ),
        };
    }
    if err.code() == ErrorNumber::NoSupport || err.code() == ErrorNumber::OperationUnsupported {
        return HypervisorError::Unsupported {
            op,
            domain: domain.to_owned(),
            reason: msg,
        };
    }
    HypervisorError::Libvirt {
        op,
        domain: domain.to_owned(),
        source: err,
    }
}

impl LibvirtHypervisor {
    /// Connects to `uri` (`qemu:///system`, `qemu+tcp://198.18.2.11/system`, `test:///default`).
    pub fn open(uri: &str) -> Result<Self, HypervisorError> {
        // libvirt's default handler prints every error to stderr; we report them ourselves.
        SILENCE.call_once(virt::error::clear_error_callback);
        let conn = Connect::open(Some(uri)).map_err(|source| HypervisorError::Connect {
            uri: uri.to_owned(),
            source,
        })?;
        Ok(Self {
            uri: uri.to_owned(),
            conn: Conn(conn),
        })
    }

    fn lookup(&self, name: &str) -> Result<Domain, HypervisorError> {
        check_c_string("lookup", name, name)?;
        Domain::lookup_by_name(&self.conn.0, name).map_err(|err| {
            if err.code() == ErrorNumber::NoDomain {
                HypervisorError::NoSuchDomain(name.to_owned())
            } else {
                HypervisorError::Libvirt {
                    op: "lookup",
                    domain: name.to_owned(),
                    source: err,
                }
            }
        })
    }

    fn err(op: &'static str, domain: &str) -> impl FnOnce(virt::error::Error) -> HypervisorError {
        let domain = domain.to_owned();
        move |source| HypervisorError::Libvirt { op, domain, source }
    }

    /// What `ask` answers of every domain listed with `flags`, but for those it answers
    /// nothing of and those gone before it asked (migrated away or undefined meanwhile).
    fn ask_each_domain<T>(
        &self,
        flags: u32,
        ask: impl Fn(&Domain) -> Result<Option<T>, HypervisorError>,
    ) -> Result<Vec<T>, HypervisorError> {
        let doms = self
            .conn
            .0
            .list_all_domains(flags)
            .map_err(Self::err("list domains", "-"))?;
        let mut out = Vec::with_capacity(doms.len());
        for dom in &doms {
            match ask(dom) {
                Ok(answer) => out.extend(answer),
                Err(e) if e.is_no_such_domain() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn summary(&self, dom: &Domain) -> Result<DomainSummary, HypervisorError> {
        let name = dom.get_name().map_err(Self::err("get name", "?"))?;
        let info = dom.get_info().map_err(Self::err("get info", &name))?;
        let active = dom.is_active().map_err(Self::err("is active", &name))?;
        let impact = if active {
            sys::VIR_DOMAIN_AFFECT_LIVE
        } else {
            sys::VIR_DOMAIN_AFFECT_CONFIG
        };
        let max_vcpus = dom
            .get_vcpus_flags(impact | sys::VIR_DOMAIN_VCPU_MAXIMUM)
            .map_err(Self::err("get max vcpus", &name))?;
        Ok(DomainSummary {
            uuid: dom
                .get_uuid_string()
                .map_err(Self::err("get uuid", &name))?,
            state: state_of(info.state),
            persistent: dom
                .is_persistent()
                .map_err(Self::err("is persistent", &name))?,
            vcpus: info.nr_virt_cpu,
            max_vcpus,
            memory_kib: info.memory,
            max_memory_kib: info.max_mem,
            cpu_time_ns: info.cpu_time,
            name,
        })
    }

    fn domain_stats(&self, dom: &Domain) -> Result<DomainStats, HypervisorError> {
        let summary = self.summary(dom)?;
        let name = summary.name.clone();
        let mut balloon = None;
        let mut rss = None;
        // memory_stats fails without a balloon device; that is "not reported", not an error.
        if let Ok(stats) = dom.memory_stats(0) {
            for stat in stats {
                match stat.tag {
                    sys::VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON => balloon = Some(stat.val),
                    sys::VIR_DOMAIN_MEMORY_STAT_RSS => rss = Some(stat.val),
                    _ => {}
                }
            }
        }
        let desc = dom.get_xml_desc(0).map_err(Self::err("get xml", &name))?;
        let mut disks = Vec::new();
        for disk in xml::disks(&desc).map_err(|e| HypervisorError::Xml {
            domain: name.clone(),
            reason: e.to_string(),
        })? {
            let s = dom
                .get_block_stats(&disk.target)
                .map_err(Self::err("block stats", &name))?;
            disks.push(DiskCounters {
                target: disk.target,
                read_bytes: s.rd_bytes.max(0) as u64,
                write_bytes: s.wr_bytes.max(0) as u64,
                read_requests: s.rd_req.max(0) as u64,
                write_requests: s.wr_req.max(0) as u64,
            });
        }
        let mut nics = Vec::new();
        for nic in xml::nics(&desc).map_err(|e| HypervisorError::Xml {
            domain: name.clone(),
            reason: e.to_string(),
        })? {
            let Some(tap) = nic.tap else { continue };
            let s = dom
                .interface_stats(&tap)
                .map_err(Self::err("interface stats", &name))?;
            nics.push(NicCounters {
                tap,
                mac: nic.mac,
                rx_bytes: s.rx_bytes.max(0) as u64,
                tx_bytes: s.tx_bytes.max(0) as u64,
                rx_packets: s.rx_packets.max(0) as u64,
                tx_packets: s.tx_packets.max(0) as u64,
            });
        }
        Ok(DomainStats {
            summary,
            balloon_current_kib: balloon,
            rss_kib: rss,
            disks,
            nics,
        })
    }

    /// `virDomainGetJobStats`, read safely: the crate's wrapper is UB when no job runs.
    fn job_stats(
        &self,
        dom: &Domain,
        name: &str,
        flags: u32,
    ) -> Result<Option<JobProgress>, HypervisorError> {
        let mut job_type: c_int = 0;
        let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
        let mut nparams: c_int = 0;
        // SAFETY: all out-pointers are valid; libvirt allocates `params`, freed below.
        let ret = unsafe {
            sys::virDomainGetJobStats(
                dom.as_ptr(),
                &mut job_type,
                &mut params,
                &mut nparams,
                flags,
            )
        };
        if ret == -1 {
            return Err(HypervisorError::Libvirt {
                op: "job stats",
                domain: name.to_owned(),
                source: virt::error::Error::last_error(),
            });
        }
        let get = |key: &std::ffi::CStr| -> Option<u64> {
            if params.is_null() {
                return None;
            }
            let mut value: c_ulonglong = 0;
            // SAFETY: params/nparams come from libvirt; key is NUL-terminated.
            let found =
                unsafe { sys::virTypedParamsGetULLong(params, nparams, key.as_ptr(), &mut value) };
            (found == 1).then_some(value)
        };
        let progress = JobProgress {
            time_elapsed_ms: get(sys::VIR_DOMAIN_JOB_TIME_ELAPSED).unwrap_or(0),
            data_total: get(sys::VIR_DOMAIN_JOB_DATA_TOTAL).unwrap_or(0),
            data_processed: get(sys::VIR_DOMAIN_JOB_DATA_PROCESSED).unwrap_or(0),
            data_remaining: get(sys::VIR_DOMAIN_JOB_DATA_REMAINING).unwrap_or(0),
            disk_total: get(sys::VIR_DOMAIN_JOB_DISK_TOTAL).unwrap_or(0),
            disk_processed: get(sys::VIR_DOMAIN_JOB_DISK_PROCESSED).unwrap_or(0),
            mem_total: get(sys::VIR_DOMAIN_JOB_MEMORY_TOTAL).unwrap_or(0),
            mem_processed: get(sys::VIR_DOMAIN_JOB_MEMORY_PROCESSED).unwrap_or(0),
            downtime_ms: get(sys::VIR_DOMAIN_JOB_DOWNTIME),
        };
        if !params.is_null() {
            // SAFETY: allocated by libvirt in the call above, freed exactly once.
            unsafe { sys::virTypedParamsFree(params, nparams) };
        }
        if job_type == sys::VIR_DOMAIN_JOB_NONE as c_int {
            return Ok(None);
        }
        Ok(Some(progress))
    }

    /// A storage pool whose target is `dir`, started; a transient one is created if needed.
    fn pool_for_dir(&self, dir: &str) -> Result<StoragePool, HypervisorError> {
        check_c_string("find storage pool", dir, dir)?;
        if let Ok(pool) = StoragePool::lookup_by_target_path(&self.conn.0, dir) {
            if !pool.is_active().map_err(Self::err("pool active", dir))? {
                pool.create(0).map_err(Self::err("start pool", dir))?;
            }
            pool.refresh(0).map_err(Self::err("refresh pool", dir))?;
            return Ok(pool);
        }
        let name = format!("viola-{}", &blake3::hash(dir.as_bytes()).to_hex()[..12]);
        let pool_xml = format!(
            "<pool type='dir'><name>{name}</name><target><path>{}</path></target></pool>",
            xml_escape(dir)
        );
        // Another caller may have created it in the meantime; look it up by name then.
        let pool = match StoragePool::create_xml(&self.conn.0, &pool_xml, 0) {
            Ok(pool) => pool,
            Err(err) => StoragePool::lookup_by_name(&self.conn.0, &name).map_err(|_| {
                HypervisorError::Libvirt {
                    op: "create storage pool",
                    domain: dir.to_owned(),
                    source: err,
                }
            })?,
        };
        pool.refresh(0).map_err(Self::err("refresh pool", dir))?;
        Ok(pool)
    }

    fn volume(&self, path: &str) -> Result<Option<StorageVol>, HypervisorError> {
        let dir = Path::new(path)
            .parent()
            .and_then(Path::to_str)
            .ok_or_else(|| HypervisorError::Failed {
                op: "find image",
                domain: path.to_owned(),
                reason: "path has no directory".into(),
            })?;
        let _pool = self.pool_for_dir(dir)?;
        match StorageVol::lookup_by_path(&self.conn.0, path) {
            Ok(vol) => Ok(Some(vol)),
            Err(err) if err.code() == ErrorNumber::NoStorageVolume => Ok(None),
            Err(err) => Err(HypervisorError::Libvirt {
                op: "find image",
                domain: path.to_owned(),
                source: err,
            }),
        }
    }
}

/// Where a resize of the domain `s` describes applies: the running guest, and its persistent
/// definition too if it has one; a guest that is not running only in its definition.
fn resize_flags(s: &DomainSummary) -> u32 {
    if s.state != DomainState::Running {
        return sys::VIR_DOMAIN_AFFECT_CONFIG;
    }
    if s.persistent {
        sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG
    } else {
        sys::VIR_DOMAIN_AFFECT_LIVE
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

impl Hypervisor for LibvirtHypervisor {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn host_info(&self) -> Result<HostInfo, HypervisorError> {
        let node = self
            .conn
            .0
            .get_node_info()
            .map_err(Self::err("node info", "-"))?;
        let free = self
            .conn
            .0
            .get_free_memory()
            .map_err(Self::err("free memory", "-"))?;
        Ok(HostInfo {
            hostname: self
                .conn
                .0
                .get_hostname()
                .map_err(Self::err("hostname", "-"))?,
            cpus: node.cpus,
            memory_kib: node.memory,
            free_memory_kib: free / 1024,
        })
    }

    fn list_domains(&self) -> Result<Vec<DomainSummary>, HypervisorError> {
        let mut out = self.ask_each_domain(0, |dom| self.summary(dom).map(Some))?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn domain(&self, name: &str) -> Result<Option<DomainSummary>, HypervisorError> {
        // A domain can vanish between the lookup and the questions, e.g. a half-made incoming
        // migration that a restarted libvirtd is cleaning up: that is "not here" too.
        match self.lookup(name).and_then(|dom| self.summary(&dom)) {
            Ok(summary) => Ok(Some(summary)),
            Err(e) if e.is_no_such_domain() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn stats(&self) -> Result<Vec<DomainStats>, HypervisorError> {
        let mut out = self.ask_each_domain(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE, |dom| {
            match self.domain_stats(dom) {
                // Stopped between listing and asking.
                Err(HypervisorError::Libvirt { source, .. })
                    if source.code() == ErrorNumber::OperationInvalid =>
                {
                    Ok(None)
                }
                other => other.map(Some),
            }
        })?;
        out.sort_by(|a, b| a.summary.name.cmp(&b.summary.name));
        Ok(out)
    }

    fn domain_xml(&self, name: &str) -> Result<String, HypervisorError> {
        self.lookup(name)?
            .get_xml_desc(0)
            .map_err(Self::err("get xml", name))
    }

    fn disks(&self, name: &str) -> Result<Vec<DiskInfo>, HypervisorError> {
        xml::disks(&self.domain_xml(name)?).map_err(|e| HypervisorError::Xml {
            domain: name.to_owned(),
            reason: e.to_string(),
        })
    }

    fn nics(&self, name: &str) -> Result<Vec<NicInfo>, HypervisorError> {
        xml::nics(&self.domain_xml(name)?).map_err(|e| HypervisorError::Xml {
            domain: name.to_owned(),
            reason: e.to_string(),
        })
    }

    fn define(&self, desc: &str) -> Result<String, HypervisorError> {
        let name = xml::domain_name(desc).map_err(|e| HypervisorError::Xml {
            domain: "?".into(),
            reason: e.to_string(),
        })?;
        check_c_string("define", &name, desc)?;
        let dom = Domain::define_xml(&self.conn.0, desc).map_err(Self::err("define", &name))?;
        dom.get_name().map_err(Self::err("define", &name))
    }

    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.lookup(name)?
            .create()
            .map(|_| ())
            .map_err(Self::err("start", name))
    }

    fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        self.lookup(name)?
            .shutdown()
            .map(|_| ())
            .map_err(Self::err("shutdown", name))
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        self.lookup(name)?
            .destroy()
            .map_err(Self::err("destroy", name))
    }

    fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        self.lookup(name)?
            .undefine_flags(sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_NVRAM)
            .map_err(Self::err("undefine", name))
    }

    fn set_vcpus(&self, name: &str, vcpus: u32) -> Result<(), HypervisorError> {
        let dom = self.lookup(name)?;
        let s = self.summary(&dom)?;
        if vcpus == 0 || vcpus > s.max_vcpus {
            return Err(HypervisorError::OutOfRange {
                op: "set vcpus",
                domain: name.to_owned(),
                value: u64::from(vcpus),
                min: 1,
                max: u64::from(s.max_vcpus),
            });
        }
        let flags = resize_flags(&s);
        dom.set_vcpus_flags(vcpus, flags)
            .map(|_| ())
            .map_err(Self::err("set vcpus", name))
    }

    fn set_memory(&self, name: &str, kib: u64) -> Result<(), HypervisorError> {
        let dom = self.lookup(name)?;
        let s = self.summary(&dom)?;
        // Below 64 MiB the tiny guest's kernel is at risk; libvirt would accept it.
        const MIN_KIB: u64 = 64 * 1024;
        if kib < MIN_KIB || kib > s.max_memory_kib {
            return Err(HypervisorError::OutOfRange {
                op: "set memory",
                domain: name.to_owned(),
                value: kib,
                min: MIN_KIB,
                max: s.max_memory_kib,
            });
        }
        let flags = resize_flags(&s);
        dom.set_memory_flags(kib, flags)
            .map(|_| ())
            .map_err(Self::err("set memory", name))
    }

    fn cpu_tuning(&self, name: &str) -> Result<CpuTuning, HypervisorError> {
        let dom = self.lookup(name)?;
        let info = dom
            .get_scheduler_parameters_flags(sys::VIR_DOMAIN_AFFECT_CURRENT)
            .map_err(|e| scheduler_error("read cpu tuning", name, e))?;
        let cap = match (info.global_bw.period, info.global_bw.quota) {
            (Some(period_us), Some(quota_us)) if quota_us > 0 => Some(CpuCap {
                period_us,
                quota_us,
            }),
            _ => None,
        };
        Ok(CpuTuning {
            shares: info.cpu_shares,
            cap,
        })
    }

    fn set_cpu_tuning(&self, name: &str, tuning: CpuTuning) -> Result<(), HypervisorError> {
        let dom = self.lookup(name)?;
        if let Some(cap) = tuning.cap
            && cap != CpuCap::UNLIMITED
            && (cap.period_us < 1000 || cap.period_us > 1_000_000 || cap.quota_us < 1000)
        {
            return Err(HypervisorError::OutOfRange {
                op: "set cpu cap",
                domain: name.to_owned(),
                value: cap.quota_us.max(0) as u64,
                min: 1000,
                max: 1_000_000,
            });
        }
        let info = SchedulerInfo {
            scheduler_type: "posix".into(),
            cpu_shares: tuning.shares,
            global_bw: SchedBandwidth {
                period: tuning.cap.map(|c| c.period_us),
                quota: tuning.cap.map(|c| c.quota_us),
            },
            ..Default::default()
        };
        dom.set_scheduler_parameters_flags(&info, sys::VIR_DOMAIN_AFFECT_LIVE)
            .map(|_| ())
            .map_err(|e| scheduler_error("set cpu tuning", name, e))
    }

    fn migrate(&self, name: &str, req: &MigrationRequest) -> Result<(), HypervisorError> {
        check_c_string("migrate", name, &req.dest_uri)?;
        let dom = self.lookup(name)?;
        let (flags, params) = migrate_flags_and_params(req);
        if let Some(ms) = req.tuning.max_downtime_ms
            && let Err(err) = dom.migrate_set_max_downtime(ms, 0)
        {
            // Not fatal: the migration still works with QEMU's default limit.
            tracing::warn!(domain = name, error = %err, "cannot set the downtime limit");
        }
        dom.migrate_to_uri3(Some(&req.dest_uri), params, flags)
            .map_err(Self::err("migrate", name))
    }

    fn job_progress(&self, name: &str) -> Result<Option<JobProgress>, HypervisorError> {
        let dom = self.lookup(name)?;
        self.job_stats(&dom, name, 0)
    }

    fn completed_job(&self, name: &str) -> Result<Option<JobProgress>, HypervisorError> {
        let dom = self.lookup(name)?;
        self.job_stats(&dom, name, sys::VIR_DOMAIN_JOB_STATS_COMPLETED)
    }

    fn abort_job(&self, name: &str) -> Result<(), HypervisorError> {
        let dom = self.lookup(name)?;
        // SAFETY: `dom` holds a valid reference for the duration of the call.
        let ret = unsafe { sys::virDomainAbortJob(dom.as_ptr()) };
        if ret == -1 {
            return Err(HypervisorError::Libvirt {
                op: "abort job",
                domain: name.to_owned(),
                source: virt::error::Error::last_error(),
            });
        }
        Ok(())
    }

    fn image_exists(&self, path: &str) -> Result<bool, HypervisorError> {
        Ok(self.volume(path)?.is_some())
    }

    fn create_overlay(
        &self,
        path: &str,
        backing: &str,
        backing_format: &str,
        capacity_bytes: u64,
    ) -> Result<(), HypervisorError> {
        let p = Path::new(path);
        let (Some(dir), Some(file)) = (
            p.parent().and_then(Path::to_str),
            p.file_name().and_then(|f| f.to_str()),
        ) else {
            return Err(HypervisorError::Failed {
                op: "create overlay",
                domain: path.to_owned(),
                reason: "not a file path".into(),
            });
        };
        check_c_string("create overlay", path, backing)?;
        let pool = self.pool_for_dir(dir)?;
        let vol_xml = format!(
            "<volume><name>{}</name><capacity unit='bytes'>{capacity_bytes}</capacity>\
             <target><format type='qcow2'/></target>\
             <backingStore><path>{}</path><format type='{}'/></backingStore></volume>",
            xml_escape(file),
            xml_escape(backing),
            xml_escape(backing_format)
        );
        StorageVol::create_xml(&pool, &vol_xml, 0)
            .map(|_| ())
            .map_err(Self::err("create overlay", path))
    }

    fn image_capacity(&self, path: &str) -> Result<u64, HypervisorError> {
        let vol = self.volume(path)?.ok_or_else(|| HypervisorError::Failed {
            op: "image capacity",
            domain: path.to_owned(),
            reason: "no such image".into(),
        })?;
        vol.get_info()
            .map(|i| i.capacity)
            .map_err(Self::err("image capacity", path))
    }

    fn delete_image(&self, path: &str) -> Result<(), HypervisorError> {
        match self.volume(path)? {
            Some(vol) => vol.delete(0).map_err(Self::err("delete image", path)),
            None => Ok(()),
        }
    }
}

/// libvirt's flags and parameters for `req`: a live, peer-to-peer migration with the disks,
/// defined only at the destination when it succeeds, aborted on any I/O error.
fn migrate_flags_and_params(req: &MigrationRequest) -> (u32, MigrateParameters) {
    let mut flags = sys::VIR_MIGRATE_LIVE
        | sys::VIR_MIGRATE_PEER2PEER
        | sys::VIR_MIGRATE_PERSIST_DEST
        | sys::VIR_MIGRATE_UNDEFINE_SOURCE
        | sys::VIR_MIGRATE_ABORT_ON_ERROR;
    flags |= match req.storage {
        StorageCopy::Incremental => sys::VIR_MIGRATE_NON_SHARED_INC,
        StorageCopy::Full => sys::VIR_MIGRATE_NON_SHARED_DISK,
    };
    let mut params = MigrateParameters {
        migrate_disks: req.disks.clone(),
        bandwidth: req.tuning.bandwidth_mib_s,
        uri: req.migrate_uri.clone(),
        ..Default::default()
    };
    if req.tuning.compress {
        // zstd at its fastest level on two multifd channels: each channel compresses in its
        // own thread; zero pages are skipped as ever. (QEMU's older threaded "mt" zlib is
        // gone since QEMU 9.1.)
        flags |= sys::VIR_MIGRATE_COMPRESSED | sys::VIR_MIGRATE_PARALLEL;
        params.compression = Some("zstd".into());
        params.compression_zstd_level = Some(1);
        params.parallel_connections = Some(2);
    }
    if req.tuning.tls {
        // QEMU's own TLS on the migration stream and, since libvirt 4.4, on the NBD disk copy;
        // the destination's certificate is checked against the data channel's host name
        // unless the request names another.
        flags |= sys::VIR_MIGRATE_TLS;
        params.tls_destination = req.tuning.tls_destination.clone();
    }
    (flags, params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MigrationTuning;

    // libvirt's in-process test driver: no daemon needed, so these run in CI.
    fn test_hv() -> LibvirtHypervisor {
        LibvirtHypervisor::open("test:///default").unwrap()
    }

    /// libvirt takes the XML of a [`crate::DomainSpec`] and keeps what Viola reads back: the
    /// disk, the NIC and both metadata elements (same prefix, two namespaces).
    #[test]
    fn the_test_driver_keeps_a_domain_spec() {
        let hv = test_hv();
        let name = format!("spec-{}", std::process::id());
        let spec = crate::DomainSpec {
            name: name.clone(),
            memory_mib: 256,
            max_memory_mib: 512,
            vcpus: 1,
            max_vcpus: 2,
            disk: "/img/spec vm's <disk>.qcow2".into(),
            bridge: "vbr-1".into(),
            mac: "52:54:00:12:34:56".into(),
            mtu: Some(1400),
            boot: crate::Boot::Kernel {
                kernel: "/guest/vmlinuz".into(),
                initrd: "/guest/initrd.img".into(),
                cmdline: crate::lab_cmdline(&name, None, Some(1400), true).unwrap(),
            },
            console_log: None,
            image_ref: Some("abc123".into()),
            violin: Some("blue".into()),
            tenant: Some("acme".into()),
            port_filter: None,
        };
        assert_eq!(hv.define(&spec.to_xml().unwrap()).unwrap(), name);
        let back = hv.domain_xml(&name).unwrap();
        // The test driver refuses undefine's flags; the domain stays in this process's driver.
        let _ = hv.undefine(&name);
        assert_eq!(xml::disks(&back).unwrap()[0].path, spec.disk);
        let nic = &xml::nics(&back).unwrap()[0];
        assert_eq!(nic.mac, "52:54:00:12:34:56");
        assert_eq!(nic.bridge.as_deref(), Some("vbr-1"));
        assert_eq!(
            xml::viola_vm_metadata(&back).unwrap(),
            Some(xml::VmMetadata {
                violin: Some("blue".into()),
                tenant: Some("acme".into()),
            })
        );
        assert!(
            back.contains("urn:viola:depot:1") && back.contains("ref=\"abc123\""),
            "{back}"
        );
    }

    #[test]
    fn lists_the_test_drivers_domain() {
        let hv = test_hv();
        let doms = hv.list_domains().unwrap();
        let test = doms.iter().find(|d| d.name == "test").unwrap();
        assert_eq!(test.state, DomainState::Running);
        assert!(test.max_vcpus >= test.vcpus);
    }

    #[test]
    fn missing_domain_is_none_and_no_such_domain() {
        let hv = test_hv();
        assert_eq!(hv.domain("no-such-vm").unwrap(), None);
        let err = hv.set_vcpus("no-such-vm", 1).unwrap_err();
        assert!(err.is_no_such_domain(), "{err}");
    }

    #[test]
    fn vcpus_beyond_maximum_are_refused_before_libvirt() {
        let hv = test_hv();
        let max = hv.domain("test").unwrap().unwrap().max_vcpus;
        let err = hv.set_vcpus("test", max + 1).unwrap_err();
        assert!(matches!(err, HypervisorError::OutOfRange { .. }), "{err}");
    }

    #[test]
    fn no_job_reads_as_none_instead_of_crashing() {
        let hv = test_hv();
        // The test driver may not implement job stats at all; either way no UB and no panic.
        match hv.job_progress("test") {
            Ok(p) => assert_eq!(p, None),
            Err(HypervisorError::Libvirt { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn nul_in_uri_is_refused() {
        let hv = test_hv();
        let req = MigrationRequest::new("qemu+tcp://x\0/system", vec![], StorageCopy::Incremental);
        assert!(hv.migrate("test", &req).is_err());
    }

    #[test]
    fn tls_is_asked_of_libvirt_only_when_requested() {
        let mut req = MigrationRequest {
            tuning: MigrationTuning {
                bandwidth_mib_s: Some(64),
                tls_destination: Some("b1".into()),
                ..MigrationTuning::default()
            },
            ..MigrationRequest::new(
                "qemu+tls://198.18.2.11/system",
                vec!["vda".into()],
                StorageCopy::Incremental,
            )
        };
        let (flags, params) = migrate_flags_and_params(&req);
        assert_eq!(flags & sys::VIR_MIGRATE_TLS, 0);
        assert_eq!(params.tls_destination, None);
        req.tuning.tls = true;
        let (flags, params) = migrate_flags_and_params(&req);
        assert_ne!(flags & sys::VIR_MIGRATE_TLS, 0);
        assert_ne!(flags & sys::VIR_MIGRATE_NON_SHARED_INC, 0);
        assert_eq!(params.tls_destination.as_deref(), Some("b1"));
        assert_eq!(params.migrate_disks, vec!["vda".to_owned()]);
    }
}
