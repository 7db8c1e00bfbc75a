//! Walking a snapshot's chunk tree outside restore (check, stats): every chunk id in stream
//! order, and every tree node, read and verified against its id on the way.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{ChunkLocation, ChunkTable, IdPrefix, Index, id_prefix};
use crate::pack_reader::FrameReader;
use crate::repo::Repository;
use crate::spill::{Record, Sorter, join};
use crate::tree::{TreeRoot, TreeWalker};

/// Calls `visit(id, is_tree_node)` for every tree node (before reading it, so a caller learns
/// which packs a snapshot needs even when one is damaged) and every chunk of the stream. Tree
/// nodes are found by `locate` (check knows where they are from [`walk_trees`] and holds no
/// other chunks); one that is not found or does not verify is an error; stream chunks are
/// only visited, so the caller decides what a missing one means.
pub fn for_each_chunk(
    repo: &Repository,
    locate: &dyn Fn(&Id) -> Option<ChunkLocation>,
    reader: &mut FrameReader<'_>,
    tree: &TreeRoot,
    visit: &mut dyn FnMut(Id, bool),
) -> Result<()> {
    // Nodes are stored together, a few frames per snapshot: keep the last one decoded.
    let mut node_frame: Option<(u32, Vec<u8>)> = None;
    let nodes_read = std::cell::RefCell::new(Vec::new());
    let mut fetch_node = |id: &Id| -> Result<Vec<u8>> {
        nodes_read.borrow_mut().push(*id);
        let object = || format!("tree node {}", id.short());
        let loc = locate(id).ok_or_else(|| Error::Missing { object: object() })?;
        if node_frame.as_ref().is_none_or(|(f, _)| *f != loc.frame) {
            node_frame = Some((loc.frame, reader.read(loc.frame, &[], Vec::new())?));
        }
        let (_, raw) = node_frame.as_ref().expect("just read");
        let node = raw
            .get(loc.offset as usize..(loc.offset + loc.len) as usize)
            .filter(|node| repo.key().chunk_id(node) == *id)
            .ok_or_else(|| Error::corrupt(object(), "decodes to other content"))?;
        Ok(node.to_vec())
    };
    let mut walker = TreeWalker::new(tree);
    loop {
        let next = walker.next_id(&mut fetch_node);
        for node in nodes_read.borrow_mut().drain(..) {
            visit(node, true);
        }
        match next? {
            Some(id) => visit(id, false),
            None => return Ok(()),
        }
    }
}

/// A chunk that snapshot number `snapshot` (in the caller's order) reads: sorted on disk and
/// joined with a [`ChunkTable`], these say which snapshots use which chunks (stats, and check
/// when something is damaged) without a table of chunks in memory.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChunkUse {
    pub prefix: IdPrefix,
    pub snapshot: u32,
}

impl Record for ChunkUse {
    const LEN: usize = 20;
    fn encode(&self, out: &mut [u8]) {
        out[..16].copy_from_slice(&self.prefix);
        out[16..].copy_from_slice(&self.snapshot.to_be_bytes());
    }
    fn decode(bytes: &[u8]) -> Self {
        ChunkUse {
            prefix: bytes[..16].try_into().expect("16 bytes"),
            snapshot: u32::from_be_bytes(bytes[16..20].try_into().expect("4 bytes")),
        }
    }
}

/// A chunk that some snapshot's tree names, met once by [`walk_trees`] however many trees name
/// it: a tree node (whole id) or a stream chunk (id prefix, as the index keeps it), and where
/// the index places it (`None`: in no index).
#[derive(Clone, Copy, Debug)]
pub enum Reached {
    Node(Id, Option<ChunkLocation>),
    Data(IdPrefix, Option<ChunkLocation>),
}

/// A tree node that could not be read: what is below it was not walked.
#[derive(Clone, Debug)]
pub struct NodeProblem {
    pub id: Id,
    pub error: String,
    /// In no index (otherwise: unreadable or not what its id says).
    pub missing: bool,
}

impl NodeProblem {
    pub fn into_error(self) -> Error {
        let object = format!("tree node {}", self.id.short());
        if self.missing {
            Error::Missing { object }
        } else {
            Error::corrupt(object, self.error)
        }
    }
}

/// A located tree node, in frame order for reading.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct NodeAt {
    location: ChunkLocation,
    id: Id,
}

