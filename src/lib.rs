//! bkp: deduplicating, encrypted backups of database dumps.
//!
//! # Glossary
//! - *chunk*: a piece of the stream cut by content-defined chunking (FastCDC, keyed gear table).
//! - *frame*: a group of consecutive new chunks, compressed (zstd) and sealed (XChaCha20-Poly1305).
//! - *pack*: a stored object holding frames and a sealed header listing them.
//! - *index*: chunk id → (pack, frame, offset); stored as sealed index files.
//! - *snapshot*: one backed-up stream: tags, host, size, whole-stream hash, chunk tree.
//! - *repository*: the format (docs/FORMAT.md); *store*: where its bytes live.
//!
//! # Data flow
//! ```text
//! backup:  source -> chunker -> keyed id -> known? skip : group -> zstd + seal -> pack -> store
//!          -> index file -> snapshot     (a snapshot is written last, when all it names is stored)
//! restore: snapshot -> tree -> chunk ids -> index -> aligned pack reads -> open + decompress
//!          -> re-check ids -> writer -> whole-stream hash check
//! ```
//!
//! # Example
//! ```
//! use bkp::{BackupOptions, Repository, InitOptions, KdfParams, Store};
//! let options = InitOptions { kdf: KdfParams::INSECURE_FAST, ..Default::default() };
//! let repo = Repository::init(Store::memory(), b"password", &options)?;
//! let dump = b"CREATE TABLE t (id int);\n".repeat(1000);
//! let summary = bkp::backup(&repo, bkp::Source::spawn(std::io::Cursor::new(dump.clone())), &BackupOptions::default(), &mut |_| {})?;
//! let mut restored = Vec::new();
//! bkp::restore(&repo, &summary.snapshot, &mut restored, &mut |_| {})?;
//! assert_eq!(restored, dump);
//! # Ok::<(), bkp::Error>(())
//! ```

mod backup;
mod check;
mod chunker;
pub mod command;
pub mod copy;
mod crypto;
pub mod drill;
mod dump;
mod envelope;
mod error;
pub mod forget;
mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod id;
mod index;
mod keys;
mod listing;
mod pack;
mod pack_reader;
mod padding;
mod parent;
pub mod prune;
mod repack;
mod repo;
mod restore;
pub mod retention;
mod send_log;
mod series;
mod snapshot;
pub mod source;
mod spill;
mod stats;
mod store;
mod stream_index;
#[doc(hidden)]
pub mod synthetic;
pub mod tables;
pub mod toc;
mod tree;
mod walk;

pub use backup::{BackupEvent, BackupOptions, BackupProgress, BackupSummary, backup};
pub use check::{CheckReport, Problem, ReadData, check};
pub use chunker::ChunkerParams;
pub use copy::{CopyEvent, CopySummary, copy};
pub use crypto::{ChunkingKeys, KdfParams, KeyRole};
pub use dump::{Compressor, DumpInfo, DumpKind, DumpReport, detect as detect_dump};
pub use error::{Error, Result};
pub use id::Id;
pub use index::{IndexFile, IndexedPack};
pub use keys::{KeyInfo, add_key, change_password, find_key, list_keys, remove_key};
pub use repo::{Config, InitOptions, Repository, hostname};
pub use restore::{RestoreProgress, RestoreSummary, restore, restore_checking_stream_hash};
pub use snapshot::{AddedBytes, MAX_CLOCK_SKEW, Snapshot, SnapshotEntry, annotation};
pub use source::Source;
pub use spill::set_sort_memory;
pub use stats::{SnapshotStats, Stats, stats};
pub use store::{Durability, ObjectInfo, RequestKind, Store};

/// The repository format this bkp writes (docs/FORMAT.md); it reads every earlier version.
pub const FORMAT_VERSION: u32 = 4;
