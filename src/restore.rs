//! Restore: a snapshot out to a writer, verified end to end.
//!
//! ```text
//! planner thread: walk the chunk tree ─ locate each chunk ─ one job per run of chunks in a frame
//! workers:        aligned ranged read of the pack ─ open ─ decompress ─ re-check every chunk id
//! this thread:    write the chunks in order ─ hash the whole stream ─ compare with the snapshot
//! ```
//! Jobs complete out of order but are consumed in order through a bounded queue of one-shot
//! receivers, which is also the read-ahead limit (and so the memory bound).
//! Reads are aligned to [`READ_ALIGNMENT`] so the store does not learn exact frame boundaries.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::crypto::CipherKey;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::pack;
use crate::repo::{Repository, pack_name};
use crate::snapshot::SnapshotEntry;
use crate::tree::TreeWalker;

pub const READ_ALIGNMENT: u64 = 64 * 1024;
const READ_AHEAD_FRAMES: usize = 8;

#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreProgress {
    pub bytes_written: u64,
    pub size: u64,
}

#[derive(Clone, Debug)]
pub struct RestoreSummary {
    pub bytes_written: u64,
    pub elapsed: Duration,
}

/// A run of chunks to cut from one frame.
struct Job {
    frame: u32,
    slices: Vec<(Id, u32, u32)>,
}

struct Decoded {
    raw: Vec<u8>,
    slices: Vec<(Id, u32, u32)>,
}

/// Reads and decodes frames; each worker keeps its own session keys and zstd context.
struct FrameReader<'a> {
    repo: &'a Repository,
    index: &'a Index,
    session_keys: HashMap<[u8; 32], CipherKey>,
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl<'a> FrameReader<'a> {
    fn new(repo: &'a Repository, index: &'a Index) -> FrameReader<'a> {
        FrameReader {
            repo,
            index,
            session_keys: HashMap::new(),
            decompressor: zstd::bulk::Decompressor::new().expect("zstd context"),
        }
    }

    fn read(&mut self, frame_number: u32) -> Result<Vec<u8>> {
        let frame = *self.index.frame(frame_number);
        let pack = self.index.pack(frame.pack);
        let name = pack_name(&pack.id);
        let end = frame.offset + frame.sealed_len as u64;
        if end > pack.len {
            return Err(Error::corrupt(
                format!("index entry for {name}"),
                "frame lies outside the pack",
            ));
        }
        let aligned_start = frame.offset / READ_ALIGNMENT * READ_ALIGNMENT;
        let aligned_end = end.div_ceil(READ_ALIGNMENT) * READ_ALIGNMENT;
        let bytes = self
            .repo
            .store()
            .get_range(&name, aligned_start..aligned_end.min(pack.len))?;
        let start = (frame.offset - aligned_start) as usize;
        let sealed = bytes
            .get(start..start + frame.sealed_len as usize)
            .ok_or_else(|| Error::corrupt(&name, "shorter than the index says"))?;
        let key = match self.session_keys.get(&pack.data_ephemeral) {
            Some(key) => key,
            None => {
                let key = self
                    .repo
                    .key()
                    .data
                    .session(&pack.data_ephemeral)
                    .ok_or_else(|| {
                        Error::corrupt(format!("index entry for {name}"), "invalid session key")
                    })?;
                self.session_keys.entry(pack.data_ephemeral).or_insert(key)
            }
        };
        pack::open_frame(
            &mut self.decompressor,
            key,
            sealed,
            frame.raw_len as usize,
            &name,
        )
    }

    /// Decodes a job's frame and checks that every slice hashes to its chunk id.
    fn decode(&mut self, job: Job) -> Result<Decoded> {
        let raw = self.read(job.frame)?;
        for &(id, offset, len) in &job.slices {
            let chunk = raw
                .get(offset as usize..(offset + len) as usize)
                .ok_or_else(|| {
                    Error::corrupt(format!("chunk {}", id.short()), "lies outside its frame")
                })?;
            if self.repo.key().chunk_id(chunk) != id {
                let pack = self.index.pack(self.index.frame(job.frame).pack);
                return Err(Error::corrupt(
                    pack_name(&pack.id),
                    format!("chunk {} decodes to other content", id.short()),
                ));
            }
        }
        Ok(Decoded {
            raw,
            slices: job.slices,
        })
    }
}

type Pending = Receiver<Result<Decoded>>;

