#!/usr/bin/env bash
# The chaos soak: the chaos test (tests/it/chaos.rs) run for CHAOS_SECONDS (default 1800) of
# load instead of CI's 90, with its report written to reports/chaos-<UTC time>.json: faults
# injected by kind, readings offered, stored and archived, dead letters (and duplicates), lost
# (must be 0), and recovery time after each kind of fault. CHAOS_SEED replays a run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prereqs.sh
mkdir -p reports
report="$PWD/reports/chaos-$(date -u +%Y%m%dT%H%M%SZ).json"
cargo build --workspace --bins --locked
CHAOS_SECONDS="${CHAOS_SECONDS:-1800}" CHAOS_REPORT="$report" REQUIRE_E2E=1 \
  cargo test -p tests --locked --test it chaos:: -- --nocapture
echo "==> Report: $report"
