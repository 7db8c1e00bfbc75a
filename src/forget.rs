//! Forget: apply a retention policy per group of snapshots, or remove snapshots by id. Removing
//! a snapshot deletes only its small snapshot object; the data it alone used stays until a prune.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::SystemTime;

use jiff::tz::TimeZone;

use crate::error::{Error, Result};
use crate::id::Id;
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

/// The reason that keeps a snapshot dated in the future ([`crate::Snapshot::is_future_dated`]):
/// it is kept and not counted by the rules, so that a host with a wrong clock can neither take
/// the place of the newest real snapshots nor have them forgotten. The CLI warns about each.
pub const FUTURE_DATED: &str = "future-dated";

/// Decides, for the snapshots carrying all of `tags`, what `policy` keeps in each group.
pub fn plan(
    repo: &Repository,
    tags: &[String],
    policy: &Policy,
    group_by: GroupBy,
    now: SystemTime,
    tz: &TimeZone,
) -> Result<Vec<ForgetGroup>> {
    repo.require_full_key("forget snapshots")?;
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
            let (future, entries): (Vec<_>, Vec<_>) = entries
                .into_iter()
                .partition(|e| e.snapshot.is_future_dated(now));
            let times: Vec<_> = entries.iter().map(|e| (e.snapshot.time, e.id)).collect();
            let decisions = retention::apply(&times, policy, now, tz);
            let kept = Decision {
                keep: true,
                reasons: vec![FUTURE_DATED],
            };
            let mut snapshots: Vec<_> = entries.into_iter().zip(decisions).collect();
            snapshots.extend(future.into_iter().map(|e| (e, kept.clone())));
            ForgetGroup {
                host,
                tags,
                snapshots,
            }
        })
        .collect())
}

/// Removes snapshots (their snapshot objects), damaged ones too, then their series markers
/// (a marker without its snapshot is passed over by readers; the other way round, `latest`
/// would not see a snapshot that is still there).
pub fn remove(repo: &Repository, snapshots: &[Id]) -> Result<()> {
    repo.require_full_key("forget snapshots")?;
    if snapshots.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = snapshots.iter().map(snapshot_name).collect();
    repo.delete_objects(&names)?;
    let gone: std::collections::HashSet<&Id> = snapshots.iter().collect();
    let markers: Vec<String> = repo
        .markers()?
        .into_iter()
        .filter(|(id, _)| gone.contains(id))
        .map(|(_, object)| object.name)
        .collect();
    repo.delete_objects(&markers)
}
