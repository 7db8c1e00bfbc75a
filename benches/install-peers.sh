#!/usr/bin/env bash
# Installs the tools benches/side_by_side.sh compares bkp with, if they are missing:
# restic from Debian packages, bupstash 0.12 from crates.io (it links libsodium).
# Safe to run again: it only installs what is not there.
set -euo pipefail
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
need_apt=()
command -v restic > /dev/null || need_apt+=(restic)
command -v bupstash > /dev/null && [ -z "${need_apt[*]}" ] && exit 0
if ! command -v bupstash > /dev/null; then
    dpkg -s libsodium-dev > /dev/null 2>&1 || need_apt+=(libsodium-dev)
    dpkg -s pkg-config > /dev/null 2>&1 || need_apt+=(pkg-config)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" > /dev/null
fi
if ! command -v bupstash > /dev/null; then
    echo "building bupstash from crates.io (3-6 minutes)" >&2
    cargo install --locked --quiet bupstash --version '^0.12'
fi
restic version | head -1
bupstash version 2>/dev/null || bupstash --version
