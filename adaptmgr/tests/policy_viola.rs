//! Viola's own policy: deterministic, capacity-respecting, and it does not move a VM back and
//! forth.

use viola_adaptmgr::policy::{ActionKind, ObservedState, Policy, viola::Viola};
use viola_adaptmgr::sim::synthetic_state;

fn apply(st: &mut ObservedState, actions: &[viola_adaptmgr::policy::Action]) {
    for a in actions {
        if let ActionKind::Migrate { vm, from, to } = a.kind {
            st.hosts[from].vms.retain(|&v| v != vm);
            st.hosts[to].vms.push(vm);
            st.vms[vm].host = Some(to);
        }
    }
}

#[test]
fn decisions_are_deterministic_and_destinations_keep_headroom() {
    let st = synthetic_state(200, 2000, 7);
    let a = Viola::default().decide(&st);
    let b = Viola::default().decide(&st);
    assert_eq!(a, b);
    assert!(!a.actions.is_empty());
    let mut after = st.clone();
    apply(&mut after, &a.actions);
    for act in &a.actions {
        let ActionKind::Migrate { to, .. } = act.kind else {
            continue;
        };
        let h = &after.hosts[to];
        let demand: f64 = h.vms.iter().map(|&v| after.vms[v].requested_mips).sum();
        assert!(
            demand <= 0.8 * h.total_mips() + 1e-6,
            "{} at {demand} of {}",
            h.name,
            h.total_mips()
        );
        assert!(!act.reason.is_empty());
    }
}

#[test]
fn a_moved_vm_is_not_moved_again_within_the_cooldown() {
    let mut st = synthetic_state(200, 2000, 11);
    let mut p = Viola::default();
    let first = p.decide(&st);
    apply(&mut st, &first.actions);
    let moved: Vec<usize> = first
        .actions
        .iter()
        .filter_map(|a| match a.kind {
            ActionKind::Migrate { vm, .. } => Some(vm),
            _ => None,
        })
        .collect();
    st.time_s += st.interval_s;
    let second = p.decide(&st);
    for a in &second.actions {
        if let ActionKind::Migrate { vm, .. } = a.kind {
            // Only an overloaded host may send a recently moved VM on.
            assert!(
                !moved.contains(&vm) || a.reason.contains("overloaded"),
                "VM {vm} moved twice: {}",
                a.reason
            );
        }
    }
}
