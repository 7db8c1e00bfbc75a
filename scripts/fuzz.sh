#!/usr/bin/env bash
# Fuzzes every decoder (fuzz/fuzz_targets/), or the TARGETs given, for SECONDS each (default
# 600), two at a time, with the nightly toolchain and cargo-fuzz (installed here if missing):
# `scripts/fuzz.sh [SECONDS [TARGET...]]`. New corpus entries land in
# fuzz/corpus/<target>/ (minimized afterwards: commit them, tests/fuzz_corpora.rs replays
# them); crashes in fuzz/artifacts/<target>/. Not part of CI: long runs are reported in notes.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=(key_file config envelope pack_header index_file snapshot tree_node obsolete_list dump_header
    catalog series_name dump_toc)
[ $# -gt 0 ] && targets=("$@")
cargo +nightly fuzz build
run() {
    local t=$1
    mkdir -p "fuzz/corpus/$t"
    cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
        -max_len=65536 > "fuzz/$t.log" 2>&1 || { echo "$t: FAILED (see fuzz/$t.log)"; return 1; }
    echo "$t: $(grep -E '^Done|#[0-9]+.*DONE' "fuzz/$t.log" | tail -n 1)"
}
status=0
for ((i = 0; i < ${#targets[@]}; i += 2)); do
    run "${targets[i]}" & a=$!
    if ((i + 1 < ${#targets[@]})); then run "${targets[i + 1]}" & b=$!; else b=; fi
    wait $a || status=1
    [ -n "$b" ] && { wait $b || status=1; }
done
for t in "${targets[@]}"; do
    cargo +nightly fuzz cmin "$t" "fuzz/corpus/$t" > /dev/null 2>&1 || true
done
exit $status
