//! Sorting more fixed-size records than memory should hold, for large repositories and large
//! dumps (docs/FORMAT.md §11.4, docs/PERFORMANCE.md "Scale").
//!
//! A repository of 100 M chunks needs 2.4 GB for the in-memory index alone, and prune, check
//! and stats must know, for every chunk a snapshot names, which frame holds it. Instead of a
//! lookup table they sort: the index's chunk records and the chunk ids the snapshots name are
//! each sorted (in runs of [`Sorter`]'s memory budget, spilled to temporary files and merged),
//! and then joined in one sequential pass ([`Table::scan`]). Memory is the budget, whatever the
//! repository holds; time grows as n log n with a small log (one merge of all runs). Backup and
//! restore look chunks up one at a time, in a sorted table too ([`Searchable`]).
//!
//! Temporary files go to `TMPDIR` (else /tmp), are created private (0600) and are unlinked as
//! soon as they are open, so nothing is left behind, even by a kill. They hold chunk-id
//! prefixes and frame numbers: what the index files hold, decrypted.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// A record of fixed size; records sort and compare as their `Ord` says.
pub trait Record: Copy + Ord {
    const LEN: usize;
    fn encode(&self, out: &mut [u8]);
    fn decode(bytes: &[u8]) -> Self;
}

/// Byte strings of a fixed length (ids, id prefixes) are records as they are.
impl<const N: usize> Record for [u8; N] {
    const LEN: usize = N;
    fn encode(&self, out: &mut [u8]) {
        out.copy_from_slice(self);
    }
    fn decode(bytes: &[u8]) -> Self {
        bytes.try_into().expect("a record's length")
    }
}

/// Memory one sorter's run buffer takes unless [`set_sort_memory`] says otherwise: prune,
/// check and stats use a few at a time.
pub const DEFAULT_MEMORY: usize = 48 << 20;

static SORT_MEMORY: AtomicUsize = AtomicUsize::new(DEFAULT_MEMORY);

/// Sets the memory of each sort buffer (the CLI's `BKP_SORT_MEMORY`): more makes prune and check
/// of a large repository faster (fewer runs to merge), less keeps them smaller; 0 gives the
/// smallest buffers (1,024 records), which tests use to make small repositories spill.
pub fn set_sort_memory(bytes: usize) {
    SORT_MEMORY.store(bytes, Ordering::Relaxed);
}

/// The memory of each sort buffer ([`set_sort_memory`]).
pub fn sort_memory() -> usize {
    SORT_MEMORY.load(Ordering::Relaxed)
}
/// Runs merged at once: a file descriptor and a read buffer each.
const MAX_MERGE: usize = 128;
const IO_BUFFER: usize = 64 << 10;

fn temp_dir() -> PathBuf {
    std::env::temp_dir()
}

pub(crate) fn temp_error(e: std::io::Error) -> Error {
    Error::TempFiles {
        dir: temp_dir().display().to_string(),
        cause: e,
    }
}

/// An anonymous private file in the temporary directory (created, then unlinked at once).
pub(crate) fn anonymous_file() -> Result<File> {
    let dir = temp_dir();
    for _ in 0..16 {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| Error::Internal(format!("no randomness: {e}")))?;
        let path = dir.join(format!(".bkp-spill-{}", hex::encode(random)));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => {
                std::fs::remove_file(&path).map_err(temp_error)?;
                return Ok(file);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(temp_error(e)),
        }
    }
    Err(Error::Internal("no unused temporary file name".into()))
}

/// Sorted records in a file, read back from the start as often as needed.
pub struct Run {
    file: File,
    records: u64,
}

impl Run {
    fn write<R: Record>(records: impl Iterator<Item = Result<R>>) -> Result<Run> {
        let file = anonymous_file()?;
        let mut out = BufWriter::with_capacity(IO_BUFFER, &file);
        let mut bytes = vec![0u8; R::LEN];
        let mut count = 0u64;
        for record in records {
            record?.encode(&mut bytes);
            out.write_all(&bytes).map_err(temp_error)?;
            count += 1;
        }
        out.flush().map_err(temp_error)?;
        drop(out);
        Ok(Run {
            file,
            records: count,
        })
    }

