//! Restore: a snapshot out to a writer, verified end to end.
//!
//! ```text
//! planner thread: walk the chunk tree ─ locate each chunk (in the packs the snapshot uses at
//!                 that place, their headers read as the stream reaches them) ─ runs of chunks
//!                 in one frame
//!                 ─ frame not decoded recently? queue a decode job
//! workers:        aligned ranged read of the pack ─ open ─ decompress (a delta frame: against
//!                 its base frames, which are decoded first through the same cache)
//! this thread:    per run: wait for its frame ─ re-check every chunk id ─ write
//! ```
//! What is written is authenticated chunk by chunk: each chunk's keyed id is checked, the ids
//! are the tree's leaves in order (each node checked against its id, the root in the
//! authenticated snapshot), and the total against the snapshot's size. The snapshot's
//! `stream_hash`, a plain BLAKE3 of what the backup read, is a second pass over every byte; it
//! checks bkp's own backup pipeline rather than the repository, so drills check it
//! ([`restore_checking_stream_hash`]), a restore does not: it was ~15 % of its CPU.
//! A day-N snapshot interleaves chunks from the frames of many earlier backups, in runs of a
//! chunk or two, so decoded frames are shared between runs through a small cache; a budget of
//! decoded frames alive at once ([`MAX_FRAMES_ALIVE`]) bounds memory and read-ahead.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::pack_reader::{Fetch, FrameReader, bases_of, fetch, fetch_frame};
use crate::repo::Repository;
use crate::snapshot::{PackRef, SnapshotEntry};
use crate::stream_index::{FrameKey, HeaderSource, MAX_CHUNKS_HELD, StreamIndex, Strictness};
use crate::tree::{TreeStep, TreeWalker};

/// Decoded frames kept for reuse by later runs.
const CACHED_FRAMES: usize = 8;
/// Decoded (or decoding) frames alive at once: the cache plus read-ahead. ~2 MiB each. On a
/// 10 GB day-N snapshot, 14 (six ahead) peaked at 71 MiB and 10 at 61 MiB, in the same time on
/// local disk; 8 (cache 4) was 1.8x slower.
const MAX_FRAMES_ALIVE: usize = 10;
/// Runs queued for the writer; each is small (a frame handle and a few slices).
const QUEUED_RUNS: usize = 4096;

#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreProgress {
    pub bytes_written: u64,
    pub size: u64,
}

#[derive(Clone, Debug)]
pub struct RestoreSummary {
    pub bytes_written: u64,
    pub elapsed: Duration,
}

/// A frame being decoded by a worker, or decoded; shared by every run that needs it. Holding
/// one takes a unit of the [`MAX_FRAMES_ALIVE`] budget, returned on drop.
struct FrameSlot {
    frame: FrameName,
    /// The read of its bytes, started when the slot was planned.
    fetch: Mutex<Option<Result<Fetch>>>,
    /// The slots of a delta frame's bases, queued before it; let go once it is decoded.
    bases: Mutex<Vec<Arc<FrameSlot>>>,
    decoded: Mutex<Option<Result<Vec<u8>>>>,
    ready: Condvar,
    budget: Sender<()>,
    /// Where the decoded buffer goes for reuse when the last run is done with it.
    spare: Sender<Vec<u8>>,
}

impl FrameSlot {
    /// Decodes this slot's frame, after its bases.
    fn decode(&self, reader: &mut FrameReader<'_>, dictionary: &mut Vec<u8>, buffer: Vec<u8>) {
        let bases = std::mem::take(&mut *self.bases.lock().expect("slot lock"));
        let fetch = self.fetch.lock().expect("slot lock").take();
        let fetch = fetch.unwrap_or_else(|| Err(Error::Internal("frame decoded twice".into())));
        dictionary.clear();
        // Exactly, as for a frame's own buffer (frame::FrameDecoder::open).
        let mut len = 0;
        let _ = bases.iter().try_for_each(|base| {
            base.with_base_raw(|raw| {
                len += raw.len();
                Ok(())
            })
        });
        dictionary.reserve_exact(len);
        let result = bases
            .iter()
            .try_for_each(|base| {
                base.with_base_raw(|raw| {
                    dictionary.extend_from_slice(raw);
                    Ok(())
                })
            })
            .and_then(|()| reader.decode(fetch?, dictionary, buffer));
        drop(bases);
        self.fill(result);
    }

    fn fill(&self, result: Result<Vec<u8>>) {
        *self.decoded.lock().expect("slot lock") = Some(result);
        self.ready.notify_all();
    }

