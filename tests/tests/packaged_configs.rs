//! The example configurations the packages install under `/etc/viola/` (`packaging/etc/`)
//! are read by each daemon's own configuration type, unknown keys refused, and pass the checks
//! the daemon makes at start, so an administrator's copy starts the daemon once its addresses
//! are edited. No lab.

use std::path::PathBuf;

use viola_adaptmgr::manager::ManagerConfig;
use viola_depot::daemon::DepotConfig;
use viola_labtests::repo_root;
use viola_monitor::daemon::MonitorConfig;
use viola_overlay::config::OverlayConfig;

fn example(name: &str) -> (PathBuf, String) {
    let path = repo_root().join("packaging/etc").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, text)
}

fn parse<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let (path, text) = example(name);
    viola_common::config::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_example_configuration_is_read_by_its_daemon() {
    let overlay: OverlayConfig = parse("overlay.toml");
    assert!(!overlay.peers.is_empty(), "the overlay example lists peers");
    assert_eq!(overlay.identity_dir, PathBuf::from("/etc/viola/overlay"));

    let depot: DepotConfig = parse("depot.toml");
    assert!(depot.image_dir_template.contains("{host}"));
    assert_eq!(depot.identity_dir, PathBuf::from("/etc/viola/depot"));

    let monitor: MonitorConfig = parse("monitor.toml");
    assert!(!monitor.host.is_empty() && !monitor.site.is_empty());
    assert_eq!(monitor.identity_dir, PathBuf::from("/etc/viola/monitor"));

    let manager: ManagerConfig = parse("adaptmgr.toml");
    viola_adaptmgr::tenants::check_tenants(&manager.tenants).expect("[[tenants]]");
    manager.vm_template.check().expect("[vm_template]");
    assert!(manager.dashboard_listen.is_some());
    assert!(manager.hosts.iter().all(|h| h.overlay_addr.is_some()));
    assert_eq!(manager.identity_dir, PathBuf::from("/etc/viola/adaptmgr"));
}

#[test]
fn an_unknown_key_in_an_example_is_refused() {
    let (_, text) = example("monitor.toml");
    let typo = format!("{text}\nintervall_ms = 5\n");
    assert!(viola_common::config::parse::<MonitorConfig>(&typo).is_err());
}