    fn reader<R: Record>(&self) -> RunReader<'_, R> {
        RunReader {
            file: &self.file,
            at: 0,
            end: self.records * R::LEN as u64,
            buffer: Vec::new(),
            pos: 0,
            _record: std::marker::PhantomData,
        }
    }
}

/// Reads a run by position (`pread`), so several readers can share its file.
struct RunReader<'a, R> {
    file: &'a File,
    at: u64,
    end: u64,
    buffer: Vec<u8>,
    pos: usize,
    _record: std::marker::PhantomData<R>,
}

impl<R: Record> Iterator for RunReader<'_, R> {
    type Item = Result<R>;

    fn next(&mut self) -> Option<Result<R>> {
        if self.pos + R::LEN > self.buffer.len() {
            if self.at >= self.end {
                return None;
            }
            let want = ((IO_BUFFER / R::LEN) * R::LEN).min((self.end - self.at) as usize);
            self.buffer.resize(want, 0);
            if let Err(e) = self.file.read_exact_at(&mut self.buffer, self.at) {
                self.at = self.end;
                return Some(Err(temp_error(e)));
            }
            self.at += want as u64;
            self.pos = 0;
        }
        let record = R::decode(&self.buffer[self.pos..self.pos + R::LEN]);
        self.pos += R::LEN;
        Some(Ok(record))
    }
}

/// Collects records and yields them sorted ([`Sorter::finish`]), optionally without repeats.
pub struct Sorter<R: Record> {
    buffer: Vec<R>,
    /// Records per run.
    capacity: usize,
    runs: Vec<Run>,
    dedup: bool,
}

impl<R: Record> Sorter<R> {
    /// A sorter whose buffer takes at most `memory` bytes; `dedup` drops equal records.
    pub fn new(memory: usize, dedup: bool) -> Sorter<R> {
        Sorter {
            buffer: Vec::new(),
            capacity: (memory / std::mem::size_of::<R>().max(1)).max(1024),
            runs: Vec::new(),
            dedup,
        }
    }

    pub fn push(&mut self, record: R) -> Result<()> {
        self.buffer.push(record);
        if self.buffer.len() >= self.capacity {
            self.spill()?;
        }
        Ok(())
    }

    fn sort_buffer(&mut self) {
        self.buffer.sort_unstable();
        if self.dedup {
            self.buffer.dedup();
        }
    }

    fn spill(&mut self) -> Result<()> {
        self.sort_buffer();
        let run = Run::write(self.buffer.drain(..).map(Ok))?;
        self.runs.push(run);
        if self.runs.len() >= MAX_MERGE {
            // Merge them into one, so that a final merge never opens too many.
            let runs = std::mem::take(&mut self.runs);
            let merged = Run::write(merge::<R>(&runs, self.dedup))?;
            self.runs.push(merged);
        }
        Ok(())
    }

    /// All records pushed, sorted.
    pub fn finish(mut self) -> Result<Table<R>> {
        if self.runs.is_empty() {
            self.sort_buffer();
            self.buffer.shrink_to_fit();
            return Ok(Table::Memory(self.buffer));
        }
        if !self.buffer.is_empty() {
            self.spill()?;
        }
        self.buffer = Vec::new();
        if self.runs.len() == 1 {
            return Ok(Table::File(self.runs.pop().expect("one run")));
        }
        Ok(Table::Runs(self.runs, self.dedup))
    }
}

