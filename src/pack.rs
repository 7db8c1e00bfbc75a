//! Packs: how frames ([`crate::frame`]) are stored.
//!
//! A *pack* is one stored object:
//! ```text
//! magic "BKPPCK02" | data_ephemeral[32] | metadata_ephemeral[32]
//! frame | frame | ...                                  (data session key, AAD "bkp v1 frame")
//! header: nonce | seal(postcard(PackHeader) || zero padding) | tag   (metadata session key)
//! trailer: nonce | seal(header_offset u64le || header_len u64le) | tag   (56 bytes, fixed)
//! ```
//! The header lists every frame, the chunk ids in it and the base frames of a delta frame, so an
//! index can be rebuilt from packs alone. The header's padding makes the whole pack a padded
//! length (Padmé, at least 4 KiB), so neither frame nor chunk sizes nor counts are visible from
//! outside; the trailer has a fixed size. Version 1 packs (`BKPPCK01`) differ only in a header
//! without `moved`, and are still read.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};

use serde::{Deserialize, Serialize};

use crate::crypto::{CipherKey, MasterKey, OpeningKey, SEAL_OVERHEAD};
use crate::envelope::check_magic;
use crate::error::{Error, Result};
pub use crate::frame::{ChunkEntry, Frame, FrameRef};
use crate::id::Id;
use crate::index::IndexedPack;
use crate::padding::padded_len;
use crate::spill;

pub const PACK_MAGIC: &[u8; 8] = b"BKPPCK02";
/// Target size of a stored pack ([`PackWriter`]): one PUT each, a few per GiB of new data.
pub const PACK_SIZE: usize = 8 << 20;
/// A pack is finished before its header passes this ([`PackWriter`]): ~28 k chunk entries.
pub const MAX_HEADER_LEN: usize = 1 << 20;
const PACK_MAGIC_V1: &[u8; 8] = b"BKPPCK01";
pub const PREFIX_LEN: usize = 8 + 32 + 32;
pub const TRAILER_LEN: usize = SEAL_OVERHEAD + 16;
const HEADER_AAD: &[u8] = b"bkp v1 pack header";
const TRAILER_AAD: &[u8] = b"bkp v1 pack trailer";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameEntry {
    /// Offset of the sealed frame within its pack.
    pub offset: u64,
    pub sealed_len: u32,
    /// The chunks in the frame, in order; each starts where the previous one ends.
    pub chunks: Vec<ChunkEntry>,
    /// Empty for a base frame; for a delta frame, the base frames whose plaintexts form its
    /// dictionary, in order.
    pub bases: Vec<FrameRef>,
}

impl FrameEntry {
    pub fn raw_len(&self) -> usize {
        self.chunks.iter().map(|c| c.len as usize).sum()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackHeader {
    pub frames: Vec<FrameEntry>,
    /// Base frames that a repack copied here from other packs, with the names they had there:
    /// delta frames stored before the move still name their bases that way.
    pub moved: Vec<MovedFrame>,
}

/// `frame` of this pack was `from` (a repacked frame moved again keeps all its old names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedFrame {
    pub frame: u32,
    pub from: FrameRef,
}

/// Format version 1, read but no longer written.
pub(crate) mod v1 {
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub struct PackHeader {
        pub frames: Vec<super::FrameEntry>,
    }

    impl From<PackHeader> for super::PackHeader {
        fn from(header: PackHeader) -> Self {
            super::PackHeader {
                frames: header.frames,
                moved: Vec::new(),
            }
        }
    }
}

/// The keys of one backup session's packs.
pub struct PackSession {
    pub data_ephemeral: [u8; 32],
    pub data_key: CipherKey,
    /// The data session key's bytes: what a put-only writer remembers to read its frames back.
    pub data_key_bytes: [u8; 32],
    pub metadata_ephemeral: [u8; 32],
    pub metadata_key: CipherKey,
}

impl PackSession {
    /// Fresh session keys: a writer needs only the public halves of the repository's keys.
    pub fn new(key: &MasterKey) -> PackSession {
        let (data_ephemeral, data_key_bytes) = key.data.sealing().new_session_key();
        let (metadata_ephemeral, metadata_key) = key.metadata.sealing().new_session();
        PackSession {
            data_ephemeral,
            data_key: CipherKey::new(&data_key_bytes),
            data_key_bytes,
            metadata_ephemeral,
            metadata_key,
        }
    }
}

impl Drop for PackSession {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.data_key_bytes);
    }
}

