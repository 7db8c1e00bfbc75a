//! Prune: reclaim the packs no snapshot needs, safely while other hosts run backups, with no
//! lock (docs/FORMAT.md §10).
//!
//! Two phases, a grace period apart. A prune marks the packs no snapshot needs in an obsolete
//! list; from then on backups do not deduplicate against them. A later prune, once the grace
//! period has passed, deletes the marked packs that are still unneeded: a backup that started
//! before the mark and used one of them has written its snapshot by then (backups are assumed
//! shorter than the grace period), which makes that pack needed again. Packs that no index
//! names (left by interrupted backups) are deleted once older than the grace period, since a
//! running backup indexes its packs only at its end. Write order makes every crash harmless:
//! rewritten index files, then the old ones deleted, then packs, then the lists.
//!
//! Needed means: holds a chunk of a snapshot's stream or chunk tree, or a base frame of a delta
//! frame that does. A pack is deleted whole; one that is needed but mostly holds frames nothing
//! needs is repacked ([`crate::repack`]): its needed frames are copied into new packs, indexed,
//! and then it is marked like an unneeded pack.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{Index, IndexFile, IndexedPack, MISSING_BASE};
use crate::pack_reader::FrameReader;
use crate::repack;
use crate::repo::{ObsoleteList, Repository, pack_name};
use crate::walk::for_each_chunk;

/// The default grace period: longer than any backup runs.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Repack a needed pack once this share of its bytes is in frames no snapshot needs.
pub const DEFAULT_REPACK_THRESHOLD: f64 = 0.5;

#[derive(Clone, Debug)]
pub struct PruneOptions {
    pub grace: Duration,
    /// The time the grace period is measured against (tests pass a later time to skip it).
    pub now: SystemTime,
    pub dry_run: bool,
    /// Share (0 to 1) of a needed pack's bytes that no snapshot needs at which it is repacked;
    /// above 1: never.
    pub repack_threshold: f64,
}

