//! The `bkp` binary as an operator uses it: exit codes, messages, damage, interruption.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{backup_cli, bkp, dumpgen, files_under, local_repo, random_bytes};
use predicates::prelude::*;

fn restore_bytes(repo: &std::path::Path, snapshot: &str) -> Vec<u8> {
    common::stdout_of(bkp(repo).args(["restore", snapshot]))
}

#[test]
fn backup_then_restore_latest_by_tag_is_byte_identical() {
    let (_dir, repo) = local_repo();
    let shop = dumpgen::dump(3_000_000, 1);
    let crm = random_bytes(500_000, 1);
    backup_cli(&repo, &shop, &["shop"]);
    backup_cli(&repo, &crm, &["crm"]);
    let out = bkp(&repo)
        .args(["restore", "latest", "--tag", "shop"])
        .assert()
        .success();
    assert!(out.get_output().stdout == shop);
    let out = bkp(&repo)
        .args(["restore", "latest", "--tag", "crm"])
        .assert()
        .success();
    assert!(out.get_output().stdout == crm);
}

#[test]
fn threads_come_from_the_option_or_the_environment_and_zero_is_refused() {
    let (_dir, repo) = local_repo();
    let shop = dumpgen::dump(3_000_000, 1);
    bkp(&repo)
        .args(["backup", "--tag", "shop", "--threads", "1"])
        .write_stdin(shop.clone())
        .assert()
        .success();
    let one = common::stdout_of(
        bkp(&repo)
            .env("BKP_THREADS", "1")
            .args(["restore", "latest"]),
    );
    assert!(one == shop);
    let three = common::stdout_of(bkp(&repo).args(["restore", "latest", "--threads", "3"]));
    assert!(three == shop);
    bkp(&repo)
        .env("BKP_THREADS", "0")
        .args(["restore", "latest"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--threads"));
}

#[test]
fn summary_is_two_lines_that_fit_a_terminal_and_quiet_prints_nothing() {
    let (_dir, repo) = local_repo();
    bkp(&repo)
        .arg("backup")
        .write_stdin(common::random_bytes(3 << 20, 9))
        .assert()
        .success()
        .stdout(
            // (3 MiB of new data, and a few KiB of tree nodes depending on where the
            // repository's key cuts it: 3.00 or 3.01 MiB.)
            predicate::str::starts_with("snapshot ").and(
                predicate::str::is_match(
                    r"added to the repository \(3\.0[01] MiB in changed chunks",
                )
                .unwrap(),
            ),
        )
        .stdout(predicate::function(|s: &str| {
            s.lines().count() == 2 && s.lines().all(|line| line.chars().count() <= 80)
        }))
        .stderr("");
    bkp(&repo)
        .args(["--quiet", "backup"])
        .write_stdin(b"hello".to_vec())
        .assert()
        .success()
        .stdout("")
        .stderr("");
}

#[test]
fn snapshots_json_lists_id_time_hostname_tags_size() {
    let (_dir, repo) = local_repo();
    let id = backup_cli(&repo, b"some data", &["b", "a"]);
    let list = common::run_json(bkp(&repo).args(["snapshots", "--json"]));
    let s = &list[0];
    assert_eq!(s["id"], id.as_str());
    assert_eq!(s["size"], 9);
    assert_eq!(s["tags"], serde_json::json!(["a", "b"]));
    assert!(s["hostname"].as_str().is_some_and(|h| !h.is_empty()));
    assert!(s["time"].as_str().unwrap().ends_with('Z'));
    // A unique prefix names the snapshot.
    assert_eq!(restore_bytes(&repo, &id[..6]), b"some data");
}

#[test]
fn wrong_password_exits_4_and_says_so() {
    let (_dir, repo) = local_repo();
    bkp(&repo)
        .env("BKP_PASSWORD", "not it")
        .arg("snapshots")
        .assert()
        .code(4)
        .stderr(predicate::str::contains("wrong password"));
}

#[test]
fn missing_repository_exits_3_and_suggests_init() {
    let dir = tempfile::tempdir().unwrap();
    bkp(&dir.path().join("nothing-here"))
        .arg("snapshots")
        .assert()
        .code(3)
        .stderr(predicate::str::contains("bkp init"));
    // An existing but empty directory is not a repository either.
    bkp(dir.path()).arg("snapshots").assert().code(3);
}

#[test]
fn init_refuses_an_existing_repository() {
    let (_dir, repo) = local_repo();
    bkp(&repo)
        .arg("init")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("already exists"));
}

#[test]
fn usage_errors_exit_2() {
    let (_dir, repo) = local_repo();
    bkp(&repo).arg("frobnicate").assert().code(2);
    bkp(&repo)
        .args(["backup", "--compression", "99"])
        .assert()
        .code(2);
}

#[test]
fn password_comes_from_a_file_or_a_command_and_never_from_argv() {
    let (dir, repo) = local_repo();
    let file = dir.path().join("pw");
    std::fs::write(&file, format!("{}\n", common::PASSWORD)).unwrap();
    // A file others can read works, with a warning that says how to fix it; a private one
    // works quietly.
    use std::os::unix::fs::PermissionsExt;
    let with_mode = |mode: u32| {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        bkp(&repo)
            .env_remove("BKP_PASSWORD")
            .env("BKP_PASSWORD_FILE", &file)
            .args(["snapshots", "--json"])
            .assert()
            .success()
    };
    with_mode(0o644).stderr(predicate::str::contains("can be read by other users").and(
        predicate::str::contains(format!("chmod 600 {}", file.display())),
    ));
    with_mode(0o600).stderr("");
    let mut cmd = bkp(&repo);
    cmd.env_remove("BKP_PASSWORD")
        .env("BKP_PASSWORD_COMMAND", format!("cat {}", file.display()))
        .arg("snapshots")
        .assert()
        .success();
    let mut cmd = bkp(&repo);
    cmd.env_remove("BKP_PASSWORD")
        .arg("snapshots")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("BKP_PASSWORD_FILE"));
}

