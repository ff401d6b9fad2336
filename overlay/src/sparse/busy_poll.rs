//! Polling for a short while after a sparse packet instead of going to sleep at once.
//!
//! Sparse request/response traffic (a ping, an MPI message and its answer) crosses the daemon
//! twice within a few hundred microseconds: the request out, the answer back. If the daemon
//! sleeps in `epoll_wait` between the two, the answer pays a full wake-up: the kernel's wake of
//! the daemon, the CPU's exit from its idle state (in a virtual machine, a trip through the
//! hypervisor), and cold caches. Busy polling, as `SO_BUSY_POLL` does for sockets and MPI
//! libraries do for their queues, keeps the daemon on the CPU for a bounded window after each
//! sparse packet, checking for I/O with a zero-timeout `epoll_wait` and giving the CPU to
//! anything else runnable (`sched_yield`) between checks, so it never delays another task on
//! its CPU.
//!
//! The spinner is one task of the daemon's `LocalSet`. A packet after a quiet spell on its path
//! (the parent module's `SparsePath`) opens a window ([`BusyPoll::open_window`]) and wakes the
//! spinner, which then yields to the runtime (tokio's current-thread scheduler polls its I/O
//! driver with a zero timeout when a task has yielded) until the window has passed, and parks
//! again. Packets closer together neither open nor extend a window: under load the daemon is
//! busy anyway, and a spinner running beside bulk traffic cost a syscall per scheduler turn
//! (measured: 2.18 against 2.64 Gb/s of single-stream TCP, two runs each). So busy polling
//! costs at most the window's CPU time per burst of traffic, and never more than
//! [`MAX_SHARE_PERCENT`] of the time on average ([`SpinBudget`]), whatever the traffic's
//! pattern.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Busy polling takes at most this share of wall-clock time, on average over
/// [`BUDGET_CAP`]-long bursts. Traffic whose packets come just over the quiet gap apart would
/// otherwise keep a CPU spinning for a window in every gap.
pub const MAX_SHARE_PERCENT: u64 = 10;

/// The most spinning time that can be saved up while idle.
pub const BUDGET_CAP: Duration = Duration::from_millis(2);

/// Spinning time, earned at [`MAX_SHARE_PERCENT`] of wall-clock time and saved up to
/// [`BUDGET_CAP`] (a token bucket).
#[derive(Debug)]
pub struct SpinBudget {
    available: Duration,
    refilled: Instant,
}

impl SpinBudget {
    /// A full budget at `now`.
    #[must_use]
    pub fn new(now: Instant) -> Self {
        Self {
            available: BUDGET_CAP,
            refilled: now,
        }
    }

    /// Earns what the time since the last call is worth; returns what may be spent now.
    pub fn refill(&mut self, now: Instant) -> Duration {
        let earned = now.saturating_duration_since(self.refilled) * MAX_SHARE_PERCENT as u32 / 100;
        self.available = (self.available + earned).min(BUDGET_CAP);
        self.refilled = now;
        self.available
    }

    /// Spends `spent` (never below zero).
    pub fn spend(&mut self, spent: Duration) {
        self.available = self.available.saturating_sub(spent);
    }
}

/// The busy-poll window and its bookkeeping, shared by the spinner and the packet paths.
#[derive(Debug)]
pub struct BusyPoll {
    window_ns: u64,
    epoch: Instant,
    /// Nanoseconds after `epoch` at which the current window closes.
    until: AtomicU64,
    /// The spinner waits for `notify` (set before it starts waiting, cleared by `open_window`).
    parked: AtomicBool,
    notify: Notify,
    /// Zero-timeout polls made by the spinner, for status.
    polls: AtomicU64,
}

impl BusyPoll {
    /// A window of `window` after each sparse packet; zero disables busy polling.
    #[must_use]
    pub fn new(window: Duration) -> Self {
        Self {
            window_ns: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
            epoch: Instant::now(),
            until: AtomicU64::new(0),
            parked: AtomicBool::new(true),
            notify: Notify::new(),
            polls: AtomicU64::new(0),
        }
    }

    /// Whether the daemon busy-polls at all.
    #[must_use]
    pub fn is_enabled(&self) -> bool {
        self.window_ns > 0
    }

    /// The window in microseconds.
    #[must_use]
    pub fn window_us(&self) -> u64 {
        self.window_ns / 1000
    }

