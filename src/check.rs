//! Check: is the repository intact, before the day it is needed?
//!
//! Structure: key files parse; index files open; every snapshot opens and every chunk of its
//! tree is indexed, with its delta frames' bases; every indexed pack exists with the indexed
//! size and its header (read by range, not whole) agrees with the index. With `read_data`, also
//! every frame (or a random sample of frames) is read, opened, decompressed and every chunk in
//! it re-hashed against its id. Every problem is reported, not just the first, with the
//! snapshots that a damaged pack affects.
//!
//! Memory does not grow with the repository: the index's chunks are sorted on local disk and
//! every tree is walked at once against them ([`walk_trees`]), as prune does; of each pack only
//! a digest of its indexed header is held. Which snapshots a problem affects is worked out only
//! when there are problems, by a second walk of each snapshot's tree, holding the tree nodes'
//! locations and the damaged chunks (memory in proportion to the damage).

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::crypto::KeyFile;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{ChunkLocation, ChunkTable, Index, id_prefix};
use crate::pack::{self, PackHeader};
use crate::pack_reader::{BaseCache, FrameReader, bases_of, read_range_aligned};
use crate::repo::{Repository, get_named, pack_name};
use crate::snapshot::SnapshotEntry;
use crate::spill::{self, Sorter, join};
use crate::walk::{ChunkUse, Reached, for_each_chunk, walk_trees};

/// How much stored data `check` reads back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ReadData {
    /// Structure only: metadata, pack headers and the chunk trees.
    None,
    /// Every frame.
    All,
    /// A random sample of frames, this fraction of them (0 < f <= 1): repeated runs cover
    /// different frames.
    Fraction(f64),
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// The object that is damaged or missing, e.g. `packs/ab/ab12...`.
    pub object: String,
    pub problem: String,
    /// Snapshots that cannot be fully restored because of it.
    pub snapshots: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    pub snapshots: usize,
    pub index_files: usize,
    pub packs: usize,
    /// Packs that no index names: left by interrupted backups; harmless, and prune removes them.
    pub unreferenced_packs: usize,
    pub frames_read: usize,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks `repo`; `progress` hears what is being checked. Fails only if the repository cannot
/// be listed at all (or local temporary files cannot be written); damage is reported in the
/// [`CheckReport`].
pub fn check(
    repo: &Repository,
    read_data: ReadData,
    progress: &mut dyn FnMut(&str),
) -> Result<CheckReport> {
    repo.require_full_key("check the repository")?;
    let mut checker = Checker {
        repo,
        report: CheckReport::default(),
        pack_problems: Vec::new(),
        marked: HashSet::new(),
    };
    progress("key files");
    checker.key_files()?;
    progress("index files");
    let indexed = checker.index_files()?;
    progress("snapshots");
    let reached = checker.snapshots(&indexed)?;
    progress(if read_data == ReadData::None {
        "packs"
    } else {
        "packs and data"
    });
    checker.packs(&indexed, &reached, read_data)?;
    let damaged = !checker.pack_problems.is_empty()
        || reached.missing
        || reached.node_problems
        || reached.undecodable;
    let packs_used_by = if damaged {
        progress("affected snapshots");
        checker.affected_snapshots(&indexed, &reached)?
    } else {
        HashMap::new()
    };
    Ok(checker.finish(&packs_used_by))
}

struct Checker<'a> {
    repo: &'a Repository,
    report: CheckReport,
    /// Problems with packs, completed at the end with the snapshots that use each pack.
    pack_problems: Vec<(Id, Problem)>,
    /// Packs a prune marked for deletion.
    marked: HashSet<Id>,
}

/// The repository's index as check holds it.
struct Indexed {
    /// Frames, packs and bases; chunks are in `chunks`.
    index: Index,
    chunks: ChunkTable,
    /// By pack number: a digest of the header its index file gives, to compare with the pack's.
    headers: Vec<[u8; 32]>,
}

