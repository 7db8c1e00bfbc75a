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

/// Blocks of read-ahead: 2 MiB, to absorb the chunker's jitter. 8 MiB ran no faster and cost
/// 6 MiB of peak RSS. A longer pause (opening a large repository) stalls the dump program for
/// as long whatever the queue's size; seconds are harmless (a dump server's write timeout is
/// a minute by default).
const READ_AHEAD_BLOCKS: usize = 8;

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

/// How a dump command failed: the reason no snapshot is recorded for its output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandFailed {
    /// The command line, with passwords removed.
    pub command: String,
    /// `exited with status 1`, `was killed by signal 9`.
    pub status: String,
    /// Its last lines of stderr.
    pub stderr_tail: Vec<String>,
}

impl std::fmt::Display for CommandFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dump command `{}` {}", self.command, self.status)?;
        if !self.stderr_tail.is_empty() {
            write!(f, ": {}", self.stderr_tail.join(" | "))?;
        }
        Ok(())
    }
}

impl std::error::Error for CommandFailed {}

const STDERR_TAIL_LINES: usize = 5;

/// A dump program run by bkp (no shell), read through its stdout. Its stderr passes through to
/// ours. At the end of its output, a non-zero exit or a death by signal becomes a read error
/// ([`CommandFailed`]), so a failed dump can never be recorded as a snapshot.
pub struct DumpCommand {
    child: std::process::Child,
    stdout: std::process::ChildStdout,
    stderr: Option<std::thread::JoinHandle<Vec<String>>>,
    command: String,
    finished: bool,
}

impl DumpCommand {
    /// Starts the dump command. One that cannot be started (not installed, not on the PATH of
    /// a cron job, not executable) is a failed dump ([`crate::Error::DumpCommand`]: exit 7 in
    /// the CLI, which monitoring keys on), not a failure of bkp.
    pub fn spawn(argv: &[std::ffi::OsString]) -> crate::Result<DumpCommand> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| crate::Error::invalid("dump command", "none given after `--`"))?;
        let command = redact_command(argv);
        let mut child = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| {
                let hint = match e.kind() {
                    io::ErrorKind::NotFound => " (is it installed, and on the PATH bkp runs with?)",
                    io::ErrorKind::PermissionDenied => " (is it executable?)",
                    _ => "",
                };
                crate::Error::DumpCommand(CommandFailed {
                    command: command.clone(),
                    status: format!("could not be started: {e}{hint}"),
                    stderr_tail: Vec::new(),
                })
            })?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || pass_through(stderr));
        Ok(DumpCommand {
            child,
            stdout,
            stderr: Some(stderr),
            command,
            finished: false,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The command line as recorded: passwords removed.
    pub fn command(&self) -> &str {
        &self.command
    }

    fn wait(&mut self) -> io::Result<()> {
        self.finished = true;
        let status = self.child.wait()?;
        let stderr_tail = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        use std::os::unix::process::ExitStatusExt;
        let status = match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            (None, None) => status.to_string(),
        };
        Err(io::Error::other(CommandFailed {
            command: self.command.clone(),
            status,
            stderr_tail,
        }))
    }
}

impl Read for DumpCommand {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.finished {
            return Ok(0);
        }
        match self.stdout.read(buf) {
            Ok(0) => self.wait().map(|()| 0),
            other => other,
        }
    }
}

impl Drop for DumpCommand {
    /// A backup that stops early stops its dump command too.
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Copies a child's stderr to ours line by line, keeping the last few lines.
fn pass_through(stderr: impl Read) -> Vec<String> {
    use std::io::{BufRead, Write};
    let mut tail = std::collections::VecDeque::with_capacity(STDERR_TAIL_LINES);
    let mut reader = io::BufReader::new(stderr);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
        let _ = io::stderr().write_all(&line);
        let text = String::from_utf8_lossy(&line)
            .trim_end()
            .chars()
            .take(300)
            .collect::<String>();
        if !text.is_empty() {
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text);
        }
        line.clear();
    }
    tail.into()
}

