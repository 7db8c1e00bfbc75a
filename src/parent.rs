//! What a backup deduplicates against: the chunks of its series' parent snapshot, read as the
//! new stream reaches where the parent used them, or (for a series' first backup, or a parent
//! that does not say where it uses its packs) an index read before the first chunk.
//!
//! A dump changes in place: day 2's chunk n is mostly where day 1's chunk n was, give or take
//! the rows inserted and deleted before it. So the backup estimates where in the parent it is
//! and holds the parent's packs used near there ([`ParentWindow`]), instead of reading every
//! header of the parent before it reads its first byte of stdin (5.9 s and 9,338 requests for
//! a 100 GiB parent, with mysqldump waiting on a full pipe). Content that moved further than
//! the window reaches is stored again: a larger backup, never a wrong one. A parent whose packs
//! are each used all over its stream (a prune's repack mixes frames from everywhere) does not
//! fit a window: then the backup reads the index of all its packs after all, where it is; and
//! where one of the parent's packs is gone (a prune repacked it and deleted it), every index
//! file, which names where its frames went.

use std::sync::Arc;
use std::thread::Scope;

use crate::error::Result;
use crate::frame::FrameRef;
use crate::id::Id;
use crate::index::{FrameLocation, Index, MISSING_BASE, PackLocation};
use crate::repo::{ParentPacks, Repository};
use crate::snapshot::PackRef;
use crate::stream_index::{FrameKey, HeaderSource, StreamIndex, Strictness};

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
    /// Shared with whoever else needs to know what the backup will find (a copy's source,
    /// which then leaves those chunks unread).
    Index(Arc<Index>),
    Parent(Box<ParentWindow>),
}

impl Known {
    /// What a backup deduplicates against, from what [`Repository::parent_for_backup`] found
    /// (or a put-only writer's send log): the parent's pack headers come from `headers`.
    pub fn start<'scope, 'env>(
        scope: &'scope Scope<'scope, 'env>,
        headers: HeaderSource<'env>,
        parent: ParentPacks,
    ) -> Result<Known> {
        Ok(match parent {
            ParentPacks::Index(index) => Known::Index(Arc::new(index)),
            ParentPacks::Uses(packs) => Known::Parent(Box::new(ParentWindow::start(
                scope,
                headers,
                &packs,
                Reach::DEFAULT,
            )?)),
        })
    }

    /// Whether there is anything to deduplicate against (a first backup has nothing).
    pub fn is_empty(&self) -> bool {
        match self {
            Known::Index(index) => index.chunk_count() == 0,
            Known::Parent(_) => false,
        }
    }

