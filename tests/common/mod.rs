//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod crash;
pub mod db;
pub mod dumpgen;
pub mod proxy;
pub mod s3;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use assert_cmd::cargo::CommandCargoExt;
use bkp::{InitOptions, KdfParams, Repository, Store};

pub const PASSWORD: &str = "correct horse battery staple";

/// A repository in memory with a cheap KDF.
pub fn memory_repo() -> Repository {
    let options = InitOptions {
        kdf: KdfParams::INSECURE_FAST,
        ..InitOptions::default()
    };
    Repository::init(Store::memory(), PASSWORD.as_bytes(), &options).unwrap()
}

pub fn random_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new_keyed(&[seed; 32])
        .finalize_xof()
        .fill(&mut out);
    out
}

/// `bkp` with the test password and a cheap KDF, pointed at `repo`.
pub fn bkp(repo: &Path) -> Command {
    Command::from_std(bkp_std(repo.to_str().unwrap()))
}

/// [`bkp`] for any location, as a std Command (to spawn it).
pub fn bkp_std(location: &str) -> std::process::Command {
    let mut cmd = std::process::Command::cargo_bin("bkp").unwrap();
    cmd.env_clear()
        .env("BKP_REPOSITORY", location)
        .env("BKP_PASSWORD", PASSWORD)
        .env("BKP_INSECURE_FAST_KDF", "1");
    cmd
}

/// A fresh, initialised repository directory.
pub fn local_repo() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    bkp(&repo).arg("init").assert().success();
    (dir, repo)
}

/// Runs `cmd`, asserts that it succeeds, and returns what it printed.
pub fn stdout_of(cmd: &mut Command) -> Vec<u8> {
    cmd.assert().success().get_output().stdout.clone()
}

/// Runs `cmd`, asserts that it succeeds, and parses what it printed as JSON.
pub fn run_json(cmd: &mut Command) -> serde_json::Value {
    let out = stdout_of(cmd);
    serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out)))
}

/// Backs up `data` with the CLI and returns the new snapshot's full id.
pub fn backup_cli(repo: &Path, data: &[u8], tags: &[&str]) -> String {
    let mut cmd = bkp(repo);
    cmd.args(["backup", "--json"]);
    for t in tags {
        cmd.args(["--tag", t]);
    }
    let json = run_json(cmd.write_stdin(data.to_vec()));
    json["snapshot_id"].as_str().unwrap().to_string()
}

/// The repository's snapshot ids, oldest first.
pub fn snapshot_ids(cmd: &mut Command) -> Vec<String> {
    run_json(cmd.args(["snapshots", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

/// Copies a directory tree (a committed fixture, to change it).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Every file under `dir/sub`.
pub fn files_under(dir: &Path, sub: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join(sub)];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// What every store backend must do alike (docs/FORMAT.md §2): create-only puts with exactly one
/// winner in a race, whole and ranged reads, sizes, sorted recursive listing, deletion.
pub fn store_conformance(store: &Store) {
    assert!(store.put_new("a/b", b"one".to_vec()).unwrap());
    assert!(!store.put_new("a/b", b"two".to_vec()).unwrap());
    assert_eq!(&store.get("a/b").unwrap()[..], b"one");
    assert_eq!(&store.get_range("a/b", 1..3).unwrap()[..], b"ne");
    assert!(matches!(store.get("nope"), Err(bkp::Error::Missing { .. })));
    assert_eq!(store.size("a/b").unwrap(), Some(3));
    assert_eq!(store.size("a/nope").unwrap(), None);

    let big = random_bytes(9 << 20, 42);
    assert!(store.put_new("a/c/big", big.clone()).unwrap());
    assert!(store.get("a/c/big").unwrap() == big);
    let range = (5 << 20) + 3..(6 << 20) + 77;
    assert!(
        store.get_range("a/c/big", range.clone()).unwrap()[..]
            == big[range.start as usize..range.end as usize]
    );
    let listed = |dir: &str| -> Vec<(String, u64)> {
        let now = std::time::SystemTime::now();
        let objects = store.list(dir).unwrap();
        for o in &objects {
            let age = now.duration_since(o.modified).unwrap_or_default();
            assert!(age.as_secs() < 3600, "{} written {age:?} ago?", o.name);
        }
        objects.into_iter().map(|o| (o.name, o.size)).collect()
    };
    let big_len = big.len() as u64;
    assert_eq!(
        listed("a"),
        [("a/b".to_string(), 3), ("a/c/big".to_string(), big_len)]
    );
    assert_eq!(listed("a/c"), [("a/c/big".to_string(), big_len)]);
    assert!(store.list("empty").unwrap().is_empty());

    // Eight writers race to create one object: exactly one wins, and its bytes are what stays.
    let winners: Vec<(usize, bool)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| scope.spawn(move || (i, store.put_new("race", vec![i as u8; 1000]).unwrap())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won: Vec<usize> = winners
        .iter()
        .filter(|(_, w)| *w)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(won.len(), 1, "{winners:?}");
    assert_eq!(
        &store.get("race").unwrap()[..],
        &vec![won[0] as u8; 1000][..]
    );

    store.delete("a/b").unwrap();
    assert!(!store.exists("a/b").unwrap());
    store.barrier().unwrap();
}
