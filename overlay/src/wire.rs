//! The datagram wire format between overlay daemons, and Ethernet/ARP helpers.
//!
//! Every QUIC datagram starts with one byte: the high nibble is the format version (1), the
//! low nibble the [`Kind`]. Multi-byte fields are big-endian.
//!
//! ```text
//! FRAME       0x10 | violin:24 | ethernet frame
//! REDIRECTED  0x14 | violin:24 | ethernet frame      (re-sent by a host the MAC moved away from)
//! FRAGMENT    0x11 | violin:24 | frag_id:32 | index:8 | count:8 | inner_kind:8 | part of a frame
//! RELAY       0x12 | len:8 | destination host (utf-8) | inner datagram   (sender -> relay)
//! RELAYED     0x13 | len:8 | source host (utf-8)      | inner datagram   (relay -> destination)
//! ```
//! A frame that does not fit the path's datagram limit is split into at most [`MAX_FRAGMENTS`]
//! FRAGMENTs; `frag_id` is a per-sender counter, `inner_kind` is FRAME or REDIRECTED.
//! Decoders never panic: anything malformed is a [`DecodeError`], which callers count and drop.

use bytes::{BufMut, Bytes, BytesMut};

/// A violin (virtual LAN) id: 24 bits.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u32", into = "u32")]
pub struct ViolinId(u32);

impl TryFrom<u32> for ViolinId {
    type Error = String;

    fn try_from(id: u32) -> Result<Self, Self::Error> {
        Self::new(id).ok_or_else(|| format!("violin id {id} does not fit 24 bits"))
    }
}

impl From<ViolinId> for u32 {
    fn from(v: ViolinId) -> Self {
        v.0
    }
}

impl ViolinId {
    /// Largest valid id.
    pub const MAX: u32 = 0x00FF_FFFF;

    /// The id, if it fits 24 bits.
    pub fn new(id: u32) -> Option<Self> {
        (id <= Self::MAX).then_some(Self(id))
    }

    /// The numeric value.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl std::fmt::Display for ViolinId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Current format version (high nibble of the first byte).
pub const VERSION: u8 = 1;
/// Bytes in front of an Ethernet frame in a FRAME datagram.
pub const FRAME_HEADER_LEN: usize = 4;
/// Bytes in front of the payload of a FRAGMENT datagram.
pub const FRAGMENT_HEADER_LEN: usize = 11;
/// Most fragments one frame may be split into.
pub const MAX_FRAGMENTS: usize = 8;
/// Largest host name carried in RELAY/RELAYED headers.
pub const MAX_HOST_NAME: usize = 255;

/// The kind of a datagram (low nibble of the first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole Ethernet frame.
    Frame = 0,
    /// One part of a frame too large for one datagram.
    Fragment = 1,
    /// A datagram to be forwarded by the receiver to another host.
    Relay = 2,
    /// A datagram forwarded by the sender on behalf of another host.
    Relayed = 3,
    /// A whole frame re-sent by the host its destination MAC moved away from.
    Redirected = 4,
}

impl Kind {
    fn from_nibble(n: u8) -> Option<Self> {
        Some(match n {
            0 => Self::Frame,
            1 => Self::Fragment,
            2 => Self::Relay,
            3 => Self::Relayed,
            4 => Self::Redirected,
            _ => return None,
        })
    }

    fn byte(self) -> u8 {
        (VERSION << 4) | self as u8
    }
}

/// Why a datagram could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Empty or shorter than its header.
    #[error("datagram truncated")]
    Truncated,
    /// Unknown version nibble.
    #[error("unknown format version")]
    Version,
    /// Unknown kind nibble.
    #[error("unknown datagram kind")]
    Kind,
    /// Fragment index/count out of range.
    #[error("bad fragment header")]
    Fragment,
    /// A relay host name that is not UTF-8 or empty.
    #[error("bad relay host name")]
    HostName,
    /// A frame shorter than an Ethernet header.
    #[error("ethernet frame too short")]
    ShortFrame,
}

/// One part of a fragmented frame, as decoded (and as the reassembler takes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// The violin.
    pub violin: ViolinId,
    /// Sender-local id shared by the parts of one frame.
    pub frag_id: u32,
    /// Position, `0..count`.
    pub index: u8,
    /// Number of parts, `1..=MAX_FRAGMENTS`.
    pub count: u8,
    /// Whether the reassembled frame is REDIRECTED.
    pub redirected: bool,
    /// This part's bytes.
    pub payload: Bytes,
}

