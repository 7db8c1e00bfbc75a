//! A dump's table of contents, read from the stream as it goes by: where each object of a
//! pg_dump plain or mysqldump/mariadb-dump stream starts and ends, which table it belongs to,
//! and for table data how many rows it holds. A backup ends a chunk at every section's start, so
//! that a section is whole chunks: its digest is that of their (keyed) ids, and two snapshots
//! tell which tables changed, and a restore reads one table, without reading anything else.
//!
//! A section starts at the line that names it and runs to the next such line:
//! - pg_dump (plain): `-- Name: T; Type: K; Schema: S; Owner: O` and `-- Data for Name: ...`
//!   (the dump's table of contents, one entry per object); its data sections are `COPY ... FROM
//!   stdin;` blocks, a row a line up to `\.`, inside which nothing is read as a marker (a row may
//!   hold any text, `-- Name:` too).
//! - mysqldump: `-- Table structure for table `T``, `-- Dumping data for table `T``, views,
//!   routines and events, `-- Current Database: `D`` (several databases); rows are the value
//!   tuples of `INSERT INTO ... VALUES (...),(...);`, counted outside quoted strings.
//!
//! What comes before the first marker is the `PREAMBLE` (session settings a restore of any part
//! needs), what comes after the last section the `TRAILER`. Other streams have no table of
//! contents. (Not the listing catalogs of `catalogs/`: this is about what is inside a dump.)
//! One pass, memory bounded by the first [`HEAD_MAX`] bytes of a line and the section list,
//! whatever the lines' lengths (an extended INSERT may be megabytes).

use memchr::memchr;
use serde::{Deserialize, Serialize};

use crate::dump::DumpKind;
use crate::tree::{TreeCursor, TreeRoot, TreeStep};

mod custom;

/// Bytes of a line looked at to tell what it is.
const HEAD_MAX: usize = 1024;

/// pg_dump's kinds of object that belong to a table, named in their statement (a sequence: an
/// identity column's, or one `OWNED BY` a column).
const BELONGS_TO_A_TABLE: [&str; 10] = [
    "SEQUENCE",
    "SEQUENCE OWNED BY",
    "INDEX",
    "CONSTRAINT",
    "FK CONSTRAINT",
    "CHECK CONSTRAINT",
    "TRIGGER",
    "DEFAULT",
    "POLICY",
    "ROW SECURITY",
];

/// One part of a dump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// The dump's own word for it: pg_dump's type (`TABLE`, `TABLE DATA`, `INDEX`, `FK
    /// CONSTRAINT`, `SEQUENCE`, ...), for mysqldump `TABLE`, `TABLE DATA`, `VIEW`, `ROUTINES`,
    /// `EVENTS`, `DATABASE`; `PREAMBLE` and `TRAILER` before the first and after the last.
    pub kind: String,
    /// Schema-qualified for PostgreSQL (`public.orders`), with its database for a mysqldump of
    /// several (`shop.orders`); names as the dump spells them, unquoted.
    pub name: String,
    /// The table an index, constraint, trigger, default or table data belongs to.
    pub table: Option<String>,
    /// Stream offsets: the section is `start..end`.
    pub start: u64,
    pub end: u64,
    /// Rows of table data; 0 for other sections.
    pub rows: u64,
}

/// A section as a snapshot records it: with the chunks it is made of (a backup ends a chunk
/// at every section's start) and their digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub section: Section,
    /// Its chunks are the stream's chunks `first_chunk..first_chunk + chunks`, numbered from 0.
    pub first_chunk: u64,
    pub chunks: u64,
    /// [`SECTION_DIGEST_CONTEXT`]-derived BLAKE3 of the chunks' ids in order: equal for equal
    /// bytes (the chunks of a section depend on its bytes alone), keyed through the ids.
    pub digest: [u8; 32],
    /// Bytes of its chunks that the backup stored as new (not yet in the repository).
    pub new_bytes: u64,
    /// The path from the snapshot's tree root down to its first chunk, so that a restore of
    /// the section reads only the tree nodes above its chunks.
    pub tree_path: Vec<TreeStep>,
}

impl Entry {
    /// Whether this is a table's rows.
    pub fn is_table_data(&self) -> bool {
        self.section.kind == "TABLE DATA"
    }

