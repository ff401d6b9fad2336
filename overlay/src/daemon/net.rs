//! The daemon's network plumbing: the QUIC endpoint and its socket options, and per violin a
//! bridge (made with `ip` unless it exists) and a TAP on it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
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
use crate::config::{OverlayConfig, QuicCongestion};
use crate::local_runtime::{LocalSetRuntime, ReadInterestSocket, set_buffer};
use crate::sparse::SparsePath;
use crate::tap::VnetTap;

/// A violin's TAP, readable through tokio.
pub(super) type Tap = Rc<AsyncFd<TapDev>>;

/// A TAP without offloads (`tun-tap`), or with a virtio-net header and offloads
/// ([`OverlayConfig::tap_offload`]).
pub(super) enum TapDev {
    Plain(Iface),
    Vnet(VnetTap),
}

impl TapDev {
    pub(super) fn name(&self) -> &str {
        match self {
            Self::Plain(t) => t.name(),
            Self::Vnet(t) => t.name(),
        }
    }
}

impl AsRawFd for TapDev {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Plain(t) => t.as_raw_fd(),
            Self::Vnet(t) => t.as_raw_fd(),
        }
    }
}

/// A violin's TAP and the longest frame the violin takes through it: its MTU, the Ethernet
/// header and one VLAN tag (checked on every frame read from it and written to it).
pub(super) struct ViolinTap {
    pub(super) tap: Tap,
    pub(super) max_frame: usize,
}

impl ViolinTap {
    pub(super) fn new(tap: Tap, mtu: u32) -> Self {
        let mut t = Self { tap, max_frame: 0 };
        t.set_mtu(mtu);
        t
    }

    /// The violin's MTU is `mtu` (also when it is updated in place).
    pub(super) fn set_mtu(&mut self, mtu: u32) {
        self.max_frame = mtu as usize + 18;
    }
}

/// Bridges created by us, removed again on drop (also on a failed start).
pub(super) struct Bridges(Vec<String>);

impl Drop for Bridges {
    fn drop(&mut self) {
        for b in self.0.drain(..) {
            remove_bridge(&b);
        }
    }
}

impl Bridges {
    pub(super) fn new() -> Self {
        Self(Vec::new())
    }

    /// Removes `name` when dropped.
    pub(super) fn push(&mut self, name: String) {
        self.0.push(name);
    }
}

/// The QUIC endpoint on `cfg.listen`, serving the overlay and control ALPNs; every send is a
/// handoff on `send_path`. Also the inode of its UDP socket (to find its drops in
/// `/proc/net/udp`).
pub(super) fn endpoint(
    cfg: &OverlayConfig,
    me: &Identity,
    send_path: Arc<SparsePath>,
) -> Result<(quinn::Endpoint, Option<u64>), DaemonError> {
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
    let congestion: Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> =
        match cfg.quic_congestion {
            QuicCongestion::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
            QuicCongestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            QuicCongestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
        };
    transport.congestion_controller_factory(congestion);
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
    let inode = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd()))
        .ok()
        .and_then(|target| {
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        });
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(LocalSetRuntime);
    // Every send is a handoff on the UDP path (see `sparse`).
    let udp = Arc::new(
        ReadInterestSocket::new(socket)
            .map_err(io_err("cannot create QUIC endpoint"))?
            .with_handoff(send_path),
    );
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server_cfg),
        udp,
        runtime,
    )
    .map_err(io_err("cannot create QUIC endpoint"))?;
    endpoint.set_default_client_config(client_cfg);
    Ok((endpoint, inode))
}

/// What the kernel dropped on the daemon's own devices, counted from the first reading: frames
/// a TAP dropped because its queue was full (the daemon did not read fast enough), and datagrams
/// the UDP socket dropped with its receive buffer full.
#[derive(Debug, Default)]
pub(super) struct KernelDrops {
    udp_inode: Option<u64>,
    /// The first readings: (TAPs' tx_dropped by name, UDP drops).
    baseline: Option<(HashMap<String, u64>, u64)>,
}

impl KernelDrops {
    pub(super) fn new(udp_inode: Option<u64>) -> Self {
        Self {
            udp_inode,
            baseline: None,
        }
    }

