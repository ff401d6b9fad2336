//! Lab: orchestrated cross-site live migration with the root disk, under load, and with the
//! destination's libvirtd killed half way.
//!
//! The guests' L2 here is a VXLAN mesh between the hosts' `vm-br0` bridges (kernel learning
//! follows the RARP QEMU sends after the move), so these tests exercise the mechanisms alone;
//! the overlay's own move handling is tested by the overlay's lab tests.
// lab: default

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use viola_adaptmgr::migration::plan::{Action, Step};
use viola_adaptmgr::migration::testing::{
    RecordingAnnouncer, assert_migrated_incrementally, assert_rolled_back_clean,
};
use viola_adaptmgr::migration::{MigrationStatus, run_migration, run_migration_detailed};
use viola_labtests::mech::*;

fn remove_base(host: &str) {
    let _ = std::fs::remove_file(local_images(host).join("base.qcow2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_across_sites_with_disk_under_ping_and_tcp_load() {
    let name = "vm-mig";
    let ip = "10.77.2.5";
    let _cleanup = begin(&["a1", "a2", "b1"], name);
    make_l2(&[
        ("a1", "10.77.2.1/24"),
        ("a2", "10.77.2.2/24"),
        ("b1", "10.77.2.3/24"),
    ]);
    let hv_a1 = open("a1");
    // The destination starts without the base: the migration must stage it (verified).
    remove_base("b1");
    boot_guest(&hv_a1, "a1", name, &format!("{ip}/24"), "vm-br0", 2, 256);
    wait_guest("a2", ip, Duration::from_secs(180));

    // Data written before the move.
    write_marker("a2", ip, "before-move");
    let written = guest_http("a2", ip, "diskwrite=8").expect("diskwrite");
    let md5_before = written.split_whitespace().next().expect("md5").to_owned();

    // Load from a2 during the move: a 10 ms ping and a bounded stream of HTTP requests.
    let ping = lab()
        .cmd("a2", "ping")
        .args(["-n", "-q", "-i", "0.01", "-w", "40", ip])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ping");
    let stream = lab()
        .cmd("a2", "sh")
        .arg("-c")
        .arg(format!(
            "ok=0; fail=0; end=$(( $(date +%s) + 45 )); \
             for i in $(seq 1 300); do [ $(date +%s) -lt $end ] || break; \
               if curl -sf --max-time 5 -o /dev/null http://{ip}/index.html; then ok=$((ok+1)); else fail=$((fail+1)); fi; \
               sleep 0.1; done; echo ok=$ok fail=$fail"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tcp load");
    tokio::time::sleep(Duration::from_secs(3)).await;

    let announcer = RecordingAnnouncer::default();
    let d = migration_deps(&["a1", "b1"], announcer.clone());
    let (tx, _rx) = watch::channel(MigrationStatus::default());
    let report = run_migration(
        migration_plan(name, "a1", "b1", 64),
        &d,
        &tx,
        &CancellationToken::new(),
    )
    .await;
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert_migrated_incrementally(&report);

    let ping_out = tokio::task::spawn_blocking(move || ping.wait_with_output())
        .await
        .unwrap()
        .expect("ping");
    let stream_out = tokio::task::spawn_blocking(move || stream.wait_with_output())
        .await
        .unwrap()
        .expect("tcp load");
    let ping_text = String::from_utf8_lossy(&ping_out.stdout).into_owned();
    let stream_text = String::from_utf8_lossy(&stream_out.stdout).into_owned();
    eprintln!("ping: {ping_text}\nhttp: {stream_text}");

    // Exactly one copy, at the destination; the source is clean.
    let hv_b1 = open("b1");
    assert!(
        hv_a1.domain(name).unwrap().is_none(),
        "copy left at the source"
    );
    assert!(hv_b1.domain(name).unwrap().is_some_and(|d| d.persistent));
    assert!(!local_images("a1").join(format!("{name}.qcow2")).exists());
    assert!(announcer.notes()[0].starts_with("expect vm-mig"));

    // Data intact, guest reachable at the same IP from the other site.
    let marker = guest_http("a2", ip, "marker-read");
    assert_eq!(
        marker.as_deref().map(str::trim),
        Some("before-move"),
        "guest console:\n{}",
        console_tail(name, 15)
    );
    let md5_after = guest_http("a2", ip, "md5").expect("md5");
    assert!(
        md5_after.starts_with(&md5_before),
        "{md5_after} vs {md5_before}"
    );

    // The TCP requests all completed (retransmission covers the switchover).
    assert!(stream_text.contains("fail=0"), "{stream_text}");
    // The 10 ms ping lost at most 1 s worth of replies.
    let received: u64 = ping_text
        .split(',')
        .find_map(|p| {
            p.trim()
                .strip_suffix(" received")
                .and_then(|n| n.trim().parse().ok())
        })
        .expect("ping summary");
    let sent: u64 = ping_text
        .split_whitespace()
        .zip(ping_text.split_whitespace().skip(1))
        .find_map(|(n, w)| (w.starts_with("packets")).then(|| n.parse().ok()).flatten())
        .expect("ping summary");
    assert!(
        sent - received <= 100,
        "lost {} of {sent} pings",
        sent - received
    );
    let downtime = report.completed.and_then(|c| c.downtime_ms);
    eprintln!(
        "downtime {downtime:?} ms, lost {} pings of {sent}",
        sent - received
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_libvirtd_killed_mid_migration_leaves_guest_at_source_only() {
    let name = "vm-kill";
    let ip = "10.77.3.5";
    let mut cleanup = begin(&["a1", "b1"], name);
    cleanup.first(|| revive_libvirtd("b1"));
    make_l2(&[("a1", "10.77.3.1/24"), ("b1", "10.77.3.3/24")]);
    let hv_a1 = open("a1");
    stage_base("b1");
    boot_guest(&hv_a1, "a1", name, &format!("{ip}/24"), "vm-br0", 1, 256);
    wait_guest("a1", ip, Duration::from_secs(180));
    // Enough data in the overlay that a 4 MiB/s copy takes several seconds.
    guest_http("a1", ip, "diskwrite=48").expect("diskwrite");

    let announcer = RecordingAnnouncer::default();
    let d = migration_deps(&["a1", "b1"], announcer.clone());
    let (tx, mut rx) = watch::channel(MigrationStatus::default());
    let migration = {
        let p = migration_plan(name, "a1", "b1", 4);
        async move { run_migration_detailed(p, &d, &tx, &CancellationToken::new()).await }
    };
    let killer = async {
        // Wait until data is flowing, then kill the destination's libvirtd.
        loop {
            if rx.changed().await.is_err() {
                return false;
            }
            let moving = rx
                .borrow()
                .job
                .as_ref()
                .is_some_and(|j| j.data_processed > 4 << 20);
            if moving {
                break;
            }
        }
        let pid = libvirtd_pid("b1").expect("b1 libvirtd pid");
        // SAFETY-free: a plain kill(2) of the one PID the lab recorded for b1's libvirtd.
        let killed = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        assert!(killed.is_ok_and(|s| s.success()));
        tokio::time::sleep(Duration::from_secs(3)).await;
        restart_libvirtd("b1");
        true
    };
    let (run, killed) = tokio::join!(migration, killer);
    eprintln!("{}", serde_json::to_string_pretty(&run.report).unwrap());
    assert!(killed, "the migration ended before data moved");

    // The guest runs at the source, answers, and nothing of it is left at the destination.
    wait_guest("a1", ip, Duration::from_secs(30));
    let hv_b1 = open("b1");
    wait_until(
        "destination forgets the domain",
        Duration::from_secs(30),
        || hv_b1.domain(name).unwrap().is_none(),
    );
    assert!(
        !local_images("b1").join(format!("{name}.qcow2")).exists(),
        "overlay left at b1"
    );
    assert_rolled_back_clean(&run, hv_a1.as_ref(), hv_b1.as_ref(), &announcer, |f| {
        f.action == Action::Run(Step::Migrate)
    });
}
