//! Staging a migrating VM's base through the destination site's depot.
//!
//! **Which image a VM runs from.** The VM's libvirt domain XML says so, in its metadata:
//!
//! ```xml
//! <metadata><viola:image xmlns:viola="urn:viola:depot:1" ref="IMAGE"/></metadata>
//! ```
//!
//! where `IMAGE` is what the depot's staging API takes (an image name or, better, the manifest
//! hash: a name may be re-imported later, a hash cannot change). Whoever boots the VM from a
//! depot-assembled chain sets it (`virsh metadata VM urn:viola:depot:1 --key viola --set
//! '<image ref="IMAGE"/>' --live --config`). It lives in the domain, so it moves with the VM
//! (the migration persists the domain at the destination), is kept in the inventory's copy of
//! the XML, and needs no extra state in the manager.
//!
//! **Who lays down what.** The depot lays the chain down in the destination host's image
//! directory (`chain_only`: without a VM overlay). Depot-laid parts are named `<part-id>.<fmt>`
//! in the host's image directory, so a chain laid by site a's depot at the source and by site
//! b's depot at the destination has the same backing paths at both. The migration's own
//! `PrecreateOverlay` step then creates the VM's overlay, at the source disk's path, with the
//! source disk's backing and virtual size, exactly as after a direct copy; so the pre-check's
//! "nothing of this VM at the destination" and the rollback's "remove only what the migration
//! made" stay true. A laid-down chain is complete and verified (the depot writes each part to a
//! temporary name and renames it) and, like a directly copied base, stays when a migration is
//! rolled back: it is a shared, read-only base, not part of the VM. (The staging API has no
//! cancel: a depot still working when a migration gives up finishes the chain later, which is
//! such a base too.)
//!
//! **When the depot is not used.** No depot configured for the destination's site, the
//! destination host unknown to the configuration, no image recorded in the domain, or a base
//! whose file name is not a depot part's: the base is copied directly and verified
//! ([`LocalCopyStager`]), and the migration's log says which and why. A depot that cannot be
//! reached, refuses, fails or is not ready by the deadline fails the step (the migration then
//! rolls back like after any other failed step); it never silently turns into a direct copy.
//! Re-instantiating the VMs of a failed host (`crate::ha`) still uses the direct copy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use viola_depot::api::{ImageEntry, StageRequest, StageState, StageStatus, UploadReport};
use viola_depot::client::{ClientError, DepotClient};
use viola_depot::transfer::PathTuning;

use super::stage::{
    BaseStager, LocalCopyStager, StageError, StageJob, StagedBase, StagedHow, StagingProgress,
};

/// XML namespace of the manager's metadata in a domain.
pub const METADATA_NS: &str = "urn:viola:depot:1";

/// The depot image a domain records it runs from (`<viola:image ref=…>` in its metadata).
pub fn depot_image(domain_xml: &str) -> Result<Option<String>, roxmltree::Error> {
    let doc = roxmltree::Document::parse(domain_xml)?;
    let found = doc
        .root_element()
        .children()
        .filter(|c| c.has_tag_name("metadata"))
        .flat_map(|m| m.children())
        .find(|n| n.tag_name().namespace() == Some(METADATA_NS) && n.tag_name().name() == "image")
        .and_then(|n| n.attribute("ref"))
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned);
    Ok(found)
}

/// Whether `path` names a file a depot lays down: `<64 hex digits>.<qcow2|raw>`.
pub fn is_depot_part(path: &str) -> bool {
    let Some(name) = Path::new(path).file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some((id, ext)) = name.split_once('.') else {
        return false;
    };
    id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        && matches!(ext, "qcow2" | "raw")
}

/// An image upload: `size` bytes of `body` as image `name` (see `DepotClient::upload`).
pub struct Upload<'a> {
    pub name: &'a str,
    pub size: u64,
    /// Replace an image of that name (else the depot refuses the upload).
    pub replace: bool,
    pub body: &'a mut (dyn tokio::io::AsyncRead + Unpin + Send),
    /// Hears how many bytes were sent.
    pub progress: &'a mut (dyn FnMut(u64) + Send),
}