    /// Bytes of the stream it takes.
    pub fn len(&self) -> u64 {
        self.section.end - self.section.start
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub const SECTION_DIGEST_CONTEXT: &str = "bkp v1 dump section digest";

/// The runs of chunks between cuts, as a backup cuts them: where each starts in the stream,
/// its first chunk and the digest of its ids.
#[derive(Default)]
pub struct ChunkRuns {
    runs: Vec<Run>,
    open: Option<(Run, blake3::Hasher)>,
}

struct Run {
    offset: u64,
    first_chunk: u64,
    chunks: u64,
    new_bytes: u64,
    digest: [u8; 32],
    cursor: TreeCursor,
}

impl ChunkRuns {
    /// The next chunk of the stream: `number`, at `offset`, starting a run if `at_cut` (or if
    /// it is the first), where `cursor` says it will be in the tree; `new_bytes` of it were
    /// stored as new (its length, or 0).
    pub fn chunk(
        &mut self,
        number: u64,
        offset: u64,
        id: &[u8; 32],
        at_cut: bool,
        new_bytes: u64,
        cursor: impl FnOnce() -> TreeCursor,
    ) {
        if at_cut || self.open.is_none() {
            self.close();
            let run = Run {
                offset,
                first_chunk: number,
                chunks: 0,
                new_bytes: 0,
                digest: [0; 32],
                cursor: cursor(),
            };
            self.open = Some((run, blake3::Hasher::new_derive_key(SECTION_DIGEST_CONTEXT)));
        }
        let (run, hasher) = self.open.as_mut().expect("a run is open");
        run.chunks += 1;
        run.new_bytes += new_bytes;
        hasher.update(id);
    }

    fn close(&mut self) {
        if let Some((mut run, hasher)) = self.open.take() {
            run.digest = *hasher.finalize().as_bytes();
            self.runs.push(run);
        }
    }

    /// The sections with their chunks, if each starts where a run does (so it must, but a
    /// table of contents that does not match is left out rather than recorded wrong), in the
    /// tree of `root`.
    pub fn entries(mut self, sections: Vec<Section>, root: &TreeRoot) -> Option<Vec<Entry>> {
        self.close();
        if sections.len() != self.runs.len() {
            return None;
        }
        sections
            .into_iter()
            .zip(self.runs)
            .map(|(section, run)| {
                (section.start == run.offset).then_some(Entry {
                    section,
                    first_chunk: run.first_chunk,
                    chunks: run.chunks,
                    digest: run.digest,
                    new_bytes: run.new_bytes,
                    tree_path: run.cursor.path(root),
                })
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    Postgres,
    MySql,
}

/// What the current line is, once its head is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineKind {
    Other,
    /// A COPY row: counted.
    Row,
    /// An INSERT: its value tuples counted from this offset in the line on.
    Insert(usize),
}

/// Counts the top-level tuples of `VALUES (...),(...);`, across pieces of a line and across
/// lines (MariaDB's mysqldump writes a tuple a line), up to the `;` that ends the statement.
///
/// What counts: a backslash escapes the byte after it; an unescaped `'` opens or closes a
/// string; outside strings `(` opens a tuple (a row if it is not inside another) and `)` closes
/// one, and a `;` outside all of them ends the statement. Most of a dump is in strings and
/// numbers, so 64 bytes at a time are turned into bit masks of those five bytes, strings and
/// escapes resolved with bit arithmetic (as simdjson does for JSON), and only the parentheses
/// and semicolons outside strings are looked at one by one: a few per row.
#[derive(Default)]
struct TupleCounter {
    depth: u32,
    in_string: bool,
    /// The next byte is escaped (the last one was an escaping backslash).
    escape_next: bool,
    ended: bool,
}

/// Bit masks of a 64-byte block: backslashes, quotes, `(`, `)`, `;`.
#[cfg(target_arch = "x86_64")]
fn special_bytes(block: &[u8; 64]) -> [u64; 5] {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
    };
    let mut masks = [0u64; 5];
    for lane in 0..4 {
        // SAFETY: SSE2 is part of the x86_64 baseline; the load reads 16 bytes at 16 * lane,
        // inside the 64-byte block, and needs no alignment.
        let bytes = unsafe { _mm_loadu_si128(block.as_ptr().add(16 * lane).cast::<__m128i>()) };
        for (mask, byte) in masks.iter_mut().zip([b'\\', b'\'', b'(', b')', b';']) {
            // SAFETY: SSE2 (as above), on values in registers.
            let bits =
                unsafe { _mm_movemask_epi8(_mm_cmpeq_epi8(bytes, _mm_set1_epi8(byte as i8))) };
            *mask |= u64::from(bits as u16) << (16 * lane);
        }
    }
    masks
}

/// [`special_bytes`] with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn special_bytes_avx2(block: &[u8; 64]) -> [u64; 5] {
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8, _mm256_set1_epi8,
    };
    let mut masks = [0u64; 5];
    for half in 0..2 {
        // SAFETY: the load reads 32 bytes at 32 * half, inside the 64-byte block, and needs no
        // alignment.
        let bytes = unsafe { _mm256_loadu_si256(block.as_ptr().add(32 * half).cast::<__m256i>()) };
        for (mask, byte) in masks.iter_mut().zip([b'\\', b'\'', b'(', b')', b';']) {
            let bits = _mm256_movemask_epi8(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi8(byte as i8)));
            *mask |= u64::from(bits as u32) << (32 * half);
        }
    }
    masks
}

#[cfg(not(target_arch = "x86_64"))]
fn special_bytes(block: &[u8; 64]) -> [u64; 5] {
    let mut masks = [0u64; 5];
    for (i, &b) in block.iter().enumerate() {
        let k = match b {
            b'\\' => 0,
            b'\'' => 1,
            b'(' => 2,
            b')' => 3,
            b';' => 4,
            _ => continue,
        };
        masks[k] |= 1 << i;
    }
    masks
}

