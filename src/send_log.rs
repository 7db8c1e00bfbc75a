//! A put-only writer's memory of its last backup of a series (docs/FORMAT.md §12.1): what it
//! sent, so that the next backup deduplicates and delta-compresses against it although the
//! writer cannot read the repository.
//!
//! One file per repository and series under the send log directory, private to its user:
//! the last snapshot's packs with their uses (what a full key reads from the snapshot), each
//! of those packs' header (what a full key reads from the pack), and the data session keys
//! of the sessions that wrote them (so that their frames can be read back as delta bases).
//! Everything in it is sealed under a key derived from the chunk-id key: a copy of the file
//! without the key file and its password reveals nothing, and a changed byte makes it unused.
//!
//! It is an optimisation only. A missing, damaged, foreign or stale log makes the backup
//! store more, never a wrong snapshot: every pack it names is checked to be in the store at
//! its size and in no obsolete list before it is used, and the backup checks again before it
//! records its snapshot, as every backup does (§10).
//!
//! ```text
//! "BKPSLG01" || record... || sealed(Meta) || meta_offset u64 LE || meta_len u64 LE
//! record = sealed(postcard(IndexedPack)), AAD "BKPSLG01 pack" || pack id
//! ```

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::crypto::{CipherKey, MasterKey};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::IndexedPack;
use crate::snapshot::PackRef;

const MAGIC: &[u8; 8] = b"BKPSLG01";
const META_AAD: &[u8] = b"BKPSLG01 meta";
const FOOTER_LEN: u64 = 16;

/// Where a pack's header is in the file, and which session wrote the pack.
#[derive(Clone, Serialize, Deserialize)]
struct Record {
    pack: Id,
    data_ephemeral: [u8; 32],
    offset: u64,
    len: u64,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    repository_id: Id,
    series: String,
    snapshot: Id,
    packs: Vec<PackRef>,
    records: Vec<Record>,
    /// (data ephemeral public key, data session key) of the sessions that wrote `packs`.
    sessions: Vec<([u8; 32], [u8; 32])>,
}

impl Drop for Meta {
    fn drop(&mut self) {
        for (_, key) in &mut self.sessions {
            key.zeroize();
        }
    }
}

/// The send log of one series, as read at the start of a backup.
pub struct SendLog {
    file: File,
    key: CipherKey,
    meta: Meta,
    records: HashMap<Id, Record>,
}

/// The file of `series`' send log in `dir`.
fn path_of(dir: &Path, key: &MasterKey, series: &str) -> PathBuf {
    // Series names are up to 400 bytes, file names 255: a keyed hash names the file.
    let name = blake3::keyed_hash(&key.chunk_id_key, series.as_bytes());
    dir.join(key.repository_id.to_hex())
        .join(hex::encode(&name.as_bytes()[..16]))
}

fn log_key(key: &MasterKey) -> CipherKey {
    let mut bytes = blake3::derive_key("bkp v4 send log", &key.chunk_id_key);
    let cipher = CipherKey::new(&bytes);
    bytes.zeroize();
    cipher
}

fn record_aad(pack: &Id) -> Vec<u8> {
    let mut aad = b"BKPSLG01 pack".to_vec();
    aad.extend_from_slice(&pack.0);
    aad
}

