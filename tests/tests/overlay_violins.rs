//! Overlay lab test: violins set at run time, kept across a restart, and DHCP for managed VMs
//! answered by the overlay. Two sites with one host each; the daemons start with no violin in
//! their TOML file and a `state_file`:
//!
//! - `set_violin` (over the unix socket) makes violin 7 (subnet 10.7.0.0/24, one managed VM
//!   per host) on both hosts: bridge and TAP appear; a bad spec is refused with its reason;
//! - a namespace standing in for each VM, with the managed MAC, runs `busybox udhcpc` and gets
//!   its configured address from its own host's daemon; the two ping each other across sites;
//! - the violin's MTU set to 9000 in place (`set_violin` with `mtu`): both hosts' bridge and
//!   TAP take it, the guests' renewed leases hand it out, and full-size 9000-byte frames cross
//!   the sites (as fragments of QUIC datagrams) with don't-fragment set;
//! - a namespace with an unknown MAC gets no lease (udhcpc gives up), counted as
//!   `dhcp_unknown_client`;
//! - b1's daemon restarts: the violin is back from the state file (bridge, TAP, the guest's
//!   port still on the bridge) and the ping crosses again;
//! - `remove_violin` on both hosts: TAP and bridge are gone, the status lists no violin, the
//!   state file keeps none.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use viola_api::overlay::{ControlReply, ControlRequest, ViolinSpec, request_unix};
use viola_labtests::overlay::*;
use viola_labtests::{LabSpec, run, run_ok, wait_until};

const LAB: &str = "ovv";
const HOSTS: [&str; 2] = ["a1", "b1"];
const VM_A: (&str, &str) = ("52:54:00:07:00:0a", "10.7.0.10");
const VM_B: (&str, &str) = ("52:54:00:07:00:0b", "10.7.0.11");
const STRANGER_MAC: &str = "52:54:00:07:00:99";

fn spec() -> Result<ViolinSpec> {
    Ok(serde_json::from_value(serde_json::json!({
        "id": 7,
        "name": "lab",
        "allowed": ["a/*", "b/*"],
        "subnet": "10.7.0.0/24",
        "vms": [
            {"mac": VM_A.0, "ip": VM_A.1, "host": "a/a1"},
            {"mac": VM_B.0, "ip": VM_B.1, "host": "b/b1"},
        ],
    }))?)
}

fn control(o: &Overlay, host: &str, req: &ControlRequest) -> Result<ControlReply> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(request_unix(&o.socket(host), req))?)
}

/// A namespace standing in for a VM on `host_ns`: its eth0 (with `mac`) is a port of vio7.
fn guest(o: &mut Overlay, host_ns: &str, name: &str, mac: &str) -> Result<String> {
    let ns = format!("vo-{}-{name}", o.lab);
    run_ok(Command::new("ip").args(["netns", "add", &ns]))?;
    o.vm_namespaces.push(ns.clone());
    let port = format!("g{name}");
    for args in [
        vec![
            "-n", host_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ],
        vec!["-n", host_ns, "link", "set", &port, "master", "vio7", "up"],
        vec!["-n", &ns, "link", "set", "eth0", "address", mac],
        vec!["-n", &ns, "link", "set", "lo", "up"],
        vec!["-n", &ns, "link", "set", "eth0", "up"],
    ] {
        run_ok(Command::new("ip").args(&args))?;
    }
    Ok(ns)
}

/// Runs `busybox udhcpc` in `ns` (5 discovers 1 s apart, then it gives up); whether it got a
/// lease, and how long it took.
fn udhcpc(o: &Overlay, ns: &str) -> Result<(bool, Duration)> {
    let script = o.path("udhcpc.sh");
    if !script.exists() {
        std::fs::write(
            &script,
            "#!/bin/sh\n\
             case \"$1\" in\n\
             bound|renew)\n\
             \x20 ip addr flush dev \"$interface\"\n\
             \x20 ip addr add \"$ip/$subnet\" dev \"$interface\"\n\
             \x20 [ -n \"$mtu\" ] && ip link set dev \"$interface\" mtu \"$mtu\"\n\
             \x20 ;;\n\
             esac\n\
             exit 0\n",
        )?;
        run_ok(Command::new("chmod").arg("755").arg(&script))?;
    }
    let start = Instant::now();
    let out = run(Command::new("ip")
        .args(["netns", "exec", ns, "timeout", "30"])
        .args([
            "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t", "5", "-T", "1", "-A", "1", "-s",
        ])
        .arg(&script))?;
    eprintln!(
        "udhcpc in {ns}: {} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok((out.status.success(), start.elapsed()))
}

fn ipv4_of(ns: &str) -> Result<String> {
    run_ok(Command::new("ip").args(["-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"]))
}

fn wait_for_violin(o: &Overlay, host: &str, present: bool) -> Result<()> {
    wait_until(
        &format!("violin 7 in {host}'s status"),
        Duration::from_secs(15),
        || {
            o.status(host).is_ok_and(|s| {
                s["switch"]["violins"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|v| v["id"] == 7) == present)
            })
        },
    )
}

