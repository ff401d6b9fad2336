//! Lab, end to end: a guest asks for resources from inside, through its shepherd channel (a
//! virtio-serial port; `viola-ask` in the guest, its host's monitor at the other end, the
//! manager's shepherd judging). Within the violin's quota the cap changes in libvirt; over it,
//! or naming another VM, or malformed, the guest is told why and nothing changes; every request
//! is in the decision log.

// lab: default

use std::time::Duration;

use viola_labtests::daemons::bin;
use viola_labtests::federation::{Federation, vm_host};
use viola_labtests::mech::*;

/// The guest's cap in percent of one CPU as libvirt has it now (`None`: uncapped).
fn cap_percent(name: &str) -> Option<i64> {
    let cap = open("a1").cpu_tuning(name).ok()?.cap?;
    (cap.quota_us > 0).then(|| cap.quota_us * 100 / cap.period_us as i64)
}

/// What the guest's `viola-ask` printed for `ask=QUERY` (its answer line and exit status).
fn ask(ip: &str, query: &str) -> String {
    viola_labtests::guest_http(lab(), "a1", ip, &format!("ask={query}"))
        .unwrap_or_else(|e| panic!("ask={query}: {e:#}"))
}

#[test]
fn a_guest_asks_from_inside_and_gets_what_its_quota_allows_and_nothing_for_another_vm() {
    let name = "vm-shep";
    let (_cleanup, _hv, ip) = begin_with_guest("a1", name, "10.77.11", 1);
    let ip = ip.as_str();
    let fed = Federation::start(
        &[("a1", "a")],
        &format!(
            "[[violins]]\nname = \"lan\"\nid = 7711\nvms = [\"{name}\"]\n\
             [guest_requests]\nmax_cap_percent_per_vm = 60\n"
        ),
    );
    let (mgr, cli) = (fed.mgr.clone(), fed.cli_id.clone());
    wait_guest("a1", ip, Duration::from_secs(180));
    wait_until(
        "the manager knows the guest",
        Duration::from_secs(60),
        || vm_host(&mgr, &cli, name).is_some_and(|(h, _)| h == "a1"),
    );
    assert_eq!(cap_percent(name), None);

    // Within its quota: half a CPU. The monitor serves the channel within a scan or two.
    let mut said = String::new();
    wait_until(
        "the guest's request is answered",
        Duration::from_secs(30),
        || {
            said = ask(ip, "resize,500");
            !said.contains("no answer") && !said.contains("could not be asked")
        },
    );
    eprintln!("[lab test] within quota: {said}");
    assert!(
        said.contains("\"accepted\":true") && said.contains("exit=0"),
        "{said}"
    );
    assert_eq!(cap_percent(name), Some(50));

    // Over it (60 %): refused with the reason; the cap stays.
    let said = ask(ip, "resize,900");
    eprintln!("[lab test] over quota: {said}");
    assert!(
        said.contains("\"accepted\":false") && said.contains("quota"),
        "{said}"
    );
    assert!(said.contains("exit=1"), "{said}");
    assert_eq!(cap_percent(name), Some(50));

    // Naming another VM, and a malformed line: refused, nothing changes.
    let said = ask(ip, "resize-as,vm-victim,100");
    eprintln!("[lab test] for another VM: {said}");
    assert!(
        said.contains("may only ask for itself: vm-shep asked for vm-victim"),
        "{said}"
    );
    let said = ask(ip, "garbage");
    assert!(said.contains("malformed"), "{said}");
    assert_eq!(cap_percent(name), Some(50));

    // Every request is in the decision log, as the shepherd's, with how it ended.
    let out = std::process::Command::new(bin("viola"))
        .args(["--manager", &mgr, "--identity"])
        .arg(&cli)
        .args(["--json", "decisions"])
        .output()
        .expect("run viola decisions");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // One decision per line.
    let shepherd: Vec<(String, String)> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a decision per line"))
        .filter(|d| d["policy"] == "shepherd")
        .flat_map(|d| d["actions"].as_array().cloned().unwrap_or_default())
        .map(|a| {
            (
                a["action"].as_str().unwrap_or_default().to_owned(),
                a["outcome"]["outcome"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        shepherd,
        [
            ("resize".to_owned(), "done".to_owned()),
            ("resize".to_owned(), "skipped".to_owned()),
            ("resize".to_owned(), "skipped".to_owned()),
            ("request".to_owned(), "skipped".to_owned()),
        ],
        "{text}"
    );
}
