//! The index a restore builds as the stream goes by. A snapshot that says at which stream chunks
//! it uses each of its packs (`PackRef::uses`, docs/FORMAT.md §11.2) lets a restore read a
//! pack's header when the stream reaches the pack's first use and let it go after its last, so
//! that neither its first byte nor its memory waits for or grows with the snapshot's size: a
//! 100 GB snapshot's ~6.5 M chunk locations were sorted on disk before its first byte (32 s).
//!
//! Headers are read ahead, in the order of first use, by a few threads ([`HEADERS_AHEAD`]).
//! A backup reads its parent's packs the same way, at an estimate of where in the parent's
//! stream it is ([`crate::parent`]).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::Scope;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::error::{Error, Result};
use crate::frame::FrameRef;
use crate::id::Id;
use crate::index::{FrameLocation, IndexedPack, PackLocation};
use crate::pack::MovedFrame;
use crate::repo::{Repository, pack_name};
use crate::send_log::SendLog;
use crate::snapshot::{ChunkSpan, PackRef};

/// Pack headers read (or being read) ahead of the stream. A header is at most 1 MiB and
/// usually ~100 KB; on S3 each is two ranged reads of 20-50 ms.
pub const HEADERS_AHEAD: usize = 8;
const HEADER_THREADS: usize = 4;
/// Chunk locations held at once, at most (20 bytes each). A snapshot's packs cover a small
/// part of the stream each (a day-2 pack of delta frames, ~37 k chunks, covers 1/5 of a 3 GB
/// dump), except after a repack, which mixes frames from everywhere in new packs: then the
/// restore sorts their headers' locations on disk instead (the caller's next pass), as for a
/// snapshot that does not say where it uses its packs.
pub const MAX_CHUNKS_HELD: usize = 1 << 19;

/// Where a stream index reads pack headers: from the packs, or, for a put-only writer, which
/// cannot open them, from its send log ([`crate::send_log`]).
#[derive(Clone, Copy)]
pub enum HeaderSource<'a> {
    Store(&'a Repository),
    SendLog(&'a SendLog),
}

impl HeaderSource<'_> {
    fn read_pack_header(&self, pack: &PackRef) -> Result<IndexedPack> {
        match self {
            HeaderSource::Store(repo) => repo.read_pack_header(pack),
            HeaderSource::SendLog(log) => log.read_pack_header(pack),
        }
    }
}

/// What a stream index does when it cannot hold what its snapshot's packs say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strictness {
    /// For a restore: a header that cannot be read, or holding more than `max_chunks_held`
    /// chunk locations at once ([`MAX_CHUNKS_HELD`]), is an error (the restore's next pass
    /// takes over).
    Exact { max_chunks_held: usize },
    /// For a backup deduplicating against its parent: a pack whose header cannot be read is
    /// left out, and the caller watches what is held and left out ([`StreamIndex::held`],
    /// [`StreamIndex::left_out`]).
    BestEffort,
}

/// A frame as the stream index names it: its pack's position in the order of first use, and
/// its position in that pack's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameKey {
    pub pack: u32,
    pub number: u32,
}

/// Where a chunk lies: its frame and its place in the frame's plaintext.
#[derive(Clone, Copy, Debug)]
pub struct Located {
    pub frame: FrameKey,
    pub offset: u32,
    pub len: u32,
}

/// A chunk of a live pack, by the first 8 bytes of its id: unique within a pack but for a
/// chance of n/2^64 (a chunk is verified against its whole id when it is read).
#[derive(Clone, Copy)]
struct PackChunk {
    prefix: [u8; 8],
    frame: u32,
    offset: u32,
    len: u32,
}

struct LivePack {
    location: PackLocation,
    frames: Vec<(FrameLocation, Vec<FrameRef>)>,
    /// Sorted by prefix.
    chunks: Vec<PackChunk>,
    /// One bit per value of the prefix's low bits, set for each chunk: a one-hash Bloom filter.
    /// Most chunks a day-2 backup looks up are new ones, in none of the live packs; each pack
    /// then costs one probe instead of a binary search (6 % of a day-2 backup's CPU before).
    filter: Vec<u64>,
}

