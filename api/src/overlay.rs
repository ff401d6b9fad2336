//! The overlay daemon's control API: typed requests and replies, the daemon's status, and the
//! clients. One JSON request per QUIC bidirectional stream (ALPN `viola-overlay-ctl/1`, roles
//! `adaptmgr` and `cli`) or per line on the host-local unix socket; one JSON reply.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use viola_common::identity::{self, Identity, Role, alpn};

/// Largest request the daemon reads.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Largest reply a client reads (a status with big MAC tables).
pub const MAX_REPLY: usize = 16 << 20;
/// How long a client waits for a reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A request to an overlay daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Answered with [`ControlReply::Status`].
    Status,
    /// Announces that `mac` of `violin` will move to `host` (`site/host`), so the daemon
    /// switches to it at the first frame from there and never flaps back.
    ExpectMove {
        /// Violin id (24 bits).
        violin: u32,
        /// MAC (`52:54:00:..`).
        mac: String,
        /// Destination host, `site/host`.
        host: String,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlReply {
    Status(Box<OverlayStatus>),
    /// The request was carried out.
    Done,
    /// The request was understood but not carried out.
    Refused {
        reason: Refusal,
    },
}

/// Why a daemon refused a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    #[error("this host is not a member of violin {0}")]
    NotMember(u32),
    #[error("violin id {0} exceeds 24 bits")]
    BadViolin(u32),
    #[error("{0:?} is not a MAC address")]
    BadMac(String),
    #[error("malformed request: {0}")]
    Malformed(String),
}

/// What `status` returns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OverlayStatus {
    /// The switching core's view.
    pub switch: SwitchStatus,
    /// Round-trip time per directly connected peer, milliseconds.
    pub rtt_ms: BTreeMap<String, f64>,
    /// Drops counted by the driver, by reason.
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

/// The switching core's status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SwitchStatus {
    /// This host, `site/host`.
    pub host: String,
    pub peers: Vec<PeerStatus>,
    /// Local violins.
    pub violins: Vec<ViolinStatus>,
    pub counters: SwitchCounters,
    /// Bytes held in reassembly.
    pub reassembly_bytes: usize,
}

impl SwitchStatus {
    /// The violin with this id, if this host carries it.
    pub fn violin(&self, id: u32) -> Option<&ViolinStatus> {
        self.violins.iter().find(|v| v.id == id)
    }
}

/// One peer host.
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

/// One violin on this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViolinStatus {
    pub id: u32,
    pub name: String,
    /// Member hosts (besides this one) this host exchanges frames with, `site/host`.
    pub members: Vec<String>,
    /// MAC table.
    pub macs: Vec<MacStatus>,
}

/// One MAC table entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MacStatus {
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

/// Monotonic counters of the switching core.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchCounters {
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
    /// Drops by reason.
    pub drops: BTreeMap<String, u64>,
}

/// Why a control request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot open a QUIC endpoint")]
    Endpoint(#[source] std::io::Error),
    #[error("invalid TLS configuration")]
    Tls(#[from] identity::TlsConfigError),
    #[error("cannot connect to the overlay daemon at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("connection to the overlay daemon at {addr} failed")]
    Connection {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("sending the request failed")]
    Send(#[source] std::io::Error),
    #[error("reading the reply failed")]
    Receive(#[source] std::io::Error),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the control socket {path}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed reply")]
    Reply(#[source] serde_json::Error),
}

/// Decodes a reply (also the fuzzers' and tests' entry point).
pub fn decode_reply(bytes: &[u8]) -> Result<ControlReply, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// Talks to overlay daemons over QUIC with mutual TLS: the caller's certificate must carry
/// the `adaptmgr` or `cli` role, the daemon's the `overlay` role. One endpoint for any number
/// of daemons.
pub struct OverlayClient {
    endpoint: quinn::Endpoint,
}

impl OverlayClient {
    pub fn new(me: &Identity) -> Result<Self, ClientError> {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
            .map_err(ClientError::Endpoint)?;
        endpoint.set_default_client_config(me.client_config(alpn::OVERLAY_CONTROL)?);
        Ok(Self { endpoint })
    }

    /// Sends `req` to the daemon at `addr` and returns its reply.
    pub async fn request(
        &self,
        addr: SocketAddr,
        req: &ControlRequest,
    ) -> Result<ControlReply, ClientError> {
        let conn = self
            .endpoint
            .connect(addr, &identity::server_name(Role::Overlay))
            .map_err(|source| ClientError::Connect { addr, source })?;
        let exchange = async {
            let conn = conn
                .await
                .map_err(|source| ClientError::Connection { addr, source })?;
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|source| ClientError::Connection { addr, source })?;
            let body = serde_json::to_vec(req).map_err(ClientError::Reply)?;
            send.write_all(&body)
                .await
                .map_err(|e| ClientError::Send(e.into()))?;
            let _ = send.finish();
            let reply = recv
                .read_to_end(MAX_REPLY)
                .await
                .map_err(|e| ClientError::Receive(std::io::Error::other(e)))?;
            conn.close(0u32.into(), b"done");
            decode_reply(&reply).map_err(ClientError::Reply)
        };
        tokio::time::timeout(REPLY_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout(REPLY_TIMEOUT))?
    }

    /// Waits until the endpoint's connections are closed politely.
    pub async fn close(self) {
        self.endpoint.wait_idle().await;
    }
}

/// Sends `req` to the daemon's host-local control socket and returns its reply.
pub async fn request_unix(
    socket: &Path,
    req: &ControlRequest,
) -> Result<ControlReply, ClientError> {
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Socket {
                path: socket.display().to_string(),
                source,
            })?;
        let mut line = serde_json::to_vec(req).map_err(ClientError::Reply)?;
        line.push(b'\n');
        stream.write_all(&line).await.map_err(ClientError::Send)?;
        let mut reply = Vec::new();
        stream
            .take(MAX_REPLY as u64)
            .read_to_end(&mut reply)
            .await
            .map_err(ClientError::Receive)?;
        decode_reply(&reply).map_err(ClientError::Reply)
    };
    tokio::time::timeout(REPLY_TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout(REPLY_TIMEOUT))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_keep_their_line_format() {
        let req = ControlRequest::ExpectMove {
            violin: 7,
            mac: "52:54:00:00:00:05".into(),
            host: "b/b1".into(),
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            r#"{"cmd":"expect_move","violin":7,"mac":"52:54:00:00:00:05","host":"b/b1"}"#
        );
        assert_eq!(serde_json::from_str::<ControlRequest>(&json).unwrap(), req);
        let extra = r#"{"cmd":"expect_move","violin":7,"mac":"m","host":"b/b1","x":1}"#;
        assert!(serde_json::from_str::<ControlRequest>(extra).is_err());
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"reboot"}"#).is_err());
    }

    #[test]
    fn replies_round_trip() {
        let mut status = OverlayStatus::default();
        status.switch.violins.push(ViolinStatus {
            id: 1,
            name: "demo".into(),
            members: vec!["b/b1".into()],
            macs: vec![],
        });
        for reply in [
            ControlReply::Done,
            ControlReply::Refused {
                reason: Refusal::NotMember(3),
            },
            ControlReply::Status(Box::new(status)),
        ] {
            let bytes = serde_json::to_vec(&reply).unwrap();
            assert_eq!(decode_reply(&bytes).unwrap(), reply);
        }
    }
}
