//! Lab, end to end through the daemons: `viola-adaptmgr` with `viola-monitor`s on a1 and a2
//! (QUIC + mutual TLS), the `viola` CLI; host a1 is killed (its monitor, libvirtd and guest
//! die) → the manager declares it failed after the configured time and re-instantiates the
//! guest on a2 from its image; when a1 returns, its stale definition is removed. And the
//! manager itself killed in the middle of a migration: its successor resolves it.

// lab: default

use std::process::Command;
use std::time::{Duration, Instant};

use viola_labtests::daemons::bin;
use viola_labtests::federation::{Federation, viola_json, vm_host};
use viola_labtests::mech::*;

const HEARTBEAT_TIMEOUT_S: u64 = 6;

#[test]
fn killed_host_guest_is_restarted_elsewhere_within_configured_time() {
    let name = "vm-ha";
    let ip = "10.77.6.5";
    let mut cleanup = begin(&["a1", "a2"], name);
    cleanup.first(|| revive_libvirtd("a1"));
    let qemu_pid_file = lab_dir().join(format!("hosts/a1/run/qemu/{name}.pid"));
    make_bridge("a1", "10.77.6.1/24");
    make_bridge("a2", "10.77.6.2/24");
    let mut fed = Federation::start(
        &[("a1", "a"), ("a2", "a")],
        &format!("heartbeat_timeout_s = {HEARTBEAT_TIMEOUT_S}\n"),
    );
    let (mgr, cli_id) = (fed.mgr.clone(), fed.cli_id.clone());

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
    fed.daemons
        .kill("monitor-a1", libc::SIGKILL)
        .expect("kill a1's monitor");
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
    fed.start_monitor("a1", "a");
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

/// The manager is killed (SIGKILL) while it migrates a guest a1 → b1; a new manager started on
/// the same inventory finds the journaled migration and resolves it: the guest runs at exactly
/// one host, answers there, the inventory says which, and nothing half-made stays behind.
#[test]
fn manager_killed_mid_migration_is_resolved_by_its_successor() {
    let name = "vm-mgr-kill";
    let ip = "10.77.8.5";
    let _cleanup = begin(&["a1", "b1"], name);
    make_bridge("a1", "10.77.8.1/24");
    make_bridge("b1", "10.77.8.2/24");
    let mut fed = Federation::start(
        &[("a1", "a"), ("b1", "b")],
        &format!(
            "migration_bandwidth_mib_s = 4\n[[violins]]\nname = \"t\"\nid = 9\nvms = [\"{name}\"]\n"
        ),
    );
    let (mgr, cli_id) = (fed.mgr.clone(), fed.cli_id.clone());

    // The base is at both sites, so the move copies only the overlay and RAM.
    stage_base("b1");
    let hv_a1 = open("a1");
    boot_guest(&hv_a1, "a1", name, &format!("{ip}/24"), "vm-br0", 1, 256);
    wait_guest("a1", ip, Duration::from_secs(180));
    write_marker("a1", ip, "before-kill");
    wait_until(
        "the manager knows the guest",
        Duration::from_secs(60),
        || vm_host(&mgr, &cli_id, name).is_some_and(|(h, _)| h == "a1"),
    );

    // The move runs at 4 MiB/s (the guest's RAM alone takes tens of seconds): kill the
    // manager once libvirt's migration job is under way.
    let mut migrate = Command::new(bin("viola"));
    migrate
        .args(["--manager", &mgr, "--identity"])
        .arg(&cli_id)
        .args(["--json", "vm", "migrate", name, "--to", "b1"]);
    let cli = migration_under_way(migrate, name, "a1");
    fed.daemons
        .kill("manager", libc::SIGKILL)
        .expect("kill the manager");

    // Its successor resolves the migration from the journal (the CLI, whose connection died
    // with the manager, is stopped: it would wait for its idle timeout).
    fed.start_manager();
    stop_cli(cli);
    // Resolved: one running copy, nothing at the other host, the inventory agrees.
    let resolved = || {
        resolved_migration(name, ["a1", "b1"], || {
            vm_host(&mgr, &cli_id, name).map(|(h, _)| h)
        })
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
