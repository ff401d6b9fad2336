//! Virtual Services (Dynamic resources management of virtual appliances): switch-shaped
//! service-level functions, their weighted aggregation, and the search for the minimum CPU share
//! that still meets a target service level (doubling to bracket, then bisection).

/// s(x) = w·a·(b−x)/√(1+(a·(b−x))²) + w: ≈ 2w well below b, w at b, ≈ 0 above b + a few/a.
pub fn service_level(x: f64, a: f64, b: f64, w: f64) -> f64 {
    let z = a * (b - x);
    w * z / (1.0 + z * z).sqrt() + w
}

/// The system service level σ = Π wᵢ·Sᵢ over (weight, level) pairs.
pub fn aggregate(levels: &[(f64, f64)]) -> f64 {
    levels.iter().map(|(w, s)| w * s).product()
}

/// The smallest share in (0, `max_share`] whose service level (`level`, increasing in the share)
/// reaches `target`, found as the paper does: from `guess`, double (or halve) until the target is
/// bracketed, then bisect until the bracket is narrower than `tolerance` × share. Returns the
/// feasible end of the bracket (`max_share` if even that is not enough).
pub fn min_share(
    guess: f64,
    max_share: f64,
    target: f64,
    tolerance: f64,
    mut level: impl FnMut(f64) -> f64,
) -> f64 {
    let mut share = guess.clamp(f64::MIN_POSITIVE, max_share);
    let (mut lo, mut hi);
    if level(share) >= target {
        hi = share;
        loop {
            let next = share / 2.0;
            if next < 1e-9 {
                return hi;
            }
            if level(next) >= target {
                hi = next;
                share = next;
            } else {
                lo = next;
                break;
            }
        }
    } else {
        lo = share;
        loop {
            let next = (share * 2.0).min(max_share);
            if level(next) >= target {
                hi = next;
                break;
            }
            if next >= max_share {
                return max_share;
            }
            lo = next;
            share = next;
        }
    }
    while hi - lo > tolerance * hi {
        let mid = 0.5 * (lo + hi);
        if level(mid) >= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// The service level a job's share is solved for: s(x) = 0.7 with a = 10, b = 1, w = 0.5 puts
/// the projected completion about 4 % of the deadline's window early (0.5 would aim at the
/// deadline itself, which measurement noise then misses half the time; at 0.6, 2 % early, the
/// lab's 61 s job ended 0.9 s before its deadline).
pub const DEADLINE_LEVEL: f64 = 0.7;

/// One progress report of a job: `done` work units at `at_s`, `share` CPUs in force over the
/// interval that ended there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub at_s: f64,
    pub done: f64,
    pub share: f64,
}

/// The job's speed, work units per CPU-second, over its last (at most) `window` intervals
/// (`reports` oldest first); `None` before two reports or when nothing moved.
pub fn units_per_cpu_second(reports: &[Progress], window: usize) -> Option<f64> {
    let start = reports.len().saturating_sub(window + 1);
    let (mut units, mut cpu_s) = (0.0, 0.0);
    for pair in reports[start..].windows(2) {
        let dt = pair[1].at_s - pair[0].at_s;
        if dt <= 0.0 {
            continue;
        }
        units += pair[1].done - pair[0].done;
        cpu_s += dt * pair[1].share;
    }
    (units > 0.0 && cpu_s > 0.0).then(|| units / cpu_s)
}

/// Virtual Services' computational service, live: the smallest CPU share (in CPUs, at most
/// `max_share`) whose projected completion keeps s(x) at [`DEADLINE_LEVEL`], where x is the
/// projected completion over the deadline, both counted from when the deadline was set
/// (`elapsed_s` ago, `window_s` long). `current` is where the search starts, as in the seed.
pub fn deadline_share(
    elapsed_s: f64,
    window_s: f64,
    remaining: f64,
    rate: f64,
    current: f64,
    max_share: f64,
) -> f64 {
    if remaining <= 0.0 {
        return f64::MIN_POSITIVE;
    }
    min_share(current, max_share, DEADLINE_LEVEL, 1e-3, |share| {
        let projected = elapsed_s + remaining / (rate * share);
        service_level(projected / window_s, 10.0, 1.0, 0.5)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_and_the_product_behave_as_described() {
        assert!(service_level(0.5, 10.0, 1.0, 0.5) > 0.99);
        assert!((service_level(1.0, 10.0, 1.0, 0.5) - 0.5).abs() < 1e-12);
        assert!(service_level(1.5, 10.0, 1.0, 0.5) < 0.01);
        assert!((aggregate(&[(1.0, 0.5), (1.0, 0.8)]) - 0.4).abs() < 1e-12);
    }

    #[test]
    fn the_search_finds_the_threshold_from_either_side() {
        let lvl = |s: f64| if s >= 0.73 { 1.0 } else { 0.0 };
        for g in [0.1, 0.4, 2.0] {
            let s = min_share(g, 4.0, 0.5, 1e-4, lvl);
            assert!((0.73..0.7302).contains(&s), "{g} -> {s}");
        }
        assert_eq!(min_share(0.4, 1.0, 0.5, 1e-4, |_| 0.0), 1.0);
    }

    #[test]
    fn a_job_gets_the_share_that_finishes_it_just_before_its_deadline() {
        // 1000 units at 10 units per CPU-second: 100 CPU-seconds. 20 s of a 200 s window gone
        // with 800 units left: 80 CPU-seconds in 180 s is 0.44 CPUs; the level asks a little more.
        let s = deadline_share(20.0, 200.0, 800.0, 10.0, 1.0, 2.0);
        assert!((0.45..0.48).contains(&s), "{s}");
        let finish = 20.0 + 800.0 / (10.0 * s);
        assert!((190.0..200.0).contains(&finish), "{finish}");
        // The job turns out slower (5 units per CPU-second): the share doubles.
        let slower = deadline_share(20.0, 200.0, 800.0, 5.0, s, 2.0);
        assert!((slower / s - 2.0).abs() < 0.02, "{s} -> {slower}");
        // Late already: the most it may have.
        assert_eq!(deadline_share(190.0, 200.0, 800.0, 10.0, 0.5, 1.5), 1.5);
    }

    #[test]
    fn the_speed_is_units_over_cpu_seconds_of_the_last_intervals() {
        let p = |at_s, done, share| Progress { at_s, done, share };
        assert_eq!(units_per_cpu_second(&[p(0.0, 0.0, 1.0)], 3), None);
        // 100 units in 10 s at a whole CPU, then 100 in 20 s at half a CPU: 10 per CPU-second.
        let reports = [p(0.0, 0.0, 1.0), p(10.0, 100.0, 1.0), p(30.0, 200.0, 0.5)];
        assert_eq!(units_per_cpu_second(&reports, 3), Some(10.0));
        // Only the last interval: 100 units over 10 CPU-seconds.
        assert_eq!(units_per_cpu_second(&reports, 1), Some(10.0));
        assert_eq!(
            units_per_cpu_second(&[p(0.0, 5.0, 1.0), p(9.0, 5.0, 1.0)], 3),
            None
        );
    }
}