    /// Waits for the decode and runs `use_raw` on it; the error of a failed decode is handed
    /// out once, to the run that comes first in the stream.
    fn with_raw<T>(&self, use_raw: impl FnOnce(&[u8]) -> Result<T>) -> Result<T> {
        self.wait_for_raw(use_raw, |e| {
            std::mem::replace(e, Error::Internal("restore already failed".into()))
        })
    }

    /// As [`FrameSlot::with_raw`], for a delta frame using this slot as a base: the error stays
    /// for this frame's own run.
    fn with_base_raw<T>(&self, use_raw: impl FnOnce(&[u8]) -> Result<T>) -> Result<T> {
        self.wait_for_raw(use_raw, |e| match e {
            Error::Corrupt { object, reason } => Error::corrupt(object.clone(), reason.clone()),
            Error::Missing { object } => Error::Missing {
                object: object.clone(),
            },
            other => Error::Internal(format!("a base frame could not be read: {other}")),
        })
    }

    fn wait_for_raw<T>(
        &self,
        use_raw: impl FnOnce(&[u8]) -> Result<T>,
        on_error: impl FnOnce(&mut Error) -> Error,
    ) -> Result<T> {
        let mut guard = self.decoded.lock().expect("slot lock");
        while guard.is_none() {
            guard = self.ready.wait(guard).expect("slot lock");
        }
        match guard.as_mut().expect("filled") {
            Ok(raw) => use_raw(raw),
            Err(e) => Err(on_error(e)),
        }
    }
}

impl Drop for FrameSlot {
    fn drop(&mut self) {
        if let Some(Ok(raw)) = self.decoded.get_mut().ok().and_then(Option::take) {
            let _ = self.spare.try_send(raw);
        }
        let _ = self.budget.send(());
    }
}

/// Where one chunk of the stream lies in its frame's plaintext.
#[derive(Clone, Copy)]
struct Slice {
    id: Id,
    offset: u32,
    len: u32,
    /// Its number in the stream.
    place: u64,
}

/// A frame as the restore's [`Locations`] name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FrameName {
    Indexed(u32),
    Streamed(FrameKey),
}

/// Where a restore finds chunks: an index of packs read before the first byte, or one that
/// reads the snapshot's packs as the stream reaches them (snapshots that say where they use
/// each pack).
enum Locations<'a> {
    Index(&'a Index),
    Stream(Box<StreamIndex>),
}

impl Locations<'_> {
    /// The frame holding chunk `id`, needed at stream chunk `place`, and where in it.
    fn chunk(&mut self, id: &Id, place: u64) -> Result<Option<(FrameName, Slice)>> {
        let at = place;
        let found = match self {
            Locations::Index(index) => index
                .chunk(id)
                .map(|l| (FrameName::Indexed(l.frame), l.offset, l.len)),
            Locations::Stream(stream) => stream
                .chunk(id, place)?
                .map(|l| (FrameName::Streamed(l.frame), l.offset, l.len)),
        };
        Ok(found.map(|(frame, offset, len)| {
            (
                frame,
                Slice {
                    id: *id,
                    offset,
                    len,
                    place: at,
                },
            )
        }))
    }

    fn bases(&self, frame: FrameName) -> Result<Vec<FrameName>> {
        Ok(match (self, frame) {
            (Locations::Index(index), FrameName::Indexed(f)) => bases_of(index, f)?
                .iter()
                .map(|&b| FrameName::Indexed(b))
                .collect(),
            (Locations::Stream(stream), FrameName::Streamed(f)) => stream
                .bases(f)?
                .into_iter()
                .map(FrameName::Streamed)
                .collect(),
            _ => return Err(Error::Internal("a frame of another index".into())),
        })
    }

    fn fetch(&self, repo: &Repository, frame: FrameName) -> Result<Fetch> {
        match (self, frame) {
            (Locations::Index(index), FrameName::Indexed(f)) => fetch(repo, index, f),
            (Locations::Stream(stream), FrameName::Streamed(f)) => {
                let (frame, pack) = stream.location(f)?;
                fetch_frame(repo, frame, pack)
            }
            _ => Err(Error::Internal("a frame of another index".into())),
        }
    }
}

/// A run of consecutive chunks of the stream that lie in one frame, or (no slot) that the
/// receiver said it has already ([`restore_chunks`]).
struct Run {
    slot: Option<Arc<FrameSlot>>,
    slices: Vec<Slice>,
}

/// Where [`restore_chunks`] sends each chunk: its id, its length and its bytes if read.
pub(crate) type ChunkOut<'a> = dyn FnMut(&Id, u32, Option<&[u8]>) -> Result<()> + 'a;

/// What a copy's receiver has already: a chunk's length, by id.
pub(crate) type Has<'a> = &'a (dyn Fn(&Id) -> Option<u32> + Sync);

