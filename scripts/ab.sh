#!/usr/bin/env bash
# An A/B load test of two builds in one session on one machine. Runs alternate (A, B, A, B, ...)
# so that the machine's and the emulator's drift falls on both sides, each on a fresh in-memory
# emulator, and the table at the end gives every run and each side's mean.
#
#   scripts/ab.sh A B [PROFILE] [PAIRS]     # e.g. scripts/ab.sh f1a76ea HEAD seed 3
#
# A and B are git revisions, or directories holding a checkout of this project (a worktree
# prepared by hand, such as a revision with commits cherry-picked). A revision is checked out
# as a worktree under .ab/<revision> and its target directory starts as a copy of this one's,
# so only what differs is compiled; it installs its own Azurite (its revision may pin another
# version). Each side is built with `cargo build --release --bins` before the first run:
# build nothing else meanwhile, it would be measured.
# PROFILE is a scripts/loadtest.sh profile (seed); PAIRS how many runs each side gets (3).
# LOADTEST_DURATION (2m) and LOADTEST_CEILING_DURATION (10s) set each run's length.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
[ $# -ge 2 ] || { sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2; exit 2; }
PROFILE="${3:-seed}"
PAIRS="${4:-3}"
export LOADTEST_DURATION="${LOADTEST_DURATION:-2m}"
export LOADTEST_CEILING_DURATION="${LOADTEST_CEILING_DURATION:-10s}"

# checkout SIDE: the directory to run SIDE (a revision or a directory) from, built.
checkout() {
  local side="$1" dir
  if [ -d "$side" ]; then
    dir="$(cd "$side" && pwd)"
  else
    local rev
    rev="$(git rev-parse --verify --quiet "$side^{commit}")" || { echo "error: $side is neither a directory nor a revision" >&2; exit 2; }
    dir="$ROOT/.ab/${rev:0:12}"
    if [ ! -d "$dir" ]; then
      git worktree add --detach "$dir" "$rev" >&2
      if [ -d "$ROOT/target/release" ]; then
        mkdir -p "$dir/target" && cp -r "$ROOT/target/release" "$dir/target/"
      fi
    fi
  fi
  echo "==> Building $side in $dir" >&2
  (cd "$dir" && cargo build --release --locked --bins >&2)
  echo "$dir"
}

bash scripts/prereqs.sh >/dev/null
A_DIR="$(checkout "$1")"
B_DIR="$(checkout "$2")"
RESULTS="$ROOT/reports/ab-$(date -u +%Y-%m-%dT%H-%M-%SZ)"
mkdir -p "$RESULTS"
for pair in $(seq 1 "$PAIRS"); do
  for side in A B; do
    dir="$A_DIR"; label="$1"
    [ "$side" = B ] && dir="$B_DIR" && label="$2"
    echo "==> Run $pair of $PAIRS, $side ($label), $PROFILE, $LOADTEST_DURATION"
    log="$RESULTS/$side-$pair.log"
    (cd "$dir" && LOADTEST_REPORT_DIR="$RESULTS/$side-$pair" bash scripts/loadtest.sh "$PROFILE" >"$log" 2>&1) \
      || { echo "error: the run failed; see $log" >&2; exit 1; }
  done
done

python3 - "$RESULTS" "$1" "$2" "$PAIRS" <<'EOF'
import glob, json, statistics, sys
results, labels, pairs = sys.argv[1], {"A": sys.argv[2], "B": sys.argv[3]}, int(sys.argv[4])
rows = {"A": [], "B": []}
us = lambda x: f"{x:.1f}" if x < 100 else f"{x:.0f}"
print(f"| run | build | CPU µs/reading (ingest + processor) | p50 | p99 | storage requests/reading | lost |")
print("|---|---|---:|---:|---:|---:|---:|")
for pair in range(1, pairs + 1):
    for side in "AB":
        found = glob.glob(f"{results}/{side}-{pair}/*/report.json")
        if not found:  # a run taken out by hand (an emulator stall, say)
            continue
        r = json.load(open(found[0]))
        ingest = r["cpu"]["ingest"]["cpu_seconds"] * 1e6 / r["stored"]
        processor = r["cpu"]["processor"]["cpu_seconds"] * 1e6 / r["stored"]
        rows[side].append((ingest, processor, r["latency_seconds"]["p99"]))
        print(f"| {side}{pair} | {labels[side]} | {us(ingest + processor)} ({us(ingest)} + {us(processor)}) "
              f"| {r['latency_seconds']['p50']:.2f} s | {r['latency_seconds']['p99']:.2f} s "
              f"| {r['storage_requests_per_reading_total']:.3f} | {r['rows']['lost']} |")
mean = {s: [statistics.mean(x[i] for x in rows[s]) for i in range(3)] for s in "AB"}
for s in "AB":
    i, p, p99 = mean[s]
    print(f"| **mean** | {labels[s]} | **{us(i + p)}** ({us(i)} + {us(p)}) | | {p99:.2f} s | | |")
a, b = sum(mean["A"][:2]), sum(mean["B"][:2])
print(f"\nB against A: {100 * (b - a) / a:+.1f}% CPU per reading (processor {100 * (mean['B'][1] - mean['A'][1]) / mean['A'][1]:+.1f}%).")
print(f"Reports: {results}/")
EOF
