//! Vertical scaling of capped VMs, in front of any placement policy.
//!
//! A VM with a CPU cap (`VmObs::cpu_cap_mips`) cannot show more demand than its cap: a VM that
//! needs more just sits at it. So "at the cap" is the signal:
//!
//! - **Raise.** A VM whose CPU use was at least `at_cap` of its cap over the last control
//!   period *and* at the last sample gets its cap multiplied by `raise_factor` (at most its
//!   vCPUs' worth), when its host's demand (the sum of its VMs' current demand) stays within
//!   `host_target` of the host's capacity with the raise. Otherwise nothing is raised and the
//!   placement policy sees an overloaded host as usual.
//! - **Lower back.** A VM this layer raised, once `cooldown_s` has passed since its last raise
//!   and its use stayed below `quiet` of its cap for the last `quiet_periods` periods, gets the
//!   cap back down: to 1.25 times its highest recent use, never below the cap it had before
//!   the first raise.
//!
//! - **Settled caps only.** The history of a VM whose cap someone else changed during the last
//!   period (a user's `viola vm resize`) was measured partly under the old cap, so the layer
//!   waits one period before it judges that VM, and forgets a raise of its own the user
//!   overrode (it never lowers a cap a user set). Its own changes take effect at the start of
//!   a period, so they need no wait. Without this rule the lab caught the layer undoing a
//!   user's new 30 % cap five seconds later, from use measured before it.
//!
//! The placement policy runs after, on the same state; actions it proposes for a VM resized
//! this period are dropped (one change per VM per period). Uncapped VMs (the simulator's
//! traces) pass through untouched, so the wrapped policy decides exactly as alone.
//!
//! What this layer remembers (the caps it started from and when it last raised) lives in
//! memory: a restarted manager lowers nothing it raised before the restart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Action, ActionKind, Decision, ObservedState, Placement, Policy};

/// The parameters; the manager reads them from its `[policy.vertical]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerticalParams {
    /// Off: the placement policy alone.
    pub enabled: bool,
    /// Use at or above this fraction of the cap counts as "at the cap".
    pub at_cap: f64,
    /// A raise multiplies the cap by this.
    pub raise_factor: f64,
    /// The host's demand after a raise stays within this fraction of its capacity.
    pub host_target: f64,
    /// Use below this fraction of the cap counts as quiet.
    pub quiet: f64,
    /// Quiet periods in a row before a raised cap is lowered.
    pub quiet_periods: usize,
    /// No lowering sooner than this after a raise, seconds.
    pub cooldown_s: f64,
}

impl Default for VerticalParams {
    fn default() -> Self {
        Self {
            enabled: true,
            at_cap: 0.9,
            raise_factor: 2.0,
            host_target: 0.9,
            quiet: 0.5,
            quiet_periods: 3,
            cooldown_s: 300.0,
        }
    }
}

/// What the layer remembers of a VM it raised.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Raised {
    /// The cap before the first raise, MIPS.
    original_mips: f64,
    /// When it last raised it (the state's time).
    at_s: f64,
}

/// The cap a VM had at the last decision, and the one this layer set then, if any.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CapSeen {
    seen_mips: f64,
    set_mips: Option<f64>,
}

impl CapSeen {
    /// The cap `now` is one the layer knew at the last decision: the period since was
    /// measured under it. Caps read back from libvirt's quota are rounded, hence the margin.
    fn settled(self, now: f64) -> bool {
        let close = |a: f64| (a - now).abs() <= 0.01 * now.max(a);
        close(self.seen_mips) || self.set_mips.is_some_and(close)
    }
}

/// Vertical scaling in front of `inner`.
pub struct Vertical {
    pub params: VerticalParams,
    inner: Box<dyn Policy>,
    raised: BTreeMap<String, Raised>,
    caps: BTreeMap<String, CapSeen>,
}

impl Vertical {
    pub fn new(params: VerticalParams, inner: Box<dyn Policy>) -> Self {
        Self {
            params,
            inner,
            raised: BTreeMap::new(),
            caps: BTreeMap::new(),
        }
    }

