//! The inventory's records, logs and journal, written once over the storage trait
//! ([`Backend`]).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::backend::{
    Backend, BackendError, Durability, Entry, Scan, Table, Write, history_key, parse_history_key,
    parse_seq_key, seq_key,
};
use super::redb_backend::RedbBackend;
use super::{
    EventRecord, HostRecord, HostState, PendingOp, SAMPLES_KEPT, Sample, SampleHistories,
    SampleKey, SiteRecord, ViolinRecord, VmRecord,
};
use crate::history::{History, HistoryWrite};
use viola_api::adaptation::{ActionOutcome, DecisionRecord};
use viola_api::dashboard::Placement;
use viola_api::manager::{HostReport, ProbeResult};

/// Decisions kept; older ones are dropped as new ones come (a year of hourly moves).
const DECISIONS_KEPT: u64 = 10_000;
/// Events kept (migrations, resizes, host events; a migration's is its whole report, a few KB);
/// older ones are dropped as new ones come.
const EVENTS_KEPT: u64 = 20_000;

/// Why the inventory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot open inventory {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("inventory store ({store}) failed")]
    Store {
        store: String,
        #[source]
        source: BackendError,
    },
    #[error("inventory record {key:?} is corrupt")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "inventory sample series {key:?} is corrupt ({len} bytes is no whole number of samples)"
    )]
    CorruptSamples { key: String, len: usize },
    #[error("cannot encode inventory record {key:?}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the configuration conflicts with the inventory: {0}")]
    Conflict(String),
}

impl InventoryError {
    /// The store refused a write because another manager leads now.
    pub fn is_not_leader(&self) -> bool {
        matches!(
            self,
            Self::Store {
                source: BackendError::NotLeader { .. },
                ..
            }
        )
    }
}

/// The persistent inventory. Cheap to share behind an `Arc`.
///
/// Every write goes through one lock, and a read-modify-write (a report folded into its host
/// and VMs, a log append) holds it from its read to its commit: the storage trait has no
/// read-write transactions (etcd's are compare-and-swap), and this manager is the store's only
/// writer (the replicated store's leader fences the others out).
pub struct Inventory {
    backend: Box<dyn Backend>,
    writer: Mutex<()>,
}

impl Inventory {
    /// Opens (or creates) the embedded inventory file at `path`.
    pub fn open(path: &Path) -> Result<Self, InventoryError> {
        let backend = RedbBackend::open(path).map_err(|source| InventoryError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::with_backend(Box::new(backend)))
    }

    /// The inventory kept in `backend`.
    pub fn with_backend(backend: Box<dyn Backend>) -> Self {
        Self {
            backend,
            writer: Mutex::new(()),
        }
    }

    /// What the inventory is kept in.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    fn store(&self, source: BackendError) -> InventoryError {
        InventoryError::Store {
            store: self.backend.describe(),
            source,
        }
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // A writer that panicked left no half-made batch (batches are atomic): go on.
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Commits `writes`; the caller holds the writer lock.
    fn commit_locked(
        &self,
        _writer: &MutexGuard<'_, ()>,
        writes: &[Write],
        durability: Durability,
    ) -> Result<(), InventoryError> {
        self.backend
            .commit(writes, durability)
            .map_err(|e| self.store(e))
    }

    fn commit(&self, writes: &[Write]) -> Result<(), InventoryError> {
        let writer = self.lock();
        self.commit_locked(&writer, writes, Durability::Durable)
    }

    fn raw(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, InventoryError> {
        self.backend.get(table, key).map_err(|e| self.store(e))
    }

    fn scan(&self, table: Table, scan: Scan<'_>) -> Result<Vec<Entry>, InventoryError> {
        self.backend.scan(table, scan).map_err(|e| self.store(e))
    }

    fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), InventoryError> {
        self.commit(&[put(table, key, encode(value, key)?)])
    }

