//! Service levels, live: Virtual Services' computational service on real VMs. A VM's job gets a
//! deadline (`viola vm deadline VM --in-s N`); the job reports its progress from inside the VM
//! on its shepherd channel (`viola-ask progress DONE TOTAL`, work units of its own choosing).
//! At each report the manager measures the job's speed in units per CPU-second over the last
//! intervals (the CPU it had: its cap, or what the monitor saw it use when uncapped), and sets
//! the VM's CPU cap to the smallest share whose projected completion keeps the seed's service
//! level (`policy::vservices::deadline_share`, the seed's doubling-and-bisection search), so
//! the share is re-solved as the observed progress changes. When the job reports it is done,
//! the VM gets its cap from before back.
//!
//! The vertical layer leaves such VMs alone (`VmObs::service` is set for them), so the two do
//! not fight over the cap. Each change is a decision of policy `vservices` in the log.

use serde::{Deserialize, Serialize};
use viola_api::adaptation::{ActionOutcome, ActionRecord, DecisionRecord, PolicyMode, StateBrief};
use viola_api::manager::{GuestAnswer, VmDeadline, VmResize};

use crate::inventory::{InventoryError, VmRecord};
use crate::lifecycle::VmError;
use crate::manager::{Manager, ManagerError, now_ms};
use crate::policy::ServiceObs;
use crate::policy::vservices::{self, Progress};
use crate::tenants::Caller;

/// Progress reports kept per job.
pub const PROGRESS_KEPT: usize = 12;

/// Intervals the job's speed is measured over (the newest ones).
const SPEED_WINDOW: usize = 3;

/// A cap change smaller than this (percentage points) is not made: the measurement is noisier.
const CAP_STEP_MIN: u32 = 2;

/// A VM's job deadline and its progress (in the VM's inventory record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDeadline {
    pub set_ms: u64,
    pub due_ms: u64,
    /// The most of a CPU the job may get, percent.
    pub max_cap_percent: u32,
    /// The VM's cap before (given back when the job is done or the deadline cleared).
    pub cap_before: Option<u32>,
    /// The newest reports, oldest first (at most [`PROGRESS_KEPT`]).
    pub progress: Vec<ProgressPoint>,
}

/// One progress report as kept: `done` of `total` units at `at_ms`, with the CPU share (in
/// CPUs) the job had over the interval that ended there.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProgressPoint {
    pub at_ms: u64,
    pub done: f64,
    pub total: f64,
    pub share: f64,
}

impl JobDeadline {
    /// What the policies see of it: x = projected completion / deadline (both from when it
    /// was set), on the seed's s(x) with a = 10, b = 1, w = 0.5. `None` before a speed is known.
    pub fn service(&self, now_ms: u64) -> Option<ServiceObs> {
        let last = self.progress.last()?;
        let speed = vservices::units_per_cpu_second(&self.points(), SPEED_WINDOW)?;
        let remaining_s = (last.total - last.done) / (speed * last.share.max(1e-3));
        let elapsed_s = now_ms.saturating_sub(self.set_ms) as f64 / 1000.0;
        let window_s = self.window_s();
        Some(ServiceObs {
            measured: (elapsed_s + remaining_s) / window_s,
            a: 10.0,
            b: 1.0,
            w: 0.5,
            weight: 1.0,
        })
    }

    fn window_s(&self) -> f64 {
        (self.due_ms.saturating_sub(self.set_ms) as f64 / 1000.0).max(1.0)
    }

    fn points(&self) -> Vec<Progress> {
        self.progress
            .iter()
            .map(|p| Progress {
                at_s: p.at_ms as f64 / 1000.0,
                done: p.done,
                share: p.share,
            })
            .collect()
    }
}

/// Why a deadline could not be set.
#[derive(Debug, thiserror::Error)]
pub enum DeadlineError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("no VM named {0:?}")]
    UnknownVm(String),
    #[error("a deadline needs --in-s of at least 1 s")]
    TooSoon,
    #[error("--max-cap-percent must be 1 to {most} ({vcpus} vCPUs)")]
    BadMaxCap { most: u32, vcpus: u32 },
    #[error("inventory")]
    Inventory(#[from] InventoryError),
    #[error("giving {vm} its cap back")]
    Restore {
        vm: String,
        #[source]
        source: ManagerError,
    },
}

/// What a progress report led to.
pub(crate) struct ProgressOutcome {
    pub answer: GuestAnswer,
    /// The cap change made (or tried), for the decision log.
    pub action: Option<ActionRecord>,
}

