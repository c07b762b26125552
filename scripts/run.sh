#!/usr/bin/env bash
# The run command: the whole pipeline locally, driven by the simulator.
#
# Installs what is missing, starts Azurite and Mosquitto unless they already run, builds the
# services (release), starts processor, ingest, the archiver and the dashboard, then the simulator, and shows a live status
# line until Ctrl-C, when it stops everything cleanly (newest first, each flushing what it holds).
#
# Settings (environment): SIMULATOR_DEVICES (10000), SIMULATOR_INTERVAL (30s), MQTT_URL
# (mqtt://127.0.0.1:1883), AZURE_STORAGE_CONNECTION_STRING (local Azurite), DASHBOARD_ADDR
# (127.0.0.1:8080), RUN_FOR (seconds
# to run before stopping by itself; unset = until Ctrl-C). Every service flag is also read from
# the environment; see `target/release/<service> --help`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
RUN="$ROOT/.run"
mkdir -p "$RUN/logs" "$RUN/azurite" "$RUN/mosquitto"

export SIMULATOR_DEVICES="${SIMULATOR_DEVICES:-10000}"
export SIMULATOR_INTERVAL="${SIMULATOR_INTERVAL:-30s}"
export MQTT_URL="${MQTT_URL:-mqtt://127.0.0.1:1883}"
MQTT_PORT="${MQTT_URL##*:}"; MQTT_PORT="${MQTT_PORT%%/*}"
INGEST_PORT=9101 PROCESSOR_PORT=9102 SIMULATOR_PORT=9103 ARCHIVER_PORT=9104
export DASHBOARD_ADDR="${DASHBOARD_ADDR:-127.0.0.1:8080}"
# The Azure SDK builds an error, and so captures a backtrace, for every optional header a
# request or response lacks (x-ms-client-request-id on every call): with RUST_BACKTRACE=1 in
# the shell that is a whole stack unwind per storage call. Panics still print backtraces.
export RUST_LIB_BACKTRACE="${RUST_LIB_BACKTRACE:-0}"
DASHBOARD_PORT="${DASHBOARD_ADDR##*:}"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# http_get PORT PATH: the raw response, without needing curl.
http_get() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET %s HTTP/1.0\r\n\r\n' "$2" >&3 && cat <&3) 2>/dev/null
}

# metric PORT NAME: the sum of a Prometheus metric's samples (0 when unreachable).
metric() {
  http_get "$1" /metrics | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $NF } END { printf "%d", s }'
}

wait_ready() { # NAME PORT
  for _ in $(seq 1 300); do
    http_get "$2" /readyz | head -n1 | grep -q ' 200' && return 0
    sleep 0.2
  done
  echo "error: $1 did not become ready; see .run/logs/$1.log" >&2
  return 1
}

bash scripts/prereqs.sh

