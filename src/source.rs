//! Input streams, read on a thread of their own.
//!
//! A [`Source`] starts draining its reader the moment it is created, so a dump program writing
//! into our stdin never stalls while the repository is being opened. The same thread hashes the
//! whole stream and inspects the dump's header and trailer, off the chunker's thread.

use std::io::{self, Read};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::dump::{DumpInfo, DumpInspector, DumpReport};

/// Read size. Blocks small enough to stay in a core's cache between the read and the hashing
/// made the whole day-1 backup 10 % cheaper in CPU than 1 MiB blocks (docs/PERFORMANCE.md):
/// the kernel's copy into the block alone went from 10 % of the profile to 2 %.
const BLOCK: usize = 256 << 10;

type Block = io::Result<Vec<u8>>;

/// The writing end of a block queue: full blocks go out, read ones come back for reuse (fresh
/// allocations cost page faults on every block).
pub(crate) struct BlockSender {
    blocks: Sender<Block>,
    spare: Receiver<Vec<u8>>,
}

/// Reads `source` in blocks into `blocks`, calling `inspect` on each, until the end, an error,
/// or the receiving side hanging up.
pub(crate) fn pump(mut source: impl Read, queue: BlockSender, mut inspect: impl FnMut(&[u8])) {
    let BlockSender { blocks, spare } = queue;
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
        inspect(&block);
        if filled > 0 && blocks.send(Ok(block)).is_err() {
            return;
        }
        if let Err(e) = result {
            let _ = blocks.send(Err(e));
            return;
        }
        if at_end {
            return;
        }
    }
}

/// The reading end of a [`pump`].
pub(crate) struct BlockReader {
    blocks: Receiver<Block>,
    spare: Sender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
}

/// A bounded queue of `capacity` blocks between a pump and a reader.
pub(crate) fn block_queue(capacity: usize) -> (BlockSender, BlockReader) {
    let (tx, rx) = bounded(capacity.max(1));
    // Room for every block there is, so none is freed and allocated again: the pump allocates
    // only when no spare is waiting, which bounds the blocks to `capacity + 2`.
    let (spare_tx, spare_rx) = bounded(capacity.max(1) + 2);
    let reader = BlockReader {
        blocks: rx,
        spare: spare_tx,
        current: Vec::new(),
        pos: 0,
        done: false,
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
                    let used = std::mem::replace(&mut self.current, block);
                    let _ = self.spare.try_send(used);
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
}

impl Source {
    /// Starts reading `reader` on a thread of its own.
    pub fn spawn(reader: impl Read + Send + 'static) -> Source {
        let (block_tx, blocks) = block_queue(READ_AHEAD_BLOCKS);
        let (detected_tx, detected) = bounded(1);
        let (facts_tx, facts) = bounded(1);
        std::thread::spawn(move || {
            let mut hasher = blake3::Hasher::new();
            let mut inspector = DumpInspector::default();
            let mut size = 0u64;
            pump(reader, block_tx, |block| {
                hasher.update(block);
                size += block.len() as u64;
                if let Some(info) = inspector.observe(block) {
                    let _ = detected_tx.try_send(info.clone());
                }
            });
            let _ = facts_tx.send(StreamFacts {
                size,
                hash: *hasher.finalize().as_bytes(),
                dump: inspector.finish(),
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
