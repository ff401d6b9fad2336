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
}
