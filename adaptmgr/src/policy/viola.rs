//! Viola's own policy: few, well-chosen migrations.
//!
//! - **Robust demand.** A VM's demand is estimated as the larger of its current demand and a high
//!   quantile of its recent history, so one quiet sample does not invite a VM in that will spike
//!   back an interval later (prediction).
//! - **Headroom with hysteresis.** A host is relieved only when its current demand reaches its
//!   capacity or its estimated demand passes `overload`; VMs are placed only where the estimated
//!   demand stays below `target`; a host is emptied only when its estimated load is under
//!   `underload` and *every* VM on it fits elsewhere below `target` (otherwise nothing moves).
//! - **Cool-down.** A VM that moved is not moved again for `cooldown_s` unless its host is
//!   overloaded, so nothing goes back and forth.
//! - **Cheap moves, efficient hosts.** From an overloaded host the smallest-RAM VMs leave first
//!   (shortest migration); destinations are already-running hosts by best fit, a sleeping host is
//!   woken only when nothing else fits (the most efficient kind first); a VM larger than a host's
//!   core is kept off that host; moves inside a site are preferred and a cross-site move is made
//!   only when no host of the VM's own site can take it.
//! - **Bounded work.** At most `max_evacuations` hosts are emptied per period.

use serde::{Deserialize, Serialize};

use super::{Action, Decision, ObservedState, Policy};

/// The policy's parameters; the live manager reads them from its `[policy.viola]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ViolaParams {
    /// Quantile of the history used as the demand estimate.
    pub quantile: f64,
    /// History samples looked at.
    pub window: usize,
    pub target: f64,
    pub overload: f64,
    pub underload: f64,
    pub cooldown_s: f64,
    pub max_evacuations: usize,
}

impl Default for ViolaParams {
    fn default() -> Self {
        Self {
            quantile: 0.9,
            window: 12,
            target: 0.8,
            overload: 0.95,
            underload: 0.45,
            cooldown_s: 4.0 * 3600.0,
            max_evacuations: 400,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Viola {
    pub params: ViolaParams,
    last_moved: Vec<f64>,
}

impl Viola {
    pub fn new(params: ViolaParams) -> Self {
        Self {
            params,
            last_moved: Vec::new(),
        }
    }

    fn estimate(&self, st: &ObservedState, v: usize) -> f64 {
        let vm = &st.vms[v];
        let n = vm.history.len().min(self.params.window);
        let mut h: Vec<f64> = vm.history[..n].to_vec();
        let q = if h.is_empty() {
            0.0
        } else {
            h.sort_by(f64::total_cmp);
            h[((self.params.quantile * (n as f64 - 1.0)).round() as usize).min(n - 1)]
        };
        (q * vm.total_mips()).max(vm.requested_mips)
    }
}

struct Load<'a> {
    st: &'a ObservedState,
    est: Vec<f64>,
    load: Vec<f64>,
    req: Vec<f64>,
    vms: Vec<Vec<usize>>,
}

impl Load<'_> {
    fn cap(&self, h: usize) -> f64 {
        self.st.hosts[h].total_mips()
    }
    fn fits(&self, h: usize, v: usize, limit: f64) -> bool {
        let host = &self.st.hosts[h];
        let vm = &self.st.vms[v];
        host.powered_on
            && vm.total_mips() / f64::from(vm.pes.max(1)) <= host.pe_mips
            && self.load[h] + self.est[v] <= limit * self.cap(h)
    }
    fn move_vm(&mut self, v: usize, from: usize, to: usize) {
        self.vms[from].retain(|&x| x != v);
        self.load[from] -= self.est[v];
        self.req[from] -= self.st.vms[v].requested_mips;
        self.vms[to].push(v);
        self.load[to] += self.est[v];
        self.req[to] += self.st.vms[v].requested_mips;
    }
    /// Best fit among running hosts of `site` (any site if None), else the most efficient empty host.
    fn destination(
        &self,
        v: usize,
        limit: f64,
        skip: &[bool],
        site: Option<usize>,
    ) -> Option<usize> {
        let n = self.st.hosts.len();
        let in_site = |h: usize| site.is_none_or(|s| self.st.hosts[h].site == s);
        let mut best: Option<(f64, usize)> = None;
        for h in 0..n {
            if skip[h] || self.vms[h].is_empty() || !in_site(h) || !self.fits(h, v, limit) {
                continue;
            }
            let slack = limit * self.cap(h) - self.load[h] - self.est[v];
            if best.is_none_or(|(s, _)| slack < s) {
                best = Some((slack, h));
            }
        }
        if let Some((_, h)) = best {
            return Some(h);
        }
        // Wake a host: the one with the lowest full-load watts per MIPS.
        let mut wake: Option<(f64, usize)> = None;
        for h in 0..n {
            if skip[h] || !self.vms[h].is_empty() || !in_site(h) || !self.fits(h, v, limit) {
                continue;
            }
            let host = &self.st.hosts[h];
            let cost = host.power.power(1.0) / self.cap(h);
            if wake.is_none_or(|(c, _)| cost < c) {
                wake = Some((cost, h));
            }
        }
        wake.map(|(_, h)| h)
    }
}

impl Policy for Viola {
    fn name(&self) -> String {
        "viola".into()
    }