impl Manager {
    /// `viola vm deadline`: sets (or with `in_s: None` clears) a job deadline on a VM.
    pub async fn set_deadline(
        &self,
        caller: &Caller,
        req: VmDeadline,
    ) -> Result<(), DeadlineError> {
        self.check_owns_vm(caller, &req.vm)?;
        let mut rec = self
            .inventory
            .vm(&req.vm)?
            .ok_or_else(|| DeadlineError::UnknownVm(req.vm.clone()))?;
        let Some(in_s) = req.in_s else {
            if let Some(d) = rec.deadline.take() {
                self.inventory.put_vm(&rec)?;
                self.restore_cap(&rec, d.cap_before).await?;
            }
            return Ok(());
        };
        if in_s == 0 {
            return Err(DeadlineError::TooSoon);
        }
        let most = rec.max_vcpus.max(rec.vcpus).max(1) * 100;
        let max_cap_percent = req.max_cap_percent.unwrap_or(rec.vcpus.max(1) * 100);
        if max_cap_percent == 0 || max_cap_percent > most {
            return Err(DeadlineError::BadMaxCap {
                most,
                vcpus: rec.max_vcpus,
            });
        }
        let now = now_ms();
        let cap_before = match &rec.deadline {
            Some(old) => old.cap_before,
            None => rec.cap_percent,
        };
        rec.deadline = Some(JobDeadline {
            set_ms: now,
            due_ms: now + in_s * 1000,
            max_cap_percent,
            cap_before,
            progress: Vec::new(),
        });
        self.inventory.put_vm(&rec)?;
        self.inventory.record(
            now,
            "deadline_set",
            &req.vm,
            serde_json::to_value(&req).unwrap_or_default(),
        )?;
        Ok(())
    }

    /// The cap the VM had before its deadline, or none.
    async fn restore_cap(
        &self,
        rec: &VmRecord,
        cap_before: Option<u32>,
    ) -> Result<(), DeadlineError> {
        let restored = match cap_before {
            Some(cap) => {
                self.resize(VmResize {
                    vm: rec.name.clone(),
                    vcpus: None,
                    memory_mib: None,
                    cap_percent: Some(cap),
                    shares: None,
                })
                .await
            }
            None => self.remove_cap(&rec.name).await,
        };
        restored.map_err(|source| DeadlineError::Restore {
            vm: rec.name.clone(),
            source,
        })
    }

