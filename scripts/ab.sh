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
shopt -s inherit_errexit
[ $# -ge 2 ] || { sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2; exit 2; }
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PROFILE="${3:-seed}"
PAIRS="${4:-3}"
export LOADTEST_DURATION="${LOADTEST_DURATION:-2m}"
export LOADTEST_CEILING_DURATION="${LOADTEST_CEILING_DURATION:-10s}"

# Every run starts its own emulator, empty and in memory, only if none listens already:
# checked before the builds, which take minutes.
if (exec 3<>/dev/tcp/127.0.0.1/10000) 2>/dev/null; then
  echo "error: something listens on 127.0.0.1:10000; stop it, each run needs a fresh emulator" >&2
  exit 1
fi

# side SIDE: the checkout to run SIDE from (a directory, as given from where the script was
# started, or a revision's worktree under .ab/), built; its path on stdout, the rest on stderr.
side() {
  local given="$1" dir rev
  if [ -d "$given" ]; then
    dir="$(cd "$given" && pwd)"
  else
    rev="$(git -C "$ROOT" rev-parse --verify --quiet "$given^{commit}")" \
      || { echo "error: $given is neither a directory nor a revision" >&2; return 2; }
    dir="$ROOT/.ab/${rev:0:12}"
    if [ ! -d "$dir" ]; then
      git -C "$ROOT" worktree add --detach "$dir" "$rev" >&2
      if [ -d "$ROOT/target/release" ]; then
        mkdir -p "$dir/target" && cp -a "$ROOT/target/release" "$dir/target/"
      fi
    elif [ "$(git -C "$dir" rev-parse HEAD)" != "$rev" ] || [ -n "$(git -C "$dir" status --porcelain)" ]; then
      echo "error: $dir is not $given unchanged; remove it (git worktree remove --force $dir)" >&2
      return 2
    fi
  fi
  echo "==> Building $given in $dir" >&2
  (cd "$dir" && cargo build --release --locked --bins >&2)
  echo "$dir"
}

A_DIR="$(side "$1")"
B_DIR="$(side "$2")"
cd "$ROOT"
RESULTS="$ROOT/reports/ab-$(date -u +%Y-%m-%dT%H-%M-%SZ)"
mkdir -p "$RESULTS"
for pair in $(seq 1 "$PAIRS"); do
  for s in A B; do
    dir="$A_DIR"; label="$1"
    [ "$s" = B ] && dir="$B_DIR" && label="$2"
    echo "==> Run $pair of $PAIRS, $s ($label), $PROFILE, $LOADTEST_DURATION"
    log="$RESULTS/$s-$pair.log"
    # A failed run is left out of the table, which the others still make.
    (cd "$dir" && LOADTEST_REPORT_DIR="$RESULTS/$s-$pair" bash scripts/loadtest.sh "$PROFILE" >"$log" 2>&1) \
      || echo "error: run $s$pair failed and is left out; see $log" >&2
  done
done

python3 - "$RESULTS" "$1" "$2" "$PAIRS" <<'EOF'
import glob, json, statistics, sys
results, labels, pairs = sys.argv[1], {"A": sys.argv[2], "B": sys.argv[3]}, int(sys.argv[4])
runs = {"A": [], "B": []}
us = lambda x: f"{x:.1f}" if x < 100 else f"{x:.0f}"
seconds = lambda x: "-" if x is None else f"{x:.2f} s"  # no probe seen: null in the report
print("| run | build | CPU µs/reading (ingest + processor) | p50 | p99 | storage requests/reading | lost |")
print("|---|---|---:|---:|---:|---:|---:|")
for pair in range(1, pairs + 1):
    for side in "AB":
        found = sorted(glob.glob(f"{results}/{side}-{pair}/*/report.json"))
        if not found:  # the run failed, or was taken out by hand (an emulator stall, say)
            continue
        r = json.load(open(found[-1]))
        stored = max(r["stored"], 1)
        ingest = r["cpu"]["ingest"]["cpu_seconds"] * 1e6 / stored
        processor = r["cpu"]["processor"]["cpu_seconds"] * 1e6 / stored
        p50, p99 = r["latency_seconds"]["p50"], r["latency_seconds"]["p99"]
        runs[side].append((ingest, processor, p50, p99))
        print(f"| {side}{pair} | {labels[side]} | {us(ingest + processor)} ({us(ingest)} + {us(processor)}) "
              f"| {seconds(p50)} | {seconds(p99)} | {r['storage_requests_per_reading_total']:.3f} "
              f"| {r['rows']['lost']} |")


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


means = {}
for side in "AB":
    if not runs[side]:
        print(f"| **mean** | {labels[side]} | no run | | | | |")
        continue
    i, p, p50, p99 = (mean(run[k] for run in runs[side]) for k in range(4))
    means[side] = (i + p, p)
    print(f"| **mean** | {labels[side]} | **{us(i + p)}** ({us(i)} + {us(p)}) | {seconds(p50)} | {seconds(p99)} | | |")
if len(means) == 2:
    (a, ap), (b, bp) = means["A"], means["B"]
    print(f"\nB against A (unrounded): {100 * (b - a) / a:+.1f}% CPU per reading, "
          f"processor {100 * (bp - ap) / ap:+.1f}%.")
print(f"Reports: {results}/")
EOF
