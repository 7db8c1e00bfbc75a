//! Snapshots: one per backup, sealed to the metadata key and named by the hash of the stored
//! object (`snapshots/<id>`). A snapshot is written last, after every pack and index file it
//! needs, so a visible snapshot is always complete.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::crypto::OpeningKey;
use crate::envelope;
use crate::error::Result;
use crate::id::Id;
use crate::toc::Entry;
use crate::tree::TreeRoot;

pub const SNAPSHOT_MAGIC: &[u8; 8] = b"BKPSNP04";
const SNAPSHOT_MAGIC_V3: &[u8; 8] = b"BKPSNP03";
const SNAPSHOT_MAGIC_V2: &[u8; 8] = b"BKPSNP02";
const SNAPSHOT_MAGIC_V1: &[u8; 8] = b"BKPSNP01";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub time: SystemTime,
    pub hostname: String,
    /// Sorted and unique.
    pub tags: Vec<String>,
    /// What the stream is (default `stdin`).
    pub name: String,
    /// Bytes in the stream.
    pub size: u64,
    /// Unkeyed BLAKE3 of the whole stream: compare with `b3sum` of the original dump.
    pub stream_hash: [u8; 32],
    pub tree: TreeRoot,
    /// What this backup added to the repository.
    pub added: AddedBytes,
    /// Room for later, typed facts about the stream (dump kind, command) without a new format.
    pub annotations: BTreeMap<String, String>,
    /// Every pack holding a chunk of the stream or of its tree, or a base frame of a frame
    /// that does, as the backup found them (sorted by id): a restore, and the next backup of
    /// the series, read these packs' headers instead of every index file. Empty in snapshots
    /// written before format 3 (`BKPSNP01`); a pack that a prune has since repacked away sends
    /// the reader to the index files.
    pub packs: Vec<PackRef>,
    /// The dump's table of contents (docs/FORMAT.md §13): its sections in stream order, each
    /// with its chunks. Empty for streams without one and in snapshots before `BKPSNP04`.
    pub toc: Vec<Entry>,
}

/// A pack by id and stored length (what an aligned read of its header needs), and where in
/// the stream the snapshot uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRef {
    pub id: Id,
    pub len: u64,
    /// `None` in snapshots written before `BKPSNP03`.
    pub uses: Option<ChunkSpan>,
}

/// The stream chunks (numbered from 0 in stream order) at which a restore first and last needs
/// a pack: for a chunk in one of its frames, for a base frame of such a chunk's frame, or for a
/// tree node, which a restore reads just before the first stream chunk below it. A restore
/// reads a pack's header when it reaches `first` and lets it go after `last`, so what it holds
/// does not grow with the snapshot (docs/FORMAT.md §11.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSpan {
    pub first: u64,
    pub last: u64,
}

impl ChunkSpan {
    pub fn at(chunk: u64) -> ChunkSpan {
        ChunkSpan {
            first: chunk,
            last: chunk,
        }
    }

    /// Makes this the smallest span holding itself and `other`.
    pub fn widen(&mut self, other: ChunkSpan) {
        *self = self.union(other);
    }

    /// The smallest span holding both.
    pub fn union(self, other: ChunkSpan) -> ChunkSpan {
        ChunkSpan {
            first: self.first.min(other.first),
            last: self.last.max(other.last),
        }
    }
}

impl Snapshot {
    /// Opens a sealed snapshot of any layout: `BKPSNP04`, `BKPSNP03` (without `toc`),
    /// `BKPSNP02` (packs without their uses) or `BKPSNP01` (without `packs`).
    pub fn open(metadata: &OpeningKey, bytes: &[u8], object: &str) -> Result<Snapshot> {
        if bytes.starts_with(SNAPSHOT_MAGIC_V1) {
            let v1: v1::Snapshot = envelope::open(SNAPSHOT_MAGIC_V1, metadata, bytes, object)?;
            return Ok(v1.into());
        }
        if bytes.starts_with(SNAPSHOT_MAGIC_V3) {
            let v3: v3::Snapshot = envelope::open(SNAPSHOT_MAGIC_V3, metadata, bytes, object)?;
            return Ok(v3.into());
        }
        if bytes.starts_with(SNAPSHOT_MAGIC_V2) {
            let v2: v2::Snapshot = envelope::open(SNAPSHOT_MAGIC_V2, metadata, bytes, object)?;
            return Ok(v2.into());
        }
        envelope::open(SNAPSHOT_MAGIC, metadata, bytes, object)
    }

    /// Whether every pack the snapshot names says where the stream uses it.
    pub fn packs_have_uses(&self) -> bool {
        !self.packs.is_empty() && self.packs.iter().all(|p| p.uses.is_some())
    }
}

/// Layout version 2 (`BKPSNP02`, the first snapshots of format 3): packs without their uses.
/// Catalogs keep their snapshots in it (listings need no uses; docs/FORMAT.md §11.3).
pub(crate) mod v2 {
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    use serde::{Deserialize, Serialize};

    use super::AddedBytes;
    use crate::id::Id;
    use crate::tree::TreeRoot;

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Snapshot {
        pub(super) time: SystemTime,
        pub(super) hostname: String,
        pub(super) tags: Vec<String>,
        pub(super) name: String,
        pub(super) size: u64,
        pub(super) stream_hash: [u8; 32],
        pub(super) tree: TreeRoot,
        pub(super) added: AddedBytes,
        pub(super) annotations: BTreeMap<String, String>,
        pub(super) packs: Vec<(Id, u64)>,
    }

