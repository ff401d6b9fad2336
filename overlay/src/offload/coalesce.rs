//! Userspace GRO: consecutive frames of one TCP flow in one violin, taken from a batch of
//! datagrams, become one large frame with a GSO `virtio_net_hdr`, so the TAP takes them in one
//! write and the guest's stack sees one segment. The rules are wireguard-go's (and the
//! kernel's GRO): only ACK or ACK|PSH segments with payload; IPv4 without options or
//! fragments, IPv6 without extension headers, no VLAN tag; equal addresses, ports, ACK number,
//! TOS/TTL/DF (traffic class, flow label, hop limit) and TCP options; adjacent sequence
//! numbers; every segment as large as the first but the last; nothing after a PSH; at most
//! 64 KiB; IP and TCP checksums valid. Everything else passes unchanged, and a flow's frames
//! keep their order.

use bytes::{Bytes, BytesMut};

use super::{
    ETHERNET_HEADER_LEN, ETHERTYPE_IPV4, GSO_TCPV4, GSO_TCPV6, IP_PROTO_TCP, Layout, NEEDS_CSUM,
    VnetHdr, be16, be32, fold, ipv4_checksum, l4_checksum_ok, layout, pseudo_sum,
};
use crate::wire::ViolinId;

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// Frames merged into one at most (well under the kernel's `UIO_MAXIOV` of 1024 iovecs).
const MAX_SEGMENTS: usize = 64;
/// The largest merged frame.
const MAX_LEN: usize = 65_535;

/// One frame for the TAP: `head` then `payloads`, written after the `virtio_net_hdr` `vnet`.
#[derive(Debug, Clone)]
pub struct Coalesced {
    pub violin: ViolinId,
    pub vnet: VnetHdr,
    /// The whole frame, or for a merged one its rewritten headers.
    pub head: Bytes,
    /// The merged segments' payloads (empty for a frame passed unchanged).
    pub payloads: Vec<Bytes>,
}

impl Coalesced {
    /// Length of the frame (without the `virtio_net_hdr`).
    #[must_use]
    pub fn len(&self) -> usize {
        self.head.len() + self.payloads.iter().map(Bytes::len).sum::<usize>()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame in one buffer.
    #[must_use]
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = self.head.to_vec();
        for p in &self.payloads {
            v.extend_from_slice(p);
        }
        v
    }
}

/// A TCP flow's identity within a violin: MACs, addresses, ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    violin: ViolinId,
    v6: bool,
    /// MACs (12), addresses (8 or 32, zero-padded), ports (4).
    bytes: [u8; 48],
}

/// A TCP segment that may be merged.
struct Segment {
    lay: Layout,
    /// End of the TCP header.
    hdrs: usize,
    seq: u32,
    ack: u32,
    psh: bool,
    payload: usize,
}

/// Frames of a batch, in order: single frames and groups of one flow's segments.
struct Item {
    violin: ViolinId,
    frames: Vec<Bytes>,
    /// For a group: its first segment's layout, where its next segment must start, the
    /// payload size of every segment but the last, the payload so far.
    group: Option<Group>,
}

struct Group {
    lay: Layout,
    hdrs: usize,
    ack: u32,
    next_seq: u32,
    seg_size: usize,
    payload: usize,
}

/// Collects a batch of frames ([`push`](Self::push)) and hands them out merged where allowed
/// ([`flush`](Self::flush)). Bounded by the caller's batch.
#[derive(Default)]
pub struct Coalescer {
    items: Vec<Item>,
    /// Groups that may still grow: flow → index in `items` (few flows per batch: a list).
    open: Vec<(FlowKey, usize)>,
}

