//! Helpers shared by Viola's lab tests (`tests/tests/*.rs`).
//!
//! A [`Lab`] is one instance of `scripts/lab.sh` (its own namespaces, libvirtds and files, so
//! tests may run side by side); it is torn down when dropped, also when a test panics. Guests
//! are the lab guest of `scripts/guest/`, driven over their small HTTP interface.
//!
//! Lab tests need root, libvirt, QEMU and the guest images (`scripts/setup.sh`). When those are
//! missing they fail with a message saying so; set `VIOLA_SKIP_LAB=1` to skip them explicitly.
//!
//! The modules hold what several lab tests share: [`daemons`] (building and running the
//! workspace's daemons), [`pki`] (certificates through `viola-ca`), [`depot`] (depot daemons in
//! lab hosts), [`overlay`] (overlay daemons and namespaces standing in for VMs) and, with the
//! `mech` feature, [`mech`] (the mechanisms tests on the default lab) and [`federation`] (a
//! manager, monitors and the CLI on it).

pub mod daemons;
pub mod depot;
#[cfg(feature = "mech")]
pub mod federation;
pub mod lifecycle;
#[cfg(feature = "mech")]
pub mod mech;
pub mod overlay;
pub mod pki;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where `scripts/guest/build.sh` puts the kernel, initrd and base image.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("VIOLA_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/viola/guest"))
}

/// Returns false (and says why) if lab tests were explicitly skipped; panics with a clear
/// message if the machine is not set up for them.
pub fn lab_tests_enabled() -> bool {
    if std::env::var_os("VIOLA_SKIP_LAB").is_some_and(|v| v == "1") {
        eprintln!("VIOLA_SKIP_LAB=1: lab test skipped");
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "lab tests need root (network namespaces, libvirtd); run scripts/test.sh as root or set VIOLA_SKIP_LAB=1"
    );
    for tool in [
        "libvirtd",
        "virsh",
        "qemu-system-x86_64",
        "qemu-img",
        "ip",
        "nsenter",
    ] {
        assert!(
            which(tool),
            "{tool} is missing: run scripts/setup.sh first (or set VIOLA_SKIP_LAB=1)"
        );
    }
    for file in ["vmlinuz", "initrd.img", "base.qcow2"] {
        assert!(
            guest_dir().join(file).exists(),
            "guest {file} missing in {}: run scripts/guest/build.sh",
            guest_dir().display()
        );
    }
    true
}

/// Panics naming the first of `tools` not on the PATH: the machine is not set up for a test
/// that needs more than the lab does.
pub fn assert_tools(tools: &[&str]) {
    for tool in tools {
        assert!(which(tool), "{tool} is missing: run scripts/setup.sh");
    }
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A progress line of a long lab test, written to stderr at once: the test harness holds back
/// what `eprintln!` prints until the test ends, which for a hung step is never.
pub fn progress(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "[lab test] {line}");
}

/// The longest run of echo requests left unanswered between two answers, in iputils `ping`
/// output (reply lines name their `icmp_seq`): the longest outage, in pings. Duplicates and
/// the order of the lines do not matter; requests after the last answer are not counted (the
/// run may have been stopped with them in flight).
pub fn longest_ping_gap(ping_stdout: &str) -> u64 {
    let mut seqs: Vec<u64> = ping_stdout
        .lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    seqs.windows(2).map(|w| w[1] - w[0] - 1).max().unwrap_or(0)
}

/// Runs a command, returning its output; an error if it could not start.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    Ok(out)
}

/// Runs a command and insists on success, returning stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One host as `lab.sh status --json` describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct LabHost {
    pub name: String,
    pub site: String,
    pub namespace: String,
    pub mount_namespace: String,
    pub address: String,
    pub libvirtd: String,
    /// How other lab hosts' libvirtds reach this one (`qemu+tls://ADDRESS/system`).
    pub libvirt_uri: String,
    /// The host's /etc/pki (its libvirt and QEMU certificates) seen from the root namespace.
    #[serde(default)]
    pub pki: String,
    pub images: String,
    pub host_uuid: String,
    pub domains: String,
    /// Its CPU capacity (`up --host-cpus`; `None`: it shares the whole machine).
    pub cpus: Option<f64>,
    /// Its cgroup subtree's directories (space-separated), where its libvirtd and QEMUs run.
    #[serde(default)]
    pub cgroups: String,
}

