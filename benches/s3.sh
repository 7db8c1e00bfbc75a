#!/usr/bin/env bash
# Runs benches/pipeline.rs against a real S3 server on loopback: SeaweedFS (installed by
# scripts/install-test-deps.sh), started here and stopped on exit. Extra environment is passed
# through, e.g.  BKP_BENCH_DAY1=/tmp/pgpair/day1.sql BKP_BENCH_DAY2=/tmp/pgpair/day2.sql benches/s3.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-test-deps.sh"
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/s3.json" <<J
{"identities":[{"name":"bench","credentials":[{"accessKey":"bench","secretKey":"bench-secret"}],"actions":["Admin","Read","List","Tagging","Write"]}]}
J
mkdir "$work/data"
"$root/.test-tools/venv/bin/weed" mini -dir="$work/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.telemetry=false -webdav=false -admin.ui=false -s3.port="$port" \
    -s3.config="$work/s3.json" -bucket=bench > "$work/weed.log" 2>&1 &
weed=$!
trap 'kill $weed 2>/dev/null; wait $weed 2>/dev/null; rm -rf "$work"' EXIT
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1 \
    AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true
# Ready when bkp can create a repository there (SeaweedFS answers curl's --aws-sigv4 with 403).
cargo build --release --bin bkp
ready=
for attempt in $(seq 300); do
    if BKP_PASSWORD=probe BKP_INSECURE_FAST_KDF=1 "$root/target/release/bkp" \
        --repo "s3://bench/probe-$attempt" init > /dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 0.5
done
[ -n "$ready" ] || { echo "SeaweedFS did not start; see $work/weed.log" >&2; exit 1; }
BKP_BENCH_REPO="s3://bench/repo-$$" cargo bench --bench pipeline
