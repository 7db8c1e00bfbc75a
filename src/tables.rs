//! A snapshot's tables, from the table of contents its backup recorded ([`crate::toc`]): what
//! `bkp ls` lists and `bkp diff` compares, without reading any of the stream.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::snapshot::Snapshot;
use crate::toc::Entry;

/// One table of a dump: its data, and what belongs to it (definition, indexes, constraints,
/// triggers), by the table of contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Table {
    /// As the dump names it: `public.orders` (PostgreSQL), `orders` or `shop.orders` (mysqldump).
    pub name: String,
    /// Rows of its data (COPY rows, INSERT value tuples).
    pub rows: u64,
    /// Bytes of its data in the stream.
    pub bytes: u64,
    /// Bytes of its data's chunks that the snapshot's backup stored as new.
    pub new_bytes: u64,
    /// Bytes of its definition, indexes, constraints and the like.
    pub schema_bytes: u64,
    #[serde(skip)]
    data_digest: Option<[u8; 32]>,
    /// Digests of its other sections, in stream order.
    #[serde(skip)]
    schema_digests: Vec<[u8; 32]>,
}

/// The table a section belongs to, if any: its own definition and data, or (pg_dump) the
/// table an index, constraint, trigger or default applies to.
fn table_of(entry: &Entry) -> Option<&str> {
    match entry.section.kind.as_str() {
        "TABLE" | "TABLE DATA" => Some(&entry.section.name),
        _ => entry.section.table.as_deref(),
    }
}

/// The snapshot's tables, in the order the dump defines them; `None` if its backup recorded no
/// table of contents (a stream of another kind, or a backup by bkp before 0.3).
pub fn tables(snapshot: &Snapshot) -> Option<Vec<Table>> {
    if snapshot.toc.is_empty() {
        return None;
    }
    let mut order: Vec<String> = Vec::new();
    let mut by_name: BTreeMap<&str, Table> = BTreeMap::new();
    for entry in &snapshot.toc {
        let Some(name) = table_of(entry) else {
            continue;
        };
        let table = by_name.entry(name).or_insert_with(|| {
            order.push(name.to_string());
            Table {
                name: name.to_string(),
                rows: 0,
                bytes: 0,
                new_bytes: 0,
                schema_bytes: 0,
                data_digest: None,
                schema_digests: Vec::new(),
            }
        });
        if entry.is_table_data() {
            table.rows += entry.section.rows;
            table.bytes += entry.len();
            table.new_bytes += entry.new_bytes;
            table.data_digest = Some(entry.digest);
        } else {
            table.schema_bytes += entry.len();
            table.schema_digests.push(entry.digest);
        }
    }
    Some(
        order
            .iter()
            .filter_map(|name| by_name.remove(name.as_str()))
            .collect(),
    )
}

/// What happened to a table between two snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Unchanged,
    /// Its data, definition, indexes or constraints differ.
    Changed,
    Added,
    Removed,
}

/// A table in `bkp diff`: its status, and its rows and bytes before and after (absent on the
/// side where it does not exist).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TableDiff {
    pub name: String,
    pub status: Change,
    /// Whether its definition, indexes or constraints changed (not only its data).
    pub schema_changed: bool,
    pub rows_before: Option<u64>,
    pub rows_after: Option<u64>,
    pub bytes_before: Option<u64>,
    pub bytes_after: Option<u64>,
    /// Bytes of its data's chunks that the newer snapshot's backup stored as new.
    pub new_bytes: u64,
}

/// Table by table, what differs from `before` to `after`: `after`'s tables in its order, then
/// those only `before` has. `None` if either has no table of contents.
pub fn diff(before: &Snapshot, after: &Snapshot) -> Option<Vec<TableDiff>> {
    let old = tables(before)?;
    let new = tables(after)?;
    let mut old_by_name: BTreeMap<&str, &Table> =
        old.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut out = Vec::new();
    for table in &new {
        let (status, schema_changed, before) = match old_by_name.remove(table.name.as_str()) {
            None => (Change::Added, false, None),
            Some(old) => {
                let schema_changed = old.schema_digests != table.schema_digests;
                let changed = schema_changed || old.data_digest != table.data_digest;
                let status = if changed {
                    Change::Changed
                } else {
                    Change::Unchanged
                };
                (status, schema_changed, Some(old))
            }
        };
        out.push(TableDiff {
            name: table.name.clone(),
            status,
            schema_changed,
            rows_before: before.map(|t| t.rows),
            rows_after: Some(table.rows),
            bytes_before: before.map(|t| t.bytes),
            bytes_after: Some(table.bytes),
            new_bytes: table.new_bytes,
        });
    }
    for table in old
        .iter()
        .filter(|t| old_by_name.contains_key(t.name.as_str()))
    {
        out.push(TableDiff {
            name: table.name.clone(),
            status: Change::Removed,
            schema_changed: false,
            rows_before: Some(table.rows),
            rows_after: None,
            bytes_before: Some(table.bytes),
            bytes_after: None,
            new_bytes: 0,
        });
    }
    Some(out)
}