/// The lab as `lab.sh status --json` describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct LabStatus {
    pub up: bool,
    pub lab: String,
    #[serde(default)]
    pub lab_dir: String,
    /// The lab's CA (`viola-ca`), which issued every host's libvirt certificates.
    #[serde(default)]
    pub ca_dir: String,
    /// Whether QEMU accepts migrations without TLS (`lab.sh up --allow-plain-migration`).
    #[serde(default)]
    pub plain_migration_allowed: bool,
    #[serde(default)]
    pub sites: u32,
    #[serde(default)]
    pub wan_delay_ms: f64,
    #[serde(default)]
    pub wan_rate_mbit: f64,
    pub hosts: Vec<LabHost>,
}

/// Options for `lab.sh up`.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub sites: u32,
    pub hosts: u32,
    pub wan_delay_ms: u32,
    pub wan_rate_mbit: u32,
    pub nat_sites: Vec<String>,
    /// Let QEMU accept migrations without TLS (to measure what TLS costs).
    pub allow_plain_migration: bool,
    /// Each host's own CPU capacity in CPUs (`--host-cpus`); `None`: hosts share the machine.
    pub host_cpus: Option<f64>,
    /// Each host's image directory only inside the host (`--private-images`): no view of it
    /// from outside (`LabHost::images` is empty), as on separate machines.
    pub private_images: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        Self {
            sites: 2,
            hosts: 2,
            wan_delay_ms: 10,
            wan_rate_mbit: 200,
            nat_sites: Vec::new(),
            allow_plain_migration: false,
            host_cpus: None,
            private_images: false,
        }
    }
}

impl LabSpec {
    /// `sites` sites of one host each (what the overlay tests need), the rest as default.
    pub fn one_host_per_site(sites: u32) -> Self {
        Self {
            sites,
            hosts: 1,
            ..Self::default()
        }
    }
}

/// A lab instance; `Drop` runs `lab.sh down` if this value brought it up.
pub struct Lab {
    pub instance: String,
    pub status: LabStatus,
    /// Brought up by [`Lab::up`] (torn down on drop), not found by [`Lab::attach`].
    owned: bool,
}

impl Lab {
    /// Brings up lab `instance` (1-6 lowercase letters/digits, unique per test).
    pub fn up(instance: &str, spec: &LabSpec) -> Result<Self> {
        let mut cmd = Self::script(instance);
        cmd.arg("up")
            .args(["--sites", &spec.sites.to_string()])
            .args(["--hosts", &spec.hosts.to_string()])
            .args(["--wan-delay-ms", &spec.wan_delay_ms.to_string()])
            .args(["--wan-rate-mbit", &spec.wan_rate_mbit.to_string()]);
        for site in &spec.nat_sites {
            cmd.args(["--nat-site", site]);
        }
        if spec.allow_plain_migration {
            cmd.arg("--allow-plain-migration");
        }
        if let Some(cpus) = spec.host_cpus {
            cmd.args(["--host-cpus", &format!("{cpus:.2}")]);
        }
        if spec.private_images {
            cmd.arg("--private-images");
        }
        // Construct the guard first so a failed `up` is still torn down.
        let mut lab = Self::unread(instance, true);
        run_ok(cmd.stdout(Stdio::null()))?;
        lab.status = lab.read_status()?;
        Ok(lab)
    }

    /// The lab `instance` someone else brought up (`scripts/lab.sh up`, as `scripts/test.sh`
    /// does for the mechanisms tests); left up when dropped. An error if it is not up.
    pub fn attach(instance: &str) -> Result<Self> {
        let mut lab = Self::unread(instance, false);
        lab.status = lab.read_status()?;
        if !lab.status.up {
            bail!("lab {instance} is not up: run `scripts/lab.sh up` first");
        }
        Ok(lab)
    }

    /// Lab `instance` before its status has been read.
    fn unread(instance: &str, owned: bool) -> Self {
        Self {
            instance: instance.to_owned(),
            status: LabStatus {
                up: false,
                lab: instance.to_owned(),
                lab_dir: String::new(),
                ca_dir: String::new(),
                plain_migration_allowed: false,
                sites: 0,
                wan_delay_ms: 0.0,
                wan_rate_mbit: 0.0,
                hosts: Vec::new(),
            },
            owned,
        }
    }

