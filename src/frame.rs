//! Frames: a group of consecutive new chunks (about 2 MiB) compressed together as one zstd frame
//! and sealed with the backup session's data key:
//! `nonce[24] || XChaCha20-Poly1305(zstd(chunk || chunk || ...)) || tag[16]`.
//!
//! Compressing a group rather than each chunk is what lets small chunks dedup well without
//! losing compression. A *delta frame* is compressed against the plaintext of up to
//! [`MAX_BASES`] earlier *base frames* (frames that are not deltas themselves), given to zstd as
//! a prefix (a raw-content dictionary): a dump that changed a little changes many small chunks
//! a little, and each changed chunk then costs the bytes of its change instead of a compressed
//! copy (docs/PERFORMANCE.md). One level only, so decoding a frame never needs more than its bases.

use serde::{Deserialize, Serialize};

use crate::crypto::CipherKey;
use crate::error::{Error, Result};
use crate::id::Id;

const FRAME_AAD: &[u8] = b"bkp v1 frame";
/// A delta frame above 1/REBASE_RATIO of its plain size is stored plain ([`FrameEncoder::seal`]).
const REBASE_RATIO: usize = 4;
/// Base frames one delta frame may use.
pub const MAX_BASES: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkEntry {
    pub id: Id,
    pub len: u32,
}

/// A frame named by its pack and its position in that pack's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FrameRef {
    pub pack: Id,
    pub frame: u32,
}

/// A group of chunks compressed and sealed, not yet placed in a pack.
pub struct Frame {
    pub sealed: Vec<u8>,
    pub chunks: Vec<ChunkEntry>,
    pub bases: Vec<FrameRef>,
}

/// zstd parameters of a delta frame: a window that keeps all of its dictionary reachable, and
/// long-distance matching to find the dictionary's matches.
///
/// zstd's regular match finder indexes only the last 2^(hashLog + 3) bytes of a dictionary
/// (1 MiB at level 3), and hashing 4 MiB of bases into tables large enough for all of them was a
/// third of a day-2 backup's CPU. The long-distance match finder indexes the whole dictionary
/// sparsely and finds the long runs that a changed region shares with its previous version; the
/// regular one, at its level's table sizes, still finds the short matches near each position. On
/// the real pg_dump pair a day-2 backup added 21 % less (10.9 -> 8.6 MB) in the same time and
/// 4 MiB less memory (docs/PERFORMANCE.md). The decoder is unchanged: these are plain zstd frames.
///
/// The long-distance match finder hashes every byte of the dictionary and the group (a fifth
/// of a day-2 backup's CPU) and records a position at one in 2^hash_rate_log of them. Matches
/// of at least 128 bytes recorded at one position in 256 (zstd's defaults here: 64 and 128)
/// took 4-7 % less CPU on the real pairs (4 alternating runs each) and stored as much or less
/// (pg pair 9.82 -> 9.63 MiB, mariadb pair 4.04 MiB both ways; the generated dump, whose
/// changes are random bytes, +2 %): the runs a changed row shares with its old version are far
/// longer than that.
fn delta_parameters(dictionary: &[u8], raw_len: usize) -> [zstd::zstd_safe::CParameter; 4] {
    let log2_ceil = |n: usize| n.next_power_of_two().trailing_zeros();
    let window_log = log2_ceil(dictionary.len() + raw_len).clamp(20, 27);
    [
        zstd::zstd_safe::CParameter::WindowLog(window_log),
        zstd::zstd_safe::CParameter::EnableLongDistanceMatching(true),
        zstd::zstd_safe::CParameter::LdmMinMatch(128),
        zstd::zstd_safe::CParameter::LdmHashRateLog(8),
    ]
}

