//! Move announcements to the overlay daemons, over their QUIC control endpoint with mutual TLS
//! and the manager's `adaptmgr` certificate (no unix socket: the manager may run on any host).
//!
//! Who is told: the daemons of the hosts that carry the VM's violin, and only those. The
//! source host's daemon is asked for the violin's member hosts (it is a member: the VM's frames
//! leave through it), the destination must be one of them (else its overlay would drop the
//! VM's frames and the move is refused before anything happens), and each member's daemon is
//! told to expect the VM's MACs at the destination. A host outside the violin would refuse
//! (`NotMember`), so asking it could only fail the migration for nothing.

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

    async fn announce(&self, n: &MoveNotice) -> Result<(), String> {
        let vni = self.violin_of(&n.vm)?;
        let host = |uri: &str| {
            self.hosts
                .get(uri)
                .ok_or_else(|| format!("no host with libvirt URI {uri} in the configuration"))
        };
        let source = host(&n.source_uri)?;
        let dest = host(&n.dest_uri)?;
        let Some(source_addr) = source.overlay_addr else {
            tracing::warn!(vm = %n.vm, source = %source.label,
                "no overlay daemon configured at the source; the move is not announced");
            return Ok(());
        };
        let status = match self.ask(source_addr, ControlRequest::Status).await? {
            ControlReply::Status(s) => s,
            other => {
                return Err(format!(
                    "overlay at {source_addr} answered {other:?} to status"
                ));
            }
        };
        let violin = status.switch.violin(vni).ok_or_else(|| {
            format!(
                "the overlay at {} does not carry violin {vni}",
                source.label
            )
        })?;
        // The source first: it is the host the MAC leaves.
        let members: Vec<&str> = std::iter::once(source.label.as_str())
            .chain(violin.members.iter().map(String::as_str))
            .collect();
        if !members.contains(&dest.label.as_str()) {
            return Err(format!(
                "{} is not a member of violin {vni} (members: {}): its overlay would drop the VM's frames",
                dest.label,
                members.join(", ")
            ));
        }
        for member in members {
            let Some(addr) = self.overlay_of_label(member) else {
                if member == dest.label {
                    return Err(format!("no overlay address configured for {member}"));
                }
                tracing::warn!(vm = %n.vm, %member,
                    "violin member with no overlay address in the configuration; it learns the move from the destination's announcement");
                continue;
            };
            for mac in &n.macs {
                let req = ControlRequest::ExpectMove {
                    violin: vni,
                    mac: mac.clone(),
                    host: dest.label.clone(),
                };
                match self.ask(addr, req).await? {
                    ControlReply::Done => {}
                    ControlReply::Refused { reason } => {
                        return Err(format!("overlay of {member} refused: {reason}"));
                    }
                    other => return Err(format!("overlay of {member} answered {other:?}")),
                }
            }
            tracing::info!(vm = %n.vm, %member, violin = vni, to = %dest.label, "move announced");
        }
        Ok(())
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
