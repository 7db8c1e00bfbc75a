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
    backup_with_cache(repo, PUT_ONLY, &cache_of(repo), data, tag)["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The put-only host's cache directory (its send logs), beside the repository.
fn cache_of(repo: &Path) -> std::path::PathBuf {
    repo.parent().unwrap().join("cache")
}

/// A backup with `password` and `BKP_CACHE_DIR=cache`; its JSON summary (warnings asserted
/// absent unless `expect_warning`).
fn backup_with_cache(
    repo: &Path,
    password: &str,
    cache: &Path,
    data: &[u8],
    tag: &str,
) -> serde_json::Value {
    let out = bkp(repo)
        .env("BKP_PASSWORD", password)
        .env("BKP_CACHE_DIR", cache)
        .args(["backup", "--json", "--tag", tag])
        .write_stdin(data.to_vec())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let mut json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["stderr"] = stderr.into();
    json
}

fn added(json: &serde_json::Value) -> u64 {
    json["bytes_added"].as_u64().unwrap()
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

#[test]
fn a_put_only_key_deduplicates_against_its_own_last_backup_from_its_send_log() {
    let (_dir, repo) = local_repo();
    repository_with_put_only_key(&repo);
    let cache = cache_of(&repo);
    let day1 = common::dumpgen::dump(6 << 20, 1);
    let day2 = common::dumpgen::dump(6 << 20, 2);
    let first = backup_with_cache(&repo, PUT_ONLY, &cache, &day1, "db");
    assert!(added(&first) > 1 << 20, "{first}");
    // The log is private and says nothing in the clear.
    let logs = common::files_under(&cache, "send-log");
    assert_eq!(logs.len(), 1, "{logs:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&logs[0]).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let unchanged = backup_with_cache(&repo, PUT_ONLY, &cache, &day1, "db");
    assert!(
        added(&unchanged) <= 16 << 10,
        "an unchanged dump: {unchanged}"
    );
    let changed = backup_with_cache(&repo, PUT_ONLY, &cache, &day2, "db");

    // The same two days with a full key, in a repository of their own.
    let (_full_dir, full_repo) = local_repo();
    let full_cache = cache_of(&full_repo);
    backup_with_cache(&full_repo, common::PASSWORD, &full_cache, &day1, "db");
    let full_changed = backup_with_cache(&full_repo, common::PASSWORD, &full_cache, &day2, "db");
    assert!(
        (added(&changed) as f64) <= 1.2 * added(&full_changed) as f64,
        "day 2: put-only {} vs full {}",
        added(&changed),
        added(&full_changed)
    );
    assert!(added(&changed) < added(&first) / 4, "{changed} vs {first}");
    for json in [&first, &unchanged, &changed] {
        assert_eq!(json["stderr"], "", "{json}");
    }
    // Everything restores, byte for byte, with the full key.
    for (json, data) in [(&first, &day1), (&unchanged, &day1), (&changed, &day2)] {
        let id = json["snapshot_id"].as_str().unwrap();
        assert_eq!(&stdout_of(bkp(&repo).args(["restore", id])), data);
    }
    bkp(&repo).args(["check", "--read-data"]).assert().success();
}

#[test]
fn a_missing_damaged_or_stale_send_log_makes_a_larger_backup_never_a_wrong_one() {
    let (_dir, repo) = local_repo();
    repository_with_put_only_key(&repo);
    let cache = cache_of(&repo);
    let day1 = common::dumpgen::dump(4 << 20, 1);
    let first = backup_with_cache(&repo, PUT_ONLY, &cache, &day1, "db");
    // As much again as the first backup stored (its index file and snapshot aside).
    let whole = |json: &serde_json::Value| added(json) > added(&first) * 3 / 4;
    let warned = |json: &serde_json::Value| {
        json["stderr"]
            .as_str()
            .unwrap()
            .contains("the send log is not used")
    };
    assert!(added(&first) > 100 << 10, "{first}");
    let log = common::files_under(&cache, "send-log").pop().unwrap();
    let mut live = vec![(first["snapshot_id"].as_str().unwrap().to_string())];

    // Damaged (a header record, then the meta): said, not used, and written anew.
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&log, &bytes).unwrap();
    let damaged_record = backup_with_cache(&repo, PUT_ONLY, &cache, &day1, "db");
    let mut bytes = std::fs::read(&log).unwrap();
    let near_end = bytes.len() - 30;
    bytes[near_end] ^= 1;
    std::fs::write(&log, &bytes).unwrap();
    let damaged_meta = backup_with_cache(&repo, PUT_ONLY, &cache, &day1, "db");
    assert!(
        whole(&damaged_meta) && warned(&damaged_meta),
        "{damaged_meta}"
    );
    // Missing: a whole backup, without a word. Of content no other snapshot holds: a prune
    // keeps one copy of a chunk stored twice, in whichever pack it chooses, so a pack of
    // day 1's chunks can stay needed after its snapshot is forgotten.
    std::fs::remove_file(&log).unwrap();
    let other = common::random_bytes(2 << 20, 7);
    let packs_before = common::files_under(&repo, "packs");
    let missing = backup_with_cache(&repo, PUT_ONLY, &cache, &other, "db");
    assert!(added(&missing) > 2 << 20 && !warned(&missing), "{missing}");
    let whole_other = |json: &serde_json::Value| added(json) > added(&missing) * 3 / 4;
    let its_packs: Vec<_> = common::files_under(&repo, "packs")
        .into_iter()
        .filter(|p| !packs_before.contains(p))
        .collect();
    let stale = std::fs::read(&log).unwrap();
    for json in [&damaged_record, &damaged_meta] {
        live.push(json["snapshot_id"].as_str().unwrap().to_string());
    }

    // Stale: the snapshot whose packs the log names is forgotten and pruned (its packs are
    // marked), then those packs are gone (a prune a grace period later).
    std::fs::remove_file(&log).unwrap();
    let fresh = backup_with_cache(&repo, PUT_ONLY, &cache, &day1, "db");
    bkp(&repo)
        .args(["forget", missing["snapshot_id"].as_str().unwrap()])
        .assert()
        .success();
    bkp(&repo)
        .args(["prune", "--grace", "1h"])
        .assert()
        .success();
    assert_eq!(common::files_under(&repo, "obsolete").len(), 1);
    std::fs::write(&log, &stale).unwrap();
    let against_marked = backup_with_cache(&repo, PUT_ONLY, &cache, &other, "db");
    assert!(whole_other(&against_marked), "{against_marked}");
    bkp(&repo).args(["check", "--read-data"]).assert().success();
    for pack in &its_packs {
        std::fs::remove_file(pack).unwrap();
    }
    std::fs::write(&log, &stale).unwrap();
    let against_gone = backup_with_cache(&repo, PUT_ONLY, &cache, &other, "db");
    assert!(whole_other(&against_gone), "{against_gone}");
    live.push(fresh["snapshot_id"].as_str().unwrap().to_string());
    for id in &live {
        assert_eq!(&stdout_of(bkp(&repo).args(["restore", id])), &day1, "{id}");
    }
    for json in [&against_marked, &against_gone] {
        let id = json["snapshot_id"].as_str().unwrap();
        assert_eq!(&stdout_of(bkp(&repo).args(["restore", id])), &other, "{id}");
    }
}

#[test]
fn two_put_only_hosts_in_one_series_each_keep_their_own_send_log() {
    let (dir, repo) = local_repo();
    repository_with_put_only_key(&repo);
    let (cache_a, cache_b) = (dir.path().join("host-a"), dir.path().join("host-b"));
    let mut written = Vec::new();
    for day in 1..=3u32 {
        let data = common::dumpgen::dump(3 << 20, day);
        for cache in [&cache_a, &cache_b] {
            let json = backup_with_cache(&repo, PUT_ONLY, cache, &data, "db");
            written.push((
                json["snapshot_id"].as_str().unwrap().to_string(),
                data.clone(),
            ));
        }
    }
    for (id, data) in &written {
        assert_eq!(&stdout_of(bkp(&repo).args(["restore", id])), data);
    }
    bkp(&repo).args(["check", "--read-data"]).assert().success();
}

/// Every request of a put-only host's backups, first and with its send log, is one the README's
/// storage policy for such a host allows: reads and listings, and creates under `packs/`,
/// `index/`, `snapshots/` and `series/`; never a delete.
#[test]
fn a_put_only_backup_needs_only_what_the_readme_policy_grants() {
    let (dir, repo) = local_repo();
    repository_with_put_only_key(&repo);
    let day1 = common::dumpgen::dump(2 << 20, 1);
    let day2 = common::dumpgen::dump(2 << 20, 2);
    for (n, day) in [&day1, &day1, &day2].into_iter().enumerate() {
        let trace = dir.path().join(format!("trace-{n}"));
        let out = bkp(&repo)
            .env("BKP_PASSWORD", PUT_ONLY)
            .env("BKP_CACHE_DIR", cache_of(&repo))
            .env("BKP_TRACE_REQUESTS", &trace)
            .args(["backup", "--quiet", "--tag", "db"])
            .write_stdin(day.clone())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let requests = std::fs::read_to_string(&trace).unwrap();
        let mut puts = 0;
        for line in requests.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let (kind, name) = (fields[1], fields[2]);
            match kind {
                "get" | "get-range" | "head" | "list" => {}
                "put" => {
                    puts += 1;
                    assert!(
                        ["packs/", "index/", "snapshots/", "series/"]
                            .iter()
                            .any(|p| name.starts_with(p)),
                        "backup {n} wrote {name}, which the policy does not grant"
                    );
                }
                other => panic!("backup {n} made a {other} request ({name})"),
            }
        }
        assert!(puts >= 2, "backup {n}: {requests}");
    }
    // (And what it wrote is whole: the full key restores it.)
    assert_eq!(
        stdout_of(bkp(&repo).args(["restore", "latest", "--tag", "db"])),
        day2
    );
}
