//! Marinescu & Schmid (2008): rule-based bottleneck detection per VM (the VM logic) and two cluster
//! logics that serve a VM's request for more of a resource: Algorithm A (grow in place, else first
//! fit with one migration) and Algorithm B (K-best-first search over placements, utility = global
//! profit − migration cost).

use super::{Action, Decision, ObservedState, Policy, planning};

/// What a VM manager observes about its VM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Symptoms {
    pub slo_violated: bool,
    pub cpu_utilization: f64,
    pub memory_utilization: f64,
    pub swapping: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Cpu,
    Memory,
}

/// The VM logic's rules: an SLO violation plus a symptom names the resource to add.
pub fn bottleneck(s: &Symptoms) -> Option<Resource> {
    if !s.slo_violated {
        return None;
    }
    if s.swapping || s.memory_utilization >= 0.95 {
        Some(Resource::Memory)
    } else if s.cpu_utilization >= 0.9 {
        Some(Resource::Cpu)
    } else {
        None
    }
}

/// One resource dimension of a cluster (e.g. memory in MB).
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub capacity: Vec<f64>,
    pub size: Vec<f64>,
    pub host_of: Vec<usize>,
}

/// A step of a cluster logic's solution, in execution order.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Grow { vm: usize, amount: f64 },
    Migrate { vm: usize, from: usize, to: usize },
}

impl Cluster {
    fn used(&self, host_of: &[usize], sizes: &[f64], h: usize) -> f64 {
        host_of
            .iter()
            .zip(sizes)
            .filter(|(x, _)| **x == h)
            .map(|(_, s)| s)
            .sum()
    }
}

/// Algorithm A: grow in place if the host has room, else move the VM (with its new size) to the
/// first host that can hold it; `None` if no single migration works.
pub fn algorithm_a(c: &Cluster, vm: usize, extra: f64) -> Option<Vec<Step>> {
    let h = c.host_of[vm];
    if c.capacity[h] - c.used(&c.host_of, &c.size, h) >= extra {
        return Some(vec![Step::Grow { vm, amount: extra }]);
    }
    let need = c.size[vm] + extra;
    (0..c.capacity.len())
        .filter(|&d| d != h)
        .find(|&d| c.capacity[d] - c.used(&c.host_of, &c.size, d) >= need)
        .map(|d| {
            vec![
                Step::Migrate { vm, from: h, to: d },
                Step::Grow { vm, amount: extra },
            ]
        })
}

/// Algorithm B's search parameters.
#[derive(Debug, Clone, Copy)]
pub struct KbfsParams {
    pub k: usize,
    pub iterations: usize,
    /// Utility lost per migration.
    pub migration_cost: f64,
}

impl Default for KbfsParams {
    fn default() -> Self {
        Self {
            k: 4,
            iterations: 200,
            migration_cost: 0.1,
        }
    }
}

/// Algorithm B: K-best-first search from the current placement (with the VM already at its new
/// size); states are placements, children move one VM; the best valid state by utility wins and is
/// turned into a capacity-respecting ordered plan.
pub fn algorithm_b(c: &Cluster, vm: usize, extra: f64, p: KbfsParams) -> Option<Vec<Step>> {
    let mut sizes = c.size.clone();
    sizes[vm] += extra;
    let n_h = c.capacity.len();
    let profit = |s: &[usize]| -> f64 {
        let mut total = 0.0;
        for h in 0..n_h {
            let used = c.used(s, &sizes, h);
            if used > c.capacity[h] + 1e-9 {
                return 0.0;
            }
            // An empty host can go offline: maximal local profit.
            total += if used == 0.0 {
                1.0
            } else {
                used / c.capacity[h]
            };
        }
        total
    };
    let cost = |s: &[usize]| s.iter().zip(&c.host_of).filter(|(a, b)| a != b).count();
    let utility = |s: &[usize]| profit(s) - p.migration_cost * cost(s) as f64;
    let mut open: Vec<(f64, Vec<usize>)> = vec![(utility(&c.host_of), c.host_of.clone())];
    let mut closed: std::collections::HashSet<Vec<usize>> = std::collections::HashSet::new();
    let mut best: Option<(f64, Vec<usize>)> = None;
    for _ in 0..p.iterations {
        if open.is_empty() {
            break;
        }
        open.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let expand: Vec<(f64, Vec<usize>)> = open.drain(..p.k.min(open.len())).collect();
        for (u, s) in expand {
            if !closed.insert(s.clone()) {
                continue;
            }
            if profit(&s) > 0.0 && best.as_ref().is_none_or(|(bu, _)| u > *bu) {
                best = Some((u, s.clone()));
            }
            for v in 0..s.len() {
                for h in 0..n_h {
                    if s[v] != h {
                        let mut child = s.clone();
                        child[v] = h;
                        if !closed.contains(&child) {
                            open.push((utility(&child), child));
                        }
                    }
                }
            }
        }
    }
    let (_, target) = best?;
    // Order the moves so that no host ever exceeds its capacity (the growing VM at its new size
    // once it lands; in place it grows last).
    let current: Vec<Option<usize>> = c.host_of.iter().map(|&h| Some(h)).collect();
    let goal: Vec<Option<usize>> = target.iter().map(|&h| Some(h)).collect();
    let plan = planning::plan(&planning::PlanInput {
        capacity: c.capacity.clone(),
        size: sizes.clone(),
        current,
        target: goal,
        max_parallel: 1,
    })
    .ok()?;
    let mut steps: Vec<Step> = plan
        .moves()
        .filter_map(|m| match (m.from, m.to) {
            (Some(f), Some(t)) => Some(Step::Migrate {
                vm: m.vm,
                from: f,
                to: t,
            }),
            _ => None,
        })
        .collect();
    steps.push(Step::Grow { vm, amount: extra });
    Some(steps)
}