    fn remove(&self, table: Table, key: &str) -> Result<(), InventoryError> {
        self.commit(&[Write::Delete {
            table,
            key: key.as_bytes().to_vec(),
        }])
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<T>, InventoryError> {
        match self.raw(table, key.as_bytes())? {
            Some(bytes) => decode(&bytes, key).map(Some),
            None => Ok(None),
        }
    }

    fn all<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, InventoryError> {
        self.scan(table, Scan::ALL)?
            .iter()
            .map(|(k, v)| decode(v, String::from_utf8_lossy(k)))
            .collect()
    }

    pub fn put_site(&self, site: &SiteRecord) -> Result<(), InventoryError> {
        self.put(Table::Sites, &site.name, site)
    }

    pub fn sites(&self) -> Result<Vec<SiteRecord>, InventoryError> {
        self.all(Table::Sites)
    }

    pub fn put_host(&self, host: &HostRecord) -> Result<(), InventoryError> {
        self.put(Table::Hosts, &host.name, host)
    }

    pub fn host(&self, name: &str) -> Result<Option<HostRecord>, InventoryError> {
        self.get(Table::Hosts, name)
    }

    pub fn hosts(&self) -> Result<Vec<HostRecord>, InventoryError> {
        self.all(Table::Hosts)
    }

    pub fn put_vm(&self, vm: &VmRecord) -> Result<(), InventoryError> {
        self.put(Table::Vms, &vm.name, vm)
    }

    pub fn vm(&self, name: &str) -> Result<Option<VmRecord>, InventoryError> {
        self.get(Table::Vms, name)
    }

    pub fn vms(&self) -> Result<Vec<VmRecord>, InventoryError> {
        self.all(Table::Vms)
    }

    /// Forgets a VM and its samples.
    pub fn remove_vm(&self, name: &str) -> Result<(), InventoryError> {
        self.commit(&[
            Write::Delete {
                table: Table::Vms,
                key: name.as_bytes().to_vec(),
            },
            Write::Delete {
                table: Table::Samples,
                key: SampleKey::Vm(name).encode().into_bytes(),
            },
        ])
    }

    /// Records where the migration of `vm` stands (replaces the previous snapshot).
    pub fn put_migration<T: Serialize>(
        &self,
        vm: &str,
        snapshot: &T,
    ) -> Result<(), InventoryError> {
        self.put(Table::Migrations, vm, snapshot)
    }

    /// Every migration recorded as in progress.
    pub fn migrations<T: DeserializeOwned>(&self) -> Result<Vec<T>, InventoryError> {
        self.all(Table::Migrations)
    }

    /// Forgets the migration of `vm` (it ended).
    pub fn remove_migration(&self, vm: &str) -> Result<(), InventoryError> {
        self.remove(Table::Migrations, vm)
    }

    pub fn put_violin(&self, violin: &ViolinRecord) -> Result<(), InventoryError> {
        self.put(Table::Violins, &violin.name, violin)
    }

    pub fn violins(&self) -> Result<Vec<ViolinRecord>, InventoryError> {
        self.all(Table::Violins)
    }

    pub fn violin(&self, name: &str) -> Result<Option<ViolinRecord>, InventoryError> {
        self.get(Table::Violins, name)
    }

    pub fn remove_violin(&self, name: &str) -> Result<(), InventoryError> {
        self.remove(Table::Violins, name)
    }

    /// Journals a create or delete before its first action (replaces an earlier entry).
    pub fn put_pending(&self, op: &PendingOp) -> Result<(), InventoryError> {
        self.put(Table::Pending, &op.vm, op)
    }

    /// Every create or delete journaled as in progress.
    pub fn pending(&self) -> Result<Vec<PendingOp>, InventoryError> {
        self.all(Table::Pending)
    }

    pub fn remove_pending(&self, vm: &str) -> Result<(), InventoryError> {
        self.remove(Table::Pending, vm)
    }

    /// Appends an event; returns it with its sequence number.
    pub fn record(
        &self,
        ts_ms: u64,
        kind: &str,
        subject: &str,
        detail: serde_json::Value,
    ) -> Result<EventRecord, InventoryError> {
        self.append(Table::Events, EVENTS_KEPT, "event", |seq| EventRecord {
            seq,
            ts_ms,
            kind: kind.to_owned(),
            subject: subject.to_owned(),
            detail,
        })
        .map(|(_, event)| event)
    }

    /// Events with a sequence number above `after`, oldest first.
    pub fn events_after(&self, after: u64) -> Result<Vec<EventRecord>, InventoryError> {
        self.after(Table::Events, after, usize::MAX, "event")
    }

    /// Folds a monitor report into the host and its VMs, in one batch. Reports older than the
    /// last one seen from that host are ignored (returns false).
    pub fn apply_report(&self, report: &HostReport, now_ms: u64) -> Result<bool, InventoryError> {
        let writer = self.lock();
        let mut host = match self.get::<HostRecord>(Table::Hosts, &report.host)? {
            Some(h) if h.last_report_seq >= report.seq && report.seq != 0 => return Ok(false),
            Some(h) => h,
            None => HostRecord {
                name: report.host.clone(),
                site: report.site.clone(),
                libvirt_uri: String::new(),
                migration_uri: String::new(),
                cpus: report.usage.cpus,
                memory_kib: report.usage.mem_total_kib,
                state: HostState::Unknown,
                last_heartbeat_ms: None,
                last_report_seq: 0,
                usage: None,
            },
        };
        host.last_report_seq = report.seq;
        host.last_heartbeat_ms = Some(now_ms);
        if host.cpus == 0 {
            host.cpus = report.usage.cpus;
        }
        if host.memory_kib == 0 {
            host.memory_kib = report.usage.mem_total_kib;
        }
        host.usage = Some(report.usage.clone());
        let mut writes = vec![put(Table::Hosts, &host.name, encode(&host, &host.name)?)];

        writes.push(self.pushed_sample(
            SampleKey::Host(&report.host),
            Sample {
                ts_ms: now_ms,
                cpu_busy: report.usage.cpu_busy,
            },
        )?);
        for usage in &report.vms {
            writes.push(self.pushed_sample(
                SampleKey::Vm(&usage.name),
                Sample {
                    ts_ms: now_ms,
                    cpu_busy: usage.cpu_busy,
                },
            )?);
        }
        let probes = encode(&report.probes, format_args!("probes of {}", report.host))?;
        writes.push(put(Table::Probes, &report.host, probes));

        for usage in &report.vms {
            let old: Option<VmRecord> = self
                .raw(Table::Vms, usage.name.as_bytes())?
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            let mut vm = old.unwrap_or_else(|| VmRecord {
                name: usage.name.clone(),
                host: report.host.clone(),
                violin: None,
                macs: Vec::new(),
                state: usage.state,
                vcpus: usage.vcpus,
                max_vcpus: usage.max_vcpus,
                memory_kib: usage.memory_kib,
                max_memory_kib: usage.max_memory_kib,
                cpu_busy: 0.0,
                domain_xml: None,
                cap_percent: None,
                deadline: None,
                updated_ms: now_ms,
            });
            vm.host = report.host.clone();
            vm.state = usage.state;
            vm.vcpus = usage.vcpus;
            vm.max_vcpus = usage.max_vcpus;
            vm.memory_kib = usage.balloon_kib.unwrap_or(usage.memory_kib);
            vm.max_memory_kib = usage.max_memory_kib;
            vm.cpu_busy = usage.cpu_busy;
            vm.macs = usage.nics.iter().map(|n| n.mac.clone()).collect();
            vm.updated_ms = now_ms;
            writes.push(put(Table::Vms, &vm.name, encode(&vm, &vm.name)?));
        }
        self.commit_locked(&writer, &writes, Durability::Durable)?;
        Ok(true)
    }

    /// The write that adds `sample` in front of `key`'s samples, keeping [`SAMPLES_KEPT`].
    fn pushed_sample(&self, key: SampleKey<'_>, sample: Sample) -> Result<Write, InventoryError> {
        let key = key.encode();
        let mut bytes = encode_samples(&[sample]);
        if let Some(old) = self.raw(Table::Samples, key.as_bytes())? {
            // A corrupt series is only history: start it again rather than refuse the report.
            if old.len().is_multiple_of(SAMPLE_BYTES) {
                let keep = old.len().min((SAMPLES_KEPT - 1) * SAMPLE_BYTES);
                bytes.extend_from_slice(&old[..keep]);
            }
        }
        Ok(put(Table::Samples, &key, bytes))
    }

    /// Samples of one host or VM, newest first.
    pub fn samples(&self, key: SampleKey<'_>) -> Result<Vec<Sample>, InventoryError> {
        let key = key.encode();
        match self.raw(Table::Samples, key.as_bytes())? {
            Some(bytes) => decode_samples(&key, &bytes),
            None => Ok(Vec::new()),
        }
    }

    /// Every host's and VM's samples (what the policy loop reads each period).
    pub fn sample_histories(&self) -> Result<SampleHistories, InventoryError> {
        let mut out = SampleHistories::default();
        for (k, v) in self.scan(Table::Samples, Scan::ALL)? {
            let key = String::from_utf8_lossy(&k);
            let samples = decode_samples(&key, &v)?;
            if let Some(name) = key.strip_prefix("host/") {
                out.hosts.insert(name.to_owned(), samples);
            } else if let Some(name) = key.strip_prefix("vm/") {
                out.vms.insert(name.to_owned(), samples);
            }
        }
        Ok(out)
    }

    /// The last service-probe results a host's monitor sent.
    pub fn probes(&self, host: &str) -> Result<Vec<ProbeResult>, InventoryError> {
        Ok(self.get(Table::Probes, host)?.unwrap_or_default())
    }

    /// Appends a decision (its `seq` is assigned here); returns its sequence number.
    pub fn record_decision(&self, decision: &DecisionRecord) -> Result<u64, InventoryError> {
        let (seq, _) = self.append(Table::Decisions, DECISIONS_KEPT, "decision", |seq| {
            DecisionRecord {
                seq,
                ..decision.clone()
            }
        })?;
        Ok(seq)
    }

    /// Sets the outcome of action `index` of decision `seq` (no-op if either is gone).
    pub fn set_action_outcome(
        &self,
        seq: u64,
        index: usize,
        outcome: ActionOutcome,
    ) -> Result<(), InventoryError> {
        let writer = self.lock();
        let key = seq_key(seq);
        let Some(bytes) = self.raw(Table::Decisions, &key)? else {
            return Ok(());
        };
        let mut d: DecisionRecord = decode(&bytes, format_args!("decision {seq}"))?;
        let Some(action) = d.actions.get_mut(index) else {
            return Ok(());
        };
        action.outcome = outcome;
        let bytes = encode(&d, format_args!("decision {seq}"))?;
        self.commit_locked(
            &writer,
            &[Write::Put {
                table: Table::Decisions,
                key: key.to_vec(),
                value: bytes,
            }],
            Durability::Durable,
        )
    }

    /// Decisions with a sequence number above `after`, oldest first, at most `limit`.
    pub fn decisions_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DecisionRecord>, InventoryError> {
        self.after(Table::Decisions, after, limit, "decision")
    }
}

const SAMPLE_BYTES: usize = 16;

fn encode_samples(samples: &[Sample]) -> Vec<u8> {
    let mut out = Vec::with_capacity(samples.len() * SAMPLE_BYTES);
    for s in samples {
        out.extend_from_slice(&s.ts_ms.to_le_bytes());
        out.extend_from_slice(&s.cpu_busy.to_le_bytes());
    }
    out
}

fn decode_samples(key: &str, bytes: &[u8]) -> Result<Vec<Sample>, InventoryError> {
    if !bytes.len().is_multiple_of(SAMPLE_BYTES) {
        return Err(InventoryError::CorruptSamples {
            key: key.to_owned(),
            len: bytes.len(),
        });
    }
    Ok(bytes
        .chunks_exact(SAMPLE_BYTES)
        .map(|c| {
            let (ts, busy) = c.split_at(8);
            Sample {
                ts_ms: u64::from_le_bytes(ts.try_into().unwrap_or_default()),
                cpu_busy: f64::from_le_bytes(busy.try_into().unwrap_or_default()),
            }
        })
        .collect())
}

impl Inventory {
    /// Appends what [`History::record`](crate::history::History::record) returned, and
    /// forgets what its prune says, in one batch.
    pub fn write_history(&self, write: &HistoryWrite) -> Result<(), InventoryError> {
        let point = |table, (name, ts, v): &(String, u64, f64)| Write::Put {
            table,
            key: history_key(name, *ts),
            value: v.to_le_bytes().to_vec(),
        };
        let mut writes: Vec<Write> = write
            .fine
            .iter()
            .map(|p| point(Table::HistoryFine, p))
            .chain(
                write
                    .minutes
                    .iter()
                    .map(|p| point(Table::HistoryMinutes, p)),
            )
            .collect();
        if let Some(prune) = write.prune {
            writes.push(Write::DeleteBelow {
                table: Table::HistoryFine,
                end: prune.fine_before.to_be_bytes().to_vec(),
            });
            writes.push(Write::DeleteBelow {
                table: Table::HistoryMinutes,
                end: prune.minutes_before.to_be_bytes().to_vec(),
            });
        }
        for (vm, list) in &write.placements {
            writes.push(match list {
                Some(list) => put(
                    Table::Placements,
                    vm,
                    encode(list, format_args!("placements of {vm}"))?,
                ),
                None => Write::Delete {
                    table: Table::Placements,
                    key: vm.as_bytes().to_vec(),
                },
            });
        }
        // Samples are not worth an fsync each: the next durable commit (the report's own, or
        // this one once a minute, with the prune) persists them.
        let durability = if write.prune.is_none() {
            Durability::Eventual
        } else {
            Durability::Durable
        };
        let writer = self.lock();
        self.commit_locked(&writer, &writes, durability)
    }

