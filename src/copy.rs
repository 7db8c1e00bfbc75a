//! Copy: snapshots of one repository into another (a second copy off site), the way `restic
//! copy` does it. Repositories have their own chunker and chunk-id keys, so a snapshot is copied
//! as its stream: restored from the source (verified as every restore is) straight into a backup
//! of the target, which chunks it with the target's keys and deduplicates it against the target's
//! previous snapshot of the series, as a nightly backup would. A copied snapshot keeps its time,
//! host, tags and name, and says where it came from (`copy.source`), which is how a rerun (after
//! a kill, or the next night) knows what the target has already.
//!
//! Repositories that share their chunking keys (`bkp init --copy-chunker-params-from`) cut a
//! stream into the same chunks with the same ids. Then the source's chunks go over as they are
//! ([`crate::restore::restore_chunks`] into a backup of [`CutChunks`]): the target first reads
//! what a backup of the series would deduplicate against, and the source reads only the chunks
//! that are not there; the others go over as ids. Each chunk read is checked against its id,
//! and an id names its content (a keyed hash), so the copy is the source's stream.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::backup::{BackupOptions, CutChunk, CutChunks, Input, backup, backup_from};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::repo::Repository;
use crate::restore::{restore, restore_chunks};
use crate::snapshot::SnapshotEntry;
use crate::source::Source;

/// The annotation naming a copied snapshot's origin: `<source repository id>/<snapshot id>`.
pub const SOURCE_ANNOTATION: &str = "copy.source";

/// What [`copy`] did.
#[derive(Clone, Debug, Default)]
pub struct CopySummary {
    /// (source snapshot, target snapshot, bytes added to the target), oldest first.
    pub copied: Vec<(Id, Id, u64)>,
    /// Snapshots the target had already.
    pub already_there: usize,
    /// Bytes of the streams copied.
    pub bytes_read: u64,
    pub elapsed: std::time::Duration,
}

/// One snapshot copied or found there already, as [`copy`] goes.
pub enum CopyEvent<'a> {
    Copied {
        source: &'a SnapshotEntry,
        target: Id,
        bytes_added: u64,
    },
}

fn origin(source: &Repository, entry: &SnapshotEntry) -> String {
    format!("{}/{}", source.config().repository_id, entry.id)
}

