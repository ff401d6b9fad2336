//! Marinescu & Schmid, section 5: the two memory scenarios.

use viola_adaptmgr::policy::marinescu::{
    Cluster, KbfsParams, Resource, Step, Symptoms, algorithm_a, algorithm_b, bottleneck,
};

#[test]
fn the_rules_name_memory_when_the_slo_breaks_while_swapping() {
    // (CPU utilization, memory utilization, swapping, the bottleneck while the SLO is broken)
    let cases = [
        (0.3, 0.97, true, Resource::Memory),
        (0.98, 0.5, false, Resource::Cpu),
    ];
    for (cpu_utilization, memory_utilization, swapping, resource) in cases {
        let s = Symptoms {
            slo_violated: true,
            cpu_utilization,
            memory_utilization,
            swapping,
        };
        assert_eq!(bottleneck(&s), Some(resource), "{s:?}");
        // Nothing to name while the SLO holds.
        let met = Symptoms {
            slo_violated: false,
            ..s
        };
        assert_eq!(bottleneck(&met), None, "{met:?}");
    }
}

#[test]
fn scenario_1_both_algorithms_move_vm1_to_host2() {
    // Host 1: 500 MB, Host 2: 1000 MB; VM 1 uses 300 MB on Host 1, VM 2 400 MB on Host 2;
    // VM 1 asks for 300 MB more.
    let c = Cluster {
        capacity: vec![500.0, 1000.0],
        size: vec![300.0, 400.0],
        host_of: vec![0, 1],
    };
    let expected = Step::Migrate {
        vm: 0,
        from: 0,
        to: 1,
    };
    let a = algorithm_a(&c, 0, 300.0).expect("A finds a solution");
    assert_eq!(a[0], expected);
    let b = algorithm_b(&c, 0, 300.0, KbfsParams::default()).expect("B finds a solution");
    assert_eq!(b[0], expected);
    assert_eq!(
        b.iter()
            .filter(|s| matches!(s, Step::Migrate { .. }))
            .count(),
        1
    );
}

#[test]
fn scenario_2_a_finds_nothing_and_b_moves_vm2_to_host3_then_vm1_to_host2() {
    // Hosts of 500, 600 and 1100 MB; VMs of 300, 400 and 600 MB; VM 1 asks for 300 MB more.
    let c = Cluster {
        capacity: vec![500.0, 600.0, 1100.0],
        size: vec![300.0, 400.0, 600.0],
        host_of: vec![0, 1, 2],
    };
    assert_eq!(algorithm_a(&c, 0, 300.0), None);
    let b = algorithm_b(&c, 0, 300.0, KbfsParams::default()).expect("B finds a solution");
    let moves: Vec<&Step> = b
        .iter()
        .filter(|s| matches!(s, Step::Migrate { .. }))
        .collect();
    assert_eq!(
        moves,
        vec![
            &Step::Migrate {
                vm: 1,
                from: 1,
                to: 2
            },
            &Step::Migrate {
                vm: 0,
                from: 0,
                to: 1
            }
        ]
    );
}
