//! Finding snapshots: by id prefix, `latest`, and listings by tag, through series markers and
//! catalogs in a repository of format 3 (docs/FORMAT.md §11), so that none of them reads what
//! the repository holds beyond the matching series; and the parent a backup deduplicates
//! against. Listings skip damaged objects ([`Repository::skip_damaged`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::envelope;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::repo::{Repository, get_named, id_of};
use crate::series;
use crate::snapshot::{self, Snapshot, SnapshotEntry};
use crate::store::ObjectInfo;

pub const CATALOG_MAGIC: &[u8; 8] = b"BKPCAT01";

/// How many of a series' snapshots may be in no catalog before a backup writes one.
pub const CATALOG_AFTER: usize = 64;

/// The listing facts of a series' snapshots (docs/FORMAT.md §11.3), so that `snapshots --tag`
/// reads a catalog rather than one object per snapshot. A cache of facts that never change:
/// which snapshots exist is always taken from the series' markers.
/// Its snapshots are in the `BKPSNP02` layout: packs without their uses, which listings do
/// not need (a restore reads the snapshot object itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub snapshots: Vec<(Id, snapshot::v2::Snapshot)>,
}

/// A series marker as listed: its time (nanoseconds), snapshot id and object name.
type MarkerEntry = (u64, Id, String);

/// "latest with tags a,b", for messages.
fn with_tags(query: &str, tags: &[String]) -> String {
    if tags.is_empty() {
        query.to_string()
    } else {
        format!("{query} with tags {}", tags.join(","))
    }
}

impl Repository {
    /// The series name of a tag set as given on a command line (any order, repeats).
    pub(crate) fn series_of(&self, tags: &[String]) -> String {
        let mut tags = tags.to_vec();
        tags.sort();
        tags.dedup();
        self.series_keys().name(&tags)
    }

    /// A series' markers by snapshot id: (time in nanoseconds, marker name).
    fn series_markers(&self, series: &str) -> Result<BTreeMap<Id, (u64, String)>> {
        Ok(self
            .store()
            .list(&series::series_dir(series))?
            .into_iter()
            .filter_map(|o| {
                let marker = series::parse_marker(&o.name)?;
                Some((marker.id, (marker.nanos, o.name)))
            })
            .collect())
    }

