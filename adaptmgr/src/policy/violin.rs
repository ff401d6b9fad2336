//! VIOLIN's adaptation heuristic: balance load within and between domains while keeping
//! migrations few, preferring moves inside a domain. A host is hot when its demand exceeds its
//! capacity or its site's mean load by `margin`; one VM leaves a hot host per period (the one that
//! best evens the pair out), to the least-loaded host of the same site if that one stays below the
//! site's mean + margin, else (only when the whole site is hotter than the federation) to the
//! least-loaded host of the coolest site. A VM that moved waits `cooldown_s` before moving again.

use super::{Action, Decision, ObservedState, Policy};

#[derive(Debug, Clone)]
pub struct Violin {
    pub margin: f64,
    pub cooldown_s: f64,
    last_moved: Vec<f64>,
}

impl Default for Violin {
    fn default() -> Self {
        Self {
            margin: 0.25,
            cooldown_s: 3600.0,
            last_moved: Vec::new(),
        }
    }
}

impl Policy for Violin {
    fn name(&self) -> String {
        "violin".into()
    }

    fn decide(&mut self, st: &ObservedState) -> Decision {
        if self.last_moved.len() != st.vms.len() {
            self.last_moved = vec![f64::NEG_INFINITY; st.vms.len()];
        }
        let n = st.hosts.len();
        let cap: Vec<f64> = st.hosts.iter().map(|h| h.total_mips()).collect();
        let mut load: Vec<f64> = st
            .hosts
            .iter()
            .map(|h| h.vms.iter().map(|&v| st.vms[v].requested_mips).sum())
            .collect();
        let active: Vec<bool> = st.hosts.iter().map(|h| !h.vms.is_empty()).collect();
        let mean = |load: &[f64], site: Option<usize>| {
            let hs: Vec<usize> = (0..n)
                .filter(|&h| active[h] && site.is_none_or(|s| st.hosts[h].site == s))
                .collect();
            let c: f64 = hs.iter().map(|&h| cap[h]).sum();
            if c > 0.0 {
                hs.iter().map(|&h| load[h]).sum::<f64>() / c
            } else {
                0.0
            }
        };
        let fed = mean(&load, None);
        let mut actions = Vec::new();
        let mut busy = vec![false; n];
        for h in 0..n {
            let site = st.hosts[h].site;
            let site_mean = mean(&load, Some(site));
            let u = load[h] / cap[h];
            if busy[h] || !(u > 1.0 || u > site_mean + self.margin) {
                continue;
            }
            let local = (0..n)
                .filter(|&d| d != h && active[d] && !busy[d] && st.hosts[d].site == site)
                .min_by(|&a, &b| (load[a] / cap[a]).total_cmp(&(load[b] / cap[b])));
            let remote = || {
                (0..n)
                    .filter(|&d| active[d] && !busy[d] && st.hosts[d].site != site)
                    .min_by(|&a, &b| (load[a] / cap[a]).total_cmp(&(load[b] / cap[b])))
            };
            let dest = match local {
                Some(d) if (load[d] / cap[d]) < site_mean + self.margin => Some(d),
                _ if site_mean > fed + self.margin => remote(),
                _ => None,
            };
            let Some(d) = dest else { continue };
            // The VM whose move leaves the pair most even, among those allowed to move.
            let best = st.hosts[h]
                .vms
                .iter()
                .copied()
                .filter(|&v| {
                    !st.vms[v].in_migration && st.time_s - self.last_moved[v] >= self.cooldown_s
                })
                .filter(|&v| st.hosts[d].pe_mips >= st.vms[v].requested_per_pe())
                .filter(|&v| (load[d] + st.vms[v].requested_mips) / cap[d] <= 1.0)
                .min_by(|&a, &b| {
                    let spread = |v: usize| {
                        let r = st.vms[v].requested_mips;
                        ((load[h] - r) / cap[h] - (load[d] + r) / cap[d]).abs()
                    };
                    spread(a).total_cmp(&spread(b))
                });
            let Some(v) = best else { continue };
            let r = st.vms[v].requested_mips;
            load[h] -= r;
            load[d] += r;
            busy[h] = true;
            busy[d] = true;
            self.last_moved[v] = st.time_s;
            let scope = if st.hosts[d].site == site {
                "within"
            } else {
                "between"
            };
            actions.push(Action::migrate(
                v,
                h,
                d,
                format!(
                    "balance {scope} domains: host {} at {:.0} %",
                    st.hosts[h].name,
                    100.0 * u
                ),
            ));
        }
        Decision { actions }
    }
}
