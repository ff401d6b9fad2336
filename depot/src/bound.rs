//! How good can any schedule be? An LP upper bound and, on tiny instances, the exact optimum.
//!
//! Time-expanded fluid LP (direct transfers, the same model the planner uses): time is cut at
//! every effective deadline; `x[p,s,d,k]` = bytes of part p sent from s to d in interval k;
//! `y_v ∈ [0,1]` = fraction of VM v completed. Coverage: every missing part of v arrives by v's
//! deadline in proportion `y_v`; capacity: per link, depot egress and site ingress per interval.
//! Any real schedule gives a feasible point with `y_v = 1` for every VM that made it, so
//! `Σ y*` ≥ the best achievable count ≥ what the planner achieves. With `y` fixed to 1 on a
//! subset the LP is a feasibility test; the largest feasible subset is the exact (fluid)
//! optimum, found by brute force on tiny instances.

use std::collections::HashMap;

use good_lp::{
    Expression, ProblemVariables, ResolutionError, Solution, SolverModel, Variable, microlp,
    variable,
};

use crate::planner::{PlanError, Problem, Scenario};

const SCALE: f64 = 1e-6; // bytes -> MB keeps the simplex well conditioned

/// The bound and how it was obtained.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Bound {
    /// Upper bound on the number of VMs that can be ready by their deadline: the LP optimum
    /// rounded down (the count is an integer, so the floor is still a bound).
    pub max_met: f64,
    /// The LP optimum before rounding.
    pub lp_value: f64,
    /// VMs with nothing to fetch that are ready in time no matter what.
    pub trivially_met: usize,
    pub variables: usize,
    pub intervals: usize,
}

/// Classification of VMs for the LP.
struct Split {
    trivial: usize,
    candidates: Vec<usize>,
}

fn split(pb: &Problem) -> Split {
    let mut trivial = 0;
    let mut candidates = Vec::new();
    for (i, v) in pb.vms.iter().enumerate() {
        if v.missing.is_empty() {
            trivial += usize::from(pb.now + v.assembly_secs <= v.deadline + 1e-3);
        } else if pb
            .alone_secs(v)
            .is_some_and(|t| pb.now + t <= v.transfer_deadline + 1e-6)
        {
            // A VM that cannot make it even with the network to itself is out (y_v = 0): a
            // valid cut that tightens the relaxation.
            candidates.push(i);
        }
    }
    Split {
        trivial,
        candidates,
    }
}

enum Mode {
    Relax,
    Integer,
    Feasible,
}

/// Builds and solves the LP over `which`. Relax: returns Σ y*. Feasible: y = 1 for all of
/// `which`; returns `Some(0)` if feasible, `None` if not.
fn solve(
    pb: &Problem,
    which: &[usize],
    mode: Mode,
) -> Result<(Option<f64>, usize, usize), PlanError> {
    let mut cuts: Vec<f64> = std::iter::once(pb.now)
        .chain(which.iter().map(|&v| pb.vms[v].transfer_deadline))
        .collect();
    cuts.sort_by(f64::total_cmp);
    cuts.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    let k_of = |t: f64| cuts[1..].iter().take_while(|&&c| c <= t + 1e-9).count();
    let intervals = cuts.len() - 1;
    let n = pb.n_sites;
    // Latest interval in which part p at site d is still useful to someone in `which`.
    let mut k_max: HashMap<(usize, usize), usize> = HashMap::new();
    for &v in which {
        let vm = &pb.vms[v];
        for &p in &vm.missing {
            let e = k_max.entry((p, vm.site)).or_default();
            *e = (*e).max(k_of(vm.transfer_deadline));
        }
    }
    let mut vars = ProblemVariables::new();
    let mut x: HashMap<(usize, usize, usize), Vec<(usize, Variable)>> = HashMap::new();
    let mut link_rows: HashMap<(usize, usize, usize), Expression> = HashMap::new();
    let mut egress_rows: HashMap<(usize, usize), Expression> = HashMap::new();
    let mut ingress_rows: HashMap<(usize, usize), Expression> = HashMap::new();
    let mut keys: Vec<_> = k_max.iter().map(|(&k, &v)| (k, v)).collect();
    keys.sort_unstable();
    let mut n_vars = 0;
    for ((p, d), km) in keys {
        for s in pb.sources(p, d) {
            for k in 0..km {
                let var = vars.add(variable().min(0.0));
                n_vars += 1;
                x.entry((p, s, d)).or_default().push((k, var));
                link_rows.entry((s, d, k)).or_default().add_mul(1.0, var);
                egress_rows.entry((s, k)).or_default().add_mul(1.0, var);
                ingress_rows.entry((d, k)).or_default().add_mul(1.0, var);
            }
        }
    }
    let ys: Vec<Variable> = match mode {
        Mode::Relax => which
            .iter()
            .map(|_| vars.add(variable().min(0.0).max(1.0)))
            .collect(),
        Mode::Integer => which
            .iter()
            .map(|_| vars.add(variable().binary()))
            .collect(),
        Mode::Feasible => Vec::new(),
    };
    let objective: Expression = ys.iter().copied().sum();
    let mut model = vars.maximise(objective).using(microlp);
    let dt = |k: usize| cuts[k + 1] - cuts[k];
    let mut rows: Vec<_> = link_rows.into_iter().collect();
    rows.sort_by_key(|r| r.0);
    for ((s, d, k), e) in rows {
        model = model.with(e.leq(pb.link[s * n + d] * dt(k) * SCALE));
    }
    let mut rows: Vec<_> = egress_rows.into_iter().collect();
    rows.sort_by_key(|r| r.0);
    for ((s, k), e) in rows {
        model = model.with(e.leq(pb.egress[s] * dt(k) * SCALE));
    }
    let mut rows: Vec<_> = ingress_rows.into_iter().collect();
    rows.sort_by_key(|r| r.0);
    for ((d, k), e) in rows {
        model = model.with(e.leq(pb.ingress[d] * dt(k) * SCALE));
    }
    for (i, &v) in which.iter().enumerate() {
        let vm = &pb.vms[v];
        let kv = k_of(vm.transfer_deadline);
        for &p in &vm.missing {
            let mut got = Expression::from(0.0);
            for s in pb.sources(p, vm.site) {
                for &(k, var) in x.get(&(p, s, vm.site)).map(Vec::as_slice).unwrap_or(&[]) {
                    if k < kv {
                        got.add_mul(1.0, var);
                    }
                }
            }
            let need = pb.need[&(p, vm.site)] * SCALE;
            model = match mode {
                Mode::Relax | Mode::Integer => model.with(got.geq(need * ys[i])),
                Mode::Feasible => model.with(got.geq(need)),
            };
        }
    }
    match model.solve() {
        Ok(sol) => {
            let val = ys.iter().map(|&y| sol.value(y)).sum::<f64>();
            Ok((Some(val), n_vars, intervals))
        }
        Err(ResolutionError::Infeasible) => Ok((None, n_vars, intervals)),
        Err(e) => Err(PlanError::Solver(e.to_string())),
    }
}

