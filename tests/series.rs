//! Series markers (format 3, docs/FORMAT.md §11.1): `latest` and `--tag` read their own series
//! only, whatever else the repository holds; markers that lie are passed over; forget, prune,
//! check and upgrade keep markers and snapshots in step.

mod common;

use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bkp::{BackupOptions, Repository, SnapshotEntry};
use common::{bkp, dumpgen, memory_repo};

fn backup(repo: &Repository, data: &[u8], tags: &[&str]) -> SnapshotEntry {
    let options = BackupOptions {
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..BackupOptions::default()
    };
    let source = bkp::Source::spawn(Cursor::new(data.to_vec()));
    bkp::backup(repo, source, &options, &mut |_| {})
        .unwrap()
        .snapshot
}

fn tags(list: &[&str]) -> Vec<String> {
    list.iter().map(|t| t.to_string()).collect()
}

fn dump(day: u32) -> Vec<u8> {
    let mut out = Vec::new();
    dumpgen::write_dump(&mut out, 200_000, day).unwrap();
    out
}

/// Snapshots in a known order, even on a coarse clock.
fn backup_later(repo: &Repository, data: &[u8], tags: &[&str]) -> SnapshotEntry {
    std::thread::sleep(Duration::from_millis(5));
    backup(repo, data, tags)
}

/// Store requests `f` makes.
fn requests<T>(repo: &Repository, f: impl FnOnce() -> T) -> (T, u64) {
    let before = repo.store().request_count();
    let out = f();
    (out, repo.store().request_count() - before)
}

fn fill_snapshots(repo: &Repository, snapshots: u64) {
    let filler = bkp::synthetic::Filler {
        chunks: 0,
        chunks_per_index_file: 1,
        snapshots,
        series: 20,
        seed: 1,
    };
    bkp::synthetic::fill(repo, &filler, &mut |_, _| {}).unwrap();
}

#[test]
fn latest_and_tag_listings_read_only_their_series_whatever_the_repository_holds() {
    let repo = memory_repo();
    backup(&repo, &dump(1), &["bench"]);
    let newest = backup_later(&repo, &dump(2), &["bench"]);
    let bench = tags(&["bench"]);
    let latest = |repo: &Repository| requests(repo, || repo.find_latest(&bench).unwrap().0.id);
    let listing = |repo: &Repository| requests(repo, || repo.snapshots(&bench).unwrap().len());
    let (id, few) = latest(&repo);
    assert_eq!(id, newest.id);
    let (listed, few_listing) = listing(&repo);
    assert_eq!(listed, 2);

    fill_snapshots(&repo, 2_000);
    assert_eq!(repo.snapshots(&[]).unwrap().len(), 2_002);
    let (id, many) = latest(&repo);
    assert_eq!(id, newest.id);
    let (listed, many_listing) = listing(&repo);
    assert_eq!(listed, 2);
    assert_eq!(
        (few, few_listing),
        (many, many_listing),
        "2,000 more snapshots in other series cost `latest` and `snapshots --tag` no request"
    );
    assert!(
        few <= 4,
        "a listing of series, one of the series, a read: {few}"
    );
}

#[test]
fn latest_with_a_tag_is_the_newest_of_every_series_that_has_it() {
    let repo = memory_repo();
    backup(&repo, &dump(1), &["shop"]);
    let weekly = backup_later(&repo, &dump(2), &["shop", "weekly"]);
    let crm = backup_later(&repo, b"crm dump\n", &["crm"]);
    let latest = |t: &[&str]| repo.find_latest(&tags(t)).unwrap().0.id;
    assert_eq!(latest(&["shop"]), weekly.id);
    assert_eq!(latest(&["weekly"]), weekly.id);
    assert_eq!(latest(&["shop", "weekly"]), weekly.id);
    assert_eq!(latest(&[]), crm.id);
    assert!(matches!(
        repo.find_latest(&tags(&["shop", "crm"])),
        Err(bkp::Error::SnapshotNotFound { .. })
    ));
    let shop: Vec<_> = repo.snapshots(&tags(&["shop"])).unwrap();
    assert_eq!(shop.len(), 2);
}

/// The markers of a repository, by name.
fn markers(repo: &Repository) -> Vec<String> {
    repo.store()
        .list("series")
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect()
}

