#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bkp::fuzzing::dump_toc(data));
