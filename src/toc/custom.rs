//! The table of contents of a pg_dump custom-format archive (`pg_dump -Fc`), read as it
//! streams by: the archive's header and TOC (its `PREAMBLE`), then one section per data block,
//! named by the TOC entry it belongs to, with its rows (the COPY rows of an uncompressed
//! archive, `-Z0`; a compressed one's rows are not counted).
//!
//! Layout (pg_dump's pg_backup_archiver.c and pg_backup_custom.c, archive versions 1.12 to
//! 1.16, PostgreSQL 9.6 to 17): `PGDMP`, the version, the sizes of an int and an offset, the
//! format, the compression, the time, the database and versions, then the TOC: a count and
//! that many entries (dump id, tag, kind, schema, owner, SQL, dependencies, data offset). Ints
//! are a sign byte and `int size` bytes, little-endian; strings an int length (-1: none) and
//! their bytes. After the TOC come the data blocks: a type byte (1 data, 3 large objects), the
//! dump id, then chunks (an int length and its bytes) up to a length of 0; large objects are
//! (oid, chunks up to 0) up to an oid of 0. Nothing follows the last block.

use std::collections::HashMap;

use super::{Section, section};

/// Header and TOC bytes held until the TOC is read whole; an archive whose TOC is larger has no
/// table of contents here.
const TOC_MAX: usize = 64 << 20;

const BLOCK_DATA: u8 = 1;
const BLOCK_LARGE_OBJECTS: u8 = 3;

#[derive(Default)]
pub(super) struct CustomToc {
    /// Stream offset of the next byte fed.
    at: u64,
    /// The header and TOC so far.
    held: Vec<u8>,
    state: State,
    int_size: usize,
    compressed: bool,
    /// Entries with data, by dump id: (kind, schema-qualified name).
    entries: HashMap<i64, (String, String)>,
    sections: Vec<Section>,
    open: Option<Section>,
    starts: Vec<u64>,
    /// The last bytes of the open block's data ([`COPY_END`]).
    tail: Vec<u8>,
}

/// How COPY data ends in a custom archive (pg_dump's dumpTableData_copy): `\.` and two empty
/// lines, three newlines that are not rows.
const COPY_END: &[u8] = b"\\.\n\n\n";

#[derive(Default)]
enum State {
    /// Holding the header and TOC until they parse.
    #[default]
    Toc,
    /// The head of a block (type byte and dump id), so far.
    BlockHead(Vec<u8>),
    /// An int so far: a chunk's length, or a large object's oid.
    Int(Vec<u8>, IntIs),
    /// Bytes of a chunk still to come.
    Chunk { left: u64, large_object: bool },
    /// Not an archive this reader understands, or past a block it could not read: no more
    /// sections.
    Lost,
}

#[derive(Clone, Copy)]
enum IntIs {
    Length { large_object: bool },
    Oid,
}

/// Why the header and TOC did not parse.
enum Short {
    /// More bytes are needed.
    More,
    /// Not an archive (of a version) this reader knows.
    Unknown,
}

/// Reads the header and TOC.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    int_size: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        let end = self.at.checked_add(n).ok_or(Short::Unknown)?;
        if end > TOC_MAX {
            return Err(Short::Unknown);
        }
        let bytes = self.bytes.get(self.at..end).ok_or(Short::More)?;
        self.at = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, Short> {
        Ok(self.take(1)?[0])
    }

    fn int(&mut self) -> Result<i64, Short> {
        let sign = self.byte()?;
        Ok(int_value(sign, self.take(self.int_size)?))
    }

    /// A string (`None`: pg_dump's NULL).
    fn string(&mut self) -> Result<Option<String>, Short> {
        let len = self.int()?;
        if len < 0 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| Short::Unknown)?;
        Ok(Some(String::from_utf8_lossy(self.take(len)?).into_owned()))
    }
}

/// An int from its sign byte and its little-endian magnitude.
fn int_value(sign: u8, magnitude: &[u8]) -> i64 {
    let mut value = 0u64;
    for (i, &b) in magnitude.iter().enumerate().take(8) {
        value |= u64::from(b) << (8 * i);
    }
    let value = value.min(i64::MAX as u64) as i64;
    if sign != 0 { -value } else { value }
}

/// What the header and TOC say: (int size, compressed, entries with data by dump id), and
/// where the TOC ends.
type Parsed = (usize, bool, HashMap<i64, (String, String)>, usize);

