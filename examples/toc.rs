//! Prints the table of contents bkp reads from a dump file, and how fast it reads it:
//! `cargo run --release --example toc -- dump.sql [pg|mysql]` (the kind is detected from the
//! first bytes unless given).
use std::io::Read;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: toc DUMP [pg|mysql]");
        std::process::exit(2);
    };
    let mut file = std::fs::File::open(path).expect("the dump opens");
    let mut block = vec![0u8; 1 << 20];
    let first = file.read(&mut block).expect("the dump reads");
    let kind = match args.get(2).map(String::as_str) {
        Some("pg") => bkp::DumpKind::PostgresPlain,
        Some("mysql") => bkp::DumpKind::MySql,
        _ => bkp::detect_dump(&block[..first]).kind,
    };
    let Some(mut reader) = bkp::toc::TocReader::for_dump(kind) else {
        eprintln!("{path}: a {} stream has no table of contents", kind.name());
        std::process::exit(1);
    };
    let started = Instant::now();
    let mut n = first;
    let mut total = 0u64;
    while n > 0 {
        reader.feed(&block[..n]);
        total += n as u64;
        n = file.read(&mut block).expect("the dump reads");
    }
    let sections = reader.finish();
    let secs = started.elapsed().as_secs_f64();
    for s in &sections {
        println!(
            "{:<16} {:<40} {:>10} rows {:>12} bytes",
            s.kind,
            s.name,
            s.rows,
            s.end - s.start
        );
    }
    eprintln!(
        "{} sections, {total} bytes in {secs:.2} s ({:.0} MB/s)",
        sections.len(),
        total as f64 / secs / 1e6
    );
}
