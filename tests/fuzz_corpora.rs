//! The fuzz targets' corpora (`fuzz/corpus/<target>/`, kept from the cargo-fuzz runs reported
//! in the notes) replayed through the decoders in every test run: each input once made a
//! decoder take a new path, and none may panic. Long runs: `scripts/fuzz.sh`.

use std::path::Path;

#[test]
fn every_decoder_survives_its_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, decode) in bkp::fuzzing::TARGETS {
        let dir = root.join(target);
        let inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("no corpus for {target} at {}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        assert!(inputs.len() >= 10, "{target}: only {} inputs", inputs.len());
        for input in inputs {
            decode(&std::fs::read(&input).unwrap());
        }
        for input in [&b""[..], &[0], &[0xff; 100], b"BKPKEY01", b"BKPSNP01\x00"] {
            decode(input);
        }
    }
}
