//! Move announcements to the overlay daemons, over their QUIC control endpoint with mutual TLS
//! and the manager's `adaptmgr` certificate (no unix socket: the manager may run on any host).
//!
//! Who is told: the daemons of the hosts that carry the VM's violin, and only those. The
//! source host's daemon is asked for the violin's member hosts (it is a member: the VM's frames
//! leave through it), the destination must be one of them (else its overlay would drop the
//! VM's frames and the move is refused before anything happens), and each member's daemon is
//! told to expect the VM's MACs at the destination. A host outside the violin would refuse
//! (`NotMember`), so asking it could only fail the migration for nothing.
//!
//! A VM re-instantiated after its host failed is announced the same way before it starts,
//! except that the restart host's daemon names the members (the failed host cannot) and a
//! member that cannot be reached is skipped: with port security the daemons take a managed
//! VM's frames only from where the control plane says it is.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use viola_api::overlay::{ClientError, ControlReply, ControlRequest, request_quic};
use viola_common::identity::Identity;

use crate::inventory::Inventory;
use crate::migration::stage::{AnnounceError, MoveAnnouncer, MoveNotice};

/// How the manager reaches overlay daemons (QUIC in production, fakes in tests).
pub trait OverlayLink: Send + Sync + 'static {
    fn request(
        &self,
        addr: SocketAddr,
        req: ControlRequest,
    ) -> BoxFuture<'_, Result<ControlReply, OverlayLinkError>>;
}

/// Why an overlay daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum OverlayLinkError {
    #[error("cannot load the manager's identity from {dir}")]
    Identity {
        dir: PathBuf,
        #[source]
        source: viola_common::identity::LoadError,
    },
    #[error("control request failed")]
    Client(#[from] ClientError),
}

/// QUIC with mutual TLS and the manager's identity, loaded per announcement so a renewed
/// certificate is picked up without a restart.
pub struct QuicOverlayLink {
    identity_dir: PathBuf,
}

impl QuicOverlayLink {
    pub fn new(identity_dir: PathBuf) -> Self {
        Self { identity_dir }
    }
}

impl OverlayLink for QuicOverlayLink {
    fn request(
        &self,
        addr: SocketAddr,
        req: ControlRequest,
    ) -> BoxFuture<'_, Result<ControlReply, OverlayLinkError>> {
        Box::pin(async move {
            let me = Identity::load_dir(&self.identity_dir).map_err(|source| {
                OverlayLinkError::Identity {
                    dir: self.identity_dir.clone(),
                    source,
                }
            })?;
            Ok(request_quic(&me, addr, &req).await?)
        })
    }
}

/// A host as the announcer knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayHost {
    /// `site/host`, as the overlay daemons name it.
    pub label: String,
    /// Its overlay daemon's address (`None`: no overlay daemon on that host).
    pub overlay_addr: Option<SocketAddr>,
}

/// Tells the overlay daemons of a VM's violin to expect its MACs at the destination.
/// Expectations expire in the overlay by themselves, so withdrawing sends nothing.
#[derive(Clone)]
pub struct OverlayAnnouncer {
    /// By libvirt URI (what the migration names hosts by).
    hosts: Arc<BTreeMap<String, OverlayHost>>,
    inventory: Arc<Inventory>,
    link: Arc<dyn OverlayLink>,
}

impl OverlayAnnouncer {
    pub fn new(
        hosts: BTreeMap<String, OverlayHost>,
        inventory: Arc<Inventory>,
        link: Arc<dyn OverlayLink>,
    ) -> Self {
        Self {
            hosts: Arc::new(hosts),
            inventory,
            link,
        }
    }

    fn overlay_of_label(&self, label: &str) -> Option<SocketAddr> {
        self.hosts
            .values()
            .find(|h| h.label == label)
            .and_then(|h| h.overlay_addr)
    }

    /// The violin id of `vm`: its recorded violin, else the violin whose members name it.
    fn violin_of(&self, vm: &str) -> Result<u32, String> {
        let recorded = self
            .inventory
            .vm(vm)
            .map_err(|e| viola_common::errors::chain(&e))?
            .and_then(|v| v.violin);
        let violins = self
            .inventory
            .violins()
            .map_err(|e| viola_common::errors::chain(&e))?;
        match recorded {
            Some(name) => violins
                .iter()
                .find(|v| v.name == name)
                .map(|v| v.vni)
                .ok_or_else(|| format!("unknown violin {name}")),
            None => violins
                .iter()
                .find(|v| v.vms.iter().any(|m| m == vm))
                .map(|v| v.vni)
                .ok_or_else(|| "the VM is in no violin".to_owned()),
        }
    }

    async fn ask(&self, addr: SocketAddr, req: ControlRequest) -> Result<ControlReply, String> {
        self.link
            .request(addr, req)
            .await
            .map_err(|e| format!("overlay at {addr}: {}", viola_common::errors::chain(&e)))
    }