impl Record for NodeAt {
    const LEN: usize = 44;
    fn encode(&self, out: &mut [u8]) {
        let l = &self.location;
        for (n, value) in [l.frame, l.offset, l.len].iter().enumerate() {
            out[4 * n..4 * n + 4].copy_from_slice(&value.to_be_bytes());
        }
        out[12..].copy_from_slice(&self.id.0);
    }
    fn decode(bytes: &[u8]) -> Self {
        let number = |n: usize| u32::from_be_bytes(bytes[4 * n..4 * n + 4].try_into().expect("4"));
        NodeAt {
            location: ChunkLocation {
                frame: number(0),
                offset: number(1),
                len: number(2),
            },
            id: Id::from_slice(&bytes[12..]).expect("32 bytes"),
        }
    }
}

/// Walks every tree of `trees` at once, level by level from the top, calling `reached` once for
/// each distinct node and stream chunk, and returns the nodes that could not be read.
///
/// Memory does not grow with the trees or the repository: each level's ids are sorted on disk
/// ([`crate::spill`]) and joined with the sorted chunk table, and a level's nodes are read in
/// frame order, each frame once. Nodes that several trees (or several places of one) share are
/// read once: a repository of 30 nightly 100 GB dumps is walked in the time of about one.
pub fn walk_trees(
    repo: &Repository,
    index: &Index,
    chunks: &ChunkTable,
    trees: &mut dyn Iterator<Item = Result<TreeRoot>>,
    reached: &mut dyn FnMut(Reached) -> Result<()>,
) -> Result<Vec<NodeProblem>> {
    walk_trees_in(
        crate::spill::sort_memory(),
        repo,
        index,
        chunks,
        trees,
        reached,
    )
}