/// Walks the tree and queues jobs; the queue of receivers keeps the output order.
fn plan(
    repo: &Repository,
    index: &Index,
    entry: &SnapshotEntry,
    jobs: Sender<(Job, Sender<Result<Decoded>>)>,
    ordered: Sender<Result<Pending>>,
) {
    let mut nodes = FrameReader::new(repo, index);
    let mut node_frames: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut fetch_node = |id: &Id| -> Result<Vec<u8>> {
        let loc = index.chunk(id).ok_or_else(|| Error::Missing {
            object: format!("tree node {} of snapshot {}", id.short(), entry.id.short()),
        })?;
        if !node_frames.iter().any(|(f, _)| *f == loc.frame) {
            let decoded = nodes.decode(Job {
                frame: loc.frame,
                slices: vec![(*id, loc.offset, loc.len)],
            })?;
            if node_frames.len() == 4 {
                node_frames.remove(0);
            }
            node_frames.push((loc.frame, decoded.raw));
        }
        let (_, raw) = node_frames
            .iter()
            .find(|(f, _)| *f == loc.frame)
            .expect("just cached");
        let node = &raw[loc.offset as usize..(loc.offset + loc.len) as usize];
        if repo.key().chunk_id(node) != *id {
            return Err(Error::corrupt(
                format!("tree node {}", id.short()),
                "decodes to other content",
            ));
        }
        Ok(node.to_vec())
    };
    let send = |job: Job| -> bool {
        let (tx, rx) = bounded(1);
        ordered.send(Ok(rx)).is_ok() && jobs.send((job, tx)).is_ok()
    };
    let mut walker = TreeWalker::new(&entry.snapshot.tree);
    let mut current: Option<Job> = None;
    loop {
        let id = match walker.next_id(&mut fetch_node) {
            Ok(Some(id)) => id,
            Ok(None) => break,
            Err(e) => {
                let _ = ordered.send(Err(e));
                return;
            }
        };
        let Some(loc) = index.chunk(&id) else {
            let _ = ordered.send(Err(Error::Missing {
                object: format!("chunk {} of snapshot {}", id.short(), entry.id.short()),
            }));
            return;
        };
        match &mut current {
            Some(job) if job.frame == loc.frame => job.slices.push((id, loc.offset, loc.len)),
            _ => {
                if let Some(job) = current.replace(Job {
                    frame: loc.frame,
                    slices: vec![(id, loc.offset, loc.len)],
                }) && !send(job)
                {
                    return;
                }
            }
        }
    }
    if let Some(job) = current {
        send(job);
    }
}

/// Restores `entry` into `out`. Fails if any byte does not verify; `out` may then hold a prefix.
pub fn restore(
    repo: &Repository,
    entry: &SnapshotEntry,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(&RestoreProgress),
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let index = repo.load_index()?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let size = entry.snapshot.size;
    let mut written = 0u64;
    let mut hasher = blake3::Hasher::new();

    std::thread::scope(|scope| -> Result<()> {
        let (job_tx, job_rx) = bounded::<(Job, Sender<Result<Decoded>>)>(READ_AHEAD_FRAMES);
        let (ordered_tx, ordered_rx) = bounded::<Result<Pending>>(READ_AHEAD_FRAMES);
        for _ in 0..threads {
            let jobs = job_rx.clone();
            let (repo, index) = (repo, &index);
            scope.spawn(move || {
                let mut reader = FrameReader::new(repo, index);
                for (job, reply) in jobs {
                    let _ = reply.send(reader.decode(job));
                }
            });
        }
        drop(job_rx);
        scope.spawn(|| plan(repo, &index, entry, job_tx, ordered_tx));

        let mut next_report = 0u64;
        for pending in ordered_rx {
            let decoded = pending?
                .recv()
                .map_err(|_| Error::Internal("restore worker stopped".into()))??;
            for (_, offset, len) in &decoded.slices {
                let chunk = &decoded.raw[*offset as usize..(*offset + *len) as usize];
                out.write_all(chunk).map_err(Error::Sink)?;
                hasher.update(chunk);
                written += chunk.len() as u64;
            }
            if written >= next_report {
                next_report = written + (8 << 20);
                progress(&RestoreProgress {
                    bytes_written: written,
                    size,
                });
            }
        }
        Ok(())
    })?;
    out.flush().map_err(Error::Sink)?;
    progress(&RestoreProgress {
        bytes_written: written,
        size,
    });

    let object = format!("snapshot {}", entry.id.short());
    if written != size {
        return Err(Error::corrupt(
            object,
            format!("restored {written} bytes, expected {size}"),
        ));
    }
    if hasher.finalize().as_bytes() != &entry.snapshot.stream_hash {
        return Err(Error::corrupt(
            object,
            "the restored stream's BLAKE3 hash does not match",
        ));
    }
    Ok(RestoreSummary {
        bytes_written: written,
        elapsed: started.elapsed(),
    })
}
