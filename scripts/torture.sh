#!/usr/bin/env bash
# Long torture runs (not CI): SIGKILLs during backups and prunes, 30 days of forget + prune with
# re-backups of old days, concurrent backups with prunes; with --s3 also against a real S3 server
# behind a fault-injecting proxy. Prints trials, broken snapshots, hangs and lost data; exits
# non-zero if any. Options are scripts/torture.py's (--help).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v faketime >/dev/null || {
    echo "installing faketime (prune's grace periods pass through it)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q faketime >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q faketime >/dev/null; }
}
cargo build --release --bin bkp --example gen_dump
exec python3 scripts/torture.py "$@"