/// A decoded datagram; payloads are zero-copy slices of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram {
    /// A whole frame (`redirected`: re-sent after a MAC move, never re-sent again).
    Frame {
        /// The violin.
        violin: ViolinId,
        /// The Ethernet frame.
        frame: Bytes,
        /// Set on REDIRECTED.
        redirected: bool,
    },
    /// One part of a frame.
    Fragment(Fragment),
    /// To be forwarded to `to`.
    Relay {
        /// Destination host.
        to: String,
        /// The datagram to forward.
        inner: Bytes,
    },
    /// Forwarded on behalf of `from`.
    Relayed {
        /// Original sender.
        from: String,
        /// The original datagram.
        inner: Bytes,
    },
}

fn violin_at(b: &[u8]) -> ViolinId {
    ViolinId(u32::from_be_bytes([0, b[0], b[1], b[2]]))
}

/// Decodes one datagram. Never panics; every malformed input is an error.
pub fn decode(datagram: &Bytes) -> Result<Datagram, DecodeError> {
    let first = *datagram.first().ok_or(DecodeError::Truncated)?;
    if first >> 4 != VERSION {
        return Err(DecodeError::Version);
    }
    let kind = Kind::from_nibble(first & 0x0F).ok_or(DecodeError::Kind)?;
    match kind {
        Kind::Frame | Kind::Redirected => {
            if datagram.len() < FRAME_HEADER_LEN + ETHERNET_HEADER_LEN {
                return Err(if datagram.len() < FRAME_HEADER_LEN {
                    DecodeError::Truncated
                } else {
                    DecodeError::ShortFrame
                });
            }
            Ok(Datagram::Frame {
                violin: violin_at(&datagram[1..4]),
                frame: datagram.slice(FRAME_HEADER_LEN..),
                redirected: kind == Kind::Redirected,
            })
        }
        Kind::Fragment => {
            if datagram.len() <= FRAGMENT_HEADER_LEN {
                return Err(DecodeError::Truncated);
            }
            let index = datagram[8];
            let count = datagram[9];
            let inner = datagram[10];
            if count == 0 || usize::from(count) > MAX_FRAGMENTS || index >= count {
                return Err(DecodeError::Fragment);
            }
            let redirected = match inner {
                b if b == Kind::Frame.byte() => false,
                b if b == Kind::Redirected.byte() => true,
                _ => return Err(DecodeError::Fragment),
            };
            Ok(Datagram::Fragment(Fragment {
                violin: violin_at(&datagram[1..4]),
                frag_id: u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]),
                index,
                count,
                redirected,
                payload: datagram.slice(FRAGMENT_HEADER_LEN..),
            }))
        }
        Kind::Relay | Kind::Relayed => {
            let len = usize::from(*datagram.get(1).ok_or(DecodeError::Truncated)?);
            if len == 0 {
                return Err(DecodeError::HostName);
            }
            let name = datagram.get(2..2 + len).ok_or(DecodeError::Truncated)?;
            let name = std::str::from_utf8(name)
                .map_err(|_| DecodeError::HostName)?
                .to_owned();
            let inner = datagram.slice(2 + len..);
            if inner.is_empty() {
                return Err(DecodeError::Truncated);
            }
            Ok(if kind == Kind::Relay {
                Datagram::Relay { to: name, inner }
            } else {
                Datagram::Relayed { from: name, inner }
            })
        }
    }
}

/// Writes the FRAME (or REDIRECTED) header into the first [`FRAME_HEADER_LEN`] bytes of `buf`,
/// which the caller reserved in front of the frame, and returns the datagram.
pub fn seal_frame(mut buf: BytesMut, violin: ViolinId, redirected: bool) -> Bytes {
    let kind = if redirected {
        Kind::Redirected
    } else {
        Kind::Frame
    };
    let v = violin.0.to_be_bytes();
    buf[..FRAME_HEADER_LEN].copy_from_slice(&[kind.byte(), v[1], v[2], v[3]]);
    buf.freeze()
}

