//! The manager's QUIC + mutual-TLS endpoint: monitors push reports, the CLI asks questions and
//! gives orders. Every connection's certificate is checked: monitors may only report about
//! their own host; `cli` and `adaptmgr` identities (administrators) may read and change
//! anything; a tenant's user (role `user`, of a tenant in `[[tenants]]`) may only make, see
//! and remove its own violins and VMs, and list and import its own images (see
//! [`crate::tenants`]).

use std::sync::Arc;

use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use viola_common::identity::{self, Identity, PeerIdentity, Role};

use crate::inventory::HostRecord;
use crate::lifecycle;
use crate::manager::Manager;
use crate::tenants::{Caller, TenantConfig};
use viola_api::adaptation::DecisionRecord;
use viola_api::manager::{Request, Response};
use viola_api::wire::{self, FrameError};

/// Accepts connections until `token` is cancelled; then waits for the open ones to finish
/// their current request (bounded by the endpoint's close).
///
/// A connection whose peer's certificate is revoked while it is open is closed
/// ([`Identity::until_revoked`]); `identity` is the manager's, whose CRL is in force.
pub async fn serve(
    endpoint: quinn::Endpoint,
    identity: Identity,
    manager: Arc<Manager>,
    token: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    tracing::warn!(error = %e, "connection task failed");
                }
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let manager = Arc::clone(&manager);
                let token = token.clone();
                let identity = identity.clone();
                connections.spawn(async move {
                    match incoming.await {
                        Ok(conn) => tokio::select! {
                            () = handle_connection(conn.clone(), manager, token) => {}
                            () = identity.until_revoked(&conn) => {
                                conn.close(identity::CLOSE_REVOKED.into(), b"revoked");
                            }
                        },
                        Err(e) => tracing::info!(error = %e, "handshake failed"),
                    }
                });
            }
        }
    }
    endpoint.close(0u32.into(), b"manager shutting down");
    while connections.join_next().await.is_some() {}
}

async fn handle_connection(
    conn: quinn::Connection,
    manager: Arc<Manager>,
    token: CancellationToken,
) {
    let peer = match identity::peer_identity(&conn) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "peer without a usable identity");
            conn.close(1u32.into(), b"no identity");
            return;
        }
    };
    tracing::debug!(%peer, "connected");
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            accepted = conn.accept_bi() => {
                let Ok((send, recv)) = accepted else { break };
                // Bounded work per connection: a peer cannot pile up unlimited requests.
                if streams.len() >= 32 {
                    tracing::warn!(%peer, "too many concurrent requests; dropping one");
                    continue;
                }
                let manager = Arc::clone(&manager);
                let peer = peer.clone();
                let token = token.clone();
                streams.spawn(async move {
                    if let Err(e) = handle_stream(send, recv, &manager, &peer, token).await {
                        tracing::info!(%peer, error = %viola_common::errors::chain(&e), "request failed");
                    }
                });
            }
        }
    }
    if token.is_cancelled() {
        // Shutting down: running requests see the token (a migration rolls back); whatever
        // has not ended by then is dropped.
        let drain = async { while streams.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            streams.abort_all();
        }
    }
    // The peer went away: what it started still ends, so that a migration a CLI or a guest
    // asked for finishes (or rolls back) with the VM in one place, journaled as usual.
    while streams.join_next().await.is_some() {}
}

/// How long running requests get to end when the manager shuts down.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