/// The stream chunks a partial restore wants: ranges of chunk numbers, ascending, asked about
/// in ascending order.
#[derive(Clone, Copy)]
struct Wanted<'a> {
    ranges: &'a [Part],
}

impl Wanted<'_> {
    /// Whether chunk `place` is wanted; `None` once no later chunk is.
    fn has(&mut self, place: u64) -> Option<bool> {
        while let Some((first, rest)) = self.ranges.split_first()
            && first.chunks.end <= place
        {
            self.ranges = rest;
        }
        let first = self.ranges.first()?;
        Some(first.chunks.start <= place)
    }
}

/// Part of a stream, restored alone ([`restore_parts`]): its chunks by number, and what they
/// must be: their bytes, and the digest of their ids (docs/FORMAT.md §13).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub chunks: std::ops::Range<u64>,
    pub bytes: u64,
    pub digest: [u8; 32],
    /// Where its first chunk is in the snapshot's tree; empty if not known (the whole tree is
    /// walked then).
    pub tree_path: Vec<TreeStep>,
}

/// Walks the tree, groups chunks into runs and queues decodes, reusing recently decoded frames.
struct Planner<'a> {
    repo: &'a Repository,
    locations: Locations<'a>,
    jobs: Sender<Arc<FrameSlot>>,
    runs: Sender<Result<Run>>,
    budget: (Sender<()>, Receiver<()>),
    /// Disconnected when the writer stops (done, failed, or its reader went away): runs still
    /// queued hold frame slots, so a planner waiting for the budget would wait forever.
    stopped: Receiver<()>,
    spare: Sender<Vec<u8>>,
    cache: Vec<Arc<FrameSlot>>,
    /// Stream chunks already written (by a pass with another index): walked, not planned.
    skip: u64,
    /// Only these stream chunks (a partial restore), the others walked past.
    wanted: Option<Wanted<'a>>,
    /// Chunks not to read, because the receiver has them.
    has: Option<Has<'a>>,
}

