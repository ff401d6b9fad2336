//! The mechanisms lab tests' helpers (`mech_*.rs`): they run on the lab someone brought up
//! (`scripts/lab.sh up`, as `scripts/test.sh` does; `VIOLA_LAB` names another instance) and
//! drive its hosts through viola-hypervisor. Everything a test makes is named `vm-…`
//! (namespace links, bridges, VMs) and removed again by the guard [`begin`] returns.
//!
//! A test file on these helpers carries the line `// lab: default`: `scripts/test.sh` brings
//! the lab up for it (and removes it again after it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use viola_adaptmgr::migration::stage::{ImageDirView, MoveAnnouncer};
use viola_adaptmgr::migration::{LocalCopyStager, MigrationDeps, MigrationPlan, MigrationTuning};
use viola_hypervisor::Hypervisor;
use viola_hypervisor::libvirt::{LibvirtConnector, LibvirtHypervisor};

use crate::{GuestSpec, Lab, guest_dir, repo_root, run};

/// The image directory as every lab host's libvirtd sees it (same path everywhere, which is what
/// storage migration needs).
pub const HOST_IMAGES: &str = "/var/lib/libvirt/images";

/// The lab the mechanisms tests run on: `VIOLA_LAB`, else the default instance `vl`.
pub fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let instance = std::env::var("VIOLA_LAB").unwrap_or_else(|_| "vl".to_owned());
        Lab::attach(&instance).unwrap_or_else(|e| {
            panic!("{e:#} (and scripts/guest/build.sh: the mechanisms tests need the lab)")
        })
    })
}

/// The lab's own directory (its hosts' libvirt directories are below it).
pub fn lab_dir() -> PathBuf {
    PathBuf::from(&lab().status.lab_dir)
}

/// Panics with a clear message unless the lab with `hosts` and the guest are there.
pub fn require_lab(hosts: &[&str]) {
    for h in hosts {
        assert!(
            lab().status.hosts.iter().any(|l| l.name == *h),
            "lab host {h} is not up: run `scripts/lab.sh up` (and scripts/guest/build.sh) first"
        );
    }
    assert!(
        guest_dir().join("base.qcow2").exists(),
        "guest not built: run scripts/guest/build.sh"
    );
}

/// What a mechanisms test holds while it runs: the lab lock, and what removes the test's
/// guest and bridges again (in that order: first the extra steps added with
/// [`Cleanup::first`]), also when the test panics.
pub struct Cleanup {
    steps: Vec<Box<dyn FnMut()>>,
    _lock: std::fs::File,
}

impl Cleanup {
    /// Runs `step` before the steps already there.
    pub fn first(&mut self, step: impl FnMut() + 'static) {
        self.steps.insert(0, Box::new(step));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for f in &mut self.steps {
            f();
        }
    }
}

