//! Input streams. [`Prefetch`] starts draining a reader at once, on its own thread, so that a
//! dump program writing into our stdin never stalls while the repository is being opened, and
//! so that read system calls overlap with chunking.

use std::io::{self, Read};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, bounded};

const BLOCK: usize = 1 << 20;

/// A reader fed by a background thread through a bounded queue of blocks.
pub struct Prefetch {
    blocks: Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
    _thread: JoinHandle<()>,
}

impl Prefetch {
    /// Starts reading `source`; at most `blocks` MiB are read ahead.
    pub fn spawn(mut source: impl Read + Send + 'static, blocks: usize) -> Prefetch {
        let (tx, rx) = bounded(blocks.max(1));
        let thread = std::thread::spawn(move || {
            loop {
                let mut block = vec![0u8; BLOCK];
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
                if filled > 0 && tx.send(Ok(block)).is_err() {
                    return;
                }
                if let Err(e) = result {
                    let _ = tx.send(Err(e));
                    return;
                }
                if at_end {
                    return;
                }
            }
        });
        Prefetch {
            blocks: rx,
            current: Vec::new(),
            pos: 0,
            done: false,
            _thread: thread,
        }
    }
}

impl Read for Prefetch {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.blocks.recv() {
                Ok(Ok(block)) => {
                    self.current = block;
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
