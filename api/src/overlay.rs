//! The overlay daemon's control API: requests, replies and the status it reports, and the
//! clients: over QUIC with mutual TLS (ALPN `viola-overlay-ctl/1`, roles `adaptmgr` and `cli`)
//! or the host-local unix socket.
//!
//! On the wire a request is one JSON object per line (`{"cmd":"status"}`,
//! `{"cmd":"expect_move","violin":1,"mac":"52:54:00:00:00:05","host":"b/b1"}`). A reply is one
//! JSON line: the status object itself, `{"ok":true}`, or `{"ok":false,"error":"…"}` (the shape
//! the adaptation manager reads).

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use viola_common::identity::{self, Identity, Role, alpn};

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Asks for [`OverlayStatus`].
    Status,
    /// Announces that `mac` of `violin` will move to `host` (`site/host`).
    ExpectMove {
        /// Violin id (24 bits).
        violin: u32,
        /// MAC, `aa:bb:cc:dd:ee:ff`.
        mac: String,
        /// Destination host, `site/host`.
        host: String,
    },
    /// Makes this host a member of a violin, or replaces the violin's settings if it already
    /// is (idempotent): its bridge and TAP are made at once, no restart. Sent by the manager.
    SetViolin {
        /// What the violin is.
        violin: ViolinSpec,
    },
    /// Takes this host out of a violin: its bridge (if the daemon made it) and TAP go.
    RemoveViolin {
        /// Violin id (24 bits).
        violin: u32,
    },
}

/// A violin as the control plane hands it to an overlay daemon (and as a daemon keeps it
/// across its restarts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViolinSpec {
    /// 24-bit id.
    pub id: u32,
    /// Name (shown in status).
    pub name: String,
    /// Hosts allowed to be members: `site/host`, `site/*`, `*`.
    pub allowed: Vec<String>,
    /// The violin's IPv4 subnet (`10.1.0.0/24`); with it, the daemon answers DHCP for the
    /// managed VMs on its TAP (each gets its own `ip`, nobody else gets a lease).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// The MTU the daemon's DHCP answers tell the violin's VMs (option 26): what their NICs
    /// are given; without it, the daemon's own `mtu` (its `dhcp_mtu` setting).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Managed VMs: their MACs are accepted only from their home host, ARP (and DHCP) for
    /// their addresses is answered from this table.
    #[serde(default)]
    pub vms: Vec<ManagedVmSpec>,
}

/// The smallest violin MTU (what IPv4 allows, RFC 2132).
pub const MIN_VIOLIN_MTU: u16 = 68;
/// The largest violin MTU: jumbo frames of 9000 bytes cross sites as fragments of QUIC
/// datagrams (the overlay's reassembly path), which is as far as it is tested.
pub const MAX_VIOLIN_MTU: u16 = 9000;

/// A managed VM's addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedVmSpec {
    /// MAC `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// The host it runs on (`site/host`); without it, the first host that claims the MAC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// The answer to a [`ControlRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum ControlReply {
    /// The daemon's status (the answer to [`ControlRequest::Status`]).
    Status(Box<OverlayStatus>),
    /// The request was carried out.
    Done,
    /// The request was not carried out (malformed, or not applicable).
    Refused {
        /// Why.
        reason: String,
    },
}

/// The wire shape of [`ControlReply`] (see the module documentation).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum ReplyWire<S> {
    Outcome {
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Status(S),
}

impl Serialize for ControlReply {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let wire: ReplyWire<&OverlayStatus> = match self {
            Self::Status(status) => ReplyWire::Status(status),
            Self::Done => ReplyWire::Outcome {
                ok: true,
                error: None,
            },
            Self::Refused { reason } => ReplyWire::Outcome {
                ok: false,
                error: Some(reason.clone()),
            },
        };
        wire.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ControlReply {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(
            match ReplyWire::<Box<OverlayStatus>>::deserialize(deserializer)? {
                ReplyWire::Status(status) => Self::Status(status),
                ReplyWire::Outcome { ok: true, .. } => Self::Done,
                ReplyWire::Outcome { ok: false, error } => Self::Refused {
                    reason: error.unwrap_or_else(|| "refused".to_owned()),
                },
            },
        )
    }
}

/// What the daemon reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OverlayStatus {
    /// The switching core: peers, violins, MAC tables, counters, drops.
    pub switch: SwitchStatus,
    /// Round-trip time per directly connected peer (`site/host`), milliseconds.
    pub rtt_ms: BTreeMap<String, f64>,
    /// Drops counted by the driver, by reason.
    pub driver_drops: BTreeMap<String, u64>,
    /// Connections refused, by reason.
    pub refused: BTreeMap<String, u64>,
    /// The CPU wake-up latency request this daemon holds, microseconds.
    pub cpu_wake_latency_us: Option<u32>,
    /// How often the daemon gave the CPU up after a sparse handoff (None: `handoff_yield` off).
    pub handoff_yields: Option<u64>,
    /// Busy polling after sparse packets (None: off).
    pub busy_poll: Option<BusyPollStatus>,
    /// Bytes each peer link (`site/host`) carried since the daemon started, its ended
    /// connections included: the UDP payload on the underlay, QUIC's overhead and
    /// retransmissions included. Monitors turn them into per-link rates.
    #[serde(default)]
    pub link_bytes: BTreeMap<String, LinkBytes>,
}

