//! Hosts with their own CPU capacity (lab test, lab `lcp`): `lab.sh up --host-cpus 0.5` puts a
//! CFS quota on each host's cgroup subtree, where its libvirtd and QEMUs run. A VM burning two
//! CPUs on a1 gets no more than a1's half CPU (and is throttled trying), and a VM burning one
//! CPU on a2 keeps what it had before a1's burner started: load on one host slows only that
//! host's guests. Migrated to a2, the burner runs inside a2's capacity.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use viola_labtests::{
    GuestSpec, Lab, LabSpec, boot_guest, create_overlay, host_bridge, lab_tests_enabled, progress,
    stage_base,
};

const LAB: &str = "lcp";
const HOST_CPUS: f64 = 0.5;

/// The directory of `host`'s cgroup subtree in the hierarchy whose mount path contains `which`.
fn cgroup_dir(lab: &Lab, host: &str, which: &str) -> PathBuf {
    let h = lab.host(host);
    h.cgroups
        .split_whitespace()
        .find(|d| d.contains(which))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no {which} cgroup for {host} in {:?}", h.cgroups))
}

/// CPU time used by everything on `host` so far (ns).
fn cpu_used_ns(lab: &Lab, host: &str) -> u64 {
    let path = cgroup_dir(lab, host, "/cpuacct/").join("cpuacct.usage");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

/// How many CFS periods `host` ran out of quota in so far.
fn throttled_periods(lab: &Lab, host: &str) -> u64 {
    let path = cgroup_dir(lab, host, "/cpu/").join("cpu.stat");
    let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    stat.lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no nr_throttled in {stat}"))
}

/// CPUs' worth of time each of `hosts` used over `window`.
fn cpus_used(lab: &Lab, hosts: &[&str], window: Duration) -> Vec<f64> {
    let before: Vec<u64> = hosts.iter().map(|h| cpu_used_ns(lab, h)).collect();
    let t = Instant::now();
    std::thread::sleep(window);
    let secs = t.elapsed().as_secs_f64();
    hosts
        .iter()
        .zip(before)
        .map(|(h, b)| (cpu_used_ns(lab, h) - b) as f64 / 1e9 / secs)
        .collect()
}

#[test]
fn a_busy_host_slows_only_its_own_guests() {
    if !lab_tests_enabled() {
        return;
    }
    let lab = Lab::up(
        LAB,
        &LabSpec {
            sites: 1,
            hosts: 2,
            host_cpus: Some(HOST_CPUS),
            ..LabSpec::default()
        },
    )
    .expect("lab up");
    for h in &lab.status.hosts {
        assert_eq!(h.cpus, Some(HOST_CPUS), "capacity of {}", h.name);
    }
    for host in ["a1", "a2"] {
        host_bridge(&lab, host, "lan0", "10.1.0.1/24").unwrap();
        stage_base(&lab, host).unwrap();
    }

    // A guest on a2 that wants one whole CPU: it gets a2's capacity.
    let mut worker = GuestSpec::new("lcp-worker", "10.1.0.6/24", "lan0");
    worker.cmdline_extra = "viola.cpuburn=1".to_owned();
    create_overlay(&lab, "a2", &worker).unwrap();
    boot_guest(&lab, "a2", &worker, Duration::from_secs(180)).expect("worker boots");
    std::thread::sleep(Duration::from_secs(2));
    let alone = cpus_used(&lab, &["a2"], Duration::from_secs(6))[0];
    progress(&format!("a2 with its busy guest alone: {alone:.2} CPUs"));
    assert!(
        alone > HOST_CPUS * 0.7 && alone < HOST_CPUS * 1.15,
        "a2's busy guest should get about a2's {HOST_CPUS} CPUs, got {alone:.2}"
    );

    // A guest on a1 that wants two: a1 is held to its capacity, a2 keeps its share.
    let mut burner = GuestSpec::new("lcp-burner", "10.1.0.5/24", "lan0");
    burner.vcpus = 2;
    burner.cmdline_extra = "viola.cpuburn=2".to_owned();
    create_overlay(&lab, "a1", &burner).unwrap();
    boot_guest(&lab, "a1", &burner, Duration::from_secs(180)).expect("burner boots");
    std::thread::sleep(Duration::from_secs(2));
    let throttled_before = throttled_periods(&lab, "a1");
    let both = cpus_used(&lab, &["a1", "a2"], Duration::from_secs(6));
    let throttled = throttled_periods(&lab, "a1") - throttled_before;
    progress(&format!(
        "a1 with a guest burning 2 CPUs: {:.2} CPUs ({throttled} periods throttled); a2 meanwhile: {:.2} CPUs",
        both[0], both[1]
    ));
    assert!(
        both[0] < HOST_CPUS * 1.15,
        "a1 used {:.2} CPUs, above its capacity of {HOST_CPUS}",
        both[0]
    );
    assert!(
        throttled > 10,
        "a1's burner should run into a1's quota (throttled in {throttled} periods)"
    );
    assert!(
        both[1] > alone * 0.8,
        "a2's guest got {:.2} CPUs with a1 busy, {alone:.2} before: a1's load slowed a2",
        both[1]
    );

    // Migrated to a2, the burner runs inside a2's capacity: a2's two guests share a2's half
    // CPU and a1 is idle.
    create_overlay(&lab, "a2", &burner).unwrap();
    lab.migrate_with_disk("lcp-burner", "a1", "a2")
        .expect("burner migrates to a2");
    assert_eq!(
        lab.domain_state("a2", "lcp-burner").as_deref(),
        Some("running")
    );
    std::thread::sleep(Duration::from_secs(2));
    let after = cpus_used(&lab, &["a1", "a2"], Duration::from_secs(6));
    progress(&format!(
        "burner moved to a2: a1 {:.2} CPUs, a2 {:.2} CPUs",
        after[0], after[1]
    ));
    assert!(
        after[1] < HOST_CPUS * 1.15,
        "a2 used {:.2} CPUs with both guests, above its capacity of {HOST_CPUS}",
        after[1]
    );
    assert!(
        after[0] < 0.15,
        "a1 still used {:.2} CPUs after its guest left",
        after[0]
    );
}
