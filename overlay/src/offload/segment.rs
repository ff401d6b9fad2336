//! Segmentation of what the TAP hands over, as a NIC would: a TSO frame (TCP over IPv4/IPv6)
//! or a USO frame (UDP) is cut into frames of at most `gso_size` payload bytes, each with its
//! own headers (IPv4 total length, id and checksum; IPv6 payload length; TCP sequence number,
//! flags and checksum; UDP length and checksum); a frame without GSO that still needs its
//! checksum gets it.

use bytes::BytesMut;

use super::{
    GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, IP_PROTO_TCP, IP_PROTO_UDP, Layout,
    NEEDS_CSUM, OffloadError, VnetHdr, be32, complete_checksum, fold, ipv4_checksum, layout,
    pseudo_sum, sum,
};

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Cuts `frame` (an Ethernet frame read from the TAP after `hdr`) into frames of at most
/// `max_frame` bytes where segmentation allows, each pushed onto `out` behind `headroom` zero
/// bytes (room for the caller's own header); the bytes come from `slab`.
///
/// Segments carry `gso_size` payload bytes (fewer where that would exceed `max_frame`), the
/// last one the rest. A frame without GSO is passed on whole, its checksum completed if the
/// header asks for it.
pub fn segment(
    hdr: &VnetHdr,
    frame: &[u8],
    max_frame: usize,
    headroom: usize,
    slab: &mut BytesMut,
    out: &mut Vec<BytesMut>,
) -> Result<(), OffloadError> {
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        let at = start(slab, headroom, frame.len());
        slab.extend_from_slice(frame);
        if hdr.flags & NEEDS_CSUM != 0
            && let Err(e) = complete_checksum(hdr, &mut slab[at..])
        {
            slab.clear();
            return Err(e);
        }
        out.push(slab.split());
        return Ok(());
    }
    let lay = layout(frame).ok_or(OffloadError::Malformed("not IPv4/IPv6"))?;
    let (want_proto, want_v6) = match gso {
        GSO_TCPV4 => (IP_PROTO_TCP, Some(false)),
        GSO_TCPV6 => (IP_PROTO_TCP, Some(true)),
        GSO_UDP_L4 => (IP_PROTO_UDP, None),
        other => return Err(OffloadError::UnsupportedGso(other)),
    };
    if lay.proto != want_proto || want_v6.is_some_and(|v6| v6 != lay.v6) {
        return Err(OffloadError::Malformed("transport does not match gso_type"));
    }
    // More-fragments or an offset: a fragment cannot be segmented.
    if !lay.v6 && u16::from_be_bytes([frame[lay.l3 + 6], frame[lay.l3 + 7]]) & 0x3fff != 0 {
        return Err(OffloadError::Malformed("IPv4 fragment"));
    }
    let l4_len = if lay.proto == IP_PROTO_TCP {
        let doff = usize::from(
            frame
                .get(lay.l4 + 12)
                .ok_or(OffloadError::Malformed("TCP"))?
                >> 4,
        );
        if doff < 5 {
            return Err(OffloadError::Malformed("TCP data offset"));
        }
        doff * 4
    } else {
        8
    };
    let hdrs = lay.l4 + l4_len;
    if frame.len() < hdrs {
        return Err(OffloadError::Malformed("headers cut short"));
    }
    let room = max_frame.saturating_sub(hdrs);
    let mss = usize::from(hdr.gso_size).min(room);
    // TCP may be cut finer; UDP segments are the sender's datagrams and keep their size.
    if mss == 0 || (lay.proto == IP_PROTO_UDP && mss < usize::from(hdr.gso_size)) {
        return Err(OffloadError::BadGsoSize(hdr.gso_size));
    }
    let payload = &frame[hdrs..];
    let n = payload.len().div_ceil(mss).max(1);
    let seq0 = be32(frame, lay.l4 + 4).unwrap_or(0);
    let id0 = u16::from_be_bytes([frame[lay.l3 + 4], frame[lay.l3 + 5]]);
    for (i, chunk) in payload
        .chunks(mss)
        .chain(payload.is_empty().then_some(&[][..]))
        .enumerate()
    {
        let at = start(slab, headroom, hdrs + chunk.len());
        slab.extend_from_slice(&frame[..hdrs]);
        slab.extend_from_slice(chunk);
        let f = &mut slab[at..];
        fix_ip(f, &lay, l4_len + chunk.len(), id0.wrapping_add(i as u16));
        if lay.proto == IP_PROTO_TCP {
            let seq = seq0.wrapping_add((i * mss) as u32);
            f[lay.l4 + 4..lay.l4 + 8].copy_from_slice(&seq.to_be_bytes());
            if i + 1 < n {
                f[lay.l4 + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                f[lay.l4 + 13] &= !TCP_CWR;
            }
            set_l4_checksum(f, &lay, 16);
        } else {
            let ul = (8 + chunk.len()) as u16;
            f[lay.l4 + 4..lay.l4 + 6].copy_from_slice(&ul.to_be_bytes());
            set_l4_checksum(f, &lay, 6);
        }
        out.push(slab.split());
    }
    Ok(())
}

