//! What a backup deduplicates against: the chunks of its series' parent snapshot, read as the
//! new stream reaches where the parent used them, or (for a series' first backup, or a parent
//! that does not say where it uses its packs) an index read before the first chunk.
//!
//! A dump changes in place: day 2's chunk n is mostly where day 1's chunk n was, give or take
//! the rows inserted and deleted before it. So the backup estimates where in the parent it is
//! and holds the parent's packs used near there ([`ParentWindow`]), instead of reading every
//! header of the parent before it reads its first byte of stdin (5.9 s and 9,338 requests for
//! a 100 GiB parent, with mysqldump waiting on a full pipe). Content that moved further than
//! the window reaches is stored again: a larger backup, never a wrong one.

use std::thread::Scope;

use crate::error::Result;
use crate::frame::FrameRef;
use crate::id::Id;
use crate::index::{FrameLocation, Index, MISSING_BASE, PackLocation};
use crate::repo::Repository;
use crate::snapshot::PackRef;
use crate::stream_index::{FrameKey, StreamIndex, Strictness};

/// A base frame that a new group may be compressed against, with where to read it: whatever
/// found it may let it go before a worker reads it.
#[derive(Clone, Debug)]
pub struct Base {
    /// How a delta frame names it: its pack and its position there.
    pub name: FrameRef,
    pub frame: FrameLocation,
    pub pack: PackLocation,
}

impl PartialEq for Base {
    fn eq(&self, other: &Base) -> bool {
        self.name == other.name
    }
}

/// A chunk the repository has: its frame's pack and the base frames of its frame (the frame
/// itself if it is a base frame).
pub struct KnownChunk {
    pub pack: PackLocation,
    pub bases: Vec<Base>,
}

/// What a backup looks chunks up in.
pub enum Known {
    Index(Index),
    Parent(Box<ParentWindow>),
}

impl Known {
    /// Whether there is anything to deduplicate against (a first backup has nothing).
    pub fn is_empty(&self) -> bool {
        match self {
            Known::Index(index) => index.chunk_count() == 0,
            Known::Parent(_) => false,
        }
    }

    /// Chunk `id`: the new stream's next data chunk, or a tree node above the data so far.
    pub fn chunk(&mut self, id: &Id, is_tree_node: bool) -> Result<Option<KnownChunk>> {
        match self {
            Known::Index(index) => Ok(index_chunk(index, id)),
            Known::Parent(window) => window.chunk(id, is_tree_node),
        }
    }
}

fn index_chunk(index: &Index, id: &Id) -> Option<KnownChunk> {
    let frame = index.chunk_frame(id)?;
    let base = |f: u32| {
        let frame = *index.frame(f);
        Base {
            name: index.frame_ref(f),
            pack: index.pack(frame.pack).clone(),
            frame,
        }
    };
    let bases = match index.bases(frame) {
        [] => vec![base(frame)],
        // (Never missing: the index holds no chunks of frames without their bases.)
        bases => bases
            .iter()
            .filter(|&&b| b != MISSING_BASE)
            .map(|&b| base(b))
            .collect(),
    };
    Some(KnownChunk {
        pack: index.pack(index.frame(frame).pack).clone(),
        bases,
    })
}

/// The parent's packs in use near where the backup estimates it is in the parent's stream.
pub struct ParentWindow {
    packs: StreamIndex,
    /// The estimate: the parent's stream chunk that the new stream's next data chunk most
    /// likely repeats.
    at: u64,
    /// The estimate at the last data chunk found: the window lets go of nothing after it
    /// while new data comes (an inserted table), so the parent's data after the insertion is
    /// still held when the stream gets there.
    at_last_found: u64,
    /// Data chunks not found since the last one found: the window reaches further ahead the
    /// longer this is (a deleted table: the parent's data after it is further on).
    not_found: u64,
}

impl ParentWindow {
    /// Parent stream chunks held ahead of the estimate, and after the last chunk found: 32 k
    /// chunks are ~512 MiB of dump; a header's locations are 20 bytes a chunk.
    const AHEAD: u64 = 32 << 10;
    const BEHIND: u64 = 32 << 10;
    /// Chunk locations held at most (5 MiB).
    const MAX_CHUNKS_HELD: usize = 256 << 10;

    /// `packs`: the parent's, every one with its uses.
    pub fn start<'scope, 'env>(
        scope: &'scope Scope<'scope, 'env>,
        repo: &'env Repository,
        packs: &[PackRef],
    ) -> Result<ParentWindow> {
        Ok(ParentWindow {
            packs: StreamIndex::start(
                scope,
                repo,
                packs,
                Self::MAX_CHUNKS_HELD,
                Strictness::BestEffort,
            )?,
            at: 0,
            at_last_found: 0,
            not_found: 0,
        })
    }

    fn chunk(&mut self, id: &Id, is_tree_node: bool) -> Result<Option<KnownChunk>> {
        let take_in_to = self.at + Self::AHEAD + 2 * self.not_found;
        let let_go_before = self.at_last_found.saturating_sub(Self::BEHIND);
        let found = self.packs.chunk_near(id, take_in_to, let_go_before)?;
        // A tree node is placed at its first chunk, behind the estimate: it moves nothing.
        if is_tree_node {
            return Ok(found.and_then(|f| self.known(f.frame)));
        }
        let known = found.and_then(|f| Some((f.frame.pack, self.known(f.frame)?)));
        match known {
            Some((pack, known)) => {
                // The parent used this chunk's pack within its uses: the estimate is too.
                let uses = self.packs.uses(pack);
                self.at = (self.at + 1).clamp(uses.first, uses.last.max(uses.first));
                self.at_last_found = self.at;
                self.not_found = 0;
                Ok(Some(known))
            }
            None => {
                self.at += 1;
                self.not_found += 1;
                Ok(None)
            }
        }
    }

    /// The chunk of `frame`, unless a base it needs is not held (then it is stored again).
    fn known(&self, frame: FrameKey) -> Option<KnownChunk> {
        let base = |key: FrameKey| {
            let (frame, pack) = self.packs.location(key).ok()?;
            Some(Base {
                name: FrameRef {
                    pack: pack.id,
                    frame: frame.number_in_pack,
                },
                frame: *frame,
                pack: pack.clone(),
            })
        };
        let bases = match self.packs.bases(frame).ok()?.as_slice() {
            [] => vec![base(frame)?],
            bases => bases.iter().map(|&b| base(b)).collect::<Option<_>>()?,
        };
        let (_, pack) = self.packs.location(frame).ok()?;
        Some(KnownChunk {
            pack: pack.clone(),
            bases,
        })
    }
}
