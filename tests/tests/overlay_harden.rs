//! Overlay lab test: a guest attacking another guest of its violin. Three sites with one host
//! each; the victim (a managed VM, MAC and IP in every daemon's `vms`) on a1, the spoofer on
//! b1, an observer on c1:
//!
//! - the spoofer takes the victim's MAC and sends: its daemon drops the frames
//!   (`spoofed_source`), every daemon keeps the victim at a1, the observer's pings to the victim
//!   are all answered meanwhile;
//! - the spoofer sends gratuitous ARP claiming the victim's address at its own MAC: its daemon
//!   drops it (`arp_spoof`), and the observer, its ARP cache flushed, still resolves the victim's
//!   address to the victim's MAC;
//! - the spoofer advertises the victim's IPv6 address (claimed by the victim's duplicate
//!   address detection) at its own MAC: its daemon drops it (`nd_spoof`) and the observer's
//!   neighbour entry keeps the victim's MAC;
//! - the spoofer floods frames from random source MACs for 10 s: its daemon keeps its MAC
//!   table within the limits and drops the rest (`learn_rate_limit`, `mac_limit`), the observer
//!   keeps reaching the victim, and the daemons' memory stays bounded (printed: RSS before,
//!   during and after, the observer's pings answered);
//! - TCP from the observer to the victim (both at MTU 1500): the SYNs' MSS is clamped and the
//!   stream's full segments cross in one datagram each (printed: throughput through the overlay
//!   and between the hosts without it, fragmented frames);
//! - UDP from the observer to the victim at 300 Mbit/s over the 200 Mbit/s WAN: the datagrams
//!   iperf3 lost are the drops the daemons counted, within 5 % (printed by reason).

use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use anyhow::{Context, Result};
use viola_labtests::overlay::*;
use viola_labtests::{LabSpec, run, run_ok};

const LAB: &str = "ovh";
const HOSTS: [&str; 3] = ["a1", "b1", "c1"];
const VICTIM_MAC: &str = "52:54:00:0a:00:01";
const VICTIM_IP: &str = "10.1.0.1";
/// Short, so that the flood's leftovers age out within the test.
const MAC_AGEING_S: u64 = 5;

/// Sends `count` gratuitous ARP replies from `ns`'s eth0 claiming `ip` at its own MAC.
fn gratuitous_arp(ns: &str, own_mac: &str, ip: &str, count: u32) -> Result<()> {
    let script = format!(
        r#"
import socket, time
mac = bytes.fromhex("{mac}")
ip = socket.inet_aton("{ip}")
frame = b"\xff" * 6 + mac + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x02" + mac + ip \
    + b"\xff" * 6 + ip
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for _ in range({count}):
    s.send(frame.ljust(60, b"\x00"))
    time.sleep(0.1)
"#,
        mac = own_mac.replace(':', ""),
    );
    run_ok(Command::new("ip").args(["netns", "exec", ns, "python3", "-c", &script]))?;
    Ok(())
}