/// zstd parameters beyond the level, for every frame.
///
/// Minimum match 6 at levels 1-9 (zstd defaults to 5 or 7): on the real pg_dump pair at level 3
/// it stored 8 % less on day 1 (97.7 against 106.4 MB), added 3 % less on day 2 and ran 10 %
/// faster; a mysqldump-style file compressed 10 % smaller at the same speed; the generated dump
/// was unchanged on day 1 and 3 % larger on day 2 (docs/PERFORMANCE.md). At level 19 it stored
/// 1 % more, so higher levels keep zstd's.
///
/// Blocks of 127 KiB: zstd 1.5.7 runs a block pre-splitter over every full 128 KiB block at
/// levels 3-4 (`ZSTD_optimalBlockSize`). On our dumps it never split one (the output was
/// byte-identical with it switched off) but took 4-6 % of compression time; a block just under
/// the maximum skips it and stores the same within 0.1 %. (The direct switch,
/// `ZSTD_c_blockSplitterLevel`, is not exposed by zstd-safe.)
fn tuned_parameters(level: i32) -> impl Iterator<Item = zstd::zstd_safe::CParameter> {
    use zstd::zstd_safe::CParameter;
    let min_match = (level <= 9).then_some(CParameter::MinMatch(6));
    min_match
        .into_iter()
        .chain([CParameter::MaxBlockSize(127 * 1024)])
}

fn zstd_error(code: usize) -> String {
    zstd::zstd_safe::get_error_name(code).to_string()
}

/// Compresses and seals groups; one per worker, so its zstd context and buffers are reused (a
/// fresh 1 MiB buffer per group cost page faults on every frame).
pub struct FrameEncoder {
    /// For base and delta frames alike (a context each took 1.3 MB more per worker), reused
    /// since a fresh context allocates and clears its tables (sized to the dictionary) for
    /// every frame: 40 % of a day-2 backup's page faults.
    context: zstd::zstd_safe::CCtx<'static>,
    compressed: Vec<u8>,
    level: i32,
}

impl FrameEncoder {
    pub fn new(level: i32) -> FrameEncoder {
        FrameEncoder {
            context: zstd::zstd_safe::CCtx::create(),
            compressed: Vec::new(),
            level,
        }
    }

    /// `raw` is the concatenation of `chunks`; `dictionary` is empty for a base frame, or the
    /// concatenated plaintexts of `bases`, in order.
    ///
    /// A delta frame grows with the changes since its bases were written, so one that is no
    /// longer much smaller than the group compressed alone (`plain_estimate`, from the bases'
    /// own ratio) is stored as a base frame instead, and the next backups find a fresher base.
    /// The break-even: a delta that grows by `c` a day over a plain frame of size `p` costs
    /// least on average when rebased at `d = sqrt(2cp)`; with c ≈ 0.035 p (docs/PERFORMANCE.md)
    /// that is about p / 4, after about a week.
    pub fn seal(
        &mut self,
        key: &CipherKey,
        raw: &[u8],
        chunks: Vec<ChunkEntry>,
        dictionary: &[u8],
        mut bases: Vec<FrameRef>,
        plain_estimate: usize,
    ) -> Frame {
        debug_assert_eq!(dictionary.is_empty(), bases.is_empty());
        if dictionary.is_empty() {
            self.compress(raw, &[]);
        } else {
            self.compress(raw, dictionary);
            if self.compressed.len() * REBASE_RATIO > plain_estimate {
                let delta = std::mem::take(&mut self.compressed);
                self.compress(raw, &[]);
                if delta.len() * REBASE_RATIO > self.compressed.len() {
                    bases.clear();
                } else {
                    self.compressed = delta;
                }
            }
        }
        Frame {
            sealed: key.seal(FRAME_AAD, &self.compressed),
            chunks,
            bases,
        }
    }

    /// Compresses `raw` into `compressed`, against `dictionary` (a prefix) unless it is empty.
    fn compress(&mut self, raw: &[u8], dictionary: &[u8]) {
        self.compressed.clear();
        self.compressed
            .reserve(zstd::zstd_safe::compress_bound(raw.len()));
        let context = &mut self.context;
        // SAFETY: the context is `'static` so that it can be reused, but `dictionary` only lives
        // for this call. zstd uses a referenced prefix for the next frame only and reads it only
        // while compressing that frame, in `compress2` below; resetting the parameters at the end
        // of this function drops the reference even if compression failed before using it. A
        // later frame never reads memory of an earlier one (that is what lets a context be
        // reused across inputs that have since been freed).
        let prefix: &'static [u8] = unsafe { std::mem::transmute::<&[u8], _>(dictionary) };
        let delta = (!dictionary.is_empty())
            .then(|| delta_parameters(dictionary, raw.len()))
            .into_iter()
            .flatten();
        let compressed = [zstd::zstd_safe::CParameter::CompressionLevel(self.level)]
            .into_iter()
            .chain(tuned_parameters(self.level))
            .chain(delta)
            .try_for_each(|p| context.set_parameter(p).map(drop))
            .and_then(|()| {
                if prefix.is_empty() {
                    Ok(())
                } else {
                    context.ref_prefix(prefix).map(drop)
                }
            })
            .and_then(|()| context.compress2(&mut self.compressed, raw).map(drop));
        let reset = context.reset(zstd::zstd_safe::ResetDirective::SessionAndParameters);
        compressed
            .and(reset)
            .map_err(zstd_error)
            .expect("zstd compresses into compress_bound bytes");
    }
}

