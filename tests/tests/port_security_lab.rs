//! Port security on the bridge (lab test, lab `vlc`): what the overlay cannot see. Two VMs of
//! one violin on the same host a1, made with the CLI (the manager's default `[vm_template]
//! port_filter = "clean-traffic"`: libvirt's nwfilter on each VM's bridge port with its MAC
//! and address). Host a2 joins the violin and asks the victim who it is, five times a second,
//! while the thief (logged in with the user's key) takes the victim's MAC and address and
//! announces them (gratuitous ARP) for about ten seconds:
//!
//! - every answer comes from the victim (without the filter a1's bridge would learn the
//!   victim's MAC on the thief's port and hand it the victim's traffic: frames between two
//!   ports of one bridge never reach the overlay, whose own guards cannot help);
//! - a1's monitor reports the thief's dropped frames (`viola_monitor_vm_port_filter_drops`,
//!   from the port filter's ebtables counters) and logs them;
//! - the thief, its own MAC and address back, answers again (a guest is fenced, not broken),
//!   and both VMs took their addresses by DHCP through the filter;
//! - the victim live-migrates to a2 and its filter goes with it: the binding is on a2's port,
//!   no longer on a1.

use std::time::{Duration, Instant};

use viola_labtests::daemons::log_text;
use viola_labtests::lifecycle::{Fed, console_ready_ip, output_text as text, ssh, ssh_keygen};
use viola_labtests::{guest_http, lab_tests_enabled, progress, run_ok, wait_until};

/// (name, MAC, address) of a VM the CLI made.
struct Vm {
    name: String,
    mac: String,
    ip: String,
}

/// The host-side device of `vm`'s NIC on `host` (`virsh domiflist`).
fn port_of(fed: &Fed, host: &str, vm: &str) -> String {
    let list = fed.lab.virsh(host, &["domiflist", vm]).expect("domiflist");
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|dev| dev.starts_with("vnet"))
        .unwrap_or_else(|| panic!("no port of {vm} at {host}: {list}"))
        .to_owned()
}

