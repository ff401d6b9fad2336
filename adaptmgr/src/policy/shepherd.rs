//! Shepherding (VIOLIN): adaptation requests that come from inside a VM are untrusted. Before
//! anything happens they pass this validator: the origin must be authenticated (the caller passes
//! the identity it verified, e.g. from the mTLS certificate) and must be a VM of the violin it
//! speaks for; the request must parse and be within bounds; the violin's quotas and the VM's and
//! violin's rate limits must allow it. Every refusal is recorded with its reason. All state is per
//! violin, so whatever one violin sends never changes what another may do.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The identity the transport proved (None = unauthenticated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub violin: String,
    pub vm: String,
}

/// What a VM may ask for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Grow or shrink its own CPU (MIPS) and/or memory (MB).
    Resize {
        vm: String,
        cpu_mips: Option<f64>,
        ram_mb: Option<f64>,
    },
    /// Ask to be moved (e.g. closer to its peers).
    Migrate { vm: String, to_site: Option<String> },
    /// A job's progress: `done` of `total` work units (any unit, the same in every report).
    /// With a deadline set on the VM, the manager re-solves its CPU share from it.
    Progress { vm: String, done: f64, total: f64 },
}

impl Request {
    /// The VM the request is about (a VM may only ask about itself).
    pub fn vm(&self) -> &str {
        match self {
            Self::Resize { vm, .. } | Self::Migrate { vm, .. } | Self::Progress { vm, .. } => vm,
        }
    }
}

/// Per-violin limits set by the administrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quota {
    pub max_cpu_mips_per_vm: f64,
    pub max_ram_mb_per_vm: f64,
    /// Sum over the violin's VMs.
    pub max_cpu_mips_total: f64,
    pub max_ram_mb_total: f64,
    /// Requests per VM per minute, and per violin per minute.
    pub vm_rate_per_min: u32,
    pub violin_rate_per_min: u32,
    pub migrations_per_hour: u32,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum Refusal {
    #[error("origin not authenticated")]
    Unauthenticated,
    #[error("violin {0:?} is not known")]
    UnknownViolin(String),
    #[error("VM {vm:?} does not belong to violin {violin:?}")]
    ForeignVm { violin: String, vm: String },
    #[error("a VM may only ask for itself: {origin} asked for {named}")]
    NotItself { origin: String, named: String },
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request exceeds the violin's quota: {0}")]
    Quota(String),
    #[error("rate limit exceeded: {0}")]
    RateLimited(String),
}

/// One line of the shepherd's log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogEntry {
    pub time_s: f64,
    pub violin: Option<String>,
    pub vm: Option<String>,
    pub accepted: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
struct ViolinState {
    quota: Option<Quota>,
    /// VM name → (cpu, ram) currently granted.
    vms: HashMap<String, (f64, f64)>,
    recent: Vec<(f64, String)>,
    migrations: Vec<f64>,
}

/// The validator. Pure: the caller passes the time.
#[derive(Debug, Default)]
pub struct Shepherd {
    violins: HashMap<String, ViolinState>,
    log: Vec<LogEntry>,
}

/// Log entries kept (the oldest go first): a manager runs for months.
pub const LOG_KEPT: usize = 1000;

/// The largest request body accepted.
pub const MAX_REQUEST_BYTES: usize = 4096;

