#!/usr/bin/env bash
# One command, on a fresh machine: build bkp, then run a real backup and restore end to end.
# Creates a throwaway repository under a temporary directory and removes it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building bkp (release, link-time optimised: the first build takes ~5 minutes on 2 cores)"
cargo build --release --quiet --bin bkp --example gen_dump
bkp=target/release/bkp
gen=target/release/examples/gen_dump

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export BKP_REPOSITORY="$work/repo"
printf 'demo password\n' > "$work/password"
chmod 600 "$work/password"   # bkp warns about a password file others can read
export BKP_PASSWORD_FILE="$work/password"

echo "== bkp init"
$bkp init
echo "== generating two days of a 200 MB SQL dump"
$gen 200000000 1 > "$work/day1.sql"
$gen 200000000 2 > "$work/day2.sql"
echo "== day 1: first backup"
$bkp backup --tag shop < "$work/day1.sql"
echo "== day 1 again: an unchanged dump adds only the snapshot"
$bkp backup --tag shop < "$work/day1.sql"
echo "== day 2: a changed dump adds only changed chunks"
$bkp backup --tag shop < "$work/day2.sql"
$bkp snapshots
echo "== restore latest --tag shop"
$bkp restore latest --tag shop > "$work/restored.sql"
cmp "$work/day2.sql" "$work/restored.sql"
echo "== restored dump is byte-identical to day 2"
echo "== check: every stored chunk read back and verified"
$bkp check --read-data
echo "== stats"
$bkp stats
echo "== forget day 1's snapshots but the newest, then prune (marks now, deletes a grace period later)"
$bkp forget --tag shop --keep-last 1
$bkp prune
