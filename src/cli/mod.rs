//! Command-line interface: clap types, password sources, progress and summaries. The only
//! module that knows about clap, terminals or exit codes.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bkp::{
    BackupOptions, BackupSummary, Error, InitOptions, KdfParams, ReadData, Repository,
    SnapshotEntry, Store,
};
use clap::{Args, CommandFactory, Parser, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde_json::json;
use zeroize::Zeroizing;

mod drill;
mod maintenance;
mod metrics;
mod pipe;
mod tables;
use maintenance::{check, forget, key_command, prune, stats};

const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    failure (storage, input or output error, snapshot not found, ...)
  2    usage error (bad arguments, or a password in the dump command's arguments)
  3    no repository at the given location (or its bucket does not exist)
  4    wrong password, no usable key, or a put-only key for what needs a full key
  5    damaged data: an object failed authentication, a restore failed verification, or
       `bkp check` found problems
  6    backup saved, but the dump is incomplete (its completion trailer is missing)
  7    no dump to save: the dump command failed (non-zero exit, killed, or could not be
       started) or the input was empty; nothing was recorded
  8    the storage refused the credentials (S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)
  9    drill failed: its command exited non-zero, stopped reading or could not be started
       (the failure is recorded; a restore that fails verification is 5, also recorded)
  130  interrupted by Ctrl-C (SIGINT); 143 by SIGTERM, 129 by SIGHUP; nothing was recorded
  141  restore output closed early (broken pipe, e.g. `| head`)";

const BACKUP_HELP: &str = "\
Examples:
  bkp backup --tag crm -- pg_dump --no-password crm
  mysqldump --single-transaction --skip-dump-date shop | bkp backup --tag shop

With `-- COMMAND`, bkp runs the dump itself (no shell): if it exits non-zero or is killed, no
snapshot is recorded and bkp exits with 7, showing the command's status and last stderr lines.
A pg_dump or mysqldump stream whose completion trailer is missing is saved, flagged INCOMPLETE,
and bkp exits with 6. Compressed input (gzip, zstd, pg_dump -Fc without -Z0) is backed up with
a warning: it cannot be deduplicated.

A dump command carrying a password (`--password X`, `-pX`, `password=X`, a URL with one,
`env PGPASSWORD=X`, also inside `sh -c`) is refused (exit 2): every local user could read it in
the process list. Use ~/.pgpass, an option file (--defaults-extra-file), or PGPASSWORD/MYSQL_PWD
in the environment of the cron job or service unit; BKP_*PASSWORD* never reaches the dump.

--metrics-file PATH writes the run's outcome for node_exporter's textfile collector (a file per
job, e.g. /var/lib/node_exporter/textfile/bkp-shop.prom), replaced whole by a rename, readable by
all: bkp_backup_last_exit_code, bkp_backup_last_run_timestamp_seconds,
bkp_backup_last_success_timestamp_seconds (kept from the previous file when a run fails),
bkp_backup_last_duration_seconds, bkp_backup_bytes_read and bkp_backup_bytes_added, labelled
with the tags. Alert on `time() - bkp_backup_last_success_timestamp_seconds > 26 * 3600` and
on `bkp_backup_last_exit_code != 0`.";

const EXIT_DAMAGED: u8 = 5;
const EXIT_DUMP_INCOMPLETE: u8 = 6;
const EXIT_DUMP_COMMAND_FAILED: u8 = 7;

const ENVIRONMENT: &str = "\
Environment:
  BKP_REPOSITORY         repository location (instead of --repo): a directory, or s3://BUCKET/PREFIX
                         (also gs://, az://: less tested)
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL
                         S3 credentials, region and endpoint (an S3-compatible server's URL);
                         AWS_ALLOW_HTTP=true allows a plain-http endpoint
  BKP_THREADS            threads for backup and restore (instead of --threads; default: one per
                         core this process may run on)
  BKP_RETRY_TIMEOUT      seconds to keep retrying a failing storage request (default 120)
  TMPDIR                 where prune, check and stats of a large repository and backup and
                         restore of a large dump sort (~60 bytes a chunk; private files,
                         unlinked at once; default /tmp)
  BKP_CACHE_DIR          where a put-only key keeps its send logs (default $XDG_CACHE_HOME/bkp,
                         else ~/.cache/bkp): what it stored last time, so that it deduplicates
  BKP_SORT_MEMORY        MiB each of their sort buffers takes (default 48; a few at a time);
                         backup and restore use at most 2 MiB for theirs and a temporary file
                         past ~75 k chunks (~1.2 GB of dump)
  BKP_PASSWORD_FILE      file whose first line is the password
  BKP_PASSWORD_COMMAND   shell command that prints the password (e.g. a secrets manager)
  BKP_PASSWORD           the password itself (visible to this user's processes; prefer the above)
  BKP_NEW_PASSWORD_FILE, BKP_NEW_PASSWORD_COMMAND, BKP_NEW_PASSWORD
                         the new password for `bkp key add` and `bkp key passwd`
  Without any of these, bkp asks on the terminal.
  BKP_FROM_REPOSITORY, BKP_FROM_PASSWORD_FILE, BKP_FROM_PASSWORD_COMMAND, BKP_FROM_PASSWORD
                         the source repository of `bkp copy` and its password
  BKP_INSECURE_FAST_KDF  tests only: new keys get a trivial key derivation (bkp warns)";

#[derive(Parser)]
#[command(
    name = "bkp",
    version,
    about = "Deduplicating, encrypted backups of database dumps",
    long_about = "Deduplicating, encrypted backups of database dumps.\n\n\
    mysqldump --single-transaction shop | bkp backup --tag shop\n\
    bkp restore latest --tag shop | mysql shop",
    after_help = format!("{ENVIRONMENT}\n\n{EXIT_CODES}")
)]
struct Cli {
    /// Repository location: a directory path (or file:// URL), or s3://BUCKET/PREFIX
    #[arg(
        short,
        long,
        global = true,
        env = "BKP_REPOSITORY",
        value_name = "LOCATION"
    )]
    repo: Option<String>,

    /// Print nothing on success (errors still go to stderr)
    #[arg(short, long, global = true)]
    quiet: bool,

    /// Threads for compressing (backup) and decoding (restore) [default: one per core this
    /// process may run on, which follows taskset and a container's cpuset]
    #[arg(long, global = true, env = "BKP_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,

    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Create a new, empty repository
    #[command(after_help = INIT_HELP)]
    Init(InitArgs),
    /// Back up standard input, or the output of a dump command, as a new snapshot
    #[command(after_help = BACKUP_HELP)]
    Backup(BackupArgs),
    /// Write a snapshot's stream to standard output (or --output), verified byte for byte
    #[command(
        after_help = RESTORE_HELP
    )]
    Restore(RestoreArgs),
    /// List snapshots, oldest first
    Snapshots(SnapshotsArgs),
    /// List the tables in a snapshot of a dump, with their rows and sizes
    #[command(after_help = LS_HELP)]
    Ls(LsArgs),
    /// Which tables changed between two snapshots of a dump, were added or removed
    #[command(after_help = DIFF_HELP)]
    Diff(DiffArgs),
    /// Restore a snapshot into a command (a scratch database) and record whether it worked
    #[command(after_help = DRILL_HELP)]
    Drill(DrillArgs),
    /// Verify the repository: structure, and with --read-data the stored data itself
    #[command(after_help = CHECK_HELP)]
    Check(CheckArgs),
    /// Manage the passwords (key files) that open the repository
    #[command(subcommand, after_help = KEY_HELP)]
    Key(KeyCommand),
    /// Remove snapshots by a retention policy (per host and tag set) or by id
    #[command(after_help = FORGET_HELP)]
    Forget(ForgetArgs),
    /// What the repository holds: sizes, dedup and compression, what each snapshot alone uses
    Stats(SnapshotsArgs),
    /// Reclaim the space of forgotten snapshots, safely while backups run (no lock)
    #[command(after_help = PRUNE_HELP)]
    Prune(PruneArgs),
    /// Bring a repository made by an older bkp to the current format (safe to run again)
    #[command(after_help = UPGRADE_HELP)]
    Upgrade,
    /// Copy snapshots from another repository (--from-repo) into this one, those it lacks
    #[command(after_help = COPY_HELP)]
    Copy(CopyArgs),
    /// Print a shell completion script (needs no repository)
    #[command(after_help = COMPLETIONS_HELP)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page, bkp(1), in roff (needs no repository)
    #[command(after_help = "Example:\n  bkp man > /usr/local/share/man/man1/bkp.1 && man bkp")]
    Man,
}