fn error(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

/// Who may send what: `Ok(None)` for a monitor's report, else the caller the request acts
/// for (whose ownership the request's handler applies).
pub fn authorize(
    peer: &PeerIdentity,
    req: &Request,
    tenants: &[TenantConfig],
) -> Result<Option<Caller>, String> {
    let from_host = match req {
        Request::Report(r) => Some((&r.host, &r.site, "report about")),
        Request::GuestAsk(a) => Some((&a.host, &a.site, "forward requests of guests on")),
        _ => None,
    };
    if let Some((host, site, what)) = from_host {
        peer.require_role(&[Role::Monitor])
            .map_err(|e| e.to_string())?;
        if *host != peer.host || *site != peer.site {
            return Err(format!(
                "{peer} may only {what} {}/{}, not {site}/{host}",
                peer.site, peer.host
            ));
        }
        return Ok(None);
    }
    let caller = Caller::of(peer).ok_or_else(|| {
        peer.require_role(&[Role::Cli, Role::Adaptmgr, Role::User])
            .map_or_else(
                |e| e.to_string(),
                |()| format!("{peer} may not ask the manager"),
            )
    })?;
    if let Caller::Tenant(tenant) = &caller {
        if !tenants.iter().any(|t| &t.name == tenant) {
            return Err(format!(
                "tenant {tenant:?} is not configured on this manager (no [[tenants]] table names it)"
            ));
        }
        let tenants_may = matches!(
            req,
            Request::ListVms
                | Request::ViolinCreate(_)
                | Request::ViolinList
                | Request::ViolinShow { .. }
                | Request::ViolinDelete { .. }
                | Request::VmCreate(_)
                | Request::VmStart { .. }
                | Request::VmStop { .. }
                | Request::VmDelete { .. }
                | Request::VmDeadline(_)
                | Request::ImageList
                | Request::ImageImport(_)
        );
        if !tenants_may {
            return Err(format!(
                "{peer} is a user of tenant {tenant}: only an administrator may {}",
                admin_only_what(req)
            ));
        }
    }
    Ok(Some(caller))
}

/// What an administrator-only request does, for the refusal.
fn admin_only_what(req: &Request) -> &'static str {
    match req {
        Request::ListHosts => "list hosts",
        Request::Resize(_) => "resize VMs",
        Request::Migrate(_) | Request::CancelMigration { .. } => "migrate VMs",
        Request::Decisions { .. } => "read the policy's decisions",
        Request::PolicyShow => "read the policy",
        _ => "do that",
    }
}

/// The oldest decisions that fit in half a frame (at least one): the CLI asks again after the
/// last one it got.
fn within_frame(decisions: Vec<DecisionRecord>) -> Vec<DecisionRecord> {
    let mut bytes = 0;
    let mut out = Vec::new();
    for d in decisions {
        bytes += serde_json::to_vec(&d).map_or(0, |b| b.len());
        if !out.is_empty() && bytes > wire::MAX_FRAME / 2 {
            break;
        }
        out.push(d);
    }
    out
}

/// `ok(value)`, or the error answer naming the error's chain.
fn answer<T, E: std::error::Error + 'static>(
    result: Result<T, E>,
    ok: impl FnOnce(T) -> Response,
) -> Response {
    result.map_or_else(|e| error(viola_common::errors::chain(&e)), ok)
}

/// Runs `work` while writing the frames it sends on `rx` to the peer (a peer that went away does
/// not stop the work); its result. What is still queued when it ends stays in `rx`.
async fn forwarding<T>(
    send: &mut quinn::SendStream,
    rx: &mut mpsc::Receiver<Response>,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            Some(frame) = rx.recv() => {
                let _ = wire::write_frame(send, &frame).await;
            }
        }
    }
}

/// Writes the frames still queued in `rx` to the peer.
async fn forward_queued(send: &mut quinn::SendStream, rx: &mut mpsc::Receiver<Response>) {
    while let Ok(frame) = rx.try_recv() {
        let _ = wire::write_frame(send, &frame).await;
    }
}

