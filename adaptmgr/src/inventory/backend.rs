//! The one storage trait under the [`Inventory`](super::Inventory): ordered tables of byte keys
//! and byte values, read one key or one range at a time and written in atomic batches.
//!
//! That is the shape every engine we would put under the manager shares (redb's B-trees,
//! etcd's keyspace), so the inventory's records, logs and journal are written once, above
//! it. [`RedbBackend`](super::redb_backend::RedbBackend) is the embedded single-manager store
//! and the default.
//!
//! Keys are chosen so that byte order is the order the inventory reads in: logs under their
//! sequence number and the dashboard's history under its timestamp, both big-endian, so
//! "the newest N" and "everything older than T" are ranges.

/// The inventory's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Sites,
    Hosts,
    Vms,
    Violins,
    /// The event log, by sequence number ([`seq_key`]).
    Events,
    /// Migrations in progress (the driver's snapshot after each step), by VM: what a
    /// restarted (or newly elected) manager finishes or rolls back.
    Migrations,
    /// Monitor samples, newest first, under `host/NAME` and `vm/NAME`: 16 bytes each (`ts_ms`
    /// u64 then `cpu_busy` f64, little-endian), not JSON: the policy loop reads every series
    /// each period and decoding 300,000 JSON numbers was most of its time at 10,000 VMs.
    Samples,
    /// Each host's last service-probe results.
    Probes,
    /// The policy loop's decisions, by sequence number ([`seq_key`]).
    Decisions,
    /// Creates and deletes in progress (`PendingOp` by VM name).
    Pending,
    /// The dashboard's history ([`crate::history`]): every sample of the last hour and the
    /// one-minute means of the last day, under [`history_key`], each an f64 (little-endian).
    HistoryFine,
    HistoryMinutes,
    /// Where each VM ran (JSON list of placements, by VM).
    Placements,
}

impl Table {
    /// Every table, in declaration order (so `table as usize` is its index here).
    pub const ALL: [Self; 13] = [
        Self::Sites,
        Self::Hosts,
        Self::Vms,
        Self::Violins,
        Self::Events,
        Self::Migrations,
        Self::Samples,
        Self::Probes,
        Self::Decisions,
        Self::Pending,
        Self::HistoryFine,
        Self::HistoryMinutes,
        Self::Placements,
    ];

    /// Its name in the store (a redb table's name, an etcd key's second part).
    pub fn name(self) -> &'static str {
        match self {
            Self::Sites => "sites",
            Self::Hosts => "hosts",
            Self::Vms => "vms",
            Self::Violins => "violins",
            Self::Events => "events",
            Self::Migrations => "migrations",
            Self::Samples => "samples",
            Self::Probes => "probes",
            Self::Decisions => "decisions",
            Self::Pending => "pending",
            Self::HistoryFine => "history_fine",
            Self::HistoryMinutes => "history_minutes",
            Self::Placements => "placements",
        }
    }
}

/// The key of a log entry: its sequence number, big-endian (byte order is number order).
pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// A log key read back.
pub fn parse_seq_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// The key of a history point: its timestamp first (big-endian), then its series, so that
/// forgetting everything older than a time is one range.
pub fn history_key(series: &str, ts_ms: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + series.len());
    key.extend_from_slice(&ts_ms.to_be_bytes());
    key.extend_from_slice(series.as_bytes());
    key
}

/// A history key read back.
pub fn parse_history_key(key: &[u8]) -> Option<(&str, u64)> {
    let (ts, series) = key.split_at_checked(8)?;
    Some((
        std::str::from_utf8(series).ok()?,
        u64::from_be_bytes(ts.try_into().ok()?),
    ))
}

/// A key and its value, as a scan returns them.
pub type Entry = (Vec<u8>, Vec<u8>);

/// One change of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Put {
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        table: Table,
        key: Vec<u8>,
    },
    /// Every key below `end` (in byte order).
    DeleteBelow {
        table: Table,
        end: Vec<u8>,
    },
}

/// How hard a batch must be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On stable storage before `commit` returns.
    Durable,
    /// May be lost in a crash until the next durable batch (the dashboard's samples: not
    /// worth an fsync each). A replicated store may treat it as durable.
    Eventual,
}

/// Which end of a range comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Ascending,
    Descending,
}

/// What a scan reads: the keys at or above `from`, in `order` from the matching end, at most
/// `limit` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan<'a> {
    pub from: &'a [u8],
    pub order: Order,
    pub limit: Option<usize>,
}

impl<'a> Scan<'a> {
    /// The whole table, in key order.
    pub const ALL: Scan<'static> = Scan {
        from: b"",
        order: Order::Ascending,
        limit: None,
    };

    /// At most `limit` keys from `from` on, in key order.
    pub fn from(from: &'a [u8], limit: usize) -> Self {
        Self {
            from,
            order: Order::Ascending,
            limit: Some(limit),
        }
    }

    /// The last `limit` keys, the last first.
    pub fn last(limit: usize) -> Self {
        Self {
            from: b"",
            order: Order::Descending,
            limit: Some(limit),
        }
    }
}

impl From<viola_etcd::EtcdError> for BackendError {
    fn from(e: viola_etcd::EtcdError) -> Self {
        Self::Etcd(Box::new(e))
    }
}

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("redb")]
    Redb(#[source] redb::Error),
    #[error("etcd")]
    Etcd(#[source] Box<viola_etcd::EtcdError>),
    /// The write was refused because this manager is no longer the leader of the replicated
    /// store (another manager took over): nothing of it was written.
    #[error("this manager is no longer the leader (leader key {key} is not the one it holds)")]
    NotLeader { key: String },
}

/// Ordered tables of byte keys and values. Every method is one transaction of the engine.
pub trait Backend: Send + Sync {
    /// The value under `key`.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError>;
    /// The entries `scan` names.
    fn scan(&self, table: Table, scan: Scan<'_>) -> Result<Vec<Entry>, BackendError>;
    /// The batch, all or nothing.
    fn commit(&self, writes: &[Write], durability: Durability) -> Result<(), BackendError>;
    /// What the inventory is kept in, for logs ("redb /var/lib/...", "etcd 198.18.0.1:2379 ...").
    fn describe(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn every_table_is_listed_once_at_its_own_index() {
        for (i, table) in Table::ALL.into_iter().enumerate() {
            assert_eq!(table as usize, i, "{table:?}");
        }
    }
}
