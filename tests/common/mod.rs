//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod db;
pub mod dumpgen;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
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
    let mut cmd = Command::cargo_bin("bkp").unwrap();
    cmd.env_clear()
        .env("BKP_REPOSITORY", repo)
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

/// Backs up `data` with the CLI and returns the new snapshot's full id.
pub fn backup_cli(repo: &Path, data: &[u8], tags: &[&str]) -> String {
    let mut cmd = bkp(repo);
    cmd.args(["backup", "--json"]);
    for t in tags {
        cmd.args(["--tag", t]);
    }
    let out = cmd
        .write_stdin(data.to_vec())
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
    json["snapshot_id"].as_str().unwrap().to_string()
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
