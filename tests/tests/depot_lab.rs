//! Depot lab test: two sites; an image (the lab guest's base plus a layer) imported at site a
//! and held by two depots there (a1 and a2, a1's copy of the layer corrupt); staged by the site b
//! depot for a VM on host b2 with a deadline; booted there by libvirt and checked to see the
//! layer's content. Then a second image is staged, the b1 depot is killed (SIGKILL) in the
//! middle of the transfer and restarted, and the restarted depot completes the part without
//! refetching the chunks it had already verified.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::Result;
use viola_labtests::daemons::{Daemons, bin, log_text};
use viola_labtests::depot::{self, depot, serve_config};
use viola_labtests::pki::Pki;
use viola_labtests::{
    GuestSpec, Lab, LabSpec, boot_guest, guest_http, host_bridge, lab_tests_enabled, run_ok,
};

const LAB: &str = "vdl";

/// A layer on the guest's base: a marker file and a payload of random bytes, written into the
/// ext4 filesystem with debugfs, stored as the difference against the base (`convert -B`).
fn make_layer(
    dir: &Path,
    base: &Path,
    name: &str,
    marker: &str,
    payload_mib: u32,
) -> Result<PathBuf> {
    let raw = dir.join(format!("{name}.raw"));
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(base)
            .arg(&raw),
    )?;
    let marker_file = dir.join(format!("{name}.marker"));
    std::fs::write(&marker_file, format!("{marker}\n"))?;
    let payload = dir.join(format!("{name}.payload"));
    run_ok(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={}", payload.display()),
        "bs=1M",
        &format!("count={payload_mib}"),
        "status=none",
    ]))?;
    let script = format!(
        "mkdir /data\nrm /data/marker\nwrite {} /data/marker\nwrite {} /data/payload\n",
        marker_file.display(),
        payload.display()
    );
    let script_file = dir.join(format!("{name}.debugfs"));
    std::fs::write(&script_file, script)?;
    run_ok(
        Command::new("debugfs")
            .args(["-w", "-f"])
            .arg(&script_file)
            .arg(&raw),
    )?;
    let layer = dir.join(format!("{name}.qcow2"));
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2", "-B"])
            .arg(base)
            .args(["-F", "qcow2"])
            .arg(&raw)
            .arg(&layer),
    )?;
    std::fs::remove_file(raw)?;
    Ok(layer)
}