/// What the walk of every snapshot's tree found.
#[derive(Default)]
struct Reachable {
    /// By pack number: some snapshot reads a frame of it (or a base of such a frame).
    used: Vec<bool>,
    /// Where every tree node that is indexed is (a few per thousand chunks).
    nodes: HashMap<Id, ChunkLocation>,
    /// Some stream chunk is in no index.
    missing: bool,
    /// Some tree node is missing or unreadable.
    node_problems: bool,
    /// Some frame that a tree uses has a base that is not indexed.
    undecodable: bool,
}

fn header_digest(header: &PackHeader) -> [u8; 32] {
    let bytes = postcard::to_stdvec(header).expect("a header serializes");
    *blake3::hash(&bytes).as_bytes()
}

/// Pack numbers of `frame`'s pack and its bases' packs; an error if a base is not indexed.
fn packs_of_frame(index: &Index, frame: u32, packs: &mut dyn FnMut(u32)) -> Result<()> {
    packs(index.frame(frame).pack);
    for &base in bases_of(index, frame)? {
        packs(index.frame(base).pack);
    }
    Ok(())
}

impl Checker<'_> {
    fn problem(&mut self, object: impl Into<String>, problem: impl ToString) {
        self.report.problems.push(Problem {
            object: object.into(),
            problem: problem.to_string(),
            snapshots: Vec::new(),
        });
    }

    fn snapshot_problem(&mut self, object: &str, snapshot: &Id, problem: String) {
        self.report.problems.push(Problem {
            object: object.to_string(),
            problem,
            snapshots: vec![snapshot.to_hex()],
        });
    }

    /// A problem with pack `pack`: the snapshots using it are filled in at the end.
    fn pack_problem(&mut self, pack: Id, problem: impl ToString) {
        let problem = Problem {
            object: pack_name(&pack),
            problem: problem.to_string(),
            snapshots: Vec::new(),
        };
        self.pack_problems.push((pack, problem));
    }

    fn key_files(&mut self) -> Result<()> {
        let store = self.repo.store();
        for object in store.list("keys")? {
            if let Err(e) = get_named(store, &object.name)
                .and_then(|bytes| KeyFile::decode(&bytes, &object.name))
            {
                self.problem(&object.name, e);
            }
        }
        Ok(())
    }

    fn index_files(&mut self) -> Result<Indexed> {
        // As restore sees it: a chunk in a pack that prune marked is found there only if it
        // is nowhere else ([`Repository::load_index`]).
        self.marked = match self.repo.obsolete_lists() {
            Ok(lists) => lists.into_iter().flat_map(|l| l.list.packs).collect(),
            Err(e) => {
                self.problem("obsolete", e);
                HashSet::new()
            }
        };
        for (object, reason) in self.repo.take_damaged_objects("obsolete/") {
            self.problem(object, reason);
        }
        let mut index = crate::index::SpillingIndex::default();
        let mut headers = Vec::new();
        let mut unreadable = Vec::new();
        self.report.index_files = self.repo.for_each_indexed_pack(
            &self.marked,
            &mut |pack| {
                headers.push(header_digest(&pack.header));
                index.add(pack)
            },
            &mut |name, e| {
                unreadable.push((name.to_string(), e));
                Ok(())
            },
        )?;
        for (name, e) in unreadable {
            self.problem(name, e);
        }
        let (index, chunks) = index.finish()?;
        Ok(Indexed {
            index,
            chunks,
            headers,
        })
    }

    /// Reads every snapshot and walks every tree at once against the index.
    fn snapshots(&mut self, indexed: &Indexed) -> Result<Reachable> {
        let Indexed { index, chunks, .. } = indexed;
        let repo = self.repo;
        let markers: HashSet<String> = if repo.has_series_markers() {
            repo.markers()?.into_iter().map(|(_, o)| o.name).collect()
        } else {
            HashSet::new()
        };
        let listed = repo.store().list("snapshots")?;
        self.report.snapshots = listed.len();
        let mut problems = Vec::new();
        let mut objects = listed.iter();
        let mut trees = std::iter::from_fn(|| {
            for object in objects.by_ref() {
                match repo.read_snapshot_named(&object.name) {
                    Ok(entry) => {
                        if repo.has_series_markers()
                            && !markers.contains(&repo.marker_of(&entry.id, &entry.snapshot))
                        {
                            problems.push((object.name.clone(), Some(entry.id), "it has no series marker, so `latest` and --tag do not find it (written by an older bkp during an upgrade?): run `bkp upgrade` to add it".to_string()));
                        }
                        return Some(Ok(entry.snapshot.tree));
                    }
                    Err(e) => problems.push((object.name.clone(), None, e.to_string())),
                }
            }
            None
        });
        let mut reached = Reachable {
            used: vec![false; index.pack_count()],
            ..Reachable::default()
        };
        let uses = |reached: &mut Reachable, frame: u32| {
            let used = &mut reached.used;
            if packs_of_frame(index, frame, &mut |pack| used[pack as usize] = true).is_err() {
                reached.undecodable = true;
            }
        };
        let node_problems = walk_trees(repo, index, chunks, &mut trees, &mut |r| {
            match r {
                Reached::Node(id, Some(location)) => {
                    reached.nodes.insert(id, location);
                    uses(&mut reached, location.frame);
                }
                Reached::Data(_, Some(location)) => uses(&mut reached, location.frame),
                Reached::Data(_, None) => reached.missing = true,
                // Returned as a node problem too.
                Reached::Node(_, None) => {}
            }
            Ok(())
        })?;
        reached.node_problems = !node_problems.is_empty();
        for (object, snapshot, problem) in problems {
            match snapshot {
                Some(id) => self.snapshot_problem(&object, &id, problem),
                None => self.problem(object, problem),
            }
        }
        Ok(reached)
    }

    /// Every indexed pack: stored with its size, its header as indexed; with `read_data`, its
    /// frames (or a sample of them) decoded and their chunks re-hashed.
    fn packs(&mut self, indexed: &Indexed, reached: &Reachable, read_data: ReadData) -> Result<()> {
        let index = &indexed.index;
        let store = self.repo.store();
        let mut stored: HashMap<String, u64> = store
            .list("packs")?
            .into_iter()
            .map(|o| (o.name, o.size))
            .collect();
        // A pack named by two index files (a prune interrupted between writing a rewritten
        // index file and deleting the old one) is one pack, checked once; it is used if any
        // of its numbers is.
        let mut used_ids = HashSet::new();
        for (number, pack) in index.packs().iter().enumerate() {
            if reached.used[number] {
                used_ids.insert(pack.id);
            }
        }
        let mut data = DataCheck::new(self.repo, index, read_data)?;
        let mut seen = HashSet::new();
        for (number, pack) in index.packs().iter().enumerate() {
            if !seen.insert(pack.id) {
                continue;
            }
            let name = pack_name(&pack.id);
            self.report.packs += 1;
            let Some(size) = stored.remove(&name) else {
                self.pack_problem(pack.id, "missing");
                continue;
            };
            if size != pack.len {
                let problem = format!("{size} bytes long, the index says {}", pack.len);
                self.pack_problem(pack.id, problem);
                continue;
            }
            let header = pack::read_header_with(size, &self.repo.key().metadata, &name, |r| {
                read_range_aligned(store, &name, size, r)
            });
            let header = match header {
                Ok((ephemeral, header))
                    if ephemeral == pack.data_ephemeral
                        && header_digest(&header) == indexed.headers[number] =>
                {
                    header
                }
                Ok(_) => {
                    self.pack_problem(pack.id, "its header does not agree with the index");
                    continue;
                }
                Err(e) => {
                    self.pack_problem(pack.id, e);
                    continue;
                }
            };
            // A marked pack that no snapshot uses is garbage waiting for the next prune, which
            // may already have deleted the bases of its delta frames (an interrupted prune).
            if self.marked.contains(&pack.id) && !used_ids.contains(&pack.id) {
                continue;
            }
            let frames = index.frames_of_pack(number as u32);
            for (frame, entry) in frames.zip(&header.frames) {
                if let Err(problem) = data.frame(frame, &entry.chunks) {
                    self.pack_problem(pack.id, problem);
                }
            }
        }
        self.report.frames_read = data.frames_read;
        self.report.unreferenced_packs = stored.len();
        Ok(())
    }

    /// Pack id -> the snapshots whose restore reads it, for the packs with problems; and the
    /// problems of each snapshot whose tree cannot be walked or whose chunks are not indexed.
    ///
    /// Each snapshot's tree is walked again (its nodes located from the first walk), and the
    /// stream chunks of all of them, as (chunk, snapshot) pairs, are sorted on disk and joined
    /// with the chunk table: memory holds the tree nodes' locations and, per snapshot, the
    /// damaged packs it reads, whatever the damage.
    fn affected_snapshots(
        &mut self,
        indexed: &Indexed,
        reached: &Reachable,
    ) -> Result<HashMap<Id, BTreeSet<Id>>> {
        let Indexed { index, chunks, .. } = indexed;
        let bad_ids: HashSet<Id> = self.pack_problems.iter().map(|(id, _)| *id).collect();
        let bad: Vec<bool> = index
            .packs()
            .iter()
            .map(|p| bad_ids.contains(&p.id))
            .collect();
        let mut affected: Vec<Affected> = Vec::new();
        let mut references: Sorter<ChunkUse> = Sorter::new(spill::sort_memory(), true);
        let mut reader = FrameReader::new(self.repo, index);
        for object in self.repo.store().list("snapshots")? {
            // Unreadable snapshots are reported already.
            let Ok(SnapshotEntry { id, snapshot }) = self.repo.read_snapshot_named(&object.name)
            else {
                continue;
            };
            let number = affected.len() as u32;
            let mut this = Affected {
                object: object.name,
                id,
                bad_packs: BTreeSet::new(),
                missing: 0,
                walk_error: None,
                base_error: None,
            };
            let mut pushed = Ok(());
            let walked = for_each_chunk(
                self.repo,
                &|id| reached.nodes.get(id).copied(),
                &mut reader,
                &snapshot.tree,
                &mut |id, is_node| {
                    if is_node {
                        // A missing node stops the walk and is reported as its error.
                        if let Some(location) = reached.nodes.get(&id) {
                            this.uses(index, &bad, location.frame);
                        }
                    } else if pushed.is_ok() {
                        pushed = references.push(ChunkUse {
                            prefix: id_prefix(&id),
                            snapshot: number,
                        });
                    }
                },
            );
            pushed?;
            this.walk_error = walked.err();
            affected.push(this);
        }
        join(
            references.finish()?.scan(),
            chunks.scan(),
            |reference| reference.prefix,
            |chunk| chunk.prefix,
            |reference, chunk| {
                let this = &mut affected[reference.snapshot as usize];
                match chunk {
                    Some(chunk) => this.uses(index, &bad, chunk.location.frame),
                    None => this.missing += 1,
                }
                Ok(())
            },
        )?;
        let mut used_by: HashMap<Id, BTreeSet<Id>> = HashMap::new();
        for this in affected {
            if this.missing > 0 {
                let problem = format!(
                    "{} of its chunks are in no index (missing data)",
                    this.missing
                );
                self.snapshot_problem(&this.object, &this.id, problem);
            }
            if let Some(e) = this.walk_error.or(this.base_error) {
                let problem = format!("its chunk tree cannot be read: {e}");
                self.snapshot_problem(&this.object, &this.id, problem);
            }
            for pack in this.bad_packs {
                used_by
                    .entry(index.pack(pack).id)
                    .or_default()
                    .insert(this.id);
            }
        }
        Ok(used_by)
    }

    /// Names the snapshots behind each pack problem.
    fn finish(mut self, used_by: &HashMap<Id, BTreeSet<Id>>) -> CheckReport {
        for (pack, mut problem) in std::mem::take(&mut self.pack_problems) {
            problem.snapshots = used_by
                .get(&pack)
                .map(|ids| ids.iter().map(Id::to_hex).collect())
                .unwrap_or_default();
            self.report.problems.push(problem);
        }
        self.report
    }
}