/// One request/answer exchange with a depot (a QUIC connection in production, a fake in tests).
pub trait DepotSession: Send + Sync {
    fn stage(&self, req: StageRequest) -> BoxFuture<'_, Result<StageStatus, ClientError>>;
    fn status<'a>(&'a self, stage_id: &'a str) -> BoxFuture<'a, Result<StageStatus, ClientError>>;
    /// The depot's named images.
    fn images(&self) -> BoxFuture<'_, Result<Vec<ImageEntry>, ClientError>>;
    fn upload<'a>(&'a self, up: Upload<'a>) -> BoxFuture<'a, Result<UploadReport, ClientError>>;
}

/// How the stager reaches a depot.
pub trait DepotLink: Send + Sync + 'static {
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> BoxFuture<'_, Result<Box<dyn DepotSession>, ClientError>>;
}

/// QUIC with mutual TLS, with the manager's identity (role `adaptmgr`), loaded at each
/// connection so a renewed certificate is picked up without a restart.
pub struct QuicDepotLink {
    identity_dir: PathBuf,
}

impl QuicDepotLink {
    pub fn new(identity_dir: PathBuf) -> Self {
        Self { identity_dir }
    }
}

struct QuicSession(DepotClient);

impl Drop for QuicSession {
    fn drop(&mut self) {
        self.0.conn.close(0u32.into(), b"done");
    }
}

impl DepotSession for QuicSession {
    fn stage(&self, req: StageRequest) -> BoxFuture<'_, Result<StageStatus, ClientError>> {
        Box::pin(self.0.stage(req))
    }
    fn status<'a>(&'a self, stage_id: &'a str) -> BoxFuture<'a, Result<StageStatus, ClientError>> {
        Box::pin(self.0.stage_status(stage_id))
    }
    fn images(&self) -> BoxFuture<'_, Result<Vec<ImageEntry>, ClientError>> {
        Box::pin(self.0.images())
    }
    fn upload<'a>(&'a self, up: Upload<'a>) -> BoxFuture<'a, Result<UploadReport, ClientError>> {
        Box::pin(
            self.0
                .upload(up.name, up.size, up.replace, up.body, up.progress),
        )
    }
}

impl DepotLink for QuicDepotLink {
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> BoxFuture<'_, Result<Box<dyn DepotSession>, ClientError>> {
        Box::pin(async move {
            let identity =
                viola_common::identity::Identity::load_dir(&self.identity_dir).map_err(|e| {
                    ClientError::Refused(format!(
                        "cannot load the manager's identity from {}: {}",
                        self.identity_dir.display(),
                        viola_common::errors::chain(&e)
                    ))
                })?;
            // Control traffic only: the default path tuning is plenty.
            let client = DepotClient::connect(&identity, addr, PathTuning::default()).await?;
            Ok(Box::new(QuicSession(client)) as Box<dyn DepotSession>)
        })
    }
}

/// A host as the depots know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepotHost {
    pub name: String,
    pub site: String,
    /// The host's own depot agent, which stages in its place when set.
    pub agent: Option<SocketAddr>,
}

impl DepotHost {
    /// Which depot stages for this host, and how logs and errors name it: the host's own agent
    /// when it has one (so no other machine writes its files), else its site's depot
    /// (`site_depot`, if the site has one).
    pub fn stager(&self, site_depot: Option<SocketAddr>) -> Result<(SocketAddr, String), String> {
        match (self.agent, site_depot) {
            (Some(addr), _) => Ok((addr, format!("{} ({}'s own depot)", self.site, self.name))),
            (None, Some(addr)) => Ok((addr, self.site.clone())),
            (None, None) => Err(format!("no depot configured for site {}", self.site)),
        }
    }
}

/// Stages through the destination site's depot when it can (see the module docs), else copies
/// directly.
#[derive(Clone)]
pub struct DepotStager {
    direct: LocalCopyStager,
    /// Site → its depot's staging address.
    depots: BTreeMap<String, SocketAddr>,
    /// libvirt URI → host name and site.
    hosts: BTreeMap<String, DepotHost>,
    link: Arc<dyn DepotLink>,
    poll_interval: Duration,
}

impl DepotStager {
    pub fn new(
        direct: LocalCopyStager,
        depots: BTreeMap<String, SocketAddr>,
        hosts: BTreeMap<String, DepotHost>,
        link: Arc<dyn DepotLink>,
    ) -> Self {
        Self {
            direct,
            depots,
            hosts,
            link,
            poll_interval: Duration::from_millis(250),
        }
    }

