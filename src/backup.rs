//! Backup: a byte stream in, a snapshot out.
//!
//! ```text
//! reader ─ chunker ─ keyed id ─ known? ─yes─────────────────────────┐
//! (this thread)                   │no                                ├─ tree of ids ─ snapshot
//!                                 └─ group (~2 MiB) ─▶ workers: zstd + seal ─▶ pack writer ─▶ store
//! ```
//! Only new chunks are compressed and encrypted, so an unchanged dump runs at the speed of
//! chunking and hashing. A group of new data chunks is compressed against the base frames that
//! hold the known chunks around it (a delta frame, [`crate::frame`]): that is where the previous
//! version of a changed region is, so a changed row costs about its own bytes. Channels are
//! bounded, so memory stays flat whatever the stream's size: the read buffer, a few groups in
//! flight, the decoded bases, one pack being filled, one uploading, and the index.
//! Order of writes: packs, index file, snapshot (see [`crate::repo`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::chunker::{ChunkInput, Chunker, GearTable};
use crate::crypto::{CipherKey, KeyRole, MasterKey};
use crate::dump::{DumpInfo, DumpReport};
use crate::error::{Error, Result};
use crate::frame::{ChunkEntry, Frame, FrameEncoder, FrameRef, MAX_BASES};
use crate::id::Id;
use crate::index::{Index, IndexedPack, PackLocation};
use crate::pack::{PackSession, PackWriter};
use crate::pack_reader::FrameReader;
use crate::parent::{Base, Known};
use crate::repo::{ParentPacks, Repository, hostname};
use crate::send_log::{SendLog, SendLogWriter};
use crate::snapshot::{AddedBytes, ChunkSpan, PackRef, Snapshot, SnapshotEntry, annotation};
use crate::source::{Source, StreamFacts};
use crate::store::Pending;
use crate::stream_index::HeaderSource;
use crate::toc::{ChunkRuns, Entry};
use crate::tree::{TreeBuilder, TreeRoot};

#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub tags: Vec<String>,
    /// Defaults to this machine's hostname.
    pub hostname: Option<String>,
    pub name: String,
    pub compression_level: i32,
    /// Uncompressed bytes of new chunks compressed together as one frame.
    pub group_size: usize,
    /// Target size of a stored pack, padding included ([`crate::pack::PackWriter`]).
    pub pack_size: usize,
    /// Compression workers; 0 means one per core.
    pub threads: usize,
    pub annotations: BTreeMap<String, String>,
    /// Where a put-only key keeps its send log (docs/FORMAT.md §12.1), without which each of
    /// its backups stores the whole dump; unused with a full key.
    pub send_log: Option<std::path::PathBuf>,
    /// The snapshot's time, if not now (a copy keeps its source's).
    pub time: Option<SystemTime>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            tags: Vec::new(),
            hostname: None,
            name: "stdin".to_string(),
            compression_level: 3,
            group_size: 2 << 20,
            pack_size: crate::pack::PACK_SIZE,
            threads: 0,
            annotations: BTreeMap::new(),
            send_log: None,
            time: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct BackupProgress {
    pub bytes_read: u64,
    /// Uncompressed bytes that were new to the repository.
    pub bytes_new: u64,
}

