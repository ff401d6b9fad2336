//! The manager's policy loop on its own (lab test, lab `vlc` with hosts of one CPU each: `lab.sh
//! up --host-cpus 1`, the monitors reporting their host's cgroup). Host b1 runs two busy VMs
//! that together want more than its CPU; b2 is half busy, so site b has no room. In `advise`
//! mode the loop recommends moving a VM off b1 and nothing moves; restarted in `act` mode it
//! starts moving that VM across the sites to an idle host of site a, is killed (SIGKILL) in the
//! middle of that migration, and its successor resolves it (one running copy) and moves the VM
//! there, live, while the scientist's host pings it; the VM keeps its address. Packed again
//! beside another busy VM at site a, one of the two is moved to the idle host of its own site.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use viola_labtests::daemons::{log_text, wait_for_log};
use viola_labtests::lifecycle::{Fed, FedSpec, console_ready_ip, spawn_manager};
use viola_labtests::{lab_tests_enabled, longest_ping_gap, progress, run, run_ok, wait_until};

/// A five-second control period; no consolidation (underload) and no cap changes (vertical),
/// so the only reason to move is the overload this test makes.
const POLICY: &str = "[policy]\nmode = \"advise\"\nperiod_s = 5\n\n[policy.viola]\nunderload = 0.0\n\n[policy.vertical]\nenabled = false\n";

/// The loop's migrate actions so far, as (vm, from, to, outcome, reason).
fn migrations(fed: &Fed) -> Vec<(String, String, String, String, String)> {
    let listed = run_ok(&mut fed.cli.cmd(&["--json", "decisions"])).unwrap();
    serde_json::Deserializer::from_str(&listed)
        .into_iter::<serde_json::Value>()
        .map(|r| r.expect("a decision record"))
        .flat_map(|r| r["actions"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["action"] == "migrate")
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap_or_default().to_owned();
            (
                s("vm"),
                s("from"),
                s("to"),
                a["outcome"]["outcome"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                s("reason"),
            )
        })
        .collect()
}

/// Waits until the loop has a migrate action off `from` with `outcome`; an error naming `what`
/// after `timeout`.
fn wait_for_migration_off(
    fed: &Fed,
    from: &str,
    outcome: &str,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_until(what, timeout, || {
        migrations(fed)
            .iter()
            .any(|(_, f, _, o, _)| f == from && o == outcome)
    })
}

/// The downtime the decision log recorded for the policy's move of `vm` to `to`.
fn move_downtime_ms(fed: &Fed, vm: &str, to: &str) -> Option<u64> {
    let listed = run_ok(&mut fed.cli.cmd(&["--json", "decisions"])).unwrap();
    serde_json::Deserializer::from_str(&listed)
        .into_iter::<serde_json::Value>()
        .map(|r| r.expect("a decision record"))
        .flat_map(|r| r["actions"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["action"] == "migrate" && a["vm"] == vm && a["to"] == to)
        .find_map(|a| a["outcome"]["moved"]["downtime_ms"].as_u64())
}

/// The violin address of VM `name`.
fn ip_of(fed: &Fed, name: &str) -> String {
    placement(fed)
        .into_iter()
        .find(|(n, _, _)| n == name)
        .map(|(_, _, ip)| ip)
        .unwrap_or_else(|| panic!("no VM {name}"))
}

/// Where each VM runs now, with its address: (name, host, ip).
fn placement(fed: &Fed) -> Vec<(String, String, String)> {
    let vms = fed.cli.json(&["vm", "list"]).unwrap();
    vms.as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            (s("name"), s("host"), s("ip"))
        })
        .collect()
}

