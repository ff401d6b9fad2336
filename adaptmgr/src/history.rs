//! The history the dashboard plots: every monitor sample of the last hour, one-minute means of
//! the last 24 hours, and where each VM ran. Sans-IO: the manager passes in reports and the
//! time; [`History::record`] returns what to persist ([`HistoryWrite`]), which the inventory
//! appends in one transaction, and [`History::restore`] rebuilds the same state from what the
//! inventory kept, so the plots survive a restart.
//!
//! Why two resolutions: at the lab's 1 s monitor period an hour is 3,600 points per series, a
//! day would be 86,400 — too many to send to a browser or keep for every VM. One-minute means
//! keep a day in 1,440 points, and the plots of the last hour still show a migration's spike.
//! Bounded: at most [`MAX_SERIES`] series (new ones beyond it are dropped and counted), points
//! older than their span are forgotten, and so are placements but the last one before the span.

use std::collections::{BTreeMap, VecDeque};

use viola_api::dashboard::{Placement, Series};
use viola_api::domain::DomainState;
use viola_api::manager::HostReport;

/// How far back every sample is kept.
pub const FINE_SPAN_MS: u64 = 3_600_000;
/// How far back the one-minute means are kept.
pub const DAY_SPAN_MS: u64 = 24 * 3_600_000;
pub const MINUTE_MS: u64 = 60_000;
/// Series kept at most (a federation of 100 hosts and 1,000 VMs has about 2,600).
pub const MAX_SERIES: usize = 8_192;

/// Which of the two resolutions a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// Every sample of the last hour.
    Hour,
    /// One-minute means of the last 24 hours.
    Day,
}

impl Range {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }

    pub fn span_ms(self) -> u64 {
        match self {
            Self::Hour => FINE_SPAN_MS,
            Self::Day => DAY_SPAN_MS,
        }
    }
}

impl std::str::FromStr for Range {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hour" => Ok(Self::Hour),
            "day" => Ok(Self::Day),
            other => Err(format!("range must be hour or day, not {other:?}")),
        }
    }
}

/// What one call of [`History::record`] adds, for the inventory to persist.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryWrite {
    /// `(series, unix ms, value)` samples.
    pub fine: Vec<(String, u64, f64)>,
    /// `(series, minute start, mean)` of minutes that closed.
    pub minutes: Vec<(String, u64, f64)>,
    /// Each VM whose placements changed, with all of them now (`None`: forget the VM, it has
    /// not reported for a day).
    pub placements: BTreeMap<String, Option<Vec<Placement>>>,
    /// Forget fine samples before this time and minute means before `prune_minutes_before`
    /// (set once a minute, not on every report).
    pub prune: Option<Prune>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prune {
    pub fine_before: u64,
    pub minutes_before: u64,
}

/// The mean of one series over the minute that runs now.
#[derive(Debug, Clone, Copy, PartialEq)]
struct OpenMinute {
    start: u64,
    sum: f64,
    n: u32,
}

impl OpenMinute {
    /// Adds `value`, sampled at `ts`, to the mean of its minute in `open`. A sample of a later
    /// minute closes the open one: returned as (start, mean) for the caller to keep.
    fn add(open: &mut Option<Self>, ts: u64, value: f64) -> Option<(u64, f64)> {
        let minute = minute_of(ts);
        match open {
            Some(open) if open.start == minute => {
                open.sum += value;
                open.n += 1;
                None
            }
            open => {
                let closed = open
                    .take()
                    .map(|done| (done.start, done.sum / f64::from(done.n)));
                *open = Some(Self {
                    start: minute,
                    sum: value,
                    n: 1,
                });
                closed
            }
        }
    }
}

#[derive(Debug, Default)]
struct SeriesState {
    fine: VecDeque<(u64, f64)>,
    minutes: VecDeque<(u64, f64)>,
    open: Option<OpenMinute>,
}

/// The history, in memory.
#[derive(Debug, Default)]
pub struct History {
    series: BTreeMap<String, SeriesState>,
    placements: BTreeMap<String, VecDeque<(u64, String)>>,
    last_prune_minute: u64,
    /// Samples of new series refused because [`MAX_SERIES`] were kept.
    pub dropped_series: u64,
}

