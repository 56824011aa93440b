#!/usr/bin/env bash
# The whole test suite, from a fresh Debian bookworm machine (as root):
# installs what ferry needs, builds the binary the cluster tests run, and
# runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

echo "== build"
cargo build --locked --bin ferry
echo "== test"
cargo test --locked --workspace -- --test-threads 2
