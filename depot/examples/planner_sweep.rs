//! Prints planner met, LP bound and timings for generated scenarios: `cargo run --release
//! --example planner_sweep -- [VMS] [MAX_DEADLINE] [SEEDS]`.
use std::time::Instant;

use viola_depot::bound::{lp_bound, milp_optimum};
use viola_depot::planner::plan;
use viola_depot::scenario_gen::{GenParams, generate};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let vms = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(50);
    let max_deadline = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(240.0);
    let seeds: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    for seed in 0..seeds {
        let sc = generate(
            seed,
            GenParams {
                vms,
                max_deadline,
                ..GenParams::default()
            },
        );
        let t = Instant::now();
        let p = plan(&sc).expect("plan");
        let tp = t.elapsed();
        let t = Instant::now();
        let b = lp_bound(&sc).expect("bound");
        println!(
            "seed {seed}: met {} bound {:.2} ratio {:.3} (plan {:?}, lp {:?}, {} vars, {} intervals)",
            p.met,
            b.max_met,
            p.met as f64 / b.max_met,
            tp,
            t.elapsed(),
            b.variables,
            b.intervals
        );
        if std::env::var_os("MILP").is_some() {
            let t = Instant::now();
            println!(
                "   milp optimum {:?} in {:?}",
                milp_optimum(&sc),
                t.elapsed()
            );
        }
    }
}