    fn decide(&mut self, st: &ObservedState) -> Decision {
        let n = st.hosts.len();
        if self.last_moved.len() != st.vms.len() {
            self.last_moved = vec![f64::NEG_INFINITY; st.vms.len()];
        }
        let est: Vec<f64> = (0..st.vms.len()).map(|v| self.estimate(st, v)).collect();
        let mut l = Load {
            st,
            load: st
                .hosts
                .iter()
                .map(|h| h.vms.iter().map(|&v| est[v]).sum())
                .collect(),
            req: st
                .hosts
                .iter()
                .map(|h| h.vms.iter().map(|&v| st.vms[v].requested_mips).sum())
                .collect(),
            vms: st.hosts.iter().map(|h| h.vms.clone()).collect(),
            est,
        };
        let mut actions = Vec::new();
        let mut touched = vec![false; n];
        // 1. Relieve overloaded hosts.
        for h in 0..n {
            let cap = l.cap(h);
            if !(l.req[h] >= cap || l.load[h] > self.params.overload * cap) {
                continue;
            }
            touched[h] = true;
            let mut cands = st.movable(&l.vms[h]);
            // Smallest RAM first (shortest migration), bigger estimate first among equals.
            cands.sort_by(|&a, &b| {
                st.vms[a]
                    .ram_mb
                    .total_cmp(&st.vms[b].ram_mb)
                    .then(l.est[b].total_cmp(&l.est[a]))
            });
            for v in cands {
                if l.load[h] <= self.params.target * cap && l.req[h] < cap {
                    break;
                }
                let site = Some(st.hosts[h].site);
                let dest = l
                    .destination(v, self.params.target, &touched, site)
                    .or_else(|| l.destination(v, self.params.target, &touched, None));
                if let Some(d) = dest {
                    // Both figures the overload test looks at, as they were before this move:
                    // the demand now, and the estimate from the VMs' recent use.
                    let (now, estimated) = (l.req[h], l.load[h]);
                    l.move_vm(v, h, d);
                    self.last_moved[v] = st.time_s;
                    actions.push(Action::migrate(
                        v,
                        h,
                        d,
                        format!(
                            "host {} overloaded: demand {now:.0} / {cap:.0} MIPS now, \
                             {estimated:.0} estimated from its VMs' recent use",
                            st.hosts[h].name,
                        ),
                    ));
                }
            }
        }
        // 2. Empty lightly loaded hosts when all of their VMs fit elsewhere.
        let mut order: Vec<usize> = (0..n)
            .filter(|&h| !l.vms[h].is_empty() && !touched[h])
            .collect();
        order.sort_by(|&a, &b| (l.load[a] / l.cap(a)).total_cmp(&(l.load[b] / l.cap(b))));
        let mut evacuated = 0;
        let mut received = vec![false; n];
        for h in order {
            if evacuated >= self.params.max_evacuations
                || l.load[h] > self.params.underload * l.cap(h)
            {
                break;
            }
            if received[h] {
                continue;
            }
            let vms = l.vms[h].clone();
            if vms.iter().any(|&v| {
                st.vms[v].in_migration || st.time_s - self.last_moved[v] < self.params.cooldown_s
            }) {
                continue;
            }
            let mut skip = touched.clone();
            skip[h] = true;
            let mut plan = Vec::new();
            let mut sorted = vms.clone();
            sorted.sort_by(|&a, &b| l.est[b].total_cmp(&l.est[a]));
            let mut ok = true;
            for v in sorted {
                // Only hosts already running: emptying a host to wake another gains nothing.
                let site = st.hosts[h].site;
                let d = (0..n)
                    .filter(|&d| {
                        !skip[d]
                            && !l.vms[d].is_empty()
                            && st.hosts[d].site == site
                            && l.fits(d, v, self.params.target)
                    })
                    .min_by(|&a, &b| {
                        let sa = self.params.target * l.cap(a) - l.load[a];
                        let sb = self.params.target * l.cap(b) - l.load[b];
                        sa.total_cmp(&sb)
                    });
                match d {
                    Some(d) => {
                        l.move_vm(v, h, d);
                        plan.push((v, d));
                    }
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                for &(v, d) in plan.iter().rev() {
                    l.move_vm(v, d, h);
                }
                continue;
            }
            touched[h] = true;
            evacuated += 1;
            for (v, d) in plan {
                received[d] = true;
                self.last_moved[v] = st.time_s;
                actions.push(Action::migrate(
                    v,
                    h,
                    d,
                    format!(
                        "host {} underloaded: empty it and let it sleep",
                        st.hosts[h].name
                    ),
                ));
            }
        }
        Decision { actions }
    }
}
