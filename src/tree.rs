//! A snapshot's chunk list as a hash tree whose nodes are themselves deduplicated chunks.
//!
//! A 1 GB dump in 16 KiB chunks has ~65,000 chunk ids (2 MB). Storing that list in the snapshot
//! would make an unchanged dump cost megabytes; stored as a tree it costs nothing new, because
//! every node dedups. A node is the concatenation of its children's 32-byte ids. A node closes
//! after a child id whose first four bytes, read as a little-endian u32, are `0xff` modulo 256
//! (ids are keyed hashes, so on average every 256th id), or at [`MAX_NODE_IDS`]. Splitting on
//! the ids themselves keeps an edit's effect local: only the nodes above a changed chunk change.
//! The snapshot keeps the top level (at most [`MAX_ROOT_IDS`] ids) and the tree's height.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::Id;

pub const MAX_NODE_IDS: usize = 1024;
pub const MAX_ROOT_IDS: usize = 64;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeRoot {
    /// 0: `ids` are data chunks; n: `ids` are nodes whose children are at height n - 1.
    pub height: u8,
    pub ids: Vec<Id>,
}

fn closes_node(id: &Id) -> bool {
    u32::from_le_bytes(id.0[..4].try_into().expect("4 bytes")) % 256 == 255
}

fn node_bytes(ids: &[Id]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.0).collect()
}

/// Builds the tree as chunk ids stream in. `store_node` stores a node's bytes as a chunk and
/// returns its id; it is also told the node's *place*: the number of the first stream chunk
/// below it, which is where a restore walking the tree reads the node (`snapshot::ChunkSpan`).
#[derive(Default)]
pub struct TreeBuilder {
    /// Per level: the ids of the open node, and its place.
    levels: Vec<(Vec<Id>, u64)>,
}

impl TreeBuilder {
    /// Adds stream chunk number `place`.
    pub fn push(
        &mut self,
        id: Id,
        place: u64,
        store_node: &mut impl FnMut(Vec<u8>, u64) -> Result<Id>,
    ) -> Result<()> {
        let (mut id, mut place) = (id, place);
        let mut level = 0;
        loop {
            if self.levels.len() == level {
                self.levels.push((Vec::new(), place));
            }
            let (pending, start) = &mut self.levels[level];
            if pending.is_empty() {
                *start = place;
            }
            pending.push(id);
            if !closes_node(&id) && pending.len() < MAX_NODE_IDS {
                return Ok(());
            }
            let node = node_bytes(pending);
            pending.clear();
            place = *start;
            id = store_node(node, place)?;
            level += 1;
        }
    }

    pub fn finish(
        mut self,
        store_node: &mut impl FnMut(Vec<u8>, u64) -> Result<Id>,
    ) -> Result<TreeRoot> {
        let mut level = 0;
        loop {
            let is_top = level + 1 >= self.levels.len();
            let (pending, start) = self
                .levels
                .get_mut(level)
                .map(|(ids, start)| (std::mem::take(ids), *start))
                .unwrap_or_default();
            if is_top && pending.len() <= MAX_ROOT_IDS {
                return Ok(TreeRoot {
                    height: level as u8,
                    ids: pending,
                });
            }
            if !pending.is_empty() {
                let id = store_node(node_bytes(&pending), start)?;
                if self.levels.len() == level + 1 {
                    self.levels.push((Vec::new(), start));
                }
                let (above, above_start) = &mut self.levels[level + 1];
                if above.is_empty() {
                    *above_start = start;
                }
                above.push(id);
            }
            level += 1;
        }
    }
}

/// Walks a tree's data chunk ids in order, fetching nodes as it goes (depth-first, so memory is
/// one node per level).
pub struct TreeWalker {
    stack: Vec<(Vec<Id>, usize, u8)>,
}

impl TreeWalker {
    pub fn new(root: &TreeRoot) -> TreeWalker {
        TreeWalker {
            stack: vec![(root.ids.clone(), 0, root.height)],
        }
    }

