//! `viola-overlay` configuration (TOML; defaults, then the file, then the command line).
//!
//! ```toml
//! listen = "198.18.1.11:4500"        # UDP address for QUIC
//! advertise = "198.18.1.11:4500"     # told to peers (defaults to listen)
//! identity_dir = "/etc/viola/overlay" # cert.pem, key.pem, ca.pem (viola-ca issue)
//! control_socket = "/run/viola/overlay.sock"
//! metrics = "127.0.0.1:9611"
//! mtu = 1500                          # MTU of the TAPs/bridges (guest MTU)
//! cpu_wake_latency_us = 0             # optional: hold a PM QoS request (lowest RTT, CPUs poll)
//! handoff_yield = true                # yield the CPU once after a sparse send/TAP write
//! busy_poll_us = 300                  # poll this long after a sparse packet before sleeping (0: off)
//! max_macs_per_violin = 1024          # learned (unmanaged) MACs per violin
//! max_macs_per_port = 512             # ... per port (local TAP, each peer host)
//! mac_learn_rate = 100                # new MACs per second from the local TAP (burst 2x)
//! mss_clamp = true                    # lower TCP SYNs' MSS so full segments fit one datagram
//! tap_offload = true                  # TAPs with virtio-net headers: TSO from, GRO to the guests
//! expect_move_ttl_s = 600             # how long an announced move stays expected
//! dhcp_mtu = true                     # DHCP answers to managed VMs carry option 26 = mtu
//! state_file = "/var/lib/viola/overlay-violins.json" # optional: keep run-time violins
//!                                     # (set_violin/remove_violin) across restarts
//!
//! [[peers]]
//! addr = "198.18.2.11:4500"
//!
//! [[violins]]
//! id = 1
//! name = "blue"
//! allowed = ["*"]                     # `site/host`, `site/*` or `*`
//! vms = [{ mac = "52:54:00:00:00:05", ip = "10.1.0.5", host = "a/a1" }] # managed VMs
//! subnet = "10.1.0.0/24"              # optional: answer DHCP for the managed VMs
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

/// Congestion controller of the peer connections ([`OverlayConfig::quic_congestion`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuicCongestion {
    Bbr,
    Cubic,
    NewReno,
}

