//! The daemon's network plumbing: the QUIC endpoint and its socket options, and per violin a
//! bridge (made with `ip` unless it exists) and a TAP on it.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tracing::{info, warn};
use tun_tap::{Iface, Mode};
use viola_common::identity::{Identity, alpn};

use super::{DaemonError, io_err};
use crate::config::OverlayConfig;
use crate::local_runtime::LocalSetRuntime;
use crate::sparse::{HandoffSocket, SparsePath};
use crate::switch::{HostPattern, Switch, ViolinConfig};
use crate::wire::{self, ViolinId};

/// A violin's TAP, readable through tokio.
pub(super) type Tap = Rc<AsyncFd<Iface>>;

/// Bridges created by us, removed again on drop (also on a failed start).
pub(super) struct Bridges(Vec<String>);

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

/// The QUIC endpoint on `cfg.listen`, serving the overlay and control ALPNs; every send is a
/// handoff on `send_path`.
pub(super) fn endpoint(
    cfg: &OverlayConfig,
    me: &Identity,
    send_path: Arc<SparsePath>,
) -> Result<quinn::Endpoint, DaemonError> {
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
    let mut server_cfg = me.server_config(&[alpn::OVERLAY, alpn::OVERLAY_CONTROL])?;
    server_cfg.transport_config(transport.clone());
    let mut client_cfg = me.client_config(alpn::OVERLAY)?;
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
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(LocalSetRuntime);
    let udp = runtime
        .wrap_udp_socket(socket)
        .map_err(io_err("cannot create QUIC endpoint"))?;
    let udp = Arc::new(HandoffSocket::new(udp, send_path));
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server_cfg),
        udp,
        runtime,
    )
    .map_err(io_err("cannot create QUIC endpoint"))?;
    endpoint.set_default_client_config(client_cfg);
    Ok(endpoint)
}

/// Sets up each configured violin: its bridge and TAP, and its place in `switch`.
pub(super) fn violins(
    cfg: &OverlayConfig,
    switch: &mut Switch,
) -> Result<(Bridges, HashMap<ViolinId, Tap>), DaemonError> {
    let mut bridges = Bridges(Vec::new());
    let mut taps = HashMap::new();
    // No peer is up yet, so adding violins asks for nothing to be sent.
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
    Ok((bridges, taps))
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
