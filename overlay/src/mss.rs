//! TCP MSS clamping: a guest at MTU 1500 offers an MSS whose full segments do not fit one QUIC
//! datagram, so nearly every full frame would be fragmented. Lowering the MSS option of SYN
//! and SYN-ACK segments leaving a guest makes both ends send segments that fit.
//!
//! Only Ethernet (with at most one 802.1Q tag), IPv4 without fragmentation and IPv6 with TCP
//! as the first next header are rewritten; everything else is left alone. The TCP checksum is
//! updated incrementally (RFC 1624), so the rest of the segment is not read.

use crate::wire::{
    ETHERNET_HEADER_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, IP_PROTO_TCP,
};

const TCP_HEADER_LEN: usize = 20;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_OPTION_END: u8 = 0;
const TCP_OPTION_NOP: u8 = 1;
const TCP_OPTION_MSS: u8 = 2;

/// The smallest MSS the clamp sets (IPv4's default): on narrower paths fragmentation carries
/// the rest.
pub const MIN_MSS: u16 = 536;

/// Lowers the MSS option of a TCP SYN in `frame` so that a full segment without TCP options
/// makes an Ethernet frame of at most `max_frame` bytes. Returns whether the frame changed.
pub fn clamp(frame: &mut [u8], max_frame: usize) -> bool {
    let Some((l3, ethertype)) = network_offset(frame) else {
        return false;
    };
    let Some(tcp) = tcp_offset(frame, l3, ethertype) else {
        return false;
    };
    let headers = tcp + TCP_HEADER_LEN;
    let limit = u16::try_from(max_frame.saturating_sub(headers))
        .unwrap_or(u16::MAX)
        .max(MIN_MSS);
    let Some(segment) = frame.get_mut(tcp..) else {
        return false;
    };
    let Some(at) = mss_option_value(segment) else {
        return false;
    };
    let old = u16::from_be_bytes([segment[at], segment[at + 1]]);
    if old <= limit {
        return false;
    }
    set_checksummed(segment, at, limit.to_be_bytes());
    true
}

/// The offset of the IP header and its EtherType (after at most one VLAN tag).
fn network_offset(frame: &[u8]) -> Option<(usize, u16)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype != ETHERTYPE_VLAN {
        return Some((ETHERNET_HEADER_LEN, ethertype));
    }
    let inner = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
    Some((ETHERNET_HEADER_LEN + 4, inner))
}

/// The offset of the TCP header of a SYN segment, if the frame carries one.
fn tcp_offset(frame: &[u8], l3: usize, ethertype: u16) -> Option<usize> {
    let tcp = match ethertype {
        ETHERTYPE_IPV4 => {
            let ip = frame.get(l3..l3 + 20)?;
            let header_len = usize::from(ip[0] & 0x0F) * 4;
            let more_fragments_or_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x3FFF;
            if ip[0] >> 4 != 4
                || header_len < 20
                || ip[9] != IP_PROTO_TCP
                || more_fragments_or_offset != 0
            {
                return None;
            }
            l3 + header_len
        }
        ETHERTYPE_IPV6 => {
            let ip = frame.get(l3..l3 + 40)?;
            if ip[0] >> 4 != 6 || ip[6] != IP_PROTO_TCP {
                return None;
            }
            l3 + 40
        }
        _ => return None,
    };
    let flags = *frame.get(tcp + 13)?;
    (flags & TCP_FLAG_SYN != 0).then_some(tcp)
}

/// The offset (in the segment) of the MSS option's value.
fn mss_option_value(segment: &[u8]) -> Option<usize> {
    let data_offset = usize::from(*segment.get(12)? >> 4) * 4;
    let options = segment.get(TCP_HEADER_LEN..data_offset)?;
    let mut i = 0;
    while let Some(&kind) = options.get(i) {
        match kind {
            TCP_OPTION_END => return None,
            TCP_OPTION_NOP => i += 1,
            _ => {
                let len = usize::from(*options.get(i + 1)?);
                if len < 2 || i + len > options.len() {
                    return None;
                }
                if kind == TCP_OPTION_MSS {
                    return (len == 4).then_some(TCP_HEADER_LEN + i + 2);
                }
                i += len;
            }
        }
    }
    None
}

