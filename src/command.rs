//! The dump command bkp runs itself (`bkp backup -- pg_dump crm`): started without a shell,
//! read through its stdout, its exit status checked at the end of its output.
//!
//! Secrets: a password on the dump command's command line is readable by every local user in
//! the process list (`/proc/PID/cmdline`, of bkp as of the dump program) for as long as the
//! dump runs, and would be recorded with the snapshot. So such a command is refused before
//! anything runs ([`password_in_command`]), naming the safe ways to pass it; and the dump
//! program never inherits bkp's own secrets (`BKP_*PASSWORD*`).

use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// How a dump command failed: the reason no snapshot is recorded for its output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandFailed {
    /// The command line as given (it holds no password: see [`password_in_command`]).
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
    /// Set (under the lock) before the child is reaped: see [`DumpStopper`].
    reaped: Arc<Mutex<bool>>,
    finished: bool,
}

/// Stops a running dump command from another thread (a signal handler's). It never signals a
/// child that was already reaped, whose pid the system may have given to another process.
#[derive(Clone)]
pub struct DumpStopper {
    pid: u32,
    reaped: Arc<Mutex<bool>>,
}

impl DumpStopper {
    /// Sends SIGTERM to the dump command, unless it has ended.
    pub fn stop(&self) {
        let reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped {
            // SAFETY: kill(2) on the pid of our own child, which cannot have been reaped while
            // we hold the lock that reaping takes first.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        }
    }
}

impl DumpCommand {
    /// Starts the dump command. One that carries a password is refused before it runs
    /// ([`Error::PasswordInCommand`]). One that cannot be started (not installed, not on the PATH of
    /// a cron job, not executable) is a failed dump ([`Error::DumpCommand`]: exit 7 in the
    /// CLI, which monitoring keys on), not a failure of bkp.
    pub fn spawn(argv: &[OsString]) -> Result<DumpCommand> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| Error::invalid("dump command", "none given after `--`"))?;
        if let Some(form) = password_in_command(argv) {
            return Err(Error::PasswordInCommand { form });
        }
        let command = display_command(argv);
        let mut process = std::process::Command::new(program);
        process
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        without_bkp_secrets(&mut process);
        let mut child = process.spawn().map_err(|e| {
            let hint = match e.kind() {
                io::ErrorKind::NotFound => " (is it installed, and on the PATH bkp runs with?)",
                io::ErrorKind::PermissionDenied => " (is it executable?)",
                _ => "",
            };
            Error::DumpCommand(CommandFailed {
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
            reaped: Arc::default(),
            finished: false,
        })
    }

    pub fn stopper(&self) -> DumpStopper {
        DumpStopper {
            pid: self.child.id(),
            reaped: self.reaped.clone(),
        }
    }

    /// The command line, for display and for the snapshot.
    pub fn command(&self) -> &str {
        &self.command
    }

    fn reap(&mut self) -> io::Result<std::process::ExitStatus> {
        *self.reaped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.child.wait()
    }

    fn wait(&mut self) -> io::Result<()> {
        self.finished = true;
        let status = self.reap()?;
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
            let _ = self.reap();
        }
    }
}