impl Coalescer {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Frames pushed since the last flush.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.items.iter().map(|i| i.frames.len()).sum()
    }

    /// Adds the Ethernet frame `frame` for the TAP of `violin`.
    pub fn push(&mut self, violin: ViolinId, frame: Bytes) {
        let Some(key) = flow_key(violin, &frame) else {
            self.single(violin, frame);
            return;
        };
        let seg = mergeable(&frame);
        if let Some(pos) = self.open.iter().position(|(k, _)| *k == key) {
            let idx = self.open[pos].1;
            if let Some(seg) = &seg
                && self.join(idx, seg, &frame)
            {
                let g = self.items[idx].group.as_ref().expect("a group");
                let full = self.items[idx].frames.len() + 1 >= MAX_SEGMENTS;
                if seg.psh || seg.payload < g.seg_size || full {
                    self.open.swap_remove(pos);
                }
                self.items[idx].frames.push(frame);
                return;
            }
            // The flow goes on in a later frame: the group is closed, keeping its order.
            self.open.swap_remove(pos);
        }
        match seg {
            Some(seg) if !seg.psh => {
                self.open.push((key, self.items.len()));
                self.items.push(Item {
                    violin,
                    frames: vec![frame],
                    group: Some(Group {
                        lay: seg.lay,
                        hdrs: seg.hdrs,
                        ack: seg.ack,
                        next_seq: seg.seq.wrapping_add(seg.payload as u32),
                        seg_size: seg.payload,
                        payload: seg.payload,
                    }),
                });
            }
            _ => self.single(violin, frame),
        }
    }

    fn single(&mut self, violin: ViolinId, frame: Bytes) {
        self.items.push(Item {
            violin,
            frames: vec![frame],
            group: None,
        });
    }

    /// Whether `seg` (in `frame`) continues the group at `idx`; if so its accounting is done
    /// (the caller adds the frame).
    fn join(&mut self, idx: usize, seg: &Segment, frame: &[u8]) -> bool {
        let item = &mut self.items[idx];
        let Some(g) = item.group.as_mut() else {
            return false;
        };
        let first = &item.frames[0];
        let ok = seg.seq == g.next_seq
            && seg.ack == g.ack
            && seg.payload <= g.seg_size
            && seg.hdrs == g.hdrs
            && seg.lay == g.lay
            && g.hdrs + g.payload + seg.payload <= MAX_LEN
            && same_fields(first, frame, &g.lay, g.hdrs);
        if ok {
            g.next_seq = g.next_seq.wrapping_add(seg.payload as u32);
            g.payload += seg.payload;
        }
        ok
    }

    /// Hands out every frame pushed since the last flush, in order (a flow's frames stay in
    /// order; merged frames stand where their first segment stood).
    pub fn flush(&mut self, out: &mut Vec<Coalesced>) {
        self.open.clear();
        for item in self.items.drain(..) {
            let violin = item.violin;
            match item.group {
                Some(g) if item.frames.len() > 1 => out.push(merged(violin, &g, item.frames)),
                _ => out.extend(item.frames.into_iter().map(|f| Coalesced {
                    violin,
                    vnet: VnetHdr::default(),
                    head: f,
                    payloads: Vec::new(),
                })),
            }
        }
    }
}

