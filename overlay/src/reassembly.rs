//! Memory-bounded reassembly of fragmented frames, with timeouts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::HostId;
use crate::wire::{Fragment, MAX_FRAGMENTS, ViolinId};

/// Limits of the reassembler.
#[derive(Debug, Clone, Copy)]
pub struct ReassemblyLimits {
    /// Bytes buffered across all incomplete frames; the oldest are evicted beyond it.
    pub max_bytes: usize,
    /// Incomplete frames at once; the oldest are evicted beyond it.
    pub max_frames: usize,
    /// An incomplete frame is dropped this long after its first part arrived.
    pub timeout: Duration,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        Self {
            max_bytes: 4 << 20,
            max_frames: 1024,
            timeout: Duration::from_millis(500),
        }
    }
}

struct Partial {
    violin: ViolinId,
    redirected: bool,
    count: u8,
    parts: [Option<Bytes>; MAX_FRAGMENTS],
    received: u8,
    bytes: usize,
    deadline: Instant,
}

/// Why a fragment was dropped (each is counted by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragmentDrop {
    /// A part disagreed with earlier parts of the same frame (count, violin) or repeated one.
    Mismatch,
}

/// A completely reassembled frame.
pub struct Reassembled {
    /// Violin of the frame.
    pub violin: ViolinId,
    /// The frame.
    pub frame: Bytes,
    /// REDIRECTED frame.
    pub redirected: bool,
}

/// Reassembles fragments per (sender, frag_id).
pub struct Reassembler {
    limits: ReassemblyLimits,
    partial: HashMap<(HostId, u32), Partial>,
    bytes: usize,
    /// Incomplete frames dropped (timeout or memory bound) so far.
    pub evicted: u64,
}

impl Reassembler {
    /// An empty reassembler.
    pub fn new(limits: ReassemblyLimits) -> Self {
        Self {
            limits,
            partial: HashMap::new(),
            bytes: 0,
            evicted: 0,
        }
    }

    /// Adds a fragment; returns the frame once all parts are there.
    pub fn push(
        &mut self,
        now: Instant,
        from: &HostId,
        frag: Fragment,
    ) -> Result<Option<Reassembled>, FragmentDrop> {
        let key = (from.clone(), frag.frag_id);
        if frag.count == 1 {
            return Ok(Some(Reassembled {
                violin: frag.violin,
                frame: frag.payload,
                redirected: frag.redirected,
            }));
        }
        let len = frag.payload.len();
        let entry = self.partial.entry(key.clone()).or_insert_with(|| Partial {
            violin: frag.violin,
            redirected: frag.redirected,
            count: frag.count,
            parts: Default::default(),
            received: 0,
            bytes: 0,
            deadline: now + self.limits.timeout,
        });
        let slot = usize::from(frag.index);
        if entry.count != frag.count
            || entry.violin != frag.violin
            || entry.redirected != frag.redirected
            || entry.parts[slot].is_some()
        {
            let bytes = entry.bytes;
            self.partial.remove(&key);
            self.bytes -= bytes;
            return Err(FragmentDrop::Mismatch);
        }
        entry.parts[slot] = Some(frag.payload);
        entry.received += 1;
        entry.bytes += len;
        self.bytes += len;
        if entry.received == entry.count {
            let Some(done) = self.partial.remove(&key) else {
                return Ok(None);
            };
            self.bytes -= done.bytes;
            let mut frame = BytesMut::with_capacity(done.bytes);
            for p in done.parts.iter().flatten() {
                frame.extend_from_slice(p);
            }
            return Ok(Some(Reassembled {
                violin: done.violin,
                frame: frame.freeze(),
                redirected: done.redirected,
            }));
        }
        self.enforce_bounds();
        Ok(None)
    }

    fn enforce_bounds(&mut self) {
        while self.bytes > self.limits.max_bytes || self.partial.len() > self.limits.max_frames {
            let Some(oldest) = self
                .partial
                .iter()
                .min_by_key(|(_, p)| p.deadline)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(p) = self.partial.remove(&oldest) {
                self.bytes -= p.bytes;
                self.evicted += 1;
            }
        }
    }

    /// Drops incomplete frames whose time is up.
    pub fn handle_timeout(&mut self, now: Instant) {
        let before = self.partial.len();
        let mut freed = 0;
        self.partial.retain(|_, p| {
            let keep = p.deadline > now;
            if !keep {
                freed += p.bytes;
            }
            keep
        });
        self.bytes -= freed;
        self.evicted += (before - self.partial.len()) as u64;
        // After a burst of partial frames, give the table's memory back.
        if self.partial.capacity() > 64 && self.partial.len() < self.partial.capacity() / 4 {
            self.partial.shrink_to_fit();
        }
    }

    /// Bytes held by incomplete frames.
    pub fn buffered_bytes(&self) -> usize {
        self.bytes
    }

