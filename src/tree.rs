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

/// One step of a path down the tree from its root to a stream chunk: which entry of the root or
/// node, and the place of what that entry names (a node's first stream chunk, or the chunk's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeStep {
    pub index: u32,
    pub place: u64,
}

/// Where a stream chunk will be in a tree still being built ([`TreeBuilder::cursor`]): its
/// steps from the bottom up, for the levels that exist so far.
#[derive(Clone, Debug, Default)]
pub struct TreeCursor(Vec<TreeStep>);

impl TreeCursor {
    /// The path from the root of the finished tree (of `root.height`) down to the chunk: the
    /// levels made after the cursor was taken hold its ancestors as their first entries.
    pub fn path(&self, root: &TreeRoot) -> Vec<TreeStep> {
        let levels = usize::from(root.height) + 1;
        let mut steps = self.0.clone();
        let top_place = steps.last().map_or(0, |s| s.place);
        while steps.len() < levels {
            steps.push(TreeStep {
                index: 0,
                place: top_place,
            });
        }
        steps.truncate(levels);
        steps.reverse();
        steps
    }
}

impl TreeBuilder {
    /// Where stream chunk `place`, about to be pushed, will be: for each level so far, its
    /// index in the open node there, and the place of its ancestor at that level.
    pub fn cursor(&self, place: u64) -> TreeCursor {
        let mut steps = Vec::with_capacity(self.levels.len() + 1);
        let mut element_place = place;
        for (pending, start) in &self.levels {
            steps.push(TreeStep {
                index: pending.len() as u32,
                place: element_place,
            });
            // The node of the next level up: the open one, or one this element starts.
            if !pending.is_empty() {
                element_place = *start;
            }
        }
        // The first element of a level not made yet.
        steps.push(TreeStep {
            index: 0,
            place: element_place,
        });
        TreeCursor(steps)
    }

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
    stack: Vec<Level>,
}

/// A node (or the root) being walked: its ids, the next one to take, its height.
struct Level {
    /// `None` for the root.
    node: Option<Id>,
    ids: Vec<Id>,
    pos: usize,
    height: u8,
}

/// The ids a node's bytes hold.
fn node_ids(id: &Id, bytes: &[u8]) -> Result<Vec<Id>> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(Id::LEN) {
        return Err(Error::corrupt(
            format!("tree node {}", id.short()),
            format!("length {} is not a whole number of ids", bytes.len()),
        ));
    }
    Ok(bytes
        .chunks_exact(Id::LEN)
        .filter_map(Id::from_slice)
        .collect())
}

impl TreeWalker {
    pub fn new(root: &TreeRoot) -> TreeWalker {
        TreeWalker {
            stack: vec![Level {
                node: None,
                ids: root.ids.clone(),
                pos: 0,
                height: root.height,
            }],
        }
    }

    pub fn next_id(
        &mut self,
        fetch_node: &mut impl FnMut(&Id) -> Result<Vec<u8>>,
    ) -> Result<Option<Id>> {
        loop {
            let Some(level) = self.stack.last_mut() else {
                return Ok(None);
            };
            let Some(&id) = level.ids.get(level.pos) else {
                self.stack.pop();
                continue;
            };
            level.pos += 1;
            if level.height == 0 {
                return Ok(Some(id));
            }
            let height = level.height - 1;
            let ids = node_ids(&id, &fetch_node(&id)?)?;
            self.stack.push(Level {
                node: Some(id),
                ids,
                pos: 0,
                height,
            });
        }
    }

