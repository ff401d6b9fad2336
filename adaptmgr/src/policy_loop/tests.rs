//! The policy loop over a fake federation: monitor reports in, the manager's inventory, the
//! loop's decisions, migrations on fake hypervisors; and the same trace through the simulator.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use viola_hypervisor::Hypervisor;
use viola_hypervisor::fake::Faults;

use super::*;
use crate::fixtures::Federation;
use crate::manager::ManagerConfig;
use crate::sim::{HostSpec, SimConfig, Simulator, VmSpec};

fn policy(mode: PolicyMode) -> PolicyConfig {
    PolicyConfig {
        mode,
        period_s: 0.2,
        ..PolicyConfig::default()
    }
}

fn new_loop(f: &Federation) -> PolicyLoop {
    PolicyLoop::new(
        f.manager.cfg.policy.clone(),
        &f.manager.inventory,
        Arc::new(PolicyMetrics::default()),
    )
    .unwrap()
}

/// a1 runs vm1 and vm2 flat out (2 of its 2 CPUs), a2 runs vm3 lightly, b1 at the other site
/// runs nothing.
fn overloaded_a1(mode: PolicyMode) -> Federation {
    Federation::new(
        &[("a1", "a"), ("a2", "a"), ("b1", "b")],
        &[("vm1", "a1"), ("vm2", "a1"), ("vm3", "a2")],
        policy(mode),
    )
}

fn a1_busy(vm: &str) -> f64 {
    if vm == "vm3" { 0.1 } else { 1.0 }
}

/// [`overloaded_a1`] once its monitors reported it busy ([`a1_busy`]).
async fn reported_overloaded_a1(mode: PolicyMode) -> Federation {
    let mut f = overloaded_a1(mode);
    f.report(&a1_busy).await;
    f
}

/// The decision of one period of `lp` over `f`, now (there must be one).
async fn decide(lp: &PolicyLoop, f: &Federation, token: &CancellationToken) -> DecisionRecord {
    lp.tick(&f.manager, now_ms(), token)
        .await
        .unwrap()
        .expect("a decision")
}

/// What a decision said about one action: (action, vm, from, to, reason).
type Said = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
);