/// The runs' records in order (without repeats if `dedup`).
fn merge<'a, R: Record + 'a>(runs: &'a [Run], dedup: bool) -> impl Iterator<Item = Result<R>> + 'a {
    let mut readers: Vec<RunReader<'_, R>> = runs.iter().map(|r| r.reader()).collect();
    let mut heap = BinaryHeap::new();
    let mut failed = None;
    for (n, reader) in readers.iter_mut().enumerate() {
        match reader.next() {
            Some(Ok(record)) => heap.push(Reverse((record, n))),
            Some(Err(e)) => failed = Some(e),
            None => {}
        }
    }
    let mut last: Option<R> = None;
    std::iter::from_fn(move || {
        if let Some(e) = failed.take() {
            heap.clear();
            return Some(Err(e));
        }
        loop {
            let Reverse((record, n)) = heap.pop()?;
            match readers[n].next() {
                Some(Ok(next)) => heap.push(Reverse((next, n))),
                Some(Err(e)) => {
                    heap.clear();
                    return Some(Err(e));
                }
                None => {}
            }
            if dedup && last == Some(record) {
                continue;
            }
            last = Some(record);
            return Some(Ok(record));
        }
    })
}

/// Sorted records: in memory while they fit, else in temporary files.
pub enum Table<R: Record> {
    Memory(Vec<R>),
    File(Run),
    Runs(Vec<Run>, bool),
}

impl<R: Record> Table<R> {
    /// The records in order, from the first.
    pub fn scan<'a>(&'a self) -> Box<dyn Iterator<Item = Result<R>> + 'a>
    where
        R: 'a,
    {
        match self {
            Table::Memory(records) => Box::new(records.iter().copied().map(Ok)),
            Table::File(run) => Box::new(run.reader()),
            Table::Runs(runs, dedup) => Box::new(merge(runs, *dedup)),
        }
    }
}

/// Bytes of a table file read for one search ([`Searchable::find`]): a page.
const SEARCH_BLOCK: usize = 4096;

/// A sorted table that is searched by key (no repeated keys): in memory as it is; in a file
/// through the first record of every 4 KiB block, kept in memory (1/146 of the records of
/// 28 bytes), and one read of that block per search.
pub struct Searchable<R: Record> {
    table: Table<R>,
    fences: Vec<R>,
    len: usize,
}

impl<R: Record> Searchable<R> {
    const PER_BLOCK: usize = SEARCH_BLOCK / R::LEN;

