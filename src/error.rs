//! The library's one error type.
//!
//! Policy: variants are split by what the caller can do about them (create a repository, fix the
//! password, fix the input, repair or restore from elsewhere), not by which module failed. Every
//! message is one lowercase line that names the object involved and, where there is one, the fix.
//! Messages never contain secrets: no passwords, no key material, no plaintext.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no bkp repository at {location} (create one with `bkp init`)")]
    RepositoryNotFound { location: String },

    #[error(
        "the bucket of {location} does not exist (create it first, or fix the bucket name in the URL)"
    )]
    BucketNotFound { location: String },

    #[error(
        "the storage at {location} refused access: check the credentials in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3) and that they may read and write the bucket"
    )]
    AccessDenied { location: String },

    #[error("a bkp repository already exists at {location}; refusing to overwrite it")]
    RepositoryExists { location: String },

    #[error("wrong password: none of the {key_count} key(s) in {location} opens with it")]
    WrongPassword { location: String, key_count: usize },

    /// The password opened a put-only key, which can back up and nothing else.
    #[error(
        "the key this password opens is put-only: it can back up, but not {refused} (use the password of a full key for that)"
    )]
    PutOnlyKey { refused: String },

    #[error(
        "{location} has no key files, so it cannot be opened (an interrupted `bkp init` leaves only a config: if it holds nothing else, delete it and run `bkp init` again)"
    )]
    NoKeys { location: String },

    /// `found` and `supported` are versions of the object's kind (its magic's digits), or of
    /// the repository format for `config`.
    #[error(
        "{object} was written by a newer bkp (version {found} of its layout; this bkp reads up to {supported}): upgrade bkp"
    )]
    UnsupportedFormat {
        object: String,
        found: u32,
        supported: u32,
    },

    /// Stored bytes failed authentication, did not parse, or decoded to the wrong content.
    #[error(
        "{object} is corrupt: {reason} (that object is damaged; `bkp check` lists what it affects)"
    )]
    Corrupt { object: String, reason: String },

    /// Something that metadata references is not in the store.
    #[error("{object} is missing from the repository (`bkp check` lists what it affects)")]
    Missing { object: String },

    #[error("no snapshot matches {query}")]
    SnapshotNotFound { query: String },

    #[error(
        "snapshot id prefix {prefix} is ambiguous: it matches {matches} snapshots; give more characters"
    )]
    AmbiguousSnapshot { prefix: String, matches: usize },

    #[error("invalid {what}: {reason}")]
    InvalidInput { what: String, reason: String },

    #[error(
        "the repository's storage is full ({location}): free space or move the repository (a backup that stops here records no snapshot)"
    )]
    StorageFull { location: String },

    // Causes are part of the message (not `#[source]`), so printing the chain never repeats them.
    #[error("storage error at {location}: {}", one_line(.cause))]
    Store {
        location: String,
        cause: object_store::Error,
    },

    #[error("reading the input stream failed: {0}")]
    Source(io::Error),

    /// The dump command bkp ran failed; nothing was recorded.
    #[error("{0}; no snapshot was saved")]
    DumpCommand(crate::command::CommandFailed),

    /// The dump command's arguments carry a password (`form` names how, never the password).
    #[error(
        "the dump command carries a password ({form}), which every local user can read in the process list; nothing was run: put it in a file (mysqldump --defaults-extra-file=FILE or ~/.my.cnf; ~/.pgpass or PGPASSFILE for pg_dump) or in the environment of the cron job or service unit (MYSQL_PWD, PGPASSWORD)"
    )]
    PasswordInCommand { form: &'static str },

    /// The stream held no bytes: a dump is never empty, so the program before the pipe (or the
    /// dump command) most likely failed. Nothing is recorded, so `latest` stays a real dump.
    #[error(
        "the input is empty (0 bytes): the dump program before the pipe probably failed (check its errors, or give it after `--` so bkp sees its exit status); no snapshot was saved"
    )]
    EmptyInput,

    /// A pack the backup wrote or deduplicated against was deleted while it ran.
    #[error(
        "{object}, which this backup depends on, was deleted while the backup ran (by a prune whose grace period is shorter than this backup took); no snapshot was saved: run the backup again, and give prune a longer --grace"
    )]
    DependencyDeleted { object: String },

    /// The snapshot object was written but the barrier after it failed.
    #[error(
        "snapshot {snapshot} was written but could not be made durable ({cause}); it is listed and may restore, but may not survive a crash of the storage host: fix the storage and run the backup again"
    )]
    NotDurable { snapshot: String, cause: String },

    #[error("writing the restored stream failed: {0}")]
    Sink(io::Error),

    /// Prune, check and stats of a large repository sort on local disk ([`crate::spill`]), and
    /// a backup to a remote store fills its next pack there.
    #[error(
        "writing temporary files in {dir} failed: {cause} (a backup to S3 needs ~10 MiB there, prune, check and stats of a large repository about 60 bytes per chunk: set TMPDIR to a writable directory with room)"
    )]
    TempFiles { dir: String, cause: io::Error },

    #[error("{0}")]
    Internal(String),
}

/// Servers put XML bodies with line breaks into their error messages; ours are one line.
fn one_line(message: &impl std::fmt::Display) -> String {
    message
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl Error {
    /// A read error from the input, or the failure of the dump command behind it.
    pub(crate) fn from_source(e: io::Error) -> Self {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<crate::command::CommandFailed>())
        {
            Some(failed) => Error::DumpCommand(failed.clone()),
            None => Error::Source(e),
        }
    }

    pub(crate) fn corrupt(object: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            object: object.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
