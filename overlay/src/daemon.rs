//! The `viola-overlay` driver: TAPs and bridges, the QUIC endpoint, peers, the control API and
//! metrics around the [`Switch`] core. Runs on one current-thread runtime inside a
//! [`tokio::task::LocalSet`]: the switch is shared by the tasks through `Rc<RefCell<_>>`, so a
//! frame goes from TAP to QUIC (and back) without crossing a channel.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use tun_tap::{Iface, Mode};
use viola_common::identity::{self, Identity, Role, alpn};

use crate::HostId;
use crate::api_types::SwitchStatus;
use crate::config::OverlayConfig;
use crate::control::{self, ControlMsg, PeerAddr};
use crate::cpu_latency::{CpuLatencyError, CpuLatencyRequest};
use crate::sparse::{BusyPoll, HandoffSocket, SparsePath};
use crate::switch::{HostPattern, Output, Switch, SwitchConfig, ViolinConfig};
use crate::wire::{self, FRAME_HEADER_LEN, ViolinId};

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

/// Drops counted by the driver (the core counts its own).
const DRIVER_DROPS: [&str; 6] = [
    "tap_full",
    "tap_write",
    "datagram_too_large",
    "no_connection",
    "control_queue_full",
    "send_failed",
];

struct Conn {
    conn: quinn::Connection,
    ctl: mpsc::Sender<ControlMsg>,
    since: Instant,
    serial: u64,
}

struct Shared {
    switch: Switch,
    conns: HashMap<HostId, Conn>,
    taps: HashMap<ViolinId, Rc<AsyncFd<Iface>>>,
    driver_drops: BTreeMap<&'static str, u64>,
    refused: BTreeMap<String, u64>,
    known: BTreeMap<HostId, Vec<SocketAddr>>,
    out: Vec<Output>,
    serial: u64,
    /// Sparse TAP writes: the frame's reader may be woken onto this CPU (see [`crate::sparse`]).
    tap_path: SparsePath,
}

impl Shared {
    fn count(&mut self, what: &'static str) {
        *self.driver_drops.entry(what).or_default() += 1;
    }

    /// Carries out what the core asked for.
    fn execute(&mut self) {
        let mut out = std::mem::take(&mut self.out);
        for o in out.drain(..) {
            match o {
                Output::Transmit { via, datagram } => {
                    let Some(c) = self.conns.get(&via) else {
                        self.count("no_connection");
                        continue;
                    };
                    match c.conn.send_datagram(datagram) {
                        Ok(()) => {}
                        Err(quinn::SendDatagramError::TooLarge) => {
                            let max = c.conn.max_datagram_size().unwrap_or(0);
                            self.switch.set_max_datagram(&via, max);
                            self.count("datagram_too_large");
                        }
                        Err(_) => self.count("send_failed"),
                    }
                }
                Output::Deliver { violin, frame } => {
                    let Some(tap) = self.taps.get(&violin) else {
                        continue;
                    };
                    match tap.get_ref().send(&frame) {
                        Ok(_) => self.tap_path.after_handoff(),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.count("tap_full"),
                        Err(_) => self.count("tap_write"),
                    }
                }
                Output::Control { via, msg } => {
                    let Some(c) = self.conns.get(&via) else {
                        self.count("no_connection");
                        continue;
                    };
                    if c.ctl.try_send(msg).is_err() {
                        self.count("control_queue_full");
                    }
                }
            }
        }
        self.out = out;
    }
}

type State = Rc<RefCell<Shared>>;

/// The status the control API returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// Core status (peers, violins, MAC tables, counters, drops).
    pub switch: serde_json::Value,
    /// Round-trip time per directly connected peer, milliseconds.
    pub rtt_ms: BTreeMap<String, f64>,
    /// Drops counted by the driver.
    pub driver_drops: BTreeMap<String, u64>,
    /// Connections refused, by reason.
    pub refused: BTreeMap<String, u64>,
    /// The CPU wake-up latency request this daemon holds, microseconds.
    #[serde(default)]
    pub cpu_wake_latency_us: Option<u32>,
    /// How often the daemon gave the CPU up after a sparse handoff (None: `handoff_yield` off).
    #[serde(default)]
    pub handoff_yields: Option<u64>,
    /// The busy-poll window in microseconds and the polls made so far (None: off).
    #[serde(default)]
    pub busy_poll: Option<(u64, u64)>,
}