    fn script(instance: &str) -> Command {
        let mut cmd = Command::new(repo_root().join("scripts/lab.sh"));
        cmd.env("VIOLA_LAB", instance);
        cmd
    }

    /// `lab.sh status --json`, parsed.
    pub fn read_status(&self) -> Result<LabStatus> {
        let json = run_ok(Self::script(&self.instance).args(["status", "--json"]))?;
        serde_json::from_str(&json).with_context(|| format!("bad lab status JSON: {json}"))
    }

    /// `viola-monitor` arguments for a monitor of `host` running in the root mount namespace:
    /// where the host's `/var/lib/libvirt` and `/run/libvirt` are from there (the VMs'
    /// shepherd channels are in one of them).
    pub fn monitor_libvirt_dirs(&self, host: &str) -> [String; 4] {
        let d = PathBuf::from(&self.status.lab_dir).join("hosts").join(host);
        [
            "--libvirt-state-dir".into(),
            d.join("lib").display().to_string(),
            "--libvirt-run-dir".into(),
            d.join("run").display().to_string(),
        ]
    }

    pub fn host(&self, name: &str) -> &LabHost {
        self.status
            .hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no lab host {name}"))
    }

    /// How a process outside `host`'s namespaces (a manager or monitor started with
    /// `ip netns exec`) reaches its libvirtd: the unix socket, visible from the root mount
    /// namespace. (`libvirt_uri` is TLS, with the client certificate in the host's own /etc/pki.)
    pub fn socket_uri(&self, host: &str) -> String {
        format!(
            "qemu+unix:///system?socket={}/hosts/{host}/run/libvirt-sock",
            self.status.lab_dir
        )
    }

    /// Where the lab keeps guest console logs (domain XML points serial output there).
    pub fn console_dir(&self) -> PathBuf {
        PathBuf::from(&self.status.lab_dir).join("console")
    }

    /// A command to run inside `host`'s network and mount namespace.
    pub fn cmd(&self, host: &str, program: &str) -> Command {
        let mut cmd = Self::script(&self.instance);
        cmd.args(["exec", host, "--", program]);
        cmd
    }

    /// Runs `sh -c script` inside `host`, insisting on success.
    pub fn sh(&self, host: &str, script: &str) -> Result<String> {
        run_ok(self.cmd(host, "sh").args(["-c", script]))
    }

    /// `virsh` against `host`'s own libvirtd.
    pub fn virsh(&self, host: &str, args: &[&str]) -> Result<String> {
        run_ok(
            self.cmd(host, "virsh")
                .args(["-c", "qemu:///system"])
                .args(args),
        )
    }

    /// Asserts that none of the domains `names` is defined at `host` and none left its disk
    /// (`NAME.qcow2`) in the host's images.
    pub fn assert_vms_gone(&self, host: &str, names: &[&str]) {
        let all = self.virsh(host, &["list", "--all", "--name"]).unwrap();
        for name in names {
            assert!(
                !all.lines().any(|l| l.trim() == *name),
                "{name} still defined at {host}"
            );
            assert!(
                !Path::new(&self.host(host).images)
                    .join(format!("{name}.qcow2"))
                    .exists(),
                "{name}'s disk still at {host}"
            );
        }
    }

