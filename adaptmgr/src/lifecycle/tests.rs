//! Violin and VM lifecycle on fake hypervisors, a fake depot and fake overlay daemons: what a
//! user gets, and that a failure leaves nothing behind.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use viola_api::manager::{ViolinCreate, ViolinView, VmCreate};
use viola_api::overlay::{ControlReply, ControlRequest};
use viola_depot::api::{StageRequest, StageState, StageStatus};
use viola_depot::client::ClientError;
use viola_hypervisor::Hypervisor as _;
use viola_hypervisor::fake::FakeCluster;

use super::{ViolinError, VmError};
use crate::announce::{OverlayLink, OverlayLinkError};
use crate::inventory::Inventory;
use crate::manager::{DepotSiteConfig, Manager, ManagerConfig, now_ms};
use crate::migration::depot_stage::{DepotLink, DepotSession, Upload};
use crate::tenants::{Caller, TenantConfig};
use tokio::io::AsyncReadExt as _;
use viola_depot::api::{ImageEntry, UploadReport};

/// Overlay daemons that record what they are told; `refuse` names a host whose daemon refuses.
#[derive(Default)]
struct Overlays {
    told: Mutex<Vec<(SocketAddr, ControlRequest)>>,
    refuse: Option<SocketAddr>,
}

impl OverlayLink for Overlays {
    fn request(
        &self,
        addr: SocketAddr,
        req: ControlRequest,
    ) -> BoxFuture<'_, Result<ControlReply, OverlayLinkError>> {
        self.told.lock().unwrap().push((addr, req));
        let reply = if Some(addr) == self.refuse {
            ControlReply::Refused {
                reason: "no bridge".into(),
            }
        } else {
            ControlReply::Done
        };
        Box::pin(async move { Ok(reply) })
    }
}

/// A depot that lays the disk down in the fake cluster when asked (or refuses the deadline
/// when `earliest_ms` says it is later).
struct Depot {
    cluster: FakeCluster,
    earliest_s: Option<u64>,
    requests: Mutex<Vec<StageRequest>>,
    /// This host goes down when the depot first says a disk is ready.
    down_when_ready: Mutex<Option<String>>,
    /// Its named images (every site's depot is this one).
    images: Mutex<Vec<ImageEntry>>,
    /// Where the manager connected to reach a depot, in order.
    connected: Mutex<Vec<SocketAddr>>,
}

fn image_entry(name: &str, content: &[u8]) -> ImageEntry {
    ImageEntry {
        name: name.into(),
        manifest: viola_depot::hash::Hash::of(content),
        virtual_size: content.len() as u64,
        bytes: content.len() as u64,
        parts: 1,
        complete: true,
        problem: None,
    }
}

fn status(req: &StageRequest, state: StageState, accepted: bool, ready_in_s: u64) -> StageStatus {
    StageStatus {
        stage_id: format!("stage-{}", req.vm),
        state,
        accepted,
        predicted_ready_unix_ms: Some(now_ms() + ready_in_s * 1000),
        ready_unix_ms: None,
        deadline_unix_ms: req.deadline_unix_ms,
        bytes_total: 1 << 20,
        bytes_done: 0,
        overlay: None,
        chain: vec![],
        message: if accepted {
            String::new()
        } else {
            "the fetch over the WAN takes longer".into()
        },
    }
}