/// A request on the control socket (one JSON object per line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Returns [`DaemonStatus`].
    Status,
    /// Announces that `mac` of `violin` will move to `host` (`site/host`).
    ExpectMove {
        /// Violin id.
        violin: u32,
        /// MAC.
        mac: String,
        /// Destination host.
        host: String,
    },
}

/// Bridges created by us, removed again on drop (also on a failed start).
struct Bridges(Vec<String>);

impl Drop for Bridges {
    fn drop(&mut self) {
        for b in self.0.drain(..) {
            match ip(&["link", "del", &b]) {
                Ok(()) => info!(bridge = %b, "removed bridge"),
                Err(e) => warn!(bridge = %b, "cannot remove bridge: {e}"),
            }
        }
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn disable_ipv6(ifname: &str) {
    // Keep the host's own IPv6 chatter (router solicitations, MLD) off the violin.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    );
}

fn set_buffer(fd: i32, opt_force: i32, opt: i32, size: usize) {
    let size = size as libc::c_int;
    let p = &size as *const libc::c_int as *const libc::c_void;
    let len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: setsockopt with a valid fd and a pointer to a live c_int of the given length.
    let rc = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt_force, p, len) };
    if rc != 0 {
        // SAFETY: as above.
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, p, len) };
    }
}

fn host_id(id: &identity::PeerIdentity) -> HostId {
    format!("{}/{}", id.site, id.host).into()
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
    let me = host_id(me_id.id());
    info!(host = %me, "starting overlay daemon");
    // Held until `run` returns; the kernel also drops it if the process dies.
    let cpu_latency = cfg
        .cpu_wake_latency_us
        .map(CpuLatencyRequest::hold)
        .transpose()?;
    if let Some(req) = &cpu_latency {
        info!(us = req.us(), "holding a CPU wake-up latency request");
    }

    // QUIC endpoint.
    let mut transport = quinn::TransportConfig::default();
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(cfg.quic_initial_mtu.max(1452));
    transport
        .initial_mtu(cfg.quic_initial_mtu)
        .mtu_discovery_config(Some(mtud))
        .min_mtu(cfg.quic_min_mtu.min(cfg.quic_initial_mtu))
        .keep_alive_interval(Some(Duration::from_millis(cfg.keepalive_ms)))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_millis(cfg.idle_timeout_ms))
                .map_err(|e| DaemonError::Config(format!("idle_timeout_ms: {e}")))?,
        ))
        .datagram_receive_buffer_size(Some(cfg.socket_buffer))
        .datagram_send_buffer_size(cfg.socket_buffer);
    let transport = Arc::new(transport);
    let mut server_cfg = me_id.server_config(&[alpn::OVERLAY, alpn::OVERLAY_CONTROL])?;
    server_cfg.transport_config(transport.clone());
    let mut client_cfg = me_id.client_config(alpn::OVERLAY)?;
    client_cfg.transport_config(transport);
    let socket = std::net::UdpSocket::bind(cfg.listen)
        .map_err(io_err(format!("cannot bind UDP {}", cfg.listen)))?;
    set_buffer(
        socket.as_raw_fd(),
        libc::SO_RCVBUFFORCE,
        libc::SO_RCVBUF,
        cfg.socket_buffer,
    );
    set_buffer(
        socket.as_raw_fd(),
        libc::SO_SNDBUFFORCE,
        libc::SO_SNDBUF,
        cfg.socket_buffer,
    );
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(crate::local_runtime::LocalSetRuntime);
    let udp = runtime
        .wrap_udp_socket(socket)
        .map_err(io_err("cannot create QUIC endpoint"))?;
    let busy = Arc::new(BusyPoll::new(Duration::from_micros(u64::from(
        cfg.busy_poll_us,
    ))));
    let send_path = Arc::new(SparsePath::new(cfg.handoff_yield, busy.clone()));
    let udp = Arc::new(HandoffSocket::new(udp, send_path.clone()));
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server_cfg),
        udp,
        runtime,
    )
    .map_err(io_err("cannot create QUIC endpoint"))?;
    endpoint.set_default_client_config(client_cfg);
    let local = endpoint.local_addr().map_err(io_err("local address"))?;
    info!(%local, "QUIC endpoint listening");

    // Switch, violins, bridges, TAPs.
    let mut switch = Switch::new(
        me.clone(),
        SwitchConfig {
            mac_ageing: Duration::from_secs(cfg.mac_ageing_s),
            ..SwitchConfig::default()
        },
    );
    let mut bridges = Bridges(Vec::new());
    let mut taps = HashMap::new();
    let mut out = Vec::new();
    for v in &cfg.violins {
        let id = ViolinId::new(v.id)
            .ok_or_else(|| DaemonError::Config(format!("violin id {} exceeds 24 bits", v.id)))?;
        let mut static_arp = Vec::new();
        for vm in &v.vms {
            let mac = wire::parse_mac(&vm.mac)
                .ok_or_else(|| DaemonError::Config(format!("bad MAC {:?}", vm.mac)))?;
            static_arp.push((vm.ip, mac));
        }
        let br = v.bridge_name();
        if !link_exists(&br) {
            ip(&["link", "add", &br, "type", "bridge"])
                .map_err(io_err(format!("cannot create bridge {br}")))?;
            bridges.0.push(br.clone());
            info!(bridge = %br, "created bridge");
        }
        let tap_name = v.tap_name();
        let tap = Iface::without_packet_info(&tap_name, Mode::Tap)
            .map_err(io_err(format!("cannot create TAP {tap_name}")))?;
        tap.set_non_blocking()
            .map_err(io_err(format!("cannot make TAP {tap_name} non-blocking")))?;
        let mtu = cfg.mtu.to_string();
        disable_ipv6(&br);
        disable_ipv6(tap.name());
        for args in [
            vec!["link", "set", &br, "mtu", &mtu, "up"],
            vec!["link", "set", tap.name(), "mtu", &mtu, "master", &br, "up"],
        ] {
            ip(&args).map_err(io_err(format!("cannot set up {br}/{tap_name}")))?;
        }
        // SAFETY: `Iface` owns its file descriptor and closes it only when dropped, which
        // happens after the `AsyncFd` that owns the `Iface` is dropped.
        let tap = unsafe { AsyncFd::register_with_interest(tap, tokio::io::Interest::READABLE) }
            .map_err(|e| {
                io_err("cannot register TAP with tokio")(io::Error::other(e.to_string()))
            })?;
        taps.insert(id, Rc::new(tap));
        switch.add_violin(
            ViolinConfig {
                id,
                name: v.name.clone(),
                allowed: v.allowed.iter().map(|p| HostPattern::new(p)).collect(),
                static_arp,
            },
            &mut out,
        );
        info!(violin = v.id, bridge = %br, tap = %tap_name, "violin up");
    }

    let state: State = Rc::new(RefCell::new(Shared {
        switch,
        conns: HashMap::new(),
        taps,
        driver_drops: BTreeMap::new(),
        refused: BTreeMap::new(),
        known: BTreeMap::new(),
        out: Vec::new(),
        serial: 0,
        tap_path: SparsePath::new(cfg.handoff_yield, busy.clone()),
    }));
    let advertise = cfg.advertise.unwrap_or(local);
    let ctx = Rc::new(Ctx {
        me: me.clone(),
        advertise,
        endpoint: endpoint.clone(),
        state: state.clone(),
        token: token.clone(),
        mtu: cfg.mtu as usize,
        cpu_wake_latency_us: cpu_latency.as_ref().map(CpuLatencyRequest::us),
        send_path,
        busy: busy.clone(),
    });

    let mut tasks: JoinSet<()> = JoinSet::new();
    let (dial_tx, mut dial_rx) = mpsc::channel::<SocketAddr>(256);
    for v in state.borrow().taps.keys() {
        tasks.spawn_local(tap_reader(ctx.clone(), *v));
    }
    tasks.spawn_local(acceptor(ctx.clone(), dial_tx.clone()));
    tasks.spawn_local(ticker(ctx.clone()));
    if busy.is_enabled() {
        info!(us = busy.window_us(), "busy polling after sparse packets");
        let (busy, token) = (busy.clone(), token.clone());
        tasks.spawn_local(async move { busy.run(token).await });
    }
    tasks.spawn_local(control_api(ctx.clone(), cfg.control_socket.clone()));
    if let Some(addr) = cfg.metrics {
        let registry: viola_common::metrics::SharedRegistry = Default::default();
        let metrics = Metrics::register(&registry);
        let (bound, serve) = viola_common::metrics::serve(addr, registry, token.clone()).await?;
        info!(%bound, "metrics endpoint");
        tasks.spawn_local(serve);
        tasks.spawn_local(metrics_updater(ctx.clone(), metrics));
    }
    let mut dialing = BTreeSet::new();
    for p in &cfg.peers {
        if p.addr != advertise && dialing.insert(p.addr) {
            tasks.spawn_local(dialer(ctx.clone(), p.addr, dial_tx.clone()));
        }
    }
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            Some(addr) = dial_rx.recv() => {
                if addr != advertise && dialing.insert(addr) {
                    debug!(%addr, "new peer address from gossip");
                    tasks.spawn_local(dialer(ctx.clone(), addr, dial_tx.clone()));
                }
            }
            Some(done) = tasks.join_next() => {
                if let Err(e) = done {
                    warn!("task failed: {e}");
                }
            }
        }
    }
    info!("shutting down");
    endpoint.close(0u32.into(), b"shutdown");
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(3), drain)
        .await
        .is_err()
    {
        warn!("tasks did not stop within 3 s; aborting them");
        tasks.abort_all();
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    // TAPs close with the last reference; bridges we made are removed by `bridges`' drop.
    state.borrow_mut().taps.clear();
    drop(ctx);
    drop(bridges);
    let _ = std::fs::remove_file(&cfg.control_socket);
    drop(cpu_latency);
    info!("stopped");
    Ok(())
}