    /// The history as it was persisted (what a restarted manager plots from).
    pub fn load_history(&self) -> Result<History, InventoryError> {
        let read = |table: Table| -> Result<Vec<(String, u64, f64)>, InventoryError> {
            self.scan(table, Scan::ALL)?
                .into_iter()
                .map(|(k, v)| {
                    let point = parse_history_key(&k).zip(v.as_slice().try_into().ok());
                    let Some(((series, ts), value)) = point else {
                        return Err(InventoryError::CorruptSamples {
                            key: format!("{} {}", table.name(), String::from_utf8_lossy(&k)),
                            len: v.len(),
                        });
                    };
                    Ok((series.to_owned(), ts, f64::from_le_bytes(value)))
                })
                .collect()
        };
        let fine = read(Table::HistoryFine)?;
        let minutes = read(Table::HistoryMinutes)?;
        let mut placements = Vec::new();
        for (k, v) in self.scan(Table::Placements, Scan::ALL)? {
            let list: Vec<Placement> = decode(
                &v,
                format_args!("placements of {}", String::from_utf8_lossy(&k)),
            )?;
            placements.extend(list);
        }
        Ok(History::restore(fine, minutes, placements))
    }

    /// The last `limit` events (oldest first).
    pub fn recent_events(&self, limit: usize) -> Result<Vec<EventRecord>, InventoryError> {
        self.last_of(Table::Events, limit, "event")
    }