fn parse_toc(bytes: &[u8]) -> Result<Parsed, Short> {
    let mut c = Cursor {
        bytes,
        at: 0,
        int_size: 4,
    };
    if c.take(5)? != b"PGDMP" {
        return Err(Short::Unknown);
    }
    let version = (c.byte()?, c.byte()?, c.byte()?);
    if !((1, 12, 0)..(1, 17, 0)).contains(&version) {
        return Err(Short::Unknown);
    }
    let at_least = |minor: u8| version >= (1, minor, 0);
    c.int_size = usize::from(c.byte()?);
    let off_size = usize::from(c.byte()?);
    let format = c.byte()?;
    if !(1..=8).contains(&c.int_size) || !(1..=16).contains(&off_size) || format != 1 {
        return Err(Short::Unknown);
    }
    let compressed = match at_least(15) {
        true => c.byte()? != 0,
        false => c.int()? != 0,
    };
    for _ in 0..7 {
        c.int()?; // the time it was made
    }
    for _ in 0..3 {
        c.string()?; // database, server version, pg_dump version
    }
    let count = c.int()?;
    let mut entries = HashMap::new();
    for _ in 0..count.max(0) {
        let dump_id = c.int()?;
        let had_dumper = c.int()?;
        c.string()?; // table oid
        c.string()?; // oid
        let tag = c.string()?.unwrap_or_default();
        let kind = c.string()?.unwrap_or_default();
        c.int()?; // section
        for _ in 0..3 {
            c.string()?; // definition, drop statement, COPY statement
        }
        let schema = c.string()?.unwrap_or_default();
        c.string()?; // tablespace
        if at_least(14) {
            c.string()?; // table access method
        }
        if at_least(16) {
            c.int()?; // relkind
        }
        c.string()?; // owner
        c.string()?; // "with oids", always false
        while c.string()?.is_some() {} // dependencies, up to a NULL
        c.byte()?; // data offset: its state, then the offset
        c.take(off_size)?;
        if had_dumper != 0 {
            let name = match schema.as_str() {
                "" => tag,
                schema => format!("{schema}.{tag}"),
            };
            entries.insert(dump_id, (kind, name));
        }
    }
    Ok((c.int_size, compressed, entries, c.at))
}

impl CustomToc {
    pub(super) fn feed(&mut self, mut block: &[u8]) {
        if let State::Toc = self.state {
            self.held.extend_from_slice(block);
            match parse_toc(&self.held) {
                Err(Short::More) if self.held.len() <= TOC_MAX => {
                    self.at += block.len() as u64;
                    return;
                }
                Err(_) => {
                    self.state = State::Lost;
                    self.held = Vec::new();
                    self.at += block.len() as u64;
                    return;
                }
                Ok((_, true, _, _)) => {
                    // Compressed data: rows cannot be counted, and nothing deduplicates
                    // (the backup warns); no table of contents.
                    self.compressed = true;
                    self.state = State::Lost;
                    self.held = Vec::new();
                    return;
                }
                Ok((int_size, compressed, entries, toc_end)) => {
                    let held = std::mem::take(&mut self.held);
                    (self.int_size, self.compressed, self.entries) =
                        (int_size, compressed, entries);
                    let from_this_block = held.len() - block.len();
                    self.at = toc_end as u64;
                    self.close_preamble();
                    self.state = State::BlockHead(Vec::new());
                    // The blocks start in this block, after the TOC.
                    block = &block[toc_end - from_this_block..];
                }
            }
        }
        while !block.is_empty() {
            let used = self.step(block);
            self.at += used as u64;
            block = &block[used..];
        }
    }

