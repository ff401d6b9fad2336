//! What one viewer's page shows, built from the manager's records with the same ownership
//! rules as the CLI ([`Caller`]): a tenant sees its own violins, their VMs and those VMs'
//! migrations and history, and nothing of the hosts, the links, the policy or other tenants.

use std::collections::{BTreeMap, BTreeSet};

use viola_api::adaptation::DecisionRecord;
use viola_api::dashboard::{HistoryView, LinkView, MigrationDone, Overview, SiteOverview, Viewer};
use viola_api::manager::HostView;
use viola_api::migration::{MigrationReport, Outcome};

use crate::history::Range;
use crate::inventory::{EventRecord, HostRecord, InventoryError};
use crate::lifecycle;
use crate::manager::{Manager, lock};
use crate::tenants::Caller;

/// Finished migrations the page lists.
const RECENT_MIGRATIONS: usize = 25;
/// Events read to find them (a migration is one event among resizes and host events).
const EVENTS_SCANNED: usize = 2_000;
/// Decisions the page lists.
const RECENT_DECISIONS: usize = 25;

/// The overview for `caller` at `now_ms`.
pub fn overview(
    manager: &Manager,
    caller: &Caller,
    viewer: Viewer,
    now_ms: u64,
) -> Result<Overview, InventoryError> {
    let inv = &manager.inventory;
    let hosts = inv.hosts()?;
    let violins = inv.violins()?;
    let mut vms = lifecycle::vm_views(caller, &inv.vms()?, &violins);
    for vm in &mut vms {
        vm.domain_xml = None;
    }
    let visible: BTreeSet<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    let admin = caller.tenant().is_none();
    let decisions: Vec<DecisionRecord> = if admin {
        let mut d = inv.recent_decisions(RECENT_DECISIONS)?;
        d.reverse();
        d
    } else {
        Vec::new()
    };
    let migrations = finished_migrations(&inv.recent_events(EVENTS_SCANNED)?, &hosts);
    let links = if admin {
        links(&hosts, &migrations)
    } else {
        Vec::new()
    };
    let mut recent: Vec<MigrationDone> = migrations
        .into_iter()
        .rev()
        .filter(|m| visible.contains(m.vm.as_str()))
        .take(RECENT_MIGRATIONS)
        .collect();
    for m in &mut recent {
        m.decision = decision_of(m, &decisions);
    }
    Ok(Overview {
        generated_ms: now_ms,
        viewer,
        sites: if admin { sites(&hosts) } else { Vec::new() },
        links,
        violins: manager.list_violins(caller)?,
        migrations_in_flight: manager
            .migrations_in_flight()
            .into_iter()
            .filter(|m| visible.contains(m.vm.as_str()))
            .collect(),
        migrations_recent: recent,
        vms,
        decisions,
        policy: admin.then(|| manager.cfg.policy.view()),
    })
}

/// The history `caller` may see: every series for an administrator; only its own VMs' for a
/// tenant.
pub fn history(
    manager: &Manager,
    caller: &Caller,
    prefix: &str,
    range: Range,
    now_ms: u64,
) -> Result<HistoryView, InventoryError> {
    let own: Option<BTreeSet<String>> = match caller {
        Caller::Admin => None,
        Caller::Tenant(_) => {
            let violins = manager.inventory.violins()?;
            Some(
                lifecycle::vm_views(caller, &manager.inventory.vms()?, &violins)
                    .into_iter()
                    .map(|v| v.name)
                    .collect(),
            )
        }
    };
    let vm_visible = |vm: &str| own.as_ref().is_none_or(|own| own.contains(vm));
    let series_visible = |name: &str| match &own {
        None => true,
        Some(_) => name
            .strip_prefix("vm/")
            .and_then(|rest| rest.split('/').next())
            .is_some_and(vm_visible),
    };
    let hosts = manager.inventory.hosts()?;
    let finished = finished_migrations(&manager.inventory.recent_events(EVENTS_SCANNED)?, &hosts);
    let per_hour = migrations_per_hour(finished.iter().filter(|m| vm_visible(&m.vm)), now_ms);
    let h = lock(&manager.history);
    Ok(HistoryView {
        range: range.as_str().to_owned(),
        series: h.query(prefix, range, now_ms, series_visible),
        placements: h.placements(range, now_ms, vm_visible),
        migrations_per_hour: per_hour,
    })
}

const HOUR_MS: u64 = 3_600_000;

/// Counts of `migrations` finished in each of the 24 hours up to the one `now_ms` is in.
fn migrations_per_hour<'a>(
    migrations: impl Iterator<Item = &'a MigrationDone>,
    now_ms: u64,
) -> Vec<(u64, u32)> {
    let current = now_ms - now_ms % HOUR_MS;
    let first = current.saturating_sub(23 * HOUR_MS);
    let mut out: Vec<(u64, u32)> = (0..24).map(|i| (first + i * HOUR_MS, 0)).collect();
    for m in migrations.filter(|m| m.finished_ms >= first) {
        let i = ((m.finished_ms - first) / HOUR_MS) as usize;
        if let Some(slot) = out.get_mut(i) {
            slot.1 += 1;
        }
    }
    out
}

