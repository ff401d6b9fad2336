//! The `viola-overlay` driver around the [`Switch`] core. Runs on one current-thread runtime
//! inside a [`tokio::task::LocalSet`]: the switch is shared by the tasks through
//! `Rc<RefCell<_>>`, so a frame goes from TAP to QUIC (and back) without crossing a channel.
//!
//! - [`run`] (here): wiring the parts together and supervising the tasks.
//! - `net`: the QUIC endpoint and socket options, bridges and TAPs (`ip`).
//! - `switching`: the state the tasks share, carrying out the core's outputs, TAP readers.
//! - `peers`: the peer book without I/O (known hosts, gossip, what to dial when).
//! - `links`: accepting, dialing and serving peer connections.
//! - `violins`: the violins of the TOML file and those set at run time (state file).
//! - `control`: the control API on the unix socket and over QUIC, and its clients.
//! - `metrics`: Prometheus export.

mod control;
mod links;
mod metrics;
mod net;
mod peers;
mod switching;
mod violins;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use viola_common::identity::{self, Identity, Role};

use self::metrics::Metrics;
use self::peers::PeerBook;
use self::switching::{Shared, State};
use crate::HostId;
use crate::config::OverlayConfig;
use crate::cpu_latency::{CpuLatencyError, CpuLatencyRequest};
use crate::offload::Coalescer;
use crate::sparse::{BusyPoll, SparsePath};
use crate::switch::{LearningLimits, Switch, SwitchConfig};
use viola_api::overlay::{BusyPollStatus, LinkBytes, OverlayStatus};

/// Why the daemon could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Identity files.
    #[error("cannot load identity from {}", .dir.display())]
    Identity {
        /// The directory.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: identity::LoadError,
    },
    /// Our certificate is not an overlay certificate.
    #[error("certificate names {0}, not an overlay daemon")]
    NotOverlay(identity::PeerIdentity),
    /// TLS configuration.
    #[error("TLS configuration")]
    Tls(#[from] identity::TlsConfigError),
    /// A bad value in the configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// Socket, TAP or bridge setup.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Metrics endpoint.
    #[error("metrics endpoint")]
    Metrics(#[from] viola_common::metrics::MetricsError),
    /// The configured CPU wake-up latency request.
    #[error("cpu_wake_latency_us")]
    CpuLatency(#[from] CpuLatencyError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// What every task of the daemon holds.
struct Ctx {
    me: HostId,
    /// This daemon's identity: its CRL decides which open links are closed
    /// ([`Identity::until_revoked`]).
    identity: Identity,
    endpoint: quinn::Endpoint,
    state: State,
    token: CancellationToken,
    cpu_wake_latency_us: Option<u32>,
    send_path: Arc<SparsePath>,
    busy: Arc<BusyPoll>,
    /// Wakes the supervisor when the peer book may have new addresses due.
    dial_due: Notify,
    /// MTU of the TAPs and bridges.
    mtu: u32,
    /// TAPs with virtio-net headers and offloads ([`OverlayConfig::tap_offload`]).
    tap_offload: bool,
    /// Where run-time violins are kept.
    state_file: Option<PathBuf>,
}

impl Ctx {
    fn status(&self) -> OverlayStatus {
        let st = self.state.borrow();
        let mut switch = st.switch.status(Instant::now());
        for v in &mut switch.violins {
            v.runtime = violins::is_runtime(&st.members, v.id);
        }
        OverlayStatus {
            switch,
            rtt_ms: st
                .conns
                .iter()
                .map(|(h, c)| (h.to_string(), c.conn.rtt().as_secs_f64() * 1000.0))
                .collect(),
            driver_drops: st
                .driver_drops
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), *v))
                .collect(),
            refused: st
                .refused
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), *v))
                .collect(),
            link_bytes: {
                let mut bytes: BTreeMap<String, LinkBytes> = st
                    .ended_link_bytes
                    .iter()
                    .map(|(h, b)| (h.to_string(), *b))
                    .collect();
                for (h, c) in &st.conns {
                    bytes
                        .entry(h.to_string())
                        .or_default()
                        .add(LinkBytes::of(&c.conn));
                }
                bytes
            },
            cpu_wake_latency_us: self.cpu_wake_latency_us,
            handoff_yields: self
                .send_path
                .yield_enabled()
                .then(|| self.send_path.yields() + st.tap_path.yields()),
            busy_poll: self.busy.is_enabled().then(|| BusyPollStatus {
                window_us: self.busy.window_us(),
                polls: self.busy.polls(),
            }),
        }
    }
}

