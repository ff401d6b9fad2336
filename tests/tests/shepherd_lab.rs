//! Lab, end to end: a guest asks for resources from inside, through its shepherd channel (a
//! virtio-serial port; `viola-ask` in the guest, its host's monitor at the other end, the
//! manager's shepherd judging). Within the violin's quota the cap changes in libvirt; over it,
//! or naming another VM, or malformed, the guest is told why and nothing changes; every request
//! is in the decision log.

// lab: default

use viola_labtests::federation::guest_of_one_violin;
use viola_labtests::mech::*;

/// What the guest's `viola-ask` printed for `ask=QUERY` (its answer line and exit status).
fn ask(ip: &str, query: &str) -> String {
    viola_labtests::guest_http(lab(), "a1", ip, &format!("ask={query}"))
        .unwrap_or_else(|e| panic!("ask={query}: {e:#}"))
}

#[test]
fn a_guest_asks_from_inside_and_gets_what_its_quota_allows_and_nothing_for_another_vm() {
    let name = "vm-shep";
    let g = guest_of_one_violin(name, "10.77.11", 7711, "max_cap_percent_per_vm = 60");
    let ip = g.ip.as_str();
    assert_eq!(cap_percent("a1", name), None);

    // Within its quota: half a CPU. The monitor serves the channel within a scan or two.
    let mut said = String::new();
    wait_until(
        "the guest's request is answered",
        std::time::Duration::from_secs(30),
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
    assert_eq!(cap_percent("a1", name), Some(50));

    // Over it (60 %): refused with the reason; the cap stays.
    let said = ask(ip, "resize,900");
    eprintln!("[lab test] over quota: {said}");
    assert!(
        said.contains("\"accepted\":false") && said.contains("quota"),
        "{said}"
    );
    assert!(said.contains("exit=1"), "{said}");
    assert_eq!(cap_percent("a1", name), Some(50));

    // Naming another VM, and a malformed line: refused, nothing changes.
    let said = ask(ip, "resize-as,vm-victim,100");
    eprintln!("[lab test] for another VM: {said}");
    assert!(
        said.contains("may only ask for itself: vm-shep asked for vm-victim"),
        "{said}"
    );
    let said = ask(ip, "garbage");
    assert!(said.contains("malformed"), "{said}");
    assert_eq!(cap_percent("a1", name), Some(50));

    // Every request is in the decision log, as the shepherd's, with how it ended.
    let shepherd: Vec<(String, String)> = g
        .fed
        .actions_of("shepherd")
        .into_iter()
        .map(|a| {
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            (text(&a["action"]), text(&a["outcome"]["outcome"]))
        })
        .collect();
    let expected = [
        ("resize", "done"),
        ("resize", "skipped"),
        ("resize", "skipped"),
        ("request", "skipped"),
    ];
    assert_eq!(
        shepherd,
        expected.map(|(a, o)| (a.to_owned(), o.to_owned()))
    );
}