impl Shepherd {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or updates) a violin's quota.
    pub fn set_quota(&mut self, violin: &str, quota: Quota) {
        self.violins.entry(violin.to_string()).or_default().quota = Some(quota);
    }

    /// Registers a VM of a violin with its current grant.
    pub fn add_vm(&mut self, violin: &str, vm: &str, cpu_mips: f64, ram_mb: f64) {
        self.violins
            .entry(violin.to_string())
            .or_default()
            .vms
            .insert(vm.to_string(), (cpu_mips, ram_mb));
    }

    /// Replaces a violin's VMs and their grants (the live manager passes what runs now, so a
    /// grant accepted but not carried out is not counted against the quota).
    pub fn set_vms<'a>(
        &mut self,
        violin: &str,
        vms: impl IntoIterator<Item = (&'a str, f64, f64)>,
    ) {
        self.violins.entry(violin.to_string()).or_default().vms = vms
            .into_iter()
            .map(|(vm, cpu, ram)| (vm.to_string(), (cpu, ram)))
            .collect();
    }

    /// The last [`LOG_KEPT`] entries, oldest first.
    pub fn log(&self) -> &[LogEntry] {
        &self.log
    }

    /// Validates `body` (JSON) from `origin` at `now_s`. On acceptance the grant is updated.
    pub fn validate(
        &mut self,
        now_s: f64,
        origin: Option<&Origin>,
        body: &[u8],
    ) -> Result<Request, Refusal> {
        let res = self.check(now_s, origin, body);
        if self.log.len() >= LOG_KEPT {
            self.log.drain(..=self.log.len() - LOG_KEPT);
        }
        self.log.push(LogEntry {
            time_s: now_s,
            violin: origin.map(|o| o.violin.clone()),
            vm: origin.map(|o| o.vm.clone()),
            accepted: res.is_ok(),
            detail: match &res {
                Ok(r) => format!("{r:?}"),
                Err(e) => e.to_string(),
            },
        });
        res
    }

    fn check(
        &mut self,
        now: f64,
        origin: Option<&Origin>,
        body: &[u8],
    ) -> Result<Request, Refusal> {
        let o = origin.ok_or(Refusal::Unauthenticated)?;
        let st = self
            .violins
            .get_mut(&o.violin)
            .ok_or_else(|| Refusal::UnknownViolin(o.violin.clone()))?;
        let quota = st
            .quota
            .clone()
            .ok_or_else(|| Refusal::UnknownViolin(o.violin.clone()))?;
        if !st.vms.contains_key(&o.vm) {
            return Err(Refusal::ForeignVm {
                violin: o.violin.clone(),
                vm: o.vm.clone(),
            });
        }
        // Rate limits count every authenticated attempt, well-formed or not.
        st.recent.retain(|(t, _)| now - t < 60.0);
        let vm_recent = st.recent.iter().filter(|(_, v)| *v == o.vm).count();
        if vm_recent >= quota.vm_rate_per_min as usize {
            return Err(Refusal::RateLimited(format!(
                "VM {} over {} requests/min",
                o.vm, quota.vm_rate_per_min
            )));
        }
        if st.recent.len() >= quota.violin_rate_per_min as usize {
            return Err(Refusal::RateLimited(format!(
                "violin over {} requests/min",
                quota.violin_rate_per_min
            )));
        }
        st.recent.push((now, o.vm.clone()));
        let req = parse(body)?;
        if req.vm() != o.vm {
            return Err(Refusal::NotItself {
                origin: o.vm.clone(),
                named: req.vm().to_owned(),
            });
        }
        match &req {
            Request::Resize {
                vm,
                cpu_mips,
                ram_mb,
            } => {
                let (cur_cpu, cur_ram) = st.vms[vm];
                let cpu = cpu_mips.unwrap_or(cur_cpu);
                let ram = ram_mb.unwrap_or(cur_ram);
                if cpu > quota.max_cpu_mips_per_vm || ram > quota.max_ram_mb_per_vm {
                    return Err(Refusal::Quota(format!(
                        "per-VM limit ({cpu} MIPS, {ram} MB)"
                    )));
                }
                let tot_cpu: f64 = st
                    .vms
                    .iter()
                    .map(|(n, g)| if n == vm { cpu } else { g.0 })
                    .sum();
                let tot_ram: f64 = st
                    .vms
                    .iter()
                    .map(|(n, g)| if n == vm { ram } else { g.1 })
                    .sum();
                if tot_cpu > quota.max_cpu_mips_total || tot_ram > quota.max_ram_mb_total {
                    return Err(Refusal::Quota(format!(
                        "violin total ({tot_cpu} MIPS, {tot_ram} MB)"
                    )));
                }
                st.vms.insert(vm.clone(), (cpu, ram));
            }
            Request::Progress { .. } => {}
            Request::Migrate { .. } => {
                st.migrations.retain(|t| now - t < 3600.0);
                if st.migrations.len() >= quota.migrations_per_hour as usize {
                    return Err(Refusal::Quota(format!(
                        "{} migrations/hour",
                        quota.migrations_per_hour
                    )));
                }
                st.migrations.push(now);
            }
        }
        Ok(req)
    }
}

/// Parses and bounds-checks a request body.
pub fn parse(body: &[u8]) -> Result<Request, Refusal> {
    if body.len() > MAX_REQUEST_BYTES {
        return Err(Refusal::Malformed(format!(
            "{} bytes (max {MAX_REQUEST_BYTES})",
            body.len()
        )));
    }
    let req: Request =
        serde_json::from_slice(body).map_err(|e| Refusal::Malformed(e.to_string()))?;
    let bad = |x: &Option<f64>| x.is_some_and(|v| !v.is_finite() || v <= 0.0);
    let (ok, needs) = match &req {
        Request::Resize {
            cpu_mips, ram_mb, ..
        } => (
            !bad(cpu_mips) && !bad(ram_mb) && (cpu_mips.is_some() || ram_mb.is_some()),
            "resize needs a VM name and positive finite sizes",
        ),
        Request::Progress { done, total, .. } => (
            total.is_finite() && *total > 0.0 && done.is_finite() && (0.0..=*total).contains(done),
            "progress needs a VM name and 0 <= done <= total, total > 0",
        ),
        Request::Migrate { to_site, .. } => {
            (to_site.as_ref().is_none_or(|s| s.len() <= 255), "bad names")
        }
    };
    let vm = req.vm();
    if vm.is_empty() || vm.len() > 255 || !ok {
        return Err(Refusal::Malformed(needs.into()));
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_oversized_bodies_are_refused(body in proptest::collection::vec(any::<u8>(), 0..6000)) {
            let r = parse(&body);
            if body.len() > MAX_REQUEST_BYTES {
                prop_assert!(matches!(r, Err(Refusal::Malformed(_))));
            }
        }
    }
}
