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
use crate::index::{ChunkTable, Index, IndexedPack, MISSING_BASE};
use crate::pack_reader::{BaseCache, FrameReader, bases_of, read_range_aligned};
use crate::repack::{self, PackToRepack};
use crate::repo::{ObsoleteList, Repository, StoredObsoleteList, id_of, pack_name};
use crate::walk::{Reached, walk_trees};

/// The default grace period: longer than any backup runs.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// The shortest grace period prune accepts: a backup running across two prunes this far apart
/// could otherwise lose a pack it already depends on.
pub const MIN_GRACE: Duration = Duration::from_secs(3600);
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
    /// Series markers whose snapshot is gone (a forget or backup cut short), older than the
    /// grace period.
    pub deleted_markers: usize,
    pub dry_run: bool,
}

/// Marks, repacks and deletes as docs/FORMAT.md §10 describes; a dry run changes nothing.
pub fn prune(repo: &Repository, options: &PruneOptions) -> Result<PruneReport> {
    repo.require_full_key("prune")?;
    let PruneOptions {
        grace,
        now,
        dry_run,
        repack_threshold,
    } = *options;
    if grace < MIN_GRACE {
        return Err(Error::invalid(
            "grace period",
            format!(
                "{} is shorter than the minimum of {}: a backup running meanwhile could lose packs it depends on (space comes back one prune later; run prune daily)",
                humantime::format_duration(grace),
                humantime::format_duration(MIN_GRACE)
            ),
        ));
    }
    let store = repo.store();
    // Memory: the compact index (as a backup holds it) and a bit per frame; index files are
    // read and rewritten one at a time.
    let index_names: Vec<String> = store.list("index")?.into_iter().map(|o| o.name).collect();
    let lists = repo.obsolete_lists()?;
    let listed: HashSet<Id> = lists
        .iter()
        .flat_map(|l| l.list.packs.iter().copied())
        .collect();
    let (index, chunks) = repo.spilled_index_with_last(&listed)?;
    let snapshots = repo.snapshots(&[])?;

    // Packs by id, once each even if two index files name one (a crash between writing a
    // rewritten index file and deleting the old one).
    let mut sizes: HashMap<Id, u64> = HashMap::new();
    for pack in index.packs() {
        sizes.insert(pack.id, pack.len);
    }

    let marked = &listed;
    let is_marked = |pack: u32| marked.contains(&index.pack(pack).id);
    let mut needed_frames = needed_frames(repo, &index, &chunks, &snapshots)?;
    drop(chunks);
    let to_repack = keep_bases_of_kept_frames(&index, &mut needed_frames, &|needed| {
        repack::plan(&index, needed, &is_marked, repack_threshold)
    });
    let needed: HashSet<Id> = (0..needed_frames.len())
        .filter(|&f| needed_frames[f])
        .map(|f| index.pack(index.frame(f as u32).pack).id)
        .collect();
    // A list is due a grace period after the time sealed in it and after the time the storage
    // gives it: a list written by a prune whose clock was behind, or stored again later
    // (replayed), is not due before a grace period has passed for everyone.
    let older_than_grace =
        |time: SystemTime| now.duration_since(time).is_ok_and(|age| age >= grace);
    let due = |stored: &StoredObsoleteList| {
        older_than_grace(stored.list.time) && older_than_grace(stored.stored)
    };
    let mut report = PruneReport {
        snapshots: snapshots.len(),
        packs: sizes.len(),
        needed_packs: needed.len(),
        dry_run,
        ..PruneReport::default()
    };
    let mut deletable: BTreeSet<Id> = BTreeSet::new();
    for stored in &lists {
        for pack in &stored.list.packs {
            if !due(stored) {
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
    // A running backup names its packs only at its end, and one being uploaded is a staging
    // file: both are left alone for the grace period after they were last written.
    let stored_packs = store.list("packs")?;
    let mut unindexed: Vec<(String, u64)> = stored_packs
        .iter()
        .filter(|o| {
            older_than_grace(o.modified)
                && id_of(&o.name).is_some_and(|id| !sizes.contains_key(&id))
        })
        .map(|o| (o.name.clone(), o.size))
        .collect();
    let abandoned = store.abandoned_uploads()?;
    unindexed.extend(
        abandoned
            .into_iter()
            .filter(|o| older_than_grace(o.modified))
            .map(|o| (o.name, o.size)),
    );
    report.deleted_unindexed = unindexed.len();
    report.deleted_packs = deletable.len();
    report.deleted_bytes = deletable.iter().filter_map(|id| sizes.get(id)).sum::<u64>()
        + unindexed.iter().map(|(_, size)| size).sum::<u64>();
    report.repacked_packs = to_repack.len();

    // Nothing goes on the word of an index file alone (docs/FORMAT.md §10): every pack that
    // snapshots need is stored, at its indexed size, and where the index chose a pack that
    // stays over a copy in one that goes, that pack's own header must say what its index
    // entry says. Otherwise a damaged or planted index file could make prune delete the only
    // copy of live data.
    let stored: HashMap<Id, u64> = stored_packs
        .iter()
        .filter_map(|o| Some((id_of(&o.name)?, o.size)))
        .collect();
    let mut needed_sorted: Vec<&Id> = needed.iter().collect();
    needed_sorted.sort_unstable();
    for id in needed_sorted {
        let indexed = sizes[id];
        match stored.get(id) {
            Some(&size) if size == indexed => {}
            found => {
                let what = match found {
                    None => "it is not in the store".to_string(),
                    Some(size) => format!("it is {size} bytes, its index entry says {indexed}"),
                };
                return Err(Error::corrupt(
                    pack_name(id),
                    format!(
                        "snapshots need it and {what}; prune deletes nothing while data is missing: run `bkp check`"
                    ),
                ));
            }
        }
    }
    let mut dropping: HashSet<Id> = deletable.iter().chain(&newly_marked).copied().collect();
    dropping.extend(to_repack.iter().map(|p| index.pack(p.pack).id));
    let pack_of = |frame: u32| index.pack(index.frame(frame).pack).id;
    let chosen_over_dropped: BTreeSet<u32> = index
        .alternatives()
        .iter()
        .filter(|&&(chosen, other)| {
            needed_frames[chosen as usize]
                && dropping.contains(&pack_of(other))
                && pack_of(chosen) != pack_of(other)
        })
        .map(|&(chosen, _)| chosen)
        .collect();
    let verify: HashSet<Id> = chosen_over_dropped.iter().map(|&f| pack_of(f)).collect();
    let headers = verify_index_claims(repo, &index_names, &verify, &stored)?;
    verify_chosen_copies(repo, &index, &chosen_over_dropped, &headers)?;
    // A backup writes its marker just before its snapshot: only old ones are orphans.
    let snapshot_ids: HashSet<Id> = store
        .list("snapshots")?
        .iter()
        .filter_map(|o| id_of(&o.name))
        .collect();
    let orphan_markers: Vec<String> = repo
        .markers()?
        .into_iter()
        .filter(|(id, o)| !snapshot_ids.contains(id) && older_than_grace(o.modified))
        .map(|(_, o)| o.name)
        .collect();
    report.deleted_markers = orphan_markers.len();

    if dry_run {
        report.repacked_frames = to_repack.iter().map(|p| p.keep.len()).sum();
        report.repack_bytes_written = to_repack.iter().map(|p| p.keep_bytes).sum();
        return Ok(report);
    }
    drop(needed_frames);

    // Every index file naming a pack to delete, or a pack an earlier file names too, is
    // replaced by one without it; only then are the packs deleted.
    let mut seen: HashSet<Id> = HashSet::new();
    for name in &index_names {
        let Some(file) = repo.skip_damaged(repo.read_index_file(name))? else {
            continue;
        };
        let drop_pack =
            |p: &IndexedPack, seen: &HashSet<Id>| deletable.contains(&p.id) || seen.contains(&p.id);
        if !file.packs.iter().any(|p| drop_pack(p, &seen)) {
            seen.extend(file.packs.iter().map(|p| p.id));
            continue;
        }
        let keep: Vec<IndexedPack> = file
            .packs
            .into_iter()
            .filter(|p| !drop_pack(p, &seen))
            .collect();
        seen.extend(keep.iter().map(|p| p.id));
        repo.replace_index_file(name, keep)?;
    }
    let mut gone: Vec<String> = deletable.iter().map(pack_name).collect();
    gone.extend(unindexed.into_iter().map(|(name, _)| name));
    repo.delete_objects(&gone)?;
    let due_lists: Vec<String> = lists
        .iter()
        .filter(|stored| due(stored))
        .map(|stored| stored.name.clone())
        .collect();
    repo.delete_objects(&due_lists)?;
    repo.delete_objects(&orphan_markers)?;
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
        repo.commit_obsolete_list(&ObsoleteList {
            time: now,
            packs: newly_marked,
        })?;
    }
    Ok(report)
}

/// The headers of packs, as read from the packs themselves.
type PackHeaders = HashMap<Id, ([u8; 32], crate::pack::PackHeader)>;

/// Checks every index entry of the packs in `verify` against the pack's own header, failing on
/// the first that disagrees (naming the index file). Returns those headers.
fn verify_index_claims(
    repo: &Repository,
    index_names: &[String],
    verify: &HashSet<Id>,
    stored: &HashMap<Id, u64>,
) -> Result<PackHeaders> {
    if verify.is_empty() {
        return Ok(PackHeaders::new());
    }
    let store = repo.store();
    let mut real = PackHeaders::new();
    for name in index_names {
        let Some(file) = repo.skip_damaged(repo.read_index_file(name))? else {
            continue;
        };
        for entry in file.packs.iter().filter(|p| verify.contains(&p.id)) {
            let (ephemeral, header) = match real.entry(entry.id) {
                std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    let pack = pack_name(&entry.id);
                    slot.insert(crate::pack::read_header_with(
                        stored[&entry.id],
                        &repo.key().metadata,
                        &pack,
                        |range| read_range_aligned(store, &pack, stored[&entry.id], range),
                    )?)
                }
            };
            if *ephemeral != entry.data_ephemeral || *header != entry.header {
                return Err(Error::corrupt(
                    name,
                    format!(
                        "it says pack {} holds what the pack's own header does not (a damaged or planted index file); prune deletes nothing: run `bkp check`",
                        entry.id.short()
                    ),
                ));
            }
        }
    }
    Ok(real)
}

/// Reads each of `frames` (copies chosen over copies in packs that go) and checks that it holds
/// the chunks its pack's header says: a writer (a put-only key's too) can seal a pack whose
/// header claims chunks it never had, and its copy must not be what lets the real one go.
fn verify_chosen_copies(
    repo: &Repository,
    index: &Index,
    frames: &BTreeSet<u32>,
    headers: &PackHeaders,
) -> Result<()> {
    let mut reader = FrameReader::new(repo, index);
    let bases = BaseCache::new(2);
    let mut dictionary = Vec::new();
    for &frame in frames {
        let location = index.frame(frame);
        let pack = index.pack(location.pack).id;
        let entry = headers
            .get(&pack)
            .and_then(|(_, header)| header.frames.get(location.number_in_pack as usize))
            .ok_or_else(|| Error::Internal(format!("no header read for pack {}", pack.short())))?;
        bases.dictionary(&mut reader, bases_of(index, frame)?, &mut dictionary)?;
        let raw = reader.read(frame, &dictionary, Vec::new())?;
        let mut at = 0usize;
        for chunk in &entry.chunks {
            let bytes = raw.get(at..at + chunk.len as usize);
            if bytes.is_none_or(|b| repo.key().chunk_id(b) != chunk.id) {
                return Err(Error::corrupt(
                    pack_name(&pack),
                    format!(
                        "its frame {} does not hold the chunks its header says, which another pack holds (a damaged or planted pack); prune deletes nothing: run `bkp check --read-data`",
                        location.number_in_pack
                    ),
                ));
            }
            at += chunk.len as usize;
        }
    }
    Ok(())
}

/// Marks as needed the bases of every frame in a pack that stays (one holding a needed frame
/// and not repacked): backups deduplicate against any frame of such a pack, needed or not,
/// and a frame whose base was deleted cannot be decoded (issue: a rollback re-backup that
/// found its chunks in such a frame was unrestorable). Keeping a base can keep its pack, whose
/// frames' bases are then kept in turn, and can change what is worth repacking, so this runs
/// to a fixed point; it ends because frames are only ever added. Returns the repack plan.
fn keep_bases_of_kept_frames(
    index: &Index,
    needed: &mut [bool],
    plan: &dyn Fn(&[bool]) -> Vec<PackToRepack>,
) -> Vec<PackToRepack> {
    loop {
        let to_repack = plan(needed);
        let mut stays = vec![false; index.pack_count()];
        for (frame, _) in needed.iter().enumerate().filter(|(_, n)| **n) {
            stays[index.frame(frame as u32).pack as usize] = true;
        }
        for pack in &to_repack {
            stays[pack.pack as usize] = false;
        }
        let mut added = false;
        for frame in 0..index.frame_count() as u32 {
            if !stays[index.frame(frame).pack as usize] {
                continue;
            }
            for &base in index.bases(frame) {
                if base != MISSING_BASE && !needed[base as usize] {
                    needed[base as usize] = true;
                    added = true;
                }
            }
        }
        if !added {
            return to_repack;
        }
    }
}

/// For each frame of the index, whether some snapshot needs it. Refuses (an error) if a snapshot
/// needs anything that is not indexed: deleting could then destroy what a repair would still
/// find.
fn needed_frames(
    repo: &Repository,
    index: &Index,
    chunks: &ChunkTable,
    snapshots: &[crate::snapshot::SnapshotEntry],
) -> Result<Vec<bool>> {
    let mut frames = vec![false; index.frame_count()];
    let mut missing = None;
    let mut trees = snapshots
        .iter()
        .map(|entry| Ok(entry.snapshot.tree.clone()));
    let problems = walk_trees(repo, index, chunks, &mut trees, &mut |reached| {
        let (what, location) = match reached {
            Reached::Node(id, location) => (id.short(), location),
            Reached::Data(prefix, location) => (hex::encode(&prefix[..4]), location),
        };
        let Some(location) = location else {
            missing.get_or_insert(what);
            return Ok(());
        };
        frames[location.frame as usize] = true;
        for &base in index.bases(location.frame) {
            if base == MISSING_BASE {
                missing.get_or_insert(what.clone());
            } else {
                frames[base as usize] = true;
            }
        }
        Ok(())
    })?;
    if let Some(problem) = problems.into_iter().next() {
        return Err(problem.into_error());
    }
    if let Some(what) = missing {
        return Err(Error::Missing {
            object: format!(
                "chunk {what} of a snapshot (prune deletes nothing while data is missing; run `bkp check`)"
            ),
        });
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    //! Prune against what it reads: planted index files, a missing pack, a back-dated list.
    use super::*;
    use crate::pack_reader::FrameReader;
    use crate::repo::test_repository as repo;
    use crate::snapshot::SnapshotEntry;
    use crate::walk::for_each_chunk;
    use crate::{BackupOptions, Source};

    const GRACE: Duration = Duration::from_secs(3600);

    fn data(len: usize, seed: u8) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new_keyed(&[seed; 32])
            .finalize_xof()
            .fill(&mut out);
        out
    }

    fn backup(repo: &Repository, data: &[u8]) -> SnapshotEntry {
        let source = Source::spawn(std::io::Cursor::new(data.to_vec()));
        crate::backup(repo, source, &BackupOptions::default(), &mut |_| {})
            .unwrap()
            .snapshot
    }

    fn restores(repo: &Repository, entry: &SnapshotEntry, data: &[u8]) -> bool {
        let mut out = Vec::new();
        crate::restore(repo, entry, &mut out, &mut |_| {}).is_ok() && out == data
    }

    fn hours_from_now(hours: u64) -> SystemTime {
        SystemTime::now() + Duration::from_secs(hours * 3600)
    }

    fn names(repo: &Repository, dir: &str) -> Vec<String> {
        repo.store()
            .list(dir)
            .unwrap()
            .into_iter()
            .map(|o| o.name)
            .collect()
    }

    /// The index entries of the packs a backup wrote (in the index file it wrote).
    fn packs_written(repo: &Repository, before: &[String]) -> Vec<IndexedPack> {
        names(repo, "index")
            .iter()
            .filter(|n| !before.contains(n))
            .flat_map(|n| repo.read_index_file(n).unwrap().packs)
            .collect()
    }

    /// `pack`'s header without the frames holding chunk-tree nodes of `snapshots` (prune reads
    /// the trees first: a false claim about a node fails there, as safely), so that a planted
    /// claim reaches prune's own checks.
    fn data_frames_only(
        repo: &Repository,
        snapshots: &[&SnapshotEntry],
        mut pack: IndexedPack,
    ) -> IndexedPack {
        let index = repo.load_index().unwrap();
        let mut reader = FrameReader::new(repo, &index);
        let mut nodes = HashSet::new();
        for entry in snapshots {
            for_each_chunk(
                repo,
                &|id| index.chunk(id),
                &mut reader,
                &entry.snapshot.tree,
                &mut |id, node| {
                    if node {
                        nodes.insert(id);
                    }
                },
            )
            .unwrap();
        }
        pack.header
            .frames
            .retain(|f| !f.chunks.iter().any(|c| nodes.contains(&c.id)));
        assert!(!pack.header.frames.is_empty());
        pack
    }

    /// Plants an index file naming `packs` under a name that sorts first, so that the index
    /// prefers its claims over the true ones; returns its name.
    fn plant_first(repo: &Repository, packs: &[IndexedPack]) -> String {
        loop {
            let before = names(repo, "index");
            repo.commit_packs(packs.to_vec()).unwrap();
            let after = names(repo, "index");
            let planted = after.iter().find(|n| !before.contains(n)).unwrap().clone();
            if after[0] == planted {
                return planted;
            }
            repo.store().delete(&planted).unwrap();
        }
    }

    #[test]
    fn an_index_file_placing_live_chunks_in_a_pack_that_does_not_exist_stops_prune() {
        let repo = repo();
        let original = data(2_000_000, 1);
        let live = backup(&repo, &original);
        let fake: Vec<IndexedPack> = packs_written(&repo, &[])
            .into_iter()
            .map(|p| IndexedPack {
                id: Id([0xab; 32]),
                ..data_frames_only(&repo, &[&live], p)
            })
            .collect();
        let planted = plant_first(&repo, &fake);
        let packs = names(&repo, "packs");
        for now in [SystemTime::now(), hours_from_now(2), hours_from_now(4)] {
            let err = prune(&repo, &PruneOptions::new(GRACE, now)).unwrap_err();
            assert!(
                matches!(&err, Error::Corrupt { object, .. } if object == &pack_name(&Id([0xab; 32]))),
                "{err}"
            );
            assert!(err.to_string().contains("not in the store"), "{err}");
        }
        assert_eq!(names(&repo, "packs"), packs);
        assert!(names(&repo, "obsolete").is_empty());
        repo.store().delete(&planted).unwrap();
        assert!(restores(&repo, &live, &original));
    }

    #[test]
    fn an_index_file_placing_live_chunks_in_another_existing_pack_stops_prune() {
        let repo = repo();
        let (a_data, b_data) = (data(2_000_000, 1), data(2_000_000, 2));
        let a = backup(&repo, &a_data);
        let after_a = names(&repo, "index");
        let b = backup(&repo, &b_data);
        let (pa, pb) = (
            packs_written(&repo, &[])
                .into_iter()
                .find(|p| !packs_written(&repo, &after_a).contains(p))
                .unwrap(),
            packs_written(&repo, &after_a).remove(0),
        );
        // "b's pack holds a's data chunks": a's pack would look mostly unneeded (repacked).
        let lie = IndexedPack {
            header: data_frames_only(&repo, &[&a, &b], pa.clone()).header,
            ..pb.clone()
        };
        let planted = plant_first(&repo, &[lie]);
        let packs = names(&repo, "packs");
        for now in [SystemTime::now(), hours_from_now(2), hours_from_now(4)] {
            let err = prune(&repo, &PruneOptions::new(GRACE, now)).unwrap_err();
            assert!(
                matches!(&err, Error::Corrupt { object, .. } if object == &planted),
                "{err}"
            );
        }
        assert_eq!(names(&repo, "packs"), packs);
        assert!(names(&repo, "obsolete").is_empty());
        // Once the operator removes the file `bkp check` names, everything is there.
        repo.store().delete(&planted).unwrap();
        assert!(restores(&repo, &a, &a_data));
        assert!(restores(&repo, &b, &b_data));
    }

    #[test]
    fn a_pack_claiming_live_chunks_it_does_not_hold_stops_prune() {
        // What a writer with only the public keys (a put-only key) can do: seal a pack whose
        // own header claims another pack's chunks over garbage, and index it first.
        let repo = repo();
        let (a_data, b_data) = (data(2_000_000, 1), data(2_000_000, 2));
        let a = backup(&repo, &a_data);
        let after_a = names(&repo, "index");
        let b = backup(&repo, &b_data);
        let a_pack = packs_written(&repo, &[])
            .into_iter()
            .find(|p| !packs_written(&repo, &after_a).contains(p))
            .unwrap();
        let claimed = data_frames_only(&repo, &[&a, &b], a_pack);
        let session = crate::pack::PackSession::new(repo.key());
        let mut writer = crate::pack::PackWriter::new(&session, 64 << 20);
        let mut encoder = crate::frame::FrameEncoder::new(3);
        for frame in &claimed.header.frames {
            let garbage = data(frame.raw_len(), 9);
            let sealed = encoder.seal(
                &session.data_key,
                &garbage,
                frame.chunks.clone(),
                &[],
                Vec::new(),
                0,
            );
            writer.add(sealed, &[]).unwrap();
        }
        let (forged, bytes) = writer.finish(&session).unwrap();
        repo.wait_for_pack(repo.put_pack_soon(&forged.id, bytes))
            .unwrap();
        plant_first(&repo, std::slice::from_ref(&forged));
        let packs = names(&repo, "packs");
        for now in [SystemTime::now(), hours_from_now(2), hours_from_now(4)] {
            let err = prune(&repo, &PruneOptions::new(GRACE, now)).unwrap_err();
            assert!(
                matches!(&err, Error::Corrupt { object, .. } if object == &pack_name(&forged.id)),
                "{err}"
            );
        }
        assert_eq!(names(&repo, "packs"), packs);
        assert!(names(&repo, "obsolete").is_empty());
        assert!(restores(&repo, &b, &b_data));
    }

    #[test]
    fn a_missing_pack_stops_prune_before_it_deletes_anything() {
        let repo = repo();
        let keep_data = data(4_000_000, 1);
        let small_packs = BackupOptions {
            group_size: 256 << 10,
            pack_size: 512 << 10,
            ..BackupOptions::default()
        };
        let source = Source::spawn(std::io::Cursor::new(keep_data.clone()));
        let keep = crate::backup(&repo, source, &small_packs, &mut |_| {})
            .unwrap()
            .snapshot;
        let written = packs_written(&repo, &[]);
        assert!(written.len() > 2, "{}", written.len());
        // A pack of data chunks only: the snapshot's tree still reads, so prune's own check
        // is what finds it gone.
        let lost = written
            .iter()
            .find(|p| data_frames_only(&repo, &[&keep], (*p).clone()).header == p.header)
            .unwrap()
            .clone();
        let after = names(&repo, "index");
        let gone = backup(&repo, &data(2_000_000, 2));
        let unneeded = packs_written(&repo, &after).remove(0);
        crate::forget::remove(&repo, &[gone.id]).unwrap();
        prune(&repo, &PruneOptions::new(GRACE, SystemTime::now())).unwrap();
        assert_eq!(
            names(&repo, "obsolete").len(),
            1,
            "the unneeded pack is marked"
        );

        repo.store().delete(&pack_name(&lost.id)).unwrap();
        let err = prune(&repo, &PruneOptions::new(GRACE, hours_from_now(2))).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { object, .. } if object == &pack_name(&lost.id)),
            "{err}"
        );
        assert!(err.to_string().contains("not in the store"), "{err}");
        assert!(repo.store().exists(&pack_name(&unneeded.id)).unwrap());
        assert_eq!(names(&repo, "obsolete").len(), 1);
        assert!(!restores(&repo, &keep, &keep_data));
    }

    #[test]
    fn an_obsolete_list_is_due_only_a_grace_period_after_the_storage_got_it() {
        let repo = repo();
        backup(&repo, &data(2_000_000, 1));
        let after = names(&repo, "index");
        let gone = backup(&repo, &data(2_000_000, 2));
        let unneeded = packs_written(&repo, &after).remove(0);
        crate::forget::remove(&repo, &[gone.id]).unwrap();
        // Sealed three days ago (a prune host whose clock was behind, or a list replayed from
        // an old copy), stored now.
        repo.commit_obsolete_list(&ObsoleteList {
            time: SystemTime::now() - Duration::from_secs(3 * 24 * 3600),
            packs: vec![unneeded.id],
        })
        .unwrap();
        let report = prune(&repo, &PruneOptions::new(GRACE, SystemTime::now())).unwrap();
        assert_eq!((report.deleted_packs, report.pending), (0, 1), "{report:?}");
        assert!(repo.store().exists(&pack_name(&unneeded.id)).unwrap());
        let report = prune(&repo, &PruneOptions::new(GRACE, hours_from_now(2))).unwrap();
        assert_eq!(report.deleted_packs, 1, "{report:?}");
        assert!(!repo.store().exists(&pack_name(&unneeded.id)).unwrap());
    }
}