#[test]
fn markers_that_lie_or_point_nowhere_are_passed_over() {
    let repo = memory_repo();
    let old = backup(&repo, &dump(1), &["shop"]);
    let new = backup_later(&repo, &dump(2), &["shop"]);
    let [newer_marker, older_marker] = markers(&repo).try_into().unwrap();
    assert!(newer_marker.ends_with(&new.id.to_hex()));
    assert!(older_marker.ends_with(&old.id.to_hex()));
    let (folder, _) = newer_marker.rsplit_once('/').unwrap();
    let store = repo.store();
    let future = u64::MAX
        - SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
        - 60_000_000_000;
    // A planted marker claiming the old snapshot is the newest; one naming no snapshot.
    let lying = format!("{folder}/{future:016x}-{}", old.id);
    store.put_new(&lying, Vec::new()).unwrap();
    let nowhere = format!("{folder}/{:016x}-{}", future - 1, "ab".repeat(32));
    store.put_new(&nowhere, Vec::new()).unwrap();
    // A series folder that is not this repository's.
    store
        .put_new(&format!("series/{}/x", "00".repeat(32)), Vec::new())
        .unwrap();

    let (latest, skipped) = repo.find_latest(&tags(&["shop"])).unwrap();
    assert_eq!(latest.id, new.id);
    assert!(skipped.is_empty());
    let damaged: Vec<String> = repo.damaged_objects().into_iter().map(|(o, _)| o).collect();
    assert!(damaged.contains(&lying), "{damaged:?}");
    assert!(
        damaged.iter().any(|o| o.starts_with("series/0000")),
        "{damaged:?}"
    );
    assert!(
        !damaged.contains(&nowhere),
        "a marker whose snapshot is gone is not damage"
    );
}

#[test]
fn forget_and_prune_remove_markers_with_their_snapshots() {
    let repo = memory_repo();
    let old = backup(&repo, &dump(1), &["shop"]);
    let new = backup_later(&repo, &dump(2), &["shop"]);
    bkp::forget::remove(&repo, &[old.id]).unwrap();
    let left = markers(&repo);
    assert_eq!(left.len(), 1);
    assert!(left[0].ends_with(&new.id.to_hex()));

    // A marker whose snapshot went without it (a forget cut short): prune removes it once it is
    // a grace period old, never a young one (a backup writes its marker just before its
    // snapshot).
    repo.store()
        .delete_many(&[format!("snapshots/{}", new.id)])
        .unwrap();
    let prune = |now| {
        let options = bkp::prune::PruneOptions::new(bkp::prune::MIN_GRACE, now);
        bkp::prune::prune(&repo, &options).unwrap()
    };
    assert_eq!(prune(SystemTime::now()).deleted_markers, 0);
    assert_eq!(markers(&repo).len(), 1);
    let later = SystemTime::now() + Duration::from_secs(2 * 86_400);
    assert_eq!(prune(later).deleted_markers, 1);
    assert!(markers(&repo).is_empty());
}

fn run(repo: &Path, args: &[&str]) -> std::process::Output {
    bkp(repo)
        .env("BKP_PASSWORD", "fixture")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn upgrade_brings_v1_and_v2_repositories_to_the_current_format() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (fixture, snapshots) in [("repo-v1", 2), ("repo-v2", 3)] {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join(fixture);
        common::copy_dir(&fixtures.join(fixture), &repo);
        let before = run(&repo, &["restore", "latest"]).stdout;
        assert!(!before.is_empty());

        let upgraded = run(&repo, &["upgrade"]);
        assert!(upgraded.status.success(), "{upgraded:?}");
        let said = String::from_utf8_lossy(&upgraded.stdout).to_string();
        assert!(
            said.contains(&format!("format {}", bkp::FORMAT_VERSION))
                && said.contains(&format!("{snapshots} series marker")),
            "{said}"
        );
        assert_eq!(common::files_under(&repo, "series").len(), snapshots);
        let check = run(&repo, &["check", "--read-data"]);
        assert!(check.status.success(), "{fixture}: {check:?}");
        assert_eq!(run(&repo, &["restore", "latest"]).stdout, before);
        let again = run(&repo, &["upgrade"]);
        assert!(String::from_utf8_lossy(&again.stdout).contains(" 0 series marker"));

        // A snapshot without its marker (one an older bkp wrote meanwhile) is reported by
        // check and given one by upgrade.
        let marker = common::files_under(&repo, "series").pop().unwrap();
        std::fs::remove_file(&marker).unwrap();
        let check = run(&repo, &["check"]);
        assert!(!check.status.success());
        assert!(
            String::from_utf8_lossy(&check.stdout).contains("no series marker")
                || String::from_utf8_lossy(&check.stderr).contains("no series marker"),
            "{check:?}"
        );
        assert!(run(&repo, &["upgrade"]).status.success());
        assert!(marker.exists());
        assert!(run(&repo, &["check"]).status.success());
    }
}

#[test]
fn backup_and_restore_requests_do_not_grow_with_the_repository() {
    let repo = memory_repo();
    let mut day1 = Vec::new();
    dumpgen::write_dump(&mut day1, 3_000_000, 1).unwrap();
    let mut day2 = Vec::new();
    dumpgen::write_dump(&mut day2, 3_000_000, 2).unwrap();
    backup(&repo, &day1, &["bench"]);
    backup_later(&repo, &day2, &["bench"]);
    let bench = tags(&["bench"]);
    // The nightly backup of an unchanged database, and `restore latest` of it.
    let measure = |repo: &Repository| {
        let (_, backup_requests) = requests(repo, || backup_later(repo, &day2, &["bench"]));
        let (restored, restore_requests) = requests(repo, || {
            let (latest, _) = repo.find_latest(&bench).unwrap();
            let mut out = Vec::new();
            bkp::restore(repo, &latest, &mut out, &mut |_| {}).unwrap();
            out
        });
        assert!(restored == day2);
        (backup_requests, restore_requests)
    };
    let small = measure(&repo);
    // 400 index files of other backups (of packs that are never read) and 2,000 snapshots.
    let filler = bkp::synthetic::Filler {
        chunks: 400_000,
        chunks_per_index_file: 1_000,
        snapshots: 2_000,
        series: 20,
        seed: 2,
    };
    bkp::synthetic::fill(&repo, &filler, &mut |_, _| {}).unwrap();
    assert!(repo.store().list("index").unwrap().len() > 400);
    let large = measure(&repo);
    assert_eq!(
        small, large,
        "(backup, restore) requests with 400 more index files and 2,000 more snapshots"
    );
}

