//! `bkp check` on intact and damaged repositories: every problem is found, named, and tied to
//! the snapshots it affects; exit code 5 when there is any.

mod common;

use std::path::{Path, PathBuf};

use common::{backup_cli, bkp, dumpgen, files_under, local_repo};

fn check_json(repo: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let out = bkp(repo)
        .arg("check")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no JSON: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), report)
}

/// The problems' (object, problem, affected snapshots).
fn problems(report: &serde_json::Value) -> Vec<(String, String, Vec<String>)> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let snapshots = p["snapshots"].as_array().unwrap();
            (
                p["object"].as_str().unwrap().to_string(),
                p["problem"].as_str().unwrap().to_string(),
                snapshots
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// A repository with two snapshots of different data, and the pack and index file that only
/// `crm`'s backup wrote. Both streams are small enough (under 64 chunks) to have no chunk-tree
/// nodes, so their packs hold data frames only.
fn two_snapshots() -> (tempfile::TempDir, PathBuf, String, String, PathBuf, PathBuf) {
    let (dir, repo) = local_repo();
    let crm = backup_cli(&repo, &common::random_bytes(600_000, 7), &["crm"]);
    let crm_pack = files_under(&repo, "packs").pop().unwrap();
    let crm_index = files_under(&repo, "index").pop().unwrap();
    let shop = backup_cli(&repo, &dumpgen::dump(600_000, 1), &["shop"]);
    (dir, repo, shop, crm, crm_pack, crm_index)
}

fn name_under(repo: &Path, file: &Path) -> String {
    file.strip_prefix(repo)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn an_intact_repository_checks_clean_with_and_without_reading_data() {
    let (_dir, repo, ..) = two_snapshots();
    for args in [&[][..], &["--read-data"], &["--read-data-subset", "50%"]] {
        let (code, report) = check_json(&repo, args);
        assert_eq!(code, 0, "{args:?}: {report}");
        assert!(problems(&report).is_empty());
        assert_eq!(report["snapshots"], 2);
    }
    let (_, report) = check_json(&repo, &["--read-data"]);
    assert!(report["frames_read"].as_u64().unwrap() >= 2);
    bkp(&repo)
        .arg("check")
        .assert()
        .success()
        .stdout(predicates::str::contains("no problems"));
}

#[test]
fn a_flipped_byte_in_a_pack_is_found_by_reading_data_and_names_the_snapshot() {
    let (_dir, repo, _shop, crm, pack, _) = two_snapshots();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[300] ^= 0x40; // inside the first frame, not the header
    std::fs::write(&pack, bytes).unwrap();

    // Reading the data finds it. (The structure check finds it only if the byte landed in a
    // chunk-tree node, which a 600 KB stream has with a probability of ~13 %.)
    let (code, report) = check_json(&repo, &["--read-data"]);
    assert_eq!(code, 5);
    let found = problems(&report);
    assert!(
        found
            .iter()
            .all(|(_, _, snapshots)| snapshots == &vec![crm.clone()]),
        "{found:?}"
    );
    let (_, problem, _) = found
        .iter()
        .find(|(object, _, _)| object == &name_under(&repo, &pack))
        .unwrap_or_else(|| panic!("the pack is not named: {found:?}"));
    assert!(problem.contains("authentication"), "{problem}");
    bkp(&repo)
        .args(["check", "--read-data"])
        .assert()
        .code(5)
        .stdout(predicates::str::contains("PROBLEM"));
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let (_dir, repo, shop, crm, pack, _) = two_snapshots();
    // A missing pack, a truncated snapshot, and an index file sealed by another repository.
    std::fs::remove_file(&pack).unwrap();
    let snapshot = files_under(&repo, "snapshots")
        .into_iter()
        .find(|p| p.file_name().unwrap().to_str().unwrap() == shop)
        .unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&snapshot)
        .unwrap();
    file.set_len(1000).unwrap();
    drop(file);
    let (_other_dir, other) = local_repo();
    backup_cli(&other, b"another repository's data", &[]);
    let foreign = files_under(&other, "index").pop().unwrap();
    let foreign_name = format!("index/{}", foreign.file_name().unwrap().to_str().unwrap());
    std::fs::copy(&foreign, repo.join(&foreign_name)).unwrap();

    let (code, report) = check_json(&repo, &[]);
    assert_eq!(code, 5);
    let found = problems(&report);
    let about = |object: &str| {
        found
            .iter()
            .find(|(o, _, _)| o == object)
            .unwrap_or_else(|| panic!("nothing about {object} in {found:?}"))
    };
    let (_, problem, snapshots) = about(&name_under(&repo, &pack));
    assert!(problem.contains("missing"), "{problem}");
    assert_eq!(snapshots, &vec![crm.clone()]);
    let (_, problem, _) = about(&name_under(&repo, &snapshot));
    assert!(problem.contains("corrupt"), "{problem}");
    let (_, problem, _) = about(&foreign_name);
    assert!(problem.contains("authentication"), "{problem}");
    // If crm's stream has a chunk-tree node (in the missing pack), its tree is reported too.
    let others: Vec<_> = found
        .iter()
        .filter(|(o, _, _)| {
            ![
                name_under(&repo, &pack),
                name_under(&repo, &snapshot),
                foreign_name.clone(),
            ]
            .contains(o)
        })
        .collect();
    assert!(
        others
            .iter()
            .all(|(o, _, s)| o == &format!("snapshots/{crm}") && s == &vec![crm.clone()]),
        "{found:?}"
    );
}

#[test]
fn a_missing_index_file_leaves_snapshots_with_unindexed_chunks() {
    let (_dir, repo, _shop, crm, _, crm_index) = two_snapshots();
    std::fs::remove_file(crm_index).unwrap();

    let (code, report) = check_json(&repo, &[]);
    assert_eq!(code, 5);
    let found = problems(&report);
    assert_eq!(found.len(), 1, "{found:?}");
    let (object, problem, snapshots) = &found[0];
    assert_eq!(object, &format!("snapshots/{crm}"));
    // "in no index", or, if crm's stream has a chunk-tree node, that node "is missing".
    assert!(
        problem.contains("in no index") || problem.contains("is missing"),
        "{problem}"
    );
    assert_eq!(snapshots, &vec![crm.clone()]);
    assert_eq!(report["unreferenced_packs"], 1);
}

#[test]
fn a_lost_pack_is_tied_to_every_snapshot_that_reads_it_through_dedup_and_delta_bases() {
    // Day 2 of a series deduplicates against day 1 and delta-compresses against its frames,
    // and both streams are long enough to have chunk-tree nodes.
    let (_dir, repo) = local_repo();
    let day1 = backup_cli(&repo, &dumpgen::dump(4_000_000, 1), &["shop"]);
    let day1_packs = files_under(&repo, "packs");
    let day2 = backup_cli(&repo, &dumpgen::dump(4_000_000, 2), &["shop"]);
    let (code, report) = check_json(&repo, &["--read-data"]);
    assert_eq!(code, 0, "{report}");
    for pack in &day1_packs {
        std::fs::remove_file(pack).unwrap();
    }

    let (code, report) = check_json(&repo, &[]);
    assert_eq!(code, 5);
    let found = problems(&report);
    let both = {
        let mut both = vec![day1.clone(), day2.clone()];
        both.sort();
        both
    };
    for pack in &day1_packs {
        let name = name_under(&repo, pack);
        let (_, problem, snapshots) = found
            .iter()
            .find(|(o, _, _)| *o == name)
            .unwrap_or_else(|| panic!("nothing about {name} in {found:?}"));
        assert!(problem.contains("missing"), "{problem}");
        assert!(!snapshots.is_empty(), "{name}: {found:?}");
    }
    assert!(
        found.iter().any(|(_, _, s)| *s == both),
        "no lost pack names both snapshots: {found:?}"
    );
    // Besides the packs: at most each snapshot's unreadable tree, never anything else.
    for (object, problem, snapshots) in &found {
        if object.starts_with("packs/") {
            continue;
        }
        assert!(
            object == &format!("snapshots/{day1}") || object == &format!("snapshots/{day2}"),
            "{found:?}"
        );
        assert!(problem.contains("chunk tree cannot be read"), "{problem}");
        assert_eq!(snapshots.len(), 1);
    }
    assert!(
        found
            .iter()
            .any(|(o, _, _)| o == &format!("snapshots/{day1}")),
        "day 1's tree nodes were in its packs: {found:?}"
    );
}

/// Every file of the repository with its contents.
fn contents(repo: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    files_under(repo, "")
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn check_prune_and_stats_sort_on_disk_and_an_unusable_tmpdir_is_a_clear_error_that_changes_nothing()
{
    // ~2,400 chunks: more than the smallest sort buffer holds (BKP_SORT_MEMORY=0), so the
    // index's chunks and the trees' ids go through temporary files.
    let (dir, repo) = local_repo();
    backup_cli(&repo, &common::random_bytes(20_000_000, 3), &["a"]);
    backup_cli(&repo, &dumpgen::dump(20_000_000, 1), &["b"]);
    let json = |args: &[&str], memory: Option<&str>| {
        let mut cmd = bkp(&repo);
        if let Some(memory) = memory {
            cmd.env("BKP_SORT_MEMORY", memory);
        }
        let out = cmd.args(args).arg("--json").output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        value.as_object_mut().map(|o| o.remove("frames_read"));
        value
    };
    for args in [&["check"][..], &["stats"], &["prune", "--dry-run"]] {
        assert_eq!(json(args, Some("0")), json(args, None), "{args:?}");
    }
    assert_eq!(
        json(&["check"], Some("0"))["problems"],
        serde_json::json!([])
    );
    // Backup and restore look chunks up in a temporary file: they deduplicate and restore
    // exactly as with the table in memory.
    let day2 = dumpgen::dump(20_000_000, 2);
    for memory in ["0", "48"] {
        let backup = |data: &[u8]| {
            let mut cmd = bkp(&repo);
            cmd.env("BKP_SORT_MEMORY", memory)
                .args(["backup", "--json", "--tag", "b"]);
            common::run_json(cmd.write_stdin(data.to_vec()))
        };
        let again = backup(&day2);
        let unchanged = backup(&day2);
        assert!(
            unchanged["bytes_added"].as_u64().unwrap() <= 16 << 10,
            "{memory}: {unchanged}"
        );
        assert!(
            again["bytes_added"].as_u64().unwrap() < 2_000_000,
            "{memory}: a day's changes are deltas: {again}"
        );
        let restored = common::stdout_of(
            bkp(&repo)
                .env("BKP_SORT_MEMORY", memory)
                .args(["restore", unchanged["snapshot_id"].as_str().unwrap()]),
        );
        assert!(restored == day2, "{memory}: restored stream differs");
    }

    let before = contents(&repo);
    let missing = dir.path().join("no such directory");
    for args in [&["check"][..], &["stats"], &["prune"]] {
        let out = bkp(&repo)
            .env("BKP_SORT_MEMORY", "0")
            .env("TMPDIR", &missing)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("temporary files") && stderr.contains("set TMPDIR"),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    assert!(contents(&repo) == before, "the repository changed");
    let out = bkp(&repo)
        .env("BKP_SORT_MEMORY", "lots")
        .arg("check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BKP_SORT_MEMORY"));
}
