//! Walking a snapshot's chunk tree outside restore (check, stats): every chunk id in stream
//! order, and every tree node, read and verified against its id on the way.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::pack_reader::FrameReader;
use crate::repo::Repository;
use crate::tree::{TreeRoot, TreeWalker};

/// Calls `visit(id, is_tree_node)` for every tree node (before reading it, so a caller learns
/// which packs a snapshot needs even when one is damaged) and every chunk of the stream. A tree
/// node that is not indexed or does not verify is an error; stream chunks are only visited, so
/// the caller decides what a missing one means.
pub fn for_each_chunk(
    repo: &Repository,
    index: &Index,
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
        let loc = index
            .chunk(id)
            .ok_or_else(|| Error::Missing { object: object() })?;
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
