//! The field's baselines (Beloglazov & Buyya, CCPE 2012, as implemented in CloudSim 3.0.3's power
//! package): overload detection THR / IQR / MAD / LR / LRR, VM selection MMT / MC / RS, placement
//! PABFD (power-aware best fit decreasing) and underload consolidation; DVFS (no migration).
//!
//! The semantics follow CloudSim 3.0.3 closely because the reference figures come from it: the
//! utilisation a detector sees is the VMs' *requested* MIPS over host capacity; the adaptive
//! detectors look at the host history made of its current VMs' histories and fall back to a static
//! 0.7 threshold while it is short (12 samples for IQR/MAD, 10 for LR); LR and LRR are both
//! ordinary least squares over the last 10 samples (3.0.3 ignores the loess weights), predicting one
//! interval ahead; PABFD skips hosts that would be overloaded after the allocation and picks the
//! smallest power increase against the host's last measured power; underload handling evacuates
//! hosts in increasing order of measured utilisation as long as all of a host's VMs find a place.

use super::{Action, Decision, HISTORY_LENGTH, ObservedState, Placement, Policy};

/// Overload detection algorithm and its parameter (threshold or safety parameter).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Detector {
    Thr(f64),
    Iqr(f64),
    Mad(f64),
    Lr(f64),
    Lrr(f64),
}

/// Which VM leaves an overloaded host first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Minimum migration time (smallest RAM).
    Mmt,
    /// Maximum correlation of its history with the other VMs' (MMT when not computable).
    Mc,
    /// Random (seeded, deterministic).
    Rs,
}

/// Static threshold used while the history is too short for the adaptive detectors.
pub const FALLBACK_THRESHOLD: f64 = 0.7;

/// A working copy of the placement a decision edits (CloudSim's save/restore allocation).
#[derive(Debug, Clone)]
pub struct Scratch<'a> {
    pub st: &'a ObservedState,
    pub host_vms: Vec<Vec<usize>>,
    pub vm_host: Vec<Option<usize>>,
    ram_free: Vec<f64>,
    bw_free: Vec<f64>,
    /// Per host: Σ over its VMs of history[i] × MIPS (kept up to date by add/remove).
    hist_sum: Vec<[f64; HISTORY_LENGTH]>,
    /// Per host: Σ of its VMs' requests capped at a core, and uncapped.
    capped_sum: Vec<f64>,
    req_sum: Vec<f64>,
}

impl<'a> Scratch<'a> {
    pub fn new(st: &'a ObservedState) -> Self {
        let mut hist_sum = vec![[0.0; HISTORY_LENGTH]; st.hosts.len()];
        for (h, host) in st.hosts.iter().enumerate() {
            for &vm in &host.vms {
                Self::accumulate(&mut hist_sum[h], &st.vms[vm], 1.0);
            }
        }
        let capped_sum = st
            .hosts
            .iter()
            .map(|h| {
                h.vms
                    .iter()
                    .map(|&v| {
                        st.vms[v].requested_per_pe().min(h.pe_mips)
                            * f64::from(st.vms[v].pes.max(1))
                    })
                    .sum()
            })
            .collect();
        let req_sum = st
            .hosts
            .iter()
            .map(|h| h.vms.iter().map(|&v| st.vms[v].requested_mips).sum())
            .collect();
        Self {
            hist_sum,
            capped_sum,
            req_sum,
            st,
            host_vms: st.hosts.iter().map(|h| h.vms.clone()).collect(),
            vm_host: st.vms.iter().map(|v| v.host).collect(),
            ram_free: st.hosts.iter().map(|h| h.ram_mb - h.ram_used_mb).collect(),
            bw_free: st
                .hosts
                .iter()
                .map(|h| h.bw_mbps - h.bw_used_mbps)
                .collect(),
        }
    }