/// Starts a mechanisms test of guest `name` on `hosts`: checks the lab, takes the lab lock,
/// removes leftovers of an interrupted run, and returns the guard that removes the guest and
/// the test's bridges from every host of `hosts` at the end.
pub fn begin(hosts: &[&'static str], name: &'static str) -> Cleanup {
    require_lab(hosts);
    let lock = lab_lock();
    remove_guest(hosts, name);
    let hosts = hosts.to_vec();
    Cleanup {
        steps: vec![Box::new(move || {
            remove_guest(&hosts, name);
            remove_l2(&hosts);
        })],
        _lock: lock,
    }
}

/// [`begin`] for one guest `name` at `host`, booted there on a bridge of its own: the host at
/// `SUBNET.1/24`, the guest at `SUBNET.5` (one vCPU of at most `max_vcpus`, 256 MiB). Returns
/// the guard, the host's hypervisor and the guest's address.
pub fn begin_with_guest(
    host: &'static str,
    name: &'static str,
    subnet: &str,
    max_vcpus: u32,
) -> (Cleanup, Arc<dyn Hypervisor>, String) {
    let cleanup = begin(&[host], name);
    make_bridge(host, &format!("{subnet}.1/24"));
    let hv = open(host);
    let ip = format!("{subnet}.5");
    boot_guest(
        &hv,
        host,
        name,
        &format!("{ip}/24"),
        "vm-br0",
        max_vcpus,
        256,
    );
    (cleanup, hv, ip)
}

/// Guest `name`'s CPU cap at `host` in percent of one CPU, as libvirt has it now (`None`:
/// uncapped, or the host cannot say).
pub fn cap_percent(host: &str, name: &str) -> Option<i64> {
    let cap = open(host).cpu_tuning(name).ok()?.cap?;
    (cap.quota_us > 0).then(|| cap.quota_us * 100 / cap.period_us as i64)
}

/// The manager's way to a host's libvirtd: its unix socket, visible from the root namespace.
pub fn manager_uri(host: &str) -> String {
    format!(
        "qemu+unix:///system?socket={}/hosts/{host}/run/libvirt-sock",
        lab_dir().display()
    )
}

/// [`Lab::monitor_libvirt_dirs`](crate::Lab::monitor_libvirt_dirs) of the lab in use.
pub fn monitor_libvirt_dirs(host: &str) -> [String; 4] {
    lab().monitor_libvirt_dirs(host)
}

/// Underlay address of a lab host (`a1` → 198.18.1.11).
pub fn address(host: &str) -> String {
    lab().host(host).address.clone()
}

/// How one libvirtd reaches another for a peer-to-peer migration.
pub fn peer_uri(host: &str) -> String {
    lab().host(host).libvirt_uri.clone()
}

/// The host's image directory ([`HOST_IMAGES`] inside it) seen from the root namespace.
pub fn local_images(host: &str) -> PathBuf {
    lab_dir().join("hosts").join(host).join("lib/images")
}

/// How the migration stager sees the image directories of `hosts`: [`HOST_IMAGES`] inside
/// each host, [`local_images`] from here.
pub fn image_dir_views(hosts: &[&str]) -> BTreeMap<String, ImageDirView> {
    hosts
        .iter()
        .map(|h| {
            (
                manager_uri(h),
                ImageDirView {
                    host_dir: HOST_IMAGES.into(),
                    local_dir: local_images(h),
                },
            )
        })
        .collect()
}

/// What a migration between lab hosts needs: libvirt connections, the direct copy of bases
/// between the image directories of `hosts`, and `announcer`.
pub fn migration_deps<A: MoveAnnouncer>(
    hosts: &[&str],
    announcer: A,
) -> MigrationDeps<LocalCopyStager, A> {
    MigrationDeps {
        connector: Arc::new(LibvirtConnector),
        stager: LocalCopyStager::new(image_dir_views(hosts)),
        announcer,
        poll_interval: Duration::from_millis(200),
        reconnect_timeout: Duration::from_secs(60),
    }
}

/// A migration of `vm` between lab hosts with its base staged, at most `bandwidth_mib_s`,
/// over TLS (the lab's QEMUs refuse migrations without it).
pub fn migration_plan(vm: &str, from: &str, to: &str, bandwidth_mib_s: u64) -> MigrationPlan {
    MigrationPlan {
        vm: vm.into(),
        source_uri: manager_uri(from),
        dest_uri: manager_uri(to),
        dest_migration_uri: peer_uri(to),
        stage_base: true,
        timeout_ms: 300_000,
        tuning: MigrationTuning {
            bandwidth_mib_s: Some(bandwidth_mib_s),
            max_downtime_ms: Some(100),
            compress: false,
            tls: true,
            tls_destination: None,
        },
    }
}

/// The last `lines` lines of guest `name`'s serial console (for failure messages: a guest
/// that stops answering usually says why there). Every host's QEMU of the guest writes there.
pub fn console_tail(name: &str, lines: usize) -> String {
    let path = lab().console_dir().join(format!("{name}.log"));
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(no console at {}: {e})", path.display()),
    }
}