    /// The state of `domain` on `host` (`running`, `paused`, `shut off`) or None if unknown there.
    pub fn domain_state(&self, host: &str, domain: &str) -> Option<String> {
        let out = run(self
            .cmd(host, "virsh")
            .args(["-c", "qemu:///system", "domstate", domain]))
        .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Live-migrates `domain` from `from` to `to` with its disk (`--copy-storage-inc`: the
    /// destination overlay must already exist with the same backing), peer to peer, over TLS
    /// (the lab's libvirtds and QEMUs take nothing else), keeping the definition only at the
    /// destination.
    pub fn migrate_with_disk(&self, domain: &str, from: &str, to: &str) -> Result<String> {
        self.virsh(
            from,
            &[
                "migrate",
                "--live",
                "--p2p",
                "--persistent",
                "--undefinesource",
                "--copy-storage-inc",
                "--tls",
                domain,
                &self.host(to).libvirt_uri,
            ],
        )
    }

    /// Tears the lab down now (also done on drop).
    pub fn down(&mut self) -> Result<()> {
        run_ok(
            Self::script(&self.instance)
                .arg("down")
                .stdout(Stdio::null()),
        )?;
        self.status.up = false;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(e) = run_ok(
            Self::script(&self.instance)
                .arg("down")
                .stdout(Stdio::null()),
        ) {
            eprintln!("lab {} teardown failed: {e:#}", self.instance);
        }
    }
}

/// A lab guest to define on a host; its domain XML comes from `scripts/guest/domain-xml.sh`,
/// the one source of it (scripts/demo.sh prints it there too).
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub name: String,
    pub ip_cidr: String,
    pub bridge: String,
    /// The directory of the guest's overlay as the host's libvirtd sees it.
    pub disk_dir: String,
    pub memory_mib: u32,
    pub max_memory_mib: u32,
    pub vcpus: u32,
    pub max_vcpus: u32,
    pub mtu: Option<u32>,
    pub cmdline_extra: String,
    /// The depot image the guest runs from, recorded in the domain's metadata.
    pub depot_image: Option<String>,
}

impl GuestSpec {
    pub fn new(name: &str, ip_cidr: &str, bridge: &str) -> Self {
        Self {
            name: name.to_owned(),
            ip_cidr: ip_cidr.to_owned(),
            bridge: bridge.to_owned(),
            disk_dir: "/var/lib/viola/images".to_owned(),
            memory_mib: 256,
            max_memory_mib: 512,
            vcpus: 1,
            max_vcpus: 2,
            mtu: None,
            cmdline_extra: String::new(),
            depot_image: None,
        }
    }

    pub fn ip(&self) -> &str {
        self.ip_cidr.split('/').next().unwrap_or(&self.ip_cidr)
    }

    /// The disk path inside every host (each host's own copy: no shared storage).
    pub fn disk_path(&self) -> String {
        format!("{}/{}.qcow2", self.disk_dir, self.name)
    }

    /// The domain XML from `scripts/guest/domain-xml.sh`.
    pub fn xml(&self, console_dir: &Path) -> Result<String> {
        let mut cmd = Command::new(repo_root().join("scripts/guest/domain-xml.sh"));
        cmd.env("VIOLA_CONSOLE_DIR", console_dir)
            .args(["--name", &self.name])
            .args(["--disk", &self.disk_path()])
            .args(["--bridge", &self.bridge])
            .args(["--ip", &self.ip_cidr])
            .args(["--memory-mib", &self.memory_mib.to_string()])
            .args(["--max-memory-mib", &self.max_memory_mib.to_string()])
            .args(["--vcpus", &self.vcpus.to_string()])
            .args(["--max-vcpus", &self.max_vcpus.to_string()]);
        if let Some(mtu) = self.mtu {
            cmd.args(["--mtu", &mtu.to_string()]);
        }
        if !self.cmdline_extra.is_empty() {
            cmd.args(["--cmdline-extra", &self.cmdline_extra]);
        }
        if let Some(image) = &self.depot_image {
            cmd.args(["--depot-image", image]);
        }
        run_ok(&mut cmd)
    }

    /// The MAC address of the guest's NIC, as its domain XML gives it.
    pub fn mac(&self, console_dir: &Path) -> Result<String> {
        let xml = self.xml(console_dir)?;
        xml.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("<mac address='")
                    .and_then(|r| r.strip_suffix("'/>"))
                    .map(str::to_owned)
            })
            .with_context(|| format!("no MAC in the domain XML of {}", self.name))
    }
}

/// Copies the guest base image into `host`'s image directory (its own copy, verified by
/// checksum) unless an identical one is there.
pub fn stage_base(lab: &Lab, host: &str) -> Result<()> {
    let src = guest_dir().join("base.qcow2");
    let dst = PathBuf::from(&lab.host(host).images).join("base.qcow2");
    if !dst.exists() {
        let tmp = dst.with_extension("qcow2.part");
        std::fs::copy(&src, &tmp).with_context(|| format!("copy {src:?} to {tmp:?}"))?;
        std::fs::rename(&tmp, &dst)?;
    }
    let sum = |p: &Path| run_ok(Command::new("sha256sum").arg(p)).map(|s| s[..64].to_owned());
    if sum(&src)? != sum(&dst)? {
        bail!("base image copy at {dst:?} does not match {src:?}");
    }
    Ok(())
}