    /// Reads what it can of `bytes` in the current state; returns how many it used.
    fn step(&mut self, bytes: &[u8]) -> usize {
        let int_len = 1 + self.int_size;
        match &mut self.state {
            State::Toc | State::Lost => bytes.len(),
            State::BlockHead(got) => {
                if got.is_empty() {
                    self.start_block();
                }
                let State::BlockHead(got) = &mut self.state else {
                    unreachable!("still a block head")
                };
                let used = (int_len + 1 - got.len()).min(bytes.len());
                got.extend_from_slice(&bytes[..used]);
                if got.len() == int_len + 1 {
                    let (kind, id) = (got[0], int_value(got[1], &got[2..]));
                    self.name_block(kind, id);
                    self.state = match kind {
                        BLOCK_DATA => State::Int(
                            Vec::new(),
                            IntIs::Length {
                                large_object: false,
                            },
                        ),
                        BLOCK_LARGE_OBJECTS => State::Int(Vec::new(), IntIs::Oid),
                        _ => State::Lost,
                    };
                }
                used
            }
            State::Int(got, is) => {
                let used = (int_len - got.len()).min(bytes.len());
                got.extend_from_slice(&bytes[..used]);
                if got.len() == int_len {
                    let value = int_value(got[0], &got[1..]);
                    self.state = match (*is, value) {
                        (_, value) if value < 0 => State::Lost,
                        (IntIs::Oid, 0) => State::BlockHead(Vec::new()),
                        (IntIs::Oid, _) => {
                            State::Int(Vec::new(), IntIs::Length { large_object: true })
                        }
                        (IntIs::Length { large_object: true }, 0) => {
                            State::Int(Vec::new(), IntIs::Oid)
                        }
                        (
                            IntIs::Length {
                                large_object: false,
                            },
                            0,
                        ) => {
                            if self.tail.ends_with(COPY_END)
                                && let Some(open) = &mut self.open
                            {
                                open.rows = open.rows.saturating_sub(3);
                            }
                            State::BlockHead(Vec::new())
                        }
                        (IntIs::Length { large_object }, len) => State::Chunk {
                            left: len as u64,
                            large_object,
                        },
                    };
                }
                used
            }
            State::Chunk { left, large_object } => {
                let used = (*left).min(bytes.len() as u64) as usize;
                *left -= used as u64;
                let large_object = *large_object;
                if !large_object && let Some(open) = &mut self.open {
                    open.rows += bytecount::count(&bytes[..used], b'\n') as u64;
                    let last = used.saturating_sub(COPY_END.len());
                    self.tail.extend_from_slice(&bytes[last..used]);
                    let excess = self.tail.len().saturating_sub(COPY_END.len());
                    self.tail.drain(..excess);
                }
                if let State::Chunk { left: 0, .. } = self.state {
                    self.state = State::Int(Vec::new(), IntIs::Length { large_object });
                }
                used
            }
        }
    }

    fn close_preamble(&mut self) {
        self.sections
            .push(section("PREAMBLE", String::new(), None, 0).ended_at(self.at));
    }

    /// A block starts here: the section before it ends.
    fn start_block(&mut self) {
        if let Some(open) = self.open.take() {
            let at = self.at;
            self.sections.push(open.ended_at(at));
        }
        self.starts.push(self.at);
        self.tail.clear();
        self.open = Some(section("DATA", String::new(), None, self.at));
    }

    fn name_block(&mut self, kind: u8, id: i64) {
        let Some(open) = &mut self.open else { return };
        let (desc, name) = match self.entries.get(&id) {
            Some((desc, name)) => (desc.clone(), name.clone()),
            None => match kind {
                BLOCK_LARGE_OBJECTS => ("BLOBS".to_string(), format!("dump id {id}")),
                _ => ("DATA".to_string(), format!("dump id {id}")),
            },
        };
        open.table = (desc == "TABLE DATA").then(|| name.clone());
        open.kind = desc;
        open.name = name;
    }

    pub(super) fn take_starts(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.starts)
    }

    /// The sections; none for a compressed archive.
    pub(super) fn finish(&mut self) -> Vec<Section> {
        if self.compressed {
            return Vec::new();
        }
        let at = self.at;
        if let State::Toc = self.state {
            // Cut off inside its TOC: all of it is the preamble.
            self.sections
                .push(section("PREAMBLE", String::new(), None, 0).ended_at(at));
            self.held = Vec::new();
        }
        if let Some(open) = self.open.take() {
            self.sections.push(open.ended_at(at));
        }
        if matches!(self.state, State::Lost) && self.sections.is_empty() {
            self.sections
                .push(section("PREAMBLE", String::new(), None, 0).ended_at(at));
        }
        // (Called once; a second call has nothing new to say.)
        self.state = State::Lost;
        std::mem::take(&mut self.sections)
    }
}

