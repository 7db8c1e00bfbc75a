#!/usr/bin/env bash
# bkp side by side with bupstash and restic on the same dump pair, in one run.
#
# Usage: benches/side_by_side.sh DAY1 DAY2 [ROUNDS]        (ROUNDS >= 3, default 3)
#   e.g. benches/pg_dump_pair.sh /tmp/pair && benches/side_by_side.sh /tmp/pair/day{1,2}.sql
#
# Each round gives every tool a new repository and times, one tool after the other (the order
# turns every round, so drift hits all of them alike): backup DAY1, backup DAY2, restore DAY2
# piped into a consumer that hashes it (as psql or mysql reads a restore), and restore DAY2 to
# /dev/null. Each restore's output is checked against DAY2. The table gives medians over the
# rounds: wall time as MB/s of the dump, CPU-seconds of the tool alone (user + system), peak RSS
# and, for backups, what the repository grew by.
#
# Environment:
#   TOOLS     what to run (default "bkp bkp@1 bupstash restic"); NAME@N pins NAME to N cores
#             with taskset (bkp@1 against bkp on every core is the scaling figure)
#   CONSUMER  the hashing reader (default "openssl dgst -sha256"). coreutils' sha256sum on this
#             machine hashes at ~320 MB/s (no SHA extensions), slower than every tool's
#             restore; openssl's SHA-256 runs at ~1.3 GB/s, so the figure is the tool's.
#   BKP_BEFORE  another bkp binary, run as the tool "bkp-before" (a before/after table in one run)
#   KEEP=1    keep the scratch directory (its path is printed)
# Peers missing are installed by benches/install-peers.sh (restic from Debian packages,
# bupstash 0.12 from crates.io).
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,6p' "$0"; exit 2; }
day1=$(realpath "$1")
day2=$(realpath "$2")
rounds=${3:-3}
[ "$rounds" -ge 3 ] || { echo "at least 3 rounds: a median of fewer says little" >&2; exit 2; }
tools=${TOOLS:-"bkp bkp@1 bupstash restic"}
consumer=${CONSUMER:-"openssl dgst -sha256"}
here=$(cd "$(dirname "$0")/.." && pwd)

"$here/benches/install-peers.sh" >&2
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
bkp=$here/target/release/bkp

work=$(mktemp -d "${TMPDIR:-/tmp}/bkp-side-by-side.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "scratch: $work" >&2; else trap 'rm -rf "$work"' EXIT; fi
head -c 32 /dev/urandom | base64 > "$work/password"
chmod 600 "$work/password"
results=$work/results.tsv
: > "$results"

expected=$($consumer < "$day2" | awk '{print $NF}')
size1=$(stat -c %s "$day1")
size2=$(stat -c %s "$day2")
cores=$(nproc)

# The tool's environment and commands. $dir is the tool's scratch directory for this round.
setup() {
    local tool=$1 dir=$2
    case $tool in
    bkp | bkp-before)
        export BKP_REPOSITORY=$dir/repo BKP_PASSWORD_FILE=$work/password BKP_CACHE_DIR=$dir/cache
        "$(bkp_of "$tool")" init > /dev/null 2>&1
        ;;
    bupstash)
        export BUPSTASH_REPOSITORY=$dir/repo BUPSTASH_KEY=$dir/key
        export BUPSTASH_SEND_LOG=$dir/send-log BUPSTASH_QUERY_CACHE=$dir/query-cache
        bupstash init > /dev/null
        bupstash new-key -o "$dir/key"
        ;;
    restic)
        export RESTIC_REPOSITORY=$dir/repo RESTIC_PASSWORD_FILE=$work/password
        export RESTIC_CACHE_DIR=$dir/cache
        restic init -q > /dev/null
        ;;
    esac
}
bkp_of() { if [ "$1" = bkp-before ]; then echo "$BKP_BEFORE"; else echo "$bkp"; fi; }
backup() {
    case $1 in
    bkp | bkp-before) "$bkp" backup --quiet --tag bench ;;
    bupstash) bupstash put -q name=dump.sql - > "$dir/last-id" ;;
    restic) restic backup -q --stdin --stdin-filename dump.sql > /dev/null ;;
    esac
}
restore() {
    case $1 in
    bkp | bkp-before) "$bkp" restore latest --tag bench --quiet ;;
    bupstash) bupstash get "id=$(cat "$dir/last-id")" ;;
    restic) restic dump -q latest /dump.sql ;;
    esac
}