    /// A progress report from the VM's job: kept, and the cap re-solved.
    pub(crate) async fn job_progress(&self, vm: &str, done: f64, total: f64) -> ProgressOutcome {
        let answer = |accepted, detail: String| GuestAnswer { accepted, detail };
        let rec = match self.inventory.vm(vm) {
            Ok(Some(r)) => r,
            Ok(None) => {
                return ProgressOutcome {
                    answer: answer(false, format!("no VM named {vm:?}")),
                    action: None,
                };
            }
            Err(e) => {
                return ProgressOutcome {
                    answer: answer(false, viola_common::errors::chain(&e)),
                    action: None,
                };
            }
        };
        let mut rec = rec;
        let Some(mut deadline) = rec.deadline.take() else {
            return ProgressOutcome {
                answer: answer(true, "noted; this VM has no deadline".into()),
                action: None,
            };
        };
        let now = now_ms();
        let current = rec.cap_percent.unwrap_or(rec.vcpus.max(1) * 100);
        let share = match rec.cap_percent {
            Some(c) => f64::from(c) / 100.0,
            // Uncapped: what the monitor saw it use.
            None => rec.cpu_busy.clamp(0.05, f64::from(rec.vcpus.max(1))),
        };
        deadline.progress.push(ProgressPoint {
            at_ms: now,
            done,
            total,
            share,
        });
        if deadline.progress.len() > PROGRESS_KEPT {
            deadline.progress.remove(0);
        }
        let late_s = now as f64 / 1000.0 - deadline.due_ms as f64 / 1000.0;
        if done >= total {
            let met = if late_s <= 0.0 {
                format!("{:.0} s before its deadline", -late_s)
            } else {
                format!("{late_s:.0} s after its deadline")
            };
            let cap_before = deadline.cap_before;
            // The deadline is gone first: a failed cap restore must not leave it steering.
            let stored = self.inventory.put_vm(&rec);
            let restored = match stored {
                Ok(()) => self.restore_cap(&rec, cap_before).await,
                Err(e) => Err(e.into()),
            };
            let outcome = match &restored {
                Ok(()) => ActionOutcome::DONE,
                Err(e) => ActionOutcome::Failed {
                    error: viola_common::errors::chain(e),
                },
            };
            let back = cap_before.map_or("uncapped".to_owned(), |c| format!("{c} % of a CPU"));
            return ProgressOutcome {
                answer: answer(true, format!("job done {met}; the VM is {back} again")),
                action: Some(cap_action(
                    vm,
                    &back,
                    format!("its job reported done {met}"),
                    outcome,
                )),
            };
        }
        let speed = vservices::units_per_cpu_second(&deadline.points(), SPEED_WINDOW);
        rec.deadline = Some(deadline.clone());
        if let Err(e) = self.inventory.put_vm(&rec) {
            return ProgressOutcome {
                answer: answer(false, viola_common::errors::chain(&e)),
                action: None,
            };
        }
        let Some(speed) = speed else {
            return ProgressOutcome {
                answer: answer(
                    true,
                    format!(
                        "noted ({:.0} % done); its speed is known from the next report",
                        100.0 * done / total
                    ),
                ),
                action: None,
            };
        };
        let elapsed_s = now.saturating_sub(deadline.set_ms) as f64 / 1000.0;
        let max_share = f64::from(deadline.max_cap_percent) / 100.0;
        let remaining = total - done;
        let wanted = vservices::deadline_share(
            elapsed_s,
            deadline.window_s(),
            remaining,
            speed,
            (f64::from(current) / 100.0).min(max_share),
            max_share,
        );
        let cap = ((wanted * 100.0).ceil() as u32).clamp(1, deadline.max_cap_percent);
        let finish_s = remaining / (speed * f64::from(cap) / 100.0);
        let due_in_s = -late_s;
        let reason = format!(
            "job {:.0} % done at {speed:.1} units per CPU-second; {cap} % of a CPU finishes it in \
             {finish_s:.0} s, its deadline is in {due_in_s:.0} s",
            100.0 * done / total
        );
        if cap.abs_diff(current) < CAP_STEP_MIN && rec.cap_percent.is_some() {
            return ProgressOutcome {
                answer: answer(true, format!("noted; cap stays at {current} %: {reason}")),
                action: None,
            };
        }
        let resized = self
            .resize(VmResize {
                vm: vm.to_owned(),
                vcpus: None,
                memory_mib: None,
                cap_percent: Some(cap),
                shares: None,
            })
            .await;
        let (accepted, outcome) = match &resized {
            Ok(()) => (true, ActionOutcome::DONE),
            Err(e) => (
                false,
                ActionOutcome::Failed {
                    error: viola_common::errors::chain(e),
                },
            ),
        };
        ProgressOutcome {
            answer: answer(accepted, format!("cap {current} % -> {cap} %: {reason}")),
            action: Some(cap_action(
                vm,
                &format!("cap {cap} % of a CPU"),
                reason,
                outcome,
            )),
        }
    }

    /// Records a cap change the deadline made as a decision of policy `vservices`.
    pub(crate) fn record_deadline_action(&self, action: ActionRecord) {
        let record = DecisionRecord {
            seq: 0,
            ts_ms: now_ms(),
            policy: "vservices".into(),
            mode: PolicyMode::Act,
            state: StateBrief::default(),
            actions: vec![action],
        };
        if let Err(e) = self.inventory.record_decision(&record) {
            tracing::warn!(error = %viola_common::errors::chain(&e), "cannot record a deadline's cap change");
        }
    }
}