/// Creates the guest's copy-on-write overlay on `host`, backed by the host's own base image.
pub fn create_overlay(lab: &Lab, host: &str, guest: &GuestSpec) -> Result<()> {
    lab.sh(
        host,
        &format!(
            "qemu-img create -q -f qcow2 -F qcow2 -b /var/lib/viola/images/base.qcow2 {}",
            guest.disk_path()
        ),
    )
    .map(|_| ())
}

/// Makes a Linux bridge `bridge` with `addr_cidr` inside `host` (for guests' NICs).
pub fn host_bridge(lab: &Lab, host: &str, bridge: &str, addr_cidr: &str) -> Result<()> {
    lab.sh(
        host,
        &format!(
            "ip link add {bridge} type bridge && ip link set {bridge} up && ip addr add {addr_cidr} dev {bridge}"
        ),
    )
    .map(|_| ())
}

/// Defines and starts `guest` on `host`, then waits until it answers ping from that host.
/// Returns the time from `virsh start` to the first answer.
pub fn boot_guest(lab: &Lab, host: &str, guest: &GuestSpec, timeout: Duration) -> Result<Duration> {
    let xml = guest.xml(&lab.console_dir())?;
    let xml_path = std::env::temp_dir().join(format!("viola-{}-{}.xml", lab.instance, guest.name));
    std::fs::write(&xml_path, xml)?;
    lab.virsh(host, &["define", xml_path.to_str().unwrap_or_default()])?;
    let start = Instant::now();
    lab.virsh(host, &["start", &guest.name])?;
    wait_ping(lab, host, guest.ip(), timeout)?;
    let answered = start.elapsed();
    // Ping answers as soon as the address is up; the HTTP interface follows a moment later.
    let left = timeout.saturating_sub(start.elapsed());
    poll_until(
        &format!("{} to answer HTTP (it answers ping)", guest.name),
        left,
        Duration::from_millis(100),
        || guest_http(lab, host, guest.ip(), "info").is_ok(),
    )?;
    Ok(answered)
}

/// Waits until `ip` answers one ping from inside `host`.
pub fn wait_ping(lab: &Lab, host: &str, ip: &str, timeout: Duration) -> Result<()> {
    poll_until(
        &format!("{ip} to answer ping from {host}"),
        timeout,
        Duration::from_millis(50),
        || {
            run(lab.cmd(host, "ping").args(["-c", "1", "-W", "0.2", ip]))
                .is_ok_and(|o| o.status.success())
        },
    )
}

/// Waits until `check` holds, asking every 200 ms; an error naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, check: impl FnMut() -> bool) -> Result<()> {
    poll_until(what, timeout, Duration::from_millis(200), check)
}

/// Waits until `check` holds, asking every `every`; an error naming `what` after `timeout`.
/// `check` is asked at least once.
pub fn poll_until(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if check() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// One action of the guest's HTTP interface (`/cgi-bin/viola?QUERY`), asked from `host`: its
/// answer, trimmed; an error if the guest does not answer, or answers with an HTTP error, within
/// 10 s.
pub fn guest_http(lab: &Lab, host: &str, ip: &str, query: &str) -> Result<String> {
    let out = run_ok(lab.cmd(host, "curl").args([
        "-sSf",
        "-m",
        "10",
        &format!("http://{ip}/cgi-bin/viola?{query}"),
    ]))?;
    Ok(out.trim().to_owned())
}

/// The `name` of each object of a JSON list (what the CLI's and the dashboard's lists hold), in
/// order; an object without a string `name` is left out. Panics when `list` is no list.
pub fn names(list: &serde_json::Value) -> Vec<&str> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect()
}