/// Each bit set, and every bit above it up to the next one set, toggled: which bytes are
/// between an odd number of quotes.
fn prefix_xor(mut bits: u64) -> u64 {
    for shift in [1, 2, 4, 8, 16, 32] {
        bits ^= bits << shift;
    }
    bits
}

impl TupleCounter {
    /// Counts the tuples that start in `bytes`; stops after the `;` that ends the statement,
    /// returning where (or `bytes.len()`).
    fn feed(&mut self, bytes: &[u8]) -> (u64, usize) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: this CPU has AVX2.
            return unsafe { self.feed_avx2(bytes) };
        }
        self.feed_with(bytes, special_bytes)
    }

    /// [`TupleCounter::feed`] with masks made 32 bytes at a time: a third less time than 16.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn feed_avx2(&mut self, bytes: &[u8]) -> (u64, usize) {
        self.feed_with(bytes, |block| special_bytes_avx2(block))
    }

    #[inline(always)]
    fn feed_with(&mut self, bytes: &[u8], masks: impl Fn(&[u8; 64]) -> [u64; 5]) -> (u64, usize) {
        if self.ended {
            return (0, 0);
        }
        let mut rows = 0;
        let mut blocks = bytes.chunks_exact(64);
        for (n, block) in blocks.by_ref().enumerate() {
            let block: &[u8; 64] = block.try_into().expect("64 bytes");
            if let Some(end) = self.block(masks(block), block, &mut rows) {
                return (rows, 64 * n + end + 1);
            }
        }
        let at = bytes.len() - blocks.remainder().len();
        for (i, &byte) in blocks.remainder().iter().enumerate() {
            if self.byte(byte, &mut rows) {
                return (rows, at + i + 1);
            }
        }
        (rows, bytes.len())
    }

    /// One byte; whether it ended the statement.
    fn byte(&mut self, byte: u8, rows: &mut u64) -> bool {
        if self.escape_next {
            self.escape_next = false;
            return false;
        }
        match byte {
            b'\\' => self.escape_next = true,
            b'\'' => self.in_string = !self.in_string,
            _ if self.in_string => {}
            b'(' => self.open(rows),
            b')' => self.depth = self.depth.saturating_sub(1),
            b';' if self.depth == 0 => {
                self.ended = true;
                return true;
            }
            _ => {}
        }
        false
    }

    fn open(&mut self, rows: &mut u64) {
        *rows += u64::from(self.depth == 0);
        self.depth += 1;
    }

    /// 64 bytes at once, as [`TupleCounter::byte`] would take them one by one; where the
    /// statement ended in them, if it did.
    #[inline(always)]
    fn block(&mut self, masks: [u64; 5], block: &[u8; 64], rows: &mut u64) -> Option<usize> {
        let [backslash, quote, open, close, semicolon] = masks;
        let escaped = self.escaped(backslash);
        let quote = quote & !escaped;
        let carried = if self.in_string { !0 } else { 0 };
        // A string's opening quote is inside it, its closing quote outside.
        let in_string = prefix_xor(quote) ^ carried;
        self.in_string = in_string >> 63 == 1;
        let mut events = (open | close | semicolon) & !in_string & !escaped;
        while events != 0 {
            let at = events.trailing_zeros() as usize;
            match block[at] {
                b'(' => self.open(rows),
                b')' => self.depth = self.depth.saturating_sub(1),
                _ if self.depth == 0 => {
                    self.ended = true;
                    return Some(at);
                }
                _ => {}
            }
            events &= events - 1;
        }
        None
    }

    /// The bytes of a block that a backslash escapes, given its backslashes: in a run of
    /// backslashes every other one escapes the next byte (simdjson's `json_escape_scanner`).
    #[inline(always)]
    fn escaped(&mut self, backslash: u64) -> u64 {
        const ODD_BITS: u64 = 0xAAAA_AAAA_AAAA_AAAA;
        let first = u64::from(self.escape_next);
        if backslash == 0 {
            self.escape_next = false;
            return first;
        }
        let potential_escape = backslash & !first;
        let maybe_escaped = potential_escape << 1;
        let escape_and_terminal_code =
            ((maybe_escaped | ODD_BITS).wrapping_sub(potential_escape)) ^ ODD_BITS;
        let escaped = escape_and_terminal_code ^ (backslash | first);
        let escape = escape_and_terminal_code & backslash;
        self.escape_next = escape >> 63 == 1;
        escaped
    }
}

/// Reads the table of contents of a stream fed to it block by block ([`TocReader::feed`]).
pub struct TocReader(Reader);

enum Reader {
    Text(TextToc),
    Custom(custom::CustomToc),
}

impl TocReader {
    /// A reader for a dump of `kind`; `None` for kinds without a table of contents.
    pub fn for_dump(kind: DumpKind) -> Option<TocReader> {
        Some(TocReader(match kind {
            DumpKind::PostgresPlain => Reader::Text(TextToc::new(Dialect::Postgres)),
            DumpKind::MySql => Reader::Text(TextToc::new(Dialect::MySql)),
            DumpKind::PostgresCustom => Reader::Custom(custom::CustomToc::default()),
            _ => return None,
        }))
    }

