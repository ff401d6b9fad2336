//! Tenants: who may see and change which violins and VMs, and how much each tenant may hold.
//!
//! - A user's certificate (`viola-ca issue-user`, role `user`) names a tenant: the manager
//!   treats such a caller as [`Caller::Tenant`]. Certificates of role `cli` (and other
//!   managers) are administrators ([`Caller::Admin`]) and see everything.
//! - A violin made by a tenant belongs to it; its VMs belong to it too. A tenant sees only its
//!   own violins and VMs, and a request that names anything else is answered as if it did not
//!   exist (so tenants learn nothing of each other's names beyond "that name is taken" on a
//!   create: names are unique in the federation because they become domain names).
//! - Quotas (`[[tenants]]` in the manager's configuration): violins, VMs, vCPUs and memory.
//!   A tenant that is not configured may do nothing. [`check_quota`] is pure; the caller
//!   holds the manager's allocation lock between the check and the record, so two requests
//!   at once cannot together exceed a quota.

use serde::{Deserialize, Serialize};
use viola_common::identity::{PeerIdentity, Role};

use crate::inventory::ViolinRecord;

/// Who sent a request, as far as ownership goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Sees and changes everything.
    Admin,
    /// Sees and changes only what belongs to this tenant.
    Tenant(String),
}

impl Caller {
    /// The caller a peer's certificate makes (`None`: a role that may not send user requests).
    pub fn of(peer: &PeerIdentity) -> Option<Self> {
        match peer.role {
            Role::Cli | Role::Adaptmgr => Some(Self::Admin),
            Role::User => peer.tenant().map(|t| Self::Tenant(t.to_owned())),
            _ => None,
        }
    }

    /// The tenant, for a tenant's caller.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Self::Admin => None,
            Self::Tenant(t) => Some(t),
        }
    }

    /// Whether this caller may see and change what `owner` owns (`None`: the federation's,
    /// made by an administrator).
    pub fn owns(&self, owner: Option<&str>) -> bool {
        match self {
            Self::Admin => true,
            Self::Tenant(t) => owner == Some(t.as_str()),
        }
    }

    /// Whether this caller may see and change `violin`.
    pub fn owns_violin(&self, violin: &ViolinRecord) -> bool {
        self.owns(violin.tenant.as_deref())
    }
}

/// One tenant and its quotas (`[[tenants]]`); a quota left out is unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// As named in its users' certificates (`viola-ca issue-user --tenant NAME`).
    pub name: String,
    pub max_violins: Option<u32>,
    pub max_vms: Option<u32>,
    pub max_vcpus: Option<u32>,
    pub max_memory_mib: Option<u64>,
}

/// What a tenant holds (or a request adds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub violins: u32,
    pub vms: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// What `tenant` holds: its violins and their VMs at the size they were made with.
pub fn usage_of(tenant: &str, violins: &[ViolinRecord]) -> Usage {
    let mut u = Usage::default();
    for v in violins
        .iter()
        .filter(|v| v.tenant.as_deref() == Some(tenant))
    {
        u.violins += 1;
        for m in &v.members {
            u.vms += 1;
            u.vcpus += m.vcpus;
            u.memory_mib += m.memory_mib;
        }
    }
    u
}

/// A request that would take a tenant over one of its quotas.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "tenant {tenant}'s quota of {limit} {what} would be exceeded (it holds {used}, the request adds {asked})"
)]
pub struct QuotaExceeded {
    pub tenant: String,
    /// "violins", "VMs", "vCPUs" or "MiB of memory".
    pub what: &'static str,
    pub limit: u64,
    pub used: u64,
    pub asked: u64,
}

/// Ok if `used + add` stays within every quota of `tenant`.
pub fn check_quota(tenant: &TenantConfig, used: Usage, add: Usage) -> Result<(), QuotaExceeded> {
    let checks: [(&'static str, Option<u64>, u64, u64); 4] = [
        (
            "violins",
            tenant.max_violins.map(u64::from),
            used.violins.into(),
            add.violins.into(),
        ),
        (
            "VMs",
            tenant.max_vms.map(u64::from),
            used.vms.into(),
            add.vms.into(),
        ),
        (
            "vCPUs",
            tenant.max_vcpus.map(u64::from),
            used.vcpus.into(),
            add.vcpus.into(),
        ),
        (
            "MiB of memory",
            tenant.max_memory_mib,
            used.memory_mib,
            add.memory_mib,
        ),
    ];
    for (what, limit, used, asked) in checks {
        if let Some(limit) = limit
            && asked > 0
            && used.saturating_add(asked) > limit
        {
            return Err(QuotaExceeded {
                tenant: tenant.name.clone(),
                what,
                limit,
                used,
                asked,
            });
        }
    }
    Ok(())
}

/// A `[[tenants]]` table that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantConfigError {
    #[error("tenant name {0:?}: use 1-63 characters of a-z, 0-9 and '-' (as in a certificate)")]
    BadName(String),
    #[error("tenant {0:?} is listed twice")]
    Duplicate(String),
}

