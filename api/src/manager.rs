//! Messages on the manager's endpoint (ALPN `viola-adaptmgr/1`). One request per
//! bidirectional stream; the manager answers with one or more [`Response`] frames (a migration
//! streams `Progress` frames, then `Migrated`). Monitors may only send `Report` and `GuestAsk`; the CLI of an
//! administrator (role `cli`) and other managers may send the rest; a tenant's user (role
//! `user`) may send the violin, VM and image requests, which then see and change only that
//! tenant's violins, VMs and images.

use serde::{Deserialize, Serialize};

use crate::adaptation::{DecisionRecord, PolicyView};
use crate::domain::{DiskCounters, DomainState, NicCounters};
use crate::migration::{MigrationReport, MigrationStatus};

/// What a monitor pushes every interval (also its heartbeat).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    pub host: String,
    pub site: String,
    /// Increases by one per report; the manager ignores reports older than the last seen.
    pub seq: u64,
    pub sent_ms: u64,
    pub usage: HostUsage,
    pub vms: Vec<VmUsage>,
    pub probes: Vec<ProbeResult>,
}

/// Host figures from /proc.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostUsage {
    /// The machine's CPUs.
    pub cpus: u32,
    /// CPUs' worth of time the host may use when it is a partition (a cgroup quota) of a
    /// bigger machine; `None`: all of `cpus`.
    pub cpu_capacity: Option<f64>,
    /// CPUs' worth of busy time over the last interval (of the partition when it is one).
    pub cpu_busy: f64,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub net: Vec<NetUsage>,
    /// The host's overlay links, one per peer it has exchanged traffic with, from its overlay
    /// daemon's status (empty when the monitor is not given the daemon's control socket).
    #[serde(default)]
    pub links: Vec<LinkUsage>,
}

/// One overlay link of a host: bytes on the underlay to and from a peer (`site/host`), QUIC's
/// overhead included, and their rates over the last interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkUsage {
    pub peer: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_bps: f64,
    pub tx_bps: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetUsage {
    pub iface: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_bps: f64,
    pub tx_bps: f64,
}

/// One VM's figures from libvirt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmUsage {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    pub vcpus: u32,
    pub max_vcpus: u32,
    pub cpu_time_ns: u64,
    /// vCPUs' worth of busy time over the last interval (1.0 = one vCPU fully busy).
    pub cpu_busy: f64,
    pub memory_kib: u64,
    pub max_memory_kib: u64,
    pub balloon_kib: Option<u64>,
    pub rss_kib: Option<u64>,
    pub disks: Vec<DiskCounters>,
    pub nics: Vec<NicCounters>,
    /// Frames its host's bridge dropped from it so far (libvirt's nwfilter on its ports:
    /// another MAC or address than its own, or a protocol the filter refuses, such as IPv6
    /// under `clean-traffic`); `None` when its ports have no filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_filter_drops: Option<u64>,
}

/// A service-level probe (an HTTP GET against a service inside a VM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub name: String,
    pub url: String,
    pub ok: bool,
    pub latency_ms: Option<f64>,
    pub error: Option<String>,
}

/// Change a VM's size; `None` fields stay as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResize {
    pub vm: String,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    /// Cap in percent of one CPU (100 = one CPU).
    pub cap_percent: Option<u32>,
    pub shares: Option<u64>,
}

/// Give a VM's job a deadline (Virtual Services' computational service): from the progress
/// the job reports on its shepherd channel (`viola-ask progress DONE TOTAL`), the manager keeps
/// the VM's CPU cap at the smallest share that finishes the job by then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDeadline {
    pub vm: String,
    /// Seconds from now; `None` clears the deadline (the VM gets its cap from before back).
    pub in_s: Option<u64>,
    /// The most of a CPU it may get, percent; default its vCPUs' worth.
    pub max_cap_percent: Option<u32>,
}