    /// The next block of the stream.
    pub fn feed(&mut self, block: &[u8]) {
        match &mut self.0 {
            Reader::Text(toc) => toc.feed(block),
            Reader::Custom(toc) => toc.feed(block),
        }
    }

    /// Where sections started since the last call (stream offsets, ascending; never 0): a
    /// backup ends a chunk at each, so that a section is made of whole chunks.
    pub fn take_starts(&mut self) -> Vec<u64> {
        match &mut self.0 {
            Reader::Text(toc) => std::mem::take(&mut toc.starts),
            Reader::Custom(toc) => toc.take_starts(),
        }
    }

    /// The sections, once the whole stream is fed (a last line without a newline may start
    /// one: [`TocReader::take_starts`] says so after this).
    pub fn finish(&mut self) -> Vec<Section> {
        match &mut self.0 {
            Reader::Text(toc) => toc.finish(),
            Reader::Custom(toc) => toc.finish(),
        }
    }
}

/// The sections of a `kind` stream fed in blocks of `block` bytes, and the section starts told
/// along the way; `None` for kinds without a table of contents. (Tests and fuzzing: a backup
/// feeds the blocks it reads.)
#[doc(hidden)]
pub fn read_in_blocks(
    kind: DumpKind,
    stream: &[u8],
    block: usize,
) -> Option<(Vec<Section>, Vec<u64>)> {
    let mut reader = TocReader::for_dump(kind)?;
    let mut starts = Vec::new();
    for piece in stream.chunks(block.max(1)) {
        reader.feed(piece);
        starts.extend(reader.take_starts());
    }
    let sections = reader.finish();
    starts.extend(reader.take_starts());
    Some((sections, starts))
}

/// The table of contents of a text dump (pg_dump plain, mysqldump), line by line.
struct TextToc {
    dialect: Dialect,
    /// Stream offset of the next byte fed.
    at: u64,
    sections: Vec<Section>,
    open: Section,
    /// Where sections started since [`TocReader::take_starts`] was last called.
    starts: Vec<u64>,
    /// The current line: where it starts and its first bytes.
    line_start: u64,
    head: Vec<u8>,
    /// What the line is, once its head is complete.
    line: Option<LineKind>,
    in_copy: bool,
    /// Inside an INSERT statement: its lines are its values, not markers.
    in_insert: bool,
    tuples: TupleCounter,
    /// mysqldump of several databases: the one being dumped.
    database: Option<String>,
}

impl TextToc {
    fn new(dialect: Dialect) -> TextToc {
        TextToc {
            dialect,
            at: 0,
            sections: Vec::new(),
            open: section("PREAMBLE", String::new(), None, 0),
            starts: Vec::new(),
            line_start: 0,
            head: Vec::with_capacity(HEAD_MAX),
            line: None,
            in_copy: false,
            in_insert: false,
            tuples: TupleCounter::default(),
            database: None,
        }
    }

    fn feed(&mut self, block: &[u8]) {
        let mut i = 0;
        while i < block.len() {
            if self.in_insert && self.head.is_empty() {
                // The statement's values, through the end of the line that ends it (which may
                // come in a later block than the `;`).
                let used = if self.tuples.ended {
                    memchr(b'\n', &block[i..]).map_or(block.len() - i, |n| n + 1)
                } else {
                    let (rows, used) = self.tuples.feed(&block[i..]);
                    self.open.rows += rows;
                    match self.tuples.ended {
                        true => memchr(b'\n', &block[i + used..])
                            .map_or(block.len() - i, |n| used + n + 1),
                        false => used,
                    }
                };
                i += used;
                self.at += used as u64;
                if block[i - 1] == b'\n' {
                    self.end_line();
                } else {
                    // A line goes on in the next block: its head is past.
                    self.line = Some(LineKind::Insert(0));
                }
                continue;
            }
            if self.in_copy && self.head.is_empty() {
                // Rows, a line each, up to `\.`: counted without looking at them one by one.
                let (rows, used) = copy_rows(&block[i..]);
                i += used;
                self.at += used as u64;
                self.line_start = self.at;
                self.open.rows += rows;
                if i == block.len() {
                    break;
                }
            }
            let end = memchr(b'\n', &block[i..]).map_or(block.len(), |n| i + n + 1);
            let piece = &block[i..end];
            let ends_line = block[end - 1] == b'\n';
            if self.line.is_none() {
                let take = piece.len().min(HEAD_MAX - self.head.len());
                self.head.extend_from_slice(&piece[..take]);
                if ends_line || self.head.len() == HEAD_MAX {
                    self.head_complete();
                    if take < piece.len() {
                        self.count_rest(&piece[take..]);
                    }
                }
            } else {
                self.count_rest(piece);
            }
            self.at += piece.len() as u64;
            i = end;
            if ends_line {
                self.end_line();
            }
        }
    }