/// The daemon's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OverlayConfig {
    /// UDP address the QUIC endpoint binds.
    pub listen: SocketAddr,
    /// Address announced to peers (default: `listen`).
    pub advertise: Option<SocketAddr>,
    /// Directory with `cert.pem`, `key.pem`, `ca.pem`.
    pub identity_dir: PathBuf,
    /// Unix socket of the local control API (status, expect_move).
    pub control_socket: PathBuf,
    /// Prometheus endpoint (none: disabled).
    pub metrics: Option<SocketAddr>,
    /// MTU of TAP devices and bridges.
    pub mtu: u32,
    /// QUIC initial MTU (UDP payload). 1472 fills a 1500-byte underlay: datagrams of up to
    /// 1434 bytes, so frames of guests with MTU 1416 travel unfragmented. On smaller paths
    /// black-hole detection falls back towards `quic_min_mtu` and frames get fragmented.
    pub quic_initial_mtu: u16,
    /// QUIC minimum MTU (black-hole detection never goes below).
    pub quic_min_mtu: u16,
    /// Congestion control of the QUIC connections to peers, which carry the guests' frames as
    /// datagrams under the guests' own TCP congestion control. `bbr` (default): on the lab's
    /// 200 Mbit/s, 10 ms WAN a guest's TCP stream kept 0.92 of what TCP between the hosts gets,
    /// against 0.82 with `cubic`, whose loss-driven back-off stacks on the guest's own
    /// (`overlay_harden`, after the first 2 s). quinn marks its BBR experimental; `cubic` and
    /// `new_reno` are there for paths where it misbehaves.
    pub quic_congestion: QuicCongestion,
    /// Keepalive interval in milliseconds.
    pub keepalive_ms: u64,
    /// A peer silent for this long is considered gone.
    pub idle_timeout_ms: u64,
    /// UDP socket receive/send buffer in bytes.
    pub socket_buffer: usize,
    /// Learned MACs age out after this many seconds.
    pub mac_ageing_s: u64,
    /// While running, hold a machine-wide CPU wake-up latency request of this many
    /// microseconds (`/dev/cpu_dma_latency`): idle CPUs poll instead of halting, which takes the
    /// wake-up from each frame's round trip (most of the idle RTT in virtual machines) at the
    /// price of CPUs that never sleep. None (default): no request.
    pub cpu_wake_latency_us: Option<u32>,
    /// After a UDP send or TAP write that follows a quiet spell, give the CPU up once, so the
    /// receiver the kernel woke onto this CPU runs before the daemon's own bookkeeping (see
    /// [`crate::sparse`]). Costs one `sched_yield` per sparse packet, nothing under load.
    pub handoff_yield: bool,
    /// After a UDP send or TAP write that follows a quiet spell, keep polling for I/O this many
    /// microseconds before sleeping, yielding the CPU between polls (see
    /// [`crate::sparse::busy_poll`]): the answer to a sparse request skips the daemon's wake-up,
    /// at the price of up to this much CPU time per burst of traffic and at most 10 % of one
    /// CPU. 0: off.
    pub busy_poll_us: u32,
    /// Learned (unmanaged) MACs kept per violin; frames from further new MACs on the local
    /// TAP are dropped and counted (`mac_limit`).
    pub max_macs_per_violin: usize,
    /// Learned MACs kept per port (the local TAP, or one peer host).
    pub max_macs_per_port: usize,
    /// New MACs learned from the local TAP per second and violin, with a burst of twice as
    /// many; frames from new MACs above it are dropped and counted (`learn_rate_limit`).
    pub mac_learn_rate: u32,
    /// Lower the MSS option of TCP SYNs from local guests so that a full segment fits one
    /// QUIC datagram on its way (no fragmentation for TCP at the guest's default MTU).
    pub mss_clamp: bool,
    /// Open the violins' TAPs with `IFF_VNET_HDR` and the kernel's offloads: the guests' TCP
    /// reaches the daemon as frames of up to 64 KiB, which it cuts into datagram-sized frames
    /// itself, and consecutive frames of one flow from the peers are written to the TAP as one
    /// (see [`crate::offload`]). On by default: on the bench topology one guest TCP stream
    /// went from 1.0–1.2 to 2.8–3.3 Gbit/s, at 4.3–5.2 instead of 12–16 busy CPU seconds per
    /// GB. Off: the TAPs are opened with `tun-tap` and every frame is read and written one by
    /// one; so is a TAP whose kernel refuses the header or the offloads (logged).
    pub tap_offload: bool,
    /// How long a move announced by `expect_move` stays expected, in seconds. A managed VM
    /// moves only while expected, so this must outlast the longest migration; while it lasts,
    /// the expected host may claim the VM even if the migration was abandoned.
    pub expect_move_ttl_s: u64,
    /// The DHCP answers to managed VMs carry the interface MTU (option 26) = `mtu`. Guests
    /// that take it (busybox's `udhcpc` script does, systemd-networkd only with `UseMTU=yes`)
    /// set their MTU to the bridge's.
    pub dhcp_mtu: bool,
    /// Where the violins set at run time by control requests (`set_violin`, `remove_violin`)
    /// are kept as JSON, rewritten after each change and restored at start; a corrupt file
    /// stops the start. None (default): they last until the daemon stops.
    pub state_file: Option<PathBuf>,
    /// Peers to connect to.
    pub peers: Vec<PeerConfig>,
    /// Violins this host is a member of.
    pub violins: Vec<ViolinEntry>,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 4500)),
            advertise: None,
            identity_dir: PathBuf::from("/etc/viola/overlay"),
            control_socket: PathBuf::from("/run/viola/overlay.sock"),
            metrics: None,
            mtu: 1500,
            quic_initial_mtu: 1472,
            quic_min_mtu: 1200,
            quic_congestion: QuicCongestion::Bbr,
            keepalive_ms: 1000,
            idle_timeout_ms: 5000,
            socket_buffer: 4 << 20,
            mac_ageing_s: 300,
            cpu_wake_latency_us: None,
            handoff_yield: true,
            busy_poll_us: 300,
            max_macs_per_violin: 1024,
            max_macs_per_port: 512,
            mac_learn_rate: 100,
            mss_clamp: true,
            tap_offload: true,
            expect_move_ttl_s: 600,
            dhcp_mtu: true,
            state_file: None,
            peers: Vec::new(),
            violins: Vec::new(),
        }
    }
}

