//! Keeping the sparse-packet path short: what the daemon does after handing a packet to a
//! receiver on this machine (a UDP send or a TAP write) when that packet follows a quiet spell.
//!
//! **Handoff yield.** Linux wakes the reader of a UDP socket or of a TAP device with a "sync"
//! wake-up: it assumes the writer is about to sleep, so it queues the woken task on the writer's
//! CPU. The daemon does not sleep at once: after each `sendmsg` or TAP write, quinn's connection
//! driver resets its timers, tokio turns its I/O and timer drivers, and the TAP reader tries one
//! more read. On an idle machine that tail is tens of microseconds of cold-cache work, and the
//! woken receiver (the peer daemon of a co-located host, the vhost thread of a VM, a local
//! process) waits behind it. Measured on the lab's two-CPU VM with 10 ms pings, the peer
//! daemon's receive step took 173 µs (median) without the yield and 34 µs with it. So after a
//! handoff that follows a quiet spell, the daemon calls `sched_yield()` once: the receiver runs
//! first and the bookkeeping after it. When nothing else is runnable the call returns at once.
//!
//! **Busy polling** ([`busy_poll`]). The same packet opens a short window in which a spinner
//! task keeps the runtime polling its I/O instead of sleeping, so the answer to a sparse
//! request does not pay the daemon's wake-up.
//!
//! Both act only on packets after a quiet spell of at least [`QUIET_GAP`] on their path
//! ([`SparsePath`], one per path: UDP sends, TAP writes). Under load (packets closer together)
//! neither acts, so bulk throughput pays nothing; wake-up placement only matters for sparse
//! traffic.

pub mod busy_poll;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use busy_poll::BusyPoll;

/// A packet counts as sparse only if the previous one on its path was at least this long ago.
/// With 200 µs the lab's bulk TCP lost 15 % of its throughput: on a busy machine the daemon is
/// often descheduled for longer than that, and yielding after such a pause hands away the CPU
/// it just got back. With 1 ms bulk throughput was unchanged (`scripts/bench/overlay.sh`, on and
/// off alternately).
pub const QUIET_GAP: Duration = Duration::from_millis(1);

/// Tells, for a stream of packets, which of them follow a quiet spell of at least
/// [`QUIET_GAP`].
#[derive(Debug)]
struct QuietSpells {
    epoch: Instant,
    /// Nanoseconds after `epoch` of the previous packet (+1, so 0 means "none yet").
    last: AtomicU64,
}

impl QuietSpells {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Records a packet at `now`; true if it is the first or followed a quiet spell.
    fn record(&self, now: Instant) -> bool {
        let ns = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        let prev = self.last.swap(ns, Ordering::Relaxed);
        prev == 0 || ns.saturating_sub(prev) >= QUIET_GAP.as_nanos() as u64
    }
}

/// One packet path (UDP sends or TAP writes): its quiet-spell tracker, and what a sparse packet
/// on it triggers (the handoff yield, a busy-poll window).
#[derive(Debug)]
pub struct SparsePath {
    yield_enabled: bool,
    spells: QuietSpells,
    yields: AtomicU64,
    busy: Arc<BusyPoll>,
}

impl SparsePath {
    /// A path that yields after sparse packets if `yield_enabled` and opens `busy`'s window.
    #[must_use]
    pub fn new(yield_enabled: bool, busy: Arc<BusyPoll>) -> Self {
        Self {
            yield_enabled,
            spells: QuietSpells::new(),
            yields: AtomicU64::new(0),
            busy,
        }
    }

    /// Records a handoff now and yields the CPU if [`record`](Self::record) says so.
    pub fn after_handoff(&self) {
        if !self.yield_enabled && !self.busy.is_enabled() {
            return;
        }
        if self.record(Instant::now()) {
            // SAFETY: sched_yield takes no arguments and has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }

    /// Records a handoff at `now`; if it followed a quiet spell, opens a busy-poll window and
    /// returns whether to yield.
    pub fn record(&self, now: Instant) -> bool {
        if !self.spells.record(now) {
            return false;
        }
        self.busy.open_window(now);
        if self.yield_enabled {
            self.yields.fetch_add(1, Ordering::Relaxed);
        }
        self.yield_enabled
    }

    /// Whether this path ever yields.
    #[must_use]
    pub fn yield_enabled(&self) -> bool {
        self.yield_enabled
    }

    /// How many handoffs yielded so far.
    #[must_use]
    pub fn yields(&self) -> u64 {
        self.yields.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(yield_enabled: bool, window: Duration) -> SparsePath {
        SparsePath::new(yield_enabled, Arc::new(BusyPoll::new(window)))
    }

    #[test]
    fn first_handoff_and_handoffs_after_a_quiet_gap_yield() {
        let d = path(true, Duration::ZERO);
        let t0 = d.spells.epoch + Duration::from_millis(5);
        assert!(d.record(t0));
        assert!(d.record(t0 + Duration::from_millis(10)));
        assert!(d.record(t0 + Duration::from_millis(10) + QUIET_GAP));
        assert_eq!(d.yields(), 3);
    }

    #[test]
    fn dense_handoffs_do_not_yield() {
        let d = path(true, Duration::ZERO);
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
        let d = path(false, Duration::from_micros(200));
        assert!(!d.record(d.spells.epoch + Duration::from_secs(1)));
        assert!(!d.record(d.spells.epoch + Duration::from_secs(2)));
        assert_eq!(d.yields(), 0);
    }

    #[test]
    fn a_clock_before_the_epoch_counts_as_the_epoch() {
        let d = path(true, Duration::ZERO);
        let before = d.spells.epoch.checked_sub(Duration::from_millis(1));
        if let Some(before) = before {
            assert!(d.record(before));
            assert!(!d.record(d.spells.epoch));
        }
    }

    #[test]
    fn a_sparse_packet_opens_a_window_and_dense_packets_do_not() {
        let d = path(false, Duration::from_micros(200));
        let t0 = d.spells.epoch + Duration::from_millis(1);
        assert!(!d.busy.within_window(t0));
        d.record(t0);
        assert!(d.busy.within_window(t0 + Duration::from_micros(199)));
        assert!(!d.busy.within_window(t0 + Duration::from_micros(200)));
        // Dense packets (a burst, bulk traffic) do not extend the window.
        for i in 1..50u64 {
            d.record(t0 + Duration::from_micros(10 * i));
        }
        assert!(!d.busy.within_window(t0 + Duration::from_micros(495)));
        // The quiet spell is measured from the latest packet.
        let last = t0 + Duration::from_micros(490);
        d.record(last + QUIET_GAP - Duration::from_micros(1));
        assert!(!d.busy.within_window(last + QUIET_GAP));
        let next = last + QUIET_GAP * 3;
        d.record(next);
        assert!(d.busy.within_window(next + Duration::from_micros(100)));
    }
}