const COMPLETIONS_HELP: &str = "\
Examples:
  bkp completions bash > /etc/bash_completion.d/bkp
  bkp completions zsh > \"${fpath[1]}/_bkp\"
  bkp completions fish > ~/.config/fish/completions/bkp.fish
  bkp completions powershell >> $PROFILE";

const INIT_HELP: &str = "\
The password comes from BKP_PASSWORD_FILE, BKP_PASSWORD_COMMAND, BKP_PASSWORD or a prompt
(asked twice). Losing it means losing every backup in the repository.

--copy-chunker-params-from LOCATION makes a repository that cuts streams into chunks and names
them exactly as the repository at LOCATION does (its chunker parameters and its chunker and
chunk-id keys; every other key is new). Then `bkp copy` between the two reads from the source
only the chunks the target lacks and sends the rest as ids, without chunking or hashing the
stream again: a third less time for a day of scattered row changes, most of it for a day whose
changes are few or clustered. The price: the two repositories are no longer independent.
Anyone holding a key of either one (a put-only key on a database host included) holds the
chunking keys of both, and the storage sides of both see the same pattern for the same data
(docs/FORMAT.md section 12.2). Use it for a copy you trust as much as the first repository;
make a repository of its own otherwise. The source's password comes from
BKP_FROM_PASSWORD_FILE, BKP_FROM_PASSWORD_COMMAND, BKP_FROM_PASSWORD or a prompt.

Examples:
  bkp --repo /srv/backup/bkp init
  bkp --repo s3://offsite/db init --copy-chunker-params-from /srv/backup/bkp";

#[derive(Args)]
struct InitArgs {
    /// Share the chunker parameters and keys of the repository at LOCATION (cheap copies)
    #[arg(long, value_name = "LOCATION")]
    copy_chunker_params_from: Option<String>,
}

const COPY_HELP: &str = "\
Copies the snapshots of the source repository (all, those with all the --tag tags, or the ones
named) that this repository lacks, oldest first, keeping their time, host, tags and name.
Each is restored from the source, verified, and backed up here: chunked with this repository's
keys and deduplicated against its previous copy of the same series, so the copy of a day adds
about what that day added in the source. A copied snapshot records where it came from, so a
rerun (after a kill, or the next night) copies only what is missing; a copy killed half-way
leaves only packs that no snapshot names, which prune removes. Both passwords must open full
keys.

A repository made with `bkp init --copy-chunker-params-from SOURCE` cuts and names chunks as
SOURCE does: then copy reads from the source only the chunks this repository lacks and sends
the rest as ids, without chunking or hashing the stream again (see `bkp help init`).

The source: --from-repo LOCATION or BKP_FROM_REPOSITORY; its password from
BKP_FROM_PASSWORD_FILE, BKP_FROM_PASSWORD_COMMAND, BKP_FROM_PASSWORD or a prompt.

Examples:
  bkp --repo s3://offsite/db copy --from-repo /backups/db --tag shop
  bkp copy --from-repo /backups/db 1a2b3c4d";

#[derive(Args)]
struct CopyArgs {
    /// The repository to copy from
    #[arg(long, env = "BKP_FROM_REPOSITORY", value_name = "LOCATION")]
    from_repo: String,
    /// Snapshots to copy by id (unique prefixes); default: every snapshot with the tags
    #[arg(value_name = "SNAPSHOT")]
    snapshots: Vec<String>,
    /// Only snapshots having all these tags
    #[arg(short, long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Print the summary as one JSON object
    #[arg(long)]
    json: bool,
}

const UPGRADE_HELP: &str = "\
Format 3 gives every snapshot a series marker (its tag set, encrypted, and its time), so that
`latest` and `--tag` read only their own series instead of every snapshot in the repository.
Format 4 lets the repository hold put-only keys (`bkp key add --put-only`), which an older bkp
would take for damaged key files.
`bkp upgrade` writes the markers of the snapshots an older bkp wrote, then records format 4 in
the repository's config: the one object bkp ever replaces, so it needs storage credentials that
may overwrite it, once. Stop backups by older bkp versions first: they cannot open an upgraded
repository, and a snapshot one of them writes during the upgrade gets no marker (run upgrade
again). Repositories of format 2 and 3 work without it; every command reads them as before.";

const PRUNE_HELP: &str = "\
Prune works in two steps a grace period apart, so that it never needs a lock and never deletes
what a running backup is about to use: it marks the packs no snapshot needs (backups stop
deduplicating against them), and a prune run after the grace period deletes those still
unneeded. Run it daily (e.g. after `bkp forget`); space comes back one run later. The grace
period must be longer than any backup takes, and is at least 1h: a backup that outlives it
fails rather than recording a snapshot with missing data. Packs no index names (left by
killed backups) and their unfinished uploads are deleted once they are a grace period old.
One prune at a time per repository.

A pack that snapshots still need but that mostly holds data none needs is repacked: the needed
part is copied (not recompressed) into new packs, and the old pack is marked like the others.
--repack-threshold sets how much of a pack must be unneeded for that (default 50%; 100%
turns repacking off).";

#[derive(Args)]
struct PruneArgs {
    /// How long marked packs wait before deletion (at least 1h); longer than any backup runs
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Repack a needed pack once this share of it is unneeded (100% = never)
    #[arg(long, value_name = "PERCENT", default_value = "50%", value_parser = parse_percent)]
    repack_threshold: f64,
    /// Report what would be marked, repacked and deleted, change nothing
    #[arg(long)]
    dry_run: bool,
    /// Print the report as one JSON object
    #[arg(long)]
    json: bool,
}

const FORGET_HELP: &str = "\
Snapshots are grouped by host and tag set (--group-by), and the policy applies to each group
on its own, so `--tag shop` retention never touches another database's or host's snapshots.
A snapshot is kept if any rule keeps it: --keep-last N newest; --keep-daily N keeps the newest
snapshot of each of the N most recent days that have one (likewise hourly, weekly = ISO weeks,
monthly, yearly; in the local time zone, TZ); --keep-within 30d keeps everything younger.
Forgetting deletes only snapshot objects; the data they alone used goes with `bkp prune`
(or --prune here).

Examples:
  bkp forget --tag shop --keep-daily 7 --keep-weekly 5 --keep-monthly 12 --dry-run
  bkp forget 1a2b3c4d";

#[derive(Args)]
struct ForgetArgs {
    /// Snapshots to forget by id (unique prefixes), instead of a policy
    #[arg(value_name = "SNAPSHOT", conflicts_with_all = [
        "keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly",
        "keep_within"])]
    snapshots: Vec<String>,
    /// Only snapshots having all these tags
    #[arg(short, long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Keep the N newest snapshots
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_last: usize,
    /// Keep the newest snapshot of each of the last N hours that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_hourly: usize,
    /// Keep the newest snapshot of each of the last N days that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_daily: usize,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_weekly: usize,
    /// Keep the newest snapshot of each of the last N months that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_monthly: usize,
    /// Keep the newest snapshot of each of the last N years that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_yearly: usize,
    /// Keep every snapshot younger than this, e.g. 36h, 30d, 2w
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    keep_within: Option<Duration>,
    /// What makes a series: host,tags (default), host, tags or none
    #[arg(long, value_name = "KEYS", default_value = "host,tags")]
    group_by: String,
    /// Show what would be forgotten, change nothing
    #[arg(long)]
    dry_run: bool,
    /// Then prune (with the default 24h grace period; see `bkp prune --help`)
    #[arg(long)]
    prune: bool,
    /// Print the decisions as JSON
    #[arg(long)]
    json: bool,
}

