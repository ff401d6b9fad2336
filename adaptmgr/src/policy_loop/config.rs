//! The `[policy]` table of the manager's configuration: which policy, in which mode, how often,
//! with which parameters. Apart from the loop so that the manager's configuration can hold it
//! without the manager and the loop importing each other.

use serde::{Deserialize, Serialize};

use crate::observe::ObserveParams;
pub use crate::policy::vertical::{Vertical, VerticalParams};
pub use crate::policy::viola::ViolaParams;
use crate::policy::{self, Policy, PolicyNameError};
pub use viola_api::adaptation::PolicyMode;
use viola_api::adaptation::PolicyView;

/// The `[policy]` table of the manager's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// A policy name the simulator accepts (`viola`, `thr-mmt-0.8`, `marinescu-a`, ...).
    pub name: String,
    pub mode: PolicyMode,
    /// Seconds between decisions.
    pub period_s: f64,
    /// Migrations run at the same time (one planner stage at most this many).
    pub max_parallel: usize,
    /// A VM that moved is not chosen again for this long.
    pub cooldown_s: f64,
    /// A destination a move to which failed is avoided for this long.
    pub avoid_failed_s: f64,
    /// MIPS of one host CPU: the unit the policies count CPU in.
    pub pe_mips: f64,
    /// Each host's NIC, Mbit/s (migration time estimates).
    pub bw_mbps: f64,
    /// Bandwidth of one cross-site migration, Mbit/s (migration time estimates).
    pub wan_mbps: f64,
    /// Parameters of the `viola` policy.
    pub viola: ViolaParams,
    /// Vertical scaling of capped VMs, in front of whichever policy places them.
    pub vertical: VerticalParams,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            name: "viola".into(),
            // Advise: a manager upgraded in place records what it would do and moves nothing
            // until an operator, having read `viola decisions`, switches to `act`.
            mode: PolicyMode::Advise,
            period_s: 60.0,
            max_parallel: 2,
            cooldown_s: 600.0,
            avoid_failed_s: 1800.0,
            pe_mips: 1000.0,
            bw_mbps: 1000.0,
            wan_mbps: 100.0,
            viola: ViolaParams::default(),
            vertical: VerticalParams::default(),
        }
    }
}

/// Why the `[policy]` table cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyConfigError {
    #[error("policy.name")]
    Name(#[from] PolicyNameError),
    #[error("policy.{field} must be positive, not {value}")]
    NotPositive { field: &'static str, value: f64 },
    #[error("policy.vertical.{field} must be {range}, not {value}")]
    OutOfRange {
        field: &'static str,
        range: &'static str,
        value: f64,
    },
}

impl PolicyConfig {
    /// The configured policy, with its parameters.
    pub fn build(&self) -> Result<Box<dyn Policy>, PolicyConfigError> {
        for (field, value) in [
            ("period_s", self.period_s),
            ("pe_mips", self.pe_mips),
            ("bw_mbps", self.bw_mbps),
            ("wan_mbps", self.wan_mbps),
        ] {
            if !(value > 0.0 && value.is_finite()) {
                return Err(PolicyConfigError::NotPositive { field, value });
            }
        }
        let v = &self.vertical;
        for (field, range, value, ok) in [
            (
                "at_cap",
                "in (0, 1]",
                v.at_cap,
                v.at_cap > 0.0 && v.at_cap <= 1.0,
            ),
            (
                "raise_factor",
                "above 1",
                v.raise_factor,
                v.raise_factor > 1.0,
            ),
            (
                "host_target",
                "in (0, 1]",
                v.host_target,
                v.host_target > 0.0 && v.host_target <= 1.0,
            ),
            (
                "quiet",
                "in (0, 1)",
                v.quiet,
                v.quiet > 0.0 && v.quiet < 1.0,
            ),
            (
                "quiet_periods",
                "at least 1",
                v.quiet_periods as f64,
                v.quiet_periods >= 1,
            ),
            ("cooldown_s", "0 or more", v.cooldown_s, v.cooldown_s >= 0.0),
        ] {
            if !ok || !value.is_finite() {
                return Err(PolicyConfigError::OutOfRange {
                    field,
                    range,
                    value,
                });
            }
        }
        let placement: Box<dyn Policy> = if self.name == "viola" {
            Box::new(policy::viola::Viola::new(self.viola.clone()))
        } else {
            policy::by_name(&self.name)?
        };
        Ok(Box::new(Vertical::new(self.vertical.clone(), placement)))
    }

    /// What `viola policy show` prints.
    pub fn view(&self) -> PolicyView {
        let mut parameters = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = parameters.as_object_mut() {
            for shown in ["name", "mode", "period_s"] {
                map.remove(shown);
            }
            if self.name != "viola" {
                map.remove("viola");
            }
        }
        PolicyView {
            policy: self.name.clone(),
            mode: self.mode,
            period_s: self.period_s,
            parameters,
        }
    }

    pub(crate) fn observe_params(&self) -> ObserveParams {
        ObserveParams {
            period_ms: (self.period_s * 1000.0) as u64,
            pe_mips: self.pe_mips,
            bw_mbps: self.bw_mbps,
            wan_mbps: self.wan_mbps,
        }
    }
}
