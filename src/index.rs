//! The index: where each stored chunk is (pack, frame, offset within the frame's plaintext).
//!
//! On disk, `index/<id>` files are sealed to the metadata key (see [`crate::envelope`]) and hold
//! the headers of the packs that one backup wrote, plus each pack's id, length and data
//! ephemeral key. A pack's own header holds the same frames, so the index can be rebuilt from
//! packs.
//!
//! In memory an [`Index`] holds frames, packs and delta bases (frame-level: ~1/128 of the
//! chunks); where each chunk is, by the first 16 bytes of its id, goes to a table sorted on
//! local disk once it is large ([`SpillingIndex`], docs/FORMAT.md §11.4), so memory does not grow
//! with the repository. A 128-bit prefix of a keyed hash cannot be collided on purpose, and by
//! chance only with probability ~n/2^128 per lookup; restore re-checks every chunk against its
//! full id regardless. (A restore of a snapshot that says where it uses its packs needs no
//! index: [`crate::stream_index`].)

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::crypto::OpeningKey;
use crate::envelope;
use crate::error::Result;
use crate::id::Id;
use crate::pack::{self, FrameRef, PackHeader};
use crate::spill::{self, Record, Searchable, Sorter, Table, TableWriter};

pub const INDEX_MAGIC: &[u8; 8] = b"BKPIDX02";
const INDEX_MAGIC_V1: &[u8; 8] = b"BKPIDX01";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedPack {
    pub id: Id,
    pub len: u64,
    pub data_ephemeral: [u8; 32],
    pub header: PackHeader,
}

impl IndexedPack {
    /// How many chunk entries its header has.
    pub fn chunk_count(&self) -> usize {
        self.header.frames.iter().map(|f| f.chunks.len()).sum()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    pub packs: Vec<IndexedPack>,
}

impl IndexFile {
    /// Opens a sealed index file of either format version.
    pub fn open(metadata: &OpeningKey, bytes: &[u8], object: &str) -> Result<IndexFile> {
        if bytes.starts_with(INDEX_MAGIC_V1) {
            let file: v1::IndexFile = envelope::open(INDEX_MAGIC_V1, metadata, bytes, object)?;
            return Ok(file.into());
        }
        envelope::open(INDEX_MAGIC, metadata, bytes, object)
    }
}

/// Format version 1: the same with version 1 pack headers.
mod v1 {
    use serde::Deserialize;

    use crate::id::Id;

    #[derive(Deserialize)]
    pub struct IndexedPack {
        id: Id,
        len: u64,
        data_ephemeral: [u8; 32],
        header: crate::pack::v1::PackHeader,
    }

    #[derive(Deserialize)]
    pub struct IndexFile {
        packs: Vec<IndexedPack>,
    }