    fn accumulate(sum: &mut [f64; HISTORY_LENGTH], v: &super::VmObs, sign: f64) {
        for (i, u) in v.history.iter().take(HISTORY_LENGTH).enumerate() {
            sum[i] += sign * u * v.mips;
        }
    }

    /// Recomputes a host's cached sums in VM order (exactly as a from-scratch sum would be, so
    /// adding and removing a VM leaves no rounding residue behind).
    fn recompute(&mut self, h: usize) {
        let mut hist = [0.0; HISTORY_LENGTH];
        let (mut capped, mut req) = (0.0, 0.0);
        for &vm in &self.host_vms[h] {
            let v = &self.st.vms[vm];
            Self::accumulate(&mut hist, v, 1.0);
            capped += self.capped(h, vm);
            req += v.requested_mips;
        }
        self.hist_sum[h] = hist;
        self.capped_sum[h] = capped;
        self.req_sum[h] = req;
    }

    fn capped(&self, h: usize, vm: usize) -> f64 {
        let v = &self.st.vms[vm];
        v.requested_per_pe().min(self.st.hosts[h].pe_mips) * f64::from(v.pes.max(1))
    }

    /// MIPS the VMs on `h` would be allocated (time-shared scheduler with over-subscription).
    pub fn allocated_mips(&self, h: usize) -> f64 {
        let cap = self.st.hosts[h].total_mips();
        let total = self.capped_sum[h];
        if total <= cap {
            total
        } else {
            let scale = cap / total;
            self.host_vms[h]
                .iter()
                .map(|&v| (self.capped(h, v) * scale).floor())
                .sum()
        }
    }

    fn available_mips(&self, h: usize) -> f64 {
        let cap = self.st.hosts[h].total_mips();
        let total = self.capped_sum[h];
        if total <= cap { cap - total } else { 0.0 }
    }

    /// Sum of the VMs' requested MIPS (uncapped) on `h`.
    pub fn requested_mips(&self, h: usize) -> f64 {
        self.req_sum[h]
    }

    /// Requested utilisation of `h` (may exceed 1).
    pub fn requested_utilization(&self, h: usize) -> f64 {
        self.requested_mips(h) / self.st.hosts[h].total_mips()
    }

    /// CloudSim's `Host.isSuitableForVm` with current demands.
    pub fn suitable(&self, h: usize, vm: usize) -> bool {
        let (host, v) = (&self.st.hosts[h], &self.st.vms[vm]);
        host.powered_on_or_wakeable()
            && host.pe_mips >= v.requested_per_pe()
            && self.available_mips(h) >= v.requested_mips
            && self.ram_free[h] >= v.ram_reserved_mb
            && self.bw_free[h] >= v.bw_reserved_mbps
    }

    pub fn add(&mut self, h: usize, vm: usize) {
        self.host_vms[h].push(vm);
        self.vm_host[vm] = Some(h);
        self.recompute(h);
        self.ram_free[h] -= self.st.vms[vm].ram_reserved_mb;
        self.bw_free[h] -= self.st.vms[vm].bw_reserved_mbps;
    }

    pub fn remove(&mut self, h: usize, vm: usize) {
        if let Some(pos) = self.host_vms[h].iter().rposition(|&x| x == vm) {
            self.host_vms[h].remove(pos);
            self.recompute(h);
            self.ram_free[h] += self.st.vms[vm].ram_reserved_mb;
            self.bw_free[h] += self.st.vms[vm].bw_reserved_mbps;
        }
        if self.vm_host[vm] == Some(h) {
            self.vm_host[vm] = None;
        }
    }

    /// Host utilisation history (newest first) built from its current VMs' histories, with the
    /// all-zero tail trimmed (CloudSim's `PowerHostUtilizationHistory.getUtilizationHistory`).
    pub fn host_history(&self, h: usize) -> Vec<f64> {
        let host_mips = self.st.hosts[h].total_mips();
        // Live VMs' samples are positive in the CloudSim model (a VM at 0 leaves), so the trimmed
        // length is the longest history on the host; the sums are cached per host.
        let mut len = 0;
        for &vm in &self.host_vms[h] {
            let v = &self.st.vms[vm];
            if let Some(last) = v
                .history
                .iter()
                .take(HISTORY_LENGTH)
                .rposition(|&u| u != 0.0)
            {
                len = len.max(last + 1);
            }
        }
        self.hist_sum[h][..len]
            .iter()
            .map(|s| s / host_mips)
            .collect()
    }
}

