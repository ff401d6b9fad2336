//! Benchmark driver for `scripts/bench/migration.sh` (not a test: ignored, run explicitly).
//!
//! A guest whose base image holds 1 GiB of data and whose overlay has 64 MiB written by the
//! guest is migrated a1 → b1 across the lab's WAN twice: incrementally with the base already
//! staged at b1, and with a full disk copy. Measured: orchestration time, downtime (libvirt's
//! completed-job statistics) and bytes through the router's link to site b.
// lab: default (ignored: a benchmark driver, so scripts/test.sh does not bring the lab up for it)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use viola_adaptmgr::migration::testing::RecordingAnnouncer;
use viola_adaptmgr::migration::{MigrationDeps, MigrationStatus, Outcome, run_migration};
use viola_hypervisor::StorageCopy;
use viola_labtests::mech::*;
use viola_labtests::{guest_dir, run_ok};

// v3: made with its inode tables zeroed (see `bench_base`).
const BENCH_BASE: &str = "base-1g-v3.qcow2";
const GUEST_MIB: u64 = 256;

fn sh(script: &str) {
    run_ok(Command::new("sh").arg("-c").arg(script)).unwrap_or_else(|e| panic!("{e:#}"));
}

/// The guest's root file system copied into a fresh 1 GiB ext4 beside 930 MiB of random
/// data, as one qcow2 (about 0.93 GiB allocated; a small journal and inode table leave ~75 MiB
/// free for the 64 MiB the guest writes). Made with its inode tables already zeroed,
/// like the lab's base: a resized or lazily made file system has the guest's kernel zero them
/// after boot, and those writes land in the overlay the migration copies.
fn bench_base() -> PathBuf {
    let dir = Path::new("/var/cache/viola/bench");
    let base = dir.join(BENCH_BASE);
    if base.exists() {
        return base;
    }
    std::fs::create_dir_all(dir).expect("bench dir");
    sh(&format!(
        "set -e; cd {dir}; rm -rf root small.raw big.raw; mkdir root; \
         qemu-img convert -O raw {guest}/base.qcow2 small.raw; \
         debugfs -R 'rdump / {dir}/root' small.raw >/dev/null 2>&1; rm -rf root/lost+found; \
         head -c 930M /dev/urandom >root/fill.bin; \
         mkfs.ext4 -q -F -L viola-root -E lazy_itable_init=0,lazy_journal_init=0 \
           -J size=8 -i 65536 -d root big.raw 1G; \
         qemu-img convert -O qcow2 big.raw {base}.part; mv {base}.part {base}; \
         rm -rf root small.raw big.raw",
        dir = dir.display(),
        guest = guest_dir().display(),
        base = base.display()
    ));
    base
}