    /// How often the depot is asked for progress.
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    /// Why the depot cannot stage this job (then the base is copied directly), or which depot,
    /// host, image and site to ask.
    fn route(&self, job: &StageJob<'_>) -> Result<(SocketAddr, String, DepotHost, String), String> {
        let host = self
            .hosts
            .get(job.dest_uri)
            .ok_or_else(|| format!("destination {} is not a configured host", job.dest_uri))?;
        let (addr, label) = host.stager(self.depots.get(&host.site).copied())?;
        let image = depot_image(job.domain_xml)
            .map_err(|e| format!("domain XML unreadable: {e}"))?
            .ok_or_else(|| format!("{} records no depot image in its metadata", job.vm))?;
        if !is_depot_part(job.base_path) {
            return Err(format!(
                "base {} was not laid down by a depot",
                job.base_path
            ));
        }
        Ok((addr, label, host.clone(), image))
    }

    async fn through_depot(
        &self,
        job: &StageJob<'_>,
        addr: SocketAddr,
        site: String,
        host: DepotHost,
        image: String,
    ) -> Result<StagedHow, StageError> {
        let started = tokio::time::Instant::now();
        let show = |st: &StageStatus| {
            (job.progress)(StagingProgress {
                by: format!("depot {site}"),
                state: state_name(st.state),
                bytes_done: st.bytes_done,
                bytes_total: st.bytes_total,
                deadline_unix_ms: st.deadline_unix_ms,
                predicted_ready_unix_ms: st.predicted_ready_unix_ms,
                accepted: st.accepted,
            });
        };
        let session =
            self.link
                .connect(addr)
                .await
                .map_err(|source| StageError::DepotUnreachable {
                    site: site.clone(),
                    addr,
                    source: Box::new(source),
                })?;
        let request_err = |source| StageError::DepotRequest {
            site: site.clone(),
            source: Box::new(source),
        };
        let mut st = session
            .stage(StageRequest {
                image: image.clone(),
                vm: job.vm.to_owned(),
                host: host.name.clone(),
                deadline_unix_ms: job.deadline_unix_ms,
                reject_if_late: false,
                chain_only: true,
            })
            .await
            .map_err(request_err)?;
        tracing::info!(vm = job.vm, site = %site, stage = %st.stage_id, accepted = st.accepted,
            predicted = ?st.predicted_ready_unix_ms, "depot staging requested");
        let stage_id = st.stage_id.clone();
        loop {
            show(&st);
            match st.state {
                StageState::Ready => break,
                StageState::Failed | StageState::Rejected => {
                    return Err(StageError::DepotRefused {
                        site,
                        stage_id,
                        state: state_name(st.state),
                        message: st.message,
                    });
                }
                StageState::Resolving | StageState::Fetching | StageState::Assembling => {}
            }
            let now = unix_ms();
            if now >= job.deadline_unix_ms {
                return Err(StageError::DepotLate {
                    site,
                    stage_id,
                    waited_ms: started.elapsed().as_millis() as u64,
                    state: state_name(st.state),
                    bytes_done: st.bytes_done,
                    bytes_total: st.bytes_total,
                });
            }
            let left = Duration::from_millis(job.deadline_unix_ms - now);
            tokio::time::sleep(self.poll_interval.min(left)).await;
            st = session.status(&stage_id).await.map_err(request_err)?;
        }
        // The chain must end in the very file the VM's disk sits on, or the incremental
        // migration would find no base (or another one) at the destination.
        let base_name = Path::new(job.base_path).file_name();
        if st.chain.last().and_then(|p| p.file_name()) != base_name {
            return Err(StageError::ChainMismatch {
                site,
                base: job.base_path.to_owned(),
                laid: st.chain,
            });
        }
        Ok(StagedHow::Depot {
            site,
            image,
            stage_id,
            bytes_fetched: st.bytes_total,
            chain: st.chain,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }
}

fn state_name(s: StageState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{s:?}"))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl BaseStager for DepotStager {
    /// Without a VM there is no image to ask a depot for: direct copy. (Host-failure
    /// restarts ask [`stage_for_vm`](BaseStager::stage_for_vm) first.)
    async fn stage(
        &self,
        base_path: &str,
        source_uri: &str,
        dest_uri: &str,
    ) -> Result<StagedBase, StageError> {
        self.direct.stage(base_path, source_uri, dest_uri).await
    }

    async fn stage_for_vm(&self, job: &StageJob<'_>) -> Result<StagedHow, StageError> {
        match self.route(job) {
            Ok((addr, label, host, image)) => {
                self.through_depot(job, addr, label, host, image).await
            }
            Err(reason) => {
                tracing::info!(vm = job.vm, %reason, "base copied directly");
                (job.progress)(StagingProgress {
                    by: "direct copy".into(),
                    state: "copying".into(),
                    deadline_unix_ms: job.deadline_unix_ms,
                    ..StagingProgress::default()
                });
                let staged = self
                    .direct
                    .stage(job.base_path, job.source_uri, job.dest_uri)
                    .await?;
                Ok(StagedHow::DirectCopy { reason, staged })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::migration::plan::{Action, Step};
    use crate::migration::stage::ImageDirView;
    use crate::migration::testing::{
        RecordingAnnouncer, assert_migrated_incrementally, assert_rolled_back_clean,
        stage_base_result, vm1_plan,
    };
    use crate::migration::{
        MigrationDeps, MigrationRun, MigrationStatus, StepError, run_migration_detailed,
    };
    use viola_hypervisor::Hypervisor;
    use viola_hypervisor::fake::{FakeCluster, sample_domain_xml};

    const A: &str = "fake://a1";
    const B: &str = "fake://b1";
    const PART: &str = "4f1c0a9b8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170f5e4d3c";
    const IMAGE: &str = "guest-manifest-hash";

    fn part_path(dir: &str) -> String {
        format!("{dir}/{PART}.qcow2")
    }

    fn with_metadata(xml: &str, image: &str) -> String {
        xml.replace(
            "</devices></domain>",
            &format!(
                "</devices><metadata><viola:image xmlns:viola='{METADATA_NS}' ref='{image}'/></metadata></domain>"
            ),
        )
    }

    fn st(state: StageState, done: u64, total: u64, chain: &[&str]) -> StageStatus {
        StageStatus {
            stage_id: "vm1-0001".into(),
            state,
            accepted: true,
            predicted_ready_unix_ms: Some(unix_ms() + 1000),
            ready_unix_ms: None,
            deadline_unix_ms: 0,
            bytes_total: total,
            bytes_done: done,
            overlay: None,
            chain: chain.iter().map(PathBuf::from).collect(),
            message: match state {
                StageState::Failed => "no peer holds part x".into(),
                _ => String::new(),
            },
        }
    }

    /// A depot that answers from a script: the first status to `stage`, then one per `status`
    /// call (the last one repeats); `on_ready` runs when it answers `ready`.
    #[derive(Default)]
    struct FakeDepot {
        script: Mutex<VecDeque<StageStatus>>,
        requests: Mutex<Vec<StageRequest>>,
        polls: Mutex<u32>,
        /// Where the stager connected, in order.
        connected: Mutex<Vec<SocketAddr>>,
        unreachable: bool,
        on_ready: Option<Box<dyn Fn() + Send + Sync>>,
    }

    impl FakeDepot {
        fn next(&self) -> StageStatus {
            let mut script = self.script.lock().unwrap();
            let s = if script.len() > 1 {
                script.pop_front().unwrap()
            } else {
                script.front().cloned().expect("script")
            };
            if s.state == StageState::Ready
                && let Some(f) = &self.on_ready
            {
                f();
            }
            s
        }
    }

    /// Where the test stagers find every site's depot.
    const SITE_B_DEPOT: &str = "198.18.2.11:7410";

    struct FakeLink(Arc<FakeDepot>);
    struct FakeSession(Arc<FakeDepot>);

    impl DepotSession for FakeSession {
        fn stage(&self, req: StageRequest) -> BoxFuture<'_, Result<StageStatus, ClientError>> {
            self.0.requests.lock().unwrap().push(req);
            let s = self.0.next();
            Box::pin(async move { Ok(s) })
        }
        fn status<'a>(
            &'a self,
            stage_id: &'a str,
        ) -> BoxFuture<'a, Result<StageStatus, ClientError>> {
            assert_eq!(stage_id, "vm1-0001");
            *self.0.polls.lock().unwrap() += 1;
            let s = self.0.next();
            Box::pin(async move { Ok(s) })
        }
        fn images(&self) -> BoxFuture<'_, Result<Vec<ImageEntry>, ClientError>> {
            Box::pin(async { Err(ClientError::Refused("a staging-only fake".into())) })
        }
        fn upload<'a>(&'a self, _: Upload<'a>) -> BoxFuture<'a, Result<UploadReport, ClientError>> {
            Box::pin(async { Err(ClientError::Refused("a staging-only fake".into())) })
        }
    }

    impl DepotLink for FakeLink {
        fn connect(
            &self,
            addr: SocketAddr,
        ) -> BoxFuture<'_, Result<Box<dyn DepotSession>, ClientError>> {
            let depot = Arc::clone(&self.0);
            depot.connected.lock().unwrap().push(addr);
            Box::pin(async move {
                if depot.unreachable {
                    return Err(ClientError::Refused("connection refused".into()));
                }
                Ok(Box::new(FakeSession(depot)) as Box<dyn DepotSession>)
            })
        }
    }