    /// Cap changes for this period.
    fn resizes(&mut self, st: &ObservedState) -> Vec<Action> {
        let p = &self.params;
        // Each host's demand now: what its VMs use at the moment.
        let mut host_demand = vec![0.0; st.hosts.len()];
        for v in &st.vms {
            if let Some(h) = v.host {
                host_demand[h] += v.requested_mips;
            }
        }
        let mut actions = Vec::new();
        let mut caps = BTreeMap::new();
        for (i, v) in st.vms.iter().enumerate() {
            let (Some(h), Some(cap)) = (v.host, v.cpu_cap_mips) else {
                continue;
            };
            let settled = self.caps.get(&v.name).is_some_and(|c| c.settled(cap));
            caps.insert(
                v.name.clone(),
                CapSeen {
                    seen_mips: cap,
                    set_mips: None,
                },
            );
            if !settled {
                // Someone else set this cap: theirs from now on.
                self.raised.remove(&v.name);
                continue;
            }
            // A VM with a service level (a job deadline) has its cap set by that controller.
            if v.in_migration || v.suspended || cap <= 0.0 || v.service.is_some() {
                continue;
            }
            let total = v.total_mips();
            let cap_fraction = cap / total;
            let last_period = v.history.first().copied();
            let at_cap = v.requested_mips >= p.at_cap * cap
                && last_period.is_some_and(|u| u >= p.at_cap * cap_fraction);
            if at_cap && cap < total {
                let new = (cap * p.raise_factor).min(total);
                let host = &st.hosts[h];
                if host_demand[h] + (new - cap) > p.host_target * host.total_mips() {
                    continue;
                }
                host_demand[h] += new - cap;
                let original_mips = self.raised.get(&v.name).map_or(cap, |r| r.original_mips);
                self.raised.insert(
                    v.name.clone(),
                    Raised {
                        original_mips,
                        at_s: st.time_s,
                    },
                );
                caps.entry(v.name.clone())
                    .and_modify(|c| c.set_mips = Some(new));
                actions.push(set_cap(
                    i,
                    new,
                    format!(
                        "CPU use at its cap ({:.0} of {cap:.0} MIPS now, {:.0} % of the cap over \
                         the last period): cap raised to {new:.0} MIPS",
                        v.requested_mips,
                        last_period.unwrap_or(0.0) / cap_fraction * 100.0
                    ),
                ));
                continue;
            }
            let Some(r) = self.raised.get(&v.name).copied() else {
                continue;
            };
            let recent = &v.history[..v.history.len().min(p.quiet_periods)];
            let quiet = recent.len() == p.quiet_periods
                && recent.iter().all(|u| *u < p.quiet * cap_fraction)
                && v.requested_mips < p.quiet * cap;
            if !quiet || st.time_s - r.at_s < p.cooldown_s {
                continue;
            }
            let highest = recent
                .iter()
                .map(|u| u * total)
                .fold(v.requested_mips, f64::max);
            let new = (highest * 1.25).max(r.original_mips);
            if new >= cap {
                continue;
            }
            if new <= r.original_mips {
                self.raised.remove(&v.name);
            }
            caps.entry(v.name.clone())
                .and_modify(|c| c.set_mips = Some(new));
            actions.push(set_cap(
                i,
                new,
                format!(
                    "CPU use below {:.0} % of its raised cap for {} periods (at most {highest:.0} \
                     of {cap:.0} MIPS): cap lowered to {new:.0} MIPS",
                    p.quiet * 100.0,
                    p.quiet_periods
                ),
            ));
        }
        // VMs that left the state (deleted) are forgotten.
        self.raised
            .retain(|name, _| st.vms.iter().any(|v| &v.name == name));
        self.caps = caps;
        actions
    }
}

impl Policy for Vertical {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn place(&mut self, state: &ObservedState, placed: &Placement, vm: usize) -> Option<usize> {
        self.inner.place(state, placed, vm)
    }

