#!/usr/bin/env bash
# The test command: installs prerequisites, checks formatting and lints, and runs every test,
# including the end-to-end tests against real Azurite and Mosquitto started on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/prereqs.sh --test

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> unused dependencies"
python3 scripts/unused-deps.py
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> Building the service binaries the end-to-end tests run"
cargo build --workspace --bins --locked
echo "==> cargo test"
# The end-to-end tests start their own servers; in CI they must not be skipped.
export REQUIRE_E2E="${REQUIRE_E2E:-${CI:-}}"
cargo test --workspace --locked -- --test-threads "${TEST_THREADS:-2}"