    fn finish(&mut self) -> Vec<Section> {
        if self.line.is_none() && !self.head.is_empty() {
            self.head_complete();
        }
        self.close(self.at);
        std::mem::take(&mut self.sections)
    }

    /// The current line's head is known: what it is, the section it starts if any, its rows
    /// so far.
    fn head_complete(&mut self) {
        let head = std::mem::take(&mut self.head);
        let kind = self.classify_line(trim_newline(&head));
        self.head = head;
        self.line = Some(kind);
        match kind {
            LineKind::Row => self.open.rows += 1,
            LineKind::Insert(from) => {
                let (rows, _) = self.tuples.feed(&self.head[from.min(self.head.len())..]);
                self.open.rows += rows;
            }
            LineKind::Other => {}
        }
    }

    /// Counts rows in the rest of a line, past its head.
    fn count_rest(&mut self, bytes: &[u8]) {
        if let Some(LineKind::Insert(_)) = self.line {
            self.open.rows += self.tuples.feed(bytes).0;
        }
    }

    fn end_line(&mut self) {
        self.line = None;
        self.line_start = self.at;
        self.head.clear();
        if self.tuples.ended {
            self.in_insert = false;
            self.tuples = TupleCounter::default();
        }
    }

    /// Tells what a line (its head) is, starting a section if it names one.
    fn classify_line(&mut self, line: &[u8]) -> LineKind {
        if self.in_insert {
            return LineKind::Insert(0);
        }
        if self.in_copy {
            if line == b"\\." {
                self.in_copy = false;
                return LineKind::Other;
            }
            return LineKind::Row;
        }
        let Some((kind, name, table)) = self.marker(line) else {
            return match self.dialect {
                // (pg_dump writes table data as `COPY ... FROM stdin;`, which may be longer
                // than a head.)
                Dialect::Postgres if line.starts_with(b"COPY ") => {
                    self.in_copy = self.open.kind == "TABLE DATA";
                    LineKind::Other
                }
                Dialect::Postgres => {
                    let kind = &*self.open.kind;
                    // (A sequence's own `ALTER TABLE s OWNER TO ...` names no table; an
                    // identity column's `ALTER TABLE t ALTER COLUMN c ADD GENERATED` does.)
                    let names_table = kind != "SEQUENCE"
                        || memchr::memmem::find(line, b" ADD GENERATED ").is_some();
                    if self.open.table.is_none()
                        && BELONGS_TO_A_TABLE.contains(&kind)
                        && names_table
                    {
                        self.open.table = statement_table(line);
                    }
                    LineKind::Other
                }
                Dialect::MySql if line.starts_with(b"INSERT INTO ") => {
                    self.in_insert = true;
                    let from = memchr::memmem::find(line, b" VALUES").unwrap_or(line.len());
                    LineKind::Insert(from)
                }
                Dialect::MySql => LineKind::Other,
            };
        };
        self.close(self.line_start);
        if self.line_start > 0 {
            self.starts.push(self.line_start);
        }
        self.open = section(&kind, name, table, self.line_start);
        LineKind::Other
    }

    fn close(&mut self, end: u64) {
        let mut done = std::mem::replace(&mut self.open, section("", String::new(), None, end));
        done.end = end;
        // An empty preamble (a dump that starts with a marker) is not worth a section.
        if !(done.kind == "PREAMBLE" && done.start == done.end) {
            self.sections.push(done);
        }
    }
    /// The section a line starts: (kind, name, table).
    fn marker(&mut self, line: &[u8]) -> Option<(String, String, Option<String>)> {
        let line = std::str::from_utf8(line).ok()?;
        match self.dialect {
            Dialect::Postgres => {
                if line == "-- PostgreSQL database dump complete" {
                    return Some(("TRAILER".into(), String::new(), None));
                }
                let rest = line
                    .strip_prefix("-- Name: ")
                    .or_else(|| line.strip_prefix("-- Data for Name: "))?;
                let (name, rest) = rest.split_once("; Type: ")?;
                let (kind, rest) = rest.split_once("; Schema: ")?;
                let schema = rest.split_once("; Owner: ").map_or(rest, |(s, _)| s);
                let qualified = match schema {
                    "-" | "" => name.to_string(),
                    schema => format!("{schema}.{name}"),
                };
                let table = match kind {
                    "TABLE DATA" => Some(qualified.clone()),
                    _ => None,
                };
                Some((kind.to_string(), qualified, table))
            }
            Dialect::MySql => {
                if line.starts_with("/*!40103 SET TIME_ZONE=@OLD_TIME_ZONE") {
                    return Some(("TRAILER".into(), String::new(), None));
                }
                if let Some(rest) = line.strip_prefix("-- Current Database: ") {
                    let db = unquote_backticks(rest.trim());
                    self.database = Some(db.clone());
                    return Some(("DATABASE".into(), db, None));
                }
                const MARKERS: [(&str, &str); 6] = [
                    ("-- Table structure for table ", "TABLE"),
                    ("-- Dumping data for table ", "TABLE DATA"),
                    ("-- Temporary view structure for view ", "VIEW"),
                    ("-- Temporary table structure for view ", "VIEW"),
                    ("-- Final view structure for view ", "VIEW"),
                    ("-- Dumping routines for database ", "ROUTINES"),
                ];
                let (rest, kind) = MARKERS
                    .iter()
                    .find_map(|(prefix, kind)| Some((line.strip_prefix(prefix)?, *kind)))
                    .or_else(|| {
                        Some((
                            line.strip_prefix("-- Dumping events for database ")?,
                            "EVENTS",
                        ))
                    })?;
                let name = unquote_backticks(rest.trim().trim_matches('\''));
                let name = match &self.database {
                    Some(db) if !matches!(kind, "ROUTINES" | "EVENTS") => format!("{db}.{name}"),
                    _ => name,
                };
                let table = (kind == "TABLE DATA").then(|| name.clone());
                Some((kind.to_string(), name, table))
            }
        }
    }
}

