//! The control plane end to end in-process: a real QUIC + mutual-TLS endpoint, real
//! certificates from a test CA, the manager over a fake federation of hypervisors, and fake
//! overlay daemons on their QUIC control endpoints.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use viola_common::identity::{CertificateAuthority, Identity, PeerIdentity, Role, alpn};

use crate::inventory::{Inventory, ViolinRecord};
use crate::manager::{HostConfig, Manager, ManagerConfig};
use crate::migration::Outcome;
use viola_api::client::Client;
use viola_api::manager::{Request, Response, VmMigrate, VmResize};
use viola_api::overlay::{ControlReply, ControlRequest, OverlayStatus, ViolinStatus};
use viola_hypervisor::Hypervisor;
use viola_hypervisor::fake::FakeCluster;

fn identity(ca: &CertificateAuthority, role: Role, site: &str, host: &str) -> Identity {
    ca.issue(&PeerIdentity::new(role, site, host).unwrap(), 1)
        .unwrap()
        .to_identity()
        .unwrap()
}

fn report(host: &str, seq: u64) -> Request {
    Request::Report(crate::fixtures::host_report(host, seq, &["vm1"]))
}

/// What a fake overlay daemon was asked: (its host, the request).
type Told = tokio::sync::mpsc::Receiver<(String, ControlRequest)>;

/// Fake overlay daemons on QUIC control endpoints with certificates from `ca`, one per
/// `(site, host, members of violin 42 besides itself)`; `None` for a host outside the violin.
/// Each answers `status` with its violin membership, `expect_move` with `Done` when it carries
/// violin 42 (else `NotMember`, as the real daemon does), and passes every request on.
fn fake_overlays(
    ca: &CertificateAuthority,
    hosts: &[(&str, &str, Option<&[&str]>)],
) -> (
    Vec<tokio::task::JoinHandle<()>>,
    Vec<std::net::SocketAddr>,
    Told,
) {
    let (seen_tx, seen_rx) = tokio::sync::mpsc::channel(64);
    let mut tasks = Vec::new();
    let mut addrs = Vec::new();
    for &(site, host, members) in hosts {
        let server_cfg = identity(ca, Role::Overlay, site, host)
            .server_config(&[alpn::OVERLAY_CONTROL])
            .unwrap();
        let endpoint = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        addrs.push(endpoint.local_addr().unwrap());
        let label = format!("{site}/{host}");
        let violins: Vec<ViolinStatus> = members
            .map(|m| ViolinStatus {
                id: 42,
                name: "lan".into(),
                members: m.iter().map(|s| (*s).to_owned()).collect(),
                macs: vec![],
                subnet: None,
                runtime: false,
            })
            .into_iter()
            .collect();
        let seen_tx = seen_tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Ok(conn) = incoming.await else { continue };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let body = recv.read_to_end(1 << 16).await.unwrap();
                    let req: ControlRequest = serde_json::from_slice(&body).unwrap();
                    let reply = match &req {
                        ControlRequest::Status => {
                            let mut status = OverlayStatus::default();
                            status.switch.host = label.clone();
                            status.switch.violins = violins.clone();
                            ControlReply::Status(Box::new(status))
                        }
                        ControlRequest::ExpectMove { violin, .. } => {
                            if violins.iter().any(|v| v.id == *violin) {
                                ControlReply::Done
                            } else {
                                ControlReply::Refused {
                                    reason: format!("not a member of violin {violin}"),
                                }
                            }
                        }
                        ControlRequest::SetViolin { .. } | ControlRequest::RemoveViolin { .. } => {
                            ControlReply::Refused {
                                reason: "not expected in this test".into(),
                            }
                        }
                    };
                    let _ = seen_tx.send((label.clone(), req)).await;
                    send.write_all(&serde_json::to_vec(&reply).unwrap())
                        .await
                        .unwrap();
                    let _ = send.finish();
                }
            }
        }));
    }
    (tasks, addrs, seen_rx)
}

