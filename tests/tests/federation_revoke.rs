//! Lab test: a host removed from the federation is refused at once by every daemon. Three
//! sites with one host each, one violin with a VM namespace on each host. The administrator
//! revokes b1's overlay certificate (`viola-ca revoke --identity viola://overlay/b/b1`) and
//! installs the CRL beside the other hosts' identities (`viola-ca install-crl`); nothing is
//! restarted. Then:
//!
//! - a1 and c1 close their open links to b1 within seconds, and b1's reconnection attempts
//!   fail their handshakes (b1 keeps running and keeps dialing);
//! - b1's VM no longer reaches the others, while a1's and c1's VMs still reach each other;
//! - a1's log says why.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use viola_labtests::overlay::*;
use viola_labtests::pki::Pki;
use viola_labtests::{Lab, LabSpec, lab_tests_enabled};

const LAB: &str = "ovr";
const HOSTS: [&str; 3] = ["a1", "b1", "c1"];

fn connected(o: &Overlay, host: &str, to: &str) -> Result<bool> {
    let status = o.status(host)?;
    Ok(peer(&status, to).is_some_and(|p| p["connected"].as_bool().unwrap_or(false)))
}

#[test]
fn a_revoked_host_is_cut_off_by_every_daemon_without_a_restart() -> Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    build_binaries()?;
    let lab = Lab::up(
        LAB,
        &LabSpec {
            sites: 3,
            hosts: 1,
            ..LabSpec::default()
        },
    )?;
    let mut o = Overlay::new(LAB)?;
    let pki = Pki::init(&o.path("ca"))?;
    let ns = |h: &str| lab.host(h).namespace.clone();
    for h in HOSTS {
        let path = o.host_config(&lab, &pki, h, &HOSTS, "", "[[violins]]\nid = 1")?;
        o.start(h, &ns(h), &path)?;
    }
    let vms: Vec<String> = HOSTS
        .iter()
        .enumerate()
        .map(|(i, h)| o.vm(&ns(h), h, 1, &format!("10.1.0.{}/24", i + 1)))
        .collect::<Result<_>>()?;
    let (vm_a, vm_b, vm_c) = (&vms[0], &vms[1], &vms[2]);
    for (from, to) in [(vm_a, "10.1.0.2"), (vm_c, "10.1.0.2"), (vm_a, "10.1.0.3")] {
        wait_ping_from(from, to, Duration::from_secs(30))
            .with_context(|| format!("before revocation; a1 log:\n{}", o.log("a1")))?;
    }
    assert!(connected(&o, "a1", "b/b1")? && connected(&o, "c1", "b/b1")?);

    let crl = pki.revoke("viola://overlay/b/b1")?;
    // Every host's identities get the CRL, as an administrator installs it on every host
    // (here the hosts' identity directories are side by side below the test's directory; b1's
    // gets it too, which changes nothing for b1's own certificate).
    let installed = Pki::install_crl(&crl, o.dir.path())?;
    eprintln!("{installed}");
    let revoked_at = Instant::now();
    loop {
        let a = connected(&o, "a1", "b/b1")?;
        let c = connected(&o, "c1", "b/b1")?;
        if !a && !c {
            break;
        }
        if revoked_at.elapsed() > Duration::from_secs(10) {
            bail!(
                "b1 still linked 10 s after the CRL: a1 {a}, c1 {c}\na1 log:\n{}",
                o.log("a1")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let cut_after = revoked_at.elapsed();
    eprintln!("a1 and c1 closed their links to b1 {cut_after:.1?} after the CRL was installed");

    // b1 keeps dialing; its handshakes are refused, so its VM stays cut off.
    std::thread::sleep(Duration::from_secs(5));
    let from_b = pings_answered(vm_b, "10.1.0.1", 10)? + pings_answered(vm_b, "10.1.0.3", 10)?;
    let a_to_c = pings_answered(vm_a, "10.1.0.3", 10)?;
    eprintln!("after revocation: b1's VM got {from_b}/20 answers, a1's VM from c1's {a_to_c}/10");
    assert_eq!(from_b, 0, "the revoked host's VM still reaches the violin");
    assert!(
        a_to_c >= 9,
        "the hosts that stay lost each other: {a_to_c}/10"
    );
    for h in ["a1", "c1"] {
        assert!(!connected(&o, h, "b/b1")?, "{h} let b1 back in");
    }
    let log = o.log("a1");
    assert!(
        log.contains("revoked"),
        "a1's log does not say why it closed b1's link:\n{log}"
    );
    Ok(())
}