const KEY_HELP: &str = "\
Each password is a key file wrapping the same master key: adding a key or changing a password
re-encrypts nothing. New passwords come from BKP_NEW_PASSWORD_FILE, BKP_NEW_PASSWORD_COMMAND,
BKP_NEW_PASSWORD or a prompt, like the current one from BKP_PASSWORD_*; never from arguments.
The last full key cannot be removed, nor the key in use (use `bkp key passwd` to replace it).

A put-only key (`bkp key add --put-only`) can back up and nothing else: with it a host cannot
restore, list or read snapshots, forget, prune, check or manage keys (exit 4), and its key file
holds no secret that decrypts what the repository stores, so whoever takes that host cannot read
old dumps with it. Give the database host a put-only key and keep a full key elsewhere for
restores and maintenance. Such a host deduplicates against what it stored last time, which it
remembers in a send log under BKP_CACHE_DIR (default ~/.cache/bkp); without one, a backup
stores the whole dump. Needs repository format 4 (`bkp upgrade`).";

#[derive(Subcommand)]
enum KeyCommand {
    /// List the key files; * marks the one the password opened
    List {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Add a key file for a new password
    Add {
        /// A key that can only back up (for the host that runs the dumps): see below
        #[arg(long)]
        put_only: bool,
    },
    /// Remove a key file (by unique id prefix)
    Remove {
        /// Key id or unique prefix, from `bkp key list`
        id: String,
    },
    /// Change the password in use (adds a key for the new one, then removes the old)
    Passwd,
}

const CHECK_HELP: &str = "\
Without --read-data, check reads metadata only: key files, index files, every pack's header (by
range) and every snapshot's chunk tree, so it is cheap enough for every night. --read-data
downloads, decrypts, decompresses and re-hashes every stored chunk; --read-data-subset 10% does
that for a random tenth of the frames (a different tenth each run).
Every problem found is listed with the snapshots it affects; bkp then exits with 5.

Examples:
  bkp check
  bkp check --read-data-subset 5% --json";

#[derive(Args)]
struct BackupArgs {
    /// Tag the snapshot (repeatable); `restore latest --tag` picks by tag
    #[arg(short, long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Host name to record (default: this machine's)
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// Name of the stream to record (default: the dump command line, or `stdin`)
    #[arg(long)]
    name: Option<String>,
    /// zstd level for new data (1-19; higher is smaller and slower)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    compression: i32,
    /// Print the summary as one JSON object
    #[arg(long)]
    json: bool,
    /// Write the outcome (exit code, times, sizes) to this file for node_exporter's textfile collector
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<std::path::PathBuf>,
    /// Run this dump command (no shell) and back up its output; if it fails, nothing is recorded
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<std::ffi::OsString>,
}

/// Which snapshot a command reads.
#[derive(Args)]
struct Pick {
    /// Snapshot id (a unique prefix is enough) or `latest`
    snapshot: String,
    /// With `latest`: the newest snapshot having all these tags (complete, readable, not dated more than an hour ahead; skipped newer ones are named on stderr)
    #[arg(short, long = "tag", value_name = "TAG")]
    tags: Vec<String>,
}

#[derive(Args)]
struct RestoreArgs {
    #[command(flatten)]
    pick: Pick,
    /// Write to this new file instead of standard output (removed again if the restore fails)
    #[arg(short, long, value_name = "FILE")]
    output: Option<std::path::PathBuf>,
    /// Only this table (repeatable; with or without its schema): a script that recreates it
    /// in an empty database, reading only its part of the snapshot
    #[arg(long = "table", value_name = "NAME")]
    tables: Vec<String>,
}

#[derive(Args)]
struct CheckArgs {
    /// Also read and verify every stored chunk
    #[arg(long)]
    read_data: bool,
    /// Also read and verify a random sample of the stored data: a percentage like `10%`
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent, conflicts_with = "read_data")]
    read_data_subset: Option<f64>,
    /// Print the report as one JSON object
    #[arg(long)]
    json: bool,
}

/// `10%` or `10` -> 0.1.
fn parse_percent(text: &str) -> std::result::Result<f64, String> {
    let number = text.trim().trim_end_matches('%');
    match number.parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(p / 100.0),
        _ => Err(format!(
            "{text:?} is not a percentage between 0 and 100, e.g. 10%"
        )),
    }
}

const RESTORE_HELP: &str = "\
Every byte is checked against the snapshot as it goes out; a restore that fails exits non-zero
(with --output, the file is not left behind).

--table NAME restores one table (or several) of a plain pg_dump or mysqldump snapshot: the
dump's preamble, the table's definition, its sequences, its data, then its indexes, constraints
and triggers, and the trailer, in the dump's order, reading only the chunks of those parts.
Foreign keys to tables not restored are left out, each with a note on stderr; restore the
referenced tables too (--table a --table b) to keep them. `bkp ls` lists the tables.

Examples:
  bkp restore latest --tag shop | mysql shop
  bkp restore 1a2b3c4d --output shop.sql
  bkp restore latest --tag crm --table public.orders | psql -v ON_ERROR_STOP=1 -d scratch";

const LS_HELP: &str = "\
bkp reads the table of contents of a plain pg_dump, an uncompressed custom archive (pg_dump -Fc
-Z0) or a mysqldump/mariadb-dump stream while it backs it up (docs/FORMAT.md section 13): each
table's rows (COPY rows or INSERT value tuples) and bytes, and digests of its data and
definition. `ls` and `diff` read only that, never the stream. Snapshots of other streams
(compressed archives or dumps) have none.

Examples:
  bkp ls latest --tag shop
  bkp ls 1a2b3c4d --json | jq '.[] | select(.rows == 0) | .name'";

const DIFF_HELP: &str = "\
A table is `changed` when its data, definition, indexes or constraints differ (by their
digests, without reading the stream), `added` or `removed` when only one snapshot has it.
`new` is how much of the table's data the later snapshot's backup stored as new chunks: the
cost of its changes before compression. Unchanged tables are left out unless --all.

Examples:
  bkp diff 1a2b3c4d latest --tag shop
  bkp diff 1a2b3c4d 5e6f7a8b --json";

const DRILL_HELP: &str = "\
A backup is only as good as its last restore. `bkp drill` restores the snapshot into COMMAND's
standard input (a client of a scratch database), checks that every byte verified (and, beyond
what a restore checks, the whole stream against the BLAKE3 hash the backup took of what it
read: a check of bkp's own backup) and that COMMAND exited 0, and records the outcome in the
repository (time, duration, bytes, host, command, and what failed): `bkp snapshots` shows each series' last drill, `--json` too.
COMMAND's output goes to stderr. Exit codes: 0 the drill succeeded; 9 COMMAND failed (exited
non-zero, stopped reading, could not be started); 5 the restore failed verification; 130/143
interrupted (recorded as such). A password in COMMAND's arguments is refused, as for backup.

Examples:
  createdb scratch && bkp drill latest --tag shop -- psql -q -v ON_ERROR_STOP=1 -d scratch
  bkp drill latest --tag shop --metrics-file /var/lib/node_exporter/bkp-drill-shop.prom \\
      -- mariadb scratch
Weekly, from cron (drop and create the scratch database around it):
  0 4 * * 0  dropdb --if-exists scratch && createdb scratch && bkp drill latest --tag shop -q -- psql -q -v ON_ERROR_STOP=1 -d scratch
or the systemd units examples/systemd/bkp-drill-shop.service and .timer.";

#[derive(Args)]
struct DrillArgs {
    #[command(flatten)]
    pick: Pick,
    /// Print the recorded drill as one JSON object
    #[arg(long)]
    json: bool,
    /// Write the outcome (exit code, times, bytes) to this file for node_exporter's textfile collector
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<std::path::PathBuf>,
    /// The command to restore into (no shell), e.g. psql -v ON_ERROR_STOP=1 -d scratch
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<std::ffi::OsString>,
}

