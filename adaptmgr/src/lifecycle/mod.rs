//! Violins and VMs as a service: `viola violin create|list|show|delete` and
//! `viola vm create|start|stop|delete`.
//!
//! - A violin made here is the manager's: it picks the id and (unless given) the subnet
//!   ([`alloc`]), keeps it in the inventory and pushes it to the overlay daemon of every host
//!   of its sites (`set_violin` over their QUIC control endpoint): bridge and TAP appear at
//!   once, no TOML, no restart. At start the manager pushes every violin again, so a daemon
//!   that lost its state gets it back.
//! - A VM is placed (its host, else a site's hosts, else the violin's, through the configured
//!   policy's `place`), given a MAC and the next free address of the violin, pushed to the
//!   violin's daemons (they answer its DHCP and ARP, and accept its MAC only from its host),
//!   its disk staged by the site's depot before the deadline (refused at once, with the
//!   depot's predicted time, when the deadline cannot be met), then defined (domain XML from
//!   [`viola_hypervisor::domain::DomainSpec`], with its image, violin and tenant in the
//!   metadata) and started. `--count N` sends every staging request before waiting for any,
//!   so the depot plans them together.
//! - Nothing half-made: each VM of a create is journaled ([`PendingOp`]) before the first
//!   action; a failure undoes every VM of the request (domain, disk, address, inventory entry)
//!   and a manager that stopped in the middle undoes it at its next start
//!   ([`Manager::resume_pending`]); a delete is journaled too and finished at the next start.

pub mod alloc;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use viola_api::manager::{Response, ViolinCreate, ViolinMember, ViolinView, VmCreate, VmView};
use viola_api::overlay::{
    ControlReply, ControlRequest, MAX_VIOLIN_MTU as MAX_MTU, MIN_VIOLIN_MTU as MIN_MTU,
    ManagedVmSpec, ViolinSpec,
};
use viola_depot::api::{StageRequest, StageState, StageStatus};
use viola_depot::client::ClientError;
use viola_hypervisor::domain::{Boot, DomainSpec, PortFilter};
use viola_hypervisor::{Host, HypervisorError};

use crate::migration::depot_stage::DepotSession;

use self::alloc::{AllocError, Subnet};
use crate::inventory::{
    HostRecord, HostState, InventoryError, MemberRecord, PendingKind, PendingOp, PendingStage,
    ViolinRecord, VmRecord,
};
use crate::manager::{Manager, now_ms};
use crate::observe;
use crate::policy::{Placement, VmObs};
use crate::tenants::{self, Caller, QuotaExceeded, Usage};
use viola_api::domain::DomainState;

/// The most VMs one `vm create --count` makes.
pub const MAX_COUNT: u32 = 64;

/// How a new VM is defined: the domain's fixed parts (`[vm_template]` in the manager's
/// configuration).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmTemplate {
    /// Direct kernel boot (as the hosts see the files), for images without a boot loader such
    /// as the lab guest's; without it the VM boots from its disk.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    /// The kernel command line with direct kernel boot; `viola.name=NAME` is appended.
    pub cmdline: String,
    /// The serial console goes to `DIR/NAME.log` (as the hosts see it); else a pty.
    pub console_dir: Option<String>,
    /// The guest NIC's MTU (what fits the overlay daemons' `mtu`).
    pub mtu: Option<u32>,
    pub vcpus: u32,
    pub max_vcpus: u32,
    pub memory_mib: u64,
    pub max_memory_mib: u64,
    /// Seconds a VM's disk may take to be ready when the request gives no deadline.
    pub ready_by_s: u64,
    /// Port security: the libvirt nwfilter put on every VM's NIC with the VM's address, so
    /// the host's bridge drops what the guest sends from another MAC or IPv4 address (and ARP
    /// claiming them) before a guest on the same bridge sees it. `clean-traffic` (libvirt's
    /// own; it also drops IPv6 and every protocol but IPv4 and ARP), the name of a filter
    /// defined on every host, or `none` (no filter: a guest may take another's MAC).
    pub port_filter: String,
}

impl VmTemplate {
    /// Refuses a template no VM could be defined from (checked at the manager's start).
    pub fn check(&self) -> Result<(), viola_hypervisor::DomainError> {
        match self.port_filter_name() {
            Some(name) if !viola_hypervisor::domain::is_valid_filter_name(name) => Err(
                viola_hypervisor::DomainError::BadFilterName(name.to_owned()),
            ),
            _ => Ok(()),
        }
    }

    /// The nwfilter of [`VmTemplate::port_filter`], `None` for `none`.
    pub fn port_filter_name(&self) -> Option<&str> {
        (self.port_filter != "none").then_some(self.port_filter.as_str())
    }
}

impl Default for VmTemplate {
    fn default() -> Self {
        Self {
            kernel: None,
            initrd: None,
            cmdline: "console=ttyS0".to_owned(),
            console_dir: None,
            mtu: None,
            vcpus: 1,
            max_vcpus: 2,
            memory_mib: 256,
            max_memory_mib: 512,
            ready_by_s: 600,
            port_filter: "clean-traffic".to_owned(),
        }
    }
}