/// Checks the `[[tenants]]` tables: certificate-compatible, unique names.
pub fn check_tenants(tenants: &[TenantConfig]) -> Result<(), TenantConfigError> {
    let mut seen = std::collections::BTreeSet::new();
    for t in tenants {
        if PeerIdentity::new(Role::User, &t.name, "x").is_err() {
            return Err(TenantConfigError::BadName(t.name.clone()));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(TenantConfigError::Duplicate(t.name.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::MemberRecord;

    fn violin(name: &str, tenant: Option<&str>, vms: &[(u32, u64)]) -> ViolinRecord {
        ViolinRecord {
            name: name.into(),
            vni: 1,
            vms: Vec::new(),
            subnet: Some("10.1.0.0/24".into()),
            sites: vec!["a".into()],
            managed: true,
            members: vms
                .iter()
                .enumerate()
                .map(|(i, &(vcpus, memory_mib))| MemberRecord {
                    vm: format!("{name}-{i}"),
                    mac: format!("02:00:00:00:00:{i:02x}"),
                    ip: std::net::Ipv4Addr::new(10, 1, 0, 2 + i as u8),
                    host: "a1".into(),
                    image: "guest".into(),
                    vcpus,
                    memory_mib,
                })
                .collect(),
            tenant: tenant.map(Into::into),
            mtu: None,
        }
    }

    #[test]
    fn callers_from_certificates() {
        let id = |role, site, host| PeerIdentity::new(role, site, host).unwrap();
        assert_eq!(Caller::of(&id(Role::Cli, "fed", "op")), Some(Caller::Admin));
        assert_eq!(
            Caller::of(&id(Role::User, "physics", "ann")),
            Some(Caller::Tenant("physics".into()))
        );
        assert_eq!(Caller::of(&id(Role::Monitor, "a", "a1")), None);
        assert_eq!(Caller::of(&id(Role::Overlay, "a", "a1")), None);
    }

    #[test]
    fn a_tenant_owns_only_its_own() {
        let t = Caller::Tenant("physics".into());
        assert!(t.owns(Some("physics")));
        assert!(!t.owns(Some("chem")));
        assert!(!t.owns(None), "the federation's violins are not a tenant's");
        assert!(Caller::Admin.owns(Some("chem")) && Caller::Admin.owns(None));
    }

    #[test]
    fn usage_counts_a_tenants_violins_and_vms_only() {
        let violins = [
            violin("p1", Some("physics"), &[(2, 512), (1, 256)]),
            violin("p2", Some("physics"), &[]),
            violin("c1", Some("chem"), &[(8, 8192)]),
            violin("fed", None, &[(4, 4096)]),
        ];
        assert_eq!(
            usage_of("physics", &violins),
            Usage {
                violins: 2,
                vms: 2,
                vcpus: 3,
                memory_mib: 768
            }
        );
        assert_eq!(usage_of("bio", &violins), Usage::default());
    }

    #[test]
    fn quotas_refuse_what_would_exceed_them_and_name_it() {
        let t = TenantConfig {
            name: "physics".into(),
            max_violins: Some(1),
            max_vms: Some(4),
            max_vcpus: Some(6),
            max_memory_mib: None,
        };
        let used = Usage {
            violins: 1,
            vms: 2,
            vcpus: 4,
            memory_mib: 1 << 20,
        };
        let vm = |n: u32, vcpus: u32| Usage {
            vms: n,
            vcpus: n * vcpus,
            memory_mib: 256 * u64::from(n),
            ..Usage::default()
        };
        check_quota(&t, used, vm(2, 1)).unwrap();
        let e = check_quota(&t, used, vm(3, 1)).unwrap_err();
        assert_eq!((e.what, e.limit, e.used, e.asked), ("VMs", 4, 2, 3));
        let e = check_quota(&t, used, vm(1, 3)).unwrap_err();
        assert_eq!(e.what, "vCPUs");
        assert!(e.to_string().contains("quota of 6 vCPUs"), "{e}");
        let e = check_quota(
            &t,
            used,
            Usage {
                violins: 1,
                ..Usage::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.what, "violins");
        // Already over (an administrator resized): a request that adds nothing there passes.
        let over = Usage { vcpus: 9, ..used };
        check_quota(
            &t,
            over,
            Usage {
                memory_mib: 1,
                ..Usage::default()
            },
        )
        .unwrap();
    }

    #[test]
    fn tenant_tables_are_checked() {
        let t = |name: &str| TenantConfig {
            name: name.into(),
            max_violins: None,
            max_vms: None,
            max_vcpus: None,
            max_memory_mib: None,
        };
        check_tenants(&[t("physics"), t("chem")]).unwrap();
        assert_eq!(
            check_tenants(&[t("physics"), t("physics")]),
            Err(TenantConfigError::Duplicate("physics".into()))
        );
        assert!(matches!(
            check_tenants(&[t("Physics Dept")]),
            Err(TenantConfigError::BadName(_))
        ));
    }
}
