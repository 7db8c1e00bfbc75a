//! A snapshot's tables, from the table of contents its backup recorded ([`crate::toc`]): what
//! `bkp ls` lists and `bkp diff` compares, without reading any of the stream, and what `bkp
//! restore --table` restores, reading only the chunks of the sections it needs.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::restore::{Part, RestoreProgress, RestoreSummary, restore_parts};
use crate::snapshot::{Snapshot, SnapshotEntry};
use crate::toc::{Entry, identifier_parts};

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
    // Tables are what the dump defines or has data of; the rest belongs to one of them.
    let defined: std::collections::BTreeSet<&str> = snapshot
        .toc
        .iter()
        .filter(|e| matches!(e.section.kind.as_str(), "TABLE" | "TABLE DATA"))
        .map(|e| e.section.name.as_str())
        .collect();
    for entry in &snapshot.toc {
        let Some(name) = table_of(entry).filter(|name| defined.contains(name)) else {
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

/// The tables a `restore --table` asks for, by the names the dump gives them: `NAME` as given,
/// or without its schema (or database) when only one table has that last part. An unknown or
/// ambiguous name is an error that lists the near matches.
pub fn resolve(snapshot: &Snapshot, asked: &[String]) -> Result<Vec<String>> {
    let kind = snapshot
        .annotations
        .get(crate::snapshot::annotation::DUMP_KIND);
    if kind.is_some_and(|k| k == crate::DumpKind::PostgresCustom.name()) {
        return Err(Error::invalid(
            "table",
            "this snapshot is a pg_dump custom archive, whose tables are not SQL in the \
             stream: restore it whole into pg_restore, e.g. `bkp restore ID | pg_restore -t \
             TABLE -d scratch`",
        ));
    }
    let known = tables(snapshot).ok_or_else(|| {
        Error::invalid(
            "table",
            "this snapshot has no table of contents (only plain pg_dump, uncompressed pg_dump -Fc and mysqldump streams \
             backed up by bkp 0.3 or later have one): restore the whole snapshot",
        )
    })?;
    let names: Vec<&str> = known.iter().map(|t| t.name.as_str()).collect();
    let mut out = Vec::new();
    for name in asked {
        let unquoted = name.replace(['"', '`'], "");
        let exact: Vec<&str> = names.iter().copied().filter(|n| *n == unquoted).collect();
        let by_last_part: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| n.ends_with(&format!(".{unquoted}")))
            .collect();
        let found = match (exact.as_slice(), by_last_part.as_slice()) {
            ([one], _) | ([], [one]) => *one,
            ([], []) => {
                let near = near_matches(&unquoted, &names);
                return Err(Error::invalid(
                    "table",
                    match near.is_empty() {
                        true => format!(
                            "{name:?} is not in this snapshot (`bkp ls` lists its {} tables)",
                            names.len()
                        ),
                        false => format!(
                            "{name:?} is not in this snapshot; did you mean {}?",
                            near.join(", ")
                        ),
                    },
                ));
            }
            (_, many) => {
                return Err(Error::invalid(
                    "table",
                    format!(
                        "{name:?} names {}: give the schema, e.g. --table {}",
                        many.join(", "),
                        many[0]
                    ),
                ));
            }
        };
        if !out.iter().any(|n| n == found) {
            out.push(found.to_string());
        }
    }
    Ok(out)
}

/// Names like `name`: the same but for case, containing it, or a few edits away.
fn near_matches<'a>(name: &str, names: &[&'a str]) -> Vec<&'a str> {
    let lower = name.to_lowercase();
    let mut near: Vec<(usize, &str)> = names
        .iter()
        .filter_map(|n| {
            let candidate = n.to_lowercase();
            let last = candidate
                .rsplit('.')
                .next()
                .unwrap_or(&candidate)
                .to_string();
            let distance = edit_distance(&lower, &last).min(edit_distance(&lower, &candidate));
            let close = candidate.contains(&lower) || distance <= 2.max(lower.len() / 4);
            close.then_some((distance, *n))
        })
        .collect();
    near.sort();
    near.into_iter().take(5).map(|(_, n)| n).collect()
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// What a restore of some tables writes of a section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Edit {
    /// As it is.
    Keep,
    /// pg_dump's `FK CONSTRAINT`: left out if it references a table not restored (read whole
    /// first, as the next one).
    ForeignKeySection,
    /// mysqldump's `CREATE TABLE`: without the lines of foreign keys to tables not restored.
    ForeignKeyLines,
}