/// LP upper bound on how many VMs of the scenario can be ready by their deadlines.
pub fn lp_bound(sc: &Scenario) -> Result<Bound, PlanError> {
    let pb = Problem::compile(sc)?;
    let sp = split(&pb);
    if sp.candidates.is_empty() {
        return Ok(Bound {
            max_met: sp.trivial as f64,
            lp_value: sp.trivial as f64,
            trivially_met: sp.trivial,
            variables: 0,
            intervals: 0,
        });
    }
    let (val, variables, intervals) = solve(&pb, &sp.candidates, Mode::Relax)?;
    let val = val.ok_or_else(|| PlanError::Solver("relaxation reported infeasible".into()))?;
    let lp_value = val + sp.trivial as f64;
    Ok(Bound {
        max_met: (lp_value + 1e-6).floor(),
        lp_value,
        trivially_met: sp.trivial,
        variables,
        intervals,
    })
}

/// Largest number of VMs that can all be ready in time (exact in the fluid model), by trying
/// subsets from the largest down. Refuses more than `max_candidates` candidate VMs.
pub fn exact_optimum(sc: &Scenario, max_candidates: usize) -> Result<usize, PlanError> {
    let pb = Problem::compile(sc)?;
    let sp = split(&pb);
    let n = sp.candidates.len();
    if n > max_candidates || n > 20 {
        return Err(PlanError::TooLarge(format!(
            "{n} candidate VMs for brute force"
        )));
    }
    let mut masks: Vec<u32> = (0..(1u32 << n)).collect();
    masks.sort_by_key(|m| std::cmp::Reverse(m.count_ones()));
    let mut best: Option<u32> = None;
    for m in masks {
        if let Some(b) = best
            && m.count_ones() < b
        {
            break;
        }
        let set: Vec<usize> = (0..n)
            .filter(|i| m & (1 << i) != 0)
            .map(|i| sp.candidates[i])
            .collect();
        let feasible = set.is_empty() || solve(&pb, &set, Mode::Feasible)?.0.is_some();
        if feasible {
            best = Some(m.count_ones());
            break;
        }
    }
    Ok(sp.trivial + best.unwrap_or(0) as usize)
}

/// Exact fluid optimum as a MILP (binary `y`), solved by microlp's branch and bound. Exact
/// like [`exact_optimum`] but usable on larger instances when the solver copes.
pub fn milp_optimum(sc: &Scenario) -> Result<usize, PlanError> {
    let pb = Problem::compile(sc)?;
    let sp = split(&pb);
    if sp.candidates.is_empty() {
        return Ok(sp.trivial);
    }
    let (val, _, _) = solve(&pb, &sp.candidates, Mode::Integer)?;
    let val = val.ok_or_else(|| PlanError::Solver("MILP reported infeasible".into()))?;
    Ok(sp.trivial + (val + 1e-6).floor() as usize)
}