/// A peer to dial.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its QUIC address.
    pub addr: SocketAddr,
}

/// One violin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViolinEntry {
    /// 24-bit id.
    pub id: u32,
    /// Name (shown in status).
    #[serde(default)]
    pub name: String,
    /// Bridge name (default `vio<id>`); created unless it exists.
    pub bridge: Option<String>,
    /// Hosts allowed to be members: `site/host`, `site/*`, `*`.
    #[serde(default = "all_hosts")]
    pub allowed: Vec<String>,
    /// Managed VMs: their MACs are accepted only from their home host, ARP for their addresses
    /// is answered from this table and cannot be changed by guests.
    #[serde(default)]
    pub vms: Vec<VmEntry>,
    /// The violin's IPv4 subnet (`10.1.0.0/24`): with it, the daemon answers DHCP for the
    /// managed VMs on its TAP.
    pub subnet: Option<String>,
}

fn all_hosts() -> Vec<String> {
    vec!["*".into()]
}

/// A VM's addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    /// MAC `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// The host it runs on (`site/host`); without it, the first host that claims the MAC.
    /// Moves follow `expect_move`.
    pub host: Option<String>,
}

impl ViolinEntry {
    /// The violin as the control plane would describe it.
    pub fn spec(&self) -> viola_api::overlay::ViolinSpec {
        viola_api::overlay::ViolinSpec {
            id: self.id,
            name: self.name.clone(),
            allowed: self.allowed.clone(),
            subnet: self.subnet.clone(),
            mtu: None,
            vms: self
                .vms
                .iter()
                .map(|vm| viola_api::overlay::ManagedVmSpec {
                    mac: vm.mac.clone(),
                    ip: vm.ip,
                    host: vm.host.clone(),
                })
                .collect(),
        }
    }

    /// The bridge name.
    pub fn bridge_name(&self) -> String {
        self.bridge
            .clone()
            .unwrap_or_else(|| format!("vio{}", self.id))
    }

    /// The TAP name (`<bridge>t`, at most 15 characters).
    pub fn tap_name(&self) -> String {
        let mut n = self.bridge_name();
        n.truncate(14);
        n.push('t');
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses_and_unknown_keys_are_refused() {
        let cfg: OverlayConfig = toml::from_str(
            r#"
            listen = "198.18.1.11:4500"
            [[peers]]
            addr = "198.18.2.11:4500"
            [[violins]]
            id = 1
            vms = [{ mac = "52:54:00:00:00:05", ip = "10.1.0.5" }]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.violins[0].bridge_name(), "vio1");
        assert_eq!(cfg.violins[0].tap_name(), "vio1t");
        assert_eq!(cfg.violins[0].allowed, vec!["*"]);
        assert_eq!(cfg.mtu, 1500);
        assert_eq!(cfg.state_file, None);
        assert!(cfg.dhcp_mtu);
        assert_eq!(cfg.violins[0].spec().vms[0].mac, "52:54:00:00:00:05");
        assert_eq!(cfg.cpu_wake_latency_us, None);
        assert_eq!(cfg.busy_poll_us, 300);
        let off: OverlayConfig = toml::from_str("busy_poll_us = 0").unwrap();
        assert_eq!(off.busy_poll_us, 0);
        let low: OverlayConfig = toml::from_str("cpu_wake_latency_us = 0").unwrap();
        assert_eq!(low.cpu_wake_latency_us, Some(0));
        assert!(toml::from_str::<OverlayConfig>("cpu_wake_latency_us = -1").is_err());
        assert!(toml::from_str::<OverlayConfig>("listn = \"1.2.3.4:1\"").is_err());
        assert_eq!(cfg.quic_congestion, QuicCongestion::Bbr);
        for (name, want) in [
            ("bbr", QuicCongestion::Bbr),
            ("cubic", QuicCongestion::Cubic),
            ("new_reno", QuicCongestion::NewReno),
        ] {
            let c: OverlayConfig =
                toml::from_str(&format!("quic_congestion = \"{name}\"")).unwrap();
            assert_eq!(c.quic_congestion, want);
        }
        assert!(toml::from_str::<OverlayConfig>("quic_congestion = \"vegas\"").is_err());
    }
}