struct Ctx {
    me: HostId,
    advertise: SocketAddr,
    endpoint: quinn::Endpoint,
    state: State,
    token: CancellationToken,
    mtu: usize,
    cpu_wake_latency_us: Option<u32>,
    send_path: Arc<SparsePath>,
    busy: Arc<BusyPoll>,
}

async fn tap_reader(ctx: Rc<Ctx>, violin: ViolinId) {
    let Some(tap) = ctx.state.borrow().taps.get(&violin).cloned() else {
        return;
    };
    // Ethernet header + VLAN tag + payload.
    let max_frame = ctx.mtu + 18;
    let mut slab = BytesMut::with_capacity(256 * 1024);
    loop {
        let mut guard = tokio::select! {
            () = ctx.token.cancelled() => return,
            g = tap.readable() => match g {
                Ok(g) => g,
                Err(e) => { warn!(%violin, "TAP not readable: {e}"); return; }
            },
        };
        let mut n_frames = 0usize;
        loop {
            if slab.capacity() < FRAME_HEADER_LEN + max_frame {
                slab.reserve(256 * 1024);
            }
            slab.resize(FRAME_HEADER_LEN + max_frame, 0);
            let res = guard.try_io(|inner| inner.get_ref().recv(&mut slab[FRAME_HEADER_LEN..]));
            match res {
                Ok(Ok(n)) => {
                    slab.truncate(FRAME_HEADER_LEN + n);
                    let buf = slab.split();
                    let mut st = ctx.state.borrow_mut();
                    let st = &mut *st;
                    st.switch
                        .handle_tap_frame(Instant::now(), violin, buf, &mut st.out);
                    st.execute();
                }
                Ok(Err(e)) => {
                    slab.clear();
                    warn!(%violin, "TAP read: {e}");
                    break;
                }
                Err(_would_block) => {
                    slab.clear();
                    break;
                }
            }
            n_frames += 1;
            if n_frames.is_multiple_of(64) {
                tokio::task::yield_now().await;
            }
        }
    }
}

