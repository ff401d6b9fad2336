//! Requests from inside VMs, live (VIOLIN's shepherding): a guest writes one JSON line on its
//! virtio-serial port `org.viola.shepherd` (`viola-ask` in the lab guest); its host's monitor
//! reads the other end of that VM's channel and forwards the line as
//! [`GuestAsk`](viola_api::manager::GuestAsk), naming the VM whose channel it came from. So the
//! origin is what the host saw, never what the guest wrote: a guest that names another VM is
//! refused (`NotItself`), and a monitor may only speak for VMs the inventory has on its host.
//!
//! [`Manager::guest_ask`] judges the line with [`Shepherd`] against the violin's quota
//! (`[guest_requests]`), its current grants (read from the inventory at each request, so a grant
//! that was accepted but failed is not counted) and the rate limits, then carries it out with
//! the calls the CLI uses ([`Manager::resize`], [`Manager::migrate`]). Every request, accepted
//! or not, goes into the decision log as a decision of the policy `shepherd` with the reason,
//! and the answer goes back to the guest.

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use viola_api::adaptation::{ActionOutcome, ActionRecord, DecisionRecord, PolicyMode, StateBrief};
use viola_api::manager::{GuestAnswer, GuestAsk, HostState, Response, VmMigrate, VmResize};

use crate::inventory::{HostRecord, InventoryError, ViolinRecord, VmRecord};
use crate::manager::{Manager, lock, now_ms};
use crate::policy::shepherd::{Origin, Quota, Request};

/// The `[guest_requests]` table: what the VMs of each violin may ask for themselves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestRequestConfig {
    /// Off: every request is refused with that reason.
    pub enabled: bool,
    /// The largest CPU cap one VM may ask for, percent of one CPU (also never above its vCPUs).
    pub max_cap_percent_per_vm: u32,
    /// The largest memory one VM may ask for, MiB (also never above its maximum memory).
    pub max_memory_mib_per_vm: u64,
    /// The violin's VMs together: CPU caps (an uncapped VM counts its vCPUs) and memory.
    pub max_cap_percent_per_violin: u32,
    pub max_memory_mib_per_violin: u64,
    /// Requests per minute, per VM and per violin (malformed ones count too).
    pub requests_per_vm_per_min: u32,
    pub requests_per_violin_per_min: u32,
    /// Moves a violin's VMs may ask for per hour.
    pub migrations_per_hour: u32,
}

impl Default for GuestRequestConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_cap_percent_per_vm: 400,
            max_memory_mib_per_vm: 8192,
            max_cap_percent_per_violin: 1600,
            max_memory_mib_per_violin: 32768,
            // A job reporting its progress every 5 s sends 12.
            requests_per_vm_per_min: 20,
            requests_per_violin_per_min: 60,
            migrations_per_hour: 4,
        }
    }
}

impl GuestRequestConfig {
    /// The shepherd's quota, in its units (MIPS at `pe_mips` per CPU, MB = MiB here).
    fn quota(&self, pe_mips: f64) -> Quota {
        let mips = |percent: u32| f64::from(percent) * pe_mips / 100.0;
        Quota {
            max_cpu_mips_per_vm: mips(self.max_cap_percent_per_vm),
            max_ram_mb_per_vm: self.max_memory_mib_per_vm as f64,
            max_cpu_mips_total: mips(self.max_cap_percent_per_violin),
            max_ram_mb_total: self.max_memory_mib_per_violin as f64,
            vm_rate_per_min: self.requests_per_vm_per_min,
            violin_rate_per_min: self.requests_per_violin_per_min,
            migrations_per_hour: self.migrations_per_hour,
        }
    }
}

/// What a VM holds now, in the shepherd's units: its cap (or its vCPUs) and its memory.
fn grant(vm: &VmRecord, pe_mips: f64) -> (f64, f64) {
    let percent = vm.cap_percent.unwrap_or(vm.vcpus * 100);
    (
        f64::from(percent) * pe_mips / 100.0,
        (vm.memory_kib / 1024) as f64,
    )
}