impl DepotSession for Arc<Depot> {
    fn stage(&self, req: StageRequest) -> BoxFuture<'_, Result<StageStatus, ClientError>> {
        self.requests.lock().unwrap().push(req.clone());
        let late = self
            .earliest_s
            .filter(|s| now_ms() + s * 1000 > req.deadline_unix_ms);
        let answer = match late {
            Some(s) => status(&req, StageState::Rejected, false, s),
            None => {
                self.cluster.add_image(
                    &format!("fake://{}", req.host),
                    &format!("/img/{}.qcow2", req.vm),
                    1 << 30,
                    None,
                );
                status(&req, StageState::Fetching, true, 1)
            }
        };
        Box::pin(async move { Ok(answer) })
    }

    fn status<'a>(&'a self, stage_id: &'a str) -> BoxFuture<'a, Result<StageStatus, ClientError>> {
        let req = self
            .requests
            .lock()
            .unwrap()
            .iter()
            .find(|r| format!("stage-{}", r.vm) == stage_id)
            .cloned()
            .expect("a stage this depot was asked for");
        if let Some(uri) = self.down_when_ready.lock().unwrap().take() {
            self.cluster.set_host_up(&uri, false);
        }
        Box::pin(async move { Ok(status(&req, StageState::Ready, true, 0)) })
    }

    fn images(&self) -> BoxFuture<'_, Result<Vec<ImageEntry>, ClientError>> {
        let images = self.images.lock().unwrap().clone();
        Box::pin(async move { Ok(images) })
    }

    fn upload<'a>(&'a self, up: Upload<'a>) -> BoxFuture<'a, Result<UploadReport, ClientError>> {
        let Upload {
            name,
            size,
            replace,
            body,
            progress,
        } = up;
        Box::pin(async move {
            if !replace && self.images.lock().unwrap().iter().any(|e| e.name == name) {
                return Err(ClientError::Refused(format!("image {name} exists")));
            }
            let mut content = Vec::new();
            body.take(size)
                .read_to_end(&mut content)
                .await
                .map_err(ClientError::Source)?;
            progress(content.len() as u64);
            if content.len() as u64 != size {
                return Err(ClientError::ShortSource {
                    sent: content.len() as u64,
                    size,
                });
            }
            let entry = image_entry(name, &content);
            let mut images = self.images.lock().unwrap();
            images.retain(|e| e.name != name);
            images.push(entry.clone());
            images.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(UploadReport {
                name: name.into(),
                manifest: entry.manifest,
                replaced: None,
                bytes_received: size,
                format: viola_depot::manifest::DiskFormat::Raw,
                virtual_size: size,
                parts: 1,
                chunks: 1,
                zero_chunks: 0,
                new_chunks: 1,
                new_bytes: size,
                dedup_chunks: 0,
                dedup_bytes: 0,
            })
        })
    }
}

struct Link(Arc<Depot>);

impl DepotLink for Link {
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> BoxFuture<'_, Result<Box<dyn DepotSession>, ClientError>> {
        let depot = Arc::clone(&self.0);
        depot.connected.lock().unwrap().push(addr);
        Box::pin(async move { Ok(Box::new(depot) as Box<dyn DepotSession>) })
    }
}

const HOSTS: [&str; 3] = ["a1", "a2", "b1"];

fn overlay_addr(host: &str) -> SocketAddr {
    let i = HOSTS.iter().position(|h| *h == host).unwrap();
    SocketAddr::from(([198, 18, 1, 11 + i as u8], 4500))
}

struct Lab {
    cluster: FakeCluster,
    manager: Manager,
    overlays: Arc<Overlays>,
    depot: Arc<Depot>,
    _dir: tempfile::TempDir,
}

async fn lab(refuse: Option<&str>, earliest_s: Option<u64>) -> Lab {
    lab_with_tenants(refuse, earliest_s, Vec::new()).await
}

async fn lab_with_tenants(
    refuse: Option<&str>,
    earliest_s: Option<u64>,
    tenants: Vec<TenantConfig>,
) -> Lab {
    lab_with(refuse, earliest_s, |cfg| cfg.tenants = tenants).await
}

/// Where every site's depot is, unless a test says otherwise.
const SITE_DEPOT: &str = "198.18.0.1:7410";

