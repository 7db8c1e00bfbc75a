//! Restore drills: the record of a snapshot restored into a command (a scratch database's
//! client) and whether that worked, kept in the repository so that `bkp snapshots` can say when
//! each series last proved restorable (docs/FORMAT.md §14).
//!
//! A drill is a write-once object `drills/<series name>/<newest first>-<id>`: sealed to the
//! metadata key like a snapshot, named by the hash of its bytes (`<id>`) after the time it
//! started, newest first, so the newest drill of a series is the first name a listing returns.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::envelope;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::repo::Repository;
use crate::series::unix_nanos;

pub const DRILLS_DIR: &str = "drills";
pub const DRILL_MAGIC: &[u8; 8] = b"BKPDRL01";

/// What a drill did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drill {
    /// The snapshot restored.
    pub snapshot: Id,
    /// Its tags (its series).
    pub tags: Vec<String>,
    /// When the drill started, and how long it took.
    pub time: SystemTime,
    pub duration: Duration,
    /// Bytes restored into the command.
    pub bytes: u64,
    /// The host that ran it, and the command (as `bkp backup` records a dump command: bkp
    /// refuses commands that carry a password).
    pub hostname: String,
    pub command: String,
    /// `None` when the restore verified and the command exited 0; else what went wrong.
    pub failure: Option<String>,
}

impl Drill {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

/// The folder of a series' drills.
fn drills_dir(series: &str) -> String {
    format!("{DRILLS_DIR}/{series}")
}

/// `<newest first>-<id>` of a drill object's name: its id, if the name is one.
fn parse_name(name: &str) -> Option<Id> {
    let file = name.rsplit('/').next()?;
    let (newest_first, id) = file.split_once('-')?;
    (newest_first.len() == 16 && u64::from_str_radix(newest_first, 16).is_ok())
        .then(|| id.parse().ok())?
}

impl Repository {
    /// Records a drill (write-once, durable); returns the object's name.
    pub fn record_drill(&self, drill: &Drill) -> Result<String> {
        let sealed = envelope::seal(DRILL_MAGIC, self.key().metadata.sealing(), drill);
        let name = format!(
            "{}/{:016x}-{}",
            drills_dir(&self.series_of(&drill.tags)),
            u64::MAX - unix_nanos(drill.time),
            Id::of_object(&sealed)
        );
        self.commit_drill(&name, sealed)?;
        Ok(name)
    }

    /// The newest drill of the series of `tags` that can be read (damaged ones are skipped and
    /// reported as listings report them), if there is one.
    pub fn last_drill(&self, tags: &[String]) -> Result<Option<Drill>> {
        self.require_full_key("read drills")?;
        let mut names: Vec<String> = self
            .store()
            .list(&drills_dir(&self.series_of(tags)))?
            .into_iter()
            .map(|o| o.name)
            .collect();
        names.sort();
        for name in names {
            if let Some(drill) = self.skip_damaged(self.read_drill(&name))? {
                return Ok(Some(drill));
            }
        }
        Ok(None)
    }

    fn read_drill(&self, name: &str) -> Result<Drill> {
        let id = parse_name(name).ok_or_else(|| Error::corrupt(name, "not a drill's name"))?;
        let bytes = self.store().get(name)?;
        if Id::of_object(&bytes) != id {
            return Err(Error::corrupt(
                name,
                "its name is not the hash of its bytes (renamed, planted, or not a bkp object)",
            ));
        }
        let drill: Drill = envelope::open(DRILL_MAGIC, &self.key().metadata, &bytes, name)?;
        if self.series_of(&drill.tags) != name.split('/').nth(1).unwrap_or_default() {
            return Err(Error::corrupt(name, "it is filed under another series"));
        }
        Ok(drill)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drill(tags: &[&str], at: u64, failure: Option<&str>) -> Drill {
        Drill {
            snapshot: Id([7; 32]),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(at),
            duration: Duration::from_millis(1500),
            bytes: 1234,
            hostname: "h".into(),
            command: "psql -d scratch".into(),
            failure: failure.map(str::to_string),
        }
    }

    #[test]
    fn the_last_drill_of_a_series_is_the_newest_and_damage_is_skipped() {
        let repo = crate::repo::test_repository();
        let tags = ["shop".to_string()];
        assert_eq!(repo.last_drill(&tags).unwrap(), None);
        let older = drill(&["shop"], 1_000, None);
        let newer = drill(&["shop"], 2_000, Some("psql exited with status 3"));
        repo.record_drill(&older).unwrap();
        let name = repo.record_drill(&newer).unwrap();
        repo.record_drill(&drill(&["crm"], 3_000, None)).unwrap();
        assert_eq!(repo.last_drill(&tags).unwrap(), Some(newer));
        // A newest drill that was tampered with is reported and passed over.
        let mut bytes = repo.store().get(&name).unwrap().to_vec();
        bytes[100] ^= 1;
        repo.store().delete(&name).unwrap();
        repo.store().put_new(&name, bytes).unwrap();
        assert_eq!(repo.last_drill(&tags).unwrap(), Some(older));
        assert_eq!(repo.damaged_objects().len(), 1);
    }
}