/// Why a violin request failed.
#[derive(Debug, thiserror::Error)]
pub enum ViolinError {
    #[error(transparent)]
    Invalid(#[from] AllocError),
    #[error("a violin named {0:?} exists")]
    Exists(String),
    #[error("violin MTU {0}: want {MIN_MTU} to {MAX_MTU}")]
    Mtu(u16),
    #[error("no violin named {0:?}")]
    Unknown(String),
    #[error("no site named {0:?}")]
    UnknownSite(String),
    #[error("violin {0:?} comes from the manager's configuration file; change it there")]
    Configured(String),
    #[error("violin {name:?} has VMs ({}); delete them first or give --force", vms.join(", "))]
    HasVms { name: String, vms: Vec<String> },
    #[error("the overlay daemon of {host} did not take violin {violin}: {reason}")]
    Overlay {
        host: String,
        violin: String,
        reason: String,
    },
    #[error("tenant {0:?} is not configured on this manager (no [[tenants]] table names it)")]
    UnknownTenant(String),
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    #[error("deleting VM {vm}")]
    DeleteVm {
        vm: String,
        #[source]
        source: Box<VmError>,
    },
    #[error("inventory")]
    Inventory(#[from] InventoryError),
}

/// Why a VM request failed (a create that fails has been undone).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Invalid(#[from] AllocError),
    #[error("a VM named {0:?} exists")]
    Exists(String),
    #[error("a domain or disk named {vm} exists at {host} (not made by this request)")]
    ExistsAtHost { vm: String, host: String },
    #[error("no VM named {0:?}")]
    Unknown(String),
    #[error("no violin named {0:?}")]
    UnknownViolin(String),
    #[error(
        "violin {0:?} comes from the manager's configuration file: create VMs on a violin made with `viola violin create`"
    )]
    ConfiguredViolin(String),
    #[error("--count must be 1 to {MAX_COUNT}")]
    BadCount,
    #[error(
        "--ssh-key needs a [vm_template] with direct kernel boot (the key travels on the kernel command line; cloud-init seeds are not built)"
    )]
    SshKeyNeedsKernelBoot,
    #[error("image name {0:?}: use letters, digits, '.', '_' and '-'")]
    BadImage(String),
    #[error("{0}")]
    NoPlace(String),
    #[error("no capacity for {vm} on {candidates}")]
    NoCapacity { vm: String, candidates: String },
    #[error("site {0} has no depot to stage images")]
    NoDepot(String),
    #[error(
        "the disk of {vm} cannot be ready by the deadline ({deadline_s} s from now){}: {message}",
        earliest_s.map(|s| format!("; the depot's earliest is {s} s from now")).unwrap_or_default()
    )]
    DeadlineImpossible {
        vm: String,
        deadline_s: u64,
        earliest_s: Option<u64>,
        message: String,
    },
    #[error("the depot of site {site} failed staging {vm}: {message}")]
    Staging {
        site: String,
        vm: String,
        message: String,
    },
    #[error("the depot of site {site}")]
    Depot {
        site: String,
        #[source]
        source: Box<ClientError>,
    },
    #[error("the overlay daemon of {host}: {reason}")]
    Overlay { host: String, reason: String },
    #[error("domain of {vm}")]
    Domain {
        vm: String,
        #[source]
        source: viola_hypervisor::domain::DomainError,
    },
    #[error("{vm} on {host}")]
    Hypervisor {
        vm: String,
        host: String,
        #[source]
        source: Box<HypervisorError>,
    },
    #[error("{0} is being migrated")]
    Busy(String),
    #[error(transparent)]
    Image(#[from] crate::images::ImageError),
    #[error("tenant {0:?} is not configured on this manager (no [[tenants]] table names it)")]
    UnknownTenant(String),
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    #[error("inventory")]
    Inventory(#[from] InventoryError),
}

impl VmError {
    /// For `map_err`: what the hypervisor of `host` said acting on `vm`.
    fn hypervisor<'a>(vm: &'a str, host: &'a str) -> impl Fn(HypervisorError) -> Self + Copy + 'a {
        move |source| Self::Hypervisor {
            vm: vm.to_owned(),
            host: host.to_owned(),
            source: Box::new(source),
        }
    }

    /// For `map_err`: what the depot of `site` said (or that it could not be reached).
    fn depot(site: &str) -> impl Fn(ClientError) -> Self + '_ {
        move |source| Self::Depot {
            site: site.to_owned(),
            source: Box::new(source),
        }
    }
}

/// Label `site/host` as the overlay daemons name hosts.
fn label(h: &HostRecord) -> String {
    format!("{}/{}", h.site, h.name)
}

impl ViolinRecord {
    /// The violin as the API shows it; `vms` gives where each member runs.
    pub fn view(&self, vms: &[VmRecord]) -> ViolinView {
        let host_of = |vm: &str| vms.iter().find(|v| v.name == vm).map(|v| v.host.clone());
        let mut members: Vec<ViolinMember> = self
            .members
            .iter()
            .map(|m| ViolinMember {
                vm: m.vm.clone(),
                mac: Some(m.mac.clone()),
                ip: Some(m.ip),
                host: host_of(&m.vm).or_else(|| Some(m.host.clone())),
            })
            .collect();
        for vm in &self.vms {
            if !self.members.iter().any(|m| &m.vm == vm) {
                members.push(ViolinMember {
                    vm: vm.clone(),
                    mac: vms
                        .iter()
                        .find(|v| &v.name == vm)
                        .and_then(|v| v.macs.first().cloned()),
                    ip: None,
                    host: host_of(vm),
                });
            }
        }
        ViolinView {
            name: self.name.clone(),
            id: self.vni,
            subnet: self.subnet.clone(),
            sites: self.sites.clone(),
            managed: self.managed,
            tenant: self.tenant.clone(),
            mtu: self.mtu,
            vms: members,
        }
    }
}

/// What a VM's record shows through the API, with the violin and address the violins give it;
/// only the VMs `caller` owns (a tenant's: those of its violins).
pub fn vm_views(caller: &Caller, vms: &[VmRecord], violins: &[ViolinRecord]) -> Vec<VmView> {
    let owner = |vm: &str| {
        violins
            .iter()
            .find(|v| v.members.iter().any(|m| m.vm == vm) || v.vms.iter().any(|n| n == vm))
            .and_then(|v| v.tenant.as_deref())
    };
    vms.iter()
        .filter(|v| caller.owns(owner(&v.name)))
        .map(|v| {
            let mut view = v.view();
            for violin in violins {
                if let Some(m) = violin.members.iter().find(|m| m.vm == v.name) {
                    view.violin = Some(violin.name.clone());
                    view.ip = Some(m.ip);
                } else if view.violin.is_none() && violin.vms.contains(&v.name) {
                    view.violin = Some(violin.name.clone());
                }
            }
            view
        })
        .collect()
}

/// One VM of a create, placed and addressed.
#[derive(Debug, Clone)]
struct NewVm {
    name: String,
    host: HostRecord,
    mac: String,
    ip: std::net::Ipv4Addr,
    disk: String,
    stage_id: Option<String>,
    /// Which depot stages its disk (its key in the sessions: a site, or a host's own depot).
    depot: String,
}

impl NewVm {
    /// Its journal entry: what an undo removes.
    fn pending(&self, violin: &str) -> PendingOp {
        PendingOp {
            kind: PendingKind::Create,
            vm: self.name.clone(),
            violin: violin.to_owned(),
            host: self.host.name.clone(),
            disk: self.disk.clone(),
            stage: self.stage_id.as_ref().map(|id| PendingStage {
                site: self.host.site.clone(),
                stage_id: id.clone(),
            }),
        }
    }
}