#[test]
fn completions_and_the_manual_page_need_no_repository() {
    let mut cmd = assert_cmd::Command::cargo_bin("bkp").unwrap();
    let bash = cmd
        .env_clear()
        .args(["completions", "bash"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let bash = String::from_utf8(bash).unwrap();
    for word in ["_bkp()", "restore", "snapshots", "--tag", "copy"] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    for shell in ["zsh", "fish", "powershell"] {
        let mut cmd = assert_cmd::Command::cargo_bin("bkp").unwrap();
        let out = cmd
            .env_clear()
            .args(["completions", shell])
            .assert()
            .success();
        assert!(
            String::from_utf8_lossy(&out.get_output().stdout).contains("restore"),
            "{shell}"
        );
    }
    let mut cmd = assert_cmd::Command::cargo_bin("bkp").unwrap();
    let page = cmd.env_clear().arg("man").assert().success();
    let page = String::from_utf8_lossy(&page.get_output().stdout).into_owned();
    assert!(
        page.starts_with(".ie") || page.contains(".TH bkp 1"),
        "{page}"
    );
    for word in ["restore", "BKP_PASSWORD_FILE", "exit"] {
        assert!(page.contains(word), "the manual page lacks {word}");
    }
    let mut cmd = assert_cmd::Command::cargo_bin("bkp").unwrap();
    cmd.env_clear()
        .args(["completions", "nosh"])
        .assert()
        .code(2);
}

#[test]
fn restore_output_never_overwrites_and_writes_the_file() {
    let (dir, repo) = local_repo();
    backup_cli(&repo, b"payload", &[]);
    let target = dir.path().join("out.sql");
    bkp(&repo)
        .args(["restore", "latest", "--output"])
        .arg(&target)
        .assert()
        .success();
    assert_eq!(std::fs::read(&target).unwrap(), b"payload");
    bkp(&repo)
        .args(["restore", "latest", "--output"])
        .arg(&target)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("never overwrites"));
}

#[test]
fn restore_into_a_closed_pipe_exits_quietly() {
    let (_dir, repo) = local_repo();
    backup_cli(&repo, &random_bytes(20_000_000, 5), &[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_bkp"))
        .env("BKP_REPOSITORY", &repo)
        .env("BKP_PASSWORD", common::PASSWORD)
        .args(["restore", "latest"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1000];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(141));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Flips one byte of the only object under `sub` at `offset` from its start.
fn flip_byte(repo: &std::path::Path, sub: &str, offset: usize) -> String {
    let files = files_under(repo, sub);
    let path = files.last().unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn assert_restore_names_damage(repo: &std::path::Path, object: &str) {
    bkp(repo)
        .args(["restore", "latest"])
        .assert()
        .code(5)
        .stderr(
            predicate::str::contains(object)
                .and(predicate::str::contains("corrupt").or(predicate::str::contains("damaged"))),
        );
}

#[test]
fn a_flipped_byte_in_a_pack_fails_restore_naming_the_pack() {
    let (_dir, repo) = local_repo();
    backup_cli(&repo, &dumpgen::dump(2_000_000, 1), &[]);
    let pack = flip_byte(&repo, "packs", 200);
    assert_restore_names_damage(&repo, &pack);
}

#[test]
fn a_flipped_byte_in_an_index_file_is_detected_naming_it() {
    let (_dir, repo) = local_repo();
    let dump = dumpgen::dump(2_000_000, 1);
    backup_cli(&repo, &dump, &[]);
    let index = flip_byte(&repo, "index", 100);
    // A restore reads its snapshot's packs, not the index files: it does not need this one.
    let restored = bkp(&repo).args(["restore", "latest"]).assert().success();
    assert!(restored.get_output().stdout == dump);
    // Check reads every index file and names the damaged one.
    bkp(&repo)
        .arg("check")
        .assert()
        .code(5)
        .stdout(predicate::str::contains(format!("index/{index}")));
}

#[test]
fn a_flipped_byte_in_a_snapshot_is_detected_naming_it() {
    let (_dir, repo) = local_repo();
    backup_cli(&repo, b"data", &[]);
    let snapshot = flip_byte(&repo, "snapshots", 2000);
    assert_restore_names_damage(&repo, &format!("snapshots/{snapshot}"));
}

#[test]
fn a_truncated_or_missing_pack_fails_restore_naming_it() {
    let (_dir, repo) = local_repo();
    backup_cli(&repo, &dumpgen::dump(2_000_000, 1), &[]);
    let pack = files_under(&repo, "packs").pop().unwrap();
    let name = pack.file_name().unwrap().to_string_lossy().into_owned();
    let file = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
    file.set_len(20_000).unwrap();
    drop(file);
    assert_restore_names_damage(&repo, &name);
    std::fs::remove_file(&pack).unwrap();
    bkp(&repo)
        .args(["restore", "latest"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains(name.as_str()).and(predicate::str::contains("missing")));
}

#[test]
fn a_backup_killed_mid_stream_leaves_earlier_snapshots_restorable() {
    let (_dir, repo) = local_repo();
    let day1 = dumpgen::dump(5_000_000, 1);
    let first = backup_cli(&repo, &day1, &["db"]);

    let mut child = Command::new(env!("CARGO_BIN_EXE_bkp"))
        .env("BKP_REPOSITORY", &repo)
        .env("BKP_PASSWORD", common::PASSWORD)
        .args(["backup", "--tag", "db"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let packs_before = files_under(&repo, "packs").len();
    let mut stdin = child.stdin.take().unwrap();
    // Feed new data and keep the pipe open, as a dump still running would.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&random_bytes(40 << 20, 9));
        std::thread::sleep(Duration::from_secs(30));
    });
    // Kill mid-stream, once the backup has stored at least one pack of its own.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while files_under(&repo, "packs").len() == packs_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the backup stored no pack"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    drop(writer);
    assert!(files_under(&repo, "packs").len() > packs_before);

    let list = common::run_json(bkp(&repo).args(["snapshots", "--json"]));
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "no snapshot from the killed backup"
    );
    assert!(restore_bytes(&repo, &first) == day1);

    let day2 = dumpgen::dump(5_000_000, 2);
    let second = backup_cli(&repo, &day2, &["db"]);
    assert!(restore_bytes(&repo, &second) == day2);
}

#[test]
fn sigterm_during_a_command_backup_stops_the_dump_and_records_nothing() {
    let (dir, repo) = local_repo();
    let pid_file = dir.path().join("dump.pid");
    let script = format!(
        "echo $$ > {}; head -c 3000000 /dev/urandom; exec sleep 60",
        pid_file.display()
    );
    let child = Command::new(env!("CARGO_BIN_EXE_bkp"))
        .env("BKP_REPOSITORY", &repo)
        .env("BKP_PASSWORD", common::PASSWORD)
        .args(["backup", "--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let dump_pid: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dump command never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was recorded"));
    // The dump command is gone too.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !std::path::Path::new(&format!("/proc/{dump_pid}")).exists() || {
            let stat =
                std::fs::read_to_string(format!("/proc/{dump_pid}/stat")).unwrap_or_default();
            stat.split_whitespace().nth(2) == Some("Z")
        }
    );
    let listed = common::run_json(bkp(&repo).args(["snapshots", "--json"]));
    assert_eq!(listed, serde_json::json!([]));
}

#[test]
fn a_metrics_file_says_each_runs_outcome_and_keeps_the_last_success() {
    let (dir, repo) = local_repo();
    let prom = dir.path().join("bkp-shop.prom");
    let value = |name: &str| -> Option<f64> {
        let text = std::fs::read_to_string(&prom).unwrap();
        let prefix = format!("{name}{{tags=\"shop\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map(|v| v.parse().unwrap())
    };
    let data = common::random_bytes(200_000, 4);
    bkp(&repo)
        .args(["backup", "--quiet", "--tag", "shop", "--metrics-file"])
        .arg(&prom)
        .write_stdin(data.clone())
        .assert()
        .success();
    assert_eq!(value("bkp_backup_last_exit_code"), Some(0.0));
    assert_eq!(value("bkp_backup_bytes_read"), Some(data.len() as f64));
    assert!(value("bkp_backup_bytes_added").unwrap() >= data.len() as f64);
    let success = value("bkp_backup_last_success_timestamp_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - success).abs() < 120.0, "{success} vs {now}");

    // A dump that fails: exit 7, and the file says so but keeps the last success.
    std::thread::sleep(std::time::Duration::from_millis(20));
    bkp(&repo)
        .args(["backup", "--quiet", "--tag", "shop", "--metrics-file"])
        .arg(&prom)
        .args(["--", "false"])
        .assert()
        .code(7);
    assert_eq!(value("bkp_backup_last_exit_code"), Some(7.0));
    assert_eq!(
        value("bkp_backup_last_success_timestamp_seconds"),
        Some(success)
    );
    assert!(value("bkp_backup_last_run_timestamp_seconds").unwrap() > success);
    assert_eq!(value("bkp_backup_bytes_read"), Some(data.len() as f64));
}

#[test]
fn the_snapshots_table_fits_80_columns_for_a_usual_series() {
    let (_dir, repo) = local_repo();
    for day in 1..=2 {
        bkp(&repo)
            .args(["backup", "--quiet", "--tag", "shop", "--host", "db1"])
            .write_stdin(common::dumpgen::dump(300_000, day))
            .assert()
            .success();
    }
    let table = String::from_utf8(common::stdout_of(bkp(&repo).arg("snapshots"))).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    // The header, two snapshots, the count, the series' last drill (none yet).
    assert_eq!(lines.len(), 5, "{table}");
    assert!(lines[0].starts_with("id "), "{table}");
    assert!(lines[4].starts_with("shop: never drilled"), "{table}");
    for line in &lines {
        assert!(line.chars().count() <= 80, "{} columns: {line}", line.len());
    }
    assert!(
        lines[1].contains(" db1 ") && lines[1].contains(" shop "),
        "{table}"
    );
}
