//! DHCPv4 for managed VMs, without I/O: parsing a guest's DHCP request out of an Ethernet
//! frame, and building the Ethernet/IPv4/UDP reply (full IPv4 and UDP checksums). The switch
//! decides who gets what ([`crate::switch`]); this module only knows the formats (RFC 2131,
//! RFC 2132).
//!
//! Only what a responder for known MACs needs is decoded: the BOOTP header and the options
//! message type (53), requested address (50), server identifier (54), lease time (51), T1
//! (58), T2 (59), subnet mask (1) and interface MTU (26). Other options are skipped; option
//! overload (52) is not honoured (its options are not looked for in `sname`/`file`).

use std::net::Ipv4Addr;

use crate::wire::{ETHERNET_HEADER_LEN, Mac};

/// UDP port of DHCP servers.
pub const SERVER_PORT: u16 = 67;
/// UDP port of DHCP clients.
pub const CLIENT_PORT: u16 = 68;
/// Length of the fixed BOOTP header (before the magic cookie).
const BOOTP_LEN: usize = 236;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Replies are padded to at least this many BOOTP bytes (the minimum of RFC 951's clients).
const MIN_BOOTP_REPLY: usize = 300;
/// The BROADCAST bit of `flags`.
pub const FLAG_BROADCAST: u16 = 0x8000;

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// Client looks for servers.
    Discover = 1,
    /// Server offers an address.
    Offer = 2,
    /// Client asks for (or renews) an address.
    Request = 3,
    /// Client found the address in use.
    Decline = 4,
    /// Server confirms.
    Ack = 5,
    /// Server refuses.
    Nak = 6,
    /// Client gives the address up.
    Release = 7,
    /// Client asks for options only.
    Inform = 8,
}

impl MessageType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            _ => return None,
        })
    }
}

/// The options this module knows (every one optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// 53.
    pub msg_type: Option<MessageType>,
    /// 50.
    pub requested_ip: Option<Ipv4Addr>,
    /// 54.
    pub server_id: Option<Ipv4Addr>,
    /// 51, seconds.
    pub lease_time: Option<u32>,
    /// 58 (T1), seconds.
    pub renewal_time: Option<u32>,
    /// 59 (T2), seconds.
    pub rebinding_time: Option<u32>,
    /// 1.
    pub subnet_mask: Option<Ipv4Addr>,
    /// 26.
    pub mtu: Option<u16>,
}

/// A DHCP message (BOOTP header with an Ethernet `chaddr`, and the known options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// 1 BOOTREQUEST, 2 BOOTREPLY.
    pub op: u8,
    /// Transaction id.
    pub xid: u32,
    /// Seconds since the client began.
    pub secs: u16,
    /// Flags ([`FLAG_BROADCAST`]).
    pub flags: u16,
    /// Client address (renewals).
    pub ciaddr: Ipv4Addr,
    /// "Your" address.
    pub yiaddr: Ipv4Addr,
    /// Next server.
    pub siaddr: Ipv4Addr,
    /// Relay agent.
    pub giaddr: Ipv4Addr,
    /// Client hardware address (htype 1, hlen 6).
    pub chaddr: Mac,
    /// Options.
    pub options: Options,
}

/// Why a DHCP message did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than the BOOTP header and magic cookie.
    #[error("shorter than a BOOTP header")]
    Truncated,
    /// Not an Ethernet `chaddr` (htype 1, hlen 6).
    #[error("not an Ethernet client")]
    NotEthernet,
    /// The magic cookie is missing.
    #[error("no DHCP magic cookie")]
    NoMagic,
    /// An option runs past the end, or a known option has the wrong length.
    #[error("bad option {0}")]
    BadOption(u8),
    /// Op is neither request nor reply.
    #[error("bad op {0}")]
    BadOp(u8),
}