    /// The newest snapshot of the series `tags` (exactly those tags) that names its packs, by
    /// the markers. (In a format 2 repository, an older bkp's newer snapshot may lack one:
    /// deduplicating against an older snapshot of the series costs bytes, never correctness.)
    pub(crate) fn parent_of(&self, tags: &[String]) -> Result<Option<SnapshotEntry>> {
        let dir = series::series_dir(&self.series_of(tags));
        for object in self.store().list_first(&dir, 16)? {
            let Some(marker) = series::parse_marker(&object.name) else {
                continue;
            };
            if let Some(entry) = self.read_marked(marker.nanos, marker.id, &object.name)?
                && !entry.snapshot.packs.is_empty()
            {
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    /// All snapshots carrying every tag in `tags`, oldest first. With tags, in a repository of
    /// format 3, only the snapshots of the series whose tags include them are read.
    pub fn snapshots(&self, tags: &[String]) -> Result<Vec<SnapshotEntry>> {
        self.snapshots_via(tags, Catalogs::Use)
    }

    /// [`Repository::snapshots`] read from the snapshot objects themselves, for what decides
    /// deletions (forget): a catalog is sealed by whichever writer made it, a put-only key's
    /// too, and must not be able to misstate the host or tags of snapshots it lists.
    pub(crate) fn snapshots_from_their_objects(
        &self,
        tags: &[String],
    ) -> Result<Vec<SnapshotEntry>> {
        self.snapshots_via(tags, Catalogs::Ignore)
    }

    fn snapshots_via(&self, tags: &[String], catalogs: Catalogs) -> Result<Vec<SnapshotEntry>> {
        self.require_full_key("list snapshots")?;
        let ids: Vec<Id> = if tags.is_empty() || !self.has_series_markers() {
            let mut ids = Vec::new();
            for object in self.store().list("snapshots")? {
                match id_of(&object.name) {
                    Some(id) => ids.push(id),
                    None => {
                        self.skip_damaged::<()>(Err(Error::corrupt(
                            &object.name,
                            "not named by a snapshot id",
                        )))?;
                    }
                }
            }
            ids
        } else {
            let mut out = Vec::new();
            for series in self.series_with(tags)? {
                out.extend(
                    self.series_snapshots(&series, catalogs)?
                        .into_iter()
                        .filter(|entry| entry.has_tags(tags)),
                );
            }
            out.sort_by(|a, b| a.snapshot.time.cmp(&b.snapshot.time).then(a.id.cmp(&b.id)));
            return Ok(out);
        };
        let mut out = Vec::new();
        for id in ids {
            let Some(entry) = self.skip_damaged(self.read_snapshot(id))? else {
                continue;
            };
            if entry.has_tags(tags) {
                out.push(entry);
            }
        }
        out.sort_by(|a, b| a.snapshot.time.cmp(&b.snapshot.time).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// The snapshots of one series: those its markers name, from its catalogs where they have
    /// them and read one by one where not.
    fn series_snapshots(&self, series: &str, catalogs: Catalogs) -> Result<Vec<SnapshotEntry>> {
        let markers = self.series_markers(series)?;
        let mut known = match catalogs {
            Catalogs::Use => self.catalog_entries(series, &markers)?.0,
            Catalogs::Ignore => HashMap::new(),
        };
        let mut out = Vec::new();
        for (id, (nanos, marker)) in &markers {
            match known.remove(id) {
                Some(snapshot) => out.push(SnapshotEntry { id: *id, snapshot }),
                None => out.extend(self.read_marked(*nanos, *id, marker)?),
            }
        }
        Ok(out)
    }

    /// The entries of a series' catalogs (§11.3) that its `markers` still name, and the names
    /// of the catalogs read. A catalog with an entry that disagrees with its marker is damaged
    /// and left out whole.
    fn catalog_entries(
        &self,
        series: &str,
        markers: &BTreeMap<Id, (u64, String)>,
    ) -> Result<(HashMap<Id, Snapshot>, Vec<String>)> {
        let mut entries = HashMap::new();
        let mut names = Vec::new();
        for object in self.store().list(&series::catalog_dir(series))? {
            let read = get_named(self.store(), &object.name).and_then(|bytes| {
                envelope::open::<Catalog>(CATALOG_MAGIC, &self.key().metadata, &bytes, &object.name)
            });
            let Some(catalog) = self.skip_damaged(read)? else {
                continue;
            };
            let snapshots: Vec<(Id, Snapshot)> = catalog
                .snapshots
                .into_iter()
                .map(|(id, snapshot)| (id, snapshot.into()))
                .collect();
            let agrees = |(id, snapshot): &(Id, Snapshot)| {
                self.series_keys().name(&snapshot.tags) == series
                    && markers
                        .get(id)
                        .is_none_or(|(nanos, _)| series::unix_nanos(snapshot.time) == *nanos)
            };
            if !snapshots.iter().all(agrees) {
                self.skip_damaged::<()>(Err(Error::corrupt(
                    &object.name,
                    "an entry disagrees with its snapshot's series marker",
                )))?;
                continue;
            }
            names.push(object.name);
            entries.extend(
                snapshots
                    .into_iter()
                    .filter(|(id, _)| markers.contains_key(id)),
            );
        }
        Ok((entries, names))
    }

    /// After a backup of series `tags`: once at least [`CATALOG_AFTER`] of the series'
    /// snapshots are in no catalog, writes one catalog of every snapshot the series' markers
    /// name, then deletes the catalogs it read (their live entries are all in the new one, so
    /// a concurrent writer doing the same loses nothing). Returns whether it wrote one.
    pub(crate) fn maintain_catalog(&self, tags: &[String]) -> Result<bool> {
        if !self.has_series_markers() || self.role() == crate::KeyRole::PutOnly {
            return Ok(false);
        }
        let series = self.series_of(tags);
        let markers = self.series_markers(&series)?;
        if markers.len() < CATALOG_AFTER {
            return Ok(false);
        }
        let (mut known, read) = self.catalog_entries(&series, &markers)?;
        let missing = markers.keys().filter(|id| !known.contains_key(id)).count();
        if missing < CATALOG_AFTER {
            return Ok(false);
        }
        for (id, (nanos, marker)) in &markers {
            if !known.contains_key(id)
                && let Some(entry) = self.read_marked(*nanos, *id, marker)?
            {
                known.insert(entry.id, entry.snapshot);
            }
        }
        let mut snapshots: Vec<(Id, Snapshot)> = known.into_iter().collect();
        snapshots.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        let snapshots = snapshots
            .into_iter()
            .map(|(id, snapshot)| (id, snapshot.into()))
            .collect();
        let sealed = envelope::seal(
            CATALOG_MAGIC,
            self.key().metadata.sealing(),
            &Catalog { snapshots },
        );
        let name = format!(
            "{}/{}",
            series::catalog_dir(&series),
            Id::of_object(&sealed)
        );
        self.commit_catalog(&name, sealed, &read)?;
        Ok(true)
    }

    /// Whether every snapshot has a series marker (format 3: written since, or upgraded), so
    /// that `latest` and `--tag` read only their series.
    pub fn has_series_markers(&self) -> bool {
        self.config().format_version >= 3
    }

    /// The names of the series whose tags include all of `tags`.
    fn series_with(&self, tags: &[String]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for name in self.store().list_folders(series::SERIES_DIR)? {
            match self.series_keys().tags(&name) {
                Some(series_tags) if tags.iter().all(|t| series_tags.contains(t)) => out.push(name),
                Some(_) => {}
                None => {
                    self.skip_damaged::<()>(Err(Error::corrupt(
                        series::series_dir(&name),
                        "not a series of this repository (planted, or damaged)",
                    )))?;
                }
            }
        }
        Ok(out)
    }

    /// The snapshots of the series matching `tags`, newest first, as their markers list them,
    /// each read and checked against its marker, lazily: `latest` reads one or two.
    /// Also says whether a series has more markers than were listed.
    fn newest_first(&self, tags: &[String]) -> Result<(Vec<MarkerEntry>, bool)> {
        // A marker listing of up to a page per series is what `latest` needs; a series whose
        // first page holds nothing usable is listed whole by the caller's second pass.
        const PAGE: usize = 1000;
        let mut markers = Vec::new();
        let mut truncated = false;
        for series in self.series_with(tags)? {
            let page = self
                .store()
                .list_first(&series::series_dir(&series), PAGE)?;
            truncated |= page.len() == PAGE;
            for object in page {
                match series::parse_marker(&object.name) {
                    Some(marker) => markers.push((marker.nanos, marker.id, object.name.clone())),
                    None => {
                        self.skip_damaged::<()>(Err(Error::corrupt(
                            &object.name,
                            "not a snapshot marker",
                        )))?;
                    }
                }
            }
        }
        markers.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
        Ok((markers, truncated))
    }

    /// Reads the snapshot a marker names and checks that it is what the marker says (its series
    /// and time); `None` for a marker whose snapshot is gone (a forget or a backup cut short
    /// between the two writes) or damaged (recorded).
    fn read_marked(&self, nanos: u64, id: Id, marker: &str) -> Result<Option<SnapshotEntry>> {
        let entry = match self.read_snapshot(id) {
            Err(Error::Missing { .. }) => return Ok(None),
            read => self.skip_damaged(read)?,
        };
        let Some(entry) = entry else { return Ok(None) };
        let series = self.series_keys().name(&entry.snapshot.tags);
        if series::marker_name(&series, entry.snapshot.time, &id) != marker
            || series::unix_nanos(entry.snapshot.time) != nanos
        {
            self.skip_damaged::<()>(Err(Error::corrupt(
                marker,
                "its snapshot has other tags or another time (planted, or renamed)",
            )))?;
            return Ok(None);
        }
        Ok(Some(entry))
    }

    /// `latest` (the newest complete snapshot with all `tags`, [`Repository::find_latest`]) or
    /// a unique snapshot id prefix.
    pub fn find_snapshot(&self, query: &str, tags: &[String]) -> Result<SnapshotEntry> {
        self.require_full_key("read snapshots")?;
        if query == "latest" {
            return self.find_latest(tags).map(|(entry, _)| entry);
        }
        let entry = self.read_snapshot(self.find_snapshot_id(query, tags)?)?;
        if entry.has_tags(tags) {
            Ok(entry)
        } else {
            Err(Error::SnapshotNotFound {
                query: with_tags(query, tags),
            })
        }
    }

    /// The id of the one snapshot object whose id starts with `prefix`, whether or not it can
    /// be read (`bkp forget ID` removes a damaged one). `tags` is for the message only.
    pub fn find_snapshot_id(&self, prefix: &str, tags: &[String]) -> Result<Id> {
        self.require_full_key("read snapshots")?;
        let lower = prefix.to_ascii_lowercase();
        if lower.is_empty() || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid(
                "snapshot",
                format!("{prefix:?} is neither `latest` nor a hex snapshot id prefix"),
            ));
        }
        let matches: Vec<Id> = self
            .store()
            .list("snapshots")?
            .iter()
            .filter_map(|o| id_of(&o.name))
            .filter(|id| id.to_hex().starts_with(&lower))
            .collect();
        match matches.as_slice() {
            [] => Err(Error::SnapshotNotFound {
                query: with_tags(prefix, tags),
            }),
            [id] => Ok(*id),
            many => Err(Error::AmbiguousSnapshot {
                prefix: prefix.to_string(),
                matches: many.len(),
            }),
        }
    }

    /// The newest snapshot with all `tags` whose dump is not flagged incomplete and that is not
    /// dated in the future ([`Snapshot::is_future_dated`]), and the newer ones it passed over,
    /// each with why (they are still restorable by id). A restore of `latest` never silently
    /// gets a truncated dump, nor one a host with a wrong clock wrote; if only such ones match,
    /// that is an error naming the newest. If none matches but damaged snapshot objects were
    /// skipped, the error is that damage.
    pub fn find_latest(
        &self,
        tags: &[String],
    ) -> Result<(SnapshotEntry, Vec<(SnapshotEntry, String)>)> {
        let now = SystemTime::now();
        let mut skipped = Vec::new();
        let mut consider = |entry: SnapshotEntry| {
            let reason = if entry.snapshot.is_future_dated(now) {
                format!(
                    "it is dated {}, more than {} after this host's clock: the clock of the host that wrote it ({}) or of this one is wrong",
                    humantime::format_rfc3339_seconds(entry.snapshot.time),
                    humantime::format_duration(crate::snapshot::MAX_CLOCK_SKEW),
                    entry.snapshot.hostname
                )
            } else if entry.snapshot.dump_complete() == Some(false) {
                "its dump is flagged INCOMPLETE".to_string()
            } else {
                return Some(entry);
            };
            skipped.push((entry, reason));
            None
        };
        if self.has_series_markers() {
            // Newest first, by the markers: usually one listing per series and one read.
            let (markers, truncated) = self.newest_first(tags)?;
            let mut seen = HashSet::new();
            for (nanos, id, marker) in markers {
                if !seen.insert(id) {
                    continue;
                }
                if let Some(entry) = self.read_marked(nanos, id, &marker)?
                    && let Some(entry) = consider(entry)
                {
                    return Ok((entry, skipped));
                }
            }
            // Only if a series has more than a page of markers and none of that page would
            // do: every snapshot of the series, the slow way.
            let rest = if truncated {
                self.snapshots(tags)?
            } else {
                Vec::new()
            };
            for entry in rest.into_iter().rev() {
                if !seen.contains(&entry.id)
                    && let Some(entry) = consider(entry)
                {
                    return Ok((entry, skipped));
                }
            }
        } else {
            for entry in self.snapshots(tags)?.into_iter().rev() {
                if let Some(entry) = consider(entry) {
                    return Ok((entry, skipped));
                }
            }
        }
        if let Some((newest, reason)) = skipped.first() {
            return Err(Error::SnapshotNotFound {
                query: format!(
                    "{} that is complete and not dated in the future (the newest, {}, was passed over: {reason}; restore it by id if you need it)",
                    with_tags("latest", tags),
                    newest.id.short()
                ),
            });
        }
        if let Some(object) = self.damaged_under("snapshots/") {
            return Err(Error::corrupt(
                object,
                format!(
                    "it cannot be read, and no readable snapshot matches {}",
                    with_tags("latest", tags)
                ),
            ));
        }
        Err(Error::SnapshotNotFound {
            query: with_tags("latest", tags),
        })
    }

    /// The series marker of snapshot `id`.
    pub(crate) fn marker_of(&self, id: &Id, snapshot: &Snapshot) -> String {
        series::marker_name(&self.series_keys().name(&snapshot.tags), snapshot.time, id)
    }

    /// Every series marker, with the storage's time for it.
    pub(crate) fn markers(&self) -> Result<Vec<(Id, ObjectInfo)>> {
        Ok(self
            .store()
            .list(series::SERIES_DIR)?
            .into_iter()
            .filter_map(|o| Some((series::parse_marker(&o.name)?.id, o)))
            .collect())
    }
}

/// Whether a listing may take snapshots from catalogs (docs/FORMAT.md §11.3).
#[derive(Clone, Copy)]
enum Catalogs {
    Use,
    Ignore,
}
