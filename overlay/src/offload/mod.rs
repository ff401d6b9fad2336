//! TAP offloads without I/O: the `virtio_net_hdr` that prefixes every read and write of a TAP
//! opened with `IFF_VNET_HDR`, cutting the kernel's large (TSO/USO) frames into frames that fit
//! one datagram ([`segment`]), and merging consecutive segments of one TCP flow into one large
//! frame for the kernel to take whole ([`coalesce`], userspace GRO).
//!
//! Frames are Ethernet frames (TAPs are L2). Layouts follow the kernel's `virtio_net.h` and
//! wireguard-go's `tun/offload_linux.go` (see `research/stage2.md` §1).

pub mod coalesce;
#[cfg(test)]
mod props;
pub mod segment;

pub use coalesce::{Coalesced, Coalescer};
pub use segment::segment;

use crate::wire::{
    ETHERNET_HEADER_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, IP_PROTO_TCP, IP_PROTO_UDP,
};

/// Length of the `virtio_net_hdr` on the TAP (the kernel's default `TUNSETVNETHDRSZ`).
pub const VNET_HDR_LEN: usize = 10;

/// `flags`: the checksum from `csum_start` on is still to be computed and stored at
/// `csum_start + csum_offset` (the field holds the pseudo-header sum).
pub const NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was verified.
pub const DATA_VALID: u8 = 2;

/// `gso_type`: no segmentation.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP segmentation (USO), IPv4 or IPv6.
pub const GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: the TCP frame carries ECN (CWR only on the first segment).
pub const GSO_ECN: u8 = 0x80;

/// Why a frame from the TAP cannot be processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// Shorter than a `virtio_net_hdr`.
    #[error("virtio_net_hdr truncated")]
    ShortHeader,
    /// A `gso_type` this module does not segment.
    #[error("unsupported gso_type {0:#x}")]
    UnsupportedGso(u8),
    /// `csum_start`/`csum_offset` outside the frame.
    #[error("checksum position outside the frame")]
    ChecksumOutOfRange,
    /// The frame's headers do not match its `gso_type` (or are cut short).
    #[error("frame headers do not match gso_type: {0}")]
    Malformed(&'static str),
    /// `gso_size` 0, or too large for any segment to fit.
    #[error("gso_size {0} unusable")]
    BadGsoSize(u16),
}

/// A `virtio_net_hdr` (little-endian on the TAP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    /// Length of the headers (a hint only when read).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// The header at the start of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self, OffloadError> {
        let b = buf.get(..VNET_HDR_LEN).ok_or(OffloadError::ShortHeader)?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    #[must_use]
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// Where an IP frame's headers are: IP at `l3`, the transport header at `l4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) l3: usize,
    pub(crate) l4: usize,
    pub(crate) v6: bool,
    pub(crate) proto: u8,
}

/// The layout of an Ethernet frame carrying IPv4 or IPv6 (at most one VLAN tag; IPv6 without
/// extension headers), if it is one.
pub(crate) fn layout(frame: &[u8]) -> Option<Layout> {
    let mut l3 = ETHERNET_HEADER_LEN;
    let mut ethertype = be16(frame, 12)?;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(frame, 16)?;
        l3 += 4;
    }
    match ethertype {
        ETHERTYPE_IPV4 => {
            let vihl = *frame.get(l3)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            // `then`, not `then_some`: the protocol byte exists only if the check holds.
            (vihl >> 4 == 4 && ihl >= 20 && frame.len() >= l3 + ihl).then(|| Layout {
                l3,
                l4: l3 + ihl,
                v6: false,
                proto: frame[l3 + 9],
            })
        }
        ETHERTYPE_IPV6 => (frame.len() >= l3 + 40 && frame[l3] >> 4 == 6).then(|| Layout {
            l3,
            l4: l3 + 40,
            v6: true,
            proto: frame[l3 + 6],
        }),
        _ => None,
    }
}

