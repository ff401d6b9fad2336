//! Migration with the base staged through the destination site's depot (lab test).
//!
//! The guest image is imported into site a's depot and assembled for guest `g1` at a1, which
//! boots from it (its domain metadata names the depot image). Site b's depot runs with site a's
//! as its peer. The adaptation manager (the library's `Manager`, configured with `[[depots]]`
//! for site b) first tries a migration whose domain names an image no depot has: the staging
//! fails, the migration rolls back, g1 keeps running at a1 and b1 has nothing of it. Then, with
//! the right image, it migrates g1 a1 -> b1: site b's depot fetches the chain from site a across
//! the WAN and lays it down at b1, and only g1's own layer crosses with the migration. Checked:
//! an incremental migration, the base at b1 laid down by site b's depot (fetched from a1, same
//! bytes as a1's), staging progress reported, the marker g1 wrote before the move read back
//! after it, and exactly one running copy, at b1.
//!
//! The manager must reach the depots' underlay addresses, which only the lab's namespaces can:
//! it runs on a thread that joined host a2's network namespace (libvirt is reached through the
//! hosts' unix sockets, which any namespace sees).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
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
use viola_labtests::depot::{self, depot, serve_config};
use viola_labtests::pki::Pki;
use viola_labtests::{
    GuestSpec, Lab, LabSpec, boot_guest, guest_http, host_bridge, lab_tests_enabled,
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

fn bytes_of(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn base_staged_through_the_destination_depot_then_incremental_migration() {
    if !lab_tests_enabled() {
        return;
    }
    let started = Instant::now();
    viola_labtests::daemons::build(&["viola-depot", "viola-common"]).expect("build");
    let lab = Lab::up(LAB, &LabSpec::default()).expect("lab up");
    let mut daemons = Daemons::default();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let lab_dir = PathBuf::from(&lab.status.lab_dir);
    let images = |h: &str| PathBuf::from(&lab.host(h).images);

    // Identities: the depots of sites a and b, the manager.
    let pki = Pki::init(&dir.join("ca")).unwrap();
    for (role, site, host) in [
        ("depot", "a", "a1"),
        ("depot", "b", "b1"),
        ("adaptmgr", "fed", "mgr"),
    ] {
        pki.issue(role, site, host, &dir.join(format!("id-{host}")))
            .unwrap();
    }

    // The guest image in site a's depot; its manifest hash is what g1's domain will name.
    let store_a = dir.join("store-a");
    let store_b = dir.join("store-b");
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

    // Depots: a at a1, b at b1 (fetching from a), each laying chains down in its hosts' image
    // directories.
    let serve_cfg = |site: &str, host: &str, store: &Path, extra: &str| {
        serve_config(
            &lab,
            site,
            host,
            store,
            &dir.join(format!("id-{host}")),
            extra,
        )
    };
    let a_cfg = serve_cfg("a", "a1", &store_a, "hosts = [\"a1\", \"a2\"]");
    let b_cfg = serve_cfg(
        "b",
        "b1",
        &store_b,
        &format!(
            "hosts = [\"b1\", \"b2\"]\n[[peers]]\nsite = \"a\"\naddr = \"{}:7410\"",
            lab.host("a1").address
        ),
    );
    depot::start(&lab, &mut daemons, "a1", &a_cfg, dir).unwrap();
    let b_log = depot::start(&lab, &mut daemons, "b1", &b_cfg, dir).unwrap();

    // g1 at a1, booted from the chain site a's depot assembled there.
    depot(&[
        "--store",
        store_a.to_str().unwrap(),
        "assemble",
        "guest",
        "--image-dir",
        images("a1").to_str().unwrap(),
        "--vm",
        "g1",
    ])
    .expect("assemble at a1");
    assert!(images("a1").join(&top_file).exists());
    assert!(
        !images("b1").join(&top_file).exists(),
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

    // The manager: every lab host, site b's depot, g1 in its inventory at a1.
    let mut hosts_toml = String::new();
    for h in ["a1", "a2", "b1", "b2"] {
        hosts_toml += &format!(
            "[[hosts]]\nname = \"{h}\"\nsite = \"{}\"\nlibvirt_uri = \"qemu+unix:///system?socket={}/hosts/{h}/run/libvirt-sock\"\nmigration_uri = \"{}\"\nimages_local = \"{}\"\n\n",
            &h[..1],
            lab_dir.display(),
            lab.host(h).libvirt_uri,
            images(h).display()
        );
    }
    let cfg_text = format!(
        "identity_dir = \"{}\"\ninventory = \"{}\"\nimages_host_dir = \"/var/lib/viola/images\"\nmigration_bandwidth_mib_s = 1000\n\n{hosts_toml}[[violins]]\nname = \"t\"\nid = 1\nvms = [\"g1\"]\n\n[[depots]]\nsite = \"b\"\naddr = \"{}:7410\"\n",
        dir.join("id-mgr").display(),
        dir.join("inventory.redb").display(),
        lab.host("b1").address
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

    // 1. g1's domain names an image no depot has: staging fails, nothing moves.
    set_image("vds-no-such-image");
    let m = Arc::clone(&manager);
    let (report, _) = in_netns(&mgr_ns, move || Box::pin(migrate(m, "g1", "b1"))).unwrap();
    let report = report.expect("migration request");
    eprintln!("failed staging: {:#?}", report.records);
    match &report.outcome {
        Outcome::RolledBack { reason } => assert!(
            reason.contains("StageBase") && reason.contains("depot of site b"),
            "{reason}"
        ),
        o => panic!("expected a rollback: {o:?}"),
    }
    assert_eq!(lab.domain_state("a1", "g1").as_deref(), Some("running"));
    assert_eq!(lab.domain_state("b1", "g1"), None, "nothing of g1 at b1");
    assert!(
        !images("b1").join("g1.qcow2").exists(),
        "no overlay left at b1"
    );

    // 2. The right image: staged by site b's depot, then an incremental migration.
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
        staged.contains(&format!("depot of site b staged image {image}")),
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
            .any(|s| s.by == "depot b" && s.state == "ready"),
        "staging progress: {staging:?}"
    );

    // The base at b1 was laid down by site b's depot, fetched from a1 across the WAN.
    let log = log_text(&b_log);
    let fetched = log
        .lines()
        .find(|l| l.contains("part fetched"))
        .unwrap_or_else(|| panic!("site b's depot fetched nothing: {log}"));
    assert!(fetched.contains("a/a1"), "{fetched}");
    assert!(log.contains("staged"), "{log}");
    assert!(
        store_b
            .join("parts")
            .join(format!("{}.idx", top["id"].as_str().unwrap()))
            .exists(),
        "site b's depot holds the part"
    );
    assert!(
        bytes_of(&images("b1").join(&top_file)) == bytes_of(&images("a1").join(&top_file)),
        "the base at b1 is not the base g1 booted from at a1"
    );

    // The guest's own data moved with it; exactly one running copy, at b1.
    assert_eq!(
        guest_http(&lab, "b1", guest.ip(), "marker-read").unwrap(),
        marker
    );
    assert_eq!(lab.domain_state("b1", "g1").as_deref(), Some("running"));
    assert_eq!(lab.domain_state("a1", "g1"), None, "g1 still defined at a1");
    assert!(
        !images("a1").join("g1.qcow2").exists(),
        "source overlay left at a1"
    );
    let _ = lab.virsh("b1", &["destroy", "g1"]);
    drop(daemons);
    eprintln!("test took {:.1} s", started.elapsed().as_secs_f64());
}
