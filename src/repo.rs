//! A repository: init/open, naming of objects, and the write-ordering rule.
//!
//! Layout in the store (docs/FORMAT.md):
//! ```text
//! config                 sealed Config; its existence is what makes a repository
//! keys/<id>              password-wrapped master key, one per password
//! packs/<id[..2]>/<id>   packs (id = BLAKE3 of the pack's bytes)
//! index/<id>             sealed IndexFile
//! snapshots/<id>         sealed Snapshot
//! ```
//! Write order: packs, then the index file naming them, then the snapshot. Each step starts only
//! after the previous one's objects are stored, so a crash leaves at worst unreferenced packs or
//! an unreferenced index file, never a snapshot that points at nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::chunker::ChunkerParams;
use crate::crypto::{KdfParams, KeyFile, MasterKey};
use crate::envelope;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{INDEX_MAGIC, Index, IndexFile, IndexedPack};
use crate::pack;
use crate::series::{self, SeriesKeys};
use crate::snapshot::{PackRef, SNAPSHOT_MAGIC, Snapshot, SnapshotEntry};
use crate::store::{ObjectInfo, Pending, Store};

pub const CONFIG_MAGIC: &[u8; 8] = b"BKPCFG01";
pub const OBSOLETE_MAGIC: &[u8; 8] = b"BKPOBS01";
pub const CATALOG_MAGIC: &[u8; 8] = b"BKPCAT01";

/// How many of a series' snapshots may be in no catalog before a backup writes one.
pub const CATALOG_AFTER: usize = 64;

/// The listing facts of a series' snapshots (docs/FORMAT.md §11.3), so that `snapshots --tag`
/// reads a catalog rather than one object per snapshot. A cache of facts that never change:
/// which snapshots exist is always taken from the series' markers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub snapshots: Vec<(Id, Snapshot)>,
}

/// Packs a prune found unneeded at `time`: backups no longer deduplicate against them, and a
/// prune at least a grace period later deletes those still unneeded (docs/FORMAT.md §10).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObsoleteList {
    pub time: SystemTime,
    pub packs: Vec<Id>,
}
/// An obsolete list as listed: its object name, when the storage says it was written (which a
/// replayed or back-dated list cannot fake), and its content.
pub(crate) struct StoredObsoleteList {
    pub name: String,
    pub stored: SystemTime,
    pub list: ObsoleteList,
}

const CONFIG_NAME: &str = "config";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub format_version: u32,
    pub repository_id: Id,
    pub chunker: ChunkerParams,
    pub created: SystemTime,
}

#[derive(Clone, Debug)]
pub struct InitOptions {
    pub kdf: KdfParams,
    pub chunker: ChunkerParams,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            kdf: KdfParams::DEFAULT,
            chunker: ChunkerParams::DEFAULT,
        }
    }
}

pub struct Repository {
    store: Store,
    key: MasterKey,
    /// The key file that opened (or created) the repository.
    key_id: Id,
    config: Config,
    series: SeriesKeys,
    /// Objects that listings found damaged and skipped ([`Repository::skip_damaged`]).
    damaged: Mutex<BTreeMap<String, String>>,
}

pub fn pack_name(id: &Id) -> String {
    let hex = id.to_hex();
    format!("packs/{}/{}", &hex[..2], hex)
}

pub fn index_name(id: &Id) -> String {
    format!("index/{id}")
}

pub fn snapshot_name(id: &Id) -> String {
    format!("snapshots/{id}")
}

pub(crate) fn key_name(id: &Id) -> String {
    format!("keys/{id}")
}

/// The last path component of an object name, parsed as an id.
pub(crate) fn id_of(name: &str) -> Option<Id> {
    name.rsplit('/').next()?.parse().ok()
}

