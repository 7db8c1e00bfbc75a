//! Synthetic repository content for the scale benchmark (`benches/scale.py`): index files and
//! snapshots written through the real format code, so that a repository "holds" 100 M chunks
//! and 100 k snapshots in minutes. What is synthetic: the packs those index files name do not
//! exist (their chunk ids are random, no snapshot references them), and the snapshots are of
//! empty streams. Everything a backup, restore or listing reads is a real, sealed object.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::error::Result;
use crate::frame::ChunkEntry;
use crate::id::Id;
use crate::index::IndexedPack;
use crate::pack::{FrameEntry, PackHeader};
use crate::repo::Repository;
use crate::snapshot::{AddedBytes, Snapshot, annotation};
use crate::tree::TreeRoot;

/// What to add.
#[derive(Clone, Debug)]
pub struct Filler {
    pub chunks: u64,
    /// Chunks per index file (one day of a 1 GB dump adds ~42,000).
    pub chunks_per_index_file: u64,
    pub snapshots: u64,
    /// Snapshots are spread over this many series (tags `synthetic-00`, ...).
    pub series: u32,
    pub seed: u64,
}

/// Chunks in a synthetic frame (a 2 MiB group of 16 KiB chunks) and frames in a pack.
const CHUNKS_PER_FRAME: u64 = 128;
const FRAMES_PER_PACK: u64 = 24;

/// splitmix64: random-looking ids without the cost of hashing 100 M counters.
struct Ids(u64);

impl Ids {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn next_id(&mut self) -> Id {
        let mut id = [0u8; 32];
        for part in id.chunks_mut(8) {
            part.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        Id(id)
    }
}

fn pack(ids: &mut Ids, chunks: u64) -> IndexedPack {
    let mut frames = Vec::new();
    let mut left = chunks;
    let mut offset = 72u64;
    while left > 0 {
        let n = left.min(CHUNKS_PER_FRAME);
        left -= n;
        let chunks = (0..n)
            .map(|_| ChunkEntry {
                id: ids.next_id(),
                len: 16384,
            })
            .collect();
        let sealed_len = 400_000;
        frames.push(FrameEntry {
            offset,
            sealed_len,
            chunks,
            bases: Vec::new(),
        });
        offset += sealed_len as u64;
    }
    IndexedPack {
        id: ids.next_id(),
        len: offset + 4096,
        data_ephemeral: ids.next_id().0,
        header: PackHeader {
            frames,
            moved: Vec::new(),
        },
    }
}

/// Adds `filler`'s index files and snapshots to `repo`; `progress` is told each step's count.
pub fn fill(repo: &Repository, filler: &Filler, progress: &mut dyn FnMut(&str, u64)) -> Result<()> {
    let mut ids = Ids(filler.seed);
    let mut written = 0u64;
    let per_pack = CHUNKS_PER_FRAME * FRAMES_PER_PACK;
    while written < filler.chunks {
        let in_file = filler.chunks_per_index_file.min(filler.chunks - written);
        let mut packs = Vec::new();
        let mut left = in_file;
        while left > 0 {
            let n = left.min(per_pack);
            packs.push(pack(&mut ids, n));
            left -= n;
        }
        repo.commit_synthetic_index(packs)?;
        written += in_file;
        progress("chunks", written);
    }
    let now = SystemTime::now();
    let mut batch = Vec::new();
    for i in 0..filler.snapshots {
        let series = (i % filler.series.max(1) as u64) as u32;
        let mut annotations = BTreeMap::new();
        annotations.insert(annotation::DUMP_KIND.to_string(), "unknown".to_string());
        batch.push(Snapshot {
            // Oldest first, a minute apart, all before the benchmark's own snapshots.
            time: now - Duration::from_secs(60 * (filler.snapshots - i + 60)),
            hostname: "synthetic".to_string(),
            tags: vec![format!("synthetic-{series:02}")],
            name: "synthetic".to_string(),
            size: 0,
            stream_hash: *blake3::hash(b"").as_bytes(),
            tree: TreeRoot {
                height: 0,
                ids: Vec::new(),
            },
            added: AddedBytes::default(),
            annotations,
            packs: Vec::new(),
            toc: Vec::new(),
        });
        if batch.len() == 1000 || i + 1 == filler.snapshots {
            repo.commit_synthetic_snapshots(&std::mem::take(&mut batch))?;
            progress("snapshots", i + 1);
        }
    }
    Ok(())
}