/// The sections a restore of `tables` needs, in stream order: the dump's preamble and
/// trailer, the schemas they are in, their sequences, definitions, data, defaults, indexes,
/// constraints and triggers.
fn sections_for<'s>(snapshot: &'s Snapshot, tables: &[String]) -> Vec<(&'s Entry, Edit)> {
    let wanted = |name: &str| tables.iter().any(|t| t == name);
    let mysql = snapshot
        .annotations
        .get(crate::snapshot::annotation::DUMP_KIND)
        .is_some_and(|kind| kind == crate::DumpKind::MySql.name());
    // pg_dump: sequences go with the table that owns them (serial, identity).
    let sequences: Vec<&str> = snapshot
        .toc
        .iter()
        .filter(|e| e.section.kind.starts_with("SEQUENCE"))
        .filter(|e| e.section.table.as_deref().is_some_and(wanted))
        .map(|e| e.section.name.as_str())
        .collect();
    let schemas: Vec<&str> = tables
        .iter()
        .filter_map(|t| t.rsplit_once('.').map(|(schema, _)| schema))
        .filter(|s| *s != "public")
        .collect();
    snapshot
        .toc
        .iter()
        .filter_map(|entry| {
            let section = &entry.section;
            let keep = match section.kind.as_str() {
                "PREAMBLE" | "TRAILER" => true,
                "SCHEMA" => schemas.contains(&section.name.as_str()),
                "SEQUENCE" | "SEQUENCE OWNED BY" | "SEQUENCE SET" => {
                    sequences.contains(&section.name.as_str())
                }
                _ => table_of(entry).is_some_and(wanted),
            };
            let edit = match section.kind.as_str() {
                "FK CONSTRAINT" => Edit::ForeignKeySection,
                "TABLE" if mysql => Edit::ForeignKeyLines,
                _ => Edit::Keep,
            };
            keep.then_some((entry, edit))
        })
        .collect()
}

/// Restores `tables` of `entry` (names as [`resolve`] gives them) into `out` as a script that
/// recreates them in an empty database, reading only the chunks of the sections it needs.
/// Foreign keys to tables not restored are left out, each told to `note`.
pub fn restore_tables(
    repo: &Repository,
    entry: &SnapshotEntry,
    tables: &[String],
    out: &mut dyn Write,
    note: &mut dyn FnMut(String),
    progress: &mut dyn FnMut(&RestoreProgress),
) -> Result<RestoreSummary> {
    let sections = sections_for(&entry.snapshot, tables);
    let parts: Vec<Part> = sections
        .iter()
        .map(|(e, _)| Part {
            chunks: e.first_chunk..e.first_chunk + e.chunks,
            bytes: e.len(),
            digest: e.digest,
            tree_path: e.tree_path.clone(),
        })
        .collect();
    let mut writer = SectionWriter {
        out,
        sections: sections.iter().map(|(e, edit)| (e.len(), *edit)).collect(),
        at: 0,
        left: sections.first().map_or(0, |(e, _)| e.len()),
        held: Vec::new(),
        tables,
        note,
    };
    let summary = restore_parts(repo, entry, &parts, &mut writer, progress)?;
    Ok(summary)
}

/// Writes the sections of a partial restore, editing those that need it.
struct SectionWriter<'a> {
    out: &'a mut dyn Write,
    /// Each section's length and edit, in order; the one being written, and its bytes left.
    sections: Vec<(u64, Edit)>,
    at: usize,
    left: u64,
    /// A section to edit, read so far.
    held: Vec<u8>,
    tables: &'a [String],
    note: &'a mut dyn FnMut(String),
}

