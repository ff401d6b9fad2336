//! `viola-sim DAY_DIR POLICY`: replays a folder of PlanetLab-format traces in the CloudSim model
//! with one policy and prints one JSON object with the figures.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use viola_adaptmgr::{policy, sim};

#[derive(Parser, Debug)]
#[command(about = "Trace-driven evaluation of Viola's adaptation policies (CloudSim 3.0.3 model)")]
struct Args {
    /// Folder of PlanetLab-format traces (one file per VM, one CPU % per line).
    day_dir: Option<PathBuf>,
    /// Policy name (dvfs, thr-mmt-0.8, iqr-mmt-1.5, mad-mmt-2.5, lr-mmt-1.2, lrr-mmt-1.2, viola, ...).
    policy: Option<String>,
    /// Instead of a run: time one decision of each named policy (comma-separated) on a synthetic
    /// federation of `--bench-hosts` hosts and `--bench-vms` VMs; prints {"<policy>": ms, ...}.
    #[arg(long)]
    decision_bench: Option<String>,
    #[arg(long, default_value_t = 1000)]
    bench_hosts: usize,
    #[arg(long, default_value_t = 10000)]
    bench_vms: usize,
    /// Number of hosts.
    #[arg(long, default_value_t = 800)]
    hosts: usize,
    /// Split the hosts into this many sites.
    #[arg(long, default_value_t = 1)]
    sites: usize,
    /// WAN bandwidth available to one cross-site migration, Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    wan_mbps: f64,
    /// Order of the VMs (their types come in four blocks of this order): `name` or `hash`
    /// (FNV-1a of the file name, a stand-in for the directory order Java's `listFiles` returns).
    #[arg(long, default_value = "name")]
    vm_order: String,
    /// Write the decision trace (one JSON object per action) to this file.
    #[arg(long)]
    trace: Option<PathBuf>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("viola-sim: {}", viola_common::errors::chain(e.as_ref()));
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(names) = &args.decision_bench {
        return decision_bench(names, args.bench_hosts, args.bench_vms);
    }
    let (Some(day_dir), Some(policy_name)) = (&args.day_dir, &args.policy) else {
        anyhow::bail!("usage: viola-sim DAY_DIR POLICY (or --decision-bench POLICIES)");
    };
    let mut traces = sim::trace::load_dir(day_dir)?;
    match args.vm_order.as_str() {
        "name" => {}
        "hash" => traces.sort_by_key(|t| sim::trace::fnv1a(&t.name)),
        other => anyhow::bail!("unknown --vm-order {other:?} (name or hash)"),
    }
    let mut policy = policy::by_name(policy_name)?;
    let mut cfg = sim::cloudsim_planetlab(&traces, args.hosts, args.sites, args.wan_mbps);
    cfg.record_trace = args.trace.is_some();
    let (report, records) = sim::Simulator::new(cfg).run(policy.as_mut());
    if let Some(path) = &args.trace {
        let mut out = String::new();
        for r in &records {
            out.push_str(&serde_json::to_string(r)?);
            out.push('\n');
        }
        std::fs::write(path, out)
            .with_context(|| format!("writing decision trace {}", path.display()))?;
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Times `decide` on a synthetic, mostly consolidated federation (a few hosts overloaded, many
/// lightly loaded), median of five runs per policy.
fn decision_bench(names: &str, hosts: usize, vms: usize) -> anyhow::Result<()> {
    let state = sim::synthetic_state(hosts, vms, 42);
    let mut out = serde_json::Map::new();
    for name in names.split(',').filter(|n| !n.is_empty()) {
        let mut p = policy::by_name(name)?;
        let mut times = Vec::new();
        let mut actions = 0;
        for _ in 0..5 {
            let t0 = std::time::Instant::now();
            let d = p.decide(&state);
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            actions = d.actions.len();
        }
        times.sort_by(f64::total_cmp);
        eprintln!("{name}: {:.2} ms ({actions} actions)", times[2]);
        out.insert(name.to_string(), serde_json::json!(times[2]));
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