    /// The hosts that carry violin `vni` as `asked`'s overlay daemon sees them, `asked` first.
    async fn members_seen_by(&self, asked: &OverlayHost, vni: u32) -> Result<Vec<String>, String> {
        let addr = asked
            .overlay_addr
            .ok_or_else(|| format!("no overlay address configured for {}", asked.label))?;
        let status = match self.ask(addr, ControlRequest::Status).await? {
            ControlReply::Status(s) => s,
            other => return Err(format!("overlay at {addr} answered {other:?} to status")),
        };
        let violin = status
            .switch
            .violin(vni)
            .ok_or_else(|| format!("the overlay at {} does not carry violin {vni}", asked.label))?;
        Ok(std::iter::once(asked.label.clone())
            .chain(violin.members.iter().cloned())
            .collect())
    }

    /// Tells every member's daemon to expect `macs` at `dest`. With `strict`, a member that
    /// cannot be told fails the announcement; without, it is logged and skipped (a host that
    /// failed cannot answer, and the others must still learn where the VM now runs).
    async fn tell_members(
        &self,
        members: &[String],
        vm: &str,
        macs: &[String],
        vni: u32,
        dest: &str,
        strict: bool,
    ) -> Result<(), String> {
        for member in members {
            let Some(addr) = self.overlay_of_label(member) else {
                if member == dest {
                    return Err(format!("no overlay address configured for {member}"));
                }
                tracing::warn!(%vm, %member,
                    "violin member with no overlay address in the configuration; it learns the move from the destination's announcement");
                continue;
            };
            let mut failure = None;
            for mac in macs {
                let req = ControlRequest::ExpectMove {
                    violin: vni,
                    mac: mac.clone(),
                    host: dest.to_owned(),
                };
                match self.ask(addr, req).await {
                    Ok(ControlReply::Done) => {}
                    Ok(ControlReply::Refused { reason }) => {
                        failure = Some(format!("overlay of {member} refused: {reason}"));
                    }
                    Ok(other) => failure = Some(format!("overlay of {member} answered {other:?}")),
                    Err(e) => failure = Some(e),
                }
                if failure.is_some() {
                    break;
                }
            }
            match failure {
                None => {
                    tracing::info!(%vm, %member, violin = vni, to = %dest, "move announced");
                }
                Some(failure) if strict || member == dest => return Err(failure),
                Some(failure) => {
                    tracing::warn!(%vm, %member, error = %failure, "violin member not told of the move");
                }
            }
        }
        Ok(())
    }

    async fn announce(&self, n: &MoveNotice) -> Result<(), String> {
        let vni = self.violin_of(&n.vm)?;
        let source = self.host(&n.source_uri)?;
        let dest = self.host(&n.dest_uri)?;
        if source.overlay_addr.is_none() {
            tracing::warn!(vm = %n.vm, source = %source.label,
                "no overlay daemon configured at the source; the move is not announced");
            return Ok(());
        }
        // The source's daemon is a member (the VM's frames leave through it) and is alive.
        let members = self.members_seen_by(source, vni).await?;
        if !members.contains(&dest.label) {
            return Err(format!(
                "{} is not a member of violin {vni} (members: {}): its overlay would drop the VM's frames",
                dest.label,
                members.join(", ")
            ));
        }
        self.tell_members(&members, &n.vm, &n.macs, vni, &dest.label, true)
            .await
    }

    /// Tells the violin's daemons that `vm`, restarted at `dest_uri` after its host failed,
    /// will send from there (with port security, a managed VM's frames are taken only from
    /// where the control plane says it is). The failed host cannot answer, so the destination's
    /// daemon names the members, and members that cannot be reached are skipped.
    pub async fn announce_restart(
        &self,
        vm: &str,
        macs: &[String],
        dest_uri: &str,
    ) -> Result<(), String> {
        let vni = self.violin_of(vm)?;
        let dest = self.host(dest_uri)?;
        if dest.overlay_addr.is_none() {
            tracing::warn!(%vm, dest = %dest.label,
                "no overlay daemon configured at the restart host; nothing announced");
            return Ok(());
        }
        let members = self.members_seen_by(dest, vni).await?;
        self.tell_members(&members, vm, macs, vni, &dest.label, false)
            .await
    }

    fn host(&self, uri: &str) -> Result<&OverlayHost, String> {
        self.hosts
            .get(uri)
            .ok_or_else(|| format!("no host with libvirt URI {uri} in the configuration"))
    }
}

impl MoveAnnouncer for OverlayAnnouncer {
    async fn expect_move(&self, n: &MoveNotice) -> Result<(), AnnounceError> {
        self.announce(n).await.map_err(|reason| AnnounceError {
            vm: n.vm.clone(),
            reason,
        })
    }

    async fn withdraw_move(&self, n: &MoveNotice) -> Result<(), AnnounceError> {
        tracing::info!(vm = %n.vm, "move withdrawn; overlay expectations expire by themselves");
        Ok(())
    }
}
