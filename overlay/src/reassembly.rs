//! Memory-bounded reassembly of fragmented frames, with timeouts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::HostId;
use crate::wire::{MAX_FRAGMENTS, ViolinId};

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

/// One fragment, as decoded.
pub struct Fragment {
    /// Violin of the frame.
    pub violin: ViolinId,
    /// Sender-local frame id.
    pub frag_id: u32,
    /// Position.
    pub index: u8,
    /// Number of parts.
    pub count: u8,
    /// REDIRECTED frame.
    pub redirected: bool,
    /// The part's bytes.
    pub payload: Bytes,
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
