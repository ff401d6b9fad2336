//! The foundation, for real: a lab of two sites with their own libvirtds, a guest booted on site
//! a, its disk written, live-migrated with its disk to site b, and the lab torn down without a
//! trace.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use viola_labtests::{
    GuestSpec, Lab, LabSpec, boot_guest, create_overlay, guest_http, host_bridge, jobinfo_number,
    lab_tests_enabled, parse_jobinfo, run_ok, stage_base, wait_ping,
};

const LAB: &str = "lf";

fn ping_avg_ms(lab: &Lab, from: &str, to: &str) -> f64 {
    let out = run_ok(
        lab.cmd(from, "ping")
            .args(["-c", "5", "-i", "0.2", "-q", to]),
    )
    .unwrap_or_else(|e| panic!("ping {from} -> {to}: {e:#}"));
    // rtt min/avg/max/mdev = 20.504/21.291/22.850/1.102 ms
    let stats = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .unwrap_or_else(|| panic!("no rtt line in {out}"));
    stats.trim().split('/').nth(1).unwrap().parse().unwrap()
}

fn lab_leftovers(instance: &str) -> Vec<String> {
    let mut left = Vec::new();
    let netns = run_ok(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    for line in netns.lines() {
        if line.starts_with(&format!("{instance}-")) {
            left.push(format!("netns {line}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines() {
        if line.contains(&format!("viola-lab-{instance}")) {
            left.push(format!("mount {line}"));
        }
    }
    for dir in [
        format!("/run/viola-lab-{instance}"),
        format!("/var/lib/viola-lab-{instance}"),
    ] {
        if std::path::Path::new(&dir).exists() {
            left.push(format!("dir {dir}"));
        }
    }
    left
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn guest_boots_migrates_across_sites_with_its_disk_and_the_lab_leaves_nothing() {
    if !lab_tests_enabled() {
        return;
    }
    let mut lab = Lab::up(LAB, &LabSpec::default()).expect("lab up");

    // Four hosts, each with its own running libvirtd and a distinct random host UUID.
    assert_eq!(lab.status.hosts.len(), 4, "{:?}", lab.status);
    let uuids: BTreeSet<_> = lab
        .status
        .hosts
        .iter()
        .map(|h| h.host_uuid.clone())
        .collect();
    assert_eq!(uuids.len(), 4, "host UUIDs must differ: {uuids:?}");
    for h in &lab.status.hosts {
        assert_eq!(h.libvirtd, "running", "libvirtd of {}", h.name);
    }
    let pid_of = |host: &str| -> u32 {
        std::fs::read_to_string(format!("{}/hosts/{host}/libvirtd.pid", lab.status.lab_dir))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let libvirtd_pids: Vec<u32> = ["a1", "a2", "b1", "b2"].iter().map(|h| pid_of(h)).collect();

    // Cross-site traffic really crosses the WAN: ~2 x 10 ms one way, intra-site far less.
    let intra = ping_avg_ms(&lab, "a1", &lab.host("a2").address);
    let cross = ping_avg_ms(&lab, "a1", &lab.host("b1").address);
    eprintln!("RTT intra-site {intra:.2} ms, cross-site {cross:.2} ms");
    assert!(
        cross >= 19.0,
        "cross-site RTT {cross} ms should carry 2 x 10 ms of WAN delay"
    );
    assert!(
        intra < cross / 2.0,
        "intra-site RTT {intra} ms vs cross-site {cross} ms"
    );

    // Each host's libvirtd answers on its underlay address, but only inside the lab.
    let remote = lab
        .virsh("a1", &["-c", &lab.host("b1").libvirt_uri, "hostname"])
        .or_else(|_| {
            run_ok(
                lab.cmd("a1", "virsh")
                    .args(["-c", &lab.host("b1").libvirt_uri, "uri"]),
            )
        });
    assert!(
        remote.is_ok(),
        "a1 cannot reach b1's libvirtd over TLS: {remote:?}"
    );

    // A guest on a1, with a private LAN bridge on a1 and b1 (no overlay yet: each host reaches
    // the guest where it runs).
    let guest = GuestSpec::new("lf-g1", "10.1.0.5/24", "lan0");
    for host in ["a1", "b1"] {
        host_bridge(&lab, host, "lan0", "10.1.0.1/24").unwrap();
        stage_base(&lab, host).unwrap();
    }
    create_overlay(&lab, "a1", &guest).unwrap();
    let boot = boot_guest(&lab, "a1", &guest, Duration::from_secs(90)).expect("guest boots");
    eprintln!(
        "guest answered ping {:.2} s after virsh start",
        boot.as_secs_f64()
    );

    // Its root disk is the qcow2 overlay: write a marker there.
    let marker = "viola-marker-7f3a";
    assert_eq!(
        guest_http(&lab, "a1", guest.ip(), &format!("marker-write={marker}")).unwrap(),
        "ok"
    );
    assert_eq!(
        guest_http(&lab, "a1", guest.ip(), "marker-read").unwrap(),
        marker
    );

    // The destination overlay must exist at the same path with the same backing file.
    create_overlay(&lab, "b1", &guest).unwrap();

    // Watch both hosts during the move: the guest must never run in two places at once.
    let both_running = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let samples = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut samples = 0u32;
            let deadline = Instant::now() + Duration::from_secs(180);
            while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                let a = lab.domain_state("a1", &guest.name);
                let b = lab.domain_state("b1", &guest.name);
                if a.as_deref() == Some("running") && b.as_deref() == Some("running") {
                    both_running.store(true, Ordering::SeqCst);
                }
                samples += 1;
            }
            samples
        });
        let start = Instant::now();
        let migrated = lab.migrate_with_disk(&guest.name, "a1", "b1");
        let total = start.elapsed();
        done.store(true, Ordering::SeqCst);
        migrated.expect("live migration with disk a1 -> b1");
        eprintln!(
            "migration a1 -> b1 took {:.2} s (virsh migrate)",
            total.as_secs_f64()
        );
        watcher.join().unwrap()
    });
    assert!(samples > 0, "the watcher never sampled the domain states");
    assert!(
        !both_running.load(Ordering::SeqCst),
        "the guest ran on a1 and b1 at the same time"
    );

    let info = parse_jobinfo(
        &lab.virsh("b1", &["domjobinfo", &guest.name, "--completed"])
            .unwrap(),
    );
    let downtime = jobinfo_number(&info, "Total downtime").expect("downtime in domjobinfo");
    let elapsed = jobinfo_number(&info, "Time elapsed").expect("elapsed in domjobinfo");
    eprintln!("QEMU reports: migration {elapsed} ms, downtime {downtime} ms");
    eprintln!(
        "FIGURES boot_s={:.2} migration_ms={elapsed} downtime_ms={downtime}",
        boot.as_secs_f64()
    );

    // Exactly one copy, at the destination; the source forgot it.
    assert_eq!(
        lab.domain_state("b1", &guest.name).as_deref(),
        Some("running")
    );
    assert_eq!(
        lab.domain_state("a1", &guest.name),
        None,
        "a1 still knows the guest"
    );
    // The guest answers at its new home and its disk kept the marker.
    wait_ping(&lab, "b1", guest.ip(), Duration::from_secs(10)).unwrap();
    assert_eq!(
        guest_http(&lab, "b1", guest.ip(), "marker-read").unwrap(),
        marker
    );
    // The disk really moved: b1's overlay now holds the written data (it was empty before).
    let overlay_b1 = std::fs::metadata(format!("{}/lf-g1.qcow2", lab.host("b1").images))
        .unwrap()
        .len();
    assert!(
        overlay_b1 > 256 * 1024,
        "b1's overlay is only {overlay_b1} bytes"
    );
    let qemu_pid: u32 = std::fs::read_to_string(format!(
        "{}/hosts/b1/run/qemu/{}.pid",
        lab.status.lab_dir, guest.name
    ))
    .unwrap()
    .trim()
    .parse()
    .unwrap();

    // A crash: b2's libvirtd dies without cleanup. `down` must still remove everything.
    run_ok(Command::new("kill").args(["-9", &libvirtd_pids[3].to_string()])).unwrap();
    lab.down().expect("lab down");
    let left = lab_leftovers(LAB);
    assert!(left.is_empty(), "lab leftovers: {left:#?}");
    for pid in libvirtd_pids.iter().chain([&qemu_pid]) {
        assert!(!alive(*pid), "process {pid} of the lab is still running");
    }
}
