//! The example configurations the packages install under `/etc/viola/` (`packaging/etc/`)
//! are read by each daemon's own configuration type, unknown keys refused, and pass the checks
//! the daemon makes at start, so an administrator's copy starts the daemon once its addresses
//! are edited. So are the configurations an enrolment bundle installs; the manager's, which a
//! bundle does not write, is the example copied as `viola-ca install` says. No lab.

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
    depot.check().expect("the example is a host's own depot");
    assert_eq!(depot.hosts.len(), 1, "a host's own depot serves that host");
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
    // The manager's configuration is the administrator's copy of its example.
    let (_, text) = example("adaptmgr.toml");
    let typo = text.replace("heartbeat_timeout_s", "heartbeat_timeout");
    assert_ne!(typo, text);
    assert!(viola_common::config::parse::<ManagerConfig>(&typo).is_err());
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
        depot: DepotPlan {
            peers: vec![("a".into(), "192.0.2.11:7410".parse().unwrap())],
        },
        libvirt: None,
        manager_identity: None,
        manager_only: false,
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
    // The host's own depot: for this host only, in its own image directory.
    assert_eq!(depot.hosts, ["b1"]);
    assert_eq!(depot.image_dir_template, "/var/lib/viola/images");
    depot.check().expect("a depot that serves one host");
    assert_eq!(depot.peers[0].site, "a");
    assert_eq!(depot.site, "b");
}

/// The manager's bundle writes its identity, not its configuration (the bundle does not know
/// the federation's hosts); the example the administrator is told to copy, with the values
/// `install` tells, reads that identity and listens where the monitors were told.
#[test]
fn the_manager_s_example_as_install_says_to_copy_it_reads_the_identity_the_bundle_installed() {
    use viola_common::enrol::{HostPlan, Names, make_bundle};
    use viola_common::identity::{CertificateAuthority, Identity};
    let ca = CertificateAuthority::generate("test", 1).unwrap();
    let plan = HostPlan {
        site: "a".into(),
        host: "a1".into(),
        manager: "192.0.2.11:7443".parse().unwrap(),
        peers: vec![],
        overlay_listen: "0.0.0.0:4500".parse().unwrap(),
        depot: Default::default(),
        libvirt: None,
        manager_identity: Some(Names {
            addresses: vec!["192.0.2.11".parse().unwrap()],
            dns_names: vec!["viola.example.org".into()],
        }),
        manager_only: false,
    };
    let crl = ca.sign_crl(&[], 30).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path();
    let bundle = make_bundle(&ca, &plan, Some(crl), 30).unwrap();
    bundle.install(etc, None, true).unwrap();
    assert!(
        !etc.join("adaptmgr.toml").exists(),
        "no manager without hosts"
    );
    let step = bundle.next_step(etc).expect("install says what to do next");

    // What the step says to set, as `key = "value"` lines.
    let told = |key: &str| -> String {
        step.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key} = \"")))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{key} not in:\n{step}"))
            .to_owned()
    };
    let (_, text) = example("adaptmgr.toml");
    let copy = text.replace(
        "\"/etc/viola/adaptmgr\"",
        &format!("\"{}\"", told("identity_dir")),
    );
    let manager: ManagerConfig = viola_common::config::parse(&copy).unwrap();
    assert_eq!(
        manager.listen.to_string(),
        told("listen"),
        "the example's port"
    );
    assert_eq!(manager.identity_dir, etc.join("adaptmgr"));
    let identity = Identity::load_dir(&manager.identity_dir).unwrap();
    assert_eq!(identity.id().uri(), "viola://adaptmgr/a/a1");
    assert!(manager.identity_dir.join("crl.pem").is_file());
}