fn metric(lab: &Lab, host: &str, port: u16, name: &str) -> f64 {
    let text = run_ok(lab.cmd(host, "curl").args([
        "-sS",
        "-m",
        "5",
        &format!("http://127.0.0.1:{port}/metrics"),
    ]))
    .unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn chunk_files(store: &Path) -> usize {
    std::fs::read_dir(store.join("chunks"))
        .map(|d| {
            d.flatten()
                .map(|s| std::fs::read_dir(s.path()).map(|x| x.count()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn image_staged_across_sites_boots_survives_a_lying_source_and_a_killed_depot() {
    if !lab_tests_enabled() {
        return;
    }
    viola_labtests::daemons::build(&["viola-depot", "viola-common"]).expect("build");
    let lab = Lab::up(LAB, &LabSpec::default()).expect("lab up");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut daemons = Daemons::default();
    let log = |host: &str| log_text(&depot::log_path(dir, host));

    // Identities: a depot per serving host, the adaptation manager.
    let pki = Pki::init(&dir.join("ca")).unwrap();
    for (role, site, host) in [
        ("depot", "a", "a1"),
        ("depot", "a", "a2"),
        ("depot", "b", "b1"),
        ("adaptmgr", "b", "am"),
    ] {
        pki.issue(role, site, host, &dir.join(format!("id-{host}")))
            .unwrap();
    }

    // Images at site a: the guest base + a small layer ("guest"), and + a big layer ("big").
    let base = viola_labtests::guest_dir().join("base.qcow2");
    let guest_layer = make_layer(dir, &base, "guest", "vd-layer-ok", 8).unwrap();
    let big_layer = make_layer(dir, &base, "big", "vd-big", 48).unwrap();
    let store_a1 = dir.join("store-a1");
    let store_a2 = dir.join("store-a2");
    let store_b1 = dir.join("store-b1");
    for (img, name) in [(&guest_layer, "guest"), (&big_layer, "big")] {
        depot::import(&store_a1, img, name).unwrap();
    }
    run_ok(Command::new("cp").arg("-a").arg(&store_a1).arg(&store_a2)).unwrap();
    // a1's copy of the guest layer is corrupt: one flipped byte in every chunk of that part.
    let status: serde_json::Value = serde_json::from_str(
        &depot(&["--store", store_a1.to_str().unwrap(), "status", "--json"]).unwrap(),
    )
    .unwrap();
    assert_eq!(
        status["images"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    let manifest_of = |store: &Path, name: &str| depot::manifest(store, name).unwrap().1;
    let guest_manifest = manifest_of(&store_a1, "guest");
    let layer_id = guest_manifest["parts"][1]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let scrub_before = depot(&["--store", store_a1.to_str().unwrap(), "scrub"]).unwrap();
    assert!(
        scrub_before.contains("\"corrupt_chunks\": []"),
        "{scrub_before}"
    );
    let idx = std::fs::read(store_a1.join("parts").join(format!("{layer_id}.idx"))).unwrap();
    let decoded = viola_depot_index_chunks(&idx);
    let mut corrupted = 0;
    for h in decoded {
        let p = store_a1.join("chunks").join(&h[..2]).join(&h);
        if let Ok(mut bytes) = std::fs::read(&p) {
            bytes[0] ^= 0x5a;
            std::fs::write(&p, bytes).unwrap();
            corrupted += 1;
        }
    }
    assert!(corrupted > 0);

    // Depots: a1 and a2 serve; b1 stages for b1 and b2 and fetches from both.
    let serve_cfg = |site: &str, host: &str, store: &Path, extra: &str| {
        let extra = format!("range_chunks = 4\nstreams_per_source = 2\n{extra}");
        let identity = dir.join(format!("id-{host}"));
        serve_config(&lab, site, host, store, &identity, &extra)
    };
    let a1_cfg = serve_cfg("a", "a1", &store_a1, "");
    let a2_cfg = serve_cfg("a", "a2", &store_a2, "");
    let b1_extra = format!(
        "hosts = [\"b1\", \"b2\"]\nmetrics_listen = \"127.0.0.1:9410\"\n[[peers]]\nsite = \"a\"\naddr = \"{}:7410\"\n[[peers]]\nsite = \"a\"\naddr = \"{}:7410\"\n",
        lab.host("a1").address,
        lab.host("a2").address
    );
    let b1_cfg = serve_cfg("b", "b1", &store_b1, &b1_extra);
    depot::start(&lab, &mut daemons, "a1", &a1_cfg, dir).unwrap();
    depot::start(&lab, &mut daemons, "a2", &a2_cfg, dir).unwrap();
    depot::start(&lab, &mut daemons, "b1", &b1_cfg, dir).unwrap();

    // Stage "guest" for VM vdg1 on b2 with a 120 s deadline, as the adaptation manager would.
    let depot_b1 = format!("{}:7410", lab.host("b1").address);
    let am_identity = dir.join("id-am");
    let stage = |image: &str, vm: &str, host: &str, extra: &[&str]| {
        run_ok(
            lab.cmd("b2", bin("viola-depot").to_str().unwrap())
                .args([
                    "--quiet",
                    "stage",
                    image,
                    "--vm",
                    vm,
                    "--host",
                    host,
                    "--deadline-secs",
                    "120",
                    "--depot",
                    &depot_b1,
                    "--identity",
                ])
                .arg(&am_identity)
                .args(extra),
        )
    };
    let out = stage("guest", "vdg1", "b2", &[]).expect("staging guest");
    eprintln!("{out}");
    assert!(out.contains("\"state\": \"ready\""), "{out}");
    assert!(out.contains("before the deadline"), "{out}");
    // The lying source was caught and its data thrown away.
    let bad = metric(&lab, "b1", 9410, "viola_depot_bad_chunks_total");
    assert!(
        bad >= 1.0,
        "b1 should have discarded a1's corrupt chunks (bad_chunks {bad}); log:\n{}",
        log("b1")
    );
    assert!(log("b1").contains("lying"), "{}", log("b1"));

    // Booted by libvirt on b2 from the staged overlay; the guest sees the layer's marker.
    let guest = GuestSpec::new("vdg1", "10.1.0.5/24", "lan0");
    host_bridge(&lab, "b2", "lan0", "10.1.0.1/24").unwrap();
    let boot = boot_guest(&lab, "b2", &guest, Duration::from_secs(120))
        .expect("guest boots from the staged image");
    eprintln!(
        "guest booted from staged image in {:.2} s",
        boot.as_secs_f64()
    );
    assert_eq!(
        guest_http(&lab, "b2", guest.ip(), "marker-read").unwrap(),
        "vd-layer-ok"
    );
    let _ = lab.virsh("b2", &["destroy", &guest.name]);

    // Kill b1's depot in the middle of fetching "big", restart it, stage again.
    let before = chunk_files(&store_b1);
    let first = stage("big", "vdg2", "b1", &["--no-wait"]).expect("staging big");
    assert!(first.contains("stage "), "{first}");
    let start = Instant::now();
    while chunk_files(&store_b1) < before + 200 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "b1 never started fetching big: {}",
            log("b1")
        );
        sleep(Duration::from_millis(20));
    }
    daemons.kill("b1", libc::SIGKILL).unwrap();
    let verified_before_kill = chunk_files(&store_b1) - before;
    assert!(
        std::fs::read_dir(store_b1.join("partial")).unwrap().count() >= 1,
        "the interrupted part is recorded as partial"
    );
    depot::start(&lab, &mut daemons, "b1", &b1_cfg, dir).unwrap();
    let out = stage("big", "vdg3", "b1", &[]).expect("staging big after restart");
    assert!(out.contains("\"state\": \"ready\""), "{out}");
    // The restarted depot re-verified what it had and fetched only the rest.
    let log = log("b1");
    let line = log
        .lines()
        .rfind(|l| l.contains("part fetched"))
        .unwrap_or_else(|| panic!("no fetch in log: {log}"));
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.trim_end_matches(',').parse().ok())
            .unwrap_or_else(|| panic!("{k} in {line}"))
    };
    let resumed = field("resumed_chunks");
    eprintln!(
        "killed after {verified_before_kill} chunks; restart reused {resumed} chunks: {line}"
    );
    assert!(resumed > 0, "{line}");
    let big_manifest = manifest_of(&store_a1, "big");
    let big_layer_size = big_manifest["parts"][1]["size"].as_u64().unwrap();
    assert!(
        field("fetched") < big_layer_size,
        "fetched {} of a {big_layer_size}-byte part after resuming",
        field("fetched")
    );
}

/// Chunk hashes (hex) of an encoded part index (see `viola_depot::part`: 69-byte header, then
/// 37-byte entries beginning with the 32-byte hash).
fn viola_depot_index_chunks(idx: &[u8]) -> Vec<String> {
    idx[69..]
        .chunks_exact(37)
        .filter(|e| e[36] == 0)
        .map(|e| e[..32].iter().map(|b| format!("{b:02x}")).collect())
        .collect()
}