/// Copies `snapshots` of `source` (oldest first) into `target`, leaving out those the target
/// has already. `options` gives the target backups' compression and sizes; time, host, tags,
/// name and annotations come from each source snapshot.
pub fn copy(
    source: &Repository,
    target: &Repository,
    mut snapshots: Vec<SnapshotEntry>,
    options: &BackupOptions,
    progress: &mut dyn FnMut(CopyEvent<'_>),
) -> Result<CopySummary> {
    source.require_full_key("copy snapshots from it")?;
    target.require_full_key("copy snapshots into it")?;
    if source.config().repository_id == target.config().repository_id {
        return Err(Error::invalid(
            "copy",
            "the source and the target are the same repository",
        ));
    }
    let started = Instant::now();
    let there: HashSet<String> = target
        .snapshots(&[])?
        .into_iter()
        .filter_map(|entry| entry.snapshot.annotations.get(SOURCE_ANNOTATION).cloned())
        .collect();
    snapshots.sort_by(|a, b| a.snapshot.time.cmp(&b.snapshot.time).then(a.id.cmp(&b.id)));
    let mut summary = CopySummary::default();
    for entry in &snapshots {
        let origin = origin(source, entry);
        if there.contains(&origin) {
            summary.already_there += 1;
            continue;
        }
        let snapshot = &entry.snapshot;
        let mut annotations = snapshot.annotations.clone();
        annotations.insert(SOURCE_ANNOTATION.to_string(), origin);
        let options = BackupOptions {
            tags: snapshot.tags.clone(),
            hostname: Some(snapshot.hostname.clone()),
            name: snapshot.name.clone(),
            annotations,
            time: Some(snapshot.time),
            ..options.clone()
        };
        let copied = if source.shares_chunking_with(target) {
            copy_chunks(source, target, entry, &options)?
        } else {
            copy_stream(source, target, entry, &options)?
        };
        summary.bytes_read += snapshot.size;
        summary.copied.push((entry.id, copied.0, copied.1));
        progress(CopyEvent::Copied {
            source: entry,
            target: copied.0,
            bytes_added: copied.1,
        });
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Restores `entry` into a backup of `target`; returns the new snapshot's id and bytes added.
fn copy_stream(
    source: &Repository,
    target: &Repository,
    entry: &SnapshotEntry,
    options: &BackupOptions,
) -> Result<(Id, u64)> {
    let (tx, rx) = bounded::<Piece>(PIECES_AHEAD);
    std::thread::scope(|scope| {
        let restorer = scope.spawn(move || {
            let mut writer = PieceWriter(tx.clone());
            let restored = restore(source, entry, &mut writer, &mut |_| {});
            // The backup sees the stream's end only once the restore verified all of it; a
            // restore that failed ends the stream with an error, so nothing is recorded.
            let end = restored.as_ref().map(drop).map_err(|e| e.to_string());
            let _ = tx.send(Piece::End(end));
            restored
        });
        let backed_up = backup(
            target,
            Source::spawn(PieceReader::new(rx)),
            options,
            &mut |_| {},
        );
        let restored = restorer.join().expect("the restore does not panic");
        // The source's error is the cause when both failed.
        restored?;
        let summary = backed_up?;
        if summary.snapshot.snapshot.stream_hash != entry.snapshot.stream_hash {
            return Err(Error::Internal(format!(
                "the copy of snapshot {} in the target is not its stream (snapshot {} there: forget it)",
                entry.id.short(),
                summary.snapshot.id.short()
            )));
        }
        Ok((summary.snapshot.id, summary.bytes_stored))
    })
}

/// Copies `entry`'s chunks that `target` lacks, and names the others (repositories that share
/// chunking keys); returns the new snapshot's id and bytes added.
fn copy_chunks(
    source: &Repository,
    target: &Repository,
    entry: &SnapshotEntry,
    options: &BackupOptions,
) -> Result<(Id, u64)> {
    let known = Arc::new(target.index_for_copy(&entry.snapshot.tags)?);
    let (tx, rx) = bounded::<CutChunk>(CHUNKS_AHEAD);
    let target_stopped = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (known_here, target_stopped) = (known.clone(), &target_stopped);
        let restorer = scope.spawn(move || {
            let has = |id: &Id| known_here.chunk(id).map(|at| at.len);
            let restored = restore_chunks(source, entry, &has, &mut |id, len, bytes| {
                let bytes = bytes.map(<[u8]>::to_vec);
                tx.send(CutChunk::Chunk {
                    id: *id,
                    len,
                    bytes,
                })
                .map_err(|_| {
                    target_stopped.store(true, Ordering::Relaxed);
                    Error::Internal("the copy's target stopped".into())
                })
            });
            let end = restored.as_ref().map(drop).map_err(|e| e.to_string());
            let _ = tx.send(CutChunk::End(end));
            restored
        });
        let cut = CutChunks {
            chunks: rx,
            known,
            stream_hash: entry.snapshot.stream_hash,
            toc: entry.snapshot.toc.clone(),
        };
        let backed_up = backup_from(target, Input::Chunks(cut), options, &mut |_| {});
        let restored = restorer.join().expect("the restore does not panic");
        // The source's error is the cause when both failed, unless it failed because the
        // target stopped.
        if !target_stopped.load(Ordering::Relaxed) {
            restored?;
        }
        let summary = backed_up?;
        let copied = &summary.snapshot.snapshot;
        if copied.size != entry.snapshot.size {
            return Err(Error::Internal(format!(
                "the copy of snapshot {} in the target is not its stream (snapshot {} there: forget it)",
                entry.id.short(),
                summary.snapshot.id.short()
            )));
        }
        Ok((summary.snapshot.id, summary.bytes_stored))
    })
}

/// Chunks in flight from the source to the target (those read, up to a chunk's maximum size
/// each; most are ids).
const CHUNKS_AHEAD: usize = 256;

/// Writes of the restore in flight to the backup (each up to a restore's write, ~1 MiB).
const PIECES_AHEAD: usize = 8;

enum Piece {
    Data(Vec<u8>),
    /// The restore's end: `Ok` once the whole stream verified.
    End(std::result::Result<(), String>),
}

struct PieceWriter(Sender<Piece>);

impl Write for PieceWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .send(Piece::Data(buf.to_vec()))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct PieceReader {
    pieces: Receiver<Piece>,
    current: Vec<u8>,
    at: usize,
    ended: bool,
}

impl PieceReader {
    fn new(pieces: Receiver<Piece>) -> PieceReader {
        PieceReader {
            pieces,
            current: Vec::new(),
            at: 0,
            ended: false,
        }
    }
}

impl Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            if self.ended {
                return Ok(0);
            }
            match self.pieces.recv() {
                Ok(Piece::Data(data)) => (self.current, self.at) = (data, 0),
                Ok(Piece::End(Ok(()))) => self.ended = true,
                Ok(Piece::End(Err(e))) => {
                    return Err(std::io::Error::other(format!(
                        "the source's snapshot did not restore: {e}"
                    )));
                }
                Err(_) => {
                    return Err(std::io::Error::other("the source's restore stopped"));
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
