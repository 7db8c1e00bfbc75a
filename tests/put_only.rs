//! Put-only keys (docs/FORMAT.md §4, §13): a host with one backs up and can do nothing else; a
//! full key restores, checks and prunes what it wrote, byte for byte.

mod common;

use std::path::Path;

use common::{backup_cli, bkp, local_repo, random_bytes, run_json, stdout_of};
use predicates::prelude::*;

const PUT_ONLY: &str = "the cron host's password";

/// A repository with a full key's backup and a put-only key; returns the put-only key's id.
fn repository_with_put_only_key(repo: &Path) -> String {
    backup_cli(repo, b"written with the full key", &["db"]);
    let out =
        stdout_of(
            bkp(repo)
                .env("BKP_NEW_PASSWORD", PUT_ONLY)
                .args(["key", "add", "--put-only"]),
        );
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("put-only"), "{out}");
    let keys = run_json(bkp(repo).args(["key", "list", "--json"]));
    let put_only: Vec<_> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["role"] == "put-only")
        .collect();
    assert_eq!(put_only.len(), 1, "{keys}");
    assert_eq!(put_only[0]["current"], false);
    assert_eq!(
        keys.as_array()
            .unwrap()
            .iter()
            .filter(|k| k["role"] == "full")
            .count(),
        1
    );
    put_only[0]["id"].as_str().unwrap().to_string()
}

fn put_only_backup(repo: &Path, data: &[u8], tag: &str) -> String {
    let json = run_json(
        bkp(repo)
            .env("BKP_PASSWORD", PUT_ONLY)
            .args(["backup", "--json", "--tag", tag])
            .write_stdin(data.to_vec()),
    );
    json["snapshot_id"].as_str().unwrap().to_string()
}

#[test]
fn a_put_only_key_backs_up_and_a_full_key_restores_checks_and_prunes_it() {
    let (_dir, repo) = local_repo();
    repository_with_put_only_key(&repo);
    let day1 = random_bytes(3 << 20, 1);
    let first = put_only_backup(&repo, &day1, "db");
    let mut day2 = day1.clone();
    day2[1 << 20..(1 << 20) + 100].fill(b'x');
    let second = put_only_backup(&repo, &day2, "db");

    // The full key sees both, restores them byte for byte, and finds nothing wrong.
    let listed: Vec<String> = run_json(bkp(&repo).args(["snapshots", "--tag", "db", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        listed.contains(&first) && listed.contains(&second),
        "{listed:?}"
    );
    assert_eq!(stdout_of(bkp(&repo).args(["restore", &first])), day1);
    assert_eq!(
        stdout_of(bkp(&repo).args(["restore", "latest", "--tag", "db"])),
        day2
    );
    bkp(&repo).args(["check", "--read-data"]).assert().success();
    // Forgetting the first and pruning keeps the second whole.
    bkp(&repo).args(["forget", &first]).assert().success();
    bkp(&repo)
        .args(["prune", "--grace", "1h"])
        .assert()
        .success();
    assert_eq!(stdout_of(bkp(&repo).args(["restore", &second])), day2);
    bkp(&repo).args(["check", "--read-data"]).assert().success();
    // And a full key's next backup deduplicates against what the put-only key wrote.
    let json = run_json(
        bkp(&repo)
            .args(["backup", "--json", "--tag", "db"])
            .write_stdin(day2.clone()),
    );
    assert!(
        json["bytes_added"].as_u64().unwrap() < 64 << 10,
        "an unchanged dump after a put-only backup: {json}"
    );
}

#[test]
fn every_command_but_backup_is_refused_with_a_put_only_key() {
    let (dir, repo) = local_repo();
    let put_only_id = repository_with_put_only_key(&repo);
    let snapshot = put_only_backup(&repo, b"a put-only backup", "db");
    let new_password = dir.path().join("new-password");
    std::fs::write(&new_password, "another\n").unwrap();
    let before = common::files_under(&repo, "");
    let refused: &[&[&str]] = &[
        &["restore", "latest", "--tag", "db"],
        &["restore", &snapshot],
        &["snapshots"],
        &["snapshots", "--tag", "db", "--json"],
        &["stats"],
        &["check"],
        &["check", "--read-data"],
        &["forget", &snapshot],
        &["forget", "--keep-last", "1"],
        &["prune"],
        &["key", "list"],
        &["key", "add"],
        &["key", "add", "--put-only"],
        &["key", "remove", &put_only_id[..8]],
        &["key", "passwd"],
        &["upgrade"],
    ];
    for args in refused {
        let out = bkp(&repo)
            .env("BKP_PASSWORD", PUT_ONLY)
            .env("BKP_NEW_PASSWORD_FILE", &new_password)
            .args(*args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed {:?}", out.stdout);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        assert!(
            stderr.contains("is put-only: it can back up, but not"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // Nothing was changed by any of them.
    assert_eq!(common::files_under(&repo, ""), before);
    assert_eq!(
        stdout_of(bkp(&repo).args(["restore", &snapshot])),
        b"a put-only backup"
    );
}

#[test]
fn the_last_full_key_cannot_be_removed_whatever_put_only_keys_there_are() {
    let (_dir, repo) = local_repo();
    repository_with_put_only_key(&repo);
    let keys = run_json(bkp(&repo).args(["key", "list", "--json"]));
    let full = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "full")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    bkp(&repo)
        .args(["key", "remove", &full[..8]])
        .assert()
        .failure()
        .stderr(predicate::str::contains("only full key"));
    assert_eq!(run_json(bkp(&repo).args(["key", "list", "--json"])), keys);
}

#[test]
fn put_only_keys_need_format_4_and_upgrade_gives_it() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo-v3");
    common::copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v3"),
        &repo,
    );
    let fixture = |cmd: &mut assert_cmd::Command| {
        cmd.env("BKP_PASSWORD", "fixture");
    };
    let mut add = bkp(&repo);
    fixture(&mut add);
    add.env("BKP_NEW_PASSWORD", PUT_ONLY)
        .args(["key", "add", "--put-only"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("bkp upgrade"));
    let mut upgrade = bkp(&repo);
    fixture(&mut upgrade);
    upgrade
        .arg("upgrade")
        .assert()
        .success()
        .stdout(predicate::str::contains("format 4"));
    let mut add = bkp(&repo);
    fixture(&mut add);
    add.env("BKP_NEW_PASSWORD", PUT_ONLY)
        .args(["key", "add", "--put-only"])
        .assert()
        .success();
    let snapshot = put_only_backup(&repo, b"after the upgrade", "fixture");
    let mut restore = bkp(&repo);
    fixture(&mut restore);
    assert_eq!(
        stdout_of(restore.args(["restore", &snapshot])),
        b"after the upgrade"
    );
}