/// Encodes a whole frame as a FRAME/REDIRECTED datagram (copies; the hot path uses
/// [`seal_frame`] on a buffer with reserved headroom instead).
pub fn encode_frame(violin: ViolinId, frame: &[u8], redirected: bool) -> Bytes {
    let mut buf = BytesMut::with_capacity(FRAME_HEADER_LEN + frame.len());
    buf.put_bytes(0, FRAME_HEADER_LEN);
    buf.extend_from_slice(frame);
    seal_frame(buf, violin, redirected)
}

/// Splits a frame into FRAGMENT datagrams of at most `max_datagram` bytes each.
/// `None` if even [`MAX_FRAGMENTS`] parts cannot carry it.
pub fn fragment(
    violin: ViolinId,
    frame: &[u8],
    redirected: bool,
    frag_id: u32,
    max_datagram: usize,
) -> Option<Vec<Bytes>> {
    let per = max_datagram.checked_sub(FRAGMENT_HEADER_LEN)?;
    if per == 0 || frame.is_empty() {
        return None;
    }
    let count = frame.len().div_ceil(per);
    if count > MAX_FRAGMENTS {
        return None;
    }
    // Equal-sized parts: no tiny tail fragment.
    let per = frame.len().div_ceil(count);
    let v = violin.0.to_be_bytes();
    let inner = if redirected {
        Kind::Redirected
    } else {
        Kind::Frame
    };
    Some(
        frame
            .chunks(per)
            .enumerate()
            .map(|(i, part)| {
                let mut b = BytesMut::with_capacity(FRAGMENT_HEADER_LEN + part.len());
                b.put_u8(Kind::Fragment.byte());
                b.put_slice(&v[1..]);
                b.put_u32(frag_id);
                b.put_u8(i as u8);
                b.put_u8(count as u8);
                b.put_u8(inner.byte());
                b.put_slice(part);
                b.freeze()
            })
            .collect(),
    )
}

/// Wraps `inner` for a relay: RELAY (to the relay, naming the destination) or RELAYED (from
/// the relay, naming the source). `None` if the host name is empty or too long.
pub fn encode_relay(relayed: bool, host: &str, inner: &[u8]) -> Option<Bytes> {
    if host.is_empty() || host.len() > MAX_HOST_NAME {
        return None;
    }
    let kind = if relayed { Kind::Relayed } else { Kind::Relay };
    let mut b = BytesMut::with_capacity(2 + host.len() + inner.len());
    b.put_u8(kind.byte());
    b.put_u8(host.len() as u8);
    b.put_slice(host.as_bytes());
    b.put_slice(inner);
    Some(b.freeze())
}