#[derive(Args)]
struct LsArgs {
    #[command(flatten)]
    pick: Pick,
    /// Print a JSON array: name, rows, bytes, new_bytes, schema_bytes per table
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DiffArgs {
    /// The earlier snapshot: id (a unique prefix) or `latest`
    before: String,
    /// The later snapshot: id (a unique prefix) or `latest`
    after: String,
    /// With `latest`: the newest snapshot having all these tags
    #[arg(short, long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// List unchanged tables too
    #[arg(long)]
    all: bool,
    /// Print one JSON object: {"before", "after", "tables": [{"name", "status", ...}]}
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SnapshotsArgs {
    /// Only snapshots having all these tags
    #[arg(short, long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Print a JSON array
    #[arg(long)]
    json: bool,
}

pub fn run() -> Result<ExitCode> {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return Ok(ExitCode::from(code));
        }
    };
    match &cli.command {
        Commands::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "bkp", &mut script);
            return print_whole(&script);
        }
        Commands::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut page)?;
            return print_whole(&page);
        }
        _ => {}
    }
    if let Some(threads) = cli.threads {
        let _ = THREADS.set(threads as usize);
    }
    let Some(location) = cli.repo.clone() else {
        eprintln!("bkp: error: no repository given: pass --repo LOCATION or set BKP_REPOSITORY");
        return Ok(ExitCode::from(2));
    };
    if let Ok(mib) = std::env::var("BKP_SORT_MEMORY") {
        let Some(bytes) = mib
            .trim()
            .parse::<usize>()
            .ok()
            .and_then(|m| m.checked_mul(1 << 20))
        else {
            eprintln!(
                "bkp: error: BKP_SORT_MEMORY={mib:?} is not a number of MiB: set it to e.g. 256, or unset it for the default (48)"
            );
            return Ok(ExitCode::from(2));
        };
        bkp::set_sort_memory(bytes);
    }
    match cli.command {
        Commands::Init(args) => init(&location, cli.quiet, args).map(|()| ExitCode::SUCCESS),
        Commands::Backup(args) => backup_with_metrics(&location, cli.quiet, args),
        Commands::Restore(args) => restore(&location, cli.quiet, args).map(|()| ExitCode::SUCCESS),
        Commands::Snapshots(args) => snapshots(&location, args).map(|()| ExitCode::SUCCESS),
        Commands::Ls(args) => tables::ls(&location, args).map(|()| ExitCode::SUCCESS),
        Commands::Diff(args) => tables::diff(&location, args).map(|()| ExitCode::SUCCESS),
        Commands::Drill(args) => drill::drill_with_metrics(&location, cli.quiet, args),
        Commands::Check(args) => check(&location, cli.quiet, args),
        Commands::Forget(args) => forget(&location, cli.quiet, args).map(|()| ExitCode::SUCCESS),
        Commands::Stats(args) => stats(&location, args).map(|()| ExitCode::SUCCESS),
        Commands::Prune(args) => prune(&location, cli.quiet, args).map(|()| ExitCode::SUCCESS),
        Commands::Upgrade => upgrade(&location, cli.quiet).map(|()| ExitCode::SUCCESS),
        Commands::Copy(args) => copy(&location, cli.quiet, args).map(|()| ExitCode::SUCCESS),
        Commands::Key(command) => {
            key_command(&location, cli.quiet, command).map(|()| ExitCode::SUCCESS)
        }
        Commands::Completions { .. } | Commands::Man => unreachable!("answered above"),
    }
}

/// The exit code for an error, as documented in [`EXIT_CODES`].
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    ExitCode::from(exit_status(err))
}

fn exit_status(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<Error>() {
        Some(Error::RepositoryNotFound { .. } | Error::BucketNotFound { .. }) => 3,
        Some(Error::WrongPassword { .. } | Error::NoKeys { .. } | Error::PutOnlyKey { .. }) => 4,
        Some(Error::Corrupt { .. } | Error::Missing { .. }) => EXIT_DAMAGED,
        Some(Error::DumpCommand(_) | Error::EmptyInput) => EXIT_DUMP_COMMAND_FAILED,
        Some(Error::AccessDenied { .. }) => 8,
        Some(Error::PasswordInCommand { .. }) => 2,
        _ => 1,
    }
}

/// Errors that end the program without a message: the reader of our output went away.
/// Writes `text` to stdout; a reader that went away (`| head`) ends it quietly, as for a restore.
fn print_whole(text: &[u8]) -> Result<ExitCode> {
    let mut out = io::stdout().lock();
    out.write_all(text)
        .and_then(|()| out.flush())
        .map_err(Error::Sink)?;
    Ok(ExitCode::SUCCESS)
}

pub fn quiet_exit(err: &anyhow::Error) -> Option<ExitCode> {
    match err.downcast_ref::<Error>() {
        Some(Error::Sink(e)) if e.kind() == io::ErrorKind::BrokenPipe => Some(ExitCode::from(141)),
        _ => None,
    }
}

/// Says so (as ssh does for a key) when a password file can be read by users other than its
/// owner: whoever reads it opens the repository.
fn warn_if_others_can_read(var: &str, path: &str) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(metadata) = std::fs::metadata(path) else {
        return;
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        eprintln!(
            "bkp: warning: {var} {path} can be read by other users (mode {mode:04o}): run `chmod 600 {path}`"
        );
    }
}

/// The first line of a password file's or command's output (without its newline).
fn first_line(text: Zeroizing<String>) -> Zeroizing<String> {
    Zeroizing::new(text.lines().next().unwrap_or("").to_string())
}

fn read_password(confirm: bool) -> Result<Zeroizing<String>> {
    read_secret("BKP_PASSWORD", "Repository password", confirm)
}

/// A secret from `{var}_FILE` (first line), `{var}_COMMAND` (first line it prints), `{var}`, or
/// a prompt on the terminal; never from the command line.
fn read_secret(var: &str, prompt: &str, confirm: bool) -> Result<Zeroizing<String>> {
    if let Ok(path) = std::env::var(format!("{var}_FILE")) {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {var}_FILE {path}"))?;
        warn_if_others_can_read(&format!("{var}_FILE"), &path);
        return Ok(first_line(Zeroizing::new(text)));
    }
    if let Ok(command) = std::env::var(format!("{var}_COMMAND")) {
        let mut sh = Command::new("sh");
        sh.args(["-c", &command]).stdin(std::process::Stdio::null());
        bkp::command::without_bkp_secrets(&mut sh);
        let output = sh
            .output()
            .with_context(|| format!("cannot run {var}_COMMAND"))?;
        if !output.status.success() {
            bail!("{var}_COMMAND failed ({}); fix the command", output.status);
        }
        let text = String::from_utf8(output.stdout)
            .with_context(|| format!("{var}_COMMAND printed something that is not UTF-8"))?;
        return Ok(first_line(Zeroizing::new(text)));
    }
    if let Ok(password) = std::env::var(var) {
        return Ok(Zeroizing::new(password));
    }
    if !io::stderr().is_terminal() || File::open("/dev/tty").is_err() {
        bail!(
            "no {} given: set {var}_FILE, {var}_COMMAND or {var} (no terminal to ask on)",
            prompt.to_lowercase()
        );
    }
    let password = Zeroizing::new(rpassword::prompt_password(format!("{prompt}: "))?);
    if confirm {
        let again = Zeroizing::new(rpassword::prompt_password(format!(
            "Repeat {}: ",
            prompt.to_lowercase()
        ))?);
        if *again != *password {
            bail!("the passwords do not match; nothing was changed");
        }
    }
    Ok(password)
}

/// The key derivation cost for a new key file.
fn kdf_params() -> KdfParams {
    if std::env::var_os("BKP_INSECURE_FAST_KDF").is_some() {
        eprintln!(
            "bkp: WARNING: BKP_INSECURE_FAST_KDF is set: the new key is protected by a trivial key derivation (argon2id with 64 KiB, one pass), so its password can be guessed at high speed from the key file; it is meant for tests only"
        );
        KdfParams::INSECURE_FAST
    } else {
        KdfParams::DEFAULT
    }
}

/// Storage options from the environment (cloud credentials are read by the store itself).
fn store_options() -> Vec<(&'static str, String)> {
    std::env::var("BKP_RETRY_TIMEOUT")
        .map(|seconds| vec![("retry_timeout", seconds)])
        .unwrap_or_default()
}