/// What a backup tells its caller while it runs.
#[derive(Clone, Copy, Debug)]
pub enum BackupEvent<'a> {
    /// The stream's header has been read (once, at the start): what kind of dump it is.
    DumpDetected(&'a DumpInfo),
    Progress(BackupProgress),
    /// Everything the snapshot names is stored; the snapshot itself is about to be written.
    /// From here on, stopping may leave it recorded (the CLI's signal handler says so).
    Recording,
    /// Something the operator should know that does not stop the backup (a put-only key's
    /// send log that could not be used or written: the backup is larger, not wrong).
    Warning(&'a str),
}

#[derive(Clone, Debug)]
pub struct BackupSummary {
    pub snapshot: SnapshotEntry,
    /// Everything this backup stored, the snapshot object included.
    pub bytes_stored: u64,
    pub elapsed: Duration,
    /// The dump's kind and whether its trailer was there (also in the snapshot's annotations).
    pub dump: DumpReport,
}

/// Chunks waiting to be compressed together.
#[derive(Default)]
struct Group {
    /// Its number in this backup ([`Deduper::group_uses`]), set when its first chunk comes.
    seq: u32,
    raw: Vec<u8>,
    chunks: Vec<ChunkEntry>,
    /// Base frames to compress against; empty for a base frame.
    bases: Vec<Base>,
    /// While the group waits for the next known chunk: the bases from before it, last resort.
    before: Vec<Base>,
}

impl Group {
    /// Ready to compress: the bases in a fixed order (a worker keeps the dictionary of bases
    /// that the next group starts with), the fallbacks used.
    fn with_final_bases(mut self) -> Group {
        let before = std::mem::take(&mut self.before);
        add_bases(&mut self.bases, &before);
        self.bases
            .sort_unstable_by_key(|b| (b.name.pack, b.name.frame));
        self
    }
}

/// Picks a data group's base frames, where the previous version of the group's content most
/// likely is, in this order of preference: the frames holding the unchanged chunks that border
/// the group's new ones (most first), the frame of the first unchanged chunk after the group,
/// and the frame of the last one before it. Measured on day 2 of an 8 MB dump: letting the
/// frame before the group take a place first made 1 backup in 12 store 4x more.
///
/// Only the neighbours of new chunks count: a group stays open until it is full, across
/// however much unchanged data lies between its new chunks, and counting every unchanged chunk
/// met meanwhile let the frames with the most chunks anywhere after a single changed row take
/// both places, so that row's chunk was stored whole (3-10 KiB instead of a few bytes).
#[derive(Default)]
struct BaseChooser {
    /// The base frames of the last known data chunk.
    last: Vec<Base>,
    /// The base frames of the last known chunk before the open group started.
    before: Vec<Base>,
    /// Base frames of known chunks next to the open group's new ones, with how often.
    seen: Vec<(Base, u32)>,
    /// The last data chunk was new: the next known one borders it.
    after_new: bool,
}

impl BaseChooser {
    /// A known data chunk lies in a frame with these bases (itself, if it is a base frame).
    fn known(&mut self, bases: Vec<Base>) {
        self.last = bases;
        if std::mem::take(&mut self.after_new) {
            self.count_last();
        }
    }

    /// A new data chunk joins the open group: the known chunk before it borders it.
    fn new_chunk(&mut self) {
        if !std::mem::replace(&mut self.after_new, true) {
            self.count_last();
        }
    }

    fn count_last(&mut self) {
        for base in &self.last {
            match self.seen.iter_mut().find(|(f, _)| f == base) {
                Some((_, hits)) => *hits += 1,
                None => self.seen.push((base.clone(), 1)),
            }
        }
    }

    fn group_started(&mut self) {
        self.seen.clear();
        self.before.clone_from(&self.last);
    }

    /// The bases found inside the group just closed, most used first; [`add_bases`] completes
    /// them.
    fn group_closed(&mut self) -> (Vec<Base>, Vec<Base>) {
        self.seen.sort_by_key(|(base, hits)| {
            (std::cmp::Reverse(*hits), base.name.pack, base.name.frame)
        });
        let inside = self.seen.drain(..).map(|(base, _)| base).collect();
        (inside, std::mem::take(&mut self.before))
    }
}

/// Appends `more` to `bases` while there is room, without repeats.
fn add_bases(bases: &mut Vec<Base>, more: &[Base]) {
    for base in more {
        if bases.len() < MAX_BASES && !bases.contains(base) {
            bases.push(base.clone());
        }
    }
}

/// Fills `dictionary` with `bases` and returns how the pack header names them. A base that
/// cannot be read leaves the group a base frame: the backup does not depend on damaged data
/// (`bkp check` reports the damage).
fn fill_dictionary(
    reader: &mut FrameReader<'_>,
    bases: &[Base],
    dictionary: &mut Dictionary,
    elsewhere: CopyBase<'_>,
) -> Vec<FrameRef> {
    if dictionary.fill(reader, bases, elsewhere).is_err() {
        *dictionary = Dictionary::default();
        return Vec::new();
    }
    bases.iter().map(|b| b.name).collect()
}

/// What `raw_len` bytes would take compressed alone, judged by the bases' own ratio.
fn plain_estimate(bases: &[Base], raw_len: usize) -> usize {
    let (sealed, raw) = bases.iter().fold((0u64, 0u64), |(s, r), b| {
        (s + b.frame.sealed_len as u64, r + b.frame.raw_len as u64)
    });
    (raw_len as u64 * sealed / raw.max(1)) as usize
}

/// Appends a base frame's plaintext to the buffer if it is at hand (in another worker's
/// dictionary); false if not.
type CopyBase<'a> = &'a dyn Fn(&FrameRef, &mut Vec<u8>) -> bool;

/// A worker's dictionary: the plaintexts of its group's base frames, concatenated, decoded
/// straight into it and kept for the next group, which mostly shares bases with this one.
///
/// Each worker holds only its own: a cache of decoded base frames shared by the workers, from
/// which each copied its dictionary, held every base twice (17 of a 10 GB day-2 backup's
/// ~80 MB heap). A base another worker holds is copied from its dictionary ([`Dictionaries`]).
#[derive(Default)]
struct Dictionary {
    bases: Vec<FrameRef>,
    /// Where each base's plaintext ends in `bytes`.
    ends: Vec<usize>,
    bytes: Vec<u8>,
}

impl Dictionary {
    /// Makes this the dictionary of `bases`, keeping the leading ones it already holds, and
    /// copying those `elsewhere` has rather than decoding them.
    fn fill(
        &mut self,
        reader: &mut FrameReader<'_>,
        bases: &[Base],
        elsewhere: CopyBase<'_>,
    ) -> Result<()> {
        if bases.is_empty() || self.bases.iter().eq(bases.iter().map(|b| &b.name)) {
            return Ok(());
        }
        // The longest run of held bases that `bases` starts with: moved to the front.
        let (mut kept, mut kept_len) = (0, 0);
        if let Some(first) = bases
            .first()
            .and_then(|b| self.bases.iter().position(|h| *h == b.name))
        {
            kept = bases
                .iter()
                .zip(&self.bases[first..])
                .take_while(|(b, h)| b.name == **h)
                .count();
            let start = first.checked_sub(1).map_or(0, |i| self.ends[i]);
            let end = self.ends[first + kept - 1];
            self.bytes.copy_within(start..end, 0);
            kept_len = end - start;
        }
        self.bytes.truncate(kept_len);
        self.ends.clear();
        let mut end = 0;
        for base in &bases[..kept] {
            end += base.frame.raw_len as usize;
            self.ends.push(end);
        }
        self.bases.clear();
        self.bases.extend(bases[..kept].iter().map(|b| b.name));
        // Exactly: grown by doubling, a 4.1 MiB dictionary took 8 MiB, in every worker.
        let len: usize = bases.iter().map(|b| b.frame.raw_len as usize).sum();
        self.bytes
            .reserve_exact(len.saturating_sub(self.bytes.len()));
        for base in &bases[kept..] {
            // (On an error the caller discards the dictionary.)
            if !elsewhere(&base.name, &mut self.bytes) {
                reader.read_base_appending(&base.frame, &base.pack, &mut self.bytes)?;
            }
            self.bases.push(base.name);
            self.ends.push(self.bytes.len());
        }
        Ok(())
    }

    /// The plaintext of base frame `name`, if this dictionary holds it.
    fn base(&self, name: &FrameRef) -> Option<&[u8]> {
        let at = self.bases.iter().position(|b| b == name)?;
        let start = at.checked_sub(1).map_or(0, |i| self.ends[i]);
        self.bytes.get(start..self.ends[at])
    }
}

/// The workers' dictionaries, each readable by the others while its worker compresses. A base
/// frame that one worker decoded is copied by another that needs it too, rather than decoded
/// again: consecutive groups mostly share a base and mostly go to different workers (a day-2
/// backup of the real pg pair decoded 853 base frames, 511 different ones; decoding was 14 %
/// of its CPU). No base is held twice for it, unlike with a shared cache.
struct Dictionaries(Vec<RwLock<Dictionary>>);

impl Dictionaries {
    fn new(workers: usize) -> Self {
        Dictionaries((0..workers).map(|_| RwLock::default()).collect())
    }

    /// Appends base `name` from a dictionary other than worker `me`'s, if one holds it and is
    /// not being filled (a dictionary being filled is not waited for).
    fn copy_base(&self, me: usize, name: &FrameRef, out: &mut Vec<u8>) -> bool {
        self.0
            .iter()
            .enumerate()
            .filter(|&(worker, _)| worker != me)
            .filter_map(|(_, dictionary)| dictionary.try_read().ok())
            .any(|dictionary| match dictionary.base(name) {
                Some(bytes) => {
                    out.extend_from_slice(bytes);
                    true
                }
                None => false,
            })
    }
}

/// The chunks this backup stored, the most recent [`RecentChunks::KEPT`] of them: a chunk that
/// repeats within a dump is stored once if it repeats within that window (~2 GiB of new data),
/// and memory does not grow with the dump (beyond it, a repeat is stored again).
///
/// A ring of id prefixes and an open-addressing table of positions in it (linear probing,
/// half full at most): 3 MiB when full, where a `HashSet` and a `VecDeque` of the prefixes
/// took 13-17 MiB, the largest part of a backup's memory that grew with the dump.
struct RecentChunks {
    /// 128-bit prefixes of keyed ids, as in the index ([`crate::index`]); once `kept` are
    /// recorded, a ring whose oldest entry is at `next`.
    ring: Vec<([u8; 16], u32)>,
    next: usize,
    kept: usize,
    /// Ring positions plus one (0: an empty slot), at the slot the prefix hashes to or after.
    slots: Vec<u32>,
}

impl Default for RecentChunks {
    fn default() -> Self {
        RecentChunks::new(Self::KEPT)
    }
}

impl RecentChunks {
    /// 3 MiB (ring and table); twice as many took 6 MiB of a 10 GB backup, where a 1 GB
    /// one (a few thousand new chunks on day 2) holds a fraction of it.
    const KEPT: usize = 1 << 17;

    fn new(kept: usize) -> RecentChunks {
        RecentChunks {
            ring: Vec::new(),
            next: 0,
            kept,
            slots: vec![0; (2 * kept).next_power_of_two()],
        }
    }

    /// Where `prefix` starts probing: its bits are a keyed hash already.
    fn home(&self, prefix: &[u8; 16]) -> usize {
        let bits = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
        bits as usize & (self.slots.len() - 1)
    }

    /// The slot holding `prefix`, or the empty slot where it would go.
    fn probe(&self, prefix: &[u8; 16]) -> (usize, bool) {
        let mask = self.slots.len() - 1;
        let mut slot = self.home(prefix);
        loop {
            match self.slots[slot] {
                0 => return (slot, false),
                at if self.ring[at as usize - 1].0 == *prefix => return (slot, true),
                _ => slot = (slot + 1) & mask,
            }
        }
    }

    /// Empties `slot` and moves later entries of its probe run back (so no probe stops early).
    fn remove_slot(&mut self, mut slot: usize) {
        let mask = self.slots.len() - 1;
        self.slots[slot] = 0;
        let mut later = slot;
        loop {
            later = (later + 1) & mask;
            let at = self.slots[later];
            if at == 0 {
                return;
            }
            let home = self.home(&self.ring[at as usize - 1].0);
            // It may move to `slot` unless its home lies cyclically in (slot, later].
            let stays = if slot <= later {
                slot < home && home <= later
            } else {
                slot < home || home <= later
            };
            if !stays {
                self.slots[slot] = at;
                self.slots[later] = 0;
                slot = later;
            }
        }
    }

    /// Records `id` as stored in group `group`; if it was recorded already, the group it was
    /// stored in.
    fn insert(&mut self, id: &Id, group: u32) -> std::result::Result<(), u32> {
        let prefix: [u8; 16] = id.0[..16].try_into().expect("16 bytes");
        if let (slot, true) = self.probe(&prefix) {
            return Err(self.ring[self.slots[slot] as usize - 1].1);
        }
        let at = if self.ring.len() < self.kept {
            self.ring.push((prefix, group));
            self.ring.len() - 1
        } else {
            let oldest = self.next;
            let (slot, found) = self.probe(&self.ring[oldest].0);
            debug_assert!(found);
            self.remove_slot(slot);
            self.ring[oldest] = (prefix, group);
            oldest
        };
        self.next = (at + 1) % self.kept;
        let (slot, _) = self.probe(&prefix);
        self.slots[slot] = at as u32 + 1;
        Ok(())
    }
}

/// Decides what is new and batches it into groups for the workers.
struct Deduper<'a> {
    repo: &'a Repository,
    known: Known,
    stored_this_session: RecentChunks,
    uses: PackUses,
    data: Group,
    /// A full data group waiting for the next known chunk to complete its bases.
    waiting: Option<Group>,
    tree_nodes: Group,
    bases: BaseChooser,
    group_size: usize,
    groups: Sender<Group>,
    /// Group buffers handed back by the workers, for reuse: a fresh one costs page faults and
    /// reallocations as it grows (a tenth of the day-1 backup's faults when the workers handed
    /// back fewer than the buffers in flight).
    spare: Receiver<Vec<u8>>,
    /// What a group buffer holds at most: a group closes on the chunk that fills it.
    group_capacity: usize,
    added: AddedBytes,
}

