//! Migration with the base staged by the destination host's own depot agent, on hosts that
//! share no file system (lab test).
//!
//! The lab runs with private image directories (`lab.sh up --private-images`): each host's
//! `/var/lib/viola/images` is a tmpfs mounted only inside that host's mount namespace, so no
//! process outside the host (another host's, the manager's, a site's depot) can see or write
//! it. The test checks that first. Each of a1 and b1 runs its own depot agent (a `viola-depot`
//! inside the host, `hosts = [itself]`), fed over the network by site a's depot, which holds the
//! imported guest image.
//!
//! a1's agent lays down g1's disk (chain and overlay) at a1, and g1 boots from it. The
//! adaptation manager (the library's `Manager`, configured with each host's `depot_agent` and no
//! view of any image directory) first tries a migration whose domain names an image no depot
//! has: the staging fails, the migration rolls back, g1 keeps running at a1 and b1 has nothing
//! of it. Then, with the right image, it migrates g1 a1 -> b1: b1's agent fetches the chain from
//! site a's depot across the WAN, verifies it and lays it down in b1's own directory, and only
//! g1's own layer crosses with the migration. Checked: an incremental migration, the base at b1
//! laid down by b1's agent (fetched from site a, same bytes as a1's), staging progress reported,
//! the marker g1 wrote before the move read back after it, and exactly one running copy, at b1.
//! Then b1 is lost: the manager, fed heartbeats, declares it failed and restarts g1 at b2 from a
//! base b2's own depot lays down (no host's directory is copied), and g1 answers from b2.
//!
//! The manager must reach the depots' underlay addresses, which only the lab's namespaces can:
//! it runs on a thread that joined host a2's network namespace (libvirt is reached through the
//! hosts' unix sockets, which any namespace sees).

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use viola_adaptmgr::inventory::{Inventory, VmRecord};
use viola_adaptmgr::manager::{Manager, ManagerConfig};
use viola_adaptmgr::migration::testing::{assert_migrated_incrementally, stage_base_result};
use viola_adaptmgr::migration::{MigrationReport, Outcome};
use viola_api::manager::{Response, VmMigrate};
use viola_hypervisor::DomainState;
use viola_hypervisor::libvirt::LibvirtConnector;
use viola_labtests::daemons::{Daemons, log_text};
use viola_labtests::depot::{self, agent_config, serve_config};
use viola_labtests::pki::Pki;
use viola_labtests::{
    GuestSpec, Lab, LabSpec, boot_guest, guest_http, host_bridge, lab_tests_enabled, run,
};

const LAB: &str = "vds";

/// Runs `f` on a thread inside network namespace `ns` (a `ip netns` name), with its own tokio
/// runtime: sockets it opens live in that namespace.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = T>>> + Send + 'static,
) -> Result<T> {
    let ns_file = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("network namespace {ns}"))?;
    let handle = std::thread::spawn(move || -> Result<T> {
        // SAFETY: setns(2) on an open namespace file; it only affects this thread (and the
        // threads it starts: the runtime's workers and blocking pool).
        if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(f()))
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("manager thread panicked"))?
}

/// Migrates `vm` to `to` through `manager`; returns the report and the progress it sent.
async fn migrate(
    manager: Arc<Manager>,
    vm: &str,
    to: &str,
) -> (Result<MigrationReport, String>, Vec<Response>) {
    let (tx, mut rx) = mpsc::channel(4096);
    let collect = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(r) = rx.recv().await {
            seen.push(r);
        }
        seen
    });
    let req = VmMigrate {
        vm: vm.to_owned(),
        to_host: to.to_owned(),
        bandwidth_mib_s: None,
        stage_base: true,
        timeout_s: Some(120),
    };
    let report = manager
        .migrate(req, tx, CancellationToken::new())
        .await
        .map_err(|e| viola_common::errors::chain(&e));
    let seen = collect.await.unwrap_or_default();
    (report, seen)
}