/// Builds one pack, up to a target size.
///
/// Padding rounds every pack up to its Padmé bucket (steps of 128 KiB between 4 and 8 MiB), so
/// where a pack ends decides how much of it is padding: closing it once it reached the target
/// padded it by ~160 KB on average (1.7 MB of a 1 GB day-1 backup). A pack in the last eighth
/// of its target is finished as soon as its padding would be under 1/256 of it, and it never
/// grows past the target (a target that is a power of two is a bucket boundary): ~20 KB of
/// padding a pack on that backup, in 13 packs instead of 11.
///
/// A pack's header is also capped ([`MAX_HEADER_LEN`]): delta frames of a changed dump are a
/// few KB for 128 chunks, so an 8 MiB pack of them had a header of ~4 MB (37 bytes a chunk),
/// held by the writer, by every reader of the pack's header and, 64 packs at a time, by the
/// backup until it wrote their index file: the memory of a day-2 backup of a 10 GB dump.
pub struct PackWriter {
    body: PackBody,
    header: PackHeader,
    /// Serialized size of `header`'s entries so far.
    header_len: usize,
    target: usize,
}

/// Where a pack's frames wait until it is finished.
enum PackBody {
    Memory(Vec<u8>),
    /// A private temporary file ([`crate::spill`]): for a pack that fills while the previous one
    /// uploads, so that memory holds one pack, not two.
    Spilled {
        out: BufWriter<File>,
        len: usize,
    },
}

impl PackBody {
    fn len(&self) -> usize {
        match self {
            PackBody::Memory(buf) => buf.len(),
            PackBody::Spilled { len, .. } => *len,
        }
    }

    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        match self {
            PackBody::Memory(buf) => buf.extend_from_slice(bytes),
            PackBody::Spilled { out, len } => {
                out.write_all(bytes).map_err(spill::temp_error)?;
                *len += bytes.len();
            }
        }
        Ok(())
    }

    /// Everything appended, in memory, with room for `more` bytes.
    fn into_memory(self, more: usize) -> Result<Vec<u8>> {
        match self {
            PackBody::Memory(buf) => Ok(buf),
            PackBody::Spilled { out, len } => {
                let mut file = out
                    .into_inner()
                    .map_err(|e| spill::temp_error(e.into_error()))?;
                let mut buf = Vec::with_capacity(len + more);
                file.seek(SeekFrom::Start(0))
                    .and_then(|_| file.take(len as u64).read_to_end(&mut buf))
                    .map_err(spill::temp_error)?;
                if buf.len() != len {
                    return Err(Error::Internal(
                        "a pack's temporary file was cut short".into(),
                    ));
                }
                Ok(buf)
            }
        }
    }
}

impl PackWriter {
    /// A pack of about `target` bytes (stored, padding included), built in memory.
    pub fn new(session: &PackSession, target: usize) -> PackWriter {
        Self::with_body(
            session,
            target,
            PackBody::Memory(Vec::with_capacity(target)),
        )
        .expect("a pack in memory takes its prefix")
    }

    /// As [`PackWriter::new`], its frames kept in a private temporary file until it is
    /// finished.
    pub fn spilled(session: &PackSession, target: usize) -> Result<PackWriter> {
        let out = BufWriter::with_capacity(64 << 10, spill::anonymous_file()?);
        Self::with_body(session, target, PackBody::Spilled { out, len: 0 })
    }

