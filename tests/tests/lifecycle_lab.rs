//! Violins and VMs as a service, on the lab with the real daemons and the `viola` CLI (lab
//! test). Two sites of two hosts; an overlay daemon on every host with no violin in its TOML;
//! a depot at each site (site a holds the guest image, site b fetches from it); the manager in
//! host a2's namespace (it reaches depots and overlays on the underlay, libvirtds through
//! their unix sockets); a monitor per host. Then, with the CLI only:
//!
//! - `viola violin create lab --sites a,b`: every host gets bridge `vio<id>` at once;
//! - `viola vm create` of three VMs from the depot image with a deadline (the one at site a
//!   with the user's SSH key, which then logs in as root while another key does not), one at site a and two
//!   at site b (`--count 2`, one plan); each takes its address by DHCP from the overlay on its
//!   host (the console says so), answers HTTP on it from a2 across the sites, and `viola vm
//!   list` shows its violin and address;
//! - an impossible deadline is refused before anything is made;
//! - a manager killed (SIGKILL) in the middle of a create of three VMs undoes it at its next
//!   start: no domain, disk, address or inventory entry of them anywhere;
//! - tenants: a user of tenant physics makes a violin that a user of tenant chem can neither
//!   see nor delete; physics's quota refuses a create that would exceed it, and nothing is
//!   made; a tenant's user may not list hosts; physics's imported image is listed for physics
//!   only, and an image file naming a backing file is refused;
//! - a created VM migrates across sites with no hand-written configuration;
//! - from inside, through its shepherd channel (`viola-ask migrate --site a`), the VM asks to
//!   go back: it is told where before the move, moves live and keeps its address;
//! - `viola violin delete lab` is refused while it has VMs, and with `--force` leaves nothing
//!   on any host: no domain (`virsh list --all`), no disk, no bridge, no violin in the
//!   overlays' status, nothing in the inventory.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use viola_labtests::daemons::log_text;
use viola_labtests::lifecycle::{
    Cli, Fed, HOSTS, console_ready_ip, spawn_manager, ssh, ssh_keygen,
};
use viola_labtests::overlay::link_exists;
use viola_labtests::{guest_dir, lab_tests_enabled, names, run, run_ok, wait_until};

