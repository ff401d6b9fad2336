//! The field's benchmark: the three PlanetLab days in the CloudSim 3.0.3 model. One test runs
//! every baseline once per day (days in parallel) and checks both the reproduction of the
//! reference figures and viola against the baselines, in the same simulator.

use std::path::{Path, PathBuf};

use viola_adaptmgr::policy::by_name;
use viola_adaptmgr::sim::{Report, Simulator, cloudsim_planetlab, trace};

const DAYS: [&str; 3] = ["20110303", "20110306", "20110309"];
const BASELINES: [&str; 5] = [
    "thr-mmt-0.8",
    "iqr-mmt-1.5",
    "mad-mmt-2.5",
    "lr-mmt-1.2",
    "lrr-mmt-1.2",
];

fn data_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/planetlab");
    d.is_dir().then_some(d)
}

fn run(traces: &[trace::VmTrace], policy: &str) -> Report {
    let mut p = by_name(policy).expect("known policy");
    Simulator::new(cloudsim_planetlab(traces, 800, 1, 0.0))
        .run(p.as_mut())
        .0
}

/// (energy kWh, migrations, SLATAH fraction) printed by CloudSim 3.0.3.
fn reference(dir: &Path, day: &str, policy: &str) -> (f64, f64, f64) {
    let file = dir.join(format!(
        "cloudsim-3.0.3/{day}_{}.txt",
        policy.replace('-', "_")
    ));
    let text = std::fs::read_to_string(&file).expect("reference file");
    let field = |key: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .expect("field present");
        line[key.len()..]
            .trim()
            .trim_end_matches(" kWh")
            .trim_end_matches('%')
            .parse()
            .expect("number")
    };
    (
        field("Energy consumption:"),
        field("Number of VM migrations:"),
        field("SLA time per active host:") / 100.0,
    )
}

#[test]
fn baselines_reproduce_cloudsim_and_viola_beats_them_on_every_day() {
    let Some(dir) = data_dir() else {
        eprintln!("PlanetLab data not found next to the checkout; skipping");
        return;
    };
    let handles: Vec<_> = DAYS
        .iter()
        .map(|&day| {
            let d = dir.join(day);
            std::thread::spawn(move || {
                let traces = trace::load_dir(&d).expect("traces load");
                let base: Vec<Report> = BASELINES.iter().map(|p| run(&traces, p)).collect();
                let dvfs = run(&traces, "dvfs");
                let viola = run(&traces, "viola");
                (day, base, dvfs, viola)
            })
        })
        .collect();
    for h in handles {
        let (day, base, dvfs, viola) = h.join().expect("day thread");
        let rel = |x: f64, y: f64| (x - y).abs() / y;
        for (p, r) in BASELINES.iter().zip(&base) {
            let (e, m, s) = reference(&dir, day, p);
            eprintln!(
                "{day} {p}: {:.2} kWh (ref {e}), {} migrations (ref {m}), SLATAH {:.4} (ref {s})",
                r.energy_kwh, r.migrations, r.slatah
            );
            assert!(
                rel(r.energy_kwh, e) <= 0.10,
                "{day} {p}: energy {} vs {e}",
                r.energy_kwh
            );
            assert!(
                rel(r.migrations as f64, m) <= 0.25,
                "{day} {p}: migrations {} vs {m}",
                r.migrations
            );
            assert!(
                rel(r.slatah, s) <= 0.25,
                "{day} {p}: SLATAH {} vs {s}",
                r.slatah
            );
        }
        let (e, _, _) = reference(&dir, day, "dvfs--");
        assert!(
            rel(dvfs.energy_kwh, e) <= 0.10,
            "{day} dvfs: energy {} vs {e}",
            dvfs.energy_kwh
        );
        assert_eq!(dvfs.migrations, 0);
        let best = base
            .iter()
            .min_by(|a, b| a.esv.total_cmp(&b.esv))
            .expect("baselines ran");
        eprintln!(
            "{day} viola: {:.2} kWh, {} migrations, ESV {:.3e} (best baseline {} ESV {:.3e}, {} migrations)",
            viola.energy_kwh, viola.migrations, viola.esv, best.policy, best.esv, best.migrations
        );
        for b in &base {
            assert!(
                viola.esv < b.esv,
                "{day}: viola ESV {} vs {} {}",
                viola.esv,
                b.policy,
                b.esv
            );
        }
        assert!(
            viola.migrations * 5 <= best.migrations,
            "{day}: viola {} migrations vs best {}",
            viola.migrations,
            best.migrations
        );
    }
}
