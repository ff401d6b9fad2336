//! Helpers shared by the mechanisms lab tests (`mech_*.rs`), included with `#[path]`.
//! Everything a test makes is named `vm-…` (namespace links, bridges, VMs) and removed again.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use viola_hypervisor::Hypervisor;
use viola_hypervisor::libvirt::LibvirtHypervisor;

pub const LAB_RUN: &str = "/run/viola-lab";
pub const LAB_DIR: &str = "/var/lib/viola-lab";
pub const GUEST_DIR: &str = "/var/cache/viola/guest";
/// The image directory as every lab host's libvirtd sees it (same path everywhere, which is what
/// storage migration needs).
pub const HOST_IMAGES: &str = "/var/lib/libvirt/images";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Panics with a clear message unless the lab and the guest are there.
pub fn require_lab(hosts: &[&str]) {
    let listed = std::fs::read_to_string(format!("{LAB_RUN}/hosts")).unwrap_or_default();
    for h in hosts {
        assert!(
            listed.lines().any(|l| l.trim() == *h),
            "lab host {h} is not up: run `scripts/lab.sh up` (and scripts/guest/build.sh) first"
        );
    }
    assert!(
        Path::new(GUEST_DIR).join("base.qcow2").exists(),
        "guest not built: run scripts/guest/build.sh"
    );
}

/// The manager's way to a host's libvirtd: its unix socket, visible from the root namespace.
pub fn manager_uri(host: &str) -> String {
    format!("qemu+unix:///system?socket={LAB_DIR}/hosts/{host}/run/libvirt-sock")
}

/// Underlay address of a lab host (`a1` → 198.18.1.11).
pub fn address(host: &str) -> String {
    let mut c = host.chars();
    let site = c.next().expect("host name") as u32 - 'a' as u32 + 1;
    let k: u32 = c.as_str().parse().expect("host number");
    format!("198.18.{site}.{}", 10 + k)
}

/// How one libvirtd reaches another for a peer-to-peer migration.
pub fn peer_uri(host: &str) -> String {
    format!("qemu+tcp://{}/system", address(host))
}

/// The host's image directory seen from the root namespace.
pub fn local_images(host: &str) -> PathBuf {
    PathBuf::from(format!("{LAB_DIR}/hosts/{host}/lib/images"))
}

/// The last `lines` lines of a guest's serial console at `host` (for failure messages: a guest
/// that stops answering usually says why there).
pub fn console_tail(host: &str, name: &str, lines: usize) -> String {
    let path = format!("{LAB_DIR}/hosts/{host}/log/{name}.console");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(no console at {path}: {e})"),
    }
}

pub fn open(host: &str) -> Arc<dyn Hypervisor> {
    Arc::new(LibvirtHypervisor::open(&manager_uri(host)).expect("connect to lab libvirtd"))
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs CMD inside lab host HOST's namespaces; returns stdout (panics on failure).
pub fn lab_exec(host: &str, args: &[&str]) -> String {
    let out = run(Command::new("bash")
        .arg(repo_root().join("scripts/lab.sh"))
        .args(["exec", host, "--"])
        .args(args));
    assert!(
        out.status.success(),
        "lab exec {host} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn lab_exec_status(host: &str, args: &[&str]) -> bool {
    run(Command::new("bash")
        .arg(repo_root().join("scripts/lab.sh"))
        .args(["exec", host, "--"])
        .args(args))
    .status
    .success()
}

/// Puts the guest's base image into `host`'s image directory (what the depot would stage).
pub fn stage_base(host: &str) {
    let dst = local_images(host).join("base.qcow2");
    if !dst.exists() {
        std::fs::create_dir_all(local_images(host)).expect("image dir");
        std::fs::copy(Path::new(GUEST_DIR).join("base.qcow2"), &dst).expect("copy base");
    }
}

/// A deterministic MAC for a test VM.
pub fn mac_for(name: &str) -> String {
    let h = name
        .bytes()
        .fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (h >> 16) & 0xff,
        (h >> 8) & 0xff,
        h & 0xff
    )
}

/// Domain XML of a lab guest: qcow2 overlay `HOST_IMAGES/NAME.qcow2` over the base, direct
/// kernel boot, virtio NIC on `bridge`, balloon, up to `max_vcpus` (ACPI is what lets the guest
/// see hot-plugged vCPUs).
pub fn guest_xml(
    name: &str,
    ip: &str,
    bridge: &str,
    vcpus: u32,
    max_vcpus: u32,
    mib: u32,
) -> String {
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mib}</memory>
  <currentMemory unit='MiB'>{mib}</currentMemory>
  <vcpu placement='static' current='{vcpus}'>{max_vcpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{GUEST_DIR}/vmlinuz</kernel><initrd>{GUEST_DIR}/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet viola.name={name} viola.ip={ip} viola.http=1</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{HOST_IMAGES}/{name}.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='bridge'>
      <mac address='{mac}'/>
      <source bridge='{bridge}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='/var/log/libvirt/{name}.console'/></serial>
    <memballoon model='virtio'><stats period='1'/></memballoon>
  </devices>
</domain>",
        mac = mac_for(name)
    )
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
    let overlay = format!("{HOST_IMAGES}/{name}.qcow2");
    let _ = hv.delete_image(&overlay);
    let base = format!("{HOST_IMAGES}/{base_file}");
    let cap = hv.image_capacity(&base).expect("base capacity");
    hv.create_overlay(&overlay, &base, "qcow2", cap)
        .expect("create overlay");
    hv.define(&guest_xml(name, ip, bridge, 1, max_vcpus, mib))
        .expect("define guest");
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

/// GET `/cgi-bin/viola?QUERY` on the guest at `ip`, from `host`'s namespace.
pub fn guest_http(host: &str, ip: &str, query: &str) -> Option<String> {
    let out = run(Command::new("bash")
        .arg(repo_root().join("scripts/lab.sh"))
        .args(["exec", host, "--", "curl", "-sf", "--max-time", "10"])
        .arg(format!("http://{ip}/cgi-bin/viola?{query}")));
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits (bounded) until the guest answers `info`.
pub fn wait_guest(host: &str, ip: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Some(info) = guest_http(host, ip, "info") {
            return info;
        }
        assert!(
            start.elapsed() < timeout,
            "guest {ip} did not answer from {host} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `key=value` from the guest's `info` answer.
pub fn info_value(info: &str, key: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits (bounded) until `check` holds, polling every 500 ms.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Removes test leftovers on drop, also when the test panics.
pub struct Cleanup(pub Vec<Box<dyn FnMut()>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for f in &mut self.0 {
            f();
        }
    }
}

/// PID of a lab host's libvirtd (the lab writes it).
pub fn libvirtd_pid(host: &str) -> Option<i32> {
    std::fs::read_to_string(format!("{LAB_DIR}/hosts/{host}/libvirtd.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Starts `host`'s libvirtd again the way the lab does (its cgroups, its namespaces, its
/// reaper), and waits until it answers.
pub fn restart_libvirtd(host: &str) {
    let out = run(
        Command::new(viola_labtests::repo_root().join("scripts/lab.sh"))
            .args(["start-libvirtd", host]),
    );
    assert!(
        out.status.success(),
        "restart libvirtd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Serialises the mechanisms lab tests (they share bridge names and hosts): hold the returned
/// file for the whole test.
pub fn lab_lock() -> std::fs::File {
    let f = std::fs::File::create("/tmp/viola-mech-lab.lock").expect("lock file");
    f.lock().expect("lock");
    f
}