/// Bytes one peer link carried, each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkBytes {
    /// Sent to the peer.
    pub tx: u64,
    /// Received from it.
    pub rx: u64,
}

impl LinkBytes {
    /// What a connection carried so far.
    pub fn of(conn: &quinn::Connection) -> Self {
        let s = conn.stats();
        Self {
            tx: s.udp_tx.bytes,
            rx: s.udp_rx.bytes,
        }
    }

    /// Adds `other` (another connection's bytes).
    pub fn add(&mut self, other: Self) {
        self.tx = self.tx.saturating_add(other.tx);
        self.rx = self.rx.saturating_add(other.rx);
    }
}

/// Busy polling after sparse packets; on the wire `[window_us, polls]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(u64, u64)", into = "(u64, u64)")]
pub struct BusyPollStatus {
    /// The window after a sparse packet, microseconds.
    pub window_us: u64,
    /// Zero-timeout polls made so far.
    pub polls: u64,
}

impl From<(u64, u64)> for BusyPollStatus {
    fn from((window_us, polls): (u64, u64)) -> Self {
        Self { window_us, polls }
    }
}

impl From<BusyPollStatus> for (u64, u64) {
    fn from(s: BusyPollStatus) -> Self {
        (s.window_us, s.polls)
    }
}

/// The switching core's status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SwitchStatus {
    /// This host, `site/host`.
    pub host: String,
    /// Known peers.
    pub peers: Vec<PeerStatus>,
    /// Local violins.
    pub violins: Vec<ViolinStatus>,
    /// Counters.
    pub counters: Counters,
    /// Bytes held in reassembly.
    pub reassembly_bytes: usize,
}

impl SwitchStatus {
    /// The violin with this id, if this host carries it.
    pub fn violin(&self, id: u32) -> Option<&ViolinStatus> {
        self.violins.iter().find(|v| v.id == id)
    }
}

/// One peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// `site/host`.
    pub host: String,
    /// Direct connection up.
    pub connected: bool,
    /// Relay used when not connected.
    pub via: Option<String>,
    /// Datagram limit of the direct connection.
    pub max_datagram: usize,
    /// Violins it is a member of.
    pub violins: Vec<u32>,
}

/// One violin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViolinStatus {
    /// Id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Member hosts (besides this one) we exchange frames with.
    pub members: Vec<String>,
    /// MAC table.
    pub macs: Vec<MacStatus>,
    /// The violin's IPv4 subnet, if it has one (the daemon answers DHCP for its managed VMs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// Set at run time by a control request (`set_violin`, kept in the daemon's state file);
    /// false: from the daemon's TOML configuration.
    #[serde(default)]
    pub runtime: bool,
}

/// One MAC table entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MacStatus {
    /// MAC.
    pub mac: String,
    /// `local` or `site/host`.
    pub location: String,
    /// Move sequence number.
    pub seq: u64,
    /// Seconds since last seen.
    pub age_s: f64,
    /// IPv4 address seen, if any.
    pub ip: Option<Ipv4Addr>,
}

/// Counters of the switching core (monotonic).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Frames read from local TAPs.
    pub tap_frames: u64,
    /// Datagrams handed to the driver for sending (after fragmentation, all hops).
    pub datagrams_out: u64,
    /// Datagrams received.
    pub datagrams_in: u64,
    /// Frames delivered to local TAPs.
    pub delivered: u64,
    /// Frames sent to every member (broadcast/multicast/unknown unicast).
    pub flooded: u64,
    /// Frames split into fragments.
    pub fragmented: u64,
    /// Frames reassembled.
    pub reassembled: u64,
    /// Incomplete frames evicted from reassembly.
    pub reassembly_evicted: u64,
    /// ARP requests answered locally from control-plane knowledge.
    pub arp_answered: u64,
    /// MAC location changes (moves) applied.
    pub mac_moves: u64,
    /// Announcements ignored as stale (lower sequence number).
    pub stale_announcements: u64,
    /// Remote frames whose source MAC is known elsewhere (ignored for learning).
    pub stale_source_frames: u64,
    /// Frames re-sent to a MAC's new host.
    pub redirected: u64,
    /// Datagrams relayed for other hosts.
    pub relayed: u64,
    /// MACs from peers not learned because a limit was reached (their frames are delivered).
    #[serde(default)]
    pub learning_refused: u64,
    /// TCP SYNs from local guests whose MSS was lowered to fit one datagram.
    #[serde(default)]
    pub mss_clamped: u64,
    /// DHCP offers sent to managed VMs.
    #[serde(default)]
    pub dhcp_offers: u64,
    /// DHCP acknowledgements sent to managed VMs.
    #[serde(default)]
    pub dhcp_acks: u64,
    /// DHCP refusals (NAK: a managed VM asked for an address other than its own).
    #[serde(default)]
    pub dhcp_naks: u64,
    /// DHCP messages to the broadcast or server address from clients that are not managed
    /// VMs of the violin (no lease from the overlay; broadcast ones go their usual way).
    #[serde(default)]
    pub dhcp_unknown_client: u64,
    /// Drops by reason (snake_case); a reason appears once it happened.
    pub drops: BTreeMap<String, u64>,
}