/// The frames of `g` as one: the first one's headers with the lengths, the last one's flags
/// and window, the IPv4 checksum and the TCP pseudo-header sum (the kernel completes the
/// checksum, `NEEDS_CSUM`).
fn merged(violin: ViolinId, g: &Group, frames: Vec<Bytes>) -> Coalesced {
    let lay = g.lay;
    let last = frames.last().expect("a group has frames").clone();
    let mut head = BytesMut::from(&frames[0][..g.hdrs]);
    let l4_len = g.hdrs - lay.l4 + g.payload;
    if lay.v6 {
        head[lay.l3 + 4..lay.l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        let total = (lay.l4 - lay.l3 + l4_len) as u16;
        head[lay.l3 + 2..lay.l3 + 4].copy_from_slice(&total.to_be_bytes());
        head[lay.l3 + 10..lay.l3 + 12].fill(0);
        let c = ipv4_checksum(&head[lay.l3..lay.l4]);
        head[lay.l3 + 10..lay.l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    head[lay.l4 + 13] = last[lay.l4 + 13];
    head[lay.l4 + 14..lay.l4 + 16].copy_from_slice(&last[lay.l4 + 14..lay.l4 + 16]);
    let ps = fold(pseudo_sum(&head[lay.l3..], lay.v6, IP_PROTO_TCP, l4_len));
    head[lay.l4 + 16..lay.l4 + 18].copy_from_slice(&ps.to_be_bytes());
    let payloads = frames.into_iter().map(|f| f.slice(g.hdrs..)).collect();
    Coalesced {
        violin,
        vnet: VnetHdr {
            flags: NEEDS_CSUM,
            gso_type: if lay.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: g.hdrs as u16,
            gso_size: g.seg_size as u16,
            csum_start: lay.l4 as u16,
            csum_offset: 16,
        },
        head: head.freeze(),
        payloads,
    }
}

/// The flow of a TCP frame (not a fragment, untagged), if it is one.
fn flow_key(violin: ViolinId, frame: &[u8]) -> Option<FlowKey> {
    let lay = layout(frame)?;
    if lay.proto != IP_PROTO_TCP || lay.l3 != ETHERNET_HEADER_LEN || frame.len() < lay.l4 + 4 {
        return None;
    }
    if !lay.v6 && be16(frame, lay.l3 + 6)? & 0x3fff != 0 {
        return None;
    }
    let mut bytes = [0u8; 48];
    bytes[..12].copy_from_slice(&frame[..12]);
    let addrs = if lay.v6 {
        &frame[lay.l3 + 8..lay.l3 + 40]
    } else {
        &frame[lay.l3 + 12..lay.l3 + 20]
    };
    bytes[12..12 + addrs.len()].copy_from_slice(addrs);
    bytes[44..48].copy_from_slice(&frame[lay.l4..lay.l4 + 4]);
    Some(FlowKey {
        violin,
        v6: lay.v6,
        bytes,
    })
}

/// The frame as a segment that may be merged, if it is one (see the module's rules).
fn mergeable(frame: &[u8]) -> Option<Segment> {
    let lay = layout(frame)?;
    if lay.proto != IP_PROTO_TCP || lay.l3 != ETHERNET_HEADER_LEN {
        return None;
    }
    if lay.v6 {
        if usize::from(be16(frame, lay.l3 + 4)?) != frame.len() - lay.l4 {
            return None;
        }
    } else {
        // No options, not a fragment, exactly the frame (no Ethernet padding).
        let ip_ok = lay.l4 - lay.l3 == 20
            && be16(frame, lay.l3 + 6)? & 0x3fff == 0
            && usize::from(be16(frame, lay.l3 + 2)?) == frame.len() - lay.l3
            && ipv4_checksum(&frame[lay.l3..lay.l4]) == be16(frame, lay.l3 + 10)?;
        if !ip_ok || be16(frame, 12)? != ETHERTYPE_IPV4 {
            return None;
        }
    }
    let doff = usize::from(*frame.get(lay.l4 + 12)? >> 4) * 4;
    let hdrs = lay.l4 + doff;
    let flags = *frame.get(lay.l4 + 13)?;
    if doff < 20 || frame.len() <= hdrs || !(flags == TCP_ACK || flags == TCP_ACK | TCP_PSH) {
        return None;
    }
    if !l4_checksum_ok(frame, &lay) {
        return None;
    }
    Some(Segment {
        lay,
        hdrs,
        seq: be32(frame, lay.l4 + 4)?,
        ack: be32(frame, lay.l4 + 8)?,
        psh: flags & TCP_PSH != 0,
        payload: frame.len() - hdrs,
    })
}

/// Whether the fields that must agree for a merge do: IPv4 TOS, DF and TTL (IPv6 traffic
/// class, flow label and hop limit), TCP data offset and options.
fn same_fields(a: &[u8], b: &[u8], lay: &Layout, hdrs: usize) -> bool {
    let ip_same = if lay.v6 {
        a[lay.l3..lay.l3 + 4] == b[lay.l3..lay.l3 + 4] && a[lay.l3 + 7] == b[lay.l3 + 7]
    } else {
        a[lay.l3 + 1] == b[lay.l3 + 1]
            && a[lay.l3 + 6] == b[lay.l3 + 6]
            && a[lay.l3 + 8] == b[lay.l3 + 8]
    };
    ip_same && a[lay.l4 + 12] == b[lay.l4 + 12] && a[lay.l4 + 20..hdrs] == b[lay.l4 + 20..hdrs]
}

#[cfg(test)]
mod tests {
    use super::super::segment::tests::tso_frame;
    use super::super::{GSO_NONE, segment};
    use super::*;

    fn v(n: u32) -> ViolinId {
        ViolinId::new(n).unwrap()
    }

    /// `payload` of flow `flow` as the segments a peer's segmenter would send.
    fn segments(v6: bool, flow: u8, seq: u32, payload: &[u8], mss: u16, psh: bool) -> Vec<Bytes> {
        let (hdr, f) = tso_frame(
            v6,
            flow,
            seq,
            if psh { 0x18 } else { 0x10 },
            12,
            payload,
            mss,
        );
        let mut slab = BytesMut::new();
        let mut out = Vec::new();
        segment(&hdr, &f, 1500, 0, &mut slab, &mut out).unwrap();
        out.into_iter().map(BytesMut::freeze).collect()
    }

    fn run(frames: impl IntoIterator<Item = (ViolinId, Bytes)>) -> Vec<Coalesced> {
        let mut c = Coalescer::new();
        for (v, f) in frames {
            c.push(v, f);
        }
        let mut out = Vec::new();
        c.flush(&mut out);
        assert_eq!(c.pending(), 0);
        out
    }

    /// What the kernel does with a merged frame: complete its checksum and cut it again.
    pub(crate) fn resegment(c: &Coalesced) -> Vec<Vec<u8>> {
        let mut slab = BytesMut::new();
        let mut out = Vec::new();
        segment(&c.vnet, &c.to_vec(), 1500, 0, &mut slab, &mut out).unwrap();
        out.into_iter().map(|b| b.to_vec()).collect()
    }

    #[test]
    fn one_flows_segments_become_one_gso_frame_that_cuts_back_into_them() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let segs = segments(false, 1, 77, &payload, 1348, true);
        let out = run(segs.iter().map(|s| (v(1), s.clone())));
        assert_eq!(out.len(), 1);
        let m = &out[0];
        assert_eq!(m.vnet.gso_type, GSO_TCPV4);
        assert_eq!(m.vnet.gso_size, 1348);
        assert_eq!(m.vnet.csum_start, 34);
        assert_eq!(m.len(), 66 + payload.len());
        let again = resegment(m);
        let orig: Vec<Vec<u8>> = segs.iter().map(|s| s.to_vec()).collect();
        assert_eq!(
            again, orig,
            "the kernel's cut of the merged frame is the original"
        );
    }

    #[test]
    fn flows_and_violins_are_never_merged_together() {
        let a = segments(false, 1, 0, &[1; 4000], 1000, false);
        let b = segments(false, 2, 0, &[2; 4000], 1000, false);
        let mut frames = Vec::new();
        for i in 0..4 {
            frames.push((v(1), a[i].clone()));
            frames.push((v(1), b[i].clone()));
            // The same flow's bytes in another violin.
            frames.push((v(2), a[i].clone()));
        }
        let out = run(frames);
        assert_eq!(out.len(), 3);
        assert_eq!((out[0].violin, out[0].payloads[0][0]), (v(1), 1));
        assert_eq!((out[1].violin, out[1].payloads[0][0]), (v(1), 2));
        assert_eq!((out[2].violin, out[2].payloads[0][0]), (v(2), 1));
        assert!(out.iter().all(|c| c.payloads.len() == 4));
    }

    #[test]
    fn gaps_short_segments_and_push_end_a_merge() {
        let s = segments(true, 1, 0, &[9; 5000], 1000, false);
        // A gap: 0, 1, 3, 4 → {0,1} {3,4}.
        let out = run([0, 1, 3, 4].map(|i| (v(1), s[i].clone())));
        assert_eq!(
            out.iter().map(|c| c.payloads.len()).collect::<Vec<_>>(),
            [2, 2]
        );
        assert_eq!(out[0].vnet.gso_type, GSO_TCPV6);
        // A short segment ends the group: the next one (from another stream) stands alone.
        let short = segments(true, 1, 0, &[9; 1500], 1000, false);
        let next = segments(true, 1, 1500, &[9; 1000], 1000, false);
        let out = run([&short[0], &short[1], &next[0]].map(|f| (v(1), f.clone())));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].payloads.len(), 2);
        assert_eq!(out[1].vnet.gso_type, GSO_NONE);
        // Nothing follows a PSH.
        let p = segments(true, 1, 0, &[9; 2000], 1000, true);
        let after = segments(true, 1, 2000, &[9; 1000], 1000, false);
        let out = run([&p[0], &p[1], &after[0]].map(|f| (v(1), f.clone())));
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0].head[54 + 13],
            0x18,
            "the merged frame carries the PSH"
        );
    }

    #[test]
    fn other_frames_pass_unchanged_and_keep_their_place_in_the_flow() {
        let s = segments(false, 1, 0, &[5; 3000], 1000, false);
        let (_, fin) = tso_frame(false, 1, 3000, 0x11, 12, &[], 1000);
        let mut fin = fin;
        // A complete checksum, as a peer sends it.
        let lay = layout(&fin).unwrap();
        fin[lay.l4 + 16..lay.l4 + 18].fill(0);
        let c = !fold(super::super::sum(
            &fin[lay.l4..],
            pseudo_sum(&fin[lay.l3..], false, IP_PROTO_TCP, fin.len() - lay.l4),
        ));
        fin[lay.l4 + 16..lay.l4 + 18].copy_from_slice(&c.to_be_bytes());
        let fin = Bytes::from(fin);
        let arp = Bytes::from(vec![0xffu8; 42]);
        let later = segments(false, 1, 3000, &[6; 1000], 1000, false);
        let out = run([
            (v(1), s[0].clone()),
            (v(1), arp.clone()),
            (v(1), s[1].clone()),
            (v(1), fin.clone()),
            (v(1), s[2].clone()),
            (v(1), later[0].clone()),
        ]);
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].payloads.len(), 2);
        assert_eq!(out[1].head, arp);
        assert_eq!(
            out[2].head, fin,
            "the FIN is not merged, and stays after what came before"
        );
        // What follows the FIN starts a merge of its own.
        assert_eq!(out[3].payloads, [s[2].slice(66..), later[0].slice(66..)]);
        // A corrupted checksum is not merged (and not hidden by a fresh one).
        let mut bad = s[1].to_vec();
        *bad.last_mut().unwrap() ^= 1;
        let out = run([(v(1), s[0].clone()), (v(1), Bytes::from(bad))]);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn merged_frames_stay_within_64_kib() {
        let payload = vec![3u8; 200_000];
        let mut frames = Vec::new();
        for (i, chunk) in payload.chunks(60_000).enumerate() {
            frames.extend(segments(false, 1, (i * 60_000) as u32, chunk, 1400, false));
        }
        let out = run(frames.into_iter().map(|f| (v(1), f)));
        assert!(out.iter().all(|c| c.len() <= MAX_LEN));
        let total: usize = out.iter().map(|c| c.len() - 66).sum();
        assert_eq!(total, 200_000);
    }
}
