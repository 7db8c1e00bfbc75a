//! The only user of `object_store`: where a repository's bytes live.
//!
//! Rules every backend obeys (docs/FORMAT.md §Storage): objects are written once, create-only,
//! and never overwritten or appended to; names are content hashes, random, or fixed (`config`).
//! The rest of bkp is synchronous; this module owns a small tokio runtime and blocks on it.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::error::{Error, Result};

pub struct Store {
    inner: Arc<dyn ObjectStore>,
    location: String,
    /// For a local directory: object_store does not fsync, so [`Store::barrier`] does.
    local_root: Option<PathBuf>,
    unsynced: Mutex<Vec<String>>,
    runtime: tokio::runtime::Runtime,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object's name relative to the repository root, e.g. `snapshots/1a2b...`.
    pub name: String,
    pub size: u64,
}

impl Store {
    /// Opens an existing location: a local directory path or `file://` URL.
    pub fn open(location: &str) -> Result<Store> {
        let dir = local_dir(location);
        if !std::path::Path::new(dir).is_dir() {
            return Err(Error::RepositoryNotFound {
                location: location.to_string(),
            });
        }
        let fs = LocalFileSystem::new_with_prefix(dir).map_err(|cause| Error::Store {
            location: location.to_string(),
            cause,
        })?;
        let mut store = Store::with(Arc::new(fs), location);
        store.local_root = Some(PathBuf::from(dir));
        Ok(store)
    }

    /// Like [`Store::open`], creating a local directory first if there is none.
    pub fn create(location: &str) -> Result<Store> {
        let dir = local_dir(location);
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::invalid("repository location", format!("cannot create {dir}: {e}"))
        })?;
        Store::open(location)
    }

    /// A store that lives in this process's memory (tests, examples).
    pub fn memory() -> Store {
        Store::with(Arc::new(InMemory::new()), "memory")
    }

    fn with(inner: Arc<dyn ObjectStore>, location: &str) -> Store {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bkp-store")
            .enable_all()
            .build()
            .expect("tokio runtime starts");
        Store {
            inner,
            location: location.to_string(),
            local_root: None,
            unsynced: Mutex::new(Vec::new()),
            runtime,
        }
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    fn error(&self, name: &str, source: object_store::Error) -> Error {
        if is_storage_full(&source) {
            return Error::StorageFull {
                location: format!("{}/{}", self.location, name),
            };
        }
        match source {
            object_store::Error::NotFound { .. } => Error::Missing {
                object: name.to_string(),
            },
            cause => Error::Store {
                location: format!("{}/{}", self.location, name),
                cause,
            },
        }
    }

    /// Writes a new object. Returns `false`, writing nothing, if `name` already exists.
    /// The object is durable after the next [`Store::barrier`].
    pub fn put_new(&self, name: &str, bytes: Vec<u8>) -> Result<bool> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let result = self.runtime.block_on(self.inner.put_opts(
            &Path::from(name),
            PutPayload::from(bytes),
            options,
        ));
        match result {
            Ok(_) => {
                if self.local_root.is_some() {
                    self.unsynced
                        .lock()
                        .expect("unsynced lock")
                        .push(name.to_string());
                }
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.error(name, e)),
        }
    }

    /// A write barrier: when it returns, every object written so far survives a crash or power
    /// loss. The write-ordering rule (packs, then index, then snapshot) depends on it. Object
    /// stores are durable on a successful put; a local directory needs fsync of each new file
    /// and of the directories naming them.
    pub fn barrier(&self) -> Result<()> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let names = std::mem::take(&mut *self.unsynced.lock().expect("unsynced lock"));
        let mut dirs = std::collections::BTreeSet::new();
        for name in &names {
            let path = root.join(name);
            self.sync_path(&path, name)?;
            dirs.insert(path.parent().unwrap_or(root).to_path_buf());
        }
        for dir in dirs {
            self.sync_path(&dir, "")?;
        }
        Ok(())
    }

    fn sync_path(&self, path: &std::path::Path, name: &str) -> Result<()> {
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::Store {
                location: format!("{}/{}", self.location, name),
                cause: object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(e),
                },
            })
    }

    pub fn get(&self, name: &str) -> Result<Bytes> {
        self.runtime
            .block_on(async { self.inner.get(&Path::from(name)).await?.bytes().await })
            .map_err(|e| self.error(name, e))
    }

    pub fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes> {
        self.runtime
            .block_on(self.inner.get_range(&Path::from(name), range))
            .map_err(|e| self.error(name, e))
    }

    pub fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.size(name)?.is_some())
    }

    /// The object's size, or `None` if there is no such object.
    pub fn size(&self, name: &str) -> Result<Option<u64>> {
        match self.runtime.block_on(self.inner.head(&Path::from(name))) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(name, e)),
        }
    }

    /// Every object under `dir` (recursively), sorted by name.
    pub fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>> {
        let prefix = Path::from(dir);
        let mut out: Vec<ObjectInfo> = self
            .runtime
            .block_on(self.inner.list(Some(&prefix)).try_collect::<Vec<_>>())
            .map_err(|e| self.error(dir, e))?
            .into_iter()
            .map(|meta| ObjectInfo {
                name: meta.location.to_string(),
                size: meta.size,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes an object (tests that simulate damage; later, prune).
    pub fn delete(&self, name: &str) -> Result<()> {
        self.runtime
            .block_on(self.inner.delete(&Path::from(name)))
            .map_err(|e| self.error(name, e))
    }
}

/// Whether an error, or any error behind it, is "no space left on the device".
fn is_storage_full(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull)
        {
            return true;
        }
        current = e.source();
    }
    false
}

fn local_dir(location: &str) -> &str {
    location.strip_prefix("file://").unwrap_or(location)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_only_puts_never_overwrite() {
        for store in [Store::memory(), {
            let dir = tempfile::tempdir().unwrap().keep();
            Store::open(dir.to_str().unwrap()).unwrap()
        }] {
            assert!(store.put_new("a/b", b"one".to_vec()).unwrap());
            assert!(!store.put_new("a/b", b"two".to_vec()).unwrap());
            assert_eq!(&store.get("a/b").unwrap()[..], b"one");
            assert_eq!(&store.get_range("a/b", 1..3).unwrap()[..], b"ne");
            assert!(matches!(store.get("nope"), Err(Error::Missing { .. })));
            assert!(store.exists("a/b").unwrap());
            assert!(!store.exists("a/c").unwrap());
            let listed = store.list("a").unwrap();
            assert_eq!(
                listed,
                vec![ObjectInfo {
                    name: "a/b".into(),
                    size: 3
                }]
            );
        }
    }

    #[test]
    fn a_full_disk_is_named_as_such() {
        let store = Store::memory();
        let full = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(std::io::Error::from(std::io::ErrorKind::StorageFull)),
        };
        let err = store.error("packs/ab/cd", full);
        assert!(matches!(err, Error::StorageFull { .. }));
        assert!(err.to_string().contains("free space"));
    }

    #[test]
    fn opening_a_missing_directory_says_repository_not_found() {
        assert!(matches!(
            Store::open("/nonexistent/bkp-repo"),
            Err(Error::RepositoryNotFound { .. })
        ));
    }
}