/// Move a VM to another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMigrate {
    pub vm: String,
    pub to_host: String,
    pub bandwidth_mib_s: Option<u64>,
    /// Stage the base at the destination (incremental copy) rather than copy the whole disk.
    pub stage_base: bool,
    pub timeout_s: Option<u64>,
}

/// Make a violin: a private Ethernet over the hosts of `sites`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViolinCreate {
    /// Its name (`[a-z0-9-]`, 1 to 32 characters), unique in the federation.
    pub name: String,
    /// Its IPv4 subnet (`10.x.y.0/24`, inside 10.0.0.0/8, prefix /16 to /29); `None`: the
    /// manager picks `10.<id/256>.<id%256>.0/24`.
    pub subnet: Option<String>,
    /// The sites whose hosts carry it; empty: every site.
    #[serde(default)]
    pub sites: Vec<String>,
    /// Its MTU (68 to 9000): its bridges and TAPs on every host, its VMs' NICs and what DHCP
    /// tells them. `None`: the manager's `[vm_template] mtu`, else the overlay daemons' `mtu`.
    pub mtu: Option<u16>,
}

/// Make a VM from a depot image on a violin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    /// Its name (`[A-Za-z0-9_-]`, 1 to 48 characters); with `count`, the prefix of
    /// `NAME-1` .. `NAME-N`.
    pub name: String,
    pub violin: String,
    /// Depot image name (or manifest hash).
    pub image: String,
    /// Where: a host, else a site (the placement picks a host there), else any host of the
    /// violin's sites.
    pub host: Option<String>,
    pub site: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    /// The disk must be ready this many seconds after the request; refused at once when the
    /// depot's planner says it cannot be (default: 600 s).
    pub ready_by_s: Option<u64>,
    /// Make this many VMs at once (their images staged together, one plan); default 1.
    pub count: Option<u32>,
    /// An OpenSSH public key line the guest lets log in as root (needs a `[vm_template]` with
    /// direct kernel boot: the key travels on the kernel command line).
    pub ssh_key: Option<String>,
}

/// Put an image into a site's depot. On the same stream, the request frame is followed by
/// exactly `size` bytes: the image file (a self-contained qcow2 or raw image; a backing file
/// or an external data file is refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageImport {
    /// Its name (letters, digits, `.`, `_`, `-`; not starting with `_`, `.` or `-`). A
    /// tenant's image is its own: other tenants neither see nor use it.
    pub name: String,
    /// The site whose depot takes it (the others fetch it from there when they need it).
    pub site: String,
    pub size: u64,
    /// Point an existing name at the new content.
    #[serde(default)]
    pub replace: bool,
}

/// An image as `ImageList` shows it: one per name, over every site's depot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageView {
    /// The name `vm create --image` takes.
    pub name: String,
    /// The tenant it belongs to (`None`: the federation's, every tenant may use it).
    pub tenant: Option<String>,
    /// The manifest hash (hex) at the first site listed; differing sites are in `sites`.
    pub manifest: String,
    /// Size of the disk it presents, bytes.
    pub virtual_size: u64,
    /// Parts (layers) of its chain.
    pub parts: usize,
    /// The sites whose depot holds it complete.
    pub sites: Vec<String>,
    /// The sites whose depot knows the name but lacks parts (still fetching, or damaged).
    pub incomplete: Vec<String>,
}

/// A violin as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolinView {
    pub name: String,
    /// 24-bit virtual network id.
    pub id: u32,
    pub subnet: Option<String>,
    /// Sites whose hosts carry it (empty for a violin from the manager's configuration).
    pub sites: Vec<String>,
    /// Made through the API (`true`) or listed in the manager's configuration.
    pub managed: bool,
    /// The tenant it belongs to (`None`: an administrator's).
    pub tenant: Option<String>,
    /// Its own MTU, if it was given one at creation.
    pub mtu: Option<u16>,
    pub vms: Vec<ViolinMember>,
}

