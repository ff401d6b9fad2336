//! Migration planning: from the current to a target placement, an ordered plan of stages that
//! never exceeds any host's capacity, with at most one migration into and one out of each host per
//! stage and at most `max_parallel` per stage. During a live migration the VM occupies both hosts,
//! so a move starts only where the destination already has room. Cycles (A must leave h1 before B
//! can enter, and B must leave h2 before A can enter) are broken by a temporary placement on the
//! host with the most slack (one extra migration, Entropy's pivot / Hall et al.'s bypass node) or,
//! when no host has room, by a stop-and-copy step: the VM is suspended to disk and resumed at its
//! target once that has room (Shirako).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq)]
pub struct PlanInput {
    pub capacity: Vec<f64>,
    pub size: Vec<f64>,
    /// Host of each VM now (None = not running, e.g. suspended).
    pub current: Vec<Option<usize>>,
    /// Host of each VM at the end (None = leave it suspended).
    pub target: Vec<Option<usize>>,
    pub max_parallel: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveKind {
    Live,
    /// A live move to a pivot host, to break a cycle.
    Temporary,
    /// Stop-and-copy, first half: suspend to disk.
    Suspend,
    /// Resume (after a suspend, or a VM that was not running) at its target.
    Resume,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub vm: usize,
    pub from: Option<usize>,
    pub to: Option<usize>,
    pub kind: MoveKind,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub stages: Vec<Vec<Move>>,
}

impl Plan {
    pub fn moves(&self) -> impl Iterator<Item = &Move> {
        self.stages.iter().flatten()
    }
    /// Live migrations, including the temporary ones.
    pub fn migrations(&self) -> usize {
        self.moves()
            .filter(|m| matches!(m.kind, MoveKind::Live | MoveKind::Temporary))
            .count()
    }
    pub fn temporary(&self) -> usize {
        self.moves()
            .filter(|m| m.kind == MoveKind::Temporary)
            .count()
    }
    pub fn stop_and_copy(&self) -> usize {
        self.moves().filter(|m| m.kind == MoveKind::Suspend).count()
    }
    /// Total size moved (e.g. MB of RAM): the cost of the plan.
    pub fn moved(&self, size: &[f64]) -> f64 {
        self.moves()
            .filter(|m| m.kind != MoveKind::Suspend)
            .map(|m| size[m.vm])
            .sum()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("input vectors disagree in length")]
    Shape,
    #[error("the target placement exceeds host {host}'s capacity")]
    TargetOverCapacity { host: usize },
    #[error("no order reaches the target (VM {vm} can never start on its target)")]
    Stuck { vm: usize },
}

/// Computes the plan (deterministic: VMs are considered in index order).
pub fn plan(input: &PlanInput) -> Result<Plan, PlanError> {
    let n_h = input.capacity.len();
    let n_v = input.size.len();
    if input.current.len() != n_v || input.target.len() != n_v {
        return Err(PlanError::Shape);
    }
    if input
        .current
        .iter()
        .chain(&input.target)
        .flatten()
        .any(|&h| h >= n_h)
    {
        return Err(PlanError::Shape);
    }
    let mut goal_used = vec![0.0; n_h];
    for (v, t) in input.target.iter().enumerate() {
        if let Some(h) = *t {
            goal_used[h] += input.size[v];
        }
    }
    if let Some(h) = (0..n_h).find(|&h| goal_used[h] > input.capacity[h] + 1e-9) {
        return Err(PlanError::TargetOverCapacity { host: h });
    }
    let mut used = vec![0.0; n_h];
    for (v, c) in input.current.iter().enumerate() {
        if let Some(h) = *c {
            used[h] += input.size[v];
        }
    }
    let fits = |used: &[f64], h: usize, s: f64| used[h] + s <= input.capacity[h] + 1e-9;
    let mut pos = input.current.clone();
    let mut out = Plan::default();
    let max_parallel = input.max_parallel.max(1);
    let mut guard = 0usize;
    while let Some(first) = (0..n_v).find(|&v| pos[v] != input.target[v]) {
        guard += 1;
        if guard > 16 * n_v + 64 {
            return Err(PlanError::Stuck { vm: first });
        }
        let mut stage = Vec::new();
        let mut busy_in = vec![false; n_h];
        let mut busy_out = vec![false; n_h];
        for v in 0..n_v {
            if stage.len() >= max_parallel || pos[v] == input.target[v] {
                continue;
            }
            let (from, to) = (pos[v], input.target[v]);
            let src_free = from.is_none_or(|f| !busy_out[f]);
            let dst_ok = to.is_none_or(|t| !busy_in[t] && fits(&used, t, input.size[v]));
            if src_free && dst_ok {
                if let Some(t) = to {
                    used[t] += input.size[v];
                    busy_in[t] = true;
                }
                if let Some(f) = from {
                    busy_out[f] = true;
                }
                let kind = match (from, to) {
                    (Some(_), Some(_)) => MoveKind::Live,
                    (None, _) => MoveKind::Resume,
                    (Some(_), None) => MoveKind::Suspend,
                };
                stage.push(Move {
                    vm: v,
                    from,
                    to,
                    kind,
                });
            }
        }
        if stage.is_empty() {
            // A cycle: every remaining VM waits for room that a remaining VM holds. Take the
            // waiting VM closest to fitting and move the largest VM standing in its way to the
            // host with the most slack (a temporary placement), or suspend it when no host has
            // room (stop-and-copy).
            let deficit = |v: usize| match input.target[v] {
                Some(t) => used[t] + input.size[v] - input.capacity[t],
                None => f64::INFINITY,
            };
            let Some(v) = (0..n_v)
                .filter(|&v| pos[v] != input.target[v] && input.target[v].is_some())
                .min_by(|&a, &b| deficit(a).total_cmp(&deficit(b)).then(a.cmp(&b)))
            else {
                return Err(PlanError::Stuck { vm: first });
            };
            let t = input.target[v];
            let Some(b) = (0..n_v)
                .filter(|&u| u != v && pos[u] == t && pos[u] != input.target[u])
                .max_by(|&a, &c| input.size[a].total_cmp(&input.size[c]).then(c.cmp(&a)))
            else {
                return Err(PlanError::Stuck { vm: v });
            };
            let from = pos[b];
            let pivot = (0..n_h)
                .filter(|&h| Some(h) != from && fits(&used, h, input.size[b]))
                .max_by(|&a, &c| {
                    let own = |h: usize| Some(h) == input.target[b];
                    own(a)
                        .cmp(&own(c))
                        .then(
                            (input.capacity[a] - used[a]).total_cmp(&(input.capacity[c] - used[c])),
                        )
                        .then(c.cmp(&a))
                });
            let m = match pivot {
                Some(p) => {
                    used[p] += input.size[b];
                    let kind = if Some(p) == input.target[b] {
                        MoveKind::Live
                    } else {
                        MoveKind::Temporary
                    };
                    Move {
                        vm: b,
                        from,
                        to: Some(p),
                        kind,
                    }
                }
                None => Move {
                    vm: b,
                    from,
                    to: None,
                    kind: MoveKind::Suspend,
                },
            };
            stage.push(m);
        }
        for m in &stage {
            if let Some(f) = m.from {
                used[f] -= input.size[m.vm];
            }
            pos[m.vm] = m.to;
        }
        out.stages.push(stage);
    }
    Ok(out)
}

/// Replays a plan and checks every invariant; used by tests and by callers that want to be sure.
pub fn check(input: &PlanInput, p: &Plan) -> Result<(), String> {
    let n_h = input.capacity.len();
    let mut used = vec![0.0; n_h];
    let mut pos = input.current.clone();
    for (v, c) in pos.iter().enumerate() {
        if let Some(h) = *c {
            used[h] += input.size[v];
        }
    }
    for (i, stage) in p.stages.iter().enumerate() {
        if stage.len() > input.max_parallel.max(1) {
            return Err(format!("stage {i} runs {} moves", stage.len()));
        }
        let mut ins = vec![0; n_h];
        let mut outs = vec![0; n_h];
        for m in stage {
            if pos[m.vm] != m.from {
                return Err(format!("stage {i}: VM {} is not on {:?}", m.vm, m.from));
            }
            if let Some(t) = m.to {
                used[t] += input.size[m.vm];
                ins[t] += 1;
                if used[t] > input.capacity[t] + 1e-9 {
                    return Err(format!("stage {i}: host {t} over capacity"));
                }
            }
            if let Some(f) = m.from {
                outs[f] += 1;
            }
        }
        if ins.iter().chain(&outs).any(|&c| c > 1) {
            return Err(format!(
                "stage {i}: more than one move into or out of a host"
            ));
        }
        for m in stage {
            if let Some(f) = m.from {
                used[f] -= input.size[m.vm];
            }
            pos[m.vm] = m.to;
        }
    }
    if pos != input.target {
        return Err("the plan does not end at the target".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Two VMs that each fill a host swap hosts 0 and 1.
    fn swap(capacity: Vec<f64>, max_parallel: usize) -> PlanInput {
        PlanInput {
            capacity,
            size: vec![1.0, 1.0],
            current: vec![Some(0), Some(1)],
            target: vec![Some(1), Some(0)],
            max_parallel,
        }
    }

    #[test]
    fn a_swap_with_a_spare_host_goes_through_a_pivot() {
        let input = swap(vec![1.0, 1.0, 1.0], 2);
        let p = plan(&input).expect("plannable");
        assert_eq!(check(&input, &p), Ok(()));
        assert_eq!(p.temporary(), 1);
        assert_eq!(p.migrations(), 3);
        assert_eq!(p.stop_and_copy(), 0);
    }

    #[test]
    fn a_swap_without_room_anywhere_uses_stop_and_copy() {
        let input = swap(vec![1.0, 1.0], 4);
        let p = plan(&input).expect("plannable");
        assert_eq!(check(&input, &p), Ok(()));
        assert_eq!(p.stop_and_copy(), 1);
        assert_eq!(p.migrations(), 1);
    }

    #[test]
    fn an_overfull_target_is_refused() {
        let input = PlanInput {
            capacity: vec![1.0, 1.0],
            size: vec![0.6, 0.6],
            current: vec![Some(0), Some(1)],
            target: vec![Some(0), Some(0)],
            max_parallel: 1,
        };
        assert_eq!(plan(&input), Err(PlanError::TargetOverCapacity { host: 0 }));
    }

    proptest! {
        #[test]
        fn plans_respect_capacity_and_reach_the_target(
            sizes in proptest::collection::vec(1u8..4, 1..10),
            seed in proptest::collection::vec(0usize..5, 20),
            par in 1usize..4,
        ) {
            // Five hosts of capacity 6; current and target are both feasible packings.
            let n_h = 5;
            let cap = 6.0;
            let size: Vec<f64> = sizes.iter().map(|&s| f64::from(s)).collect();
            let pack = |off: usize| -> Option<Vec<Option<usize>>> {
                let mut used = vec![0.0; n_h];
                let mut out = Vec::new();
                for (v, s) in size.iter().enumerate() {
                    let start = seed[(v + off) % seed.len()];
                    let h = (0..n_h).map(|i| (start + i) % n_h).find(|&h| used[h] + s <= cap)?;
                    used[h] += s;
                    out.push(Some(h));
                }
                Some(out)
            };
            if let (Some(current), Some(target)) = (pack(0), pack(7)) {
                let input = PlanInput { capacity: vec![cap; n_h], size: size.clone(), current, target, max_parallel: par };
                let p = plan(&input).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(check(&input, &p), Ok(()));
            }
        }
    }
}