async fn lab_with(
    refuse: Option<&str>,
    earliest_s: Option<u64>,
    configure: impl FnOnce(&mut ManagerConfig),
) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let cluster = FakeCluster::new();
    for h in HOSTS {
        cluster.host(&format!("fake://{h}"));
    }
    let mut cfg = ManagerConfig {
        hosts: HOSTS
            .iter()
            .map(|h| crate::manager::HostConfig {
                overlay_addr: Some(overlay_addr(h)),
                ..crate::fixtures::fake_host(h, &h[..1])
            })
            .collect(),
        depots: ["a", "b"]
            .iter()
            .map(|s| DepotSiteConfig {
                site: (*s).into(),
                addr: SITE_DEPOT.parse().unwrap(),
            })
            .collect(),
        images_host_dir: "/img".into(),
        ..ManagerConfig::default()
    };
    configure(&mut cfg);
    let overlays = Arc::new(Overlays {
        told: Mutex::default(),
        refuse: refuse.map(overlay_addr),
    });
    let depot = Arc::new(Depot {
        cluster: cluster.clone(),
        earliest_s,
        requests: Mutex::default(),
        down_when_ready: Mutex::default(),
        images: Mutex::new(vec![image_entry("guest-base", b"base")]),
        connected: Mutex::default(),
    });
    let inventory = Arc::new(Inventory::open(&dir.path().join("inv.redb")).unwrap());
    let manager = Manager::with_links(
        cfg,
        inventory,
        Arc::new(cluster.clone()),
        Arc::new(Link(Arc::clone(&depot))),
        Arc::clone(&overlays) as Arc<dyn OverlayLink>,
    )
    .unwrap();
    for h in HOSTS {
        manager
            .handle_report(crate::fixtures::host_report(h, 1, &[]))
            .await
            .unwrap();
    }
    Lab {
        cluster,
        manager,
        overlays,
        depot,
        _dir: dir,
    }
}

fn violin(name: &str, sites: &[&str]) -> ViolinCreate {
    ViolinCreate {
        name: name.into(),
        subnet: None,
        sites: sites.iter().map(|s| (*s).to_owned()).collect(),
        mtu: None,
    }
}

fn vm(name: &str, violin: &str) -> VmCreate {
    VmCreate {
        name: name.into(),
        violin: violin.into(),
        image: "guest-base".into(),
        host: None,
        site: None,
        vcpus: None,
        memory_mib: None,
        ready_by_s: None,
        count: None,
        ssh_key: None,
    }
}

impl Lab {
    fn told(&self) -> Vec<(SocketAddr, ControlRequest)> {
        std::mem::take(&mut *self.overlays.told.lock().unwrap())
    }

    /// Violin `name` over `sites` (none: all), created by an administrator.
    async fn create_violin(&self, name: &str, sites: &[&str]) -> Result<ViolinView, ViolinError> {
        self.manager
            .create_violin(&Caller::Admin, violin(name, sites))
            .await
    }

    async fn create(&self, req: VmCreate) -> Result<Vec<viola_api::manager::VmView>, VmError> {
        let (tx, _rx) = mpsc::channel(1024);
        self.manager.create_vms(&Caller::Admin, req, tx).await
    }

    /// Nothing of `vm` anywhere: no domain, no disk, no record, no address, no journal.
    fn assert_gone(&self, vm: &str) {
        for h in HOSTS {
            let uri = format!("fake://{h}");
            assert!(!self.cluster.has_domain(&uri, vm), "{vm} defined at {h}");
            assert!(
                !self.cluster.has_image(&uri, &format!("/img/{vm}.qcow2")),
                "{vm}'s disk at {h}"
            );
        }
        let inv = &self.manager.inventory;
        assert!(inv.vm(vm).unwrap().is_none());
        assert!(inv.pending().unwrap().is_empty());
        for v in inv.violins().unwrap() {
            assert!(v.members.iter().all(|m| m.vm != vm), "{vm} in {}", v.name);
        }
    }
}

#[tokio::test]
async fn a_violin_gets_an_id_a_subnet_and_its_hosts_overlays() {
    let lab = lab(None, None).await;
    let v = lab.create_violin("lab", &[]).await.unwrap();
    assert_eq!((v.id, v.subnet.as_deref()), (1, Some("10.0.1.0/24")));
    assert_eq!(v.sites, ["a", "b"]);
    let told = lab.told();
    assert_eq!(told.len(), 3, "{told:?}");
    for (_, req) in &told {
        let ControlRequest::SetViolin { violin } = req else {
            panic!("{req:?}");
        };
        assert_eq!(violin.allowed, ["a/*", "b/*"]);
        assert!(violin.vms.is_empty());
    }
    // Only site b's host carries a violin of site b; ids are not reused.
    let w = lab.create_violin("wan", &["b"]).await.unwrap();
    assert_eq!(w.id, 2);
    let told = lab.told();
    assert_eq!(
        told.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        [overlay_addr("b1")]
    );
    let err = lab.create_violin("lab", &[]).await;
    assert!(err.unwrap_err().to_string().contains("exists"));
    let err = lab.create_violin("x", &["c"]).await;
    assert!(err.unwrap_err().to_string().contains("no site named \"c\""));
    let bad = ViolinCreate {
        subnet: Some("192.168.0.0/24".into()),
        ..violin("bad", &[])
    };
    assert!(
        lab.manager
            .create_violin(&Caller::Admin, bad)
            .await
            .is_err()
    );
    assert!(lab.told().is_empty(), "a refused request tells no overlay");
    for mtu in [67, 9001] {
        let bad = ViolinCreate {
            mtu: Some(mtu),
            ..violin("bad", &[])
        };
        let err = lab.manager.create_violin(&Caller::Admin, bad).await;
        assert!(
            err.unwrap_err().to_string().contains(&format!("MTU {mtu}")),
            "{mtu}"
        );
    }
    assert!(lab.told().is_empty(), "a refused MTU tells no overlay");
}