    fn with_body(session: &PackSession, target: usize, mut body: PackBody) -> Result<PackWriter> {
        body.append(PACK_MAGIC)?;
        body.append(&session.data_ephemeral)?;
        body.append(&session.metadata_ephemeral)?;
        Ok(PackWriter {
            body,
            header: PackHeader::default(),
            header_len: 0,
            target,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.header.frames.is_empty()
    }

    /// Whether the pack should be finished before `next` is added (see [`PackWriter`]).
    pub fn is_full_before(&self, next: &Frame, moved_from: &[FrameRef]) -> bool {
        if self.is_empty() {
            return false;
        }
        let now = self.unpadded_len();
        // An upper bound of what `next` adds to the header: ids, lengths and varints.
        let next_entry = 32 + (next.chunks.len() + next.bases.len() + moved_from.len()) * 42;
        if self.header_len + next_entry > MAX_HEADER_LEN {
            return true;
        }
        if now + next.sealed.len() as u64 + next_entry as u64 > self.target as u64 {
            return true;
        }
        now >= (self.target - self.target / 8) as u64 && padded_len(now) - now <= now / 256
    }

    /// What [`PackWriter::finish`] would produce before padding.
    fn unpadded_len(&self) -> u64 {
        // The two vector lengths in front of the header's entries: at most 5 bytes each.
        (self.body.len() + self.header_len + 10 + SEAL_OVERHEAD + TRAILER_LEN) as u64
    }

    /// Adds `frame`, which was known as `moved_from` in the packs it was copied from (empty for
    /// a new frame).
    pub fn add(&mut self, frame: Frame, moved_from: &[FrameRef]) -> Result<()> {
        let number = self.header.frames.len() as u32;
        for &from in moved_from {
            let moved = MovedFrame {
                frame: number,
                from,
            };
            self.header_len += serialized_size(&moved);
            self.header.moved.push(moved);
        }
        let entry = FrameEntry {
            offset: self.body.len() as u64,
            sealed_len: frame.sealed.len() as u32,
            chunks: frame.chunks,
            bases: frame.bases,
        };
        self.body.append(&frame.sealed)?;
        self.header_len += serialized_size(&entry);
        self.header.frames.push(entry);
        Ok(())
    }

    /// The pack's index entry and the bytes to store under `packs/` as its id.
    pub fn finish(self, session: &PackSession) -> Result<(IndexedPack, Vec<u8>)> {
        let metadata_key = &session.metadata_key;
        let mut header_plain = postcard::to_allocvec(&self.header).expect("header serializes");
        debug_assert!(header_plain.len() <= self.header_len + 10);
        let frames_len = self.body.len();
        let unpadded = (frames_len + header_plain.len() + SEAL_OVERHEAD + TRAILER_LEN) as u64;
        let padding = (padded_len(unpadded) - unpadded) as usize;
        header_plain.resize(header_plain.len() + padding, 0);
        let sealed_header = metadata_key.seal(HEADER_AAD, &header_plain);
        drop(header_plain);
        let mut trailer = [0u8; 16];
        trailer[..8].copy_from_slice(&(frames_len as u64).to_le_bytes());
        trailer[8..].copy_from_slice(&(sealed_header.len() as u64).to_le_bytes());
        let sealed_trailer = metadata_key.seal(TRAILER_AAD, &trailer);
        let mut buf = self
            .body
            .into_memory(sealed_header.len() + sealed_trailer.len())?;
        buf.extend_from_slice(&sealed_header);
        buf.extend_from_slice(&sealed_trailer);
        debug_assert_eq!(buf.len() as u64, padded_len(unpadded));
        let pack = IndexedPack {
            id: Id::of_object(&buf),
            len: buf.len() as u64,
            data_ephemeral: session.data_ephemeral,
            header: self.header,
        };
        Ok((pack, buf))
    }
}

fn serialized_size(value: &impl Serialize) -> usize {
    postcard::experimental::serialized_size(value).expect("header entries serialize")
}

/// A pack holding `frames` (arbitrary bytes) and a sealed header whose plaintext is `header`
/// (arbitrary too): for fuzzing the header decoder behind its authentication.
pub(crate) fn pack_around(session: &PackSession, frames: &[u8], header: &[u8]) -> Vec<u8> {
    let mut out = PACK_MAGIC.to_vec();
    out.extend_from_slice(&session.data_ephemeral);
    out.extend_from_slice(&session.metadata_ephemeral);
    out.extend_from_slice(frames);
    let sealed = session.metadata_key.seal(HEADER_AAD, header);
    let mut trailer = [0u8; 16];
    trailer[..8].copy_from_slice(&(out.len() as u64).to_le_bytes());
    trailer[8..].copy_from_slice(&(sealed.len() as u64).to_le_bytes());
    out.extend(sealed);
    out.extend(session.metadata_key.seal(TRAILER_AAD, &trailer));
    out
}

/// Reads a pack's header from the pack's bytes alone (for index rebuilds).
/// Returns the data ephemeral key (needed to open its frames) and the header.
pub fn read_header(
    pack: &[u8],
    metadata: &OpeningKey,
    object: &str,
) -> Result<([u8; 32], PackHeader)> {
    let len = pack.len() as u64;
    read_header_with(len, metadata, object, |range| {
        pack.get(range.start as usize..range.end as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Error::corrupt(object, "the header lies outside the pack"))
    })
}

/// Reads a pack's header through `read(range)` of a pack `len` bytes long: three small reads
/// (start, trailer, header) instead of the whole pack, which is what `check` needs.
pub fn read_header_with(
    len: u64,
    metadata: &OpeningKey,
    object: &str,
    mut read: impl FnMut(std::ops::Range<u64>) -> Result<Vec<u8>>,
) -> Result<([u8; 32], PackHeader)> {
    if len < (PREFIX_LEN + TRAILER_LEN) as u64 {
        return Err(Error::corrupt(object, format!("truncated to {len} bytes")));
    }
    let prefix = read(0..PREFIX_LEN as u64)?;
    let version_1 = &prefix[..8] == PACK_MAGIC_V1;
    if !version_1 {
        check_magic(PACK_MAGIC, &prefix[..8], object)?;
    }
    let data_ephemeral: [u8; 32] = prefix[8..40].try_into().expect("32 bytes");
    let metadata_ephemeral: [u8; 32] = prefix[40..PREFIX_LEN].try_into().expect("32 bytes");
    let key = metadata
        .session(&metadata_ephemeral)?
        .ok_or_else(|| Error::corrupt(object, "invalid session key"))?;
    let trailer = key
        .open(TRAILER_AAD, &read(len - TRAILER_LEN as u64..len)?)
        .ok_or_else(|| Error::corrupt(object, "the pack trailer fails authentication"))?;
    let offset = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
    let header_len = u64::from_le_bytes(trailer[8..].try_into().expect("8 bytes"));
    let end = offset
        .checked_add(header_len)
        .filter(|&end| end <= len)
        .ok_or_else(|| Error::corrupt(object, "the header lies outside the pack"))?;
    let plain = key
        .open(HEADER_AAD, &read(offset..end)?)
        .ok_or_else(|| Error::corrupt(object, "the pack header fails authentication"))?;
    let decoded = if version_1 {
        postcard::take_from_bytes::<v1::PackHeader>(&plain).map(|(h, _padding)| h.into())
    } else {
        postcard::take_from_bytes::<PackHeader>(&plain).map(|(h, _padding)| h)
    };
    let header = decoded
        .map_err(|e| Error::corrupt(object, format!("the pack header does not decode: {e}")))?;
    Ok((data_ephemeral, header))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameDecoder, FrameEncoder};

    #[test]
    fn pack_round_trip_through_header_and_frames() {
        let master = MasterKey::generate();
        let s = PackSession::new(&master);
        round_trip(&master, &s, PackWriter::new(&s, 1 << 20));
        round_trip(&master, &s, PackWriter::spilled(&s, 1 << 20).unwrap());
    }

    fn round_trip(master: &MasterKey, s: &PackSession, mut writer: PackWriter) {
        let mut encoder = FrameEncoder::new(3);
        let raw = b"INSERT INTO t VALUES (1);\nINSERT INTO t VALUES (2);\n".repeat(100);
        let chunks = vec![
            ChunkEntry {
                id: master.chunk_id(&raw[..1000]),
                len: 1000,
            },
            ChunkEntry {
                id: master.chunk_id(&raw[1000..]),
                len: (raw.len() - 1000) as u32,
            },
        ];
        let base = FrameRef {
            pack: Id([5; 32]),
            frame: 2,
        };
        writer
            .add(
                encoder.seal(&s.data_key, &raw, chunks.clone(), &[], Vec::new(), 0),
                &[base],
            )
            .unwrap();
        let mut dictionary = Vec::new();
        dictionary.extend_from_slice(&raw);
        let frame = encoder.seal(
            &s.data_key,
            &raw,
            chunks.clone(),
            &dictionary,
            vec![base],
            1 << 20,
        );
        writer.add(frame, &[]).unwrap();
        let (pack, bytes) = writer.finish(s).unwrap();
        assert_eq!(bytes.len() as u64, padded_len(bytes.len() as u64));
        assert_eq!(pack.id, Id::of_object(&bytes));
        assert_eq!(pack.len, bytes.len() as u64);

        let (data_eph, header) = read_header(&bytes, &master.metadata, "p").unwrap();
        assert_eq!(data_eph, s.data_ephemeral);
        assert_eq!(header, pack.header);
        assert_eq!(header.frames[0].chunks, chunks);
        assert!(header.frames[0].bases.is_empty());
        assert_eq!(header.frames[1].bases, vec![base]);
        assert_eq!(
            header.moved,
            vec![MovedFrame {
                frame: 0,
                from: base
            }]
        );
        let f = &header.frames[0];
        let sealed = &bytes[f.offset as usize..f.offset as usize + f.sealed_len as usize];
        let key = master.data.session(&data_eph).unwrap().unwrap();
        let mut decoder = FrameDecoder::default();
        let mut out = Vec::new();
        decoder
            .open(&key, sealed, &[], f.raw_len(), &mut out, "p")
            .unwrap();
        assert_eq!(out, raw);
        let f = &header.frames[1];
        let sealed = &bytes[f.offset as usize..f.offset as usize + f.sealed_len as usize];
        out.clear();
        decoder
            .open(&key, sealed, &dictionary, f.raw_len(), &mut out, "p")
            .unwrap();
        assert_eq!(out, raw);

        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(read_header(&flipped, &master.metadata, "p").is_err());
    }

    #[test]
    fn packs_end_just_below_a_padding_boundary_and_never_past_the_target() {
        let s = PackSession::new(&MasterKey::generate());
        let mut sizes = blake3::Hasher::new().finalize_xof();
        let mut frames = (0..800u32).map(|i| {
            let mut r = [0u8; 4];
            sizes.fill(&mut r);
            let chunks = (0..12).map(|c| ChunkEntry {
                id: Id([(i + c) as u8; 32]),
                len: 16 << 10,
            });
            Frame {
                sealed: vec![0; 100_000 + (u32::from_le_bytes(r) % 200_000) as usize],
                chunks: chunks.collect(),
                bases: Vec::new(),
            }
        });
        let mut writer = PackWriter::new(&s, PACK_SIZE);
        let mut paddings = Vec::new();
        loop {
            let next = frames.next();
            if next.as_ref().is_none_or(|f| writer.is_full_before(f, &[])) {
                let full = std::mem::replace(&mut writer, PackWriter::new(&s, PACK_SIZE));
                let (pack, bytes) = full.finish(&s).unwrap();
                let frames: usize = pack
                    .header
                    .frames
                    .iter()
                    .map(|f| f.sealed_len as usize)
                    .sum();
                let header = postcard::to_allocvec(&pack.header).unwrap().len();
                let content = PREFIX_LEN + frames + header + SEAL_OVERHEAD + TRAILER_LEN;
                assert!(bytes.len() <= PACK_SIZE, "{}", bytes.len());
                paddings.push(bytes.len() - content);
            }
            match next {
                Some(frame) => writer.add(frame, &[]).unwrap(),
                None => break,
            }
        }
        paddings.pop(); // the last pack is as long as the stream makes it
        assert!(paddings.len() >= 16, "{paddings:?}");
        // Closing a pack once it reaches the target padded by ~130 KiB on average, closing only
        // before it would pass the target by ~50 KiB here (the frames are deterministic).
        let average = paddings.iter().sum::<usize>() / paddings.len();
        assert!(average < 40 << 10, "{average} {paddings:?}");
    }
}