/// The manager's own certificate, saved where its configuration says.
fn manager_identity_dir(ca: &CertificateAuthority, dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("mgr");
    ca.issue(&PeerIdentity::new(Role::Adaptmgr, "fed", "mgr").unwrap(), 1)
        .unwrap()
        .save(&path)
        .unwrap();
    path
}

/// Violin "lan" (VNI 42) with vm1 in it, as the inventory records it.
fn put_vm1_in_violin_lan(inventory: &Inventory) {
    inventory
        .put_violin(&ViolinRecord {
            name: "lan".into(),
            vni: 42,
            vms: vec!["vm1".into()],
            ..ViolinRecord::default()
        })
        .unwrap();
    let mut rec = inventory.vm("vm1").unwrap().unwrap();
    rec.violin = Some("lan".into());
    inventory.put_vm(&rec).unwrap();
}

fn fake_host(name: &str, site: &str, overlay_addr: std::net::SocketAddr) -> HostConfig {
    HostConfig {
        overlay_addr: Some(overlay_addr),
        ..crate::fixtures::fake_host(name, site)
    }
}

/// Fake overlays at a1 and b1 (both in violin 42) and a2 (outside it), and the three hosts
/// configured with them.
fn hosts_with_overlays(
    ca: &CertificateAuthority,
) -> (Vec<tokio::task::JoinHandle<()>>, Vec<HostConfig>, Told) {
    let (tasks, addrs, told) = fake_overlays(
        ca,
        &[
            ("a", "a1", Some(&["b/b1"])),
            ("b", "b1", Some(&["a/a1"])),
            ("a", "a2", None),
        ],
    );
    let hosts = vec![
        fake_host("a1", "a", addrs[0]),
        fake_host("b1", "b", addrs[1]),
        fake_host("a2", "a", addrs[2]),
    ];
    (tasks, hosts, told)
}

/// The manager's configuration over `hosts`, its certificate saved in `dir`.
fn manager_config(
    ca: &CertificateAuthority,
    dir: &std::path::Path,
    hosts: Vec<HostConfig>,
) -> ManagerConfig {
    ManagerConfig {
        hosts,
        identity_dir: manager_identity_dir(ca, dir),
        ..ManagerConfig::default()
    }
}

/// An inventory in `dir` that has a1's first report, with vm1 in violin "lan".
fn inventory_with_vm1_in_lan(dir: &std::path::Path) -> Arc<Inventory> {
    let inventory = Arc::new(Inventory::open(&dir.join("inv.redb")).unwrap());
    let Request::Report(r) = report("a1", 1) else {
        unreachable!()
    };
    inventory.apply_report(&r, 1).unwrap();
    put_vm1_in_violin_lan(&inventory);
    inventory
}

/// The manager's control server on a loopback port.
struct Served {
    addr: std::net::SocketAddr,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    fn start(ca: &CertificateAuthority, manager: &Arc<Manager>) -> Self {
        let me = identity(ca, Role::Adaptmgr, "fed", "mgr");
        let server_cfg = me.server_config(&[alpn::ADAPTMGR]).unwrap();
        let endpoint = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let token = CancellationToken::new();
        let task = tokio::spawn(super::server::serve(
            endpoint,
            me,
            Arc::clone(manager),
            token.clone(),
        ));
        Self { addr, token, task }
    }

    /// A client with the certificate of `role` at `site`/`host`.
    async fn connect(
        &self,
        ca: &CertificateAuthority,
        role: Role,
        site: &str,
        host: &str,
    ) -> Client {
        Client::connect(&identity(ca, role, site, host), self.addr)
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.token.cancel();
        self.task.await.unwrap();
    }
}

/// A move of vm1 to `to_host` with its base staged, as the CLI asks by default.
fn move_vm1(to_host: &str, timeout_s: Option<u64>) -> VmMigrate {
    VmMigrate {
        vm: "vm1".into(),
        to_host: to_host.into(),
        bandwidth_mib_s: None,
        stage_base: true,
        timeout_s,
    }
}

