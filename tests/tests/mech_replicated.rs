//! Lab, replicated managers: three `viola-adaptmgr`s share their state in a three-member etcd
//! cluster, each manager beside an etcd member on its own "machine" (a lab host's namespace:
//! a2 at site a, b2 and b1 at site b). The leader's machine is lost (its manager and its etcd
//! member killed) in the middle of a cross-site migration; another manager takes over, resolves
//! the migration from the journal in etcd (exactly one running copy, the inventory agrees) and
//! goes on serving: the monitors report to it and it acts on the VM. Stopped cleanly, it hands
//! over at once.

// lab: default

use std::process::Command;
use std::time::{Duration, Instant};

use viola_labtests::federation::Replicated;
use viola_labtests::mech::*;

/// What the test states for a takeover: the lease's TTL (3 s; etcd grants at least 2 s), etcd
/// electing a new leader of its own when the lost member led it (about 2 s), the standby's
/// campaign period, and slack for a loaded 2-core machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(20);

#[test]
fn a_lost_leader_mid_migration_is_replaced_and_its_migration_resolved() {
    let name = "vm-repl";
    let ip = "10.77.9.5";
    let _cleanup = begin(&["a1", "b1"], name);
    make_bridge("a1", "10.77.9.1/24");
    make_bridge("b1", "10.77.9.2/24");
    let mut repl = Replicated::start(
        &["a2", "b2", "b1"],
        &[("a1", "a"), ("b1", "b")],
        &format!(
            "migration_bandwidth_mib_s = 4\n[[violins]]\nname = \"t\"\nid = 9\nvms = [\"{name}\"]\n"
        ),
        "a1",
    );
    assert_eq!(
        repl.leader().as_deref(),
        Some("a2"),
        "a2's manager leads first"
    );

    // etcd speaks TLS only and asks for a certificate of the federation: neither plain HTTP
    // nor a client without a certificate reads the inventory.
    let first_etcd = repl.endpoints().split(',').next().unwrap().to_owned();
    for url in [
        first_etcd.clone(),
        first_etcd.replace("https://", "http://"),
    ] {
        let read = Command::new("ip")
            .args(["netns", "exec", &repl.cli_ns, "curl", "-skf", "-m", "5"])
            .args([
                "-X",
                "POST",
                "-d",
                "{\"key\":\"L3Zpb2xh\",\"range_end\":\"L3Zpb2xi\"}",
            ])
            .arg(format!("{url}/v3/kv/range"))
            .output()
            .expect("curl");
        assert!(
            !read.status.success() && !String::from_utf8_lossy(&read.stdout).contains("kvs"),
            "{url} answered without a client certificate: {}",
            String::from_utf8_lossy(&read.stdout)
        );
    }

    // Only the leader serves: a standby refuses the CLI's connection (so a client moves on to
    // the next address at once), and the CLI given only a standby's address says so.
    let standby_only = repl.managers.split(',').nth(1).unwrap().to_owned();
    let asked = Command::new("ip")
        .args(["netns", "exec", &repl.cli_ns])
        .arg(viola_labtests::daemons::bin("viola"))
        .args(["--manager", &standby_only, "--identity"])
        .arg(&repl.fed.cli_id)
        .args(["host", "list"])
        .output()
        .expect("viola host list");
    let said = String::from_utf8_lossy(&asked.stderr);
    assert!(
        !asked.status.success() && said.contains("refused"),
        "a standby manager served the CLI: {said}"
    );

    stage_base("b1");
    let hv_a1 = open("a1");
    boot_guest(&hv_a1, "a1", name, &format!("{ip}/24"), "vm-br0", 1, 256);
    wait_guest("a1", ip, Duration::from_secs(180));
    write_marker("a1", ip, "before-loss");
    wait_until(
        "the leader knows the guest at a1",
        Duration::from_secs(60),
        || repl.vm_host(name).is_some_and(|(h, _)| h == "a1"),
    );

    // The move runs at 4 MiB/s (the guest's RAM alone takes tens of seconds): lose the
    // leader's machine once libvirt's migration job is under way.
    let cli = migration_under_way(
        repl.viola_command(&["--json", "vm", "migrate", name, "--to", "b1"]),
        name,
        "a1",
    );
    repl.lose_machine("a2");
    let lost_at = Instant::now();
    stop_cli(cli);

    viola_labtests::wait_until("another manager leads", TAKEOVER_BOUND, || {
        repl.leader().is_some_and(|l| l != "a2")
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\nb2:\n{}\nb1:\n{}",
            repl.manager_log("b2"),
            repl.manager_log("b1")
        )
    });
    let took_over = lost_at.elapsed();
    let successor = repl.leader().expect("a leader");
    eprintln!(
        "manager at {successor} leads {:.1} s after a2 was lost",
        took_over.as_secs_f64()
    );

    // Resolved: one running copy, nothing at the other host, the inventory agrees.
    let resolved = || resolved_migration(name, ["a1", "b1"], || repl.vm_host(name).map(|(h, _)| h));
    viola_labtests::wait_until(
        "the new leader resolves the migration",
        Duration::from_secs(120),
        || resolved().is_some(),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", repl.manager_log(&successor)));
    let here = resolved().expect("still resolved");
    eprintln!(
        "the interrupted migration was resolved with the guest at {here}, {:.1} s after the loss",
        lost_at.elapsed().as_secs_f64()
    );
    assert_eq!(
        guest_http(here, ip, "marker-read")
            .as_deref()
            .map(str::trim),
        Some("before-loss")
    );
    let log = repl.manager_log(&successor);
    assert!(
        log.contains("elected leader of the managers")
            && log.contains("interrupted migrations resolved"),
        "the successor resolves the migration from the journal; its log:\n{log}\nA2:\n{}\nB1:\n{}",
        repl.manager_log("a2"),
        repl.manager_log("b1")
    );

    // It goes on: both monitors report to the new leader (their hosts up, heartbeats after the
    // loss), and it acts on the VM (a CPU cap, set at the guest's host).
    let after_loss_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - lost_at.elapsed().as_millis() as u64;
    wait_until(
        "both hosts report to the new leader",
        Duration::from_secs(30),
        || {
            repl.viola_json(&["host", "list"])
                .and_then(|h| h.as_array().cloned())
                .is_some_and(|h| {
                    h.len() == 2
                        && h.iter().all(|h| {
                            h["state"] == "up"
                                && h["last_heartbeat_ms"]
                                    .as_u64()
                                    .is_some_and(|t| t > after_loss_ms)
                        })
                })
        },
    );
    let resize = repl
        .viola_command(&["vm", "resize", name, "--cap-percent", "50"])
        .output()
        .expect("viola vm resize");
    assert!(
        resize.status.success(),
        "the new leader refused a resize: {}",
        String::from_utf8_lossy(&resize.stderr)
    );
    assert_eq!(cap_percent(here, name), Some(50));

    // The successor is stopped cleanly (SIGTERM): it resigns, so the last manager leads
    // without waiting for a lease to end, and serves the CLI.
    let last = ["b2", "b1"]
        .into_iter()
        .find(|m| *m != successor)
        .expect("a third manager");
    let stopped_at = Instant::now();
    let status = repl
        .fed
        .daemons
        .kill(&format!("manager-{successor}"), libc::SIGTERM)
        .expect("stop the successor");
    assert!(
        status.success(),
        "the successor did not stop cleanly: {status}"
    );
    viola_labtests::wait_until("the last manager leads", Duration::from_secs(10), || {
        repl.leader().as_deref() == Some(last)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", repl.manager_log(last)));
    eprintln!(
        "after a clean stop, the manager at {last} leads {:.1} s later",
        stopped_at.elapsed().as_secs_f64()
    );
    assert!(
        repl.manager_log(&successor)
            .contains("resigned the managers' leadership"),
        "{}",
        repl.manager_log(&successor)
    );
    wait_until(
        "the last manager serves the CLI",
        Duration::from_secs(30),
        || repl.vm_host(name).is_some_and(|(h, _)| h == here),
    );
}