#[test]
fn a_guest_cannot_take_a_neighbours_mac_on_its_own_bridge() {
    if !lab_tests_enabled() {
        return;
    }
    let fed = Fed::up(&[]);
    let cli = &fed.cli;
    let a2 = fed.ns("a2");
    fed.violin_joined_by_a2("sec");
    let key = fed.dir().join("id_ed25519");
    ssh_keygen(&key, Some("tester@lab"));
    let mut vms = Vec::new();
    for name in ["victim", "thief"] {
        let made = cli
            .vm_create(
                name,
                "sec",
                "guest",
                &[
                    "--host",
                    "a1",
                    "--ready-by",
                    "120",
                    "--ssh-key",
                    key.with_extension("pub").to_str().unwrap(),
                ],
            )
            .unwrap_or_else(|e| panic!("vm create {name}: {e}\n{}", log_text(&fed.mgr_log)));
        vms.push(Vm {
            name: name.to_owned(),
            mac: made[0]["macs"][0].as_str().expect("a MAC").to_owned(),
            ip: made[0]["ip"].as_str().expect("an address").to_owned(),
        });
    }
    for vm in &vms {
        // By DHCP, through the filter (requests from 0.0.0.0 pass it).
        wait_until(
            &format!("{} leases {}", vm.name, vm.ip),
            Duration::from_secs(120),
            || console_ready_ip(&fed.console, &vm.name).is_some_and(|got| got == vm.ip),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}; console: {:?}",
                std::fs::read_to_string(fed.console.join(format!("{}.log", vm.name)))
            )
        });
        wait_until(
            &format!("{} answers at {}", vm.name, vm.ip),
            Duration::from_secs(60),
            || guest_http(&fed.lab, "a2", &vm.ip, "info").is_ok(),
        )
        .unwrap();
    }
    let (victim, thief) = (&vms[0], &vms[1]);
    let who = |ip: &str| {
        guest_http(&fed.lab, "a2", ip, "info")
            .ok()
            .and_then(|info| info.lines().next().map(str::to_owned))
    };
    assert_eq!(who(&victim.ip).as_deref(), Some("name=victim"));
    assert_eq!(who(&thief.ip).as_deref(), Some("name=thief"));
    let bindings = fed.lab.virsh("a1", &["nwfilter-binding-list"]).unwrap();
    let thief_port = port_of(&fed, "a1", "thief");
    let victim_port = port_of(&fed, "a1", "victim");
    for port in [&thief_port, &victim_port] {
        assert!(
            bindings
                .lines()
                .any(|l| l.contains(port.as_str()) && l.contains("clean-traffic")),
            "no clean-traffic on {port} at a1: {bindings}"
        );
    }
    let drops = |vm: &str| {
        fed.monitor_vm_metric("a1", "viola_monitor_vm_port_filter_drops", vm)
            .map(|v| v as u64)
    };
    wait_until(
        "a1's monitor reports the thief's port filter",
        Duration::from_secs(30),
        || drops("thief").is_some(),
    )
    .unwrap();
    let dropped_before = drops("thief").unwrap();

    // The thief takes the victim's MAC and address for ~10 s and announces them (40 gratuitous
    // ARPs), in the background so the SSH session can end; then it takes its own back.
    let attack = format!(
        "( sleep 1; ip link set eth0 down; ip link set eth0 address {vmac}; ip link set eth0 up; \
         ip addr flush dev eth0; ip addr add {vip}/24 dev eth0; \
         i=0; while [ $i -lt 40 ]; do i=$((i+1)); arping -U -c 1 -I eth0 {vip}; sleep 0.2; done; \
         ip link set eth0 down; ip link set eth0 address {tmac}; ip link set eth0 up; \
         ip addr flush dev eth0; ip addr add {tip}/24 dev eth0 ) </dev/null >/dev/null 2>&1 &",
        vmac = victim.mac,
        vip = victim.ip,
        tmac = thief.mac,
        tip = thief.ip,
    );
    let out = ssh(&a2, &key, &thief.ip, &attack, None, Duration::from_secs(30));
    assert!(out.status.success(), "the attack: {}", text(&out));
    let began = Instant::now();
    let mut answers = Vec::new();
    while began.elapsed() < Duration::from_secs(12) {
        answers.push(who(&victim.ip));
        std::thread::sleep(Duration::from_millis(200));
    }
    let from_victim = answers
        .iter()
        .filter(|a| a.as_deref() == Some("name=victim"))
        .count();
    let from_thief = answers
        .iter()
        .filter(|a| a.as_deref() == Some("name=thief"))
        .count();
    progress(&format!(
        "during the theft: {from_victim} of {} requests to the victim answered by the victim, {from_thief} by the thief",
        answers.len()
    ));
    assert_eq!(
        from_thief, 0,
        "the thief answered for the victim: {answers:?}"
    );
    assert_eq!(
        from_victim,
        answers.len(),
        "the victim lost requests during the theft: {answers:?}"
    );
    // The monitor samples every second: its figure catches up within a few.
    let mut dropped = 0;
    wait_until(
        "a1's monitor counts the thief's dropped frames",
        Duration::from_secs(10),
        || {
            dropped = drops("thief").unwrap_or(0) - dropped_before;
            dropped >= 20
        },
    )
    .unwrap_or_else(|e| panic!("{e}: the filter dropped only {dropped} of the thief's frames"));
    progress(&format!(
        "a1's monitor: the bridge dropped {dropped} frames from the thief, {} from the victim \
         (its own frames the filter refuses, such as IPv6)",
        drops("victim").unwrap_or(0)
    ));
    let monitor_log = log_text(&fed.dir().join("monitor-a1.log"));
    assert!(
        monitor_log
            .lines()
            .any(|l| l.contains("port filter dropped frames") && l.contains("thief")),
        "a1's monitor did not log the thief's drops:\n{monitor_log}"
    );

    // Fenced, not broken: with its own MAC and address back, the thief answers again.
    wait_until(
        "the thief answers as itself again",
        Duration::from_secs(60),
        || who(&thief.ip).as_deref() == Some("name=thief"),
    )
    .unwrap();

    // The filter follows a migration: bound on a2's port, gone from a1.
    let moved = run_ok(&mut cli.cmd(&["vm", "migrate", "victim", "--to", "a2"]))
        .unwrap_or_else(|e| panic!("migrate victim: {e}\n{}", log_text(&fed.mgr_log)));
    progress(&format!(
        "victim moved to a2: {}",
        moved
            .lines()
            .find(|l| l.contains("Migrate "))
            .unwrap_or_default()
            .trim()
    ));
    let port = port_of(&fed, "a2", "victim");
    let bindings = fed.lab.virsh("a2", &["nwfilter-binding-list"]).unwrap();
    assert!(
        bindings
            .lines()
            .any(|l| l.contains(port.as_str()) && l.contains("clean-traffic")),
        "no clean-traffic on the victim's port {port} at a2: {bindings}"
    );
    let left = fed.lab.virsh("a1", &["nwfilter-binding-list"]).unwrap();
    assert!(
        !left.lines().any(|l| l.contains(victim_port.as_str())),
        "the victim's old binding stayed at a1: {left}"
    );
    assert_eq!(who(&victim.ip).as_deref(), Some("name=victim"));
    cli.json(&["violin", "delete", "sec", "--force"])
        .expect("violin delete");
}