/// Everything the fake overlays were asked so far.
fn drain(told: &mut Told) -> Vec<(String, ControlRequest)> {
    let mut asked = Vec::new();
    while let Ok(seen) = told.try_recv() {
        asked.push(seen);
    }
    asked
}

/// What the overlay of `host` is told when `mac` of violin 42 moves to b1.
fn expect_move_to_b1(host: &str, mac: &str) -> (String, ControlRequest) {
    (
        host.to_owned(),
        ControlRequest::ExpectMove {
            violin: 42,
            mac: mac.to_owned(),
            host: "b/b1".into(),
        },
    )
}

#[tokio::test]
async fn monitors_report_cli_resizes_and_migrates_roles_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("test", 1).unwrap();

    let (overlays, mut hosts, mut told) = hosts_with_overlays(&ca);
    hosts[1].migration_tls_name = Some("b1.b.libvirt.viola".into());

    let (cluster, a1) = crate::fixtures::federation_with_vm1_on_a1();

    let cfg = manager_config(&ca, dir.path(), hosts);
    let inventory = Arc::new(Inventory::open(&dir.path().join("inv.redb")).unwrap());
    let manager =
        Arc::new(Manager::new(cfg, Arc::clone(&inventory), Arc::new(cluster.clone())).unwrap());
    let server = Served::start(&ca, &manager);

    // The monitor of a1 reports; the manager learns the VM and fetches its definition.
    let mon = server.connect(&ca, Role::Monitor, "a", "a1").await;
    assert_eq!(
        mon.call(&report("a1", 1), |_| {}).await.unwrap(),
        Response::Ack
    );
    let vm = inventory.vm("vm1").unwrap().unwrap();
    assert_eq!(vm.host, "a1");
    assert!(vm.domain_xml.is_some());
    // A monitor may not read the inventory, nor report for another host.
    assert!(matches!(
        mon.call(&Request::ListVms, |_| {}).await.unwrap(),
        Response::Error { .. }
    ));
    let other = server.connect(&ca, Role::Monitor, "a", "a2").await;
    match other.call(&report("a1", 2), |_| {}).await.unwrap() {
        Response::Error { message } => assert!(message.contains("may only report"), "{message}"),
        r => panic!("{r:?}"),
    }
    // Guests' requests: a1's monitor forwards for a VM on a1 (vm1 is in no violin here, so
    // the shepherd refuses it, over the same stream); a2's monitor may not speak for a1, nor
    // may a CLI forward anything as if from a guest.
    let ask = |host: &str| {
        Request::GuestAsk(viola_api::manager::GuestAsk {
            host: host.into(),
            site: "a".into(),
            vm: "vm1".into(),
            line: r#"{"op":"resize","vm":"vm1","cpu_mips":500}"#.into(),
        })
    };
    match mon.call(&ask("a1"), |_| {}).await.unwrap() {
        Response::GuestAnswer(a) => {
            assert!(!a.accepted && a.detail.contains("in no violin"), "{a:?}")
        }
        r => panic!("{r:?}"),
    }
    match other.call(&ask("a1"), |_| {}).await.unwrap() {
        Response::Error { message } => {
            assert!(
                message.contains("may only forward requests of guests on a/a2"),
                "{message}"
            )
        }
        r => panic!("{r:?}"),
    }

    let cli = server.connect(&ca, Role::Cli, "fed", "me").await;
    let Response::Vms(vms) = cli.call(&Request::ListVms, |_| {}).await.unwrap() else {
        panic!("no vm list");
    };
    assert_eq!(vms.len(), 1);
    assert!(matches!(
        cli.call(&ask("a1"), |_| {}).await.unwrap(),
        Response::Error { .. }
    ));
    let resize = Request::Resize(VmResize {
        vm: "vm1".into(),
        vcpus: Some(2),
        memory_mib: Some(128),
        cap_percent: None,
        shares: None,
    });
    assert_eq!(cli.call(&resize, |_| {}).await.unwrap(), Response::Ack);
    let d = a1.domain("vm1").unwrap().unwrap();
    assert_eq!((d.vcpus, d.memory_kib), (2, 128 * 1024));

    // Not in a violin: the overlay cannot be told, so the move is rolled back.
    let mv = Request::Migrate(move_vm1("b1", Some(30)));
    let Response::Migrated(report) = cli.call(&mv, |_| {}).await.unwrap() else {
        panic!("no migration report");
    };
    assert!(
        matches!(&report.outcome, Outcome::RolledBack { reason } if reason.contains("violin")),
        "{:?}",
        report.outcome
    );
    assert_eq!(cluster.hosts_running("vm1"), vec!["fake://a1".to_string()]);

    // In a violin: the overlay is told, the VM moves, the inventory follows.
    put_vm1_in_violin_lan(&inventory);
    let mut progress = 0;
    let last = cli
        .call(&mv, |r| {
            if matches!(r, Response::Progress(_)) {
                progress += 1;
            }
        })
        .await
        .unwrap();
    let Response::Migrated(report) = last else {
        panic!("{last:?}")
    };
    assert!(
        matches!(report.outcome, Outcome::Migrated { .. }),
        "{:?}",
        report.outcome
    );
    assert!(progress > 0, "no progress frames");
    assert_eq!(cluster.hosts_running("vm1"), vec!["fake://b1".to_string()]);
    assert_eq!(inventory.vm("vm1").unwrap().unwrap().host, "b1");
    // Encrypted by default, checked against the name b1's configuration gives.
    let asked = cluster.migration_requests();
    let last_asked = asked.last().expect("a migration request");
    assert!(last_asked.tuning.tls);
    assert_eq!(
        last_asked.tuning.tls_destination.as_deref(),
        Some("b1.b.libvirt.viola")
    );
    // The source's overlay was asked for the violin's members, then a1 and b1 were told to
    // expect the MAC at b1; a2, outside the violin, was never asked anything.
    let mac = "52:54:00:00:00:01";
    assert_eq!(
        drain(&mut told),
        vec![
            ("a/a1".to_owned(), ControlRequest::Status),
            expect_move_to_b1("a/a1", mac),
            expect_move_to_b1("b/b1", mac),
        ]
    );
    assert!(
        inventory
            .events_after(0)
            .unwrap()
            .iter()
            .any(|e| e.kind == "migration")
    );

    cli.close().await;
    mon.close().await;
    other.close().await;
    server.stop().await;
    overlays.iter().for_each(tokio::task::JoinHandle::abort);
}