#[test]
fn overloaded_hosts_are_relieved_by_the_loop_across_and_within_sites_in_act_mode_only() {
    if !lab_tests_enabled() {
        return;
    }
    let mut fed = Fed::with(&FedSpec {
        host_cpus: Some(1.0),
        manager_toml: POLICY,
        ..FedSpec::default()
    });
    let a2 = fed.ns("a2");
    wait_until(
        "every host reports its own capacity of one CPU",
        Duration::from_secs(30),
        || {
            fed.cli.json(&["host", "list"]).is_ok_and(|h| {
                h.as_array().is_some_and(|a| {
                    a.len() == 4 && a.iter().all(|h| h["usage"]["cpu_capacity"] == 1.0)
                })
            })
        },
    )
    .unwrap();

    fed.violin_joined_by_a2("busy");
    // The policy moves the smallest VM first (the shortest migration), usually "mover".
    // `vm create` places no more vCPUs on a host than it has CPUs, so "stay" starts at a1 and
    // an operator moves it to b1 (a manual move checks memory only).
    let vms = [
        ("mover", "b1", "192", "55"),
        ("stay", "b1", "256", "55"),
        ("filler", "b2", "256", "40"),
    ];
    for (name, host, mem, _) in vms {
        let host = if name == "stay" { "a1" } else { host };
        fed.cli
            .vm_create(
                name,
                "busy",
                "guest",
                &["--host", host, "--memory-mib", mem, "--ready-by", "180"],
            )
            .unwrap_or_else(|e| panic!("vm create {name}: {e}\n{}", log_text(&fed.mgr_log)));
    }
    for (name, _, _, _) in vms {
        let ip = ip_of(&fed, name);
        wait_until(
            &format!("{name} up at {ip}"),
            Duration::from_secs(180),
            || console_ready_ip(&fed.console, name).is_some_and(|got| got == ip),
        )
        .unwrap();
    }
    let packed =
        run(&mut fed
            .cli
            .cmd(&["vm", "migrate", "stay", "--to", "b1", "--timeout-s", "240"]))
        .unwrap();
    assert!(
        packed.status.success(),
        "vm migrate stay --to b1: {}{}",
        String::from_utf8_lossy(&packed.stdout),
        String::from_utf8_lossy(&packed.stderr)
    );
    for (name, _, _, cap) in vms {
        let ip = ip_of(&fed, name);
        fed.cli
            .json(&["vm", "resize", name, "--cap-percent", cap])
            .expect("cap");
        // Each burns one CPU (bounded: 10 minutes) within its cap: b1's two want 1.1 CPUs of
        // its 1, b2's one 0.4 of its 1.
        let burn = run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &a2,
            "curl",
            "-sf",
            "-m",
            "5",
            &format!("http://{ip}/cgi-bin/viola?burn=1,600"),
        ]))
        .unwrap();
        assert_eq!(burn.trim(), "ok", "burn on {name}");
    }
    progress("b1 runs two busy VMs (caps 55 %), b2 one (cap 40 %); the loop advises");

    // Advise: a move off b1 is recommended, and nothing moves.
    wait_for_migration_off(
        &fed,
        "b1",
        "advised",
        "the loop advises moving a VM off b1",
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", log_text(&fed.mgr_log)));
    let advised = migrations(&fed);
    assert!(
        advised.iter().all(|m| m.3 == "advised"),
        "advise mode carried something out: {advised:?}"
    );
    let (vm, _, to, _, reason) = advised.iter().find(|m| m.1 == "b1").unwrap().clone();
    progress(&format!("advised: {vm} b1 -> {to} ({reason})"));
    // Which of b1's two VMs: the policy's choice (usually the smaller, "mover").
    assert!(
        vm == "mover" || vm == "stay",
        "one of b1's VMs: {advised:?}"
    );
    assert!(to.starts_with('a'), "site b has no room: {advised:?}");
    let before = placement(&fed);
    for (name, host, _, _) in vms {
        assert!(
            before.iter().any(|(n, h, _)| n == name && h == host),
            "advise mode moved {name}: {before:?}"
        );
    }

    // Act: the same manager, restarted in act mode, moves the VM while a2 pings it.
    fed.daemons.kill("manager", libc::SIGTERM).unwrap();
    let cfg = std::fs::read_to_string(&fed.mgr_cfg).unwrap();
    std::fs::write(
        &fed.mgr_cfg,
        cfg.replace("mode = \"advise\"", "mode = \"act\""),
    )
    .unwrap();
    let killed_log = fed.dir().join("adaptmgr-act-killed.log");
    fed.daemons
        .add("manager", spawn_manager(&a2, &fed.mgr_cfg, &killed_log));
    // Both of b1's VMs are pinged from a2: which one the loop moves is its choice (after the
    // rollback below, the VM whose move failed may be passed over for a while).
    let pings: Vec<(&str, String, std::process::Child)> = ["mover", "stay"]
        .into_iter()
        .map(|vm| {
            let ip = ip_of(&fed, vm);
            let child = Command::new("timeout")
                .args(["-s", "INT", "300", "ip", "netns", "exec", &a2])
                .args(["ping", "-i", "0.02", "-W", "1", &ip])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (vm, ip, child)
        })
        .collect();
    let t = Instant::now();
    // Killed in the middle of its first policy-driven migration, the manager's successor
    // resolves it from the journal (one running copy) and its loop goes on.
    wait_for_log(
        &killed_log,
        "action=Run(Migrate)",
        0,
        Duration::from_secs(120),
    )
    .unwrap();
    fed.daemons.kill("manager", libc::SIGKILL).unwrap();
    let running_copies = |fed: &Fed, vm: &str| {
        ["a1", "a2", "b1", "b2"]
            .into_iter()
            .filter(|h| fed.lab.domain_state(h, vm).as_deref() == Some("running"))
            .count()
    };
    let log = fed.dir().join("adaptmgr-act.log");
    fed.daemons
        .add("manager", spawn_manager(&a2, &fed.mgr_cfg, &log));
    wait_for_log(
        &log,
        "interrupted migration resolved",
        0,
        Duration::from_secs(120),
    )
    .unwrap();
    progress(&format!(
        "manager killed mid-migration; its successor: {}",
        log_text(&log)
            .lines()
            .find(|l| l.contains("interrupted migration resolved"))
            .unwrap_or_default()
    ));
    for vm in ["mover", "stay"] {
        assert_eq!(running_copies(&fed, vm), 1, "one running copy of {vm}");
    }
    let moved = wait_for_migration_off(
        &fed,
        "b1",
        "done",
        "the loop moves a VM off b1",
        Duration::from_secs(180),
    );
    std::thread::sleep(Duration::from_secs(3));
    let pinged: Vec<(&str, String, std::process::Output)> = pings
        .into_iter()
        .map(|(vm, ip, child)| {
            // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            (vm, ip, child.wait_with_output().unwrap())
        })
        .collect();
    moved.unwrap_or_else(|e| panic!("{e}\n{}", log_text(&log)));
    let done: Vec<_> = migrations(&fed)
        .into_iter()
        .filter(|m| m.3 == "done")
        .collect();
    let (vm, from, to, _, reason) = done[0].clone();
    progress(&format!(
        "act: {vm} {from} -> {to} ({reason}) {:.0} s after the restart",
        t.elapsed().as_secs_f64()
    ));
    assert!(
        from == "b1" && (vm == "mover" || vm == "stay"),
        "one of b1's VMs moves: {done:?}"
    );
    assert!(to.starts_with('a'), "a cross-site move: {done:?}");
    let left = if vm == "mover" { "stay" } else { "mover" };
    let after = placement(&fed);
    let expected = [(vm.as_str(), to.as_str()), (left, "b1"), ("filler", "b2")];
    for (name, host) in expected {
        assert!(
            after.iter().any(|(n, h, _)| n == name && h == host),
            "{name} should be at {host}: {after:?}"
        );
    }
    let (_, moved_ip, moved_ping) = pinged.iter().find(|(v, _, _)| *v == vm).unwrap();
    assert_eq!(
        &ip_of(&fed, &vm),
        moved_ip,
        "the moved VM keeps its address"
    );
    assert_eq!(fed.lab.domain_state(&to, &vm).as_deref(), Some("running"));
    assert_eq!(fed.lab.domain_state("b1", &vm), None);
    for v in ["mover", "stay"] {
        assert_eq!(running_copies(&fed, v), 1, "one running copy of {v}");
    }
    let summary = String::from_utf8_lossy(&moved_ping.stdout)
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_default()
        .to_owned();
    // The loop's move costs the VM no more than the migration's own downtime plus 50 ms (what
    // overlay_migrate allows a hand-typed move), give or take the pings' 20 ms spacing: the
    // longest run of unanswered pings, wherever it fell (the killed manager's interrupted move
    // paused the VM too).
    let downtime_ms = move_downtime_ms(&fed, &vm, &to)
        .unwrap_or_else(|| panic!("no downtime recorded for {vm}'s move to {to}"));
    let gap_ms = longest_ping_gap(&String::from_utf8_lossy(&moved_ping.stdout)) * 20;
    progress(&format!(
        "ping of {vm} from a2 across the move: {summary}; longest outage {gap_ms} ms, \
         migration downtime {downtime_ms} ms"
    ));
    assert!(
        gap_ms <= downtime_ms + 50 + 40,
        "{vm} was unreachable for {gap_ms} ms across a move with {downtime_ms} ms downtime"
    );
    let answered = run(
        Command::new("ip").args(["netns", "exec", &a2, "ping", "-c", "3", "-W", "2", moved_ip])
    )
    .unwrap();
    assert!(
        answered.status.success(),
        "{vm} does not answer at {moved_ip} after its move"
    );

    // Within a site: the operator packs the VM left at b1 beside the moved one; the other host
    // of site a is idle, so the loop moves one of the two there.
    let other = if to == "a1" { "a2" } else { "a1" };
    let packed = run(&mut fed
        .cli
        .cmd(&["vm", "migrate", left, "--to", &to, "--timeout-s", "240"]))
    .unwrap();
    assert!(packed.status.success(), "vm migrate {left} --to {to}");
    wait_until(
        &format!("the loop moves a VM off {to} within site a"),
        Duration::from_secs(120),
        || {
            migrations(&fed)
                .iter()
                .any(|(_, f, t, outcome, _)| f == &to && t == other && outcome == "done")
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{:?}\n{}", migrations(&fed), log_text(&log)));
    let within = migrations(&fed)
        .into_iter()
        .find(|(_, f, t, outcome, _)| f == &to && t == other && outcome == "done")
        .unwrap();
    progress(&format!(
        "within site a: {} {} -> {} ({})",
        within.0, within.1, within.2, within.4
    ));
    assert!(
        migrations(&fed)
            .iter()
            .filter(|m| m.3 == "done" && m.1 == to)
            .all(|m| m.2.starts_with('a')),
        "with room at its own site a VM stays there: {:?}",
        migrations(&fed)
    );
    fed.cli
        .json(&["violin", "delete", "busy", "--force"])
        .expect("violin delete");
}
