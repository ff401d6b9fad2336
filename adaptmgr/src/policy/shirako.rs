//! Shirako: provisioning at the broker (*room-for-growth*: worst fit over its logical inventory,
//! and a *migrating* variant that moves a VM to another logical host when a resize does not fit)
//! and placement at the site (*energy-aware*: best fit so idle hosts can be powered down, and
//! *follow-broker*: place where the broker provisioned). [`run_experiment`] replays guests whose
//! slivers grow and counts the migrations the site performs (a lease the broker moves reaches an
//! energy-aware site as a new sliver, which it places by its own best fit); [`Fit`] holds the two
//! fits, as simulator policies too.

use super::{Action, Decision, ObservedState, Placement, Policy};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    RoomForGrowth,
    Migrating,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SitePlacement {
    EnergyAware,
    FollowBroker,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExperimentResult {
    pub site_migrations: u64,
    pub broker_migrations: u64,
    pub denied_resizes: u64,
    pub granted_resizes: u64,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Two guests on `hosts` unit-capacity hosts request VMs of a fifth of a host (until 60 % of the
/// inventory is provisioned) and then grow them by random steps towards half a host over
/// `periods` lease periods, more than the hosts can hold in the end.
pub fn run_experiment(
    prov: Provisioning,
    place: SitePlacement,
    hosts: usize,
    periods: usize,
    seed: u64,
) -> ExperimentResult {
    let mut rng = Rng(seed | 1);
    let mut res = ExperimentResult::default();
    let mut size: Vec<f64> = Vec::new();
    let mut logical: Vec<usize> = Vec::new();
    let mut physical: Vec<usize> = Vec::new();
    let mut l_load = vec![0.0; hosts];
    let mut p_load = vec![0.0; hosts];
    for period in 0..periods {
        // Arrivals: each guest asks for a new VM while the broker's inventory has room.
        // Both guests ask for their VMs at the start, until 60 % of the inventory is provisioned.
        let arrivals = if period == 0 { 3 * hosts } else { 0 };
        for _request in 0..arrivals {
            let s = 0.2;
            if l_load.iter().sum::<f64>() + s > 0.6 * hosts as f64 {
                break;
            }
            if let Some(l) = Fit::Worst.with_room(&l_load, s, None) {
                let p = match place {
                    SitePlacement::FollowBroker => l,
                    SitePlacement::EnergyAware => match Fit::Best.with_room(&p_load, s, None) {
                        Some(p) => p,
                        None => continue,
                    },
                };
                l_load[l] += s;
                p_load[p] += s;
                size.push(s);
                logical.push(l);
                physical.push(p);
            }
        }
        // Growth: every VM may ask to grow by a step, up to half a host.
        for v in 0..size.len() {
            if rng.next() >= 0.3 || size[v] >= 0.5 - 1e-9 {
                continue;
            }
            let new = (size[v] + 0.05 * (1.0 + (rng.next() * 3.0).floor())).min(0.5);
            let delta = new - size[v];
            let l = logical[v];
            if l_load[l] + delta > 1.0 + 1e-9 {
                match prov {
                    Provisioning::RoomForGrowth => {
                        res.denied_resizes += 1;
                        continue;
                    }
                    Provisioning::Migrating => match Fit::Worst.with_room(&l_load, new, Some(l)) {
                        Some(nl) => {
                            l_load[l] -= size[v];
                            l_load[nl] += size[v];
                            logical[v] = nl;
                            res.broker_migrations += 1;
                            match place {
                                SitePlacement::FollowBroker => {
                                    p_load[physical[v]] -= size[v];
                                    p_load[nl] += size[v];
                                    physical[v] = nl;
                                    res.site_migrations += 1;
                                }
                                SitePlacement::EnergyAware => {
                                    // The moved lease reaches the site as a new sliver at its
                                    // new size, which the site places by its own best fit.
                                    let p = physical[v];
                                    p_load[p] -= size[v];
                                    if let Some(np) = Fit::Best.with_room(&p_load, new, None) {
                                        if np != p {
                                            res.site_migrations += 1;
                                        }
                                        physical[v] = np;
                                    }
                                    p_load[physical[v]] += size[v];
                                }
                            }
                        }
                        None => {
                            res.denied_resizes += 1;
                            continue;
                        }
                    },
                }
            }
            let l = logical[v];
            l_load[l] += delta;
            res.granted_resizes += 1;
            let p = physical[v];
            if p_load[p] + delta > 1.0 + 1e-9 {
                // The site must make room: move the growing VM to the best-fit host that can take
                // it, else move its neighbours away (smallest first).
                if let Some(np) = Fit::Best.with_room(&p_load, new, Some(p)) {
                    p_load[p] -= size[v];
                    p_load[np] += size[v];
                    physical[v] = np;
                    res.site_migrations += 1;
                } else {
                    let mut others: Vec<usize> = (0..size.len())
                        .filter(|&o| o != v && physical[o] == p)
                        .collect();
                    others.sort_by(|&a, &b| size[a].total_cmp(&size[b]));
                    for o in others {
                        if p_load[p] + delta <= 1.0 + 1e-9 {
                            break;
                        }
                        if let Some(np) = Fit::Best.with_room(&p_load, size[o], Some(p)) {
                            p_load[p] -= size[o];
                            p_load[np] += size[o];
                            physical[o] = np;
                            res.site_migrations += 1;
                        }
                    }
                }
            }
            p_load[physical[v]] += delta;
            size[v] = new;
        }
    }
    res
}

fn relieve(
    st: &ObservedState,
    choose: impl Fn(&[f64], &ObservedState, usize, usize) -> Option<usize>,
    label: &str,
) -> Decision {
    let mut load: Vec<f64> = st
        .hosts
        .iter()
        .map(|h| h.vms.iter().map(|&v| st.vms[v].requested_mips).sum::<f64>() / h.total_mips())
        .collect();
    let mut actions = Vec::new();
    for (h, host) in st.hosts.iter().enumerate() {
        if load[h] <= 1.0 {
            continue;
        }
        let mut vms = st.movable(&host.vms);
        vms.sort_by(|&a, &b| st.vms[a].ram_mb.total_cmp(&st.vms[b].ram_mb));
        for v in vms {
            if load[h] <= 1.0 {
                break;
            }
            if let Some(d) = choose(&load, st, v, h) {
                let share = st.vms[v].requested_mips;
                load[h] -= share / host.total_mips();
                load[d] += share / st.hosts[d].total_mips();
                actions.push(Action::migrate(
                    v,
                    h,
                    d,
                    format!("host {} saturated: {label}", host.name),
                ));
            }
        }
    }
    Decision { actions }
}

fn fits(load: &[f64], st: &ObservedState, v: usize, d: usize, h: usize) -> bool {
    d != h
        && st.hosts[d].pe_mips >= st.vms[v].requested_per_pe()
        && load[d] + st.vms[v].requested_mips / st.hosts[d].total_mips() <= 1.0
}

/// The site's placement policies for the simulator and the live manager: best fit is the
/// site's *energy-aware* placement, worst fit the broker's *room-for-growth*.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// The fullest host: packs VMs so that other hosts can idle.
    Best,
    /// The emptiest host: leaves every host room to grow.
    Worst,
}

impl Fit {
    /// Of `hosts`, the one this fit takes by `load`; the lowest index among equal loads.
    fn pick(
        self,
        hosts: impl Iterator<Item = usize>,
        load: impl Fn(usize) -> f64,
    ) -> Option<usize> {
        hosts.min_by(|&a, &b| {
            let by_load = load(a).total_cmp(&load(b));
            match self {
                Self::Best => by_load.reverse(),
                Self::Worst => by_load,
            }
            .then(a.cmp(&b))
        })
    }

    /// The host this fit takes among the unit-capacity hosts (but `skip`) with room for `size`.
    fn with_room(self, load: &[f64], size: f64, skip: Option<usize>) -> Option<usize> {
        self.pick(
            (0..load.len()).filter(|&h| Some(h) != skip && load[h] + size <= 1.0 + 1e-9),
            |h| load[h],
        )
    }
}

impl Fit {
    /// Where this fit moves VM `v` off saturated host `h`, given the hosts' `load`: best fit
    /// prefers a host already in use and powers one up only when none fits.
    fn destination(self, load: &[f64], st: &ObservedState, v: usize, h: usize) -> Option<usize> {
        let fitting = (0..st.hosts.len()).filter(move |&d| fits(load, st, v, d, h));
        match self {
            Self::Best => self
                .pick(
                    fitting.clone().filter(|&d| !st.hosts[d].vms.is_empty()),
                    |d| load[d],
                )
                .or_else(|| fitting.clone().next()),
            Self::Worst => self.pick(fitting, |d| load[d]),
        }
    }
}

impl Policy for Fit {
    fn name(&self) -> String {
        match self {
            Self::Best => "shirako-energy-aware",
            Self::Worst => "shirako-room-for-growth",
        }
        .into()
    }
    fn place(&mut self, st: &ObservedState, placed: &Placement, vm: usize) -> Option<usize> {
        self.pick(
            (0..st.hosts.len()).filter(|&h| placed.fits(st, h, vm)),
            |h| placed.mips[h] / st.hosts[h].total_mips(),
        )
    }
    fn decide(&mut self, st: &ObservedState) -> Decision {
        let fit = *self;
        let label = match fit {
            Self::Best => "best fit",
            Self::Worst => "worst fit",
        };
        relieve(st, |load, st, v, h| fit.destination(load, st, v, h), label)
    }
}