/// A manager that stops in the middle of a migration leaves its journal; a new manager over
/// the same inventory resolves it: the VM runs at exactly one place, the inventory says
/// where, and no journal entry stays.
#[tokio::test]
async fn a_restarted_manager_resolves_the_migration_its_predecessor_left() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("test", 1).unwrap();
    let (overlays, hosts, _told) = hosts_with_overlays(&ca);
    let (cluster, _) = crate::fixtures::federation_with_vm1_on_a1();
    let cfg = manager_config(&ca, dir.path(), hosts);
    let inventory = inventory_with_vm1_in_lan(dir.path());

    // The first manager starts a two-second move and is gone a moment later.
    cluster.set_faults(viola_hypervisor::fake::Faults {
        migration_duration: std::time::Duration::from_secs(2),
        ..Default::default()
    });
    let first = Manager::new(
        cfg.clone(),
        Arc::clone(&inventory),
        Arc::new(cluster.clone()),
    )
    .unwrap();
    let (progress, _p) = tokio::sync::mpsc::channel(64);
    let cut = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        first.migrate(move_vm1("b1", None), progress, CancellationToken::new()),
    )
    .await;
    assert!(
        cut.is_err(),
        "the move should still have been running: {cut:?}"
    );
    drop(first);
    let left: Vec<crate::migration::MigrationSnapshot> = inventory.migrations().unwrap();
    assert_eq!(
        left.len(),
        1,
        "the migration must be journaled while it runs"
    );

    let second = Manager::new(cfg, Arc::clone(&inventory), Arc::new(cluster.clone())).unwrap();
    let reports = second.resume_migrations().await.unwrap();
    assert_eq!(reports.len(), 1);
    let running = cluster.hosts_running("vm1");
    assert_eq!(running.len(), 1, "exactly one copy must run: {running:?}");
    let recorded = inventory.vm("vm1").unwrap().unwrap().host;
    assert_eq!(format!("fake://{recorded}"), running[0]);
    match &reports[0].outcome {
        Outcome::Migrated { .. } => {
            assert_eq!(recorded, "b1");
            assert!(!cluster.has_image("fake://a1", "/img/vm1.qcow2"));
        }
        Outcome::RolledBack { .. } => {
            assert_eq!(recorded, "a1");
            assert!(!cluster.has_image("fake://b1", "/img/vm1.qcow2"));
        }
        other => panic!("{other:?}: {:#?}", reports[0].records),
    }
    assert!(
        inventory
            .migrations::<crate::migration::MigrationSnapshot>()
            .unwrap()
            .is_empty()
    );
    assert!(second.resume_migrations().await.unwrap().is_empty());
    overlays.iter().for_each(tokio::task::JoinHandle::abort);
}

