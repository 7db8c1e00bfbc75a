//! Reading frames back out of packs, for restore and for the bases of delta frames in backup.
//! Reads are aligned to [`READ_ALIGNMENT`] so the store does not learn exact frame boundaries.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::crypto::CipherKey;
use crate::error::{Error, Result};
use crate::frame::FrameDecoder;
use crate::index::{FrameLocation, Index, MISSING_BASE, PackLocation};
use crate::repo::{Repository, pack_name};
use crate::store::Pending;

pub const READ_ALIGNMENT: u64 = 64 * 1024;

/// Reads and decodes frames; each thread keeps its own session keys and zstd context.
pub struct FrameReader<'a> {
    repo: &'a Repository,
    /// Where [`FrameReader::read`] finds frames by number; a reader of fetches only needs none.
    index: Option<&'a Index>,
    session_keys: HashMap<[u8; 32], CipherKey>,
    decoder: FrameDecoder,
}

impl<'a> FrameReader<'a> {
    pub fn new(repo: &'a Repository, index: &'a Index) -> FrameReader<'a> {
        FrameReader {
            index: Some(index),
            ..FrameReader::of_fetches(repo)
        }
    }

    /// A reader that only decodes what [`fetch_frame`] started reading.
    pub fn of_fetches(repo: &'a Repository) -> FrameReader<'a> {
        FrameReader {
            repo,
            index: None,
            session_keys: HashMap::new(),
            decoder: FrameDecoder::default(),
        }
    }

    fn index(&self) -> Result<&'a Index> {
        self.index
            .ok_or_else(|| Error::Internal("a frame read by number without an index".into()))
    }

    /// Reads and decodes a frame into `raw` (a reused buffer), returning it. A delta frame
    /// needs `dictionary`: its bases' plaintexts, concatenated ([`BaseCache::dictionary`]).
    pub fn read(&mut self, frame: u32, dictionary: &[u8], raw: Vec<u8>) -> Result<Vec<u8>> {
        let fetch = fetch(self.repo, self.index()?, frame)?;
        self.decode(fetch, dictionary, raw)
    }

    /// Opens a frame whose bytes [`fetch`] started reading.
    pub fn decode(&mut self, fetch: Fetch, dictionary: &[u8], mut raw: Vec<u8>) -> Result<Vec<u8>> {
        raw.clear();
        self.open_into(fetch, dictionary, &mut raw)?;
        Ok(raw)
    }

    /// Reads and decodes a base frame given by its location, appending its plaintext to `out`.
    pub fn read_base_appending(
        &mut self,
        frame: &FrameLocation,
        pack: &PackLocation,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let fetch = fetch_frame(self.repo, frame, pack)?;
        self.open_into(fetch, &[], out)
    }

    /// Waits for `fetch` and opens the frame, appending its plaintext to `out`.
    fn open_into(&mut self, fetch: Fetch, dictionary: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let (frame, pack) = (&fetch.frame, &fetch.pack);
        let name = pack_name(&pack.id);
        let store = self.repo.store();
        let bytes = store.wait(fetch.bytes).map_err(|e| {
            // A failed ranged read of a pack that is shorter than indexed is damage, not I/O.
            match store.size(&name) {
                Ok(Some(actual)) if actual != pack.len => Error::corrupt(
                    &name,
                    format!("it is {actual} bytes long, the index says {}", pack.len),
                ),
                _ => e,
            }
        })?;
        let sealed = bytes
            .get(fetch.start..fetch.start + frame.sealed_len as usize)
            .ok_or_else(|| Error::corrupt(&name, "shorter than the index says"))?;
        let key = match self.session_keys.get(&pack.data_ephemeral) {
            Some(key) => key,
            None => {
                let key = self
                    .repo
                    .data_session(&pack.data_ephemeral)?
                    .ok_or_else(|| {
                        Error::corrupt(format!("index entry for {name}"), "invalid session key")
                    })?;
                self.session_keys.entry(pack.data_ephemeral).or_insert(key)
            }
        };
        self.decoder
            .open(key, sealed, dictionary, frame.raw_len as usize, out, &name)
    }
}

/// A frame's bytes being read from the store, with what opening it takes.
pub struct Fetch {
    frame: FrameLocation,
    pack: PackLocation,
    bytes: Pending<Bytes>,
    /// Where the frame starts in the aligned range read.
    start: usize,
}

/// Starts reading a frame's pack range, so that reads overlap decoding (restore prefetches
/// the frames it has planned; on S3 each read is a request with its own latency).
pub fn fetch(repo: &Repository, index: &Index, frame_number: u32) -> Result<Fetch> {
    let frame = index.frame(frame_number);
    fetch_frame(repo, frame, index.pack(frame.pack))
}