pub fn open(host: &str) -> Arc<dyn Hypervisor> {
    Arc::new(LibvirtHypervisor::open(&manager_uri(host)).expect("connect to lab libvirtd"))
}

/// Runs `args` inside lab host `host`'s namespaces; returns stdout (panics on failure).
pub fn lab_exec(host: &str, args: &[&str]) -> String {
    crate::run_ok(lab().cmd(host, args[0]).args(&args[1..]))
        .unwrap_or_else(|e| panic!("lab exec {host}: {e:#}"))
}

/// Runs `args` inside lab host `host`'s namespaces; whether it succeeded.
pub fn lab_exec_status(host: &str, args: &[&str]) -> bool {
    run(lab().cmd(host, args[0]).args(&args[1..])).is_ok_and(|o| o.status.success())
}

/// Puts the guest's base image into `host`'s image directory (what the depot would stage).
pub fn stage_base(host: &str) {
    let dst = local_images(host).join("base.qcow2");
    if !dst.exists() {
        std::fs::create_dir_all(local_images(host)).expect("image dir");
        std::fs::copy(guest_dir().join("base.qcow2"), &dst).expect("copy base");
    }
}

/// The lab guest `name` (`scripts/guest/domain-xml.sh`): its overlay `HOST_IMAGES/NAME.qcow2`,
/// a virtio NIC on `bridge`, `mib` MiB of memory (also the most: the balloon only shrinks it),
/// one vCPU of at most `max_vcpus` (ACPI is what lets the guest see hot-plugged vCPUs).
pub fn guest(name: &str, ip_cidr: &str, bridge: &str, max_vcpus: u32, mib: u32) -> GuestSpec {
    GuestSpec {
        disk_dir: HOST_IMAGES.to_owned(),
        memory_mib: mib,
        max_memory_mib: mib,
        vcpus: 1,
        max_vcpus,
        ..GuestSpec::new(name, ip_cidr, bridge)
    }
}

/// Creates `name`'s overlay on `host` and defines + starts the guest there.
pub fn boot_guest(
    hv: &Arc<dyn Hypervisor>,
    host: &str,
    name: &str,
    ip: &str,
    bridge: &str,
    max_vcpus: u32,
    mib: u32,
) {
    stage_base(host);
    boot_guest_on(hv, name, ip, bridge, max_vcpus, mib, "base.qcow2");
}

/// Like [`boot_guest`], over the base image `base_file` already in the host's image directory.
pub fn boot_guest_on(
    hv: &Arc<dyn Hypervisor>,
    name: &str,
    ip: &str,
    bridge: &str,
    max_vcpus: u32,
    mib: u32,
    base_file: &str,
) {
    let spec = guest(name, ip, bridge, max_vcpus, mib);
    let overlay = spec.disk_path();
    let _ = hv.delete_image(&overlay);
    let base = format!("{HOST_IMAGES}/{base_file}");
    let cap = hv.image_capacity(&base).expect("base capacity");
    hv.create_overlay(&overlay, &base, "qcow2", cap)
        .expect("create overlay");
    let xml = spec.xml(&lab().console_dir()).expect("domain XML");
    hv.define(&xml).expect("define guest");
    hv.start(name).expect("start guest");
}

/// Destroys and undefines `name` on every given host, and deletes its overlay there.
pub fn remove_guest(hosts: &[&str], name: &str) {
    for h in hosts {
        let Ok(hv) = LibvirtHypervisor::open(&manager_uri(h)) else {
            continue;
        };
        let _ = hv.destroy(name);
        let _ = hv.undefine(name);
        let _ = hv.delete_image(&format!("{HOST_IMAGES}/{name}.qcow2"));
    }
}