/// Where the snapshot uses each pack it depends on (docs/FORMAT.md §11.2), as stream chunk
/// numbers: gathered while the stream is deduplicated, resolved once its packs are stored.
#[derive(Default)]
struct PackUses {
    /// Packs holding known chunks or their frames' bases, in the order met, with where known
    /// chunks use them.
    known: Vec<PackRef>,
    /// Position in `known` by pack id.
    numbers: HashMap<Id, u32>,
    /// Each group of this backup (by [`Group::seq`]): its first chunk's, and those of its
    /// chunks' repeats.
    groups: Vec<ChunkSpan>,
    /// (group, position in `known`) for every pack holding a base of a group: the snapshot
    /// uses it wherever it uses the group. (Numbers, not ids: one per group and base, 51 k
    /// groups at 100 GiB.)
    group_bases: Vec<(u32, u32)>,
}

impl PackUses {
    /// Stream chunk `place` uses `pack`.
    fn known_pack(&mut self, pack: &PackLocation, place: u64) {
        let at = self.number(pack) as usize;
        widen(&mut self.known[at], ChunkSpan::at(place));
    }

    /// `pack`'s position in `known`, where it is added (without uses) if new.
    fn number(&mut self, pack: &PackLocation) -> u32 {
        *self.numbers.entry(pack.id).or_insert_with(|| {
            self.known.push(PackRef {
                id: pack.id,
                len: pack.len,
                uses: None,
            });
            self.known.len() as u32 - 1
        })
    }

    /// Every pack the snapshot depends on (sorted by id), with the stream chunks that use it:
    /// the packs this backup stored, those holding known chunks, and those holding the bases
    /// of either's frames.
    fn resolve(&self, stored: &Stored) -> Vec<PackRef> {
        let mut known = self.known.clone();
        for &(group, at) in &self.group_bases {
            widen(&mut known[at as usize], self.groups[group as usize]);
        }
        let mut packs = stored.packs.clone();
        for &(group, at) in &stored.group_packs {
            widen(&mut packs[at as usize], self.groups[group as usize]);
        }
        packs.extend(known);
        packs.sort_unstable_by_key(|p| p.id);
        // A pack named twice (by two index files, or stored and found): one entry, all uses.
        packs.dedup_by(|later, kept| {
            let same = later.id == kept.id;
            if same {
                kept.uses = match (kept.uses, later.uses) {
                    (Some(a), Some(b)) => Some(a.union(b)),
                    (a, b) => a.or(b),
                };
            }
            same
        });
        packs
    }
}

/// `pack` is used at `span` too.
fn widen(pack: &mut PackRef, span: ChunkSpan) {
    pack.uses = Some(pack.uses.map_or(span, |u| u.union(span)));
}