async fn acceptor(ctx: Rc<Ctx>, dial_tx: mpsc::Sender<SocketAddr>) {
    loop {
        let incoming = tokio::select! {
            () = ctx.token.cancelled() => return,
            i = ctx.endpoint.accept() => match i { Some(i) => i, None => return },
        };
        let ctx = ctx.clone();
        let dial_tx = dial_tx.clone();
        tokio::task::spawn_local(async move {
            let remote = incoming.remote_address();
            let conn = match tokio::time::timeout(Duration::from_secs(10), incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    warn!(%remote, "handshake refused: {e}");
                    *ctx.state
                        .borrow_mut()
                        .refused
                        .entry("handshake".into())
                        .or_default() += 1;
                    return;
                }
                Err(_) => return,
            };
            let alpn = conn
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol);
            if alpn.as_deref() == Some(alpn::OVERLAY_CONTROL) {
                match identity::peer_identity(&conn)
                    .map_err(|e| e.to_string())
                    .and_then(|p| {
                        p.require_role(&[Role::Adaptmgr, Role::Cli])
                            .map_err(|e| e.to_string())
                    }) {
                    Ok(()) => serve_control_connection(ctx, conn).await,
                    Err(e) => {
                        warn!(%remote, "control connection refused: {e}");
                        *ctx.state
                            .borrow_mut()
                            .refused
                            .entry("role".into())
                            .or_default() += 1;
                        conn.close(2u32.into(), b"role");
                    }
                }
                return;
            }
            handle_connection(ctx, conn, false, dial_tx).await;
        });
    }
}