impl SendLog {
    /// The send log of `series` in `dir`: `Ok(None)` if there is none; `Err` with what is
    /// wrong with it if it cannot be used (the backup then stores everything).
    pub fn open(
        dir: &Path,
        key: &MasterKey,
        series: &str,
    ) -> std::result::Result<Option<SendLog>, String> {
        let path = path_of(dir, key, series);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let unusable = |why: &str| format!("{} {why}", path.display());
        let len = file.metadata().map_err(|e| unusable(&e.to_string()))?.len();
        if len < MAGIC.len() as u64 + FOOTER_LEN {
            return Err(unusable("is cut short"));
        }
        let mut head = [0u8; 8];
        let mut footer = [0u8; FOOTER_LEN as usize];
        file.read_exact_at(&mut head, 0)
            .and_then(|()| file.read_exact_at(&mut footer, len - FOOTER_LEN))
            .map_err(|e| unusable(&e.to_string()))?;
        if &head != MAGIC {
            return Err(unusable("is not a bkp send log"));
        }
        let offset = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
        let meta_len = u64::from_le_bytes(footer[8..].try_into().expect("8 bytes"));
        if offset.checked_add(meta_len) != Some(len - FOOTER_LEN) || meta_len > 1 << 30 {
            return Err(unusable("is damaged (its footer)"));
        }
        let mut sealed = vec![0u8; meta_len as usize];
        file.read_exact_at(&mut sealed, offset)
            .map_err(|e| unusable(&e.to_string()))?;
        let log_key = log_key(key);
        let mut plain = log_key
            .open(META_AAD, &sealed)
            .ok_or_else(|| unusable("fails authentication (damaged, or of another key)"))?;
        let meta: std::result::Result<Meta, _> = postcard::from_bytes(&plain);
        plain.zeroize();
        let meta = meta.map_err(|_| unusable("does not decode"))?;
        if meta.repository_id != key.repository_id || meta.series != series {
            return Err(unusable("belongs to another repository or series"));
        }
        let records = meta.records.iter().map(|r| (r.pack, r.clone())).collect();
        Ok(Some(SendLog {
            file,
            key: log_key,
            meta,
            records,
        }))
    }

    /// That snapshot's packs, each with its uses.
    pub fn packs(&self) -> &[PackRef] {
        &self.meta.packs
    }

    /// The data session keys it remembers, by their ephemeral public key.
    pub fn sessions(&self) -> impl Iterator<Item = (&[u8; 32], &[u8; 32])> {
        self.meta.sessions.iter().map(|(e, k)| (e, k))
    }

    /// The header of `pack`, as the pack's writer made it.
    pub fn read_pack_header(&self, pack: &PackRef) -> Result<IndexedPack> {
        let object = format!("the send log's header of pack {}", pack.id.short());
        let record = self.records.get(&pack.id).ok_or_else(|| Error::Missing {
            object: object.clone(),
        })?;
        if record.len > 64 << 20 {
            return Err(Error::corrupt(&object, "too long"));
        }
        let mut sealed = vec![0u8; record.len as usize];
        self.file
            .read_exact_at(&mut sealed, record.offset)
            .map_err(|e| Error::corrupt(&object, e.to_string()))?;
        let plain = self
            .key
            .open(&record_aad(&pack.id), &sealed)
            .ok_or_else(|| Error::corrupt(&object, "fails authentication"))?;
        let header: IndexedPack =
            postcard::from_bytes(&plain).map_err(|e| Error::corrupt(&object, e.to_string()))?;
        if header.id != pack.id || header.len != pack.len {
            return Err(Error::corrupt(&object, "it is of another pack"));
        }
        Ok(header)
    }

    /// The sealed record of `pack`, to copy into the next log as it is.
    fn raw_record(&self, pack: &Id) -> Option<(Record, Vec<u8>)> {
        let record = self.records.get(pack)?;
        let mut sealed = vec![0u8; usize::try_from(record.len).ok()?];
        self.file.read_exact_at(&mut sealed, record.offset).ok()?;
        Some((record.clone(), sealed))
    }
}

/// The next send log of a series, written while a backup runs: each new pack's header as the
/// pack is stored, then what the snapshot uses from the previous log, then the meta. A failure
/// to write it never fails the backup: the log is then left as it was, and said so.
pub struct SendLogWriter {
    path: PathBuf,
    temporary: PathBuf,
    key: CipherKey,
    state: Mutex<std::result::Result<Writing, String>>,
}

struct Writing {
    file: File,
    at: u64,
    records: Vec<Record>,
}

impl Writing {
    fn append(&mut self, record: Record, sealed: &[u8]) -> std::io::Result<()> {
        self.file.write_all(sealed)?;
        self.records.push(Record {
            offset: self.at,
            len: sealed.len() as u64,
            ..record
        });
        self.at += sealed.len() as u64;
        Ok(())
    }
}