impl super::HostObs {
    /// Hosts are switched on on demand in every model we run; kept as a hook for maintenance.
    pub fn powered_on_or_wakeable(&self) -> bool {
        true
    }
}

/// Median as commons-math `Percentile(50)` computes it.
pub fn median(data: &[f64]) -> f64 {
    let mut s = data.to_vec();
    s.sort_by(f64::total_cmp);
    percentile_sorted(&s, 50.0)
}

fn percentile_sorted(s: &[f64], p: f64) -> f64 {
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n == 1 {
        return s[0];
    }
    let pos = p * (n as f64 + 1.0) / 100.0;
    let fpos = pos.floor();
    let d = pos - fpos;
    if pos < 1.0 {
        return s[0];
    }
    if pos >= n as f64 {
        return s[n - 1];
    }
    let lower = s[fpos as usize - 1];
    let upper = s[fpos as usize];
    lower + d * (upper - lower)
}

/// Median absolute deviation.
pub fn mad(data: &[f64]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let m = median(data);
    let dev: Vec<f64> = data.iter().map(|x| (m - x).abs()).collect();
    median(&dev)
}

/// Interquartile range as CloudSim's `MathUtil.iqr` computes it.
pub fn iqr(data: &[f64]) -> f64 {
    let mut s = data.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len() as f64;
    let q1 = ((0.25 * (n + 1.0) + 0.5).floor() as usize).saturating_sub(1);
    let q3 = ((0.75 * (n + 1.0) + 0.5).floor() as usize).saturating_sub(1);
    s[q3.min(s.len() - 1)] - s[q1.min(s.len() - 1)]
}

