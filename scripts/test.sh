#!/usr/bin/env bash
# The whole test suite: unit, integration, format conformance, CLI, end-to-end against real
# PostgreSQL and MariaDB servers and a real S3 server (SeaweedFS) (installed here if missing,
# started and stopped by the tests), and doc tests; the benchmark and examples are built too.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
cargo test --all-targets
cargo test --doc