    /// (TAP queue overflows, UDP receive overflows) since the first call.
    pub(super) fn read<'a>(&mut self, taps: impl Iterator<Item = &'a str>) -> (u64, u64) {
        let taps: HashMap<String, u64> = taps
            .map(|t| {
                let path = format!("/sys/class/net/{t}/statistics/tx_dropped");
                let n = std::fs::read_to_string(path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                (t.to_owned(), n)
            })
            .collect();
        let udp = self.udp_inode.map_or(0, |inode| {
            ["/proc/net/udp", "/proc/net/udp6"]
                .iter()
                .find_map(|p| udp_socket_drops(&std::fs::read_to_string(p).ok()?, inode))
                .unwrap_or(0)
        });
        let (tap_base, udp_base) = self.baseline.get_or_insert_with(|| (taps.clone(), udp));
        let tap_drops = taps
            .iter()
            .map(|(t, n)| n.saturating_sub(tap_base.get(t).copied().unwrap_or(0)))
            .sum();
        (tap_drops, udp.saturating_sub(*udp_base))
    }
}

/// The `drops` column of the socket with `inode` in a `/proc/net/udp` table.
fn udp_socket_drops(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.get(9)?.parse::<u64>().ok()? == inode).then_some(())?;
        cols.get(12)?.parse().ok()
    })
}

/// A violin's devices: the bridge `bridge` (made unless it exists) and the TAP `tap_name` on
/// it (with a virtio-net header and offloads if `offload`), both at `mtu` and up, IPv6 off.
/// Also whether the bridge was made here (it is removed again if the TAP cannot be set up).
pub(super) fn violin_devices(
    bridge: &str,
    tap_name: &str,
    mtu: u32,
    offload: bool,
) -> Result<(Tap, bool), DaemonError> {
    let made = if link_exists(bridge) {
        false
    } else {
        ip(&["link", "add", bridge, "type", "bridge"])
            .map_err(io_err(format!("cannot create bridge {bridge}")))?;
        info!(%bridge, "created bridge");
        true
    };
    let tap = tap_on(bridge, tap_name, mtu, offload);
    if tap.is_err() && made {
        remove_bridge(bridge);
    }
    Ok((tap?, made))
}

fn tap_on(br: &str, tap_name: &str, mtu: u32, offload: bool) -> Result<Tap, DaemonError> {
    let plain = || -> Result<TapDev, DaemonError> {
        let tap = Iface::without_packet_info(tap_name, Mode::Tap)
            .map_err(io_err(format!("cannot create TAP {tap_name}")))?;
        tap.set_non_blocking()
            .map_err(io_err(format!("cannot make TAP {tap_name} non-blocking")))?;
        Ok(TapDev::Plain(tap))
    };
    let tap = if offload {
        match VnetTap::open(tap_name) {
            Ok(tap) => {
                info!(tap = %tap.name(), offloads = tap.offloads(), "TAP with virtio-net header");
                TapDev::Vnet(tap)
            }
            // A kernel that refuses the header or the offloads still gets the violin, at the
            // speed without them (the failed TAP was not persistent: it went with its fd).
            Err(e) => {
                warn!(tap = %tap_name, error = %e, "cannot open the TAP with offloads; using it without");
                plain()?
            }
        }
    } else {
        plain()?
    };
    let mtu = mtu.to_string();
    disable_ipv6(br);
    disable_ipv6(tap.name());
    for args in [
        vec!["link", "set", br, "mtu", &mtu, "up"],
        vec!["link", "set", tap.name(), "mtu", &mtu, "master", br, "up"],
    ] {
        ip(&args).map_err(io_err(format!("cannot set up {br}/{tap_name}")))?;
    }
    // SAFETY: `Iface` and `VnetTap` own their file descriptors and close them only when
    // dropped, which happens after the `AsyncFd` that owns them is dropped.
    let tap = unsafe { AsyncFd::register_with_interest(tap, tokio::io::Interest::READABLE) }
        .map_err(|e| io_err("cannot register TAP with tokio")(io::Error::other(e.to_string())))?;
    Ok(Rc::new(tap))
}

/// Sets a violin's TAP and bridge to `mtu` (a violin updated in place).
pub(super) fn set_mtu(bridge: &str, tap_name: &str, mtu: u32) -> Result<(), DaemonError> {
    let mtu = mtu.to_string();
    for dev in [tap_name, bridge] {
        ip(&["link", "set", dev, "mtu", &mtu])
            .map_err(io_err(format!("cannot set the MTU of {dev}")))?;
    }
    Ok(())
}

/// Deletes the bridge `name` (its ports stay, detached).
pub(super) fn remove_bridge(name: &str) {
    match ip(&["link", "del", name]) {
        Ok(()) => info!(bridge = %name, "removed bridge"),
        Err(e) => warn!(bridge = %name, "cannot remove bridge: {e}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_udp_sockets_drops_are_found_by_inode() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  123: 00000000:1194 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4711 2 ffff8881 17
  124: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4712 2 ffff8882 0
";
        assert_eq!(udp_socket_drops(table, 4711), Some(17));
        assert_eq!(udp_socket_drops(table, 4712), Some(0));
        assert_eq!(udp_socket_drops(table, 9), None);
    }
}