#[tokio::test]
async fn a_violins_own_mtu_goes_to_its_overlays_and_its_vms_nics() {
    let lab = lab(None, None).await;
    let made = lab
        .manager
        .create_violin(
            &Caller::Admin,
            ViolinCreate {
                mtu: Some(9000),
                ..violin("jumbo", &[])
            },
        )
        .await
        .unwrap();
    assert_eq!(made.mtu, Some(9000));
    for (_, req) in lab.told() {
        let ControlRequest::SetViolin { violin } = req else {
            panic!("{req:?}");
        };
        assert_eq!(violin.mtu, Some(9000));
    }
    lab.create(vm("big", "jumbo")).await.unwrap();
    let xml = lab
        .manager
        .inventory
        .vm("big")
        .unwrap()
        .unwrap()
        .domain_xml
        .unwrap();
    assert!(xml.contains("<mtu size='9000'/>"), "{xml}");
}

#[tokio::test]
async fn a_violin_a_daemon_refuses_is_taken_back_everywhere() {
    let lab = lab(Some("b1"), None).await;
    let err = lab.create_violin("lab", &[]).await.unwrap_err();
    assert!(
        err.to_string().contains("b/b1") || err.to_string().contains("b1"),
        "{err}"
    );
    assert!(lab.manager.list_violins(&Caller::Admin).unwrap().is_empty());
    let removed: Vec<SocketAddr> = lab
        .told()
        .into_iter()
        .filter(|(_, r)| matches!(r, ControlRequest::RemoveViolin { violin: 1 }))
        .map(|(a, _)| a)
        .collect();
    assert_eq!(removed.len(), 3);
}

#[tokio::test]
async fn vms_are_placed_addressed_staged_defined_and_started() {
    let lab = lab(None, None).await;
    lab.create_violin("lab", &[]).await.unwrap();
    lab.told();
    let vms = lab
        .create(VmCreate {
            site: Some("b".into()),
            ..vm("web", "lab")
        })
        .await
        .unwrap();
    assert_eq!(vms.len(), 1);
    let web = &vms[0];
    assert_eq!(web.host, "b1");
    assert_eq!(web.violin.as_deref(), Some("lab"));
    assert_eq!(web.ip, Some("10.0.1.2".parse().unwrap()));
    assert!(lab.cluster.hosts_running("web") == ["fake://b1"]);
    let xml = lab
        .manager
        .inventory
        .vm("web")
        .unwrap()
        .unwrap()
        .domain_xml
        .unwrap();
    assert!(
        xml.contains("<source bridge='vio1'/>") || xml.contains("bridge='vio1'"),
        "{xml}"
    );
    assert!(xml.contains(&web.macs[0]));
    // Port security: the bridge port accepts only the VM's own MAC and address.
    assert!(
        xml.contains(
            "<filterref filter='clean-traffic'><parameter name='IP' value='10.0.1.2'/></filterref>"
        ),
        "{xml}"
    );
    // Every host of the violin now knows the VM's MAC, address and home.
    let told = lab.told();
    assert_eq!(told.len(), 3);
    for (_, req) in &told {
        let ControlRequest::SetViolin { violin } = req else {
            panic!("{req:?}");
        };
        assert_eq!(violin.vms.len(), 1);
        assert_eq!(
            violin.vms[0].ip,
            "10.0.1.2".parse::<std::net::Ipv4Addr>().unwrap()
        );
        assert_eq!(violin.vms[0].host.as_deref(), Some("b/b1"));
    }
    // Three more at once: one plan (every staging asked before any wait), distinct addresses.
    let more = lab
        .create(VmCreate {
            count: Some(3),
            ..vm("node", "lab")
        })
        .await
        .unwrap();
    let names: Vec<&str> = more.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["node-1", "node-2", "node-3"]);
    let mut ips: Vec<_> = more.iter().map(|v| v.ip.unwrap()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3);
    assert!(!ips.contains(&"10.0.1.2".parse().unwrap()));
    assert_eq!(lab.depot.requests.lock().unwrap().len(), 4);
    let listed = lab.manager.list_violins(&Caller::Admin).unwrap();
    assert_eq!(listed[0].vms.len(), 4);
    // The name is taken now.
    assert!(matches!(
        lab.create(vm("web", "lab")).await,
        Err(VmError::Exists(_))
    ));
}