fn open_store(location: &str, create: bool) -> Result<Store> {
    let options = store_options();
    let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Ok(if create {
        Store::create_with_options(location, &options)?
    } else {
        Store::open_with_options(location, &options)?
    })
}

/// The repository at `location` that a copy reads, opened with the BKP_FROM_* password.
fn open_source(location: &str, refused: &str) -> Result<OpenRepository> {
    let store = open_store(location, false)?;
    let password = read_secret("BKP_FROM_PASSWORD", "Source repository password", false)?;
    let repo = unlock(store, &password)?;
    repo.require_full_key(refused)?;
    Ok(OpenRepository {
        repo,
        warn_damage: true,
    })
}

fn copy(location: &str, quiet: bool, args: CopyArgs) -> Result<()> {
    let source = open_source(&args.from_repo, "copy snapshots from it")?;
    let target = open_repository(location, Access::FullKeyTo("copy snapshots into it"))?;
    let snapshots = if args.snapshots.is_empty() {
        source.snapshots(&args.tags)?
    } else {
        args.snapshots
            .iter()
            .map(|query| source.find_snapshot(query, &args.tags))
            .collect::<bkp::Result<Vec<_>>>()?
    };
    let mut out = io::stdout().lock();
    let summary = bkp::copy(
        &source,
        &target,
        snapshots,
        &BackupOptions::default(),
        &mut |event| match event {
            bkp::CopyEvent::Copied {
                source,
                target,
                bytes_added,
            } => {
                if !quiet && !args.json {
                    let _ = writeln!(
                        out,
                        "copied {} ({}, {}) as {}: {} added",
                        source.id.short(),
                        humantime::format_rfc3339_seconds(source.snapshot.time),
                        HumanBytes(source.snapshot.size),
                        target.short(),
                        HumanBytes(bytes_added)
                    );
                }
            }
        },
    )?;
    let added: u64 = summary.copied.iter().map(|(_, _, added)| added).sum();
    if args.json {
        let copied: Vec<_> = summary
            .copied
            .iter()
            .map(|(from, to, added)| {
                json!({"source": from.to_hex(), "target": to.to_hex(), "bytes_added": added})
            })
            .collect();
        writeln!(
            out,
            "{}",
            json!({
                "copied": copied,
                "already_there": summary.already_there,
                "bytes_read": summary.bytes_read,
                "bytes_added": added,
                "seconds": summary.elapsed.as_secs_f64(),
            })
        )?;
    } else if !quiet {
        writeln!(
            out,
            "copied {} snapshot(s) ({} read, {} added), {} already there",
            summary.copied.len(),
            HumanBytes(summary.bytes_read),
            HumanBytes(added),
            summary.already_there
        )?;
    }
    Ok(())
}

fn upgrade(location: &str, quiet: bool) -> Result<()> {
    let mut open = open_repository(location, Access::FullKeyTo("upgrade the repository"))?;
    let before = open.repo.config().format_version;
    let written = open.repo.upgrade()?;
    if !quiet {
        println!(
            "repository at format {} (was {before}); {written} series marker(s) written",
            open.repo.config().format_version
        );
    }
    Ok(())
}

/// Where a put-only key's send logs are (docs/FORMAT.md §12.1): `BKP_CACHE_DIR`, else the XDG
/// cache directory, each with `send-log/` below.
fn send_log_dir() -> Option<std::path::PathBuf> {
    let non_empty = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty());
    let cache = non_empty("BKP_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| non_empty("XDG_CACHE_HOME").map(|d| std::path::Path::new(&d).join("bkp")))
        .or_else(|| non_empty("HOME").map(|d| std::path::Path::new(&d).join(".cache/bkp")))?;
    Some(cache.join("send-log"))
}

/// What a command does with a repository: backing up is all that a put-only key may do.
#[derive(Clone, Copy)]
enum Access {
    BackUp,
    /// Anything else, named for the refusal a put-only key gets ("restore").
    FullKeyTo(&'static str),
}

/// `--threads` (`BKP_THREADS`), for every repository a command opens.
static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Opens the repository in `store` with `password`, working with `--threads` threads.
fn unlock(store: Store, password: &str) -> Result<Repository> {
    let mut repo = Repository::open(store, password.as_bytes())?;
    repo.set_workers(THREADS.get().copied().unwrap_or(0));
    Ok(repo)
}

fn open_repository(location: &str, access: Access) -> Result<OpenRepository> {
    let store = open_store(location, false)?;
    let password = read_password(false)?;
    let repo = unlock(store, &password)?;
    if let Access::FullKeyTo(refused) = access {
        repo.require_full_key(refused)?;
    }
    Ok(OpenRepository {
        repo,
        warn_damage: true,
    })
}

/// An open repository that, once the command is done with it (or failed), warns about each
/// damaged object that its listings skipped, so that damage is never silent.
struct OpenRepository {
    repo: Repository,
    /// `bkp check` reports damage itself.
    warn_damage: bool,
}

impl std::ops::Deref for OpenRepository {
    type Target = Repository;
    fn deref(&self) -> &Repository {
        &self.repo
    }
}

impl Drop for OpenRepository {
    fn drop(&mut self) {
        if !self.warn_damage {
            return;
        }
        self.warn_now();
    }
}

impl OpenRepository {
    /// Warns about the damage found so far (before a restore starts writing, so that the
    /// operator sees it first), once each.
    fn warn_now(&self) {
        for (object, reason) in self.repo.take_damaged_objects("") {
            eprintln!(
                "bkp: warning: skipped {object}, which is damaged: {reason} (`bkp check` lists all damage)"
            );
        }
    }
}

/// `report` (a JSON object) with the damaged objects the command skipped, if any, as
/// `damaged_objects: [{object, reason}]` (they are also warned about on stderr).
fn with_damage(repo: &Repository, report: impl serde::Serialize) -> Result<serde_json::Value> {
    let mut value = serde_json::to_value(report)?;
    let damaged = repo.damaged_objects();
    if let (Some(map), false) = (value.as_object_mut(), damaged.is_empty()) {
        let list: Vec<_> = damaged
            .iter()
            .map(|(object, reason)| json!({"object": object, "reason": reason}))
            .collect();
        map.insert("damaged_objects".to_string(), list.into());
    }
    Ok(value)
}

fn init(location: &str, quiet: bool, args: InitArgs) -> Result<()> {
    // The source first: a mistake there should not cost the new password's typing twice.
    let shared = match &args.copy_chunker_params_from {
        Some(from) => {
            let source = open_source(from, "share its chunker parameters")?;
            Some((source.config().chunker, source.chunking_keys()?))
        }
        None => None,
    };
    let password = read_password(true)?;
    if password.is_empty() {
        bail!(
            "refusing an empty password; choose one and keep it safe: without it no backup can be restored"
        );
    }
    let mut options = InitOptions {
        kdf: kdf_params(),
        ..InitOptions::default()
    };
    if let Some((chunker, keys)) = shared {
        options.chunker = chunker;
        options.chunking_keys = Some(keys);
    }
    let repo = Repository::init(open_store(location, true)?, password.as_bytes(), &options)?;
    if !quiet {
        println!(
            "created bkp repository {} at {location}\n\
             Keep the password safe: without it, no backup in this repository can be restored.",
            repo.config().repository_id.short()
        );
    }
    Ok(())
}

fn byte_spinner(template: &str) -> Option<ProgressBar> {
    if !io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new_spinner()
        .with_style(ProgressStyle::with_template(template).expect("valid template"));
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

/// Where a backup is, for its signal handler: whether it may still say "nothing was recorded".
#[derive(Default)]
struct BackupPhase {
    /// The snapshot is being written: stopping now may leave it recorded.
    recording: bool,
    /// A signal that came while recording, answered once the snapshot is written.
    deferred_signal: Option<i32>,
}

/// What the signal handler does about `signal`.
#[derive(Debug, PartialEq, Eq)]
enum OnSignal {
    /// Stop the dump command, say this, exit with 128 + signal.
    Exit(String),
    /// Say this and let the snapshot be written.
    Defer(String),
}

impl BackupPhase {
    fn on_signal(&mut self, signal: i32) -> OnSignal {
        if !self.recording {
            return OnSignal::Exit(format!(
                "bkp: interrupted by signal {signal}; the backup stopped and nothing was recorded"
            ));
        }
        if self.deferred_signal.is_some() {
            return OnSignal::Exit(format!(
                "bkp: interrupted by signal {signal} while the snapshot was being written: it may or may not be recorded (`bkp snapshots` shows it if it is)"
            ));
        }
        self.deferred_signal = Some(signal);
        OnSignal::Defer(format!(
            "bkp: signal {signal}: the snapshot is being written; stopping once it is (signal again to stop at once)"
        ))
    }
}

/// On SIGINT, SIGTERM or SIGHUP: stop the dump command, say so, and exit without recording.
/// A snapshot is the last object a backup writes, atomically, so exiting at any point before
/// it leaves nothing recorded. A signal while the snapshot is being written waits for it (a
/// second one does not), so that what bkp says is true: the phase is decided under the lock
/// that the backup takes to enter the recording phase.
fn stop_on_signals(
    dump_command: Option<bkp::command::DumpStopper>,
) -> Result<std::sync::Arc<std::sync::Mutex<BackupPhase>>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("cannot install signal handlers")?;
    let phase = std::sync::Arc::new(std::sync::Mutex::new(BackupPhase::default()));
    let shared = phase.clone();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            let mut phase = shared.lock().unwrap_or_else(|e| e.into_inner());
            match phase.on_signal(signal) {
                OnSignal::Exit(message) => {
                    if let Some(dump) = &dump_command {
                        dump.stop();
                    }
                    eprintln!("{message}");
                    std::process::exit(128 + signal);
                }
                OnSignal::Defer(message) => eprintln!("{message}"),
            }
        }
    });
    Ok(phase)
}