    /// How many zero-timeout polls the spinner made so far.
    #[must_use]
    pub fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    /// Opens a window at `now` (a sparse packet) and wakes the spinner.
    pub fn open_window(&self, now: Instant) {
        if !self.is_enabled() {
            return;
        }
        let until = self.ns(now).saturating_add(self.window_ns);
        self.until.store(until, Ordering::Relaxed);
        if self.parked.swap(false, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    /// True while `now` is within the current window.
    #[must_use]
    pub fn within_window(&self, now: Instant) -> bool {
        self.ns(now) < self.until.load(Ordering::Relaxed)
    }

    /// Nanoseconds from the epoch to `now` (0 for times before it).
    fn ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// The spinner: runs until `token` is cancelled. Must run as a task of the runtime that
    /// drives the daemon's sockets (its yields are what make that runtime poll them).
    pub async fn run(&self, token: CancellationToken) {
        if !self.is_enabled() {
            return;
        }
        let mut budget = SpinBudget::new(Instant::now());
        loop {
            self.parked.store(true, Ordering::Release);
            tokio::select! {
                () = token.cancelled() => return,
                () = self.notify.notified() => {}
            }
            let start = Instant::now();
            let allowance = budget.refill(start);
            loop {
                let now = Instant::now();
                if !self.within_window(now) || now.saturating_duration_since(start) >= allowance {
                    budget.spend(now.saturating_duration_since(start));
                    break;
                }
                if token.is_cancelled() {
                    return;
                }
                // Anything runnable on this CPU (the packet's receiver, woken onto it by the
                // kernel) goes first; then one turn of the runtime polls the I/O driver.
                // SAFETY: sched_yield takes no arguments and has no preconditions.
                unsafe { libc::sched_yield() };
                self.polls.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn zero_window_is_disabled_and_opening_is_a_no_op() {
        let b = BusyPoll::new(Duration::ZERO);
        assert!(!b.is_enabled());
        b.open_window(Instant::now());
        assert!(!b.within_window(Instant::now()));
        assert!(b.parked.load(Ordering::Relaxed));
    }

    #[test]
    fn a_window_lasts_its_length_and_a_new_one_replaces_it() {
        let b = BusyPoll::new(Duration::from_micros(200));
        let t0 = b.epoch + Duration::from_millis(1);
        assert!(!b.within_window(t0));
        b.open_window(t0);
        assert!(b.within_window(t0 + Duration::from_micros(199)));
        assert!(!b.within_window(t0 + Duration::from_micros(200)));
        let t1 = t0 + Duration::from_millis(5);
        b.open_window(t1);
        assert!(b.within_window(t1 + Duration::from_micros(100)));
    }

    #[test]
    fn the_budget_caps_spinning_at_its_share_of_the_time() {
        let t0 = Instant::now();
        let mut b = SpinBudget::new(t0);
        assert_eq!(b.refill(t0), BUDGET_CAP);
        b.spend(BUDGET_CAP + Duration::from_millis(1));
        assert_eq!(b.refill(t0), Duration::ZERO);
        // 1 ms later a tenth of it has been earned.
        let t1 = t0 + Duration::from_millis(1);
        assert_eq!(
            b.refill(t1),
            Duration::from_micros(1000 * MAX_SHARE_PERCENT / 100)
        );
        // A long idle spell saves up no more than the cap.
        assert_eq!(b.refill(t1 + Duration::from_secs(10)), BUDGET_CAP);
        // Spending a window every 1.1 ms for a second stays within the share.
        let mut now = t1 + Duration::from_secs(10);
        let mut spun = Duration::ZERO;
        for _ in 0..909 {
            now += Duration::from_micros(1100);
            let spend = b.refill(now).min(Duration::from_micros(300));
            b.spend(spend);
            spun += spend;
        }
        let limit = Duration::from_secs(1) * MAX_SHARE_PERCENT as u32 / 100 + BUDGET_CAP;
        assert!(spun <= limit, "spun {spun:?} > {limit:?}");
        assert!(
            spun >= limit - BUDGET_CAP - Duration::from_millis(2),
            "spun only {spun:?}"
        );
    }

    #[test]
    fn the_spinner_polls_after_a_window_opens_and_parks_after_it() {
        crate::local_runtime::block_on_local(async {
            let b = Rc::new(BusyPoll::new(Duration::from_millis(5)));
            let token = CancellationToken::new();
            let spinner = tokio::task::spawn_local({
                let b = b.clone();
                let token = token.clone();
                async move { b.run(token).await }
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(b.polls(), 0, "no packet yet, so no polling");
            b.open_window(Instant::now());
            tokio::time::sleep(Duration::from_millis(30)).await;
            let after_first = b.polls();
            assert!(
                after_first > 0,
                "the spinner polled after the window opened"
            );
            assert!(
                b.parked.load(Ordering::Relaxed),
                "and parked after the window"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(b.polls(), after_first, "a parked spinner does not poll");
            token.cancel();
            spinner.await.unwrap();
        })
        .unwrap();
    }
}