    fn stager(
        depot: &Arc<FakeDepot>,
        direct: LocalCopyStager,
        depot_sites: &[&str],
    ) -> DepotStager {
        let addr: SocketAddr = SITE_B_DEPOT.parse().unwrap();
        let hosts = [(A, "a1", "a"), (B, "b1", "b")]
            .into_iter()
            .map(|(uri, name, site)| {
                (
                    uri.to_owned(),
                    DepotHost {
                        name: name.into(),
                        site: site.into(),
                        agent: None,
                    },
                )
            })
            .collect();
        DepotStager::new(
            direct,
            depot_sites
                .iter()
                .map(|s| ((*s).to_owned(), addr))
                .collect(),
            hosts,
            Arc::new(FakeLink(Arc::clone(depot))),
        )
        .with_poll_interval(Duration::from_millis(2))
    }

    /// Runs `stage_for_vm` for vm1's base `base` with `xml`; returns the result and the
    /// progress seen.
    async fn stage(
        s: &DepotStager,
        base: &str,
        xml: &str,
        deadline_in: Duration,
    ) -> (Result<StagedHow, StageError>, Vec<StagingProgress>) {
        let seen = Mutex::new(Vec::new());
        let progress = |p: StagingProgress| seen.lock().unwrap().push(p);
        let job = StageJob {
            vm: "vm1",
            base_path: base,
            source_uri: A,
            dest_uri: B,
            domain_xml: xml,
            deadline_unix_ms: unix_ms() + deadline_in.as_millis() as u64,
            progress: &progress,
        };
        let r = s.stage_for_vm(&job).await;
        (r, seen.into_inner().unwrap())
    }