/// Every action of a decision, in order.
fn actions(d: &DecisionRecord) -> Vec<Said> {
    d.actions
        .iter()
        .map(|a| {
            (
                a.action.clone(),
                a.vm.clone(),
                a.from.clone(),
                a.to.clone(),
                a.reason.clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn act_mode_moves_a_vm_off_an_overloaded_host_within_two_periods() {
    let f = reported_overloaded_a1(PolicyMode::Act).await;
    let token = CancellationToken::new();
    let looping = tokio::spawn(new_loop(&f).run(Arc::clone(&f.manager), token.clone()));
    let period = Duration::from_secs_f64(f.manager.cfg.policy.period_s);
    let started = tokio::time::Instant::now();
    while f.running("vm1") == ["fake://a1"] && f.running("vm2") == ["fake://a1"] {
        assert!(
            started.elapsed() < 2 * period + Duration::from_millis(300),
            "nothing moved within two periods"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    token.cancel();
    looping.await.unwrap();
    assert_eq!(
        f.running("vm1"),
        ["fake://a2"],
        "the smallest-first candidate moves in-site"
    );
    assert_eq!(f.manager.inventory.vm("vm1").unwrap().unwrap().host, "a2");
    let d = &f.decisions()[0];
    assert_eq!(d.mode, PolicyMode::Act);
    assert_eq!(d.state.hosts_overloaded, 1);
    assert_eq!(d.actions.len(), 1);
    assert!(
        matches!(d.actions[0].outcome, ActionOutcome::Done { .. }),
        "{:?}",
        d.actions[0]
    );
    // Both figures the policy judged: the demand now and its estimate from recent use.
    let reason = &d.actions[0].reason;
    assert!(
        reason.contains("a1 overloaded: demand 2000 / 2000 MIPS now, ")
            && reason.contains(" estimated from its VMs' recent use"),
        "{reason}"
    );
}

#[tokio::test]
async fn advise_mode_records_the_same_decision_and_changes_nothing() {
    let token = CancellationToken::new();
    let advised = reported_overloaded_a1(PolicyMode::Advise).await;
    let d = decide(&new_loop(&advised), &advised, &token).await;
    assert_eq!(d.actions[0].outcome, ActionOutcome::Advised);
    assert_eq!(advised.running("vm1"), ["fake://a1"]);
    assert_eq!(advised.running("vm2"), ["fake://a1"]);
    assert_eq!(advised.decisions(), vec![d.clone()]);

    let acted = reported_overloaded_a1(PolicyMode::Act).await;
    let done = decide(&new_loop(&acted), &acted, &token).await;
    assert_eq!(actions(&done), actions(&d), "advise and act decide alike");
    assert_eq!(acted.running("vm1"), ["fake://a2"]);
}

#[tokio::test]
async fn a_vm_in_its_cool_down_is_not_chosen() {
    let token = CancellationToken::new();
    let mut f = reported_overloaded_a1(PolicyMode::Act).await;
    let lp = new_loop(&f);
    let first = decide(&lp, &f, &token).await;
    assert_eq!(first.actions[0].vm.as_deref(), Some("vm1"));
    assert_eq!(f.running("vm1"), ["fake://a2"]);
    // Now a2 is overloaded by vm1 and vm3; vm1 just moved, so vm3 must go (to b1: a1 has no
    // room below the target with vm2 busy).
    f.report(&|_| 1.0).await;
    let second = decide(&lp, &f, &token).await;
    assert_eq!(second.state.vms_held, 1);
    assert!(
        second
            .actions
            .iter()
            .all(|a| a.vm.as_deref() != Some("vm1")),
        "{:?}",
        second.actions
    );
    assert_eq!(second.actions[0].vm.as_deref(), Some("vm3"));
    assert_eq!(f.running("vm1"), ["fake://a2"]);
    // A restarted loop remembers the cool-down from the decision log.
    let restarted = new_loop(&f);
    let held: Vec<String> = restarted
        .core()
        .memory
        .cooling_down(now_ms(), &f.manager.cfg.policy)
        .cloned()
        .collect();
    assert!(held.contains(&"vm1".to_owned()), "{held:?}");
}

#[tokio::test]
async fn a_failed_move_is_recorded_and_its_destination_avoided() {
    let token = CancellationToken::new();
    let mut f = reported_overloaded_a1(PolicyMode::Act).await;
    f.cluster.set_faults(Faults {
        refuse_migration: Some("out of memory at the destination".into()),
        ..Faults::default()
    });
    let lp = new_loop(&f);
    let first = decide(&lp, &f, &token).await;
    let outcome = &first.actions[0].outcome;
    assert!(
        matches!(
            outcome,
            ActionOutcome::RolledBack { .. } | ActionOutcome::Failed { .. }
        ),
        "{outcome:?}"
    );
    assert_eq!(f.running("vm1"), ["fake://a1"]);
    assert_eq!(f.decisions()[0].actions[0].outcome, *outcome, "persisted");
    // The next period the policy asks again; a2 is avoided.
    f.cluster.set_faults(Faults::default());
    f.report(&a1_busy).await;
    let second = decide(&lp, &f, &token).await;
    let to_a2: Vec<_> = second
        .actions
        .iter()
        .filter(|a| a.to.as_deref() == Some("a2"))
        .collect();
    assert!(!to_a2.is_empty());
    for a in to_a2 {
        assert!(
            matches!(&a.outcome, ActionOutcome::Skipped { reason } if reason.contains("failed recently")),
            "{a:?}"
        );
    }
    assert_eq!(f.running("vm1"), ["fake://a1"]);
}

/// Always says the same thing.
struct Scripted(Vec<policy::Action>);

impl Policy for Scripted {
    fn name(&self) -> String {
        "scripted".into()
    }
    fn decide(&mut self, _: &ObservedState) -> policy::Decision {
        policy::Decision {
            actions: self.0.clone(),
        }
    }
}

/// Hosts h0..h2 of 1 GiB; v0 fills h0, v1 fills h1, v2 (small) on h2.
fn full_hosts() -> ObservedState {
    let mut st = crate::sim::synthetic_state(3, 3, 1);
    for (i, h) in st.hosts.iter_mut().enumerate() {
        h.name = format!("h{i}");
        h.ram_mb = 1024.0;
        h.vms = vec![i];
    }
    for (i, v) in st.vms.iter_mut().enumerate() {
        v.name = format!("v{i}");
        v.host = Some(i);
        v.ram_mb = if i == 2 { 128.0 } else { 1024.0 };
        v.ram_reserved_mb = v.ram_mb;
    }
    st
}

#[test]
fn a_swap_of_full_hosts_is_ordered_safely_and_unsupported_actions_are_skipped() {
    let actions = vec![
        policy::Action::migrate(0, 0, 1, "swap"),
        policy::Action::migrate(1, 1, 0, "swap"),
        policy::Action {
            kind: ActionKind::Resize {
                vm: 2,
                cpu_mips: Some(1500.0),
                ram_mb: None,
            },
            reason: "grow".into(),
        },
        policy::Action {
            kind: ActionKind::PowerOff { host: 2 },
            reason: "idle".into(),
        },
    ];
    let cfg = PolicyConfig {
        mode: PolicyMode::Act,
        max_parallel: 1,
        ..PolicyConfig::default()
    };
    let mut core = LoopCore::with_policy(cfg, Box::new(Scripted(actions)));
    let plan = core.plan(&full_hosts(), 1000);
    let r = &plan.record;
    // Neither host has room for the other's VM while it still holds its own: neither move can
    // start; h2 has no room for a 1 GiB VM either, so the planner would need stop-and-copy.
    assert!(
        matches!(&r.actions[0].outcome, ActionOutcome::Skipped { reason } if reason.contains("stop-and-copy")),
        "{:?}",
        r.actions[0]
    );
    assert_eq!(r.actions[2].outcome, ActionOutcome::Pending);
    assert_eq!(r.actions[2].detail.as_deref(), Some("cap 150 %"));
    assert!(matches!(
        r.actions[3].outcome,
        ActionOutcome::Skipped { .. }
    ));
    assert_eq!(plan.steps.len(), 1, "only the resize: {:?}", plan.steps);

    // With room on h2 (its VM is small and h2 grows), the swap goes through a temporary move.
    let mut st = full_hosts();
    st.hosts[2].ram_mb = 2048.0;
    let plan = core.plan(&st, 2000);
    let stages: Vec<(usize, String, String)> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Migrate { stage, req, .. } => Some((*stage, req.vm.clone(), req.to_host.clone())),
            Step::Resize { .. } => None,
        })
        .collect();
    assert_eq!(
        stages,
        vec![
            (0, "v1".into(), "h2".into()),
            (1, "v0".into(), "h1".into()),
            (2, "v1".into(), "h0".into()),
        ]
    );
    let temporary = plan.record.actions.last().unwrap();
    assert!(temporary.reason.contains("temporary"), "{temporary:?}");
    assert_eq!(plan.record.actions[0].stage, Some(1));
    assert_eq!(plan.record.actions[1].stage, Some(2));
}

#[test]
fn the_policy_table_is_strict_and_names_are_the_simulators() {
    let cfg: ManagerConfig = viola_common::config::parse(
        "[policy]\nname = \"thr-mmt-0.8\"\nmode = \"act\"\nperiod_s = 30\n",
    )
    .unwrap();
    assert_eq!(cfg.policy.mode, PolicyMode::Act);
    assert_eq!(cfg.policy.build().unwrap().name(), "thr-mmt-0.8");
    assert_eq!(ManagerConfig::default().policy.name, "viola");
    assert_eq!(ManagerConfig::default().policy.mode, PolicyMode::Advise);
    let err = viola_common::config::parse::<ManagerConfig>("[policy]\nperiod = 30\n").unwrap_err();
    assert!(err.to_string().contains("period"), "{err}");
    let err =
        viola_common::config::parse::<ManagerConfig>("[policy.viola]\ntarget_x = 1\n").unwrap_err();
    assert!(err.to_string().contains("target_x"), "{err}");
    for name in policy::POLICY_NAMES {
        let cfg = PolicyConfig {
            name: (*name).into(),
            ..PolicyConfig::default()
        };
        assert_eq!(cfg.build().unwrap().name(), *name);
    }
    let bad = PolicyConfig {
        name: "nope".into(),
        ..PolicyConfig::default()
    };
    assert!(matches!(bad.build(), Err(PolicyConfigError::Name(_))));
    let view = PolicyConfig::default().view();
    assert_eq!(view.policy, "viola");
    assert!(view.parameters.get("viola").is_some());
    assert!(view.parameters.get("name").is_none());
}

/// The parity test: one recorded trace of CPU use (one value per VM per period, multiples of
/// 1/64 so that every path computes it exactly), fed (a) as monitor reports into the manager's
/// inventory and through the live loop in advise mode over fake hypervisors, and (b) to the
/// simulator in advise mode from the same placement, gives the same decisions, action by
/// action, with the same reasons.
#[tokio::test]
#[allow(clippy::needless_range_loop)] // periods index the trace's columns
async fn live_and_simulated_decisions_are_identical_on_a_recorded_trace() {
    const PERIOD_MS: u64 = 60_000;
    const STEPS: usize = 16;
    let hosts = [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")];
    let vms: Vec<(String, &str)> = (0..8).map(|i| (format!("vm{i}"), hosts[i / 2].0)).collect();
    // PlanetLab-like: a quiet base with noise; a1's pair spikes together (overload), b2's pair
    // stays light (a host worth emptying).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 9) as f64
    };
    let trace: Vec<Vec<f64>> = (0..8)
        .map(|v| {
            (0..STEPS)
                .map(|k| {
                    let base = match v {
                        0 | 1 if (4..9).contains(&k) => 62.0,
                        6 | 7 => 4.0,
                        _ => 20.0,
                    };
                    (base + noise()).min(64.0) / 64.0
                })
                .collect()
        })
        .collect();

    // (b) The simulator.
    let sim_cfg = SimConfig {
        interval_s: PERIOD_MS as f64 / 1000.0,
        steps: STEPS,
        sites: ["a", "b"]
            .iter()
            .map(|s| policy::SiteObs {
                name: (*s).into(),
                wan_mbps: 100.0,
            })
            .collect(),
        hosts: hosts
            .iter()
            .map(|(h, site)| HostSpec {
                name: (*h).into(),
                site: usize::from(*site == "b"),
                pes: 2,
                pe_mips: 1000.0,
                ram_mb: 4096.0,
                bw_mbps: 1000.0,
                power: policy::PowerModel::hp_ml110_g5(),
            })
            .collect(),
        vms: vms
            .iter()
            .enumerate()
            .map(|(i, (name, _))| VmSpec {
                name: name.clone(),
                mips: 1000.0,
                ram_mb: 512.0,
                bw_mbps: 0.0,
                trace: trace[i].clone(),
                violin: None,
            })
            .collect(),
        record_trace: true,
        time_offset_s: 0.0,
        remove_idle_vms: false,
        placement: Some((0..8).map(|i| i / 2).collect()),
        apply_actions: false,
    };
    let mut sim_policy = PolicyConfig::default().build().unwrap();
    let (_, sim_trace) = Simulator::new(sim_cfg).run(sim_policy.as_mut());
    type Seen = (
        u64,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        String,
    );
    let simulated: Vec<Seen> = sim_trace
        .into_iter()
        .map(|r| {
            (
                (r.time_s * 1000.0) as u64 / PERIOD_MS,
                r.action,
                r.vm,
                r.from,
                r.to,
                r.reason,
            )
        })
        .collect();

    // (a) Live: the hosts' monitors report once through the front door (the hosts come up and
    // the VMs are learnt), then one report per period at recorded times.
    let vm_refs: Vec<(&str, &str)> = vms.iter().map(|(v, h)| (v.as_str(), *h)).collect();
    let mut f = Federation::new(
        &hosts,
        &vm_refs,
        PolicyConfig {
            period_s: PERIOD_MS as f64 / 1000.0,
            ..PolicyConfig::default()
        },
    );
    f.report(&|_| 0.0).await;
    // Far enough ahead that the front-door report is out of every history window.
    let t0 = now_ms() + 100 * PERIOD_MS;
    let lp = new_loop(&f);
    let token = CancellationToken::new();
    for k in 1..STEPS {
        let at = t0 + k as u64 * PERIOD_MS;
        let index = |vm: &str| vm[2..].parse::<usize>().unwrap();
        for r in f.reports(&|vm| trace[index(vm)][k]) {
            assert!(f.manager.inventory.apply_report(&r, at).unwrap());
        }
        lp.tick(&f.manager, at, &token).await.unwrap();
    }
    let live: Vec<Seen> = f
        .decisions()
        .into_iter()
        .flat_map(|d| {
            let k = (d.ts_ms - t0) / PERIOD_MS;
            actions(&d)
                .into_iter()
                .map(move |(a, vm, from, to, reason)| (k, a, vm, from, to, reason))
        })
        .collect();
    assert!(
        simulated.iter().any(|s| s.5.contains("overloaded")),
        "the trace overloads a host: {simulated:?}"
    );
    assert!(
        simulated.iter().any(|s| s.5.contains("underloaded")),
        "the trace leaves a host worth emptying: {simulated:?}"
    );
    assert_eq!(live, simulated);
    // Nothing moved: advise mode.
    for (vm, host) in &vm_refs {
        assert_eq!(f.running(vm), [format!("fake://{host}")]);
    }
}

/// A VM at its cap gets a higher one in act mode, through the manager's resize (the libvirt
/// cap changes and the inventory records it); quiet again, it gets its own cap back.
#[tokio::test]
async fn act_mode_raises_the_cap_of_a_vm_at_its_cap_and_lowers_it_when_quiet() {
    let token = CancellationToken::new();
    let mut cfg = policy(PolicyMode::Act);
    cfg.vertical.cooldown_s = 0.0;
    cfg.vertical.quiet_periods = 2;
    let mut f = Federation::new(&[("a1", "a"), ("a2", "a")], &[("vm1", "a1")], cfg);
    let period = Duration::from_secs_f64(f.manager.cfg.policy.period_s);
    let cap_of = |f: &Federation| {
        let tuning = f.cluster.host("fake://a1").cpu_tuning("vm1").unwrap();
        let recorded = f.manager.inventory.vm("vm1").unwrap().unwrap().cap_percent;
        (
            tuning.cap.map(|c| c.quota_us * 100 / c.period_us as i64),
            recorded,
        )
    };
    // The manager learns of vm1 from a1's monitor.
    f.report(&|_| 0.01).await;
    f.manager
        .resize(VmResize {
            vm: "vm1".into(),
            vcpus: None,
            memory_mib: None,
            cap_percent: Some(50),
            shares: None,
        })
        .await
        .unwrap();
    assert_eq!(cap_of(&f), (Some(50), Some(50)));
    let lp = new_loop(&f);
    // The first period sees the cap the user set and judges it only after a period under it.
    assert!(
        lp.tick(&f.manager, now_ms(), &token)
            .await
            .unwrap()
            .is_none()
    );
    // At its cap (half a CPU) for a period: raised to a whole one.
    tokio::time::sleep(period + Duration::from_millis(50)).await;
    f.report(&|_| 0.5).await;
    let raised = decide(&lp, &f, &token).await;
    let said = actions(&raised);
    assert_eq!(said.len(), 1, "{said:?}");
    assert_eq!(said[0].0, "resize");
    assert!(said[0].4.contains("at its cap"), "{said:?}");
    assert_eq!(raised.actions[0].outcome, ActionOutcome::DONE);
    assert_eq!(cap_of(&f), (Some(100), Some(100)));
    // Quiet for two periods: back to its own cap.
    for _ in 0..2 {
        tokio::time::sleep(period + Duration::from_millis(50)).await;
        f.report(&|_| 0.01).await;
    }
    let lowered = decide(&lp, &f, &token).await;
    assert!(
        actions(&lowered)[0].4.contains("lowered"),
        "{:?}",
        actions(&lowered)
    );
    assert_eq!(cap_of(&f), (Some(50), Some(50)));
    // Nothing more to do.
    assert!(
        lp.tick(&f.manager, now_ms(), &token)
            .await
            .unwrap()
            .is_none()
    );
}