fn valid_image(image: &str) -> bool {
    (1..=200).contains(&image.len())
        && image
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Manager {
    /// Where the depot of `site` takes requests (`[[depots]]`).
    pub(crate) fn depot_addr(&self, site: &str) -> Option<SocketAddr> {
        self.cfg
            .depots
            .iter()
            .find(|d| d.site == site)
            .map(|d| d.addr)
    }

    /// The depot that lays down images on host `host` of site `site`, and its name in
    /// messages: the host's own depot agent when it has one, else the site's depot.
    pub(crate) fn staging_depot(
        &self,
        host: &str,
        site: &str,
    ) -> Result<(SocketAddr, String), VmError> {
        crate::migration::depot_stage::DepotHost {
            name: host.to_owned(),
            site: site.to_owned(),
            agent: self
                .cfg
                .hosts
                .iter()
                .find(|h| h.name == host)
                .and_then(|h| h.depot_agent),
        }
        .stager(self.depot_addr(site))
        .map_err(|_| VmError::NoDepot(site.to_owned()))
    }

    fn overlay_addr(&self, host: &str) -> Option<SocketAddr> {
        self.cfg
            .hosts
            .iter()
            .find(|h| h.name == host)
            .and_then(|h| h.overlay_addr)
    }

    /// The hosts that carry `violin`: every configured host of its sites.
    fn violin_hosts(&self, violin: &ViolinRecord) -> Result<Vec<HostRecord>, InventoryError> {
        Ok(self
            .inventory
            .hosts()?
            .into_iter()
            .filter(|h| violin.sites.contains(&h.site) && !h.libvirt_uri.is_empty())
            .collect())
    }

    /// The MTU of `violin`'s devices and its VMs' NICs: its own, else `[vm_template] mtu`
    /// (`None`: the overlay daemons' own `mtu`).
    fn violin_mtu(&self, violin: &ViolinRecord) -> Option<u32> {
        violin.mtu.map(u32::from).or(self.cfg.vm_template.mtu)
    }

    /// What the overlay daemons are told about `violin`.
    fn violin_spec(&self, violin: &ViolinRecord) -> Result<ViolinSpec, InventoryError> {
        let vms = self.inventory.vms()?;
        let hosts = self.inventory.hosts()?;
        let label_of = |name: &str| hosts.iter().find(|h| h.name == name).map(label);
        Ok(ViolinSpec {
            id: violin.vni,
            name: violin.name.clone(),
            allowed: violin.sites.iter().map(|s| format!("{s}/*")).collect(),
            subnet: violin.subnet.clone(),
            // What the VMs' NICs are given, so a DHCP guest agrees.
            mtu: self.violin_mtu(violin).and_then(|m| u16::try_from(m).ok()),
            vms: violin
                .members
                .iter()
                .map(|m| {
                    // Where it runs now (a migration moved it), else where it was created.
                    let host = vms
                        .iter()
                        .find(|v| v.name == m.vm)
                        .map_or(m.host.as_str(), |v| v.host.as_str());
                    ManagedVmSpec {
                        mac: m.mac.clone(),
                        ip: m.ip,
                        host: label_of(host),
                    }
                })
                .collect(),
        })
    }

    /// Sends `req` to the overlay daemon of `host` (none configured: nothing to tell).
    async fn tell_overlay(&self, host: &HostRecord, req: ControlRequest) -> Result<(), String> {
        let Some(addr) = self.overlay_addr(&host.name) else {
            tracing::info!(host = %host.name, "no overlay_addr configured: no overlay to tell");
            return Ok(());
        };
        match self.overlays.request(addr, req).await {
            Ok(ControlReply::Done) => Ok(()),
            Ok(ControlReply::Refused { reason }) => Err(reason),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(viola_common::errors::chain(&e)),
        }
    }

    /// Pushes `violin` to every host of its sites; the first refusal is the error (hosts
    /// already told keep the new spec, which a later push or the next start repeats).
    async fn push_violin(&self, violin: &ViolinRecord) -> Result<(), (String, String)> {
        let spec = self
            .violin_spec(violin)
            .map_err(|e| (String::from("inventory"), viola_common::errors::chain(&e)))?;
        let hosts = self
            .violin_hosts(violin)
            .map_err(|e| (String::from("inventory"), viola_common::errors::chain(&e)))?;
        let pushes = hosts.iter().map(|h| {
            let req = ControlRequest::SetViolin {
                violin: spec.clone(),
            };
            async move { (h.name.clone(), self.tell_overlay(h, req).await) }
        });
        for (host, result) in futures::future::join_all(pushes).await {
            result.map_err(|reason| (host, reason))?;
        }
        Ok(())
    }

    /// Pushes every violin made through the API to its hosts' overlay daemons (at start: a
    /// daemon that restarted without its state gets its violins back). Failures are logged.
    pub async fn push_all_violins(&self) -> Result<(), InventoryError> {
        for violin in self.inventory.violins()? {
            if violin.managed
                && let Err((host, reason)) = self.push_violin(&violin).await
            {
                tracing::warn!(violin = %violin.name, %host, %reason, "cannot push the violin");
            }
        }
        Ok(())
    }

    /// The quotas of `caller`'s tenant (`None` for an administrator: no quota).
    fn tenant_config(&self, caller: &Caller) -> Result<Option<&tenants::TenantConfig>, String> {
        match caller.tenant() {
            None => Ok(None),
            Some(t) => self
                .cfg
                .tenants
                .iter()
                .find(|c| c.name == t)
                .map(Some)
                .ok_or_else(|| t.to_owned()),
        }
    }

    /// `viola violin create`: the violin belongs to `caller`'s tenant (none for an
    /// administrator).
    pub async fn create_violin(
        &self,
        caller: &Caller,
        req: ViolinCreate,
    ) -> Result<ViolinView, ViolinError> {
        alloc::check_violin_name(&req.name)?;
        let quota = self
            .tenant_config(caller)
            .map_err(ViolinError::UnknownTenant)?;
        let allocation = self.allocation.lock().await;
        let violins = self.inventory.violins()?;
        if violins.iter().any(|v| v.name == req.name) {
            return Err(ViolinError::Exists(req.name));
        }
        if let Some(quota) = quota {
            let add = Usage {
                violins: 1,
                ..Usage::default()
            };
            tenants::check_quota(quota, tenants::usage_of(&quota.name, &violins), add)?;
        }
        let known_sites: BTreeSet<String> = self
            .inventory
            .hosts()?
            .into_iter()
            .filter(|h| !h.libvirt_uri.is_empty())
            .map(|h| h.site)
            .collect();
        let sites: Vec<String> = if req.sites.is_empty() {
            known_sites.iter().cloned().collect()
        } else {
            let mut sites = req.sites.clone();
            sites.sort();
            sites.dedup();
            if let Some(bad) = sites.iter().find(|s| !known_sites.contains(*s)) {
                return Err(ViolinError::UnknownSite(bad.clone()));
            }
            sites
        };
        if let Some(mtu) = req.mtu.filter(|m| !(MIN_MTU..=MAX_MTU).contains(m)) {
            return Err(ViolinError::Mtu(mtu));
        }
        let id = alloc::next_violin_id(&violins.iter().map(|v| v.vni).collect())?;
        let subnet = match &req.subnet {
            Some(text) => Subnet::parse(text)?,
            None => Subnet::default_for(id),
        };
        let record = ViolinRecord {
            name: req.name.clone(),
            vni: id,
            vms: Vec::new(),
            subnet: Some(subnet.to_string()),
            sites,
            managed: true,
            members: Vec::new(),
            tenant: caller.tenant().map(str::to_owned),
            mtu: req.mtu,
        };
        self.inventory.put_violin(&record)?;
        drop(allocation);
        if let Err((host, reason)) = self.push_violin(&record).await {
            // Nothing half-made: take it back from every host and forget it.
            self.withdraw_violin(&record).await;
            self.inventory.remove_violin(&record.name)?;
            return Err(ViolinError::Overlay {
                host,
                violin: record.name,
                reason,
            });
        }
        self.inventory.record(
            now_ms(),
            "violin_created",
            &record.name,
            serde_json::json!({
                "id": id, "subnet": record.subnet, "sites": record.sites, "tenant": record.tenant,
            }),
        )?;
        Ok(record.view(&[]))
    }

    /// Removes `violin` from its hosts' overlay daemons (bridges and TAPs go); failures logged.
    async fn withdraw_violin(&self, violin: &ViolinRecord) {
        let Ok(hosts) = self.violin_hosts(violin) else {
            return;
        };
        for h in hosts {
            let req = ControlRequest::RemoveViolin { violin: violin.vni };
            if let Err(reason) = self.tell_overlay(&h, req).await {
                tracing::warn!(violin = %violin.name, host = %h.name, %reason, "cannot remove the violin");
            }
        }
    }

    /// `viola violin list`: the violins `caller` owns.
    pub fn list_violins(&self, caller: &Caller) -> Result<Vec<ViolinView>, InventoryError> {
        let vms = self.inventory.vms()?;
        Ok(self
            .inventory
            .violins()?
            .iter()
            .filter(|v| caller.owns_violin(v))
            .map(|v| v.view(&vms))
            .collect())
    }

    /// `violin` if `caller` owns it; another tenant's is as unknown as a missing one.
    fn owned_violin(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Option<ViolinRecord>, InventoryError> {
        Ok(self
            .inventory
            .violin(name)?
            .filter(|v| caller.owns_violin(v)))
    }

    /// `viola violin delete`: its VMs first (with `force`), then the violin everywhere.
    pub async fn delete_violin(
        &self,
        caller: &Caller,
        name: &str,
        force: bool,
    ) -> Result<(), ViolinError> {
        let violin = self
            .owned_violin(caller, name)?
            .ok_or_else(|| ViolinError::Unknown(name.to_owned()))?;
        if !violin.managed {
            return Err(ViolinError::Configured(name.to_owned()));
        }
        let vms: Vec<String> = violin.members.iter().map(|m| m.vm.clone()).collect();
        if !vms.is_empty() && !force {
            return Err(ViolinError::HasVms {
                name: name.to_owned(),
                vms,
            });
        }
        // The violin goes from every host right after: no need to tell them of each VM.
        for vm in &vms {
            self.delete_vm_telling(vm, false)
                .await
                .map_err(|e| ViolinError::DeleteVm {
                    vm: vm.clone(),
                    source: Box::new(e),
                })?;
        }
        self.withdraw_violin(&violin).await;
        self.inventory.remove_violin(name)?;
        self.inventory.record(
            now_ms(),
            "violin_deleted",
            name,
            serde_json::json!({ "id": violin.vni, "vms": vms }),
        )?;
        Ok(())
    }

    /// Picks hosts for `names` among `candidates` with the configured policy's placement (on
    /// the VMs' full size, the VMs already there counted at theirs).
    fn place(
        &self,
        names: &[String],
        candidates: &[HostRecord],
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<Vec<HostRecord>, VmError> {
        let up: Vec<HostRecord> = candidates
            .iter()
            .filter(|h| h.state == HostState::Up && h.cpus > 0)
            .cloned()
            .collect();
        let names_of = |hs: &[HostRecord]| {
            hs.iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if up.is_empty() {
            return Err(VmError::NoPlace(format!(
                "no host up with a monitor among {}",
                names_of(candidates)
            )));
        }
        let resident: Vec<VmRecord> = self
            .inventory
            .vms()?
            .into_iter()
            .filter(|v| up.iter().any(|h| h.name == v.host))
            .collect();
        let params = self.cfg.policy.observe_params();
        let mut state = observe::observed_state(
            &up,
            &resident,
            &[],
            &Default::default(),
            &BTreeSet::new(),
            now_ms(),
            &params,
        );
        let mut placed = Placement::new(state.hosts.len());
        for (v, vm) in state.vms.clone().iter().enumerate() {
            if let Some(h) = vm.host {
                placed.add(&state, h, v);
            }
        }
        let mut policy = self.cfg.policy.build().map_err(|e| {
            VmError::NoPlace(format!("policy: {}", viola_common::errors::chain(&e)))
        })?;
        let mut out = Vec::new();
        for name in names {
            let ram = memory_mib as f64;
            state.vms.push(VmObs {
                name: name.clone(),
                violin: None,
                host: None,
                pes: vcpus.max(1),
                mips: params.pe_mips,
                ram_mb: ram,
                ram_reserved_mb: ram,
                bw_reserved_mbps: 0.0,
                requested_mips: 0.0,
                allocated_mips: 0.0,
                cpu_cap_mips: None,
                history: Vec::new(),
                in_migration: false,
                suspended: false,
                service: None,
            });
            let v = state.vms.len() - 1;
            let h = policy
                .place(&state, &placed, v)
                .ok_or_else(|| VmError::NoCapacity {
                    vm: name.clone(),
                    candidates: names_of(&up),
                })?;
            placed.add(&state, h, v);
            out.push(up[h].clone());
        }
        Ok(out)
    }

    /// `viola vm create`: makes the VMs or nothing; `progress` gets one line per step.
    pub async fn create_vms(
        &self,
        caller: &Caller,
        req: VmCreate,
        progress: mpsc::Sender<Response>,
    ) -> Result<Vec<VmView>, VmError> {
        let say = |message: String| {
            tracing::info!(%message, "vm create");
            let _ = progress.try_send(Response::Step { message });
        };
        let count = req.count.unwrap_or(1);
        if count == 0 || count > MAX_COUNT {
            return Err(VmError::BadCount);
        }
        alloc::check_vm_name(&req.name)?;
        let names = alloc::names_for(&req.name, count);
        for n in &names {
            alloc::check_vm_name(n)?;
        }
        if !valid_image(&req.image) {
            return Err(VmError::BadImage(req.image.clone()));
        }
        if let Some(key) = &req.ssh_key {
            alloc::ssh_key_param(key)?;
            if self.cfg.vm_template.kernel.is_none() {
                return Err(VmError::SshKeyNeedsKernelBoot);
            }
        }
        let quota = self.tenant_config(caller).map_err(VmError::UnknownTenant)?;
        // A tenant's own image of that name, else the federation's (asked of the depots of
        // the violin's sites before the allocation lock: it is a network round trip).
        let mut req = req;
        if let Some(v) = self.owned_violin(caller, &req.violin)? {
            req.image = self.resolve_image(caller, &req.image, &v.sites).await?;
        }
        // From the names' check to the addresses' record, one request at a time.
        let allocation = self.allocation.lock().await;
        let mut violin = self
            .owned_violin(caller, &req.violin)?
            .ok_or_else(|| VmError::UnknownViolin(req.violin.clone()))?;
        if !violin.managed {
            return Err(VmError::ConfiguredViolin(req.violin.clone()));
        }
        let subnet = Subnet::parse(violin.subnet.as_deref().unwrap_or_default())?;
        let existing = self.inventory.vms()?;
        let pending = self.inventory.pending()?;
        let all_violins = self.inventory.violins()?;
        for n in &names {
            let taken = existing.iter().any(|v| &v.name == n)
                || pending.iter().any(|p| &p.vm == n)
                || all_violins
                    .iter()
                    .any(|v| v.vms.contains(n) || v.members.iter().any(|m| &m.vm == n));
            if taken {
                return Err(VmError::Exists(n.clone()));
            }
        }
        // Where: the host, else the site, else the violin's sites.
        let candidates: Vec<HostRecord> = self
            .violin_hosts(&violin)?
            .into_iter()
            .filter(|h| req.site.as_ref().is_none_or(|s| &h.site == s))
            .filter(|h| req.host.as_ref().is_none_or(|n| &h.name == n))
            .collect();
        if candidates.is_empty() {
            return Err(VmError::NoPlace(format!(
                "no host of violin {} (sites {}) matches{}{}",
                violin.name,
                violin.sites.join(", "),
                req.site
                    .as_ref()
                    .map(|s| format!(" site {s}"))
                    .unwrap_or_default(),
                req.host
                    .as_ref()
                    .map(|h| format!(" host {h}"))
                    .unwrap_or_default(),
            )));
        }
        let t = &self.cfg.vm_template;
        let vcpus = req.vcpus.unwrap_or(t.vcpus).max(1);
        let memory_mib = req.memory_mib.unwrap_or(t.memory_mib).max(64);
        if let Some(quota) = quota {
            let add = Usage {
                violins: 0,
                vms: count,
                vcpus: vcpus.saturating_mul(count),
                memory_mib: memory_mib.saturating_mul(u64::from(count)),
            };
            tenants::check_quota(quota, tenants::usage_of(&quota.name, &all_violins), add)?;
        }
        let hosts = self.place(&names, &candidates, vcpus, memory_mib)?;
        for h in &hosts {
            self.staging_depot(&h.name, &h.site)?;
        }
        // Addresses: never one another VM of the violin holds.
        let mut used_ips: BTreeSet<_> = violin.members.iter().map(|m| m.ip).collect();
        let mut used_macs: BTreeSet<String> = all_violins
            .iter()
            .flat_map(|v| v.members.iter().map(|m| m.mac.clone()))
            .chain(existing.iter().flat_map(|v| v.macs.iter().cloned()))
            .collect();
        let mut new = Vec::new();
        for (name, host) in names.iter().zip(hosts) {
            let ip = subnet.next_free(&used_ips)?;
            let mac = alloc::mac_for(name, violin.vni, &used_macs)?;
            used_ips.insert(ip);
            used_macs.insert(mac.clone());
            new.push(NewVm {
                name: name.clone(),
                disk: self
                    .cfg
                    .images_host_dir
                    .join(format!("{name}.qcow2"))
                    .to_string_lossy()
                    .into_owned(),
                host,
                mac,
                ip,
                stage_id: None,
                depot: String::new(),
            });
        }
        // Anything found at a host from here on was made by this request (what the undo
        // removes), so nothing of that name may be there before.
        for vm in &new {
            let hv_err = VmError::hypervisor(&vm.name, &vm.host.name);
            let hv = Host::open(&self.connector, &vm.host.libvirt_uri)
                .await
                .map_err(hv_err)?;
            if hv.domain(&vm.name).await.map_err(hv_err)?.is_some()
                || hv.image_exists(&vm.disk).await.map_err(hv_err)?
            {
                return Err(VmError::ExistsAtHost {
                    vm: vm.name.clone(),
                    host: vm.host.name.clone(),
                });
            }
        }
        // Journal first, then hand out the addresses: a manager that stops from here on
        // undoes these VMs at its next start.
        for vm in &new {
            self.inventory.put_pending(&vm.pending(&violin.name))?;
        }
        for vm in &new {
            violin.members.push(MemberRecord {
                vm: vm.name.clone(),
                mac: vm.mac.clone(),
                ip: vm.ip,
                host: vm.host.name.clone(),
                image: req.image.clone(),
                vcpus,
                memory_mib,
            });
        }
        self.inventory.put_violin(&violin)?;
        drop(allocation);
        for vm in &new {
            say(format!(
                "{}: host {} (site {}), MAC {}, address {}",
                vm.name, vm.host.name, vm.host.site, vm.mac, vm.ip
            ));
        }
        let made = self
            .make_vms(&req, &violin, &mut new, vcpus, memory_mib, &say)
            .await;
        match made {
            Ok(()) => {
                let mut views = Vec::new();
                for vm in &new {
                    self.inventory.remove_pending(&vm.name)?;
                    self.inventory.record(
                        now_ms(),
                        "vm_created",
                        &vm.name,
                        serde_json::json!({
                            "violin": violin.name, "host": vm.host.name, "image": req.image,
                            "mac": vm.mac, "ip": vm.ip,
                        }),
                    )?;
                    views.push(self.inventory.vm(&vm.name)?);
                }
                let violins = self.inventory.violins()?;
                Ok(vm_views(
                    caller,
                    &views.into_iter().flatten().collect::<Vec<_>>(),
                    &violins,
                ))
            }
            Err(e) => {
                say(format!(
                    "failed: {}; undoing",
                    viola_common::errors::chain(&e)
                ));
                for vm in &new {
                    self.undo_create(&vm.pending(&violin.name), false).await;
                }
                // The violin without them, told once.
                if let Some(violin) = self.inventory.violin(&violin.name)?
                    && let Err((host, reason)) = self.push_violin(&violin).await
                {
                    tracing::warn!(violin = %violin.name, %host, %reason, "cannot update the violin after an undo");
                }
                Err(e)
            }
        }
    }

    /// The actions of a create, after the journal: overlays told, disks staged, domains
    /// defined and started, inventory records written.
    async fn make_vms(
        &self,
        req: &VmCreate,
        violin: &ViolinRecord,
        new: &mut [NewVm],
        vcpus: u32,
        memory_mib: u64,
        say: &(dyn Fn(String) + Sync),
    ) -> Result<(), VmError> {
        self.push_violin(violin)
            .await
            .map_err(|(host, reason)| VmError::Overlay { host, reason })?;
        let mut sessions = BTreeMap::new();
        if let Err(e) = self.stage_disks(req, new, say, &mut sessions).await {
            // The depots cannot be told to stop: wait until they are done with what they
            // started, so that the undo removes the disks they lay down.
            settle(&sessions, new).await;
            return Err(e);
        }
        for vm in new.iter_mut() {
            let spec = self.domain_spec(vm, violin, req, vcpus, memory_mib);
            let xml = spec.to_xml().map_err(|source| VmError::Domain {
                vm: vm.name.clone(),
                source,
            })?;
            let hv_err = VmError::hypervisor(&vm.name, &vm.host.name);
            let host = Host::open(&self.connector, &vm.host.libvirt_uri)
                .await
                .map_err(hv_err)?;
            host.define(&xml).await.map_err(hv_err)?;
            host.start(&vm.name).await.map_err(hv_err)?;
            self.inventory.put_vm(&VmRecord {
                name: vm.name.clone(),
                host: vm.host.name.clone(),
                violin: Some(violin.name.clone()),
                macs: vec![vm.mac.clone()],
                state: DomainState::Running,
                vcpus,
                max_vcpus: self.cfg.vm_template.max_vcpus.max(vcpus),
                memory_kib: memory_mib * 1024,
                max_memory_kib: self.cfg.vm_template.max_memory_mib.max(memory_mib) * 1024,
                cpu_busy: 0.0,
                domain_xml: Some(xml),
                cap_percent: None,
                deadline: None,
                updated_ms: now_ms(),
            })?;
            say(format!("{}: started on {}", vm.name, vm.host.name));
        }
        Ok(())
    }

    /// Asks each VM's site depot to stage its disk (every request before waiting for any, so
    /// the depots plan them together) and waits until all are ready.
    async fn stage_disks(
        &self,
        req: &VmCreate,
        new: &mut [NewVm],
        say: &(dyn Fn(String) + Sync),
        sessions: &mut BTreeMap<String, Box<dyn DepotSession>>,
    ) -> Result<(), VmError> {
        // Every staging request first, so the depots plan them together.
        let ready_by_s = req.ready_by_s.unwrap_or(self.cfg.vm_template.ready_by_s);
        let deadline_ms = now_ms() + ready_by_s * 1000;
        for vm in new.iter_mut() {
            let (addr, site) = self.staging_depot(&vm.host.name, &vm.host.site)?;
            if !sessions.contains_key(&site) {
                let session = self
                    .depot_link
                    .connect(addr)
                    .await
                    .map_err(VmError::depot(&site))?;
                sessions.insert(site.clone(), session);
            }
            vm.depot = site.clone();
            let status = sessions[&site]
                .stage(StageRequest {
                    image: req.image.clone(),
                    vm: vm.name.clone(),
                    host: vm.host.name.clone(),
                    deadline_unix_ms: deadline_ms,
                    reject_if_late: true,
                    chain_only: false,
                })
                .await
                .map_err(VmError::depot(&site))?;
            vm.stage_id = Some(status.stage_id.clone());
            // Journaled: a manager restarted from here on waits for this staging to end
            // before it removes the disk.
            self.inventory.put_pending(&vm.pending(&req.violin))?;
            check_stage(&vm.name, &site, deadline_ms, &status)?;
            say(format!(
                "{}: asked the depot of site {site} for image {}",
                vm.name, req.image
            ));
        }
        // The depots' verdicts on the deadline first (each has planned once it stops
        // resolving), so an impossible one is refused before any disk is waited for.
        for vm in new.iter() {
            let site = &vm.depot;
            let until = now_ms() + 30_000;
            loop {
                let status = stage_status(sessions, vm).await?;
                check_stage(&vm.name, site, status.deadline_unix_ms, &status)?;
                if status.state != StageState::Resolving || now_ms() > until {
                    say(format!(
                        "{}: depot of site {site} stages {} bytes, predicted ready in {} s",
                        vm.name,
                        status.bytes_total,
                        status
                            .predicted_ready_unix_ms
                            .map_or("?".to_owned(), |t| format!(
                                "{:.1}",
                                t.saturating_sub(now_ms()) as f64 / 1000.0
                            )),
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for vm in new.iter() {
            let site = &vm.depot;
            let mut last_reported = 0u64;
            loop {
                let status = stage_status(sessions, vm).await?;
                if status.state == StageState::Ready {
                    break;
                }
                check_stage(&vm.name, site, status.deadline_unix_ms, &status)?;
                if now_ms() > deadline_ms + 30_000 {
                    return Err(VmError::Staging {
                        site: site.clone(),
                        vm: vm.name.clone(),
                        message: format!("not ready 30 s after the deadline ({})", status.message),
                    });
                }
                if status.bytes_done >= last_reported + (32 << 20) {
                    last_reported = status.bytes_done;
                    say(format!(
                        "{}: {} of {} MiB staged",
                        vm.name,
                        status.bytes_done >> 20,
                        status.bytes_total >> 20
                    ));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            say(format!("{}: disk ready at {}", vm.name, vm.host.name));
        }
        Ok(())
    }

    fn domain_spec(
        &self,
        vm: &NewVm,
        violin: &ViolinRecord,
        req: &VmCreate,
        vcpus: u32,
        memory_mib: u64,
    ) -> DomainSpec {
        let t = &self.cfg.vm_template;
        // Checked when the request came in.
        let ssh_key = req
            .ssh_key
            .as_deref()
            .and_then(|k| alloc::ssh_key_param(k).ok())
            .map(|k| format!(" viola.ssh_key={k}"))
            .unwrap_or_default();
        let boot = match (&t.kernel, &t.initrd) {
            (Some(kernel), Some(initrd)) => Boot::Kernel {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: format!("{} viola.name={}{ssh_key}", t.cmdline, vm.name),
            },
            _ => Boot::Disk,
        };
        DomainSpec {
            name: vm.name.clone(),
            memory_mib,
            max_memory_mib: t.max_memory_mib.max(memory_mib),
            vcpus,
            max_vcpus: t.max_vcpus.max(vcpus),
            disk: vm.disk.clone(),
            bridge: format!("vio{}", violin.vni),
            mac: vm.mac.clone(),
            mtu: self.violin_mtu(violin),
            boot,
            console_log: t
                .console_dir
                .as_ref()
                .map(|d| format!("{d}/{}.log", vm.name)),
            image_ref: Some(req.image.clone()),
            violin: Some(violin.name.clone()),
            tenant: violin.tenant.clone(),
            port_filter: t.port_filter_name().map(|filter| PortFilter {
                filter: filter.to_owned(),
                ip: vm.ip,
            }),
        }
    }

    /// Undoes a create (or finishes a delete): no domain, no disk, no address, no record.
    /// Each step is tolerant of what is already gone; failures are logged and leave the
    /// journal entry for the next start.
    async fn undo_create(&self, op: &PendingOp, tell_overlays: bool) {
        match self.remove_vm_everywhere(op, tell_overlays).await {
            Ok(()) => {
                if let Err(e) = self.inventory.remove_pending(&op.vm) {
                    tracing::warn!(vm = %op.vm, error = %viola_common::errors::chain(&e), "cannot clear the journal");
                }
            }
            Err(e) => {
                tracing::warn!(vm = %op.vm, error = %viola_common::errors::chain(&e), "cannot remove the VM; will retry at the next start");
            }
        }
    }

    /// Removes `op.vm`'s domain (if it is of the violin), disk, address and record; with
    /// `tell_overlays`, pushes the violin without it (a caller removing several VMs, or the
    /// whole violin, tells the overlays once itself).
    async fn remove_vm_everywhere(
        &self,
        op: &PendingOp,
        tell_overlays: bool,
    ) -> Result<(), VmError> {
        // The host it runs on now (a migration may have moved it), else the one it was made on.
        let at = self
            .inventory
            .vm(&op.vm)?
            .map_or_else(|| op.host.clone(), |v| v.host);
        let host = self
            .inventory
            .host(&at)?
            .filter(|h| !h.libvirt_uri.is_empty());
        if let Some(host) = &host {
            let hv_err = VmError::hypervisor(&op.vm, &host.name);
            let hv = Host::open(&self.connector, &host.libvirt_uri)
                .await
                .map_err(hv_err)?;
            if let Some(domain) = hv.domain(&op.vm).await.map_err(hv_err)? {
                // Only a domain of this violin is ours to remove (its metadata says so).
                let xml = hv.domain_xml(&op.vm).await.map_err(hv_err)?;
                let ours = viola_hypervisor::xml::viola_vm_metadata(&xml)
                    .ok()
                    .flatten()
                    .is_some_and(|m| m.violin.as_deref() == Some(op.violin.as_str()));
                if !ours {
                    tracing::warn!(vm = %op.vm, host = %host.name, "a domain of that name is not of this violin: left alone, with its disk");
                } else {
                    if matches!(domain.state, DomainState::Running | DomainState::Paused) {
                        hv.destroy(&op.vm).await.map_err(hv_err)?;
                    }
                    hv.undefine(&op.vm).await.map_err(hv_err)?;
                    hv.delete_image(&op.disk).await.map_err(hv_err)?;
                }
            } else {
                hv.delete_image(&op.disk).await.map_err(hv_err)?;
            }
        }
        let allocation = self.allocation.lock().await;
        let changed = match self.inventory.violin(&op.violin)? {
            Some(mut violin) => {
                let before = violin.members.len();
                violin.members.retain(|m| m.vm != op.vm);
                violin.vms.retain(|v| v != &op.vm);
                let changed = violin.members.len() != before;
                if changed {
                    self.inventory.put_violin(&violin)?;
                }
                changed.then_some(violin)
            }
            None => None,
        };
        self.inventory.remove_vm(&op.vm)?;
        drop(allocation);
        if tell_overlays
            && let Some(violin) = changed
            && let Err((host, reason)) = self.push_violin(&violin).await
        {
            tracing::warn!(violin = %violin.name, %host, %reason, "cannot update the violin after removing a VM");
        }
        Ok(())
    }

    /// Undoes the creates and finishes the deletes a previous manager left in progress. Call
    /// once at start.
    pub async fn resume_pending(&self) -> Result<usize, InventoryError> {
        let pending = self.inventory.pending()?;
        for op in &pending {
            tracing::warn!(vm = %op.vm, kind = ?op.kind, "resolving a create or delete the previous manager left in progress");
            if let Some(stage) = &op.stage {
                self.settle_stage(stage, &op.host).await;
            }
            self.undo_create(op, true).await;
            self.inventory.record(
                now_ms(),
                match op.kind {
                    PendingKind::Create => "vm_create_undone",
                    PendingKind::Delete => "vm_delete_finished",
                },
                &op.vm,
                serde_json::to_value(op).unwrap_or_default(),
            )?;
        }
        Ok(pending.len())
    }

    /// `vm`'s violin and place in it, if `caller` owns it (else it is unknown to `caller`).
    /// Waits (at most 2 minutes) until `stage` has ended at its depot; a depot that cannot be
    /// reached or no longer knows it has nothing left to write.
    async fn settle_stage(&self, stage: &PendingStage, host: &str) {
        let Ok((addr, _)) = self.staging_depot(host, &stage.site) else {
            return;
        };
        match self.depot_link.connect(addr).await {
            Ok(session) => {
                tracing::info!(site = %stage.site, stage = %stage.stage_id, "waiting for the depot to finish a staging before undoing its create");
                settle_one(session.as_ref(), &stage.stage_id, now_ms() + 120_000).await;
            }
            Err(e) => {
                tracing::warn!(site = %stage.site, error = %viola_common::errors::chain(&e), "cannot reach the depot to wait for a staging")
            }
        }
    }

    fn member(&self, caller: &Caller, vm: &str) -> Result<(ViolinRecord, MemberRecord), VmError> {
        for violin in self.inventory.violins()? {
            if !caller.owns_violin(&violin) {
                continue;
            }
            if let Some(m) = violin.members.iter().find(|m| m.vm == vm) {
                let m = m.clone();
                return Ok((violin, m));
            }
        }
        Err(VmError::Unknown(vm.to_owned()))
    }

    /// `viola vm delete`: stopped, undefined, disk deleted, address freed.
    pub async fn delete_vm(&self, caller: &Caller, vm: &str) -> Result<(), VmError> {
        self.member(caller, vm)?;
        self.delete_vm_telling(vm, true).await
    }

    async fn delete_vm_telling(&self, vm: &str, tell_overlays: bool) -> Result<(), VmError> {
        let (violin, _) = self.member(&Caller::Admin, vm)?;
        if self.migrating_vms().contains(vm) {
            return Err(VmError::Busy(vm.to_owned()));
        }
        let rec = self.inventory.vm(vm)?;
        let op = PendingOp {
            kind: PendingKind::Delete,
            vm: vm.to_owned(),
            violin: violin.name.clone(),
            host: rec.map_or_else(
                || {
                    violin
                        .members
                        .iter()
                        .find(|m| m.vm == vm)
                        .map(|m| m.host.clone())
                        .unwrap_or_default()
                },
                |r| r.host,
            ),
            disk: self
                .cfg
                .images_host_dir
                .join(format!("{vm}.qcow2"))
                .to_string_lossy()
                .into_owned(),
            stage: None,
        };
        self.inventory.put_pending(&op)?;
        self.remove_vm_everywhere(&op, tell_overlays).await?;
        self.inventory.remove_pending(vm)?;
        self.inventory.record(
            now_ms(),
            "vm_deleted",
            vm,
            serde_json::to_value(&op).unwrap_or_default(),
        )?;
        Ok(())
    }

    async fn vm_host(&self, vm: &str) -> Result<Host, VmError> {
        let rec = self
            .inventory
            .vm(vm)?
            .ok_or_else(|| VmError::Unknown(vm.to_owned()))?;
        let host = self
            .inventory
            .host(&rec.host)?
            .filter(|h| !h.libvirt_uri.is_empty())
            .ok_or_else(|| VmError::NoPlace(format!("{vm}'s host {} is unknown", rec.host)))?;
        Host::open(&self.connector, &host.libvirt_uri)
            .await
            .map_err(VmError::hypervisor(vm, &host.name))
    }

    /// Ok if `caller` may act on `vm`: an administrator on any VM, a tenant on its violins'.
    pub(crate) fn check_owns_vm(&self, caller: &Caller, vm: &str) -> Result<(), VmError> {
        match caller {
            Caller::Admin => Ok(()),
            Caller::Tenant(_) => self.member(caller, vm).map(|_| ()),
        }
    }

    /// `viola vm start`.
    pub async fn start_vm(&self, caller: &Caller, vm: &str) -> Result<(), VmError> {
        self.check_owns_vm(caller, vm)?;
        let hv = self.vm_host(vm).await?;
        hv.start(vm)
            .await
            .map_err(VmError::hypervisor(vm, hv.uri()))?;
        self.inventory
            .record(now_ms(), "vm_started", vm, serde_json::Value::Null)?;
        Ok(())
    }

    /// `viola vm stop`: powers the VM off (it keeps its disk and address).
    pub async fn stop_vm(&self, caller: &Caller, vm: &str) -> Result<(), VmError> {
        self.check_owns_vm(caller, vm)?;
        if self.migrating_vms().contains(vm) {
            return Err(VmError::Busy(vm.to_owned()));
        }
        let hv = self.vm_host(vm).await?;
        hv.destroy(vm)
            .await
            .map_err(VmError::hypervisor(vm, hv.uri()))?;
        if let Some(mut rec) = self.inventory.vm(vm)? {
            rec.state = DomainState::ShutOff;
            self.inventory.put_vm(&rec)?;
        }
        self.inventory
            .record(now_ms(), "vm_stopped", vm, serde_json::Value::Null)?;
        Ok(())
    }
}

/// Where `vm`'s staging stands, as its site's depot says.
async fn stage_status(
    sessions: &BTreeMap<String, Box<dyn DepotSession>>,
    vm: &NewVm,
) -> Result<StageStatus, VmError> {
    let site = &vm.depot;
    let stage_id = vm.stage_id.as_deref().unwrap_or_default();
    sessions[site]
        .status(stage_id)
        .await
        .map_err(VmError::depot(site))
}

/// Waits (at most 2 minutes) until every staging that was started has ended, one way or the
/// other.
async fn settle(sessions: &BTreeMap<String, Box<dyn DepotSession>>, new: &[NewVm]) {
    let until = now_ms() + 120_000;
    for vm in new {
        let (Some(stage_id), Some(session)) = (&vm.stage_id, sessions.get(&vm.depot)) else {
            continue;
        };
        settle_one(session.as_ref(), stage_id, until).await;
    }
}

/// Waits until `stage_id` has ended (or the depot does not answer, or `until_ms`).
async fn settle_one(session: &dyn DepotSession, stage_id: &str, until_ms: u64) {
    while now_ms() < until_ms {
        match session.status(stage_id).await {
            Ok(s)
                if matches!(
                    s.state,
                    StageState::Resolving | StageState::Fetching | StageState::Assembling
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            _ => break,
        }
    }
}

/// Refuses a staging the depot will not finish by the deadline.
fn check_stage(
    vm: &str,
    site: &str,
    deadline_ms: u64,
    status: &StageStatus,
) -> Result<(), VmError> {
    let now = now_ms();
    // A staging that failed (before or after planning) is a failure, not a late deadline.
    if status.state == StageState::Failed {
        return Err(VmError::Staging {
            site: site.to_owned(),
            vm: vm.to_owned(),
            message: status.message.clone(),
        });
    }
    // The depot answers `resolving` first; its verdict on the deadline comes with the plan.
    if status.state == StageState::Rejected
        || (!status.accepted && status.state != StageState::Resolving)
    {
        return Err(VmError::DeadlineImpossible {
            vm: vm.to_owned(),
            deadline_s: deadline_ms.saturating_sub(now) / 1000,
            earliest_s: status
                .predicted_ready_unix_ms
                .map(|t| t.saturating_sub(now).div_ceil(1000)),
            message: status.message.clone(),
        });
    }
    Ok(())
}