    /// Incomplete frames held.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

/// Fuzz entry point: a script of datagrams from a few senders, clock advances and whole
/// frames to fragment, run against a reassembler with small limits. Never panics; the byte
/// accounting stays exact, the limits hold, and a fragmented frame comes back byte for byte.
///
/// Script: `max_frames`, `max_bytes / 16`, then records. `0x80 | t`: advance `t` × 10 ms and
/// time out; `0x40 | _, len, mtu, frame[len]`: fragment `frame` for `12 + mtu`-byte datagrams
/// and push its parts in reverse; else `sender, len, datagram[len]` (sender = low 2 bits).
pub fn fuzz_reassemble(data: &[u8]) {
    use crate::wire::{Datagram, decode, fragment};

    let mut it = data.iter().copied();
    let (Some(frames), Some(bytes)) = (it.next(), it.next()) else {
        return;
    };
    let limits = ReassemblyLimits {
        max_bytes: 64 + usize::from(bytes) * 16,
        max_frames: 1 + usize::from(frames % 8),
        timeout: Duration::from_millis(500),
    };
    let mut r = Reassembler::new(limits);
    let senders: [HostId; 5] = ["a/0", "a/1", "b/0", "b/1", "self/check"].map(HostId::from);
    let mut now = Instant::now();
    let mut next_id = 0u32;
    let mut rest = data.get(2..).unwrap_or_default();
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        if op & 0x80 != 0 {
            now += Duration::from_millis(10 * u64::from(op & 0x7F));
            r.handle_timeout(now);
        } else if op & 0x40 != 0 {
            let [len, mtu, ..] = *rest else { return };
            let frame = rest.get(2..2 + usize::from(len)).unwrap_or(&rest[2..]);
            rest = &rest[2 + frame.len()..];
            let Some(violin) = ViolinId::new(u32::from(mtu)) else {
                return;
            };
            next_id += 1;
            let Some(parts) = fragment(violin, frame, mtu & 1 == 1, next_id, 12 + usize::from(mtu))
            else {
                continue;
            };
            let evicted = r.evicted;
            let mut out = None;
            for p in parts.iter().rev() {
                let Ok(Datagram::Fragment(frag)) = decode(p) else {
                    panic!("own fragment does not decode");
                };
                assert!(out.is_none(), "frame completed before its last part");
                out = r
                    .push(now, &senders[4], frag)
                    .expect("own fragments never mismatch");
                check_accounting(&r);
            }
            if let Some(done) = &out {
                assert_eq!(&done.frame[..], frame);
                assert_eq!((done.violin, done.redirected), (violin, mtu & 1 == 1));
            } else {
                assert_ne!(r.evicted, evicted, "frame lost without an eviction");
            }
        } else {
            let [len, ..] = *rest else { return };
            let d = rest.get(1..1 + usize::from(len)).unwrap_or(&rest[1..]);
            rest = &rest[1 + d.len()..];
            if let Ok(Datagram::Fragment(frag)) = decode(&Bytes::copy_from_slice(d)) {
                if let Ok(Some(done)) = r.push(now, &senders[usize::from(op & 3)], frag) {
                    assert!(!done.frame.is_empty());
                }
                check_accounting(&r);
            }
        }
    }
}

fn check_accounting(r: &Reassembler) {
    let mut total = 0;
    for p in r.partial.values() {
        let held: Vec<_> = p.parts.iter().flatten().collect();
        assert_eq!(p.bytes, held.iter().map(|b| b.len()).sum::<usize>());
        assert_eq!(usize::from(p.received), held.len());
        assert!(p.received < p.count);
        total += p.bytes;
    }
    assert_eq!(r.bytes, total);
    assert!(r.bytes <= r.limits.max_bytes);
    assert!(r.partial.len() <= r.limits.max_frames);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::{ViolinId, fragment};

    fn frag(d: &Bytes) -> Fragment {
        match crate::wire::decode(d) {
            Ok(crate::wire::Datagram::Fragment(f)) => f,
            other => panic!("not a fragment: {other:?}"),
        }
    }

    #[test]
    fn mismatch_and_memory_bound_keep_accounting_exact() {
        let limits = ReassemblyLimits {
            max_bytes: 100,
            max_frames: 2,
            timeout: Duration::from_millis(500),
        };
        let mut r = Reassembler::new(limits);
        let now = Instant::now();
        let from = HostId::from("a/0");
        let v = ViolinId::new(1).unwrap();
        let parts = fragment(v, &[7; 90], false, 1, 11 + 30).unwrap();
        assert_eq!(parts.len(), 3);
        assert!(r.push(now, &from, frag(&parts[0])).unwrap().is_none());
        // The same part again: the whole frame is dropped.
        assert_eq!(
            r.push(now, &from, frag(&parts[0])).err(),
            Some(FragmentDrop::Mismatch)
        );
        assert_eq!((r.pending(), r.buffered_bytes()), (0, 0));
        // Two partial frames of 60 bytes exceed 100 bytes: the older goes.
        let a = fragment(v, &[1; 90], false, 2, 11 + 30).unwrap();
        let b = fragment(v, &[2; 90], false, 3, 11 + 30).unwrap();
        for p in &a[..2] {
            r.push(now, &from, frag(p)).unwrap();
        }
        r.push(now + Duration::from_millis(1), &from, frag(&b[0]))
            .unwrap();
        r.push(now + Duration::from_millis(1), &from, frag(&b[1]))
            .unwrap();
        assert_eq!((r.pending(), r.buffered_bytes(), r.evicted), (1, 60, 1));
        let done = r.push(now, &from, frag(&b[2])).unwrap().unwrap();
        assert_eq!(&done.frame[..], &[2; 90][..]);
        check_accounting(&r);
        r.handle_timeout(now + Duration::from_secs(1));
        assert_eq!((r.pending(), r.buffered_bytes()), (0, 0));
    }

    #[test]
    fn fuzz_target_smoke() {
        // A round trip of a 40-byte frame in 20-byte datagrams, then a stray fragment, a
        // clock jump and a truncated record.
        let mut script = vec![3, 4, 0x40, 40, 20];
        script.extend(0..40);
        script.extend([
            1, 12, 0x11, 0, 0, 1, 0, 0, 0, 9, 0, 2, 0x10, 0xAA, 0x85, 0x00, 5,
        ]);
        fuzz_reassemble(&script);
    }

    proptest! {
        #[test]
        fn reassembly_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            fuzz_reassemble(&data);
        }
    }
}