/// Writes `value` at `at` in the TCP segment and updates its checksum (RFC 1624:
/// HC' = ~(~HC + ~m + m') for every 16-bit word m that changes to m').
fn set_checksummed(segment: &mut [u8], at: usize, value: [u8; 2]) {
    // Words are aligned to the segment's start; after an odd number of NOPs the value
    // straddles two words.
    let first = at & !1;
    let words = if at.is_multiple_of(2) {
        first..first + 2
    } else {
        first..first + 4
    };
    let Some(old) = segment.get(words.clone()).map(<[u8]>::to_vec) else {
        return;
    };
    segment[at..at + 2].copy_from_slice(&value);
    let word = |b: &[u8]| u32::from(u16::from_be_bytes([b[0], b[1]]));
    let mut sum = u32::from(!u16::from_be_bytes([segment[16], segment[17]]));
    for (old, new) in old.chunks(2).zip(segment[words].chunks(2)) {
        sum += (!word(old) & 0xFFFF) + word(new);
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    let checksum = !(sum as u16);
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The TCP checksum of `segment` over the IPv4 or IPv6 pseudo-header, computed in full.
    fn full_checksum(frame: &[u8], l3: usize, v6: bool, tcp: usize) -> u16 {
        let segment = &frame[tcp..];
        let mut sum: u32 = 0;
        let mut add = |bytes: &[u8]| {
            for pair in bytes.chunks(2) {
                sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            }
        };
        if v6 {
            add(&frame[l3 + 8..l3 + 40]);
        } else {
            add(&frame[l3 + 12..l3 + 20]);
        }
        let len = segment.len() as u32;
        add(&len.to_be_bytes());
        add(&[0, IP_PROTO_TCP]);
        let mut with_zero = segment.to_vec();
        with_zero[16] = 0;
        with_zero[17] = 0;
        add(&with_zero);
        while sum > 0xFFFF {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// A frame with a TCP segment: returns it with the offsets of its IP and TCP headers.
    fn tcp_frame(
        v6: bool,
        vlan: bool,
        flags: u8,
        options: &[u8],
        payload: &[u8],
    ) -> (Vec<u8>, usize, usize) {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        }
        let l3 = f.len() + 2;
        let mut tcp_header = vec![0x12, 0x34, 0x00, 0x50, 1, 2, 3, 4, 0, 0, 0, 0];
        let mut options = options.to_vec();
        options.resize(options.len().div_ceil(4) * 4, TCP_OPTION_END);
        let data_offset = (TCP_HEADER_LEN + options.len()) / 4;
        tcp_header.push((data_offset as u8) << 4);
        tcp_header.push(flags);
        tcp_header.extend_from_slice(&[0xFF, 0xFF, 0, 0, 0, 0]);
        tcp_header.extend_from_slice(&options);
        tcp_header.extend_from_slice(payload);
        let tcp_len = tcp_header.len();
        if v6 {
            f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            f.extend_from_slice(&[IP_PROTO_TCP, 64]);
            f.extend_from_slice(&[0xFD, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&[0xFD, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0, 0x40, 0, 64, IP_PROTO_TCP, 0, 0]);
            f.extend_from_slice(&[10, 1, 0, 1, 10, 1, 0, 2]);
        }
        let tcp = f.len();
        f.extend_from_slice(&tcp_header);
        let checksum = full_checksum(&f, l3, v6, tcp);
        f[tcp + 16..tcp + 18].copy_from_slice(&checksum.to_be_bytes());
        (f, l3, tcp)
    }

    /// TCP options with an MSS option after `nops` NOPs (to put it at odd offsets), and others.
    fn options(nops: usize, mss: u16, timestamps: bool) -> Vec<u8> {
        let mut o = vec![TCP_OPTION_NOP; nops];
        o.extend_from_slice(&[TCP_OPTION_MSS, 4]);
        o.extend_from_slice(&mss.to_be_bytes());
        if timestamps {
            o.extend_from_slice(&[8, 10, 1, 2, 3, 4, 0, 0, 0, 0]);
        }
        o.extend_from_slice(&[4, 2]); // SACK permitted
        o
    }

    fn mss_of(frame: &[u8], tcp: usize) -> Option<u16> {
        let at = mss_option_value(&frame[tcp..])?;
        Some(u16::from_be_bytes([frame[tcp + at], frame[tcp + at + 1]]))
    }

    #[test]
    fn a_default_syn_is_clamped_to_what_fits_one_datagram() {
        let (mut f, _, tcp) = tcp_frame(false, false, TCP_FLAG_SYN, &options(0, 1460, true), &[]);
        // 1434-byte datagrams: 4 bytes of FRAME header, 14 Ethernet, 20 IP, 20 TCP.
        assert!(clamp(&mut f, 1430));
        assert_eq!(mss_of(&f, tcp), Some(1430 - 14 - 20 - 20));
        // Already small enough: untouched.
        assert!(!clamp(&mut f, 1430));
    }

    proptest! {
        #[test]
        fn only_the_mss_changes_and_the_checksum_stays_valid(
            v6 in any::<bool>(),
            vlan in any::<bool>(),
            ack in any::<bool>(),
            nops in 0usize..4,
            timestamps in any::<bool>(),
            mss in any::<u16>(),
            max_frame in 0usize..10_000,
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let flags = TCP_FLAG_SYN | if ack { 0x10 } else { 0 };
            let (before, l3, tcp) =
                tcp_frame(v6, vlan, flags, &options(nops, mss, timestamps), &payload);
            let mut after = before.clone();
            let changed = clamp(&mut after, max_frame);
            let limit = u16::try_from(max_frame.saturating_sub(tcp + 20))
                .unwrap_or(u16::MAX)
                .max(MIN_MSS);
            prop_assert_eq!(mss_of(&after, tcp), Some(mss.min(limit)));
            prop_assert_eq!(changed, mss > limit);
            let checksum = u16::from_be_bytes([after[tcp + 16], after[tcp + 17]]);
            prop_assert_eq!(checksum, full_checksum(&after, l3, v6, tcp));
            let at = tcp + mss_option_value(&after[tcp..]).unwrap();
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                if ![at, at + 1, tcp + 16, tcp + 17].contains(&i) {
                    prop_assert_eq!(b, a, "byte {} changed", i);
                }
            }
        }

        #[test]
        fn segments_without_syn_are_untouched(
            v6 in any::<bool>(),
            flags in any::<u8>(),
            mss in any::<u16>(),
            max_frame in 0usize..2_000,
        ) {
            let flags = flags & !TCP_FLAG_SYN;
            let (before, _, _) = tcp_frame(v6, false, flags, &options(1, mss, true), &[1, 2, 3]);
            let mut after = before.clone();
            prop_assert!(!clamp(&mut after, max_frame));
            prop_assert_eq!(before, after);
        }

        #[test]
        fn arbitrary_frames_never_panic(
            mut frame in proptest::collection::vec(any::<u8>(), 0..200),
            max_frame in 0usize..2_000,
        ) {
            let before = frame.clone();
            if !clamp(&mut frame, max_frame) {
                prop_assert_eq!(before, frame);
            }
        }
    }
}
