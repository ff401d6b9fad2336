//! The inventory in etcd, shared by replicated managers ([`crate::replication`]).
//!
//! A table's entry lives under `PREFIX` + the table's name + `/` + its key. Every batch is one
//! etcd transaction, guarded by the writer's leadership when it has one: a manager that lost
//! its leadership cannot change anything, even before it notices. etcd keeps a key's old
//! versions until it compacts them: run it with `--auto-compaction-*`, and with
//! `--max-txn-ops` above a report's writes (two per VM of the host, and a few).

use std::sync::Arc;

use viola_etcd::{Etcd, Leadership, Op, Txn, prefix_end};

use super::backend::{Backend, BackendError, Durability, Entry, Order, Scan, Table, Write};

pub struct EtcdBackend {
    etcd: Arc<Etcd>,
    prefix: Vec<u8>,
    fence: Option<Leadership>,
}

impl EtcdBackend {
    /// The tables under `prefix`; writes fenced by `fence` (`None`: unguarded, for a tool or
    /// a test that is the only writer).
    pub fn new(etcd: Arc<Etcd>, prefix: Vec<u8>, fence: Option<Leadership>) -> Self {
        Self {
            etcd,
            prefix,
            fence,
        }
    }

    fn table_prefix(&self, table: Table) -> Vec<u8> {
        let mut key = self.prefix.clone();
        key.extend_from_slice(table.name().as_bytes());
        key.push(b'/');
        key
    }

    fn key(&self, table: Table, key: &[u8]) -> Vec<u8> {
        let mut full = self.table_prefix(table);
        full.extend_from_slice(key);
        full
    }
}

impl Backend for EtcdBackend {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        Ok(self
            .etcd
            .get(&self.key(table, key))
            .map_err(BackendError::from)?
            .map(|kv| kv.value))
    }

    fn scan(&self, table: Table, scan: Scan<'_>) -> Result<Vec<Entry>, BackendError> {
        let start = self.key(table, scan.from);
        let prefix = self.table_prefix(table);
        let (end, skip) = (prefix_end(&prefix), prefix.len());
        let kvs = self
            .etcd
            .range(&start, &end, scan.limit, scan.order == Order::Descending)
            .map_err(BackendError::from)?;
        Ok(kvs
            .into_iter()
            .map(|kv| (kv.key.get(skip..).unwrap_or_default().to_vec(), kv.value))
            .collect())
    }

    fn commit(&self, writes: &[Write], _durability: Durability) -> Result<(), BackendError> {
        if writes.is_empty() {
            return Ok(());
        }
        let ops: Vec<Op> = writes
            .iter()
            .map(|w| match w {
                Write::Put { table, key, value } => Op::Put {
                    key: self.key(*table, key),
                    value: value.clone(),
                    lease: None,
                },
                Write::Delete { table, key } => Op::Delete {
                    key: self.key(*table, key),
                },
                Write::DeleteBelow { table, end } => Op::DeleteRange {
                    start: self.table_prefix(*table),
                    end: self.key(*table, end),
                },
            })
            .collect();
        let mut txn = Txn::new();
        if let Some(fence) = &self.fence {
            txn = txn.when(fence.fence());
        }
        let txn = ops.into_iter().fold(txn, Txn::then);
        let done = self.etcd.txn(&txn).map_err(BackendError::from)?;
        if !done.succeeded {
            return Err(BackendError::NotLeader {
                key: self
                    .fence
                    .as_ref()
                    .map(|f| String::from_utf8_lossy(&f.key).into_owned())
                    .unwrap_or_default(),
            });
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "etcd {} under {}",
            self.etcd.endpoints().join(","),
            String::from_utf8_lossy(&self.prefix)
        )
    }
}
