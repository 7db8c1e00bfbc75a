//! `--metrics-file`: a backup's or a drill's outcome in the Prometheus text format, for
//! node_exporter's textfile collector, so that monitoring alerts when a nightly backup (or a
//! weekly drill) failed or did not run.
//!
//! One file per job (its tag set is a label): the file is replaced whole, by a rename, so the
//! collector never reads half of it. A failed run keeps the last success's time and sizes from
//! the file it replaces, so `time() - bkp_backup_last_success_timestamp_seconds` keeps growing
//! until a backup succeeds again.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

/// Which job: its metrics are `bkp_<job>_...`.
#[derive(Clone, Copy)]
pub(super) enum Job {
    Backup,
    Drill,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Job::Backup => "backup",
            Job::Drill => "drill",
        }
    }

    /// Its size metrics: (name after `bkp_<job>_`, help).
    fn sizes(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Job::Backup => &[
                (
                    "bytes_read",
                    "Bytes of the dump in the last saved snapshot.",
                ),
                (
                    "bytes_added",
                    "Bytes the last saved snapshot added to the repository.",
                ),
            ],
            Job::Drill => &[(
                "bytes_restored",
                "Bytes the last successful drill restored into its command.",
            )],
        }
    }

    fn exit_codes(self) -> &'static str {
        match self {
            Job::Backup => {
                "0 saved, 6 saved but the dump is incomplete, 7 the dump failed, others bkp or storage failures (see bkp --help)"
            }
            Job::Drill => {
                "0 restored and the command succeeded, 9 the command failed, 5 the restore failed verification, others bkp or storage failures (see bkp --help)"
            }
        }
    }
}

const LAST_SUCCESS: &str = "last_success_timestamp_seconds";

/// One run's outcome.
pub(super) struct Outcome<'a> {
    pub job: Job,
    pub tags: &'a [String],
    pub exit_code: u8,
    pub ended: SystemTime,
    pub duration: Duration,
    /// The job's sizes ([`Job::sizes`], in that order) if it saved something (a backup: exit 0,
    /// or 6 for an incomplete dump; a drill: exit 0).
    pub sizes: Option<Vec<u64>>,
}

/// Replaces the file at `path` with `outcome` (and the last success's lines from the file it
/// replaces, if this run did not succeed). Readable by all: node_exporter runs as another user,
/// and the file holds tags, times and sizes only.
pub(super) fn write(path: &Path, outcome: &Outcome<'_>) -> Result<()> {
    let labels = format!("{{tags=\"{}\"}}", escape(&outcome.tags.join(",")));
    let job = outcome.job;
    let name = |what: &str| format!("bkp_{}_{what}", job.name());
    let seconds = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let previous = std::fs::read_to_string(path).unwrap_or_default();
    let kept = |name: &str| -> Option<String> {
        previous
            .lines()
            .find(|line| line.starts_with(name) && line[name.len()..].starts_with(&labels))
            .map(|line| line[name.len() + labels.len()..].trim().to_string())
    };
    let succeeded = outcome.exit_code == 0;
    let last_success = match succeeded {
        true => Some(format!("{:.3}", seconds(outcome.ended))),
        false => kept(&name(LAST_SUCCESS)),
    };

    let mut text = String::new();
    let mut metric = |name: &str, help: &str, value: Option<String>| {
        if let Some(value) = value {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{labels} {value}\n"
            ));
        }
    };
    metric(
        &name("last_run_timestamp_seconds"),
        &format!(
            "When the last {} run of these tags ended, whatever its outcome.",
            job.name()
        ),
        Some(format!("{:.3}", seconds(outcome.ended))),
    );
    metric(
        &name("last_exit_code"),
        &format!("The last run's exit code: {}.", job.exit_codes()),
        Some(outcome.exit_code.to_string()),
    );
    metric(
        &name("last_duration_seconds"),
        "How long the last run took.",
        Some(format!("{:.3}", outcome.duration.as_secs_f64())),
    );
    metric(
        &name(LAST_SUCCESS),
        &format!("When the last {} that exited 0 ended.", job.name()),
        last_success,
    );
    for (n, (size, help)) in job.sizes().iter().enumerate() {
        let value = match &outcome.sizes {
            Some(sizes) => sizes.get(n).map(u64::to_string),
            None => kept(&name(size)),
        };
        metric(&name(size), help, value);
    }

    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let temporary = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mut file = std::fs::File::create(&temporary)?;
        // (A chmod, not the mode at creation: bkp's umask makes everything else private.)
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written.with_context(|| format!("cannot write {}", path.display()))
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_keeps_the_last_success_and_labels_are_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bkp.prom");
        let tags = vec!["a\"b".to_string(), "c\\d".to_string()];
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let outcome = |exit_code, ended, sizes| Outcome {
            job: Job::Backup,
            tags: &tags,
            exit_code,
            ended,
            duration: Duration::from_millis(1500),
            sizes,
        };
        write(&path, &outcome(0, at(1_000), Some(vec![1000, 10]))).unwrap();
        write(&path, &outcome(7, at(2_000), None)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let value = |name: &str| {
            let prefix = format!("{name}{{tags=\"a\\\"b,c\\\\d\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
                .to_string()
        };
        assert_eq!(value("bkp_backup_last_exit_code"), "7");
        assert_eq!(value("bkp_backup_last_run_timestamp_seconds"), "2000.000");
        assert_eq!(
            value("bkp_backup_last_success_timestamp_seconds"),
            "1000.000"
        );
        assert_eq!(value("bkp_backup_bytes_read"), "1000");
        assert_eq!(value("bkp_backup_bytes_added"), "10");
        assert_eq!(value("bkp_backup_last_duration_seconds"), "1.500");
        // Only the file itself is left, readable by the exporter.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_first_run_that_fails_has_no_last_success() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bkp.prom");
        let outcome = Outcome {
            job: Job::Drill,
            tags: &[],
            exit_code: 1,
            ended: SystemTime::now(),
            duration: Duration::ZERO,
            sizes: None,
        };
        write(&path, &outcome).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("bkp_drill_last_exit_code{tags=\"\"} 1"),
            "{text}"
        );
        assert!(!text.contains(LAST_SUCCESS), "{text}");
    }
}
