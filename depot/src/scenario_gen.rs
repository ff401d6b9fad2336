//! Seeded random planning scenarios (for the benchmark and the planner's tests).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::planner::{LinkSpec, PartSpec, Scenario, SiteSpec, VmSpec};

/// Shape of a generated scenario.
#[derive(Clone, Copy, Debug)]
pub struct GenParams {
    pub sites: usize,
    pub vms: usize,
    /// Image families (base + 0..=2 layers each).
    pub images: usize,
    /// Deadlines are drawn from `min_deadline..max_deadline` seconds after now.
    pub min_deadline: f64,
    pub max_deadline: f64,
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            sites: 4,
            vms: 50,
            images: 6,
            min_deadline: 20.0,
            max_deadline: 240.0,
        }
    }
}

/// `n` deterministic pseudo-random bytes for `seed` (a linear congruential generator: data
/// for tests and benchmarks that neither compresses nor repeats, not for anything secret).
pub fn pseudo_random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u8
        })
        .collect()
}

/// A deterministic scenario for `seed`.
pub fn generate(seed: u64, g: GenParams) -> Scenario {
    let mut rng = StdRng::seed_from_u64(seed);
    let mb = 1_000_000.0;
    let sites: Vec<SiteSpec> = (0..g.sites)
        .map(|i| SiteSpec {
            name: format!("s{i}"),
            egress_bps: rng.gen_range(60.0..200.0) * mb,
            ingress_bps: rng.gen_range(60.0..200.0) * mb,
        })
        .collect();
    let mut links = Vec::new();
    for a in 0..g.sites {
        for b in 0..g.sites {
            if a != b {
                links.push(LinkSpec {
                    from: format!("s{a}"),
                    to: format!("s{b}"),
                    bytes_per_sec: rng.gen_range(5.0..60.0) * mb,
                });
            }
        }
    }
    let mut parts = Vec::new();
    let mut images: Vec<Vec<String>> = Vec::new();
    let holders = |rng: &mut StdRng| -> Vec<String> {
        let n = rng.gen_range(1..=2.min(g.sites));
        let mut h: Vec<String> = Vec::new();
        while h.len() < n {
            let s = format!("s{}", rng.gen_range(0..g.sites));
            if !h.contains(&s) {
                h.push(s);
            }
        }
        h
    };
    for i in 0..g.images {
        let base = format!("img{i}-base");
        parts.push(PartSpec {
            name: base.clone(),
            bytes: (rng.gen_range(200.0..1500.0) * mb) as u64,
            holders: holders(&mut rng),
        });
        let mut chain = vec![base];
        for l in 0..rng.gen_range(0..=2) {
            let name = format!("img{i}-layer{l}");
            parts.push(PartSpec {
                name: name.clone(),
                bytes: (rng.gen_range(20.0..300.0) * mb) as u64,
                holders: holders(&mut rng),
            });
            chain.push(name);
        }
        images.push(chain);
    }
    let now = 1000.0;
    let vms = (0..g.vms)
        .map(|i| VmSpec {
            name: format!("vm{i}"),
            site: format!("s{}", rng.gen_range(0..g.sites)),
            parts: images[rng.gen_range(0..images.len())].clone(),
            deadline: now + rng.gen_range(g.min_deadline..g.max_deadline),
            assembly_secs: rng.gen_range(0.5..4.0),
        })
        .collect();
    Scenario {
        now,
        sites,
        links,
        parts,
        vms,
        progress: Vec::new(),
    }
}