pub(crate) fn be16(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

pub(crate) fn be32(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

/// The ones'-complement sum of `data` added to `acc`, not folded.
pub(crate) fn sum(data: &[u8], mut acc: u64) -> u64 {
    // Eight bytes at a time: the carries collect in the upper bits and are folded at the end.
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes(c.try_into().expect("8 bytes"));
        let (s, carry) = acc.overflowing_add(w);
        acc = s + u64::from(carry);
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    let (s, carry) = acc.overflowing_add(u64::from_be_bytes(tail));
    s + u64::from(carry)
}

/// `acc` folded to 16 bits (not inverted).
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header sum of a transport segment of `len` bytes in the IP packet at `ip`.
pub(crate) fn pseudo_sum(ip: &[u8], v6: bool, proto: u8, len: usize) -> u64 {
    let addrs = if v6 { &ip[8..40] } else { &ip[12..20] };
    sum(addrs, u64::from(proto) + len as u64)
}

/// The IPv4 header checksum of `hdr` (its checksum field is skipped).
pub(crate) fn ipv4_checksum(hdr: &[u8]) -> u16 {
    !fold(sum(&hdr[12..], sum(&hdr[..10], 0)))
}

/// Completes a `NEEDS_CSUM` frame's checksum as the device would: the ones' complement of the
/// sum from `csum_start` to the end (the field holds the pseudo-header sum), stored in place.
pub fn complete_checksum(hdr: &VnetHdr, frame: &mut [u8]) -> Result<(), OffloadError> {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > frame.len() {
        return Err(OffloadError::ChecksumOutOfRange);
    }
    let mut c = !fold(sum(&frame[start..], 0));
    // UDP sends a computed 0 as all ones (0 means "no checksum").
    if c == 0 && hdr.csum_offset == 6 {
        c = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Whether the transport checksum of the IP packet in `frame` at `lay` verifies.
pub(crate) fn l4_checksum_ok(frame: &[u8], lay: &Layout) -> bool {
    let seg = &frame[lay.l4..];
    fold(sum(
        seg,
        pseudo_sum(&frame[lay.l3..], lay.v6, lay.proto, seg.len()),
    )) == 0xffff
}

/// Fuzzing and proptests: any bytes as a `virtio_net_hdr` and a frame through the segmenter
/// and the segments through the coalescer: never a panic, segments fit, merged frames stay
/// within 64 KiB.
pub fn fuzz_offload(data: &[u8]) {
    const MAX_FRAME: usize = 1418;
    let Ok(hdr) = VnetHdr::parse(data) else {
        return;
    };
    let frame = &data[VNET_HDR_LEN..];
    let mut slab = bytes::BytesMut::new();
    let mut segs = Vec::new();
    if segment(&hdr, frame, MAX_FRAME, 4, &mut slab, &mut segs).is_err() {
        return;
    }
    let violin = crate::wire::ViolinId::new(1).expect("valid id");
    let mut co = Coalescer::new();
    for s in segs {
        if hdr.gso_type & !GSO_ECN != GSO_NONE {
            assert!(s.len() <= 4 + MAX_FRAME, "a segment longer than asked for");
        }
        co.push(violin, s.freeze().slice(4..));
    }
    let mut out = Vec::new();
    co.flush(&mut out);
    for c in &out {
        assert!(!c.payloads.is_empty() || c.vnet == VnetHdr::default());
        assert!(
            c.payloads.is_empty() || c.len() <= 65_535,
            "merged frame too long"
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// USO of an untagged IPv4 UDP frame (as [`frame_v4_udp`] makes) in 1400-byte segments.
    pub(crate) const USO_V4_HDR: VnetHdr = VnetHdr {
        flags: NEEDS_CSUM,
        gso_type: GSO_UDP_L4,
        hdr_len: 42,
        gso_size: 1400,
        csum_start: 34,
        csum_offset: 6,
    };

    #[test]
    fn the_header_round_trips_in_little_endian() {
        let h = USO_V4_HDR;
        let b = h.encode();
        // The layout the lab kernel produced for a 40×1400 B UDP_SEGMENT send (stage2 §1).
        assert_eq!(b, [1, 5, 42, 0, 0x78, 0x05, 34, 0, 6, 0]);
        assert_eq!(VnetHdr::parse(&b), Ok(h));
        assert_eq!(VnetHdr::parse(&b[..9]), Err(OffloadError::ShortHeader));
    }

    #[test]
    fn the_checksum_matches_a_byte_wise_reference() {
        let data: Vec<u8> = (0..1001u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut acc = 0u32;
        for c in data.chunks(2) {
            acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        for n in [0, 1, 7, 8, 9, 64, 1000, 1001] {
            let mut a = 0u32;
            for c in data[..n].chunks(2) {
                a += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            while a >> 16 != 0 {
                a = (a & 0xffff) + (a >> 16);
            }
            assert_eq!(u32::from(fold(sum(&data[..n], 0))), a, "{n} bytes");
        }
        assert_eq!(u32::from(fold(sum(&data, 0))), acc);
    }

    #[test]
    fn a_needs_csum_udp_frame_is_completed_like_the_kernel_would() {
        let payload = b"hello, violin";
        let mut f = frame_v4_udp(payload);
        let good = f.clone();
        // As the TAP hands it over: the field holds the folded pseudo-header sum.
        let lay = layout(&f).unwrap();
        let ps = fold(pseudo_sum(
            &f[lay.l3..],
            false,
            IP_PROTO_UDP,
            8 + payload.len(),
        ));
        f[40..42].copy_from_slice(&ps.to_be_bytes());
        let h = VnetHdr {
            flags: NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..VnetHdr::default()
        };
        complete_checksum(&h, &mut f).unwrap();
        assert_eq!(f, good);
        assert!(l4_checksum_ok(&f, &lay));
        let far = VnetHdr {
            csum_start: 60,
            ..h
        };
        assert_eq!(
            complete_checksum(&far, &mut f),
            Err(OffloadError::ChecksumOutOfRange)
        );
    }

    #[test]
    fn truncated_ip_headers_have_no_layout() {
        // Found by the fuzzer: an IPv4 header cut after 3 bytes (the protocol byte was read
        // before the length was checked).
        let mut f = frame_v4_udp(b"x");
        assert!(layout(&f).is_some());
        for n in 0..34 {
            assert_eq!(layout(&f[..n]), None, "{n} bytes");
        }
        f.truncate(14);
        f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x60; 39]);
        assert_eq!(layout(&f), None);
        let crash = [
            1u8, 1, 0x42, 0, 1, 0, 0x8f, 6, 1, 0x13, 0x1c, 0x34, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8,
            0, 0x45, 0, 0x0f, 0xd4, 0x12, 0x34, 0x40, 1, 1,
        ];
        fuzz_offload(&crash);
    }

    /// An Ethernet/IPv4/UDP frame with valid checksums.
    pub(crate) fn frame_v4_udp(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0];
        let total = 28 + payload.len();
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            1,
            0x40,
            0,
            64,
            17,
        ]);
        f.extend_from_slice(&[0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        let c = ipv4_checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        let ul = 8 + payload.len();
        f.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, (ul >> 8) as u8, ul as u8, 0, 0]);
        f.extend_from_slice(payload);
        let c = !fold(sum(&f[34..], pseudo_sum(&f[14..], false, IP_PROTO_UDP, ul)));
        f[40..42].copy_from_slice(&c.to_be_bytes());
        f
    }
}