fn sites(hosts: &[HostRecord]) -> Vec<SiteOverview> {
    let mut by_site: BTreeMap<&str, Vec<HostView>> = BTreeMap::new();
    for h in hosts {
        by_site.entry(&h.site).or_default().push(h.view());
    }
    by_site
        .into_iter()
        .map(|(name, hosts)| SiteOverview {
            name: name.to_owned(),
            hosts,
        })
        .collect()
}

/// The migrations among `events`, oldest first, with host names for the hypervisor URIs.
pub fn finished_migrations(events: &[EventRecord], hosts: &[HostRecord]) -> Vec<MigrationDone> {
    let host_of = |uri: &str| {
        hosts
            .iter()
            .find(|h| h.libvirt_uri == uri)
            .map_or_else(|| uri.to_owned(), |h| h.name.clone())
    };
    events
        .iter()
        .filter(|e| e.kind == "migration")
        .filter_map(|e| {
            let report: MigrationReport = serde_json::from_value(e.detail.clone()).ok()?;
            let started_ms = report.records.first().map_or(e.ts_ms, |r| r.started_ms);
            let (outcome, reason) = match &report.outcome {
                Outcome::Migrated { .. } => ("migrated", None),
                Outcome::RolledBack { reason } => ("rolled_back", Some(reason.clone())),
                Outcome::Stuck { reason } => ("stuck", Some(reason.clone())),
            };
            Some(MigrationDone {
                vm: report.plan.vm.clone(),
                from: host_of(&report.plan.source_uri),
                to: host_of(&report.plan.dest_uri),
                started_ms,
                finished_ms: e.ts_ms,
                outcome: outcome.to_owned(),
                reason,
                downtime_ms: report.completed.as_ref().and_then(|c| c.downtime_ms),
                bytes: report.completed.as_ref().map(|c| c.data_processed),
                decision: None,
            })
        })
        .collect()
}

/// The newest decision, made before `m` started, that ordered this move.
fn decision_of(m: &MigrationDone, decisions: &[DecisionRecord]) -> Option<u64> {
    decisions
        .iter()
        .filter(|d| d.ts_ms <= m.started_ms + 1_000)
        .find(|d| {
            d.actions.iter().any(|a| {
                a.action == "migrate"
                    && a.vm.as_deref() == Some(m.vm.as_str())
                    && a.to.as_deref() == Some(m.to.as_str())
            })
        })
        .map(|d| d.seq)
}

