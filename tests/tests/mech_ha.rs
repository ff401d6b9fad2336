//! Lab, end to end through the daemons: `viola-adaptmgr` with `viola-monitor`s on a1 and a2
//! (QUIC + mutual TLS), the `viola` CLI; host a1 is killed (its monitor, libvirtd and guest
//! die) → the manager declares it failed after the configured time and re-instantiates the
//! guest on a2 from its image; when a1 returns, its stale definition is removed. And the
//! manager itself killed in the middle of a migration: its successor resolves it.

#[path = "mech_util.rs"]
mod util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use util::*;
use viola_common::identity::{CertificateAuthority, PeerIdentity, Role};

const HEARTBEAT_TIMEOUT_S: u64 = 6;

fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("debug").join(name)
}

fn build_daemons() {
    let status = Command::new(env!("CARGO"))
        .current_dir(repo_root())
        .args([
            "build",
            "-q",
            "-p",
            "viola-adaptmgr",
            "-p",
            "viola-monitor",
            "--bins",
        ])
        .status()
        .expect("cargo build");
    assert!(status.success(), "building the daemons failed");
}

fn issue(ca: &CertificateAuthority, dir: &Path, role: Role, site: &str, host: &str) -> PathBuf {
    let out = dir.join(format!("{role}-{host}"));
    ca.issue(&PeerIdentity::new(role, site, host).unwrap(), 2)
        .unwrap()
        .save(&out)
        .unwrap();
    out
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills (by PID) and reaps the daemons this test started.
struct Children(Vec<Child>);
impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn viola_json(mgr: &str, cli: &Path, args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new(bin("viola"))
        .args(["--manager", mgr, "--identity"])
        .arg(cli)
        .arg("--json")
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("viola {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn vm_host(mgr: &str, cli: &Path, vm: &str) -> Option<(String, bool)> {
    let vms = viola_json(mgr, cli, &["vm", "list"])?;
    vms.as_array()?.iter().find(|v| v["name"] == vm).map(|v| {
        (
            v["host"].as_str().unwrap_or_default().to_owned(),
            !v["domain_xml"].is_null(),
        )
    })
}

/// Writes the manager's configuration for `hosts` (name, site) with `extra` keys and tables
/// (top-level keys first), its inventory in `dir`.
fn write_manager_config(
    dir: &Path,
    listen: &str,
    identity: &Path,
    hosts: &[(&str, &str)],
    extra: &str,
) -> PathBuf {
    let mut toml = format!(
        "listen = \"{listen}\"\nmetrics_listen = \"127.0.0.1:{}\"\nidentity_dir = \"{}\"\ninventory = \"{}\"\n{extra}\n",
        free_port(),
        identity.display(),
        dir.join("inventory.redb").display()
    );
    for (h, site) in hosts {
        toml.push_str(&format!(
            "[[hosts]]\nname = \"{h}\"\nsite = \"{site}\"\nlibvirt_uri = \"{}\"\nmigration_uri = \"{}\"\nimages_local = \"{}\"\n\n",
            manager_uri(h),
            peer_uri(h),
            local_images(h).display()
        ));
    }
    let cfg = dir.join("adaptmgr.toml");
    std::fs::write(&cfg, toml).unwrap();
    cfg
}

fn start_monitor(manager: &str, host: &str, site: &str, identity: &Path) -> Child {
    Command::new(bin("viola-monitor"))
        .args(["--host", host, "--site", site, "--manager", manager])
        .args(["--interval-ms", "1000", "--libvirt-uri", &manager_uri(host)])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--identity")
        .arg(identity)
        .stderr(Stdio::null())
        .spawn()
        .expect("start viola-monitor")
}

#[test]
fn killed_host_guest_is_restarted_elsewhere_within_configured_time() {
    require_lab(&["a1", "a2"]);
    let _lock = lab_lock();
    build_daemons();
    let name = "vm-ha";
    let ip = "10.77.6.5";
    let qemu_pid_file = format!("{LAB_DIR}/hosts/a1/run/qemu/{name}.pid");
    let _cleanup = Cleanup(vec![Box::new(move || {
        if libvirtd_pid("a1").is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            restart_libvirtd("a1");
        }
        remove_guest(&["a1", "a2"], name);
        remove_l2(&["a1", "a2"]);
    })]);
    remove_guest(&["a1", "a2"], name); // leftovers of an interrupted run
    make_bridge("a1", "10.77.6.1/24");
    make_bridge("a2", "10.77.6.2/24");

    // Identities.
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("viola-test", 2).unwrap();
    let mgr_id = issue(&ca, tmp.path(), Role::Adaptmgr, "fed", "mgr");
    let cli_id = issue(&ca, tmp.path(), Role::Cli, "fed", "tester");
    let port = free_port();
    let mgr = format!("127.0.0.1:{port}");
    let cfg = write_manager_config(
        tmp.path(),
        &mgr,
        &mgr_id,
        &[("a1", "a"), ("a2", "a")],
        &format!("heartbeat_timeout_s = {HEARTBEAT_TIMEOUT_S}\n"),
    );
    let mut children = Children(vec![start_manager(&cfg)]);
    let mut monitor_of = std::collections::BTreeMap::new();
    for h in ["a1", "a2"] {
        let id = issue(&ca, tmp.path(), Role::Monitor, "a", h);
        let child = start_monitor(&mgr, h, "a", &id);
        monitor_of.insert(h, children.0.len());
        children.0.push(child);
    }

    // The guest's base is at both hosts (as the depot keeps it at every site of the VM).
    stage_base("a2");
    let hv_a1 = open("a1");
    boot_guest(&hv_a1, "a1", name, &format!("{ip}/24"), "vm-br0", 1, 256);
    wait_until(
        "the manager knows the guest on a1 with its definition",
        Duration::from_secs(60),
        || vm_host(&mgr, &cli_id, name) == Some(("a1".into(), true)),
    );
    // Both monitors report on their own clock; a2's first report may come after the guest's.
    wait_until(
        "both hosts are up in the manager's view",
        Duration::from_secs(30),
        || {
            viola_json(&mgr, &cli_id, &["host", "list"])
                .and_then(|h| h.as_array().cloned())
                .is_some_and(|h| h.len() == 2 && h.iter().all(|h| h["state"] == "up"))
        },
    );

    // Kill host a1: its monitor, its libvirtd and its guest's QEMU (PIDs we started or the lab
    // recorded; nothing found by name).
    let qemu_pid = std::fs::read_to_string(&qemu_pid_file)
        .expect("qemu pid")
        .trim()
        .to_owned();
    let mon = &mut children.0[monitor_of["a1"]];
    let _ = Command::new("kill")
        .args(["-KILL", &mon.id().to_string()])
        .status();
    let _ = mon.wait();
    let libvirtd = libvirtd_pid("a1").expect("a1 libvirtd").to_string();
    assert!(
        Command::new("kill")
            .args(["-KILL", &libvirtd, &qemu_pid])
            .status()
            .unwrap()
            .success()
    );
    let killed_at = Instant::now();

    wait_until(
        "the manager restarts the guest on a2",
        Duration::from_secs(HEARTBEAT_TIMEOUT_S + 30),
        || vm_host(&mgr, &cli_id, name).is_some_and(|(h, _)| h == "a2"),
    );
    let restarted_after = killed_at.elapsed();
    let hv_a2 = open("a2");
    let d = hv_a2.domain(name).unwrap().expect("defined on a2");
    assert_eq!(d.state, viola_hypervisor::DomainState::Running);
    let hosts = viola_json(&mgr, &cli_id, &["host", "list"]).expect("host list");
    let a1 = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "a1")
        .unwrap()
        .clone();
    assert!(a1["state"].get("failed").is_some(), "{a1}");
    wait_guest("a2", ip, Duration::from_secs(180));
    eprintln!(
        "guest running on a2 {:.1} s after a1 was killed (heartbeat timeout {HEARTBEAT_TIMEOUT_S} s); answering after {:.1} s",
        restarted_after.as_secs_f64(),
        killed_at.elapsed().as_secs_f64()
    );
    assert!(restarted_after >= Duration::from_secs(HEARTBEAT_TIMEOUT_S - 1));

    // a1 comes back: libvirtd restarted, its monitor reports again → the stale copy is fenced.
    restart_libvirtd("a1");
    let id = tmp.path().join("monitor-a1");
    children.0.push(start_monitor(&mgr, "a1", "a", &id));
    wait_until(
        "a1's stale definition is removed",
        Duration::from_secs(60),
        // Just restarted, libvirtd may still refuse calls: an error means "not yet".
        || matches!(open("a1").domain(name), Ok(None)),
    );
    assert_eq!(
        vm_host(&mgr, &cli_id, name).map(|(h, _)| h),
        Some("a2".into())
    );
}