impl Planner<'_> {
    /// The slot of a frame (and of its bases), queued for decoding unless cached; `None` when
    /// the writer has stopped.
    fn slot(&mut self, frame: FrameName) -> Result<Option<Arc<FrameSlot>>> {
        if let Some(pos) = self.cache.iter().position(|s| s.frame == frame) {
            let slot = self.cache.remove(pos);
            self.cache.push(slot.clone());
            return Ok(Some(slot));
        }
        let mut bases = Vec::new();
        for base in self.locations.bases(frame)? {
            // Bases are base frames, so this recursion is one level deep.
            match self.slot(base)? {
                Some(slot) => bases.push(slot),
                None => return Ok(None),
            }
        }
        if self.cache.len() == CACHED_FRAMES {
            self.cache.remove(0);
        }
        crossbeam_channel::select! {
            recv(self.budget.1) -> unit => if unit.is_err() { return Ok(None) },
            recv(self.stopped) -> _ => return Ok(None),
        }
        let slot = Arc::new(FrameSlot {
            frame,
            fetch: Mutex::new(Some(self.locations.fetch(self.repo, frame))),
            bases: Mutex::new(bases),
            decoded: Mutex::new(None),
            ready: Condvar::new(),
            budget: self.budget.0.clone(),
            spare: self.spare.clone(),
        });
        if self.jobs.send(slot.clone()).is_err() {
            return Ok(None);
        }
        self.cache.push(slot.clone());
        Ok(Some(slot))
    }

    fn run(mut self, repo: &Repository, entry: &SnapshotEntry) {
        if let Err(e) = self.plan(repo, entry) {
            let _ = self.runs.send(Err(e));
        }
    }

    /// A tree node, read at stream chunk `place`. Two decoded node frames are kept: the one
    /// the current run of level-1 nodes is in, and one for a node above them (the walker keeps
    /// a node's ids once fetched, so its frame is needed again only for its next sibling). Four
    /// took 8 MiB for the ~10 node frames of a 10 GB dump, where a 1 GB dump has one.
    fn read_node(
        &mut self,
        id: &Id,
        place: u64,
        reader: &mut FrameReader<'_>,
        node_frames: &mut Vec<(FrameName, Vec<u8>)>,
        entry: &SnapshotEntry,
    ) -> Result<Vec<u8>> {
        let (frame, slice) = self
            .locations
            .chunk(id, place)?
            .ok_or_else(|| Error::Missing {
                object: format!("tree node {} of snapshot {}", id.short(), entry.id.short()),
            })?;
        if !node_frames.iter().any(|(f, _)| *f == frame) {
            if node_frames.len() == 2 {
                node_frames.remove(0);
            }
            let fetch = self.locations.fetch(self.repo, frame)?;
            node_frames.push((frame, reader.decode(fetch, &[], Vec::new())?));
        }
        let (_, raw) = node_frames
            .iter()
            .find(|(f, _)| *f == frame)
            .expect("cached");
        Ok(verified_chunk(self.repo, raw, &slice)?.to_vec())
    }

    fn plan(&mut self, repo: &Repository, entry: &SnapshotEntry) -> Result<()> {
        let mut reader = FrameReader::of_fetches(repo);
        let mut node_frames = Vec::new();
        let mut walker = TreeWalker::new(&entry.snapshot.tree);
        let mut run = None;
        if let Some(parts) = self.wanted.map(|w| w.ranges).filter(|p| has_paths(p)) {
            // Parts that say where they are in the tree: only the nodes above them are read.
            for part in parts {
                if part.chunks.end <= self.skip {
                    continue;
                }
                walker.seek(&entry.snapshot.tree, &part.tree_path, &mut |id, at| {
                    self.read_node(id, at, &mut reader, &mut node_frames, entry)
                })?;
                for place in part.chunks.clone() {
                    let next = walker.next_id(&mut |id| {
                        self.read_node(id, place, &mut reader, &mut node_frames, entry)
                    })?;
                    let Some(id) = next else {
                        return Err(Error::corrupt(
                            format!("snapshot {}", entry.id.short()),
                            "its chunk tree ends inside a section of its table of contents",
                        ));
                    };
                    if place >= self.skip && !self.queue(id, place, &mut run, entry)? {
                        return Ok(());
                    }
                }
            }
        } else {
            // Stream chunks walked: the place of the next one.
            let mut place = 0u64;
            loop {
                let next = walker.next_id(&mut |id| {
                    self.read_node(id, place, &mut reader, &mut node_frames, entry)
                })?;
                let Some(id) = next else { break };
                place += 1;
                if place <= self.skip {
                    continue;
                }
                if let Some(wanted) = &mut self.wanted {
                    match wanted.has(place - 1) {
                        Some(true) => {}
                        Some(false) => continue,
                        None => break,
                    }
                }
                if !self.queue(id, place - 1, &mut run, entry)? {
                    return Ok(());
                }
            }
        }
        if let Some(run) = run {
            let _ = self.runs.send(Ok(run));
        }
        Ok(())
    }

    /// Adds stream chunk `id` at `place` to the open run, or sends that run and opens another
    /// in the chunk's frame; false when the writer has stopped. The frame's slot is taken as
    /// the run opens, while the stream index still holds its pack: by the time the run is
    /// sent, the next chunk's lookup may have let the pack go.
    fn queue(
        &mut self,
        id: Id,
        place: u64,
        run: &mut Option<Run>,
        entry: &SnapshotEntry,
    ) -> Result<bool> {
        let (frame, slice) = match self.has.and_then(|has| has(&id)) {
            Some(len) => (
                None,
                Slice {
                    id,
                    offset: 0,
                    len,
                    place,
                },
            ),
            None => {
                let (frame, slice) =
                    self.locations
                        .chunk(&id, place)?
                        .ok_or_else(|| Error::Missing {
                            object: format!(
                                "chunk {} of snapshot {}",
                                id.short(),
                                entry.id.short()
                            ),
                        })?;
                (Some(frame), slice)
            }
        };
        if let Some(open) = run
            && open.slot.as_ref().map(|s| s.frame) == frame
        {
            open.slices.push(slice);
            return Ok(true);
        }
        let slot = match frame {
            None => None,
            Some(frame) => match self.slot(frame)? {
                Some(slot) => Some(slot),
                None => return Ok(false),
            },
        };
        let opened = Run {
            slot,
            slices: vec![slice],
        };
        match run.replace(opened) {
            Some(done) => Ok(self.runs.send(Ok(done)).is_ok()),
            None => Ok(true),
        }
    }
}

/// Whether every part says where it is in the tree (those of a table of contents do).
fn has_paths(parts: &[Part]) -> bool {
    parts.iter().all(|p| !p.tree_path.is_empty())
}

/// The packs a restore of `parts` uses: those used at their chunks or at the places of the
/// tree nodes above them. (All of them for parts without paths: the whole tree is walked.)
fn packs_for_parts(packs: &[PackRef], parts: &[Part]) -> Vec<PackRef> {
    if !has_paths(parts) {
        return packs.to_vec();
    }
    packs
        .iter()
        .filter(|pack| {
            let Some(uses) = pack.uses else { return true };
            parts.iter().any(|part| {
                let chunks = uses.first < part.chunks.end && uses.last >= part.chunks.start;
                chunks
                    || part
                        .tree_path
                        .iter()
                        .any(|step| (uses.first..=uses.last).contains(&step.place))
            })
        })
        .copied()
        .collect()
}