/// The samples a monitor report gives: the host's CPU, capacity, memory and traffic per
/// interface (violin bridges and the underlay; not loopback, nor the VMs' own ports, whose
/// traffic is the VMs'), and each running VM's CPU and memory.
pub fn samples_of(report: &HostReport) -> Vec<(String, f64)> {
    let h = &report.host;
    let u = &report.usage;
    let mut out = vec![
        (format!("host/{h}/cpu"), u.cpu_busy),
        (
            format!("host/{h}/cpu_capacity"),
            u.cpu_capacity.unwrap_or(f64::from(u.cpus)),
        ),
        (
            format!("host/{h}/mem_used_mib"),
            u.mem_total_kib.saturating_sub(u.mem_available_kib) as f64 / 1024.0,
        ),
    ];
    for n in &u.net {
        if n.iface == "lo" || n.iface.starts_with("vnet") {
            continue;
        }
        out.push((
            format!("host/{h}/net/{}/rx_mbit_s", n.iface),
            n.rx_bps / 1e6,
        ));
        out.push((
            format!("host/{h}/net/{}/tx_mbit_s", n.iface),
            n.tx_bps / 1e6,
        ));
    }
    // Each overlay link, named by its peer's `site:host` (a series name's parts are split at
    // '/').
    for l in &u.links {
        let peer = l.peer.replace('/', ":");
        out.push((format!("host/{h}/link/{peer}/rx_mbit_s"), l.rx_bps / 1e6));
        out.push((format!("host/{h}/link/{peer}/tx_mbit_s"), l.tx_bps / 1e6));
    }
    // Only where a VM runs: during a migration both hosts report it (the destination's copy
    // paused until the switch-over), and the paused copy's zeros would mix into its series.
    for vm in report
        .vms
        .iter()
        .filter(|v| v.state == DomainState::Running)
    {
        out.push((format!("vm/{}/cpu", vm.name), vm.cpu_busy));
        out.push((
            format!("vm/{}/mem_mib", vm.name),
            vm.balloon_kib.unwrap_or(vm.memory_kib) as f64 / 1024.0,
        ));
    }
    out
}

fn minute_of(ts: u64) -> u64 {
    ts - ts % MINUTE_MS
}

impl History {
    /// Folds in a host's samples taken at `now_ms` and the VMs it runs; returns what to persist.
    pub fn record(&mut self, now_ms: u64, report: &HostReport) -> HistoryWrite {
        let mut write = HistoryWrite::default();
        for (name, value) in samples_of(report) {
            if !value.is_finite() {
                continue;
            }
            if !self.series.contains_key(&name) && self.series.len() >= MAX_SERIES {
                self.dropped_series += 1;
                continue;
            }
            let s = self.series.entry(name.clone()).or_default();
            s.fine.push_back((now_ms, value));
            write.fine.push((name.clone(), now_ms, value));
            if let Some((start, mean)) = OpenMinute::add(&mut s.open, now_ms, value) {
                s.minutes.push_back((start, mean));
                write.minutes.push((name.clone(), start, mean));
            }
        }
        for vm in report
            .vms
            .iter()
            .filter(|v| v.state == DomainState::Running)
        {
            let moved = self
                .placements
                .get(&vm.name)
                .and_then(|p| p.back())
                .is_none_or(|(_, host)| host != &report.host);
            if moved {
                self.placements
                    .entry(vm.name.clone())
                    .or_default()
                    .push_back((now_ms, report.host.clone()));
                write.placements.insert(vm.name.clone(), None);
            }
        }
        let minute = minute_of(now_ms);
        if minute > self.last_prune_minute {
            self.last_prune_minute = minute;
            let prune = Prune {
                fine_before: now_ms.saturating_sub(FINE_SPAN_MS),
                minutes_before: now_ms.saturating_sub(DAY_SPAN_MS),
            };
            write
                .placements
                .extend(self.prune(prune).into_iter().map(|vm| (vm, None)));
            write.prune = Some(prune);
        }
        for (vm, list) in &mut write.placements {
            *list = self.placements.get(vm).map(|p| {
                p.iter()
                    .map(|(t, host)| Placement {
                        vm: vm.clone(),
                        host: host.clone(),
                        since_ms: *t,
                    })
                    .collect()
            });
        }
        write
    }