    /// Chunk `id`: the new stream's next data chunk, or a tree node above the data so far.
    pub fn chunk(
        &mut self,
        repo: &Repository,
        id: &Id,
        is_tree_node: bool,
    ) -> Result<Option<KnownChunk>> {
        if let Known::Parent(window) = self {
            let found = window.chunk(id, is_tree_node)?;
            if repo.role() == crate::KeyRole::PutOnly && !matches!(found, Lookup::Done(_)) {
                // It cannot read the index: the rest of its stream is stored again.
                *self = Known::Index(Arc::default());
                return Ok(None);
            }
            match found {
                Lookup::Done(found) => return Ok(found),
                Lookup::DoesNotFit => {
                    *self =
                        Known::Index(Arc::new(repo.index_of_parent_packs(&window.packs.packs())?));
                }
                // Most likely a prune repacked it and deleted it since: its frames are in
                // other packs now, which only the index files name.
                Lookup::PackGone => *self = Known::Index(Arc::new(repo.load_index_for_backup()?)),
            }
        }
        match self {
            Known::Index(index) => Ok(index_chunk(index, id)),
            Known::Parent(_) => unreachable!("replaced by an index above"),
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

/// How far a [`ParentWindow`] reaches, in the parent's stream chunks.
#[derive(Clone, Copy, Debug)]
pub struct Reach {
    /// Held ahead of the estimate.
    pub ahead: u64,
    /// Held after the last chunk found.
    pub behind: u64,
    /// Chunk locations held before the window stops guessing further ahead; with twice as
    /// many due at once, it gives way to the index of all the parent's packs.
    pub max_chunks_held: usize,
}

impl Reach {
    /// 32 k chunks are ~512 MiB of dump; a header's locations are 20 bytes a chunk, so the
    /// window holds 5 MiB of them at most.
    pub const DEFAULT: Reach = Reach {
        ahead: 32 << 10,
        behind: 32 << 10,
        max_chunks_held: 256 << 10,
    };
}

/// The parent's packs in use near where the backup estimates it is in the parent's stream.
pub struct ParentWindow {
    packs: StreamIndex,
    reach: Reach,
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

/// What a [`ParentWindow`] found.
enum Lookup {
    Done(Option<KnownChunk>),
    /// The packs the parent uses here hold more than the window's room.
    DoesNotFit,
    /// A pack's header could not be read.
    PackGone,
}

impl ParentWindow {
    /// `parent_packs`: every one with its uses.
    pub fn start<'scope, 'env>(
        scope: &'scope Scope<'scope, 'env>,
        headers: HeaderSource<'env>,
        parent_packs: &[PackRef],
        reach: Reach,
    ) -> Result<ParentWindow> {
        Ok(ParentWindow {
            packs: StreamIndex::start(scope, headers, parent_packs, Strictness::BestEffort)?,
            reach,
            at: 0,
            at_last_found: 0,
            not_found: 0,
        })
    }

    fn chunk(&mut self, id: &Id, is_tree_node: bool) -> Result<Lookup> {
        // Reaching further ahead while chunks are not found is a guess (that part of the
        // parent was deleted): made only while there is room for it.
        let mut take_in_to = self.at + self.reach.ahead;
        if self.packs.held() < self.reach.max_chunks_held {
            take_in_to += 2 * self.not_found;
        }
        let let_go_before = self.at_last_found.saturating_sub(self.reach.behind);
        let found = self.packs.chunk_near(id, take_in_to, let_go_before)?;
        if self.packs.left_out() > 0 {
            return Ok(Lookup::PackGone);
        }
        // (Twice the room: the guess stops at the room, and the step that reaches it may take
        // in more.)
        if self.packs.held() > 2 * self.reach.max_chunks_held {
            return Ok(Lookup::DoesNotFit);
        }
        // A tree node is placed at its first chunk, behind the estimate: it moves nothing.
        if is_tree_node {
            return Ok(Lookup::Done(found.and_then(|f| self.known(f.frame))));
        }
        let known = found.and_then(|f| Some((f.frame.pack, self.known(f.frame)?)));
        match known {
            Some((pack, known)) => {
                // The parent used this chunk's pack within its uses: the estimate is too.
                let uses = self.packs.uses(pack);
                self.at = (self.at + 1).clamp(uses.first, uses.last.max(uses.first));
                self.at_last_found = self.at;
                self.not_found = 0;
                Ok(Lookup::Done(Some(known)))
            }
            None => {
                self.at += 1;
                self.not_found += 1;
                Ok(Lookup::Done(None))
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::chunker::{Chunker, GearTable};
    use crate::repo::{pseudo_random, small_packs, test_backup, test_repository};

    fn chunk_ids(repo: &Repository, data: &[u8]) -> Vec<Id> {
        let key = repo.key();
        let gear = GearTable::from_key(&key.chunker_key);
        let mut chunker = Chunker::new(data, repo.config().chunker, gear).unwrap();
        let mut ids = Vec::new();
        while let Some(chunk) = chunker.next_chunk().unwrap() {
            ids.push(key.chunk_id(chunk));
        }
        ids
    }

    #[test]
    fn the_window_follows_a_stream_that_lost_or_gained_more_than_it_reaches() {
        let repo = test_repository();
        let day1 = pseudo_random(24_000_000, 1);
        let parent = test_backup(&repo, &day1, &small_packs()).snapshot;
        let day1_ids: HashSet<Id> = chunk_ids(&repo, &day1).into_iter().collect();
        let reach = Reach {
            ahead: 64,
            behind: 64,
            max_chunks_held: 600,
        };
        let new_part = pseudo_random(1_500_000, 2);
        let cut = 2_000_000..3_500_000;
        let deleted = [&day1[..cut.start], &day1[cut.end..]].concat();
        let inserted = [&day1[..cut.start], &new_part[..], &day1[cut.start..]].concat();
        for (case, day2) in [
            ("unchanged", &day1),
            ("deleted", &deleted),
            ("inserted", &inserted),
        ] {
            let ids = chunk_ids(&repo, day2);
            let in_parent = ids.iter().filter(|id| day1_ids.contains(id)).count();
            let (found, most_held) = std::thread::scope(|scope| {
                let mut window =
                    ParentWindow::start(scope, HeaderSource::Store(&repo), &parent.packs, reach)
                        .unwrap();
                let (mut found, mut most_held) = (0, 0);
                for id in &ids {
                    match window.chunk(id, false).unwrap() {
                        Lookup::Done(chunk) => found += chunk.is_some() as usize,
                        _ => panic!("{case}: the window gave way to an index"),
                    }
                    most_held = most_held.max(window.packs.held());
                }
                (found, most_held)
            });
            assert!(
                found * 10 >= in_parent * 9,
                "{case}: {found} of the {in_parent} chunks the parent has found"
            );
            assert!(
                most_held * 2 < day1_ids.len(),
                "{case}: {most_held} of {} chunk locations held at once",
                day1_ids.len()
            );
        }
    }

    #[test]
    fn a_parent_whose_packs_do_not_fit_the_window_is_read_whole_and_deduplicates_as_well() {
        let repo = test_repository();
        let day1 = pseudo_random(6_000_000, 3);
        let mut packs = test_backup(&repo, &day1, &small_packs()).snapshot.packs;
        // Every pack said to be used all over the stream (as after a repack).
        let last = chunk_ids(&repo, &day1).len() as u64;
        for pack in &mut packs {
            pack.uses = Some(crate::snapshot::ChunkSpan { first: 0, last });
        }
        let reach = Reach {
            ahead: 8,
            behind: 8,
            max_chunks_held: 20,
        };
        let ids = chunk_ids(&repo, &day1);
        std::thread::scope(|scope| {
            let window =
                ParentWindow::start(scope, HeaderSource::Store(&repo), &packs, reach).unwrap();
            let mut known = Known::Parent(Box::new(window));
            for id in &ids {
                let found = known.chunk(&repo, id, false).unwrap();
                assert!(found.is_some(), "a chunk of the parent not found");
            }
            assert!(matches!(known, Known::Index(_)));
        });
    }
}