fn section(kind: &str, name: String, table: Option<String>, start: u64) -> Section {
    Section {
        kind: kind.to_string(),
        name,
        table,
        start,
        end: start,
        rows: 0,
    }
}

/// The rows at the start of `bytes` (COPY data, from a line's start): (rows, bytes they take),
/// up to the `\.` line that ends the data or to the last complete line.
fn copy_rows(bytes: &[u8]) -> (u64, usize) {
    let until =
        end_of_copy(bytes).unwrap_or_else(|| memchr::memrchr(b'\n', bytes).map_or(0, |n| n + 1));
    let rows = bytecount::count(&bytes[..until], b'\n');
    (rows as u64, until)
}

/// Where the line `\.` (or a line that may turn out to be it) starts in `bytes`. A row cannot
/// start with `\.`: COPY's text format writes a backslash in data as `\\`.
fn end_of_copy(bytes: &[u8]) -> Option<usize> {
    memchr::memmem::find_iter(bytes, b"\\.").find(|&at| {
        let rest = &bytes[at + 2..];
        (at == 0 || bytes[at - 1] == b'\n')
            && (rest.is_empty() || rest[0] == b'\n' || rest.starts_with(b"\r"))
    })
}

fn trim_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `` `a``b` `` -> ``a`b``; a name without backticks as it is.
fn unquote_backticks(text: &str) -> String {
    match text.strip_prefix('`').and_then(|t| t.strip_suffix('`')) {
        Some(inner) => inner.replace("``", "`"),
        None => text.to_string(),
    }
}

/// The table a pg_dump statement applies to: `ALTER TABLE [ONLY] T ...`, `CREATE [UNIQUE] INDEX
/// I ON [ONLY] T ...`, `CREATE TRIGGER ... ON T ...`; unquoted and schema-qualified as written.
fn statement_table(line: &[u8]) -> Option<String> {
    let line = std::str::from_utf8(line).ok()?;
    if line.starts_with("ALTER SEQUENCE ") {
        // `ALTER SEQUENCE s OWNED BY t.column;`
        let at = line.find(" OWNED BY ")?;
        let mut parts = identifier_parts(&line[at + 10..])?;
        parts.pop();
        return (!parts.is_empty()).then(|| parts.join("."));
    }
    let rest = if let Some(rest) = line.strip_prefix("ALTER TABLE ") {
        rest
    } else if line.starts_with("CREATE INDEX ")
        || line.starts_with("CREATE UNIQUE INDEX ")
        || line.starts_with("CREATE TRIGGER ")
        || line.starts_with("CREATE CONSTRAINT TRIGGER ")
        || line.starts_with("CREATE POLICY ")
    {
        let at = line.find(" ON ")?;
        &line[at + 4..]
    } else {
        return None;
    };
    let rest = rest.strip_prefix("ONLY ").unwrap_or(rest);
    qualified_identifier(rest)
}

/// The SQL identifier (`a.b`, `"A b"."c""d"`) at the start of `text`, unquoted.
fn qualified_identifier(text: &str) -> Option<String> {
    identifier_parts(text).map(|parts| parts.join("."))
}