    /// Forgets what is older than `prune`; returns the VMs whose placements changed.
    fn prune(&mut self, prune: Prune) -> Vec<String> {
        self.series.retain(|_, s| {
            while s.fine.front().is_some_and(|(t, _)| *t < prune.fine_before) {
                s.fine.pop_front();
            }
            while s
                .minutes
                .front()
                .is_some_and(|(t, _)| *t < prune.minutes_before)
            {
                s.minutes.pop_front();
            }
            !(s.fine.is_empty() && s.minutes.is_empty() && s.open.is_none())
        });
        let mut changed = Vec::new();
        let series = &self.series;
        self.placements.retain(|vm, p| {
            // A VM with no sample for a day is gone.
            if !series.contains_key(&format!("vm/{vm}/cpu")) {
                changed.push(vm.clone());
                return false;
            }
            // The last placement before the span says where the VM was when the span began.
            let before = p.len();
            while p.len() > 1 && p.get(1).is_some_and(|(t, _)| *t < prune.minutes_before) {
                p.pop_front();
            }
            if p.len() != before {
                changed.push(vm.clone());
            }
            true
        });
        changed
    }

    /// Rebuilds the history from what was persisted (fine samples, closed minutes and
    /// placements, each oldest first within a series).
    pub fn restore(
        fine: impl IntoIterator<Item = (String, u64, f64)>,
        minutes: impl IntoIterator<Item = (String, u64, f64)>,
        placements: impl IntoIterator<Item = Placement>,
    ) -> Self {
        let mut h = Self::default();
        for (name, ts, v) in fine {
            h.series.entry(name).or_default().fine.push_back((ts, v));
        }
        for (name, ts, v) in minutes {
            h.series.entry(name).or_default().minutes.push_back((ts, v));
        }
        for s in h.series.values_mut() {
            s.fine.make_contiguous().sort_by_key(|p| p.0);
            s.minutes.make_contiguous().sort_by_key(|p| p.0);
            // The minute that was open when the manager stopped is rebuilt from its samples,
            // so it is neither lost nor counted twice.
            let closed_until = s.minutes.back().map_or(0, |(t, _)| t + MINUTE_MS);
            for &(ts, v) in s.fine.iter().filter(|(ts, _)| *ts >= closed_until) {
                if let Some(closed) = OpenMinute::add(&mut s.open, ts, v) {
                    s.minutes.push_back(closed);
                }
            }
        }
        let mut placements: Vec<Placement> = placements.into_iter().collect();
        placements.sort_by_key(|p| p.since_ms);
        for p in placements {
            h.placements
                .entry(p.vm)
                .or_default()
                .push_back((p.since_ms, p.host));
        }
        h
    }

    /// The series whose name starts with `prefix` and that `visible` admits, over `range`
    /// ending at `now_ms`; for [`Range::Day`], the minute still open is included as its mean
    /// so far.
    pub fn query(
        &self,
        prefix: &str,
        range: Range,
        now_ms: u64,
        visible: impl Fn(&str) -> bool,
    ) -> Vec<Series> {
        let from = now_ms.saturating_sub(range.span_ms());
        self.series
            .range(prefix.to_owned()..)
            .take_while(|(name, _)| name.starts_with(prefix))
            .filter(|(name, _)| visible(name))
            .filter_map(|(name, s)| {
                let mut points: Vec<(u64, f64)> = match range {
                    Range::Hour => s.fine.iter().copied().filter(|p| p.0 >= from).collect(),
                    Range::Day => s.minutes.iter().copied().filter(|p| p.0 >= from).collect(),
                };
                if range == Range::Day
                    && let Some(open) = s.open
                {
                    points.push((open.start, open.sum / f64::from(open.n)));
                }
                (!points.is_empty()).then(|| Series {
                    name: name.clone(),
                    points,
                })
            })
            .collect()
    }