/// Reads an object named by the hash of its bytes (all but the config): one whose bytes do not
/// hash to its name (renamed, copied over, planted, or a stray file such as `notes.txt`) is
/// damaged, whatever its content says.
pub(crate) fn get_named(store: &Store, name: &str) -> Result<bytes::Bytes> {
    let bytes = store.get(name)?;
    if id_of(name) != Some(Id::of_object(&bytes)) {
        return Err(Error::corrupt(
            name,
            "its name is not the hash of its bytes (renamed, planted, or not a bkp object)",
        ));
    }
    Ok(bytes)
}

/// [`Repository::skip_damaged`], recording into `damaged` (also before a repository is open).
fn skip_damaged_into<T>(
    damaged: &mut BTreeMap<String, String>,
    read: Result<T>,
) -> Result<Option<T>> {
    match read {
        Ok(value) => Ok(Some(value)),
        Err(Error::Corrupt { object, reason }) => {
            damaged.entry(object).or_insert(reason);
            Ok(None)
        }
        Err(Error::Missing { object }) => {
            damaged
                .entry(object)
                .or_insert_with(|| "it was listed but cannot be read any more".to_string());
            Ok(None)
        }
        Err(e) => Err(e),
    }
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

pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

pub(crate) fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A repository in memory with a trivial KDF, for unit tests.
#[cfg(test)]
pub(crate) fn test_repository() -> Repository {
    let options = InitOptions {
        kdf: KdfParams::INSECURE_FAST,
        ..InitOptions::default()
    };
    Repository::init(Store::memory(), b"pw", &options).expect("a memory repository")
}

impl Repository {
    /// Creates a repository in an empty store.
    pub fn init(store: Store, password: &[u8], options: &InitOptions) -> Result<Repository> {
        options.chunker.validate()?;
        if store.exists(CONFIG_NAME)? {
            return Err(Error::RepositoryExists {
                location: store.location().to_string(),
            });
        }
        let key = MasterKey::generate();
        let now = SystemTime::now();
        let key_file = KeyFile::wrap(&key, password, options.kdf, unix_seconds(now))?;
        let config = Config {
            format_version: crate::FORMAT_VERSION,
            repository_id: key.repository_id,
            chunker: options.chunker,
            created: now,
        };
        let sealed = envelope::seal(CONFIG_MAGIC, key.metadata.sealing(), &config);
        // The config goes first, create-only: of racing inits exactly one writes it, and only
        // that one goes on to write its key file, so no other init's key lingers.
        if !store.put_new(CONFIG_NAME, sealed)? {
            return Err(Error::RepositoryExists {
                location: store.location().to_string(),
            });
        }
        let key_bytes = key_file.encode();
        let key_id = Id::of_object(&key_bytes);
        store.put_new(&key_name(&key_id), key_bytes)?;
        store.barrier()?;
        Ok(Repository {
            store,
            series: SeriesKeys::new(&key),
            key,
            key_id,
            config,
            damaged: Mutex::default(),
        })
    }

    /// Opens a repository with a password, trying each key file in turn.
    pub fn open(store: Store, password: &[u8]) -> Result<Repository> {
        let config_bytes = match store.get(CONFIG_NAME) {
            Ok(bytes) => bytes,
            Err(Error::Missing { .. }) => {
                return Err(Error::RepositoryNotFound {
                    location: store.location().to_string(),
                });
            }
            Err(e) => return Err(e),
        };
        let key_objects = store.list("keys")?;
        if key_objects.is_empty() {
            return Err(Error::NoKeys {
                location: store.location().to_string(),
            });
        }
        // Several keys may open with one password (a key added twice, or a key left by an
        // older bkp's init race); the right one is the one that opens the config.
        let mut unlocked_but_wrong = None;
        let mut opened = None;
        let mut damaged = BTreeMap::new();
        for object in &key_objects {
            // A damaged key file (cut short by a crash, planted) must not lock out the others.
            let read = get_named(&store, &object.name)
                .and_then(|bytes| KeyFile::decode(&bytes, &object.name));
            let Some(file) = skip_damaged_into(&mut damaged, read)? else {
                continue;
            };
            let Some(key) = file.unwrap_with(password, &object.name)? else {
                continue;
            };
            let config: Result<Config> =
                envelope::open(CONFIG_MAGIC, &key.metadata, &config_bytes, CONFIG_NAME);
            match config {
                Ok(config) if config.repository_id == key.repository_id => {
                    let key_id = id_of(&object.name).expect("get_named checked the name");
                    opened = Some((key, key_id, config));
                    break;
                }
                Ok(_) => {
                    unlocked_but_wrong = Some(Error::corrupt(
                        CONFIG_NAME,
                        "belongs to another repository than the key",
                    ))
                }
                Err(e) => unlocked_but_wrong = Some(e),
            }
        }
        let (key, key_id, config) = match (opened, unlocked_but_wrong) {
            (Some(opened), _) => opened,
            (None, Some(e)) => return Err(e),
            (None, None) => {
                return Err(Error::WrongPassword {
                    location: store.location().to_string(),
                    key_count: key_objects.len(),
                });
            }
        };
        if config.format_version > crate::FORMAT_VERSION {
            return Err(Error::UnsupportedFormat {
                object: CONFIG_NAME.to_string(),
                found: config.format_version,
                supported: crate::FORMAT_VERSION,
            });
        }
        config.chunker.validate()?;
        Ok(Repository {
            store,
            series: SeriesKeys::new(&key),
            key,
            key_id,
            config,
            damaged: Mutex::new(damaged),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn key(&self) -> &MasterKey {
        &self.key
    }

    /// The id of the key file that opened this repository.
    pub fn key_id(&self) -> Id {
        self.key_id
    }

    /// Reads every index file, for reading data (restore, check, stats): where a chunk is stored
    /// more than once, a copy outside the packs a prune marked is used, so that a restore does
    /// not depend on what the next prune deletes.
    pub fn load_index(&self) -> Result<Index> {
        self.load_index_with_last(&self.marked_packs()?)
    }

    /// The packs in every obsolete list.
    fn marked_packs(&self) -> Result<HashSet<Id>> {
        Ok(self
            .obsolete_lists()?
            .into_iter()
            .flat_map(|stored| stored.list.packs)
            .collect())
    }

    /// The index a backup deduplicates against: without the packs a prune has marked obsolete,
    /// so that a backup never comes to depend on a pack a later prune deletes (docs/FORMAT.md
    /// §10). Their chunks, if needed again, are stored again. It knows which frame holds a
    /// chunk, not where in it ([`Index::frames_only`]).
    pub(crate) fn load_index_for_backup(&self) -> Result<Index> {
        let obsolete = self.marked_packs()?;
        let mut index = Index::frames_only();
        self.add_index_files(&mut index, &obsolete)?;
        index.finish_decodable_only();
        Ok(index)
    }

    /// The index a backup of a series deduplicates against: that of the packs its parent
    /// snapshot (the series' newest) named, read from their headers, so that a backup reads
    /// what its parent needs and not every index file of the repository. If the parent names
    /// none (a series' first backup, or the first by this bkp), or one of its packs is marked
    /// obsolete (a prune repacked it), gone or damaged, every index file instead
    /// ([`Repository::load_index_for_backup`]): the chunks moved elsewhere, and the next
    /// backup's parent names where.
    pub(crate) fn load_index_for_series(&self, tags: &[String]) -> Result<Index> {
        let Some(parent) = self.parent_of(tags)? else {
            return self.load_index_for_backup();
        };
        let obsolete = self.marked_packs()?;
        if parent
            .snapshot
            .packs
            .iter()
            .any(|p| obsolete.contains(&p.id))
        {
            return self.load_index_for_backup();
        }
        let mut index = Index::frames_only();
        for pack in self.read_pack_headers(&parent.snapshot.packs) {
            match pack {
                Ok(pack) => index.add(&pack),
                Err(Error::Missing { .. } | Error::Corrupt { .. }) => {
                    return self.load_index_for_backup();
                }
                Err(e) => return Err(e),
            }
        }
        index.finish_decodable_only();
        Ok(index)
    }

    /// The index a restore of `snapshot` reads: that of the packs it names, read from their
    /// headers, if they hold every chunk of its tree and every base those chunks' frames need
    /// (checked by a walk of the tree, whose nodes are a small part of the stream); otherwise
    /// (a prune repacked one since, or a snapshot from before format 3) every index file.
    pub(crate) fn load_index_for_restore(&self, snapshot: &Snapshot) -> Result<Index> {
        if snapshot.packs.is_empty() {
            return self.load_index();
        }
        let mut index = Index::default();
        for pack in self.read_pack_headers(&snapshot.packs) {
            match pack {
                Ok(pack) => index.add(&pack),
                Err(Error::Missing { .. } | Error::Corrupt { .. }) => return self.load_index(),
                Err(e) => return Err(e),
            }
        }
        index.finish();
        let mut complete = true;
        let mut reader = crate::pack_reader::FrameReader::new(self, &index);
        let walked =
            crate::walk::for_each_chunk(self, &index, &mut reader, &snapshot.tree, &mut |id, _| {
                let decodable = index
                    .chunk_frame(&id)
                    .is_some_and(|frame| crate::pack_reader::bases_of(&index, frame).is_ok());
                complete &= decodable;
            });
        match walked {
            Ok(()) if complete => Ok(index),
            Ok(()) | Err(Error::Missing { .. } | Error::Corrupt { .. }) => self.load_index(),
            Err(e) => Err(e),
        }
    }

    /// The newest snapshot of the series `tags` (exactly those tags) that names its packs, by
    /// the markers. (In a format 2 repository, an older bkp's newer snapshot may lack one:
    /// deduplicating against an older snapshot of the series costs bytes, never correctness.)
    fn parent_of(&self, tags: &[String]) -> Result<Option<SnapshotEntry>> {
        let mut tags = tags.to_vec();
        tags.sort();
        tags.dedup();
        let dir = series::series_dir(&self.series.name(&tags));
        for object in self.store.list_first(&dir, 16)? {
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

    /// The headers of `packs`, read with aligned ranged reads, several packs at a time; each
    /// is checked against its id and length.
    pub(crate) fn read_pack_headers(&self, packs: &[PackRef]) -> Vec<Result<IndexedPack>> {
        const THREADS: usize = 8;
        let read = |pack: &PackRef| -> Result<IndexedPack> {
            let name = pack_name(&pack.id);
            let (data_ephemeral, header) =
                pack::read_header_with(pack.len, &self.key.metadata, &name, |range| {
                    crate::pack_reader::read_range_aligned(&self.store, &name, pack.len, range)
                })?;
            Ok(IndexedPack {
                id: pack.id,
                len: pack.len,
                data_ephemeral,
                header,
            })
        };
        let per_thread = packs.len().div_ceil(THREADS).max(1);
        std::thread::scope(|scope| {
            let workers: Vec<_> = packs
                .chunks(per_thread)
                .map(|part| scope.spawn(move || part.iter().map(read).collect::<Vec<_>>()))
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("a header reader does not panic"))
                .collect()
        })
    }

    /// One index file at a time: only the compact in-memory index grows with the repository.
    fn add_index_files(&self, index: &mut Index, skip: &HashSet<Id>) -> Result<()> {
        for object in self.store.list("index")? {
            let Some(file) = self.skip_damaged(self.read_index_file(&object.name))? else {
                continue;
            };
            for pack in file.packs.iter().filter(|p| !skip.contains(&p.id)) {
                index.add(pack);
            }
        }
        Ok(())
    }

    /// The whole index, with the packs in `last` added after all others: where a chunk is in
    /// both (a backup stored again what a marked pack holds), the other copy is the one used,
    /// so prune can let the marked pack go.
    /// Files naming packs in `last` are read a second time rather than those packs held: after
    /// a prune that marked most of a repository, they are most of the index.
    pub(crate) fn load_index_with_last(&self, last: &HashSet<Id>) -> Result<Index> {
        let mut index = Index::default();
        let mut deferred = Vec::new();
        for object in self.store.list("index")? {
            let Some(file) = self.skip_damaged(self.read_index_file(&object.name))? else {
                continue;
            };
            let (later, now): (Vec<_>, Vec<_>) =
                file.packs.iter().partition(|p| last.contains(&p.id));
            now.into_iter().for_each(|pack| index.add(pack));
            if !later.is_empty() {
                deferred.push(object.name);
            }
        }
        for name in deferred {
            let Some(file) = self.skip_damaged(self.read_index_file(&name))? else {
                continue;
            };
            for pack in file.packs.iter().filter(|p| last.contains(&p.id)) {
                index.add(pack);
            }
        }
        index.finish();
        Ok(index)
    }

    /// Listings go on past a damaged object (one that fails authentication or parsing, or was
    /// listed and is gone): it is recorded ([`Repository::damaged_objects`]) and skipped, so
    /// one bad object (a write cut short by a crash, a planted file) blocks nothing. Storage
    /// errors, and objects of a newer format, still stop the operation.
    pub(crate) fn skip_damaged<T>(&self, read: Result<T>) -> Result<Option<T>> {
        let mut damaged = self.damaged.lock().expect("damage lock");
        skip_damaged_into(&mut damaged, read)
    }

    /// Every damaged object that listings skipped so far, with what is wrong with each.
    pub fn damaged_objects(&self) -> Vec<(String, String)> {
        let damaged = self.damaged.lock().expect("damage lock");
        damaged
            .iter()
            .map(|(object, reason)| (object.clone(), reason.clone()))
            .collect()
    }

    /// The damaged objects under `prefix` (`""`: all) that listings skipped and that were not
    /// taken yet, with what is wrong with each (`its name is not the hash of its bytes`): tell
    /// the operator (`bkp check` reports them
    /// too).
    pub fn take_damaged_objects(&self, prefix: &str) -> Vec<(String, String)> {
        let mut damaged = self.damaged.lock().expect("damage lock");
        damaged
            .iter_mut()
            .filter(|(object, error)| object.starts_with(prefix) && !error.is_empty())
            .map(|(object, error)| (object.clone(), std::mem::take(error)))
            .collect()
    }

    pub(crate) fn read_index_file(&self, name: &str) -> Result<IndexFile> {
        let bytes = get_named(&self.store, name)?;
        IndexFile::open(&self.key.metadata, &bytes, name)
    }

    /// Every obsolete list (prune's marks), with its name and the storage's time for it.
    pub(crate) fn obsolete_lists(&self) -> Result<Vec<StoredObsoleteList>> {
        let mut lists = Vec::new();
        for object in self.store.list("obsolete")? {
            let read = get_named(&self.store, &object.name).and_then(|bytes| {
                envelope::open(OBSOLETE_MAGIC, &self.key.metadata, &bytes, &object.name)
            });
            if let Some(list) = self.skip_damaged(read)? {
                lists.push(StoredObsoleteList {
                    name: object.name,
                    stored: object.modified,
                    list,
                });
            }
        }
        Ok(lists)
    }

    /// Reads a pack and rebuilds its index entry from the pack alone, checking that the pack
    /// is stored under the hash of its bytes.
    pub fn read_pack(&self, id: &Id) -> Result<IndexedPack> {
        let name = pack_name(id);
        let bytes = self.store.get(&name)?;
        if Id::of_object(&bytes) != *id {
            return Err(Error::corrupt(&name, "its bytes do not hash to its name"));
        }
        let (data_ephemeral, header) = pack::read_header(&bytes, &self.key.metadata, &name)?;
        Ok(IndexedPack {
            id: *id,
            len: bytes.len() as u64,
            data_ephemeral,
            header,
        })
    }

    /// Reads the snapshot object `snapshots/<id>`.
    pub(crate) fn read_snapshot_named(&self, name: &str) -> Result<SnapshotEntry> {
        let id = id_of(name).ok_or_else(|| Error::corrupt(name, "not named by a snapshot id"))?;
        self.read_snapshot(id)
    }

    /// Reads snapshot `id`.
    pub fn read_snapshot(&self, id: Id) -> Result<SnapshotEntry> {
        let name = snapshot_name(&id);
        let bytes = get_named(&self.store, &name)?;
        let snapshot = Snapshot::open(&self.key.metadata, &bytes, &name)?;
        Ok(SnapshotEntry { id, snapshot })
    }

    /// All snapshots carrying every tag in `tags`, oldest first. With tags, in a repository of
    /// format 3, only the snapshots of the series whose tags include them are read.
    pub fn snapshots(&self, tags: &[String]) -> Result<Vec<SnapshotEntry>> {
        let ids: Vec<Id> = if tags.is_empty() || !self.has_series_markers() {
            let mut ids = Vec::new();
            for object in self.store.list("snapshots")? {
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
                    self.series_snapshots(&series)?
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
    fn series_snapshots(&self, series: &str) -> Result<Vec<SnapshotEntry>> {
        let markers: BTreeMap<Id, (u64, String)> = self
            .store
            .list(&series::series_dir(series))?
            .into_iter()
            .filter_map(|o| {
                let marker = series::parse_marker(&o.name)?;
                Some((marker.id, (marker.nanos, o.name)))
            })
            .collect();
        let (mut known, _) = self.catalog_entries(series, &markers)?;
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
        for object in self.store.list(&series::catalog_dir(series))? {
            let read = get_named(&self.store, &object.name).and_then(|bytes| {
                envelope::open::<Catalog>(CATALOG_MAGIC, &self.key.metadata, &bytes, &object.name)
            });
            let Some(catalog) = self.skip_damaged(read)? else {
                continue;
            };
            let agrees = |(id, snapshot): &(Id, Snapshot)| {
                self.series.name(&snapshot.tags) == series
                    && markers
                        .get(id)
                        .is_none_or(|(nanos, _)| series::unix_nanos(snapshot.time) == *nanos)
            };
            if !catalog.snapshots.iter().all(agrees) {
                self.skip_damaged::<()>(Err(Error::corrupt(
                    &object.name,
                    "an entry disagrees with its snapshot's series marker",
                )))?;
                continue;
            }
            names.push(object.name);
            entries.extend(
                catalog
                    .snapshots
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
        if !self.has_series_markers() {
            return Ok(false);
        }
        let mut tags = tags.to_vec();
        tags.sort();
        tags.dedup();
        let series = self.series.name(&tags);
        let markers: BTreeMap<Id, (u64, String)> = self
            .store
            .list(&series::series_dir(&series))?
            .into_iter()
            .filter_map(|o| {
                let marker = series::parse_marker(&o.name)?;
                Some((marker.id, (marker.nanos, o.name)))
            })
            .collect();
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
        let sealed = envelope::seal(
            CATALOG_MAGIC,
            self.key.metadata.sealing(),
            &Catalog { snapshots },
        );
        let name = format!(
            "{}/{}",
            series::catalog_dir(&series),
            Id::of_object(&sealed)
        );
        self.store.put_new(&name, sealed)?;
        self.store.barrier()?;
        self.delete_objects(&read)?;
        Ok(true)
    }

    /// Whether every snapshot has a series marker (format 3: written since, or upgraded), so
    /// that `latest` and `--tag` read only their series.
    pub fn has_series_markers(&self) -> bool {
        self.config.format_version >= 3
    }

    /// The names of the series whose tags include all of `tags`.
    fn series_with(&self, tags: &[String]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for name in self.store.list_folders(series::SERIES_DIR)? {
            match self.series.tags(&name) {
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
            let page = self.store.list_first(&series::series_dir(&series), PAGE)?;
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
        let series = self.series.name(&entry.snapshot.tags);
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
        let lower = prefix.to_ascii_lowercase();
        if lower.is_empty() || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid(
                "snapshot",
                format!("{prefix:?} is neither `latest` nor a hex snapshot id prefix"),
            ));
        }
        let matches: Vec<Id> = self
            .store
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
        let damaged = self.damaged.lock().expect("damage lock");
        if let Some((object, _)) = damaged.iter().find(|(o, _)| o.starts_with("snapshots/")) {
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

    // Writes. The repository alone orders them (docs/FORMAT.md §2, §10): nothing is written
    // that names an object before that object is durable, and each method returns once what it
    // wrote or deleted is durable, except `put_pack_soon`, whose packs become durable with the
    // commit that names them. Operations never call the store's put, delete or barrier.

    /// Starts storing a pack (a backup overlaps uploads with compression); it is durable, and
    /// named, only with [`Repository::commit_packs`] or [`Repository::commit_snapshot`].
    pub(crate) fn put_pack_soon(&self, id: &Id, bytes: Vec<u8>) -> Pending<bool> {
        self.store.put_new_soon(&pack_name(id), bytes)
    }

    /// The result of a pack put started with [`Repository::put_pack_soon`].
    pub(crate) fn wait_for_pack(&self, put: Pending<bool>) -> Result<()> {
        self.store.wait(put).map(drop)
    }

    /// Makes the packs stored so far durable, then names `packs` in one new index file and
    /// makes that durable. Returns the index file's stored size (0 for no packs).
    pub(crate) fn commit_packs(&self, packs: Vec<IndexedPack>) -> Result<u64> {
        if packs.is_empty() {
            return Ok(0);
        }
        self.store.barrier()?;
        let sealed = envelope::seal(
            INDEX_MAGIC,
            self.key.metadata.sealing(),
            &IndexFile { packs },
        );
        let len = sealed.len() as u64;
        self.store
            .put_new(&index_name(&Id::of_object(&sealed)), sealed)?;
        self.store.barrier()?;
        Ok(len)
    }

    /// Records a snapshot, once everything it references is durable, and makes it durable;
    /// refuses if a pack in `depends_on` is gone (a prune deleted it while the backup ran, which
    /// happens only to a backup that took longer than the prune's grace period). Returns the
    /// snapshot's id and stored size.
    pub(crate) fn commit_snapshot(&self, snapshot: &Snapshot) -> Result<(Id, u64)> {
        self.store.barrier()?;
        let names: Vec<String> = snapshot.packs.iter().map(|p| pack_name(&p.id)).collect();
        let sizes = self.store.sizes(&names)?;
        if let Some((name, _)) = names.iter().zip(sizes).find(|(_, size)| size.is_none()) {
            return Err(Error::DependencyDeleted {
                object: name.clone(),
            });
        }
        let sealed = envelope::seal(SNAPSHOT_MAGIC, self.key.metadata.sealing(), snapshot);
        let id = Id::of_object(&sealed);
        let len = sealed.len() as u64;
        // The marker first: a crash between the two leaves a marker without its snapshot,
        // which readers pass over, never a snapshot that `latest` does not find.
        self.store
            .put_new(&self.marker_of(&id, snapshot), Vec::new())?;
        self.store.barrier()?;
        self.store.put_new(&snapshot_name(&id), sealed)?;
        // Written but perhaps not durable: saying "nothing was recorded" would be wrong.
        self.store.barrier().map_err(|cause| Error::NotDurable {
            snapshot: id.short(),
            cause: cause.to_string(),
        })?;
        Ok((id, len))
    }

    /// The series marker of snapshot `id`.
    pub(crate) fn marker_of(&self, id: &Id, snapshot: &Snapshot) -> String {
        series::marker_name(&self.series.name(&snapshot.tags), snapshot.time, id)
    }

    /// Every series marker, with the storage's time for it.
    pub(crate) fn markers(&self) -> Result<Vec<(Id, ObjectInfo)>> {
        Ok(self
            .store
            .list(series::SERIES_DIR)?
            .into_iter()
            .filter_map(|o| Some((series::parse_marker(&o.name)?.id, o)))
            .collect())
    }

    /// Brings the repository to format 3: every snapshot gets its series marker, then the
    /// config says format 3 (the one object ever replaced). Returns how many markers it wrote.
    /// Snapshots that cannot be read get none (`bkp check` reports them).
    pub fn upgrade(&mut self) -> Result<usize> {
        let mut written = 0;
        for entry in self.snapshots(&[])? {
            if self
                .store
                .put_new(&self.marker_of(&entry.id, &entry.snapshot), Vec::new())?
            {
                written += 1;
            }
        }
        self.store.barrier()?;
        if self.config.format_version < crate::FORMAT_VERSION {
            let config = Config {
                format_version: crate::FORMAT_VERSION,
                ..self.config.clone()
            };
            let sealed = envelope::seal(CONFIG_MAGIC, self.key.metadata.sealing(), &config);
            self.store.replace(CONFIG_NAME, sealed)?;
            self.store.barrier()?;
            self.config = config;
        }
        Ok(written)
    }

    /// Replaces index file `old` by one naming only `keep` (none: no new file): the new file is
    /// durable before the old one goes, and the old one is durably gone when this returns, so
    /// that the packs it named may be deleted next.
    pub(crate) fn replace_index_file(&self, old: &str, keep: Vec<IndexedPack>) -> Result<()> {
        self.commit_packs(keep)?;
        self.store.delete(old)?;
        self.store.barrier()
    }

    /// Deletes objects (packs no index names any more, processed obsolete lists, forgotten
    /// snapshots, removed keys), durably.
    pub(crate) fn delete_objects(&self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        self.store.delete_many(names)?;
        self.store.barrier()
    }

    /// Stores an obsolete list (prune's marks), durably.
    pub(crate) fn commit_obsolete_list(&self, list: &ObsoleteList) -> Result<()> {
        let sealed = envelope::seal(OBSOLETE_MAGIC, self.key.metadata.sealing(), list);
        let name = format!("obsolete/{}", Id::of_object(&sealed).to_hex());
        self.store.put_new(&name, sealed)?;
        self.store.barrier()
    }

    /// Stores a synthetic index file (the scale benchmark's filler), durably; its packs do not
    /// exist, so this skips the barrier before it that [`Repository::commit_packs`] makes.
    pub(crate) fn commit_synthetic_index(&self, packs: Vec<IndexedPack>) -> Result<()> {
        let sealed = envelope::seal(
            INDEX_MAGIC,
            self.key.metadata.sealing(),
            &IndexFile { packs },
        );
        self.store
            .put_new(&index_name(&Id::of_object(&sealed)), sealed)?;
        self.store.barrier()
    }

    /// Stores synthetic snapshots (the scale benchmark's filler) and their markers at once,
    /// durably: they name no packs, so there is nothing to wait for before them.
    pub(crate) fn commit_synthetic_snapshots(&self, snapshots: &[Snapshot]) -> Result<()> {
        let puts: Vec<_> = snapshots
            .iter()
            .flat_map(|snapshot| {
                let sealed = envelope::seal(SNAPSHOT_MAGIC, self.key.metadata.sealing(), snapshot);
                let id = Id::of_object(&sealed);
                [
                    self.store
                        .put_new_soon(&self.marker_of(&id, snapshot), Vec::new()),
                    self.store.put_new_soon(&snapshot_name(&id), sealed),
                ]
            })
            .collect();
        for put in puts {
            self.store.wait(put)?;
        }
        self.store.barrier()
    }

    /// Stores a key file, durably.
    pub(crate) fn commit_key_file(&self, id: &Id, bytes: Vec<u8>) -> Result<()> {
        self.store.put_new(&key_name(id), bytes)?;
        self.store.barrier()
    }
}