impl LivePack {
    /// Eight bits of filter for each chunk (a filter that says "maybe" for ~12 % of the
    /// chunks it does not hold), at least 4 Kib.
    fn filter_of(chunks: &[PackChunk]) -> Vec<u64> {
        let bits = (chunks.len() * 8).next_power_of_two().max(4096);
        let mut filter = vec![0u64; bits / 64];
        for chunk in chunks {
            let bit = filter_bit(&chunk.prefix, bits);
            filter[bit / 64] |= 1 << (bit % 64);
        }
        filter
    }

    /// False if the pack surely does not hold a chunk with this prefix.
    fn might_hold(&self, prefix: &[u8; 8]) -> bool {
        let bit = filter_bit(prefix, self.filter.len() * 64);
        self.filter[bit / 64] & (1 << (bit % 64)) != 0
    }

    fn find(&self, prefix: &[u8; 8]) -> Option<&PackChunk> {
        if !self.might_hold(prefix) {
            return None;
        }
        let at = self
            .chunks
            .binary_search_by(|c| c.prefix.cmp(prefix))
            .ok()?;
        Some(&self.chunks[at])
    }
}

pub struct StreamIndex {
    /// The snapshot's packs, by first use.
    order: Arc<Vec<(PackRef, ChunkSpan)>>,
    /// Position in `order` by pack id.
    position: HashMap<Id, u32>,
    /// The next pack of `order` to take in.
    next: usize,
    /// The packs of `order` taken in and not let go yet, by position in `order`.
    live: Vec<Option<LivePack>>,
    /// Live packs, the one that last held a chunk looked up first (a run of the stream mostly
    /// comes from one or two packs). Of a chunk stored twice, the copy found first is used; if
    /// its frame's bases are not in use there, the restore's next pass takes over.
    recent: Vec<u32>,
    /// Live packs by last use, soonest first.
    ending: BinaryHeap<Reverse<(u64, u32)>>,
    /// Chunk locations the live packs hold.
    held: usize,
    /// Base frames that a repack moved into a live pack, by their old names.
    moved: HashMap<FrameRef, FrameKey>,
    headers: Receiver<(usize, Result<Arrived>)>,
    arrived: BTreeMap<usize, Result<Arrived>>,
    /// A unit for each header that may be read ahead; one comes back per header taken in.
    room: Sender<()>,
    strictness: Strictness,
    left_out: usize,
}

/// The filter bit of a prefix, in a filter of `bits` bits (a power of two). Chunk ids are keyed
/// hashes, so any of their bits will do.
fn filter_bit(prefix: &[u8; 8], bits: usize) -> usize {
    u64::from_le_bytes(*prefix) as usize & (bits - 1)
}

fn short_prefix(id: &Id) -> [u8; 8] {
    id.0[..8].try_into().expect("8 bytes")
}

impl StreamIndex {
    /// Starts reading the headers of `packs` (every one with its uses) in `scope`.
    pub fn start<'scope, 'env>(
        scope: &'scope Scope<'scope, 'env>,
        source: HeaderSource<'env>,
        packs: &[PackRef],
        strictness: Strictness,
    ) -> Result<StreamIndex> {
        let mut order = Vec::with_capacity(packs.len());
        for pack in packs {
            let uses = pack.uses.ok_or_else(|| {
                Error::Internal("a stream index of packs without their uses".into())
            })?;
            order.push((*pack, uses));
        }
        order.sort_by_key(|(pack, uses)| (uses.first, pack.id));
        let position = order
            .iter()
            .enumerate()
            .map(|(at, (pack, _))| (pack.id, at as u32))
            .collect();
        let order = Arc::new(order);
        let live = std::iter::repeat_with(|| None).take(order.len()).collect();
        let (room, room_rx) = bounded::<()>(HEADERS_AHEAD);
        for _ in 0..HEADERS_AHEAD {
            room.send(()).expect("room for the whole window");
        }
        let (header_tx, headers) = bounded(HEADERS_AHEAD);
        let next = Arc::new(AtomicUsize::new(0));
        for _ in 0..HEADER_THREADS.min(order.len()) {
            let (order, next, room, header_tx) = (
                order.clone(),
                next.clone(),
                room_rx.clone(),
                header_tx.clone(),
            );
            // Each exits when the index is dropped (its channels close) or every header is read.
            scope.spawn(move || {
                while room.recv().is_ok() {
                    let at = next.fetch_add(1, Ordering::Relaxed);
                    let Some((pack, _)) = order.get(at) else {
                        return;
                    };
                    let header = source.read_pack_header(pack);
                    let arrived = header.and_then(|h| live_pack(at as u32, h));
                    if header_tx.send((at, arrived)).is_err() {
                        return;
                    }
                }
            });
        }
        Ok(StreamIndex {
            order,
            position,
            next: 0,
            live,
            recent: Vec::new(),
            ending: BinaryHeap::new(),
            held: 0,
            moved: HashMap::new(),
            headers,
            arrived: BTreeMap::new(),
            room,
            strictness,
            left_out: 0,
        })
    }