    pub fn new(table: Table<R>) -> Result<Searchable<R>> {
        let table = match table {
            Table::Runs(runs, dedup) => Table::File(Run::write(merge::<R>(&runs, dedup))?),
            table => table,
        };
        let (fences, len) = match &table {
            Table::Memory(records) => (Vec::new(), records.len()),
            Table::File(run) => (
                run.reader::<R>()
                    .step_by(Self::PER_BLOCK)
                    .collect::<Result<Vec<R>>>()?,
                run.records as usize,
            ),
            Table::Runs(..) => unreachable!("merged above"),
        };
        Ok(Searchable { table, fences, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub(crate) fn table(&self) -> &Table<R> {
        &self.table
    }

    /// The record whose key is `key`.
    pub fn find<K: Ord>(&self, key: &K, key_of: impl Fn(&R) -> K) -> Result<Option<R>> {
        let run = match &self.table {
            Table::Memory(records) => {
                let at = records.binary_search_by(|r| key_of(r).cmp(key));
                return Ok(at.ok().map(|at| records[at]));
            }
            Table::File(run) => run,
            Table::Runs(..) => unreachable!("merged by new"),
        };
        let block = self.fences.partition_point(|f| key_of(f) <= *key);
        let Some(block) = block.checked_sub(1) else {
            return Ok(None);
        };
        let first = block * Self::PER_BLOCK;
        let count = Self::PER_BLOCK.min(self.len - first);
        let mut bytes = [0u8; SEARCH_BLOCK];
        let bytes = &mut bytes[..count * R::LEN];
        run.file
            .read_exact_at(bytes, (first * R::LEN) as u64)
            .map_err(temp_error)?;
        let record = |n: usize| R::decode(&bytes[n * R::LEN..(n + 1) * R::LEN]);
        let (mut low, mut high) = (0, count);
        while low < high {
            let middle = (low + high) / 2;
            let found = record(middle);
            match key_of(&found).cmp(key) {
                std::cmp::Ordering::Less => low = middle + 1,
                std::cmp::Ordering::Greater => high = middle,
                std::cmp::Ordering::Equal => return Ok(Some(found)),
            }
        }
        Ok(None)
    }
}

/// A writer of records already in order (a table derived from another in one pass).
pub struct TableWriter<R: Record> {
    memory: Vec<R>,
    limit: usize,
    file: Option<(BufWriter<File>, u64)>,
    /// One record's bytes, reused.
    scratch: Vec<u8>,
}

impl<R: Record> TableWriter<R> {
    pub fn new(memory: usize) -> TableWriter<R> {
        TableWriter {
            memory: Vec::new(),
            limit: (memory / std::mem::size_of::<R>().max(1)).max(1024),
            file: None,
            scratch: vec![0u8; R::LEN],
        }
    }

    /// Appends `record`, which must not sort before the last one.
    pub fn push(&mut self, record: R) -> Result<()> {
        debug_assert!(self.memory.last().is_none_or(|last| *last <= record));
        if let Some((out, count)) = &mut self.file {
            record.encode(&mut self.scratch);
            out.write_all(&self.scratch).map_err(temp_error)?;
            *count += 1;
            return Ok(());
        }
        self.memory.push(record);
        if self.memory.len() >= self.limit {
            let mut out = BufWriter::with_capacity(IO_BUFFER, anonymous_file()?);
            for r in self.memory.drain(..) {
                r.encode(&mut self.scratch);
                out.write_all(&self.scratch).map_err(temp_error)?;
            }
            self.file = Some((out, self.limit as u64));
            self.memory = Vec::new();
        }
        Ok(())
    }

    pub fn finish(self) -> Result<Table<R>> {
        match self.file {
            None => Ok(Table::Memory(self.memory)),
            Some((out, records)) => {
                let file = out.into_inner().map_err(|e| temp_error(e.into_error()))?;
                Ok(Table::File(Run { file, records }))
            }
        }
    }
}

/// Joins two ascending streams on a key: for each of `queries`, the first record of `table`
/// with that key, or `None`. `table` must hold at most one record per key.
pub fn join<Q, R: Copy, K: Ord>(
    queries: impl Iterator<Item = Result<Q>>,
    mut table: impl Iterator<Item = Result<R>>,
    query_key: impl Fn(&Q) -> K,
    record_key: impl Fn(&R) -> K,
    mut found: impl FnMut(Q, Option<R>) -> Result<()>,
) -> Result<()> {
    let mut next = table.next().transpose()?;
    for query in queries {
        let query = query?;
        let key = query_key(&query);
        while next.as_ref().is_some_and(|r| record_key(r) < key) {
            next = table.next().transpose()?;
        }
        found(query, next.filter(|r| record_key(r) == key))?;
    }
    Ok(())
}

/// Reads a file of records written elsewhere (tests).
#[cfg(test)]
fn read_all<R: Record>(mut file: impl std::io::Read) -> Vec<R> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).unwrap();
    bytes.chunks_exact(R::LEN).map(R::decode).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Record for u64 {
        const LEN: usize = 8;
        fn encode(&self, out: &mut [u8]) {
            out.copy_from_slice(&self.to_be_bytes());
        }
        fn decode(bytes: &[u8]) -> Self {
            u64::from_be_bytes(bytes.try_into().unwrap())
        }
    }

    fn pseudo_random(n: usize, modulo: u64) -> Vec<u64> {
        (0..n as u64)
            .map(|i| {
                let h = blake3::hash(&i.to_le_bytes());
                u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap()) % modulo
            })
            .collect()
    }

    fn sorted(records: &[u64], memory: usize, dedup: bool) -> Vec<u64> {
        let mut sorter = Sorter::new(memory, dedup);
        for &r in records {
            sorter.push(r).unwrap();
        }
        let table = sorter.finish().unwrap();
        table.scan().map(|r| r.unwrap()).collect()
    }