/// Reserves room for one frame of `len` bytes behind `headroom` zero bytes; returns where the
/// frame starts.
fn start(slab: &mut BytesMut, headroom: usize, len: usize) -> usize {
    if slab.capacity() < headroom + len {
        slab.reserve((headroom + len).max(64 * 1024));
    }
    slab.resize(headroom, 0);
    headroom
}

/// Sets the IP header's lengths (the transport segment is `l4_len` bytes) and, for IPv4, `id`
/// and the header checksum.
fn fix_ip(f: &mut [u8], lay: &Layout, l4_len: usize, id: u16) {
    let ip = &mut f[lay.l3..lay.l4];
    if lay.v6 {
        ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        let total = (ip.len() + l4_len) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[4..6].copy_from_slice(&id.to_be_bytes());
        ip[10..12].fill(0);
        let c = ipv4_checksum(ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
}

/// Computes the transport checksum (at `offset` in the transport header) over the whole
/// segment.
fn set_l4_checksum(f: &mut [u8], lay: &Layout, offset: usize) {
    let at = lay.l4 + offset;
    f[at..at + 2].fill(0);
    let len = f.len() - lay.l4;
    let ps = pseudo_sum(&f[lay.l3..], lay.v6, lay.proto, len);
    let mut c = !fold(sum(&f[lay.l4..], ps));
    if c == 0 && lay.proto == IP_PROTO_UDP {
        c = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::l4_checksum_ok;
    use super::super::tests::{USO_V4_HDR, frame_v4_udp};
    use super::*;

    /// A TSO frame as the TAP hands it over: Ethernet, IPv4 or IPv6, TCP with `opts` bytes of
    /// options, `payload`, NEEDS_CSUM with the pseudo-header sum in the checksum field.
    pub(crate) fn tso_frame(
        v6: bool,
        flow: u8,
        seq: u32,
        flags: u8,
        opts: usize,
        payload: &[u8],
        mss: u16,
    ) -> (VnetHdr, Vec<u8>) {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, flow];
        let thl = 20 + opts;
        if v6 {
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            let pl = (thl + payload.len()) as u16;
            f.extend_from_slice(&pl.to_be_bytes());
            f.extend_from_slice(&[6, 64]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, flow]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            f.extend_from_slice(&[8, 0, 0x45, 0]);
            // The kernel's TSO frames carry the whole length (up to 64 KiB).
            let total = (20 + thl + payload.len()).min(0xffff) as u16;
            f.extend_from_slice(&total.to_be_bytes());
            f.extend_from_slice(&[
                0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, flow, 10, 0, 0, 2,
            ]);
            let c = ipv4_checksum(&f[14..34]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
        let l4 = f.len();
        f.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&0x1000_0000u32.to_be_bytes());
        f.extend_from_slice(&[(thl as u8 / 4) << 4, flags, 0x01, 0xf6, 0, 0, 0, 0]);
        for i in 0..opts {
            // NOPs then a timestamp-like pattern: options are compared, not interpreted.
            f.push(if i < opts.saturating_sub(4) { 1 } else { 0x55 });
        }
        f.extend_from_slice(payload);
        let lay = layout(&f).unwrap();
        let ps = fold(pseudo_sum(&f[lay.l3..], v6, IP_PROTO_TCP, f.len() - l4));
        f[l4 + 16..l4 + 18].copy_from_slice(&ps.to_be_bytes());
        let hdr = VnetHdr {
            flags: NEEDS_CSUM,
            gso_type: if payload.len() > usize::from(mss) {
                if v6 { GSO_TCPV6 } else { GSO_TCPV4 }
            } else {
                GSO_NONE
            },
            hdr_len: l4 as u16 + thl as u16,
            gso_size: if payload.len() > usize::from(mss) {
                mss
            } else {
                0
            },
            csum_start: l4 as u16,
            csum_offset: 16,
        };
        (hdr, f)
    }

    fn run(hdr: &VnetHdr, f: &[u8], max: usize) -> Vec<BytesMut> {
        let mut slab = BytesMut::new();
        let mut out = Vec::new();
        segment(hdr, f, max, 4, &mut slab, &mut out).unwrap();
        out
    }

    #[test]
    fn a_tso_frame_is_cut_like_a_nic_would() {
        let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let (hdr, f) = tso_frame(false, 1, 1000, 0x18, 12, &payload, 1348);
        let segs = run(&hdr, &f, 1418);
        assert_eq!(segs.len(), 4);
        let mut got = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert_eq!(&s[..4], &[0; 4], "headroom");
            let s = &s[4..];
            assert!(s.len() <= 1418);
            let lay = layout(s).unwrap();
            assert_eq!(
                usize::from(u16::from_be_bytes([s[16], s[17]])),
                s.len() - 14
            );
            assert_eq!(
                u16::from_be_bytes([s[18], s[19]]),
                0x1234 + i as u16,
                "IPv4 id"
            );
            assert_eq!(
                ipv4_checksum(&s[14..34]),
                u16::from_be_bytes([s[24], s[25]])
            );
            assert!(l4_checksum_ok(s, &lay));
            let seq = u32::from_be_bytes(s[38..42].try_into().unwrap());
            assert_eq!(seq, 1000 + (i * 1348) as u32);
            let flags = s[47];
            assert_eq!(
                flags,
                if i == 3 { 0x18 } else { 0x10 },
                "PSH on the last only"
            );
            got.extend_from_slice(&s[66..]);
        }
        assert_eq!(got, payload);
    }

    #[test]
    fn segments_are_cut_smaller_when_gso_size_would_not_fit() {
        let payload = vec![7u8; 3000];
        let (hdr, f) = tso_frame(true, 1, 0, 0x10, 0, &payload, 1440);
        let segs = run(&hdr, &f, 1000);
        assert!(segs.iter().all(|s| s.len() - 4 <= 1000));
        assert_eq!(segs.len(), 3000usize.div_ceil(1000 - 74));
        for s in &segs {
            let s = &s[4..];
            assert!(l4_checksum_ok(s, &layout(s).unwrap()));
            assert_eq!(
                usize::from(u16::from_be_bytes([s[18], s[19]])),
                s.len() - 54
            );
        }
    }

    #[test]
    fn uso_frames_get_their_own_udp_headers() {
        let payload: Vec<u8> = (0..4200u32).map(|i| (i / 7) as u8).collect();
        let mut f = frame_v4_udp(&payload);
        let ps = fold(pseudo_sum(&f[14..], false, IP_PROTO_UDP, f.len() - 34));
        f[40..42].copy_from_slice(&ps.to_be_bytes());
        let hdr = USO_V4_HDR;
        let mut slab = BytesMut::new();
        let mut none = Vec::new();
        assert_eq!(
            segment(&hdr, &f, 1441, 4, &mut slab, &mut none),
            Err(OffloadError::BadGsoSize(1400)),
            "UDP datagrams are not cut to another size"
        );
        let segs = run(&hdr, &f, 1500);
        assert_eq!(segs.len(), 3);
        for (i, s) in segs.iter().enumerate() {
            let s = &s[4..];
            assert_eq!(s.len(), 42 + 1400);
            assert_eq!(u16::from_be_bytes([s[38], s[39]]), 1408);
            assert!(l4_checksum_ok(s, &layout(s).unwrap()));
            assert_eq!(&s[42..], &payload[i * 1400..(i + 1) * 1400]);
        }
    }

    #[test]
    fn frames_without_gso_pass_whole_with_their_checksum_completed() {
        let (hdr, f) = tso_frame(false, 1, 5, 0x02, 4, &[], 1400);
        assert_eq!(hdr.gso_type, GSO_NONE);
        let segs = run(&hdr, &f, 1418);
        assert_eq!(segs.len(), 1);
        let s = &segs[0][4..];
        assert!(l4_checksum_ok(s, &layout(s).unwrap()));
        let plain = VnetHdr::default();
        let arp = [0xffu8; 42];
        assert_eq!(&run(&plain, &arp, 1418)[0][4..], &arp[..]);
    }

    #[test]
    fn malformed_gso_frames_are_refused() {
        let (mut hdr, f) = tso_frame(false, 1, 5, 0x10, 0, &[1; 3000], 1400);
        let mut slab = BytesMut::new();
        let mut out = Vec::new();
        hdr.gso_type = GSO_TCPV6;
        assert!(segment(&hdr, &f, 1418, 4, &mut slab, &mut out).is_err());
        hdr.gso_type = 3;
        assert_eq!(
            segment(&hdr, &f, 1418, 4, &mut slab, &mut out),
            Err(OffloadError::UnsupportedGso(3))
        );
        hdr.gso_type = GSO_TCPV4;
        hdr.gso_size = 0;
        assert_eq!(
            segment(&hdr, &f, 1418, 4, &mut slab, &mut out),
            Err(OffloadError::BadGsoSize(0))
        );
        hdr.gso_size = 1400;
        assert!(segment(&hdr, &f[..40], 1418, 4, &mut slab, &mut out).is_err());
        assert!(out.is_empty());
    }
}