impl Write for SectionWriter<'_> {
    fn write(&mut self, mut buf: &[u8]) -> std::io::Result<usize> {
        let len = buf.len();
        while !buf.is_empty() {
            let Some(&(_, edit)) = self.sections.get(self.at) else {
                return Err(std::io::Error::other("more bytes than the sections hold"));
            };
            let take = buf.len().min(self.left as usize);
            match edit {
                Edit::Keep => self.out.write_all(&buf[..take])?,
                _ => self.held.extend_from_slice(&buf[..take]),
            }
            buf = &buf[take..];
            self.left -= take as u64;
            if self.left == 0 {
                if edit != Edit::Keep {
                    let held = std::mem::take(&mut self.held);
                    let kept = drop_foreign_keys(&held, edit, self.tables, self.note);
                    self.out.write_all(&kept)?;
                }
                self.at += 1;
                self.left = self.sections.get(self.at).map_or(0, |s| s.0);
            }
        }
        Ok(len)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// A section without its foreign keys to tables not in `tables`: pg_dump's `FK CONSTRAINT`
/// section whole, or the `CONSTRAINT ... FOREIGN KEY ... REFERENCES` lines of mysqldump's
/// `CREATE TABLE` (and the comma before the last one kept). Each one left out is told to `note`.
fn drop_foreign_keys(
    section: &[u8],
    edit: Edit,
    tables: &[String],
    note: &mut dyn FnMut(String),
) -> Vec<u8> {
    let text = String::from_utf8_lossy(section);
    let restored = |referenced: &str| {
        tables
            .iter()
            .any(|t| t == referenced || t.rsplit('.').next() == Some(referenced))
    };
    let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut dropped = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let Some(at) = line.find(" REFERENCES ") else {
            i += 1;
            continue;
        };
        let Some(referenced) =
            identifier_parts(&line[at + 12..].replace('`', "\"")).map(|parts| parts.join("."))
        else {
            i += 1;
            continue;
        };
        if restored(&referenced) {
            i += 1;
            continue;
        }
        if edit == Edit::ForeignKeyLines && !line.trim_start().starts_with("CONSTRAINT ") {
            i += 1;
            continue;
        }
        note(format!(
            "left out a foreign key to {referenced}, which is not restored: {}",
            line.trim().trim_end_matches(',')
        ));
        dropped = true;
        if edit == Edit::ForeignKeyLines {
            // mysqldump: a line of the CREATE TABLE.
            lines.remove(i);
            if lines
                .get(i)
                .is_some_and(|next| next.trim_start().starts_with(')'))
                && let Some(before) = lines.get_mut(i - 1)
                && let Some(stripped) = before.trim_end().strip_suffix(',')
            {
                *before = stripped;
                lines.insert(i, "\n");
            }
        } else {
            // pg_dump: the whole `ALTER TABLE ... ADD CONSTRAINT` section.
            return Vec::new();
        }
    }
    match dropped {
        true => lines.concat().into_bytes(),
        false => section.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mysqldump_table_keeps_only_foreign_keys_to_restored_tables() {
        let create = "CREATE TABLE `orders` (\n  `id` int NOT NULL,\n  `customer` int,\n  PRIMARY KEY (`id`),\n  KEY `customer` (`customer`),\n  CONSTRAINT `orders_ibfk_1` FOREIGN KEY (`customer`) REFERENCES `customers` (`id`)\n) ENGINE=InnoDB;\n";
        let mut notes = Vec::new();
        let kept = drop_foreign_keys(
            create.as_bytes(),
            Edit::ForeignKeyLines,
            &["orders".to_string()],
            &mut |n| notes.push(n),
        );
        assert_eq!(
            String::from_utf8(kept).unwrap(),
            "CREATE TABLE `orders` (\n  `id` int NOT NULL,\n  `customer` int,\n  PRIMARY KEY (`id`),\n  KEY `customer` (`customer`)\n) ENGINE=InnoDB;\n"
        );
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("customers"), "{notes:?}");
        // Restored together, the key stays.
        let both = ["orders".to_string(), "customers".to_string()];
        let kept = drop_foreign_keys(create.as_bytes(), Edit::ForeignKeyLines, &both, &mut |n| {
            panic!("{n}")
        });
        assert_eq!(kept, create.as_bytes());
    }

    #[test]
    fn a_pg_dump_foreign_key_to_a_table_not_restored_is_left_out_whole() {
        let section = "--\n-- Name: orders orders_customer_fkey; Type: FK CONSTRAINT; Schema: public; Owner: postgres\n--\n\nALTER TABLE ONLY public.orders\n    ADD CONSTRAINT orders_customer_fkey FOREIGN KEY (customer) REFERENCES public.customers(id);\n\n";
        let mut notes = Vec::new();
        let only = ["public.orders".to_string()];
        let kept = drop_foreign_keys(
            section.as_bytes(),
            Edit::ForeignKeySection,
            &only,
            &mut |n| notes.push(n),
        );
        assert!(kept.is_empty());
        assert!(notes[0].contains("public.customers"), "{notes:?}");
        let both = ["public.orders".to_string(), "public.customers".to_string()];
        let kept = drop_foreign_keys(
            section.as_bytes(),
            Edit::ForeignKeySection,
            &both,
            &mut |n| panic!("{n}"),
        );
        assert_eq!(kept, section.as_bytes());
    }

    fn snapshot_with_tables(names: &[&str]) -> Snapshot {
        let entry = |kind: &str, name: &str| Entry {
            section: crate::toc::Section {
                kind: kind.to_string(),
                name: name.to_string(),
                table: None,
                start: 0,
                end: 1,
                rows: 0,
            },
            first_chunk: 0,
            chunks: 1,
            digest: [0; 32],
            new_bytes: 0,
            tree_path: Vec::new(),
        };
        Snapshot {
            time: std::time::SystemTime::UNIX_EPOCH,
            hostname: String::new(),
            tags: Vec::new(),
            name: String::new(),
            size: 0,
            stream_hash: [0; 32],
            tree: crate::tree::TreeRoot {
                height: 0,
                ids: Vec::new(),
            },
            added: Default::default(),
            annotations: Default::default(),
            packs: Vec::new(),
            toc: names.iter().map(|n| entry("TABLE", n)).collect(),
        }
    }

    #[test]
    fn table_names_resolve_with_or_without_schema_and_unknown_ones_list_near_matches() {
        let snapshot = snapshot_with_tables(&[
            "public.orders",
            "public.customers",
            "sales.orders",
            "x.\"Odd\"",
        ]);
        let resolve = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            resolve(&snapshot, &names).map_err(|e| e.to_string())
        };
        assert_eq!(resolve(&["customers"]).unwrap(), ["public.customers"]);
        assert_eq!(resolve(&["sales.orders"]).unwrap(), ["sales.orders"]);
        let ambiguous = resolve(&["orders"]).unwrap_err();
        assert!(
            ambiguous.contains("public.orders, sales.orders"),
            "{ambiguous}"
        );
        let unknown = resolve(&["custmers"]).unwrap_err();
        assert!(
            unknown.contains("did you mean public.customers?"),
            "{unknown}"
        );
        let far = resolve(&["zzzzzzzz"]).unwrap_err();
        assert!(far.contains("bkp ls"), "{far}");
    }
}
