//! Giving the CPU up right after handing a packet to a receiver on this machine.
//!
//! Linux wakes the reader of a UDP socket or of a TAP device with a "sync" wake-up: it assumes
//! the writer is about to sleep, so it queues the woken task on the writer's CPU. The daemon
//! does not sleep at once: after each `sendmsg` or TAP write, quinn's connection driver resets
//! its timers, tokio turns its I/O and timer drivers, and the TAP reader tries one more read.
//! On an idle machine that tail is tens of microseconds of cold-cache work, and the woken
//! receiver (the peer daemon of a co-located host, the vhost thread of a VM, a local process)
//! waits behind it. Measured on the lab's two-CPU VM with 10 ms pings, the peer daemon's
//! receive step took 173 µs (median) without the yield and 34 µs with it.
//!
//! So after a handoff that follows a quiet spell, the daemon calls `sched_yield()` once: the
//! receiver runs first and the bookkeeping after it. When nothing else is runnable the call
//! returns at once. Under load (handoffs closer together than [`QUIET_GAP`]) it never yields,
//! so bulk throughput pays nothing; the wake-up placement only matters for sparse traffic.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::busy_poll::BusyPoll;

/// A handoff yields only if the previous one was at least this long ago. With 200 µs the lab's
/// bulk TCP lost 15 % of its throughput: on a busy machine the daemon is often descheduled for
/// longer than that, and yielding after such a pause hands away the CPU it just got back. With
/// 1 ms bulk throughput was unchanged (`scripts/bench/overlay.sh`, on and off alternately).
pub const QUIET_GAP: Duration = Duration::from_millis(1);

/// Tells, for a stream of packets, which of them follow a quiet spell of at least
/// [`QUIET_GAP`]: the ones after which the handoff yield and busy polling act.
#[derive(Debug)]
pub struct QuietSpells {
    epoch: Instant,
    /// Nanoseconds after `epoch` of the previous packet (+1, so 0 means "none yet").
    last: AtomicU64,
}

impl QuietSpells {
    /// No packet yet.
    #[must_use]
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// The instant the tracker's times count from.
    #[must_use]
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Nanoseconds from this tracker's epoch to `now` (0 for times before it).
    #[must_use]
    pub fn ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Records a packet at `now`; true if it is the first or followed a quiet spell.
    pub fn record(&self, now: Instant) -> bool {
        let ns = self.ns(now).saturating_add(1);
        let prev = self.last.swap(ns, Ordering::Relaxed);
        prev == 0 || ns.saturating_sub(prev) >= QUIET_GAP.as_nanos() as u64
    }
}

impl Default for QuietSpells {
    fn default() -> Self {
        Self::new()
    }
}

/// Decides, per stream of handoffs, whether to yield after the current one.
#[derive(Debug)]
pub struct HandoffYield {
    enabled: bool,
    spells: QuietSpells,
    yields: AtomicU64,
}

impl HandoffYield {
    /// A decider; `enabled == false` never yields.
    #[must_use]
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            spells: QuietSpells::new(),
            yields: AtomicU64::new(0),
        }
    }

    /// Records a handoff at `now`; true if it followed a quiet spell of at least [`QUIET_GAP`].
    pub fn record(&self, now: Instant) -> bool {
        if !self.enabled {
            return false;
        }
        let quiet = self.spells.record(now);
        if quiet {
            self.yields.fetch_add(1, Ordering::Relaxed);
        }
        quiet
    }

    /// Whether this decider ever yields.
    #[must_use]
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Records a handoff now, for this decider and for `busy`'s window (one clock read for
    /// both), and yields the CPU if [`record`](Self::record) says so.
    pub fn after_handoff(&self, busy: &BusyPoll) {
        if !self.enabled && !busy.is_enabled() {
            return;
        }
        let now = Instant::now();
        busy.touch_at(now);
        if self.record(now) {
            // SAFETY: sched_yield takes no arguments and has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }

    /// How many handoffs yielded so far.
    #[must_use]
    pub fn yields(&self) -> u64 {
        self.yields.load(Ordering::Relaxed)
    }
}

/// quinn's UDP socket, yielding after sparse sends (see the module documentation).
pub struct HandoffSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    decider: Arc<HandoffYield>,
    busy: Arc<BusyPoll>,
}

impl HandoffSocket {
    /// Wraps `inner`; every send is also a packet for `busy`'s window.
    #[must_use]
    pub fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        decider: Arc<HandoffYield>,
        busy: Arc<BusyPoll>,
    ) -> Self {
        Self {
            inner,
            decider,
            busy,
        }
    }
}

impl fmt::Debug for HandoffSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandoffSocket")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for HandoffSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)?;
        self.decider.after_handoff(&self.busy);
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_handoff_and_handoffs_after_a_quiet_gap_yield() {
        let d = HandoffYield::new(true);
        let t0 = d.spells.epoch + Duration::from_millis(5);
        assert!(d.record(t0));
        assert!(d.record(t0 + Duration::from_millis(10)));
        assert!(d.record(t0 + Duration::from_millis(10) + QUIET_GAP));
        assert_eq!(d.yields(), 3);
    }

    #[test]
    fn dense_handoffs_do_not_yield() {
        let d = HandoffYield::new(true);
        let t0 = d.spells.epoch + Duration::from_millis(1);
        assert!(d.record(t0));
        // A burst: every handoff 10 µs after the previous one.
        for i in 1..100u64 {
            assert!(!d.record(t0 + Duration::from_micros(10 * i)), "handoff {i}");
        }
        assert_eq!(d.yields(), 1);
        // The gap is measured from the latest handoff, not from the last yield.
        let last = t0 + Duration::from_micros(990);
        assert!(!d.record(last + QUIET_GAP - Duration::from_micros(1)));
        assert!(d.record(last + QUIET_GAP * 3));
    }

    #[test]
    fn disabled_never_yields() {
        let d = HandoffYield::new(false);
        assert!(!d.record(d.spells.epoch + Duration::from_secs(1)));
        assert!(!d.record(d.spells.epoch + Duration::from_secs(2)));
        assert_eq!(d.yields(), 0);
    }

    #[test]
    fn a_clock_before_the_epoch_counts_as_the_epoch() {
        let d = HandoffYield::new(true);
        let before = d.spells.epoch.checked_sub(Duration::from_millis(1));
        if let Some(before) = before {
            assert!(d.record(before));
            assert!(!d.record(d.spells.epoch));
        }
    }
}