impl Counters {
    /// Every counter but the drops, by name (the names of the status' JSON fields).
    #[must_use]
    pub fn events(&self) -> [(&'static str, u64); 20] {
        [
            ("tap_frames", self.tap_frames),
            ("datagrams_out", self.datagrams_out),
            ("datagrams_in", self.datagrams_in),
            ("delivered", self.delivered),
            ("flooded", self.flooded),
            ("fragmented", self.fragmented),
            ("reassembled", self.reassembled),
            ("reassembly_evicted", self.reassembly_evicted),
            ("arp_answered", self.arp_answered),
            ("mac_moves", self.mac_moves),
            ("stale_announcements", self.stale_announcements),
            ("stale_source_frames", self.stale_source_frames),
            ("redirected", self.redirected),
            ("relayed", self.relayed),
            ("learning_refused", self.learning_refused),
            ("mss_clamped", self.mss_clamped),
            ("dhcp_offers", self.dhcp_offers),
            ("dhcp_acks", self.dhcp_acks),
            ("dhcp_naks", self.dhcp_naks),
            ("dhcp_unknown_client", self.dhcp_unknown_client),
        ]
    }
}

/// Why a control request to a daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The unix control socket.
    #[error("cannot reach the control socket {}", .path.display())]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A local QUIC endpoint for the request.
    #[error("cannot open a QUIC endpoint")]
    Endpoint(#[source] io::Error),
    /// TLS configuration from our identity.
    #[error("TLS configuration")]
    Tls(#[from] identity::TlsConfigError),
    /// The connection could not be started.
    #[error("cannot connect")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed (includes refusal by the daemon).
    #[error("connection failed")]
    Connection(#[from] quinn::ConnectionError),
    /// Sending the request.
    #[error("cannot send the request")]
    Send(#[from] quinn::WriteError),
    /// Receiving the reply.
    #[error("cannot read the reply")]
    Receive(#[from] quinn::ReadToEndError),
    /// The daemon did not answer in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The request could not be encoded.
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
    /// The reply is not a control reply.
    #[error("bad reply")]
    Reply(#[source] serde_json::Error),
}

/// How long a client waits for a reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client waits for a reply over QUIC (connection set-up included).
const QUIC_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one request to the daemon's unix control socket and returns its reply.
pub async fn request_unix(
    socket: &Path,
    req: &ControlRequest,
) -> Result<ControlReply, ClientError> {
    let io_err = |source| ClientError::Socket {
        path: socket.to_owned(),
        source,
    };
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(io_err)?;
    let mut line = serde_json::to_string(req).map_err(ClientError::Encode)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).await.map_err(io_err)?;
    let mut reply = String::new();
    tokio::time::timeout(REPLY_TIMEOUT, stream.read_to_string(&mut reply))
        .await
        .map_err(|_| ClientError::Timeout(REPLY_TIMEOUT))?
        .map_err(io_err)?;
    serde_json::from_str(&reply).map_err(ClientError::Reply)
}

/// Sends one request to the daemon at `addr` over QUIC with mutual TLS (our identity must have
/// role `adaptmgr` or `cli`) and returns its reply.
pub async fn request_quic(
    me: &Identity,
    addr: SocketAddr,
    req: &ControlRequest,
) -> Result<ControlReply, ClientError> {
    let bind: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(ClientError::Endpoint)?;
    endpoint.set_default_client_config(me.client_config(alpn::OVERLAY_CONTROL)?);
    let conn = endpoint
        .connect(addr, &identity::server_name(Role::Overlay))?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let body = serde_json::to_vec(req).map_err(ClientError::Encode)?;
    send.write_all(&body).await?;
    let _ = send.finish();
    let reply = tokio::time::timeout(QUIC_REPLY_TIMEOUT, recv.read_to_end(16 << 20))
        .await
        .map_err(|_| ClientError::Timeout(QUIC_REPLY_TIMEOUT))??;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    serde_json::from_slice(&reply).map_err(ClientError::Reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> OverlayStatus {
        OverlayStatus {
            switch: SwitchStatus {
                host: "a/a1".into(),
                peers: vec![PeerStatus {
                    host: "b/b1".into(),
                    connected: false,
                    via: Some("c/c1".into()),
                    max_datagram: 1434,
                    violins: vec![1],
                }],
                violins: vec![ViolinStatus {
                    id: 1,
                    name: "blue".into(),
                    members: vec!["b/b1".into()],
                    macs: vec![MacStatus {
                        mac: "52:54:00:00:00:05".into(),
                        location: "local".into(),
                        seq: 2,
                        age_s: 0.5,
                        ip: Some(Ipv4Addr::new(10, 1, 0, 5)),
                    }],
                    subnet: Some("10.1.0.0/24".into()),
                    runtime: true,
                }],
                counters: Counters {
                    relayed: 3,
                    drops: [("not_member".to_owned(), 2)].into(),
                    ..Counters::default()
                },
                reassembly_bytes: 0,
            },
            rtt_ms: [("b/b1".to_owned(), 0.25)].into(),
            driver_drops: BTreeMap::new(),
            refused: [("handshake".to_owned(), 1)].into(),
            cpu_wake_latency_us: None,
            handoff_yields: Some(7),
            busy_poll: Some(BusyPollStatus {
                window_us: 300,
                polls: 9,
            }),
            link_bytes: [("b/b1".to_owned(), LinkBytes { tx: 9000, rx: 4000 })].into(),
        }
    }

    #[test]
    fn requests_keep_their_json_shape() {
        let status: ControlRequest = serde_json::from_str(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(status, ControlRequest::Status);
        let line = r#"{"cmd":"expect_move","violin":1,"mac":"52:54:00:00:00:05","host":"b/b1"}"#;
        let req: ControlRequest = serde_json::from_str(line).unwrap();
        assert_eq!(serde_json::to_string(&req).unwrap(), line);
        let typo = r#"{"cmd":"expect_move","violin":1,"mac":"x","host":"b/b1","hots":"c"}"#;
        assert!(serde_json::from_str::<ControlRequest>(typo).is_err());
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"reboot"}"#).is_err());
    }

    #[test]
    fn outcome_replies_are_ok_objects() {
        let done = serde_json::to_string(&ControlReply::Done).unwrap();
        assert_eq!(done, r#"{"ok":true}"#);
        let refused = ControlReply::Refused {
            reason: "bad MAC".into(),
        };
        let line = serde_json::to_string(&refused).unwrap();
        assert_eq!(line, r#"{"ok":false,"error":"bad MAC"}"#);
        for reply in [ControlReply::Done, refused] {
            let text = serde_json::to_string(&reply).unwrap();
            assert_eq!(serde_json::from_str::<ControlReply>(&text).unwrap(), reply);
        }
        let bare: ControlReply = serde_json::from_str(r#"{"ok":false}"#).unwrap();
        assert!(matches!(bare, ControlReply::Refused { .. }));
        assert!(serde_json::from_str::<ControlReply>(r#"{"nonsense":1}"#).is_err());
    }

    #[test]
    fn a_status_reply_is_the_status_object_with_the_keys_lab_tests_read() {
        let reply = ControlReply::Status(Box::new(status()));
        let v = serde_json::to_value(&reply).unwrap();
        assert_eq!(v["switch"]["host"], "a/a1");
        assert_eq!(v["switch"]["peers"][0]["via"], "c/c1");
        assert_eq!(v["switch"]["violins"][0]["macs"][0]["location"], "local");
        assert_eq!(v["switch"]["counters"]["relayed"], 3);
        assert_eq!(v["switch"]["counters"]["drops"]["not_member"], 2);
        assert_eq!(v["switch"]["reassembly_bytes"], 0);
        assert_eq!(v["refused"]["handshake"], 1);
        assert_eq!(v["rtt_ms"]["b/b1"], 0.25);
        assert!(v["cpu_wake_latency_us"].is_null());
        assert_eq!(v["handoff_yields"], 7);
        assert_eq!(v["busy_poll"], serde_json::json!([300, 9]));
        assert!(v["driver_drops"].as_object().is_some());
        let back: ControlReply = serde_json::from_value(v).unwrap();
        assert_eq!(back, reply);
    }

    #[test]
    fn events_name_every_counter_field_but_drops() {
        let v = serde_json::to_value(Counters::default()).unwrap();
        let mut fields: Vec<&str> = v
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "drops")
            .collect();
        let mut events: Vec<&str> = Counters::default()
            .events()
            .iter()
            .map(|(name, _)| *name)
            .collect();
        fields.sort_unstable();
        events.sort_unstable();
        assert_eq!(fields, events);
    }
}