/// Sends `count` unsolicited IPv6 neighbour advertisements (override flag set, to all nodes)
/// from `ns`'s eth0 claiming `ip6` at its own MAC, with a valid ICMPv6 checksum: a guest that
/// got one would overwrite its neighbour entry.
fn unsolicited_advert(ns: &str, own_mac: &str, ip6: &str, count: u32) -> Result<()> {
    let script = format!(
        r#"
import socket, struct, time
mac = bytes.fromhex("{mac}")
target = socket.inet_pton(socket.AF_INET6, "{ip6}")
src, dst = target, socket.inet_pton(socket.AF_INET6, "ff02::1")
body = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + target + b"\x02\x01" + mac
pseudo = src + dst + struct.pack("!I3xB", len(body), 58) + body
total = sum(struct.unpack("!%dH" % (len(pseudo) // 2), pseudo))
while total >> 16:
    total = (total & 0xffff) + (total >> 16)
body = body[:2] + struct.pack("!H", ~total & 0xffff) + body[4:]
ip = struct.pack("!IHBB", 0x60000000, len(body), 58, 255) + src + dst
frame = b"\x33\x33\x00\x00\x00\x01" + mac + b"\x86\xdd" + ip + body
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for _ in range({count}):
    s.send(frame)
    time.sleep(0.1)
"#,
        mac = own_mac.replace(':', ""),
    );
    run_ok(Command::new("ip").args(["netns", "exec", ns, "python3", "-c", &script]))?;
    Ok(())
}

/// Adds `addr` (IPv6, with prefix) to `ns`'s eth0 and waits for duplicate address detection.
fn add_ipv6(ns: &str, addr: &str) -> Result<()> {
    run_ok(Command::new("ip").args(["-n", ns, "addr", "add", addr, "dev", "eth0"]))?;
    let ip = addr.split('/').next().unwrap_or(addr);
    for _ in 0..50 {
        let out = run_ok(Command::new("ip").args(["-n", ns, "-6", "addr", "show", "dev", "eth0"]))?;
        if out
            .lines()
            .any(|l| l.contains(ip) && !l.contains("tentative"))
        {
            return Ok(());
        }
        sleep(Duration::from_millis(100));
    }
    anyhow::bail!("{addr} in {ns} stayed tentative")
}

/// Floods broadcast frames from random source MACs out of `ns`'s eth0 for `seconds`; returns
/// the child (it prints how many frames it sent).
fn flood_random_sources(ns: &str, seconds: u32) -> Result<std::process::Child> {
    let script = format!(
        r#"
import random, socket, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
tail = b"\x08\x00" + b"\x00" * 46
sent, end = 0, time.time() + {seconds}
while time.time() < end:
    for _ in range(500):
        src = (random.getrandbits(48) & ~(1 << 40)) | (2 << 40)
        try:
            s.send(b"\xff" * 6 + src.to_bytes(6, "big") + tail)
            sent += 1
        except OSError:
            pass
print(sent)
"#
    );
    Ok(Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Resident memory of daemon `name`, MiB.
fn rss_mib(o: &Overlay, name: &str) -> Result<f64> {
    let pid = o.daemons.pid(name).context("no such daemon")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

fn mac_table_len(o: &Overlay, name: &str) -> Result<usize> {
    Ok(o.status(name)?["switch"]["violins"][0]["macs"]
        .as_array()
        .map_or(0, Vec::len))
}

/// `iperf3 -c SERVER_IP -p PORT CLIENT_ARGS` in namespace `client` (30 s at most) against a
/// one-shot iperf3 server on `port` in namespace `server`; the client's output.
fn iperf3(
    server: &str,
    client: &str,
    server_ip: &str,
    port: &str,
    client_args: &[&str],
) -> Result<std::process::Output> {
    let mut iperf_server = Command::new("ip")
        .args(["netns", "exec", server, "iperf3", "-s", "-1", "-p", port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    sleep(Duration::from_millis(500));
    let iperf = run(Command::new("ip")
        .args(["netns", "exec", client, "timeout", "30", "iperf3"])
        .args(["-c", server_ip, "-p", port])
        .args(client_args));
    let _ = iperf_server.kill();
    let _ = iperf_server.wait();
    iperf
}

/// TCP throughput from namespace `client` to `server_ip` in namespace `server`: iperf3 for 8 s,
/// Mbit/s received after the first 2 s (both slow starts, the guest's and the QUIC
/// connection's, are left out).
fn tcp_mbit(server: &str, client: &str, server_ip: &str) -> Result<f64> {
    let iperf = iperf3(
        server,
        client,
        server_ip,
        "5311",
        &["-t", "6", "-O", "2", "-J"],
    )?;
    anyhow::ensure!(
        iperf.status.success(),
        "iperf3 {client} -> {server_ip} failed"
    );
    let report: serde_json::Value = serde_json::from_slice(&iperf.stdout)?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e6)
        .context("no received rate in iperf3's report")
}

fn set_mac(ns: &str, mac: &str) -> Result<()> {
    run_ok(Command::new("ip").args(["-n", ns, "link", "set", "eth0", "address", mac]))?;
    Ok(())
}

fn victim_location(o: &Overlay, host: &str) -> Result<String> {
    let status = o.status(host)?;
    let macs = status["switch"]["violins"][0]["macs"]
        .as_array()
        .context("no MAC table")?;
    Ok(macs
        .iter()
        .find(|m| m["mac"] == VICTIM_MAC)
        .map(|m| m["location"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default())
}

#[test]
fn a_guest_can_neither_steal_a_managed_mac_nor_poison_arp() -> Result<()> {
    let Some((lab, mut o, pki)) = start_lab(LAB, &LabSpec::one_host_per_site(3))? else {
        return Ok(());
    };
    let ns = |h: &str| lab.host(h).namespace.clone();
    let addr = |h: &str| lab.host(h).address.clone();
    for h in HOSTS {
        let path = o.host_config(
            &lab,
            &pki,
            h,
            &HOSTS,
            &format!("mac_ageing_s = {MAC_AGEING_S}"),
            &format!(
                "[[violins]]\nid = 1\nvms = [{{ mac = \"{VICTIM_MAC}\", ip = \"{VICTIM_IP}\", host = \"a/a1\" }}]"
            ),
        )?;
        o.start(h, &ns(h), &path)?;
    }
    let vms: Vec<String> = o.vm_per_host(&lab, &HOSTS, 1)?;
    let (victim, spoofer, observer) = (&vms[0], &vms[1], &vms[2]);
    set_mac(victim, VICTIM_MAC)?;
    let spoofer_mac = mac_of(spoofer)?;
    let t = wait_ping_from(observer, VICTIM_IP, Duration::from_secs(30))
        .with_context(|| format!("a1 log:\n{}\nc1 log:\n{}", o.log("a1"), o.log("c1")))?;
    eprintln!("victim reachable from c1 after {t:?}");
    wait_ping_from(spoofer, VICTIM_IP, Duration::from_secs(15))?;

    // 1. MAC theft: the spoofer sends as the victim while the observer pings the victim.
    set_mac(spoofer, VICTIM_MAC)?;
    let mut spoofing = Command::new("ip")
        .args([
            "netns", "exec", spoofer, "ping", "-q", "-i", "0.05", "-c", "80",
        ])
        .arg("10.1.0.3")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let answered = pings_answered(observer, VICTIM_IP, 20);
    let _ = spoofing.kill();
    let _ = spoofing.wait();
    let answered = answered?;
    let b1 = o.status("b1")?;
    let spoofed = counter(&b1, &["switch", "counters", "drops", "spoofed_source"]);
    let locations: Vec<String> = HOSTS
        .iter()
        .map(|h| victim_location(&o, h))
        .collect::<Result<_>>()?;
    eprintln!(
        "MAC theft: observer got {answered}/20 answers from the victim; b1 spoofed_source \
         {spoofed}; victim located at {locations:?} (a1 b1 c1)"
    );
    assert!(answered >= 19, "the victim lost traffic: {answered}/20");
    assert!(spoofed > 0, "b1 counted no spoofed frames: {b1}");
    assert_eq!(
        locations,
        ["local", "a/a1", "a/a1"],
        "the victim's MAC moved"
    );

    // 2. ARP poisoning: the spoofer, back at its own MAC, claims the victim's address.
    set_mac(spoofer, &spoofer_mac)?;
    gratuitous_arp(spoofer, &spoofer_mac, VICTIM_IP, 5)?;
    sleep(Duration::from_millis(300));
    let arp_spoof = counter(
        &o.status("b1")?,
        &["switch", "counters", "drops", "arp_spoof"],
    );
    run_ok(Command::new("ip").args(["-n", observer, "neigh", "flush", "all"]))?;
    let answered = pings_answered(observer, VICTIM_IP, 5)?;
    let resolved = neighbour_mac(observer, VICTIM_IP)?;
    eprintln!(
        "ARP poisoning: b1 arp_spoof {arp_spoof}; observer resolves {VICTIM_IP} to {resolved}, \
         {answered}/5 answered"
    );
    assert_eq!(arp_spoof, 5, "b1 did not drop every gratuitous ARP");
    assert_eq!(resolved, VICTIM_MAC, "the observer's ARP was poisoned");
    assert!(answered >= 4, "the victim lost traffic: {answered}/5");

    // 2b. IPv6 neighbour discovery: the victim's duplicate address detection claims its
    // address; the spoofer's advertisements of it at its own MAC are dropped (`nd_spoof`), and
    // the observer's neighbour entry keeps the victim's MAC.
    add_ipv6(victim, "fd00::1/64")?;
    add_ipv6(observer, "fd00::3/64")?;
    add_ipv6(spoofer, "fd00::2/64")?;
    let answered_before = pings_answered(observer, "fd00::1", 3)?;
    unsolicited_advert(spoofer, &spoofer_mac, "fd00::1", 5)?;
    sleep(Duration::from_millis(300));
    let nd_spoof = counter(
        &o.status("b1")?,
        &["switch", "counters", "drops", "nd_spoof"],
    );
    let resolved6 = neighbour_mac(observer, "fd00::1")?;
    let answered6 = pings_answered(observer, "fd00::1", 5)?;
    eprintln!(
        "ND poisoning: b1 nd_spoof {nd_spoof}; observer resolves fd00::1 to {resolved6}, \
         {answered_before}/3 answered before, {answered6}/5 after"
    );
    assert_eq!(
        answered_before, 3,
        "the victim's IPv6 address did not answer"
    );
    assert_eq!(nd_spoof, 5, "b1 did not drop every spoofed advertisement");
    assert_eq!(
        resolved6, VICTIM_MAC,
        "the observer's neighbour entry was poisoned"
    );
    assert!(
        answered6 >= 4,
        "the victim lost IPv6 traffic: {answered6}/5"
    );

    // 3. A flood of random source MACs from the spoofer for 10 s.
    let rss = |o: &Overlay| -> Result<Vec<f64>> { HOSTS.iter().map(|h| rss_mib(o, h)).collect() };
    let idle = rss(&o)?;
    let flood = flood_random_sources(spoofer, 10)?;
    let observer_ns = observer.clone();
    let pings = std::thread::spawn(move || pings_answered(&observer_ns, VICTIM_IP, 45));
    let (mut peak, mut largest_table) = (idle.clone(), 0);
    for _ in 0..9 {
        sleep(Duration::from_secs(1));
        for (p, now) in peak.iter_mut().zip(rss(&o)?) {
            *p = p.max(now);
        }
        for h in HOSTS {
            largest_table = largest_table.max(mac_table_len(&o, h)?);
        }
    }
    let flood_out = flood.wait_with_output()?;
    let answered = pings
        .join()
        .map_err(|_| anyhow::anyhow!("ping thread panicked"))??;
    let sent = String::from_utf8_lossy(&flood_out.stdout).trim().to_owned();
    let b1 = o.status("b1")?;
    let drops = &b1["switch"]["counters"]["drops"];
    let limited = counter(drops, &["learn_rate_limit"]) + counter(drops, &["mac_limit"]);
    sleep(Duration::from_secs(MAC_AGEING_S + 2));
    let after = rss(&o)?;
    let tables_after: Vec<usize> = HOSTS
        .iter()
        .map(|h| mac_table_len(&o, h))
        .collect::<Result<_>>()?;
    eprintln!(
        "flood: {sent} frames from random MACs (b1's TAP frames in all: {}, kernel TAP queue \
         overflows: {}); b1 dropped {limited} \
         (learn_rate_limit {}, mac_limit {}); largest MAC table {largest_table}; observer got \
         {answered}/45 answers; RSS MiB (a1 b1 c1) idle {idle:.1?}, peak {peak:.1?}, {}s after \
         {after:.1?}; tables after {tables_after:?}",
        b1["switch"]["counters"]["tap_frames"],
        b1["driver_drops"]["tap_queue_overflow"],
        drops["learn_rate_limit"],
        drops["mac_limit"],
        MAC_AGEING_S + 2,
    );
    assert!(limited > 0, "b1 limited nothing: {b1}");
    assert!(
        largest_table <= 512 + 8,
        "a MAC table grew to {largest_table}"
    );
    assert!(
        answered >= 40,
        "the victim lost traffic in the flood: {answered}/45"
    );
    for (h, (p, i)) in HOSTS.iter().zip(peak.iter().zip(&idle)) {
        assert!(p - i < 32.0, "{h}'s RSS grew from {i:.1} to {p:.1} MiB");
    }

    // 4. TCP at the guests' default MTU is not fragmented.
    let events = |h: &str| -> Result<(u64, u64, u64)> {
        let s = o.status(h)?;
        let c = |k: &str| counter(&s, &["switch", "counters", k]);
        Ok((c("datagrams_out"), c("fragmented"), c("mss_clamped")))
    };
    let (c1_before, a1_before) = (events("c1")?, events("a1")?);
    let mbit = tcp_mbit(victim, observer, VICTIM_IP)?;
    let (c1_after, a1_after) = (events("c1")?, events("a1")?);
    let direct = tcp_mbit(&ns("a1"), &ns("c1"), &addr("a1"))?;
    let sent = c1_after.0 - c1_before.0;
    let fragmented = c1_after.1 - c1_before.1;
    eprintln!(
        "TCP c1 -> a1 at MTU 1500, after the first 2 s: {mbit:.1} Mbit/s through the overlay, \
         {direct:.1} Mbit/s between the hosts without it ({:.2}); c1 sent {sent} datagrams, \
         fragmented {fragmented} frames; SYNs clamped: c1 {}, a1 {}",
        mbit / direct,
        c1_after.2 - c1_before.2,
        a1_after.2 - a1_before.2,
    );
    assert!(c1_after.2 > c1_before.2, "c1 clamped no SYN");
    assert!(a1_after.2 > a1_before.2, "a1 clamped no SYN-ACK");
    assert!(
        fragmented * 100 <= sent,
        "{fragmented} of {sent} frames were fragmented"
    );

    // 5. UDP above the WAN's rate (300 Mbit/s offered, 200 Mbit/s WAN): whatever iperf3 lost
    // shows in the daemons' counters (the core's drops, the driver's, the kernel's on the
    // daemons' devices and what QUIC declared lost on the WAN), within 5 %.
    let (counted_before, _) = drops_counted(&o)?;
    let (sent, lost) = udp_loss(victim, observer, VICTIM_IP, 300, 5)?;
    // Kernel and QUIC loss counters are read once a second.
    sleep(Duration::from_secs(2));
    let (counted_after, by_reason) = drops_counted(&o)?;
    let counted = counted_after - counted_before;
    eprintln!(
        "UDP overload c1 -> a1: iperf3 sent {sent} datagrams, lost {lost}; the daemons counted {counted} drops: {by_reason:?}"
    );
    assert!(lost > 0, "300 Mbit/s over a 200 Mbit/s WAN lost nothing");
    assert!(
        counted.abs_diff(lost) * 100 <= lost * 5 + 100,
        "iperf3 lost {lost} datagrams, the counters say {counted}: {by_reason:?}"
    );
    drop(o);
    drop(lab);
    Ok(())
}

/// Every drop the daemons counted, in total and by daemon and reason (non-zero only).
fn drops_counted(o: &Overlay) -> Result<(u64, Vec<(String, u64)>)> {
    let mut by_reason = Vec::new();
    for h in HOSTS {
        let s = o.status(h)?;
        for group in [&s["switch"]["counters"]["drops"], &s["driver_drops"]] {
            for (reason, n) in group.as_object().context("no drop counters")? {
                let n = n.as_u64().unwrap_or(0);
                if n > 0 {
                    by_reason.push((format!("{h}/{reason}"), n));
                }
            }
        }
    }
    Ok((by_reason.iter().map(|(_, n)| n).sum(), by_reason))
}

/// UDP from namespace `client` to `server_ip` (in `server`) at `mbit` Mbit/s for `seconds`, in
/// 1000-byte datagrams (one overlay datagram each): (datagrams sent, lost) as iperf3 counts.
fn udp_loss(
    server: &str,
    client: &str,
    server_ip: &str,
    mbit: u32,
    seconds: u32,
) -> Result<(u64, u64)> {
    let rate = format!("{mbit}M");
    let seconds = seconds.to_string();
    let iperf = iperf3(
        server,
        client,
        server_ip,
        "5312",
        &[
            "-u", "-l", "1000", "-w", "4M", "-J", "-b", &rate, "-t", &seconds,
        ],
    )?;
    anyhow::ensure!(
        iperf.status.success(),
        "iperf3 -u {client} -> {server_ip} failed: {}",
        String::from_utf8_lossy(&iperf.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&iperf.stdout)?;
    let sum = &report["end"]["sum"];
    let field = |k: &str| {
        sum[k]
            .as_u64()
            .with_context(|| format!("no {k} in iperf3's report: {sum}"))
    };
    Ok((field("packets")?, field("lost_packets")?))
}