    /// Where a chunk needed at stream chunk `place` is, among the packs the snapshot uses there.
    /// Places never go back.
    pub fn chunk(&mut self, id: &Id, place: u64) -> Result<Option<Located>> {
        self.chunk_near(id, place, place)
    }

    /// Where a chunk is among the packs held once every pack first used by `take_in_to` is
    /// taken in and those last used before `let_go_before` are let go (both may only grow;
    /// a smaller one than before changes nothing).
    pub fn chunk_near(
        &mut self,
        id: &Id,
        take_in_to: u64,
        let_go_before: u64,
    ) -> Result<Option<Located>> {
        self.reach(take_in_to, let_go_before)?;
        if let Strictness::Exact { max_chunks_held } = self.strictness
            && self.held > max_chunks_held
        {
            return Err(Error::Missing {
                object: format!(
                    "room for the chunk locations of the packs in use at stream chunk {take_in_to}"
                ),
            });
        }
        let prefix = short_prefix(id);
        for at in 0..self.recent.len() {
            let pack = self.recent[at];
            if let Some(chunk) = self.live_pack(pack).and_then(|p| p.find(&prefix)) {
                let found = Located {
                    frame: FrameKey {
                        pack,
                        number: chunk.frame,
                    },
                    offset: chunk.offset,
                    len: chunk.len,
                };
                self.recent[..=at].rotate_right(1);
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// The base frames of a delta frame (none for a base frame).
    pub fn bases(&self, frame: FrameKey) -> Result<Vec<FrameKey>> {
        let (location, bases) = self.frame(frame)?;
        bases
            .iter()
            .map(|base| {
                self.moved
                    .get(base)
                    .copied()
                    .filter(|&key| self.is_base_frame(key))
                    .or_else(|| {
                        let key = FrameKey {
                            pack: *self.position.get(&base.pack)?,
                            number: base.frame,
                        };
                        self.is_base_frame(key).then_some(key)
                    })
                    .ok_or_else(|| Error::Missing {
                        object: format!(
                            "a base frame of frame {} in {}",
                            location.number_in_pack,
                            self.live_pack(frame.pack)
                                .map_or_else(String::new, |p| pack_name(&p.location.id))
                        ),
                    })
            })
            .collect()
    }

    /// The snapshot's packs, in the order of first use.
    pub fn packs(&self) -> Vec<PackRef> {
        self.order.iter().map(|(pack, _)| *pack).collect()
    }

    /// Packs left out because their header could not be read.
    pub fn left_out(&self) -> usize {
        self.left_out
    }

    /// Chunk locations held now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// The stream chunks at which the snapshot uses a pack.
    pub fn uses(&self, pack: u32) -> ChunkSpan {
        self.order[pack as usize].1
    }

    /// A frame's location and its pack's.
    pub fn location(&self, frame: FrameKey) -> Result<(&FrameLocation, &PackLocation)> {
        let (location, _) = self.frame(frame)?;
        let pack = self
            .live_pack(frame.pack)
            .ok_or_else(|| Error::Internal("a frame found in a pack that is not live".into()))?;
        Ok((location, &pack.location))
    }

    fn frame(&self, frame: FrameKey) -> Result<&(FrameLocation, Vec<FrameRef>)> {
        self.live_pack(frame.pack)
            .and_then(|pack| pack.frames.get(frame.number as usize))
            .ok_or_else(|| Error::Missing {
                object: "a frame the snapshot's packs were said to hold there".into(),
            })
    }

    fn live_pack(&self, pack: u32) -> Option<&LivePack> {
        self.live.get(pack as usize).and_then(Option::as_ref)
    }

    fn is_base_frame(&self, key: FrameKey) -> bool {
        self.frame(key).is_ok_and(|(_, bases)| bases.is_empty())
    }

    /// Takes in every pack first used by `take_in_to` and lets go of those last used before
    /// `let_go_before`.
    fn reach(&mut self, take_in_to: u64, let_go_before: u64) -> Result<()> {
        while let Some(&(_, uses)) = self.order.get(self.next)
            && uses.first <= take_in_to
        {
            let at = self.next;
            self.next += 1;
            match self.take_header(at) {
                Ok(header) => self.take_in(at as u32, uses.last, header),
                Err(_) if self.strictness == Strictness::BestEffort => self.left_out += 1,
                Err(e) => return Err(e),
            }
        }
        while let Some(&Reverse((last, pack))) = self.ending.peek()
            && last < let_go_before
        {
            self.ending.pop();
            if let Some(gone) = self.live.get_mut(pack as usize).and_then(Option::take) {
                self.held -= gone.chunks.len();
                self.recent.retain(|&p| p != pack);
                self.moved.retain(|_, key| key.pack != pack);
            }
        }
        Ok(())
    }

    /// Header number `at` of `order`, waiting for it if it is still being read.
    fn take_header(&mut self, at: usize) -> Result<Arrived> {
        loop {
            if let Some(header) = self.arrived.remove(&at) {
                let _ = self.room.try_send(());
                return header;
            }
            let (number, header) = self
                .headers
                .recv()
                .map_err(|_| Error::Internal("the pack header readers stopped".into()))?;
            self.arrived.insert(number, header);
        }
    }

    fn take_in(&mut self, number: u32, last: u64, (pack, moved): Arrived) {
        for moved in moved {
            self.moved.insert(
                moved.from,
                FrameKey {
                    pack: number,
                    number: moved.frame,
                },
            );
        }
        self.held += pack.chunks.len();
        self.live[number as usize] = Some(pack);
        self.recent.push(number);
        self.ending.push(Reverse((last, number)));
    }
}

/// A pack header in the form the index keeps, with the frames a repack moved into it.
type Arrived = (LivePack, Vec<MovedFrame>);

/// Pack number `number` of the order of first use, from its header: made by the thread that
/// read it, so that headers waiting their turn are held compactly and sorted in parallel.
fn live_pack(number: u32, pack: IndexedPack) -> Result<Arrived> {
    let name = || pack_name(&pack.id);
    let count = pack.header.frames.iter().map(|f| f.chunks.len()).sum();
    let mut chunks = Vec::with_capacity(count);
    let mut frames = Vec::with_capacity(pack.header.frames.len());
    for (n, frame) in pack.header.frames.into_iter().enumerate() {
        let mut offset = 0u32;
        for entry in &frame.chunks {
            chunks.push(PackChunk {
                prefix: short_prefix(&entry.id),
                frame: n as u32,
                offset,
                len: entry.len,
            });
            offset = offset
                .checked_add(entry.len)
                .ok_or_else(|| Error::corrupt(name(), "a frame of more than 4 GiB"))?;
        }
        let location = FrameLocation::new(number, n as u32, frame.offset, frame.sealed_len, offset);
        frames.push((location, frame.bases));
    }
    chunks.sort_unstable_by_key(|c| c.prefix);
    let live = LivePack {
        filter: LivePack::filter_of(&chunks),
        location: PackLocation {
            id: pack.id,
            len: pack.len,
            data_ephemeral: pack.data_ephemeral,
        },
        frames,
        chunks,
    };
    Ok((live, pack.header.moved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{pseudo_random, small_packs, test_backup, test_repository};

    fn exact(max_chunks_held: usize) -> Strictness {
        Strictness::Exact { max_chunks_held }
    }

    #[test]
    fn the_stream_index_holds_the_packs_of_a_small_part_of_the_stream_at_a_time() {
        let repo = test_repository();
        let day1 = pseudo_random(8_000_000, 1);
        let mut day2 = day1.clone();
        for at in (10_000..8_000_000).step_by(500_000) {
            day2[at..at + 100].fill(9);
        }
        test_backup(&repo, &day1, &small_packs());
        let snapshot = test_backup(&repo, &day2, &small_packs()).snapshot;
        assert!(snapshot.packs.len() > 40, "{} packs", snapshot.packs.len());
        let chunks = snapshot.added.chunks;
        let (most_live, most_chunks) = std::thread::scope(|scope| {
            let mut index = StreamIndex::start(
                scope,
                HeaderSource::Store(&repo),
                &snapshot.packs,
                exact(usize::MAX),
            )
            .unwrap();
            let (mut most_live, mut most_chunks) = (0, 0);
            for place in 0..chunks {
                index.chunk(&Id([0; 32]), place).unwrap();
                most_live = most_live.max(index.live.iter().flatten().count());
                most_chunks = most_chunks.max(index.held);
            }
            // Past the end, everything is let go.
            index.chunk(&Id([0; 32]), u64::MAX).unwrap();
            assert!(index.live.iter().all(Option::is_none));
            (most_live, most_chunks)
        });
        // With room for fewer locations than that, the index says so rather than grow.
        std::thread::scope(|scope| {
            let room = most_chunks / 2;
            let mut index = StreamIndex::start(
                scope,
                HeaderSource::Store(&repo),
                &snapshot.packs,
                exact(room),
            )
            .unwrap();
            let failed = (0..chunks).find_map(|place| index.chunk(&Id([0; 32]), place).err());
            assert!(matches!(failed, Some(Error::Missing { .. })), "{failed:?}");
        });
        assert!(
            most_live * 5 < snapshot.packs.len(),
            "{most_live} of {} packs held at once",
            snapshot.packs.len()
        );
        assert!(
            most_chunks * 3 < chunks as usize,
            "{most_chunks} of {chunks} chunk locations held at once"
        );
    }

    #[test]
    fn a_live_pack_finds_each_of_its_chunks_and_its_filter_turns_most_others_away() {
        let prefix = |n: u64| {
            blake3::hash(&n.to_le_bytes()).as_bytes()[..8]
                .try_into()
                .unwrap()
        };
        for count in [1, 100, 5_000, 40_000] {
            let mut chunks: Vec<PackChunk> = (0..count)
                .map(|n| PackChunk {
                    prefix: prefix(n),
                    frame: n as u32,
                    offset: 0,
                    len: 1,
                })
                .collect();
            chunks.sort_unstable_by_key(|c| c.prefix);
            let pack = LivePack {
                location: PackLocation {
                    id: Id([0; 32]),
                    len: 0,
                    data_ephemeral: [0; 32],
                },
                frames: Vec::new(),
                filter: LivePack::filter_of(&chunks),
                chunks,
            };
            for n in 0..count {
                assert_eq!(pack.find(&prefix(n)).map(|c| c.frame), Some(n as u32));
            }
            let absent = count..count + 10_000;
            let passed = absent
                .clone()
                .filter(|&n| pack.might_hold(&prefix(n)))
                .count();
            assert!(
                passed < 1_500,
                "{passed} of 10000 absent chunks passed the filter"
            );
            assert!(absent.into_iter().all(|n| pack.find(&prefix(n)).is_none()));
        }
    }

    #[test]
    fn a_restore_through_packs_whose_uses_are_wrong_falls_back_and_is_exact() {
        let repo = test_repository();
        let data = pseudo_random(3_000_000, 2);
        let entry = test_backup(&repo, &data, &small_packs());
        // Packs said to be used only at the start (let go too early), or only at the end
        // (taken in too late): a damaged or planted snapshot, or a bug.
        for wrong in [
            ChunkSpan::at(0),
            ChunkSpan::at(entry.snapshot.added.chunks - 1),
        ] {
            let mut snapshot = entry.snapshot.clone();
            for pack in &mut snapshot.packs {
                pack.uses = Some(wrong);
            }
            let (id, _) = repo.commit_snapshot(&snapshot).unwrap();
            let planted = repo.read_snapshot(id).unwrap();
            let mut out = Vec::new();
            crate::restore(&repo, &planted, &mut out, &mut |_| {}).unwrap();
            assert!(out == data, "{wrong:?}");
        }
    }
}
