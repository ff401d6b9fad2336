//! Lab, end to end: a job inside a VM with a deadline (Virtual Services' computational
//! service, live). The job (`viola-job` in the guest) reports its progress from inside on its
//! shepherd channel; `viola vm deadline` gives it a deadline about three times what it needs at
//! a whole CPU; the manager caps the VM at the smallest share that still finishes in time,
//! re-solving at each report, and gives the cap back when the job is done. The job must finish
//! before the deadline, and later than it would have uncapped (it ran on less than a CPU).

// lab: default

use std::time::{Duration, Instant};

use viola_labtests::federation::guest_of_one_violin;
use viola_labtests::mech::*;

/// Runs `viola-job UNITS REPORT_S` in the guest and waits for it (at most `timeout`): the
/// job's own duration in seconds, and the caps seen while it ran.
fn run_job(name: &str, ip: &str, units: u32, report_s: u32, timeout: Duration) -> (f64, Vec<i64>) {
    let started = guest_http("a1", ip, &format!("job-start={units},{report_s}"));
    assert_eq!(started.as_deref(), Some("ok"));
    let mut result = String::new();
    let mut caps = Vec::new();
    let t0 = Instant::now();
    wait_until("the job ends", timeout, || {
        caps.extend(cap_percent("a1", name));
        result = guest_http("a1", ip, "job-result").unwrap_or_default();
        result.starts_with("units=")
    });
    let field = |k: &str| -> f64 {
        result
            .split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {result:?}"))
    };
    eprintln!(
        "[lab test] job of {units} units: {result} ({:.0} s here)",
        t0.elapsed().as_secs_f64()
    );
    (field("end") - field("start"), caps)
}

#[test]
fn a_job_with_a_deadline_gets_the_smallest_share_that_meets_it() {
    let name = "vm-job";
    let g = guest_of_one_violin(name, "10.77.12", 7712, "requests_per_vm_per_min = 40");
    let ip = g.ip.as_str();

    // How fast a unit of work is here, at a whole CPU (no deadline yet: progress is noted).
    let (calibration_s, _) = run_job(name, ip, 20, 60, Duration::from_secs(300));
    let per_unit_s = calibration_s / 20.0;
    // About 20 s of work at a whole CPU, and three times that until the deadline.
    let units = (20.0 / per_unit_s).ceil().max(10.0) as u32;
    let alone_s = units as f64 * per_unit_s;
    let deadline_s = (3.0 * alone_s).ceil() as u64;
    eprintln!(
        "[lab test] {per_unit_s:.2} s per unit: {units} units, {alone_s:.0} s alone, deadline in {deadline_s} s"
    );
    assert_eq!(cap_percent("a1", name), None);

    g.fed
        .viola(&["vm", "deadline", name, "--in-s", &deadline_s.to_string()]);
    let (took_s, caps) = run_job(name, ip, units, 3, Duration::from_secs(deadline_s * 2 + 60));
    // Below a whole CPU while it ran (the last reading may be the cap given back).
    let below: Vec<i64> = caps.iter().copied().filter(|c| *c < 100).collect();
    eprintln!(
        "FIGURES deadline_lab alone_s={alone_s:.1} deadline_s={deadline_s} took_s={took_s:.1} \
         cap_min={:?} cap_max={:?}",
        below.iter().min(),
        below.iter().max()
    );
    // Capped below a whole CPU, the job took longer than alone, and still met its deadline.
    assert!(
        !below.is_empty(),
        "the manager never capped the job's VM below a CPU: {caps:?}"
    );
    assert!(
        took_s > 1.5 * alone_s,
        "the job took {took_s:.0} s, {alone_s:.0} s alone: not slowed"
    );
    assert!(
        took_s <= deadline_s as f64 + 3.0,
        "the job took {took_s:.0} s, its deadline was {deadline_s} s"
    );
    // Done: the deadline is gone and the VM uncapped again, as before.
    wait_until("the cap is removed", Duration::from_secs(20), || {
        cap_percent("a1", name).is_none()
    });
    let changes = g.fed.actions_of("vservices");
    let done = changes
        .iter()
        .filter(|a| a["outcome"]["outcome"] == "done")
        .count();
    assert!(
        done >= 2,
        "the cap changes are not in the decision log: {changes:?}"
    );
}
