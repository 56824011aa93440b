#!/usr/bin/env bash
# The whole test suite, from a fresh Debian bookworm machine (as root):
# installs what ferry needs, builds the test build of the binary the
# cluster tests run (cargo feature `test-hooks`: testing aids such as
# FERRY_TEST_HIDE_FACTS exist only there), and runs every test of the
# workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

echo "== build (test build of ferry)"
cargo build --locked --bin ferry --features ferry-cli/test-hooks
# A copy: `cargo test` may rebuild target/debug/ferry without the feature.
cp target/debug/ferry target/debug/ferry-test-hooks
export FERRY_BIN="$PWD/target/debug/ferry-test-hooks"
echo "== test"
cargo test --locked --workspace -- --test-threads 2
