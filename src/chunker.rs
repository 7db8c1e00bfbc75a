//! Content-defined chunking: FastCDC (v2020) over a reader, with a secret gear table.
//!
//! The 256-entry gear table is generated from the repository's 256-bit chunker key, so cut
//! points differ per repository and cannot be predicted without the key (the crate's u64 `seed`
//! only XORs one word into the public table, the shape that the 2025 fingerprinting papers broke).
//! Cut points are part of the repository format: same key + same parameters + same fastcdc major
//! version = same chunks. That is why fastcdc is pinned.

use std::collections::VecDeque;
use std::io::{self, Read};

use fastcdc::v2020::{self, Normalization};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Chunk size bounds in bytes, stored in the repository config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl ChunkerParams {
    /// Chosen by measurement on SQL dumps (docs/PERFORMANCE.md): with delta frames, 16 KiB
    /// chunks stored less than 8 KiB or 4 KiB ones on day 1 and on day 2, with half the index
    /// of 8 KiB; 64 KiB chunks leave too few unchanged chunks to find a changed one's bases.
    /// Compression works on ~2 MiB groups, not on single chunks.
    pub const DEFAULT: ChunkerParams = ChunkerParams {
        min_size: 4 * 1024,
        avg_size: 16 * 1024,
        max_size: 128 * 1024,
    };

    /// fastcdc only checks these in debug builds; a bad value in release silently shifts cuts.
    pub fn validate(&self) -> Result<()> {
        let (min, avg, max) = (
            self.min_size as usize,
            self.avg_size as usize,
            self.max_size as usize,
        );
        let ok = [min, avg, max].iter().all(|v| v % 2 == 0)
            && (v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min)
            && (v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg)
            && (v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max)
            && min <= avg
            && avg <= max;
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(
                "chunker parameters",
                format!(
                    "{self:?} must be even, ordered min <= avg <= max and within fastcdc's limits"
                ),
            ))
        }
    }
}

/// The keyed gear tables (`gear` and `gear << 1`, as fastcdc's two-byte scan needs).
pub struct GearTable {
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
}

impl GearTable {
    pub fn from_key(chunker_key: &[u8; 32]) -> GearTable {
        let mut bytes = [0u8; 256 * 8];
        blake3::Hasher::new_keyed(chunker_key)
            .update(b"bkp v1 fastcdc gear table")
            .finalize_xof()
            .fill(&mut bytes);
        let mut gear = Box::new([0u64; 256]);
        let mut gear_ls = Box::new([0u64; 256]);
        for (i, word) in bytes.chunks_exact(8).enumerate() {
            gear[i] = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            gear_ls[i] = gear[i] << 1;
        }
        GearTable { gear, gear_ls }
    }
}

/// A reader that may say where chunks must end: at the start of each section of a dump
/// ([`crate::toc`]), so that a section is whole chunks.
pub trait ChunkInput: Read {
    /// Stream offsets, ascending, of cuts learned since the last call; each one is told before
    /// the bytes at it are read.
    fn take_cuts(&mut self) -> Vec<u64> {
        Vec::new()
    }
}

impl ChunkInput for &[u8] {}

/// Splits a byte stream into chunks. Memory: one buffer of a few max-size chunks.
pub struct Chunker<R> {
    reader: R,
    params: ChunkerParams,
    gear: GearTable,
    mask_s: u64,
    mask_l: u64,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    /// Stream offset of `buf[start]`.
    offset: u64,
    /// Cuts ahead, ascending.
    cuts: VecDeque<u64>,
}

impl<R: ChunkInput> Chunker<R> {
    pub fn new(reader: R, params: ChunkerParams, gear: GearTable) -> Result<Chunker<R>> {
        params.validate()?;
        let (mask_s, mask_l) = v2020::select_masks(params.avg_size as usize, Normalization::Level1);
        // Small enough that what is read in is still in cache when it is cut and hashed.
        let buf_len = (2 * params.max_size as usize).max(256 << 10);
        Ok(Chunker {
            reader,
            params,
            gear,
            mask_s,
            mask_l,
            buf: vec![0; buf_len],
            start: 0,
            end: 0,
            eof: false,
            offset: 0,
            cuts: VecDeque::new(),
        })
    }

    #[cfg(test)]
    pub fn next_chunk(&mut self) -> io::Result<Option<&[u8]>> {
        Ok(self.next_chunk_at_cut()?.map(|(chunk, _)| chunk))
    }

    /// The next chunk, or `None` at the end of the stream, and whether it starts at a cut the
    /// input asked for (the start of a dump's section). A chunk ends where the content says
    /// (FastCDC), at the maximum size, or at a cut the input asked for, whichever comes first.
    pub fn next_chunk_at_cut(&mut self) -> io::Result<Option<(&[u8], bool)>> {
        if self.end - self.start < self.params.max_size as usize && !self.eof {
            self.refill()?;
        }
        if self.start == self.end {
            return Ok(None);
        }
        let mut at_cut = false;
        while let Some(&cut) = self.cuts.front()
            && cut <= self.offset
        {
            at_cut |= cut == self.offset;
            self.cuts.pop_front();
        }
        let available = self.end - self.start;
        let limit = match self.cuts.front() {
            Some(&cut) => available.min((cut - self.offset).try_into().unwrap_or(usize::MAX)),
            None => available,
        };
        let (_, len) = v2020::cut_gear(
            &self.buf[self.start..self.start + limit],
            self.params.min_size as usize,
            self.params.avg_size as usize,
            self.params.max_size as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear.gear[..],
            &self.gear.gear_ls[..],
        );
        let chunk = &self.buf[self.start..self.start + len];
        self.start += len;
        self.offset += len as u64;
        Ok(Some((chunk, at_cut)))
    }