    /// Runs `stage_for_vm` for vm1 over `base`, its domain naming `IMAGE`, 10 s before the
    /// deadline.
    async fn stage_image(
        s: &DepotStager,
        base: &str,
    ) -> (Result<StagedHow, StageError>, Vec<StagingProgress>) {
        stage(s, base, &vm_xml(base, Some(IMAGE)), Duration::from_secs(10)).await
    }

    /// Runs `stage_for_vm` for vm1 over a depot part at `/img`, with a depot at site b only.
    async fn stage_at_site_b(
        depot: &Arc<FakeDepot>,
        deadline_in: Duration,
    ) -> (Result<StagedHow, StageError>, Vec<StagingProgress>) {
        let base = part_path("/img");
        let s = stager(depot, LocalCopyStager::default(), &["b"]);
        stage(&s, &base, &vm_xml(&base, Some(IMAGE)), deadline_in).await
    }

    fn vm_xml(base: &str, image: Option<&str>) -> String {
        let xml = sample_domain_xml("vm1", "/img/vm1.qcow2", base, "52:54:00:00:00:01");
        match image {
            Some(i) => with_metadata(&xml, i),
            None => xml,
        }
    }

    fn scripted(script: Vec<StageStatus>) -> Arc<FakeDepot> {
        Arc::new(FakeDepot {
            script: Mutex::new(script.into()),
            ..FakeDepot::default()
        })
    }

    #[test]
    fn the_domain_metadata_names_the_image() {
        let base = part_path("/img");
        assert_eq!(
            depot_image(&vm_xml(&base, Some(IMAGE))).unwrap().as_deref(),
            Some(IMAGE)
        );
        assert_eq!(depot_image(&vm_xml(&base, None)).unwrap(), None);
        // Same local name in another namespace is someone else's metadata.
        let other = vm_xml(&base, None).replace(
            "</devices></domain>",
            "</devices><metadata><x:image xmlns:x='urn:other' ref='nope'/></metadata></domain>",
        );
        assert_eq!(depot_image(&other).unwrap(), None);
        assert!(depot_image("<domain>").is_err());
    }