/// Seals a frame again under `to` without decompressing it (repack moves frames between packs,
/// whose session keys differ).
pub fn reseal(from: &CipherKey, to: &CipherKey, sealed: &[u8], object: &str) -> Result<Vec<u8>> {
    let compressed = from
        .open(FRAME_AAD, sealed)
        .ok_or_else(|| Error::corrupt(object, "a frame fails authentication"))?;
    Ok(to.seal(FRAME_AAD, &compressed))
}

/// Opens and decompresses frames, reusing its zstd context.
pub struct FrameDecoder {
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder {
            decompressor: zstd::bulk::Decompressor::new().expect("zstd context"),
        }
    }
}

impl FrameDecoder {
    /// Opens a frame, appending its plaintext (the concatenation of its chunks) to `raw`: a
    /// reused buffer in restore, which clears it first, and a dictionary in backup, which
    /// decodes a group's base frames straight into it. `dictionary` as for
    /// [`FrameEncoder::seal`]. On an error `raw` holds what it held before.
    pub fn open(
        &mut self,
        key: &CipherKey,
        sealed: &[u8],
        dictionary: &[u8],
        raw_len: usize,
        raw: &mut Vec<u8>,
        object: &str,
    ) -> Result<()> {
        let compressed = key
            .open(FRAME_AAD, sealed)
            .ok_or_else(|| Error::corrupt(object, "a frame fails authentication"))?;
        let start = raw.len();
        // Exactly: `reserve` may double a reused buffer (4 MiB for a 2 MiB frame, 10 of them
        // alive in a restore).
        raw.reserve_exact(raw_len);
        let mut tail = Tail { vec: raw, start };
        let decompressed = if dictionary.is_empty() {
            self.decompressor
                .decompress_to_buffer(&compressed, &mut tail)
                .map_err(|e| e.to_string())
        } else {
            let mut context = zstd::zstd_safe::DCtx::create();
            context
                .ref_prefix(dictionary)
                .and_then(|_| context.decompress(&mut tail, &compressed))
                .map_err(zstd_error)
        };
        let result = decompressed
            .map_err(|e| Error::corrupt(object, format!("a frame does not decompress: {e}")))
            .and_then(|_| {
                if raw.len() - start == raw_len {
                    Ok(())
                } else {
                    Err(Error::corrupt(
                        object,
                        "a frame decompresses to the wrong length",
                    ))
                }
            });
        if result.is_err() {
            raw.truncate(start);
        }
        result
    }
}

/// The unused capacity of a vector after its first `start` bytes, for zstd to write into.
struct Tail<'a> {
    vec: &'a mut Vec<u8>,
    start: usize,
}

