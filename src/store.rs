//! The only user of `object_store`: where a repository's bytes live.
//!
//! A location is a local path (or `file://` URL), `s3://bucket/prefix`, or, less tested,
//! `gs://bucket/prefix` and `az://container/prefix`. Credentials and endpoints come from the
//! environment the way every tool of those clouds takes them (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
//! `AWS_ALLOW_HTTP`, ...), never from the command line. S3 requests are path-style, so
//! S3-compatible servers work with an endpoint alone.
//!
//! Rules every backend obeys (docs/FORMAT.md §2): objects are written once, create-only
//! (`If-None-Match: *` on S3), and never overwritten or appended to. Packs are at most ~10 MiB
//! and go up in one PUT, so there are no multipart uploads to abort after a crash: an object
//! either exists whole or not at all. Transient failures (timeouts, 5xx, dropped connections)
//! are retried with exponential backoff by object_store, for up to [`RETRY_TIMEOUT`].
//! The rest of bkp is synchronous; this module owns a small tokio runtime and blocks on it,
//! or hands out [`Pending`] operations that run on it meanwhile (uploads, prefetching).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};

use crate::error::{Error, Result};

/// How long one operation is retried on transient errors before it fails.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Store {
    inner: Arc<dyn ObjectStore>,
    location: String,
    /// For a local directory: object_store does not fsync, so a [`Syncer`] does.
    local: Option<(PathBuf, Syncer)>,
    /// For a store that needs more at a barrier than its puts guarantee (crash tests).
    durability: Option<Arc<dyn Durability>>,
    retry: Retry,
    runtime: tokio::runtime::Runtime,
    requests: Arc<RequestLog>,
}

/// Every request a store made, counted by kind, and traced to a file when `BKP_TRACE_REQUESTS`
/// names one (a line per request: microseconds since the store opened, kind, object, bytes):
/// the figure that carries from a local benchmark to S3, where each costs 20-50 ms.
#[derive(Default)]
struct RequestLog {
    counts: [std::sync::atomic::AtomicU64; RequestKind::COUNT],
    trace: Option<(std::time::Instant, std::sync::Mutex<std::fs::File>)>,
}

/// The kinds of store request, for [`Store::request_counts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Get,
    GetRange,
    Head,
    /// One page of a listing (S3 lists up to 1,000 objects a request).
    List,
    Put,
    Delete,
}

impl RequestKind {
    const COUNT: usize = 6;
    const ALL: [RequestKind; RequestKind::COUNT] = [
        RequestKind::Get,
        RequestKind::GetRange,
        RequestKind::Head,
        RequestKind::List,
        RequestKind::Put,
        RequestKind::Delete,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RequestKind::Get => "get",
            RequestKind::GetRange => "get-range",
            RequestKind::Head => "head",
            RequestKind::List => "list",
            RequestKind::Put => "put",
            RequestKind::Delete => "delete",
        }
    }
}

impl RequestLog {
    fn from_env() -> RequestLog {
        let trace = std::env::var_os("BKP_TRACE_REQUESTS").and_then(|path| {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()?;
            Some((std::time::Instant::now(), std::sync::Mutex::new(file)))
        });
        RequestLog {
            trace,
            ..RequestLog::default()
        }
    }

    fn note(&self, kind: RequestKind, name: &str, bytes: u64) {
        self.note_many(kind, name, bytes, 1);
    }

    fn note_many(&self, kind: RequestKind, name: &str, bytes: u64, requests: u64) {
        self.counts[kind as usize].fetch_add(requests, std::sync::atomic::Ordering::Relaxed);
        if let Some((opened, file)) = &self.trace {
            use std::io::Write;
            let line = format!(
                "{} {} {name} {bytes} {requests}\n",
                opened.elapsed().as_micros(),
                kind.name()
            );
            let _ = file.lock().expect("trace lock").write_all(line.as_bytes());
        }
    }
}