/// Ordinary least squares y = a + b·x; `None` when x has no spread.
pub fn ols(x: &[f64], y: &[f64]) -> Option<(f64, f64)> {
    let n = x.len() as f64;
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let sxx: f64 = x.iter().map(|v| (v - mx) * (v - mx)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let b = sxy / sxx;
    Some((my - b * mx, b))
}

impl Detector {
    /// CloudSim's `isHostOverUtilized` on the scratch placement.
    pub fn overloaded(&self, sc: &Scratch, h: usize) -> bool {
        let util = sc.requested_utilization(h);
        let fallback = util > FALLBACK_THRESHOLD;
        match *self {
            Self::Thr(t) => util > t,
            Self::Iqr(s) | Self::Mad(s) => {
                let hist = sc.host_history(h);
                if hist.len() < 12 {
                    return fallback;
                }
                let spread = if matches!(self, Self::Iqr(_)) {
                    iqr(&hist)
                } else {
                    mad(&hist)
                };
                util > 1.0 - s * spread
            }
            Self::Lr(s) | Self::Lrr(s) => {
                let hist = sc.host_history(h);
                const LEN: usize = 10;
                if hist.len() < LEN {
                    return fallback;
                }
                let x: Vec<f64> = (1..=LEN).map(|i| i as f64).collect();
                let y: Vec<f64> = (0..LEN).map(|i| hist[LEN - 1 - i]).collect();
                let Some((a, b)) = ols(&x, &y) else {
                    return fallback;
                };
                let max_migration_s = sc.host_vms[h]
                    .iter()
                    .map(|&v| sc.st.vms[v].ram_mb * 8.0 / (sc.st.hosts[h].bw_mbps / 2.0))
                    .fold(f64::MIN, f64::max);
                let intervals = (max_migration_s / sc.st.interval_s).ceil();
                let predicted = (a + b * (LEN as f64 + intervals)) * s;
                predicted >= 1.0
            }
        }
    }

    /// The static threshold used for admission of new VMs (no history yet).
    pub fn admission_threshold(&self) -> f64 {
        match *self {
            Self::Thr(t) => t,
            _ => FALLBACK_THRESHOLD,
        }
    }
}

/// PABFD (`findHostForVm`): the non-excluded suitable host with the least power increase that is
/// not overloaded after taking the VM.
pub fn pabfd(sc: &mut Scratch, det: &Detector, vm: usize, excluded: &[bool]) -> Option<usize> {
    let mut best = None;
    let mut min_diff = f64::MAX;
    let req = sc.st.vms[vm].requested_mips;
    for h in 0..sc.st.hosts.len() {
        if excluded[h] || !sc.suitable(h, vm) {
            continue;
        }
        let util_mips = sc.allocated_mips(h);
        let host = &sc.st.hosts[h];
        let after = (util_mips + req) / host.total_mips();
        let diff = host.power.power(after) - host.power.power(host.utilization);
        // Same result as checking every host (hosts are scanned in order and only a strictly
        // smaller increase wins), but the costly overload check runs only for would-be winners.
        if diff >= min_diff {
            continue;
        }
        if util_mips != 0.0 {
            sc.add(h, vm);
            let over = det.overloaded(sc, h);
            sc.remove(h, vm);
            if over {
                continue;
            }
        }
        min_diff = diff;
        best = Some(h);
    }
    best
}

/// Initial placement by PABFD on the VM's full size. As in CloudSim, capacity is checked against
/// the full sizes of the VMs placed so far, but the overload check after allocation only sees the
/// new VM's demand (the VMs already created request nothing until their workload starts), and the
/// power increase is measured from an idle host.
pub fn pabfd_initial(st: &ObservedState, placed: &Placement, vm: usize, thr: f64) -> Option<usize> {
    let v = &st.vms[vm];
    let mut best = None;
    let mut min_diff = f64::MAX;
    for (h, host) in st.hosts.iter().enumerate() {
        if !placed.fits(st, h, vm) {
            continue;
        }
        let used = placed.mips[h];
        let total = host.total_mips();
        if used != 0.0 && v.total_mips() / total > thr {
            continue;
        }
        let diff = host.power.power((used + v.total_mips()) / total) - host.power.power(0.0);
        if diff < min_diff {
            min_diff = diff;
            best = Some(h);
        }
    }
    best
}

/// First fit on the full size (CloudSim's `PowerVmAllocationPolicySimple`).
pub fn first_fit_initial(st: &ObservedState, placed: &Placement, vm: usize) -> Option<usize> {
    (0..st.hosts.len()).find(|&h| placed.fits(st, h, vm))
}

/// No migrations at all; hosts only scale their power with load.
#[derive(Debug, Default)]
pub struct Dvfs;

impl Policy for Dvfs {
    fn name(&self) -> String {
        "dvfs".into()
    }
    fn place(&mut self, state: &ObservedState, placed: &Placement, vm: usize) -> Option<usize> {
        first_fit_initial(state, placed, vm)
    }
    fn decide(&mut self, _state: &ObservedState) -> Decision {
        Decision::default()
    }
}

/// A Beloglazov & Buyya consolidation policy: detector + selection + PABFD + underload.
#[derive(Debug)]
pub struct Beloglazov {
    name: String,
    pub detector: Detector,
    pub selection: Selection,
    rng: u64,
}

impl Beloglazov {
    pub fn new(name: &str, detector: Detector, selection: Selection) -> Self {
        Self {
            name: name.to_string(),
            detector,
            selection,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic, seeded once per policy instance.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn select(&mut self, sc: &Scratch, h: usize) -> Option<usize> {
        let movable = sc.st.movable(&sc.host_vms[h]);
        if movable.is_empty() {
            return None;
        }
        match self.selection {
            Selection::Mmt => mmt(sc.st, &movable),
            Selection::Rs => {
                let i = (self.next_random() % movable.len() as u64) as usize;
                Some(movable[i])
            }
            Selection::Mc => max_correlation(sc.st, &movable).or_else(|| mmt(sc.st, &movable)),
        }
    }
}

/// The VM with the smallest RAM (first one on ties).
pub fn mmt(st: &ObservedState, movable: &[usize]) -> Option<usize> {
    let mut best = None;
    let mut min = f64::MAX;
    for &v in movable {
        if st.vms[v].ram_mb < min {
            min = st.vms[v].ram_mb;
            best = Some(v);
        }
    }
    best
}

/// The VM whose history is best explained (R²) by a linear regression on the others' histories.
pub fn max_correlation(st: &ObservedState, movable: &[usize]) -> Option<usize> {
    let m = movable.len();
    let n = movable
        .iter()
        .map(|&v| st.vms[v].history.len().min(HISTORY_LENGTH))
        .min()?;
    if m < 2 || n <= m {
        return None;
    }
    let mut best = None;
    let mut best_r2 = f64::MIN_POSITIVE;
    for i in 0..m {
        let y: Vec<f64> = (0..n).map(|t| st.vms[movable[i]].history[t]).collect();
        let cols: Vec<Vec<f64>> = (0..m)
            .filter(|&j| j != i)
            .map(|j| (0..n).map(|t| st.vms[movable[j]].history[t]).collect())
            .collect();
        let r2 = r_squared(&y, &cols)?;
        if r2 > best_r2 {
            best_r2 = r2;
            best = Some(i);
        }
    }
    Some(movable[best.unwrap_or(0)])
}

/// R² of the OLS fit of `y` on `cols` with an intercept; `None` if singular.
fn r_squared(y: &[f64], cols: &[Vec<f64>]) -> Option<f64> {
    let n = y.len();
    let p = cols.len() + 1;
    // Normal equations (XᵀX) β = Xᵀy.
    let x = |t: usize, j: usize| if j == 0 { 1.0 } else { cols[j - 1][t] };
    let mut a = vec![vec![0.0; p + 1]; p];
    for r in 0..p {
        for c in 0..p {
            a[r][c] = (0..n).map(|t| x(t, r) * x(t, c)).sum();
        }
        a[r][p] = (0..n).map(|t| x(t, r) * y[t]).sum();
    }
    for col in 0..p {
        let piv = (col..p).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[piv][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, piv);
        for r in 0..p {
            if r != col {
                let f = a[r][col] / a[col][col];
                for c in col..=p {
                    a[r][c] -= f * a[col][c];
                }
            }
        }
    }
    let beta: Vec<f64> = (0..p).map(|r| a[r][p] / a[r][r]).collect();
    let mean = y.iter().sum::<f64>() / n as f64;
    let sst: f64 = y.iter().map(|v| (v - mean) * (v - mean)).sum();
    let ssr: f64 = (0..n)
        .map(|t| {
            let fit: f64 = (0..p).map(|j| beta[j] * x(t, j)).sum();
            (y[t] - fit) * (y[t] - fit)
        })
        .sum();
    Some(1.0 - ssr / sst)
}

impl Policy for Beloglazov {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn place(&mut self, state: &ObservedState, placed: &Placement, vm: usize) -> Option<usize> {
        pabfd_initial(state, placed, vm, self.detector.admission_threshold())
    }

    fn decide(&mut self, st: &ObservedState) -> Decision {
        let n = st.hosts.len();
        let det = self.detector;
        let mut sc = Scratch::new(st);
        let over: Vec<usize> = (0..n).filter(|&h| det.overloaded(&sc, h)).collect();
        let mut to_move = Vec::new();
        for &h in &over {
            while let Some(vm) = self.select(&sc, h) {
                to_move.push(vm);
                sc.remove(h, vm);
                if !det.overloaded(&sc, h) {
                    break;
                }
            }
        }
        let mut excluded = vec![false; n];
        for &h in &over {
            excluded[h] = true;
        }
        let mut actions = Vec::new();
        sort_by_demand_desc(st, &mut to_move);
        for vm in to_move {
            if let Some(h) = pabfd(&mut sc, &det, vm, &excluded) {
                sc.add(h, vm);
                let from = st.vms[vm].host.unwrap_or(h);
                actions.push(Action::migrate(
                    vm,
                    from,
                    h,
                    format!("host {from} overloaded ({det:?})"),
                ));
            }
        }
        actions.extend(underload(st, &mut sc, &det, &over));
        Decision { actions }
    }
}

/// Stable sort by current demand, largest first (CloudSim's `sortByCpuUtilization`).
pub fn sort_by_demand_desc(st: &ObservedState, vms: &mut [usize]) {
    vms.sort_by(|&a, &b| {
        st.vms[b]
            .requested_mips
            .total_cmp(&st.vms[a].requested_mips)
    });
}

/// CloudSim's `getMigrationMapFromUnderUtilizedHosts`.
fn underload(st: &ObservedState, sc: &mut Scratch, det: &Detector, over: &[usize]) -> Vec<Action> {
    let n = st.hosts.len();
    let mut excl_under = vec![false; n];
    let mut excl_place = vec![false; n];
    let mut n_under = 0;
    for h in over
        .iter()
        .copied()
        .chain((0..n).filter(|&h| st.hosts[h].utilization == 0.0))
    {
        if !excl_under[h] {
            excl_under[h] = true;
            n_under += 1;
        }
        excl_place[h] = true;
    }
    let mut actions = Vec::new();
    while n_under < n {
        let mut min = 1.0;
        let mut pick = None;
        for h in 0..n {
            if excl_under[h] {
                continue;
            }
            let u = st.hosts[h].utilization;
            if u > 0.0 && u < min && !sc.host_vms[h].iter().any(|&v| st.vms[v].in_migration) {
                min = u;
                pick = Some(h);
            }
        }
        let Some(h) = pick else { break };
        excl_under[h] = true;
        n_under += 1;
        excl_place[h] = true;
        let mut vms = st.movable(&sc.host_vms[h]);
        if vms.is_empty() {
            continue;
        }
        sort_by_demand_desc(st, &mut vms);
        let mut placed = Vec::new();
        for &vm in &vms {
            match pabfd(sc, det, vm, &excl_place) {
                Some(t) => {
                    sc.add(t, vm);
                    placed.push((vm, t));
                }
                None => {
                    for &(v, t) in &placed {
                        sc.remove(t, v);
                        sc.vm_host[v] = Some(h);
                    }
                    placed.clear();
                    break;
                }
            }
        }
        for &(vm, t) in &placed {
            if !excl_under[t] {
                excl_under[t] = true;
                n_under += 1;
            }
            let from = st.vms[vm].host.unwrap_or(h);
            actions.push(Action::migrate(
                vm,
                from,
                t,
                format!("host {h} underloaded: consolidate"),
            ));
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_match_cloudsim_definitions() {
        let d = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2];
        assert!((median(&d) - 0.65).abs() < 1e-12);
        // n = 12: q1 = round(3.25)-1 = 2, q3 = round(9.75)-1 = 9.
        assert!((iqr(&d) - (1.0 - 0.3)).abs() < 1e-12);
        assert!((mad(&d) - 0.3).abs() < 1e-12);
        let (a, b) = ols(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]).unwrap_or((0.0, 0.0));
        assert!(a.abs() < 1e-12 && (b - 2.0).abs() < 1e-12);
    }

    #[test]
    fn correlation_prefers_the_vm_explained_by_the_others() {
        let r2 = r_squared(&[1.0, 2.0, 3.0, 4.0], &[vec![2.0, 4.0, 6.0, 8.1]]).unwrap_or(0.0);
        assert!(r2 > 0.99);
    }
}