async fn dialer(ctx: Rc<Ctx>, addr: SocketAddr, dial_tx: mpsc::Sender<SocketAddr>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        if ctx.token.is_cancelled() {
            return;
        }
        // Already connected to whoever is at this address (either direction)?
        let connected = ctx
            .state
            .borrow()
            .conns
            .values()
            .any(|c| c.conn.remote_address() == addr && c.conn.close_reason().is_none());
        if !connected {
            let attempt = async {
                let connecting = ctx
                    .endpoint
                    .connect(addr, &identity::server_name(Role::Overlay))
                    .map_err(|e| e.to_string())?;
                tokio::time::timeout(Duration::from_secs(5), connecting)
                    .await
                    .map_err(|_| "timeout".to_owned())?
                    .map_err(|e| e.to_string())
            };
            match attempt.await {
                Ok(conn) => {
                    backoff = Duration::from_millis(250);
                    let is_me = identity::peer_identity(&conn)
                        .map(|id| host_id(&id) == ctx.me)
                        .unwrap_or(false);
                    if is_me {
                        conn.close(0u32.into(), b"self");
                        return;
                    }
                    handle_connection(ctx.clone(), conn, true, dial_tx.clone()).await;
                    continue;
                }
                Err(e) => debug!(%addr, "connect failed: {e}"),
            }
        }
        tokio::select! {
            () = ctx.token.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(4));
    }
}

/// Registers a connection and serves it until it closes.
async fn handle_connection(
    ctx: Rc<Ctx>,
    conn: quinn::Connection,
    dialed: bool,
    dial_tx: mpsc::Sender<SocketAddr>,
) {
    let remote = conn.remote_address();
    let peer = match identity::peer_identity(&conn) {
        Ok(p) => p,
        Err(e) => {
            warn!(%remote, "no identity: {e}");
            conn.close(1u32.into(), b"identity");
            return;
        }
    };
    if let Err(e) = peer.require_role(&[Role::Overlay]) {
        warn!(%remote, "refused: {e}");
        *ctx.state
            .borrow_mut()
            .refused
            .entry("role".into())
            .or_default() += 1;
        conn.close(2u32.into(), b"role");
        return;
    }
    let host = host_id(&peer);
    if host == ctx.me {
        conn.close(0u32.into(), b"self");
        return;
    }
    let (ctl_tx, ctl_rx) = mpsc::channel::<ControlMsg>(4096);
    let serial;
    {
        let mut st = ctx.state.borrow_mut();
        let st = &mut *st;
        let now = Instant::now();
        if let Some(old) = st.conns.get(&host) {
            let old_alive = old.conn.close_reason().is_none();
            // Simultaneous dials: both ends keep the one dialed by the smaller host name.
            let race = old_alive && now.duration_since(old.since) < Duration::from_secs(2);
            let new_dialer_is_smaller = if dialed { ctx.me < host } else { host < ctx.me };
            if race && !new_dialer_is_smaller {
                debug!(peer = %host, "duplicate connection; keeping the existing one");
                conn.close(0u32.into(), b"duplicate");
                return;
            }
            old.conn.close(0u32.into(), b"replaced");
            st.switch.peer_down(&host, &mut st.out);
        }
        st.serial += 1;
        serial = st.serial;
        st.conns.insert(
            host.clone(),
            Conn {
                conn: conn.clone(),
                ctl: ctl_tx.clone(),
                since: now,
                serial,
            },
        );
        st.known.insert(host.clone(), vec![remote]);
        let max = conn.max_datagram_size().unwrap_or(1162);
        st.switch.peer_up(host.clone(), max, &mut st.out);
        st.execute();
        let mut known: Vec<PeerAddr> = st
            .known
            .iter()
            .filter(|(h, _)| **h != host)
            .map(|(h, a)| PeerAddr {
                host: h.to_string(),
                addrs: a.clone(),
            })
            .collect();
        known.push(PeerAddr {
            host: ctx.me.to_string(),
            addrs: vec![ctx.advertise],
        });
        let _ = ctl_tx.try_send(ControlMsg::Peers { known });
    }
    info!(peer = %host, %remote, dialed, "peer connected");
    drop(ctl_tx);

    let datagrams = async {
        loop {
            let d = tokio::select! {
                () = ctx.token.cancelled() => return,
                d = conn.read_datagram() => match d { Ok(d) => d, Err(_) => return },
            };
            let mut st = ctx.state.borrow_mut();
            let st = &mut *st;
            st.switch
                .handle_datagram(Instant::now(), &host, d, &mut st.out);
            st.execute();
        }
    };
    let writer = control_writer(&conn, ctl_rx, &ctx.token);
    let reader = control_reader(&ctx, &conn, &host, &dial_tx);
    tokio::select! {
        () = datagrams => {}
        () = writer => {}
        () = reader => {}
    }
    let reason = conn
        .close_reason()
        .map_or_else(|| "ended".to_owned(), |r| r.to_string());
    conn.close(0u32.into(), b"bye");
    let mut st = ctx.state.borrow_mut();
    let st = &mut *st;
    if st.conns.get(&host).is_some_and(|c| c.serial == serial) {
        st.conns.remove(&host);
        st.switch.peer_down(&host, &mut st.out);
        st.execute();
        info!(peer = %host, "peer disconnected: {reason}");
    }
}