    fn refill(&mut self) -> io::Result<()> {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        while self.end < self.buf.len() {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.cuts.extend(self.reader.take_cuts());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_lengths(data: &[u8], key: [u8; 32]) -> Vec<usize> {
        let mut chunker =
            Chunker::new(data, ChunkerParams::DEFAULT, GearTable::from_key(&key)).unwrap();
        let mut out = Vec::new();
        while let Some(c) = chunker.next_chunk().unwrap() {
            out.push(c.len());
        }
        out
    }

    fn pseudo_random(len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new().finalize_xof().fill(&mut out);
        out
    }

    #[test]
    fn chunks_cover_the_input_within_bounds() {
        let data = pseudo_random(3 << 20);
        let lens = chunk_lengths(&data, [1; 32]);
        assert_eq!(lens.iter().sum::<usize>(), data.len());
        let p = ChunkerParams::DEFAULT;
        for &l in &lens[..lens.len() - 1] {
            assert!(l >= p.min_size as usize && l <= p.max_size as usize, "{l}");
        }
        let avg = data.len() / lens.len();
        let target = p.avg_size as usize;
        assert!((target / 2..target * 2).contains(&avg), "average {avg}");
    }

    #[test]
    fn cut_points_depend_on_the_key() {
        let data = pseudo_random(1 << 20);
        assert_eq!(chunk_lengths(&data, [1; 32]), chunk_lengths(&data, [1; 32]));
        assert_ne!(chunk_lengths(&data, [1; 32]), chunk_lengths(&data, [2; 32]));
    }

    /// A reader that asks for cuts at fixed offsets, told a block at a time as a dump's
    /// reading thread tells them.
    struct WithCuts<'a> {
        data: &'a [u8],
        at: usize,
        cuts: Vec<u64>,
    }

    impl Read for WithCuts<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.data.len() - self.at).min(100_000);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    impl ChunkInput for WithCuts<'_> {
        fn take_cuts(&mut self) -> Vec<u64> {
            let (told, later): (Vec<u64>, Vec<u64>) = self
                .cuts
                .iter()
                .partition(|&&c| c <= self.at as u64 + 100_000);
            self.cuts = later;
            told
        }
    }

    /// (offset, length, starts at a cut) of each chunk.
    fn cut_with(data: &[u8], cuts: &[u64]) -> Vec<(u64, usize, bool)> {
        let input = WithCuts {
            data,
            at: 0,
            cuts: cuts.to_vec(),
        };
        let mut chunker =
            Chunker::new(input, ChunkerParams::DEFAULT, GearTable::from_key(&[1; 32])).unwrap();
        let (mut out, mut at) = (Vec::new(), 0);
        while let Some((chunk, at_cut)) = chunker.next_chunk_at_cut().unwrap() {
            out.push((at, chunk.len(), at_cut));
            at += chunk.len() as u64;
        }
        out
    }

    #[test]
    fn chunks_end_at_the_cuts_asked_for_and_a_section_is_cut_alike_wherever_it_is() {
        let section = pseudo_random(300_000);
        let tiny = b"-- Name: t; Type: TABLE; Schema: public; Owner: x\n".to_vec();
        for before in [0usize, 1, 5000, 70_000, 250_000] {
            let mut data = pseudo_random(before + 1);
            data.truncate(before);
            data.extend_from_slice(&tiny);
            data.extend_from_slice(&section);
            let (a, b) = (before as u64, (before + tiny.len()) as u64);
            let cuts: Vec<u64> = [a, b].into_iter().filter(|&c| c > 0).collect();
            let chunks = cut_with(&data, &cuts);
            let starts: Vec<u64> = chunks.iter().filter(|c| c.2).map(|c| c.0).collect();
            assert_eq!(starts, cuts, "before = {before}");
            // The section's chunks, relative to its start, do not depend on what precedes it.
            let of_section: Vec<(u64, usize)> = chunks
                .iter()
                .filter(|c| c.0 >= b)
                .map(|c| (c.0 - b, c.1))
                .collect();
            let alone: Vec<(u64, usize)> =
                cut_with(&section, &[]).iter().map(|c| (c.0, c.1)).collect();
            assert_eq!(of_section, alone, "before = {before}");
        }
    }

    #[test]
    fn empty_input_has_no_chunks_and_bad_params_are_refused() {
        assert!(chunk_lengths(&[], [1; 32]).is_empty());
        let bad = ChunkerParams {
            min_size: 3,
            avg_size: 8192,
            max_size: 65536,
        };
        assert!(bad.validate().is_err());
    }
}