impl Deduper<'_> {
    /// Queues `bytes` (known as `id`) unless the repository or this session already has it.
    /// `place` is where a restore needs it: its number in the stream, or for a tree node the
    /// number of the first stream chunk below it.
    fn offer(&mut self, id: Id, bytes: &[u8], is_tree_node: bool, place: u64) -> Result<()> {
        if self.offer_known(&id, is_tree_node, place)? {
            return Ok(());
        }
        let open = if is_tree_node {
            &self.tree_nodes
        } else {
            &self.data
        };
        let seq = if open.chunks.is_empty() {
            self.uses.groups.len() as u32
        } else {
            open.seq
        };
        if let Err(stored_in) = self.stored_this_session.insert(&id, seq) {
            self.uses.groups[stored_in as usize].widen(ChunkSpan::at(place));
            return Ok(());
        }
        if !is_tree_node {
            if self.data.chunks.is_empty() {
                self.bases.group_started();
            }
            self.bases.new_chunk();
        }
        self.added.new_chunks += 1;
        self.added.new_raw += bytes.len() as u64;
        // Tree nodes get groups of their own so that restore can read the chunk list without
        // decoding data frames.
        let group = if is_tree_node {
            &mut self.tree_nodes
        } else {
            &mut self.data
        };
        if group.chunks.is_empty() {
            group.seq = seq;
            self.uses.groups.push(ChunkSpan::at(place));
        } else {
            self.uses.groups[seq as usize].widen(ChunkSpan::at(place));
        }
        group.raw.extend_from_slice(bytes);
        group.chunks.push(ChunkEntry {
            id,
            len: bytes.len() as u32,
        });
        let full_at = if is_tree_node {
            self.group_size.min(TREE_GROUP_SIZE)
        } else {
            self.group_size
        };
        if group.raw.len() >= full_at {
            let mut raw = self
                .spare
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(self.group_capacity));
            raw.clear();
            let mut chunks = std::mem::take(&mut group.chunks);
            // Held in pack headers until the index file naming them is written (32 k chunks):
            // without the slack of a doubled vector.
            chunks.shrink_to_fit();
            let mut full = Group {
                seq: group.seq,
                raw: std::mem::replace(&mut group.raw, raw),
                chunks,
                ..Group::default()
            };
            if is_tree_node {
                self.send(full)?;
            } else {
                // A full data group waits for the next known chunk (see BaseChooser), unless
                // there is nothing to know (a first backup).
                let (inside, before) = self.bases.group_closed();
                add_bases(&mut full.bases, &inside);
                full.before = before;
                if self.known.is_empty() {
                    self.send(full)?;
                } else if let Some(previous) = self.waiting.replace(full) {
                    self.send(previous.with_final_bases())?;
                }
            }
        }
        Ok(())
    }

    /// Takes note of chunk `id` at `place` if the repository has it; false if not.
    fn offer_known(&mut self, id: &Id, is_tree_node: bool, place: u64) -> Result<bool> {
        let Some(chunk) = self.known.chunk(self.repo, id, is_tree_node)? else {
            return Ok(false);
        };
        self.uses.known_pack(&chunk.pack, place);
        for base in &chunk.bases {
            self.uses.known_pack(&base.pack, place);
        }
        if !is_tree_node {
            self.bases.known(chunk.bases);
            if let Some(mut waiting) = self.waiting.take() {
                // Where the group's old content ends: often a frame it had not met yet.
                add_bases(&mut waiting.bases, &self.bases.last);
                self.send(waiting.with_final_bases())?;
            }
        }
        Ok(true)
    }

    fn store_tree_node(&mut self, node: Vec<u8>, place: u64) -> Result<Id> {
        let id = self.repo.key().chunk_id(&node);
        self.offer(id, &node, true, place)?;
        Ok(id)
    }

    fn send(&mut self, group: Group) -> Result<()> {
        for base in &group.bases {
            let entry = (group.seq, self.uses.number(&base.pack));
            let this_group = self.uses.group_bases.iter().rev();
            if !this_group
                .take_while(|(seq, _)| *seq == group.seq)
                .any(|e| *e == entry)
            {
                self.uses.group_bases.push(entry);
            }
        }
        // A closed channel means a later stage failed; its error is reported instead.
        self.groups
            .send(group)
            .map_err(|_| Error::Internal("pipeline stopped".into()))
    }

    fn flush(&mut self) -> Result<()> {
        let (inside, before) = self.bases.group_closed();
        add_bases(&mut self.data.bases, &inside);
        self.data.before = before;
        if let Some(waiting) = self.waiting.take() {
            self.send(waiting.with_final_bases())?;
        }
        for group in [
            std::mem::take(&mut self.data).with_final_bases(),
            std::mem::take(&mut self.tree_nodes),
        ] {
            if !group.chunks.is_empty() {
                self.send(group)?;
            }
        }
        Ok(())
    }
}

/// Where a compress worker finds its groups' base frames: its dictionary (number `worker` of
/// `dictionaries`), another worker's, or the store through `reader`.
struct BasesFrom<'a> {
    reader: FrameReader<'a>,
    dictionaries: &'a Dictionaries,
    worker: usize,
}

fn compress_worker(
    groups: Receiver<Group>,
    frames: Sender<(u32, Frame)>,
    spare: Sender<Vec<u8>>,
    key: &CipherKey,
    level: i32,
    mut bases_from: BasesFrom<'_>,
) {
    let mut encoder = FrameEncoder::new(level);
    let (dictionaries, me) = (bases_from.dictionaries, bases_from.worker);
    let elsewhere = |name: &FrameRef, out: &mut Vec<u8>| dictionaries.copy_base(me, name, out);
    for group in groups {
        let bases = {
            let mut dictionary = dictionaries.0[me].write().expect("dictionary lock");
            let reader = &mut bases_from.reader;
            fill_dictionary(reader, &group.bases, &mut dictionary, &elsewhere)
        };
        let dictionary = dictionaries.0[me].read().expect("dictionary lock");
        let estimate = plain_estimate(&group.bases, group.raw.len());
        // (A base frame keeps the dictionary for the next group, unused.)
        let prefix = if bases.is_empty() {
            &[][..]
        } else {
            &dictionary.bytes[..]
        };
        let frame = encoder.seal(key, &group.raw, group.chunks, prefix, bases, estimate);
        let _ = spare.try_send(group.raw);
        if frames.send((group.seq, frame)).is_err() {
            return;
        }
    }
}

/// Tree nodes close their group sooner than data: node ids (random bytes) gain nothing from
/// a larger frame, and a restore keeps two decoded node frames. At 2 MiB, a 10 GB dump's ~10
/// node frames cost a backup and a restore 3-4 MiB of their peak each; at 256 KiB a node frame
/// is ~7 nodes, and a 10 GB dump's tree ~90 frames.
const TREE_GROUP_SIZE: usize = 256 << 10;

/// Full groups (~2 MiB each) waiting for a free compress worker. With none (a rendezvous), the
/// deduper waited for a worker while both were busy and then a worker waited while the deduper
/// chunked the next group: on 2 cores, the workers waited for groups for a quarter of a day-2
/// backup of the real pg pair and a third of its day 1. Two queued groups: day 1 2.20 -> 1.93 s,
/// day 2 2.58 -> 2.36 s (medians of 3, alternating), 4 MiB more at the peak (38 -> 42 MiB with a
/// test key). (A queue of one measured no faster on day 1 of a 3 GiB dump, at 0.2.)
const GROUPS_QUEUED: usize = 2;

/// Finished packs uploading to a remote store while the next one fills (in a temporary file):
/// uploads overlap compression, and memory holds this many packs. A local put is a file write
/// the page cache absorbs; overlapping it gains nothing.
const PACKS_UPLOADING: usize = 1;

/// Stored packs named by one index file. A backup writes an index file every so many packs
/// rather than one at its end, so that what it holds of its packs' headers stays bounded
/// (~1.5 MB) however large the dump; an index file names only packs already durable.
const PACKS_PER_INDEX_FILE: usize = 64;
/// An index file is also written once its packs hold this many chunks, for packs of small
/// delta frames: ~1.2 MB of headers held until then, and 3-4 times that while the index file
/// is serialized and sealed (at 128 k chunks that was 19 MB of a 10 GB day-2 backup's peak).
const CHUNKS_PER_INDEX_FILE: usize = 32 << 10;

/// What the pack writer stored.
#[derive(Default)]
struct Stored {
    packs: Vec<PackRef>,
    /// (group, position in `packs`) for every frame stored.
    group_packs: Vec<(u32, u32)>,
    /// Bytes of packs and index files.
    bytes: u64,
    /// The last packs, stored and durable but not yet in an index file: named once the
    /// backup has read its stream to the end (a failed one leaves them to prune, unindexed).
    unindexed: Vec<IndexedPack>,
}

