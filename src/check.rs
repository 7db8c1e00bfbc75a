//! Check: is the repository intact, before the day it is needed?
//!
//! Structure: key files parse; index files open; every indexed pack exists with the indexed
//! size and its header (read by range, not whole) agrees with the index; every snapshot opens
//! and every chunk of its tree is indexed, with its delta frames' bases. With `read_data`, also
//! every frame (or a random sample of frames) is read, opened, decompressed and every chunk in
//! it re-hashed against its id. Every problem is reported, not just the first, with the
//! snapshots that a damaged pack affects.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::crypto::KeyFile;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{Index, IndexFile, IndexedPack};
use crate::pack;
use crate::pack_reader::{BaseCache, FrameReader, bases_of, read_range_aligned};
use crate::repo::{Repository, get_named, pack_name};
use crate::walk::for_each_chunk;

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
/// be listed at all; damage is reported in the [`CheckReport`].
pub fn check(
    repo: &Repository,
    read_data: ReadData,
    progress: &mut dyn FnMut(&str),
) -> Result<CheckReport> {
    let mut checker = Checker {
        repo,
        report: CheckReport::default(),
        pack_problems: Vec::new(),
        packs_used_by: HashMap::new(),
        marked: HashSet::new(),
    };
    progress("key files");
    checker.key_files()?;
    progress("index files");
    let (index, indexed) = checker.index_files()?;
    progress("packs");
    checker.packs(&indexed)?;
    progress("snapshots");
    checker.snapshots(&index)?;
    if read_data != ReadData::None {
        progress("data");
        checker.data(&index, &indexed, read_data)?;
    }
    Ok(checker.finish())
}

struct Checker<'a> {
    repo: &'a Repository,
    report: CheckReport,
    /// Problems with packs (by number in index order), completed at the end with the
    /// snapshots that use each pack.
    pack_problems: Vec<(u32, Problem)>,
    /// Pack number -> snapshots whose restore reads it.
    packs_used_by: HashMap<u32, BTreeSet<Id>>,
    /// Packs a prune marked for deletion.
    marked: HashSet<Id>,
}

