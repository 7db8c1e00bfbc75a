//! End-to-end benchmark on a generated SQL dump pair.
//!
//! `cargo bench --bench pipeline` (size from BKP_BENCH_SIZE, default 200 MB; the figures in
//! docs/PERFORMANCE.md use BKP_BENCH_SIZE=1000000000). Runs the release `bkp` binary under
//! `/usr/bin/time -v` and reports, for backup of day 1, re-backup of day 1, backup of day 2 and
//! restore: MB/s, bytes added to the repository, and peak RSS.
//! With BKP_BENCH_SWEEP=1 it also measures day-1 storage and day-2 additions for several chunk
//! sizes through the library. BKP_BENCH_DAY1 and BKP_BENCH_DAY2 name an existing dump pair
//! (e.g. a real one from benches/pg_dump_pair.sh) to use instead of generated dumps.
//! BKP_BENCH_REPO names the repository to use instead of a local temporary directory, e.g. an
//! `s3://bucket/prefix` with the AWS_* variables set (benches/s3.sh runs it against a loopback
//! SeaweedFS); it must not exist yet.

#[path = "../tests/common/dumpgen.rs"]
mod dumpgen;

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

struct Run {
    seconds: f64,
    peak_rss_kib: u64,
    stdout: String,
}

fn timed(bin: &str, args: &[&str], stdin: Option<&Path>, stdout_to_null: bool, repo: &str) -> Run {
    let mut cmd = Command::new("/usr/bin/time");
    cmd.arg("-v").arg(bin).args(args);
    cmd.env("BKP_REPOSITORY", repo).env("BKP_PASSWORD", "bench");
    cmd.stdin(match stdin {
        Some(p) => Stdio::from(File::open(p).unwrap()),
        None => Stdio::null(),
    });
    if stdout_to_null {
        cmd.stdout(Stdio::null());
    }
    let started = Instant::now();
    let out = cmd
        .output()
        .expect("run /usr/bin/time (apt-get install time)");
    let seconds = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bkp {args:?} failed: {stderr}");
    let peak_rss_kib = stderr
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Run {
        seconds,
        peak_rss_kib,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

fn bytes_added(json: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("backup --json output");
    v["bytes_added"].as_u64().unwrap()
}

fn report(step: &str, size: u64, run: &Run, added: Option<u64>) {
    println!(
        "{step:<18} {:>8.1} MB/s  {:>7.2} s  added {:>14}  peak RSS {:>6.1} MiB",
        size as f64 / 1e6 / run.seconds,
        run.seconds,
        added.map_or("-".to_string(), |a| format!("{a} B")),
        run.peak_rss_kib as f64 / 1024.0
    );
}

fn generate(dir: &Path, size: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let day1 = dir.join("day1.sql");
    let day2 = dir.join("day2.sql");
    for (path, day) in [(&day1, 1), (&day2, 2)] {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path).unwrap());
        dumpgen::write_dump(&mut out, size, day).unwrap();
    }
    (day1, day2)
}

/// Chunk size and group size trade-offs, through the library on local repositories.
fn sweep(dir: &Path, day1: &Path, day2: &Path) {
    println!(
        "\nsweep: avg chunk / group -> day-1 stored, day-2 added, index bytes, seconds for day-1 backup, re-backup, day-2 backup, day-2 restore"
    );
    let configs = [
        (4096u32, 2usize << 20),
        (8192, 2 << 20),
        (16384, 1 << 20),
        (16384, 2 << 20),
        (65536, 2 << 20),
        (16384, 256 << 10),
        (16384, 4 << 20),
    ];
    for (n, (avg, group)) in configs.into_iter().enumerate() {
        let options = bkp::InitOptions {
            kdf: bkp::KdfParams::INSECURE_FAST,
            chunker: bkp::ChunkerParams {
                min_size: avg / 4,
                avg_size: avg,
                max_size: avg * 8,
            },
            chunking_keys: None,
        };
        let location = dir.join(format!("sweep-{n}"));
        let repo = bkp::Repository::init(
            bkp::Store::create(location.to_str().unwrap()).unwrap(),
            b"bench",
            &options,
        )
        .unwrap();
        let backup_options = bkp::BackupOptions {
            group_size: group,
            ..Default::default()
        };
        let mut stored = Vec::new();
        let mut seconds = Vec::new();
        let mut last = None;
        for path in [day1, day1, day2] {
            let started = Instant::now();
            let s = bkp::backup(
                &repo,
                bkp::Source::spawn(File::open(path).unwrap()),
                &backup_options,
                &mut |_| {},
            )
            .unwrap();
            seconds.push(started.elapsed().as_secs_f64());
            stored.push(s.bytes_stored);
            last = Some(s.snapshot);
        }
        let started = Instant::now();
        bkp::restore(&repo, &last.unwrap(), &mut std::io::sink(), &mut |_| {}).unwrap();
        seconds.push(started.elapsed().as_secs_f64());
        let index_bytes: u64 = repo
            .store()
            .list("index")
            .unwrap()
            .iter()
            .map(|o| o.size)
            .sum();
        println!(
            "  {:>5} B / {:>4} KiB: {:>10} B {:>10} B {:>9} B   {:.2} s {:.2} s {:.2} s {:.2} s",
            avg,
            group >> 10,
            stored[0],
            stored[2],
            index_bytes,
            seconds[0],
            seconds[1],
            seconds[2],
            seconds[3]
        );
        std::fs::remove_dir_all(&location).ok();
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it,
    // and only needs it to build.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let size: u64 = std::env::var("BKP_BENCH_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000_000);
    let bin = env!("CARGO_BIN_EXE_bkp");
    let work = tempfile::tempdir().unwrap();
    // A real dump pair (benches/pg_dump_pair.sh) instead of the generated one.
    let (day1, day2) = match (
        std::env::var_os("BKP_BENCH_DAY1"),
        std::env::var_os("BKP_BENCH_DAY2"),
    ) {
        (Some(day1), Some(day2)) => (day1.into(), day2.into()),
        _ => generate(work.path(), size),
    };
    let len1 = std::fs::metadata(&day1).unwrap().len();
    let len2 = std::fs::metadata(&day2).unwrap().len();
    println!("dump pair: day 1 {len1} B, day 2 {len2} B");
    let repo = std::env::var("BKP_BENCH_REPO")
        .unwrap_or_else(|_| work.path().join("repo").to_str().unwrap().to_string());
    println!("repository: {repo}");

    let init = Command::new(bin)
        .args(["init", "--quiet"])
        .env("BKP_REPOSITORY", &repo)
        .env("BKP_PASSWORD", "bench")
        .status()
        .unwrap();
    assert!(init.success(), "bkp init {repo} failed");
    // bkp fsyncs its packs, and an fsync waits behind the writeback of whatever else is dirty:
    // right after the dumps were generated or a build, the first backup ran 30-40 % slower.
    let synced = Command::new("sync").status();
    assert!(synced.is_ok_and(|s| s.success()), "sync failed");
    let steps = [
        ("backup day 1", &day1, len1),
        ("re-backup day 1", &day1, len1),
        ("backup day 2", &day2, len2),
    ];
    for (step, dump, len) in steps {
        let args = ["backup", "--json", "--tag", "bench"];
        let run = timed(bin, &args, Some(dump), false, &repo);
        report(step, len, &run, Some(bytes_added(&run.stdout)));
    }
    let run = timed(bin, &["restore", "latest", "--quiet"], None, true, &repo);
    report("restore day 2", len2, &run, None);

    if std::env::var_os("BKP_BENCH_SWEEP").is_some() {
        sweep(work.path(), &day1, &day2);
    }
}