/// A command line for display and for the snapshot, without the passwords operators put in
/// them: `--password=...`, MySQL's `-pSECRET`, and the password in `scheme://user:pass@host`.
pub fn redact_command(argv: &[std::ffi::OsString]) -> String {
    let program = argv
        .first()
        .map(|p| {
            std::path::Path::new(p)
                .file_name()
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let mysql_like = program.contains("mysql") || program.contains("mariadb");
    argv.iter()
        .map(|arg| {
            let arg = arg.to_string_lossy();
            let redacted = if let Some((flag, _)) = arg
                .split_once('=')
                .filter(|(f, _)| f.starts_with("--") && f.contains("password"))
            {
                format!("{flag}=***")
            } else if mysql_like && arg.starts_with("-p") && arg.len() > 2 {
                "-p***".to_string()
            } else {
                redact_url_password(&arg)
            };
            if redacted.contains(char::is_whitespace) || redacted.is_empty() {
                format!("'{redacted}'")
            } else {
                redacted
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn redact_url_password(arg: &str) -> String {
    let Some(scheme_end) = arg.find("://") else {
        return arg.to_string();
    };
    let authority_start = scheme_end + 3;
    let rest = &arg[authority_start..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return arg.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &arg[..authority_start],
            &rest[..colon],
            &rest[at..]
        ),
        None => arg.to_string(),
    }
}

#[cfg(test)]
mod command_tests {
    use super::*;
    use std::ffi::OsString;

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn passwords_never_reach_the_recorded_command() {
        assert_eq!(
            redact_command(&argv(&[
                "mysqldump",
                "-uroot",
                "-psecret",
                "--single-transaction",
                "shop"
            ])),
            "mysqldump -uroot -p*** --single-transaction shop"
        );
        assert_eq!(
            redact_command(&argv(&["pg_dump", "-p5432", "crm"])),
            "pg_dump -p5432 crm"
        );
        assert_eq!(
            redact_command(&argv(&["mariadb-dump", "--password=hunter2", "x"])),
            "mariadb-dump --password=*** x"
        );
        assert_eq!(
            redact_command(&argv(&[
                "pg_dump",
                "postgresql://app:s3cret@db:5432/crm?sslmode=require"
            ])),
            "pg_dump postgresql://app:***@db:5432/crm?sslmode=require"
        );
        assert_eq!(
            redact_command(&argv(&["sh", "-c", "echo hi"])),
            "sh -c 'echo hi'"
        );
    }

    #[test]
    fn a_failing_command_is_a_read_error_naming_status_and_stderr() {
        let mut cmd = DumpCommand::spawn(&argv(&[
            "sh",
            "-c",
            "echo partial; echo 'boom: no such database' >&2; exit 3",
        ]))
        .unwrap();
        let mut out = Vec::new();
        let err = cmd.read_to_end(&mut out).unwrap_err();
        assert_eq!(out, b"partial\n");
        let failed = err
            .get_ref()
            .unwrap()
            .downcast_ref::<CommandFailed>()
            .unwrap();
        assert_eq!(failed.status, "exited with status 3");
        assert_eq!(failed.stderr_tail, vec!["boom: no such database"]);

        let mut killed = DumpCommand::spawn(&argv(&["sh", "-c", "echo x; kill -9 $$"])).unwrap();
        let err = killed.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("killed by signal 9"), "{err}");

        let mut ok = DumpCommand::spawn(&argv(&["printf", "hello"])).unwrap();
        let mut out = Vec::new();
        ok.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello");

        let missing = DumpCommand::spawn(&argv(&["/nonexistent/pg_dump"]))
            .err()
            .unwrap();
        assert!(matches!(missing, crate::Error::DumpCommand(_)), "{missing}");
        let message = missing.to_string();
        assert!(message.contains("could not be started"), "{message}");
        assert!(message.contains("is it installed"), "{message}");
    }
}
