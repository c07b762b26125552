#!/usr/bin/env bash
# What TLS costs at the edge, measured on this machine with the release binaries:
#
#   1. ingest's CPU per reading with and without TLS, in the same run: two ingest replicas in
#      one share group, one on a plain listener and one on a TLS listener of the same broker,
#      each taking about half of the seed load (10,000 sensors every 30 s, published by the
#      simulator as a gateway), each measured on what it received.
#   2. how long 10,000 per-device TLS connections (one identity each) take to connect, and the
#      same over plain TCP for comparison.
#
# Usage: cargo build --release --bins && bash scripts/tls-bench.sh
# Settings: BENCH_SECONDS (measured window of part 1, default 60), BENCH_DEVICES (10000).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/target/release"
SECONDS_MEASURED="${BENCH_SECONDS:-60}"
DEVICES="${BENCH_DEVICES:-10000}"
for b in ingest simulator; do
  [ -x "$BIN/$b" ] || { echo "error: $BIN/$b missing: cargo build --release --bins" >&2; exit 1; }
done
bash scripts/prereqs.sh >/dev/null

W="$(mktemp -d)"; chmod 755 "$W"   # the broker drops to the mosquitto user and must read it
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
metric() { # PORT NAME
  python3 - "$1" "$2" <<'EOF'
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
print(int(sum(float(l.rsplit(" ", 1)[1]) for l in body.splitlines() if l.startswith(sys.argv[2] + " ") or l.startswith(sys.argv[2] + "{"))))
EOF
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

echo "==> Identities for $DEVICES devices"
printf 'bench-fleet-secret' >"$W/fleet.secret"
SIMULATOR_DEVICE_SECRET_FILE="$W/fleet.secret" "$BIN/simulator" --print-credentials --devices "$DEVICES" >"$W/devices.txt"
DEVICE_CREDENTIALS="$W/devices.txt" bash deploy/mosquitto/gen-identities.sh "$W/id" >/dev/null

echo "==> Azurite and a broker with a plain and a TLS listener (same identities and permissions)"
QP=$(free_port); TP=$(free_port); BP=$(free_port); PLAIN=$(free_port); TLS=$(free_port)
.tools/node_modules/.bin/azurite --silent --skipApiVersionCheck --location "$W/azurite" \
  --queuePort "$QP" --tablePort "$TP" --blobPort "$BP" >"$W/azurite.log" 2>&1 &
pids+=($!)
mkdir -p "$W/data"; chmod 777 "$W/data"
cat >"$W/mosquitto.conf" <<EOF
per_listener_settings false
allow_anonymous false
plugin $(ls /usr/lib/*/mosquitto_dynamic_security.so /usr/lib/mosquitto_dynamic_security.so 2>/dev/null | head -n1)
plugin_opt_config_file $W/id/dynamic-security.json
set_tcp_nodelay true
persistence false
max_queued_messages 0
max_queued_bytes 0
listener $PLAIN 127.0.0.1
listener $TLS 127.0.0.1
cafile $W/id/ca.crt
certfile $W/id/server.crt
keyfile $W/id/server.key
EOF
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
"$MOSQUITTO" -c "$W/mosquitto.conf" >"$W/mosquitto.log" 2>&1 &
pids+=($!)
wait_port "$QP"; wait_port "$PLAIN"; wait_port "$TLS"
STORAGE="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;QueueEndpoint=http://127.0.0.1:$QP/devstoreaccount1;TableEndpoint=http://127.0.0.1:$TP/devstoreaccount1;BlobEndpoint=http://127.0.0.1:$BP/devstoreaccount1"

# tls_env URL: MQTT_URL, plus the CA file when the URL is mqtts:// (only then is one allowed).
tls_env() { echo "MQTT_URL=$1"; case "$1" in mqtts://*) echo "MQTT_CA_FILE=$W/id/ca.crt" ;; esac; }
start_ingest() { # NAME URL METRICS_PORT
  env $(tls_env "$2") MQTT_USERNAME=ingest MQTT_PASSWORD_FILE="$W/id/ingest.password" \
  INGEST_CLIENT_ID="bench-$1" INGEST_QUEUE_NAME="bench-$1" INGEST_METRICS_ADDR="127.0.0.1:$3" \
  AZURE_STORAGE_CONNECTION_STRING="$STORAGE" "$BIN/ingest" >"$W/ingest-$1.log" 2>&1 &
  pids+=($!)
}
MP=$(free_port); MT=$(free_port)
start_ingest plain "mqtt://127.0.0.1:$PLAIN" "$MP"; PLAIN_PID=$!
start_ingest tls "mqtts://127.0.0.1:$TLS" "$MT"; TLS_PID=$!
ready() { python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$1/readyz', timeout=2)" 2>/dev/null; }
for port in "$MP" "$MT"; do
  for _ in $(seq 1 150); do ready "$port" && break; sleep 0.2; done
  ready "$port" || { echo "error: an ingest did not become ready; its log is in $W" >&2; trap - EXIT; exit 1; }
done

echo "==> Part 1: seed load ($DEVICES sensors every 30 s) for $((SECONDS_MEASURED + 30)) s, split between the two ingests"
MQTT_URL="mqtt://127.0.0.1:$PLAIN" MQTT_USERNAME=gateway MQTT_PASSWORD_FILE="$W/id/gateway.password" \
  "$BIN/simulator" --devices "$DEVICES" --interval 30s --duration "$((SECONDS_MEASURED + 40))s" \
  --metrics-addr 127.0.0.1:0 --log-format json >"$W/sim1.json" 2>"$W/sim1.log" &
SIM=$!; pids+=($SIM)
sleep 30   # every device has published once; connections and caches are warm
c0p=$(cpu_ticks "$PLAIN_PID"); c0t=$(cpu_ticks "$TLS_PID")
r0p=$(metric "$MP" ingest_messages_received_total); r0t=$(metric "$MT" ingest_messages_received_total)
sleep "$SECONDS_MEASURED"
c1p=$(cpu_ticks "$PLAIN_PID"); c1t=$(cpu_ticks "$TLS_PID")
r1p=$(metric "$MP" ingest_messages_received_total); r1t=$(metric "$MT" ingest_messages_received_total)
wait "$SIM" || true
HZ=$(getconf CLK_TCK)
python3 - "$HZ" "$c0p" "$c1p" "$r0p" "$r1p" "$c0t" "$c1t" "$r0t" "$r1t" "$SECONDS_MEASURED" <<'EOF'
import sys
hz, c0p, c1p, r0p, r1p, c0t, c1t, r0t, r1t, secs = map(float, sys.argv[1:])
for name, dc, dr in (("plain", c1p - c0p, r1p - r0p), ("TLS", c1t - c0t, r1t - r0t)):
    print(f"    ingest over {name:5}: {dr:8.0f} readings in {secs:.0f} s ({dr / secs:5.0f}/s), "
          f"CPU {dc / hz:6.2f} s = {dc / hz * 1e6 / max(dr, 1):6.1f} CPU-us per reading")
EOF

echo "==> Part 2: $DEVICES per-device connections, each its own identity"
for run in "TLS 500" "TLS 1000" "TLS 0" "plain 0"; do
  read -r kind rate <<<"$run"
  if [ "$kind" = TLS ]; then url="mqtts://127.0.0.1:$TLS"; else url="mqtt://127.0.0.1:$PLAIN"; fi
  env $(tls_env "$url") SIMULATOR_DEVICE_SECRET_FILE="$W/fleet.secret" \
    "$BIN/simulator" --devices "$DEVICES" --interval 30s --rounds 1 --connect-rate "$rate" \
    --metrics-addr 127.0.0.1:0 --log-format json >"$W/sim2.json" 2>"$W/sim2.log"
  python3 - "$kind" "$W/sim2.json" "$rate" <<'EOF'
import json, sys
s = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
rate = "all at once" if float(sys.argv[3]) == 0 else f"{float(sys.argv[3]):.0f}/s"
print(f"    {sys.argv[1]:5} (opened {rate:11}): {s['connections']} connected, the last after {s['all_connected_seconds']:.2f} s; "
      f"{s['acked']}/{s['messages']} publishes acknowledged")
EOF
done
