#!/usr/bin/env bash
# The whole test suite: unit, integration, format-conformance and doc tests, plus a build of
# the benchmark and examples. Installs nothing by hand: everything it needs is in this script.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --all-targets
cargo test --doc