/// The chunk at `offset..offset + len` of a decoded frame, checked against its id.
fn verified_chunk<'r>(repo: &Repository, raw: &'r [u8], slice: &Slice) -> Result<&'r [u8]> {
    let object = || format!("chunk {}", slice.id.short());
    let start = slice.offset as usize;
    let chunk = raw
        .get(start..start + slice.len as usize)
        .ok_or_else(|| Error::corrupt(object(), "lies outside its frame"))?;
    if repo.key().chunk_id(chunk) != slice.id {
        return Err(Error::corrupt(object(), "decodes to other content"));
    }
    Ok(chunk)
}

/// Where a restore's chunks go.
enum Output<'a> {
    /// The stream.
    Stream(&'a mut dyn Write),
    /// Each chunk in stream order, by id and length, with its bytes unless the receiver has
    /// it. The chunks read are checked against their ids; the stream's hash cannot be (the
    /// receiver's chunks are not read): the ids, keyed hashes of the content, stand for it.
    Chunks(&'a mut ChunkOut<'a>),
}

/// Where restored chunks go: verified and counted on the way.
struct Sink<'a> {
    out: Output<'a>,
    progress: &'a mut dyn FnMut(&RestoreProgress),
    /// The whole stream's hash, when it is to be checked against the snapshot's.
    hasher: Option<blake3::Hasher>,
    size: u64,
    written: u64,
    /// The stream chunk after the last one written: where a pass with another index resumes.
    next_place: u64,
    next_report: u64,
    /// A partial restore's parts, checked as they are written.
    parts: Option<PartsCheck<'a>>,
}

/// Checks each part of a partial restore as its chunks go out: all of its chunks, in order
/// (the digest of their ids), and its bytes.
struct PartsCheck<'a> {
    parts: &'a [Part],
    /// The part being written, its digest and bytes so far.
    at: usize,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl PartsCheck<'_> {
    fn chunk(&mut self, entry: &SnapshotEntry, slice: &Slice) -> Result<()> {
        while self
            .parts
            .get(self.at)
            .is_some_and(|p| p.chunks.end <= slice.place)
        {
            self.close(entry)?;
        }
        if !self
            .parts
            .get(self.at)
            .is_some_and(|p| p.chunks.contains(&slice.place))
        {
            return Err(Error::Internal(format!("chunk {} of no part", slice.place)));
        }
        self.hasher.update(&slice.id.0);
        self.bytes += slice.len as u64;
        Ok(())
    }

    /// The part being written is complete: it must be what the snapshot says.
    fn close(&mut self, entry: &SnapshotEntry) -> Result<()> {
        let part = &self.parts[self.at];
        let digest = std::mem::replace(
            &mut self.hasher,
            blake3::Hasher::new_derive_key(crate::toc::SECTION_DIGEST_CONTEXT),
        )
        .finalize();
        if digest.as_bytes() != &part.digest || self.bytes != part.bytes {
            return Err(Error::corrupt(
                format!("snapshot {}", entry.id.short()),
                format!(
                    "its chunks {}..{} are not the section its table of contents names",
                    part.chunks.start, part.chunks.end
                ),
            ));
        }
        self.bytes = 0;
        self.at += 1;
        Ok(())
    }
}

impl<'a> Sink<'a> {
    /// A sink for `size` bytes (of `parts` only, if given).
    fn new(
        out: Output<'a>,
        size: u64,
        parts: Option<&'a [Part]>,
        progress: &'a mut dyn FnMut(&RestoreProgress),
    ) -> Self {
        Sink {
            out,
            progress,
            hasher: None,
            size,
            written: 0,
            next_place: 0,
            next_report: 0,
            parts: parts.map(|parts| PartsCheck {
                parts,
                at: 0,
                hasher: blake3::Hasher::new_derive_key(crate::toc::SECTION_DIGEST_CONTEXT),
                bytes: 0,
            }),
        }
    }