    #[test]
    fn only_content_addressed_file_names_are_depot_parts() {
        assert!(is_depot_part(&part_path("/var/lib/viola/images")));
        assert!(is_depot_part(&format!("/x/{PART}.raw")));
        assert!(!is_depot_part("/var/lib/viola/images/base.qcow2"));
        assert!(!is_depot_part(&format!("/x/{}.qcow2", PART.to_uppercase())));
        assert!(!is_depot_part(&format!("/x/{PART}.vmdk")));
        assert!(!is_depot_part(&format!("/x/{}.qcow2", &PART[1..])));
    }

    #[tokio::test]
    async fn stages_through_the_destination_sites_depot_and_reports_progress() {
        let base = part_path("/var/lib/viola/images");
        let laid = part_path("/srv/lab/images/b1");
        let depot = scripted(vec![
            st(StageState::Resolving, 0, 0, &[]),
            st(StageState::Fetching, 0, 100, &[]),
            st(StageState::Fetching, 60, 100, &[]),
            st(StageState::Assembling, 100, 100, &[]),
            st(StageState::Ready, 100, 100, &[&laid]),
        ]);
        let s = stager(&depot, LocalCopyStager::default(), &["a", "b"]);
        let (r, seen) = stage_image(&s, &base).await;
        match r.unwrap() {
            StagedHow::Depot {
                site,
                image,
                bytes_fetched,
                chain,
                ..
            } => {
                assert_eq!(site, "b");
                assert_eq!(image, IMAGE);
                assert_eq!(bytes_fetched, 100);
                assert_eq!(chain, vec![PathBuf::from(&laid)]);
            }
            other => panic!("{other:?}"),
        }
        let reqs = depot.requests.lock().unwrap();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].image, IMAGE);
        assert_eq!(reqs[0].vm, "vm1");
        assert_eq!(reqs[0].host, "b1", "the destination host, not the source");
        assert!(
            reqs[0].chain_only,
            "the migration creates the VM's overlay itself"
        );
        assert!(reqs[0].deadline_unix_ms > unix_ms());
        let states: Vec<_> = seen.iter().map(|p| p.state.as_str()).collect();
        assert_eq!(
            states,
            ["resolving", "fetching", "fetching", "assembling", "ready"]
        );
        assert!(seen.iter().all(|p| p.by == "depot b"));
        assert_eq!(seen[2].bytes_done, 60);
        assert_eq!(
            *depot.connected.lock().unwrap(),
            [SITE_B_DEPOT.parse().unwrap()]
        );
    }

    #[tokio::test]
    async fn a_host_with_its_own_depot_agent_is_staged_through_it_not_its_sites_depot() {
        let base = part_path("/var/lib/viola/images");
        let depot = scripted(vec![st(StageState::Ready, 100, 100, &[&base])]);
        let agent: SocketAddr = "198.18.2.21:7410".parse().unwrap();
        // With and without a depot for site b: the agent is asked either way.
        for sites in [&["a", "b"][..], &["a"][..]] {
            depot.connected.lock().unwrap().clear();
            let mut s = stager(&depot, LocalCopyStager::default(), sites);
            s.hosts.get_mut(B).unwrap().agent = Some(agent);
            let (r, seen) = stage_image(&s, &base).await;
            match r.unwrap() {
                StagedHow::Depot { site, .. } => assert_eq!(site, "b (b1's own depot)"),
                other => panic!("{other:?}"),
            }
            assert_eq!(*depot.connected.lock().unwrap(), [agent]);
            assert!(seen.iter().all(|p| p.by == "depot b (b1's own depot)"));
        }
        let reqs = depot.requests.lock().unwrap();
        assert!(reqs.iter().all(|r| r.host == "b1" && r.chain_only));
    }

    #[tokio::test]
    async fn a_failed_staging_fails_the_step_instead_of_copying() {
        let depot = scripted(vec![
            st(StageState::Fetching, 0, 100, &[]),
            st(StageState::Failed, 10, 100, &[]),
        ]);
        let (r, _) = stage_at_site_b(&depot, Duration::from_secs(10)).await;
        match r {
            Err(StageError::DepotRefused { state, message, .. }) => {
                assert_eq!(state, "failed");
                assert!(message.contains("no peer holds"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_staging_not_ready_by_the_deadline_fails_at_the_deadline() {
        let depot = scripted(vec![st(StageState::Fetching, 5, 100, &[])]);
        let t = tokio::time::Instant::now();
        let (r, seen) = stage_at_site_b(&depot, Duration::from_millis(150)).await;
        assert!(
            matches!(r, Err(StageError::DepotLate { bytes_done: 5, .. })),
            "{r:?}"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(*depot.polls.lock().unwrap() > 2, "progress was followed");
        assert!(!seen.is_empty());
    }

    #[tokio::test]
    async fn a_chain_ending_elsewhere_is_refused() {
        let other = format!("/srv/b1/{}.qcow2", "0".repeat(64));
        let depot = scripted(vec![st(StageState::Ready, 0, 0, &[&other])]);
        let (r, _) = stage_at_site_b(&depot, Duration::from_secs(10)).await;
        assert!(matches!(r, Err(StageError::ChainMismatch { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn an_unreachable_depot_fails_the_step() {
        let depot = Arc::new(FakeDepot {
            unreachable: true,
            ..FakeDepot::default()
        });
        let (r, _) = stage_at_site_b(&depot, Duration::from_secs(10)).await;
        assert!(
            matches!(r, Err(StageError::DepotUnreachable { ref site, .. }) if site == "b"),
            "{r:?}"
        );
    }

    /// Direct-copy views of two image directories under `root`, with `file` at a1.
    fn direct(root: &Path, file: &str) -> LocalCopyStager {
        let mut views = BTreeMap::new();
        for (uri, h) in [(A, "a1"), (B, "b1")] {
            let dir = root.join(h);
            std::fs::create_dir_all(&dir).unwrap();
            views.insert(
                uri.to_owned(),
                ImageDirView {
                    host_dir: "/img".into(),
                    local_dir: dir,
                },
            );
        }
        std::fs::write(root.join("a1").join(file), b"a base image").unwrap();
        LocalCopyStager::new(views)
    }

    #[tokio::test]
    async fn without_a_depot_route_the_base_is_copied_directly_and_the_reason_recorded() {
        let part = format!("{PART}.qcow2");
        let cases = [
            // (depot sites, base file, image in metadata, expected reason)
            (
                vec![],
                part.as_str(),
                Some(IMAGE),
                "no depot configured for site b",
            ),
            (vec!["b"], part.as_str(), None, "records no depot image"),
            (
                vec!["b"],
                "base.qcow2",
                Some(IMAGE),
                "was not laid down by a depot",
            ),
        ];
        for (sites, file, image, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let depot = scripted(vec![st(StageState::Ready, 0, 0, &[])]);
            let s = stager(&depot, direct(dir.path(), file), &sites);
            let base = format!("/img/{file}");
            let (r, seen) = stage(&s, &base, &vm_xml(&base, image), Duration::from_secs(10)).await;
            match r.unwrap() {
                StagedHow::DirectCopy { reason, staged } => {
                    assert!(reason.contains(want), "{reason} lacks {want}");
                    assert!(staged.copied);
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(
                std::fs::read(dir.path().join("b1").join(file)).unwrap(),
                b"a base image"
            );
            assert!(
                depot.requests.lock().unwrap().is_empty(),
                "depot asked: {want}"
            );
            assert_eq!(seen[0].by, "direct copy");
        }
    }

    /// vm1 runs at a1 over a depot-laid base; b1 has nothing.
    fn cluster() -> (FakeCluster, String) {
        let cluster = FakeCluster::new();
        let a = cluster.host(A);
        cluster.host(B);
        let base = part_path("/img");
        cluster.add_image(A, &base, 1 << 30, None);
        cluster.add_image(A, "/img/vm1.qcow2", 1 << 30, Some(&base));
        a.define(&vm_xml(&base, Some(IMAGE))).unwrap();
        a.start("vm1").unwrap();
        (cluster, base)
    }

    /// Migrates vm1 from a1 to b1 staging through `stager`; returns the run, the statuses
    /// seen, and what the overlay was told.
    async fn migrate(
        cluster: &FakeCluster,
        stager: DepotStager,
        timeout_ms: u64,
    ) -> (MigrationRun, Vec<MigrationStatus>, RecordingAnnouncer) {
        let announcer = RecordingAnnouncer::default();
        let deps = MigrationDeps {
            connector: Arc::new(cluster.clone()),
            stager,
            announcer: announcer.clone(),
            poll_interval: Duration::from_millis(5),
            reconnect_timeout: Duration::from_millis(50),
        };
        let plan = vm1_plan(A, B, timeout_ms);
        let (tx, mut rx) = watch::channel(MigrationStatus::default());
        let watcher = tokio::spawn(async move {
            let mut seen = Vec::new();
            while rx.changed().await.is_ok() {
                seen.push(rx.borrow_and_update().clone());
            }
            seen
        });
        let run = run_migration_detailed(plan, &deps, &tx, &CancellationToken::new()).await;
        drop(tx);
        (run, watcher.await.unwrap(), announcer)
    }

    /// A migration whose staging ends in the depot's `script`: rolled back before the move,
    /// with nothing at the destination (not even the base) and the stager's error as cause.
    async fn assert_staging_rolls_back(
        script: Vec<StageStatus>,
        timeout_ms: u64,
        expected: impl FnOnce(&StageError) -> bool,
    ) {
        let (cluster, base) = cluster();
        let depot = scripted(script);
        let (run, _, announcer) = migrate(
            &cluster,
            stager(&depot, LocalCopyStager::default(), &["b"]),
            timeout_ms,
        )
        .await;
        assert_rolled_back_clean(&run, &cluster.host(A), &cluster.host(B), &announcer, |f| {
            f.action == Action::Run(Step::StageBase)
                && matches!(&f.error, StepError::Staging { source, .. } if expected(source))
        });
        assert!(!cluster.has_image(B, &base));
        assert!(
            run.report.records.iter().all(|r| r.action != "Migrate"),
            "{:#?}",
            run.report.records
        );
    }

    #[tokio::test]
    async fn a_migration_stages_through_the_depot_then_copies_only_the_overlay() {
        let (cluster, base) = cluster();
        let c = cluster.clone();
        let laid = base.clone();
        let depot = Arc::new(FakeDepot {
            script: Mutex::new(
                vec![
                    st(StageState::Fetching, 0, 100, &[]),
                    st(StageState::Fetching, 50, 100, &[]),
                    st(StageState::Ready, 100, 100, &[&base]),
                ]
                .into(),
            ),
            on_ready: Some(Box::new(move || c.add_image(B, &laid, 1 << 30, None))),
            ..FakeDepot::default()
        });
        let (run, statuses, _) = migrate(
            &cluster,
            stager(&depot, LocalCopyStager::default(), &["b"]),
            5_000,
        )
        .await;
        let report = run.report;
        assert_migrated_incrementally(&report);
        assert_eq!(cluster.hosts_running("vm1"), vec![B.to_string()]);
        assert!(cluster.has_image(B, &base) && cluster.has_image(B, "/img/vm1.qcow2"));
        let staged = stage_base_result(&report);
        assert!(
            staged.contains("depot of site b staged image guest-manifest-hash"),
            "{staged}"
        );
        let staging: Vec<_> = statuses.iter().filter_map(|s| s.staging.clone()).collect();
        assert!(
            staging
                .iter()
                .any(|p| p.state == "fetching" && p.bytes_done == 50),
            "{staging:?}"
        );
        assert!(
            statuses
                .iter()
                .all(|s| s.staging.is_none() || s.step == "StageBase")
        );
    }

    #[tokio::test]
    async fn a_failed_depot_staging_rolls_the_migration_back_with_nothing_at_the_destination() {
        let script = vec![
            st(StageState::Fetching, 0, 100, &[]),
            st(StageState::Failed, 0, 100, &[]),
        ];
        assert_staging_rolls_back(script, 5_000, |e| {
            matches!(e, StageError::DepotRefused { .. })
        })
        .await;
    }

    #[tokio::test]
    async fn a_late_depot_staging_rolls_the_migration_back_at_its_timeout() {
        let t = tokio::time::Instant::now();
        let script = vec![st(StageState::Fetching, 1, 100, &[])];
        assert_staging_rolls_back(script, 300, |e| matches!(e, StageError::DepotLate { .. })).await;
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
}
