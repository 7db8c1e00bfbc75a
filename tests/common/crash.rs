//! A store that loses power (as redb's crash tests do): it keeps only what a write barrier made
//! durable, and at a chosen step (a put, a delete or a barrier) it "crashes": that step and
//! every operation after it fail,
//! as if the process and the machine had stopped there. [`CrashStore::after_power_loss`] then
//! gives what a disk would hold after the reboot: the durable objects, objects deleted since
//! the last barrier back again, and objects written since then gone or cut short.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// What became of a write that no barrier made durable when the power went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// Gone.
    Vanished,
    /// There, but only its first half.
    Truncated,
    /// The last one written there whole, the others gone: the disk wrote them out of order.
    LastKept,
}

#[derive(Default)]
struct State {
    /// The objects as of the last barrier.
    durable: BTreeMap<String, Bytes>,
    /// Written since the last barrier, oldest first (deletes are `None`).
    pending: Vec<(String, Option<Bytes>)>,
    /// Puts, deletes and barriers so far: the points where the power can go.
    steps: usize,
    crash_at: Option<usize>,
    crashed: bool,
}

pub struct CrashStore {
    live: Arc<InMemory>,
    state: Arc<Mutex<State>>,
}

impl fmt::Display for CrashStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CrashStore")
    }
}

impl fmt::Debug for CrashStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CrashStore")
    }
}

fn power_lost() -> object_store::Error {
    object_store::Error::Generic {
        store: "CrashStore",
        source: "the power went out".into(),
    }
}

impl CrashStore {
    /// A store holding `objects`, all durable, that crashes at step number `crash_at`
    /// (0-based; `None`: never).
    pub fn new(objects: &BTreeMap<String, Bytes>, crash_at: Option<usize>) -> Arc<CrashStore> {
        let live = Arc::new(InMemory::new());
        for (name, bytes) in objects {
            futures::executor::block_on(live.put(&Path::from(name.as_str()), bytes.clone().into()))
                .unwrap();
        }
        let state = State {
            durable: objects.clone(),
            crash_at,
            ..State::default()
        };
        Arc::new(CrashStore {
            live,
            state: Arc::new(Mutex::new(state)),
        })
    }

    /// A [`bkp::Store`] on this store, whose barriers make writes durable here.
    pub fn store(self: &Arc<Self>) -> bkp::Store {
        bkp::Store::with_durability(self.clone(), "crash-store", Arc::new(Barrier(self.clone())))
    }

    /// Puts, deletes and barriers so far.
    pub fn steps(&self) -> usize {
        self.state.lock().unwrap().steps
    }

    pub fn crashed(&self) -> bool {
        self.state.lock().unwrap().crashed
    }

    /// Everything stored now, durable or not (to start the next scenario from).
    pub fn objects(&self) -> BTreeMap<String, Bytes> {
        let state = self.state.lock().unwrap();
        let mut objects = state.durable.clone();
        for (name, bytes) in &state.pending {
            match bytes {
                Some(bytes) => objects.insert(name.clone(), bytes.clone()),
                None => objects.remove(name),
            };
        }
        objects
    }

    /// Objects written since the last barrier.
    pub fn not_durable(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state.pending.iter().map(|(name, _)| name.clone()).collect()
    }

    /// What the disk holds after the power came back.
    pub fn after_power_loss(&self, lost: Lost) -> BTreeMap<String, Bytes> {
        let state = self.state.lock().unwrap();
        let mut objects = state.durable.clone();
        let last_put = state.pending.iter().rposition(|(_, bytes)| bytes.is_some());
        for (at, (name, bytes)) in state.pending.iter().enumerate() {
            match (bytes, lost) {
                (Some(bytes), Lost::Truncated) => {
                    objects.insert(name.clone(), bytes.slice(..bytes.len() / 2));
                }
                (Some(bytes), Lost::LastKept) if Some(at) == last_put => {
                    objects.insert(name.clone(), bytes.clone());
                }
                _ => {}
            }
        }
        objects
    }

    /// Counts a step; fails it (and crashes) if it is the chosen one.
    fn step(state: &mut State) -> object_store::Result<()> {
        if state.crashed || state.crash_at == Some(state.steps) {
            state.crashed = true;
            return Err(power_lost());
        }
        state.steps += 1;
        Ok(())
    }

    fn alive(&self) -> object_store::Result<()> {
        if self.crashed() {
            return Err(power_lost());
        }
        Ok(())
    }
}

struct Barrier(Arc<CrashStore>);

impl bkp::Durability for Barrier {
    fn barrier(&self) -> Result<(), String> {
        let mut state = self.0.state.lock().unwrap();
        CrashStore::step(&mut state).map_err(|e| e.to_string())?;
        let pending = std::mem::take(&mut state.pending);
        for (name, bytes) in pending {
            match bytes {
                Some(bytes) => state.durable.insert(name, bytes),
                None => state.durable.remove(&name),
            };
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for CrashStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        CrashStore::step(&mut self.state.lock().unwrap())?;
        let bytes = Bytes::from(payload.clone());
        let result = self.live.put_opts(location, payload, opts).await?;
        self.state
            .lock()
            .unwrap()
            .pending
            .push((location.to_string(), Some(bytes)));
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(object_store::Error::NotImplemented {
            operation: "multipart uploads".into(),
            implementer: "CrashStore".into(),
        })
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.alive()?;
        self.live.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let (live, state) = (self.live.clone(), self.state.clone());
        locations
            .then(move |location| {
                let (live, state) = (live.clone(), state.clone());
                async move {
                    let location = location?;
                    CrashStore::step(&mut state.lock().unwrap())?;
                    match live.delete(&location).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                    state
                        .lock()
                        .unwrap()
                        .pending
                        .push((location.to_string(), None));
                    Ok(location)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        if let Err(e) = self.alive() {
            return futures::stream::once(async { Err(e) }).boxed();
        }
        self.live.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.alive()?;
        self.live.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        _from: &Path,
        _to: &Path,
        _options: CopyOptions,
    ) -> object_store::Result<()> {
        Err(object_store::Error::NotImplemented {
            operation: "copy".into(),
            implementer: "CrashStore".into(),
        })
    }
}
