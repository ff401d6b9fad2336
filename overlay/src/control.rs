//! Control messages between overlay daemons (reliable: sent on a QUIC stream), and their
//! length-prefixed framing.
//!
//! Each message is a 4-byte big-endian length followed by that many bytes of JSON. Messages
//! larger than [`MAX_CONTROL_LEN`] are refused.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::wire::ViolinId;

/// Largest control message accepted.
pub const MAX_CONTROL_LEN: usize = 1 << 20;

/// A peer's name and where it listens (gossiped so new hosts are found without restarts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAddr {
    /// `site/host`.
    pub host: String,
    /// Underlay addresses it accepts connections on.
    pub addrs: Vec<SocketAddr>,
}

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlMsg {
    /// The violins the sender is a member of (sent on connect and on change).
    Membership {
        /// Violin ids.
        violins: Vec<ViolinId>,
        /// The sender is new to the receiver (just connected or restarted): the receiver
        /// answers with its own membership and a full sync of its MACs.
        #[serde(default)]
        ask: bool,
    },
    /// The hosts the sender has a direct connection to (for relay routing).
    Reach {
        /// `site/host` names.
        connected: Vec<String>,
    },
    /// Peers the sender knows, with their addresses (driver-level gossip).
    Peers {
        /// Known peers.
        known: Vec<PeerAddr>,
    },
    /// The sender now hosts `mac` in `violin`, with a sequence number higher than any it knew.
    Announce {
        /// Violin.
        violin: ViolinId,
        /// MAC, `aa:bb:..`.
        mac: String,
        /// Move sequence number.
        seq: u64,
        /// An IPv4 address the MAC was seen using (ARP), for ARP answering.
        ip: Option<Ipv4Addr>,
    },
    /// The receiver announced a sequence number not higher than `seq`, which the sender knows.
    SeqHint {
        /// Violin.
        violin: ViolinId,
        /// MAC.
        mac: String,
        /// Highest sequence number the sender knows for the MAC.
        seq: u64,
    },
    /// `mac` is expected to move to `host` soon (from the adaptation manager).
    ExpectMove {
        /// Violin.
        violin: ViolinId,
        /// MAC.
        mac: String,
        /// `site/host` it will appear on.
        host: String,
    },
    /// Forward `msg` to `to` (sender -> relay).
    Relay {
        /// Destination `site/host`.
        to: String,
        /// The message.
        msg: Box<Self>,
    },
    /// `msg` forwarded on behalf of `from` (relay -> destination).
    Relayed {
        /// Original sender.
        from: String,
        /// The message.
        msg: Box<Self>,
    },
}

/// A control message that could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ControlDecodeError {
    /// Length prefix above [`MAX_CONTROL_LEN`].
    #[error("control message of {0} bytes exceeds the limit")]
    TooLong(usize),
    /// Not a valid message.
    #[error("malformed control message")]
    Json(#[source] serde_json::Error),
}

/// Encodes a message with its length prefix.
pub fn encode(msg: &ControlMsg) -> Vec<u8> {
    // Serialising a plain enum of strings and numbers cannot fail.
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks a length prefix.
pub fn check_len(prefix: [u8; 4]) -> Result<usize, ControlDecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_CONTROL_LEN {
        return Err(ControlDecodeError::TooLong(len));
    }
    Ok(len)
}

/// Decodes a message body (without the length prefix).
pub fn decode(body: &[u8]) -> Result<ControlMsg, ControlDecodeError> {
    serde_json::from_slice(body).map_err(ControlDecodeError::Json)
}

/// Fuzz entry point: arbitrary bytes as a framed control message. Never panics; what decodes
/// re-encodes to a message that decodes to the same value.
pub fn fuzz_decode(data: &[u8]) {
    let Some((prefix, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    // The daemon reads the prefix, refuses long ones, then reads exactly that many bytes.
    let Ok(len) = check_len(*prefix) else { return };
    let Ok(msg) = decode(body.get(..len).unwrap_or(body)) else {
        return;
    };
    let again = encode(&msg);
    let len = check_len(again[..4].try_into().unwrap_or_default()).expect("own message too long");
    assert_eq!(len, again.len() - 4);
    assert_eq!(decode(&again[4..]).ok(), Some(msg));
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn roundtrip() {
        let msg = ControlMsg::Relay {
            to: "c/c1".into(),
            msg: Box::new(ControlMsg::Announce {
                violin: ViolinId::new(5).unwrap(),
                mac: "02:00:00:00:00:01".into(),
                seq: 3,
                ip: Some(Ipv4Addr::new(10, 1, 0, 5)),
            }),
        };
        let bytes = encode(&msg);
        let len = check_len(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(decode(&bytes[4..]).unwrap(), msg);
        assert!(check_len([0xFF; 4]).is_err());
        assert!(decode(br#"{"t":"membership","violins":[1],"x":1}"#).is_err());
        assert!(decode(br#"{"t":"membership","violins":[16777216]}"#).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&data);
            fuzz_decode(&data);
        }
    }
}
