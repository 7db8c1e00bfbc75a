//! A deterministic generator of pg_dump-like plain SQL dumps, for tests and benchmarks.
//!
//! Day 1 is a dump of a few tables in COPY format. Day `d > 1` is the same database a day later:
//! about 1.3 % of rows updated (scattered), 0.2 % deleted, 0.5 % new rows appended per table,
//! which is the change pattern measured on a real 1 GB pg_dump pair.

use std::io::{self, Write};

/// SplitMix64: tiny, fast, and good enough to make text that compresses like real data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
    "order",
    "shipped",
    "pending",
    "refund",
    "customer",
    "premium",
    "basic",
    "express",
    "warehouse",
    "invoice",
    "paid",
    "late",
];
const CITIES: &[&str] = &[
    "Berlin", "Paris", "Lisbon", "Oslo", "Kraków", "Zürich", "Tokyo", "Austin",
];

/// Which version of a row a given day shows: 0 = deleted, otherwise a revision number.
fn row_revision(table: u64, id: u64, day: u32) -> u64 {
    let mut revision = 1;
    for d in 2..=day {
        let mut rng = Rng::new((table << 56) ^ (id << 8) ^ d as u64 ^ 0xD1CE);
        let roll = rng.below(10_000);
        if roll < 20 {
            return 0;
        }
        if roll < 150 {
            revision = d as u64;
        }
    }
    revision
}

/// Free-text columns in real databases repeat themselves (product names, statuses, templates):
/// notes come from a fixed set of phrases, which gives the ~5x zstd ratio measured on a real
/// pg_dump rather than the ~3x of independent random words.
fn phrase(n: u64) -> String {
    let mut rng = Rng::new(n ^ 0xFACE);
    let words = 3 + rng.below(10);
    (0..words)
        .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_row(out: &mut impl Write, table: u64, id: u64, revision: u64) -> io::Result<()> {
    let mut rng = Rng::new((table << 56) ^ id.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ revision);
    let first = WORDS[rng.below(WORDS.len() as u64) as usize];
    let last = WORDS[rng.below(WORDS.len() as u64) as usize];
    write!(
        out,
        "{id}\t{first} {last}\t{first}.{last}{}@example.com\t{}\t{}.{}0\t2025-11-{:02} {:02}:{:02}:00\t{}",
        id % 100,
        CITIES[rng.below(CITIES.len() as u64) as usize],
        rng.below(500),
        rng.below(10),
        1 + (id / 5000) % 28,
        rng.below(24),
        rng.below(12) * 5,
        phrase(rng.below(400)),
    )?;
    if rng.below(50) == 0 {
        out.write_all(b"\t\\N\n")
    } else {
        writeln!(out, "\t{}", revision * 7 + rng.below(100))
    }
}

const TABLES: u64 = 4;
const APPROX_ROW_LEN: u64 = 125;

/// Writes the dump of `day` (1, 2, ...) of a database whose day-1 dump is about `size` bytes.
pub fn write_dump(out: &mut impl Write, size: u64, day: u32) -> io::Result<()> {
    let rows_per_table = (size / APPROX_ROW_LEN / TABLES).max(1);
    writeln!(out, "--\n-- PostgreSQL database dump\n--\n")?;
    writeln!(
        out,
        "SET statement_timeout = 0;\nSET client_encoding = 'UTF8';\n"
    )?;
    for table in 0..TABLES {
        // pg_dump's table of contents: a comment naming each object before it.
        writeln!(
            out,
            "--\n-- Name: t{table}; Type: TABLE; Schema: public; Owner: postgres\n--\n"
        )?;
        writeln!(
            out,
            "CREATE TABLE public.t{table} (id bigint, name text, email text, city text, balance numeric, updated timestamp, note text, score integer);\n"
        )?;
        writeln!(
            out,
            "--\n-- Data for Name: t{table}; Type: TABLE DATA; Schema: public; Owner: postgres\n--\n"
        )?;
        writeln!(
            out,
            "COPY public.t{table} (id, name, email, city, balance, updated, note, score) FROM stdin;"
        )?;
        let grown = rows_per_table + rows_per_table * 5 / 1000 * (day as u64 - 1);
        for id in 1..=grown {
            let revision = row_revision(table, id, day);
            if revision != 0 {
                write_row(out, table, id, revision)?;
            }
        }
        writeln!(out, "\\.\n")?;
    }
    writeln!(out, "--\n-- PostgreSQL database dump complete\n--")
}

/// The dump as bytes (tests; the benchmark and example stream to files instead).
#[allow(dead_code)]
pub fn dump(size: u64, day: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(size as usize + size as usize / 8);
    write_dump(&mut out, size, day).expect("writing to a Vec");
    out
}