started=()   # pids of what this script started, in start order
graces=()    # seconds each may take to stop before it is killed
stop_all() {
  trap - INT TERM EXIT
  echo
  echo "==> Stopping (each service flushes what it holds)"
  for ((i=${#started[@]}-1; i>=0; i--)); do
    local pid="${started[$i]}" waited=0
    kill -TERM "$pid" 2>/dev/null || continue
    # Azurite reports "closed" yet its node process can linger; nothing is lost by killing it then.
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$(( ${graces[$i]} * 5 ))" ]; do
      sleep 0.2; waited=$((waited + 1))
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  echo "==> Stopped. Logs are in .run/logs/."
}
trap stop_all INT TERM EXIT

if port_open 10000 && port_open 10001 && port_open 10002; then
  echo "==> Using the Azure Storage emulator already listening on 10000-10002"
  [ -n "${LOADTEST_PROFILE:-}" ] && echo "    (load-test numbers depend on its state: Azurite slows down as its data grows)"
else
  storage=(--location "$RUN/azurite")
  if [ -n "${LOADTEST_PROFILE:-}" ]; then
    # Every load test starts from an empty emulator that keeps its data in memory only: on
    # disk, Azurite periodically rewrites whole tables, which stalls it longer as they grow.
    storage=(--inMemoryPersistence)
  fi
  echo "==> Starting Azurite (${storage[*]})"
  .tools/node_modules/.bin/azurite --silent --skipApiVersionCheck "${storage[@]}" \
    >"$RUN/logs/azurite.log" 2>&1 &
  started+=($!); graces+=(10)
  for _ in $(seq 1 100); do port_open 10000 && port_open 10001 && port_open 10002 && break; sleep 0.2; done
fi

if port_open "$MQTT_PORT"; then
  echo "==> Using the MQTT broker already listening on $MQTT_PORT"
  echo "    Its configuration is its own: unless it sets max_queued_messages 0 (see"
  echo "    deploy/mosquitto.conf), it drops messages queued beyond 1000 while ingest is down."
else
  echo "==> Starting Mosquitto on $MQTT_PORT with deploy/mosquitto.conf"
  store="$RUN/mosquitto"
  if [ -n "${LOADTEST_PROFILE:-}" ]; then
    store="$RUN/mosquitto-loadtest"; rm -rf "$store"; mkdir -p "$store"   # no sessions left over
  fi
  sed -e "s|^listener .*|listener $MQTT_PORT 127.0.0.1|" \
      -e "s|^persistence_location .*|persistence_location $store/|" \
      deploy/mosquitto.conf >"$RUN/mosquitto.conf"
  # Started as root, Mosquitto switches to its own user and can then not write its store here:
  # a broker restart would lose ingest's session and every reading queued for it.
  [ "$(id -u)" = 0 ] && echo "user root" >>"$RUN/mosquitto.conf"
  MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
  "$MOSQUITTO" -c "$RUN/mosquitto.conf" >"$RUN/logs/mosquitto.log" 2>&1 &
  started+=($!); graces+=(10)
  mosquitto_pid=$!
  for _ in $(seq 1 50); do port_open "$MQTT_PORT" && break; sleep 0.2; done
  # Prove it can persist: SIGUSR1 makes it save its store now.
  kill -USR1 "$mosquitto_pid"
  for _ in $(seq 1 50); do grep -q "Saving in-memory database" "$RUN/logs/mosquitto.log" && break; sleep 0.1; done
  sleep 0.2
  if ! grep -q "Saving in-memory database" "$RUN/logs/mosquitto.log" || grep -q "Error saving" "$RUN/logs/mosquitto.log"; then
    echo "error: Mosquitto cannot save its store in $store; a broker restart would lose readings:" >&2
    tail -n 5 "$RUN/logs/mosquitto.log" >&2
    exit 1
  fi
fi

echo "==> Building (release)"
cargo build --release --locked --bins

for svc in processor ingest archiver; do
  port_var="$(echo "$svc" | tr a-z A-Z)_PORT"
  echo "==> Starting $svc (metrics on 127.0.0.1:${!port_var})"
  args=(); [ "$svc" = archiver ] && args=(run)  # a pass now, then every ARCHIVER_INTERVAL (1h)
  target/release/$svc "${args[@]}" >"$RUN/logs/$svc.log" 2>&1 &
  started+=($!); graces+=(60)
  wait_ready "$svc" "${!port_var}"
done
if [ -z "${LOADTEST_PROFILE:-}" ]; then
  echo "==> Starting the dashboard on http://$DASHBOARD_ADDR/"
  target/release/dashboard >"$RUN/logs/dashboard.log" 2>&1 &
  started+=($!); graces+=(15)
  wait_ready dashboard "$DASHBOARD_PORT"
fi
if [ -n "${LOADTEST_PROFILE:-}" ]; then
  # scripts/loadtest.sh: the load tester drives the simulator itself, then everything stops.
  echo "==> Load test, profile $LOADTEST_PROFILE (the report goes to reports/)"
  target/release/loadtest --profile "$LOADTEST_PROFILE"
  exit 0
fi

# Only after ingest has subscribed: the broker keeps nothing for a subscription that does not exist.
echo "==> Starting the simulator: $SIMULATOR_DEVICES devices every $SIMULATOR_INTERVAL"
target/release/simulator >"$RUN/logs/simulator.log" 2>&1 &
started+=($!); graces+=(15)
sim_pid=$!

echo "==> Running. Ctrl-C stops everything. Metrics: :$INGEST_PORT/metrics :$PROCESSOR_PORT/metrics :$ARCHIVER_PORT/metrics :$SIMULATOR_PORT/metrics :$DASHBOARD_PORT/metrics"
echo "    Dashboard: http://$DASHBOARD_ADDR/ (API: http://$DASHBOARD_ADDR/api/v1/devices)"
echo "    Dead letters, from another terminal: target/release/deadletter list (docs/dead-letters.md)"
t0=$(date +%s.%N); s0=0; begin=$(date +%s)
while kill -0 "$sim_pid" 2>/dev/null; do
  sleep 2
  published=$(metric $SIMULATOR_PORT simulator_published_total)
  stored=$(metric $PROCESSOR_PORT processor_readings_stored_total)
  dead=$(metric $PROCESSOR_PORT processor_dead_letters_total)
  depth=$(metric $PROCESSOR_PORT processor_queue_depth)
  archived=$(metric $ARCHIVER_PORT archiver_rows_archived_total)
  t1=$(date +%s.%N)
  rate=$(awk -v a="$stored" -v b="$s0" -v t="$t1" -v u="$t0" 'BEGIN { printf "%.0f", (a - b) / (t - u) }')
  avg=$(awk -v a="$stored" -v t="$(date +%s)" -v u="$begin" 'BEGIN { d = t - u; printf "%.0f", (d > 0 ? a / d : 0) }')
  printf '\rpublished %9d | stored %9d | dead-lettered %6d | queue depth %5d | %6d readings/s (avg %d) | archived %d   ' \
    "$published" "$stored" "$dead" "$depth" "$rate" "$avg" "$archived"
  t0=$t1; s0=$stored
  if [ -n "${RUN_FOR:-}" ] && [ $(( $(date +%s) - begin )) -ge "$RUN_FOR" ]; then
    break
  fi
done