fn cap_action(vm: &str, detail: &str, reason: String, outcome: ActionOutcome) -> ActionRecord {
    ActionRecord {
        action: "resize".into(),
        vm: Some(vm.to_owned()),
        from: None,
        to: None,
        detail: Some(detail.to_owned()),
        reason,
        stage: None,
        outcome,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use viola_api::adaptation::PolicyMode;
    use viola_hypervisor::Hypervisor;

    use super::*;
    use crate::fixtures::Federation;
    use crate::policy_loop::config::PolicyConfig;

    fn cap_on_a1(f: &Federation) -> Option<i64> {
        let t = f.cluster.host("fake://a1").cpu_tuning("job").unwrap();
        t.cap.map(|c| c.quota_us * 100 / c.period_us as i64)
    }

    fn vservices_actions(f: &Federation) -> Vec<ActionRecord> {
        f.decisions()
            .into_iter()
            .filter(|d| d.policy == "vservices")
            .flat_map(|d| d.actions)
            .collect()
    }

    #[tokio::test]
    async fn a_deadline_sets_the_smallest_cap_from_the_jobs_progress_and_gives_it_back_when_done() {
        let mut f = Federation::new(
            &[("a1", "a")],
            &[("job", "a1")],
            PolicyConfig {
                mode: PolicyMode::Off,
                ..PolicyConfig::default()
            },
        );
        // The job burns its whole vCPU.
        f.report(&|_| 1.0).await;
        let m = &f.manager;
        // Progress without a deadline: noted, nothing changes.
        let p = m.job_progress("job", 0.0, 1000.0).await;
        assert!(p.answer.accepted && p.answer.detail.contains("no deadline"));
        let set = |in_s| VmDeadline {
            vm: "job".into(),
            in_s,
            max_cap_percent: None,
        };
        m.set_deadline(&Caller::Admin, set(Some(10))).await.unwrap();
        assert!(matches!(
            m.set_deadline(&Caller::Tenant("other".into()), set(Some(10)))
                .await,
            Err(DeadlineError::Vm(_))
        ));

        let p = m.job_progress("job", 0.0, 1000.0).await;
        assert!(
            p.answer
                .detail
                .contains("speed is known from the next report"),
            "{}",
            p.answer.detail
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        // 100 units in 0.3 s of a whole CPU: 900 left need about 2.7 CPU-seconds in the
        // deadline's remaining 9.7 s, so a bit more than a quarter of a CPU.
        let p = m.job_progress("job", 100.0, 1000.0).await;
        let action = p.action.expect("a cap change");
        assert_eq!(action.outcome, ActionOutcome::DONE);
        let cap = cap_on_a1(&f).expect("a cap");
        assert!((25..=40).contains(&cap), "cap {cap}: {}", p.answer.detail);
        assert_eq!(
            m.inventory.vm("job").unwrap().unwrap().cap_percent,
            Some(cap as u32)
        );
        m.record_deadline_action(action);

        // The job turns out slower at that cap (half the expected progress): a higher cap.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let expected = 0.3 * (cap as f64 / 100.0) * 333.0;
        let p = m.job_progress("job", 100.0 + expected / 2.0, 1000.0).await;
        let higher = cap_on_a1(&f).unwrap();
        assert!(higher > cap, "{cap} -> {higher}: {}", p.answer.detail);

        // Done: the deadline is gone and the VM is uncapped again.
        let p = m.job_progress("job", 1000.0, 1000.0).await;
        assert!(
            p.answer.detail.contains("before its deadline"),
            "{}",
            p.answer.detail
        );
        let rec = m.inventory.vm("job").unwrap().unwrap();
        assert_eq!((rec.cap_percent, rec.deadline), (None, None));
        assert_eq!(cap_on_a1(&f), None);
        assert_eq!(vservices_actions(&f).len(), 1);
    }

    #[tokio::test]
    async fn a_deadline_is_refused_without_time_or_beyond_the_vms_cpus_and_clears_cleanly() {
        let mut f = Federation::new(&[("a1", "a")], &[("job", "a1")], PolicyConfig::default());
        f.report(&|_| 1.0).await;
        let m = &f.manager;
        let req = |in_s, max_cap_percent| VmDeadline {
            vm: "job".into(),
            in_s,
            max_cap_percent,
        };
        assert!(matches!(
            m.set_deadline(&Caller::Admin, req(Some(0), None)).await,
            Err(DeadlineError::TooSoon)
        ));
        assert!(matches!(
            m.set_deadline(&Caller::Admin, req(Some(60), Some(900)))
                .await,
            Err(DeadlineError::BadMaxCap { .. })
        ));
        m.set_deadline(&Caller::Admin, req(Some(60), Some(50)))
            .await
            .unwrap();
        m.job_progress("job", 0.0, 10.0).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Far too slow for the deadline: the most it may have, 50 %.
        m.job_progress("job", 0.001, 10.0).await;
        assert_eq!(cap_on_a1(&f), Some(50));
        m.set_deadline(&Caller::Admin, req(None, None))
            .await
            .unwrap();
        let rec = m.inventory.vm("job").unwrap().unwrap();
        assert_eq!((rec.cap_percent, rec.deadline), (None, None));
    }
}
