//! The Grafana dashboard shipped in `docs/grafana/viola.json` asks only for metrics the
//! daemons register (a renamed metric would leave a panel silently empty), and every daemon's
//! metric families appear on it. No lab: it reads the dashboard and the daemons' sources.

use std::collections::BTreeSet;
use std::path::Path;

use viola_labtests::repo_root;

/// The `viola_…` names registered with a Prometheus registry in the daemons' sources.
fn registered(root: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut stack: Vec<_> = ["adaptmgr/src", "monitor/src", "overlay/src", "depot/src"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                // `registry.register(\n "viola_x",` : the name is the next string literal.
                for (i, _) in text.match_indices(".register(") {
                    let rest = &text[i..];
                    if let Some(start) = rest.find('"') {
                        let name: String = rest[start + 1..]
                            .chars()
                            .take_while(|c| *c != '"')
                            .collect();
                        if name.starts_with("viola_") && !name.starts_with("viola_test") {
                            names.insert(name);
                        }
                    }
                }
            }
        }
    }
    names
}

#[test]
fn every_panel_asks_for_a_registered_metric_and_every_daemon_has_panels() {
    let root = repo_root();
    let registered = registered(&root);
    assert!(
        registered.len() >= 20,
        "found only {} metric registrations: {registered:?}",
        registered.len()
    );
    let path = root.join("docs/grafana/viola.json");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut asked = BTreeSet::new();
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("viola_").map(|_| word) {
                    // Counters are exported with `_total`.
                    let family = name.strip_suffix("_total").unwrap_or(name);
                    assert!(
                        registered.contains(family),
                        "panel {} asks for {name}, which no daemon registers",
                        p["title"]
                    );
                    asked.insert(family.to_owned());
                }
            }
        }
    }
    for daemon in [
        "viola_adaptmgr_",
        "viola_monitor_",
        "viola_overlay_",
        "viola_depot_",
    ] {
        assert!(
            asked.iter().any(|n| n.starts_with(daemon)),
            "no panel for {daemon}*"
        );
    }
    let missing: Vec<_> = registered.difference(&asked).collect();
    assert!(missing.is_empty(), "metrics without a panel: {missing:?}");
}