impl PruneOptions {
    pub fn new(grace: Duration, now: SystemTime) -> PruneOptions {
        PruneOptions {
            grace,
            now,
            dry_run: false,
            repack_threshold: DEFAULT_REPACK_THRESHOLD,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    pub snapshots: usize,
    /// Indexed packs, and those some snapshot needs.
    pub packs: usize,
    pub needed_packs: usize,
    /// Unneeded packs marked now; deleted by a prune after the grace period.
    pub newly_marked: usize,
    /// Marked packs still within their grace period.
    pub pending: usize,
    /// Marked packs that a snapshot needs again (a backup that started before the mark).
    pub needed_again: usize,
    pub deleted_packs: usize,
    pub deleted_bytes: u64,
    /// Packs no index named, older than the grace period.
    pub deleted_unindexed: usize,
    /// Needed packs whose needed frames were copied into new packs (they are marked, too).
    pub repacked_packs: usize,
    pub repacked_frames: usize,
    /// The new packs and their index file (in a dry run: the frame bytes that would be copied).
    pub repack_bytes_written: u64,
    pub dry_run: bool,
}

/// Marks, repacks and deletes as docs/FORMAT.md §10 describes; a dry run changes nothing.
pub fn prune(repo: &Repository, options: &PruneOptions) -> Result<PruneReport> {
    let PruneOptions {
        grace,
        now,
        dry_run,
        repack_threshold,
    } = *options;
    let store = repo.store();
    // Memory: the compact index (as a backup holds it) and a bit per frame; index files are
    // read and rewritten one at a time.
    let index_names: Vec<String> = store.list("index")?.into_iter().map(|o| o.name).collect();
    let lists = repo.obsolete_lists()?;
    let listed: HashSet<Id> = lists
        .iter()
        .flat_map(|(_, l)| l.packs.iter().copied())
        .collect();
    let index = repo.load_index_with_last(&listed)?;
    let snapshots = repo.snapshots(&[])?;

    // Packs by id, once each even if two index files name one (a crash between writing a
    // rewritten index file and deleting the old one).
    let mut sizes: HashMap<Id, u64> = HashMap::new();
    for pack in index.packs() {
        sizes.insert(pack.id, pack.len);
    }

    let needed_frames = needed_frames(repo, &index, &snapshots)?;
    let needed: HashSet<Id> = (0..needed_frames.len())
        .filter(|&f| needed_frames[f])
        .map(|f| index.pack(index.frame(f as u32).pack).id)
        .collect();
    let due = |list: &ObsoleteList| now.duration_since(list.time).is_ok_and(|age| age >= grace);
    let mut report = PruneReport {
        snapshots: snapshots.len(),
        packs: sizes.len(),
        needed_packs: needed.len(),
        dry_run,
        ..PruneReport::default()
    };
    let marked = &listed;
    let mut deletable: BTreeSet<Id> = BTreeSet::new();
    for (_, list) in &lists {
        for pack in &list.packs {
            if !due(list) {
                report.pending += 1;
            } else if needed.contains(pack) {
                report.needed_again += 1;
            } else {
                deletable.insert(*pack);
            }
        }
    }
    let mut newly_marked: Vec<Id> = sizes
        .keys()
        .copied()
        .filter(|id| !needed.contains(id) && !marked.contains(id))
        .collect();
    newly_marked.sort_unstable();
    report.newly_marked = newly_marked.len();
    let unindexed: Vec<(String, u64)> = store
        .list("packs")?
        .into_iter()
        .filter(|o| {
            let id = o
                .name
                .rsplit('/')
                .next()
                .and_then(|hex| hex.parse::<Id>().ok());
            let old = now.duration_since(o.modified).is_ok_and(|age| age >= grace);
            old && id.is_some_and(|id| !sizes.contains_key(&id))
        })
        .map(|o| (o.name, o.size))
        .collect();
    report.deleted_unindexed = unindexed.len();
    report.deleted_packs = deletable.len();
    report.deleted_bytes = deletable.iter().filter_map(|id| sizes.get(id)).sum::<u64>()
        + unindexed.iter().map(|(_, size)| size).sum::<u64>();
    let is_marked = |pack: u32| marked.contains(&index.pack(pack).id);
    let to_repack = repack::plan(&index, &needed_frames, &is_marked, repack_threshold);
    report.repacked_packs = to_repack.len();
    if dry_run {
        report.repacked_frames = to_repack.iter().map(|p| p.keep.len()).sum();
        report.repack_bytes_written = to_repack.iter().map(|p| p.keep_bytes).sum();
        return Ok(report);
    }
    drop(needed_frames);

    if !deletable.is_empty() {
        // Every index file naming a deleted pack is rewritten without it (the new file durable
        // before the old one goes), then the packs are deleted.
        for name in &index_names {
            let file = repo.read_index_file(name)?;
            if !file.packs.iter().any(|p| deletable.contains(&p.id)) {
                continue;
            }
            let packs: Vec<IndexedPack> = file
                .packs
                .into_iter()
                .filter(|p| !deletable.contains(&p.id))
                .collect();
            if !packs.is_empty() {
                repo.write_index(&IndexFile { packs })?;
                store.barrier()?;
            }
            store.delete_many(std::slice::from_ref(name))?;
        }
        let packs: Vec<String> = deletable.iter().map(pack_name).collect();
        store.delete_many(&packs)?;
    }
    let unindexed_names: Vec<String> = unindexed.iter().map(|(name, _)| name.clone()).collect();
    store.delete_many(&unindexed_names)?;
    let due_lists: Vec<String> = lists
        .iter()
        .filter(|(_, list)| due(list))
        .map(|(name, _)| name.clone())
        .collect();
    store.delete_many(&due_lists)?;
    if !to_repack.is_empty() {
        // The copies are indexed before their originals are marked: from then on the index
        // prefers them, and the originals go the way of any unneeded pack.
        let repacked = repack::repack(repo, &index, &to_repack)?;
        report.repacked_frames = repacked.frames;
        report.repack_bytes_written = repacked.bytes_written;
        newly_marked.extend(to_repack.iter().map(|p| index.pack(p.pack).id));
        newly_marked.sort_unstable();
    }
    if !newly_marked.is_empty() {
        repo.write_obsolete_list(&ObsoleteList {
            time: now,
            packs: newly_marked,
        })?;
    }
    Ok(report)
}

/// For each frame of the index, whether some snapshot needs it. Refuses (an error) if a snapshot
/// needs anything that is not indexed: deleting could then destroy what a repair would still
/// find.
fn needed_frames(
    repo: &Repository,
    index: &Index,
    snapshots: &[crate::snapshot::SnapshotEntry],
) -> Result<Vec<bool>> {
    let mut frames = vec![false; index.frame_count()];
    let mut reader = FrameReader::new(repo, index);
    for entry in snapshots {
        let mut missing = None;
        for_each_chunk(
            repo,
            index,
            &mut reader,
            &entry.snapshot.tree,
            &mut |id, _| match index.chunk(&id) {
                Some(location) => {
                    frames[location.frame as usize] = true;
                    for &base in index.bases(location.frame) {
                        if base == MISSING_BASE {
                            missing.get_or_insert(id);
                        } else {
                            frames[base as usize] = true;
                        }
                    }
                }
                None => {
                    missing.get_or_insert(id);
                }
            },
        )?;
        if let Some(id) = missing {
            return Err(Error::Missing {
                object: format!(
                    "chunk {} of snapshot {} (prune deletes nothing while data is missing; run `bkp check`)",
                    id.short(),
                    entry.id.short()
                ),
            });
        }
    }
    Ok(frames)
}