    #[test]
    fn sorts_in_memory_in_one_run_and_across_many_runs() {
        // 1024 records a run at the smallest budget: 200,000 records make 196 runs, more than
        // MAX_MERGE, so an intermediate merge runs too.
        let records = pseudo_random(200_000, 50_000);
        let mut expected = records.clone();
        expected.sort_unstable();
        let mut unique = expected.clone();
        unique.dedup();
        for memory in [0, 64 << 10, 64 << 20] {
            assert_eq!(sorted(&records, memory, false), expected, "memory {memory}");
            assert_eq!(sorted(&records, memory, true), unique, "memory {memory}");
        }
        assert!(sorted(&[], 0, true).is_empty());
    }

    #[test]
    fn a_searchable_table_finds_every_record_and_nothing_else_in_memory_and_in_a_file() {
        let mut records = pseudo_random(20_000, u64::MAX / 2);
        records.sort_unstable();
        records.dedup();
        for memory in [0, 64 << 20] {
            let mut sorter = Sorter::new(memory, true);
            for &r in &records {
                sorter.push(r * 2).unwrap();
            }
            let table = Searchable::new(sorter.finish().unwrap()).unwrap();
            assert_eq!(table.len(), records.len());
            assert_eq!(matches!(table.table, Table::File(_)), memory == 0);
            for &r in &records {
                assert_eq!(table.find(&(r * 2), |x| *x).unwrap(), Some(r * 2));
                assert_eq!(table.find(&(r * 2 + 1), |x| *x).unwrap(), None);
            }
            assert_eq!(table.find(&0, |x| *x).unwrap(), None);
            assert_eq!(table.find(&u64::MAX, |x| *x).unwrap(), None);
        }
    }

    #[test]
    fn a_table_scans_the_same_records_every_time_and_leaves_no_file() {
        let before = std::fs::read_dir(temp_dir()).unwrap().count();
        let records = pseudo_random(10_000, u64::MAX);
        let mut sorter = Sorter::new(0, false);
        for &r in &records {
            sorter.push(r).unwrap();
        }
        let table = sorter.finish().unwrap();
        assert!(matches!(table, Table::Runs(..)));
        let first: Vec<u64> = table.scan().map(|r| r.unwrap()).collect();
        let second: Vec<u64> = table.scan().map(|r| r.unwrap()).collect();
        assert_eq!(first.len(), records.len());
        assert_eq!(first, second);
        // Other tests' files exist for an instant between creation and unlinking; a leaked
        // one stays.
        let spill_files = || {
            std::fs::read_dir(temp_dir())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(".bkp-spill-"))
                .count()
        };
        let stays = (0..50).all(|_| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            spill_files() > 0
        });
        assert!(!stays, "{before} entries before");
    }

    #[test]
    fn a_table_writer_spills_and_reads_back_in_order() {
        let mut writer = TableWriter::new(0);
        for r in 0..5_000u64 {
            writer.push(r * 3).unwrap();
        }
        let table = writer.finish().unwrap();
        assert!(matches!(table, Table::File(_)));
        let back: Vec<u64> = table.scan().map(|r| r.unwrap()).collect();
        assert_eq!(back, (0..5_000u64).map(|r| r * 3).collect::<Vec<_>>());
        if let Table::File(run) = &table {
            let mut file = &run.file;
            use std::io::Seek;
            file.rewind().unwrap();
            assert_eq!(read_all::<u64>(std::io::BufReader::new(file)).len(), 5_000);
        }
    }

    #[test]
    fn join_finds_each_query_or_none() {
        let table = [2u64, 4, 6, 8];
        let queries = [1u64, 2, 3, 8, 9];
        let mut out = Vec::new();
        join(
            queries.iter().copied().map(Ok),
            table.iter().copied().map(Ok),
            |q| *q,
            |r| *r,
            |q, hit| {
                out.push((q, hit));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            out,
            vec![(1, None), (2, Some(2)), (3, None), (8, Some(8)), (9, None)]
        );
    }
}
