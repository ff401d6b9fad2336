//! Small scenario simulations used by the reproductions.

use crate::policy::vservices::{min_share, service_level};

/// Outcome of [`deadline_job`].
#[derive(Debug, Clone, PartialEq)]
pub struct DeadlineRun {
    pub finish_s: f64,
    pub deadline_s: f64,
    /// CPU share chosen at each control period.
    pub shares: Vec<f64>,
}

/// Virtual Services' computational service: `work_cpu_s` of work (seconds on one full CPU) must be
/// done by `deadline_s`. Every `period_s` the optimiser searches the minimum CPU share whose
/// service level reaches 50 % (the deadline is met exactly at 50 %: x = projected completion /
/// deadline on s(x) with a = 10, b = 1, w = 0.5), starting from the current share; the job then
/// runs at that share until the next period. The share is capped at `max_share` CPUs.
pub fn deadline_job(
    work_cpu_s: f64,
    deadline_s: f64,
    period_s: f64,
    initial_share: f64,
    max_share: f64,
) -> DeadlineRun {
    let mut t = 0.0;
    let mut left = work_cpu_s;
    let mut share = initial_share;
    let mut shares = Vec::new();
    // The first period runs at the initial share, as the paper's job started at 40 % of a CPU.
    let mut first = true;
    while left > 1e-9 {
        if !first {
            let now = t;
            let rem = left;
            share = min_share(share, max_share, 0.5, 1e-3, |s| {
                let projected = now + rem / s;
                service_level(projected / deadline_s, 10.0, 1.0, 0.5)
            });
        }
        first = false;
        shares.push(share);
        let run = period_s.min(left / share);
        left -= run * share;
        t += run;
    }
    DeadlineRun {
        finish_s: t,
        deadline_s,
        shares,
    }
}
