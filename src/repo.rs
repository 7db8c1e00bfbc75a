//! A repository: init/open, naming of objects, and the write-ordering rule.
//!
//! Layout in the store (docs/FORMAT.md):
//! ```text
//! config                 sealed Config; its existence is what makes a repository
//! keys/<id>              password-wrapped master key, one per password
//! packs/<id[..2]>/<id>   packs (id = BLAKE3 of the pack's bytes)
//! index/<id>             sealed IndexFile
//! snapshots/<id>         sealed Snapshot
//! series/<tags>/<t>-<id> empty series markers (format 3; finding them: [`crate::listing`])
//! catalogs/<tags>/<id>   sealed catalogs of a series' snapshots
//! obsolete/<id>          sealed lists of packs a prune marked
//! ```
//! Write order: packs, then the index file naming them, then the snapshot. Each step starts only
//! after the previous one's objects are stored, so a crash leaves at worst unreferenced packs or
//! an unreferenced index file, never a snapshot that points at nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::chunker::ChunkerParams;
use crate::crypto::{ChunkingKeys, CipherKey, KdfParams, KeyFile, KeyRole, MasterKey};
use crate::envelope;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{INDEX_MAGIC, Index, IndexFile, IndexedPack, SpillingIndex, lookup_memory};
use crate::pack;
use crate::send_log::SendLog;
use crate::series::SeriesKeys;
use crate::snapshot::{PackRef, SNAPSHOT_MAGIC, Snapshot, SnapshotEntry};
use crate::store::{Pending, Store};

pub const CONFIG_MAGIC: &[u8; 8] = b"BKPCFG01";
/// An obsolete list sealed to the metadata key (formats 1-3): only a full key reads it.
pub const OBSOLETE_MAGIC: &[u8; 8] = b"BKPOBS01";
/// An obsolete list sealed under the shared key (format 4), which every writer must read:
/// a put-only writer too must not deduplicate against the packs it names.
pub const SHARED_OBSOLETE_MAGIC: &[u8; 8] = b"BKPOBS02";
/// The first format whose obsolete lists are `BKPOBS02`.
const SHARED_OBSOLETE_FORMAT: u32 = 4;
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
    /// Another repository's chunking keys ([`Repository::chunking_keys`]), with its `chunker`
    /// parameters: copies between the two then read only what the target lacks. `None`: new
    /// keys of its own (the default, and the private choice).
    pub chunking_keys: Option<ChunkingKeys>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            kdf: KdfParams::DEFAULT,
            chunker: ChunkerParams::DEFAULT,
            chunking_keys: None,
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
    /// Data session keys a put-only writer knows (its own, from its send log), by ephemeral
    /// public key: the only frames it can read back.
    known_data_sessions: Mutex<HashMap<[u8; 32], CipherKey>>,
    /// Threads a backup compresses and a restore decodes with; 0: one per core this process
    /// may run on (its CPU affinity: `taskset`, a cgroup's cpuset).
    workers: usize,
}

/// What a backup deduplicates against, as [`Repository::parent_for_backup`] found it.
pub(crate) enum ParentPacks {
    Index(Index),
    /// The parent's packs, each with its uses.
    Uses(Vec<PackRef>),
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

/// Options that make many small groups and packs of a few MB of test data.
#[cfg(test)]
pub(crate) fn small_packs() -> crate::BackupOptions {
    crate::BackupOptions {
        group_size: 64 << 10,
        pack_size: 128 << 10,
        ..crate::BackupOptions::default()
    }
}

/// `len` incompressible bytes without repeats, from `seed`.
#[cfg(test)]
pub(crate) fn pseudo_random(len: usize, seed: u8) -> Vec<u8> {
    let mut data = vec![0u8; len];
    blake3::Hasher::new_keyed(&[seed; 32])
        .finalize_xof()
        .fill(&mut data);
    data
}

/// Backs `data` up with `options`.
#[cfg(test)]
pub(crate) fn test_backup(
    repo: &Repository,
    data: &[u8],
    options: &crate::BackupOptions,
) -> SnapshotEntry {
    let source = crate::Source::spawn(std::io::Cursor::new(data.to_vec()));
    crate::backup(repo, source, options, &mut |_| {})
        .expect("a test backup")
        .snapshot
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
        let mut key = MasterKey::generate();
        if let Some(shared) = &options.chunking_keys {
            key.chunker_key = shared.chunker_key;
            key.chunk_id_key = shared.chunk_id_key;
        }
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
        Ok(Repository::with_key(
            store,
            key,
            key_id,
            config,
            BTreeMap::new(),
        ))
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
            let Some(unlocked) = file.unwrap_with(password, &object.name)? else {
                continue;
            };
            let key = unlocked.key;
            // A put-only key cannot open the config: it carries a copy of it instead.
            let config: Result<Config> = match &unlocked.config {
                None => envelope::open(CONFIG_MAGIC, &key.metadata, &config_bytes, CONFIG_NAME),
                Some(copy) => postcard::from_bytes(copy)
                    .map_err(|e| Error::corrupt(&object.name, format!("its config: {e}"))),
            };
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
        Ok(Repository::with_key(store, key, key_id, config, damaged))
    }