/// A MAC address.
pub type Mac = [u8; 6];
/// The broadcast MAC.
pub const BROADCAST: Mac = [0xFF; 6];
/// Length of an untagged Ethernet II header.
pub const ETHERNET_HEADER_LEN: usize = 14;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of RARP (QEMU's self-announcement after migration).
pub const ETHERTYPE_RARP: u16 = 0x8035;

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn mac_to_string(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Whether a MAC is a group (broadcast/multicast) address.
pub fn is_group(mac: &Mac) -> bool {
    mac[0] & 1 == 1
}

/// The destination, source and EtherType of an Ethernet frame (etherparse).
pub fn ethernet(frame: &[u8]) -> Option<(Mac, Mac, u16)> {
    let h = etherparse::Ethernet2HeaderSlice::from_slice(frame).ok()?;
    Some((h.destination(), h.source(), h.ether_type().0))
}

/// An IPv4-over-Ethernet ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// 1 request, 2 reply (3/4 for RARP).
    pub op: u16,
    /// Sender hardware address.
    pub sha: Mac,
    /// Sender protocol address.
    pub spa: [u8; 4],
    /// Target hardware address.
    pub tha: Mac,
    /// Target protocol address.
    pub tpa: [u8; 4],
}

/// Parses the ARP/RARP payload of an Ethernet frame (IPv4 over Ethernet only).
pub fn parse_arp(frame: &[u8]) -> Option<Arp> {
    let (_, _, ethertype) = ethernet(frame)?;
    if ethertype != ETHERTYPE_ARP && ethertype != ETHERTYPE_RARP {
        return None;
    }
    let p = frame.get(ETHERNET_HEADER_LEN..ETHERNET_HEADER_LEN + 28)?;
    // htype 1 (Ethernet), ptype 0x0800 (IPv4), hlen 6, plen 4
    if p[0..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    let mac = |o: usize| -> Mac { [p[o], p[o + 1], p[o + 2], p[o + 3], p[o + 4], p[o + 5]] };
    let ip = |o: usize| -> [u8; 4] { [p[o], p[o + 1], p[o + 2], p[o + 3]] };
    Some(Arp {
        op: u16::from_be_bytes([p[6], p[7]]),
        sha: mac(8),
        spa: ip(14),
        tha: mac(18),
        tpa: ip(24),
    })
}

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType of an 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// IP protocol number of TCP.
pub const IP_PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IP_PROTO_UDP: u8 = 17;

/// An IPv6 neighbour solicitation or advertisement (RFC 4861 §4.3, §4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nd {
    /// An advertisement (136); else a solicitation (135).
    pub advert: bool,
    /// The packet's IPv6 source (`::` in duplicate address detection).
    pub src_ip: std::net::Ipv6Addr,
    /// The address solicited or advertised.
    pub target: std::net::Ipv6Addr,
    /// The source (solicitation) or target (advertisement) link-layer address option.
    pub lladdr: Option<Mac>,
}

/// Parses an untagged IPv6 neighbour solicitation or advertisement: ICMPv6 right after the
/// IPv6 header (ND messages carry no extension headers). Anything else is `None`.
pub fn parse_nd(frame: &[u8]) -> Option<Nd> {
    const IPV6_HEADER_LEN: usize = 40;
    const ICMPV6: u8 = 58;
    let (_, _, ethertype) = ethernet(frame)?;
    if ethertype != ETHERTYPE_IPV6 {
        return None;
    }
    let ip = frame.get(ETHERNET_HEADER_LEN..ETHERNET_HEADER_LEN + IPV6_HEADER_LEN)?;
    if ip[0] >> 4 != 6 || ip[6] != ICMPV6 {
        return None;
    }
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let start = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN;
    let icmp = frame.get(start..start + payload_len)?;
    let (advert, option_wanted) = match icmp.first()? {
        135 => (false, 1),
        136 => (true, 2),
        _ => return None,
    };
    let addr = |b: &[u8]| -> Option<std::net::Ipv6Addr> {
        Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))
    };
    let src_ip = addr(&ip[8..24])?;
    let target = addr(icmp.get(8..24)?)?;
    let mut lladdr = None;
    let mut options = &icmp[24..];
    while options.len() >= 2 {
        let len = usize::from(options[1]) * 8;
        if len == 0 || len > options.len() {
            // RFC 4861 §4.6: a zero-length option makes the whole packet invalid.
            return None;
        }
        if options[0] == option_wanted && len == 8 {
            lladdr = Some(<Mac>::try_from(&options[2..8]).ok()?);
        }
        options = &options[len..];
    }
    Some(Nd {
        advert,
        src_ip,
        target,
        lladdr,
    })
}

/// The link-local address a guest forms from `mac` by default (modified EUI-64, RFC 4291
/// appendix A): `fe80::` + the MAC with `ff:fe` in the middle and the U/L bit flipped.
pub fn eui64_link_local(mac: &Mac) -> std::net::Ipv6Addr {
    let mut a = [0u8; 16];
    a[0] = 0xfe;
    a[1] = 0x80;
    a[8] = mac[0] ^ 0x02;
    a[9] = mac[1];
    a[10] = mac[2];
    a[11] = 0xff;
    a[12] = 0xfe;
    a[13] = mac[3];
    a[14] = mac[4];
    a[15] = mac[5];
    std::net::Ipv6Addr::from(a)
}

/// Builds an Ethernet frame carrying an ARP packet (padded to the 60-byte minimum).
pub fn build_arp(dst: Mac, src: Mac, arp: &Arp) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&arp.op.to_be_bytes());
    f.extend_from_slice(&arp.sha);
    f.extend_from_slice(&arp.spa);
    f.extend_from_slice(&arp.tha);
    f.extend_from_slice(&arp.tpa);
    f.resize(60, 0);
    f
}