/// The violin `vm` belongs to: its recorded one, else the one of `violins` whose list names it.
fn violin_of<'a>(vm: &'a VmRecord, violins: &'a [ViolinRecord]) -> Option<&'a str> {
    vm.violin.as_deref().or_else(|| {
        violins
            .iter()
            .find(|v| v.vms.contains(&vm.name))
            .map(|v| v.name.as_str())
    })
}

/// A request refused before anything was done: its operation and the reason.
type Refused = (&'static str, String);

/// How a request ended, for the guest, the decision log and the metrics.
struct Ended {
    op: &'static str,
    to: Option<String>,
    detail: Option<String>,
    outcome: ActionOutcome,
    answer: GuestAnswer,
}

impl Ended {
    fn refused(op: &'static str, reason: String) -> Self {
        Self {
            op,
            to: None,
            detail: None,
            outcome: ActionOutcome::Skipped {
                reason: reason.clone(),
            },
            answer: GuestAnswer {
                accepted: false,
                detail: reason,
            },
        }
    }
}

impl Manager {
    /// Judges and carries out one line a guest sent. The answer for the guest is the returned
    /// `GuestAnswer`; for a move it is sent on `progress` first, the move runs (its `Progress`
    /// frames on `progress` too) and the move's report or error is returned.
    pub async fn guest_ask(
        &self,
        ask: GuestAsk,
        progress: mpsc::Sender<Response>,
        cancel: CancellationToken,
    ) -> Response {
        let ts_ms = now_ms();
        let judged = self.judge(&ask, ts_ms);
        let (violin, verdict) = match judged {
            Ok(j) => j,
            Err((op, reason)) => return self.finish(&ask, ts_ms, Ended::refused(op, reason)),
        };
        match verdict {
            Request::Resize {
                cpu_mips, ram_mb, ..
            } => {
                let ended = self.guest_resize(&ask, cpu_mips, ram_mb).await;
                self.finish(&ask, ts_ms, ended)
            }
            Request::Progress { done, total, .. } => {
                // Not logged one by one (a job reports every few seconds): the cap changes
                // they lead to are, as the policy `vservices`.
                let p = self.job_progress(&ask.vm, done, total).await;
                let outcome = match &p.action {
                    Some(a) => a.outcome.clone(),
                    None => ActionOutcome::Skipped {
                        reason: p.answer.detail.clone(),
                    },
                };
                if let Some(a) = p.action {
                    self.record_deadline_action(a);
                }
                self.count_guest_request("progress", &outcome);
                Response::GuestAnswer(p.answer)
            }
            Request::Migrate { to_site, .. } => {
                let to = match self.guest_destination(&ask, &violin, to_site.as_deref()) {
                    Ok(to) => to,
                    Err(reason) => {
                        return self.finish(&ask, ts_ms, Ended::refused("migrate", reason));
                    }
                };
                let answer = GuestAnswer {
                    accepted: true,
                    detail: format!("moving to {}/{}", to.site, to.name),
                };
                let seq = self.record_guest_decision(
                    &ask,
                    ts_ms,
                    &Ended {
                        op: "migrate",
                        to: Some(to.name.clone()),
                        detail: None,
                        outcome: ActionOutcome::Pending,
                        answer: answer.clone(),
                    },
                );
                // The guest hears this before the move: its channel ends with the source.
                let _ = progress.send(Response::GuestAnswer(answer)).await;
                let req = VmMigrate {
                    vm: ask.vm.clone(),
                    to_host: to.name.clone(),
                    bandwidth_mib_s: None,
                    stage_base: true,
                    timeout_s: None,
                };
                let result = self.migrate(req, progress, cancel).await;
                let outcome = crate::policy_loop::migration_outcome(&result);
                let response = match result {
                    Ok(report) => Response::Migrated(Box::new(report)),
                    Err(e) => Response::Error {
                        message: viola_common::errors::chain(&e),
                    },
                };
                self.count_guest_request("migrate", &outcome);
                if let Some(seq) = seq
                    && let Err(e) = self.inventory.set_action_outcome(seq, 0, outcome)
                {
                    tracing::warn!(vm = %ask.vm, error = %viola_common::errors::chain(&e), "cannot record how a guest's move ended");
                }
                response
            }
        }
    }

    /// The checks before anything is done: the VM is where its monitor says, requests are on,
    /// it has a violin, and the shepherd accepts the line.
    fn judge(&self, ask: &GuestAsk, ts_ms: u64) -> Result<(String, Request), Refused> {
        let internal = |e: InventoryError| ("request", viola_common::errors::chain(&e));
        let vm = self.inventory.vm(&ask.vm).map_err(internal)?;
        let Some(vm) = vm.filter(|v| v.host == ask.host) else {
            return Err((
                "request",
                format!(
                    "the manager knows no VM {:?} on host {}/{}",
                    ask.vm, ask.site, ask.host
                ),
            ));
        };
        if !self.cfg.guest_requests.enabled {
            return Err((
                "request",
                "requests from guests are off on this manager ([guest_requests] enabled = false)"
                    .into(),
            ));
        }
        let violins = self.inventory.violins().map_err(internal)?;
        let Some(violin) = violin_of(&vm, &violins).map(str::to_owned) else {
            return Err((
                "request",
                format!(
                    "{} is in no violin, whose quota would bound its requests",
                    ask.vm
                ),
            ));
        };
        let pe_mips = self.cfg.policy.pe_mips;
        let members: Vec<VmRecord> = self
            .inventory
            .vms()
            .map_err(internal)?
            .into_iter()
            .filter(|v| violin_of(v, &violins) == Some(violin.as_str()))
            .collect();
        let mut shepherd = lock(&self.shepherd);
        shepherd.set_quota(&violin, self.cfg.guest_requests.quota(pe_mips));
        shepherd.set_vms(
            &violin,
            members.iter().map(|v| {
                let (cpu, ram) = grant(v, pe_mips);
                (v.name.as_str(), cpu, ram)
            }),
        );
        let origin = Origin {
            violin: violin.clone(),
            vm: ask.vm.clone(),
        };
        let verdict = shepherd.validate(ts_ms as f64 / 1000.0, Some(&origin), ask.line.as_bytes());
        drop(shepherd);
        match verdict {
            Ok(req) => {
                // Beyond the quota, the VM's own limits: libvirt would refuse these anyway.
                if let Request::Resize {
                    cpu_mips, ram_mb, ..
                } = &req
                {
                    let most = f64::from(vm.vcpus) * pe_mips;
                    if cpu_mips.is_some_and(|c| c > most) {
                        return Err((
                            "resize",
                            format!("{} has {} vCPUs: at most {most:.0} MIPS", vm.name, vm.vcpus),
                        ));
                    }
                    let max_mib = vm.max_memory_kib / 1024;
                    if ram_mb.is_some_and(|r| r > max_mib as f64) {
                        return Err((
                            "resize",
                            format!("{}'s maximum memory is {max_mib} MiB", vm.name),
                        ));
                    }
                }
                Ok((violin, req))
            }
            Err(refusal) => {
                let op = match crate::policy::shepherd::parse(ask.line.as_bytes()) {
                    Ok(Request::Resize { .. }) => "resize",
                    Ok(Request::Migrate { .. }) => "migrate",
                    Ok(Request::Progress { .. }) => "progress",
                    Err(_) => "request",
                };
                Err((op, refusal.to_string()))
            }
        }
    }

    async fn guest_resize(
        &self,
        ask: &GuestAsk,
        cpu_mips: Option<f64>,
        ram_mb: Option<f64>,
    ) -> Ended {
        let pe_mips = self.cfg.policy.pe_mips;
        let cap_percent = cpu_mips.map(|m| ((m / pe_mips * 100.0).round() as u32).max(1));
        let memory_mib = ram_mb.map(|r| r.round() as u64);
        let mut detail = Vec::new();
        if let Some(c) = cap_percent {
            detail.push(format!("cap {c} % of a CPU"));
        }
        if let Some(m) = memory_mib {
            detail.push(format!("memory {m} MiB"));
        }
        let detail = detail.join(", ");
        let req = VmResize {
            vm: ask.vm.clone(),
            vcpus: None,
            memory_mib,
            cap_percent,
            shares: None,
        };
        match self.resize(req).await {
            Ok(()) => Ended {
                op: "resize",
                to: None,
                detail: Some(detail.clone()),
                outcome: ActionOutcome::DONE,
                answer: GuestAnswer {
                    accepted: true,
                    detail: format!("done: {detail}"),
                },
            },
            Err(e) => {
                let error = viola_common::errors::chain(&e);
                Ended {
                    op: "resize",
                    to: None,
                    detail: Some(detail),
                    outcome: ActionOutcome::Failed {
                        error: error.clone(),
                    },
                    answer: GuestAnswer {
                        accepted: false,
                        detail: format!("accepted but it failed: {error}"),
                    },
                }
            }
        }
    }

    /// Where a guest that asked to move goes: an up host of `to_site` (else its own site),
    /// not its own, on a site its violin spans, with the most memory free.
    fn guest_destination(
        &self,
        ask: &GuestAsk,
        violin: &str,
        to_site: Option<&str>,
    ) -> Result<HostRecord, String> {
        let site = to_site.unwrap_or(&ask.site);
        let chain = |e: InventoryError| viola_common::errors::chain(&e);
        let sites = self
            .inventory
            .violin(violin)
            .map_err(chain)?
            .map(|v| v.sites)
            .unwrap_or_default();
        if !sites.is_empty() && !sites.iter().any(|s| s == site) {
            return Err(format!("violin {violin} does not span site {site}"));
        }
        let vms = self.inventory.vms().map_err(chain)?;
        let free_kib = |h: &HostRecord| {
            let used: u64 = vms
                .iter()
                .filter(|v| v.host == h.name)
                .map(|v| v.memory_kib)
                .sum();
            h.memory_kib.saturating_sub(used)
        };
        self.inventory
            .hosts()
            .map_err(chain)?
            .into_iter()
            .filter(|h| h.site == site && h.name != ask.host && h.state == HostState::Up)
            .filter(|h| !h.libvirt_uri.is_empty())
            .max_by_key(free_kib)
            .ok_or_else(|| format!("no other host of site {site} is up"))
    }

    /// Records, counts and answers a request that ended without a move.
    fn finish(&self, ask: &GuestAsk, ts_ms: u64, ended: Ended) -> Response {
        self.record_guest_decision(ask, ts_ms, &ended);
        self.count_guest_request(ended.op, &ended.outcome);
        if ended.answer.accepted {
            tracing::info!(vm = %ask.vm, host = %ask.host, detail = %ended.answer.detail, "guest request carried out");
        } else {
            tracing::warn!(vm = %ask.vm, host = %ask.host, reason = %ended.answer.detail, "guest request refused");
        }
        Response::GuestAnswer(ended.answer)
    }

    fn record_guest_decision(&self, ask: &GuestAsk, ts_ms: u64, ended: &Ended) -> Option<u64> {
        let brief = |hosts: Vec<HostRecord>, vms: usize| StateBrief {
            hosts: hosts.len(),
            hosts_up: hosts.iter().filter(|h| h.state == HostState::Up).count(),
            vms,
            ..StateBrief::default()
        };
        let state = match (self.inventory.hosts(), self.inventory.vms()) {
            (Ok(h), Ok(v)) => brief(h, v.len()),
            _ => StateBrief::default(),
        };
        let record = DecisionRecord {
            seq: 0,
            ts_ms,
            policy: "shepherd".into(),
            mode: PolicyMode::Act,
            state,
            actions: vec![ActionRecord {
                action: ended.op.into(),
                vm: Some(ask.vm.clone()),
                from: Some(ask.host.clone()),
                to: ended.to.clone(),
                detail: ended.detail.clone(),
                reason: format!(
                    "asked by the guest on its channel at {}/{}",
                    ask.site, ask.host
                ),
                stage: None,
                outcome: ended.outcome.clone(),
            }],
        };
        match self.inventory.record_decision(&record) {
            Ok(seq) => Some(seq),
            Err(e) => {
                tracing::warn!(vm = %ask.vm, error = %viola_common::errors::chain(&e), "cannot record a guest's request");
                None
            }
        }
    }

    fn count_guest_request(&self, op: &str, outcome: &ActionOutcome) {
        self.metrics
            .guest_requests
            .get_or_create(&vec![
                ("op".to_owned(), op.to_owned()),
                ("outcome".to_owned(), outcome.label().to_owned()),
            ])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use viola_api::adaptation::PolicyMode;
    use viola_hypervisor::Hypervisor;

    use super::*;
    use crate::fixtures::Federation;
    use crate::policy_loop::config::PolicyConfig;

    /// a1 and a2 at site a, b1 at site b; vm1 and vm2 on a1, both in violin "lan" (1 vCPU,
    /// 512 MiB each); quotas: 100 % of a CPU per VM, 170 % for the violin.
    async fn federation() -> Federation {
        let mut f = Federation::with(
            &[("a1", "a"), ("a2", "a"), ("b1", "b")],
            &[("vm1", "a1"), ("vm2", "a1")],
            PolicyConfig {
                mode: PolicyMode::Off,
                ..PolicyConfig::default()
            },
            |cfg| {
                cfg.guest_requests.max_cap_percent_per_vm = 100;
                cfg.guest_requests.max_cap_percent_per_violin = 170;
                cfg.guest_requests.requests_per_vm_per_min = 6;
            },
        );
        f.report(&|_| 0.1).await;
        f
    }

    /// `line` as it came from `vm`'s channel on `host`; the answer and any further frames.
    async fn ask(f: &Federation, host: &str, vm: &str, line: &str) -> (Response, Vec<Response>) {
        let (tx, mut rx) = mpsc::channel(64);
        let ask = GuestAsk {
            host: host.into(),
            site: if host == "b1" { "b" } else { "a" }.into(),
            vm: vm.into(),
            line: line.into(),
        };
        let last = f.manager.guest_ask(ask, tx, CancellationToken::new()).await;
        let mut frames = Vec::new();
        while let Ok(r) = rx.try_recv() {
            frames.push(r);
        }
        (last, frames)
    }

    fn answer(r: &Response) -> &GuestAnswer {
        match r {
            Response::GuestAnswer(a) => a,
            other => panic!("not an answer: {other:?}"),
        }
    }

    fn cap_on_a1(f: &Federation, vm: &str) -> Option<i64> {
        let t = f.cluster.host("fake://a1").cpu_tuning(vm).unwrap();
        t.cap.map(|c| c.quota_us * 100 / c.period_us as i64)
    }

    /// The shepherd's decisions: (action, vm, outcome label, reason or detail).
    fn logged(f: &Federation) -> Vec<(String, String, String)> {
        f.decisions()
            .into_iter()
            .filter(|d| d.policy == "shepherd")
            .flat_map(|d| d.actions)
            .map(|a| {
                (
                    a.action,
                    a.vm.unwrap_or_default(),
                    a.outcome.label().to_owned(),
                )
            })
            .collect()
    }

    /// The answer to `line` from `vm`'s channel on `host`.
    async fn said(f: &Federation, host: &str, vm: &str, line: &str) -> GuestAnswer {
        answer(&ask(f, host, vm, line).await.0).clone()
    }

    /// A resize line: `vm` asks for a cap of `mips`.
    fn cap(vm: &str, mips: u32) -> String {
        format!(r#"{{"op":"resize","vm":"{vm}","cpu_mips":{mips}}}"#)
    }

    #[tokio::test]
    async fn a_request_within_quota_is_carried_out_and_one_over_it_is_refused_with_its_reason() {
        let f = federation().await;
        let a = said(&f, "a1", "vm1", &cap("vm1", 600)).await;
        assert!(a.accepted && a.detail.contains("cap 60 %"), "{a:?}");
        assert_eq!(cap_on_a1(&f, "vm1"), Some(60));
        let recorded = f.manager.inventory.vm("vm1").unwrap().unwrap().cap_percent;
        assert_eq!(recorded, Some(60));

        // Over the per-VM quota (100 %): refused, nothing changes.
        let a = said(&f, "a1", "vm1", &cap("vm1", 1500)).await;
        assert!(!a.accepted && a.detail.contains("quota"), "{a:?}");
        assert_eq!(cap_on_a1(&f, "vm1"), Some(60));
        // vm2 (uncapped: its whole vCPU, 100 %) asks for 80 %: with vm1's 60 % the violin
        // would hold 140 % of its 170; accepted. Then vm1 asking for 100 % would make 180 %.
        assert!(said(&f, "a1", "vm2", &cap("vm2", 800)).await.accepted);
        let a = said(&f, "a1", "vm1", &cap("vm1", 1000)).await;
        assert!(a.detail.contains("violin total"), "{a:?}");
        // Beyond the VM itself: more memory than its maximum.
        let a = said(
            &f,
            "a1",
            "vm2",
            r#"{"op":"resize","vm":"vm2","ram_mb":4096}"#,
        )
        .await;
        assert!(a.detail.contains("maximum memory is 512 MiB"), "{a:?}");

        let outcomes: Vec<_> = logged(&f).into_iter().map(|(_, vm, o)| (vm, o)).collect();
        let expected = [
            ("vm1", "done"),
            ("vm1", "skipped"),
            ("vm2", "done"),
            ("vm1", "skipped"),
            ("vm2", "skipped"),
        ];
        assert_eq!(
            outcomes,
            expected.map(|(v, o)| (v.to_owned(), o.to_owned()))
        );
        let counted = |outcome: &str| {
            let labels = vec![
                ("op".to_owned(), "resize".to_owned()),
                ("outcome".to_owned(), outcome.to_owned()),
            ];
            f.manager
                .metrics
                .guest_requests
                .get_or_create(&labels)
                .get()
        };
        assert_eq!((counted("done"), counted("skipped")), (2, 3));
    }

    #[tokio::test]
    async fn a_vm_cannot_act_on_another_nor_a_monitor_speak_for_a_vm_elsewhere() {
        let f = federation().await;
        let a = said(&f, "a1", "vm1", &cap("vm2", 100)).await;
        assert!(!a.accepted, "{a:?}");
        assert!(
            a.detail
                .contains("may only ask for itself: vm1 asked for vm2"),
            "{a:?}"
        );
        // a2's monitor forwarding a line as if from vm1 (which runs on a1).
        let a = said(&f, "a2", "vm1", &cap("vm1", 100)).await;
        assert!(a.detail.contains("no VM \"vm1\" on host a/a2"), "{a:?}");
        let a = said(&f, "a1", "vm1", r#"{"op":"resize","vm":"#).await;
        assert!(a.detail.contains("malformed"), "{a:?}");
        // None of it touched vm2 or vm1.
        assert_eq!((cap_on_a1(&f, "vm1"), cap_on_a1(&f, "vm2")), (None, None));
        // Six requests per VM per minute, malformed ones included: vm1 has sent two (what a2's
        // monitor forwarded never reached the shepherd).
        for _ in 0..4 {
            said(&f, "a1", "vm1", "{}").await;
        }
        let a = said(&f, "a1", "vm1", &cap("vm1", 100)).await;
        assert!(a.detail.contains("rate limit"), "{a:?}");
        assert_eq!(cap_on_a1(&f, "vm1"), None);
    }

    #[tokio::test]
    async fn a_move_is_answered_first_then_carried_out_and_logged_with_how_it_ended() {
        let f = federation().await;
        let (last, frames) = ask(&f, "a1", "vm1", r#"{"op":"migrate","vm":"vm1"}"#).await;
        let first = frames.first().expect("the answer before the move");
        assert_eq!(answer(first).detail, "moving to a/a2");
        assert!(answer(first).accepted);
        assert!(matches!(last, Response::Migrated(_)), "{last:?}");
        assert_eq!(f.running("vm1"), ["fake://a2"]);
        assert_eq!(
            logged(&f),
            [("migrate".into(), "vm1".into(), "done".into())]
        );
        // Off to a site the violin has no other host up at: refused, and it stays.
        let (r, _) = ask(
            &f,
            "a2",
            "vm1",
            r#"{"op":"migrate","vm":"vm1","to_site":"c"}"#,
        )
        .await;
        assert!(
            answer(&r).detail.contains("no other host of site c is up"),
            "{r:?}"
        );
        assert_eq!(f.running("vm1"), ["fake://a2"]);
    }

    #[tokio::test]
    async fn requests_are_refused_when_the_manager_turned_them_off() {
        let mut f = Federation::with(
            &[("a1", "a")],
            &[("vm1", "a1")],
            PolicyConfig::default(),
            |cfg| cfg.guest_requests.enabled = false,
        );
        f.report(&|_| 0.1).await;
        let a = said(&f, "a1", "vm1", &cap("vm1", 100)).await;
        assert!(a.detail.contains("off on this manager"), "{a:?}");
    }
}