/// What a store does at a write barrier ([`Store::barrier`]) beyond what its puts and deletes
/// already guarantee. Crash tests implement it with a store that keeps only what a barrier
/// made durable and forgets the rest when it "loses power".
pub trait Durability: Send + Sync {
    fn barrier(&self) -> std::result::Result<(), String>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object's name relative to the repository root, e.g. `snapshots/1a2b...`.
    pub name: String,
    pub size: u64,
    /// When it was written (prune leaves packs younger than its grace period alone).
    pub modified: SystemTime,
}

/// An operation running on the store's runtime; [`Store::wait`] for its result.
pub struct Pending<T>(tokio::task::JoinHandle<Result<T>>);

impl Store {
    /// Opens an existing location: a local directory path or `file://` URL, or a cloud URL
    /// (`s3://`, `gs://`, `az://`).
    pub fn open(location: &str) -> Result<Store> {
        Store::open_with_options(location, &[])
    }

    /// [`Store::open`] with options for a cloud store that override the environment:
    /// object_store's configuration keys (`aws_access_key_id`, `aws_endpoint`,
    /// `aws_allow_http`, ...) and `retry_timeout` (seconds, default [`RETRY_TIMEOUT`]).
    pub fn open_with_options(location: &str, options: &[(&str, &str)]) -> Result<Store> {
        if let Some((cloud, retry)) = cloud_store(location, options)? {
            let mut store = Store::with(cloud, location);
            store.retry = retry;
            store.check_bucket()?;
            return Ok(store);
        }
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
        store.local = Some((PathBuf::from(dir), Syncer::spawn()));
        Ok(store)
    }

    /// Like [`Store::open`], creating a local directory first if there is none.
    pub fn create(location: &str) -> Result<Store> {
        Store::create_with_options(location, &[])
    }