/// What a snapshot reads that is damaged.
struct Affected {
    object: String,
    id: Id,
    /// Numbers of the packs with problems that it reads.
    bad_packs: BTreeSet<u32>,
    /// Distinct stream chunks in no index.
    missing: u64,
    walk_error: Option<Error>,
    base_error: Option<Error>,
}

impl Affected {
    fn uses(&mut self, index: &Index, bad: &[bool], frame: u32) {
        let bad_packs = &mut self.bad_packs;
        let mark = &mut |pack: u32| {
            if bad[pack as usize] {
                bad_packs.insert(pack);
            }
        };
        if let Err(e) = packs_of_frame(index, frame, mark) {
            self.base_error.get_or_insert(e);
        }
    }
}

/// Reading frames back for `check --read-data`.
struct DataCheck<'a> {
    repo: &'a Repository,
    index: &'a Index,
    read_data: ReadData,
    /// Keys the random sample, so that repeated runs cover different frames.
    sample_key: [u8; 32],
    reader: FrameReader<'a>,
    bases: BaseCache,
    dictionary: Vec<u8>,
    raw: Vec<u8>,
    frames_read: usize,
}

impl<'a> DataCheck<'a> {
    fn new(repo: &'a Repository, index: &'a Index, read_data: ReadData) -> Result<Self> {
        let mut sample_key = [0u8; 32];
        getrandom::fill(&mut sample_key)
            .map_err(|e| Error::Internal(format!("no randomness: {e}")))?;
        Ok(DataCheck {
            repo,
            index,
            read_data,
            sample_key,
            reader: FrameReader::new(repo, index),
            bases: BaseCache::new(4),
            dictionary: Vec::new(),
            raw: Vec::new(),
            frames_read: 0,
        })
    }