// SAFETY: `as_mut_ptr` and `capacity` describe the vector's allocation past `start` (which is at
// most its length), and `filled_until` marks as initialized only the `n` bytes zstd reports it
// wrote there, which the trait's contract guarantees it did.
unsafe impl zstd::zstd_safe::WriteBuf for Tail<'_> {
    fn as_slice(&self) -> &[u8] {
        &self.vec[self.start..]
    }

    fn capacity(&self) -> usize {
        self.vec.capacity() - self.start
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: `start` <= len <= capacity, so the pointer stays within (or one past) the
        // allocation.
        unsafe { self.vec.as_mut_ptr().add(self.start) }
    }

    unsafe fn filled_until(&mut self, n: usize) {
        // SAFETY: the caller (zstd) initialized `n` bytes from `as_mut_ptr`.
        unsafe { self.vec.set_len(self.start + n) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    fn session_key(master: &MasterKey) -> CipherKey {
        master.data.sealing().new_session().1
    }

    fn rows(from: u32, to: u32) -> Vec<u8> {
        (from..to)
            .map(|i| format!("{i}\tcustomer {}\t{}\tshipped\n", i % 97, i * 7 % 1000))
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn a_delta_frame_stores_the_change_not_a_copy() {
        let master = MasterKey::generate();
        let key = session_key(&master);
        let day1 = rows(0, 20_000);
        let mut day2 = rows(0, 20_000);
        day2.splice(300_000..300_010, b"UPDATED!!!".iter().copied());
        let chunk = |raw: &[u8]| {
            vec![ChunkEntry {
                id: master.chunk_id(raw),
                len: raw.len() as u32,
            }]
        };
        let mut encoder = FrameEncoder::new(3);
        let base = encoder.seal(&key, &day1, chunk(&day1), &[], Vec::new(), 0);
        let plain = encoder.seal(&key, &day2, chunk(&day2), &[], Vec::new(), 0);
        let mut dictionary = Vec::new();
        dictionary.extend_from_slice(&day1);
        let base_ref = FrameRef {
            pack: Id([1; 32]),
            frame: 0,
        };
        let estimate = plain.sealed.len();
        let delta = encoder.seal(
            &key,
            &day2,
            chunk(&day2),
            &dictionary,
            vec![base_ref],
            estimate,
        );
        assert_eq!(delta.bases, vec![base_ref]);
        assert!(
            delta.sealed.len() * 20 < plain.sealed.len(),
            "delta {} bytes, plain {} bytes",
            delta.sealed.len(),
            plain.sealed.len()
        );

        let mut decoder = FrameDecoder::default();
        let mut out = Vec::new();
        decoder
            .open(&key, &delta.sealed, &dictionary, day2.len(), &mut out, "p")
            .unwrap();
        assert_eq!(out, day2);
        // The same context then opens a base frame without the dictionary.
        out.clear();
        decoder
            .open(&key, &base.sealed, &[], day1.len(), &mut out, "p")
            .unwrap();
        assert_eq!(out, day1);
        // Without its bases, or with other bases, a delta frame does not decode to its content.
        out.clear();
        assert!(
            decoder
                .open(&key, &delta.sealed, &[], day2.len(), &mut out, "p")
                .is_err()
                || out != day2
        );
        let mut wrong = Vec::new();
        wrong.extend_from_slice(&rows(1, 20_001));
        out.clear();
        assert!(
            decoder
                .open(&key, &delta.sealed, &wrong, day2.len(), &mut out, "p")
                .is_err()
                || out != day2
        );
    }

    #[test]
    fn opening_appends_after_what_the_buffer_holds() {
        let master = MasterKey::generate();
        let key = session_key(&master);
        let (one, two) = (rows(0, 3_000), rows(3_000, 7_000));
        let mut encoder = FrameEncoder::new(3);
        let first = encoder.seal(&key, &one, Vec::new(), &[], Vec::new(), 0);
        let second = encoder.seal(&key, &two, Vec::new(), &[], Vec::new(), 0);
        let mut decoder = FrameDecoder::default();
        let mut out = Vec::new();
        decoder
            .open(&key, &first.sealed, &[], one.len(), &mut out, "p")
            .unwrap();
        decoder
            .open(&key, &second.sealed, &[], two.len(), &mut out, "p")
            .unwrap();
        assert_eq!(out, [one.clone(), two.clone()].concat());
        // A frame that does not open leaves what was there, and only that.
        let mut damaged = second.sealed.clone();
        damaged[40] ^= 1;
        let before = out.clone();
        assert!(
            decoder
                .open(&key, &damaged, &[], two.len(), &mut out, "p")
                .is_err()
        );
        assert!(
            decoder
                .open(&key, &second.sealed, &[], 10, &mut out, "p")
                .is_err()
        );
        assert_eq!(out, before);
    }

    #[test]
    fn a_flipped_bit_fails_authentication() {
        let master = MasterKey::generate();
        let key = session_key(&master);
        let raw = rows(0, 100);
        let mut frame = FrameEncoder::new(3).seal(&key, &raw, Vec::new(), &[], Vec::new(), 0);
        frame.sealed[30] ^= 1;
        let mut out = Vec::new();
        let err = FrameDecoder::default()
            .open(
                &key,
                &frame.sealed,
                &[],
                raw.len(),
                &mut out,
                "packs/ab/abc",
            )
            .unwrap_err();
        assert!(err.to_string().contains("packs/ab/abc"), "{err}");
    }
}