/// A move to a host whose overlay does not carry the VM's violin is rolled back with that
/// reason before the VM moves (its overlay would drop the VM's frames), leaving nothing at the
/// destination. That host's overlay is never asked anything.
#[tokio::test]
async fn a_move_out_of_the_violin_is_refused_and_outsiders_are_never_asked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("test", 1).unwrap();
    let (overlays, hosts, mut told) = hosts_with_overlays(&ca);
    let (cluster, _) = crate::fixtures::federation_with_vm1_on_a1();
    let cfg = manager_config(&ca, dir.path(), hosts);
    let inventory = inventory_with_vm1_in_lan(dir.path());
    let manager = Manager::new(cfg, Arc::clone(&inventory), Arc::new(cluster.clone())).unwrap();
    let (progress, _p) = tokio::sync::mpsc::channel(64);
    let report = manager
        .migrate(move_vm1("a2", Some(30)), progress, CancellationToken::new())
        .await
        .unwrap();
    assert!(
        matches!(&report.outcome, Outcome::RolledBack { reason } if reason.contains("a/a2 is not a member of violin 42")),
        "{:?}",
        report.outcome
    );
    assert_eq!(cluster.hosts_running("vm1"), vec!["fake://a1".to_string()]);
    assert!(!cluster.has_image("fake://a2", "/img/vm1.qcow2"));
    let asked: Vec<String> = drain(&mut told).into_iter().map(|(host, _)| host).collect();
    assert_eq!(
        asked,
        vec!["a/a1".to_owned()],
        "only the source's overlay is asked"
    );
    overlays.iter().for_each(tokio::task::JoinHandle::abort);
}

#[tokio::test]
async fn the_cli_reads_the_decision_log_and_the_policy_in_force() {
    use crate::fixtures::decision_to_move_vm1;
    use viola_api::adaptation::{ActionOutcome, PolicyMode};
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("test", 1).unwrap();
    let cfg: ManagerConfig =
        viola_common::config::parse("[policy]\nmode = \"act\"\nperiod_s = 30\n").unwrap();
    let inventory = Arc::new(Inventory::open(&dir.path().join("inv.redb")).unwrap());
    for i in 0..3 {
        inventory
            .record_decision(&decision_to_move_vm1(
                1000 + i,
                "host a1 overloaded",
                ActionOutcome::DONE,
            ))
            .unwrap();
    }
    let manager =
        Arc::new(Manager::new(cfg, Arc::clone(&inventory), Arc::new(FakeCluster::new())).unwrap());
    let server = Served::start(&ca, &manager);
    let cli = server.connect(&ca, Role::Cli, "fed", "me").await;
    let Response::Policy(view) = cli.call(&Request::PolicyShow, |_| {}).await.unwrap() else {
        panic!("no policy view");
    };
    assert_eq!(
        (view.policy.as_str(), view.mode),
        ("viola", PolicyMode::Act)
    );
    assert_eq!(view.period_s, 30.0);
    let req = Request::Decisions {
        after_seq: 1,
        limit: 1,
    };
    let Response::Decisions(d) = cli.call(&req, |_| {}).await.unwrap() else {
        panic!("no decisions");
    };
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].seq, 2);
    let mon = server.connect(&ca, Role::Monitor, "a", "a1").await;
    assert!(matches!(
        mon.call(&Request::PolicyShow, |_| {}).await.unwrap(),
        Response::Error { .. }
    ));
    cli.close().await;
    mon.close().await;
    server.stop().await;
}