    fn write_run(&mut self, repo: &Repository, entry: &SnapshotEntry, run: &Run) -> Result<()> {
        match &run.slot {
            None => {
                for slice in &run.slices {
                    self.count(entry, slice)?;
                    match &mut self.out {
                        Output::Chunks(out) => out(&slice.id, slice.len, None)?,
                        Output::Stream(_) => {
                            return Err(Error::Internal("a chunk left out of a stream".into()));
                        }
                    }
                }
            }
            Some(slot) => slot.with_raw(|raw| {
                // Chunks that lie next to each other in the frame (most of a run) go out in
                // one write, each verified before it joins: no copy into a buffer on the way,
                // and a write that large goes past the writer's buffer.
                let mut pending = 0..0;
                for slice in &run.slices {
                    let chunk = verified_chunk(repo, raw, slice)?;
                    self.count(entry, slice)?;
                    if let Output::Chunks(out) = &mut self.out {
                        out(&slice.id, slice.len, Some(chunk))?;
                        continue;
                    }
                    let start = slice.offset as usize;
                    if start != pending.end {
                        self.write(&raw[pending])?;
                        pending = start..start;
                    }
                    pending.end = start + chunk.len();
                }
                self.write(&raw[pending])
            })?,
        }
        if self.written >= self.next_report {
            self.next_report = self.written + (8 << 20);
            self.report();
        }
        Ok(())
    }

    /// Writes verified bytes to the stream.
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if let Output::Stream(out) = &mut self.out
            && !bytes.is_empty()
        {
            out.write_all(bytes).map_err(Error::Sink)?;
            if let Some(hasher) = &mut self.hasher {
                hasher.update(bytes);
            }
        }
        Ok(())
    }

    /// Counts a chunk of `len` bytes about to go out. A tree that names chunks over and over
    /// (damaged, or written to hang a restore) stops here, not after an endless stream.
    fn count(&mut self, entry: &SnapshotEntry, slice: &Slice) -> Result<()> {
        let len = slice.len as u64;
        if self.written + len > self.size {
            return Err(Error::corrupt(
                format!("snapshot {}", entry.id.short()),
                format!("its chunk tree yields more than its {} bytes", self.size),
            ));
        }
        match &mut self.parts {
            Some(parts) => parts.chunk(entry, slice)?,
            // Every leaf of the tree, in order: a planner that skipped or repeated one (as a
            // pass that resumes could) must not go unnoticed.
            None if slice.place != self.next_place => {
                return Err(Error::Internal(format!(
                    "chunk {} written after chunk {}",
                    slice.place, self.next_place
                )));
            }
            None => {}
        }
        self.written += len;
        self.next_place = slice.place + 1;
        Ok(())
    }

    fn report(&mut self) {
        (self.progress)(&RestoreProgress {
            bytes_written: self.written,
            size: self.size,
        });
    }
}

/// Restores `entry` into `out`. Fails if any byte does not verify; `out` may then hold a prefix.
///
/// Chunks are looked up in the index of the packs the snapshot names (§11.2 of
/// docs/FORMAT.md), without a walk of the whole tree first, so the first byte does not wait for
/// the snapshot's size. If those packs turn out not to hold a chunk, a node or a base (a prune
/// repacked one since), or one is gone or damaged, the restore goes on from that chunk with
/// the index of every index file: nothing written is written again.
pub fn restore(
    repo: &Repository,
    entry: &SnapshotEntry,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(&RestoreProgress),
) -> Result<RestoreSummary> {
    let sink = Sink::new(Output::Stream(out), entry.snapshot.size, None, progress);
    restore_into(repo, entry, sink, None)
}

/// As [`restore`], and the whole stream is hashed as it goes out and checked against the hash
/// the backup took of what it read: a check of bkp itself, end to end (a drill's).
pub fn restore_checking_stream_hash(
    repo: &Repository,
    entry: &SnapshotEntry,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(&RestoreProgress),
) -> Result<RestoreSummary> {
    let mut sink = Sink::new(Output::Stream(out), entry.snapshot.size, None, progress);
    sink.hasher = Some(blake3::Hasher::new());
    restore_into(repo, entry, sink, None)
}

/// Restores only `parts` of `entry`'s stream (ascending, not overlapping; sections of a dump,
/// docs/FORMAT.md §13) into `out`, one after the other, reading only the frames that hold
/// them (and the tree). Each chunk is checked against its id, and each part against the
/// digest of its chunks' ids and its length; the whole stream's hash cannot be.
pub fn restore_parts(
    repo: &Repository,
    entry: &SnapshotEntry,
    parts: &[Part],
    out: &mut dyn Write,
    progress: &mut dyn FnMut(&RestoreProgress),
) -> Result<RestoreSummary> {
    if parts
        .windows(2)
        .any(|w| w[0].chunks.end > w[1].chunks.start)
    {
        return Err(Error::Internal("parts out of order".into()));
    }
    let size = parts.iter().map(|p| p.bytes).sum();
    let sink = Sink::new(Output::Stream(out), size, Some(parts), progress);
    restore_into(repo, entry, sink, None)
}

