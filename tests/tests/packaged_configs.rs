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

#[test]
fn the_configurations_an_enrolment_bundle_installs_are_read_by_their_daemons() {
    use viola_common::enrol::{DepotPlan, HostPlan, make_bundle};
    use viola_common::identity::CertificateAuthority;
    let ca = CertificateAuthority::generate("test", 1).unwrap();
    let plan = HostPlan {
        site: "b".into(),
        host: "b1".into(),
        manager: "192.0.2.10:7443".parse().unwrap(),
        peers: vec!["192.0.2.11:4500".parse().unwrap()],
        overlay_listen: "0.0.0.0:4500".parse().unwrap(),
        depot: Some(DepotPlan {
            hosts: vec!["b1".into(), "b2".into()],
            peers: vec![("a".into(), "192.0.2.11:7410".parse().unwrap())],
        }),
        libvirt: None,
        manager_identity: None,
    };
    let dir = tempfile::tempdir().unwrap();
    make_bundle(&ca, &plan, None, 30)
        .unwrap()
        .install(dir.path(), None, false)
        .unwrap();
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    let overlay: OverlayConfig = viola_common::config::parse(&read("overlay.toml")).unwrap();
    assert_eq!(overlay.peers.len(), 1);
    assert_eq!(overlay.identity_dir, dir.path().join("overlay"));
    let monitor: MonitorConfig = viola_common::config::parse(&read("monitor.toml")).unwrap();
    assert_eq!((monitor.host.as_str(), monitor.site.as_str()), ("b1", "b"));
    assert_eq!(monitor.manager, plan.manager);
    let depot: DepotConfig = viola_common::config::parse(&read("depot.toml")).unwrap();
    assert_eq!(depot.hosts, ["b1", "b2"]);
    assert_eq!(depot.peers[0].site, "a");
    assert_eq!(depot.site, "b");
}