async fn handle_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    manager: &Manager,
    peer: &PeerIdentity,
    token: CancellationToken,
) -> Result<(), FrameError> {
    let Some(req) = wire::read_frame::<Request>(&mut recv).await? else {
        return Ok(());
    };
    let caller = match authorize(peer, &req, &manager.cfg.tenants) {
        Ok(caller) => caller.unwrap_or(Caller::Admin),
        Err(reason) => {
            tracing::warn!(%peer, %reason, "request refused");
            wire::write_frame(&mut send, &error(reason)).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let chain = |e: &(dyn std::error::Error + 'static)| viola_common::errors::chain(e);
    let ack = |()| Response::Ack;
    let response = match req {
        Request::Report(report) => answer(manager.handle_report(report).await, ack),
        Request::ListHosts => answer(manager.inventory.hosts(), |h| {
            Response::Hosts(h.iter().map(HostRecord::view).collect())
        }),
        Request::ListVms => match (manager.inventory.vms(), manager.inventory.violins()) {
            (Ok(v), Ok(violins)) => Response::Vms(lifecycle::vm_views(&caller, &v, &violins)),
            (Err(e), _) | (_, Err(e)) => error(chain(&e)),
        },
        Request::ViolinCreate(create) => {
            answer(manager.create_violin(&caller, create).await, |v| {
                Response::Violins(vec![v])
            })
        }
        Request::ViolinList => answer(manager.list_violins(&caller), Response::Violins),
        Request::ViolinShow { name } => match manager.list_violins(&caller) {
            Ok(v) => match v.into_iter().find(|v| v.name == name) {
                Some(v) => Response::Violins(vec![v]),
                None => error(format!("no violin named {name:?}")),
            },
            Err(e) => error(chain(&e)),
        },
        Request::ViolinDelete { name, force } => {
            answer(manager.delete_violin(&caller, &name, force).await, ack)
        }
        Request::VmCreate(create) => {
            let (tx, mut rx) = mpsc::channel(64);
            let run = manager.create_vms(&caller, create, tx);
            answer(forwarding(&mut send, &mut rx, run).await, Response::Vms)
        }
        Request::ImageList => {
            let (tx, mut rx) = mpsc::channel(16);
            let images = manager.list_images(&caller, &tx).await;
            drop(tx);
            while let Some(step) = rx.recv().await {
                let _ = wire::write_frame(&mut send, &step).await;
            }
            Response::Images(images)
        }
        Request::ImageImport(import) => {
            let (tx, mut rx) = mpsc::channel(64);
            let result = {
                let mut body = (&mut recv).take(import.size);
                let run = manager.import_image(&caller, import, &mut body, &tx);
                forwarding(&mut send, &mut rx, run).await
            };
            forward_queued(&mut send, &mut rx).await;
            match result {
                Ok(image) => Response::Images(vec![image]),
                Err(e) => {
                    // Whatever of the body was not read is not wanted.
                    let _ = recv.stop(0u32.into());
                    error(chain(&e))
                }
            }
        }
        Request::VmStart { vm } => answer(manager.start_vm(&caller, &vm).await, ack),
        Request::VmStop { vm } => answer(manager.stop_vm(&caller, &vm).await, ack),
        Request::VmDelete { vm } => answer(manager.delete_vm(&caller, &vm).await, ack),
        Request::VmDeadline(d) => answer(manager.set_deadline(&caller, d).await, ack),
        Request::Resize(r) => answer(manager.resize(r).await, ack),
        Request::Decisions { after_seq, limit } => {
            let limit = (limit as usize).clamp(1, 500);
            answer(manager.inventory.decisions_after(after_seq, limit), |d| {
                Response::Decisions(within_frame(d))
            })
        }
        Request::PolicyShow => Response::Policy(Box::new(manager.cfg.policy.view())),
        Request::CancelMigration { vm } => {
            if manager.cancel_migration(&vm) {
                Response::Ack
            } else {
                error(format!("no migration of {vm} is running"))
            }
        }
        Request::GuestAsk(ask) => {
            let (tx, mut rx) = mpsc::channel(16);
            let run = manager.guest_ask(ask, tx, token.child_token());
            // A monitor that went away does not stop a move the guest asked for.
            let response = forwarding(&mut send, &mut rx, run).await;
            // The guest's answer may still be queued when a move ends at once.
            forward_queued(&mut send, &mut rx).await;
            response
        }
        Request::Migrate(m) => {
            let (tx, mut rx) = mpsc::channel(16);
            let cancel = token.child_token();
            let run = manager.migrate(m, tx, cancel);
            answer(forwarding(&mut send, &mut rx, run).await, |report| {
                Response::Migrated(Box::new(report))
            })
        }
    };
    wire::write_frame(&mut send, &response).await?;
    let _ = send.finish();
    Ok(())
}
