#!/usr/bin/env bash
# Load test: runs the pipeline like scripts/run.sh, but instead of the endless simulator it runs
# `loadtest --profile PROFILE`, which measures the raw storage ceiling, drives the profile,
# and writes a Markdown/JSON report and an SVG chart under reports/.
#
#   scripts/loadtest.sh seed         # 10,000 sensors every 30 s for 5 minutes
#   scripts/loadtest.sh saturation   # single readings at 25%..150% of the write ceiling, 30 s a step
#   scripts/loadtest.sh gateway      # arrays of 100 readings at 120% of the batch ceiling, 2 minutes
#
# LOADTEST_DURATION (per step) and LOADTEST_CEILING_DURATION shorten or lengthen a run; every
# other `target/release/loadtest --help` flag has a LOADTEST_* variable too.
set -euo pipefail
cd "$(dirname "$0")/.."
# Its own broker (deploy/mosquitto.conf, empty) on its own port: a broker with default settings
# drops what it queues beyond 1,000 messages per client, which a load past the ceiling reaches.
export MQTT_URL="${MQTT_URL:-mqtt://127.0.0.1:18830}"
LOADTEST_PROFILE="${1:-seed}" exec bash scripts/run.sh