#[tokio::test]
async fn a_host_with_its_own_depot_agent_gets_its_disks_from_it_not_from_its_sites_depot() {
    let agent: SocketAddr = "198.18.2.11:7411".parse().unwrap();
    // b1 has its own agent, and site b no depot at all.
    let lab = lab_with(None, None, |cfg| {
        cfg.depots.retain(|d| d.site == "a");
        cfg.hosts
            .iter_mut()
            .filter(|h| h.name == "b1")
            .for_each(|h| h.depot_agent = Some(agent));
    })
    .await;
    lab.create_violin("lab", &[]).await.unwrap();
    for (site, host, depot) in [("b", "b1", agent), ("a", "a1", SITE_DEPOT.parse().unwrap())] {
        lab.depot.connected.lock().unwrap().clear();
        let vms = lab
            .create(VmCreate {
                site: Some(site.into()),
                host: Some(host.into()),
                ..vm(&format!("web-{host}"), "lab")
            })
            .await
            .unwrap();
        assert_eq!(vms[0].host, host);
        assert_eq!(*lab.depot.connected.lock().unwrap(), [depot], "{host}");
        let req = lab.depot.requests.lock().unwrap().last().cloned().unwrap();
        assert_eq!((req.host.as_str(), req.chain_only), (host, false));
    }
}

#[tokio::test]
async fn an_impossible_deadline_is_refused_with_the_earliest_time_and_leaves_nothing() {
    let lab = lab(None, Some(900)).await;
    lab.create_violin("lab", &[]).await.unwrap();
    let err = lab
        .create(VmCreate {
            ready_by_s: Some(60),
            count: Some(2),
            ..vm("late", "lab")
        })
        .await
        .unwrap_err();
    let VmError::DeadlineImpossible { earliest_s, .. } = &err else {
        panic!("{err}");
    };
    assert!(
        earliest_s.is_some_and(|s| (899..=901).contains(&s)),
        "{err}"
    );
    assert!(err.to_string().contains("earliest"), "{err}");
    lab.assert_gone("late-1");
    lab.assert_gone("late-2");
    // The same request with a deadline the depot can meet works, with the first addresses.
    let ok = lab
        .create(VmCreate {
            ready_by_s: Some(1000),
            ..vm("late", "lab")
        })
        .await
        .unwrap();
    assert_eq!(ok[0].ip, Some("10.0.1.2".parse().unwrap()));
}