fn ip_at(b: &[u8], o: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

impl Message {
    /// Parses a DHCP message (a UDP payload).
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        if b.len() < BOOTP_LEN + MAGIC.len() {
            return Err(ParseError::Truncated);
        }
        if b[0] != 1 && b[0] != 2 {
            return Err(ParseError::BadOp(b[0]));
        }
        if b[1] != 1 || b[2] != 6 {
            return Err(ParseError::NotEthernet);
        }
        if b[BOOTP_LEN..BOOTP_LEN + 4] != MAGIC {
            return Err(ParseError::NoMagic);
        }
        let mut chaddr = [0; 6];
        chaddr.copy_from_slice(&b[28..34]);
        let mut options = Options::default();
        let mut rest = &b[BOOTP_LEN + 4..];
        while let Some((&code, tail)) = rest.split_first() {
            match code {
                0 => {
                    rest = tail;
                    continue;
                }
                255 => break,
                _ => {}
            }
            let (&len, tail) = tail.split_first().ok_or(ParseError::BadOption(code))?;
            let value = tail
                .get(..usize::from(len))
                .ok_or(ParseError::BadOption(code))?;
            rest = &tail[value.len()..];
            let want = |n: usize| {
                if value.len() == n {
                    Ok(())
                } else {
                    Err(ParseError::BadOption(code))
                }
            };
            let ip = || want(4).map(|()| Some(ip_at(value, 0)));
            let secs = || want(4).map(|()| Some(u32_at(value, 0)));
            match code {
                53 => {
                    want(1)?;
                    options.msg_type = MessageType::from_u8(value[0]);
                }
                50 => options.requested_ip = ip()?,
                54 => options.server_id = ip()?,
                51 => options.lease_time = secs()?,
                58 => options.renewal_time = secs()?,
                59 => options.rebinding_time = secs()?,
                1 => options.subnet_mask = ip()?,
                26 => {
                    want(2)?;
                    options.mtu = Some(u16::from_be_bytes([value[0], value[1]]));
                }
                _ => {}
            }
        }
        Ok(Self {
            op: b[0],
            xid: u32_at(b, 4),
            secs: u16::from_be_bytes([b[8], b[9]]),
            flags: u16::from_be_bytes([b[10], b[11]]),
            ciaddr: ip_at(b, 12),
            yiaddr: ip_at(b, 16),
            siaddr: ip_at(b, 20),
            giaddr: ip_at(b, 24),
            chaddr,
            options,
        })
    }

    /// Encodes the message (padded to 300 bytes, as BOOTP clients expect).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BOOTP_LEN];
        b[0] = self.op;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&self.xid.to_be_bytes());
        b[8..10].copy_from_slice(&self.secs.to_be_bytes());
        b[10..12].copy_from_slice(&self.flags.to_be_bytes());
        b[12..16].copy_from_slice(&self.ciaddr.octets());
        b[16..20].copy_from_slice(&self.yiaddr.octets());
        b[20..24].copy_from_slice(&self.siaddr.octets());
        b[24..28].copy_from_slice(&self.giaddr.octets());
        b[28..34].copy_from_slice(&self.chaddr);
        b.extend_from_slice(&MAGIC);
        let o = &self.options;
        if let Some(t) = o.msg_type {
            b.extend_from_slice(&[53, 1, t as u8]);
        }
        for (code, ip) in [(54, o.server_id), (50, o.requested_ip), (1, o.subnet_mask)] {
            if let Some(ip) = ip {
                b.extend_from_slice(&[code, 4]);
                b.extend_from_slice(&ip.octets());
            }
        }
        for (code, secs) in [
            (51, o.lease_time),
            (58, o.renewal_time),
            (59, o.rebinding_time),
        ] {
            if let Some(s) = secs {
                b.extend_from_slice(&[code, 4]);
                b.extend_from_slice(&s.to_be_bytes());
            }
        }
        if let Some(mtu) = o.mtu {
            b.extend_from_slice(&[26, 2]);
            b.extend_from_slice(&mtu.to_be_bytes());
        }
        b.push(255);
        if b.len() < MIN_BOOTP_REPLY {
            b.resize(MIN_BOOTP_REPLY, 0);
        }
        b
    }
}