    pub fn next_id(
        &mut self,
        fetch_node: &mut impl FnMut(&Id) -> Result<Vec<u8>>,
    ) -> Result<Option<Id>> {
        loop {
            let Some((ids, pos, height)) = self.stack.last_mut() else {
                return Ok(None);
            };
            let Some(&id) = ids.get(*pos) else {
                self.stack.pop();
                continue;
            };
            *pos += 1;
            if *height == 0 {
                return Ok(Some(id));
            }
            let child_height = *height - 1;
            let bytes = fetch_node(&id)?;
            if bytes.is_empty() || bytes.len() % Id::LEN != 0 {
                return Err(Error::corrupt(
                    format!("tree node {}", id.short()),
                    format!("length {} is not a whole number of ids", bytes.len()),
                ));
            }
            let children = bytes
                .chunks_exact(Id::LEN)
                .filter_map(Id::from_slice)
                .collect();
            self.stack.push((children, 0, child_height));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn build(ids: &[Id], nodes: &mut HashMap<Id, Vec<u8>>) -> TreeRoot {
        build_placed(ids, nodes, &mut HashMap::new())
    }

    /// Also records each node's place.
    fn build_placed(
        ids: &[Id],
        nodes: &mut HashMap<Id, Vec<u8>>,
        places: &mut HashMap<Id, u64>,
    ) -> TreeRoot {
        let mut store = |bytes: Vec<u8>, place: u64| {
            let id = Id(*blake3::hash(&bytes).as_bytes());
            nodes.insert(id, bytes);
            places.insert(id, place);
            Ok(id)
        };
        let mut builder = TreeBuilder::default();
        for (place, id) in ids.iter().enumerate() {
            builder.push(*id, place as u64, &mut store).unwrap();
        }
        builder.finish(&mut store).unwrap()
    }

    fn walk(root: &TreeRoot, nodes: &HashMap<Id, Vec<u8>>) -> Vec<Id> {
        let mut walker = TreeWalker::new(root);
        let mut out = Vec::new();
        while let Some(id) = walker.next_id(&mut |id| Ok(nodes[id].clone())).unwrap() {
            out.push(id);
        }
        out
    }

    fn ids(n: usize, salt: u8) -> Vec<Id> {
        (0..n)
            .map(|i| Id(*blake3::hash(&[&i.to_le_bytes()[..], &[salt]].concat()).as_bytes()))
            .collect()
    }

    #[test]
    fn walks_back_what_was_built_at_every_size() {
        for n in [0, 1, 64, 65, 255, 1000, 50_000] {
            let mut nodes = HashMap::new();
            let list = ids(n, 0);
            let root = build(&list, &mut nodes);
            assert!(root.ids.len() <= MAX_ROOT_IDS);
            assert_eq!(walk(&root, &nodes), list, "n = {n}");
        }
    }

    #[test]
    fn a_node_is_placed_at_the_first_stream_chunk_below_it() {
        for n in [1, 65, 1000, 50_000] {
            let (mut nodes, mut places) = (HashMap::new(), HashMap::new());
            let list = ids(n, 3);
            let root = build_placed(&list, &mut nodes, &mut places);
            // Walk the tree as a restore does, noting where each node is read.
            let mut walker = TreeWalker::new(&root);
            let mut emitted = 0u64;
            let mut read_at = Vec::new();
            loop {
                let next = walker.next_id(&mut |id| {
                    read_at.push((*id, emitted));
                    Ok(nodes[id].clone())
                });
                match next.unwrap() {
                    Some(_) => emitted += 1,
                    None => break,
                }
            }
            assert_eq!(read_at.len(), nodes.len(), "n = {n}");
            for (id, at) in read_at {
                assert_eq!(places[&id], at, "n = {n}");
            }
        }
    }

    #[test]
    fn a_local_edit_changes_few_nodes() {
        let mut day1 = HashMap::new();
        let list = ids(50_000, 0);
        build(&list, &mut day1);
        let mut edited = list.clone();
        edited[25_000] = ids(1, 7)[0];
        let mut day2 = HashMap::new();
        build(&edited, &mut day2);
        let new_nodes = day2.keys().filter(|k| !day1.contains_key(k)).count();
        assert!(
            new_nodes <= 4,
            "{new_nodes} of {} nodes changed",
            day2.len()
        );
    }
}
