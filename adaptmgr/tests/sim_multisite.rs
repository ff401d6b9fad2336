//! Several sites with a slower WAN between them: cross-site migrations cost more in the model and
//! are recorded as such in the decision trace; viola keeps moves inside a site.

use std::path::Path;

use viola_adaptmgr::policy::by_name;
use viola_adaptmgr::sim::{Simulator, cloudsim_planetlab, trace};

#[test]
fn cross_site_moves_are_costlier_and_viola_keeps_them_rare() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/planetlab/20110306");
    if !dir.is_dir() {
        eprintln!("PlanetLab data not found; skipping");
        return;
    }
    let traces = trace::load_dir(&dir).expect("traces load");
    let mut cfg = cloudsim_planetlab(&traces, 800, 2, 100.0);
    cfg.record_trace = true;
    let mut thr = by_name("thr-mmt-0.8").expect("known");
    let (rt, trace_thr) = Simulator::new(cfg.clone()).run(thr.as_mut());
    let mut viola = by_name("viola").expect("known");
    let (rv, trace_viola) = Simulator::new(cfg).run(viola.as_mut());
    // Every applied migration is in the trace with its reason and cost.
    assert_eq!(
        trace_thr.iter().filter(|r| r.applied).count() as u64,
        rt.migrations
    );
    assert!(trace_viola.iter().all(|r| !r.reason.is_empty()));
    // 1740 MB over 100 Mbit/s of WAN instead of 500 Mbit/s of LAN.
    let cross = trace_thr.iter().find(|r| r.cross_site && r.cost_s > 100.0);
    assert!(
        cross.is_some(),
        "the site-blind baseline moves across the WAN, at WAN speed"
    );
    assert!(
        trace_thr
            .iter()
            .filter(|r| !r.cross_site)
            .all(|r| r.cost_s < 30.0)
    );
    assert!(
        rt.cross_site_migrations > 100,
        "baseline: {} cross-site",
        rt.cross_site_migrations
    );
    assert!(
        rv.cross_site_migrations * 20 <= rv.migrations.max(1),
        "viola: {} of {} cross-site",
        rv.cross_site_migrations,
        rv.migrations
    );
}