fn walk_trees_in(
    memory: usize,
    repo: &Repository,
    index: &Index,
    chunks: &ChunkTable,
    trees: &mut dyn Iterator<Item = Result<TreeRoot>>,
    reached: &mut dyn FnMut(Reached) -> Result<()>,
) -> Result<Vec<NodeProblem>> {
    let mut levels: Vec<Option<Sorter<[u8; 32]>>> = Vec::new();
    let mut data: Sorter<IdPrefix> = Sorter::new(memory, true);
    let push = |levels: &mut Vec<Option<Sorter<[u8; 32]>>>,
                data: &mut Sorter<IdPrefix>,
                height: u8,
                id: Id|
     -> Result<()> {
        if height == 0 {
            return data.push(id_prefix(&id));
        }
        let height = height as usize;
        if levels.len() <= height {
            levels.resize_with(height + 1, || None);
        }
        levels[height]
            .get_or_insert_with(|| Sorter::new(memory, true))
            .push(id.0)
    };
    for tree in trees {
        let tree = tree?;
        for id in &tree.ids {
            push(&mut levels, &mut data, tree.height, *id)?;
        }
    }
    let mut problems = Vec::new();
    let mut reader = FrameReader::new(repo, index);
    for height in (1..levels.len()).rev() {
        let Some(nodes) = levels[height].take() else {
            continue;
        };
        let nodes = nodes.finish()?;
        let mut located: Sorter<NodeAt> = Sorter::new(memory, false);
        join(
            nodes.scan(),
            chunks.scan(),
            |node| id_prefix(&Id(*node)),
            |chunk| chunk.prefix,
            |node, hit| {
                let id = Id(node);
                reached(Reached::Node(id, hit.map(|c| c.location)))?;
                match hit {
                    Some(chunk) => located.push(NodeAt {
                        location: chunk.location,
                        id,
                    }),
                    None => {
                        problems.push(NodeProblem {
                            id,
                            error: "in no index".into(),
                            missing: true,
                        });
                        Ok(())
                    }
                }
            },
        )?;
        drop(nodes);
        let mut frame: Option<(u32, std::result::Result<Vec<u8>, String>)> = None;
        for node in located.finish()?.scan() {
            let NodeAt { location, id } = node?;
            if frame.as_ref().is_none_or(|(f, _)| *f != location.frame) {
                let raw = reader
                    .read(location.frame, &[], Vec::new())
                    .map_err(|e| e.to_string());
                frame = Some((location.frame, raw));
            }
            let bytes = match &frame.as_ref().expect("just read").1 {
                Ok(raw) => raw
                    .get(location.offset as usize..(location.offset + location.len) as usize)
                    .filter(|node| repo.key().chunk_id(node) == id)
                    .ok_or_else(|| "decodes to other content".to_string()),
                Err(e) => Err(e.clone()),
            };
            let whole = |bytes: &[u8]| !bytes.is_empty() && bytes.len().is_multiple_of(Id::LEN);
            let bytes = match bytes {
                Ok(bytes) if whole(bytes) => bytes,
                failed => {
                    let error = failed
                        .err()
                        .unwrap_or_else(|| "its length is not a whole number of ids".to_string());
                    problems.push(NodeProblem {
                        id,
                        error,
                        missing: false,
                    });
                    continue;
                }
            };
            for child in bytes.chunks_exact(Id::LEN).filter_map(Id::from_slice) {
                push(&mut levels, &mut data, height as u8 - 1, child)?;
            }
        }
    }
    let data = data.finish()?;
    join(
        data.scan(),
        chunks.scan(),
        |prefix| *prefix,
        |chunk| chunk.prefix,
        |prefix, hit| reached(Reached::Data(prefix, hit.map(|c| c.location))),
    )?;
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;
    use crate::{BackupOptions, Source};

    #[test]
    fn walking_all_trees_at_once_meets_what_walking_each_meets_once_each() {
        // Small chunks, so that 6 MB make trees three levels high.
        let options = crate::repo::InitOptions {
            kdf: crate::crypto::KdfParams::INSECURE_FAST,
            chunker: crate::chunker::ChunkerParams {
                min_size: 64,
                avg_size: 256,
                max_size: 1024,
            },
            chunking_keys: None,
        };
        let repo = Repository::init(crate::store::Store::memory(), b"pw", &options).unwrap();
        let small = BackupOptions {
            group_size: 64 << 10,
            pack_size: 256 << 10,
            ..BackupOptions::default()
        };
        let mut data = vec![0u8; 6_000_000];
        let mut trees = Vec::new();
        for day in 0..3u8 {
            blake3::Hasher::new_keyed(&[day / 2; 32])
                .finalize_xof()
                .fill(&mut data);
            data[day as usize * 1000..][..100].fill(day);
            let source = Source::spawn(std::io::Cursor::new(data.clone()));
            let summary = crate::backup(&repo, source, &small, &mut |_| {}).unwrap();
            trees.push(summary.snapshot.snapshot.tree);
        }
        let index = repo.load_index().unwrap();
        let mut reader = FrameReader::new(&repo, &index);
        let (mut nodes, mut data_chunks) = (HashSet::new(), HashSet::new());
        for tree in &trees {
            for_each_chunk(
                &repo,
                &|id| index.chunk(id),
                &mut reader,
                tree,
                &mut |id, node| {
                    if node {
                        nodes.insert(id);
                    } else {
                        data_chunks.insert(id_prefix(&id));
                    }
                },
            )
            .unwrap();
        }
        assert!(
            trees.iter().any(|t| t.height >= 2),
            "{:?}",
            trees.iter().map(|t| t.height)
        );
        assert!(nodes.len() > 100 && data_chunks.len() > 20_000);
        let (chunkless, table) = repo.spilled_index_with_last(&HashSet::new()).unwrap();
        for memory in [0, 1 << 30] {
            let mut met_nodes = HashMap::new();
            let mut met_data = HashMap::new();
            let mut roots = trees.iter().cloned().map(Ok);
            let problems = walk_trees_in(memory, &repo, &chunkless, &table, &mut roots, &mut |r| {
                match r {
                    Reached::Node(id, at) => {
                        assert_eq!(at, index.chunk(&id));
                        *met_nodes.entry(id).or_insert(0) += 1;
                    }
                    Reached::Data(prefix, at) => {
                        // The index looks chunks up by prefix alone.
                        let id = Id::from_slice(&[prefix, [0; 16]].concat()).unwrap();
                        assert_eq!(at, index.chunk(&id));
                        *met_data.entry(prefix).or_insert(0) += 1;
                    }
                }
                Ok(())
            })
            .unwrap();
            assert!(problems.is_empty());
            assert_eq!(met_nodes.keys().copied().collect::<HashSet<_>>(), nodes);
            assert_eq!(
                met_data.keys().copied().collect::<HashSet<_>>(),
                data_chunks
            );
            assert!(met_nodes.values().chain(met_data.values()).all(|&n| n == 1));
        }
    }
}