#[test]
fn two_hosts_backing_up_one_series_at_once_and_a_prune_leave_every_snapshot_restorable() {
    let repo = memory_repo();
    let day = |n| {
        let mut out = Vec::new();
        dumpgen::write_dump(&mut out, 3_000_000, n).unwrap();
        out
    };
    let first = backup(&repo, &day(1), &["shop"]);
    backup_later(&repo, &day(2), &["shop"]);
    // Both hosts take day 2's snapshot as their parent; a prune runs meanwhile, after day 1
    // was forgotten (its packs hold bases the others still need).
    bkp::forget::remove(&repo, &[first.id]).unwrap();
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| backup(&repo, &day(3), &["shop"]));
        let b = scope.spawn(|| backup(&repo, &day(4), &["shop"]));
        let options = bkp::prune::PruneOptions::new(bkp::prune::MIN_GRACE, SystemTime::now());
        bkp::prune::prune(&repo, &options).unwrap();
        (a.join().unwrap(), b.join().unwrap())
    });
    // And the prune a grace period later deletes what it marked.
    let later = SystemTime::now() + Duration::from_secs(2 * 86_400);
    let options = bkp::prune::PruneOptions::new(bkp::prune::MIN_GRACE, later);
    bkp::prune::prune(&repo, &options).unwrap();
    for (entry, data) in [(&a, day(3)), (&b, day(4))] {
        let mut out = Vec::new();
        bkp::restore(&repo, entry, &mut out, &mut |_| {}).unwrap();
        assert!(out == data);
    }
    // The next backup of the series deduplicates (and deltas) against whichever is newest, day
    // 3 or day 4: it stores a fraction of the dump.
    let next = backup_later(&repo, &day(4), &["shop"]);
    assert!(
        next.snapshot.added.stored < day(4).len() as u64 / 10,
        "{:?}",
        next.snapshot.added
    );
    let report = bkp::check(&repo, bkp::ReadData::All, &mut |_| {}).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[test]
fn a_long_series_is_listed_from_its_catalog_not_one_read_per_snapshot() {
    let repo = memory_repo();
    let filler = bkp::synthetic::Filler {
        chunks: 0,
        chunks_per_index_file: 1,
        snapshots: 300,
        series: 1,
        seed: 3,
    };
    bkp::synthetic::fill(&repo, &filler, &mut |_, _| {}).unwrap();
    let series = tags(&["synthetic-00"]);
    let (listed, uncatalogued) = requests(&repo, || repo.snapshots(&series).unwrap());
    assert_eq!(listed.len(), 300);
    assert!(uncatalogued > 300, "one read per snapshot: {uncatalogued}");

    // The next backup of the series finds 300 snapshots in no catalog and writes one.
    let newest = backup(&repo, b"synthetic dump\n", &["synthetic-00"]);
    assert_eq!(repo.store().list("catalogs").unwrap().len(), 1);
    let (listed, catalogued) = requests(&repo, || repo.snapshots(&series).unwrap());
    assert_eq!(listed.len(), 301);
    assert_eq!(listed.last().unwrap().id, newest.id);
    assert!(catalogued <= 6, "listings and one catalog: {catalogued}");
    // What the catalog says is what the snapshots say, but for where the stream uses each
    // pack, which only a restore needs (it reads the snapshot object).
    for entry in &listed {
        let mut stored = repo.read_snapshot(entry.id).unwrap().snapshot;
        for pack in &mut stored.packs {
            pack.uses = None;
        }
        assert_eq!(stored, entry.snapshot);
    }

    // A forgotten snapshot leaves the listing though the catalog still has it.
    bkp::forget::remove(&repo, &[listed[0].id]).unwrap();
    let after = repo.snapshots(&series).unwrap();
    assert_eq!(after.len(), 300);
    assert!(after.iter().all(|e| e.id != listed[0].id));

    // A planted catalog that disagrees with the markers is damaged and ignored.
    let catalog_dir = repo.store().list("catalogs").unwrap()[0].name.clone();
    let (dir, _) = catalog_dir.rsplit_once('/').unwrap();
    repo.store()
        .put_new(&format!("{dir}/{}", "cd".repeat(32)), b"junk".to_vec())
        .unwrap();
    assert_eq!(repo.snapshots(&series).unwrap().len(), 300);
    assert!(
        repo.damaged_objects()
            .iter()
            .any(|(o, _)| o.starts_with("catalogs/"))
    );
}