fn wan_bytes() -> u64 {
    let read = |what: &str| -> u64 {
        lab_exec(
            "rtr",
            &["cat", &format!("/sys/class/net/wan-b/statistics/{what}")],
        )
        .trim()
        .parse()
        .unwrap_or(0)
    };
    read("rx_bytes") + read("tx_bytes")
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

struct Run {
    total_s: f64,
    downtime_ms: u64,
    wan_bytes: u64,
    overlay_bytes: u64,
}

async fn one_run(mode: StorageCopy) -> Run {
    let name = match mode {
        StorageCopy::Incremental => "vm-bench-inc",
        StorageCopy::Full => "vm-bench-full",
    };
    let ip = "10.77.7.5";
    remove_guest(&["a1", "b1"], name);
    let staged_at_b1 = local_images("b1").join(BENCH_BASE);
    match mode {
        StorageCopy::Incremental => {
            if !staged_at_b1.exists() {
                std::fs::copy(bench_base(), &staged_at_b1).expect("stage base at b1");
            }
        }
        StorageCopy::Full => {
            let _ = std::fs::remove_file(&staged_at_b1);
        }
    }
    let hv = open("a1");
    boot_guest_on(
        &hv,
        name,
        &format!("{ip}/24"),
        "vm-br0",
        1,
        GUEST_MIB as u32,
        BENCH_BASE,
    );
    wait_guest("a1", ip, Duration::from_secs(180));
    guest_http("a1", ip, "diskwrite=64").expect("64 MiB written in the guest");
    let overlay_bytes = allocated_bytes(&local_images("a1").join(format!("{name}.qcow2")));

    let deps = MigrationDeps {
        poll_interval: Duration::from_millis(500),
        reconnect_timeout: Duration::from_secs(30),
        // Nothing listens for moves here (the guest's L2 is a local bridge).
        ..migration_deps(&["a1", "b1"], RecordingAnnouncer::default())
    };
    let mut plan = migration_plan(name, "a1", "b1", 10_000);
    plan.stage_base = mode == StorageCopy::Incremental;
    plan.timeout_ms = 600_000;
    // QEMU's downtime limit; VIOLA_BENCH_MAX_DOWNTIME_MS overrides the 50 ms used here.
    plan.tuning.max_downtime_ms = Some(
        std::env::var("VIOLA_BENCH_MAX_DOWNTIME_MS")
            .ok()
            .map(|v| {
                v.parse()
                    .expect("VIOLA_BENCH_MAX_DOWNTIME_MS: milliseconds")
            })
            .unwrap_or(50),
    );
    // The manager's default is off; VIOLA_BENCH_COMPRESS=1 measures it on.
    plan.tuning.compress = std::env::var_os("VIOLA_BENCH_COMPRESS").is_some_and(|v| v == "1");
    let before = wan_bytes();
    let (tx, _rx) = watch::channel(MigrationStatus::default());
    let report = run_migration(plan, &deps, &tx, &CancellationToken::new()).await;
    let wan = wan_bytes().saturating_sub(before);
    remove_guest(&["a1", "b1"], name);
    assert_eq!(
        report.outcome,
        Outcome::Migrated { storage: mode },
        "{report:#?}"
    );
    for r in &report.records {
        eprintln!(
            "  {name}: {:<18} {:>6} ms  {}",
            r.action,
            r.finished_ms.saturating_sub(r.started_ms),
            r.result
        );
    }
    let first = report.records.first().map_or(0, |r| r.started_ms);
    let last = report.records.last().map_or(0, |r| r.finished_ms);
    Run {
        total_s: (last - first) as f64 / 1000.0,
        downtime_ms: report.completed.and_then(|c| c.downtime_ms).unwrap_or(0),
        wan_bytes: wan,
        overlay_bytes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark driver: run by scripts/bench/migration.sh"]
async fn migration_benchmark() {
    require_lab(&["a1", "b1"]);
    let _lock = lab_lock();
    let base = bench_base();
    let at_a1 = local_images("a1").join(BENCH_BASE);
    if !at_a1.exists() {
        std::fs::copy(&base, &at_a1).expect("base at a1");
    }
    make_bridge("a1", "10.77.7.1/24");
    make_bridge("b1", "10.77.7.2/24");
    let inc = one_run(StorageCopy::Incremental).await;
    let full = one_run(StorageCopy::Full).await;
    remove_l2(&["a1", "b1"]);
    let overlay_plus_ram = inc.overlay_bytes + GUEST_MIB * 1024 * 1024;
    let json = serde_json::json!({
        "inc.total_s": inc.total_s,
        "inc.downtime_ms": inc.downtime_ms,
        "inc.wan_bytes": inc.wan_bytes,
        "full.total_s": full.total_s,
        "full.downtime_ms": full.downtime_ms,
        "full.wan_bytes": full.wan_bytes,
        "overlay_plus_ram_bytes": overlay_plus_ram,
        "speedup_full_over_inc": full.total_s / inc.total_s,
        "inc_wan_over_overlay_plus_ram": inc.wan_bytes as f64 / overlay_plus_ram as f64,
    });
    println!("BENCH {json}");
    if let Some(out) = std::env::var_os("VIOLA_BENCH_JSON") {
        std::fs::write(out, json.to_string()).expect("write bench json");
    }
}