async fn control_writer(
    conn: &quinn::Connection,
    mut rx: mpsc::Receiver<ControlMsg>,
    token: &CancellationToken,
) {
    let Ok(mut stream) = conn.open_uni().await else {
        return;
    };
    loop {
        let msg = tokio::select! {
            () = token.cancelled() => return,
            m = rx.recv() => match m { Some(m) => m, None => { std::future::pending::<()>().await; return } },
        };
        if stream.write_all(&control::encode(&msg)).await.is_err() {
            return;
        }
    }
}

async fn control_reader(
    ctx: &Rc<Ctx>,
    conn: &quinn::Connection,
    host: &HostId,
    dial_tx: &mpsc::Sender<SocketAddr>,
) {
    let Ok(mut stream) = conn.accept_uni().await else {
        return;
    };
    let mut body = Vec::new();
    loop {
        let mut prefix = [0u8; 4];
        tokio::select! {
            () = ctx.token.cancelled() => return,
            r = stream.read_exact(&mut prefix) => if r.is_err() { return },
        }
        let Ok(len) = control::check_len(prefix) else {
            warn!(peer = %host, "oversized control message; closing");
            conn.close(3u32.into(), b"control");
            return;
        };
        body.resize(len, 0);
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        let msg = match control::decode(&body) {
            Ok(m) => m,
            Err(e) => {
                warn!(peer = %host, "bad control message: {e}");
                ctx.state.borrow_mut().count("control_malformed");
                continue;
            }
        };
        if let ControlMsg::Peers { known } = &msg {
            let mut st = ctx.state.borrow_mut();
            for p in known {
                let h: HostId = p.host.as_str().into();
                if h == ctx.me {
                    continue;
                }
                for a in &p.addrs {
                    let _ = dial_tx.try_send(*a);
                }
                if h == *host {
                    // What the peer advertises beats the (possibly NAT'd) address we saw.
                    st.known.insert(h, p.addrs.clone());
                } else {
                    st.known.entry(h).or_insert_with(|| p.addrs.clone());
                }
            }
            continue;
        }
        let mut st = ctx.state.borrow_mut();
        let st = &mut *st;
        st.switch
            .handle_control(Instant::now(), host, msg, &mut st.out);
        st.execute();
    }
}

async fn ticker(ctx: Rc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            () = ctx.token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut st = ctx.state.borrow_mut();
        let st = &mut *st;
        st.switch.handle_timeout(Instant::now());
        let sizes: Vec<(HostId, usize)> = st
            .conns
            .iter()
            .filter_map(|(h, c)| Some((h.clone(), c.conn.max_datagram_size()?)))
            .collect();
        for (h, m) in sizes {
            st.switch.set_max_datagram(&h, m);
        }
    }
}