/// A DHCP client message found in an Ethernet frame: IPv4, UDP 68 → 67, untagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFrame {
    /// Ethernet destination.
    pub dst_mac: Mac,
    /// Ethernet source.
    pub src_mac: Mac,
    /// IPv4 source.
    pub src_ip: Ipv4Addr,
    /// IPv4 destination.
    pub dst_ip: Ipv4Addr,
    /// The message.
    pub msg: Message,
}

/// Whether `frame` looks like a DHCP client message (untagged IPv4, UDP 68 → 67), cheaply,
/// before anything is parsed: the switch calls this on every frame from the TAP.
pub fn is_client_frame(frame: &[u8]) -> bool {
    let Some(ip) = frame.get(ETHERNET_HEADER_LEN..) else {
        return false;
    };
    if frame[12..14] != [0x08, 0x00] || ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
        return false;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ip.get(ihl..ihl + 4)
        .is_some_and(|udp| udp[..4] == [0, CLIENT_PORT as u8, 0, SERVER_PORT as u8])
}

/// Parses a DHCP client message out of an Ethernet frame: untagged IPv4 (not a fragment), UDP
/// from port 68 to port 67, BOOTREQUEST. Checksums are not verified (the frame comes from the
/// local TAP; a damaged one gets a reply the client will not take).
pub fn parse_client_frame(frame: &[u8]) -> Option<ClientFrame> {
    if !is_client_frame(frame) {
        return None;
    }
    let ip = &frame[ETHERNET_HEADER_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    if ihl < 20 || fragment || total < ihl + 8 || total > ip.len() {
        return None;
    }
    let udp = &ip[ihl..total];
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < 8 || udp_len > udp.len() {
        return None;
    }
    let msg = Message::parse(&udp[8..udp_len]).ok()?;
    if msg.op != 1 {
        return None;
    }
    let mac = |o: usize| -> Mac {
        let mut m = [0; 6];
        m.copy_from_slice(&frame[o..o + 6]);
        m
    };
    Some(ClientFrame {
        dst_mac: mac(0),
        src_mac: mac(6),
        src_ip: ip_at(ip, 12),
        dst_ip: ip_at(ip, 16),
        msg,
    })
}

/// The Internet checksum (RFC 1071) of `parts` concatenated (each of even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Builds the Ethernet/IPv4/UDP frame of a server reply (port 67 → 68), with the IPv4 header
/// checksum and the full UDP checksum.
pub fn build_server_frame(
    dst_mac: Mac,
    src_mac: Mac,
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    msg: &Message,
) -> Vec<u8> {
    let payload = msg.encode();
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut f = Vec::with_capacity(ETHERNET_HEADER_LEN + total);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src_ip.octets());
    ip[16..20].copy_from_slice(&dst_ip.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut udp = [0u8; 8];
    udp[0..2].copy_from_slice(&SERVER_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&CLIENT_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src_ip.octets());
    pseudo[4..8].copy_from_slice(&dst_ip.octets());
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let c = match checksum(&[&pseudo, &udp, &payload]) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&udp);
    f.extend_from_slice(&payload);
    f
}

/// An IPv4 subnet, `10.1.0.0/24` (host bits zero, prefix 8 to 30: room for the server's
/// address and a guest's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

/// Why a subnet does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    /// Not `a.b.c.d/len`.
    #[error("subnet {0:?} is not ADDRESS/PREFIX")]
    Syntax(String),
    /// The prefix is outside 8..=30.
    #[error("subnet {0:?}: the prefix must be 8 to 30")]
    Prefix(String),
    /// Host bits are set.
    #[error("subnet {0:?} has host bits set")]
    HostBits(String),
}