    impl From<IndexFile> for super::IndexFile {
        fn from(file: IndexFile) -> Self {
            let packs = file.packs.into_iter().map(|p| super::IndexedPack {
                id: p.id,
                len: p.len,
                data_ephemeral: p.data_ephemeral,
                header: p.header.into(),
            });
            super::IndexFile {
                packs: packs.collect(),
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChunkLocation {
    pub frame: u32,
    pub offset: u32,
    pub len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLocation {
    pub pack: u32,
    /// Its position in its pack's header.
    pub number_in_pack: u32,
    pub offset: u64,
    pub sealed_len: u32,
    pub raw_len: u32,
    bases_at: u32,
    bases_len: u32,
}

impl FrameLocation {
    /// A frame outside an [`Index`] (its bases kept by the caller).
    pub fn new(
        pack: u32,
        number_in_pack: u32,
        offset: u64,
        sealed_len: u32,
        raw_len: u32,
    ) -> FrameLocation {
        FrameLocation {
            pack,
            number_in_pack,
            offset,
            sealed_len,
            raw_len,
            bases_at: 0,
            bases_len: 0,
        }
    }
}

/// A base frame that is not in the index, or is itself a delta frame (bases are one level).
pub const MISSING_BASE: u32 = u32::MAX;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackLocation {
    pub id: Id,
    pub len: u64,
    pub data_ephemeral: [u8; 32],
}

pub type IdPrefix = [u8; 16];

fn prefix(id: &Id) -> IdPrefix {
    id.0[..16].try_into().expect("16 bytes")
}

/// Where a chunk is: the record a lookup in an [`Index`] would give, by id prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocatedChunk {
    pub prefix: IdPrefix,
    pub location: ChunkLocation,
}

fn encode_four(out: &mut [u8], prefix: &IdPrefix, numbers: [u32; 3]) {
    out[..16].copy_from_slice(prefix);
    for (n, value) in numbers.iter().enumerate() {
        out[16 + 4 * n..20 + 4 * n].copy_from_slice(&value.to_be_bytes());
    }
}

fn decode_four(bytes: &[u8]) -> (IdPrefix, [u32; 3]) {
    let number =
        |n: usize| u32::from_be_bytes(bytes[16 + 4 * n..20 + 4 * n].try_into().expect("4"));
    (
        bytes[..16].try_into().expect("16 bytes"),
        [number(0), number(1), number(2)],
    )
}

impl Record for LocatedChunk {
    const LEN: usize = 28;
    fn encode(&self, out: &mut [u8]) {
        let l = &self.location;
        encode_four(out, &self.prefix, [l.frame, l.offset, l.len]);
    }
    fn decode(bytes: &[u8]) -> Self {
        let (prefix, [frame, offset, len]) = decode_four(bytes);
        LocatedChunk {
            prefix,
            location: ChunkLocation { frame, offset, len },
        }
    }
}

/// The index of a repository too large to hold in memory (prune, check): frames, packs and
/// bases in memory as in an [`Index`], the chunks sorted on disk ([`crate::spill`]) into a
/// [`ChunkTable`] that is joined with sorted chunk ids instead of searched.
pub struct SpillingIndex {
    index: Index,
    /// Of the sort buffer, and of the table before it goes to a file.
    memory: usize,
    /// In (prefix, frame) order: of a chunk's copies, the first added comes first.
    chunks: Sorter<LocatedChunk>,
}

impl Default for SpillingIndex {
    fn default() -> Self {
        SpillingIndex::with_memory(spill::sort_memory())
    }
}

/// Memory of a backup's or a restore's [`SpillingIndex`]: a snapshot of up to ~75 k chunks
/// (~1.2 GB of dump) is held in memory, a larger one goes to a temporary file: beyond that, the
/// sort buffers were what a backup of a larger dump held more (measured with 1 and 5 GB dumps).
const LOOKUP_MEMORY: usize = 2 << 20;

/// [`LOOKUP_MEMORY`], or less if the sort buffers are set smaller ([`spill::set_sort_memory`]).
pub fn lookup_memory() -> usize {
    LOOKUP_MEMORY.min(spill::sort_memory())
}

impl SpillingIndex {
    /// One whose sorting takes `memory` bytes (runs beyond it go to temporary files).
    pub fn with_memory(memory: usize) -> SpillingIndex {
        SpillingIndex {
            index: Index::default(),
            memory,
            chunks: Sorter::new(memory, false),
        }
    }

    pub fn add(&mut self, pack: &IndexedPack) -> Result<()> {
        let chunks = &mut self.chunks;
        self.index.add_frames(pack, &mut |chunk| chunks.push(chunk))
    }

    /// The index (without chunks: look them up in the table) and the table: of the copies of a
    /// chunk, the first-added one that can be decoded (a copy whose delta bases are gone, in a
    /// pack a prune is about to delete, must not hide a good one), the others recorded as
    /// alternatives.
    pub fn finish(self) -> Result<(Index, ChunkTable)> {
        let (index, table) = self.finish_table(false)?;
        Ok((index, ChunkTable { table }))
    }

    /// An index whose chunks are looked up in the sorted table (in memory while it is small,
    /// else in a temporary file searched a block at a time), chosen as by
    /// [`SpillingIndex::finish`]: what a backup and a restore use, so that their memory does not
    /// grow with the snapshot's chunks. With `decodable_only` (a backup), chunks only in delta
    /// frames whose bases are not in this index (a prune deleted them, or their packs are marked
    /// obsolete and left out) are left out, so a backup never deduplicates against a frame that
    /// could not be decoded; it stores those chunks again.
    pub fn finish_for_lookups(self, decodable_only: bool) -> Result<Index> {
        let (mut index, table) = self.finish_table(decodable_only)?;
        index.lookup = Some(Searchable::new(table)?);
        Ok(index)
    }

    fn finish_table(self, decodable_only: bool) -> Result<(Index, Table<LocatedChunk>)> {
        let SpillingIndex {
            mut index,
            memory,
            chunks,
        } = self;
        index.resolve_bases();
        let sorted = chunks.finish()?;
        let mut table = TableWriter::new(memory);
        let mut group: Vec<LocatedChunk> = Vec::new();
        // Frames are known from the records themselves: no lookup of a chunk number's frame
        // (a binary search with a cache miss a step, which took half of a check's time).
        let mut close = |group: &mut Vec<LocatedChunk>, index: &mut Index| -> Result<()> {
            let Some(first) = group.first() else {
                return Ok(());
            };
            let decodable = |record: &&LocatedChunk| {
                !index.bases(record.location.frame).contains(&MISSING_BASE)
            };
            // (Most chunks are stored once: then that copy it is, without looking at frames.)
            let best = match group.len() {
                1 => *first,
                _ => *group.iter().find(decodable).unwrap_or(first),
            };
            if decodable_only && !decodable(&&best) {
                group.clear();
                return Ok(());
            }
            let chosen = best.location.frame;
            for other in group.iter().filter(|r| r.location != best.location) {
                index.alternatives.push((chosen, other.location.frame));
            }
            group.clear();
            table.push(best)
        };
        for record in sorted.scan() {
            let record = record?;
            if group
                .first()
                .is_some_and(|first| first.prefix != record.prefix)
            {
                close(&mut group, &mut index)?;
            }
            group.push(record);
        }
        close(&mut group, &mut index)?;
        Ok((index, table.finish()?))
    }
}

/// Every chunk of an index, located, in id-prefix order, once each.
pub struct ChunkTable {
    table: Table<LocatedChunk>,
}

impl ChunkTable {
    pub fn scan(&self) -> impl Iterator<Item = Result<LocatedChunk>> + '_ {
        self.table.scan()
    }
}

pub(crate) fn id_prefix(id: &Id) -> IdPrefix {
    prefix(id)
}

/// Frames, packs and delta bases of the packs added to a [`SpillingIndex`], and (made by
/// [`SpillingIndex::finish_for_lookups`]) where each chunk is.
#[derive(Default)]
pub struct Index {
    frames: Vec<FrameLocation>,
    packs: Vec<PackLocation>,
    /// Base frame numbers of delta frames (`FrameLocation::bases_at..`), resolved once every
    /// pack is added from `unresolved_bases`: a base may be in a pack that is added later.
    bases: Vec<u32>,
    unresolved_bases: Vec<FrameRef>,
    /// Old names of frames that a repack moved (`pack::MovedFrame`), with their frame numbers.
    moved: Vec<(FrameRef, u32)>,
    /// Where one of two claims was chosen: (chosen frame, other frame), for a chunk stored
    /// more than once and for a base frame that a repack moved. Prune verifies the chosen
    /// claim before it lets the other pack go.
    alternatives: Vec<(u32, u32)>,
    /// Where the chunks are (none without it).
    lookup: Option<Searchable<LocatedChunk>>,
}

impl Index {
    /// Adds `pack`'s frames, handing each of its chunks to `chunk` instead of keeping it.
    fn add_frames(
        &mut self,
        pack: &IndexedPack,
        chunk: &mut dyn FnMut(LocatedChunk) -> Result<()>,
    ) -> Result<()> {
        let pack_number = self.packs.len() as u32;
        let first_frame = self.frames.len() as u32;
        self.moved.extend(
            pack.header
                .moved
                .iter()
                .map(|m: &pack::MovedFrame| (m.from, first_frame + m.frame)),
        );
        self.packs.push(PackLocation {
            id: pack.id,
            len: pack.len,
            data_ephemeral: pack.data_ephemeral,
        });
        for (number_in_pack, frame) in pack.header.frames.iter().enumerate() {
            let mut offset = 0u32;
            for entry in &frame.chunks {
                chunk(LocatedChunk {
                    prefix: prefix(&entry.id),
                    location: ChunkLocation {
                        frame: self.frames.len() as u32,
                        offset,
                        len: entry.len,
                    },
                })?;
                offset += entry.len;
            }
            self.frames.push(FrameLocation {
                pack: pack_number,
                number_in_pack: number_in_pack as u32,
                offset: frame.offset,
                sealed_len: frame.sealed_len,
                raw_len: offset,
                bases_at: self.unresolved_bases.len() as u32,
                bases_len: frame.bases.len() as u32,
            });
            self.unresolved_bases.extend_from_slice(&frame.bases);
        }
        Ok(())
    }

    fn resolve_bases(&mut self) {
        let mut first_frame: HashMap<Id, u32> = HashMap::new();
        for (number, frame) in self.frames.iter().enumerate() {
            if frame.number_in_pack == 0 {
                first_frame
                    .entry(self.packs[frame.pack as usize].id)
                    .or_insert(number as u32);
            }
        }
        let is_base = |number: u32| {
            self.frames
                .get(number as usize)
                .is_some_and(|f| f.bases_len == 0)
        };
        // A moved frame's new place wins over its old one, which a prune deletes once no
        // other snapshot needs it.
        let moved: HashMap<FrameRef, u32> = self
            .moved
            .iter()
            .filter(|&&(_, number)| is_base(number))
            .copied()
            .collect();
        let direct = |base: &FrameRef| -> u32 {
            let Some(&first) = first_frame.get(&base.pack) else {
                return MISSING_BASE;
            };
            let number = first as usize + base.frame as usize;
            match self.frames.get(number) {
                Some(f)
                    if self.packs[f.pack as usize].id == base.pack
                        && f.number_in_pack == base.frame
                        && f.bases_len == 0 =>
                {
                    number as u32
                }
                _ => MISSING_BASE,
            }
        };
        let mut alternatives = Vec::new();
        let resolve = |base: &FrameRef| -> u32 {
            let original = direct(base);
            match moved.get(base) {
                Some(&number) => {
                    if original != MISSING_BASE {
                        alternatives.push((number, original));
                    }
                    number
                }
                None => original,
            }
        };
        self.bases = self.unresolved_bases.iter().map(resolve).collect();
        alternatives.sort_unstable();
        alternatives.dedup();
        self.alternatives.extend(alternatives);
        self.unresolved_bases = Vec::new();
        self.moved = Vec::new();
    }

    pub fn contains(&self, id: &Id) -> bool {
        self.chunk_frame(id).is_some()
    }

    /// The frame that holds a chunk.
    pub fn chunk_frame(&self, id: &Id) -> Option<u32> {
        self.chunk(id).map(|location| location.frame)
    }

    /// Where a chunk is.
    pub fn chunk(&self, id: &Id) -> Option<ChunkLocation> {
        // A temporary file that cannot be read back (a disk error) leaves the chunk unfound: a
        // backup stores it again, a restore reports it.
        let key = prefix(id);
        let found = self
            .lookup
            .as_ref()?
            .find(&key, |c| c.prefix)
            .ok()
            .flatten();
        found.map(|c| c.location)
    }

    /// The frames of pack number `pack`, in header order (a pack's frames are added together).
    pub fn frames_of_pack(&self, pack: u32) -> std::ops::Range<u32> {
        let start = self.frames.partition_point(|f| f.pack < pack);
        let end = self.frames.partition_point(|f| f.pack <= pack);
        start as u32..end as u32
    }

    pub fn frame(&self, frame: u32) -> &FrameLocation {
        &self.frames[frame as usize]
    }

    /// The base frames of a delta frame (empty for a base frame); [`MISSING_BASE`] where a base
    /// cannot be used.
    pub fn bases(&self, frame: u32) -> &[u32] {
        let f = &self.frames[frame as usize];
        &self.bases[f.bases_at as usize..(f.bases_at + f.bases_len) as usize]
    }

    /// How pack headers name a frame.
    pub fn frame_ref(&self, frame: u32) -> FrameRef {
        let f = &self.frames[frame as usize];
        FrameRef {
            pack: self.packs[f.pack as usize].id,
            frame: f.number_in_pack,
        }
    }

    /// (chosen frame, other frame) for every chunk stored more than once and every moved base
    /// frame whose old place is indexed too.
    pub fn alternatives(&self) -> &[(u32, u32)] {
        &self.alternatives
    }

    /// Every pack, in the order added (a pack named by two index files appears twice).
    pub fn packs(&self) -> &[PackLocation] {
        &self.packs
    }

    pub fn pack(&self, pack: u32) -> &PackLocation {
        &self.packs[pack as usize]
    }

    pub fn frame_count(&self) -> usize {
        self.frames.len()
    }

    pub fn chunk_count(&self) -> usize {
        self.lookup.as_ref().map_or(0, |lookup| lookup.len())
    }

    pub fn pack_count(&self) -> usize {
        self.packs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::{ChunkEntry, FrameEntry};

    /// An index of `packs` for lookups, in memory.
    fn lookups(packs: &[IndexedPack], decodable_only: bool) -> Index {
        let mut spilling = SpillingIndex::with_memory(64 << 20);
        for pack in packs {
            spilling.add(pack).unwrap();
        }
        spilling.finish_for_lookups(decodable_only).unwrap()
    }

    /// A pack with id `[pack_id; 32]` holding `frames`.
    fn pack(pack_id: u8, frames: Vec<FrameEntry>) -> IndexedPack {
        IndexedPack {
            id: Id([pack_id; 32]),
            len: 1000,
            data_ephemeral: [0; 32],
            header: PackHeader {
                frames,
                moved: vec![],
            },
        }
    }

    #[test]
    fn locates_chunks_by_frame_and_offset() {
        let id = |b| Id([b; 32]);
        let index = lookups(
            &[IndexedPack {
                id: id(9),
                len: 1000,
                data_ephemeral: [0; 32],
                header: PackHeader {
                    frames: vec![
                        FrameEntry {
                            offset: 72,
                            sealed_len: 100,
                            chunks: vec![
                                ChunkEntry { id: id(1), len: 10 },
                                ChunkEntry { id: id(2), len: 20 },
                            ],
                            bases: vec![],
                        },
                        FrameEntry {
                            offset: 172,
                            sealed_len: 50,
                            chunks: vec![ChunkEntry { id: id(3), len: 5 }],
                            bases: vec![],
                        },
                    ],
                    moved: vec![],
                },
            }],
            false,
        );
        let loc = index.chunk(&id(2)).unwrap();
        assert_eq!(
            loc,
            ChunkLocation {
                frame: 0,
                offset: 10,
                len: 20
            }
        );
        assert_eq!(index.frame(0).raw_len, 30);
        let first = index.chunk(&id(1)).unwrap();
        assert_eq!((first.frame, first.offset, first.len), (0, 0, 10));
        let third = index.chunk(&id(3)).unwrap();
        assert_eq!((third.offset, third.len), (0, 5));
        assert_eq!(index.frame(third.frame).offset, 172);
        assert_eq!(index.pack(index.frame(third.frame).pack).id, id(9));
        assert!(!index.contains(&id(4)));
    }

    #[test]
    fn resolves_base_frames_across_packs_one_level_deep() {
        let id = |b| Id([b; 32]);
        let frame = |offset, chunk: u8, bases: Vec<FrameRef>| FrameEntry {
            offset,
            sealed_len: 10,
            chunks: vec![ChunkEntry {
                id: id(chunk),
                len: 4,
            }],
            bases,
        };
        let base = |pack: u8, frame: u32| FrameRef {
            pack: id(pack),
            frame,
        };
        // The delta frames' pack comes first: bases resolve whatever the order.
        let packs = [
            pack(
                20,
                vec![
                    frame(72, 1, vec![base(10, 1), base(10, 0)]),
                    frame(82, 2, vec![base(20, 0)]), // a delta of a delta
                    frame(92, 3, vec![base(30, 0), base(10, 5)]), // unknown pack, no such frame
                ],
            ),
            pack(10, vec![frame(72, 4, vec![]), frame(82, 5, vec![])]),
        ];
        let index = lookups(&packs, false);
        let number = |chunk| index.chunk(&id(chunk)).unwrap().frame;
        assert_eq!(index.bases(number(1)), &[number(5), number(4)]);
        assert_eq!(index.bases(number(2)), &[MISSING_BASE]);
        assert_eq!(index.bases(number(3)), &[MISSING_BASE, MISSING_BASE]);
        assert!(index.bases(number(4)).is_empty());
        assert_eq!(index.frame_ref(number(5)), base(10, 1));
    }

    #[test]
    fn a_backup_index_forgets_chunks_whose_frames_cannot_be_decoded() {
        let id = |b| Id([b; 32]);
        let frame = |offset, chunks: &[u8], bases: Vec<FrameRef>| FrameEntry {
            offset,
            sealed_len: 10,
            chunks: chunks
                .iter()
                .map(|&c| ChunkEntry { id: id(c), len: 4 })
                .collect(),
            bases,
        };
        let gone = FrameRef {
            pack: id(99),
            frame: 0,
        };
        // Chunk 1 only in a delta frame whose base is gone; chunk 2 there and in a good frame
        // added later; chunk 3 in a good frame only.
        let packs = [
            pack(10, vec![frame(72, &[1, 2], vec![gone])]),
            pack(20, vec![frame(72, &[2, 3], vec![])]),
        ];
        let looked_up = lookups(&packs, true);
        let restore = lookups(&packs, false);
        assert_eq!(looked_up.chunk_frame(&id(1)), None);
        assert_eq!(looked_up.chunk_frame(&id(2)), Some(1));
        assert_eq!(looked_up.chunk_frame(&id(3)), Some(1));
        assert_eq!(looked_up.chunk_count(), 2);
        // A restore finds every chunk, the decodable copy of chunk 2 first.
        assert_eq!(restore.chunk_frame(&id(1)), Some(0));
        assert_eq!(
            restore.chunk(&id(2)).map(|c| (c.frame, c.offset)),
            Some((1, 0))
        );
        assert_eq!(
            restore.chunk(&id(3)).map(|c| (c.frame, c.offset)),
            Some((1, 4))
        );
    }

    #[test]
    fn bases_follow_frames_that_a_repack_moved_once_or_twice() {
        let id = |b| Id([b; 32]);
        let frame_ref = |pack: u8, frame: u32| FrameRef {
            pack: id(pack),
            frame,
        };
        let frame = |chunk: u8, bases: Vec<FrameRef>| FrameEntry {
            offset: 72,
            sealed_len: 10,
            chunks: vec![ChunkEntry {
                id: id(chunk),
                len: 4,
            }],
            bases,
        };
        let pack = |pack_id: u8, frames, moved| IndexedPack {
            id: id(pack_id),
            len: 1000,
            data_ephemeral: [0; 32],
            header: PackHeader { frames, moved },
        };
        // Deltas written before the moves name their bases in packs 10 and 11, both gone.
        let first = pack(
            20,
            vec![
                frame(1, vec![frame_ref(10, 3)]),
                frame(2, vec![frame_ref(11, 0), frame_ref(12, 1)]),
            ],
            vec![],
        );
        // Pack 12 holds (10, 3) after one move; pack 13 holds (11, 0) after two, and a delta
        // frame that a moved-frame record cannot turn into a base.
        let moved = |frame, from| pack::MovedFrame { frame, from };
        let second = pack(
            12,
            vec![frame(4, vec![]), frame(5, vec![])],
            vec![moved(0, frame_ref(10, 3))],
        );
        let third = pack(
            13,
            vec![frame(6, vec![frame_ref(12, 1)]), frame(7, vec![])],
            vec![
                moved(1, frame_ref(14, 2)),
                moved(1, frame_ref(11, 0)),
                moved(0, frame_ref(12, 1)),
            ],
        );
        let index = lookups(&[first, second, third], false);
        let number = |chunk| index.chunk(&id(chunk)).unwrap().frame;
        assert_eq!(index.bases(number(1)), &[number(4)]);
        assert_eq!(index.bases(number(2)), &[number(7), number(5)]);
        assert_eq!(index.bases(number(6)), &[number(5)]);
    }

    #[test]
    fn a_chunk_stored_twice_is_found_at_its_first_location() {
        let id = Id([7; 32]);
        let pack = |pack_id: u8, offset: u64| IndexedPack {
            id: Id([pack_id; 32]),
            len: 1 << 20,
            data_ephemeral: [0; 32],
            header: PackHeader {
                frames: vec![FrameEntry {
                    offset,
                    sealed_len: 10,
                    chunks: vec![ChunkEntry { id, len: 4 }],
                    bases: vec![],
                }],
                moved: vec![],
            },
        };
        let index = lookups(&[pack(1, 100), pack(2, 200)], false);
        let loc = index.chunk(&id).unwrap();
        assert_eq!(index.frame(loc.frame).offset, 100);
        assert!(!index.contains(&Id([8; 32])));
    }

    #[test]
    fn every_chunk_is_found_where_its_pack_header_put_it() {
        let mut random = blake3::Hasher::new().finalize_xof();
        let mut next = |below: u32| {
            let mut word = [0u8; 4];
            random.fill(&mut word);
            u32::from_le_bytes(word) % below
        };
        // The smallest budget: runs of 1,024 records, so this one sorts through files.
        let mut spilling = SpillingIndex::with_memory(0);
        // Looked up, in a file and in memory.
        let mut in_file = SpillingIndex::with_memory(0);
        let mut in_memory = SpillingIndex::with_memory(64 << 20);
        let mut expected = Vec::new();
        let mut frame_number = 0;
        // Over 1,024 chunks: more than the smallest table holds in memory.
        for pack_number in 0..500u16 {
            // Some frames without chunks and some chunks stored again, as a repack can leave.
            let frames = (0..next(6))
                .map(|f| {
                    let mut offset = 0;
                    let chunks = (0..next(5))
                        .map(|c| {
                            let [high, low] = pack_number.to_be_bytes();
                            let id = Id(*blake3::hash(&[high, low, f as u8, c as u8]).as_bytes());
                            let id = if next(8) == 0 { Id([1; 32]) } else { id };
                            let len = 1 + next(1000);
                            if id != Id([1; 32]) || !expected.iter().any(|(e, _)| *e == id) {
                                expected.push((id, (frame_number, offset, len)));
                            }
                            offset += len;
                            ChunkEntry { id, len }
                        })
                        .collect();
                    frame_number += 1;
                    FrameEntry {
                        offset: 72,
                        sealed_len: 10,
                        chunks,
                        bases: vec![],
                    }
                })
                .collect();
            let pack = IndexedPack {
                id: Id(*blake3::hash(&pack_number.to_be_bytes()).as_bytes()),
                len: 1000,
                data_ephemeral: [0; 32],
                header: PackHeader {
                    frames,
                    moved: vec![],
                },
            };
            spilling.add(&pack).unwrap();
            in_file.add(&pack).unwrap();
            in_memory.add(&pack).unwrap();
        }
        let in_file = in_file.finish_for_lookups(false).unwrap();
        let in_memory = in_memory.finish_for_lookups(false).unwrap();
        assert!(matches!(
            in_file.lookup.as_ref().unwrap().table(),
            Table::File(_)
        ));
        assert!(matches!(
            in_memory.lookup.as_ref().unwrap().table(),
            Table::Memory(_)
        ));
        let (chunkless, table) = spilling.finish().unwrap();
        let located: HashMap<IdPrefix, ChunkLocation> = table
            .scan()
            .map(|c| c.map(|c| (c.prefix, c.location)))
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(chunkless.frame_count(), frame_number as usize);
        assert_eq!(in_file.frame_count(), frame_number as usize);
        // The chunk stored again: every other copy is an alternative of the first.
        let stored_again = expected
            .iter()
            .find(|(id, _)| *id == Id([1; 32]))
            .unwrap()
            .1
            .0;
        assert!(!chunkless.alternatives().is_empty());
        assert!(
            chunkless
                .alternatives()
                .iter()
                .all(|&(chosen, _)| chosen == stored_again)
        );
        assert!(expected.len() > 50, "{}", expected.len());
        let count = expected.len();
        for (id, (frame, offset, len)) in expected {
            let location = ChunkLocation { frame, offset, len };
            assert_eq!(located.get(&prefix(&id)), Some(&location));
            for looked_up in [&in_file, &in_memory] {
                assert_eq!(looked_up.chunk(&id), Some(location));
                assert_eq!(looked_up.chunk_frame(&id), Some(frame));
            }
        }
        assert_eq!(located.len(), count);
        for looked_up in [&in_file, &in_memory] {
            assert_eq!(looked_up.chunk_count(), count);
            assert_eq!(looked_up.alternatives(), chunkless.alternatives());
            assert_eq!(looked_up.chunk(&Id([2; 32])), None);
        }
    }
}
