//! Lab, end to end through the daemons: the manager's policy loop in `act` mode, a monitor on
//! a1, a guest on a1 capped at 30 % of a CPU by `viola vm resize`. The guest starts burning a
//! CPU: within two control periods the manager raises its cap (libvirt's CFS quota changes,
//! the decision log says why); when the burn stops, after the cool-down, the cap goes back to
//! 30 %. Nobody types a resize after the first. Restarted in `advise` mode, the manager records
//! the same raise for the same burn and changes nothing.

// lab: default

use std::time::{Duration, Instant};

use viola_labtests::federation::{Federation, managed_guest, vm_host};
use viola_labtests::mech::*;

const PERIOD_S: u64 = 5;
const COOLDOWN_S: u64 = 10;
const BURN_S: u64 = 30;

/// The resize actions the decision log holds for `vm`: (reason, outcome).
fn resizes(fed: &Federation, vm: &str) -> Vec<(String, String)> {
    fed.actions_of("")
        .into_iter()
        .filter(|a| a["action"] == "resize" && a["vm"] == vm)
        .map(|a| {
            (
                a["reason"].as_str().unwrap_or_default().to_owned(),
                a["outcome"].to_string(),
            )
        })
        .collect()
}

#[test]
fn a_guest_at_its_cpu_cap_gets_a_higher_one_and_its_own_back_when_quiet() {
    let name = "vm-vert";
    let mut g = managed_guest(
        "a1",
        "a",
        name,
        "10.77.9",
        &format!(
            "[policy]\nmode = \"act\"\nperiod_s = {PERIOD_S}\n\
             [policy.vertical]\ncooldown_s = {COOLDOWN_S}\nquiet_periods = 2\n"
        ),
    );
    let ip = g.ip.clone();
    let ip = ip.as_str();
    let (mgr, cli) = (g.fed.mgr.clone(), g.fed.cli_id.clone());
    g.fed.viola(&["vm", "resize", name, "--cap-percent", "30"]);
    assert_eq!(cap_percent("a1", name), Some(30));
    // A quiet period at the new cap first, so that the loop's history starts from it.
    std::thread::sleep(Duration::from_secs(PERIOD_S));
    assert_eq!(cap_percent("a1", name), Some(30), "raised while idle");

    assert_eq!(
        guest_http("a1", ip, &format!("burn=1,{BURN_S}")).as_deref(),
        Some("ok")
    );
    let burn_started = Instant::now();
    // Two periods, plus a monitor sample and a tick's work.
    wait_until(
        "the manager raises the cap",
        Duration::from_secs(2 * PERIOD_S + 5),
        || cap_percent("a1", name).is_some_and(|c| c > 30),
    );
    let reaction = burn_started.elapsed();
    let raised_to = cap_percent("a1", name);
    let said = resizes(&g.fed, name);
    let decision_to_action = g
        .fed
        .manager_metric("viola_adaptmgr_policy_decision_to_action_ms")
        .expect("the manager exports viola_adaptmgr_policy_decision_to_action_ms");
    eprintln!(
        "FIGURES adapt_vertical reaction_s={:.1} decision_to_action_ms={decision_to_action} \
         raised_to={raised_to:?} decisions={said:?}",
        reaction.as_secs_f64()
    );
    assert!(
        said.iter()
            .any(|(reason, outcome)| reason.contains("at its cap") && outcome.contains("done")),
        "no raise in the decision log: {said:?}"
    );

    // The burn ends; after two quiet periods and the cool-down the cap is 30 % again.
    let burn_ends = Duration::from_secs(BURN_S).saturating_sub(burn_started.elapsed());
    std::thread::sleep(burn_ends);
    let quiet_since = Instant::now();
    wait_until(
        "the manager lowers the cap back",
        Duration::from_secs(COOLDOWN_S + 3 * PERIOD_S + 10),
        || cap_percent("a1", name) == Some(30),
    );
    eprintln!(
        "FIGURES adapt_vertical lowered_after_s={:.1}",
        quiet_since.elapsed().as_secs_f64()
    );
    let said = resizes(&g.fed, name);
    assert!(
        said.iter()
            .any(|(reason, outcome)| reason.contains("lowered") && outcome.contains("done")),
        "no lowering in the decision log: {said:?}"
    );
    // The guest kept running on a1 throughout.
    assert_eq!(vm_host(&mgr, &cli, name).map(|(h, _)| h), Some("a1".into()));
    wait_guest("a1", ip, Duration::from_secs(30));

    // Advise mode: the manager restarted with `mode = "advise"` sees the same burn, records
    // the same raise as advised, and changes nothing.
    let fed = &mut g.fed;
    let cfg = std::fs::read_to_string(&fed.cfg).expect("the manager's configuration");
    std::fs::write(&fed.cfg, cfg.replace("mode = \"act\"", "mode = \"advise\"")).unwrap();
    fed.daemons
        .kill("manager", libc::SIGTERM)
        .expect("stop the manager");
    fed.start_manager();
    let advised = |said: &[(String, String)]| {
        said.iter()
            .filter(|(reason, outcome)| {
                reason.contains("at its cap") && outcome.contains("advised")
            })
            .count()
    };
    wait_until(
        "the restarted manager answers",
        Duration::from_secs(30),
        || vm_host(&mgr, &cli, name).is_some(),
    );
    std::thread::sleep(Duration::from_secs(PERIOD_S));
    assert_eq!(guest_http("a1", ip, "burn=1,15").as_deref(), Some("ok"));
    wait_until(
        "the advise-mode loop records a raise",
        Duration::from_secs(2 * PERIOD_S + 5),
        || advised(&resizes(&g.fed, name)) > 0,
    );
    assert_eq!(
        cap_percent("a1", name),
        Some(30),
        "advise mode changed the cap"
    );
}