impl Subnet {
    /// Parses `10.1.0.0/24`.
    pub fn parse(s: &str) -> Result<Self, SubnetError> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| SubnetError::Syntax(s.to_owned()))?;
        let network: Ipv4Addr = addr
            .parse()
            .map_err(|_| SubnetError::Syntax(s.to_owned()))?;
        let prefix: u8 = len.parse().map_err(|_| SubnetError::Syntax(s.to_owned()))?;
        if !(8..=30).contains(&prefix) {
            return Err(SubnetError::Prefix(s.to_owned()));
        }
        let subnet = Self { network, prefix };
        if u32::from(network) & !u32::from(subnet.mask()) != 0 {
            return Err(SubnetError::HostBits(s.to_owned()));
        }
        Ok(subnet)
    }

    /// The netmask.
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - self.prefix))
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !u32::from(self.mask()))
    }

    /// The DHCP server's address: the first usable one (network + 1).
    pub fn server(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Whether `ip` is a host address of the subnet (neither network nor broadcast).
    pub fn contains_host(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.mask()) == u32::from(self.network)
            && ip != self.network
            && ip != self.broadcast()
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Fuzz entry point: arbitrary bytes as a DHCP message and as an Ethernet frame never panic;
/// a message that parses re-encodes to one that parses to the same fields.
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(msg) = Message::parse(data) {
        assert_eq!(Message::parse(&msg.encode()).as_ref(), Ok(&msg));
    }
    if let Some(cf) = parse_client_frame(data) {
        let again = build_server_frame(cf.dst_mac, cf.src_mac, cf.src_ip, cf.dst_ip, &cf.msg);
        assert!(again.len() >= ETHERNET_HEADER_LEN + 28 + BOOTP_LEN);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A client frame (DISCOVER or REQUEST) as `udhcpc` sends it: broadcast, from 0.0.0.0.
    pub(crate) fn client_frame(
        mac: Mac,
        msg_type: MessageType,
        requested: Option<Ipv4Addr>,
        server_id: Option<Ipv4Addr>,
    ) -> Vec<u8> {
        let msg = Message {
            op: 1,
            xid: 0x1234_5678,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: mac,
            options: Options {
                msg_type: Some(msg_type),
                requested_ip: requested,
                server_id,
                ..Options::default()
            },
        };
        let mut f = build_server_frame(
            [0xff; 6],
            mac,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            &msg,
        );
        // Client ports.
        f[34..38].copy_from_slice(&[0, 68, 0, 67]);
        f
    }

    /// The server reply in `frame`: (Ethernet dst, IPv4 dst, message), checksums verified.
    pub(crate) fn server_reply(frame: &[u8]) -> (Mac, Ipv4Addr, Message) {
        let ip = &frame[14..34];
        assert_eq!(checksum(&[ip]), 0, "IPv4 header checksum");
        let udp = &frame[34..];
        let mut pseudo = [0u8; 12];
        pseudo[0..8].copy_from_slice(&ip[12..20]);
        pseudo[9] = 17;
        pseudo[10..12].copy_from_slice(&udp[4..6]);
        assert_eq!(checksum(&[&pseudo, udp]), 0, "UDP checksum");
        assert_eq!(&udp[0..4], &[0, 67, 0, 68]);
        let mut dst = [0; 6];
        dst.copy_from_slice(&frame[..6]);
        (dst, ip_at(ip, 16), Message::parse(&udp[8..]).unwrap())
    }

    #[test]
    fn a_client_frame_parses_and_a_reply_carries_valid_checksums() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = client_frame(mac, MessageType::Discover, None, None);
        let cf = parse_client_frame(&f).unwrap();
        assert_eq!(cf.src_mac, mac);
        assert_eq!(cf.dst_ip, Ipv4Addr::BROADCAST);
        assert_eq!(cf.msg.options.msg_type, Some(MessageType::Discover));
        assert_eq!(cf.msg.chaddr, mac);
        let reply = build_server_frame(
            mac,
            [2; 6],
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 5),
            &cf.msg,
        );
        let (dst, ip, msg) = server_reply(&reply);
        assert_eq!((dst, ip), (mac, Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(msg, cf.msg);
        // Not a client frame: wrong ports, a fragment, truncated.
        let mut other = f.clone();
        other[37] = 53;
        assert!(parse_client_frame(&other).is_none());
        let mut frag = f.clone();
        frag[20] = 0x20;
        assert!(parse_client_frame(&frag).is_none());
        assert!(parse_client_frame(&f[..100]).is_none());
    }

    #[test]
    fn subnets_parse_and_know_their_addresses() {
        let s = Subnet::parse("10.7.0.0/24").unwrap();
        assert_eq!(s.mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.server(), Ipv4Addr::new(10, 7, 0, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 7, 0, 255));
        assert!(s.contains_host(Ipv4Addr::new(10, 7, 0, 10)));
        assert!(!s.contains_host(Ipv4Addr::new(10, 7, 0, 255)));
        assert!(!s.contains_host(Ipv4Addr::new(10, 7, 1, 10)));
        assert_eq!(s.to_string(), "10.7.0.0/24");
        assert!(matches!(
            Subnet::parse("10.7.0.1/24"),
            Err(SubnetError::HostBits(_))
        ));
        assert!(matches!(
            Subnet::parse("10.7.0.0/31"),
            Err(SubnetError::Prefix(_))
        ));
        assert!(matches!(
            Subnet::parse("10.7.0.0"),
            Err(SubnetError::Syntax(_))
        ));
    }

    fn ip() -> impl Strategy<Value = Ipv4Addr> {
        any::<u32>().prop_map(Ipv4Addr::from)
    }

    fn message() -> impl Strategy<Value = Message> {
        let options = (
            proptest::option::of(1u8..=8),
            proptest::option::of(ip()),
            proptest::option::of(ip()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(ip()),
            proptest::option::of(any::<u16>()),
        )
            .prop_map(|(t, req, sid, lease, t1, t2, mask, mtu)| Options {
                msg_type: t.and_then(MessageType::from_u8),
                requested_ip: req,
                server_id: sid,
                lease_time: lease,
                renewal_time: t1,
                rebinding_time: t2,
                subnet_mask: mask,
                mtu,
            });
        (
            1u8..=2,
            any::<u32>(),
            any::<u16>(),
            any::<u16>(),
            (ip(), ip(), ip(), ip()),
            any::<[u8; 6]>(),
            options,
        )
            .prop_map(
                |(op, xid, secs, flags, (ciaddr, yiaddr, siaddr, giaddr), chaddr, options)| {
                    Message {
                        op,
                        xid,
                        secs,
                        flags,
                        ciaddr,
                        yiaddr,
                        siaddr,
                        giaddr,
                        chaddr,
                        options,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..700)) {
            fuzz_parse(&data);
        }

        #[test]
        fn mutated_client_frames_never_panic(
            at in 0usize..400, byte in any::<u8>(), cut in 0usize..400,
        ) {
            let mut f = client_frame([2, 0, 0, 0, 0, 1], MessageType::Request,
                Some(Ipv4Addr::new(10, 0, 0, 5)), Some(Ipv4Addr::new(10, 0, 0, 1)));
            if at < f.len() {
                f[at] = byte;
            }
            f.truncate(f.len().saturating_sub(cut));
            fuzz_parse(&f);
        }

        #[test]
        fn what_is_built_parses_back(msg in message(), src in ip(), dst in ip()) {
            prop_assert_eq!(Message::parse(&msg.encode()), Ok(msg.clone()));
            let frame = build_server_frame(msg.chaddr, [2; 6], src, dst, &msg);
            let (mac, to, back) = server_reply(&frame);
            prop_assert_eq!(mac, msg.chaddr);
            prop_assert_eq!(to, dst);
            prop_assert_eq!(back, msg);
        }
    }
}