/// The cluster logic as a simulator/manager policy on CPU: a VM whose demand is not met (its host
/// is saturated) asks for the missing MIPS; Algorithm A or B answers.
#[derive(Debug, Clone)]
pub struct ClusterPolicy {
    pub use_b: bool,
    pub params: KbfsParams,
}

impl ClusterPolicy {
    pub fn algorithm_a() -> Self {
        Self {
            use_b: false,
            params: KbfsParams::default(),
        }
    }
    pub fn algorithm_b() -> Self {
        Self {
            use_b: true,
            params: KbfsParams {
                k: 3,
                iterations: 20,
                migration_cost: 0.05,
            },
        }
    }
}

impl Policy for ClusterPolicy {
    fn name(&self) -> String {
        if self.use_b {
            "marinescu-b".into()
        } else {
            "marinescu-a".into()
        }
    }

    fn decide(&mut self, st: &ObservedState) -> Decision {
        let mut actions = Vec::new();
        let mut moved = vec![false; st.vms.len()];
        for (h, host) in st.hosts.iter().enumerate() {
            let req: f64 = host.vms.iter().map(|&v| st.vms[v].requested_mips).sum();
            if req <= host.total_mips() {
                continue;
            }
            // The VM with the largest unmet demand is the one whose SLO breaks first.
            let Some(&vm) = host
                .vms
                .iter()
                .filter(|&&v| !st.vms[v].in_migration && !moved[v])
                .max_by(|&&a, &&b| {
                    st.vms[a]
                        .requested_mips
                        .total_cmp(&st.vms[b].requested_mips)
                })
            else {
                continue;
            };
            let extra = req - host.total_mips();
            // A local cluster of the saturated host and the running hosts with the most room.
            let mut cands: Vec<usize> = (0..st.hosts.len())
                .filter(|&d| d != h && !st.hosts[d].vms.is_empty())
                .collect();
            let free = |d: usize| {
                st.hosts[d].total_mips()
                    - st.hosts[d]
                        .vms
                        .iter()
                        .map(|&v| st.vms[v].requested_mips)
                        .sum::<f64>()
            };
            cands.sort_by(|&a, &b| free(b).total_cmp(&free(a)));
            cands.truncate(if self.use_b { 3 } else { st.hosts.len() });
            let empty = (0..st.hosts.len()).find(|&d| st.hosts[d].vms.is_empty());
            cands.extend(empty);
            let mut local = vec![h];
            local.extend(cands);
            let mut vms_l = Vec::new();
            let mut host_of = Vec::new();
            for (i, &lh) in local.iter().enumerate() {
                for &v in &st.hosts[lh].vms {
                    vms_l.push(v);
                    host_of.push(i);
                }
            }
            let cluster = Cluster {
                capacity: local.iter().map(|&lh| st.hosts[lh].total_mips()).collect(),
                size: vms_l.iter().map(|&v| st.vms[v].requested_mips).collect(),
                host_of,
            };
            let Some(idx) = vms_l.iter().position(|&v| v == vm) else {
                continue;
            };
            // The VM "grows" to its demand: in the cluster view it already requests it, so the
            // request is for the host's shortfall to disappear.
            let sol = if self.use_b {
                algorithm_b(&cluster, idx, 0.0, self.params).filter(|s| s.len() > 1)
            } else {
                let mut c2 = cluster.clone();
                c2.size[idx] -= extra.min(c2.size[idx]);
                algorithm_a(&c2, idx, extra.min(cluster.size[idx]))
            };
            for s in sol.into_iter().flatten() {
                if let Step::Migrate { vm: i, from, to } = s {
                    let v = vms_l[i];
                    if !moved[v] {
                        moved[v] = true;
                        actions.push(Action::migrate(
                            v,
                            local[from],
                            local[to],
                            format!(
                                "SLO: host {} short of {:.0} MIPS (Algorithm {})",
                                host.name,
                                extra,
                                if self.use_b { "B" } else { "A" }
                            ),
                        ));
                    }
                }
            }
        }
        Decision { actions }
    }
}