/// A bridge `vm-br0` in `host` with address `addr` (CIDR); guests attach to it.
pub fn make_bridge(host: &str, addr: &str) {
    let _ = lab_exec_status(host, &["ip", "link", "del", "vm-br0"]);
    lab_exec(host, &["ip", "link", "add", "vm-br0", "type", "bridge"]);
    lab_exec(host, &["ip", "addr", "add", addr, "dev", "vm-br0"]);
    lab_exec(host, &["ip", "link", "set", "vm-br0", "up"]);
}

/// Joins the `vm-br0` bridges of `hosts` into one L2 with a VXLAN mesh over the underlay
/// (head-end replication, no VXLAN learning: every unicast is flooded to all hosts, so a moved
/// MAC is found without relying on the kernel's learned entries, which were seen to go stale
/// after a move): a stand-in for the overlay in tests of the mechanisms alone.
pub fn make_l2(hosts: &[(&str, &str)]) {
    for (h, addr) in hosts {
        make_bridge(h, addr);
        let _ = lab_exec_status(h, &["ip", "link", "del", "vm-vx0"]);
        lab_exec(
            h,
            &[
                "ip",
                "link",
                "add",
                "vm-vx0",
                "type",
                "vxlan",
                "id",
                "4242",
                "dstport",
                "4789",
                "dev",
                "eth0",
                "local",
                &address(h),
                "nolearning",
            ],
        );
        for (other, _) in hosts.iter().filter(|(o, _)| o != h) {
            lab_exec(
                h,
                &[
                    "bridge",
                    "fdb",
                    "append",
                    "00:00:00:00:00:00",
                    "dev",
                    "vm-vx0",
                    "dst",
                    &address(other),
                ],
            );
        }
        lab_exec(
            h,
            &[
                "ip", "link", "set", "vm-vx0", "mtu", "1400", "master", "vm-br0", "up",
            ],
        );
        lab_exec(h, &["ip", "link", "set", "vm-br0", "mtu", "1400"]);
    }
}

pub fn remove_l2(hosts: &[&str]) {
    for h in hosts {
        let _ = lab_exec_status(h, &["ip", "link", "del", "vm-vx0"]);
        let _ = lab_exec_status(h, &["ip", "link", "del", "vm-br0"]);
    }
}

/// GET `/cgi-bin/viola?QUERY` on the guest at `ip`, from `host`'s namespace: the answer,
/// trimmed, or None if there was none.
pub fn guest_http(host: &str, ip: &str, query: &str) -> Option<String> {
    crate::guest_http(lab(), host, ip, query).ok()
}

/// Has the guest at `ip` write `word` to its disk (asked from `host`); panics unless it says ok.
pub fn write_marker(host: &str, ip: &str, word: &str) {
    assert_eq!(
        guest_http(host, ip, &format!("marker-write={word}")).as_deref(),
        Some("ok"),
        "marker-write={word} on {ip}"
    );
}

/// Waits (bounded) until the guest answers `info`; the answer.
pub fn wait_guest(host: &str, ip: &str, timeout: Duration) -> String {
    let mut info = None;
    wait_until(
        &format!("guest {ip} to answer from {host}"),
        timeout,
        || {
            info = guest_http(host, ip, "info");
            info.is_some()
        },
    );
    info.expect("an answer")
}