    /// Moves to the stream chunk at the end of `path` (from the root of `root`), so that
    /// [`TreeWalker::next_id`] returns it next and the chunks after it then. Only the nodes on
    /// the path that the walker does not hold already are fetched, each with its place.
    pub fn seek(
        &mut self,
        root: &TreeRoot,
        path: &[TreeStep],
        fetch_node: &mut impl FnMut(&Id, u64) -> Result<Vec<u8>>,
    ) -> Result<()> {
        let bad_path =
            |why: &str| Error::corrupt("a table of contents' tree path", why.to_string());
        if path.len() != usize::from(root.height) + 1 {
            return Err(bad_path("its length is not the tree's height"));
        }
        let mut stack = Vec::with_capacity(path.len());
        let (mut node, mut ids) = (None, root.ids.clone());
        for (depth, step) in path.iter().enumerate() {
            let height = root.height - depth as u8;
            let index = step.index as usize;
            let Some(&child) = ids.get(index) else {
                return Err(bad_path("it goes past the end of a node"));
            };
            if height == 0 {
                stack.push(Level {
                    node,
                    ids,
                    pos: index,
                    height,
                });
                break;
            }
            let held = self
                .stack
                .get(depth + 1)
                .filter(|level| level.node == Some(child))
                .map(|level| level.ids.clone());
            let child_ids = match held {
                Some(child_ids) => child_ids,
                None => node_ids(&child, &fetch_node(&child, step.place)?)?,
            };
            stack.push(Level {
                node,
                ids: std::mem::replace(&mut ids, child_ids),
                pos: index + 1,
                height,
            });
            node = Some(child);
        }
        self.stack = stack;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn build(ids: &[Id], nodes: &mut HashMap<Id, Vec<u8>>) -> TreeRoot {
        build_placed(ids, nodes, &mut HashMap::new(), |_, _| {})
    }

    /// Also records each node's place, and shows the builder to `before_push` before each
    /// chunk is pushed.
    fn build_placed(
        ids: &[Id],
        nodes: &mut HashMap<Id, Vec<u8>>,
        places: &mut HashMap<Id, u64>,
        mut before_push: impl FnMut(&TreeBuilder, usize),
    ) -> TreeRoot {
        let mut store = |bytes: Vec<u8>, place: u64| {
            let id = Id(*blake3::hash(&bytes).as_bytes());
            nodes.insert(id, bytes);
            places.insert(id, place);
            Ok(id)
        };
        let mut builder = TreeBuilder::default();
        for (place, id) in ids.iter().enumerate() {
            before_push(&builder, place);
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

    /// A path taken while building leads a walker to its chunk, fetching each node at its own
    /// place and only the nodes it does not hold; walking on from there gives the chunks after.
    #[test]
    fn a_cursor_taken_while_building_leads_a_walker_to_its_chunk() {
        for n in [1, 64, 65, 1000, 70_000] {
            let (mut nodes, mut places) = (HashMap::new(), HashMap::new());
            let list = ids(n, 5);
            let targets: Vec<usize> = [0, 1, n / 3, n / 2, n.saturating_sub(2), n - 1]
                .into_iter()
                .filter(|&t| t < n)
                .collect();
            let mut cursors = Vec::new();
            let root = build_placed(&list, &mut nodes, &mut places, |builder, place| {
                if targets.contains(&place) {
                    cursors.push((place, builder.cursor(place as u64)));
                }
            });
            let mut walker = TreeWalker::new(&root);
            let mut fetched = 0;
            for (place, cursor) in &cursors {
                let path = cursor.path(&root);
                assert_eq!(path.len(), usize::from(root.height) + 1);
                assert_eq!(path.last().unwrap().place, *place as u64);
                walker
                    .seek(&root, &path, &mut |id, at| {
                        assert_eq!(places[id], at, "n = {n}: a node fetched at its place");
                        fetched += 1;
                        Ok(nodes[id].clone())
                    })
                    .unwrap();
                for expected in &list[*place..(*place + 3).min(n)] {
                    let got = walker.next_id(&mut |id| Ok(nodes[id].clone())).unwrap();
                    assert_eq!(got, Some(*expected), "n = {n}, place {place}");
                }
            }
            assert!(
                fetched <= cursors.len() * usize::from(root.height),
                "n = {n}"
            );
        }
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
            let root = build_placed(&list, &mut nodes, &mut places, |_, _| {});
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