/// Fills packs with frames, stores each as it fills, and names them in index files as they
/// become durable; returns what it stored.
fn pack_writer(
    repo: &Repository,
    session: &PackSession,
    frames: Receiver<(u32, Frame)>,
    pack_size: usize,
    send_log: Option<&SendLogWriter>,
) -> Result<Stored> {
    let in_flight = if repo.store().is_local() {
        0
    } else {
        PACKS_UPLOADING
    };
    let mut stored = Stored::default();
    // Each with the groups whose frames it holds.
    let mut uploads: VecDeque<(Pending<bool>, IndexedPack, Vec<u32>)> = VecDeque::new();
    // Uploaded, not yet named by an index file.
    let mut durable: Vec<IndexedPack> = Vec::new();
    // Waits until at most `keep` uploads are in flight, then indexes the uploaded packs if
    // there are at least `batch`.
    let mut settle = |uploads: &mut VecDeque<(Pending<bool>, IndexedPack, Vec<u32>)>,
                      durable: &mut Vec<IndexedPack>,
                      keep: usize,
                      batch: usize|
     -> Result<()> {
        while uploads.len() > keep {
            let (upload, pack, groups) = uploads.pop_front().expect("an upload");
            repo.wait_for_pack(upload)?;
            let at = stored.packs.len() as u32;
            stored
                .group_packs
                .extend(groups.into_iter().map(|g| (g, at)));
            stored.packs.push(PackRef {
                id: pack.id,
                len: pack.len,
                uses: None,
            });
            stored.bytes += pack.len;
            durable.push(pack);
        }
        let chunks: usize = durable.iter().map(IndexedPack::chunk_count).sum();
        if durable.len() >= batch || chunks >= CHUNKS_PER_INDEX_FILE {
            log_packs(send_log, durable);
            stored.bytes += repo.commit_packs(std::mem::take(durable))?;
        }
        Ok(())
    };
    // While a pack uploads, the next one fills in a temporary file, and comes into memory
    // once the upload before it is done: one pack in memory, not two (8 MiB of a backup's peak
    // on S3).
    let new_writer = || {
        if in_flight > 0 {
            PackWriter::spilled(session, pack_size)
        } else {
            Ok(PackWriter::new(session, pack_size))
        }
    };
    let mut writer = new_writer()?;
    let mut groups = Vec::new();
    for (group, frame) in frames {
        if writer.is_full_before(&frame, &[]) {
            let full = std::mem::replace(&mut writer, new_writer()?);
            settle(
                &mut uploads,
                &mut durable,
                in_flight.saturating_sub(1),
                PACKS_PER_INDEX_FILE,
            )?;
            let (pack, bytes) = full.finish(session)?;
            let groups = std::mem::take(&mut groups);
            uploads.push_back((repo.put_pack_soon(&pack.id, bytes), pack, groups));
            settle(&mut uploads, &mut durable, in_flight, PACKS_PER_INDEX_FILE)?;
        }
        writer.add(frame, &[])?;
        groups.push(group);
    }
    if !writer.is_empty() {
        settle(
            &mut uploads,
            &mut durable,
            in_flight.saturating_sub(1),
            PACKS_PER_INDEX_FILE,
        )?;
        let (pack, bytes) = writer.finish(session)?;
        uploads.push_back((repo.put_pack_soon(&pack.id, bytes), pack, groups));
    }
    settle(&mut uploads, &mut durable, 0, PACKS_PER_INDEX_FILE)?;
    stored.unindexed = durable;
    Ok(stored)
}

fn send_log_unused(why: &str) -> String {
    format!("the send log is not used: {why}; this backup stores the whole dump")
}

/// Notes the headers of `packs` in a put-only writer's next send log.
fn log_packs(send_log: Option<&SendLogWriter>, packs: &[IndexedPack]) {
    if let Some(log) = send_log {
        packs.iter().for_each(|pack| log.add(pack));
    }
}