/// [`fetch`] of a frame given by its location (`frame.pack` is not looked at).
pub fn fetch_frame(repo: &Repository, frame: &FrameLocation, pack: &PackLocation) -> Result<Fetch> {
    let name = pack_name(&pack.id);
    let end = frame.offset + frame.sealed_len as u64;
    if end > pack.len {
        return Err(Error::corrupt(
            format!("index entry for {name}"),
            "frame lies outside the pack",
        ));
    }
    let range = aligned(frame.offset..end, pack.len);
    Ok(Fetch {
        frame: *frame,
        pack: pack.clone(),
        start: (frame.offset - range.start) as usize,
        bytes: repo.store().get_range_soon(&name, range),
    })
}

/// `range` widened to [`READ_ALIGNMENT`] boundaries, within an object `len` bytes long.
fn aligned(range: std::ops::Range<u64>, len: u64) -> std::ops::Range<u64> {
    let start = range.start / READ_ALIGNMENT * READ_ALIGNMENT;
    let end = range.end.div_ceil(READ_ALIGNMENT) * READ_ALIGNMENT;
    start..end.min(len)
}

/// Reads `range` of pack `name` (`len` bytes long) through an aligned read, so that the store
/// does not learn exact offsets (where a pack's header starts says how many frame bytes it
/// holds, finer than its padded size).
pub fn read_range_aligned(
    store: &crate::store::Store,
    name: &str,
    len: u64,
    range: std::ops::Range<u64>,
) -> Result<Vec<u8>> {
    let wide = aligned(range.clone(), len);
    let bytes = store.get_range(name, wide.clone())?;
    let (from, to) = (
        (range.start - wide.start) as usize,
        (range.end - wide.start) as usize,
    );
    bytes
        .get(from..to)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| Error::corrupt(name, "shorter than its listed size"))
}

/// Recently decoded base frames, shared by threads: consecutive delta frames mostly share their
/// bases (check, which decodes delta frames; backup decodes into its dictionaries directly).
pub struct BaseCache {
    decoded: Mutex<VecDeque<(u32, Arc<Vec<u8>>)>>,
    /// The buffer of a frame let go of, for the next decode: a fresh one is faulted in page by
    /// page as zstd writes it (a third of a day-2 backup's page faults).
    spare: Mutex<Option<Vec<u8>>>,
    kept: usize,
}

impl BaseCache {
    pub fn new(kept: usize) -> BaseCache {
        BaseCache {
            decoded: Mutex::new(VecDeque::new()),
            spare: Mutex::new(None),
            kept,
        }
    }

    /// Fills `dictionary` with the plaintexts of `bases` (base frames), in order.
    pub fn dictionary(
        &self,
        reader: &mut FrameReader<'_>,
        bases: &[u32],
        dictionary: &mut Vec<u8>,
    ) -> Result<()> {
        dictionary.clear();
        let decoded = bases
            .iter()
            .map(|&base| self.get(reader, base))
            .collect::<Result<Vec<_>>>()?;
        // Exactly: grown by doubling, a 4.1 MiB dictionary took 8 MiB, in every worker.
        let len: usize = decoded.iter().map(|d| d.len()).sum();
        dictionary.reserve_exact(len);
        for base in decoded {
            dictionary.extend_from_slice(&base);
        }
        Ok(())
    }

    fn get(&self, reader: &mut FrameReader<'_>, frame: u32) -> Result<Arc<Vec<u8>>> {
        let cached = |decoded: &VecDeque<(u32, Arc<Vec<u8>>)>| {
            decoded
                .iter()
                .find(|(f, _)| *f == frame)
                .map(|(_, raw)| raw.clone())
        };
        if let Some(raw) = cached(&self.decoded.lock().expect("base cache lock")) {
            return Ok(raw);
        }
        let buffer = self.spare.lock().expect("base cache lock").take();
        let raw = Arc::new(reader.read(frame, &[], buffer.unwrap_or_default())?);
        let mut decoded = self.decoded.lock().expect("base cache lock");
        if cached(&decoded).is_none() {
            if decoded.len() == self.kept {
                let (_, evicted) = decoded.pop_front().expect("a cached frame");
                // Unless a worker is still building a dictionary from it.
                if let Ok(buffer) = Arc::try_unwrap(evicted) {
                    *self.spare.lock().expect("base cache lock") = Some(buffer);
                }
            }
            decoded.push_back((frame, raw.clone()));
        }
        Ok(raw)
    }
}

/// The base frames a delta frame needs, or an error naming the frame whose base is missing.
pub fn bases_of(index: &Index, frame: u32) -> Result<&[u32]> {
    let bases = index.bases(frame);
    if bases.contains(&MISSING_BASE) {
        let location = index.frame(frame);
        return Err(Error::Missing {
            object: format!(
                "a base frame of frame {} in {}",
                location.number_in_pack,
                pack_name(&index.pack(location.pack).id)
            ),
        });
    }
    Ok(bases)
}
