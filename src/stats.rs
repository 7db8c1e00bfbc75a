//! Stats: what the repository holds and what deduplication and compression saved; for each
//! snapshot, the stored bytes that only it uses (about what forgetting it and pruning would
//! free: a chunk's share of its frame's stored size, by raw length; a chunk in a frame that
//! another snapshot's delta frames use as a base is not freed).

use std::collections::HashMap;

use serde::Serialize;

use crate::error::Result;
use crate::id::Id;
use crate::index::{ChunkLocation, IdPrefix, id_prefix};
use crate::pack_reader::FrameReader;
use crate::repo::Repository;
use crate::spill::{self, Sorter, join};
use crate::walk::{ChunkUse, Reached, for_each_chunk, walk_trees};

#[derive(Clone, Debug, Serialize)]
pub struct SnapshotStats {
    pub id: String,
    /// Bytes of the stream.
    pub size: u64,
    /// Stored bytes of the chunks no other (selected) snapshot uses.
    pub alone_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub snapshots: usize,
    /// Sum of the selected snapshots' stream sizes.
    pub logical_bytes: u64,
    /// Their distinct chunks' uncompressed bytes (data and chunk-tree nodes).
    pub unique_bytes: u64,
    /// logical / unique.
    pub dedup_ratio: f64,
    /// Everything stored: packs, index files, snapshots, keys, config.
    pub stored_bytes: u64,
    pub packs: usize,
    pub pack_bytes: u64,
    pub index_files: usize,
    pub index_bytes: u64,
    /// unique bytes / stored share of those chunks.
    pub compression_ratio: f64,
    pub per_snapshot: Vec<SnapshotStats>,
}

/// Which snapshots use something: one, or more than one.
#[derive(Clone, Copy, Default)]
struct Users {
    /// The first snapshot met, plus one (0: none yet).
    first: u32,
    many: bool,
}

impl Users {
    fn add(&mut self, snapshot: u32) {
        if self.first == 0 {
            self.first = snapshot + 1;
        } else if self.first != snapshot + 1 {
            self.many = true;
        }
    }

    fn merge(&mut self, other: Users) {
        if other.first != 0 {
            self.add(other.first - 1);
            self.many |= other.many;
        }
    }

    /// The only snapshot, if exactly one.
    fn only(&self) -> Option<usize> {
        (self.first != 0 && !self.many).then(|| self.first as usize - 1)
    }
}

/// Stats over the snapshots carrying all of `tags` (the repository totals are for all of it).
///
/// Memory does not grow with the repository or the snapshots' size: the index's chunks are
/// sorted on local disk ([`crate::spill`]), the (chunk, snapshot) pairs of every selected
/// snapshot too, and the two are joined in order; what is held is frame-level (which snapshots
/// use each base frame) and per snapshot.
pub fn stats(repo: &Repository, tags: &[String]) -> Result<Stats> {
    repo.require_full_key("show statistics")?;
    let store = repo.store();
    let total = |dir: &str| -> Result<(usize, u64)> {
        let objects = store.list(dir)?;
        Ok((objects.len(), objects.iter().map(|o| o.size).sum()))
    };
    let (packs, pack_bytes) = total("packs")?;
    let (index_files, index_bytes) = total("index")?;
    let (_, snapshot_bytes) = total("snapshots")?;
    let (_, key_bytes) = total("keys")?;
    let config_bytes = store.size("config")?.unwrap_or(0);

    let (index, chunks) = repo.spilled_index()?;
    let snapshots = repo.snapshots(tags)?;
    // Where the tree nodes are (a few per thousand chunks), so that each tree can be walked.
    let mut nodes: HashMap<Id, ChunkLocation> = HashMap::new();
    let mut trees = snapshots.iter().map(|e| Ok(e.snapshot.tree.clone()));
    // A node that cannot be read is the error of the walk below.
    walk_trees(repo, &index, &chunks, &mut trees, &mut |reached| {
        if let Reached::Node(id, Some(location)) = reached {
            nodes.insert(id, location);
        }
        Ok(())
    })?;
    let mut uses: Sorter<ChunkUse> = Sorter::new(spill::sort_memory(), true);
    let mut reader = FrameReader::new(repo, &index);
    for (number, entry) in snapshots.iter().enumerate() {
        let mut pushed = Ok(());
        for_each_chunk(
            repo,
            &|id| nodes.get(id).copied(),
            &mut reader,
            &entry.snapshot.tree,
            &mut |id, _| {
                if pushed.is_ok() {
                    pushed = uses.push(ChunkUse {
                        prefix: id_prefix(&id),
                        snapshot: number as u32,
                    });
                }
            },
        )?;
        pushed?;
    }
    let uses = uses.finish()?;
    // Each chunk's users, in id order, with where it is; chunks in no index are not counted.
    let each_chunk = |visit: &mut dyn FnMut(ChunkLocation, Users)| -> Result<()> {
        let mut current: Option<(IdPrefix, ChunkLocation, Users)> = None;
        join(
            uses.scan(),
            chunks.scan(),
            |u| u.prefix,
            |c| c.prefix,
            |u, chunk| {
                let Some(chunk) = chunk else {
                    return Ok(());
                };
                match &mut current {
                    Some((prefix, _, users)) if *prefix == u.prefix => users.add(u.snapshot),
                    _ => {
                        if let Some((_, location, users)) = current.take() {
                            visit(location, users);
                        }
                        let mut users = Users::default();
                        users.add(u.snapshot);
                        current = Some((u.prefix, chunk.location, users));
                    }
                }
                Ok(())
            },
        )?;
        if let Some((_, location, users)) = current {
            visit(location, users);
        }
        Ok(())
    };
    // Base frame -> snapshots whose delta frames need it.
    let mut bases: HashMap<u32, Users> = HashMap::new();
    each_chunk(&mut |location, users| {
        for &base in index.bases(location.frame) {
            bases.entry(base).or_default().merge(users);
        }
    })?;
    let stored_share = |location: &ChunkLocation| -> u64 {
        let frame = index.frame(location.frame);
        frame.sealed_len as u64 * location.len as u64 / (frame.raw_len as u64).max(1)
    };
    let mut alone = vec![0u64; snapshots.len()];
    let (mut unique_bytes, mut unique_stored) = (0u64, 0u64);
    each_chunk(&mut |location, users| {
        unique_bytes += location.len as u64;
        unique_stored += stored_share(&location);
        if let Some(only) = users.only() {
            let base_of_others = bases
                .get(&location.frame)
                .is_some_and(|b| b.only() != Some(only));
            if !base_of_others {
                alone[only] += stored_share(&location);
            }
        }
    })?;
    let logical_bytes: u64 = snapshots.iter().map(|s| s.snapshot.size).sum();
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Ok(Stats {
        snapshots: snapshots.len(),
        logical_bytes,
        unique_bytes,
        dedup_ratio: ratio(logical_bytes, unique_bytes),
        stored_bytes: pack_bytes + index_bytes + snapshot_bytes + key_bytes + config_bytes,
        packs,
        pack_bytes,
        index_files,
        index_bytes,
        compression_ratio: ratio(unique_bytes, unique_stored),
        per_snapshot: snapshots
            .iter()
            .zip(alone)
            .map(|(entry, alone_bytes)| SnapshotStats {
                id: entry.id.to_hex(),
                size: entry.snapshot.size,
                alone_bytes,
            })
            .collect(),
    })
}