    /// Where the VMs `visible` admits ran over `range` (the placement in force when it began,
    /// then every change), oldest first.
    pub fn placements(
        &self,
        range: Range,
        now_ms: u64,
        visible: impl Fn(&str) -> bool,
    ) -> Vec<Placement> {
        let from = now_ms.saturating_sub(range.span_ms());
        let mut out = Vec::new();
        for (vm, p) in self.placements.iter().filter(|(vm, _)| visible(vm)) {
            let first = p.iter().rposition(|(t, _)| *t <= from).unwrap_or(0);
            out.extend(p.iter().skip(first).map(|(t, host)| Placement {
                vm: vm.clone(),
                host: host.clone(),
                since_ms: *t,
            }));
        }
        out.sort_by_key(|p| p.since_ms);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use viola_api::manager::NetUsage;

    /// `host` busy `cpu` CPUs, with loopback and a violin bridge, running `vms` (name, CPU).
    fn report(host: &str, cpu: f64, vms: &[(&str, f64)]) -> HostReport {
        let mut r = fixtures::host_report(host, 1, &[]);
        r.usage.cpu_busy = cpu;
        r.usage.cpu_capacity = Some(0.5);
        let iface = |name: &str, bps: f64| NetUsage {
            iface: name.into(),
            rx_bytes: 0,
            tx_bytes: 0,
            rx_bps: bps,
            tx_bps: bps,
        };
        r.usage.net = vec![iface("lo", 1e9), iface("vio7", 2e6)];
        r.usage.links = vec![viola_api::manager::LinkUsage {
            peer: "b/b1".into(),
            tx_bps: 3e6,
            ..Default::default()
        }];
        r.vms = vms
            .iter()
            .map(|(name, cpu)| fixtures::running_vm(name, 2, 256 << 10, *cpu))
            .collect();
        r
    }

    const T0: u64 = 1_700_000_000_000 - 1_700_000_000_000 % MINUTE_MS;

    #[test]
    fn a_report_gives_host_vm_and_bridge_series_but_not_loopback() {
        let samples = samples_of(&report("a1", 0.3, &[("g1", 0.9)]));
        let names: Vec<String> = samples.iter().map(|(n, _)| n.clone()).collect();
        assert!(names.contains(&"host/a1/cpu".to_owned()));
        assert!(names.contains(&"host/a1/cpu_capacity".to_owned()));
        assert!(names.contains(&"host/a1/net/vio7/tx_mbit_s".to_owned()));
        let link = samples
            .iter()
            .find(|(n, _)| n == "host/a1/link/b:b1/tx_mbit_s")
            .expect("the link to b1 is sampled");
        assert!((link.1 - 3.0).abs() < 1e-9);
        assert!(names.contains(&"vm/g1/cpu".to_owned()));
        assert!(!names.iter().any(|n| n.contains("/lo/")));
    }

    #[test]
    fn minutes_close_with_their_mean_and_the_hour_keeps_every_sample() {
        let mut h = History::default();
        let mut minutes = Vec::new();
        for i in 0..180u64 {
            let w = h.record(T0 + i * 1000, &report("a1", (i % 60) as f64, &[]));
            minutes.extend(w.minutes.into_iter().filter(|m| m.0 == "host/a1/cpu"));
        }
        // Minutes 0 and 1 closed (each the mean of 0..59); minute 2 is still open.
        assert_eq!(
            minutes,
            vec![
                ("host/a1/cpu".to_owned(), T0, 29.5),
                ("host/a1/cpu".to_owned(), T0 + MINUTE_MS, 29.5)
            ]
        );
        let now = T0 + 179_000;
        let hour = h.query("host/a1/cpu", Range::Hour, now, |_| true);
        assert_eq!(hour.len(), 2, "cpu and cpu_capacity");
        assert_eq!(hour[0].points.len(), 180);
        let day = h.query("host/a1/cpu", Range::Day, now, |_| true);
        assert_eq!(
            day[0].points.len(),
            3,
            "two closed minutes and the open one"
        );
    }

    #[test]
    fn old_samples_are_forgotten_and_the_prune_is_persisted_once_a_minute() {
        let mut h = History::default();
        h.record(T0, &report("a1", 1.0, &[]));
        let later = T0 + FINE_SPAN_MS + 2 * MINUTE_MS;
        let w = h.record(later, &report("a1", 2.0, &[]));
        assert_eq!(
            w.prune,
            Some(Prune {
                fine_before: later - FINE_SPAN_MS,
                minutes_before: later.saturating_sub(DAY_SPAN_MS),
            })
        );
        let hour = h.query("host/a1/cpu", Range::Hour, later, |_| true);
        assert_eq!(hour[0].points, vec![(later, 2.0)]);
        // The first minute's mean stays for the day.
        let day = h.query("host/a1/cpu", Range::Day, later, |_| true);
        assert_eq!(day[0].points[0], (T0, 1.0));
        assert!(
            h.record(later + 1000, &report("a1", 2.0, &[]))
                .prune
                .is_none()
        );
    }

    #[test]
    fn a_restored_history_answers_as_the_one_that_recorded() {
        let mut h = History::default();
        let mut fine = Vec::new();
        let mut minutes = Vec::new();
        let mut placements = Vec::new();
        for i in 0..150u64 {
            let host = if i < 100 { "a1" } else { "b1" };
            let w = h.record(T0 + i * 1000, &report(host, i as f64, &[("g1", 0.5)]));
            fine.extend(w.fine);
            minutes.extend(w.minutes);
            for (vm, list) in w.placements {
                placements.retain(|p: &Placement| p.vm != vm);
                placements.extend(list.unwrap_or_default());
            }
        }
        let back = History::restore(fine, minutes, placements);
        let now = T0 + 149_000;
        for range in [Range::Hour, Range::Day] {
            assert_eq!(
                back.query("", range, now, |_| true),
                h.query("", range, now, |_| true),
                "{range:?}"
            );
        }
        let moves = back.placements(Range::Hour, now, |_| true);
        assert_eq!(
            moves
                .iter()
                .map(|p| (p.host.as_str(), p.since_ms))
                .collect::<Vec<_>>(),
            vec![("a1", T0), ("b1", T0 + 100_000)]
        );
    }

    #[test]
    fn series_are_bounded_and_filtered_by_what_the_viewer_may_see() {
        let mut h = History::default();
        for i in 0..MAX_SERIES {
            h.series.insert(format!("x/{i}"), SeriesState::default());
        }
        h.record(T0, &report("a1", 1.0, &[]));
        assert!(h.dropped_series > 0);
        assert!(h.query("host/", Range::Hour, T0, |_| true).is_empty());

        let mut h = History::default();
        h.record(T0, &report("a1", 1.0, &[("mine", 1.0), ("theirs", 1.0)]));
        let seen = h.query("vm/", Range::Hour, T0, |n| n.starts_with("vm/mine/"));
        assert!(seen.iter().all(|s| s.name.starts_with("vm/mine/")));
        assert_eq!(seen.len(), 2);
        let placed = h.placements(Range::Hour, T0, |vm| vm == "mine");
        assert_eq!(placed.len(), 1);
    }

    #[test]
    fn a_migration_s_paused_copy_neither_moves_the_vm_nor_adds_samples() {
        let mut h = History::default();
        h.record(T0, &report("a1", 1.0, &[("g1", 0.8)]));
        // Mid-migration: b1 holds g1 paused (incoming), a1 still runs it.
        let mut incoming = report("b1", 1.0, &[("g1", 0.0)]);
        incoming.vms[0].state = DomainState::Paused;
        let w = h.record(T0 + 1000, &incoming);
        assert!(w.placements.is_empty());
        assert!(!w.fine.iter().any(|(n, _, _)| n.starts_with("vm/g1/")));
        h.record(T0 + 2000, &report("b1", 1.0, &[("g1", 0.7)]));
        let placed = h.placements(Range::Hour, T0 + 2000, |_| true);
        assert_eq!(
            placed.iter().map(|p| p.host.as_str()).collect::<Vec<_>>(),
            ["a1", "b1"]
        );
        let cpu = h.query("vm/g1/cpu", Range::Hour, T0 + 2000, |_| true);
        assert_eq!(cpu[0].points, vec![(T0, 0.8), (T0 + 2000, 0.7)]);
    }

    #[test]
    fn non_finite_samples_are_skipped() {
        let mut h = History::default();
        let w = h.record(T0, &report("a1", f64::NAN, &[]));
        assert!(!w.fine.iter().any(|(n, _, _)| n == "host/a1/cpu"));
    }
}
