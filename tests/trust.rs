//! What bkp reads and what it reveals (issue 13): damaged, foreign and planted objects, wrong
//! clocks, and the secrets an operator's command line or umask could leak.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{bkp, files_under, local_repo, snapshot_ids};

#[test]
fn a_dump_command_carrying_a_password_is_refused_without_showing_it() {
    let (_dir, repo) = local_repo();
    for command in [
        &["mysqldump", "--password", "hunter2", "shop"][..],
        &["sh", "-c", "PGPASSWORD=hunter2 pg_dump crm"],
        &["pg_dump", "postgresql://app:hunter2@db/crm"],
    ] {
        let out = bkp(&repo)
            .args(["backup", "--tag", "shop", "--"])
            .args(command)
            .assert()
            .code(2)
            .get_output()
            .clone();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("carries a password"), "{stderr}");
        assert!(stderr.contains(".pgpass"), "{stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    assert!(snapshot_ids(&mut bkp(&repo)).is_empty());
}

/// Modes of everything under `dir`, as (path, mode & 0o777).
fn modes(dir: &Path) -> Vec<(String, u32)> {
    let mut out = vec![(
        dir.display().to_string(),
        std::fs::metadata(dir).unwrap().permissions().mode() & 0o777,
    )];
    for file in files_under(dir, "") {
        let mut path = file.as_path();
        while path != dir {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            out.push((path.display().to_string(), mode));
            path = path.parent().unwrap();
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn repository_and_restored_files_are_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let run = |args: &str, input: &[u8]| {
        let mut cmd = assert_cmd::Command::new("sh");
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap())
            .env("BKP_REPOSITORY", &repo)
            .env("BKP_PASSWORD", common::PASSWORD)
            .env("BKP_INSECURE_FAST_KDF", "1")
            .env("BKP", assert_cmd::cargo::cargo_bin("bkp"))
            .args(["-c", &format!("umask 000; \"$BKP\" {args}")])
            .write_stdin(input.to_vec())
            .assert()
            .success();
    };
    run("init", b"");
    run("backup --tag t", &common::random_bytes(300_000, 3));
    let restored = dir.path().join("restored.sql");
    run(
        &format!("restore latest --output {}", restored.display()),
        b"",
    );
    for (path, mode) in modes(&repo) {
        let is_dir = Path::new(&path).is_dir();
        let private = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(mode, private, "{path} has mode {mode:o}");
    }
    let mode = std::fs::metadata(&restored).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
