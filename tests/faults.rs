//! Bad days: every wait has an end, and nothing that is not a real dump becomes `latest`.
//! Each case that could hang runs under a deadline and fails the test instead of hanging it.

mod common;

use std::io::{Cursor, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bkp::{BackupOptions, Repository};
use common::{backup_cli, bkp, dumpgen, local_repo, memory_repo, snapshot_ids};

/// Far longer than any of these cases takes, far shorter than forever.
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `f` on a thread and returns its result, failing the test if it takes past [`DEADLINE`].
fn within_deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    result
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("{what} hung (no result within {DEADLINE:?})"))
}

fn backup(repo: &Repository, data: &[u8]) -> bkp::BackupSummary {
    let source = bkp::Source::spawn(Cursor::new(data.to_vec()));
    bkp::backup(repo, source, &BackupOptions::default(), &mut |_| {}).unwrap()
}

/// A day-1 and a day-2 backup: the day-2 snapshot reads many frames, deltas and their bases.
fn two_days() -> (Repository, bkp::SnapshotEntry, Vec<u8>) {
    let repo = memory_repo();
    backup(&repo, &dumpgen::dump(24_000_000, 1));
    let day2 = dumpgen::dump(24_000_000, 2);
    let entry = backup(&repo, &day2).snapshot;
    (repo, entry, day2)
}

/// A writer that takes `room` bytes and then fails, as a closed pipe does.
struct ClosesAfter {
    room: usize,
}

impl Write for ClosesAfter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.room == 0 {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        let n = buf.len().min(self.room);
        self.room -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_restore_whose_writer_goes_away_returns_promptly() {
    let (repo, entry, _) = two_days();
    let repo = std::sync::Arc::new(repo);
    for room in [0, 100, 5_000_000] {
        let (repo, entry) = (repo.clone(), entry.clone());
        let result = within_deadline("restore into a closed writer", move || {
            bkp::restore(&repo, &entry, &mut ClosesAfter { room }, &mut |_| {}).map(drop)
        });
        assert!(
            matches!(result, Err(bkp::Error::Sink(ref e)) if e.kind() == std::io::ErrorKind::BrokenPipe),
            "{result:?}"
        );
    }
}

#[test]
fn a_restore_of_a_damaged_snapshot_fails_promptly() {
    let (repo, entry, _) = two_days();
    // Every pack of day 1 goes missing: day 2's deltas lose their bases, its chunks their frames.
    let packs = repo.store().list("packs").unwrap();
    let day1 = &packs[..packs.len() / 2];
    for pack in day1 {
        repo.store().delete(&pack.name).unwrap();
    }
    let result = within_deadline("restore of a damaged snapshot", move || {
        bkp::restore(&repo, &entry, &mut Vec::new(), &mut |_| {}).map(drop)
    });
    assert!(
        matches!(
            result,
            Err(bkp::Error::Missing { .. } | bkp::Error::Corrupt { .. })
        ),
        "{result:?}"
    );
}

/// Waits for a child with a deadline; kills it and fails the test if it is still running then.
fn wait_with_deadline(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} hung (still running after {DEADLINE:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn restore_piped_into_head_exits_141() {
    let (_dir, repo) = local_repo();
    backup_cli(&repo, &dumpgen::dump(24_000_000, 1), &[]);
    backup_cli(&repo, &dumpgen::dump(24_000_000, 2), &[]);
    for take in [0usize, 100, 3_000_000] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bkp"))
            .env("BKP_REPOSITORY", &repo)
            .env("BKP_PASSWORD", common::PASSWORD)
            .args(["restore", "latest"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut head = vec![0u8; take];
        stdout.read_exact(&mut head).unwrap();
        drop(stdout); // `| head -c N` exits
        let status = wait_with_deadline(&mut child, "bkp restore latest | head");
        assert_eq!(status.code(), Some(141), "after reading {take} bytes");
    }
}

#[test]
fn an_empty_input_records_nothing_and_exits_7() {
    let (_dir, repo) = local_repo();
    let real = backup_cli(&repo, b"-- a dump\nCOPY t FROM stdin;\n1\n\\.\n", &["crm"]);
    // An empty pipe, a closed stdin, and a pipe from a dump program that failed.
    let assert = bkp(&repo)
        .args(["backup", "--tag", "crm"])
        .write_stdin(Vec::new())
        .assert()
        .code(7);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
    assert!(stderr.contains("input is empty"), "{stderr}");
    assert!(stderr.contains("before the pipe"), "{stderr}");
    let closed = common::bkp_std(repo.to_str().unwrap())
        .args(["backup", "--tag", "crm"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(closed.code(), Some(7));
    let mut shell = common::bkp_std(repo.to_str().unwrap());
    let exe = env!("CARGO_BIN_EXE_bkp");
    shell.env("PATH", std::env::var("PATH").unwrap_or_default());
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("false | {exe} backup --tag crm"))
        .envs(shell.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(7));
    // `bkp backup -- COMMAND` whose command succeeds but prints nothing.
    bkp(&repo)
        .args(["backup", "--tag", "crm", "--", "true"])
        .assert()
        .code(7);
    assert_eq!(snapshot_ids(&mut bkp(&repo)), [real]);
}

#[test]
fn latest_is_the_newest_complete_dump_and_names_the_incomplete_ones_it_skipped() {
    let (_dir, repo) = local_repo();
    let whole = dumpgen::dump(300_000, 1);
    let complete = backup_cli(&repo, &whole, &["shop"]);
    let cut = dumpgen::dump(300_000, 2)[..100_000].to_vec();
    let out = bkp(&repo)
        .args(["backup", "--json", "--tag", "shop"])
        .write_stdin(cut.clone())
        .assert()
        .code(6);
    let json: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let incomplete = json["snapshot_id"].as_str().unwrap().to_string();
    let restored = bkp(&repo)
        .args(["restore", "--quiet", "latest", "--tag", "shop"])
        .assert()
        .success();
    let output = restored.get_output();
    assert!(output.stdout == whole, "latest is the complete dump");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&incomplete[..8]) && stderr.contains("INCOMPLETE"),
        "{stderr}"
    );
    let by_id = common::stdout_of(bkp(&repo).args(["restore", "--quiet", &incomplete]));
    assert!(by_id == cut);
    // Forgetting the complete one leaves only the incomplete: `latest` refuses, naming it.
    bkp(&repo).args(["forget", &complete]).assert().success();
    let refused = bkp(&repo)
        .args(["restore", "latest", "--tag", "shop"])
        .assert()
        .code(1);
    let stderr = String::from_utf8_lossy(&refused.get_output().stderr).to_string();
    assert!(stderr.contains(&incomplete[..8]), "{stderr}");
}

#[test]
fn an_interrupted_restore_to_a_file_leaves_no_file() {
    let (dir, repo) = local_repo();
    let data = dumpgen::dump(40_000_000, 1);
    backup_cli(&repo, &data, &[]);
    let target = dir.path().join("out.sql");
    let partial = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".out.sql.bkp-restore-")
            })
    };
    let mut child = common::bkp_std(repo.to_str().unwrap())
        .args(["restore", "latest", "--output"])
        .arg(&target)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    while !partial(dir.path()) {
        assert!(Instant::now() < deadline, "no partial file appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = wait_with_deadline(&mut child, "interrupted restore");
    assert_eq!(status.code(), Some(130));
    assert!(!target.exists(), "nothing under the requested name");
    assert!(!partial(dir.path()), "the partial file is removed");
    // Uninterrupted, the file appears whole, private to its owner.
    bkp(&repo)
        .args(["restore", "--quiet", "latest", "--output"])
        .arg(&target)
        .assert()
        .success();
    assert!(std::fs::read(&target).unwrap() == data);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&target).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    assert!(!partial(dir.path()));
}

