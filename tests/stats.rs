//! `bkp stats`: totals, dedup, and what each snapshot alone uses (so what forgetting it frees).

mod common;

use std::path::Path;

use common::{backup_cli, bkp, dumpgen, local_repo, random_bytes, run_json};

fn stats(repo: &Path, tags: &[&str]) -> serde_json::Value {
    let mut cmd = bkp(repo);
    cmd.args(["stats", "--json"]);
    for tag in tags {
        cmd.args(["--tag", tag]);
    }
    run_json(&mut cmd)
}

fn alone(report: &serde_json::Value, id: &str) -> u64 {
    report["per_snapshot"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap()["alone_bytes"]
        .as_u64()
        .unwrap()
}

#[test]
fn shared_chunks_belong_to_no_snapshot_alone() {
    let (_dir, repo) = local_repo();
    let a = random_bytes(1_000_000, 1);
    let b = random_bytes(1_000_000, 2);
    let a1 = backup_cli(&repo, &a, &["a"]);
    let b1 = backup_cli(&repo, &b, &["b"]);
    let a2 = backup_cli(&repo, &a, &["a"]);

    let all = stats(&repo, &[]);
    assert_eq!(all["snapshots"], 3);
    assert_eq!(all["logical_bytes"], 3_000_000);
    let unique = all["unique_bytes"].as_u64().unwrap();
    assert!((2_000_000..2_100_000).contains(&unique), "{all}");
    let dedup = all["dedup_ratio"].as_f64().unwrap();
    assert!((1.4..1.51).contains(&dedup), "{all}");
    assert_eq!(alone(&all, &a1), 0);
    assert_eq!(alone(&all, &a2), 0);
    // Random data does not compress: b alone holds about its size.
    assert!(alone(&all, &b1) > 950_000, "{all}");
    assert!(all["stored_bytes"].as_u64().unwrap() > 2_000_000);

    // Restricted to tag a, a's two snapshots still share everything.
    let only_a = stats(&repo, &["a"]);
    assert_eq!(only_a["snapshots"], 2);
    assert_eq!(alone(&only_a, &a1), 0);
}

#[test]
fn a_base_frame_is_not_freed_by_forgetting_its_snapshot() {
    let (_dir, repo) = local_repo();
    let day1 = backup_cli(&repo, &dumpgen::dump(4_000_000, 1), &["db"]);
    let day2 = backup_cli(&repo, &dumpgen::dump(4_000_000, 2), &["db"]);
    let report = stats(&repo, &[]);
    let stored = report["pack_bytes"].as_u64().unwrap();
    // Most of day 1's chunks changed on day 2, but day 2 stored them as deltas of day 1's
    // frames, so forgetting day 1 frees little.
    assert!(alone(&report, &day1) * 4 < stored, "{report}");
    assert!(alone(&report, &day2) > 0, "{report}");
    bkp(&repo)
        .arg("stats")
        .assert()
        .success()
        .stdout(predicates::str::contains("only it uses"));
}