/// What a put-only writer deduplicates against: what its send log remembers of the series'
/// last backup and is still in the store, unmarked.
fn parent_from_send_log(
    repo: &Repository,
    log: Option<&SendLog>,
    progress: &mut dyn FnMut(BackupEvent<'_>),
) -> Result<ParentPacks> {
    let nothing = ParentPacks::Index(Index::default());
    let Some(log) = log else {
        return Ok(nothing);
    };
    match repo.usable_logged_packs(log)? {
        Ok(packs) if !packs.is_empty() => {
            for (ephemeral, key) in log.sessions() {
                repo.know_data_session(*ephemeral, key);
            }
            Ok(ParentPacks::Uses(packs))
        }
        Ok(_) => Ok(nothing),
        Err(why) => {
            progress(BackupEvent::Warning(&send_log_unused(&why)));
            Ok(nothing)
        }
    }
}

/// Backs up `source` as one snapshot.
pub fn backup(
    repo: &Repository,
    source: Source,
    options: &BackupOptions,
    progress: &mut dyn FnMut(BackupEvent<'_>),
) -> Result<BackupSummary> {
    backup_from(repo, Input::Stream(source), options, progress)
}

/// What a backup reads.
pub(crate) enum Input {
    /// A stream, chunked here.
    Stream(Source),
    /// Chunks that another repository with this one's chunking keys cut (a copy).
    Chunks(CutChunks),
}

/// A stream as chunks cut elsewhere with this repository's chunker and chunk-id keys, in
/// stream order, those in `known` without their bytes: the backup deduplicates against
/// `known` alone, so it finds exactly those.
pub(crate) struct CutChunks {
    pub chunks: Receiver<CutChunk>,
    pub known: Arc<Index>,
    /// The stream's BLAKE3 hash, as its source recorded it.
    pub stream_hash: [u8; 32],
    /// The dump's table of contents, as its source recorded it (same chunks, same ids).
    pub toc: Vec<Entry>,
}

pub(crate) enum CutChunk {
    Chunk {
        id: Id,
        len: u32,
        bytes: Option<Vec<u8>>,
    },
    /// The end of the stream: `Ok` once the source has sent all of it.
    End(std::result::Result<(), String>),
}

/// Where a backup's chunks come from, once the pipeline runs.
enum Reading<R: ChunkInput> {
    Stream {
        chunker: Chunker<R>,
        detected: Receiver<DumpInfo>,
        facts: Receiver<StreamFacts>,
    },
    Chunks(CutChunks),
}

pub(crate) fn backup_from(
    repo: &Repository,
    input: Input,
    options: &BackupOptions,
    progress: &mut dyn FnMut(BackupEvent<'_>),
) -> Result<BackupSummary> {
    let started = Instant::now();
    let key = repo.key();
    let mut tags = options.tags.clone();
    tags.sort();
    tags.dedup();
    // A put-only key cannot read the repository: what it knows of the series' last backup is
    // what it wrote down itself.
    let send_log_dir = match repo.role() {
        KeyRole::PutOnly => options.send_log.as_deref(),
        KeyRole::Full => None,
    };
    let series = repo.series_of(&tags);
    let send_log = match send_log_dir.map(|dir| SendLog::open(dir, key, &series)) {
        Some(Err(why)) => {
            progress(BackupEvent::Warning(&send_log_unused(&why)));
            None
        }
        Some(Ok(log)) => log,
        None => None,
    };
    let parent = match (&input, send_log_dir) {
        // (Never read: the copy's known chunks are what it deduplicates against.)
        (Input::Chunks(_), _) => ParentPacks::Index(Index::default()),
        (Input::Stream(_), Some(_)) => parent_from_send_log(repo, send_log.as_ref(), progress)?,
        (Input::Stream(_), None) => repo.parent_for_backup(&options.tags)?,
    };
    let headers = match &send_log {
        Some(log) => HeaderSource::SendLog(log),
        None => HeaderSource::Store(repo),
    };
    let next_send_log = send_log_dir.map(|dir| SendLogWriter::create(dir, key, &series));
    let session = PackSession::new(key);
    let threads = match options.threads {
        0 => repo.workers(),
        n => n,
    };
    let dictionaries = Dictionaries::new(threads);

    let (root, stream, added, packs, depends_on) = std::thread::scope(|scope| {
        let (known, reading) = match input {
            Input::Stream(source) => {
                let known = Known::start(scope, headers, parent)?;
                let (blocks, detected, facts) = source.into_parts();
                let chunker = Chunker::new(
                    blocks,
                    repo.config().chunker,
                    GearTable::from_key(&key.chunker_key),
                )?;
                let reading = Reading::Stream {
                    chunker,
                    detected,
                    facts,
                };
                (known, reading)
            }
            Input::Chunks(cut) => (Known::Index(cut.known.clone()), Reading::Chunks(cut)),
        };
        // Full groups wait for a free worker in a queue of GROUPS_QUEUED.
        let (group_tx, group_rx) = bounded::<Group>(GROUPS_QUEUED);
        // A sealed frame per worker waits while the pack writer stores a pack.
        let (frame_tx, frame_rx) = bounded::<(u32, Frame)>(threads);
        // Room for every group buffer there can be (the open data and tree groups, the queued
        // ones, the one waiting to be queued, one handed over, one per worker), so none is
        // dropped and allocated again.
        let (spare_tx, spare_rx) = bounded::<Vec<u8>>(threads + GROUPS_QUEUED + 4);
        for worker in 0..threads {
            let (groups, frames, spare) = (group_rx.clone(), frame_tx.clone(), spare_tx.clone());
            let (key, level) = (&session.data_key, options.compression_level);
            let bases_from = BasesFrom {
                reader: FrameReader::of_fetches(repo),
                dictionaries: &dictionaries,
                worker,
            };
            scope.spawn(move || compress_worker(groups, frames, spare, key, level, bases_from));
        }
        drop((group_rx, frame_tx, spare_tx));
        let writer = scope.spawn(|| {
            pack_writer(
                repo,
                &session,
                frame_rx,
                options.pack_size,
                next_send_log.as_ref(),
            )
        });

        let mut dedup = Deduper {
            repo,
            known,
            stored_this_session: RecentChunks::default(),
            uses: PackUses::default(),
            data: Group::default(),
            waiting: None,
            tree_nodes: Group::default(),
            bases: BaseChooser::default(),
            group_size: options.group_size,
            groups: group_tx,
            spare: spare_rx,
            group_capacity: options.group_size + repo.config().chunker.max_size as usize,
            added: AddedBytes::default(),
        };
        let (streamed, facts) = match reading {
            Reading::Stream {
                mut chunker,
                detected,
                facts,
            } => {
                let streamed = stream_chunks(&mut chunker, &mut dedup, key, &detected, progress);
                drop(chunker); // hang up on the reader if chunking stopped early
                match streamed {
                    Ok((root, runs)) => (Ok(root), Facts::Later(facts, Box::new(runs))),
                    Err(e) => (Err(e), Facts::Now(StreamRead::default())),
                }
            }
            Reading::Chunks(cut) => match feed_chunks(&cut, &mut dedup, key, progress) {
                Ok((root, size)) => {
                    let facts = StreamRead {
                        size,
                        hash: cut.stream_hash,
                        dump: None,
                        toc: cut.toc,
                    };
                    (Ok(root), Facts::Now(facts))
                }
                Err(e) => (Err(e), Facts::Now(StreamRead::default())),
            },
        };
        drop(dedup.groups);
        let packs = writer.join().expect("pack writer does not panic");
        // A storage failure stops the pipeline; report it rather than the stop it caused.
        let packs = packs?;
        let root = streamed?;
        let stream = match facts {
            Facts::Now(facts) => facts,
            // The chunker saw the end of the stream, so the reading thread is done.
            Facts::Later(facts, runs) => facts
                .recv()
                .map(|facts| StreamRead {
                    size: facts.size,
                    hash: facts.hash,
                    dump: Some(facts.dump),
                    toc: match facts.toc {
                        Some(sections) if !sections.is_empty() => {
                            runs.entries(sections, &root).unwrap_or_else(|| {
                                progress(BackupEvent::Warning(
                                    "the dump's table of contents did not match its chunks and \
                                 is left out: `ls`, `diff` and `restore --table` will not \
                                 know this snapshot's tables",
                                ));
                                Vec::new()
                            })
                        }
                        _ => Vec::new(),
                    },
                })
                .map_err(|_| Error::Internal("the input's reading thread stopped".into()))?,
        };
        let depends_on = dedup.uses.resolve(&packs);
        Ok::<_, Error>((root, stream, dedup.added, packs, depends_on))
    })?;

    if stream.size == 0 {
        return Err(Error::EmptyInput);
    }
    let mut added = added;
    log_packs(next_send_log.as_ref(), &packs.unindexed);
    added.stored = packs.bytes + repo.commit_packs(packs.unindexed)?;
    let snapshot = Snapshot {
        time: options.time.unwrap_or_else(SystemTime::now),
        hostname: options.hostname.clone().unwrap_or_else(hostname),
        tags,
        name: options.name.clone(),
        size: stream.size,
        stream_hash: stream.hash,
        tree: root,
        added,
        annotations: annotations(options, stream.dump.as_ref()),
        packs: depends_on,
        toc: stream.toc,
    };
    progress(BackupEvent::Recording);
    let (id, snapshot_len) = repo.commit_snapshot(&snapshot)?;
    // Optimisations only: the snapshot is recorded whatever happens here.
    let _ = repo.maintain_catalog(&snapshot.tags);
    if let Some(next) = &next_send_log {
        let mut sessions: HashMap<[u8; 32], [u8; 32]> = send_log
            .iter()
            .flat_map(|log| log.sessions().map(|(e, k)| (*e, *k)))
            .collect();
        sessions.insert(session.data_ephemeral, session.data_key_bytes);
        let written = next.finish(
            repo.config().repository_id,
            &series,
            id,
            &snapshot.packs,
            &sessions,
            send_log.as_ref(),
        );
        sessions.values_mut().for_each(zeroize::Zeroize::zeroize);
        if let Err(why) = written {
            progress(BackupEvent::Warning(&format!(
                "the send log could not be written ({why}): the next backup stores the whole dump"
            )));
        }
    }
    Ok(BackupSummary {
        bytes_stored: added.stored + snapshot_len,
        snapshot: SnapshotEntry { id, snapshot },
        elapsed: started.elapsed(),
        // (Chunks copied from another repository: the source's annotations say what it was.)
        dump: stream.dump.unwrap_or(DumpReport {
            info: crate::dump::detect(&[]),
            complete: None,
        }),
    })
}

/// What the stream turned out to be, or where the reading thread will say so.
enum Facts {
    Now(StreamRead),
    /// From the reading thread, once it is done; with the runs of chunks the stream was cut
    /// into, which its table of contents is matched with.
    Later(Receiver<StreamFacts>, Box<ChunkRuns>),
}

/// What the stream turned out to be.
#[derive(Default)]
struct StreamRead {
    size: u64,
    hash: [u8; 32],
    /// What the dump's header and trailer said (a stream read here).
    dump: Option<DumpReport>,
    toc: Vec<Entry>,
}

/// The caller's annotations plus what the dump's header and trailer said.
fn annotations(options: &BackupOptions, dump: Option<&DumpReport>) -> BTreeMap<String, String> {
    let mut out = options.annotations.clone();
    let Some(dump) = dump else { return out };
    let info = &dump.info;
    out.insert(annotation::DUMP_KIND.into(), info.kind.name().into());
    if let Some(v) = &info.server_version {
        out.insert(annotation::SERVER_VERSION.into(), v.clone());
    }
    if let Some(d) = &info.database {
        out.insert(annotation::DATABASE.into(), d.clone());
    }
    if let Some(complete) = dump.complete {
        out.insert(annotation::COMPLETE.into(), complete.to_string());
    }
    out
}

/// Chunks the stream into the deduper; returns the tree and the runs of chunks between the
/// cuts the reading thread asked for (the dump's sections).
fn stream_chunks<R: ChunkInput>(
    chunker: &mut Chunker<R>,
    dedup: &mut Deduper<'_>,
    key: &MasterKey,
    detected: &Receiver<DumpInfo>,
    progress: &mut dyn FnMut(BackupEvent<'_>),
) -> Result<(TreeRoot, ChunkRuns)> {
    let mut tree = TreeBuilder::default();
    let mut runs = ChunkRuns::default();
    let mut size = 0u64;
    let mut report = ProgressReport::default();
    // The reading thread sends the header's verdict once, so this reports it once.
    let report_detected = |progress: &mut dyn FnMut(BackupEvent<'_>)| {
        if let Ok(info) = detected.try_recv() {
            progress(BackupEvent::DumpDetected(&info));
        }
    };
    while let Some((chunk, at_cut)) = chunker.next_chunk_at_cut().map_err(Error::from_source)? {
        let id = key.chunk_id(chunk);
        let offset = size;
        size += chunk.len() as u64;
        let place = dedup.added.chunks;
        dedup.added.chunks += 1;
        let new_before = dedup.added.new_raw;
        dedup.offer(id, chunk, false, place)?;
        let new_bytes = dedup.added.new_raw - new_before;
        runs.chunk(place, offset, &id.0, at_cut, new_bytes, || {
            tree.cursor(place)
        });
        // (After the first chunk is looked up: by then the parent's first packs are in.)
        report_detected(progress);
        tree.push(id, place, &mut |node, at| dedup.store_tree_node(node, at))?;
        report.now_and_then(size, dedup.added.new_raw, progress);
    }
    let root = tree.finish(&mut |node, at| dedup.store_tree_node(node, at))?;
    dedup.flush()?;
    report_detected(progress); // in case it arrived after the last chunk was read
    progress(BackupEvent::Progress(BackupProgress {
        bytes_read: size,
        bytes_new: dedup.added.new_raw,
    }));
    Ok((root, runs))
}

/// Progress events, one per 8 MiB of the stream.
struct ProgressReport {
    next_at: u64,
}

impl Default for ProgressReport {
    fn default() -> Self {
        ProgressReport { next_at: 8 << 20 }
    }
}

impl ProgressReport {
    fn now_and_then(
        &mut self,
        bytes_read: u64,
        bytes_new: u64,
        progress: &mut dyn FnMut(BackupEvent<'_>),
    ) {
        if bytes_read >= self.next_at {
            self.next_at = bytes_read + (8 << 20);
            progress(BackupEvent::Progress(BackupProgress {
                bytes_read,
                bytes_new,
            }));
        }
    }
}

/// [`stream_chunks`] for chunks cut elsewhere ([`CutChunks`]); returns the tree and the
/// stream's size.
fn feed_chunks(
    cut: &CutChunks,
    dedup: &mut Deduper<'_>,
    key: &MasterKey,
    progress: &mut dyn FnMut(BackupEvent<'_>),
) -> Result<(TreeRoot, u64)> {
    let mut tree = TreeBuilder::default();
    let mut size = 0u64;
    let mut report = ProgressReport::default();
    loop {
        let (id, len, bytes) = match cut.chunks.recv() {
            Ok(CutChunk::Chunk { id, len, bytes }) => (id, len, bytes),
            Ok(CutChunk::End(Ok(()))) => break,
            Ok(CutChunk::End(Err(why))) => return Err(Error::Internal(why)),
            Err(_) => return Err(Error::Internal("the copy's source stopped".into())),
        };
        let place = dedup.added.chunks;
        dedup.added.chunks += 1;
        let object = || format!("copied chunk {}", id.short());
        match bytes {
            Some(bytes) if bytes.len() == len as usize && key.chunk_id(&bytes) == id => {
                dedup.offer(id, &bytes, false, place)?;
            }
            Some(_) => return Err(Error::corrupt(object(), "is not what its id says")),
            None => {
                if !dedup.offer_known(&id, false, place)? {
                    return Err(Error::Internal(format!("{} is not here", object())));
                }
            }
        }
        size += len as u64;
        tree.push(id, place, &mut |node, at| dedup.store_tree_node(node, at))?;
        report.now_and_then(size, dedup.added.new_raw, progress);
    }
    let root = tree.finish(&mut |node, at| dedup.store_tree_node(node, at))?;
    dedup.flush()?;
    Ok((root, size))
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};

    use super::*;

    /// Every pack a restore needs at stream chunk `place` (the frame's and its bases'), by the
    /// repository's whole index, checked against what the snapshot says of its packs.
    fn assert_uses_cover(repo: &Repository, entry: &SnapshotEntry) {
        let index = repo.load_index().unwrap();
        let snapshot = &entry.snapshot;
        assert!(snapshot.packs_have_uses());
        let span_of = |id: &Id| {
            let at = snapshot.packs.binary_search_by_key(id, |p| p.id).unwrap();
            snapshot.packs[at].uses.unwrap()
        };
        let covers = |id: &Id, place: u64| {
            let frame = index.chunk_frame(id).expect("indexed");
            let mut frames = vec![frame];
            frames.extend_from_slice(index.bases(frame));
            for frame in frames {
                let span = span_of(&index.pack(index.frame(frame).pack).id);
                assert!(
                    span.first <= place && place <= span.last,
                    "chunk {} at {place}: its pack is used at {span:?}",
                    id.short()
                );
            }
        };
        let mut reader = FrameReader::new(repo, &index);
        let mut walker = crate::tree::TreeWalker::new(&snapshot.tree);
        let mut place = 0u64;
        while let Some(id) = walker
            .next_id(&mut |node| {
                covers(node, place);
                let loc = index.chunk(node).unwrap();
                let raw = reader.read(loc.frame, &[], Vec::new())?;
                Ok(raw[loc.offset as usize..][..loc.len as usize].to_vec())
            })
            .unwrap()
        {
            covers(&id, place);
            place += 1;
        }
        assert_eq!(place, snapshot.added.chunks);
    }

    #[test]
    fn a_snapshot_says_at_which_stream_chunks_it_uses_each_pack() {
        let repo = crate::repo::test_repository();
        let small = BackupOptions {
            group_size: 64 << 10,
            pack_size: 256 << 10,
            ..BackupOptions::default()
        };
        let mut day1 = vec![0u8; 6_000_000];
        blake3::Hasher::new().finalize_xof().fill(&mut day1);
        // A block that comes back near the end: one group used at two far places.
        let repeated = day1[100_000..400_000].to_vec();
        day1[5_500_000..5_800_000].copy_from_slice(&repeated);
        let mut day2 = day1.clone();
        for at in (50_000..6_000_000).step_by(700_000) {
            day2[at..at + 64].fill(7);
        }
        for data in [day1, day2] {
            let source = Source::spawn(std::io::Cursor::new(data));
            let entry = crate::backup(&repo, source, &small, &mut |_| {})
                .unwrap()
                .snapshot;
            assert!(entry.snapshot.tree.height >= 1);
            assert_uses_cover(&repo, &entry);
            // Uses say something: most packs serve a small part of the stream.
            let chunks = entry.snapshot.added.chunks;
            let narrow = entry.snapshot.packs.iter().filter(|p| {
                let span = p.uses.unwrap();
                span.last - span.first < chunks / 4
            });
            assert!(
                narrow.count() * 2 > entry.snapshot.packs.len(),
                "{:?}",
                entry.snapshot.packs
            );
        }
    }

    /// A repository of base frames, its index, and four of its frames with their plaintexts.
    fn four_base_frames() -> (Repository, Index, [u32; 4], HashMap<u32, Vec<u8>>) {
        let repo = crate::repo::test_repository();
        let small = BackupOptions {
            group_size: 64 << 10,
            ..BackupOptions::default()
        };
        let mut data = vec![0u8; 1_000_000];
        blake3::Hasher::new().finalize_xof().fill(&mut data);
        let source = Source::spawn(std::io::Cursor::new(data));
        backup(&repo, source, &small, &mut |_| {}).unwrap();
        let index = repo.load_index().unwrap();
        let mut reader = FrameReader::new(&repo, &index);
        let plain: Vec<u32> = (0..index.frame_count() as u32)
            .filter(|&f| index.bases(f).is_empty() && index.frame(f).raw_len > 0)
            .take(4)
            .collect();
        assert_eq!(plain.len(), 4, "frames: {}", index.frame_count());
        let raw: HashMap<u32, Vec<u8>> = plain
            .iter()
            .map(|&f| (f, reader.read(f, &[], Vec::new()).unwrap()))
            .collect();
        drop(reader);
        let four = plain.try_into().expect("four frames");
        (repo, index, four, raw)
    }

    fn as_bases(index: &Index, frames: &[u32]) -> Vec<Base> {
        frames
            .iter()
            .map(|&f| {
                let frame = *index.frame(f);
                Base {
                    name: index.frame_ref(f),
                    pack: index.pack(frame.pack).clone(),
                    frame,
                }
            })
            .collect()
    }

    #[test]
    fn a_base_that_another_worker_holds_is_copied_from_its_dictionary_unless_it_is_filling() {
        let (repo, index, [a, b, c, _], raw) = four_base_frames();
        let mut reader = FrameReader::new(&repo, &index);
        let all = Dictionaries::new(2);
        let dictionaries = &all;
        let copy = |me: usize| {
            move |name: &FrameRef, out: &mut Vec<u8>| -> bool {
                dictionaries.copy_base(me, name, out)
            }
        };
        {
            let mut first = dictionaries.0[0].write().unwrap();
            first
                .fill(&mut reader, &as_bases(&index, &[a, b]), &copy(0))
                .unwrap();
            // Marked, to tell a copy from a decode.
            let at = raw[&a].len();
            first.bytes[at] ^= 1;
        }
        let mut expected: Vec<u8> = raw[&b].iter().chain(&raw[&c]).copied().collect();
        expected[0] ^= 1;
        let mut second = dictionaries.0[1].write().unwrap();
        second
            .fill(&mut reader, &as_bases(&index, &[b, c]), &copy(1))
            .unwrap();
        assert!(
            second.bytes == expected,
            "b copied from the first dictionary"
        );
        // A dictionary being filled is not waited for: the base is decoded.
        *second = Dictionary::default();
        let filling = dictionaries.0[0].write().unwrap();
        second
            .fill(&mut reader, &as_bases(&index, &[b]), &copy(1))
            .unwrap();
        assert!(second.bytes == raw[&b], "b decoded");
        drop(filling);
        drop(second);
        let mut copied = Vec::new();
        assert!(dictionaries.copy_base(1, &index.frame_ref(b), &mut copied));
        assert!(copied == expected[..raw[&b].len()]);
        // A worker's own dictionary is not where it copies from.
        assert!(!dictionaries.copy_base(0, &index.frame_ref(a), &mut Vec::new()));
    }

    #[test]
    fn a_dictionary_holds_exactly_its_bases_whatever_it_held_before() {
        let (repo, index, [a, b, c, d], raw) = four_base_frames();
        let mut reader = FrameReader::new(&repo, &index);
        let mut dictionary = Dictionary::default();
        // Kept whole, kept in part at the front or the back, nothing kept, a single base.
        for bases in [
            vec![a, b],
            vec![a, b],
            vec![b, c],
            vec![b],
            vec![a, d],
            vec![d, a],
            vec![c, d],
            vec![a],
            vec![],
        ] {
            let as_bases = as_bases(&index, &bases);
            dictionary
                .fill(&mut reader, &as_bases, &|_, _| false)
                .unwrap();
            if bases.is_empty() {
                // (Left as it was, unused by a base frame.)
                assert_eq!(dictionary.bytes, raw[&a]);
                continue;
            }
            let expected: Vec<u8> = bases.iter().flat_map(|f| raw[f].clone()).collect();
            assert_eq!(dictionary.bytes, expected, "{bases:?}");
            let names: Vec<FrameRef> = bases.iter().map(|&f| index.frame_ref(f)).collect();
            assert_eq!(dictionary.bases, names);
        }
    }

    #[test]
    fn recent_chunks_remember_exactly_the_last_ones_kept() {
        // A small window and ids from a small pool: many repeats, evictions and probe runs
        // that wrap around the table. Each id is recorded with the step that stored it, as a
        // backup records the group.
        let mut recent = RecentChunks::new(50);
        let (mut model, mut order) = (HashMap::new(), VecDeque::new());
        for n in 0..20_000u32 {
            let pick = blake3::hash(&n.to_le_bytes()).as_bytes()[0] as u32 % 120;
            let id = Id(*blake3::hash(&pick.to_le_bytes()).as_bytes());
            let expected = match model.get(&id) {
                Some(&stored_at) => Err(stored_at),
                None => {
                    model.insert(id, n);
                    order.push_back(id);
                    if order.len() > 50 {
                        model.remove(&order.pop_front().unwrap());
                    }
                    Ok(())
                }
            };
            assert_eq!(recent.insert(&id, n), expected, "step {n}");
        }
        assert!(recent.slots.iter().filter(|&&s| s != 0).count() == 50);
    }
}