/// Restores `entry`'s chunks into `out` in stream order, each by id and length, with its
/// bytes (checked against its id) unless `has` gives its length: those are not read. For a
/// copy into a repository that cuts and names chunks as this one does.
pub(crate) fn restore_chunks(
    repo: &Repository,
    entry: &SnapshotEntry,
    has: Has<'_>,
    out: &mut ChunkOut<'_>,
) -> Result<RestoreSummary> {
    let mut progress = |_: &RestoreProgress| {};
    let sink = Sink::new(
        Output::Chunks(out),
        entry.snapshot.size,
        None,
        &mut progress,
    );
    restore_into(repo, entry, sink, Some(has))
}

fn restore_into(
    repo: &Repository,
    entry: &SnapshotEntry,
    mut sink: Sink<'_>,
    has: Option<Has<'_>>,
) -> Result<RestoreSummary> {
    repo.require_full_key("restore")?;
    let started = Instant::now();
    // Passes, each going on from where the one before it stopped: the snapshot's packs as
    // the stream reaches them, if it says where it uses them; all their headers at once (a
    // snapshot without uses, or one whose packs are in use at more places at once than the
    // stream index holds, after a repack); every index file (a pack is gone or a writer was
    // wrong). A pass gives up on what the packs it reads turn out not to hold, or damage.
    let snapshot = &entry.snapshot;
    if snapshot.packs_have_uses() {
        match restore_with(repo, entry, Lookup::Stream, has, &mut sink) {
            Err(Error::Missing { .. } | Error::Corrupt { .. }) => {}
            done => return done.and_then(|()| sink.finish(entry, started)),
        }
    }
    if let Some(index) = repo.index_of_snapshot_packs(snapshot)? {
        match restore_with(repo, entry, Lookup::Index(&index), has, &mut sink) {
            Err(Error::Missing { .. } | Error::Corrupt { .. }) => {}
            done => return done.and_then(|()| sink.finish(entry, started)),
        }
    }
    let everything = repo.load_index()?;
    restore_with(repo, entry, Lookup::Index(&everything), has, &mut sink)?;
    sink.finish(entry, started)
}

impl Sink<'_> {
    /// Checks what was written against the snapshot, once every chunk is.
    fn finish(mut self, entry: &SnapshotEntry, started: Instant) -> Result<RestoreSummary> {
        let size = self.size;
        if let Output::Stream(out) = &mut self.out {
            out.flush().map_err(Error::Sink)?;
        }
        self.report();

        let object = format!("snapshot {}", entry.id.short());
        if let Some(parts) = &mut self.parts {
            while parts.at < parts.parts.len() {
                parts.close(entry)?;
            }
        }
        if self.written != size {
            return Err(Error::corrupt(
                object,
                format!("restored {} bytes, expected {size}", self.written),
            ));
        }
        if let Some(hasher) = &self.hasher
            && hasher.finalize().as_bytes() != &entry.snapshot.stream_hash
        {
            return Err(Error::corrupt(
                object,
                "the restored stream's BLAKE3 hash does not match",
            ));
        }
        Ok(RestoreSummary {
            bytes_written: self.written,
            elapsed: started.elapsed(),
        })
    }
}

/// What a pass of a restore looks chunks up in.
enum Lookup<'a> {
    /// The snapshot's packs, read as the stream reaches them (`PackRef::uses`).
    Stream,
    Index(&'a Index),
}

