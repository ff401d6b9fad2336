//! The embedded single-manager store: `redb` (a crash-safe B-tree with ACID transactions), one
//! file. The default: a federation that can do without its manager for the time it takes to
//! restart it needs nothing else.
//!
//! Format 2 keeps every table as bytes to bytes (`kv.NAME`); a file of format 1 (typed tables
//! under their bare names, before the storage trait) is converted in place, in one
//! transaction, the first time it is opened.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use super::backend::{
    Backend, BackendError, Durability, Entry, Order, Scan, Table, Write, history_key, seq_key,
};

fn table_name(table: Table) -> String {
    format!("kv.{}", table.name())
}

fn definition(name: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

/// A key or value as redb hands it out.
type Guard<'a> = redb::AccessGuard<'a, &'static [u8]>;

fn redb<E: Into<redb::Error>>(e: E) -> BackendError {
    BackendError::Redb(e.into())
}

pub struct RedbBackend {
    db: Database,
    /// Names of the tables, in the order of [`Table::ALL`] (redb's definitions borrow them).
    names: [String; Table::ALL.len()],
}

impl RedbBackend {
    /// Opens (or creates) the store at `path`, converting a format-1 file.
    pub fn open(path: &Path) -> Result<Self, redb::Error> {
        let db = Database::create(path)?;
        let names = Table::ALL.map(table_name);
        let tx = db.begin_write()?;
        // Create every table once so readers never meet a missing one.
        for name in &names {
            tx.open_table(definition(name))?;
        }
        convert_format_1(&tx)?;
        tx.commit()?;
        Ok(Self { db, names })
    }

    fn name(&self, table: Table) -> &str {
        &self.names[table as usize]
    }
}

impl Backend for RedbBackend {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        let tx = self.db.begin_read().map_err(redb)?;
        let t = tx.open_table(definition(self.name(table))).map_err(redb)?;
        Ok(t.get(key).map_err(redb)?.map(|v| v.value().to_vec()))
    }

    fn scan(&self, table: Table, scan: Scan<'_>) -> Result<Vec<Entry>, BackendError> {
        let tx = self.db.begin_read().map_err(redb)?;
        let t = tx.open_table(definition(self.name(table))).map_err(redb)?;
        let range = t.range(scan.from..).map_err(redb)?;
        let limit = scan.limit.unwrap_or(usize::MAX);
        let entry = |e: Result<(Guard<'_>, Guard<'_>), redb::StorageError>| {
            e.map(|(k, v)| (k.value().to_vec(), v.value().to_vec()))
                .map_err(redb)
        };
        match scan.order {
            Order::Ascending => range.take(limit).map(entry).collect(),
            Order::Descending => range.rev().take(limit).map(entry).collect(),
        }
    }

    fn commit(&self, writes: &[Write], durability: Durability) -> Result<(), BackendError> {
        let mut tx = self.db.begin_write().map_err(redb)?;
        if durability == Durability::Eventual {
            tx.set_durability(redb::Durability::None).map_err(redb)?;
        }
        for write in writes {
            match write {
                Write::Put { table, key, value } => {
                    tx.open_table(definition(self.name(*table)))
                        .map_err(redb)?
                        .insert(key.as_slice(), value.as_slice())
                        .map_err(redb)?;
                }
                Write::Delete { table, key } => {
                    tx.open_table(definition(self.name(*table)))
                        .map_err(redb)?
                        .remove(key.as_slice())
                        .map_err(redb)?;
                }
                Write::DeleteBelow { table, end } => {
                    tx.open_table(definition(self.name(*table)))
                        .map_err(redb)?
                        .retain_in::<&[u8], _>(..end.as_slice(), |_, _| false)
                        .map_err(redb)?;
                }
            }
        }
        tx.commit().map_err(redb)
    }

    fn describe(&self) -> String {
        "redb".to_owned()
    }
}

/// Moves the typed tables of a format-1 file into format 2 and drops them.
fn convert_format_1(tx: &redb::WriteTransaction) -> Result<(), redb::Error> {
    let existing: Vec<String> = tx.list_tables()?.map(|t| t.name().to_owned()).collect();
    let present = |t: Table| existing.iter().any(|n| n == t.name());
    for table in Table::ALL.into_iter().filter(|&t| present(t)) {
        let name = table.name();
        let mut out = tx.open_table(definition(&table_name(table)))?;
        match table {
            Table::Events | Table::Decisions => {
                let old: TableDefinition<u64, &[u8]> = TableDefinition::new(name);
                for item in tx.open_table(old)?.iter()? {
                    let (k, v) = item?;
                    out.insert(seq_key(k.value()).as_slice(), v.value())?;
                }
                drop(out);
                tx.delete_table(old)?;
            }
            Table::HistoryFine | Table::HistoryMinutes => {
                let old: TableDefinition<(&str, u64), f64> = TableDefinition::new(name);
                for item in tx.open_table(old)?.iter()? {
                    let (k, v) = item?;
                    let (series, ts) = k.value();
                    out.insert(
                        history_key(series, ts).as_slice(),
                        v.value().to_le_bytes().as_slice(),
                    )?;
                }
                drop(out);
                tx.delete_table(old)?;
            }
            _ => {
                let old: TableDefinition<&str, &[u8]> = TableDefinition::new(name);
                for item in tx.open_table(old)?.iter()? {
                    let (k, v) = item?;
                    out.insert(k.value().as_bytes(), v.value())?;
                }
                drop(out);
                tx.delete_table(old)?;
            }
        }
        tracing::info!(table = name, "inventory table converted to format 2");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_1_file_is_converted_with_everything_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            let vms: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
            tx.open_table(vms)
                .unwrap()
                .insert("g1", b"{}".as_slice())
                .unwrap();
            let events: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
            tx.open_table(events)
                .unwrap()
                .insert(7, b"e".as_slice())
                .unwrap();
            let fine: TableDefinition<(&str, u64), f64> = TableDefinition::new("history_fine");
            tx.open_table(fine)
                .unwrap()
                .insert(("host/a1/cpu", 5), 0.25)
                .unwrap();
            tx.commit().unwrap();
        }
        let store = RedbBackend::open(&path).unwrap();
        assert_eq!(
            store.get(Table::Vms, b"g1").unwrap().as_deref(),
            Some(b"{}".as_slice())
        );
        assert_eq!(
            store.get(Table::Events, &seq_key(7)).unwrap().as_deref(),
            Some(b"e".as_slice())
        );
        let fine = store.scan(Table::HistoryFine, Scan::ALL).unwrap();
        assert_eq!(
            fine,
            vec![(
                history_key("host/a1/cpu", 5),
                0.25f64.to_le_bytes().to_vec()
            )]
        );
        drop(store);
        // Converted once: the old tables are gone, a second open finds nothing to convert.
        let store = RedbBackend::open(&path).unwrap();
        let tx = store.db.begin_read().unwrap();
        let names: Vec<String> = tx
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .collect();
        assert!(names.iter().all(|n| n.starts_with("kv.")), "{names:?}");
    }
}