    fn with_key(
        store: Store,
        key: MasterKey,
        key_id: Id,
        config: Config,
        damaged: BTreeMap<String, String>,
    ) -> Repository {
        Repository {
            store,
            series: SeriesKeys::new(&key),
            key,
            key_id,
            config,
            damaged: Mutex::new(damaged),
            known_data_sessions: Mutex::new(HashMap::new()),
            workers: 0,
        }
    }

    /// Sets how many threads backups and restores work with (0: one per core).
    pub fn set_workers(&mut self, workers: usize) {
        self.workers = workers;
    }

    /// How many threads backups and restores work with.
    pub fn workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The keys of series names (docs/FORMAT.md §11.1).
    pub(crate) fn series_keys(&self) -> &SeriesKeys {
        &self.series
    }

    /// The damaged objects recorded so far whose names start with `prefix`.
    pub(crate) fn damaged_under(&self, prefix: &str) -> Option<String> {
        let damaged = self.damaged.lock().expect("damage lock");
        damaged.keys().find(|o| o.starts_with(prefix)).cloned()
    }

    pub(crate) fn key(&self) -> &MasterKey {
        &self.key
    }

    /// The key of the data session `ephemeral_public` (`None` for a degenerate one): derived
    /// with a full key; with a put-only key, one it was told ([`Self::know_data_session`]).
    pub(crate) fn data_session(&self, ephemeral_public: &[u8; 32]) -> Result<Option<CipherKey>> {
        if self.role() == KeyRole::Full {
            return self.key.data.session(ephemeral_public);
        }
        let known = self.known_data_sessions.lock().expect("sessions lock");
        match known.get(ephemeral_public) {
            Some(key) => Ok(Some(key.clone())),
            None => self.key.data.session(ephemeral_public),
        }
    }

    /// Tells a put-only writer the key of one of its own data sessions.
    pub(crate) fn know_data_session(&self, ephemeral_public: [u8; 32], key: &[u8; 32]) {
        self.known_data_sessions
            .lock()
            .expect("sessions lock")
            .insert(ephemeral_public, CipherKey::new(key));
    }

    /// What the key that opened the repository may do.
    pub fn role(&self) -> KeyRole {
        self.key.role()
    }

    /// Refuses what a put-only key may not do (`refused` says what: "restore", "list
    /// snapshots"): before it reads anything, so the refusal is the first and only error.
    /// This repository's chunking keys, for a repository to share them
    /// ([`InitOptions::chunking_keys`]). Needs a full key.
    pub fn chunking_keys(&self) -> Result<ChunkingKeys> {
        self.require_full_key("share its chunking keys")?;
        Ok(ChunkingKeys::of(&self.key))
    }

    /// Whether `other` cuts and names chunks as this repository does.
    pub(crate) fn shares_chunking_with(&self, other: &Repository) -> bool {
        self.config.chunker == other.config.chunker
            && ChunkingKeys::of(&self.key) == ChunkingKeys::of(&other.key)
    }

    pub fn require_full_key(&self, refused: &str) -> Result<()> {
        match self.role() {
            KeyRole::Full => Ok(()),
            KeyRole::PutOnly => Err(Error::PutOnlyKey {
                refused: refused.to_string(),
            }),
        }
    }

    /// The id of the key file that opened this repository.
    pub fn key_id(&self) -> Id {
        self.key_id
    }

