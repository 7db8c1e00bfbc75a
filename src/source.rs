//! Input streams, read on a thread of their own.
//!
//! A [`Source`] starts draining its reader the moment it is created, so a dump program writing
//! into our stdin never stalls while the repository is being opened. The same thread hashes the
//! whole stream, inspects the dump's header and trailer and reads its table of contents, off
//! the chunker's thread.

use std::io::{self, Read};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::dump::{DumpInfo, DumpInspector, DumpReport};
use crate::toc::{Section, TocReader};

/// Read size. Blocks small enough to stay in a core's cache between the read and the hashing
/// made the whole day-1 backup 10 % cheaper in CPU than 1 MiB blocks (docs/PERFORMANCE.md):
/// the kernel's copy into the block alone went from 10 % of the profile to 2 %.
const BLOCK: usize = 256 << 10;

/// Bytes read, with the stream offsets at which a chunk must end that were found up to then
/// (where the dump's sections start, [`crate::toc`]).
struct Block {
    bytes: Vec<u8>,
    cuts: Vec<u64>,
}

/// The writing end of a block queue: full blocks go out, read ones come back for reuse (fresh
/// allocations cost page faults on every block).
pub(crate) struct BlockSender {
    blocks: Sender<io::Result<Block>>,
    spare: Receiver<Vec<u8>>,
}

/// What the reading thread does with the stream besides passing it on.
pub(crate) trait Inspect {
    /// Looks at the next block; returns the cuts found in it or before.
    fn block(&mut self, block: &[u8]) -> Vec<u64>;
    /// The stream has ended: the cuts found only now.
    fn end(&mut self) -> Vec<u64>;
}

