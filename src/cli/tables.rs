//! The commands that read a snapshot's table of contents: ls and diff.

use bkp::tables::{Change, TableDiff};

use super::*;

/// The snapshot `spec` names, read whole: a listing of a long series may take it from a
/// catalog (docs/FORMAT.md §11.3), which keeps no table of contents.
fn pick_whole(repo: &Repository, spec: &str, tags: &[String]) -> Result<SnapshotEntry> {
    let entry = pick_by(repo, spec, tags)?;
    if entry.snapshot.toc.is_empty() {
        return Ok(repo.find_snapshot(&entry.id.to_hex(), &[])?);
    }
    Ok(entry)
}

/// What `ls` and `diff` need of a snapshot: its tables, or why it has none.
fn tables_of(entry: &SnapshotEntry) -> Result<Vec<bkp::tables::Table>> {
    bkp::tables::tables(&entry.snapshot).ok_or_else(|| no_table_of_contents(entry))
}

fn no_table_of_contents(entry: &SnapshotEntry) -> anyhow::Error {
    let kind = entry
        .snapshot
        .annotations
        .get(bkp::annotation::DUMP_KIND)
        .map_or("unknown", String::as_str);
    anyhow::anyhow!(
        "snapshot {} has no table of contents (its stream is {kind}): bkp reads one from \
         plain pg_dump, uncompressed pg_dump -Fc and mysqldump/mariadb-dump streams, in \
         backups made by bkp 0.3 or later; restore the whole snapshot instead",
        entry.id.short()
    )
}

pub(super) fn ls(location: &str, args: LsArgs) -> Result<()> {
    let repo = open_repository(location, Access::FullKeyTo("list a snapshot's tables"))?;
    let entry = pick_whole(&repo, &args.pick.snapshot, &args.pick.tags)?;
    let tables = tables_of(&entry)?;
    let mut out = io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&tables)?)?;
        return Ok(());
    }
    let rows: Vec<[String; 3]> = tables
        .iter()
        .map(|t| {
            [
                t.rows.to_string(),
                HumanBytes(t.bytes).to_string(),
                t.name.clone(),
            ]
        })
        .collect();
    for line in columns(&["rows", "data", "table"], &rows, &[0, 1]) {
        writeln!(out, "{line}")?;
    }
    let (rows, bytes) = tables
        .iter()
        .fold((0, 0), |(r, b), t| (r + t.rows, b + t.bytes));
    writeln!(
        out,
        "{} table(s), {rows} rows, {} of data in snapshot {} ({} in all)",
        tables.len(),
        HumanBytes(bytes),
        entry.id.short(),
        HumanBytes(entry.snapshot.size)
    )?;
    Ok(())
}

pub(super) fn diff(location: &str, args: DiffArgs) -> Result<()> {
    let repo = open_repository(location, Access::FullKeyTo("compare snapshots"))?;
    let before = pick_whole(&repo, &args.before, &args.tags)?;
    let after = pick_whole(&repo, &args.after, &args.tags)?;
    let tables = bkp::tables::diff(&before.snapshot, &after.snapshot).ok_or_else(|| {
        match bkp::tables::tables(&before.snapshot) {
            None => no_table_of_contents(&before),
            Some(_) => no_table_of_contents(&after),
        }
    })?;
    let mut out = io::stdout().lock();
    if args.json {
        let value = json!({
            "before": before.id.to_hex(),
            "after": after.id.to_hex(),
            "tables": tables,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    let shown: Vec<&TableDiff> = tables
        .iter()
        .filter(|t| args.all || t.status != Change::Unchanged)
        .collect();
    let number = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
    let size = |n: Option<u64>| n.map_or("-".to_string(), |n| HumanBytes(n).to_string());
    let rows: Vec<[String; 7]> = shown
        .iter()
        .map(|t| {
            let status = match (t.status, t.schema_changed) {
                (Change::Changed, true) => "changed+schema".to_string(),
                (status, _) => json!(status).as_str().unwrap_or("?").to_string(),
            };
            [
                status,
                number(t.rows_before),
                number(t.rows_after),
                size(t.bytes_before),
                size(t.bytes_after),
                HumanBytes(t.new_bytes).to_string(),
                t.name.clone(),
            ]
        })
        .collect();
    let header = [
        "status",
        "rows before",
        "after",
        "data before",
        "after",
        "new",
        "table",
    ];
    if !rows.is_empty() {
        for line in columns(&header, &rows, &[1, 2, 3, 4, 5]) {
            writeln!(out, "{line}")?;
        }
    }
    let count = |c: Change| tables.iter().filter(|t| t.status == c).count();
    writeln!(
        out,
        "{} to {}: {} changed, {} added, {} removed, {} unchanged{}",
        before.id.short(),
        after.id.short(),
        count(Change::Changed),
        count(Change::Added),
        count(Change::Removed),
        count(Change::Unchanged),
        if args.all || count(Change::Unchanged) == 0 {
            ""
        } else {
            " (--all lists them)"
        }
    )?;
    Ok(())
}