fn start_manager(cfg: &Path) -> Child {
    Command::new(bin("viola-adaptmgr"))
        .arg("--config")
        .arg(cfg)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start viola-adaptmgr")
}

/// The manager is killed (SIGKILL) while it migrates a guest a1 → b1; a new manager started on
/// the same inventory finds the journaled migration and resolves it: the guest runs at exactly
/// one host, answers there, the inventory says which, and nothing half-made stays behind.
#[test]
fn manager_killed_mid_migration_is_resolved_by_its_successor() {
    require_lab(&["a1", "b1"]);
    let _lock = lab_lock();
    build_daemons();
    let name = "vm-mgr-kill";
    let ip = "10.77.8.5";
    let _cleanup = Cleanup(vec![Box::new(move || {
        remove_guest(&["a1", "b1"], name);
        remove_l2(&["a1", "b1"]);
    })]);
    remove_guest(&["a1", "b1"], name); // leftovers of an interrupted run
    make_bridge("a1", "10.77.8.1/24");
    make_bridge("b1", "10.77.8.2/24");

    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("viola-test", 2).unwrap();
    let mgr_id = issue(&ca, tmp.path(), Role::Adaptmgr, "fed", "mgr");
    let cli_id = issue(&ca, tmp.path(), Role::Cli, "fed", "tester");
    let mgr = format!("127.0.0.1:{}", free_port());
    let cfg = write_manager_config(
        tmp.path(),
        &mgr,
        &mgr_id,
        &[("a1", "a"), ("b1", "b")],
        &format!(
            "migration_bandwidth_mib_s = 4\n[[violins]]\nname = \"t\"\nid = 9\nvms = [\"{name}\"]\n"
        ),
    );
    let mut children = Children(vec![start_manager(&cfg)]);
    for (h, site) in [("a1", "a"), ("b1", "b")] {
        let id = issue(&ca, tmp.path(), Role::Monitor, site, h);
        children.0.push(start_monitor(&mgr, h, site, &id));
    }

    // The base is at both sites, so the move copies only the overlay and RAM.
    stage_base("b1");
    let hv_a1 = open("a1");
    boot_guest(&hv_a1, "a1", name, &format!("{ip}/24"), "vm-br0", 1, 256);
    wait_guest("a1", ip, Duration::from_secs(180));
    assert_eq!(
        guest_http("a1", ip, "marker-write=before-kill")
            .as_deref()
            .map(str::trim),
        Some("ok")
    );
    wait_until(
        "the manager knows the guest",
        Duration::from_secs(60),
        || vm_host(&mgr, &cli_id, name).is_some_and(|(h, _)| h == "a1"),
    );

    // The move runs at 4 MiB/s (the guest's RAM alone takes tens of seconds): kill the
    // manager once libvirt's migration job is under way.
    let mut cli = Command::new(bin("viola"))
        .args(["--manager", &mgr, "--identity"])
        .arg(&cli_id)
        .args(["--json", "vm", "migrate", name, "--to", "b1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("viola vm migrate");
    wait_until(
        "the migration job runs at a1",
        Duration::from_secs(60),
        || hv_a1.job_progress(name).ok().flatten().is_some(),
    );
    std::thread::sleep(Duration::from_secs(2));
    let manager = &mut children.0[0];
    let _ = Command::new("kill")
        .args(["-KILL", &manager.id().to_string()])
        .status();
    let _ = manager.wait();

    // Its successor resolves the migration from the journal (the CLI, whose connection died
    // with the manager, is stopped: it would wait for its idle timeout).
    children.0[0] = start_manager(&cfg);
    let _ = Command::new("kill")
        .args(["-TERM", &cli.id().to_string()])
        .status();
    let _ = cli.wait();
    let hv_b1 = open("b1");
    let running_at = |hv: &std::sync::Arc<dyn viola_hypervisor::Hypervisor>| {
        hv.domain(name)
            .ok()
            .flatten()
            .is_some_and(|d| d.state == viola_hypervisor::DomainState::Running)
    };
    // Resolved: one running copy, nothing at the other host, the inventory agrees.
    let resolved = || {
        let (at_a1, at_b1) = (running_at(&hv_a1), running_at(&hv_b1));
        if at_a1 == at_b1 {
            return None;
        }
        let (here, other) = if at_a1 { ("a1", "b1") } else { ("b1", "a1") };
        let clean = open(other).domain(name).ok().flatten().is_none()
            && !local_images(other).join(format!("{name}.qcow2")).exists();
        let recorded = vm_host(&mgr, &cli_id, name).is_some_and(|(h, _)| h == here);
        (clean && recorded).then_some(here)
    };
    wait_until(
        "the restarted manager resolves the migration",
        Duration::from_secs(120),
        || resolved().is_some(),
    );
    let here = resolved().expect("still resolved");
    eprintln!("the interrupted migration was resolved with the guest at {here}");
    assert_eq!(
        guest_http(here, ip, "marker-read")
            .as_deref()
            .map(str::trim),
        Some("before-kill")
    );
}
