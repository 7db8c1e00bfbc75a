//! `bkp forget`: retention per host and tag set, dry runs, explicit removal. The policy itself
//! is unit-tested on calendars in src/retention.rs.

mod common;

use std::path::Path;

use common::{bkp, local_repo, run_json};
use predicates::prelude::*;

fn backup(repo: &Path, host: &str, tag: &str, data: &[u8]) -> String {
    let mut cmd = bkp(repo);
    cmd.args(["backup", "--json", "--host", host, "--tag", tag])
        .write_stdin(data.to_vec());
    run_json(&mut cmd)["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn snapshot_ids(repo: &Path) -> Vec<String> {
    common::snapshot_ids(&mut bkp(repo))
}

fn forget_json(repo: &Path, args: &[&str]) -> serde_json::Value {
    run_json(bkp(repo).arg("forget").args(args).arg("--json"))
}

#[test]
fn retention_applies_per_host_and_tag_set_and_dry_runs_change_nothing() {
    let (_dir, repo) = local_repo();
    let shop: Vec<String> = (0..3)
        .map(|i| backup(&repo, "db1", "shop", format!("shop day {i}").as_bytes()))
        .collect();
    let crm: Vec<String> = (0..2)
        .map(|i| backup(&repo, "db1", "crm", format!("crm day {i}").as_bytes()))
        .collect();
    let other_host = backup(&repo, "db2", "shop", b"shop on another host");

    let plan = forget_json(&repo, &["--keep-last", "1", "--dry-run"]);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["forgotten"], 3);
    let groups = plan["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 3, "{plan}");
    let group = |host: &str, tag: &str| {
        groups
            .iter()
            .find(|g| g["host"] == host && g["tags"][0] == tag)
            .unwrap_or_else(|| panic!("no group {host} {tag} in {plan}"))
    };
    let kept = |g: &serde_json::Value| -> Vec<String> {
        g["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["keep"] == true)
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(kept(group("db1", "shop")), vec![shop[2].clone()]);
    assert_eq!(kept(group("db1", "crm")), vec![crm[1].clone()]);
    assert_eq!(kept(group("db2", "shop")), vec![other_host.clone()]);
    assert_eq!(group("db1", "shop")["snapshots"][2]["reasons"][0], "last");
    assert_eq!(snapshot_ids(&repo).len(), 6, "a dry run removes nothing");

    // For real, only the shop series: the other host's shop snapshot and crm are untouched.
    bkp(&repo)
        .args(["forget", "--tag", "shop", "--keep-last", "2"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("forgot 1 snapshot(s)").and(predicate::str::contains("prune")),
        );
    let left = snapshot_ids(&repo);
    assert_eq!(left.len(), 5);
    assert!(!left.contains(&shop[0]) && left.contains(&other_host) && left.contains(&crm[0]));

    // Grouped by tags alone, both hosts' shop snapshots are one series.
    let plan = forget_json(
        &repo,
        &["--tag", "shop", "--group-by", "tags", "--keep-last", "1"],
    );
    assert_eq!(plan["groups"].as_array().unwrap().len(), 1);
    assert_eq!(plan["forgotten"], 2);
    assert_eq!(snapshot_ids(&repo).len(), 3);

    // What is kept still restores.
    let restored = common::stdout_of(bkp(&repo).args(["restore", "latest", "--tag", "crm"]));
    assert_eq!(restored, b"crm day 1");
}

#[test]
fn snapshots_can_be_forgotten_by_id_and_a_policy_is_required() {
    let (_dir, repo) = local_repo();
    let first = backup(&repo, "db1", "shop", b"one");
    let second = backup(&repo, "db1", "shop", b"two");
    bkp(&repo)
        .args(["forget", &first[..8]])
        .assert()
        .success()
        .stdout(predicate::str::contains(&first[..8]));
    assert_eq!(snapshot_ids(&repo), vec![second.clone()]);
    bkp(&repo)
        .arg("forget")
        .assert()
        .failure()
        .stderr(predicate::str::contains("no --keep-* rule"));
    bkp(&repo)
        .args(["forget", "--keep-last", "1", "--group-by", "hostname"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("grouping"));
    bkp(&repo)
        .args(["forget", &second[..8], "--keep-last", "1"])
        .assert()
        .code(2);
    assert_eq!(snapshot_ids(&repo), vec![second]);
}
