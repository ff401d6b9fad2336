//! Properties of segmenting and coalescing together: what the segmenter cuts and the coalescer
//! merges again, cut once more as the kernel would, is byte for byte what was cut first; every
//! frame's checksums hold; nothing is merged across flows or violins.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::segment::tests::tso_frame;
use super::{
    Coalesced, Coalescer, GSO_NONE, VnetHdr, complete_checksum, fuzz_offload, ipv4_checksum,
    l4_checksum_ok, layout, segment,
};
use crate::wire::ViolinId;

const MAX_FRAME: usize = 1418;

/// A stream's piece: which flow (1 or 2) in which violin, IPv6 or not, from which sequence
/// number, with which payload and MSS.
#[derive(Debug, Clone)]
struct Stream {
    violin: u32,
    flow: u8,
    v6: bool,
    seq: u32,
    payload: Vec<u8>,
    mss: u16,
    psh: bool,
}

fn stream(violin: u32, flow: u8) -> impl Strategy<Value = Stream> {
    (
        any::<bool>(),
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 1..20_000),
        // Full segments fit MAX_FRAME (as MSS clamping makes them), IPv6 with options too.
        200u16..1332,
        any::<bool>(),
    )
        .prop_map(move |(v6, seq, payload, mss, psh)| Stream {
            violin,
            flow,
            v6,
            seq,
            payload,
            mss,
            psh,
        })
}

/// The stream's TSO frame cut by the segmenter, checked as a NIC's segments would be.
fn cut(s: &Stream) -> Vec<Bytes> {
    let (hdr, f) = tso_frame(
        s.v6,
        s.flow,
        s.seq,
        if s.psh { 0x18 } else { 0x10 },
        12,
        &s.payload,
        s.mss,
    );
    let mut slab = BytesMut::new();
    let mut out = Vec::new();
    segment(&hdr, &f, MAX_FRAME, 0, &mut slab, &mut out).unwrap();
    let mut seq = s.seq;
    let mut payload = Vec::new();
    for seg in &out {
        assert!(seg.len() <= MAX_FRAME);
        let lay = layout(seg).unwrap();
        assert!(l4_checksum_ok(seg, &lay), "TCP checksum");
        if !lay.v6 {
            let ip = &seg[lay.l3..lay.l4];
            assert_eq!(ipv4_checksum(ip), u16::from_be_bytes([ip[10], ip[11]]));
            assert_eq!(
                usize::from(u16::from_be_bytes([ip[2], ip[3]])),
                seg.len() - lay.l3
            );
        }
        assert_eq!(
            u32::from_be_bytes(seg[lay.l4 + 4..lay.l4 + 8].try_into().unwrap()),
            seq
        );
        let data = &seg[lay.l4 + 32..];
        seq = seq.wrapping_add(data.len() as u32);
        payload.extend_from_slice(data);
    }
    assert_eq!(payload, s.payload, "the segments carry the payload");
    out.into_iter().map(BytesMut::freeze).collect()
}

/// What the kernel makes of a frame written to the TAP: a merged frame checksummed and cut
/// back into segments, any other frame as it is.
fn kernel_cut(c: &Coalesced) -> Vec<Vec<u8>> {
    let mut f = c.to_vec();
    if c.vnet == VnetHdr::default() {
        return vec![f];
    }
    assert!(f.len() <= 65_535);
    let mut whole = f.clone();
    complete_checksum(&c.vnet, &mut whole).unwrap();
    assert!(
        l4_checksum_ok(&whole, &layout(&whole).unwrap()),
        "merged checksum"
    );
    let mut slab = BytesMut::new();
    let mut out = Vec::new();
    segment(&c.vnet, &f, MAX_FRAME, 0, &mut slab, &mut out).unwrap();
    f.clear();
    out.into_iter().map(|b| b.to_vec()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Two flows of one violin and the first flow's twin in another violin, interleaved:
    /// each one's frames, merged and cut again, are exactly its segments.
    #[test]
    fn segment_then_coalesce_is_identical_per_flow(
        a in stream(1, 1),
        b in stream(1, 2),
        order in prop::collection::vec(0usize..3, 0..200),
    ) {
        let twin = Stream { violin: 2, ..a.clone() };
        let streams = [&a, &b, &twin];
        let cuts: Vec<Vec<Bytes>> = streams.iter().map(|s| cut(s)).collect();
        let mut next = [0usize; 3];
        let mut co = Coalescer::new();
        let push = |k: usize, co: &mut Coalescer, next: &mut [usize; 3]| {
            if let Some(f) = cuts[k].get(next[k]) {
                co.push(ViolinId::new(streams[k].violin).unwrap(), f.clone());
                next[k] += 1;
            }
        };
        for k in order {
            push(k, &mut co, &mut next);
        }
        for k in 0..3 {
            while next[k] < cuts[k].len() {
                push(k, &mut co, &mut next);
            }
        }
        let mut out = Vec::new();
        co.flush(&mut out);
        let mut got: [Vec<Vec<u8>>; 3] = Default::default();
        for c in &out {
            let flow = c.head[11];
            let k = match (c.violin.get(), flow) {
                (1, 1) => 0,
                (1, 2) => 1,
                (2, 1) => 2,
                other => panic!("unknown flow {other:?}"),
            };
            got[k].extend(kernel_cut(c));
        }
        for k in 0..3 {
            let want: Vec<Vec<u8>> = cuts[k].iter().map(|b| b.to_vec()).collect();
            prop_assert_eq!(&got[k], &want, "flow {}", k);
        }
        // Merging happened: one flow alone takes fewer writes than segments.
        if a.payload.len() > 3 * usize::from(a.mss) {
            let mut co = Coalescer::new();
            for f in &cuts[0] {
                co.push(ViolinId::new(1).unwrap(), f.clone());
            }
            let mut alone = Vec::new();
            co.flush(&mut alone);
            prop_assert!(alone.len() < cuts[0].len());
            prop_assert!(alone.iter().all(|c| c.payloads.is_empty() || c.vnet.gso_type != GSO_NONE));
        }
    }

    #[test]
    fn any_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..3000)) {
        fuzz_offload(&data);
    }

    /// Real frames with a byte changed: never a panic.
    #[test]
    fn corrupted_frames_never_panic(s in stream(1, 1), at in any::<prop::sample::Index>(), x in 1u8..) {
        let (hdr, f) = tso_frame(s.v6, 1, s.seq, 0x10, 12, &s.payload, s.mss);
        let mut data = hdr.encode().to_vec();
        data.extend_from_slice(&f);
        let i = at.index(data.len().min(200));
        data[i] ^= x;
        fuzz_offload(&data);
    }
}