#[tokio::test]
async fn a_failure_half_way_undoes_every_vm_of_the_request() {
    let lab = lab(None, None).await;
    lab.create_violin("lab", &["a"]).await.unwrap();
    // a2's libvirt goes away once its disks are staged: the define there fails, and so does
    // the undo at a2 until it is back; the journal keeps the VMs for the next start.
    *lab.depot.down_when_ready.lock().unwrap() = Some("fake://a2".into());
    let err = lab
        .create(VmCreate {
            count: Some(2),
            host: Some("a2".into()),
            ..vm("half", "lab")
        })
        .await
        .unwrap_err();
    assert!(matches!(err, VmError::Hypervisor { .. }), "{err}");
    assert_eq!(lab.manager.inventory.pending().unwrap().len(), 2);
    lab.cluster.set_host_up("fake://a2", true);
    assert_eq!(lab.manager.resume_pending().await.unwrap(), 2);
    lab.assert_gone("half-1");
    lab.assert_gone("half-2");
    // A domain of that name already at the host (not Viola's) is refused before anything,
    // and stays.
    let foreign = viola_hypervisor::fake::sample_domain_xml(
        "mine",
        "/img/mine.qcow2",
        "/img/base.qcow2",
        "52:54:00:00:00:99",
    );
    lab.cluster.host("fake://a1").define(&foreign).unwrap();
    let err = lab
        .create(VmCreate {
            host: Some("a1".into()),
            ..vm("mine", "lab")
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("exists"), "{err}");
    assert!(lab.cluster.has_domain("fake://a1", "mine"));
    assert!(lab.manager.inventory.pending().unwrap().is_empty());
}

#[tokio::test]
async fn a_create_left_half_done_is_undone_at_the_next_start() {
    let lab = lab(None, None).await;
    lab.create_violin("lab", &[]).await.unwrap();
    lab.create(vm("kept", "lab")).await.unwrap();
    // As if the manager had stopped after defining `cut` at a1: journal, address, domain, disk.
    let op = crate::inventory::PendingOp {
        kind: crate::inventory::PendingKind::Create,
        vm: "cut".into(),
        violin: "lab".into(),
        host: "a1".into(),
        disk: "/img/cut.qcow2".into(),
        // The fake depot answers `ready` for a stage it was asked for: nothing to wait for.
        stage: Some(crate::inventory::PendingStage {
            site: "a".into(),
            stage_id: "stage-kept".into(),
        }),
    };
    lab.manager.inventory.put_pending(&op).unwrap();
    let mut rec = lab.manager.inventory.violin("lab").unwrap().unwrap();
    rec.members.push(crate::inventory::MemberRecord {
        vm: "cut".into(),
        mac: "02:00:00:00:00:01".into(),
        ip: "10.0.1.9".parse().unwrap(),
        host: "a1".into(),
        image: "guest-base".into(),
        vcpus: 1,
        memory_mib: 256,
    });
    lab.manager.inventory.put_violin(&rec).unwrap();
    lab.cluster
        .add_image("fake://a1", "/img/cut.qcow2", 1 << 30, None);
    let spec = viola_hypervisor::domain::DomainSpec {
        name: "cut".into(),
        memory_mib: 256,
        max_memory_mib: 512,
        vcpus: 1,
        max_vcpus: 2,
        disk: "/img/cut.qcow2".into(),
        bridge: "vio1".into(),
        mac: "02:00:00:00:00:01".into(),
        mtu: None,
        boot: viola_hypervisor::domain::Boot::Disk,
        console_log: None,
        image_ref: Some("guest-base".into()),
        violin: Some("lab".into()),
        tenant: None,
        port_filter: None,
    };
    lab.cluster
        .host("fake://a1")
        .define(&spec.to_xml().unwrap())
        .unwrap();
    assert_eq!(lab.manager.resume_pending().await.unwrap(), 1);
    lab.assert_gone("cut");
    assert!(lab.manager.inventory.vm("kept").unwrap().is_some());
}

#[tokio::test]
async fn deleting_a_violin_with_vms_needs_force_and_then_removes_everything() {
    let lab = lab(None, None).await;
    lab.create_violin("lab", &[]).await.unwrap();
    lab.create(VmCreate {
        count: Some(2),
        ..vm("n", "lab")
    })
    .await
    .unwrap();
    let err = lab
        .manager
        .delete_violin(&Caller::Admin, "lab", false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("n-1"), "{err}");
    assert_eq!(lab.manager.list_violins(&Caller::Admin).unwrap().len(), 1);
    lab.told();
    lab.manager
        .delete_violin(&Caller::Admin, "lab", true)
        .await
        .unwrap();
    lab.assert_gone("n-1");
    lab.assert_gone("n-2");
    assert!(lab.manager.list_violins(&Caller::Admin).unwrap().is_empty());
    let removed = lab
        .told()
        .into_iter()
        .filter(|(_, r)| matches!(r, ControlRequest::RemoveViolin { violin: 1 }))
        .count();
    assert_eq!(removed, 3);
    assert!(
        lab.manager
            .delete_violin(&Caller::Admin, "lab", true)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn creates_at_the_same_time_get_distinct_addresses_and_all_are_kept() {
    let lab = lab(None, None).await;
    lab.create_violin("lab", &[]).await.unwrap();
    let (a, b, c) = tokio::join!(
        lab.create(vm("x", "lab")),
        lab.create(vm("y", "lab")),
        lab.create(VmCreate {
            count: Some(2),
            ..vm("z", "lab")
        }),
    );
    let mut ips: Vec<_> = [a.unwrap(), b.unwrap(), c.unwrap()]
        .concat()
        .iter()
        .map(|v| v.ip.unwrap())
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 4);
    let members = &lab.manager.list_violins(&Caller::Admin).unwrap()[0].vms;
    assert_eq!(members.len(), 4, "{members:?}");
}

#[tokio::test]
async fn tenants_see_and_change_only_their_own_within_their_quotas() {
    let quota = |name: &str| TenantConfig {
        name: name.into(),
        max_violins: Some(1),
        max_vms: Some(3),
        max_vcpus: Some(4),
        max_memory_mib: None,
    };
    let lab = lab_with_tenants(None, None, vec![quota("physics"), quota("chem")]).await;
    let physics = Caller::Tenant("physics".into());
    let chem = Caller::Tenant("chem".into());
    let (tx, _rx) = mpsc::channel(1024);

    let v = lab
        .manager
        .create_violin(&physics, violin("p", &[]))
        .await
        .unwrap();
    assert_eq!(v.tenant.as_deref(), Some("physics"));
    let err = lab
        .manager
        .create_violin(&physics, violin("p2", &[]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("quota of 1 violins"), "{err}");
    lab.create_violin("fed", &[]).await.unwrap();
    lab.create(vm("adm", "fed")).await.unwrap();

    // Two VMs of 2 vCPUs fill physics's 4; a third is refused and leaves nothing.
    let two = VmCreate {
        vcpus: Some(2),
        count: Some(2),
        ..vm("pv", "p")
    };
    lab.manager
        .create_vms(&physics, two, tx.clone())
        .await
        .unwrap();
    let err = lab
        .manager
        .create_vms(&physics, vm("more", "p"), tx.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("quota of 4 vCPUs"), "{err}");
    lab.assert_gone("more");

    // Each sees only its own; another tenant's is as unknown as a missing one.
    let names = |c: &Caller| -> Vec<String> {
        lab.manager
            .list_violins(c)
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect()
    };
    assert_eq!(names(&physics), ["p"]);
    assert!(names(&chem).is_empty());
    assert_eq!(names(&Caller::Admin), ["fed", "p"]);
    let (vms, violins) = (
        lab.manager.inventory.vms().unwrap(),
        lab.manager.inventory.violins().unwrap(),
    );
    let vm_names = |c: &Caller| -> Vec<String> {
        super::vm_views(c, &vms, &violins)
            .into_iter()
            .map(|v| v.name)
            .collect()
    };
    assert_eq!(vm_names(&physics), ["pv-1", "pv-2"]);
    assert!(vm_names(&chem).is_empty());
    assert_eq!(vm_names(&Caller::Admin).len(), 3);

    let err = lab
        .manager
        .delete_violin(&chem, "p", true)
        .await
        .unwrap_err();
    assert!(matches!(err, ViolinError::Unknown(_)), "{err}");
    let err = lab
        .manager
        .create_vms(&chem, vm("intruder", "p"), tx.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, VmError::UnknownViolin(_)), "{err}");
    lab.assert_gone("intruder");
    for result in [
        lab.manager.stop_vm(&chem, "pv-1").await,
        lab.manager.start_vm(&chem, "pv-1").await,
        lab.manager.delete_vm(&chem, "pv-1").await,
        lab.manager.delete_vm(&physics, "adm").await,
    ] {
        assert!(matches!(result, Err(VmError::Unknown(_))), "{result:?}");
    }
    assert!(
        lab.cluster.has_domain("fake://a1", "pv-1")
            || lab.cluster.has_domain("fake://a2", "pv-1")
            || lab.cluster.has_domain("fake://b1", "pv-1")
    );
    assert_eq!(names(&physics), ["p"]);

    // A tenant no [[tenants]] table names may make nothing.
    let bio = Caller::Tenant("bio".into());
    let err = lab
        .manager
        .create_violin(&bio, violin("b", &[]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not configured"), "{err}");

    // Its own: the tenant removes it, and its quota is free again.
    lab.manager
        .delete_violin(&physics, "p", true)
        .await
        .unwrap();
    lab.assert_gone("pv-1");
    lab.manager
        .create_violin(&physics, violin("p2", &[]))
        .await
        .unwrap();
}

/// (name, tenant) of the images `caller` is shown.
async fn list_images(lab: &Lab, caller: &Caller) -> Vec<(String, Option<String>)> {
    let (tx, _rx) = mpsc::channel(16);
    lab.manager
        .list_images(caller, &tx)
        .await
        .into_iter()
        .map(|v| (v.name, v.tenant))
        .collect()
}

#[tokio::test]
async fn a_tenants_images_are_its_own_and_its_vms_run_from_them() {
    let quota = |name: &str| TenantConfig {
        name: name.into(),
        max_violins: None,
        max_vms: None,
        max_vcpus: None,
        max_memory_mib: None,
    };
    let lab = lab_with_tenants(None, None, vec![quota("physics"), quota("chem")]).await;
    let physics = Caller::Tenant("physics".into());
    let chem = Caller::Tenant("chem".into());
    let (tx, _rx) = mpsc::channel(1024);
    let import = |name: &str, size: u64| viola_api::manager::ImageImport {
        name: name.into(),
        site: "a".into(),
        size,
        replace: false,
    };

    let mut body: &[u8] = b"physics's own guest-base";
    let view = lab
        .manager
        .import_image(
            &physics,
            import("guest-base", body.len() as u64),
            &mut body,
            &tx,
        )
        .await
        .unwrap();
    assert_eq!(
        (view.name.as_str(), view.tenant.as_deref()),
        ("guest-base", Some("physics"))
    );
    // Stored under the tenant's depot name, next to the federation's image of that name.
    let names: Vec<_> = lab
        .depot
        .images
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.name.clone())
        .collect();
    assert_eq!(names, ["_physics.guest-base", "guest-base"]);
    // A short body is refused and names nothing.
    let mut short: &[u8] = b"abc";
    let err = lab
        .manager
        .import_image(&chem, import("big", 10), &mut short, &tx)
        .await
        .unwrap_err();
    assert!(
        viola_common::errors::chain(&err).contains("ended after 3 of 10"),
        "{err}"
    );
    let mut reserved: &[u8] = b"x";
    assert!(
        lab.manager
            .import_image(&chem, import("_physics.guest-base", 1), &mut reserved, &tx)
            .await
            .is_err()
    );

    assert_eq!(
        list_images(&lab, &physics).await,
        [
            ("guest-base".to_owned(), None),
            ("guest-base".to_owned(), Some("physics".to_owned()))
        ]
    );
    assert_eq!(
        list_images(&lab, &chem).await,
        [("guest-base".to_owned(), None)]
    );
    assert_eq!(list_images(&lab, &Caller::Admin).await.len(), 2);

    // physics's VM runs from physics's image, chem's from the federation's.
    lab.manager
        .create_violin(&physics, violin("p", &[]))
        .await
        .unwrap();
    lab.manager
        .create_violin(&chem, violin("c", &[]))
        .await
        .unwrap();
    lab.manager
        .create_vms(&physics, vm("pv", "p"), tx.clone())
        .await
        .unwrap();
    lab.manager
        .create_vms(&chem, vm("cv", "c"), tx.clone())
        .await
        .unwrap();
    let staged: Vec<(String, String)> = lab
        .depot
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.vm.clone(), r.image.clone()))
        .collect();
    assert!(
        staged.contains(&("pv".into(), "_physics.guest-base".into())),
        "{staged:?}"
    );
    assert!(
        staged.contains(&("cv".into(), "guest-base".into())),
        "{staged:?}"
    );
    let err = lab
        .manager
        .create_vms(
            &chem,
            VmCreate {
                image: "_physics.guest-base".into(),
                ..vm("cv2", "c")
            },
            tx.clone(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("image name"), "{err}");
    lab.assert_gone("cv2");
}