/// Every pair of sites, with the migrations Viola saw cross between them.
fn links(hosts: &[HostRecord], migrations: &[MigrationDone]) -> Vec<LinkView> {
    let site_of = |host: &str| {
        hosts
            .iter()
            .find(|h| h.name == host)
            .map(|h| h.site.as_str())
    };
    let sites: BTreeSet<&str> = hosts.iter().map(|h| h.site.as_str()).collect();
    let sites: Vec<&str> = sites.into_iter().collect();
    let mut out = Vec::new();
    for (i, a) in sites.iter().enumerate() {
        for b in &sites[i + 1..] {
            let across: Vec<&MigrationDone> = migrations
                .iter()
                .filter(|m| {
                    let ends = (site_of(&m.from), site_of(&m.to));
                    ends == (Some(a), Some(b)) || ends == (Some(b), Some(a))
                })
                .collect();
            let last = across.iter().rev().find(|m| m.outcome == "migrated");
            out.push(LinkView {
                a: (*a).to_owned(),
                b: (*b).to_owned(),
                migrations: across.len() as u32,
                last_goodput_mbit_s: last.and_then(|m| {
                    let ms = m.finished_ms.saturating_sub(m.started_ms);
                    (ms > 0).then(|| m.bytes.unwrap_or(0) as f64 * 8.0 / ms as f64 / 1_000.0)
                }),
                last_ms: last.map(|m| m.finished_ms),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use viola_api::adaptation::{ActionOutcome, ActionRecord, PolicyMode, StateBrief};
    use viola_api::domain::{JobProgress, StorageCopy};
    use viola_api::manager::HostState;
    use viola_api::migration::{MigrationPlan, StepRecord};

    fn host(name: &str, site: &str) -> HostRecord {
        HostRecord {
            name: name.into(),
            site: site.into(),
            libvirt_uri: format!("qemu+tls://{name}/system"),
            migration_uri: String::new(),
            cpus: 2,
            memory_kib: 0,
            state: HostState::Up,
            last_heartbeat_ms: None,
            last_report_seq: 0,
            usage: None,
        }
    }

    fn migration_event(seq: u64, vm: &str, from: &str, to: &str, outcome: Outcome) -> EventRecord {
        let report = MigrationReport {
            plan: MigrationPlan {
                vm: vm.into(),
                source_uri: format!("qemu+tls://{from}/system"),
                dest_uri: format!("qemu+tls://{to}/system"),
                dest_migration_uri: String::new(),
                stage_base: true,
                timeout_ms: 0,
                tuning: Default::default(),
            },
            outcome,
            storage: StorageCopy::Incremental,
            records: vec![StepRecord {
                action: "migrate".into(),
                started_ms: seq * 10_000,
                finished_ms: seq * 10_000 + 8_000,
                result: "ok".into(),
            }],
            completed: Some(JobProgress {
                data_processed: 100_000_000,
                downtime_ms: Some(120),
                ..JobProgress::default()
            }),
        };
        EventRecord {
            seq,
            ts_ms: seq * 10_000 + 8_000,
            kind: "migration".into(),
            subject: vm.into(),
            detail: serde_json::to_value(report).unwrap(),
        }
    }

    #[test]
    fn migrations_read_from_events_carry_host_names_and_figures_and_feed_the_links() {
        let hosts = [host("a1", "a"), host("a2", "a"), host("b1", "b")];
        let events = [
            migration_event(
                1,
                "g1",
                "a1",
                "b1",
                Outcome::Migrated {
                    storage: StorageCopy::Incremental,
                },
            ),
            EventRecord {
                seq: 2,
                ts_ms: 1,
                kind: "vm_resized".into(),
                subject: "g1".into(),
                detail: serde_json::Value::Null,
            },
            migration_event(
                3,
                "g2",
                "a1",
                "a2",
                Outcome::RolledBack {
                    reason: "destination refused".into(),
                },
            ),
        ];
        let done = finished_migrations(&events, &hosts);
        assert_eq!(done.len(), 2);
        assert_eq!((done[0].from.as_str(), done[0].to.as_str()), ("a1", "b1"));
        assert_eq!(done[0].downtime_ms, Some(120));
        assert_eq!(done[0].finished_ms - done[0].started_ms, 8_000);
        assert_eq!(done[1].outcome, "rolled_back");
        assert_eq!(done[1].reason.as_deref(), Some("destination refused"));

        let links = links(&hosts, &done);
        assert_eq!(links.len(), 1, "sites a and b");
        assert_eq!(
            links[0].migrations, 1,
            "the move within site a does not cross"
        );
        // 100 MB in 8 s.
        assert_eq!(links[0].last_goodput_mbit_s, Some(100.0));
    }

    #[test]
    fn migrations_are_counted_in_their_hour() {
        let hosts = [host("a1", "a"), host("b1", "b")];
        let moved = Outcome::Migrated {
            storage: StorageCopy::Incremental,
        };
        let done = finished_migrations(
            &[
                migration_event(1, "g1", "a1", "b1", moved.clone()),
                migration_event(8_000, "g1", "b1", "a1", moved.clone()),
                migration_event(8_001, "g1", "a1", "b1", moved.clone()),
                migration_event(8_640, "g1", "b1", "a1", moved),
            ],
            &hosts,
        );
        // 24 h and 10 s after the epoch: the first one is more than a day old.
        let now = 8_640 * 10_000 + 10_000;
        let counts = migrations_per_hour(done.iter(), now);
        assert_eq!(counts.len(), 24);
        assert_eq!(counts[0].0, HOUR_MS);
        assert_eq!(counts.iter().map(|c| c.1).sum::<u32>(), 3);
        assert_eq!(
            counts[23].1, 1,
            "the one at 86,408 s is in the current hour"
        );
        assert_eq!(counts[21].1, 2, "80,008 s and 80,018 s are in hour 22");
    }

    #[test]
    fn a_migration_is_linked_to_the_decision_that_ordered_it() {
        let hosts = [host("a1", "a"), host("b1", "b")];
        let m = &finished_migrations(
            &[migration_event(
                50,
                "g1",
                "a1",
                "b1",
                Outcome::Migrated {
                    storage: StorageCopy::Incremental,
                },
            )],
            &hosts,
        )[0];
        let decision = |seq, ts_ms, vm: &str, to: &str| DecisionRecord {
            seq,
            ts_ms,
            policy: "viola".into(),
            mode: PolicyMode::Act,
            state: StateBrief::default(),
            actions: vec![ActionRecord::migration(
                Some(vm.into()),
                Some("a1".into()),
                Some(to.into()),
                "a1 overloaded".into(),
                Some(0),
                ActionOutcome::DONE,
            )],
        };
        // Newest first, as the overview keeps them.
        let decisions = [
            decision(9, m.started_ms + 60_000, "g1", "b1"),
            decision(8, m.started_ms - 200, "g1", "b1"),
            decision(7, m.started_ms - 100_000, "g1", "b1"),
            decision(6, m.started_ms - 300, "g2", "b1"),
        ];
        assert_eq!(decision_of(m, &decisions), Some(8));
        assert_eq!(decision_of(m, &decisions[3..]), None);
    }
}
