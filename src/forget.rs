//! Forget: apply a retention policy per group of snapshots, or remove snapshots by id. Removing
//! a snapshot deletes only its small snapshot object; the data it alone used stays until a prune.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::SystemTime;

use jiff::tz::TimeZone;

use crate::error::{Error, Result};
use crate::repo::{Repository, snapshot_name};
use crate::retention::{self, Decision, Policy};
use crate::snapshot::SnapshotEntry;

/// What makes snapshots one series for retention. By default host and tag set: `--tag db`
/// retention never mixes databases or hosts, and a stream name that varies (the dump command
/// line) does not split a series.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupBy {
    pub host: bool,
    pub tags: bool,
}

impl GroupBy {
    pub const DEFAULT: GroupBy = GroupBy {
        host: true,
        tags: true,
    };
}

impl FromStr for GroupBy {
    type Err = Error;

    /// `host,tags`, `host`, `tags`, or `none`.
    fn from_str(text: &str) -> Result<GroupBy> {
        let mut group = GroupBy::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "host" => group.host = true,
                "tags" => group.tags = true,
                "none" => {}
                other => {
                    return Err(Error::invalid(
                        "grouping",
                        format!("{other:?}: use host, tags, both (host,tags) or none"),
                    ));
                }
            }
        }
        Ok(group)
    }
}

/// (host, tags), each present when grouping by it.
type SeriesKey = (Option<String>, Option<Vec<String>>);

/// One series of snapshots and the policy's decision on each, oldest first.
#[derive(Clone, Debug)]
pub struct ForgetGroup {
    pub host: Option<String>,
    pub tags: Option<Vec<String>>,
    pub snapshots: Vec<(SnapshotEntry, Decision)>,
}

/// Decides, for the snapshots carrying all of `tags`, what `policy` keeps in each group.
pub fn plan(
    repo: &Repository,
    tags: &[String],
    policy: &Policy,
    group_by: GroupBy,
    now: SystemTime,
    tz: &TimeZone,
) -> Result<Vec<ForgetGroup>> {
    if policy.is_empty() {
        return Err(Error::invalid(
            "policy",
            "no --keep-* rule given; refusing to forget every snapshot",
        ));
    }
    let mut groups: BTreeMap<SeriesKey, Vec<SnapshotEntry>> = BTreeMap::new();
    for entry in repo.snapshots(tags)? {
        let key = (
            group_by.host.then(|| entry.snapshot.hostname.clone()),
            group_by.tags.then(|| entry.snapshot.tags.clone()),
        );
        groups.entry(key).or_default().push(entry);
    }
    Ok(groups
        .into_iter()
        .map(|((host, tags), entries)| {
            let times: Vec<_> = entries.iter().map(|e| (e.snapshot.time, e.id)).collect();
            let decisions = retention::apply(&times, policy, now, tz);
            ForgetGroup {
                host,
                tags,
                snapshots: entries.into_iter().zip(decisions).collect(),
            }
        })
        .collect())
}

/// Removes snapshots (their snapshot objects).
pub fn remove(repo: &Repository, snapshots: &[&SnapshotEntry]) -> Result<()> {
    let names: Vec<String> = snapshots.iter().map(|e| snapshot_name(&e.id)).collect();
    repo.delete_objects(&names)
}