    /// [`Store::create`] with the options of [`Store::open_with_options`].
    pub fn create_with_options(location: &str, options: &[(&str, &str)]) -> Result<Store> {
        if is_cloud(location) {
            return Store::open_with_options(location, options);
        }
        let dir = local_dir(location);
        // Private whatever the umask: the repository's objects are encrypted, but their names,
        // sizes and times are not for other local users.
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                Error::invalid("repository location", format!("cannot create {dir}: {e}"))
            })?;
        // An existing directory too, if it is ours (best effort: a mount point may not be).
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        Store::open_with_options(location, options)
    }

    /// A store that lives in this process's memory (tests, examples).
    pub fn memory() -> Store {
        Store::with(Arc::new(InMemory::new()), "memory")
    }

    /// Any object_store backend, with what its barrier must do ([`Durability`]).
    pub fn with_durability(
        inner: Arc<dyn ObjectStore>,
        location: &str,
        durability: Arc<dyn Durability>,
    ) -> Store {
        let mut store = Store::with(inner, location);
        store.durability = Some(durability);
        store
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
            local: None,
            durability: None,
            retry: Retry {
                timeout: None,
                first_wait: Retry::FIRST_WAIT,
            },
            runtime,
            requests: Arc::new(RequestLog::from_env()),
        }
    }

    /// How many requests of each kind this store has made so far.
    pub fn request_counts(&self) -> Vec<(RequestKind, u64)> {
        RequestKind::ALL
            .iter()
            .map(|&kind| {
                let count = &self.requests.counts[kind as usize];
                (kind, count.load(std::sync::atomic::Ordering::Relaxed))
            })
            .collect()
    }

    /// All requests this store has made so far.
    pub fn request_count(&self) -> u64 {
        self.request_counts().iter().map(|(_, n)| n).sum()
    }

    /// One listing request, so that a missing bucket, refused credentials or an unreachable
    /// endpoint are reported as such before anything else (some S3-compatible servers would
    /// otherwise create a missing bucket on the first write).
    fn check_bucket(&self) -> Result<()> {
        self.requests.note(RequestKind::List, "", 0);
        self.runtime
            .block_on(self.retry.run(|| self.inner.list_with_delimiter(None)))
            .map(drop)
            .map_err(|e| self.error("", e))
    }

    /// Whether writes are to a local directory (where a put is a file write, not a request).
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    fn error(&self, name: &str, source: object_store::Error) -> Error {
        store_error(&self.location, name, source)
    }

    /// Writes a new object. Returns `false`, writing nothing, if `name` already exists.
    /// The object is durable after the next [`Store::barrier`].
    pub fn put_new(&self, name: &str, bytes: Vec<u8>) -> Result<bool> {
        let pending = self.put_new_soon(name, bytes);
        self.wait(pending)
    }

    /// [`Store::put_new`], running meanwhile; the caller bounds how many are in flight.
    pub fn put_new_soon(&self, name: &str, bytes: Vec<u8>) -> Pending<bool> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let (inner, location, name) = (self.inner.clone(), self.location.clone(), name.to_string());
        let syncer = self
            .local
            .as_ref()
            .map(|(root, syncer)| (root.join(&name), syncer.requests.clone()));
        let retry = self.retry;
        self.requests
            .note(RequestKind::Put, &name, bytes.len() as u64);
        let payload = PutPayload::from(bytes);
        Pending(self.runtime.spawn(async move {
            let path = Path::from(name.as_str());
            let result = retry
                .run(|| inner.put_opts(&path, payload.clone(), options.clone()))
                .await;
            match result {
                Ok(_) => {
                    if let Some((path, requests)) = syncer {
                        let _ = requests.send(SyncRequest::File(path));
                    }
                    Ok(true)
                }
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(store_error(&location, &name, e)),
            }
        }))
    }

    /// The result of an operation started with a `_soon` method.
    pub fn wait<T>(&self, pending: Pending<T>) -> Result<T> {
        self.runtime
            .block_on(pending.0)
            .unwrap_or_else(|e| Err(Error::Internal(format!("a storage task failed: {e}"))))
    }

    /// A write barrier: when it returns, every object written so far survives a crash or power
    /// loss. The write-ordering rule (packs, then index, then snapshot) depends on it. Object
    /// stores are durable on a successful put; a local directory needs fsync of each new file
    /// and of the directories naming them, which the [`Syncer`] has mostly done by now.
    pub fn barrier(&self) -> Result<()> {
        if let Some(durability) = &self.durability {
            durability.barrier().map_err(|e| {
                let cause = object_store::Error::Generic {
                    store: "durability",
                    source: e.into(),
                };
                self.error("", cause)
            })?;
        }
        let Some((root, syncer)) = &self.local else {
            return Ok(());
        };
        syncer.barrier().map_err(|(path, e)| {
            let name = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            let cause = object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(e),
            };
            self.error(&name, cause)
        })
    }

    pub fn get(&self, name: &str) -> Result<Bytes> {
        let bytes = self
            .runtime
            .block_on(
                self.retry
                    .run(|| async { self.inner.get(&Path::from(name)).await?.bytes().await }),
            )
            .map_err(|e| self.error(name, e));
        let len = bytes.as_ref().map_or(0, |b| b.len() as u64);
        self.requests.note(RequestKind::Get, name, len);
        bytes
    }

    pub fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes> {
        let pending = self.get_range_soon(name, range);
        self.wait(pending)
    }

    /// [`Store::get_range`], running meanwhile (restore prefetches frames this way).
    pub fn get_range_soon(&self, name: &str, range: Range<u64>) -> Pending<Bytes> {
        let (inner, location, name) = (self.inner.clone(), self.location.clone(), name.to_string());
        let retry = self.retry;
        self.requests
            .note(RequestKind::GetRange, &name, range.end - range.start);
        Pending(self.runtime.spawn(async move {
            let path = Path::from(name.as_str());
            retry
                .run(|| inner.get_range(&path, range.clone()))
                .await
                .map_err(|e| store_error(&location, &name, e))
        }))
    }

    pub fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.size(name)?.is_some())
    }

    /// The object's size, or `None` if there is no such object.
    pub fn size(&self, name: &str) -> Result<Option<u64>> {
        self.requests.note(RequestKind::Head, name, 0);
        let path = Path::from(name);
        match self
            .runtime
            .block_on(self.retry.run(|| self.inner.head(&path)))
        {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(name, e)),
        }
    }

    /// [`Store::size`] of many objects, several requests at a time.
    pub fn sizes(&self, names: &[String]) -> Result<Vec<Option<u64>>> {
        const IN_FLIGHT: usize = 16;
        let heads = names.iter().map(|name| async move {
            self.requests.note(RequestKind::Head, name, 0);
            let path = Path::from(name.as_str());
            match self.retry.run(|| self.inner.head(&path)).await {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.error(name, e)),
            }
        });
        self.runtime.block_on(
            futures::stream::iter(heads)
                .buffered(IN_FLIGHT)
                .try_collect::<Vec<_>>(),
        )
    }

    /// Every object under `dir` (recursively), sorted by name.
    pub fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>> {
        self.list_up_to(dir, usize::MAX)
    }

    /// The first `n` objects under `dir` in name order, reading no more of the listing than it
    /// takes (on S3, which lists in name order, one request for up to 1,000).
    pub fn list_first(&self, dir: &str, n: usize) -> Result<Vec<ObjectInfo>> {
        if self.local.is_some() {
            // A directory listing is not in name order: read it all (it is local).
            let mut all = self.list(dir)?;
            all.truncate(n);
            return Ok(all);
        }
        self.list_up_to(dir, n)
    }

    /// Up to `n` objects under `dir`, the first the store lists, sorted by name.
    fn list_up_to(&self, dir: &str, n: usize) -> Result<Vec<ObjectInfo>> {
        let prefix = Path::from(dir);
        let mut out: Vec<ObjectInfo> = self
            .runtime
            .block_on(self.retry.run(|| {
                self.inner
                    .list(Some(&prefix))
                    .take(n)
                    .try_collect::<Vec<_>>()
            }))
            .map_err(|e| self.error(dir, e))?
            .into_iter()
            .map(|meta| ObjectInfo {
                name: meta.location.to_string(),
                size: meta.size,
                modified: SystemTime::from(meta.last_modified),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        // S3 lists 1,000 objects a request.
        let pages = out.len() as u64 / 1000 + 1;
        self.requests.note_many(RequestKind::List, dir, 0, pages);
        Ok(out)
    }

    /// The names of the folders directly under `dir` (`series/` → `["abc...", ...]`).
    pub fn list_folders(&self, dir: &str) -> Result<Vec<String>> {
        let prefix = Path::from(dir);
        let listing = self
            .runtime
            .block_on(
                self.retry
                    .run(|| self.inner.list_with_delimiter(Some(&prefix))),
            )
            .map_err(|e| self.error(dir, e))?;
        let found = listing.common_prefixes.len() + listing.objects.len();
        self.requests
            .note_many(RequestKind::List, dir, 0, found as u64 / 1000 + 1);
        let mut out: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Replaces an object's content at once (readers see the old or the new bytes). Only
    /// `bkp upgrade` does this, to the `config`; every other object is create-only.
    pub fn replace(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.requests
            .note(RequestKind::Put, name, bytes.len() as u64);
        let path = Path::from(name);
        let payload = PutPayload::from(bytes);
        self.runtime
            .block_on(self.retry.run(|| self.inner.put(&path, payload.clone())))
            .map_err(|e| self.error(name, e))?;
        if let Some((root, syncer)) = &self.local {
            let _ = syncer.requests.send(SyncRequest::File(root.join(name)));
        }
        Ok(())
    }

    /// Files that a local store's uploads left behind when the process writing them was killed
    /// (object_store writes `NAME#N` and then links it as `NAME`), which listings never show.
    /// Cloud stores have none: an object there is uploaded in one request.
    pub fn abandoned_uploads(&self) -> Result<Vec<ObjectInfo>> {
        let Some((root, _)) = &self.local else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut dirs = vec![root.clone()];
        let io_error = |path: &std::path::Path, e: std::io::Error| {
            self.error(
                &path.strip_prefix(root).unwrap_or(path).to_string_lossy(),
                object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(e),
                },
            )
        };
        while let Some(dir) = dirs.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| io_error(&dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| io_error(&dir, e))?;
                let path = entry.path();
                let meta = entry.metadata().map_err(|e| io_error(&path, e))?;
                if meta.is_dir() {
                    dirs.push(path);
                } else if is_staging_name(&entry.file_name().to_string_lossy()) {
                    out.push(ObjectInfo {
                        name: path
                            .strip_prefix(root)
                            .unwrap_or(&path)
                            .to_string_lossy()
                            .into_owned(),
                        size: meta.len(),
                        modified: meta.modified().map_err(|e| io_error(&path, e))?,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes objects, in batches where the store has them (S3: up to 1,000 a request), and
    /// abandoned uploads ([`Store::abandoned_uploads`]). Objects already gone are not an error.
    pub fn delete_many(&self, names: &[String]) -> Result<()> {
        let (staging, names): (Vec<&String>, Vec<&String>) = names
            .iter()
            .partition(|n| self.local.is_some() && is_staging_name(n));
        if let Some((root, syncer)) = &self.local {
            for name in staging {
                let path = root.join(name);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        let cause = object_store::Error::Generic {
                            store: "LocalFileSystem",
                            source: Box::new(e),
                        };
                        return Err(self.error(name, cause));
                    }
                }
                if let Some(dir) = path.parent() {
                    let _ = syncer.requests.send(SyncRequest::Dir(dir.to_path_buf()));
                }
            }
        }
        let names: Vec<String> = names.into_iter().cloned().collect();
        // S3 deletes 1,000 objects a request.
        let batches = names.len().div_ceil(1000) as u64;
        if let Some(first) = names.first() {
            self.requests
                .note_many(RequestKind::Delete, first, 0, batches);
        }
        let batch = || async {
            let paths: Vec<object_store::Result<Path>> =
                names.iter().map(|n| Ok(Path::from(n.as_str()))).collect();
            let results: Vec<object_store::Result<Path>> = self
                .inner
                .delete_stream(futures::stream::iter(paths).boxed())
                .collect()
                .await;
            // Deleting is idempotent: a transient failure of one retries the batch.
            match results
                .iter()
                .position(|r| r.as_ref().is_err_and(is_transient))
            {
                Some(at) => Err(results.into_iter().nth(at).expect("there").unwrap_err()),
                None => Ok(results),
            }
        };
        let results = match self.runtime.block_on(self.retry.run(batch)) {
            Ok(results) => results,
            Err(e) => return Err(self.error(names.first().map_or("", |n| n.as_str()), e)),
        };
        if let Some((root, syncer)) = &self.local {
            // A deletion is durable once its directory is synced, at the next barrier.
            for name in &names {
                if let Some(dir) = root.join(name).parent() {
                    let _ = syncer.requests.send(SyncRequest::Dir(dir.to_path_buf()));
                }
            }
        }
        for (name, result) in names.iter().zip(results) {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.error(name, e)),
            }
        }
        Ok(())
    }

    /// Removes an object; one already gone is not an error. Durable after the next barrier.
    pub fn delete(&self, name: &str) -> Result<()> {
        self.delete_many(&[name.to_string()])
    }
}

/// fsyncs a local store's new files on a thread of its own as they are written, so that a
/// backup's write barrier finds little left to wait for.
struct Syncer {
    requests: crossbeam_channel::Sender<SyncRequest>,
}

type SyncResult = std::result::Result<(), (PathBuf, std::io::Error)>;

enum SyncRequest {
    File(PathBuf),
    /// A directory whose entries changed (a deletion): synced at the next barrier.
    Dir(PathBuf),
    /// Sync the directories too, then answer with the first failure since the last barrier.
    Barrier(crossbeam_channel::Sender<SyncResult>),
}

impl Syncer {
    fn spawn() -> Syncer {
        let (requests, incoming) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("bkp-fsync".into())
            .spawn(move || {
                let fsync = |p: &std::path::Path| std::fs::File::open(p).and_then(|f| f.sync_all());
                let mut dirs = std::collections::BTreeSet::new();
                let mut failure: Option<(PathBuf, std::io::Error)> = None;
                for request in incoming {
                    match request {
                        SyncRequest::File(path) => {
                            if failure.is_none()
                                && let Err(e) = fsync(&path)
                            {
                                failure = Some((path.clone(), e));
                            }
                            if let Some(dir) = path.parent() {
                                dirs.insert(dir.to_path_buf());
                            }
                        }
                        SyncRequest::Dir(dir) => {
                            dirs.insert(dir);
                        }
                        SyncRequest::Barrier(reply) => {
                            for dir in std::mem::take(&mut dirs) {
                                if failure.is_none()
                                    && let Err(e) = fsync(&dir)
                                {
                                    failure = Some((dir, e));
                                }
                            }
                            let _ = reply.send(failure.take().map_or(Ok(()), Err));
                        }
                    }
                }
            })
            .expect("the fsync thread starts");
        Syncer { requests }
    }

    fn barrier(&self) -> SyncResult {
        let (reply, answer) = crossbeam_channel::bounded(1);
        let lost = |what: &str| {
            (
                PathBuf::from("."),
                std::io::Error::other(format!("fsync thread {what}")),
            )
        };
        self.requests
            .send(SyncRequest::Barrier(reply))
            .map_err(|_| lost("stopped"))?;
        answer.recv().map_err(|_| lost("died"))?
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

/// object_store's local staging files are `NAME#N`, N decimal digits.
fn is_staging_name(name: &str) -> bool {
    name.rsplit_once('#')
        .is_some_and(|(_, suffix)| !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()))
}

fn local_dir(location: &str) -> &str {
    location.strip_prefix("file://").unwrap_or(location)
}

const CLOUD_SCHEMES: [&str; 7] = ["s3", "s3a", "gs", "az", "azure", "abfs", "abfss"];

fn is_cloud(location: &str) -> bool {
    location
        .split_once("://")
        .is_some_and(|(scheme, _)| CLOUD_SCHEMES.contains(&scheme))
}

/// The object store of a cloud URL, rooted at its path; `None` for a local location.
fn cloud_store(
    location: &str,
    options: &[(&str, &str)],
) -> Result<Option<(Arc<dyn ObjectStore>, Retry)>> {
    if !is_cloud(location) {
        return Ok(None);
    }
    let invalid = |reason: String| Error::invalid("repository location", reason);
    let bad_option = |key: &str| Error::invalid("storage option", format!("unknown option {key}"));
    let mut retry_timeout = RETRY_TIMEOUT;
    let mut config = Vec::new();
    for &(key, value) in options {
        if key == "retry_timeout" {
            let seconds = value.parse::<u64>().map_err(|_| {
                Error::invalid(
                    "retry timeout",
                    format!("{value:?} is not a number of seconds"),
                )
            })?;
            retry_timeout = Duration::from_secs(seconds);
        } else {
            config.push((key, value));
        }
    }
    let url = url::Url::parse(location).map_err(|e| invalid(format!("{location}: {e}")))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!(
            "{location} names no bucket; use {}://BUCKET/PREFIX",
            url.scheme()
        )));
    }
    // Retries are bkp's own ([`Retry`]): object_store does not retry a PUT whose connection
    // dropped, and counts retries rather than time.
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 0,
        retry_timeout,
    };
    // The three builders share these methods but no trait.
    macro_rules! build {
        ($builder:expr) => {{
            let mut builder = $builder.with_url(location);
            for &(key, value) in &config {
                builder = builder.with_config(key.parse().map_err(|_| bad_option(key))?, value);
            }
            builder
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        }};
    }
    let built = match url.scheme() {
        "s3" | "s3a" => build!(AmazonS3Builder::from_env()),
        "gs" => build!(GoogleCloudStorageBuilder::from_env()),
        _ => build!(MicrosoftAzureBuilder::from_env()),
    };
    let store = built.map_err(|e| invalid(format!("{location}: {e}")))?;
    let prefix = url.path().trim_matches('/');
    let store = if prefix.is_empty() {
        store
    } else {
        Arc::new(PrefixStore::new(store, prefix)) as Arc<dyn ObjectStore>
    };
    Ok(Some((
        store,
        Retry {
            timeout: Some(retry_timeout),
            first_wait: Retry::FIRST_WAIT,
        },
    )))
}

