//! `bkp key`: several passwords open one repository; the last key and the key in use are not
//! removed by accident; `passwd` replaces the password in use.

mod common;

use std::path::Path;

use common::{PASSWORD, backup_cli, bkp, local_repo, run_json};
use predicates::prelude::*;

fn keys(repo: &Path, password: &str) -> Vec<serde_json::Value> {
    let mut cmd = bkp(repo);
    cmd.env("BKP_PASSWORD", password)
        .args(["key", "list", "--json"]);
    run_json(&mut cmd).as_array().unwrap().clone()
}

fn opens(repo: &Path, password: &str) -> bool {
    bkp(repo)
        .env("BKP_PASSWORD", password)
        .arg("snapshots")
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn a_second_password_opens_the_same_repository_until_removed() {
    let (_dir, repo) = local_repo();
    let snapshot = backup_cli(&repo, b"data before the new key", &[]);
    let first = keys(&repo, PASSWORD);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["current"], true);
    assert_eq!(first[0]["kdf"]["algorithm"], "argon2id");
    assert!(first[0]["kdf"]["memory_kib"].as_u64().unwrap() > 0);

    bkp(&repo)
        .env("BKP_NEW_PASSWORD", "second password")
        .args(["key", "add"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("added key").and(predicate::str::contains("second").not()),
        );
    assert!(opens(&repo, PASSWORD) && opens(&repo, "second password"));
    let restored = common::stdout_of(
        bkp(&repo)
            .env("BKP_PASSWORD", "second password")
            .args(["restore", &snapshot]),
    );
    assert_eq!(restored, b"data before the new key");

    // Opened with the second password, that key is the current one and cannot be removed.
    let listed = keys(&repo, "second password");
    assert_eq!(listed.len(), 2);
    let current = listed.iter().find(|k| k["current"] == true).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let other = listed.iter().find(|k| k["current"] == false).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    bkp(&repo)
        .env("BKP_PASSWORD", "second password")
        .args(["key", "remove", &current[..8]])
        .assert()
        .failure()
        .stderr(predicate::str::contains("bkp key passwd"));
    // The first key can go, from the second; then the second is the last one and stays.
    bkp(&repo)
        .env("BKP_PASSWORD", "second password")
        .args(["key", "remove", &other[..8]])
        .assert()
        .success();
    assert!(!opens(&repo, PASSWORD));
    bkp(&repo)
        .env("BKP_PASSWORD", "second password")
        .args(["key", "remove", &current[..8]])
        .assert()
        .failure()
        .stderr(predicate::str::contains("only full key"));
    assert!(opens(&repo, "second password"));
}

#[test]
fn passwd_replaces_the_password_in_use() {
    let (_dir, repo) = local_repo();
    let before = keys(&repo, PASSWORD);
    bkp(&repo)
        .env("BKP_NEW_PASSWORD_FILE", {
            let file = repo.parent().unwrap().join("new-password");
            std::fs::write(&file, "rotated password\nignored second line\n").unwrap();
            file
        })
        .args(["key", "passwd"])
        .assert()
        .success()
        .stdout(predicate::str::contains("password changed"));
    bkp(&repo)
        .arg("snapshots")
        .assert()
        .code(4)
        .stderr(predicate::str::contains("wrong password"));
    assert!(opens(&repo, "rotated password"));
    let after = keys(&repo, "rotated password");
    assert_eq!(after.len(), 1);
    assert_ne!(after[0]["id"], before[0]["id"]);
    // No new password anywhere to read: a clear error, nothing changed.
    bkp(&repo)
        .env("BKP_PASSWORD", "rotated password")
        .args(["key", "add"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("BKP_NEW_PASSWORD_FILE"));
    assert_eq!(keys(&repo, "rotated password").len(), 1);
}