/// Runs the daemon until `token` is cancelled. Must be called inside a `LocalSet`.
pub async fn run(cfg: OverlayConfig, token: CancellationToken) -> Result<(), DaemonError> {
    let me_id = Identity::load_dir(&cfg.identity_dir).map_err(|source| DaemonError::Identity {
        dir: cfg.identity_dir.clone(),
        source,
    })?;
    if me_id.id().role != Role::Overlay {
        return Err(DaemonError::NotOverlay(me_id.id().clone()));
    }
    let me = links::host_id(me_id.id());
    info!(host = %me, "starting overlay daemon");
    // Held until `run` returns; the kernel also drops it if the process dies.
    let cpu_latency = cfg
        .cpu_wake_latency_us
        .map(CpuLatencyRequest::hold)
        .transpose()?;
    if let Some(req) = &cpu_latency {
        info!(us = req.us(), "holding a CPU wake-up latency request");
    }

    let busy = Arc::new(BusyPoll::new(Duration::from_micros(u64::from(
        cfg.busy_poll_us,
    ))));
    let send_path = Arc::new(SparsePath::new(cfg.handoff_yield, busy.clone()));
    let (endpoint, udp_inode) = net::endpoint(&cfg, &me_id, send_path.clone())?;
    let local = endpoint.local_addr().map_err(io_err("local address"))?;
    info!(%local, "QUIC endpoint listening");

    let mut switch = Switch::new(
        me.clone(),
        SwitchConfig {
            mac_ageing: Duration::from_secs(cfg.mac_ageing_s),
            learning: LearningLimits {
                per_violin: cfg.max_macs_per_violin,
                per_port: cfg.max_macs_per_port,
                local_rate_per_s: cfg.mac_learn_rate,
                local_burst: cfg.mac_learn_rate.saturating_mul(2),
            },
            mss_clamp: cfg.mss_clamp,
            expect_move_ttl: Duration::from_secs(cfg.expect_move_ttl_s),
            dhcp_mtu: cfg.dhcp_mtu.then(|| u16::try_from(cfg.mtu).ok()).flatten(),
            ..SwitchConfig::default()
        },
    );
    let violins::Setup {
        bridges,
        taps,
        members,
    } = violins::setup(&cfg, &mut switch)?;
    let advertise = cfg.advertise.unwrap_or(local);
    let mut peers = PeerBook::new(me.clone(), advertise);
    for p in &cfg.peers {
        peers.add_address(p.addr, Instant::now());
    }
    let state: State = Rc::new(RefCell::new(Shared {
        switch,
        conns: HashMap::new(),
        ended_link_bytes: HashMap::new(),
        taps,
        members,
        readers: HashMap::new(),
        peers,
        driver_drops: BTreeMap::new(),
        refused: BTreeMap::new(),
        out: Vec::new(),
        serial: 0,
        tap_path: SparsePath::new(cfg.handoff_yield, busy.clone()),
        // Ethernet header and one VLAN tag.
        drop_log: Default::default(),
        kernel_drops: net::KernelDrops::new(udp_inode),
        coalescer: Coalescer::new(),
        coalesced: Vec::new(),
    }));
    let ctx = Rc::new(Ctx {
        me,
        identity: me_id.clone(),
        endpoint: endpoint.clone(),
        state: state.clone(),
        token: token.clone(),
        cpu_wake_latency_us: cpu_latency.as_ref().map(CpuLatencyRequest::us),
        send_path,
        busy: busy.clone(),
        dial_due: Notify::new(),
        mtu: cfg.mtu,
        tap_offload: cfg.tap_offload,
        state_file: cfg.state_file.clone(),
    });

    let mut tasks: JoinSet<()> = JoinSet::new();
    let ids: Vec<_> = state.borrow().taps.keys().copied().collect();
    for v in ids {
        violins::start_reader(&ctx, v);
    }
    tasks.spawn_local(links::acceptor(ctx.clone()));
    tasks.spawn_local(switching::ticker(ctx.clone()));
    if busy.is_enabled() {
        info!(us = busy.window_us(), "busy polling after sparse packets");
        let (busy, token) = (busy.clone(), token.clone());
        tasks.spawn_local(async move { busy.run(token).await });
    }
    tasks.spawn_local(control::serve_unix(ctx.clone(), cfg.control_socket.clone()));
    if let Some(addr) = cfg.metrics {
        let registry: viola_common::metrics::SharedRegistry = Default::default();
        let metrics = Metrics::register(&registry);
        let (bound, serve) = viola_common::metrics::serve(addr, registry, token.clone()).await?;
        info!(%bound, "metrics endpoint");
        tasks.spawn_local(serve);
        tasks.spawn_local(metrics::updater(ctx.clone(), metrics));
    }
    supervise(&ctx, &mut tasks).await;

    info!("shutting down");
    endpoint.close(0u32.into(), b"shutdown");
    let drain = async {
        while tasks.join_next().await.is_some() {}
        violins::stop_readers(&ctx).await;
    };
    if tokio::time::timeout(Duration::from_secs(3), drain)
        .await
        .is_err()
    {
        warn!("tasks did not stop within 3 s; aborting them");
        tasks.abort_all();
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    // TAPs close with the last reference; bridges we made are removed by `bridges`' drop
    // (the TOML's violins) and here (run-time violins not kept in a state file).
    violins::shutdown(&ctx);
    state.borrow_mut().readers.clear();
    state.borrow_mut().taps.clear();
    drop(ctx);
    drop(bridges);
    let _ = std::fs::remove_file(&cfg.control_socket);
    drop(cpu_latency);
    info!("stopped");
    Ok(())
}

/// Until cancelled: dials what the peer book says is due, and reaps finished tasks.
async fn supervise(ctx: &Rc<Ctx>, tasks: &mut JoinSet<()>) {
    loop {
        let next = {
            let mut st = ctx.state.borrow_mut();
            let st = &mut *st;
            let conns = &st.conns;
            // Already connected to whoever is at an address (either direction)?
            let connected = |addr| {
                conns
                    .values()
                    .any(|c| c.conn.remote_address() == addr && c.conn.close_reason().is_none())
            };
            for addr in st.peers.poll_dial(Instant::now(), connected) {
                tasks.spawn_local(links::dial(ctx.clone(), addr));
            }
            st.peers.poll_timeout()
        };
        let due = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = ctx.token.cancelled() => return,
            () = due => {}
            () = ctx.dial_due.notified() => {}
            Some(done) = tasks.join_next() => {
                if let Err(e) = done {
                    warn!("task failed: {e}");
                }
            }
        }
    }
}