# Runs "$@" under /usr/bin/time with stdin and stdout as given by the caller; appends a row.
timed() {
    local name=$1 step=$2 bytes=$3
    shift 3
    /usr/bin/time -f '%e %U %S %M' -o "$work/time" "$@"
    read -r wall user sys rss < "$work/time"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$step" "$bytes" "$wall" "$user" "$sys" "$rss" >> "$results"
}

one_round() {
    local spec=$1 round=$2 tool=${1%@*} pin=()
    if [[ $spec == *@* ]]; then pin=(taskset -c "0-$((${spec#*@} - 1))"); fi
    dir=$work/$round-${spec/@/-}
    mkdir -p "$dir"
    (
        setup "$tool" "$dir"
        size() { du -sb "$dir/repo" | cut -f1; }
        local before after
        before=$(size); sync
        timed "$spec" "backup day 1" "$size1" "${pin[@]}" bash -c "$(declare -f backup); bkp=$(bkp_of "$tool") dir=$dir backup $tool" < "$day1"
        after=$(size); printf '%s\tadded day 1\t%s\n' "$spec" $((after - before)) >> "$results"
        before=$after; sync
        timed "$spec" "backup day 2" "$size2" "${pin[@]}" bash -c "$(declare -f backup); bkp=$(bkp_of "$tool") dir=$dir backup $tool" < "$day2"
        after=$(size); printf '%s\tadded day 2\t%s\n' "$spec" $((after - before)) >> "$results"
        # The consumer reads a fifo, so that only the tool is timed.
        mkfifo "$dir/fifo"
        $consumer < "$dir/fifo" > "$dir/hash" &
        timed "$spec" "restore day 2 | hash" "$size2" "${pin[@]}" bash -c "$(declare -f restore); bkp=$(bkp_of "$tool") dir=$dir restore $tool" > "$dir/fifo"
        wait $!
        got=$(awk '{print $NF}' "$dir/hash")
        [ "$got" = "$expected" ] || { echo "$spec: restore of day 2 differs (sha256 $got, expected $expected)" >&2; exit 1; }
        timed "$spec" "restore day 2 > /dev/null" "$size2" "${pin[@]}" bash -c "$(declare -f restore); bkp=$(bkp_of "$tool") dir=$dir restore $tool > /dev/null"
    )
    rm -rf "$dir"
}

echo "consumer alone: $( { /usr/bin/time -f '%e' $consumer < "$day2" > /dev/null; } 2>&1 | tail -1) s for day 2" >&2
read -ra order <<< "$tools"
for round in $(seq 1 "$rounds"); do
    for spec in "${order[@]}"; do
        echo "round $round: $spec" >&2
        one_round "$spec" "$round"
    done
    order=("${order[@]:1}" "${order[0]}")
done

python3 - "$results" "$cores" "$tools" "$consumer" <<'PY'
import statistics, sys
from collections import defaultdict
path, cores, tools, consumer = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4]
timed, added = defaultdict(list), defaultdict(list)
for line in open(path):
    f = line.rstrip("\n").split("\t")
    if f[1].startswith("added"):
        added[(f[0], f[1])].append(int(f[2]))
    else:
        name, step, size, wall, user, sys_, rss = f
        timed[(name, step)].append((int(size), float(wall), float(user) + float(sys_), int(rss)))
steps = ["backup day 1", "backup day 2", "restore day 2 | hash", "restore day 2 > /dev/null"]
med = statistics.median
print(f"{cores} cores; medians of {len(next(iter(timed.values())))} rounds; | hash = piped into `{consumer}`")
print()
print("| step | " + " | ".join(tools) + " |")
print("|---|" + "---|" * len(tools))
for step in steps:
    cells = []
    for t in tools:
        rows = timed.get((t, step))
        if not rows:
            cells.append("—"); continue
        mbs = med(s / w / 1e6 for s, w, _, _ in rows)
        cpu = med(c for _, _, c, _ in rows) / (rows[0][0] / 1e9)
        rss = med(r for *_, r in rows) / 1024
        cell = f"{mbs:,.0f} MB/s, {cpu:.2f} CPU-s/GB, {rss:.0f} MiB"
        if step.startswith("backup"):
            cell += f", +{med(added[(t, 'added ' + step[7:])]) / 1e6:,.1f} MB"
        cells.append(cell)
    print(f"| {step} | " + " | ".join(cells) + " |")
scaled = [t for t in tools if "@" in t and t.split("@")[0] in tools]
for t in scaled:
    base = t.split("@")[0]
    print()
    for step in steps:
        one = med(s / w for s, w, _, _ in timed[(t, step)])
        all_ = med(s / w for s, w, _, _ in timed[(base, step)])
        print(f"{base} {step}: {all_ / one:.2f}x on {cores} cores against {t.split('@')[1]}")
PY