/// Parses `virsh domjobinfo --completed` into (key, value) pairs.
pub fn parse_jobinfo(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The first number in a `virsh domjobinfo` value ("343          ms" → 343.0).
pub fn jobinfo_number(info: &[(String, String)], key: &str) -> Option<f64> {
    info.iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_ping_gap_is_the_longest_run_of_unanswered_requests() {
        let out = "PING 10.0.1.2 (10.0.1.2) 56(84) bytes of data.\n\
            64 bytes from 10.0.1.2: icmp_seq=1 ttl=64 time=0.3 ms\n\
            64 bytes from 10.0.1.2: icmp_seq=2 ttl=64 time=0.3 ms\n\
            64 bytes from 10.0.1.2: icmp_seq=5 ttl=64 time=0.3 ms\n\
            64 bytes from 10.0.1.2: icmp_seq=4 ttl=64 time=40 ms\n\
            64 bytes from 10.0.1.2: icmp_seq=4 ttl=64 time=40 ms (DUP!)\n\
            64 bytes from 10.0.1.2: icmp_seq=17 ttl=64 time=0.3 ms\n\
            64 bytes from 10.0.1.2: icmp_seq=18 ttl=64 time=0.3 ms\n\
            \n--- 10.0.1.2 ping statistics ---\n\
            25 packets transmitted, 6 received, 76% packet loss, time 480ms\n";
        // 6..=16 unanswered; 3 alone; 19..=25 after the last answer are not an outage.
        assert_eq!(longest_ping_gap(out), 11);
        assert_eq!(longest_ping_gap("no answers at all"), 0);
    }

    #[test]
    fn jobinfo_is_parsed() {
        let info = parse_jobinfo(
            "Job type:         Completed\nTime elapsed:     4907         ms\nTotal downtime:   343          ms\n",
        );
        assert_eq!(jobinfo_number(&info, "Total downtime"), Some(343.0));
        assert_eq!(jobinfo_number(&info, "Time elapsed"), Some(4907.0));
        assert_eq!(jobinfo_number(&info, "Missing"), None);
    }

    #[test]
    fn the_one_domain_xml_carries_every_setting_of_the_spec() {
        let console = tempfile::tempdir().unwrap();
        let g = GuestSpec {
            disk_dir: "/var/lib/libvirt/images".into(),
            memory_mib: 192,
            max_memory_mib: 384,
            vcpus: 1,
            max_vcpus: 3,
            mtu: Some(1400),
            cmdline_extra: "viola.cpuburn=1".into(),
            depot_image: Some("abc123".into()),
            ..GuestSpec::new("vm-x", "10.77.9.5/24", "vm-br0")
        };
        let xml = g.xml(console.path()).unwrap();
        for want in [
            "<name>vm-x</name>",
            "<source file='/var/lib/libvirt/images/vm-x.qcow2'/>",
            "<source bridge='vm-br0'/>",
            "viola.ip=10.77.9.5/24",
            "viola.mtu=1400",
            "viola.cpuburn=1",
            "<memory unit='MiB'>384</memory>",
            "<currentMemory unit='MiB'>192</currentMemory>",
            "<vcpu placement='static' current='1'>3</vcpu>",
            "<viola:image xmlns:viola='urn:viola:depot:1' ref='abc123'/>",
            &format!("{}/vm-x.log", console.path().display()),
        ] {
            assert!(xml.contains(want), "{want} missing in\n{xml}");
        }
        let mac = g.mac(console.path()).unwrap();
        assert!(mac.starts_with("52:54:00:"), "{mac}");
        assert_eq!(mac, g.mac(console.path()).unwrap(), "the MAC is stable");
    }

    #[cfg(feature = "mech")]
    #[test]
    fn the_manager_reads_the_depot_image_the_domain_xml_records() {
        let console = tempfile::tempdir().unwrap();
        let g = GuestSpec {
            depot_image: Some("abc123".into()),
            ..GuestSpec::new("vm-x", "10.77.9.5/24", "vm-br0")
        };
        let xml = g.xml(console.path()).unwrap();
        assert_eq!(
            viola_adaptmgr::migration::depot_stage::depot_image(&xml).unwrap(),
            Some("abc123".to_owned())
        );
    }

    /// scripts/test.sh brings the default lab up for a test file with the line `// lab: default`:
    /// every file on the mechanisms helpers must have it, and only those.
    #[test]
    fn every_test_on_the_default_lab_says_so() {
        let dir = repo_root().join("tests/tests");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let marked = text.lines().any(|l| l.starts_with("// lab: default"));
            let uses = text.contains("viola_labtests::mech");
            assert_eq!(
                marked,
                uses,
                "{}: `// lab: default` and viola_labtests::mech go together",
                path.display()
            );
            seen += 1;
        }
        assert!(seen > 0, "no lab tests in {}", dir.display());
    }

    #[test]
    fn guest_disk_lives_in_the_hosts_private_image_dir() {
        let g = GuestSpec::new("g1", "10.1.0.5/24", "lan0");
        assert_eq!(g.disk_path(), "/var/lib/viola/images/g1.qcow2");
        assert_eq!(g.ip(), "10.1.0.5");
    }
}