/// A VM of a violin with its addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolinMember {
    pub vm: String,
    pub mac: Option<String>,
    pub ip: Option<std::net::Ipv4Addr>,
    /// Where it runs (or last ran).
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Report(HostReport),
    ListHosts,
    ListVms,
    Resize(VmResize),
    Migrate(VmMigrate),
    /// Cancel a running migration of this VM.
    CancelMigration {
        vm: String,
    },
    /// Decisions of the policy loop with a sequence number above `after_seq`, oldest first, at
    /// most `limit` of them.
    Decisions {
        after_seq: u64,
        limit: u32,
    },
    /// The policy, mode and parameters in force.
    PolicyShow,
    ViolinCreate(ViolinCreate),
    ViolinList,
    ViolinShow {
        name: String,
    },
    /// Delete a violin; its VMs first, which needs `force` when it has any.
    ViolinDelete {
        name: String,
        force: bool,
    },
    /// Answered with `Step` frames while it works, then `Vms` (the VMs made).
    VmCreate(VmCreate),
    VmStart {
        vm: String,
    },
    /// Power a VM off (it stays defined, with its disk and address).
    VmStop {
        vm: String,
    },
    /// Remove a VM: stopped, undefined, its disk deleted, its address freed.
    VmDelete {
        vm: String,
    },
    /// The images of every site's depot that the caller may use.
    ImageList,
    /// Followed by the image's bytes (see [`ImageImport`]); answered with `Step` frames while
    /// it is received and imported, then `Images` with the image.
    ImageImport(ImageImport),
    /// A request a guest sent through its shepherd channel, forwarded by its host's monitor
    /// (monitors only, about a VM on their own host). Answered with `GuestAnswer` at once; a
    /// move the guest asked for then runs on the same stream (`Progress`, then `Migrated`).
    GuestAsk(GuestAsk),
    /// Set or clear a job deadline on a VM (answered with `Ack`).
    VmDeadline(VmDeadline),
}

/// What a monitor forwards from a guest's shepherd channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestAsk {
    pub host: String,
    pub site: String,
    /// The VM whose channel the line came from: the origin, which the guest cannot choose.
    pub vm: String,
    /// The line as the guest sent it (untrusted: the manager's shepherd parses it).
    pub line: String,
}

/// The shepherd's answer to a guest, written back on its channel as one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAnswer {
    pub accepted: bool,
    /// What was done, or why not.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ack,
    Hosts(Vec<HostView>),
    Vms(Vec<VmView>),
    Progress(MigrationStatus),
    Migrated(Box<MigrationReport>),
    Decisions(Vec<DecisionRecord>),
    Policy(Box<PolicyView>),
    Violins(Vec<ViolinView>),
    Images(Vec<ImageView>),
    GuestAnswer(GuestAnswer),
    /// Progress of a long request (one line for people).
    Step {
        message: String,
    },
    Error {
        message: String,
    },
}

/// Liveness as the manager's failure detector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Never reported yet.
    Unknown,
    Up,
    /// Declared failed (no heartbeat for the configured time) at `since_ms`.
    Failed {
        since_ms: u64,
    },
}

/// A host as `ListHosts` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    pub name: String,
    pub site: String,
    pub cpus: u32,
    pub memory_kib: u64,
    pub state: HostState,
    pub last_heartbeat_ms: Option<u64>,
    /// The monitor's last report of the host's usage.
    pub usage: Option<HostUsage>,
}

/// A VM as `ListVms` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    pub name: String,
    /// Where it runs (or last ran).
    pub host: String,
    pub violin: Option<String>,
    pub macs: Vec<String>,
    /// Its violin address, when the manager handed it out.
    pub ip: Option<std::net::Ipv4Addr>,
    pub state: DomainState,
    pub vcpus: u32,
    pub max_vcpus: u32,
    pub memory_kib: u64,
    pub max_memory_kib: u64,
    /// vCPUs' worth of CPU use in the last report.
    pub cpu_busy: f64,
    /// The persistent definition the manager keeps to re-instantiate the VM elsewhere if its
    /// host fails (`None` until it has fetched it).
    pub domain_xml: Option<String>,
    pub updated_ms: u64,
}