/// A heartbeat from lab host `host` with the VMs `running` there, and room for g1.
fn heartbeat(host: &str, seq: u64, running: &[&str]) -> viola_api::manager::HostReport {
    viola_api::manager::HostReport {
        host: host.into(),
        site: host[..1].into(),
        seq,
        sent_ms: 0,
        usage: viola_api::manager::HostUsage {
            cpus: 2,
            cpu_capacity: None,
            cpu_busy: 0.1,
            mem_total_kib: 4 << 20,
            mem_available_kib: 2 << 20,
            net: vec![],
            links: vec![],
        },
        vms: running
            .iter()
            .map(|name| viola_api::manager::VmUsage {
                name: (*name).into(),
                uuid: format!("uuid-{name}"),
                state: DomainState::Running,
                vcpus: 1,
                max_vcpus: 2,
                cpu_time_ns: 0,
                cpu_busy: 0.0,
                memory_kib: 256 * 1024,
                max_memory_kib: 512 * 1024,
                balloon_kib: None,
                rss_kib: None,
                disks: vec![],
                nics: vec![],
                port_filter_drops: None,
            })
            .collect(),
        probes: vec![],
    }
}

/// Where a host's own image directory is, as the host (its libvirtd, its agent) sees it.
const HOST_IMAGES: &str = "/var/lib/viola/images";

/// SHA-256 of `file` in `host`'s image directory, read inside the host; `None` if it is not
/// there.
fn digest_at(lab: &Lab, host: &str, file: &str) -> Option<String> {
    lab.sh(host, &format!("sha256sum {HOST_IMAGES}/{file}"))
        .ok()
        .and_then(|out| out.split_whitespace().next().map(str::to_owned))
}

/// The device (`major:minor`) of every mount in a mount namespace's mount table.
fn mounted_devices(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .collect()
}

/// Each host's image directory is its own file system, mounted in no other mount namespace:
/// not the machine's (where the test, the manager and site a's depot run), not another host's.
fn assert_image_dirs_private(lab: &Lab, hosts: &[&str]) {
    let device = |h: &str| {
        lab.sh(h, &format!("mountpoint -d {HOST_IMAGES}"))
            .unwrap_or_else(|e| panic!("{h}'s image directory is no mount of its own: {e:#}"))
            .trim()
            .to_owned()
    };
    let root = mounted_devices(&std::fs::read_to_string("/proc/self/mountinfo").unwrap());
    for h in hosts {
        let dev = device(h);
        assert!(
            !root.contains(&dev),
            "{h}'s image directory ({dev}) is mounted outside the host"
        );
        for other in hosts.iter().filter(|o| *o != h) {
            let theirs = mounted_devices(&lab.sh(other, "cat /proc/self/mountinfo").unwrap());
            assert!(
                !theirs.contains(&dev),
                "{h}'s image directory ({dev}) is mounted in {other}"
            );
        }
    }
    // And what one host writes there, no other host sees.
    lab.sh(hosts[0], &format!("echo {} >{HOST_IMAGES}/probe", hosts[0]))
        .unwrap();
    for other in &hosts[1..] {
        assert_eq!(
            digest_at(lab, other, "probe"),
            None,
            "{other} sees {}'s file",
            hosts[0]
        );
    }
    lab.sh(hosts[0], &format!("rm {HOST_IMAGES}/probe"))
        .unwrap();
}