    fn decide(&mut self, state: &ObservedState) -> Decision {
        let resizes = if self.params.enabled {
            self.resizes(state)
        } else {
            Vec::new()
        };
        let resized: Vec<usize> = resizes
            .iter()
            .filter_map(|a| match a.kind {
                ActionKind::Resize { vm, .. } => Some(vm),
                _ => None,
            })
            .collect();
        let mut actions = resizes;
        actions.extend(
            self.inner
                .decide(state)
                .actions
                .into_iter()
                .filter(|a| !action_vm(&a.kind).is_some_and(|vm| resized.contains(&vm))),
        );
        Decision { actions }
    }
}

fn set_cap(vm: usize, cpu_mips: f64, reason: String) -> Action {
    Action {
        kind: ActionKind::Resize {
            vm,
            cpu_mips: Some(cpu_mips),
            ram_mb: None,
        },
        reason,
    }
}

fn action_vm(kind: &ActionKind) -> Option<usize> {
    match *kind {
        ActionKind::Migrate { vm, .. }
        | ActionKind::Resize { vm, .. }
        | ActionKind::Suspend { vm }
        | ActionKind::Resume { vm, .. } => Some(vm),
        ActionKind::PowerOn { .. } | ActionKind::PowerOff { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{HostObs, PowerModel, SiteObs, VmObs};

    /// One 4-CPU host (1000 MIPS each) with one 2-vCPU VM capped at `cap` MIPS, using `use_now`
    /// MIPS now and `history` (fractions of its 2000 MIPS, newest first).
    fn state(time_s: f64, cap: Option<f64>, use_now: f64, history: &[f64]) -> ObservedState {
        ObservedState {
            time_s,
            interval_s: 5.0,
            sites: vec![SiteObs {
                name: "a".into(),
                wan_mbps: 100.0,
            }],
            violins: vec![],
            hosts: vec![HostObs {
                name: "a1".into(),
                site: 0,
                pes: 4,
                pe_mips: 1000.0,
                ram_mb: 4096.0,
                bw_mbps: 1000.0,
                ram_used_mb: 512.0,
                bw_used_mbps: 0.0,
                power: PowerModel::hp_ml110_g5(),
                vms: vec![0],
                utilization: use_now / 4000.0,
                powered_on: true,
            }],
            vms: vec![VmObs {
                name: "g1".into(),
                violin: None,
                host: Some(0),
                pes: 2,
                mips: 1000.0,
                ram_mb: 512.0,
                ram_reserved_mb: 512.0,
                bw_reserved_mbps: 0.0,
                requested_mips: use_now,
                allocated_mips: use_now,
                cpu_cap_mips: cap,
                history: history.to_vec(),
                in_migration: false,
                suspended: false,
                service: None,
            }],
        }
    }

    fn vertical() -> Vertical {
        Vertical::new(
            VerticalParams {
                cooldown_s: 20.0,
                ..VerticalParams::default()
            },
            crate::policy::by_name("viola").unwrap(),
        )
    }

    fn cap_set(d: &Decision) -> Option<f64> {
        d.actions.iter().find_map(|a| match a.kind {
            ActionKind::Resize { cpu_mips, .. } => cpu_mips,
            _ => None,
        })
    }

    /// The cap `p` sets, deciding on [`state`] of these figures.
    fn cap_after(
        p: &mut Vertical,
        time_s: f64,
        cap: Option<f64>,
        use_now: f64,
        history: &[f64],
    ) -> Option<f64> {
        cap_set(&p.decide(&state(time_s, cap, use_now, history)))
    }

    #[test]
    fn a_vm_at_its_cap_is_raised_then_lowered_back_once_quiet_after_the_cool_down() {
        let mut p = vertical();
        // Capped at 500 MIPS (a quarter of its 2000): half a period at the cap is not enough.
        assert_eq!(cap_after(&mut p, 0.0, Some(500.0), 500.0, &[0.12]), None);
        // A whole period at the cap: raised to 1000.
        let d = p.decide(&state(5.0, Some(500.0), 495.0, &[0.25, 0.12]));
        assert_eq!(cap_set(&d), Some(1000.0), "{d:?}");
        assert!(d.actions[0].reason.contains("at its cap"), "{d:?}");
        // Still at the new cap: raised again, at most to its vCPUs' worth.
        assert_eq!(
            cap_after(&mut p, 10.0, Some(1000.0), 1000.0, &[0.5, 0.25]),
            Some(2000.0)
        );
        assert_eq!(
            cap_after(&mut p, 15.0, Some(2000.0), 2000.0, &[1.0, 0.5]),
            None
        );
        // The burn stops: quiet, but within the cool-down after the last raise.
        let quiet = [0.01, 0.01, 0.01];
        assert_eq!(cap_after(&mut p, 20.0, Some(2000.0), 10.0, &quiet), None);
        // After it: back to the cap it had before the first raise.
        let d = p.decide(&state(31.0, Some(2000.0), 10.0, &quiet));
        assert_eq!(cap_set(&d), Some(500.0), "{d:?}");
        assert!(d.actions[0].reason.contains("lowered"), "{d:?}");
        // And left alone from then on.
        assert_eq!(cap_after(&mut p, 60.0, Some(500.0), 10.0, &quiet), None);
    }

    #[test]
    fn a_cap_a_user_just_set_is_judged_only_after_a_period_under_it_and_never_undone() {
        let mut p = vertical();
        // Uncapped at 2000 MIPS, busy; the user then caps it at 500 mid-period. The last
        // period's use (measured before the cap) and the current sample exceed the new cap.
        assert_eq!(cap_after(&mut p, 0.0, Some(2000.0), 1900.0, &[0.95]), None);
        assert_eq!(
            cap_after(&mut p, 5.0, Some(500.0), 740.0, &[0.6, 0.95]),
            None,
            "raised from use measured under the old cap"
        );
        // A whole period at the new cap: now it is raised.
        let d = p.decide(&state(10.0, Some(500.0), 500.0, &[0.25, 0.6]));
        assert_eq!(cap_set(&d), Some(1000.0), "{d:?}");
        // Its own raise needs no wait: still at the cap, raised again.
        assert_eq!(
            cap_after(&mut p, 15.0, Some(1000.0), 1000.0, &[0.5, 0.25]),
            Some(2000.0)
        );
        // The user sets 1500 by hand; quiet long after the cool-down, the layer leaves it.
        let quiet = [0.01, 0.01, 0.01];
        for t in [20.0, 60.0, 100.0] {
            assert_eq!(
                cap_after(&mut p, t, Some(1500.0), 10.0, &quiet),
                None,
                "at {t} s"
            );
        }
    }

    #[test]
    fn no_raise_without_room_on_the_host_and_uncapped_vms_pass_through() {
        let mut p = vertical();
        let mut st = state(5.0, Some(500.0), 500.0, &[0.25]);
        // Another VM's demand fills the host: 3400 + 500 MIPS of 4000, no room for 500 more.
        st.vms.push(VmObs {
            name: "busy".into(),
            requested_mips: 3400.0,
            cpu_cap_mips: None,
            ..st.vms[0].clone()
        });
        st.hosts[0].vms.push(1);
        // Seen once, so the second decision judges a settled cap.
        p.decide(&st);
        assert_eq!(cap_set(&p.decide(&st)), None);
        // The same without the other VM's demand is raised: the room was the reason.
        let mut roomy = st.clone();
        roomy.vms[1].requested_mips = 0.0;
        assert_eq!(cap_set(&p.decide(&roomy)), Some(1000.0));
        // Uncapped: the placement policy's decision, unchanged.
        let st = state(5.0, None, 2000.0, &[1.0, 1.0]);
        let mut alone = crate::policy::by_name("viola").unwrap();
        assert_eq!(p.decide(&st), alone.decide(&st));
    }
}
