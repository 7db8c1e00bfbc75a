//! Fills an existing repository with synthetic index files and snapshots for the scale
//! benchmark (`benches/scale.py`); see `bkp::synthetic` for what is synthetic.
//!
//! `BKP_PASSWORD=... cargo run --release --example scale_fill -- LOCATION CHUNKS SNAPSHOTS [SEED]`

use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [location, chunks, snapshots, rest @ ..] = args.as_slice() else {
        return Err("usage: scale_fill LOCATION CHUNKS SNAPSHOTS [SEED]".into());
    };
    let password = std::env::var("BKP_PASSWORD").map_err(|_| "set BKP_PASSWORD")?;
    let repo = bkp::Repository::open(bkp::Store::open(location)?, password.as_bytes())?;
    let filler = bkp::synthetic::Filler {
        chunks: chunks.parse()?,
        chunks_per_index_file: 42_000,
        snapshots: snapshots.parse()?,
        series: 20,
        seed: rest.first().map_or(Ok(1), |s| s.parse())?,
    };
    let started = Instant::now();
    let mut last = Instant::now();
    bkp::synthetic::fill(&repo, &filler, &mut |what, n| {
        if last.elapsed().as_secs() >= 10 {
            eprintln!("{:>6.0} s: {n} {what}", started.elapsed().as_secs_f64());
            last = Instant::now();
        }
    })?;
    eprintln!(
        "filled in {:.1} s: {} chunks, {} snapshots",
        started.elapsed().as_secs_f64(),
        filler.chunks,
        filler.snapshots
    );
    Ok(())
}
