//! What bkp reads and what it reveals (issue 13): damaged, foreign and planted objects, wrong
//! clocks, and the secrets an operator's command line or umask could leak.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{backup_cli, bkp, files_under, local_repo, snapshot_ids};

#[test]
fn a_dump_command_carrying_a_password_is_refused_without_showing_it() {
    let (_dir, repo) = local_repo();
    for command in [
        &["mysqldump", "--password", "hunter2", "shop"][..],
        &["sh", "-c", "PGPASSWORD=hunter2 pg_dump crm"],
        &["pg_dump", "postgresql://app:hunter2@db/crm"],
    ] {
        let out = bkp(&repo)
            .args(["backup", "--tag", "shop", "--"])
            .args(command)
            .assert()
            .code(2)
            .get_output()
            .clone();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("carries a password"), "{stderr}");
        assert!(stderr.contains(".pgpass"), "{stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    assert!(snapshot_ids(&mut bkp(&repo)).is_empty());
}

/// Modes of everything under `dir`, as (path, mode & 0o777).
fn modes(dir: &Path) -> Vec<(String, u32)> {
    let mut out = vec![(
        dir.display().to_string(),
        std::fs::metadata(dir).unwrap().permissions().mode() & 0o777,
    )];
    for file in files_under(dir, "") {
        let mut path = file.as_path();
        while path != dir {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            out.push((path.display().to_string(), mode));
            path = path.parent().unwrap();
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn repository_and_restored_files_are_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let run = |args: &str, input: &[u8]| {
        let mut cmd = assert_cmd::Command::new("sh");
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap())
            .env("BKP_REPOSITORY", &repo)
            .env("BKP_PASSWORD", common::PASSWORD)
            .env("BKP_INSECURE_FAST_KDF", "1")
            .env("BKP", assert_cmd::cargo::cargo_bin("bkp"))
            .args(["-c", &format!("umask 000; \"$BKP\" {args}")])
            .write_stdin(input.to_vec())
            .assert()
            .success();
    };
    run("init", b"");
    run("backup --tag t", &common::random_bytes(300_000, 3));
    let restored = dir.path().join("restored.sql");
    run(
        &format!("restore latest --output {}", restored.display()),
        b"",
    );
    for (path, mode) in modes(&repo) {
        let is_dir = Path::new(&path).is_dir();
        let private = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(mode, private, "{path} has mode {mode:o}");
    }
    let mode = std::fs::metadata(&restored).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

/// Writes `bytes` under `repo/dir/`, named by their hash (as a real object is) unless `name`.
fn plant(repo: &Path, dir: &str, name: Option<&str>, bytes: &[u8]) -> String {
    let name = name
        .map(str::to_string)
        .unwrap_or_else(|| blake3::hash(bytes).to_hex().to_string());
    let path = repo.join(dir).join(&name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    format!("{dir}/{name}")
}

/// A key file whose argon2 cost is absurd (4 Gi KiB, 2^32 - 1 passes), laid out as
/// docs/FORMAT.md §4 says: magic, then postcard of (kdf, salt, created, sealed).
fn absurd_key_file() -> Vec<u8> {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut out = b"BKPKEY01".to_vec();
    varint(u32::MAX as u64, &mut out); // memory_kib
    varint(u32::MAX as u64, &mut out); // iterations
    varint(1, &mut out); // parallelism
    out.extend([7u8; 16]); // salt
    varint(0, &mut out); // created
    varint(48, &mut out);
    out.extend([9u8; 48]); // sealed
    out
}

#[test]
fn planted_empty_garbage_foreign_and_misnamed_objects_block_nothing() {
    let (_dir, repo) = local_repo();
    let (_other_dir, other) = local_repo();
    let day1 = common::dumpgen::dump(1_500_000, 1);
    let day2 = common::dumpgen::dump(1_500_000, 2);
    backup_cli(&repo, &day1, &["shop"]);
    let newest = backup_cli(&repo, &day2, &["shop"]);
    backup_cli(&other, &day2, &["shop"]);

    let mut planted = Vec::new();
    for dir in ["snapshots", "index", "keys", "obsolete"] {
        planted.push(plant(&repo, dir, None, b""));
        planted.push(plant(&repo, dir, None, &common::random_bytes(700, 1)));
        planted.push(plant(&repo, dir, Some("notes.txt"), b"remember the milk\n"));
        if dir != "obsolete" {
            // A real object of another repository, and one of ours under a wrong name.
            let foreign = std::fs::read(files_under(&other, dir).remove(0)).unwrap();
            let foreign = plant(&repo, dir, None, &foreign);
            // Another repository's key file is a well-formed key file: only its password
            // could tell it is not ours, so it is merely one more key that does not open.
            if dir != "keys" {
                planted.push(foreign);
            }
            let ours = std::fs::read(files_under(&repo, dir).pop().unwrap()).unwrap();
            planted.push(plant(&repo, dir, Some(&"0".repeat(64)), &ours));
        }
    }
    planted.push(plant(&repo, "keys", None, &absurd_key_file()));
    plant(
        &repo,
        "packs/00",
        Some(&"0".repeat(64)),
        &common::random_bytes(5000, 2),
    );
    std::fs::write(repo.join("packs").join("README"), b"stray").unwrap();

    // Listings go on, naming what they skipped.
    let out = bkp(&repo)
        .arg("snapshots")
        .assert()
        .success()
        .get_output()
        .clone();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("2 snapshot(s)"), "{stdout}");
    assert!(stdout.contains("DAMAGED"), "{stdout}");
    for object in planted.iter().filter(|o| o.starts_with("snapshots/")) {
        let name = object.rsplit('/').next().unwrap();
        assert!(
            stdout.contains(&name[..8.min(name.len())]),
            "{object}: {stdout}"
        );
    }
    // Key files are tried in turn until one opens: those before it are named.
    assert!(stderr.contains("which is damaged"), "{stderr}");
    let json = common::run_json(bkp(&repo).args(["snapshots", "--json"]));
    let damaged = json
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["damaged"].is_string())
        .count();
    assert_eq!(
        damaged,
        planted
            .iter()
            .filter(|o| o.starts_with("snapshots/"))
            .count()
    );

    let stats = common::run_json(bkp(&repo).args(["stats", "--json"]));
    let reported = stats["damaged_objects"].as_array().unwrap();
    for object in planted.iter().filter(|o| o.starts_with("index/")) {
        assert!(
            reported.iter().any(|d| d["object"] == object.as_str()),
            "{object}: {stats}"
        );
    }

    // Restore gets the newest intact dump; backups, forget and prune work.
    let restored = bkp(&repo)
        .args(["restore", "latest", "--tag", "shop"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert!(restored == day2);
    assert_eq!(restored.len(), day2.len());
    let day3 = common::dumpgen::dump(1_500_000, 3);
    backup_cli(&repo, &day3, &["shop"]);
    bkp(&repo)
        .args(["forget", "--keep-last", "2", "--prune"])
        .assert()
        .success();
    assert!(common::stdout_of(bkp(&repo).args(["restore", &newest])) == day2);

    // check names every planted object; `forget ID` removes a damaged snapshot.
    let out = bkp(&repo)
        .arg("check")
        .assert()
        .code(5)
        .get_output()
        .clone();
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    for object in &planted {
        assert!(
            report.contains(object.as_str()),
            "{object} not reported: {report}"
        );
    }
    let unreadable = planted
        .iter()
        .find(|o| o.starts_with("snapshots/") && !o.ends_with(".txt"))
        .unwrap();
    let id = unreadable.rsplit('/').next().unwrap();
    bkp(&repo).args(["forget", id]).assert().success();
    assert!(!repo.join(unreadable).exists());
}

#[test]
fn a_snapshot_from_a_host_whose_clock_is_years_ahead_never_becomes_latest() {
    let (_dir, repo) = local_repo();
    let today = common::dumpgen::dump(1_000_000, 1);
    let planted = common::dumpgen::dump(1_000_000, 2);
    backup_cli(&repo, &today, &["shop"]);
    let mut ahead = assert_cmd::Command::new("faketime");
    ahead
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("BKP_REPOSITORY", &repo)
        .env("BKP_PASSWORD", common::PASSWORD)
        .args(["-f", "+3650d"])
        .arg(assert_cmd::cargo::cargo_bin("bkp"))
        .args(["backup", "--json", "--tag", "shop"]);
    let json = common::run_json(ahead.write_stdin(planted.clone()));
    let future = json["snapshot_id"].as_str().unwrap().to_string();
    let listing = common::run_json(bkp(&repo).args(["snapshots", "--json"]));
    let future_entry = listing
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == future.as_str())
        .unwrap();
    assert!(
        future_entry["time"].as_str().unwrap().starts_with("20"),
        "{future_entry}"
    );
    assert_eq!(future_entry["future_dated"], true, "{future_entry}");
    assert!(
        common::stdout_of(bkp(&repo).arg("snapshots"))
            .windows(6)
            .any(|w| w == b"FUTURE")
    );

    let out = bkp(&repo)
        .args(["restore", "latest", "--tag", "shop"])
        .assert()
        .success()
        .get_output()
        .clone();
    assert!(out.stdout == today, "latest must be today's dump");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&future[..8]) && stderr.contains("clock"),
        "{stderr}"
    );

    // Retention keeps it without counting it: --keep-last 1 keeps today's dump too.
    let out = bkp(&repo)
        .args(["forget", "--keep-last", "1"])
        .assert()
        .success()
        .get_output()
        .clone();
    assert!(String::from_utf8_lossy(&out.stderr).contains("future"));
    assert_eq!(snapshot_ids(&mut bkp(&repo)).len(), 2);
    assert!(common::stdout_of(bkp(&repo).args(["restore", "latest"])) == today);
}
