//! Writes a generated pg_dump-like SQL dump to stdout: the benchmark's and tests' data.
//!
//! `cargo run --release --example gen_dump -- SIZE_BYTES DAY > dump.sql`
//! (DAY 1 is the base dump; DAY 2 is the same database a day later.)

#[path = "../tests/common/dumpgen.rs"]
mod dumpgen;

use std::io::{BufWriter, Write};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let size = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000_000u64);
    let day = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1u32)
        .max(1);
    let mut out = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    dumpgen::write_dump(&mut out, size, day)?;
    out.flush()
}