/// Removes bkp's own secrets (`BKP_PASSWORD`, `BKP_PASSWORD_FILE`, ... any `BKP_*PASSWORD*`)
/// from the environment a child process gets: a dump program or password command has no use
/// for them, and whatever it runs could log or leak them.
pub fn without_bkp_secrets(command: &mut std::process::Command) {
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy();
        if text.starts_with("BKP_") && text.contains("PASSWORD") {
            command.env_remove(&name);
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

/// The command line as one string, arguments with spaces quoted.
pub fn display_command(argv: &[OsString]) -> String {
    argv.iter()
        .map(|arg| {
            let arg = arg.to_string_lossy();
            if arg.contains(char::is_whitespace) || arg.is_empty() {
                format!("'{arg}'")
            } else {
                arg.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// How a command line carries a password, if it does (never the password itself): the option
/// forms of pg_dump, mysqldump and mariadb-dump (`--password X`, `--password=X`, `--pass=X`,
/// `-pX`), libpq connection strings (`password=X`), URLs (`scheme://user:X@host`,
/// `?password=X`), environment assignments (`env PGPASSWORD=X ...`, `MYSQL_PWD=X`), also
/// inside the script of `sh -c '...'` (every argument is also read word by word).
pub fn password_in_command(argv: &[OsString]) -> Option<&'static str> {
    let words: Vec<String> = argv
        .iter()
        .map(|arg| arg.to_string_lossy())
        .flat_map(|arg| {
            let mut words = vec![arg.to_string()];
            if arg.contains(char::is_whitespace) {
                words.extend(
                    arg.split(|c: char| c.is_whitespace() || c == ';' || c == '|' || c == '&')
                        .map(|w| w.trim_matches(|c| c == '\'' || c == '"').to_string())
                        .filter(|w| !w.is_empty()),
                );
            }
            words
        })
        .collect();
    let mysql_like = words.iter().any(|w| {
        let program = std::path::Path::new(w)
            .file_name()
            .unwrap_or(OsStr::new(""))
            .to_string_lossy()
            .to_ascii_lowercase();
        program.contains("mysql") || program.contains("mariadb")
    });
    words.iter().enumerate().find_map(|(i, word)| {
        let lower = word.to_ascii_lowercase();
        let next = words.get(i + 1);
        if matches!(
            lower.as_str(),
            "--password" | "--pass" | "--passwd" | "-password"
        ) && next.is_some_and(|n| !n.starts_with('-'))
        {
            return Some("`--password VALUE`");
        }
        if let Some((flag, value)) = lower.split_once('=')
            && flag.starts_with("--")
            && names_a_password(flag)
            && !value.is_empty()
        {
            return Some("`--password=VALUE`");
        }
        if mysql_like && lower.starts_with("-p") && !lower.starts_with("--") && lower.len() > 2 {
            return Some("MySQL's `-pVALUE`");
        }
        if url_has_password(&lower) {
            return Some("a password in a URL");
        }
        lower
            .split(['?', '&'])
            .any(|part| {
                part.split_once('=').is_some_and(|(name, value)| {
                    !value.is_empty()
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                        && (names_a_password(name) || name == "mysql_pwd")
                })
            })
            .then_some("a `password=VALUE` setting (connection string, URL or environment)")
    })
}

/// `password`, `pgpassword`, `sslpassword`, `pass`, `passwd`; not `passfile`, `no-password`.
fn names_a_password(name: &str) -> bool {
    (name.contains("pass") || name.contains("pwd"))
        && !name.contains("file")
        && !name.contains("no-")
}

/// `scheme://user:password@host...`
fn url_has_password(word: &str) -> bool {
    let Some((_, rest)) = word.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn every_form_of_password_in_a_dump_command_is_found() {
        let with_password: &[&[&str]] = &[
            &["mysqldump", "--password", "hunter2", "shop"],
            &["mysqldump", "--password=hunter2", "shop"],
            &["mariadb-dump", "--pass=hunter2", "shop"],
            &["/usr/bin/mysqldump", "-uroot", "-phunter2", "shop"],
            &["pg_dump", "host=db user=app password=hunter2 dbname=crm"],
            &["pg_dump", "--dbname=host=db password=hunter2"],
            &["pg_dump", "postgresql://app:hunter2@db:5432/crm"],
            &[
                "pg_dump",
                "postgresql://app@db/crm?sslmode=require&password=hunter2",
            ],
            &["sh", "-c", "mysqldump -phunter2 shop | gzip"],
            &["sh", "-c", "PGPASSWORD=hunter2 pg_dump crm"],
            &["bash", "-c", "pg_dump --password hunter2 crm"],
            &["env", "PGPASSWORD=hunter2", "pg_dump", "crm"],
            &["env", "MYSQL_PWD=hunter2", "mysqldump", "shop"],
            &["pg_dump", "--dbname", "sslpassword=hunter2 dbname=crm"],
            &["pg_dump", "--dbname=postgresql://app:hunter2@db/crm"],
        ];
        for command in with_password {
            assert!(password_in_command(&argv(command)).is_some(), "{command:?}");
        }
        let without: &[&[&str]] = &[
            &["pg_dump", "--no-password", "crm"],
            &["pg_dump", "-p5432", "-h", "db", "crm"],
            &["pg_dump", "host=db passfile=/etc/bkp/pgpass dbname=crm"],
            &["env", "PGPASSFILE=/etc/bkp/pgpass", "pg_dump", "crm"],
            &["mysqldump", "--defaults-extra-file=/etc/bkp/my.cnf", "shop"],
            &["mysqldump", "-p", "shop"],
            &["pg_dump", "postgresql://app@db:5432/crm?sslmode=require"],
            &["sh", "-c", "pg_dump crm | head -c 100"],
            &[
                "mysqldump",
                "--single-transaction",
                "--skip-dump-date",
                "shop",
            ],
        ];
        for command in without {
            assert_eq!(password_in_command(&argv(command)), None, "{command:?}");
        }
    }

    #[test]
    fn a_command_with_a_password_is_refused_before_it_runs_and_the_error_hides_it() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let script = format!("touch {}; echo --password=hunter2", marker.display());
        let err = DumpCommand::spawn(&argv(&["sh", "-c", &script]))
            .err()
            .unwrap();
        assert!(matches!(err, Error::PasswordInCommand { .. }), "{err}");
        let message = err.to_string();
        assert!(!message.contains("hunter2"), "{message}");
        assert!(message.contains("pgpass"), "{message}");
        assert!(!marker.exists());
    }

    #[test]
    fn the_dump_command_does_not_inherit_bkp_passwords() {
        // SAFETY: the only test in this binary that touches this variable.
        unsafe { std::env::set_var("BKP_PASSWORD_TEST_INHERIT", "s3cret") };
        let mut cmd = DumpCommand::spawn(&argv(&["env"])).unwrap();
        let mut out = String::new();
        cmd.read_to_string(&mut out).unwrap();
        assert!(out.contains("PATH="), "{out}");
        assert!(!out.contains("s3cret"), "{out}");
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
        assert_eq!(
            failed.command,
            "sh -c 'echo partial; echo 'boom: no such database' >&2; exit 3'"
        );

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
        assert!(matches!(missing, Error::DumpCommand(_)), "{missing}");
        let message = missing.to_string();
        assert!(message.contains("could not be started"), "{message}");
        assert!(message.contains("is it installed"), "{message}");
    }

    #[test]
    fn a_stopper_never_signals_a_reaped_child() {
        let mut cmd = DumpCommand::spawn(&argv(&["printf", "x"])).unwrap();
        let stopper = cmd.stopper();
        cmd.read_to_end(&mut Vec::new()).unwrap();
        assert!(*stopper.reaped.lock().unwrap());
        stopper.stop(); // a no-op: the pid may belong to another process now

        let mut running = DumpCommand::spawn(&argv(&["sleep", "30"])).unwrap();
        running.stopper().stop();
        let err = running.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("killed by signal 15"), "{err}");
    }
}