/// A VM restarted after its host failed is announced before it starts: the restart host's
/// overlay names the violin's members (the failed host cannot), each member is told, and a
/// host outside the violin is never asked.
#[tokio::test]
async fn a_restart_elsewhere_is_announced_to_the_violin_from_the_restart_host() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("test", 1).unwrap();
    let (overlays, hosts, mut told) = hosts_with_overlays(&ca);
    let inventory = inventory_with_vm1_in_lan(dir.path());
    let announcer = crate::announce::OverlayAnnouncer::new(
        crate::manager::overlay_hosts(&hosts),
        Arc::clone(&inventory),
        Arc::new(crate::announce::QuicOverlayLink::new(manager_identity_dir(
            &ca,
            dir.path(),
        ))),
    );
    let mac = "52:54:00:00:00:01".to_owned();
    announcer
        .announce_restart("vm1", std::slice::from_ref(&mac), "fake://b1")
        .await
        .unwrap();
    assert_eq!(
        drain(&mut told),
        vec![
            ("b/b1".to_owned(), ControlRequest::Status),
            expect_move_to_b1("b/b1", &mac),
            expect_move_to_b1("a/a1", &mac),
        ]
    );
    overlays.iter().for_each(tokio::task::JoinHandle::abort);
}

#[tokio::test]
async fn a_tenants_user_may_use_its_violins_and_vms_only_and_an_unlisted_tenant_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("test", 1).unwrap();
    let (cluster, _a1) = crate::fixtures::federation_with_vm1_on_a1();
    let mut cfg = manager_config(&ca, dir.path(), Vec::new());
    cfg.tenants = vec![crate::tenants::TenantConfig {
        name: "physics".into(),
        max_violins: None,
        max_vms: None,
        max_vcpus: None,
        max_memory_mib: None,
    }];
    let inventory = inventory_with_vm1_in_lan(dir.path());
    let manager = Arc::new(Manager::new(cfg, inventory, Arc::new(cluster)).unwrap());
    let server = Served::start(&ca, &manager);

    let user = server.connect(&ca, Role::User, "physics", "ann").await;
    // The administrator's vm1 (violin "lan") is not the tenant's to see.
    assert_eq!(
        user.call(&Request::ListVms, |_| {}).await.unwrap(),
        Response::Vms(Vec::new())
    );
    assert_eq!(
        user.call(&Request::ViolinList, |_| {}).await.unwrap(),
        Response::Violins(Vec::new())
    );
    for admin_only in [
        Request::ListHosts,
        Request::PolicyShow,
        Request::Migrate(move_vm1("a1", None)),
    ] {
        match user.call(&admin_only, |_| {}).await.unwrap() {
            Response::Error { message } => {
                assert!(message.contains("only an administrator"), "{message}")
            }
            r => panic!("{admin_only:?} answered {r:?}"),
        }
    }
    match user
        .call(&Request::VmDelete { vm: "vm1".into() }, |_| {})
        .await
        .unwrap()
    {
        Response::Error { message } => assert!(message.contains("no VM named"), "{message}"),
        r => panic!("{r:?}"),
    }
    assert!(manager.inventory.vm("vm1").unwrap().is_some());

    let stranger = server.connect(&ca, Role::User, "bio", "bob").await;
    match stranger.call(&Request::ViolinList, |_| {}).await.unwrap() {
        Response::Error { message } => assert!(message.contains("not configured"), "{message}"),
        r => panic!("{r:?}"),
    }
    server.stop().await;
}