    /// The last `limit` decisions (oldest first).
    pub fn recent_decisions(&self, limit: usize) -> Result<Vec<DecisionRecord>, InventoryError> {
        self.last_of(Table::Decisions, limit, "decision")
    }

    fn last_of<T: DeserializeOwned>(
        &self,
        table: Table,
        limit: usize,
        what: &str,
    ) -> Result<Vec<T>, InventoryError> {
        let mut out: Vec<T> = decode_log(self.scan(table, Scan::last(limit))?, what)?;
        out.reverse();
        Ok(out)
    }

    /// Of a log table, the entries with a sequence number above `after`, oldest first, at
    /// most `limit`.
    fn after<T: DeserializeOwned>(
        &self,
        table: Table,
        after: u64,
        limit: usize,
        what: &str,
    ) -> Result<Vec<T>, InventoryError> {
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let entries = self.scan(table, Scan::from(&seq_key(from), limit))?;
        decode_log(entries, what)
    }

    /// Appends `entry(seq)` to a log table under the next sequence number, keeping the last
    /// `kept` entries; returns the number and the entry.
    fn append<T: Serialize>(
        &self,
        table: Table,
        kept: u64,
        what: &str,
        entry: impl FnOnce(u64) -> T,
    ) -> Result<(u64, T), InventoryError> {
        let writer = self.lock();
        let last = self.scan(table, Scan::last(1))?;
        let seq = last
            .first()
            .and_then(|(k, _)| parse_seq_key(k))
            .map_or(1, |s| s + 1);
        let entry = entry(seq);
        let mut writes = vec![Write::Put {
            table,
            key: seq_key(seq).to_vec(),
            value: encode(&entry, format_args!("{what} {seq}"))?,
        }];
        if seq > kept {
            writes.push(Write::DeleteBelow {
                table,
                end: seq_key(seq - kept + 1).to_vec(),
            });
        }
        self.commit_locked(&writer, &writes, Durability::Durable)?;
        Ok((seq, entry))
    }
}

fn put(table: Table, key: &str, value: Vec<u8>) -> Write {
    Write::Put {
        table,
        key: key.as_bytes().to_vec(),
        value,
    }
}

/// A record as stored (JSON); `key` names it in the error.
fn encode<T: Serialize>(value: &T, key: impl std::fmt::Display) -> Result<Vec<u8>, InventoryError> {
    serde_json::to_vec(value).map_err(|source| InventoryError::Encode {
        key: key.to_string(),
        source,
    })
}

/// Entries of a log table (events, decisions) read back; `what` names them in errors.
fn decode_log<T: DeserializeOwned>(
    entries: Vec<Entry>,
    what: &str,
) -> Result<Vec<T>, InventoryError> {
    entries
        .iter()
        .map(|(k, v)| {
            let seq = parse_seq_key(k).unwrap_or_default();
            decode(v, format_args!("{what} {seq}"))
        })
        .collect()
}

/// A stored record read back; `key` names it in the error.
fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    key: impl std::fmt::Display,
) -> Result<T, InventoryError> {
    serde_json::from_slice(bytes).map_err(|source| InventoryError::Corrupt {
        key: key.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use viola_api::manager::{HostUsage, VmUsage};

    fn report(seq: u64, vms: &[(&str, f64)]) -> HostReport {
        HostReport {
            host: "a1".into(),
            site: "a".into(),
            seq,
            sent_ms: 0,
            usage: HostUsage {
                cpus: 2,
                cpu_capacity: None,
                cpu_busy: 0.5,
                mem_total_kib: 1 << 20,
                mem_available_kib: 1 << 19,
                net: vec![],
                links: vec![],
            },
            vms: vms
                .iter()
                .map(|(n, busy)| VmUsage {
                    uuid: String::new(),
                    balloon_kib: Some(200_000),
                    ..crate::fixtures::running_vm(n, 2, 262_144, *busy)
                })
                .collect(),
            probes: vec![],
        }
    }

    /// A new inventory on one store each time (a restarted manager, or its successor).
    type Reopen<'a> = &'a dyn Fn() -> Inventory;

    /// On redb: the file at `path` opened again each time.
    fn redb_file(path: &Path) -> impl Fn() -> Inventory + '_ {
        move || Inventory::open(path).unwrap()
    }

    /// On etcd: a new client of `cluster`, the same prefix each time.
    fn etcd_store(cluster: &viola_etcd::testing::Cluster) -> impl Fn() -> Inventory + '_ {
        move || {
            Inventory::with_backend(Box::new(super::super::etcd_backend::EtcdBackend::new(
                std::sync::Arc::new(cluster.client()),
                b"/test/inventory/".to_vec(),
                None,
            )))
        }
    }

    #[test]
    fn survives_a_restart_with_everything() {
        let dir = tempfile::tempdir().unwrap();
        everything_survives(&redb_file(&dir.path().join("inv.redb")));
    }

    #[test]
    fn survives_a_successor_with_everything_in_etcd() {
        let cluster = viola_etcd::testing::Cluster::start(1);
        everything_survives(&etcd_store(&cluster));
    }

    fn everything_survives(open: Reopen<'_>) {
        {
            let inv = open();
            inv.put_site(&SiteRecord { name: "a".into() }).unwrap();
            inv.put_violin(&ViolinRecord {
                name: "lan".into(),
                vni: 7,
                vms: vec!["vm1".into()],
                ..ViolinRecord::default()
            })
            .unwrap();
            assert!(inv.apply_report(&report(1, &[("vm1", 0.9)]), 1000).unwrap());
            inv.record(1001, "migration", "vm1", serde_json::json!({"ok": true}))
                .unwrap();
        }
        let inv = open();
        assert_eq!(inv.sites().unwrap().len(), 1);
        assert_eq!(inv.violins().unwrap()[0].vni, 7);
        let vm = inv.vm("vm1").unwrap().unwrap();
        assert_eq!(vm.host, "a1");
        assert_eq!(vm.memory_kib, 200_000, "balloon size is the VM's memory");
        assert!((vm.cpu_busy - 0.9).abs() < 1e-9);
        let host = inv.host("a1").unwrap().unwrap();
        assert_eq!(host.last_heartbeat_ms, Some(1000));
        let ev = inv.events_after(0).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].seq, 1);
        assert_eq!(
            inv.record(2000, "x", "y", serde_json::Value::Null)
                .unwrap()
                .seq,
            2
        );
    }

    #[test]
    fn samples_probes_and_decisions_survive_a_restart_and_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        samples_probes_and_decisions_survive(&redb_file(&dir.path().join("inv.redb")));
    }

    #[test]
    fn samples_probes_and_decisions_survive_in_etcd_and_stay_bounded() {
        let cluster = viola_etcd::testing::Cluster::start(1);
        samples_probes_and_decisions_survive(&etcd_store(&cluster));
    }

    fn samples_probes_and_decisions_survive(open: Reopen<'_>) {
        use crate::fixtures::decision_to_move_vm1;
        {
            let inv = open();
            for seq in 1..=(SAMPLES_KEPT as u64 + 5) {
                let mut r = report(seq, &[("vm1", seq as f64 / 1000.0)]);
                if seq == 3 {
                    r.probes.push(ProbeResult {
                        name: "web".into(),
                        url: "http://10.0.0.5/".into(),
                        ok: true,
                        latency_ms: Some(4.5),
                        error: None,
                    });
                }
                assert!(inv.apply_report(&r, seq * 1000).unwrap());
            }
            let d = decision_to_move_vm1(5, "because", ActionOutcome::Pending);
            assert_eq!(inv.record_decision(&d).unwrap(), 1);
            assert_eq!(inv.record_decision(&d).unwrap(), 2);
            inv.set_action_outcome(1, 0, ActionOutcome::DONE).unwrap();
        }
        let inv = open();
        let vm = inv.samples(SampleKey::Vm("vm1")).unwrap();
        assert_eq!(vm.len(), SAMPLES_KEPT);
        let newest = SAMPLES_KEPT as u64 + 5;
        assert_eq!(vm[0].ts_ms, newest * 1000, "newest first");
        assert!((vm[0].cpu_busy - newest as f64 / 1000.0).abs() < 1e-12);
        let all = inv.sample_histories().unwrap();
        assert_eq!(all.hosts["a1"].len(), SAMPLES_KEPT);
        assert_eq!(all.vms["vm1"], vm);
        // Each report replaces the probe results; the last one had none.
        assert!(inv.probes("a1").unwrap().is_empty());
        let decisions = inv.decisions_after(0, 10).unwrap();
        assert_eq!(decisions.len(), 2);
        assert_eq!(decisions[0].actions[0].outcome, ActionOutcome::DONE);
        assert_eq!(decisions[1].actions[0].outcome, ActionOutcome::Pending);
        assert_eq!(inv.decisions_after(1, 10).unwrap()[0].seq, 2);
        assert_eq!(inv.decisions_after(0, 1).unwrap().len(), 1);
    }

    #[test]
    fn probe_results_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&dir.path().join("inv.redb")).unwrap();
        let mut r = report(1, &[]);
        r.probes.push(ProbeResult {
            name: "web".into(),
            url: "http://10.0.0.5/".into(),
            ok: false,
            latency_ms: None,
            error: Some("timeout".into()),
        });
        inv.apply_report(&r, 10).unwrap();
        assert_eq!(inv.probes("a1").unwrap(), r.probes);
    }

    #[test]
    fn stale_reports_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&dir.path().join("inv.redb")).unwrap();
        assert!(inv.apply_report(&report(5, &[("vm1", 0.1)]), 10).unwrap());
        assert!(!inv.apply_report(&report(4, &[("vm1", 0.9)]), 20).unwrap());
        assert!((inv.vm("vm1").unwrap().unwrap().cpu_busy - 0.1).abs() < 1e-9);
        assert_eq!(inv.host("a1").unwrap().unwrap().last_heartbeat_ms, Some(10));
    }

    #[test]
    fn the_history_survives_reopening_and_its_prune_reaches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        the_history_survives_and_is_pruned(&redb_file(&dir.path().join("inv.redb")));
    }

    #[test]
    fn the_history_survives_in_etcd_and_its_prune_reaches_etcd() {
        let cluster = viola_etcd::testing::Cluster::start(1);
        the_history_survives_and_is_pruned(&etcd_store(&cluster));
    }

    fn the_history_survives_and_is_pruned(open: Reopen<'_>) {
        use crate::history::{FINE_SPAN_MS, History, MINUTE_MS, Range};
        let t0 = 1_700_000_000_000 - 1_700_000_000_000 % MINUTE_MS;
        let mut h = History::default();
        {
            let inv = open();
            for i in 0..130u64 {
                let vms: &[(&str, f64)] = if i < 70 { &[("vm1", 0.5)] } else { &[] };
                inv.write_history(&h.record(t0 + i * 1000, &report(i + 1, vms)))
                    .unwrap();
            }
        }
        let now = t0 + 129_000;
        let back = open().load_history().unwrap();
        for range in [Range::Hour, Range::Day] {
            assert_eq!(
                back.query("", range, now, |_| true),
                h.query("", range, now, |_| true)
            );
        }
        assert_eq!(
            back.placements(Range::Day, now, |_| true),
            h.placements(Range::Day, now, |_| true)
        );
        // An hour and more later: the old samples leave the file too.
        let later = t0 + FINE_SPAN_MS + 5 * MINUTE_MS;
        let inv = open();
        inv.write_history(&h.record(later, &report(500, &[])))
            .unwrap();
        let back = inv.load_history().unwrap();
        let hour = back.query("host/a1/cpu", Range::Hour, later, |_| true);
        assert_eq!(hour[0].points, vec![(later, 0.5)]);
        assert_eq!(
            back.query("host/a1/cpu", Range::Day, later, |_| true)[0].points[0].0,
            t0
        );
    }

    #[test]
    fn the_event_log_keeps_its_newest_entries_only() {
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&dir.path().join("inv.redb")).unwrap();
        for i in 0..EVENTS_KEPT + 5 {
            inv.record(i, "vm_resized", "vm1", serde_json::Value::Null)
                .unwrap();
        }
        let all = inv.events_after(0).unwrap();
        assert_eq!(all.len() as u64, EVENTS_KEPT);
        assert_eq!(all[0].seq, 6, "the five oldest went");
        assert_eq!(all.last().unwrap().seq, EVENTS_KEPT + 5);
        assert_eq!(inv.recent_events(3).unwrap()[2].seq, EVENTS_KEPT + 5);
    }

    #[test]
    fn a_deposed_leaders_writes_are_refused_and_change_nothing() {
        use std::sync::Arc;
        use viola_etcd::Acquire;
        let cluster = viola_etcd::testing::Cluster::start(1);
        let etcd = Arc::new(cluster.client());
        let fenced = |fence| {
            Inventory::with_backend(Box::new(super::super::etcd_backend::EtcdBackend::new(
                Arc::clone(&etcd),
                b"/test/inventory/".to_vec(),
                Some(fence),
            )))
        };
        let elect = |who: &[u8]| {
            let lease = etcd.lease_grant(5).unwrap();
            match etcd.try_acquire(b"/test/leader", who, lease.id).unwrap() {
                Acquire::Won(leadership) => leadership,
                held => panic!("not elected: {held:?}"),
            }
        };
        let first = elect(b"m1");
        let old = fenced(first.clone());
        old.put_site(&SiteRecord { name: "a".into() }).unwrap();

        // m1's lease ends (it stopped renewing it) and m2 is elected; m1 has not noticed.
        etcd.lease_revoke(first.lease).unwrap();
        let new = fenced(elect(b"m2"));
        let err = old.put_site(&SiteRecord { name: "b".into() }).unwrap_err();
        assert!(err.is_not_leader(), "{err}");
        let err = old
            .record(1, "migration", "vm1", serde_json::Value::Null)
            .unwrap_err();
        assert!(err.is_not_leader(), "{err}");
        assert_eq!(new.sites().unwrap(), vec![SiteRecord { name: "a".into() }]);
        assert!(new.events_after(0).unwrap().is_empty());
        new.put_site(&SiteRecord { name: "b".into() }).unwrap();
        assert_eq!(new.sites().unwrap().len(), 2);
    }

    #[test]
    fn a_garbage_file_is_an_open_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.redb");
        std::fs::write(&path, b"this is not a database").unwrap();
        assert!(matches!(
            Inventory::open(&path),
            Err(InventoryError::Open { .. })
        ));
    }
}