/// Builds an Ethernet frame carrying an IPv6 neighbour solicitation or advertisement (hop
/// limit 255, ICMPv6 checksum left zero: the switch does not check it, guests do).
pub fn build_nd(dst: Mac, src: Mac, nd: &Nd) -> Vec<u8> {
    let option_len = if nd.lladdr.is_some() { 8 } else { 0 };
    let icmp_len = 24 + option_len;
    let mut f = Vec::with_capacity(ETHERNET_HEADER_LEN + 40 + icmp_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp_len as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&nd.src_ip.octets());
    // Destination: all-nodes for an advertisement, the target's solicited-node group else.
    let t = nd.target.octets();
    let dst_ip: [u8; 16] = if nd.advert {
        [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    } else {
        [
            0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
        ]
    };
    f.extend_from_slice(&dst_ip);
    let (icmp_type, option_type, flags) = if nd.advert {
        (136, 2, 0x20) // override
    } else {
        (135, 1, 0)
    };
    f.extend_from_slice(&[icmp_type, 0, 0, 0, flags, 0, 0, 0]);
    f.extend_from_slice(&t);
    if let Some(mac) = nd.lladdr {
        f.extend_from_slice(&[option_type, 1]);
        f.extend_from_slice(&mac);
    }
    f
}

/// Fuzz entry point: decodes arbitrary bytes as a datagram and as an Ethernet/ARP/ND frame.
/// Must never panic; whatever decodes re-encodes to the bytes it came from.
pub fn fuzz_decode(data: &[u8]) {
    fuzz_datagram(&Bytes::copy_from_slice(data), 0);
    let _ = ethernet(data);
    let (dst, src, _) = ethernet(data).unwrap_or_default();
    if let Some(arp) = parse_arp(data) {
        // parse_arp accepts trailing bytes and ignores the padding, so compare the parsed part.
        assert_eq!(parse_arp(&build_arp(dst, src, &arp)), Some(arp));
    }
    if let Some(nd) = parse_nd(data) {
        assert_eq!(parse_nd(&build_nd(dst, src, &nd)), Some(nd));
    }
}

fn fuzz_datagram(b: &Bytes, depth: u8) {
    let Ok(d) = decode(b) else { return };
    match d {
        Datagram::Frame {
            violin,
            frame,
            redirected,
        } => assert_eq!(encode_frame(violin, &frame, redirected), b),
        Datagram::Fragment(Fragment {
            violin,
            frag_id,
            index,
            count,
            redirected,
            payload,
        }) => {
            // The part alone is a one-fragment frame: re-encode it and patch index/count in.
            let mut again = fragment(violin, &payload, redirected, frag_id, usize::MAX)
                .and_then(|mut v| v.pop())
                .map(BytesMut::from)
                .expect("a decoded fragment payload is never empty");
            again[8] = index;
            again[9] = count;
            assert_eq!(again.freeze(), b);
        }
        Datagram::Relay { to: host, inner } | Datagram::Relayed { from: host, inner } => {
            let relayed = b[0] & 0x0F == Kind::Relayed as u8;
            assert_eq!(encode_relay(relayed, &host, &inner).as_ref(), Some(b));
            // Relays forward one hop, but the receiver still decodes what is inside.
            if depth == 0 {
                fuzz_datagram(&inner, 1);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn frame_roundtrip_and_header_layout() {
        let v = ViolinId::new(0x00AB_CDEF).unwrap();
        let d = encode_frame(v, &frame(60), false);
        assert_eq!(&d[..4], &[0x10, 0xAB, 0xCD, 0xEF]);
        assert_eq!(
            decode(&d).unwrap(),
            Datagram::Frame {
                violin: v,
                frame: Bytes::from(frame(60)),
                redirected: false
            }
        );
        assert!(ViolinId::new(0x0100_0000).is_none());
    }

    #[test]
    fn full_frame_fragments_to_fit_small_datagrams() {
        let v = ViolinId::new(7).unwrap();
        let f = frame(1514);
        let parts = fragment(v, &f, true, 99, 1162).unwrap();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.len() <= 1162));
        let mut joined = Vec::new();
        for p in &parts {
            let Datagram::Fragment(Fragment {
                payload,
                redirected,
                frag_id,
                count,
                ..
            }) = decode(p).unwrap()
            else {
                panic!("not a fragment")
            };
            assert!(redirected);
            assert_eq!((frag_id, count), (99, 2));
            joined.extend_from_slice(&payload);
        }
        assert_eq!(joined, f);
        assert!(fragment(v, &frame(20_000), false, 1, 1200).is_none());
    }

    #[test]
    fn relay_roundtrip() {
        let inner = encode_frame(ViolinId::new(1).unwrap(), &frame(20), false);
        let r = encode_relay(false, "c/c1", &inner).unwrap();
        assert_eq!(
            decode(&r).unwrap(),
            Datagram::Relay {
                to: "c/c1".into(),
                inner: inner.clone()
            }
        );
        assert!(encode_relay(true, "", &inner).is_none());
    }

    /// 02:00:00:00:00:01 at 10.1.0.1 asks who has 10.1.0.2.
    pub(crate) fn arp_request() -> Arp {
        Arp {
            op: 1,
            sha: [2, 0, 0, 0, 0, 1],
            spa: [10, 1, 0, 1],
            tha: [0; 6],
            tpa: [10, 1, 0, 2],
        }
    }

    #[test]
    fn arp_build_parse() {
        let arp = arp_request();
        let f = build_arp(BROADCAST, arp.sha, &arp);
        assert_eq!(f.len(), 60);
        assert_eq!(parse_arp(&f), Some(arp));
        assert_eq!(parse_mac("02:00:00:00:00:01"), Some(arp.sha));
        assert_eq!(mac_to_string(&arp.sha), "02:00:00:00:00:01");
        assert!(parse_mac("02:00:00:00:00").is_none());
    }

    #[test]
    fn fuzz_target_smoke() {
        for data in [
            &b""[..],
            &[0x12, 0xFF],
            &[0x11; 11],
            &[0x13, 1, b'x', 0x12, 1, b'y'],
        ] {
            fuzz_decode(data);
        }
    }

    #[test]
    fn neighbour_discovery_parses_what_it_builds_and_the_eui64_link_local_is_standard() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let ll = eui64_link_local(&mac);
        assert_eq!(
            ll,
            "fe80::5054:ff:fe12:3456"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
        );
        for (advert, src_ip, lladdr) in [
            (true, ll, Some(mac)),
            (false, ll, Some(mac)),
            (false, std::net::Ipv6Addr::UNSPECIFIED, None),
        ] {
            let nd = Nd {
                advert,
                src_ip,
                target: ll,
                lladdr,
            };
            let f = build_nd(BROADCAST, mac, &nd);
            assert_eq!(parse_nd(&f), Some(nd));
            // Cut short, or with a zero-length option: not ND.
            assert_eq!(parse_nd(&f[..f.len() - 1]), None);
        }
        let mut zero_option = build_nd(
            BROADCAST,
            mac,
            &Nd {
                advert: true,
                src_ip: ll,
                target: ll,
                lladdr: Some(mac),
            },
        );
        let at = zero_option.len() - 7;
        zero_option[at] = 0;
        assert_eq!(parse_nd(&zero_option), None);
        assert_eq!(
            parse_nd(&build_arp(
                BROADCAST,
                mac,
                &Arp {
                    op: 1,
                    sha: mac,
                    spa: [10, 0, 0, 1],
                    tha: [0; 6],
                    tpa: [10, 0, 0, 2]
                }
            )),
            None
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            fuzz_decode(&data);
        }

        #[test]
        fn fragment_roundtrip(len in 14usize..9000, max in 100usize..1500, id in any::<u32>(), v in 0u32..=ViolinId::MAX) {
            let v = ViolinId::new(v).unwrap();
            let f = frame(len);
            if let Some(parts) = fragment(v, &f, false, id, max) {
                let mut joined = Vec::new();
                for (i, p) in parts.iter().enumerate() {
                    prop_assert!(p.len() <= max);
                    match decode(p).unwrap() {
                        Datagram::Fragment(Fragment { violin, index, payload, .. }) => {
                            prop_assert_eq!(violin, v);
                            prop_assert_eq!(usize::from(index), i);
                            joined.extend_from_slice(&payload);
                        }
                        other => prop_assert!(false, "{:?}", other),
                    }
                }
                prop_assert_eq!(joined, f);
            } else {
                prop_assert!(len > (max - FRAGMENT_HEADER_LEN) * MAX_FRAGMENTS);
            }
        }
    }
}