#[test]
fn violins_and_vms_from_the_cli_with_dhcp_a_deadline_a_migration_and_nothing_left_behind() {
    if !lab_tests_enabled() {
        return;
    }
    let mut fed = Fed::up(&[]);
    let lab = &fed.lab;
    let dir = fed.tmp.path();
    let console = fed.console.clone();
    let mgr_log = fed.mgr_log.clone();
    let ns = |h: &str| lab.host(h).namespace.clone();
    let cli = &fed.cli;

    // A violin across both sites: a bridge on every host at once.
    let violin = cli
        .json(&["violin", "create", "lab", "--sites", "a,b"])
        .unwrap_or_else(|e| panic!("violin create: {e}\n{}", log_text(&mgr_log)));
    let vid = violin[0]["id"].as_u64().expect("violin id");
    let subnet = violin[0]["subnet"].as_str().expect("subnet").to_owned();
    let bridge = format!("vio{vid}");
    eprintln!("violin lab: id {vid}, subnet {subnet}");
    for h in HOSTS {
        assert!(link_exists(&ns(h), &bridge), "{bridge} missing at {h}");
    }
    // a2 looks into the violin from an address of its own (no VM holds it).
    let observer = subnet.replace(".0/", ".250/");
    run_ok(Command::new("ip").args(["-n", &ns("a2"), "addr", "add", &observer, "dev", &bridge]))
        .unwrap();

    // Three VMs from the depot image with a deadline: one at site a (with the user's SSH
    // key), two at site b.
    let key = dir.join("id_ed25519");
    ssh_keygen(&key, Some("tester@lab"));
    // `vm create NAME` in violin lab from the depot image at SITE, ready within READY_BY s.
    let create = |name: &str, site: &str, ready_by: &str, more: &[&str]| {
        let mut args = vec!["--site", site, "--ready-by", ready_by];
        args.extend_from_slice(more);
        cli.vm_create(name, "lab", "guest", &args)
    };
    let created = Instant::now();
    let pub_key = key.with_extension("pub");
    let a_vms = create("web", "a", "120", &["--ssh-key", pub_key.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("vm create web: {e}\n{}", log_text(&mgr_log)));
    let b_vms = create("node", "b", "180", &["--count", "2"])
        .unwrap_or_else(|e| panic!("vm create node: {e}\n{}", log_text(&mgr_log)));
    eprintln!("3 VMs created in {:.1} s", created.elapsed().as_secs_f64());
    let vms: Vec<(String, String, String)> = a_vms
        .as_array()
        .unwrap()
        .iter()
        .chain(b_vms.as_array().unwrap())
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["host"].as_str().unwrap().to_owned(),
                v["ip"].as_str().expect("an address").to_owned(),
            )
        })
        .collect();
    assert_eq!(vms.len(), 3);
    assert!(vms[0].1.starts_with('a') && vms[1].1.starts_with('b') && vms[2].1.starts_with('b'));
    for (name, host, ip) in &vms {
        // Its address by DHCP from the overlay on its host, then HTTP from a2 (site a).
        wait_until(
            &format!("{name} leases {ip}"),
            Duration::from_secs(120),
            || console_ready_ip(&console, name).is_some_and(|got| &got == ip),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}; console: {:?}",
                std::fs::read_to_string(console.join(format!("{name}.log")))
            )
        });
        wait_until(
            &format!("{name} answers at {ip}"),
            Duration::from_secs(60),
            || viola_labtests::guest_http(lab, "a2", ip, "info").is_ok(),
        )
        .unwrap();
        eprintln!(
            "{name} at {host} answers at {ip} {:.1} s after the first create",
            created.elapsed().as_secs_f64()
        );
    }
    // The key given at create logs in as root on web (and nothing else does).
    let ssh = |ip: &str, identity: &Path| {
        ssh(
            &ns("a2"),
            identity,
            ip,
            "hostname",
            None,
            Duration::from_secs(60),
        )
    };
    let out = ssh(&vms[0].2, &key);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "web",
        "ssh root@web: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other = dir.join("other_ed25519");
    ssh_keygen(&other, None);
    assert!(
        !ssh(&vms[0].2, &other).status.success(),
        "another key is refused"
    );
    let listed = cli.json(&["vm", "list"]).unwrap();
    for (name, _, ip) in &vms {
        let v = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} not listed: {listed}"));
        assert_eq!(v["violin"], "lab");
        assert_eq!(v["ip"], ip.as_str());
    }

    // An impossible deadline: refused at once, nothing made.
    let late = create("late", "b", "0", &[]);
    let err = late.expect_err("a deadline of 0 s cannot be met");
    assert!(err.contains("cannot be ready"), "{err}");
    for h in ["b1", "b2"] {
        let all = lab.virsh(h, &["list", "--all", "--name"]).unwrap();
        assert!(!all.contains("late"), "{h}: {all}");
        assert!(!Path::new(&lab.host(h).images).join("late.qcow2").exists());
    }

    // A manager killed in the middle of a create of three VMs (placed over both sites)
    // undoes it at its next start.
    let cut_out = dir.join("cut.out");
    let mut cut = cli
        .cmd(&[
            "vm",
            "create",
            "cut",
            "--violin",
            "lab",
            "--image",
            "guest",
            "--ready-by",
            "180",
            "--count",
            "3",
        ])
        .stdout(std::fs::File::create(&cut_out).unwrap())
        .stderr(std::fs::File::create(dir.join("cut.err")).unwrap())
        .spawn()
        .unwrap();
    wait_until("the create asks a depot", Duration::from_secs(60), || {
        log_text(&cut_out).contains("asked the depot")
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            log_text(&cut_out),
            log_text(&dir.join("cut.err"))
        )
    });
    fed.daemons.kill("manager", libc::SIGKILL).unwrap();
    let _ = cut.wait();
    eprintln!("manager killed during: {}", log_text(&cut_out));
    let mgr_log2 = dir.join("adaptmgr-2.log");
    let again = spawn_manager(&ns("a2"), &fed.mgr_cfg, &mgr_log2);
    fed.daemons.add("manager", again);
    wait_until(
        "the restarted manager resolves the create",
        Duration::from_secs(180),
        || log_text(&mgr_log2).contains("interrupted creates and deletes resolved"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", log_text(&mgr_log2)));
    let cut_names = ["cut-1", "cut-2", "cut-3"];
    for h in HOSTS {
        lab.assert_vms_gone(h, &cut_names);
    }
    let shown = cli.json(&["violin", "show", "lab"]).unwrap();
    let members = shown[0]["vms"].as_array().unwrap();
    assert_eq!(members.len(), 3, "only web and node-1/2: {shown}");
    let listed = cli.json(&["vm", "list"]).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|v| !cut_names.contains(&v["name"].as_str().unwrap_or_default())),
        "{listed}"
    );
    for h in HOSTS {
        let status = fed.overlays.status(h).unwrap().to_string();
        for line in log_text(&cut_out).lines().filter(|l| l.contains("MAC")) {
            let mac = line
                .split("MAC ")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .unwrap();
            assert!(!status.contains(mac), "{h}'s overlay still knows {mac}");
        }
    }

    // Tenants: physics's violin is invisible and untouchable for chem; quotas hold.
    let (ann, bob) = (fed.user("ann"), fed.user("bob"));
    let science = ann
        .json(&["violin", "create", "science", "--sites", "b"])
        .unwrap_or_else(|e| panic!("tenant's violin create: {e}"));
    assert_eq!(science[0]["tenant"], "physics");
    let science_bridge = format!("vio{}", science[0]["id"]);
    assert!(link_exists(&ns("b1"), &science_bridge));
    let ann_sees = ann.json(&["violin", "list"]).unwrap();
    assert_eq!(
        names(&ann_sees),
        ["science"],
        "physics sees only its own violin: {ann_sees}"
    );
    assert_eq!(
        bob.json(&["violin", "list"]).unwrap(),
        serde_json::json!([])
    );
    assert!(
        bob.json(&["violin", "show", "science"])
            .is_err_and(|e| e.contains("no violin"))
    );
    assert!(
        bob.json(&["violin", "delete", "science", "--force"])
            .is_err_and(|e| e.contains("no violin"))
    );
    assert!(
        link_exists(&ns("b1"), &science_bridge),
        "chem's delete changed nothing"
    );
    assert_eq!(
        ann.json(&["vm", "list"]).unwrap(),
        serde_json::json!([]),
        "the administrator's VMs are not physics's"
    );
    assert!(
        ann.json(&["host", "list"])
            .is_err_and(|e| e.contains("only an administrator"))
    );
    let over = ann.json(&[
        "vm", "create", "sim", "--violin", "science", "--image", "guest", "--site", "b", "--count",
        "2",
    ]);
    assert!(
        over.is_err_and(|e| e.contains("quota of 1 VMs")),
        "physics may hold 1 VM"
    );
    for h in ["b1", "b2"] {
        let all = lab.virsh(h, &["list", "--all", "--name"]).unwrap();
        assert!(!all.contains("sim-"), "{h}: {all}");
    }
    // Images: physics's own is listed for physics only; a disk naming a backing file is
    // refused by the depot before anything reads it.
    let base = guest_dir().join("base.qcow2");
    let imported = ann
        .json(&[
            "image",
            "import",
            base.to_str().unwrap(),
            "--name",
            "mine",
            "--site",
            "a",
        ])
        .unwrap_or_else(|e| panic!("image import: {e}\n{}", log_text(&mgr_log2)));
    assert_eq!(imported[0]["name"], "mine");
    assert_eq!(imported[0]["tenant"], "physics");
    let images = |who: &Cli| -> Vec<(String, String)> {
        who.json(&["image", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["name"].as_str().unwrap().to_owned(),
                    i["tenant"].to_string(),
                )
            })
            .collect()
    };
    let ann_images = images(&ann);
    assert!(
        ann_images.contains(&("mine".into(), "\"physics\"".into())),
        "{ann_images:?}"
    );
    assert!(
        ann_images.contains(&("guest".into(), "null".into())),
        "{ann_images:?}"
    );
    let bob_images = images(&bob);
    assert!(
        bob_images.iter().all(|(n, _)| n != "mine"),
        "{bob_images:?}"
    );
    let layered = dir.join("layered.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&layered),
    )
    .unwrap();
    let refused = ann.json(&[
        "image",
        "import",
        layered.to_str().unwrap(),
        "--name",
        "layered",
        "--site",
        "a",
    ]);
    assert!(
        refused.is_err_and(|e| e.contains("backing")),
        "a disk with a backing file is refused"
    );
    assert!(images(&ann).iter().all(|(n, _)| n != "layered"));
    ann.json(&["violin", "delete", "science"]).unwrap();
    assert!(!link_exists(&ns("b1"), &science_bridge));

    // A created VM moves across sites with nothing configured by hand.
    let (web, web_host, web_ip) = vms[0].clone();
    let out =
        run(&mut cli.cmd(&["vm", "migrate", &web, "--to", "b2", "--timeout-s", "240"])).unwrap();
    assert!(
        out.status.success(),
        "migrate: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.domain_state("b2", &web).as_deref(), Some("running"));
    assert!(lab.domain_state(&web_host, &web).is_none());
    wait_until(
        &format!("{web} answers at b2"),
        Duration::from_secs(30),
        || viola_labtests::guest_http(lab, "a2", &web_ip, "info").is_ok(),
    )
    .unwrap();

    // From inside, the guest asks to go back to site a (its shepherd channel, b2's monitor,
    // the manager's shepherd): it is told where it goes before the move, and it moves live,
    // keeping its address.
    let said = viola_labtests::guest_http(lab, "a2", &web_ip, "ask=migrate,a").unwrap();
    eprintln!("[lab test] {web} asked to move to site a: {said}");
    assert!(
        said.contains("\"accepted\":true") && said.contains("moving to a/"),
        "{said}"
    );
    let mut back_at = String::new();
    wait_until(
        &format!("{web} moved back to site a at its own request"),
        Duration::from_secs(240),
        || {
            back_at = placement_of(cli, &web);
            // The source's copy goes once the move is complete: one running copy.
            back_at.starts_with('a')
                && lab.domain_state(&back_at, &web).as_deref() == Some("running")
                && lab.domain_state("b2", &web).is_none()
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", log_text(&mgr_log)));
    wait_until(
        &format!("{web} answers at {back_at}"),
        Duration::from_secs(30),
        || viola_labtests::guest_http(lab, "a2", &web_ip, "info").is_ok(),
    )
    .unwrap();
    // Its new host's monitor serves its channel now: a request from there is answered.
    let mut said = String::new();
    wait_until(
        &format!("{web} is heard from {back_at}"),
        Duration::from_secs(30),
        || {
            said = viola_labtests::guest_http(lab, "a2", &web_ip, "ask=resize,500")
                .unwrap_or_default();
            said.contains("\"accepted\":true")
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {said}"));
    let moves = run_ok(&mut cli.cmd(&["--json", "decisions"])).unwrap();
    assert!(
        moves.lines().any(|l| l.contains("\"policy\":\"shepherd\"")
            && l.contains("\"action\":\"migrate\"")
            && l.contains("\"outcome\":\"done\"")),
        "the guest's move is not in the decision log as done: {moves}"
    );

    // Delete: refused while it has VMs; with --force nothing is left anywhere.
    let refused = cli.json(&["violin", "delete", "lab"]);
    assert!(refused.is_err_and(|e| e.contains("--force")));
    cli.json(&["violin", "delete", "lab", "--force"])
        .unwrap_or_else(|e| panic!("violin delete: {e}\n{}", log_text(&mgr_log)));
    for h in HOSTS {
        let names: Vec<&str> = vms.iter().map(|(name, _, _)| name.as_str()).collect();
        lab.assert_vms_gone(h, &names);
        assert!(!link_exists(&ns(h), &bridge), "{bridge} still at {h}");
        let status = fed.overlays.status(h).unwrap();
        assert_eq!(status["switch"]["violins"], serde_json::json!([]), "{h}");
    }
    assert_eq!(
        cli.json(&["violin", "list"]).unwrap(),
        serde_json::json!([])
    );
    let left = cli.json(&["vm", "list"]).unwrap();
    assert!(
        left.as_array()
            .unwrap()
            .iter()
            .all(|v| !vms.iter().any(|(n, _, _)| v["name"] == n.as_str())),
        "{left}"
    );
}

/// Creates `n` VMs over both sites and waits until every one answers HTTP at its DHCP address.
/// Returns (seconds until the creates returned, seconds until all answered).
fn create_and_wait(fed: &Fed, violin: &str, names: &[String], one_plan: bool) -> (f64, f64) {
    let started = Instant::now();
    let base = ["--violin", violin, "--image", "guest", "--ready-by", "600"];
    let mut made = Vec::new();
    if one_plan {
        let count = names.len().to_string();
        let mut args = vec!["vm", "create", "many"];
        args.extend_from_slice(&base);
        args.extend_from_slice(&["--count", &count]);
        made.extend(
            fed.cli
                .json(&args)
                .expect("vm create --count")
                .as_array()
                .unwrap()
                .clone(),
        );
    } else {
        for name in names {
            let mut args = vec!["vm", "create", name.as_str()];
            args.extend_from_slice(&base);
            made.extend(
                fed.cli
                    .json(&args)
                    .expect("vm create")
                    .as_array()
                    .unwrap()
                    .clone(),
            );
        }
    }
    let created = started.elapsed().as_secs_f64();
    let sites: Vec<&str> = made.iter().filter_map(|v| v["host"].as_str()).collect();
    eprintln!("{} VMs created in {created:.1} s on {sites:?}", made.len());
    for v in &made {
        let (name, ip) = (v["name"].as_str().unwrap(), v["ip"].as_str().unwrap());
        wait_until(
            &format!("{name} answers at {ip}"),
            Duration::from_secs(600),
            || viola_labtests::guest_http(&fed.lab, "a2", ip, "info").is_ok(),
        )
        .unwrap();
    }
    (created, started.elapsed().as_secs_f64())
}

/// `scripts/bench/lifecycle.sh`: the time to create a violin's VMs over two sites with one
/// request (`--count N`: one plan per depot) against N requests one after the other, each
/// until the creates return and until every VM answers HTTP at its DHCP address. Writes the
/// figures to `VIOLA_BENCH_JSON`; `VIOLA_BENCH_VMS` sets N (default 8).
#[test]
#[ignore = "benchmark: scripts/bench/lifecycle.sh"]
fn create_benchmark() {
    if !lab_tests_enabled() {
        return;
    }
    let n: usize = std::env::var("VIOLA_BENCH_VMS")
        .ok()
        .map_or(8, |v| v.parse().expect("VIOLA_BENCH_VMS: a number"));
    let out = std::env::var("VIOLA_BENCH_JSON").expect("VIOLA_BENCH_JSON: where to write");
    let fed = Fed::up(&[]);
    fed.violin_joined_by_a2("bench");

    // Site b fetches the image across the WAN in the first run only (it is 3 MiB: a fraction
    // of a second at 200 Mbit/s, against tens of seconds of boots).
    let names: Vec<String> = (1..=n).map(|i| format!("many-{i}")).collect();
    let (plan_create, plan_all) = create_and_wait(&fed, "bench", &names, true);
    for name in &names {
        fed.cli.json(&["vm", "delete", name]).expect("vm delete");
    }
    let names: Vec<String> = (1..=n).map(|i| format!("one-{i}")).collect();
    let (seq_create, seq_all) = create_and_wait(&fed, "bench", &names, false);
    fed.cli
        .json(&["violin", "delete", "bench", "--force"])
        .expect("violin delete");
    let result = serde_json::json!({
        "vms": n,
        "one_plan.create_s": plan_create,
        "one_plan.all_answer_s": plan_all,
        "one_at_a_time.create_s": seq_create,
        "one_at_a_time.all_answer_s": seq_all,
        "create_ratio": seq_create / plan_create,
        "all_answer_ratio": seq_all / plan_all,
    });
    eprintln!("{result}");
    std::fs::write(out, result.to_string()).unwrap();
}

/// The host `viola vm list` places `vm` on (empty when it cannot be read).
fn placement_of(cli: &Cli, vm: &str) -> String {
    cli.json(&["vm", "list"])
        .ok()
        .and_then(|l| {
            l.as_array()?
                .iter()
                .find(|v| v["name"] == vm)
                .and_then(|v| v["host"].as_str().map(str::to_owned))
        })
        .unwrap_or_default()
}