impl Checker<'_> {
    fn problem(&mut self, object: impl Into<String>, problem: impl ToString) {
        self.report.problems.push(Problem {
            object: object.into(),
            problem: problem.to_string(),
            snapshots: Vec::new(),
        });
    }

    /// A problem with pack number `number`: the snapshots using it are filled in at the end.
    fn pack_problem(&mut self, number: usize, pack: &IndexedPack, problem: impl ToString) {
        let problem = Problem {
            object: pack_name(&pack.id),
            problem: problem.to_string(),
            snapshots: Vec::new(),
        };
        self.pack_problems.push((number as u32, problem));
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

    fn index_files(&mut self) -> Result<(Index, Vec<IndexedPack>)> {
        let store = self.repo.store();
        let mut index = Index::default();
        let mut indexed = Vec::new();
        for object in store.list("index")? {
            self.report.index_files += 1;
            let file: Result<IndexFile> = get_named(store, &object.name)
                .and_then(|bytes| IndexFile::open(&self.repo.key().metadata, &bytes, &object.name));
            match file {
                Ok(file) => indexed.extend(file.packs),
                Err(e) => self.problem(&object.name, e),
            }
        }
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
        let marked = &self.marked;
        let (mut indexed, last): (Vec<_>, Vec<_>) =
            indexed.into_iter().partition(|p| !marked.contains(&p.id));
        indexed.extend(last);
        for pack in &indexed {
            index.add(pack);
        }
        index.finish();
        Ok((index, indexed))
    }

    fn packs(&mut self, indexed: &[IndexedPack]) -> Result<()> {
        let store = self.repo.store();
        let mut stored: HashMap<String, u64> = store
            .list("packs")?
            .into_iter()
            .map(|o| (o.name, o.size))
            .collect();
        // A pack named by two index files (a prune interrupted between writing a rewritten
        // index file and deleting the old one) is one pack, checked once.
        let mut seen = HashSet::new();
        for (number, pack) in indexed.iter().enumerate() {
            if !seen.insert(pack.id) {
                continue;
            }
            let name = pack_name(&pack.id);
            self.report.packs += 1;
            let Some(size) = stored.remove(&name) else {
                self.pack_problem(number, pack, "missing");
                continue;
            };
            if size != pack.len {
                let problem = format!("{size} bytes long, the index says {}", pack.len);
                self.pack_problem(number, pack, problem);
                continue;
            }
            let header = pack::read_header_with(size, &self.repo.key().metadata, &name, |r| {
                read_range_aligned(store, &name, size, r)
            });
            match header {
                Ok((ephemeral, header))
                    if ephemeral == pack.data_ephemeral && header == pack.header => {}
                Ok(_) => {
                    self.pack_problem(number, pack, "its header does not agree with the index")
                }
                Err(e) => self.pack_problem(number, pack, e),
            }
        }
        self.report.unreferenced_packs = stored.len();
        Ok(())
    }

    fn snapshots(&mut self, index: &Index) -> Result<()> {
        let store = self.repo.store();
        let mut reader = FrameReader::new(self.repo, index);
        let markers: HashSet<String> = if self.repo.has_series_markers() {
            self.repo
                .markers()?
                .into_iter()
                .map(|(_, o)| o.name)
                .collect()
        } else {
            HashSet::new()
        };
        for object in store.list("snapshots")? {
            self.report.snapshots += 1;
            let entry = match self.repo.read_snapshot_named(&object.name) {
                Ok(entry) => entry,
                Err(e) => {
                    self.problem(&object.name, e);
                    continue;
                }
            };
            if self.repo.has_series_markers()
                && !markers.contains(&self.repo.marker_of(&entry.id, &entry.snapshot))
            {
                self.report.problems.push(Problem {
                    object: object.name.clone(),
                    problem: "it has no series marker, so `latest` and --tag do not find it (written by an older bkp during an upgrade?): run `bkp upgrade` to add it".to_string(),
                    snapshots: vec![entry.id.to_hex()],
                });
            }
            let mut packs = BTreeSet::new();
            let mut missing = 0u64;
            let mut base_error = None;
            let walked = for_each_chunk(
                self.repo,
                index,
                &mut reader,
                &entry.snapshot.tree,
                &mut |id, is_node| match index.chunk(&id) {
                    Some(loc) => {
                        packs.insert(index.frame(loc.frame).pack);
                        match bases_of(index, loc.frame) {
                            Ok(bases) => packs.extend(bases.iter().map(|&b| index.frame(b).pack)),
                            Err(e) => {
                                base_error.get_or_insert(e);
                            }
                        }
                    }
                    // A missing node stops the walk and is reported as its error.
                    None if !is_node => missing += 1,
                    None => {}
                },
            );
            let walk_error = walked.err().or(base_error);
            let snapshot = entry.id.to_hex();
            if missing > 0 {
                let problem = format!("{missing} of its chunks are in no index (missing data)");
                self.report.problems.push(Problem {
                    object: object.name.clone(),
                    problem,
                    snapshots: vec![snapshot.clone()],
                });
            }
            if let Some(e) = walk_error {
                self.report.problems.push(Problem {
                    object: object.name.clone(),
                    problem: format!("its chunk tree cannot be read: {e}"),
                    snapshots: vec![snapshot],
                });
            }
            for pack in packs {
                self.packs_used_by.entry(pack).or_default().insert(entry.id);
            }
        }
        Ok(())
    }

    fn data(&mut self, index: &Index, indexed: &[IndexedPack], read_data: ReadData) -> Result<()> {
        let sample_key = {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key)
                .map_err(|e| Error::Internal(format!("no randomness: {e}")))?;
            key
        };
        let selected = |frame: u32| match read_data {
            ReadData::None => false,
            ReadData::All => true,
            ReadData::Fraction(f) => {
                let h = blake3::keyed_hash(&sample_key, &frame.to_le_bytes());
                let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
                (x as f64) < f * u64::MAX as f64
            }
        };
        let mut reader = FrameReader::new(self.repo, index);
        let bases_cache = BaseCache::new(4);
        let mut dictionary = Vec::new();
        let mut raw = Vec::new();
        let mut frame_number = 0u32;
        for (pack_number, pack) in indexed.iter().enumerate() {
            // A marked pack that no snapshot uses is garbage waiting for the next prune, which
            // may already have deleted the bases of its delta frames (an interrupted prune).
            let garbage = self.marked.contains(&pack.id)
                && !self.packs_used_by.contains_key(&(pack_number as u32));
            for entry in &pack.header.frames {
                let frame = frame_number;
                frame_number += 1;
                if garbage || !selected(frame) {
                    continue;
                }
                self.report.frames_read += 1;
                let decoded = bases_of(index, frame)
                    .and_then(|bases| bases_cache.dictionary(&mut reader, bases, &mut dictionary))
                    .and_then(|()| reader.read(frame, &dictionary, std::mem::take(&mut raw)));
                let decoded = match decoded {
                    Ok(decoded) => decoded,
                    Err(e) => {
                        self.pack_problem(pack_number, pack, e);
                        continue;
                    }
                };
                let mut at = 0usize;
                let mut wrong = 0;
                for chunk in &entry.chunks {
                    let bytes = decoded.get(at..at + chunk.len as usize);
                    if bytes.is_none_or(|b| self.repo.key().chunk_id(b) != chunk.id) {
                        wrong += 1;
                    }
                    at += chunk.len as usize;
                }
                if wrong > 0 {
                    let problem = format!(
                        "frame {} holds {wrong} chunks that do not match their ids",
                        index.frame(frame).number_in_pack
                    );
                    self.pack_problem(pack_number, pack, problem);
                }
                raw = decoded;
            }
        }
        Ok(())
    }

    /// Names the snapshots behind each pack problem.
    fn finish(mut self) -> CheckReport {
        for (pack, mut problem) in std::mem::take(&mut self.pack_problems) {
            problem.snapshots = self
                .packs_used_by
                .get(&pack)
                .map(|ids| ids.iter().map(Id::to_hex).collect())
                .unwrap_or_default();
            self.report.problems.push(problem);
        }
        self.report
    }
}