#[test]
fn violins_set_at_run_time_answer_dhcp_and_survive_a_restart() -> Result<()> {
    let Some((lab, mut o, pki)) = start_lab(LAB, &LabSpec::one_host_per_site(2))? else {
        return Ok(());
    };
    let ns = |h: &str| lab.host(h).namespace.clone();
    let mut configs = Vec::new();
    for h in HOSTS {
        let state = format!(
            "state_file = \"{}\"",
            o.path(&format!("{h}-state.json")).display()
        );
        let path = o.host_config(&lab, &pki, h, &HOSTS, &state, "")?;
        o.start(h, &ns(h), &path)?;
        configs.push(path);
    }
    for h in HOSTS {
        wait_until(
            &format!("{h}'s control socket"),
            Duration::from_secs(15),
            || o.status(h).is_ok(),
        )
        .with_context(|| o.log(h))?;
        assert!(!link_exists(&ns(h), "vio7"), "no violin before set_violin");
    }

    // A bad spec is refused and changes nothing.
    let mut bad = spec()?;
    bad.vms[1].ip = "10.8.0.11".parse()?;
    match control(&o, "a1", &ControlRequest::SetViolin { violin: bad })? {
        ControlReply::Refused { reason } => {
            eprintln!("bad spec refused: {reason}");
            assert!(reason.contains("10.8.0.11"), "{reason}");
        }
        other => bail!("a bad spec was not refused: {other:?}"),
    }
    assert!(!link_exists(&ns("a1"), "vio7"));

    // set_violin on both hosts (twice on a1: idempotent).
    for h in ["a1", "b1", "a1"] {
        let reply = control(&o, h, &ControlRequest::SetViolin { violin: spec()? })?;
        assert_eq!(reply, ControlReply::Done, "set_violin on {h}");
    }
    for h in HOSTS {
        assert!(link_exists(&ns(h), "vio7") && link_exists(&ns(h), "vio7t"));
        let status = o.status(h)?;
        let v = &status["switch"]["violins"][0];
        assert_eq!(v["id"], 7);
        assert_eq!(v["subnet"], "10.7.0.0/24");
        assert_eq!(v["runtime"], true);
    }
    wait_until(
        "a1 and b1 members of violin 7",
        Duration::from_secs(20),
        || {
            o.status("a1")
                .is_ok_and(|s| s["switch"]["violins"][0]["members"] == serde_json::json!(["b/b1"]))
        },
    )
    .with_context(|| format!("a1:\n{}\nb1:\n{}", o.log("a1"), o.log("b1")))?;

    // DHCP from each host's daemon, then ping across sites.
    let ga = guest(&mut o, &ns("a1"), "ga", VM_A.0)?;
    let gb = guest(&mut o, &ns("b1"), "gb", VM_B.0)?;
    for (g, (_, ip)) in [(&ga, VM_A), (&gb, VM_B)] {
        let (leased, took) = udhcpc(&o, g)?;
        let addrs = ipv4_of(g)?;
        eprintln!("{g}: lease {leased} after {took:?}: {}", addrs.trim());
        assert!(leased, "{g} got no lease");
        assert!(addrs.contains(&format!("{ip}/24")), "{g}: {addrs}");
    }
    for h in HOSTS {
        let s = o.status(h)?;
        let c = &s["switch"]["counters"];
        eprintln!(
            "{h}: dhcp_offers {} dhcp_acks {} dhcp_naks {}",
            c["dhcp_offers"], c["dhcp_acks"], c["dhcp_naks"]
        );
        assert!(
            counter(&s, &["switch", "counters", "dhcp_acks"]) >= 1,
            "{h}: {c}"
        );
    }
    let t = wait_ping_from(&ga, VM_B.1, Duration::from_secs(20))
        .with_context(|| format!("a1:\n{}\nb1:\n{}", o.log("a1"), o.log("b1")))?;
    eprintln!("ping a1 -> b1 guest after {t:?}");

    // The violin's own MTU, changed in place: 9000 on its bridges and TAPs, and in the leases.
    let jumbo = ViolinSpec {
        mtu: Some(9000),
        ..spec()?
    };
    for h in HOSTS {
        let reply = control(
            &o,
            h,
            &ControlRequest::SetViolin {
                violin: jumbo.clone(),
            },
        )?;
        assert_eq!(reply, ControlReply::Done, "set_violin mtu 9000 on {h}");
        assert_eq!(link_mtu(&ns(h), "vio7")?, 9000, "{h}'s bridge");
        assert_eq!(link_mtu(&ns(h), "vio7t")?, 9000, "{h}'s TAP");
    }
    let too_big = ViolinSpec {
        mtu: Some(9001),
        ..spec()?
    };
    match control(&o, "a1", &ControlRequest::SetViolin { violin: too_big })? {
        ControlReply::Refused { reason } => assert!(reason.contains("9001"), "{reason}"),
        other => panic!("MTU 9001 taken: {other:?}"),
    }
    assert_eq!(
        link_mtu(&ns("a1"), "vio7")?,
        9000,
        "a refused spec changed nothing"
    );
    for (h, g, port) in [("a1", &ga, "gga"), ("b1", &gb, "ggb")] {
        // The guest's port, as libvirt sets a VM's from the domain's <mtu>.
        run_ok(Command::new("ip").args(["-n", &ns(h), "link", "set", port, "mtu", "9000"]))?;
        let (leased, _) = udhcpc(&o, g)?;
        assert!(leased, "{g}: no lease after the MTU change");
        assert_eq!(link_mtu(g, "eth0")?, 9000, "{g}: the lease's MTU");
    }
    let jumbo_ping = run(Command::new("ip").args([
        "netns", "exec", &ga, "ping", "-c", "3", "-W", "2", "-M", "do", "-s", "8972", VM_B.1,
    ]))?;
    assert!(
        jumbo_ping.status.success(),
        "9000-byte frames across the sites: {}{}",
        String::from_utf8_lossy(&jumbo_ping.stdout),
        String::from_utf8_lossy(&jumbo_ping.stderr)
    );
    eprintln!("9000-byte pings a1 -> b1 answered at violin MTU 9000");

    // An unknown MAC gets no lease from the overlay, in bounded time.
    let stranger = guest(&mut o, &ns("a1"), "gx", STRANGER_MAC)?;
    let (leased, took) = udhcpc(&o, &stranger)?;
    eprintln!("unknown MAC: lease {leased} after {took:?}");
    assert!(!leased, "an unknown MAC got a lease");
    assert!(took < Duration::from_secs(25));
    assert!(!ipv4_of(&stranger)?.contains("inet "));
    let unknown = counter(
        &o.status("a1")?,
        &["switch", "counters", "dhcp_unknown_client"],
    );
    assert!(unknown >= 1, "no dhcp_unknown_client counted");

    // b1 restarts: the violin comes back from its state file.
    o.kill("b1", libc::SIGTERM)?;
    let kept = std::fs::read_to_string(o.path("b1-state.json"))?;
    assert!(kept.contains("10.7.0.0/24"), "b1's state file: {kept}");
    assert!(
        link_exists(&ns("b1"), "vio7"),
        "a kept violin's bridge stays"
    );
    o.start("b1", &ns("b1"), &configs[1])?;
    wait_for_violin(&o, "b1", true).with_context(|| o.log("b1"))?;
    assert!(link_exists(&ns("b1"), "vio7t"));
    assert_eq!(o.status("b1")?["switch"]["violins"][0]["runtime"], true);
    let t = wait_ping_from(&ga, VM_B.1, Duration::from_secs(30))
        .with_context(|| format!("a1:\n{}\nb1:\n{}", o.log("a1"), o.log("b1")))?;
    eprintln!("ping across again {t:?} after b1's restart");

    // remove_violin: TAP and bridge go, the status and the state file forget the violin.
    for h in HOSTS {
        let reply = control(&o, h, &ControlRequest::RemoveViolin { violin: 7 })?;
        assert_eq!(reply, ControlReply::Done, "remove_violin on {h}");
        wait_until(
            &format!("vio7t gone in {h}"),
            Duration::from_secs(5),
            || !link_exists(&ns(h), "vio7t"),
        )?;
        assert!(
            !link_exists(&ns(h), "vio7"),
            "{h}: the bridge is still there"
        );
        wait_for_violin(&o, h, false)?;
        let kept = std::fs::read_to_string(o.path(&format!("{h}-state.json")))?;
        assert!(!kept.contains("10.7.0.0/24"), "{h}'s state file: {kept}");
    }
    Ok(())
}
