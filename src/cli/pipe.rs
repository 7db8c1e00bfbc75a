//! Writing a restore into a pipe (`bkp restore ... | psql`, a drill's command) without the
//! writer and the reader taking turns a page at a time.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

/// The pipe buffer a restore asks for (Linux's default limit for an unprivileged process,
/// /proc/sys/fs/pipe-max-size).
const PIPE_BYTES: usize = 1 << 20;

/// The buffer in front of a restore's output. A restore writes the chunks that lie together in
/// a frame in one write (~80 KB on average on the real pair); this buffer only gathers the
/// short ones, the rest go past it uncopied. A 1 MiB buffer copied every byte once more: 3 % of
/// a restore's CPU.
pub(crate) const WRITE_BUFFER: usize = 64 << 10;

/// The longest wait between two looks at a full pipe: a reader that slow (a database building
/// indexes) is not kept waiting by it, and the writer wakes ~500 times a second.
const MOST_PATIENCE: Duration = Duration::from_millis(2);

/// Output that writes into a pipe only what fits: once the pipe is full, a plain write sleeps
/// until the reader frees a page, copies a page, and sleeps again, so writer and reader switch
/// for every few KiB the reader takes (50,000 switches for a 1 GB restore into `openssl dgst`).
/// This one waits until the pipe has room for half its size (or the whole write) and writes
/// what fits: 16,000 switches, 8-15 % less of the restore's CPU. Anything but a pipe is
/// written to as it is.
pub(crate) struct PipeWriter<W: Write + AsFd> {
    inner: W,
    /// The pipe's size, if `inner` is a pipe whose fill can be read.
    pipe: Option<usize>,
}

impl<W: Write + AsFd> PipeWriter<W> {
    /// Asks for a pipe buffer of [`PIPE_BYTES`] if `inner` is a pipe. With the default 64 KiB,
    /// the writer would wait for the reader every 32 KiB. Nothing changes if the system
    /// refuses (a lower limit, or not Linux).
    pub(crate) fn new(inner: W) -> Self {
        let pipe = grow_pipe(inner.as_fd().as_raw_fd());
        PipeWriter { inner, pipe }
    }

    /// Waits until the pipe has room for `wanted` bytes (at most half the pipe), and returns
    /// the room; or returns at once when the reader has gone, for the write to fail.
    fn room(&self, size: usize, wanted: usize) -> usize {
        let wanted = wanted.min(size / 2);
        let mut patience = Duration::from_micros(50);
        loop {
            let Some(queued) = queued(self.inner.as_fd().as_raw_fd()) else {
                return wanted;
            };
            let room = size.saturating_sub(queued);
            if room >= wanted || reader_gone(self.inner.as_fd().as_raw_fd()) {
                return room.max(1);
            }
            std::thread::sleep(patience);
            patience = (patience * 2).min(MOST_PATIENCE);
        }
    }
}

impl<W: Write + AsFd> Write for PipeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.pipe {
            Some(size) if !buf.is_empty() => {
                let room = self.room(size, buf.len());
                self.inner.write(&buf[..buf.len().min(room)])
            }
            _ => self.inner.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Grows the pipe `fd` is (if it is one) and returns its size, if its fill can be read.
#[cfg(target_os = "linux")]
fn grow_pipe(fd: i32) -> Option<usize> {
    // SAFETY: fstat and fcntl on a descriptor we hold, with a valid out-pointer.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut stat) != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFIFO {
            return None;
        }
        libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_BYTES as libc::c_int);
        let size = libc::fcntl(fd, libc::F_GETPIPE_SZ);
        (size > 0 && queued(fd).is_some()).then_some(size as usize)
    }
}

#[cfg(not(target_os = "linux"))]
fn grow_pipe(_fd: i32) -> Option<usize> {
    None
}

/// The bytes waiting in the pipe `fd`.
#[cfg(target_os = "linux")]
fn queued(fd: i32) -> Option<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD on a descriptor we hold, with a valid out-pointer.
    let done = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) };
    (done == 0).then_some(queued.max(0) as usize)
}

#[cfg(not(target_os = "linux"))]
fn queued(_fd: i32) -> Option<usize> {
    None
}

/// Whether the pipe `fd` writes into has no reader left (`restore | head` once head is done).
#[cfg(target_os = "linux")]
fn reader_gone(fd: i32) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

#[cfg(not(target_os = "linux"))]
fn reader_gone(_fd: i32) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A pipe, as (reader, writer).
    fn pipe() -> (std::fs::File, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: a valid array of two descriptors, each then owned by one File.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            use std::os::fd::FromRawFd;
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    #[test]
    fn everything_written_into_a_pipe_arrives_in_order() {
        let (mut reader, writer) = pipe();
        let data: Vec<u8> = (0..5_000_000u32).map(|n| (n * 7 % 251) as u8).collect();
        let expected = data.clone();
        let writing = std::thread::spawn(move || {
            let mut out = PipeWriter::new(writer);
            assert!(out.pipe.is_some(), "a pipe is seen as one");
            for piece in data.chunks(300_000) {
                out.write_all(piece).unwrap();
            }
        });
        let mut got = Vec::new();
        // A slow reader, a little at a time: the writer waits for room.
        let mut buffer = [0u8; 8192];
        loop {
            let n = reader.read(&mut buffer).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buffer[..n]);
        }
        writing.join().unwrap();
        assert!(got == expected);
    }

    #[test]
    fn a_pipe_whose_reader_is_gone_fails_the_write_rather_than_wait() {
        let (reader, writer) = pipe();
        let mut out = PipeWriter::new(writer);
        // Fill the pipe, then let the reader go: the next write must not wait for room.
        let size = out.pipe.expect("a pipe");
        out.inner.write_all(&vec![1u8; size]).unwrap();
        drop(reader);
        let error = out.write_all(&[2u8; 100_000]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
    }
}
