//! Overlay lab test with real QEMU guests: a guest on site a is live-migrated with its disk to
//! site b while a third guest (on host a2) pings it every 10 ms and keeps one TCP stream from
//! it running. The move is made by the adaptation manager daemon (`viola vm migrate`), which
//! runs on b2, a host without an overlay daemon: it announces the move in advance to the
//! overlay daemons of the violin's hosts over QUIC with mutual TLS and its `adaptmgr`
//! certificate. The guest keeps its IP and MAC, the pings lost (counted at the pinger's NIC)
//! stay within QEMU's own downtime plus 50 ms, and after the move a2's traffic goes to b1 only.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use viola_labtests::daemons::{bin, build, log_text, spawn_logged};
use viola_labtests::overlay::*;
use viola_labtests::{
    GuestSpec, LabSpec, boot_guest, create_overlay, guest_http, run_ok, stage_base, wait_until,
};

const LAB: &str = "ovm";
const HOSTS: [&str; 3] = ["a1", "a2", "b1"];
/// How long the third guest pings and streams.
const LOAD_SECONDS: u64 = 30;

/// (sent, received) from a ping summary (busybox or iputils).
fn ping_counts(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.contains("transmitted"))?;
    let first_number = |part: &str| part.split_whitespace().next()?.parse().ok();
    let mut sent = None;
    let mut received = None;
    for part in line.split(',') {
        if part.contains("transmitted") {
            sent = first_number(part);
        } else if part.contains("received") {
            received = first_number(part);
        }
    }
    Some((sent?, received?))
}

/// (requests, requests never answered) of the echo stream `from` -> `to` in tcpdump text
/// output (`-nn`) taken at the pinger's own NIC, by sequence number. The pinger's own count can
/// be higher: busybox ping sets a 7 KiB socket receive buffer and drops replies that arrive
/// in a burst (after the source guest stalls when the migration starts).
fn wire_ping_loss(text: &str, from: &str, to: &str) -> (u64, u64) {
    let request = format!("IP {from} > {to}: ICMP echo request,");
    let reply = format!("IP {to} > {from}: ICMP echo reply,");
    let seq = |l: &str| -> Option<u32> {
        l.split(", ")
            .find_map(|f| f.strip_prefix("seq "))?
            .parse()
            .ok()
    };
    let mut asked = std::collections::BTreeSet::new();
    let mut answered = std::collections::BTreeSet::new();
    for line in text.lines() {
        if line.contains(&request) {
            asked.extend(seq(line));
        } else if line.contains(&reply) {
            answered.extend(seq(line));
        }
    }
    let lost = asked.difference(&answered).count() as u64;
    (asked.len() as u64, lost)
}

#[test]
fn wire_ping_loss_counts_unanswered_requests_once() {
    let text = "\
1.0 IP 10.1.0.6 > 10.1.0.5: ICMP echo request, id 7, seq 1, length 64
1.1 IP 10.1.0.5 > 10.1.0.6: ICMP echo reply, id 7, seq 1, length 64
1.2 IP 10.1.0.6 > 10.1.0.5: ICMP echo request, id 7, seq 2, length 64
1.3 IP 10.1.0.6 > 10.1.0.5: ICMP echo request, id 7, seq 3, length 64
1.4 IP 10.1.0.5 > 10.1.0.6: ICMP echo reply, id 7, seq 3, length 64
1.5 IP 10.1.0.5 > 10.1.0.6: ICMP echo reply, id 7, seq 3, length 64
1.6 IP 10.1.0.9 > 10.1.0.5: ICMP echo request, id 8, seq 4, length 64
";
    assert_eq!(wire_ping_loss(text, "10.1.0.6", "10.1.0.5"), (3, 1));
    assert_eq!(wire_ping_loss("", "10.1.0.6", "10.1.0.5"), (0, 0));
}

fn mac_location(status: &serde_json::Value, mac: &str) -> Option<(String, u64)> {
    status["switch"]["violins"][0]["macs"]
        .as_array()?
        .iter()
        .find(|m| m["mac"] == mac)
        .map(|m| {
            (
                m["location"].as_str().unwrap_or("").to_owned(),
                m["seq"].as_u64().unwrap_or(0),
            )
        })
}