/// One pass of a restore, from the chunk after those `sink` has written.
fn restore_with(
    repo: &Repository,
    entry: &SnapshotEntry,
    lookup: Lookup<'_>,
    has: Option<Has<'_>>,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let threads = repo.workers();
    std::thread::scope(|scope| -> Result<()> {
        // Dropped when this closure returns, however it returns, which releases the planner.
        let (_writing, stopped) = bounded::<()>(0);
        let (job_tx, job_rx) = bounded::<Arc<FrameSlot>>(MAX_FRAMES_ALIVE);
        let (run_tx, run_rx) = bounded::<Result<Run>>(QUEUED_RUNS);
        let budget = bounded::<()>(MAX_FRAMES_ALIVE);
        let (spare_tx, spare_rx) = bounded::<Vec<u8>>(MAX_FRAMES_ALIVE);
        for _ in 0..MAX_FRAMES_ALIVE {
            budget.0.send(()).expect("room for the whole budget");
        }
        for _ in 0..threads {
            let (jobs, spare) = (job_rx.clone(), spare_rx.clone());
            scope.spawn(move || {
                let mut reader = FrameReader::of_fetches(repo);
                let mut dictionary = Vec::new();
                for slot in jobs {
                    let buffer = spare.try_recv().unwrap_or_default();
                    slot.decode(&mut reader, &mut dictionary, buffer);
                }
            });
        }
        drop(job_rx);
        let locations = match lookup {
            Lookup::Index(index) => Locations::Index(index),
            Lookup::Stream => Locations::Stream(Box::new(StreamIndex::start(
                scope,
                HeaderSource::Store(repo),
                &match &sink.parts {
                    Some(parts) => packs_for_parts(&entry.snapshot.packs, parts.parts),
                    None => entry.snapshot.packs.clone(),
                },
                Strictness::Exact {
                    max_chunks_held: MAX_CHUNKS_HELD,
                },
            )?)),
        };
        let planner = Planner {
            repo,
            locations,
            jobs: job_tx,
            runs: run_tx,
            budget,
            stopped,
            spare: spare_tx,
            cache: Vec::new(),
            skip: sink.next_place,
            has,
            wanted: sink.parts.as_ref().map(|p| Wanted { ranges: p.parts }),
        };
        scope.spawn(|| planner.run(repo, entry));
        for run in run_rx {
            sink.write_run(repo, entry, &run?)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackupOptions, Source};

    /// Counts what a restore wrote, to show it stopped early.
    struct Counting(u64);

    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_tree_that_yields_more_than_the_snapshot_size_stops_at_that_size() {
        let repo = crate::repo::test_repository();
        let data = b"INSERT INTO t VALUES (1, 'x');\n".repeat(40_000);
        let source = Source::spawn(std::io::Cursor::new(data.clone()));
        let summary = crate::backup(&repo, source, &BackupOptions::default(), &mut |_| {}).unwrap();
        // The same tree, its ids repeated many times over: a writer could record this. (Its
        // height is 0 or 1: how repetitive text is cut depends on the repository's chunker key.)
        let mut snapshot = summary.snapshot.snapshot.clone();
        let ids = snapshot.tree.ids.clone();
        for _ in 0..200 {
            snapshot.tree.ids.extend_from_slice(&ids);
        }
        let (id, _) = repo.commit_snapshot(&snapshot).unwrap();
        let entry = repo.read_snapshot(id).unwrap();
        let mut out = Counting(0);
        let err = restore(&repo, &entry, &mut out, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("yields more than"), "{err}");
        assert!(out.0 <= data.len() as u64, "{} written", out.0);
    }

    #[test]
    fn the_first_pass_restores_a_snapshot_of_many_packs_without_falling_back() {
        // Random bytes: a pack for each 2 MiB frame. The stream index lets packs go
        // while runs in them are still open.
        let repo = crate::repo::test_repository();
        let mut data = vec![0u8; 12 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for byte in &mut data {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *byte = x as u8;
        }
        let source = Source::spawn(std::io::Cursor::new(data.clone()));
        let options = BackupOptions {
            pack_size: 128 << 10,
            ..BackupOptions::default()
        };
        let entry = crate::backup(&repo, source, &options, &mut |_| {})
            .unwrap()
            .snapshot;
        assert!(entry.snapshot.packs.len() > 4 && entry.snapshot.packs_have_uses());
        let mut out = Vec::new();
        let mut progress = |_: &RestoreProgress| {};
        let mut sink = Sink::new(
            Output::Stream(&mut out),
            entry.snapshot.size,
            None,
            &mut progress,
        );
        // The pass a restore makes first; the others are for repacked or damaged repositories.
        restore_with(&repo, &entry, Lookup::Stream, None, &mut sink).unwrap();
        sink.finish(&entry, Instant::now()).unwrap();
        assert!(out == data);
    }

    #[test]
    fn a_drill_checks_the_stream_against_the_hash_the_backup_took() {
        let repo = crate::repo::test_repository();
        let data = b"COPY t (a) FROM stdin;\n1\n2\n\\.\n".repeat(5_000);
        let source = Source::spawn(std::io::Cursor::new(data.clone()));
        let summary = crate::backup(&repo, source, &BackupOptions::default(), &mut |_| {}).unwrap();
        let mut out = Vec::new();
        restore_checking_stream_hash(&repo, &summary.snapshot, &mut out, &mut |_| {}).unwrap();
        assert!(out == data);
        // A backup whose chunks were not what it read (a bug in bkp's own pipeline): every
        // chunk is what its id says, so only the stream's hash can tell.
        let mut snapshot = summary.snapshot.snapshot.clone();
        snapshot.stream_hash[0] ^= 1;
        let (id, _) = repo.commit_snapshot(&snapshot).unwrap();
        let entry = repo.read_snapshot(id).unwrap();
        restore(&repo, &entry, &mut Vec::new(), &mut |_| {}).unwrap();
        let err =
            restore_checking_stream_hash(&repo, &entry, &mut Vec::new(), &mut |_| {}).unwrap_err();
        assert!(
            err.to_string().contains("BLAKE3 hash does not match"),
            "{err}"
        );
    }
}