    fn selected(&self, frame: u32) -> bool {
        match self.read_data {
            ReadData::None => false,
            ReadData::All => true,
            ReadData::Fraction(f) => {
                let h = blake3::keyed_hash(&self.sample_key, &frame.to_le_bytes());
                let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
                (x as f64) < f * u64::MAX as f64
            }
        }
    }

    /// Reads `frame` (if selected) and checks that it holds `chunks`, as its pack's header says.
    fn frame(
        &mut self,
        frame: u32,
        chunks: &[pack::ChunkEntry],
    ) -> std::result::Result<(), String> {
        if !self.selected(frame) {
            return Ok(());
        }
        self.frames_read += 1;
        let decoded = bases_of(self.index, frame)
            .and_then(|bases| {
                self.bases
                    .dictionary(&mut self.reader, bases, &mut self.dictionary)
            })
            .and_then(|()| {
                self.reader
                    .read(frame, &self.dictionary, std::mem::take(&mut self.raw))
            })
            .map_err(|e| e.to_string())?;
        let mut at = 0usize;
        let mut wrong = 0;
        for chunk in chunks {
            let bytes = decoded.get(at..at + chunk.len as usize);
            if bytes.is_none_or(|b| self.repo.key().chunk_id(b) != chunk.id) {
                wrong += 1;
            }
            at += chunk.len as usize;
        }
        self.raw = decoded;
        if wrong > 0 {
            return Err(format!(
                "frame {} holds {wrong} chunks that do not match their ids",
                self.index.frame(frame).number_in_pack
            ));
        }
        Ok(())
    }
}