fn status(ctx: &Ctx) -> DaemonStatus {
    let st = ctx.state.borrow();
    let sw: SwitchStatus = st.switch.status(Instant::now());
    DaemonStatus {
        switch: serde_json::to_value(sw).unwrap_or_default(),
        rtt_ms: st
            .conns
            .iter()
            .map(|(h, c)| (h.to_string(), c.conn.rtt().as_secs_f64() * 1000.0))
            .collect(),
        driver_drops: st
            .driver_drops
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect(),
        refused: st.refused.clone(),
        cpu_wake_latency_us: ctx.cpu_wake_latency_us,
        handoff_yields: ctx
            .send_path
            .yield_enabled()
            .then(|| ctx.send_path.yields() + st.tap_path.yields()),
        busy_poll: ctx
            .busy
            .is_enabled()
            .then(|| (ctx.busy.window_us(), ctx.busy.polls())),
    }
}

async fn control_api(ctx: Rc<Ctx>, path: PathBuf) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), "control socket unavailable: {e}");
            return;
        }
    };
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    info!(path = %path.display(), "control socket");
    loop {
        let (stream, _) = tokio::select! {
            () = ctx.token.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let ctx = ctx.clone();
        tokio::task::spawn_local(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r.take(64 * 1024)).lines();
            let Ok(Ok(Some(line))) =
                tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await
            else {
                return;
            };
            let mut reply = answer(&ctx, &line);
            reply.push('\n');
            let _ = w.write_all(reply.as_bytes()).await;
        });
    }
}

/// Answers one control request (a JSON line) from the unix socket or a QUIC control stream.
fn answer(ctx: &Ctx, line: &str) -> String {
    let reply = match serde_json::from_str::<ControlRequest>(line) {
        Ok(ControlRequest::Status) => serde_json::to_value(status(ctx)).unwrap_or_default(),
        Ok(ControlRequest::ExpectMove { violin, mac, host }) => {
            let res = (|| {
                let v = ViolinId::new(violin).ok_or("violin id exceeds 24 bits")?;
                let m = wire::parse_mac(&mac).ok_or("bad MAC")?;
                let mut st = ctx.state.borrow_mut();
                let st = &mut *st;
                let ok =
                    st.switch
                        .expect_move(Instant::now(), v, m, host.as_str().into(), &mut st.out);
                st.execute();
                if ok {
                    Ok(())
                } else {
                    Err("not a member of that violin")
                }
            })();
            info!(violin, %mac, %host, ok = res.is_ok(), "expect_move");
            match res {
                Ok(()) => serde_json::json!({"ok": true}),
                Err(e) => serde_json::json!({"ok": false, "error": e}),
            }
        }
        Err(e) => serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    reply.to_string()
}

/// Serves control requests from an adaptation manager or CLI over QUIC (ALPN
/// `viola-overlay-ctl/1`): one JSON request line per bidirectional stream, one reply line.
async fn serve_control_connection(ctx: Rc<Ctx>, conn: quinn::Connection) {
    loop {
        let (mut send, mut recv) = tokio::select! {
            () = ctx.token.cancelled() => return,
            s = conn.accept_bi() => match s { Ok(s) => s, Err(_) => return },
        };
        let Ok(Ok(body)) =
            tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(64 * 1024)).await
        else {
            continue;
        };
        let line = String::from_utf8_lossy(&body);
        let mut reply = answer(&ctx, line.trim());
        reply.push('\n');
        let _ = send.write_all(reply.as_bytes()).await;
        let _ = send.finish();
    }
}

/// Sends one control request to the overlay daemon at `addr` over QUIC with mutual TLS
/// (what the adaptation manager uses: its identity must have role `adaptmgr` or `cli`), and
/// returns the reply (JSON).
pub async fn remote_request(
    me: &Identity,
    addr: SocketAddr,
    req: &ControlRequest,
) -> Result<serde_json::Value, RemoteRequestError> {
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(RemoteRequestError::Io)?;
    endpoint.set_default_client_config(me.client_config(alpn::OVERLAY_CONTROL)?);
    let conn = endpoint
        .connect(addr, &identity::server_name(Role::Overlay))
        .map_err(|e| RemoteRequestError::Connect(e.to_string()))?
        .await
        .map_err(|e| RemoteRequestError::Connect(e.to_string()))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| RemoteRequestError::Connect(e.to_string()))?;
    let body = serde_json::to_vec(req).map_err(|e| RemoteRequestError::Reply(e.to_string()))?;
    send.write_all(&body)
        .await
        .map_err(|e| RemoteRequestError::Connect(e.to_string()))?;
    let _ = send.finish();
    let reply = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(16 << 20))
        .await
        .map_err(|_| RemoteRequestError::Connect("no reply within 10 s".into()))?
        .map_err(|e| RemoteRequestError::Connect(e.to_string()))?;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    serde_json::from_slice(&reply).map_err(|e| RemoteRequestError::Reply(e.to_string()))
}