impl Section {
    fn ended_at(mut self, end: u64) -> Section {
        self.end = end;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dump::DumpKind;

    fn int(out: &mut Vec<u8>, value: i64) {
        out.push(u8::from(value < 0));
        out.extend_from_slice(&(value.unsigned_abs() as u32).to_le_bytes());
    }

    fn string(out: &mut Vec<u8>, text: Option<&str>) {
        match text {
            None => int(out, -1),
            Some(text) => {
                int(out, text.len() as i64);
                out.extend_from_slice(text.as_bytes());
            }
        }
    }

    /// A version 1.14 archive (PostgreSQL 14 and 15) of two tables, one with data in two
    /// chunks, and a block of large objects; `compression` as pg_dump writes it.
    fn archive(compression: i64) -> Vec<u8> {
        let mut a = b"PGDMP".to_vec();
        a.extend_from_slice(&[1, 14, 0, 4, 8, 1]);
        int(&mut a, compression);
        for field in [0, 0, 0, 1, 0, 125, 0] {
            int(&mut a, field);
        }
        for text in ["shop", "15.20", "15.20"] {
            string(&mut a, Some(text));
        }
        let entries: [(i64, bool, &str, &str, &str); 4] = [
            (1, false, "Wéird \"T\"", "TABLE", "sales"),
            (2, true, "Wéird \"T\"", "TABLE DATA", "sales"),
            (3, true, "empty", "TABLE DATA", "public"),
            (4, true, "BLOBS", "BLOBS", ""),
        ];
        int(&mut a, entries.len() as i64);
        for (id, data, tag, kind, schema) in entries {
            int(&mut a, id);
            int(&mut a, i64::from(data));
            string(&mut a, Some("1259"));
            string(&mut a, Some("16384"));
            string(&mut a, Some(tag));
            string(&mut a, Some(kind));
            int(&mut a, 2);
            string(&mut a, Some("CREATE TABLE ...;\n"));
            string(&mut a, Some(""));
            string(&mut a, Some("COPY ... FROM stdin;\n"));
            string(&mut a, Some(schema));
            string(&mut a, Some(""));
            string(&mut a, Some("heap"));
            string(&mut a, Some("postgres"));
            string(&mut a, Some("false"));
            string(&mut a, Some("1"));
            string(&mut a, None);
            a.push(1); // offset not set (written to a pipe)
            a.extend_from_slice(&[0; 8]);
        }
        // Data of dump id 2: three rows, one of them looking like a TOC, in two chunks.
        a.push(BLOCK_DATA);
        int(&mut a, 2);
        for chunk in ["1\tPGDMP\n2\t", "two\n3\t\\\\.\n\\.\n", "\n\n"] {
            int(&mut a, chunk.len() as i64);
            a.extend_from_slice(chunk.as_bytes());
        }
        int(&mut a, 0);
        // Dump id 3: no rows.
        a.push(BLOCK_DATA);
        int(&mut a, 3);
        int(&mut a, 0);
        // Two large objects.
        a.push(BLOCK_LARGE_OBJECTS);
        int(&mut a, 4);
        for oid in [16400, 16401] {
            int(&mut a, oid);
            int(&mut a, 3);
            a.extend_from_slice(b"\n\n\n");
            int(&mut a, 0);
        }
        int(&mut a, 0);
        a
    }

    fn read(archive: &[u8], block: usize) -> (Vec<Section>, Vec<u64>) {
        crate::toc::read_in_blocks(DumpKind::PostgresCustom, archive, block).unwrap()
    }

    #[test]
    fn a_custom_archive_has_a_section_per_data_block_with_its_rows() {
        let archive = archive(0);
        let (sections, starts) = read(&archive, archive.len());
        let kinds: Vec<(&str, &str, u64)> = sections
            .iter()
            .map(|s| (s.kind.as_str(), s.name.as_str(), s.rows))
            .collect();
        assert_eq!(
            kinds,
            [
                ("PREAMBLE", "", 0),
                ("TABLE DATA", "sales.Wéird \"T\"", 3),
                ("TABLE DATA", "public.empty", 0),
                ("BLOBS", "BLOBS", 0),
            ]
        );
        assert_eq!(sections[1].table.as_deref(), Some("sales.Wéird \"T\""));
        let mut at = 0;
        for s in &sections {
            assert_eq!(s.start, at);
            at = s.end;
        }
        assert_eq!(at, archive.len() as u64);
        let told: Vec<u64> = sections.iter().skip(1).map(|s| s.start).collect();
        assert_eq!(starts, told);
        for block in [1, 2, 3, 5, 7, 64, 100] {
            assert_eq!(
                read(&archive, block),
                (sections.clone(), starts.clone()),
                "{block}"
            );
        }
    }

    #[test]
    fn a_compressed_or_cut_or_foreign_archive_has_no_sections_it_cannot_vouch_for() {
        assert!(read(&archive(-1), 1000).0.is_empty(), "compressed");
        let archive = archive(0);
        // Cut inside the TOC: one preamble; inside a block: that block is the last section.
        for cut in [40, archive.len() - 30] {
            let (sections, _) = read(&archive[..cut], 17);
            assert_eq!(sections.last().unwrap().end, cut as u64);
            assert_eq!(sections[0].start, 0);
        }
        let mut newer = archive.clone();
        newer[6] = 99; // version 1.99
        let (sections, starts) = read(&newer, 64);
        assert_eq!((sections.len(), starts.len()), (1, 0));
        assert_eq!(sections[0].end, newer.len() as u64);
    }
}
