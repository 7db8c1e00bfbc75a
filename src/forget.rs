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
    for entry in repo.snapshots_from_their_objects(tags)? {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listing::{CATALOG_MAGIC, Catalog};
    use crate::repo::{pseudo_random, test_repository};
    use crate::snapshot::Snapshot;
    use crate::{BackupOptions, Source, envelope, series};

    fn backup(repo: &Repository, host: &str, seed: u8) -> SnapshotEntry {
        let options = BackupOptions {
            tags: vec!["db".to_string()],
            hostname: Some(host.to_string()),
            ..BackupOptions::default()
        };
        let source = Source::spawn(std::io::Cursor::new(pseudo_random(100_000, seed)));
        crate::backup(repo, source, &options, &mut |_| {})
            .unwrap()
            .snapshot
    }

    #[test]
    fn forget_groups_snapshots_as_their_own_objects_say_not_as_a_catalog_does() {
        let repo = test_repository();
        let only_of_a = backup(&repo, "host-a", 1);
        let of_b = backup(&repo, "host-b", 2);
        // A catalog that any writer can seal (a put-only key's too): "both are host-b's".
        let forged = Snapshot {
            hostname: "host-b".to_string(),
            ..only_of_a.snapshot.clone()
        };
        let catalog = Catalog {
            snapshots: vec![
                (only_of_a.id, forged.into()),
                (of_b.id, of_b.snapshot.clone().into()),
            ],
        };
        let sealed = envelope::seal(CATALOG_MAGIC, repo.key().metadata.sealing(), &catalog);
        let series = repo.series_of(&["db".to_string()]);
        let name = format!(
            "{}/{}",
            series::catalog_dir(&series),
            Id::of_object(&sealed)
        );
        repo.commit_catalog(&name, sealed, &[]).unwrap();
        let tags = ["db".to_string()];
        assert!(
            repo.snapshots(&tags)
                .unwrap()
                .iter()
                .all(|e| e.snapshot.hostname == "host-b"),
            "the listing takes the catalog's word (a cache for display)"
        );
        // Keep the newest per host: each host's only snapshot stays.
        let policy = Policy {
            last: 1,
            ..Policy::default()
        };
        let groups = plan(
            &repo,
            &tags,
            &policy,
            GroupBy::DEFAULT,
            SystemTime::now(),
            &TimeZone::UTC,
        )
        .unwrap();
        assert_eq!(groups.len(), 2);
        assert!(
            groups
                .iter()
                .flat_map(|g| &g.snapshots)
                .all(|(_, decision)| decision.keep)
        );
    }
}
