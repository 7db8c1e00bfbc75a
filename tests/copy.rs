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

/// `data` with `edits` small changes spread over it (a few rows updated).
fn edited(data: &[u8], edits: usize) -> Vec<u8> {
    let mut out = data.to_vec();
    for n in 1..=edits {
        let at = out.len() * n / (edits + 1);
        out[at..at + 12].copy_from_slice(b"edited-row!!");
    }
    out
}

/// Ranged and whole reads `repo`'s store has made so far.
fn reads(repo: &bkp::Repository) -> u64 {
    repo.store()
        .request_counts()
        .iter()
        .filter(|(kind, _)| matches!(kind, bkp::RequestKind::Get | bkp::RequestKind::GetRange))
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn repositories_that_share_chunking_copy_only_the_chunks_the_target_lacks() {
    use bkp::{BackupOptions, InitOptions, KdfParams, Repository, Store};
    let source = common::memory_repo();
    let shared = Repository::init(
        Store::memory(),
        PASSWORD.as_bytes(),
        &InitOptions {
            kdf: KdfParams::INSECURE_FAST,
            chunker: source.config().chunker,
            chunking_keys: Some(source.chunking_keys().unwrap()),
        },
    )
    .unwrap();
    let own = common::memory_repo();
    // Small frames and packs, so that a few changed rows are a few frames of many.
    let small = BackupOptions {
        group_size: 64 << 10,
        pack_size: 256 << 10,
        tags: vec!["db".into()],
        ..BackupOptions::default()
    };
    let day1 = dumpgen::dump(6 << 20, 1);
    let day2 = edited(&day1, 3);
    let mut added_in_source = 0;
    for day in [&day1, &day2] {
        let source_stream = bkp::Source::spawn(std::io::Cursor::new(day.clone()));
        added_in_source = bkp::backup(&source, source_stream, &small, &mut |_| {})
            .unwrap()
            .bytes_stored;
    }
    let entries = source.snapshots(&[]).unwrap();
    assert_eq!(entries.len(), 2);

    let mut day2_reads = Vec::new();
    for target in [&shared, &own] {
        bkp::copy(&source, target, entries[..1].to_vec(), &small, &mut |_| {}).unwrap();
        let before = reads(&source);
        let summary = bkp::copy(&source, target, entries.clone(), &small, &mut |_| {}).unwrap();
        day2_reads.push(reads(&source) - before);
        assert_eq!((summary.copied.len(), summary.already_there), (1, 1));
        // Sharing chunking, the copy deduplicates by id against everything of day 1 (a few
        // tens of KB here, which move by a frame's size with which frames become bases).
        let added = summary.copied[0].2;
        assert!(
            !std::ptr::eq(target, &shared) || added <= added_in_source * 13 / 10 + (16 << 10),
            "day 2 added {added_in_source} in the source, {added} in the copy"
        );
        let latest = target.find_snapshot("latest", &["db".into()]).unwrap();
        let mut restored = Vec::new();
        bkp::restore(target, &latest, &mut restored, &mut |_| {}).unwrap();
        assert!(restored == day2, "the copy restores to day 2");
        let report = bkp::check(target, bkp::ReadData::All, &mut |_| {}).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }
    // Sharing the chunking keys, the source reads the changed chunks' frames (and their
    // bases), the headers and the tree; otherwise the whole stream.
    let (cut, stream) = (day2_reads[0], day2_reads[1]);
    assert!(
        cut * 3 <= stream,
        "day 2's copy read {cut} times from the source sharing chunking, {stream} times not"
    );
}

#[test]
fn a_repository_made_to_share_chunking_copies_by_chunk_and_a_damaged_source_chunk_stops_it() {
    let (_s, source) = local_repo();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("offsite");
    // A wrong source password creates nothing.
    bkp(&target)
        .env("BKP_FROM_PASSWORD", "not it")
        .args([
            "init",
            "--copy-chunker-params-from",
            source.to_str().unwrap(),
        ])
        .assert()
        .code(4);
    assert!(!target.exists());
    bkp(&target)
        .env("BKP_FROM_PASSWORD", PASSWORD)
        .args([
            "init",
            "--copy-chunker-params-from",
            source.to_str().unwrap(),
        ])
        .assert()
        .success();

    let day1 = dumpgen::dump(3 << 20, 1);
    backup(&source, &day1);
    let first = copy(&source, &target, PASSWORD, &[]);
    assert_eq!(first["copied"].as_array().unwrap().len(), 1, "{first}");
    assert_eq!(
        stdout_of(bkp(&target).args(["restore", "latest", "--tag", "db"])),
        day1
    );

    // Day 2's new chunks are in the source's newest pack: damaged, the copy stops and
    // records nothing.
    let day2 = edited(&day1, 2);
    backup(&source, &day2);
    let newest = common::files_under(&source, "packs")
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .unwrap();
    let good = std::fs::read(&newest).unwrap();
    let mut bad = good.clone();
    // Frames come first, the header last.
    bad[good.len() / 4] ^= 0x01;
    std::fs::write(&newest, &bad).unwrap();
    bkp(&target)
        .env("BKP_FROM_REPOSITORY", &source)
        .env("BKP_FROM_PASSWORD", PASSWORD)
        .arg("copy")
        .assert()
        .code(5);
    assert_eq!(snapshots(&target).len(), 1);

    std::fs::write(&newest, &good).unwrap();
    let second = copy(&source, &target, PASSWORD, &[]);
    assert_eq!(second["copied"].as_array().unwrap().len(), 1, "{second}");
    assert_eq!(
        stdout_of(bkp(&target).args(["restore", "latest", "--tag", "db"])),
        day2
    );
    bkp(&target)
        .args(["check", "--read-data"])
        .assert()
        .success();
}