#[test]
fn bases_laid_down_by_each_hosts_own_depot_for_a_migration_and_a_restart() {
    if !lab_tests_enabled() {
        return;
    }
    let started = Instant::now();
    viola_labtests::daemons::build(&["viola-depot", "viola-common"]).expect("build");
    let lab = Lab::up(
        LAB,
        &LabSpec {
            private_images: true,
            ..LabSpec::default()
        },
    )
    .expect("lab up");
    let hosts = ["a1", "a2", "b1", "b2"];
    assert_image_dirs_private(&lab, &hosts);
    for h in hosts {
        assert_eq!(
            lab.host(h).images,
            "",
            "{h}'s image directory has a view from outside"
        );
    }
    let mut daemons = Daemons::default();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab_dir = PathBuf::from(&lab.status.lab_dir);

    // Identities: site a's depot, the agents of a1, b1 and b2, the manager.
    let pki = Pki::init(&dir.join("ca")).unwrap();
    for (role, site, name) in [
        ("depot", "a", "depot-a"),
        ("depot", "a", "a1"),
        ("depot", "b", "b1"),
        ("depot", "b", "b2"),
        ("adaptmgr", "fed", "mgr"),
    ] {
        pki.issue(role, site, name, &dir.join(format!("id-{name}")))
            .unwrap();
    }

    // The guest image in site a's depot; its manifest hash is what g1's domain will name.
    let store_a = dir.join("store-a");
    depot::import(
        &store_a,
        &viola_labtests::guest_dir().join("base.qcow2"),
        "guest",
    )
    .expect("import");
    let (image, manifest) = depot::manifest(&store_a, "guest").expect("image recorded");
    let parts = manifest["parts"].as_array().expect("parts");
    let top = parts.last().expect("a part");
    let top_file = format!(
        "{}.{}",
        top["id"].as_str().unwrap(),
        top["format"].as_str().unwrap()
    );

    // Site a's depot on a1's network (it lays nothing down: `hosts` names no host it could
    // write for), and the agents of a1 and b1, each fed by it.
    let site_a = format!("{}:7410", lab.host("a1").address);
    let a_cfg = serve_config(
        &lab,
        "a",
        "a1",
        &store_a,
        &dir.join("id-depot-a"),
        "hosts = [\"no-such-host\"]",
    );
    depot::start(&lab, &mut daemons, "a1", &a_cfg, dir).unwrap();
    let agent = |site: &str, host: &str| {
        agent_config(
            &lab,
            site,
            host,
            &dir.join(format!("agent-store-{host}")),
            &dir.join(format!("id-{host}")),
            &[("a", &site_a)],
        )
    };
    let agent_addr = |h: &str| format!("{}:{}", lab.host(h).address, depot::AGENT_PORT);
    depot::start_agent(&lab, &mut daemons, "a1", &agent("a", "a1"), dir).unwrap();
    let b1_log = depot::start_agent(&lab, &mut daemons, "b1", &agent("b", "b1"), dir).unwrap();
    let b2_log = depot::start_agent(&lab, &mut daemons, "b2", &agent("b", "b2"), dir).unwrap();

    // `viola-depot stage` from a2, with the manager's certificate: a1's agent asked to lay
    // image `guest` down for `vm` at `host`.
    let stage_at_a1 = |vm: &str, host: &str| {
        run(lab
            .cmd(
                "a2",
                viola_labtests::daemons::bin("viola-depot")
                    .to_str()
                    .unwrap(),
            )
            .args(["--quiet", "stage", "guest", "--vm", vm, "--host", host])
            .args([
                "--deadline-secs",
                "60",
                "--depot",
                &agent_addr("a1"),
                "--identity",
            ])
            .arg(dir.join("id-mgr")))
        .unwrap()
    };
    // An agent lays images down for its own host only.
    let refused = stage_at_a1("x", "b1");
    let said = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("host b1 is not served by depot a"),
        "a1's agent asked to stage for b1: {said}"
    );

    // g1 at a1, its disk laid down by a1's agent (fetched from site a's depot), booted there.
    let staged = stage_at_a1("g1", "a1");
    assert!(
        staged.status.success(),
        "a1's agent stages g1's disk: {}",
        String::from_utf8_lossy(&staged.stderr)
    );
    assert!(digest_at(&lab, "a1", &top_file).is_some(), "no base at a1");
    assert!(
        digest_at(&lab, "a1", "g1.qcow2").is_some(),
        "no disk for g1 at a1"
    );
    assert_eq!(
        digest_at(&lab, "b1", &top_file),
        None,
        "b1 starts without the base"
    );
    let guest = GuestSpec::new("g1", "10.1.0.5/24", "lan0");
    host_bridge(&lab, "a1", "lan0", "10.1.0.1/24").unwrap();
    host_bridge(&lab, "b1", "lan0", "10.1.0.2/24").unwrap();
    boot_guest(&lab, "a1", &guest, Duration::from_secs(120)).expect("g1 boots at a1");
    let set_image = |image_ref: &str| {
        lab.virsh(
            "a1",
            &[
                "metadata",
                "g1",
                "--uri",
                viola_adaptmgr::migration::depot_stage::METADATA_NS,
                "--key",
                "viola",
                "--set",
                &format!("<image ref='{image_ref}'/>"),
                "--live",
                "--config",
            ],
        )
        .expect("virsh metadata")
    };
    let marker = format!("vds-{}", std::process::id());
    assert_eq!(
        guest_http(&lab, "a1", guest.ip(), &format!("marker-write={marker}")).unwrap(),
        "ok"
    );

    // The manager: every lab host, no view of any image directory, and the agents of a1 and
    // b1; no site depot at all.
    let mut hosts_toml = String::new();
    for h in hosts {
        hosts_toml += &format!(
            "[[hosts]]\nname = \"{h}\"\nsite = \"{}\"\nlibvirt_uri = \"qemu+unix:///system?socket={}/hosts/{h}/run/libvirt-sock\"\nmigration_uri = \"{}\"\n",
            &h[..1],
            lab_dir.display(),
            lab.host(h).libvirt_uri,
        );
        if matches!(h, "a1" | "b1" | "b2") {
            hosts_toml += &format!("depot_agent = \"{}\"\n", agent_addr(h));
        }
        hosts_toml += "\n";
    }
    let cfg_text = format!(
        "identity_dir = \"{}\"\ninventory = \"{}\"\nimages_host_dir = \"{HOST_IMAGES}\"\nmigration_bandwidth_mib_s = 1000\nheartbeat_timeout_s = 1\n\n{hosts_toml}[[violins]]\nname = \"t\"\nid = 1\nvms = [\"g1\"]\n",
        dir.join("id-mgr").display(),
        dir.join("inventory.redb").display(),
    );
    let cfg: ManagerConfig = viola_common::config::parse(&cfg_text).expect("manager config");
    let inventory = Arc::new(Inventory::open(&cfg.inventory).unwrap());
    let manager =
        Arc::new(Manager::new(cfg, Arc::clone(&inventory), Arc::new(LibvirtConnector)).unwrap());
    inventory
        .put_vm(&VmRecord {
            name: "g1".into(),
            host: "a1".into(),
            violin: Some("t".into()),
            macs: Vec::new(),
            state: DomainState::Running,
            vcpus: 1,
            max_vcpus: 2,
            memory_kib: 256 * 1024,
            max_memory_kib: 512 * 1024,
            cpu_busy: 0.0,
            domain_xml: None,
            cap_percent: None,
            deadline: None,
            updated_ms: 0,
        })
        .unwrap();
    let mgr_ns = lab.host("a2").namespace.clone();
    let by_agent = "b (b1's own depot)";

    // 1. g1's domain names an image no depot has: staging fails, nothing moves.
    set_image("vds-no-such-image");
    let m = Arc::clone(&manager);
    let (report, _) = in_netns(&mgr_ns, move || Box::pin(migrate(m, "g1", "b1"))).unwrap();
    let report = report.expect("migration request");
    eprintln!("failed staging: {:#?}", report.records);
    match &report.outcome {
        Outcome::RolledBack { reason } => assert!(
            reason.contains("StageBase") && reason.contains(&format!("depot of site {by_agent}")),
            "{reason}"
        ),
        o => panic!("expected a rollback: {o:?}"),
    }
    assert_eq!(lab.domain_state("a1", "g1").as_deref(), Some("running"));
    assert_eq!(lab.domain_state("b1", "g1"), None, "nothing of g1 at b1");
    assert_eq!(
        digest_at(&lab, "b1", "g1.qcow2"),
        None,
        "no overlay left at b1"
    );

    // 2. The right image: staged by b1's agent, then an incremental migration.
    set_image(&image);
    let t = Instant::now();
    let m = Arc::clone(&manager);
    let (report, progress) = in_netns(&mgr_ns, move || Box::pin(migrate(m, "g1", "b1"))).unwrap();
    let report = report.expect("migration request");
    eprintln!(
        "migrated in {:.1} s: {:#?}\n{:?}",
        t.elapsed().as_secs_f64(),
        report.records,
        report.completed
    );
    assert_migrated_incrementally(&report);
    let staged = stage_base_result(&report);
    assert!(
        staged.contains(&format!("depot of site {by_agent} staged image {image}")),
        "{staged}"
    );
    let staging: Vec<_> = progress
        .iter()
        .filter_map(|r| match r {
            Response::Progress(s) => s.staging.clone(),
            _ => None,
        })
        .collect();
    assert!(
        staging
            .iter()
            .any(|s| s.by == format!("depot {by_agent}") && s.state == "ready"),
        "staging progress: {staging:?}"
    );

    // The base at b1 was laid down by b1's agent, fetched from site a's depot across the WAN.
    let log = log_text(&b1_log);
    let fetched = log
        .lines()
        .find(|l| l.contains("part fetched"))
        .unwrap_or_else(|| panic!("b1's agent fetched nothing: {log}"));
    assert!(fetched.contains("a/depot-a"), "{fetched}");
    assert!(log.contains("staged"), "{log}");
    assert!(
        dir.join("agent-store-b1")
            .join("parts")
            .join(format!("{}.idx", top["id"].as_str().unwrap()))
            .exists(),
        "b1's agent holds the part"
    );
    let base_at_b1 = digest_at(&lab, "b1", &top_file).expect("the base at b1");
    assert_eq!(
        Some(base_at_b1),
        digest_at(&lab, "a1", &top_file),
        "the base at b1 is not the base g1 booted from at a1"
    );

    // The guest's own data moved with it; exactly one running copy, at b1.
    assert_eq!(
        guest_http(&lab, "b1", guest.ip(), "marker-read").unwrap(),
        marker
    );
    assert_eq!(lab.domain_state("b1", "g1").as_deref(), Some("running"));
    assert_eq!(lab.domain_state("a1", "g1"), None, "g1 still defined at a1");
    assert_eq!(
        digest_at(&lab, "a1", "g1.qcow2"),
        None,
        "source overlay left at a1"
    );
    // Nothing of it anywhere outside the hosts.
    for h in hosts {
        assert!(
            !lab_dir.join("images").join(h).join(&top_file).exists(),
            "a base appeared in the machine's view of {h}"
        );
    }

    // 3. b1 is lost. The manager restarts g1 at b2, the other host of site b, from a base
    // b2's own depot lays down: nobody copies it from another host's directory. First every
    // host reports (which arms the failure detector), b1 with g1 running, so the manager
    // captures g1's definition from b1 as it does for any VM it is told about.
    let mut rec = inventory.vm("g1").unwrap().expect("g1 in the inventory");
    rec.domain_xml = None;
    inventory.put_vm(&rec).unwrap();
    let report = |seq: u64, skip_b1: bool| {
        let m = Arc::clone(&manager);
        in_netns(&mgr_ns, move || {
            Box::pin(async move {
                for h in hosts.into_iter().filter(|h| !(skip_b1 && *h == "b1")) {
                    let vms: &[&str] = if h == "b1" { &["g1"] } else { &[] };
                    m.handle_report(heartbeat(h, seq, vms)).await?;
                }
                anyhow::Ok(())
            })
        })
        .unwrap()
    };
    report(1, false).expect("first reports");
    assert!(
        inventory
            .vm("g1")
            .unwrap()
            .and_then(|r| r.domain_xml)
            .is_some(),
        "the manager did not capture g1's definition from b1"
    );
    // Then g1 is gone from b1 (its libvirtd still answers, so the manager's fencing probe
    // finds g1 not running there), and b1 falls silent while the others keep reporting.
    lab.virsh("b1", &["destroy", "g1"]).unwrap();
    lab.virsh("b1", &["undefine", "g1"]).unwrap();
    host_bridge(&lab, "b2", "lan0", "10.1.0.3/24").unwrap();
    for seq in 2..=6 {
        std::thread::sleep(Duration::from_millis(400));
        report(seq, true).expect("reports without b1");
    }
    let m = Arc::clone(&manager);
    in_netns(&mgr_ns, move || Box::pin(async move { m.ha_tick().await }))
        .unwrap()
        .expect("the HA tick");
    let events: Vec<_> = inventory
        .recent_events(20)
        .unwrap()
        .into_iter()
        .filter(|e| e.subject == "g1" || e.subject == "b1")
        .map(|e| format!("{} {} {}", e.kind, e.subject, e.detail))
        .collect();
    eprintln!("HA events: {events:#?}");
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("vm_restarted g1") && e.contains("\"b2\"")),
        "g1 was not restarted at b2: {events:?}"
    );
    assert_eq!(lab.domain_state("b2", "g1").as_deref(), Some("running"));
    assert_eq!(lab.domain_state("b1", "g1"), None);
    assert_eq!(
        digest_at(&lab, "b2", &top_file),
        digest_at(&lab, "a1", &top_file),
        "the base at b2 is not g1's"
    );
    let log = log_text(&b2_log);
    assert!(
        log.contains("staged"),
        "b2's own depot laid nothing down: {log}"
    );
    viola_labtests::wait_ping(&lab, "b2", guest.ip(), Duration::from_secs(120))
        .expect("g1 answers from b2 after its restart");
    let _ = lab.virsh("b2", &["destroy", "g1"]);
    drop(daemons);
    eprintln!("test took {:.1} s", started.elapsed().as_secs_f64());
}