/// How a cloud store's requests are retried: every transient failure (a 5xx or 408/429 answer,
/// a refused, dropped or timed-out connection, a body cut off) again and again, with
/// exponential backoff, until [`RETRY_TIMEOUT`] (or the configured time) has passed since the
/// first attempt. Safe for every request bkp makes: reads and deletes are idempotent, and puts
/// are create-only of content-named objects, so a retried put that had in fact succeeded finds
/// the same object there (`AlreadyExists`). Local stores do not retry (`timeout` is `None`).
#[derive(Clone, Copy, Debug)]
struct Retry {
    timeout: Option<Duration>,
    /// The wait before the first retry; it doubles up to [`Retry::LONGEST_WAIT`].
    first_wait: Duration,
}

impl Retry {
    const FIRST_WAIT: Duration = Duration::from_millis(100);
    const LONGEST_WAIT: Duration = Duration::from_secs(8);

    async fn run<T, F, Fut>(self, mut attempt: F) -> object_store::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let started = std::time::Instant::now();
        let mut wait = self.first_wait;
        loop {
            match attempt().await {
                Err(e)
                    if self.timeout.is_some_and(|t| started.elapsed() < t) && is_transient(&e) =>
                {
                    let left = self
                        .timeout
                        .unwrap_or_default()
                        .saturating_sub(started.elapsed());
                    tokio::time::sleep(wait.min(left)).await;
                    wait = (wait * 2).min(Retry::LONGEST_WAIT);
                }
                result => return result,
            }
        }
    }
}

