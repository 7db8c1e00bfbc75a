//! `bkp copy`: snapshots another repository lacks, verified, incremental, resumable after a
//! kill, from an old repository too.

mod common;

use std::path::Path;

use common::{PASSWORD, bkp, dumpgen, local_repo, run_json, stdout_of};

/// `bkp copy --json` from `source` into `target`, with `args`.
fn copy(source: &Path, target: &Path, source_password: &str, args: &[&str]) -> serde_json::Value {
    run_json(
        bkp(target)
            .env("BKP_FROM_REPOSITORY", source)
            .env("BKP_FROM_PASSWORD", source_password)
            .args(["copy", "--json"])
            .args(args),
    )
}

fn backup(repo: &Path, data: &[u8]) -> serde_json::Value {
    run_json(
        bkp(repo)
            .args(["backup", "--json", "--tag", "db"])
            .write_stdin(data.to_vec()),
    )
}

fn snapshots(repo: &Path) -> Vec<serde_json::Value> {
    run_json(bkp(repo).args(["snapshots", "--json"]))
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn copy_brings_only_what_the_target_lacks_and_a_day_costs_what_it_cost_in_the_source() {
    let (_s, source) = local_repo();
    let (_t, target) = local_repo();
    let days: Vec<Vec<u8>> = (1..=3).map(|day| dumpgen::dump(5 << 20, day)).collect();
    let in_source: Vec<_> = days[..2].iter().map(|d| backup(&source, d)).collect();

    let first = copy(&source, &target, PASSWORD, &[]);
    assert_eq!(first["copied"].as_array().unwrap().len(), 2, "{first}");
    let again = copy(&source, &target, PASSWORD, &[]);
    assert_eq!(again["copied"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["already_there"], 2);

    let day3 = backup(&source, &days[2]);
    let third = copy(&source, &target, PASSWORD, &["--tag", "db"]);
    let copied = third["copied"].as_array().unwrap();
    assert_eq!(copied.len(), 1, "{third}");
    let (in_source_added, in_target_added) = (
        day3["bytes_added"].as_u64().unwrap(),
        copied[0]["bytes_added"].as_u64().unwrap(),
    );
    assert!(
        in_target_added as f64 <= 1.3 * in_source_added as f64,
        "day 3 added {in_source_added} in the source, {in_target_added} in the copy"
    );

    // Time, host, tags and name come along; every copy restores to its stream.
    let (from, to) = (snapshots(&source), snapshots(&target));
    assert_eq!(from.len(), 3);
    assert_eq!(to.len(), 3);
    for (a, b) in from.iter().zip(&to) {
        for field in ["time", "hostname", "tags", "name", "size"] {
            assert_eq!(a[field], b[field], "{field}: {a} {b}");
        }
        let restored = stdout_of(bkp(&target).args(["restore", b["id"].as_str().unwrap()]));
        assert_eq!(
            restored,
            stdout_of(bkp(&source).args(["restore", a["id"].as_str().unwrap()]))
        );
    }
    assert_eq!(
        stdout_of(bkp(&target).args(["restore", "latest", "--tag", "db"])),
        days[2]
    );
    bkp(&target)
        .args(["check", "--read-data"])
        .assert()
        .success();
    let _ = in_source;
}

#[test]
fn a_killed_copy_is_finished_by_the_next_one_and_nothing_is_copied_twice() {
    let (_s, source) = local_repo();
    let (_t, target) = local_repo();
    let big = common::random_bytes(48 << 20, 3);
    backup(&source, &dumpgen::dump(2 << 20, 1));
    backup(&source, &big);
    let mut child = common::bkp_std(target.to_str().unwrap())
        .env("BKP_FROM_REPOSITORY", &source)
        .env("BKP_FROM_PASSWORD", PASSWORD)
        .args(["copy", "--quiet"])
        .spawn()
        .unwrap();
    // Killed while it copies the second snapshot (or, on a fast machine, after it is done).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while snapshots(&target).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    child.kill().unwrap();
    child.wait().unwrap();
    let before = snapshots(&target).len();
    assert!((1..=2).contains(&before), "{before}");

    let rerun = copy(&source, &target, PASSWORD, &[]);
    assert_eq!(
        rerun["copied"].as_array().unwrap().len() + before,
        2,
        "{rerun}"
    );
    assert_eq!(rerun["already_there"], before);
    assert_eq!(snapshots(&target).len(), 2);
    let ids: Vec<String> = snapshots(&target)
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stdout_of(bkp(&target).args(["restore", &ids[1]])), big);
    bkp(&target)
        .args(["check", "--read-data"])
        .assert()
        .success();
}

#[test]
fn a_format_2_repository_copies_into_a_new_one() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v2");
    let (_t, target) = local_repo();
    let copied = copy(&fixture, &target, "fixture", &["--tag", "fixture"]);
    assert_eq!(copied["copied"].as_array().unwrap().len(), 3, "{copied}");
    for (a, b) in snapshots(&target).iter().zip(
        run_json(
            bkp(&fixture)
                .env("BKP_PASSWORD", "fixture")
                .args(["snapshots", "--json"]),
        )
        .as_array()
        .unwrap(),
    ) {
        let from_fixture = stdout_of(
            bkp(&fixture)
                .env("BKP_PASSWORD", "fixture")
                .args(["restore", b["id"].as_str().unwrap()]),
        );
        assert_eq!(
            stdout_of(bkp(&target).args(["restore", a["id"].as_str().unwrap()])),
            from_fixture
        );
    }
}

#[test]
fn copy_refuses_the_same_repository_and_a_wrong_source_password() {
    let (_s, source) = local_repo();
    backup(&source, b"one snapshot");
    let same = bkp(&source)
        .env("BKP_FROM_REPOSITORY", &source)
        .env("BKP_FROM_PASSWORD", PASSWORD)
        .arg("copy")
        .output()
        .unwrap();
    assert!(!same.status.success());
    assert!(String::from_utf8_lossy(&same.stderr).contains("same repository"));
    let (_t, target) = local_repo();
    bkp(&target)
        .env("BKP_FROM_REPOSITORY", &source)
        .env("BKP_FROM_PASSWORD", "not it")
        .arg("copy")
        .assert()
        .code(4);
    assert!(snapshots(&target).is_empty());
}
