//! Input streams, read ahead on a thread of their own.
//!
//! [`Prefetch`] starts draining a reader at once, so that a dump program writing into our stdin
//! never stalls while the repository is being opened. The backup pipeline uses the same pump to
//! read and hash the whole stream on one thread while the chunker works on another.

use std::io::{self, Read};

use crossbeam_channel::{Receiver, Sender, bounded};

const BLOCK: usize = 1 << 20;

type Block = io::Result<Vec<u8>>;

/// The writing end of a block queue: full blocks go out, read ones come back for reuse (fresh
/// allocations of 1 MiB cost page faults on every block).
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

/// A bounded queue of `capacity` blocks (1 MiB each) between a pump and a reader.
pub(crate) fn block_queue(capacity: usize) -> (BlockSender, BlockReader) {
    let (tx, rx) = bounded(capacity.max(1));
    let (spare_tx, spare_rx) = bounded(2);
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

/// A reader fed by a background thread that starts reading immediately.
pub struct Prefetch(BlockReader);

impl Prefetch {
    /// Starts reading `source`; at most `blocks` MiB are read ahead.
    pub fn spawn(source: impl Read + Send + 'static, blocks: usize) -> Prefetch {
        let (tx, reader) = block_queue(blocks);
        std::thread::spawn(move || pump(source, tx, |_| {}));
        Prefetch(reader)
    }
}

impl Read for Prefetch {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_yields_the_stream_unchanged() {
        let data: Vec<u8> = (0..3 * BLOCK + 17).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        Prefetch::spawn(io::Cursor::new(data.clone()), 2)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn prefetch_passes_on_read_errors() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let mut out = Vec::new();
        let err = Prefetch::spawn(Failing, 2)
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(err.to_string().contains("disk on fire"));
    }
}