/// `key=value` from the guest's `info` answer.
pub fn info_value(info: &str, key: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits (bounded) until the guest at `ip` reports `key` with a value `ok` accepts.
pub fn wait_info(host: &str, ip: &str, key: &str, timeout: Duration, ok: impl Fn(u64) -> bool) {
    wait_until(&format!("guest {ip}: {key}"), timeout, || {
        guest_http(host, ip, "info")
            .and_then(|i| info_value(&i, key))
            .is_some_and(&ok)
    });
}

/// Waits (bounded) until `check` holds, polling every 500 ms; panics after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, check: impl FnMut() -> bool) {
    crate::poll_until(what, timeout, Duration::from_millis(500), check)
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Starts `migrate` (a `viola vm migrate` of `vm`) and returns it once libvirt's migration job
/// has run for 2 s at `from`: a test then interrupts the move mid-way. Stop the CLI with
/// [`stop_cli`] (its manager may be gone; it would wait for its idle timeout).
pub fn migration_under_way(mut migrate: Command, vm: &str, from: &str) -> std::process::Child {
    let child = migrate
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("viola vm migrate");
    let hv = open(from);
    wait_until(
        &format!("the migration job runs at {from}"),
        Duration::from_secs(60),
        || hv.job_progress(vm).ok().flatten().is_some(),
    );
    std::thread::sleep(Duration::from_secs(2));
    child
}

/// Stops a CLI process this test started (SIGTERM, by its PID) and reaps it.
pub fn stop_cli(mut cli: std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &cli.id().to_string()])
        .status();
    let _ = cli.wait();
}

/// Where an interrupted migration of `vm` between hosts `a` and `b` ended, once it is
/// resolved: it runs at exactly one of them, the other has neither its definition nor its disk,
/// and `recorded()` (where the manager has it) agrees.
pub fn resolved_migration(
    vm: &str,
    [a, b]: [&'static str; 2],
    recorded: impl Fn() -> Option<String>,
) -> Option<&'static str> {
    let running_at = |host: &str| {
        open(host)
            .domain(vm)
            .ok()
            .flatten()
            .is_some_and(|d| d.state == viola_hypervisor::DomainState::Running)
    };
    let (at_a, at_b) = (running_at(a), running_at(b));
    if at_a == at_b {
        return None;
    }
    let (here, other) = if at_a { (a, b) } else { (b, a) };
    let clean = open(other).domain(vm).ok().flatten().is_none()
        && !local_images(other).join(format!("{vm}.qcow2")).exists();
    (clean && recorded().as_deref() == Some(here)).then_some(here)
}

/// PID of a lab host's libvirtd (the lab writes it).
pub fn libvirtd_pid(host: &str) -> Option<i32> {
    std::fs::read_to_string(lab_dir().join(format!("hosts/{host}/libvirtd.pid")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Starts `host`'s libvirtd again the way the lab does (its cgroups, its namespaces, its
/// reaper), and waits until it answers.
pub fn restart_libvirtd(host: &str) {
    let out = run(Command::new(repo_root().join("scripts/lab.sh"))
        .env("VIOLA_LAB", &lab().instance)
        .args(["start-libvirtd", host]))
    .expect("lab.sh start-libvirtd");
    assert!(
        out.status.success(),
        "restart libvirtd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `host`'s libvirtd again if a test killed it (for cleanups).
pub fn revive_libvirtd(host: &str) {
    if libvirtd_pid(host).is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists()) {
        restart_libvirtd(host);
    }
}

/// Issues `host`'s libvirt and QEMU certificates again, from the lab's CA or, with `ca_dir`,
/// from that CA (a host from outside the federation), and restarts its libvirtd to serve them.
pub fn issue_libvirt_certs(host: &str, ca_dir: Option<&Path>) {
    let mut cmd = Command::new(repo_root().join("scripts/lab.sh"));
    cmd.env("VIOLA_LAB", &lab().instance)
        .args(["issue-libvirt", host]);
    if let Some(dir) = ca_dir {
        cmd.arg("--ca-dir").arg(dir);
    }
    crate::run_ok(&mut cmd).unwrap_or_else(|e| panic!("lab.sh issue-libvirt {host}: {e:#}"));
}

/// Serialises the mechanisms lab tests of a lab (they share bridge names and hosts): hold the
/// returned file for the whole test.
pub fn lab_lock() -> std::fs::File {
    let path = format!("/tmp/viola-mech-lab-{}.lock", lab().instance);
    let f = std::fs::File::create(path).expect("lock file");
    f.lock().expect("lock");
    f
}
