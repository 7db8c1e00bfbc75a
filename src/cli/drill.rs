//! `bkp drill`: restore a snapshot into a command (a scratch database's client), check that
//! the restore verified and the command succeeded, and record the outcome in the repository.

use std::os::fd::AsFd;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::time::{Instant, SystemTime};

use bkp::drill::Drill;

use super::*;

/// A drill's command failed (or could not be started, or stopped reading): documented in
/// [`EXIT_CODES`].
pub(super) const EXIT_DRILL_FAILED: u8 = 9;

pub(super) fn drill_with_metrics(location: &str, quiet: bool, args: DrillArgs) -> Result<ExitCode> {
    let Some(path) = args.metrics_file.clone() else {
        return drill(location, quiet, args).map(|(code, _)| ExitCode::from(code));
    };
    let started = Instant::now();
    let tags = args.pick.tags.clone();
    let result = drill(location, quiet, args);
    let (exit_code, restored) = match &result {
        Ok((code, drill)) => (*code, drill.as_ref().filter(|d| d.ok()).map(|d| d.bytes)),
        Err(err) => (exit_status(err), None),
    };
    let outcome = metrics::Outcome {
        job: metrics::Job::Drill,
        tags: &tags,
        exit_code,
        ended: SystemTime::now(),
        duration: started.elapsed(),
        sizes: restored.map(|bytes| vec![bytes]),
    };
    if let Err(why) = metrics::write(&path, &outcome) {
        eprintln!("bkp: warning: the metrics file was not written: {why:#}");
    }
    result.map(|(code, _)| ExitCode::from(code))
}

/// Runs the drill; its exit code and, once one is recorded, the drill.
fn drill(location: &str, quiet: bool, args: DrillArgs) -> Result<(u8, Option<Drill>)> {
    let Some((program, program_args)) = args.command.split_first() else {
        bail!(
            "no command to restore into: give it after `--`, e.g. bkp drill latest --tag shop -- psql -v ON_ERROR_STOP=1 -d scratch"
        );
    };
    if let Some(form) = bkp::command::password_in_command(&args.command) {
        return Err(Error::PasswordInCommand { form }.into());
    }
    let repo = open_repository(location, Access::FullKeyTo("run a restore drill"))?;
    let entry = pick_snapshot(&repo, &args.pick)?;
    repo.warn_now();
    let command_line = bkp::command::display_command(&args.command);

    let mut command = Command::new(program);
    command.args(program_args).stdin(Stdio::piped());
    // The command's output is the drill's log, on stderr: stdout is bkp's (--json).
    if let Ok(stderr) = io::stderr().as_fd().try_clone_to_owned() {
        command.stdout(Stdio::from(stderr));
    }
    bkp::command::without_bkp_secrets(&mut command);
    let signal = Arc::new(AtomicI32::new(0));
    let child_pid = Arc::new(AtomicU32::new(0));
    stop_child_on_signals(signal.clone(), child_pid.clone())?;

    let time = SystemTime::now();
    let started = Instant::now();
    let mut bytes = 0;
    let mut damaged = None;
    let failure = match command.spawn() {
        Err(e) => Some(format!("{command_line} could not be started: {e}")),
        Ok(mut child) => {
            child_pid.store(child.id(), Ordering::SeqCst);
            let stdin = child.stdin.take().expect("piped");
            let stdin = super::pipe::PipeWriter::new(stdin);
            let mut out = BufWriter::with_capacity(super::pipe::WRITE_BUFFER, stdin);
            // A drill is the deep check: the stream against the hash the backup took of it too.
            let restored = bkp::restore_checking_stream_hash(&repo, &entry, &mut out, &mut |p| {
                bytes = p.bytes_written;
            });
            drop(out); // end of input for the command
            let status = child.wait();
            child_pid.store(0, Ordering::SeqCst);
            match (signal.load(Ordering::SeqCst), restored, status) {
                (n, _, _) if n != 0 => Some(format!("interrupted by signal {n}")),
                (_, Err(Error::Sink(_)), Ok(status)) if !status.success() => Some(format!(
                    "{command_line} {} before the end of the restore",
                    describe(status)
                )),
                (_, Err(Error::Sink(e)), _) => Some(format!(
                    "{command_line} stopped reading before the end of the restore ({e})"
                )),
                (_, Err(e), _) => {
                    let why = format!("the restore failed: {e}");
                    damaged = Some(e);
                    Some(why)
                }
                (_, Ok(summary), Ok(status)) => {
                    bytes = summary.bytes_written;
                    (!status.success()).then(|| format!("{command_line} {}", describe(status)))
                }
                (_, Ok(_), Err(e)) => Some(format!("{command_line} could not be waited for: {e}")),
            }
        }
    };
    let drill = Drill {
        snapshot: entry.id,
        tags: entry.snapshot.tags.clone(),
        time,
        duration: started.elapsed(),
        bytes,
        hostname: bkp::hostname(),
        command: command_line,
        failure,
    };
    repo.record_drill(&drill)?;
    let code = match (&drill.failure, signal.load(Ordering::SeqCst), &damaged) {
        (None, _, _) => 0,
        (Some(_), n, _) if n != 0 => (128 + n) as u8,
        (Some(_), _, Some(Error::Corrupt { .. } | Error::Missing { .. })) => EXIT_DAMAGED,
        (Some(_), _, Some(_)) => 1,
        (Some(_), _, None) => EXIT_DRILL_FAILED,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&drill_json(&drill))?);
    }
    match &drill.failure {
        None if !quiet => eprintln!(
            "drill of snapshot {} OK: {} restored into `{}` in {:.1} s (recorded)",
            entry.id.short(),
            HumanBytes(drill.bytes),
            drill.command,
            drill.duration.as_secs_f64()
        ),
        None => {}
        // Said even with --quiet: a failed drill is what the operator runs drills to learn.
        Some(why) => eprintln!(
            "bkp: drill of snapshot {} FAILED (recorded): {why}",
            entry.id.short()
        ),
    }
    Ok((code, Some(drill)))
}

/// `exited with status 3`, `was killed by signal 9`.
fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// On SIGINT, SIGTERM or SIGHUP: remember it and stop the command; the drill then ends (the
/// restore's writes fail) and is recorded as interrupted.
fn stop_child_on_signals(signal: Arc<AtomicI32>, child_pid: Arc<AtomicU32>) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("cannot install signal handlers")?;
    std::thread::spawn(move || {
        for received in signals.forever() {
            if signal.swap(received, Ordering::SeqCst) != 0 {
                eprintln!("bkp: interrupted by signal {received} again; stopping now");
                std::process::exit(128 + received);
            }
            eprintln!(
                "bkp: interrupted by signal {received}; stopping the drill and recording that"
            );
            let pid = child_pid.load(Ordering::SeqCst);
            if pid != 0 {
                // SAFETY: kill(2) sends a signal to the drill's own child process.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
            // A command whose own children keep reading would keep the drill going.
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_secs(30));
                eprintln!(
                    "bkp: the command did not stop within 30 s of signal {received}; the drill was not recorded"
                );
                std::process::exit(128 + received);
            });
        }
    });
    Ok(())
}

pub(super) fn drill_json(drill: &Drill) -> serde_json::Value {
    json!({
        "snapshot": drill.snapshot.to_hex(),
        "tags": drill.tags,
        "time": humantime::format_rfc3339_seconds(drill.time).to_string(),
        "seconds": drill.duration.as_secs_f64(),
        "bytes": drill.bytes,
        "hostname": drill.hostname,
        "command": drill.command,
        "ok": drill.ok(),
        "failure": drill.failure,
    })
}