/// Whether a failed request may succeed if tried again.
fn is_transient(error: &object_store::Error) -> bool {
    use object_store::Error as E;
    match error {
        E::Generic { .. } => {
            let detail = error_chain(error);
            let refused = [
                "AccessDenied",
                "SignatureDoesNotMatch",
                "InvalidAccessKeyId",
                "NoSuchBucket",
            ];
            if refused.iter().any(|code| detail.contains(code)) || is_storage_full(error) {
                return false;
            }
            // "Server returned non-2xx status code: 404 Not Found": a 4xx is the request's
            // fault, except a timeout or throttling.
            match detail.split_once("status code: ") {
                Some((_, status)) => {
                    !status.starts_with('4')
                        || status.starts_with("408")
                        || status.starts_with("429")
                }
                None => true,
            }
        }
        _ => false,
    }
}

/// An object_store error as what the caller can do about it.
fn store_error(location: &str, name: &str, source: object_store::Error) -> Error {
    let full_name = || format!("{location}/{name}");
    if is_storage_full(&source) {
        return Error::StorageFull {
            location: full_name(),
        };
    }
    let detail = error_chain(&source);
    let denied = [
        "403 Forbidden",
        "401 Unauthorized",
        "AccessDenied",
        "SignatureDoesNotMatch",
    ]
    .iter()
    .chain(&["InvalidAccessKeyId"])
    .any(|code| detail.contains(code));
    match source {
        _ if detail.contains("NoSuchBucket") => Error::BucketNotFound {
            location: location.to_string(),
        },
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => Error::AccessDenied {
            location: location.to_string(),
        },
        _ if denied => Error::AccessDenied {
            location: location.to_string(),
        },
        object_store::Error::NotFound { .. } => Error::Missing {
            object: name.to_string(),
        },
        // A range past the object's end: it is shorter than whoever asked expected (a pack
        // cut short). Local: "Requested range was invalid"; S3: 416 InvalidRange.
        _ if detail.contains("Requested range was invalid")
            || detail.contains("InvalidRange")
            || detail.contains("416 Range Not Satisfiable") =>
        {
            Error::corrupt(name, "it is shorter than its listed size (cut short?)")
        }
        cause => Error::Store {
            location: full_name(),
            cause,
        },
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        out.push_str(": ");
        out.push_str(&e.to_string());
        current = e.source();
    }
    out
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
            assert_eq!(listed.len(), 1);
            assert_eq!((listed[0].name.as_str(), listed[0].size), ("a/b", 3));
        }
    }

    #[test]
    fn transient_failures_are_retried_for_the_whole_retry_time_and_others_not_at_all() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let generic = |message: &str| object_store::Error::Generic {
            store: "S3",
            source: message.to_string().into(),
        };
        let retry = Retry {
            timeout: Some(Duration::from_secs(5)),
            first_wait: Duration::from_millis(1),
        };
        // Eleven failures, one more than object_store retried: a connection dropped mid-PUT, 5xx.
        for message in [
            "Error performing PUT http://s3/b/p in 1ms - HTTP error: error sending request",
            "Server returned non-2xx status code: 503 Service Unavailable: slow down",
            "Server returned non-2xx status code: 429 Too Many Requests",
        ] {
            let mut attempts = 0;
            let result = runtime.block_on(retry.run(|| {
                attempts += 1;
                let failed = attempts <= 11;
                async move {
                    if failed {
                        Err(generic(message))
                    } else {
                        Ok(attempts)
                    }
                }
            }));
            assert_eq!(result.unwrap(), 12, "{message}");
        }
        // Refusals and the request's own faults are final at once.
        for error in [
            generic("Server returned non-2xx status code: 403 Forbidden: AccessDenied"),
            generic("Server returned non-2xx status code: 400 Bad Request"),
            object_store::Error::NotFound {
                path: "x".into(),
                source: "gone".into(),
            },
        ] {
            let mut attempts = 0;
            let mut error = Some(error);
            let result: object_store::Result<()> = runtime.block_on(retry.run(|| {
                attempts += 1;
                let e = error.take().expect("tried once");
                async move { Err(e) }
            }));
            assert!(result.is_err());
            assert_eq!(attempts, 1);
        }
        // And a failure that never ends ends at the retry time.
        let short = Retry {
            timeout: Some(Duration::from_millis(300)),
            first_wait: Duration::from_millis(1),
        };
        let started = std::time::Instant::now();
        let result: object_store::Result<()> =
            runtime.block_on(short.run(|| async { Err(generic("error sending request")) }));
        assert!(result.is_err());
        assert!(started.elapsed() >= Duration::from_millis(300));
        // A local store does not retry.
        let local = Retry {
            timeout: None,
            first_wait: Duration::from_millis(1),
        };
        let mut attempts = 0;
        let _ = runtime.block_on(local.run(|| {
            attempts += 1;
            async { Err::<(), _>(generic("error sending request")) }
        }));
        assert_eq!(attempts, 1);
    }

    #[test]
    fn a_full_disk_is_named_as_such() {
        let full = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(std::io::Error::from(std::io::ErrorKind::StorageFull)),
        };
        let err = store_error("memory", "packs/ab/cd", full);
        assert!(matches!(err, Error::StorageFull { .. }));
        assert!(err.to_string().contains("free space"));
    }

    #[test]
    fn cloud_locations_need_a_bucket_and_local_ones_are_not_cloud() {
        assert!(is_cloud("s3://bucket/prefix"));
        assert!(is_cloud("gs://bucket"));
        assert!(!is_cloud("/srv/backups/s3://x"));
        assert!(!is_cloud("file:///srv/backups"));
        let err = Store::open("s3:///prefix").err().unwrap();
        assert!(err.to_string().contains("names no bucket"), "{err}");
    }

    #[test]
    fn opening_a_missing_directory_says_repository_not_found() {
        assert!(matches!(
            Store::open("/nonexistent/bkp-repo"),
            Err(Error::RepositoryNotFound { .. })
        ));
    }
}
