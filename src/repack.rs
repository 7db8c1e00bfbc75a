//! Repack: copies the frames that snapshots still need out of packs that are mostly unneeded,
//! so that prune can delete those packs (docs/FORMAT.md §10).
//!
//! Frames are copied as they are: opened with their old pack's session key and sealed with a
//! new one, never decompressed. A base frame keeps its old names in the new pack's header
//! (`PackHeader::moved`), because delta frames stored before the move name their bases that
//! way, and their own pack headers are immutable.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::frame::{self, Frame, FrameRef};
use crate::index::{Index, IndexedPack};
use crate::pack::{self, PACK_SIZE, PackSession, PackWriter};
use crate::repo::{Repository, pack_name};

/// A pack to repack: its number in the index and the frames (numbers in the pack) to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PackToRepack {
    pub pack: u32,
    pub keep: Vec<u32>,
    /// The sealed bytes of the frames kept.
    pub keep_bytes: u64,
}

/// The packs in which frames that no snapshot needs (`needed[frame]` false) take at least
/// `threshold` (0..=1) of the frame bytes, among those that hold some needed frame and are not
/// `excluded`. A pack that the index names twice (a prune interrupted between writing an index
/// file and deleting the one it replaces) is left for a later prune.
pub(crate) fn plan(
    index: &Index,
    needed: &[bool],
    excluded: &dyn Fn(u32) -> bool,
    threshold: f64,
) -> Vec<PackToRepack> {
    #[derive(Default)]
    struct Usage {
        bytes: u64,
        needed_bytes: u64,
        keep: Vec<u32>,
    }
    let mut usage: Vec<Usage> = (0..index.pack_count()).map(|_| Usage::default()).collect();
    for (number, &is_needed) in needed.iter().enumerate() {
        let frame = index.frame(number as u32);
        let pack = &mut usage[frame.pack as usize];
        pack.bytes += u64::from(frame.sealed_len);
        if is_needed {
            pack.needed_bytes += u64::from(frame.sealed_len);
            pack.keep.push(frame.number_in_pack);
        }
    }
    let mut times_named: HashMap<_, u32> = HashMap::new();
    for pack in index.packs() {
        *times_named.entry(pack.id).or_default() += 1;
    }
    usage
        .into_iter()
        .enumerate()
        .filter(|(number, pack)| {
            let unneeded = (pack.bytes - pack.needed_bytes) as f64;
            pack.needed_bytes > 0
                && unneeded >= threshold * pack.bytes as f64
                && times_named[&index.pack(*number as u32).id] == 1
                && !excluded(*number as u32)
        })
        .map(|(number, pack)| PackToRepack {
            pack: number as u32,
            keep: pack.keep,
            keep_bytes: pack.needed_bytes,
        })
        .collect()
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Repacked {
    pub frames: usize,
    /// Bytes of the new packs and their index file.
    pub bytes_written: u64,
}

/// Copies the frames each planned pack keeps into new packs and indexes them (durably, before
/// anything is marked or deleted). Memory: one old pack and one new pack.
pub(crate) fn repack(repo: &Repository, index: &Index, plan: &[PackToRepack]) -> Result<Repacked> {
    let store = repo.store();
    let key = repo.key();
    let session = PackSession::new(key);
    let mut written: Vec<IndexedPack> = Vec::new();
    let mut report = Repacked::default();
    let mut writer = PackWriter::new(&session, PACK_SIZE);
    let mut store_pack = |writer: PackWriter, report: &mut Repacked| -> Result<()> {
        let (pack, bytes) = writer.finish(&session)?;
        report.bytes_written += pack.len;
        repo.wait_for_pack(repo.put_pack_soon(&pack.id, bytes))?;
        written.push(pack);
        Ok(())
    };
    for old in plan {
        let location = index.pack(old.pack);
        let name = pack_name(&location.id);
        let bytes = store.get(&name)?;
        let (data_ephemeral, header) = pack::read_header(&bytes, &key.metadata, &name)?;
        let old_key = key
            .data
            .session(&data_ephemeral)?
            .ok_or_else(|| Error::corrupt(&name, "invalid session key"))?;
        for &number in &old.keep {
            let entry = header
                .frames
                .get(number as usize)
                .ok_or_else(|| Error::corrupt(&name, "the index names a frame it lacks"))?;
            let sealed = usize::try_from(entry.offset)
                .ok()
                .and_then(|start| bytes.get(start..start + entry.sealed_len as usize))
                .ok_or_else(|| Error::corrupt(&name, "a frame lies outside the pack"))?;
            let moved_from: Vec<FrameRef> = if entry.bases.is_empty() {
                let here = FrameRef {
                    pack: location.id,
                    frame: number,
                };
                let earlier = header.moved.iter().filter(|m| m.frame == number);
                std::iter::once(here)
                    .chain(earlier.map(|m| m.from))
                    .collect()
            } else {
                Vec::new() // only base frames are named by other frames
            };
            let frame = Frame {
                sealed: frame::reseal(&old_key, &session.data_key, sealed, &name)?,
                chunks: entry.chunks.clone(),
                bases: entry.bases.clone(),
            };
            if writer.is_full_before(&frame, &moved_from) {
                let full = std::mem::replace(&mut writer, PackWriter::new(&session, PACK_SIZE));
                store_pack(full, &mut report)?;
            }
            writer.add(frame, &moved_from)?;
            report.frames += 1;
        }
    }
    if !writer.is_empty() {
        store_pack(writer, &mut report)?;
    }
    report.bytes_written += repo.commit_packs(written)?;
    Ok(report)
}