/// A backup, and its outcome in `--metrics-file` whatever it is (a signal that stops it leaves
/// the file as it was: its last success only grows older).
fn backup_with_metrics(location: &str, quiet: bool, mut args: BackupArgs) -> Result<ExitCode> {
    let Some(path) = args.metrics_file.take() else {
        return backup(location, quiet, args).map(|(code, _)| ExitCode::from(code));
    };
    let mut tags = args.tags.clone();
    tags.sort();
    tags.dedup();
    let started = std::time::Instant::now();
    let result = backup(location, quiet, args);
    let (exit_code, saved) = match &result {
        Ok((code, summary)) => (*code, Some(summary)),
        Err(err) => (exit_status(err), None),
    };
    let outcome = metrics::Outcome {
        job: metrics::Job::Backup,
        tags: &tags,
        exit_code,
        ended: std::time::SystemTime::now(),
        duration: started.elapsed(),
        sizes: saved.map(|summary| vec![summary.snapshot.snapshot.size, summary.bytes_stored]),
    };
    if let Err(why) = metrics::write(&path, &outcome) {
        eprintln!("bkp: warning: the metrics file was not written: {why:#}");
    }
    result.map(|(code, _)| ExitCode::from(code))
}

/// A backup: its exit code (0, or 6 for a dump saved incomplete) and summary.
fn backup(location: &str, quiet: bool, args: BackupArgs) -> Result<(u8, BackupSummary)> {
    let mut options = BackupOptions {
        tags: args.tags,
        hostname: args.host,
        compression_level: args.compression,
        ..BackupOptions::default()
    };
    // Start draining the dump before the (slower) password and repository work.
    let phase;
    let mut input_size = None;
    let input = if args.command.is_empty() {
        if io::stdin().is_terminal() {
            bail!(
                "standard input is a terminal; pipe a dump into bkp backup (`pg_dump db | bkp backup --tag db`) or give the command after `--`"
            );
        }
        phase = stop_on_signals(None)?;
        options.name = args.name.unwrap_or_else(|| "stdin".to_string());
        input_size = stdin_file_size();
        bkp::Source::spawn(io::stdin())
    } else {
        let command = bkp::command::DumpCommand::spawn(&args.command)?;
        phase = stop_on_signals(Some(command.stopper()))?;
        options.name = args.name.unwrap_or_else(|| command.command().to_string());
        options.annotations.insert(
            bkp::annotation::COMMAND.to_string(),
            command.command().to_string(),
        );
        bkp::Source::spawn(command)
    };
    let repo = open_repository(location, Access::BackUp)?;
    if repo.role() == bkp::KeyRole::PutOnly {
        options.send_log = send_log_dir();
        if options.send_log.is_none() {
            eprintln!(
                "bkp: warning: a put-only key keeps a send log, but neither BKP_CACHE_DIR nor XDG_CACHE_HOME nor HOME is set: this backup stores the whole dump, and so will the next"
            );
        }
    }
    let bar = if quiet {
        None
    } else {
        byte_spinner("{spinner} {msg} [{elapsed}]")
    };
    let summary = bkp::backup(&repo, input, &options, &mut |event| match event {
        bkp::BackupEvent::DumpDetected(info) => {
            if let Some(warning) = &info.compression_warning {
                let message = format!("bkp: warning: {warning}");
                match &bar {
                    Some(bar) => bar.println(message),
                    None => eprintln!("{message}"),
                }
            }
        }
        bkp::BackupEvent::Warning(warning) => {
            let message = format!("bkp: warning: {warning}");
            match &bar {
                Some(bar) => bar.println(message),
                None => eprintln!("{message}"),
            }
        }
        bkp::BackupEvent::Recording => {
            phase.lock().unwrap_or_else(|e| e.into_inner()).recording = true;
        }
        bkp::BackupEvent::Progress(p) => {
            if let Some(bar) = &bar {
                bar.set_message(progress_line(&p, bar.elapsed(), input_size));
            }
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(signal) = phase
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .deferred_signal
    {
        eprintln!(
            "bkp: signal {signal} came while the snapshot was being written; it was recorded: {}",
            summary.snapshot.id.short()
        );
    }
    if args.json {
        println!("{}", with_damage(&repo, backup_json(&summary))?);
    } else if !quiet {
        println!("{}", backup_line(&summary));
    }
    if summary.dump.complete == Some(false) {
        eprintln!(
            "bkp: WARNING: the {} dump ends without its completion trailer: it is probably truncated \
             (the dump program failed or was cut off). Snapshot {} was saved but is flagged INCOMPLETE; \
             check the dump program's errors and run the backup again.",
            summary.dump.info.kind.name(),
            summary.snapshot.id.short()
        );
        return Ok((EXIT_DUMP_INCOMPLETE, summary));
    }
    Ok((0, summary))
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// What is left of standard input, if it is a regular file (`bkp backup < dump.sql`).
fn stdin_file_size() -> Option<u64> {
    use std::io::Seek;
    use std::os::fd::AsFd;
    let mut file = File::from(io::stdin().as_fd().try_clone_to_owned().ok()?);
    let metadata = file.metadata().ok()?;
    if !metadata.is_file() {
        return None;
    }
    let at = file.stream_position().ok()?;
    Some(metadata.len().saturating_sub(at))
}

/// The backup's progress line: what was read (of how much, and how long the rest takes, when
/// the size is known), and how much of it is in chunks the repository did not have (stored as
/// deltas and compressed, so what is added is far less: the summary says how much).
fn progress_line(p: &bkp::BackupProgress, elapsed: Duration, size: Option<u64>) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = p.bytes_read as f64 / secs;
    let read = match size {
        Some(size) if size >= p.bytes_read && size > 0 => {
            let left = ((size - p.bytes_read) as f64 / rate.max(1.0)) as u64;
            let left = match left {
                0..60 => format!("{left}s"),
                60..3600 => format!("{} min", left.div_ceil(60)),
                _ => format!("{}h{:02}m", left / 3600, left % 3600 / 60),
            };
            format!(
                "{}/{} ({:.0}%, {left} left)",
                HumanBytes(p.bytes_read),
                HumanBytes(size),
                100.0 * p.bytes_read as f64 / size as f64,
            )
        }
        _ => format!(
            "{} read, {}/s",
            HumanBytes(p.bytes_read),
            HumanBytes(rate as u64)
        ),
    };
    format!("{read}, {} in changed chunks", HumanBytes(p.bytes_new))
}

fn backup_line(summary: &BackupSummary) -> String {
    let s = &summary.snapshot.snapshot;
    let secs = summary.elapsed.as_secs_f64();
    // Two lines that each fit 80 columns, whatever the sizes.
    let new = if s.added.new_raw == 0 {
        "no changed chunks".to_string()
    } else {
        format!(
            "{} in changed chunks, {:.1}x",
            HumanBytes(s.added.new_raw),
            ratio(s.added.new_raw, s.added.stored)
        )
    };
    format!(
        "snapshot {} saved: {} read in {:.1} s ({}/s)\n  {} added to the repository ({new})",
        summary.snapshot.id.short(),
        HumanBytes(s.size),
        secs,
        HumanBytes((s.size as f64 / secs.max(0.001)) as u64),
        HumanBytes(summary.bytes_stored),
    )
}

fn backup_json(summary: &BackupSummary) -> serde_json::Value {
    let s = &summary.snapshot.snapshot;
    json!({
        "snapshot_id": summary.snapshot.id.to_hex(),
        "bytes_read": s.size,
        "bytes_new": s.added.new_raw,
        "bytes_added": summary.bytes_stored,
        "chunks": s.added.chunks,
        "new_chunks": s.added.new_chunks,
        "dedup_ratio": ratio(s.size, s.added.new_raw),
        "compression_ratio": ratio(s.added.new_raw, s.added.stored),
        "seconds": summary.elapsed.as_secs_f64(),
        "tags": s.tags,
        "hostname": s.hostname,
        "dump_kind": summary.dump.info.kind.name(),
        "complete": summary.dump.complete,
    })
}

/// The snapshot `pick` names: an id (a unique prefix) or `latest`, among those with its tags.
fn pick_snapshot(repo: &Repository, pick: &Pick) -> Result<SnapshotEntry> {
    pick_by(repo, &pick.snapshot, &pick.tags)
}

/// The snapshot `spec` names: an id (a unique prefix) or `latest`, among those with `tags`.
fn pick_by(repo: &Repository, spec: &str, tags: &[String]) -> Result<SnapshotEntry> {
    if spec != "latest" {
        return Ok(repo.find_snapshot(spec, tags)?);
    }
    let (entry, skipped) = repo.find_latest(tags)?;
    for (newer, reason) in &skipped {
        // Said even with --quiet: the operator asked for the newest and gets an older one.
        eprintln!(
            "bkp: note: skipped the newer snapshot {} ({}): {reason}; name it by id if you need it",
            newer.id.short(),
            humantime::format_rfc3339_seconds(newer.snapshot.time)
        );
    }
    Ok(entry)
}

fn restore(location: &str, quiet: bool, args: RestoreArgs) -> Result<()> {
    let repo = open_repository(location, Access::FullKeyTo("restore"))?;
    let entry = pick_snapshot(&repo, &args.pick)?;
    repo.warn_now();
    if entry.snapshot.dump_complete() == Some(false) {
        // Said even with --quiet: restoring a truncated dump must never go unnoticed.
        eprintln!(
            "bkp: WARNING: snapshot {} is flagged INCOMPLETE: its dump ended without the completion \
             trailer, so what follows is probably a truncated dump. `bkp snapshots` lists the complete ones.",
            entry.id.short()
        );
    }
    let bar = if quiet || !io::stderr().is_terminal() {
        None
    } else {
        let bar = ProgressBar::new(entry.snapshot.size).with_style(
            ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        Some(bar)
    };
    let mut report = |p: &bkp::RestoreProgress| {
        if let Some(bar) = &bar {
            bar.set_position(p.bytes_written);
        }
    };
    let tables = match args.tables.is_empty() {
        true => Vec::new(),
        false => bkp::tables::resolve(&entry.snapshot, &args.tables)?,
    };
    let mut restore = |out: &mut dyn Write| match tables.is_empty() {
        true => bkp::restore(&repo, &entry, out, &mut report),
        false => bkp::tables::restore_tables(
            &repo,
            &entry,
            &tables,
            out,
            // Said even with --quiet: the restored tables lack a constraint the dump had.
            &mut |note| eprintln!("bkp: note: {note}"),
            &mut report,
        ),
    };
    let summary = match &args.output {
        Some(path) => restore_to_file(path, &mut restore)?,
        None => {
            let stdout = pipe::PipeWriter::new(io::stdout().lock());
            let mut out = BufWriter::with_capacity(pipe::WRITE_BUFFER, stdout);
            restore(&mut out)?
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if !quiet {
        let what = match tables.is_empty() {
            true => String::new(),
            false => format!("{} of ", tables.join(", ")),
        };
        eprintln!(
            "restored {what}snapshot {}: {} verified, {:.1} s",
            entry.id.short(),
            HumanBytes(summary.bytes_written),
            summary.elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// Restores into a new file at `path`, never overwriting one. The stream goes to a temporary
/// file beside it (private: a dump holds the database's data) that takes the name only once
/// the whole stream verified and is on disk; a failed or interrupted restore (Ctrl-C, SIGTERM,
/// SIGHUP) leaves nothing under the requested name and removes the temporary file.
fn restore_to_file(
    path: &std::path::Path,
    restore: &mut dyn FnMut(&mut dyn Write) -> bkp::Result<bkp::RestoreSummary>,
) -> Result<bkp::RestoreSummary> {
    use std::os::unix::fs::OpenOptionsExt;
    let exists = || {
        anyhow::anyhow!(
            "{} already exists (restore never overwrites; remove it or choose another --output)",
            path.display()
        )
    };
    if path.symlink_metadata().is_ok() {
        return Err(exists());
    }
    let name = path
        .file_name()
        .with_context(|| format!("--output {} names no file", path.display()))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let temp = dir.join(format!(
        ".{}.bkp-restore-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    // Before the file exists, so that no signal can come between.
    remove_on_signals(temp.clone())?;
    let file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .with_context(|| {
            format!(
                "cannot create {} (is the directory writable?)",
                temp.display()
            )
        })?;
    let mut out = BufWriter::with_capacity(pipe::WRITE_BUFFER, file);
    let result = restore(&mut out)
        .map_err(anyhow::Error::from)
        .and_then(|summary| {
            let file = out.into_inner().map_err(|e| Error::Sink(e.into_error()))?;
            file.sync_all().map_err(Error::Sink)?;
            // A hard link fails if the name exists, unlike a rename: never overwrite.
            std::fs::hard_link(&temp, path).map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => exists(),
                _ => anyhow::Error::from(e).context(format!("cannot create {}", path.display())),
            })?;
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(Error::Sink)?;
            Ok(summary)
        });
    let _ = std::fs::remove_file(&temp);
    result
}

/// On SIGINT, SIGTERM or SIGHUP during a restore to a file: remove the partial file and exit.
fn remove_on_signals(partial: std::path::PathBuf) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("cannot install signal handlers")?;
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let _ = std::fs::remove_file(&partial);
            eprintln!("bkp: interrupted by signal {signal}; the restore stopped and wrote no file");
            std::process::exit(128 + signal);
        }
    });
    Ok(())
}

fn snapshot_json(entry: &SnapshotEntry) -> serde_json::Value {
    let s = &entry.snapshot;
    json!({
        "id": entry.id.to_hex(),
        "time": humantime::format_rfc3339_seconds(s.time).to_string(),
        "hostname": s.hostname,
        "tags": s.tags,
        "name": s.name,
        "size": s.size,
        "stream_blake3": hex::encode(s.stream_hash),
        "bytes_added": s.added.stored,
        "dump_kind": s.annotations.get(bkp::annotation::DUMP_KIND),
        "complete": s.dump_complete(),
        "database": s.annotations.get(bkp::annotation::DATABASE),
        "server_version": s.annotations.get(bkp::annotation::SERVER_VERSION),
        "command": s.annotations.get(bkp::annotation::COMMAND),
        "future_dated": s.is_future_dated(std::time::SystemTime::now()),
    })
}

/// The dump kind, marked when the dump was found incomplete or the time is in the future.
fn dump_column(s: &bkp::Snapshot) -> String {
    let kind = s
        .annotations
        .get(bkp::annotation::DUMP_KIND)
        .map_or("-", String::as_str);
    // (Short: the table is read on a terminal; `--json` has the kind as recorded.)
    let mut column = kind.replace("postgres-", "pg-");
    if s.dump_complete() == Some(false) {
        column.push_str(" INCOMPLETE");
    }
    if s.is_future_dated(std::time::SystemTime::now()) {
        column.push_str(" FUTURE");
    }
    column
}

/// A text table: the header and the rows, each column as wide as what it holds, those numbered
/// in `right` aligned right (sizes), the last one unpadded.
fn columns<R: AsRef<[String]>>(header: &[&str], rows: &[R], right: &[usize]) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row.as_ref()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (n, (cell, width)) in cells.zip(&widths).enumerate() {
            let pad = " ".repeat(width.saturating_sub(cell.chars().count()));
            if n + 1 == widths.len() {
                text.push_str(if right.contains(&n) { &pad } else { "" });
                text.push_str(cell);
            } else if right.contains(&n) {
                text.push_str(&format!("{pad}{cell}  "));
            } else {
                text.push_str(&format!("{cell}{pad}  "));
            }
        }
        text
    };
    let mut lines = vec![line(&mut header.iter().copied())];
    lines.extend(
        rows.iter()
            .map(|row| line(&mut row.as_ref().iter().map(String::as_str))),
    );
    lines
}

fn snapshots(location: &str, args: SnapshotsArgs) -> Result<()> {
    let repo = open_repository(location, Access::FullKeyTo("list snapshots"))?;
    let list = repo.snapshots(&args.tags)?;
    // Shown as such (with their tags unknown: they cannot be read), not only warned about.
    let damaged = repo.take_damaged_objects("snapshots/");
    // Each series' last restore drill (one listing and one read per series).
    let mut drills: Vec<(Vec<String>, Option<bkp::drill::Drill>)> = Vec::new();
    for entry in &list {
        if !drills.iter().any(|(tags, _)| *tags == entry.snapshot.tags) {
            let drill = repo.last_drill(&entry.snapshot.tags)?;
            drills.push((entry.snapshot.tags.clone(), drill));
        }
    }
    let last_drill = |tags: &Vec<String>| {
        drills
            .iter()
            .find(|(t, _)| t == tags)
            .and_then(|(_, d)| d.as_ref())
    };
    let mut out = io::stdout().lock();
    if args.json {
        let mut array: Vec<_> = list
            .iter()
            .map(|entry| {
                let mut value = snapshot_json(entry);
                value["series_last_drill"] = last_drill(&entry.snapshot.tags)
                    .map_or(serde_json::Value::Null, drill::drill_json);
                value
            })
            .collect();
        array.extend(damaged.iter().map(|(object, error)| {
            json!({
                "id": object.rsplit('/').next(),
                "object": object,
                "damaged": error,
            })
        }));
        writeln!(out, "{}", serde_json::to_string_pretty(&array)?)?;
        return Ok(());
    }
    // Columns as wide as what they hold, so that a usual line fits 80 columns; the time to the
    // minute in UTC (`--json` has the seconds).
    let now = std::time::SystemTime::now();
    let rows: Vec<[String; 8]> = list
        .iter()
        .map(|entry| {
            let s = &entry.snapshot;
            let time = humantime::format_rfc3339_seconds(s.time).to_string();
            [
                entry.id.short(),
                time.get(..16).unwrap_or(&time).replace('T', " "),
                s.hostname.clone(),
                HumanBytes(s.size).to_string(),
                HumanBytes(s.added.stored).to_string(),
                s.tags.join(","),
                dump_column(s),
                s.name.clone(),
            ]
        })
        .collect();
    let header = [
        "id",
        "time (UTC)",
        "host",
        "size",
        "added",
        "tags",
        "dump",
        "name",
    ];
    let lines = columns(&header, &rows, &[3, 4]);
    writeln!(out, "{}", lines[0])?;
    let (mut incomplete, mut future) = (0, 0);
    for (entry, line) in list.iter().zip(&lines[1..]) {
        writeln!(out, "{line}")?;
        let s = &entry.snapshot;
        incomplete += usize::from(s.dump_complete() == Some(false));
        future += usize::from(s.is_future_dated(now));
    }
    for (object, error) in &damaged {
        let id = object.rsplit('/').next().unwrap_or(object);
        writeln!(out, "{:<8}  DAMAGED: {error}", id.get(..8).unwrap_or(id))?;
    }
    write!(out, "{} snapshot(s)", list.len())?;
    if incomplete > 0 {
        write!(
            out,
            ", {incomplete} INCOMPLETE (their dumps lack the completion trailer)"
        )?;
    }
    if future > 0 {
        write!(
            out,
            ", {future} FUTURE (dated more than {} ahead of this host's clock: `latest` and retention pass over them)",
            humantime::format_duration(bkp::MAX_CLOCK_SKEW)
        )?;
    }
    if !damaged.is_empty() {
        write!(
            out,
            ", {} DAMAGED (unreadable; `bkp forget ID` removes one)",
            damaged.len()
        )?;
    }
    writeln!(out)?;
    for (tags, drill) in &drills {
        let series = match tags.is_empty() {
            true => "(no tags)".to_string(),
            false => tags.join(","),
        };
        let Some(drill) = drill else {
            writeln!(
                out,
                "{series}: never drilled (`bkp drill` restores into a scratch database)"
            )?;
            continue;
        };
        let time = humantime::format_rfc3339_seconds(drill.time).to_string();
        let when = time.get(..16).unwrap_or(&time).replace('T', " ");
        match &drill.failure {
            None => writeln!(
                out,
                "{series}: last drill {when} OK, snapshot {}, {} in {:.0} s",
                drill.snapshot.short(),
                HumanBytes(drill.bytes),
                drill.duration.as_secs_f64()
            )?,
            Some(why) => writeln!(
                out,
                "{series}: last drill {when} FAILED, snapshot {}: {why}",
                drill.snapshot.short()
            )?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_names_what_it_counts_and_fits_a_terminal() {
        let p = bkp::BackupProgress {
            bytes_read: 3 << 30,
            bytes_new: 461 << 20,
        };
        let known = progress_line(&p, Duration::from_secs(10), Some(12 << 30));
        assert!(
            known.starts_with("3.00 GiB/12.00 GiB (25%, 30s left)"),
            "{known}"
        );
        let slow = progress_line(&p, Duration::from_secs(1000), Some(12 << 30));
        assert!(slow.contains("(25%, 50 min left)"), "{slow}");
        let slower = progress_line(&p, Duration::from_secs(4000), Some(12 << 30));
        assert!(slower.contains("(25%, 3h20m left)"), "{slower}");
        assert!(known.contains("461.00 MiB in changed chunks"), "{known}");
        let piped = progress_line(&p, Duration::from_secs(10), None);
        assert!(piped.starts_with("3.00 GiB read, "), "{piped}");
        // (The spinner and elapsed time take 13 columns more.)
        for line in [known, slow, slower, piped] {
            assert!(line.len() <= 67, "{} columns: {line}", line.len());
        }
    }

    #[test]
    fn a_signal_never_claims_nothing_was_recorded_once_the_snapshot_is_being_written() {
        let mut phase = BackupPhase::default();
        assert!(
            matches!(phase.on_signal(15), OnSignal::Exit(m) if m.contains("nothing was recorded"))
        );
        phase.recording = true;
        let first = phase.on_signal(15);
        assert!(
            matches!(&first, OnSignal::Defer(m) if !m.contains("nothing")),
            "{first:?}"
        );
        assert_eq!(phase.deferred_signal, Some(15));
        let second = phase.on_signal(2);
        assert!(
            matches!(&second, OnSignal::Exit(m) if m.contains("may or may not") && !m.contains("nothing was recorded")),
            "{second:?}"
        );
    }
}
