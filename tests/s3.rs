//! S3 repositories against a real S3 server (SeaweedFS on loopback, started and stopped here).
//! One test runs every scenario in turn, because the server binds fixed internal ports.

mod common;

use std::io::{Cursor, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use bkp::prune::PruneOptions;
use bkp::{BackupOptions, InitOptions, KdfParams, Repository};
use common::s3::S3Server;
use common::{PASSWORD, dumpgen, run_json, store_conformance};
use predicates::prelude::*;

/// `bkp` with the test password, a cheap KDF and the server's S3 settings, on `url`.
fn bkp_std(server: &S3Server, url: &str) -> Command {
    let mut cmd = common::bkp_std(url);
    cmd.envs(server.env());
    cmd
}

fn bkp(server: &S3Server, url: &str) -> assert_cmd::Command {
    assert_cmd::Command::from_std(bkp_std(server, url))
}

fn snapshot_count(server: &S3Server, url: &str) -> usize {
    common::snapshot_ids(&mut bkp(server, url)).len()
}

fn backup_json(server: &S3Server, url: &str, data: &[u8]) -> serde_json::Value {
    run_json(
        bkp(server, url)
            .args(["backup", "--json", "--tag", "s3"])
            .write_stdin(data.to_vec()),
    )
}

fn restore(server: &S3Server, url: &str, snapshot: &str) -> Vec<u8> {
    common::stdout_of(bkp(server, url).args(["restore", snapshot]))
}

#[test]
fn s3_repositories_work_against_a_real_server() {
    let mut server = S3Server::start();

    // The store layer behaves as local and in-memory stores do (tests/store.rs).
    store_conformance(&server.store("conformance"));

    library_round_trip_and_dedup(&server);
    cli_round_trip_dedup_and_day_two(&server);
    a_put_only_key_backs_up_to_s3_and_deduplicates_from_its_send_log(&server);
    copy_from_local_to_s3_and_back(&server);
    concurrent_inits_have_one_winner(&server);
    wrong_credentials_and_missing_bucket_are_named(&server);
    a_server_lost_mid_backup_leaves_the_repository_intact(&mut server);
    dropped_connections_are_retried(&server);
    a_server_restart_mid_backup_is_ridden_out(&mut server);
}

fn library_round_trip_and_dedup(server: &S3Server) {
    let options = InitOptions {
        kdf: KdfParams::INSECURE_FAST,
        ..InitOptions::default()
    };
    let repo = Repository::init(server.store("library"), PASSWORD.as_bytes(), &options).unwrap();
    let dump = dumpgen::dump(12_000_000, 1);
    let backup = |data: &[u8]| {
        let source = bkp::Source::spawn(Cursor::new(data.to_vec()));
        bkp::backup(&repo, source, &BackupOptions::default(), &mut |_| {}).unwrap()
    };
    let first = backup(&dump);
    let again = backup(&dump);
    assert_eq!(
        again.bytes_stored, 4096,
        "an unchanged dump adds one snapshot"
    );
    let reopened = Repository::open(server.store("library"), PASSWORD.as_bytes()).unwrap();
    for summary in [&first, &again] {
        let mut out = Vec::new();
        bkp::restore(&reopened, &summary.snapshot, &mut out, &mut |_| {}).unwrap();
        assert!(out == dump, "restore from S3 differs");
    }
}

fn cli_round_trip_dedup_and_day_two(server: &S3Server) {
    let url = server.url("cli");
    bkp(server, &url).arg("init").assert().success();
    let day1 = dumpgen::dump(8_000_000, 1);
    let day2 = dumpgen::dump(8_000_000, 2);
    let first = backup_json(server, &url, &day1);
    let unchanged = backup_json(server, &url, &day1);
    assert_eq!(unchanged["bytes_added"], 4096);
    let second = backup_json(server, &url, &day2);
    let (added1, added2) = (
        first["bytes_added"].as_u64().unwrap(),
        second["bytes_added"].as_u64().unwrap(),
    );
    assert!(added2 * 5 < added1, "day 1 added {added1}, day 2 {added2}");
    let id = |v: &serde_json::Value| v["snapshot_id"].as_str().unwrap().to_string();
    assert!(restore(server, &url, &id(&first)) == day1);
    assert!(restore(server, &url, "latest") == day2);
    assert_eq!(snapshot_count(server, &url), 3);
    // Forget and prune a snapshot of its own data: marked, then deleted (in a batch) one grace
    // period later; the rest still restores and checks clean.
    let extra = backup_json(server, &url, &common::random_bytes(2_000_000, 5));
    let extra_id = extra["snapshot_id"].as_str().unwrap();
    bkp(server, &url)
        .args(["forget", extra_id])
        .assert()
        .success();
    // The CLI's prune marks; the deleting prunes run a grace period later, which only the
    // library can pretend (the CLI refuses grace periods under an hour).
    let repo = Repository::open(server.store("cli"), PASSWORD.as_bytes()).unwrap();
    let grace = bkp::prune::DEFAULT_GRACE;
    let prune_later = |days: u32| {
        let later = std::time::SystemTime::now() + grace * days + Duration::from_secs(60);
        serde_json::to_value(bkp::prune::prune(&repo, &PruneOptions::new(grace, later)).unwrap())
            .unwrap()
    };
    let prune = |when: &str| match when {
        "now" => run_json(bkp(server, &url).args(["prune", "--json"])),
        _ => prune_later(when.parse().unwrap()),
    };
    assert_eq!(prune("now")["newly_marked"], 1);
    let deleted = prune("1");
    assert_eq!(deleted["deleted_packs"], 1, "{deleted}");
    assert!(restore(server, &url, "latest") == day2);
    // Keep only day 2 cut to its first quarter: day 1's pack then mostly holds frames nothing
    // needs, but also the bases of the kept deltas, so it is repacked rather than kept whole.
    let cut = day2[..2_000_000].to_vec();
    let saved = bkp(server, &url)
        .args(["backup", "--json", "--tag", "s3"])
        .write_stdin(cut.clone())
        .assert()
        .code(6); // saved, flagged incomplete: the cut dump has no trailer
    let saved: serde_json::Value = serde_json::from_slice(&saved.get_output().stdout).unwrap();
    let cut_id = saved["snapshot_id"].as_str().unwrap().to_string();
    bkp(server, &url)
        .args(["forget", "--keep-last", "1"])
        .assert()
        .success();
    let marking = prune("1");
    assert!(marking["repacked_packs"].as_u64() >= Some(1), "{marking}");
    let deleting = prune("2");
    assert!(
        deleting["deleted_bytes"].as_u64() > marking["repack_bytes_written"].as_u64(),
        "{deleting} {marking}"
    );
    // `latest` never picks an incomplete dump; by id it restores.
    assert!(restore(server, &url, &cut_id) == cut);
    bkp(server, &url)
        .args(["check", "--read-data"])
        .assert()
        .success()
        .stdout(predicate::str::contains("no problems"));
}

fn a_put_only_key_backs_up_to_s3_and_deduplicates_from_its_send_log(server: &S3Server) {
    let url = server.url("put-only");
    bkp(server, &url).arg("init").assert().success();
    bkp(server, &url)
        .env("BKP_NEW_PASSWORD", "put-only password")
        .args(["key", "add", "--put-only"])
        .assert()
        .success();
    let cache = tempfile::tempdir().unwrap();
    let put_only = |data: &[u8]| {
        run_json(
            bkp(server, &url)
                .env("BKP_PASSWORD", "put-only password")
                .env("BKP_CACHE_DIR", cache.path())
                .args(["backup", "--json", "--tag", "db"])
                .write_stdin(data.to_vec()),
        )
    };
    let day1 = dumpgen::dump(6_000_000, 1);
    let day2 = dumpgen::dump(6_000_000, 2);
    let first = put_only(&day1);
    let unchanged = put_only(&day1);
    let second = put_only(&day2);
    let added = |v: &serde_json::Value| v["bytes_added"].as_u64().unwrap();
    assert!(added(&unchanged) <= 16 << 10, "{unchanged}");
    assert!(added(&second) * 5 < added(&first), "{first} {second}");
    bkp(server, &url)
        .env("BKP_PASSWORD", "put-only password")
        .args(["restore", "latest", "--tag", "db"])
        .assert()
        .code(4);
    for (json, data) in [(&first, &day1), (&unchanged, &day1), (&second, &day2)] {
        let id = json["snapshot_id"].as_str().unwrap();
        assert!(restore(server, &url, id) == *data, "{id}");
    }
    bkp(server, &url)
        .args(["check", "--read-data"])
        .assert()
        .success();
}

fn copy_from_local_to_s3_and_back(server: &S3Server) {
    let (_dir, local) = common::local_repo();
    let days: Vec<Vec<u8>> = (1..=2).map(|day| dumpgen::dump(4_000_000, day)).collect();
    for day in &days {
        common::bkp(&local)
            .args(["backup", "--tag", "db"])
            .write_stdin(day.clone())
            .assert()
            .success();
    }
    let url = server.url("copy");
    bkp(server, &url).arg("init").assert().success();
    let copy = |to: &str, from: &str| {
        run_json(
            bkp(server, to)
                .env("BKP_FROM_REPOSITORY", from)
                .env("BKP_FROM_PASSWORD", PASSWORD)
                .args(["copy", "--json"]),
        )
    };
    let to_s3 = copy(&url, local.to_str().unwrap());
    assert_eq!(to_s3["copied"].as_array().unwrap().len(), 2, "{to_s3}");
    assert_eq!(copy(&url, local.to_str().unwrap())["already_there"], 2);
    assert!(restore(server, &url, "latest") == days[1]);
    // And back, into a new local repository.
    let (_back_dir, back) = common::local_repo();
    let back_url = back.to_str().unwrap().to_string();
    let from_s3 = copy(&back_url, &url);
    assert_eq!(from_s3["copied"].as_array().unwrap().len(), 2, "{from_s3}");
    assert_eq!(
        common::stdout_of(common::bkp(&back).args(["restore", "latest", "--tag", "db"])),
        days[1]
    );
}

fn concurrent_inits_have_one_winner(server: &S3Server) {
    let url = server.url("race");
    let children: Vec<_> = (0..4)
        .map(|_| {
            bkp_std(server, &url)
                .arg("init")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outcomes: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let winners = outcomes.iter().filter(|o| o.status.success()).count();
    assert_eq!(winners, 1, "{outcomes:?}");
    for lost in outcomes.iter().filter(|o| !o.status.success()) {
        assert!(String::from_utf8_lossy(&lost.stderr).contains("already exists"));
    }
    // The winner's key opens the repository.
    backup_json(server, &url, b"after the race");
}

fn wrong_credentials_and_missing_bucket_are_named(server: &S3Server) {
    let url = server.url("cli");
    bkp(server, &url)
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .args(["snapshots"])
        .assert()
        .code(8)
        .stderr(
            predicate::str::contains("refused access")
                .and(predicate::str::contains("AWS_SECRET_ACCESS_KEY"))
                .and(predicate::str::contains("not-the-secret").not()),
        );
    bkp(server, "s3://no-such-bucket/repo")
        .args(["snapshots"])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("bucket").and(predicate::str::contains("does not exist")));
    bkp(server, "s3://no-such-bucket/repo")
        .arg("init")
        .assert()
        .code(3)
        .stderr(predicate::str::contains("does not exist"));
    bkp(server, &server.url("nothing-here"))
        .args(["snapshots"])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("bkp init"));
}

fn a_server_lost_mid_backup_leaves_the_repository_intact(server: &mut S3Server) {
    let url = server.url("lost");
    bkp(server, &url).arg("init").assert().success();
    let day1 = dumpgen::dump(4_000_000, 1);
    let first = backup_json(server, &url, &day1);

    // A backup whose input keeps coming, while the server goes away.
    let mut child = bkp_std(server, &url)
        .args(["backup", "--tag", "lost"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let block = common::random_bytes(1 << 20, 9);
        for _ in 0..400 {
            if stdin.write_all(&block).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    server.stop();
    // BKP_RETRY_TIMEOUT=5 (server.env()) bounds how long bkp keeps retrying.
    let output = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("storage error"), "{stderr}");

    server.restart();
    // No snapshot of the failed backup; the earlier one restores; a new backup succeeds.
    assert_eq!(snapshot_count(server, &url), 1);
    let id = first["snapshot_id"].as_str().unwrap();
    assert!(restore(server, &url, id) == day1);
    let day2 = dumpgen::dump(4_000_000, 2);
    backup_json(server, &url, &day2);
    assert!(restore(server, &url, "latest") == day2);
}

/// Issue 12, defect 8: a connection dropped after a pack's PUT was sent and before its answer
/// came (three times) is retried like a 5xx; the retry finds the pack there (create-only), and
/// the backup succeeds.
fn dropped_connections_are_retried(server: &S3Server) {
    let proxy = common::proxy::FaultyProxy::start(server.port(), 3, 200_000);
    let url = server.url("flaky");
    let through_proxy = || {
        let mut cmd = bkp_std(server, &url);
        cmd.env("AWS_ENDPOINT_URL", proxy.endpoint())
            .env("BKP_RETRY_TIMEOUT", "60");
        assert_cmd::Command::from_std(cmd)
    };
    through_proxy().arg("init").assert().success();
    let data = common::random_bytes(20 << 20, 11);
    let out = through_proxy()
        .args(["backup", "--json"])
        .write_stdin(data.clone())
        .assert()
        .success();
    let json: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let id = json["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(proxy.cuts(), 3, "the proxy cut three requests");
    let restored = common::stdout_of(through_proxy().args(["restore", &id]));
    assert!(restored == data);
}

/// Issue 12, defect 8: a server that restarts while a backup runs is waited for (within the
/// retry time), not given up on after a few quick retries.
fn a_server_restart_mid_backup_is_ridden_out(server: &mut S3Server) {
    let url = server.url("restart");
    bkp(server, &url).arg("init").assert().success();
    let mut child = bkp_std(server, &url)
        .env("BKP_RETRY_TIMEOUT", "90")
        .args(["backup", "--json", "--tag", "restart"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let block = common::random_bytes(1 << 20, 12);
    let feeder = std::thread::spawn(move || {
        let mut sent = Vec::new();
        for _ in 0..30 {
            stdin.write_all(&block).unwrap();
            sent.extend_from_slice(&block);
            std::thread::sleep(Duration::from_millis(50));
        }
        sent
    });
    std::thread::sleep(Duration::from_millis(1000));
    // Down for 12 s, well within the retry time.
    server.stop();
    std::thread::sleep(Duration::from_secs(12));
    server.restart();
    let sent = feeder.join().unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let restored = restore(server, &url, json["snapshot_id"].as_str().unwrap());
    assert!(restored == sent);
}