/// Why a remote control request failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteRequestError {
    /// Local socket.
    #[error("cannot open a QUIC endpoint")]
    Io(#[source] io::Error),
    /// TLS configuration from the identity.
    #[error("TLS configuration")]
    Tls(#[from] identity::TlsConfigError),
    /// Connecting, sending or receiving (includes refusal by the daemon).
    #[error("overlay control connection: {0}")]
    Connect(String),
    /// The reply is not JSON.
    #[error("bad reply: {0}")]
    Reply(String),
}

/// Sends one request to a running daemon's control socket and returns the reply line.
pub async fn request(socket: &Path, req: &ControlRequest) -> io::Result<String> {
    let mut s = tokio::net::UnixStream::connect(socket).await?;
    let mut line = serde_json::to_string(req).map_err(io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes()).await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut reply))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply"))??;
    Ok(reply)
}

type Labels = Vec<(String, String)>;

struct Metrics {
    events: Family<Labels, Counter>,
    drops: Family<Labels, Counter>,
    peers: Gauge,
    rtt: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    macs: Family<Labels, Gauge>,
    last: BTreeMap<(bool, String), u64>,
}

impl Metrics {
    fn register(registry: &viola_common::metrics::SharedRegistry) -> Self {
        let m = Self {
            events: Family::default(),
            drops: Family::default(),
            peers: Gauge::default(),
            rtt: Family::default(),
            macs: Family::default(),
            last: BTreeMap::new(),
        };
        if let Ok(mut r) = registry.lock() {
            r.register(
                "viola_overlay_events",
                "Frames and datagrams handled, by event",
                m.events.clone(),
            );
            r.register(
                "viola_overlay_drops",
                "Frames, datagrams and messages dropped, by reason",
                m.drops.clone(),
            );
            r.register(
                "viola_overlay_peers_connected",
                "Directly connected peers",
                m.peers.clone(),
            );
            r.register(
                "viola_overlay_peer_rtt_seconds",
                "Round-trip time per peer",
                m.rtt.clone(),
            );
            r.register(
                "viola_overlay_macs",
                "MAC table entries per violin",
                m.macs.clone(),
            );
        }
        m
    }

    fn bump(&mut self, drop: bool, name: &str, value: u64) {
        let last = self.last.entry((drop, name.to_owned())).or_default();
        let delta = value.saturating_sub(*last);
        *last = value;
        let (fam, key) = if drop {
            (&self.drops, "reason")
        } else {
            (&self.events, "event")
        };
        fam.get_or_create(&vec![(key.to_owned(), name.to_owned())])
            .inc_by(delta);
    }
}

async fn metrics_updater(ctx: Rc<Ctx>, mut m: Metrics) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = ctx.token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = status(&ctx);
        if let Some(c) = s.switch.get("counters").and_then(|c| c.as_object()) {
            for (k, v) in c {
                if let Some(n) = v.as_u64() {
                    m.bump(false, k, n);
                }
            }
            if let Some(d) = c.get("drops").and_then(|d| d.as_object()) {
                for (k, v) in d {
                    m.bump(true, k, v.as_u64().unwrap_or(0));
                }
            }
        }
        for k in DRIVER_DROPS {
            m.bump(true, k, s.driver_drops.get(k).copied().unwrap_or(0));
        }
        m.peers.set(s.rtt_ms.len() as i64);
        for (p, r) in &s.rtt_ms {
            m.rtt
                .get_or_create(&vec![("peer".into(), p.clone())])
                .set(r / 1000.0);
        }
        if let Some(vs) = s.switch.get("violins").and_then(|v| v.as_array()) {
            for v in vs {
                let id = v.get("id").and_then(|i| i.as_u64()).unwrap_or(0);
                let n = v
                    .get("macs")
                    .and_then(|m| m.as_array())
                    .map_or(0, |a| a.len());
                m.macs
                    .get_or_create(&vec![("violin".into(), id.to_string())])
                    .set(n as i64);
            }
        }
    }
}