/// The parts of the SQL identifier at the start of `text`, unquoted.
pub(crate) fn identifier_parts(text: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' || c == ' ' || c == '(' || c == ';' {
                    break;
                }
                part.push(c);
                chars.next();
            }
        }
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        if chars.peek() != Some(&'.') {
            break;
        }
        chars.next();
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sections of `dump` fed in blocks of `block` bytes, and the starts it told of.
    fn read(kind: DumpKind, dump: &[u8], block: usize) -> (Vec<Section>, Vec<u64>) {
        read_in_blocks(kind, dump, block).unwrap()
    }

    /// The sections are the same however the stream is cut into blocks, they cover the
    /// stream, and the reader told of every start but the stream's.
    fn read_every_way(kind: DumpKind, dump: &[u8]) -> Vec<Section> {
        let (whole, starts) = read(kind, dump, dump.len().max(1));
        for block in [1, 2, 3, 7, 64, 1000, 1024, 1025, 4096] {
            assert_eq!(
                read(kind, dump, block),
                (whole.clone(), starts.clone()),
                "blocks of {block}"
            );
        }
        let mut at = 0;
        for s in &whole {
            assert_eq!(s.start, at, "{s:?}");
            at = s.end;
        }
        assert_eq!(at, dump.len() as u64);
        let told: Vec<u64> = whole.iter().map(|s| s.start).filter(|&s| s > 0).collect();
        assert_eq!(starts, told);
        whole
    }

    fn find<'a>(sections: &'a [Section], kind: &str, name: &str) -> &'a Section {
        sections
            .iter()
            .find(|s| s.kind == kind && s.name == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in {sections:#?}"))
    }

    const PG: &str = r#"--
-- PostgreSQL database dump
--

\restrict abc

SET statement_timeout = 0;

--
-- Name: orders; Type: TABLE; Schema: public; Owner: postgres
--

CREATE TABLE public.orders (
    id integer NOT NULL,
    note text
);

--
-- Name: Wéird "T"; Type: TABLE; Schema: sales.eu; Owner: postgres
--

CREATE TABLE "sales.eu"."Wéird ""T""" (x int);

--
-- Data for Name: orders; Type: TABLE DATA; Schema: public; Owner: postgres
--

COPY public.orders (id, note) FROM stdin;
1	-- Name: evil; Type: TABLE; Schema: public; Owner: x
2	\\.not the end
3	DROP TABLE orders;
\.

--
-- Data for Name: Wéird "T"; Type: TABLE DATA; Schema: sales.eu; Owner: postgres
--

COPY "sales.eu"."Wéird ""T""" (x) FROM stdin;
\.

--
-- Name: orders_note_idx; Type: INDEX; Schema: public; Owner: postgres
--

CREATE INDEX orders_note_idx ON public.orders USING btree (note);

--
-- Name: Wéird "T" t_fk; Type: FK CONSTRAINT; Schema: sales.eu; Owner: postgres
--

ALTER TABLE ONLY "sales.eu"."Wéird ""T"""
    ADD CONSTRAINT t_fk FOREIGN KEY (x) REFERENCES public.orders(id);

--
-- PostgreSQL database dump complete
--

\unrestrict abc

"#;

    #[test]
    fn a_pg_dump_is_cut_into_its_table_of_contents() {
        let sections = read_every_way(DumpKind::PostgresPlain, PG.as_bytes());
        let kinds: Vec<(&str, &str)> = sections
            .iter()
            .map(|s| (s.kind.as_str(), s.name.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("PREAMBLE", ""),
                ("TABLE", "public.orders"),
                ("TABLE", "sales.eu.Wéird \"T\""),
                ("TABLE DATA", "public.orders"),
                ("TABLE DATA", "sales.eu.Wéird \"T\""),
                ("INDEX", "public.orders_note_idx"),
                ("FK CONSTRAINT", "sales.eu.Wéird \"T\" t_fk"),
                ("TRAILER", ""),
            ]
        );
        // Rows that look like SQL or like markers are rows; `\.` ends the data only alone.
        let data = find(&sections, "TABLE DATA", "public.orders");
        assert_eq!(data.rows, 3);
        assert_eq!(data.table.as_deref(), Some("public.orders"));
        assert_eq!(
            find(&sections, "TABLE DATA", "sales.eu.Wéird \"T\"").rows,
            0
        );
        assert_eq!(
            find(&sections, "INDEX", "public.orders_note_idx")
                .table
                .as_deref(),
            Some("public.orders")
        );
        assert_eq!(
            find(&sections, "FK CONSTRAINT", "sales.eu.Wéird \"T\" t_fk")
                .table
                .as_deref(),
            Some("sales.eu.Wéird \"T\"")
        );
        // A section starts at the line that names it.
        let table = find(&sections, "TABLE", "public.orders");
        assert!(PG[table.start as usize..].starts_with("-- Name: orders;"));
    }

    #[test]
    fn a_dump_cut_off_in_a_table_ends_with_that_table() {
        let cut = &PG[..PG.find("3\tDROP").unwrap() + 4];
        let sections = read_every_way(DumpKind::PostgresPlain, cut.as_bytes());
        let last = sections.last().unwrap();
        assert_eq!((last.kind.as_str(), last.rows), ("TABLE DATA", 3));
        assert_eq!(last.end, cut.len() as u64);
    }

    const MYSQL: &str = r#"/*M!999999\- enable the sandbox mode */ 
-- MariaDB dump 10.19  Distrib 10.11.6-MariaDB, for debian-linux-gnu (x86_64)
--
-- Host: localhost    Database: shop
-- ------------------------------------------------------
/*!40101 SET @OLD_CHARACTER_SET_CLIENT=@@CHARACTER_SET_CLIENT */;

--
-- Table structure for table `cus``tomers`
--

DROP TABLE IF EXISTS `cus``tomers`;
CREATE TABLE `cus``tomers` (
  `id` int(11) NOT NULL,
  `note` text DEFAULT NULL
);

--
-- Dumping data for table `cus``tomers`
--

LOCK TABLES `cus``tomers` WRITE;
INSERT INTO `cus``tomers` VALUES (1,'a (b), c'),(2,'it\'s (x'),(3,'Zürich ✓ ''q'' -- Dumping data for table `x`'),(4,NULL);
INSERT INTO `cus``tomers` VALUES (5,'))),((');
INSERT INTO `cus``tomers` VALUES
(6,'a tuple a line, as MariaDB writes them'),
(7,'-- Table structure for table `no`'),
(8,'x;y');
UNLOCK TABLES;

--
-- Table structure for table `empty`
--

CREATE TABLE `empty` (`id` int);

--
-- Dumping data for table `empty`
--

LOCK TABLES `empty` WRITE;
UNLOCK TABLES;
/*!40103 SET TIME_ZONE=@OLD_TIME_ZONE */;

-- Dump completed on 2026-12-06 20:00:00
"#;

    #[test]
    fn a_mysqldump_is_cut_at_its_tables_and_counts_value_tuples() {
        let sections = read_every_way(DumpKind::MySql, MYSQL.as_bytes());
        let kinds: Vec<(&str, &str, u64)> = sections
            .iter()
            .map(|s| (s.kind.as_str(), s.name.as_str(), s.rows))
            .collect();
        assert_eq!(
            kinds,
            [
                ("PREAMBLE", "", 0),
                ("TABLE", "cus`tomers", 0),
                ("TABLE DATA", "cus`tomers", 8),
                ("TABLE", "empty", 0),
                ("TABLE DATA", "empty", 0),
                ("TRAILER", "", 0),
            ]
        );
    }

    #[test]
    fn an_insert_longer_than_a_head_is_counted_whole() {
        let mut dump = String::from(
            "-- MySQL dump 10.13\n--\n-- Dumping data for table `t`\n--\n\nINSERT INTO `t` VALUES ",
        );
        let tuples: Vec<String> = (0..5000)
            .map(|n| format!("({n},'{}')", "x(".repeat(n % 7)))
            .collect();
        dump.push_str(&tuples.join(","));
        dump.push_str(";\n");
        let sections = read_every_way(DumpKind::MySql, dump.as_bytes());
        assert_eq!(find(&sections, "TABLE DATA", "t").rows, 5000);
    }

    /// The 64-bytes-at-a-time count agrees with the byte-at-a-time one, wherever the input is
    /// split, on inputs made of the bytes that matter.
    #[test]
    fn tuples_counted_by_blocks_are_those_counted_byte_by_byte() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"\\\\\\''''(()),;;xx 0";
        for round in 0..3000 {
            let len = (next() % 400) as usize;
            // Mostly plain text, with runs of the bytes that matter.
            let input: Vec<u8> = (0..len)
                .map(|_| match next() % 4 {
                    0 => b'a',
                    _ => alphabet[(next() % alphabet.len() as u64) as usize],
                })
                .collect();
            let mut by_byte = TupleCounter::default();
            let (mut rows, mut used) = (0, input.len());
            for (i, &b) in input.iter().enumerate() {
                if by_byte.byte(b, &mut rows) {
                    used = i + 1;
                    break;
                }
            }
            let split = (next() % (len as u64 + 1)) as usize;
            let mut by_block = TupleCounter::default();
            // This CPU's way, and the one every x86_64 has.
            let (first, used_first) = by_block.feed(&input[..split]);
            let (second, used_second) = if round % 2 == 0 {
                by_block.feed(&input[split..])
            } else {
                by_block.feed_with(&input[split..], special_bytes)
            };
            let used_blocks = match used_first < split {
                true => used_first,
                false => split + used_second,
            };
            assert_eq!(
                (first + second, used_blocks, by_block.ended),
                (rows, used, by_byte.ended),
                "round {round}: {:?} split at {split}",
                String::from_utf8_lossy(&input)
            );
            if !by_byte.ended {
                assert_eq!(
                    (by_block.depth, by_block.in_string, by_block.escape_next),
                    (by_byte.depth, by_byte.in_string, by_byte.escape_next),
                    "round {round}"
                );
            }
        }
    }

    #[test]
    fn several_databases_qualify_their_tables() {
        let dump = "-- MySQL dump 10.13\n--\n-- Current Database: `a`\n--\n\nUSE `a`;\n\n--\n-- Table structure for table `t`\n--\n\nCREATE TABLE `t` (x int);\n--\n-- Current Database: `b`\n--\n\n--\n-- Dumping data for table `t`\n--\n\nINSERT INTO `t` VALUES (1);\n";
        let sections = read_every_way(DumpKind::MySql, dump.as_bytes());
        assert_eq!(find(&sections, "TABLE", "a.t").rows, 0);
        assert_eq!(find(&sections, "TABLE DATA", "b.t").rows, 1);
    }

    #[test]
    fn streams_of_other_kinds_have_no_table_of_contents() {
        assert!(TocReader::for_dump(DumpKind::Unknown).is_none());
    }
}
