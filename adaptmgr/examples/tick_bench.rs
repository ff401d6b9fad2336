//! The policy loop's tick at scale: 1,000 fake hosts and 10,000 VMs (by default) with 30 control
//! periods of monitor samples in a real inventory; times the whole period's work before anything
//! is carried out — read the inventory, build the state, decide (`viola`), plan — and prints
//! `{"tick_ms.p50": .., "tick_ms.p99": .., ...}`. Run by `scripts/bench/adaptation.sh`.
//!
//!   cargo run --release -p viola-adaptmgr --example tick_bench -- [HOSTS VMS ROUNDS]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use viola_adaptmgr::inventory::Inventory;
use viola_adaptmgr::manager::{HostConfig, Manager, ManagerConfig};
use viola_adaptmgr::observe::{ObserveParams, observed_state};
use viola_adaptmgr::policy::HISTORY_LENGTH;
use viola_adaptmgr::policy_loop::{LoopCore, PolicyConfig, PolicyMode};
use viola_adaptmgr::sim::synthetic_state;
use viola_api::domain::DomainState;
use viola_api::manager::{HostReport, HostUsage, VmUsage};
use viola_hypervisor::fake::FakeCluster;

/// The synthetic federation's host CPU (the model's G5 core).
const PE_MIPS: f64 = 2660.0;
const PERIOD_MS: u64 = 60_000;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let hosts = args.first().copied().unwrap_or(1000);
    let vms = args.get(1).copied().unwrap_or(10_000);
    let rounds = args.get(2).copied().unwrap_or(50);

    // Placement and 30 samples of history per VM: the simulator's synthetic federation (some
    // hosts overloaded, many light), so every tick has real work to do.
    let synthetic = synthetic_state(hosts, vms, 42);
    let dir = tempfile::tempdir()?;
    let cluster = FakeCluster::new();
    let host_cfgs: Vec<HostConfig> = synthetic
        .hosts
        .iter()
        .map(|h| {
            cluster.host(&format!("fake://{}", h.name));
            HostConfig {
                name: h.name.clone(),
                site: format!("site{}", h.site),
                libvirt_uri: format!("fake://{}", h.name),
                migration_uri: None,
                migration_tls_name: None,
                images_local: None,
                overlay_addr: None,
                depot_agent: None,
            }
        })
        .collect();
    let policy = PolicyConfig {
        mode: PolicyMode::Advise,
        pe_mips: PE_MIPS,
        ..PolicyConfig::default()
    };
    let cfg = ManagerConfig {
        hosts: host_cfgs,
        identity_dir: dir.path().join("no-identity"),
        policy: policy.clone(),
        ..ManagerConfig::default()
    };
    let inventory = Arc::new(Inventory::open(&dir.path().join("inv.redb"))?);
    let manager = Manager::new(cfg, Arc::clone(&inventory), Arc::new(cluster))?;

    // 30 periods of reports, oldest first, as the monitors would have sent them.
    let setup = Instant::now();
    let t0 = 1_800_000_000_000;
    for k in (0..HISTORY_LENGTH).rev() {
        let at = t0 - k as u64 * PERIOD_MS;
        for (i, h) in synthetic.hosts.iter().enumerate() {
            let report = HostReport {
                host: h.name.clone(),
                site: format!("site{}", h.site),
                seq: (HISTORY_LENGTH - k) as u64,
                sent_ms: at,
                usage: HostUsage {
                    cpus: h.pes,
                    cpu_capacity: None,
                    cpu_busy: h.utilization * f64::from(h.pes),
                    mem_total_kib: (h.ram_mb * 1024.0) as u64,
                    mem_available_kib: 0,
                    net: vec![],
                    links: vec![],
                },
                vms: synthetic.hosts[i]
                    .vms
                    .iter()
                    .map(|&v| {
                        let vm = &synthetic.vms[v];
                        VmUsage {
                            name: vm.name.clone(),
                            uuid: String::new(),
                            state: DomainState::Running,
                            vcpus: 1,
                            max_vcpus: 1,
                            cpu_time_ns: 0,
                            cpu_busy: vm.history[k] * vm.mips / PE_MIPS,
                            memory_kib: (vm.ram_mb * 1024.0) as u64,
                            max_memory_kib: (vm.ram_mb * 1024.0) as u64,
                            balloon_kib: None,
                            rss_kib: None,
                            disks: vec![],
                            nics: vec![],
                            port_filter_drops: None,
                        }
                    })
                    .collect(),
                probes: vec![],
            };
            inventory.apply_report(&report, at)?;
        }
    }
    // The failure detector would have them up after their first report.
    for mut h in inventory.hosts()? {
        h.state = viola_api::manager::HostState::Up;
        inventory.put_host(&h)?;
    }
    eprintln!(
        "setup: {hosts} hosts, {vms} VMs, {HISTORY_LENGTH} periods of reports in {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    let mut times = Vec::with_capacity(rounds);
    let mut actions = 0;
    let moving: BTreeSet<String> = manager.migrating_vms();
    for round in 0..rounds + 3 {
        // A fresh policy each round: the first decision is the heavy one (later ones are
        // lighter as moved VMs cool down).
        let mut core = LoopCore::new(policy.clone())?;
        let started = Instant::now();
        let plan = core.plan_from_inventory(&inventory, &moving, t0 + 1)?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if round >= 3 {
            times.push(ms);
        }
        actions = plan.record.actions.len();
    }
    // Where the time goes (median of a few rounds): reading the inventory, building, deciding
    // and planning.
    let mut phases = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..7 {
        let mut core = LoopCore::new(policy.clone())?;
        let t = Instant::now();
        let (h, v, vi, s) = (
            inventory.hosts()?,
            inventory.vms()?,
            inventory.violins()?,
            inventory.sample_histories()?,
        );
        let read = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let params = ObserveParams {
            period_ms: PERIOD_MS,
            pe_mips: PE_MIPS,
            bw_mbps: policy.bw_mbps,
            wan_mbps: policy.wan_mbps,
        };
        let state = observed_state(&h, &v, &vi, &s, &moving, t0 + 1, &params);
        let build = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        core.plan(&state, t0 + 1);
        let decide = t.elapsed().as_secs_f64() * 1e3;
        for (p, x) in phases.iter_mut().zip([read, build, decide]) {
            p.push(x);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [read, build, decide] = &mut phases;
    let (read, build, decide) = (median(read), median(build), median(decide));
    times.sort_by(f64::total_cmp);
    let pct =
        |p: f64| times[((p * (times.len() - 1) as f64).round() as usize).min(times.len() - 1)];
    let out = serde_json::json!({
        "tick_ms.p50": pct(0.50),
        "tick_ms.p99": pct(0.99),
        "tick_ms.max": times.last().copied().unwrap_or(0.0),
        "hosts": hosts,
        "vms": vms,
        "rounds": rounds,
        "actions_per_tick": actions,
        "phase_ms.read_inventory": read,
        "phase_ms.build_state": build,
        "phase_ms.decide_and_plan": decide,
    });
    println!("{out}");
    Ok(())
}