    /// Reads every index file, for reading data (restore, check, stats): where a chunk is stored
    /// more than once, a copy outside the packs a prune marked is used, so that a restore does
    /// not depend on what the next prune deletes.
    /// Its chunks are looked up in a table sorted on local disk once it is large
    /// ([`SpillingIndex::finish_for_lookups`]): memory does not grow with the repository.
    pub fn load_index(&self) -> Result<Index> {
        let mut index = SpillingIndex::with_memory(lookup_memory());
        self.for_each_indexed_pack(
            &self.marked_packs()?,
            &mut |pack| index.add(pack),
            &mut |name, e| self.skip_damaged_index_file(name, e),
        )?;
        index.finish_for_lookups(false)
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
    /// chunk, and where in it. Its chunks are looked up in a table sorted on local disk once
    /// it is large.
    pub(crate) fn load_index_for_backup(&self) -> Result<Index> {
        let obsolete = self.marked_packs()?;
        let mut index = SpillingIndex::with_memory(lookup_memory());
        self.add_index_files(&mut index, &obsolete)?;
        index.finish_for_lookups(true)
    }

    /// What a backup of a series deduplicates against. If the series' parent (its newest
    /// snapshot) says where it uses each of its packs, those packs, for the backup to read as
    /// its stream reaches where the parent used them ([`crate::parent`]). If it names packs
    /// without their uses (written by bkp 0.2 before BKPSNP03), the index of those packs, read
    /// from their headers. If it names none (a series' first backup, or the first by this
    /// bkp), or one of its packs is marked obsolete (a prune repacked it), gone or damaged,
    /// every index file instead ([`Repository::load_index_for_backup`]): the chunks moved
    /// elsewhere, and the next backup's parent names where.
    pub(crate) fn parent_for_backup(&self, tags: &[String]) -> Result<ParentPacks> {
        if self.role() == KeyRole::PutOnly {
            // It cannot read what is stored: it deduplicates within its own stream only.
            return Ok(ParentPacks::Index(Index::default()));
        }
        let Some(parent) = self.parent_of(tags)? else {
            return self.load_index_for_backup().map(ParentPacks::Index);
        };
        let obsolete = self.marked_packs()?;
        if parent
            .snapshot
            .packs
            .iter()
            .any(|p| obsolete.contains(&p.id))
        {
            return self.load_index_for_backup().map(ParentPacks::Index);
        }
        if parent.snapshot.packs_have_uses() {
            return Ok(ParentPacks::Uses(parent.snapshot.packs));
        }
        self.index_of_parent_packs(&parent.snapshot.packs)
            .map(ParentPacks::Index)
    }

    /// What a backup of the series `tags` deduplicates against, as an index read whole
    /// (the parent's packs' headers, or every index file where a backup would read them): a
    /// copy asks it before it reads the source, to leave unread what this repository has.
    pub(crate) fn index_for_copy(&self, tags: &[String]) -> Result<Index> {
        match self.parent_for_backup(tags)? {
            ParentPacks::Index(index) => Ok(index),
            ParentPacks::Uses(packs) => self.index_of_parent_packs(&packs),
        }
    }

    /// The packs of a put-only writer's send log that a backup may deduplicate against: those
    /// in the store at their size and in no obsolete list (§10). `Ok(Err(why))` if the marks
    /// cannot be known (an obsolete list sealed for full keys only, before `bkp upgrade`).
    pub(crate) fn usable_logged_packs(
        &self,
        log: &SendLog,
    ) -> Result<std::result::Result<Vec<PackRef>, String>> {
        let marked = match self.marked_packs() {
            Ok(marked) => marked,
            Err(Error::PutOnlyKey { .. }) => {
                return Ok(Err(
                    "the repository has obsolete lists that only a full key reads (run `bkp upgrade` with one)"
                        .to_string(),
                ));
            }
            Err(e) => return Err(e),
        };
        let names: Vec<String> = log.packs().iter().map(|p| pack_name(&p.id)).collect();
        let sizes = self.store.sizes(&names)?;
        Ok(Ok(log
            .packs()
            .iter()
            .zip(sizes)
            .filter(|(pack, size)| *size == Some(pack.len) && !marked.contains(&pack.id))
            .map(|(pack, _)| *pack)
            .collect()))
    }

    /// The index of a parent's packs, read from their headers; every index file if one is
    /// gone or damaged.
    pub(crate) fn index_of_parent_packs(&self, packs: &[PackRef]) -> Result<Index> {
        let mut index = SpillingIndex::with_memory(lookup_memory());
        if self.index_of_packs(packs, &mut index)?.is_none() {
            return self.load_index_for_backup();
        }
        index.finish_for_lookups(true)
    }

    /// The index of the packs `snapshot` names, read from their headers: what a restore
    /// looks its chunks up in first. `None` if it names none (a snapshot from before format 3)
    /// or one is gone or damaged; then, and wherever these packs turn out not to hold a chunk
    /// or a base (a prune repacked one since), the restore reads every index file.
    pub(crate) fn index_of_snapshot_packs(&self, snapshot: &Snapshot) -> Result<Option<Index>> {
        if snapshot.packs.is_empty() {
            return Ok(None);
        }
        let mut index = SpillingIndex::with_memory(lookup_memory());
        if self.index_of_packs(&snapshot.packs, &mut index)?.is_none() {
            return Ok(None);
        }
        index.finish_for_lookups(false).map(Some)
    }

    /// Builds an index of `packs` from their headers, read with aligned ranged reads, several
    /// packs at a time and added as they arrive (memory holds a few headers, not all of them).
    /// `None` if a pack is gone or damaged: the caller reads the index files instead.
    fn index_of_packs(&self, packs: &[PackRef], index: &mut SpillingIndex) -> Result<Option<()>> {
        const THREADS: usize = 8;
        let read = |pack: &PackRef| self.read_pack_header(pack);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let (tx, rx) = crossbeam_channel::bounded::<Result<IndexedPack>>(THREADS);
            for _ in 0..THREADS.min(packs.len()) {
                let (tx, next, stop, read) = (tx.clone(), &next, &stop, &read);
                scope.spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let at = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(pack) = packs.get(at) else { return };
                        if tx.send(read(pack)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            let mut outcome = Ok(Some(()));
            for pack in rx {
                match pack.and_then(|pack| index.add(&pack)) {
                    Ok(()) => {}
                    Err(Error::Missing { .. } | Error::Corrupt { .. }) => outcome = Ok(None),
                    Err(e) => outcome = Err(e),
                }
                if !matches!(outcome, Ok(Some(()))) {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    break;
                }
            }
            outcome
        })
    }

    /// A pack's header, read with aligned ranged reads of its end (§6.4).
    pub(crate) fn read_pack_header(&self, pack: &PackRef) -> Result<IndexedPack> {
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
    }

    /// One index file at a time: only the compact in-memory index grows with the repository.
    fn add_index_files(&self, index: &mut SpillingIndex, skip: &HashSet<Id>) -> Result<()> {
        for object in self.store.list("index")? {
            let Some(file) = self.skip_damaged(self.read_index_file(&object.name))? else {
                continue;
            };
            for pack in file.packs.iter().filter(|p| !skip.contains(&p.id)) {
                index.add(pack)?;
            }
        }
        Ok(())
    }

    /// [`Repository::spilled_index_with_last`] with the packs that prune marked last, as in
    /// [`Repository::load_index`] (stats).
    pub(crate) fn spilled_index(&self) -> Result<(Index, crate::index::ChunkTable)> {
        self.spilled_index_with_last(&self.marked_packs()?)
    }

    /// The whole index, for prune and check, with the packs in `last` added after all others:
    /// where a chunk is in both (a backup stored again what a marked pack holds), the other
    /// copy is the one used, so prune can let the marked pack go. The chunks are sorted on
    /// local disk rather than held ([`crate::index::SpillingIndex`]): the index and the table
    /// to join with. Files naming packs in `last` are read a second time rather than those
    /// packs held: after a prune that marked most of a repository, they are most of the index.
    pub(crate) fn spilled_index_with_last(
        &self,
        last: &HashSet<Id>,
    ) -> Result<(Index, crate::index::ChunkTable)> {
        let mut index = SpillingIndex::default();
        self.for_each_indexed_pack(last, &mut |pack| index.add(pack), &mut |name, e| {
            self.skip_damaged_index_file(name, e)
        })?;
        index.finish()
    }

    /// Every indexed pack, those in `last` after all others. An index file that cannot be read
    /// goes to `unreadable`, which decides whether that stops the listing. Returns how many
    /// index files were listed.
    pub(crate) fn for_each_indexed_pack(
        &self,
        last: &HashSet<Id>,
        add: &mut dyn FnMut(&IndexedPack) -> Result<()>,
        unreadable: &mut dyn FnMut(&str, Error) -> Result<()>,
    ) -> Result<usize> {
        let mut read = |name: &str| match self.read_index_file(name) {
            Ok(file) => Ok(Some(file)),
            Err(e) => unreadable(name, e).map(|()| None),
        };
        let listed = self.store.list("index")?;
        let mut deferred = Vec::new();
        for object in &listed {
            let Some(file) = read(&object.name)? else {
                continue;
            };
            let (later, now): (Vec<_>, Vec<_>) =
                file.packs.iter().partition(|p| last.contains(&p.id));
            now.into_iter().try_for_each(&mut *add)?;
            if !later.is_empty() {
                deferred.push(&object.name);
            }
        }
        for name in deferred {
            let Some(file) = read(name)? else {
                continue;
            };
            for pack in file.packs.iter().filter(|p| last.contains(&p.id)) {
                add(pack)?;
            }
        }
        Ok(listed.len())
    }

    /// For [`Repository::for_each_indexed_pack`]: a damaged index file is skipped (and
    /// recorded), a storage error stops the listing.
    fn skip_damaged_index_file(&self, _name: &str, error: Error) -> Result<()> {
        self.skip_damaged::<()>(Err(error)).map(drop)
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
            let read = get_named(&self.store, &object.name)
                .and_then(|bytes| self.open_obsolete_list(&bytes, &object.name));
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

    fn open_obsolete_list(&self, bytes: &[u8], name: &str) -> Result<ObsoleteList> {
        if bytes.starts_with(OBSOLETE_MAGIC) {
            envelope::open(OBSOLETE_MAGIC, &self.key.metadata, bytes, name)
        } else {
            envelope::open_shared(SHARED_OBSOLETE_MAGIC, &self.key.shared_key(), bytes, name)
        }
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
        let file = IndexFile { packs };
        let sealed = envelope::seal(INDEX_MAGIC, self.key.metadata.sealing(), &file);
        drop(file); // (its headers: ~1.5 MB, not needed while the file is stored)
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

    /// Brings the repository to the current format: every snapshot gets its series marker
    /// (format 3), then the config says the current format (the one object ever replaced;
    /// format 4 adds no objects, only put-only key files). Returns how many markers it wrote.
    /// Snapshots that cannot be read get none (`bkp check` reports them).
    pub fn upgrade(&mut self) -> Result<usize> {
        self.require_full_key("upgrade the repository")?;
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
        self.reseal_obsolete_lists()?;
        Ok(written)
    }

    /// Format 4: obsolete lists sealed to the metadata key are sealed again under the shared
    /// key (the new one durable before the old one goes). The storage's time of the new list is
    /// now, so its packs wait a grace period longer: later, never sooner.
    fn reseal_obsolete_lists(&self) -> Result<()> {
        for object in self.store.list("obsolete")? {
            let read = get_named(&self.store, &object.name).and_then(|bytes| {
                if !bytes.starts_with(OBSOLETE_MAGIC) {
                    return Ok(None);
                }
                envelope::open::<ObsoleteList>(
                    OBSOLETE_MAGIC,
                    &self.key.metadata,
                    &bytes,
                    &object.name,
                )
                .map(Some)
            });
            // A damaged one is left for prune and check to report.
            if let Some(Some(list)) = self.skip_damaged(read)? {
                self.commit_obsolete_list(&list)?;
                self.delete_objects(std::slice::from_ref(&object.name))?;
            }
        }
        Ok(())
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

    /// Stores a catalog (`name`, sealed) durably, then deletes the catalogs it `replaces`
    /// (each of whose live entries it holds), durably.
    pub(crate) fn commit_catalog(
        &self,
        name: &str,
        sealed: Vec<u8>,
        replaces: &[String],
    ) -> Result<()> {
        self.store.put_new(name, sealed)?;
        self.store.barrier()?;
        self.delete_objects(replaces)
    }

    /// Stores a drill's record (`name`, sealed), durably.
    pub(crate) fn commit_drill(&self, name: &str, sealed: Vec<u8>) -> Result<()> {
        self.store.put_new(name, sealed)?;
        self.store.barrier()
    }

    /// Stores an obsolete list (prune's marks), durably.
    pub(crate) fn commit_obsolete_list(&self, list: &ObsoleteList) -> Result<()> {
        let sealed = if self.config.format_version >= SHARED_OBSOLETE_FORMAT {
            envelope::seal_shared(SHARED_OBSOLETE_MAGIC, &self.key.shared_key(), list)
        } else {
            // What bkp for formats 1-3 reads.
            envelope::seal(OBSOLETE_MAGIC, self.key.metadata.sealing(), list)
        };
        let name = format!("obsolete/{}", Id::of_object(&sealed).to_hex());
        self.store.put_new(&name, sealed)?;
        self.store.barrier()
    }

    /// Stores a synthetic index file (the scale benchmark's filler), durably; its packs do not
    /// exist, so this skips the barrier before it that [`Repository::commit_packs`] makes.
    pub(crate) fn commit_synthetic_index(&self, packs: Vec<IndexedPack>) -> Result<()> {
        let file = IndexFile { packs };
        let sealed = envelope::seal(INDEX_MAGIC, self.key.metadata.sealing(), &file);
        drop(file); // (its headers: ~1.5 MB, not needed while the file is stored)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> InitOptions {
        InitOptions {
            kdf: KdfParams::INSECURE_FAST,
            ..InitOptions::default()
        }
    }

    fn obsolete_magics(repo: &Repository) -> Vec<Vec<u8>> {
        repo.store
            .list("obsolete")
            .unwrap()
            .iter()
            .map(|o| repo.store.get(&o.name).unwrap()[..8].to_vec())
            .collect()
    }

    #[test]
    fn a_put_only_key_reads_the_obsolete_lists_of_format_4_and_upgrade_reseals_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        let location = dir.path().join("repo");
        let location = location.to_str().unwrap();
        let mut repo =
            Repository::init(Store::create(location).unwrap(), b"full", &fast()).unwrap();
        crate::keys::add_key(&repo, b"put", KdfParams::INSECURE_FAST, KeyRole::PutOnly).unwrap();
        let list = ObsoleteList {
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
            packs: vec![Id([7; 32]), Id([9; 32])],
        };
        // As a format 3 repository stored it: only a full key reads it.
        repo.config.format_version = 3;
        repo.commit_obsolete_list(&list).unwrap();
        assert_eq!(obsolete_magics(&repo), [OBSOLETE_MAGIC.to_vec()]);
        let put_only = Repository::open(Store::open(location).unwrap(), b"put").unwrap();
        assert_eq!(put_only.role(), KeyRole::PutOnly);
        assert!(matches!(
            put_only.obsolete_lists(),
            Err(Error::PutOnlyKey { .. })
        ));

        // Upgrade seals it again for every writer: same packs, same sealed time.
        repo.upgrade().unwrap();
        assert_eq!(obsolete_magics(&repo), [SHARED_OBSOLETE_MAGIC.to_vec()]);
        let read = |repo: &Repository| -> Vec<ObsoleteList> {
            repo.obsolete_lists()
                .unwrap()
                .into_iter()
                .map(|stored| stored.list)
                .collect()
        };
        assert_eq!(read(&repo), vec![list.clone()]);
        assert_eq!(read(&put_only), vec![list.clone()]);
        // And format 4 writes them so.
        repo.commit_obsolete_list(&ObsoleteList {
            time: SystemTime::now(),
            ..list
        })
        .unwrap();
        assert_eq!(read(&put_only).len(), 2);
        assert!(
            obsolete_magics(&repo)
                .iter()
                .all(|m| m == SHARED_OBSOLETE_MAGIC)
        );
        // A list another repository's shared key sealed is damaged, not trusted.
        let other = Repository::init(Store::memory(), b"x", &fast()).unwrap();
        let foreign =
            envelope::seal_shared(SHARED_OBSOLETE_MAGIC, &other.key.shared_key(), &list_of(9));
        repo.store
            .put_new(&format!("obsolete/{}", Id::of_object(&foreign)), foreign)
            .unwrap();
        assert_eq!(read(&put_only).len(), 2);
        assert!(put_only.damaged_under("obsolete/").is_some());
    }

    fn list_of(byte: u8) -> ObsoleteList {
        ObsoleteList {
            time: SystemTime::now(),
            packs: vec![Id([byte; 32])],
        }
    }
}