    impl From<Snapshot> for super::Snapshot {
        fn from(s: Snapshot) -> Self {
            super::Snapshot {
                time: s.time,
                hostname: s.hostname,
                tags: s.tags,
                name: s.name,
                size: s.size,
                stream_hash: s.stream_hash,
                tree: s.tree,
                added: s.added,
                annotations: s.annotations,
                packs: s
                    .packs
                    .into_iter()
                    .map(|(id, len)| super::PackRef {
                        id,
                        len,
                        uses: None,
                    })
                    .collect(),
                toc: Vec::new(),
            }
        }
    }

    impl From<super::Snapshot> for Snapshot {
        fn from(s: super::Snapshot) -> Self {
            Snapshot {
                time: s.time,
                hostname: s.hostname,
                tags: s.tags,
                name: s.name,
                size: s.size,
                stream_hash: s.stream_hash,
                tree: s.tree,
                added: s.added,
                annotations: s.annotations,
                packs: s.packs.into_iter().map(|p| (p.id, p.len)).collect(),
            }
        }
    }
}

/// Layout version 3 (`BKPSNP03`): that of version 4 without `toc`.
mod v3 {
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    use serde::Deserialize;

    use super::{AddedBytes, PackRef};
    use crate::tree::TreeRoot;

    #[derive(Deserialize)]
    pub struct Snapshot {
        time: SystemTime,
        hostname: String,
        tags: Vec<String>,
        name: String,
        size: u64,
        stream_hash: [u8; 32],
        tree: TreeRoot,
        added: AddedBytes,
        annotations: BTreeMap<String, String>,
        packs: Vec<PackRef>,
    }

    impl From<Snapshot> for super::Snapshot {
        fn from(s: Snapshot) -> Self {
            super::Snapshot {
                time: s.time,
                hostname: s.hostname,
                tags: s.tags,
                name: s.name,
                size: s.size,
                stream_hash: s.stream_hash,
                tree: s.tree,
                added: s.added,
                annotations: s.annotations,
                packs: s.packs,
                toc: Vec::new(),
            }
        }
    }
}

/// Layout version 1 (bkp 0.1 and 0.2): that of version 2 without `packs`.
mod v1 {
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    use serde::Deserialize;

    use super::AddedBytes;
    use crate::tree::TreeRoot;

    #[derive(Deserialize)]
    pub struct Snapshot {
        time: SystemTime,
        hostname: String,
        tags: Vec<String>,
        name: String,
        size: u64,
        stream_hash: [u8; 32],
        tree: TreeRoot,
        added: AddedBytes,
        annotations: BTreeMap<String, String>,
    }

    impl From<Snapshot> for super::Snapshot {
        fn from(s: Snapshot) -> Self {
            super::v2::Snapshot {
                time: s.time,
                hostname: s.hostname,
                tags: s.tags,
                name: s.name,
                size: s.size,
                stream_hash: s.stream_hash,
                tree: s.tree,
                added: s.added,
                annotations: s.annotations,
                packs: Vec::new(),
            }
            .into()
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedBytes {
    pub chunks: u64,
    pub new_chunks: u64,
    /// Uncompressed bytes of new chunks (data and tree nodes).
    pub new_raw: u64,
    /// Stored bytes of new packs and index files (the snapshot object itself not included).
    pub stored: u64,
}

/// Keys of [`Snapshot::annotations`] that bkp itself writes.
pub mod annotation {
    /// `postgres-plain`, `postgres-custom`, `postgres-tar`, `mysql`, `gzip`, ..., `unknown`.
    pub const DUMP_KIND: &str = "dump.kind";
    pub const SERVER_VERSION: &str = "dump.server_version";
    pub const DATABASE: &str = "dump.database";
    /// `true` or `false`; absent when the kind has no trailer to check.
    pub const COMPLETE: &str = "dump.complete";
    /// The dump command line bkp ran, with passwords removed.
    pub const COMMAND: &str = "command";
}

/// How far ahead of the reader's clock a snapshot's time may be and still count as the newest
/// (`latest`, retention). Beyond it the writer's clock was wrong (or the time was planted): a
/// snapshot dated ten years ahead must not become `latest` for ten years.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(3600);

impl Snapshot {
    /// Whether this snapshot is dated more than [`MAX_CLOCK_SKEW`] after `now`.
    pub fn is_future_dated(&self, now: SystemTime) -> bool {
        self.time
            .duration_since(now)
            .is_ok_and(|ahead| ahead > MAX_CLOCK_SKEW)
    }

    /// `Some(false)` when the dump's header promised a trailer that never came.
    pub fn dump_complete(&self) -> Option<bool> {
        self.annotations
            .get(annotation::COMPLETE)
            .map(|v| v == "true")
    }
}

/// A snapshot with the id it is stored under.
#[derive(Clone, Debug)]
pub struct SnapshotEntry {
    pub id: Id,
    pub snapshot: Snapshot,
}

impl SnapshotEntry {
    pub fn has_tags(&self, tags: &[String]) -> bool {
        tags.iter().all(|t| self.snapshot.tags.contains(t))
    }
}
