//! Stats: what the repository holds and what deduplication and compression saved; for each
//! snapshot, the stored bytes that only it uses (about what forgetting it and pruning would
//! free: a chunk's share of its frame's stored size, by raw length; a chunk in a frame that
//! another snapshot's delta frames use as a base is not freed).

use std::collections::HashMap;

use serde::Serialize;

use crate::error::Result;
use crate::index::ChunkLocation;
use crate::pack_reader::FrameReader;
use crate::repo::Repository;
use crate::walk::for_each_chunk;

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

/// How many snapshots use something, and the last one that did (the only one, if one).
#[derive(Clone, Copy)]
struct Users {
    count: u32,
    last: usize,
}

impl Default for Users {
    fn default() -> Self {
        Users {
            count: 0,
            last: usize::MAX,
        }
    }
}

impl Users {
    /// Snapshots are visited in turn, so a repeat is always the last one.
    fn add(&mut self, snapshot: usize) {
        if self.last != snapshot {
            self.count += 1;
            self.last = snapshot;
        }
    }
}

/// Stats over the snapshots carrying all of `tags` (the repository totals are for all of it).
pub fn stats(repo: &Repository, tags: &[String]) -> Result<Stats> {
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

    let index = repo.load_index()?;
    let snapshots = repo.snapshots(tags)?;
    let mut reader = FrameReader::new(repo, &index);
    // Chunk (by its first id bytes, as the index keys it) -> location and snapshots using it.
    let mut chunks: HashMap<[u8; 16], (ChunkLocation, Users)> = HashMap::new();
    // Base frame -> snapshots whose delta frames need it.
    let mut bases: HashMap<u32, Users> = HashMap::new();
    for (number, entry) in snapshots.iter().enumerate() {
        for_each_chunk(
            repo,
            &index,
            &mut reader,
            &entry.snapshot.tree,
            &mut |id, _| {
                if let Some(location) = index.chunk(&id) {
                    let key: [u8; 16] = id.0[..16].try_into().expect("16 bytes");
                    let (_, users) = chunks.entry(key).or_insert((location, Users::default()));
                    users.add(number);
                    for &base in index.bases(location.frame) {
                        bases.entry(base).or_default().add(number);
                    }
                }
            },
        )?;
    }
    let stored_share = |location: &ChunkLocation| -> u64 {
        let frame = index.frame(location.frame);
        frame.sealed_len as u64 * location.len as u64 / (frame.raw_len as u64).max(1)
    };
    let mut alone = vec![0u64; snapshots.len()];
    let (mut unique_bytes, mut unique_stored) = (0u64, 0u64);
    for (location, users) in chunks.values() {
        unique_bytes += location.len as u64;
        unique_stored += stored_share(location);
        let base_of_others = bases
            .get(&location.frame)
            .is_some_and(|b| b.count > 1 || b.last != users.last);
        if users.count == 1 && !base_of_others {
            alone[users.last] += stored_share(location);
        }
    }
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