/// A dump program that cannot be started is a failed dump (exit 7, which cron monitoring keys
/// on), not a failure of bkp (exit 1).
#[test]
fn a_missing_dump_program_exits_7_and_records_nothing() {
    let (_dir, repo) = local_repo();
    let out = bkp(&repo)
        .args([
            "backup",
            "--tag",
            "crm",
            "--",
            "no-such-dump-program",
            "crm",
        ])
        .assert()
        .code(7);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).to_string();
    assert!(
        stderr.contains("no-such-dump-program crm") && stderr.contains("could not be started"),
        "{stderr}"
    );
    assert!(snapshot_ids(&mut bkp(&repo)).is_empty());
}

/// `forget --prune` opens the repository once: one password prompt (here: one run of the
/// password command), not two.
#[test]
fn forget_with_prune_asks_for_the_password_once() {
    let (dir, repo) = local_repo();
    backup_cli(&repo, b"-- one\n", &[]);
    backup_cli(&repo, b"-- two\n", &[]);
    let asked = dir.path().join("asked");
    let command = format!("echo >> '{}'; echo '{}'", asked.display(), common::PASSWORD);
    let mut cmd = common::bkp_std(repo.to_str().unwrap());
    cmd.env_remove("BKP_PASSWORD")
        .env("BKP_PASSWORD_COMMAND", command)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(["forget", "--quiet", "--keep-last", "1", "--prune"]);
    let status = cmd.status().unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(&asked).unwrap().lines().count(), 1);
}