/// Reads `source` in blocks into `blocks`, showing each to `inspect`, until the end, an error,
/// or the receiving side hanging up. A block is passed on once the next one has been inspected
/// too: a cut at a line that starts near a block's end is known only from the next block, and
/// the chunker must know every cut in a block before it cuts there.
pub(crate) fn pump(mut source: impl Read, queue: BlockSender, inspect: &mut impl Inspect) {
    let BlockSender { blocks, spare } = queue;
    let mut held: Option<Vec<u8>> = None;
    let mut cuts = Vec::new();
    let pass_on = |block: Vec<u8>, cuts: &mut Vec<u64>| {
        let cuts = std::mem::take(cuts);
        blocks.send(Ok(Block { bytes: block, cuts })).is_ok()
    };
    loop {
        let mut block = spare.try_recv().unwrap_or_default();
        block.resize(BLOCK, 0);
        let mut filled = 0;
        let result = loop {
            match source.read(&mut block[filled..]) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    filled += n;
                    if filled == BLOCK {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        block.truncate(filled);
        let at_end = filled < BLOCK;
        cuts.extend(inspect.block(&block));
        if let Some(previous) = held.take()
            && !pass_on(previous, &mut cuts)
        {
            return;
        }
        if filled > 0 {
            held = Some(block);
        }
        if let Err(e) = result {
            if let Some(last) = held.take() {
                pass_on(last, &mut cuts);
            }
            let _ = blocks.send(Err(e));
            return;
        }
        if at_end {
            cuts.extend(inspect.end());
            if let Some(last) = held.take() {
                pass_on(last, &mut cuts);
            }
            return;
        }
    }
}

/// The reading end of a [`pump`].
pub(crate) struct BlockReader {
    blocks: Receiver<io::Result<Block>>,
    spare: Sender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
    /// Cuts received and not yet taken ([`crate::chunker::ChunkInput`]).
    cuts: Vec<u64>,
}

/// A bounded queue of `capacity` blocks between a pump and a reader.
pub(crate) fn block_queue(capacity: usize) -> (BlockSender, BlockReader) {
    let (tx, rx) = bounded(capacity.max(1));
    // Room for every block there is, so none is freed and allocated again: the pump allocates
    // only when no spare is waiting, which bounds the blocks to `capacity + 3` (one held back).
    let (spare_tx, spare_rx) = bounded(capacity.max(1) + 3);
    let reader = BlockReader {
        blocks: rx,
        spare: spare_tx,
        current: Vec::new(),
        pos: 0,
        done: false,
        cuts: Vec::new(),
    };
    let sender = BlockSender {
        blocks: tx,
        spare: spare_rx,
    };
    (sender, reader)
}

impl Read for BlockReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.blocks.recv() {
                Ok(Ok(block)) => {
                    let used = std::mem::replace(&mut self.current, block.bytes);
                    let _ = self.spare.try_send(used);
                    self.cuts.extend(block.cuts);
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl crate::chunker::ChunkInput for BlockReader {
    fn take_cuts(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.cuts)
    }
}

/// Blocks of read-ahead: 1 MiB, to absorb the chunker's jitter (2 MiB ran no faster, 8 MiB
/// cost 6 MiB of peak RSS). A longer pause (opening a large repository) stalls the dump program
/// for as long whatever the queue's size; seconds are harmless (a dump server's write timeout
/// is a minute by default).
const READ_AHEAD_BLOCKS: usize = 4;

/// The stream to back up, already being read.
pub struct Source {
    blocks: BlockReader,
    detected: Receiver<DumpInfo>,
    facts: Receiver<StreamFacts>,
}

/// What the reading thread learned, once the stream has ended.
pub(crate) struct StreamFacts {
    pub size: u64,
    pub hash: [u8; 32],
    pub dump: DumpReport,
    /// The dump's table of contents, for the kinds that have one.
    pub toc: Option<Vec<Section>>,
}

/// The reading thread's work on each block: the stream's hash and size, the dump's header
/// and trailer, and its table of contents.
struct Reading {
    hasher: blake3::Hasher,
    inspector: DumpInspector,
    toc: Option<TocReader>,
    /// The table of contents, once the stream has ended.
    sections: Option<Vec<Section>>,
    size: u64,
    detected: Sender<DumpInfo>,
}

impl Inspect for Reading {
    fn block(&mut self, block: &[u8]) -> Vec<u64> {
        self.hasher.update(block);
        self.size += block.len() as u64;
        if let Some(info) = self.inspector.observe(block) {
            self.toc = TocReader::for_dump(info.kind);
            let _ = self.detected.try_send(info.clone());
        }
        match &mut self.toc {
            Some(toc) => {
                toc.feed(block);
                toc.take_starts()
            }
            None => Vec::new(),
        }
    }

    fn end(&mut self) -> Vec<u64> {
        // (Sections finish once the facts are sent; a last line may start one only now.)
        match &mut self.toc {
            Some(toc) => {
                let sections = toc.finish();
                let cuts = toc.take_starts();
                self.sections = Some(sections);
                cuts
            }
            None => Vec::new(),
        }
    }
}

impl Source {
    /// Starts reading `reader` on a thread of its own.
    pub fn spawn(reader: impl Read + Send + 'static) -> Source {
        let (block_tx, blocks) = block_queue(READ_AHEAD_BLOCKS);
        let (detected_tx, detected) = bounded(1);
        let (facts_tx, facts) = bounded(1);
        std::thread::spawn(move || {
            let mut reading = Reading {
                hasher: blake3::Hasher::new(),
                inspector: DumpInspector::default(),
                toc: None,
                sections: None,
                size: 0,
                detected: detected_tx,
            };
            pump(reader, block_tx, &mut reading);
            let _ = facts_tx.send(StreamFacts {
                size: reading.size,
                hash: *reading.hasher.finalize().as_bytes(),
                toc: reading.sections,
                dump: reading.inspector.finish(),
            });
        });
        Source {
            blocks,
            detected,
            facts,
        }
    }

    /// The stream's bytes; what the header said, as soon as it is known; and, after the end of
    /// the stream, its size, hash and the dump's verdict.
    pub(crate) fn into_parts(self) -> (BlockReader, Receiver<DumpInfo>, Receiver<StreamFacts>) {
        (self.blocks, self.detected, self.facts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_yields_the_stream_unchanged_with_its_hash() {
        let data: Vec<u8> = (0..3 * BLOCK + 17).map(|i| (i % 251) as u8).collect();
        let (mut blocks, _, facts) = Source::spawn(io::Cursor::new(data.clone())).into_parts();
        let mut out = Vec::new();
        blocks.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        let facts = facts.recv().unwrap();
        assert_eq!(facts.size, data.len() as u64);
        assert_eq!(&facts.hash, blake3::hash(&data).as_bytes());
    }

    #[test]
    fn a_source_passes_on_read_errors() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let (mut blocks, _, _) = Source::spawn(Failing).into_parts();
        let err = blocks.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("disk on fire"));
    }
}