#[test]
fn guest_live_migrates_across_sites_on_the_overlay_keeping_its_address() -> Result<()> {
    let Some((lab, mut o, pki)) = start_lab(LAB, &LabSpec::default())? else {
        return Ok(());
    };
    build(&["viola-adaptmgr", "viola-monitor"])?;
    let ns = |h: &str| lab.host(h).namespace.clone();
    let guest = GuestSpec::new("vo-g1", "10.1.0.5/24", "vio1");
    // The third guest, on a2, loads g1 across the move.
    let pinger = GuestSpec::new("vo-g2", "10.1.0.6/24", "vio1");
    let mac = guest.mac(&lab.console_dir())?;
    for (i, h) in HOSTS.iter().enumerate() {
        let violin = format!(
            "[[violins]]\nid = 1\nname = \"mig\"\nvms = [{{ mac = \"{mac}\", ip = \"10.1.0.5\" }}]"
        );
        let path = o.host_config(&lab, &pki, h, &HOSTS, "", &violin)?;
        o.start(h, &ns(h), &path)?;
        // The host itself joins the violin through its bridge (a2 is the pinging "third guest").
        wait_for_link(&ns(h), "vio1", Duration::from_secs(15))?;
        run_ok(Command::new("ip").args([
            "-n",
            &ns(h),
            "addr",
            "add",
            &format!("10.1.0.{}/24", 201 + i),
            "dev",
            "vio1",
        ]))?;
    }
    for h in HOSTS {
        stage_base(&lab, h)?;
    }
    create_overlay(&lab, "a1", &guest)?;
    create_overlay(&lab, "a2", &pinger)?;
    let boot = boot_guest(&lab, "a1", &guest, Duration::from_secs(120))?;
    eprintln!("guest up {:.1} s after virsh start", boot.as_secs_f64());
    boot_guest(&lab, "a2", &pinger, Duration::from_secs(120))?;
    wait_ping_from(&ns("a2"), pinger.ip(), Duration::from_secs(20))?;
    wait_ping_from(&ns("a2"), guest.ip(), Duration::from_secs(20))?;
    assert_eq!(
        guest_http(&lab, "a2", guest.ip(), "marker-write=moved")?,
        "ok"
    );
    let before = o.status("a2")?;
    assert_eq!(
        mac_location(&before, &mac).map(|l| l.0).as_deref(),
        Some("a/a1")
    );

    // Pings lost are counted at g2's own NIC (its tap on a2): requests whose reply never came
    // back. tcpdump is bounded in time and stopped by PID.
    let iflist = lab.virsh("a2", &["domiflist", &pinger.name])?;
    let pinger_tap = iflist
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|w| w.starts_with("vnet") || w.starts_with("tap"))
        .with_context(|| format!("no tap for {} in {iflist:?}", pinger.name))?
        .to_owned();
    let capture_path = o.path("pinger-icmp.txt");
    let mut capture = Command::new("ip")
        .args(["netns", "exec", &ns("a2"), "timeout"])
        .arg((LOAD_SECONDS + 90).to_string())
        .args(["tcpdump", "-i", &pinger_tap, "-nn", "-l", "icmp"])
        .stdout(std::fs::File::create(&capture_path)?)
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("start tcpdump")?;
    std::thread::sleep(Duration::from_millis(500));

    // Load from the third guest (g2 on a2): a ping every 10 ms and one slow TCP stream from
    // g1's web server (16 KiB every 0.1 s), both running across the move.
    let load = guest_http(
        &lab,
        "a2",
        pinger.ip(),
        &format!("load-start={},{LOAD_SECONDS}", guest.ip()),
    )?;
    assert_eq!(load, "ok", "the third guest refused the load: {load}");
    std::thread::sleep(Duration::from_secs(3));

    // The move, by the adaptation manager daemon on b2, a host with no overlay daemon: it
    // reaches the overlays only over QUIC with its `adaptmgr` certificate (no unix socket), asks
    // a1's daemon for the violin's members and tells each of them in advance. A monitor on a1
    // tells it about the guest; the CLI orders the move.
    let manager_addr = format!("{}:17443", lab.host("b2").address);
    let mgr_pki = pki.issue("adaptmgr", "fed", "mgr", &o.path("pki-adaptmgr"))?;
    let cli_pki = pki.issue("cli", "fed", "operator", &o.path("pki-cli"))?;
    let monitor_pki = pki.issue("monitor", "a", "a1", &o.path("pki-monitor-a1"))?;
    let hosts_toml: String = HOSTS
        .iter()
        .map(|h| {
            let host = lab.host(h);
            format!(
                "[[hosts]]\nname = \"{h}\"\nsite = \"{}\"\nlibvirt_uri = \"{}\"\n\
                 migration_uri = \"{}\"\nimages_local = \"{}\"\n\
                 overlay_addr = \"{}:4500\"\n\n",
                &h[..1],
                lab.socket_uri(h),
                host.libvirt_uri,
                host.images,
                host.address
            )
        })
        .collect();
    let manager_cfg = o.write_config(
        "adaptmgr",
        &format!(
            "listen = \"{manager_addr}\"\nmetrics_listen = \"127.0.0.1:19743\"\nidentity_dir = \"{}\"\n\
             inventory = \"{}\"\nimages_host_dir = \"/var/lib/viola/images\"\n\n{hosts_toml}\
             [[violins]]\nname = \"mig\"\nid = 1\nvms = [\"{}\"]\n",
            mgr_pki.display(),
            o.path("inventory.redb").display(),
            guest.name
        ),
    )?;
    // b2 runs no overlay daemon: no violin bridge there.
    assert!(
        !viola_labtests::run(Command::new("ip").args(["-n", &ns("b2"), "link", "show", "vio1"]))?
            .status
            .success(),
        "b2 must have no overlay"
    );
    let spawn = |o: &mut Overlay, name: &str, netns: &str, cmd: &mut Command| -> Result<()> {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", netns])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .env("RUST_LOG", "info");
        let child = spawn_logged(&mut wrapped, &o.path(&format!("{name}.log")))?;
        o.daemons.add(name, child);
        Ok(())
    };
    spawn(
        &mut o,
        "adaptmgr",
        &ns("b2"),
        Command::new(bin("viola-adaptmgr"))
            .arg("--config")
            .arg(&manager_cfg),
    )?;
    spawn(
        &mut o,
        "monitor-a1",
        &ns("a1"),
        Command::new(bin("viola-monitor"))
            .args(["--host", "a1", "--site", "a", "--manager", &manager_addr])
            .args([
                "--interval-ms",
                "1000",
                "--metrics-listen",
                "127.0.0.1:19744",
            ])
            .args(["--libvirt-uri", &lab.socket_uri("a1")])
            .arg("--identity")
            .arg(&monitor_pki),
    )?;
    let viola = |args: &[&str]| {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &ns("b2")])
                .arg(bin("viola"))
                .args(["--manager", &manager_addr, "--identity"])
                .arg(&cli_pki)
                .args(args),
        )
    };
    wait_until(
        "the manager to learn the guest",
        Duration::from_secs(30),
        || viola(&["vm", "list", "--json"]).is_ok_and(|l| l.contains(&guest.name)),
    )?;
    let start = Instant::now();
    let moved = viola(&["vm", "migrate", &guest.name, "--to", "b1"])?;
    eprintln!(
        "viola vm migrate took {:.2} s:\n{moved}",
        start.elapsed().as_secs_f64()
    );
    let log = log_text(&o.path("adaptmgr.log"));
    for member in ["a/a1", "a/a2", "b/b1"] {
        assert!(
            log.lines()
                .any(|l| l.contains("move announced") && l.contains(&format!("member={member}"))),
            "the manager did not announce the move to {member}:\n{log}"
        );
    }
    // The manager read the destination's completed-job statistics (libvirt hands them out
    // once), and the CLI prints them: "time 4875 ms, downtime 223 ms, ... bytes moved".
    let downtime: f64 = moved
        .split(", ")
        .find_map(|part| part.trim().strip_prefix("downtime ")?.strip_suffix(" ms"))
        .and_then(|ms| ms.parse().ok())
        .with_context(|| format!("no downtime in the CLI's report:\n{moved}"))?;

    // Where a2 sends now, and that nothing more goes to a1 for the guest.
    wait_until("a2 to learn the move", Duration::from_secs(5), || {
        o.status("a2")
            .is_ok_and(|s| mac_location(&s, &mac).is_some_and(|l| l.0 == "b/b1"))
    })?;
    let a1_counters = |o: &Overlay| -> Result<(u64, u64)> {
        let s = o.status("a1")?;
        Ok((
            counter(&s, &["switch", "counters", "datagrams_in"]),
            counter(&s, &["switch", "counters", "redirected"]),
        ))
    };
    let (a1_before, a1_redirected_before) = a1_counters(&o)?;
    std::thread::sleep(Duration::from_secs(2));
    let (a1_after, a1_redirected_after) = a1_counters(&o)?;

    let load = {
        let until = Instant::now() + Duration::from_secs(LOAD_SECONDS + 60);
        loop {
            let r = guest_http(&lab, "a2", pinger.ip(), "load-result")?;
            if r != "running" {
                break r;
            }
            anyhow::ensure!(Instant::now() < until, "the third guest's load never ended");
            std::thread::sleep(Duration::from_secs(1));
        }
    };
    // Replies to the last requests are at most one WAN round trip behind.
    std::thread::sleep(Duration::from_secs(1));
    let _ = Command::new("kill")
        .args(["-TERM", &capture.id().to_string()])
        .status();
    let _ = capture.wait();
    let (wire_sent, wire_lost) = wire_ping_loss(
        &std::fs::read_to_string(&capture_path)?,
        pinger.ip(),
        guest.ip(),
    );
    let (sent, received) =
        ping_counts(&load).with_context(|| format!("no ping summary in {load:?}"))?;
    let streamed: u64 = load
        .lines()
        .find_map(|l| l.strip_prefix("stream_bytes="))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no stream result in {load:?}"))?;
    let lost = sent.saturating_sub(received);
    let a2 = o.status("a2")?;
    let (loc, seq) = mac_location(&a2, &mac).context("a2 forgot the guest")?;
    eprintln!(
        "FIGURES overlay_migration downtime_ms={downtime} wire_pings_sent={wire_sent} \
         wire_pings_lost={wire_lost} wire_lost_ms={} ping_sent={sent} ping_lost={lost} \
         stream_bytes={streamed} a2_sees={loc}@seq{seq} a1_datagrams_in_2s_after={} a1_redirected_2s_after={}",
        wire_lost * 10,
        a1_after - a1_before,
        a1_redirected_after - a1_redirected_before
    );
    // Every location change each overlay made, for the record (a handful of lines).
    for h in HOSTS {
        for line in o.log(h).lines().filter(|l| {
            l.contains("mac moved")
                || l.contains("sequence hint")
                || l.contains("stale announcement")
        }) {
            eprintln!("{h}: {line}");
        }
    }
    // The capture saw the same stream the pinger sent (a few at the edges may differ).
    assert!(
        wire_sent + 5 >= sent && sent + 5 >= wire_sent,
        "tcpdump saw {wire_sent} requests, ping sent {sent}"
    );
    assert_eq!(loc, "b/b1");
    assert!(seq >= 1);
    // The guest answers at its new home, from the other site, with its disk.
    assert_eq!(guest_http(&lab, "a2", guest.ip(), "marker-read")?, "moved");
    // The TCP stream survived the move: every byte arrived, on one connection.
    assert_eq!(
        streamed,
        LOAD_SECONDS * 10 * 16384,
        "the TCP stream across the move was cut short"
    );
    // After the move nothing of the ping stream (200 requests in 2 s) reaches a1: it forwards
    // no unicast for the guest to b1 any more, and what it still receives is a few broadcasts.
    assert!(
        a1_redirected_after - a1_redirected_before <= 2,
        "a1 still forwards the guest's unicast to b1: {}",
        a1_redirected_after - a1_redirected_before
    );
    assert!(
        a1_after - a1_before <= 40,
        "a1 still receives traffic after the move: {}",
        a1_after - a1_before
    );
    // Lost pings, counted at the pinger's NIC: no more than the guest's own downtime plus
    // 50 ms (10 ms per ping), plus one ping in flight.
    let allowed = ((downtime + 50.0) / 10.0).ceil() as u64 + 1;
    assert!(
        wire_lost <= allowed,
        "lost {wire_lost} pings ({} ms) with {downtime} ms downtime (allowed {allowed})",
        wire_lost * 10
    );
    let _ = lab.virsh("b1", &["destroy", &guest.name]);
    let _ = lab.virsh("b1", &["undefine", &guest.name]);
    let _ = lab.virsh("a2", &["destroy", &pinger.name]);
    let _ = lab.virsh("a2", &["undefine", &pinger.name]);
    drop(o);
    drop(lab);
    Ok(())
}