impl SendLogWriter {
    pub fn create(dir: &Path, key: &MasterKey, series: &str) -> SendLogWriter {
        let path = path_of(dir, key, series);
        let temporary = path.with_extension(format!("tmp{}", std::process::id()));
        let open = || -> std::io::Result<Writing> {
            let parent = path.parent().expect("a send log is in a directory");
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(MAGIC)?;
            Ok(Writing {
                file,
                at: MAGIC.len() as u64,
                records: Vec::new(),
            })
        };
        let state = open().map_err(|e| format!("{}: {e}", temporary.display()));
        SendLogWriter {
            path,
            temporary,
            key: log_key(key),
            state: Mutex::new(state),
        }
    }

    fn append(&self, record: Record, sealed: &[u8]) {
        let mut state = self.state.lock().expect("send log lock");
        if let Ok(writing) = state.as_mut()
            && let Err(e) = writing.append(record, sealed)
        {
            *state = Err(format!("{}: {e}", self.temporary.display()));
        }
    }

    /// Records the header of a pack this backup stored.
    pub fn add(&self, pack: &IndexedPack) {
        let plain = postcard::to_allocvec(pack).expect("a pack header serializes");
        let sealed = self.key.seal(&record_aad(&pack.id), &plain);
        let record = Record {
            pack: pack.id,
            data_ephemeral: pack.data_ephemeral,
            offset: 0,
            len: 0,
        };
        self.append(record, &sealed);
    }

    /// Completes the log of `snapshot`, which uses `packs`: the headers of those not added
    /// come from `previous`; `sessions` are the data session keys this writer knows. Replaces
    /// the series' log at once (a crash leaves the previous one, or this one). `Err` says why
    /// the log could not be written.
    pub fn finish(
        &self,
        repository_id: Id,
        series: &str,
        snapshot: Id,
        packs: &[PackRef],
        sessions: &HashMap<[u8; 32], [u8; 32]>,
        previous: Option<&SendLog>,
    ) -> std::result::Result<(), String> {
        let added: HashSet<Id> = match &*self.state.lock().expect("send log lock") {
            Ok(writing) => writing.records.iter().map(|r| r.pack).collect(),
            Err(e) => return Err(e.clone()),
        };
        let mut kept = Vec::new();
        for pack in packs {
            if added.contains(&pack.id) {
                kept.push(*pack);
                continue;
            }
            // A pack it does not know (another host's, or one it forgot) is left out: the
            // next backup stores again what is in it.
            if let Some((record, sealed)) = previous.and_then(|log| log.raw_record(&pack.id)) {
                self.append(record, &sealed);
                kept.push(*pack);
            }
        }
        let mut state = self.state.lock().expect("send log lock");
        let writing = state.as_mut().map_err(|e| e.clone())?;
        let keep: HashSet<Id> = kept.iter().map(|p| p.id).collect();
        writing.records.retain(|r| keep.contains(&r.pack));
        let used_sessions: HashSet<[u8; 32]> =
            writing.records.iter().map(|r| r.data_ephemeral).collect();
        let meta = Meta {
            repository_id,
            series: series.to_string(),
            snapshot,
            packs: kept,
            records: std::mem::take(&mut writing.records),
            sessions: sessions
                .iter()
                .filter(|(e, _)| used_sessions.contains(*e))
                .map(|(e, k)| (*e, *k))
                .collect(),
        };
        let mut plain = postcard::to_allocvec(&meta).expect("a send log serializes");
        let sealed = self.key.seal(META_AAD, &plain);
        plain.zeroize();
        let mut footer = writing.at.to_le_bytes().to_vec();
        footer.extend((sealed.len() as u64).to_le_bytes());
        let io = |e: std::io::Error| format!("{}: {e}", self.temporary.display());
        writing.file.write_all(&sealed).map_err(io)?;
        writing.file.write_all(&footer).map_err(io)?;
        writing.file.sync_all().map_err(io)?;
        std::fs::rename(&self.temporary, &self.path).map_err(io)?;
        Ok(())
    }
}

impl Drop for SendLogWriter {
    fn drop(&mut self) {
        // Finished, it was renamed; otherwise the backup failed and the old log stays.
        let _ = std::fs::remove_file(&self.temporary);
    }
}
