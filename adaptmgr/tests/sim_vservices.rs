//! Virtual Services: a deadline job whose CPU share is found by the binary search finishes within
//! 0.5 % of its deadline (the paper: a 40-minute computation finished 10 to 15 s late).

use viola_adaptmgr::sim::scenarios::deadline_job;

#[test]
fn a_forty_minute_job_meets_its_deadline_within_half_a_percent() {
    // 1.3 CPU-hours of work in 40 minutes: 40 % of one CPU is far too little at the start.
    let run = deadline_job(1.3 * 3600.0, 2400.0, 300.0, 0.4, 4.0);
    let dev = (run.finish_s - run.deadline_s).abs() / run.deadline_s;
    assert!(
        dev <= 0.005,
        "finished at {} s for a {} s deadline",
        run.finish_s,
        run.deadline_s
    );
    assert!(
        run.shares[0] < run.shares[1],
        "the optimiser had to grow the share: {:?}",
        run.shares
    );
}
