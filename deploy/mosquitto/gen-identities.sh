#!/usr/bin/env bash
# gen-identities.sh OUT_DIR
#
# Writes a TEST certificate authority, the broker's certificate, client certificates and a
# hashed Mosquitto password file for deploy/mosquitto/mosquitto.conf, for local runs and
# tests. Production certificates come from the operator's CA and production keys and
# passwords are mounted as secrets; never ship what this script writes.
#
# Needs only Debian's `openssl` and `mosquitto` packages, and python3.
#
# Writes into OUT_DIR (created, mode 0755; existing files of these names are replaced):
#   ca.crt, ca.key                 test CA, EC P-256, valid CA_DAYS (ca.key is 0600)
#   server.crt, server.key         broker certificate, subjectAltName = BROKER_NAMES,
#                                  extendedKeyUsage serverAuth
#   ingest.crt, ingest.key         client certificate CN=ingest (clientAuth)
#   <DEVICE_CERT_ID>.crt, .key     client certificate CN=<DEVICE_CERT_ID> (clientAuth)
#   dynamic-security.json          identities (hashed passwords) and permissions for the
#                                  dynamic-security plugin (dynsec.py)
#   ingest.password                ingest's password, plain text, 0600, no trailing newline
#   gateway.password               gateway's password, plain text, 0600, no trailing newline
# Certificates and their keys (except ca.key) and dynamic-security.json are 0644 so that a broker started as
# root, which drops to the `mosquitto` user, can read them. That is for local/test use only.
# The folders above OUT_DIR must be searchable by that user too (a 0700 mktemp parent is not).
#
# Environment:
#   BROKER_NAMES        server certificate subjectAltName
#                       (default DNS:localhost,IP:127.0.0.1,DNS:mosquitto)
#   DEVICE_CERT_ID      device identity of the device client certificate (default sensor-00001)
#   INGEST_PASSWORD     ingest's password (default: generated, openssl rand -base64 24)
#   GATEWAY_PASSWORD    gateway's password (default: generated)
#   DEVICE_CREDENTIALS  file of device credentials, one `username:password` per line in plain
#                       text (`simulator --print-credentials` writes it); blank lines and
#                       lines starting with `#` are skipped. Unset: no device lines.
#   INGEST_SHARE_GROUP, INGEST_TOPIC_PREFIX
#                       as set for ingest (defaults: none, `devices`): the permissions name them
#   CA_DAYS             test CA validity in days (default 3650)
#   CERT_DAYS           server and client certificate validity in days (default 825)
#
# Prints one line saying what it wrote; never prints a password.
set -euo pipefail

usage() {
  echo "usage: $0 OUT_DIR   (settings in environment variables; see the header of this script)" >&2
  exit 2
}
[[ $# -eq 1 && -n $1 ]] || usage
out=$1

broker_names=${BROKER_NAMES:-DNS:localhost,IP:127.0.0.1,DNS:mosquitto}
device_id=${DEVICE_CERT_ID:-sensor-00001}
ca_days=${CA_DAYS:-3650}
cert_days=${CERT_DAYS:-825}

die() { echo "gen-identities: $*" >&2; exit 1; }

for tool in openssl python3; do
  command -v "$tool" >/dev/null || die "$tool not found (Debian: apt-get install openssl python3)"
done
[[ $device_id =~ ^[A-Za-z0-9._-]+$ ]] || die "DEVICE_CERT_ID must match [A-Za-z0-9._-]+: '$device_id'"
[[ $device_id != ingest && $device_id != gateway ]] || die "DEVICE_CERT_ID cannot be a service identity"
[[ $ca_days =~ ^[1-9][0-9]*$ && $cert_days =~ ^[1-9][0-9]*$ ]] || die "CA_DAYS and CERT_DAYS must be positive integers"
[[ -n $broker_names && $broker_names != *$'\n'* ]] || die "BROKER_NAMES must be one non-empty line"
if [[ -n ${DEVICE_CREDENTIALS:-} && ! -r $DEVICE_CREDENTIALS ]]; then
  die "DEVICE_CREDENTIALS: cannot read '$DEVICE_CREDENTIALS'"
fi

# Everything is checked before anything is written to OUT_DIR. Plain-text secrets are kept
# in a private temporary folder (mktemp, 0700) until they are written out.
work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT

# Passwords of the service identities.
service_password() { # name value-or-empty
  local value=$2
  if [[ -z $value ]]; then
    value=$(openssl rand -base64 24)
  fi
  [[ $value != *:* && $value != *$'\n'* && $value != *$'\r'* ]] \
    || die "$1's password must not contain ':' or a line break"
  (umask 077 && printf '%s' "$value" >"$work/$1.password")
}
service_password ingest "${INGEST_PASSWORD:-}"
service_password gateway "${GATEWAY_PASSWORD:-}"

# Device credentials. Checks every line: one `:`, a username Mosquitto's ACL pattern can use
# (no `/`, `+`, `#`, blanks), not a service identity, no duplicates, a non-empty password.
: >"$work/devices"
if [[ -n ${DEVICE_CREDENTIALS:-} ]]; then
  awk '
    { sub(/\r$/, "") }
    /^[[:space:]]*$/ || /^#/ { next }
    {
      n = index($0, ":")
      user = substr($0, 1, n - 1); pass = substr($0, n + 1)
      if (n == 0 || user == "" || pass == "" || index(pass, ":") > 0) {
        bad = "line " NR ": expected username:password (no other `:`)"; exit 1
      }
      if (user ~ /[\/+# \t]/) { bad = "line " NR ": username contains / + # or a blank"; exit 1 }
      if (user == "ingest" || user == "gateway") { bad = "line " NR ": " user " is a service identity"; exit 1 }
      if (seen[user]++) { bad = "line " NR ": duplicate username " user; exit 1 }
      print
    }
    END { if (bad != "") { print "gen-identities: DEVICE_CREDENTIALS " bad > "/dev/stderr"; exit 1 } }
  ' "$DEVICE_CREDENTIALS" >"$work/devices"
fi
devices=$(wc -l <"$work/devices")
devices=$((devices))

mkdir -p -- "$out"
chmod 0755 -- "$out"
# A broker started as root reads these files as the `mosquitto` user: warn if a folder above
# OUT_DIR is not searchable by others (e.g. a 0700 mktemp folder).
dir=$(cd -- "$out" && pwd -P)
while [[ $dir != / ]]; do
  dir=$(dirname -- "$dir")
  perms=$(stat -c %A -- "$dir")
  if [[ ${perms:9:1} != [xt] ]]; then
    echo "gen-identities: warning: $dir is not searchable by others (mode $perms);" \
      "a broker running as the mosquitto user cannot read $out" >&2
    break
  fi
done

# Runs a command quietly; shows its output only if it fails.
quiet() {
  local log
  if ! log=$("$@" 2>&1); then
    printf '%s\n' "$log" >&2
    die "failed: $1 $2"
  fi
}

cat >"$work/openssl.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $broker_names
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF

new_key() { # path mode
  quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"
  chmod "$2" "$1"
}

# A certificate signed by the CA: name CN extension-section
issue() {
  local name=$1 cn=$2 ext=$3
  new_key "$out/$name.key" 0644
  quiet openssl req -new -config "$work/openssl.cnf" -key "$out/$name.key" \
    -subj "/CN=$cn" -out "$work/$name.csr"
  quiet openssl x509 -req -in "$work/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$cert_days" -sha256 \
    -extfile "$work/openssl.cnf" -extensions "$ext" -out "$out/$name.crt"
  chmod 0644 "$out/$name.crt"
}

# Test CA.
new_key "$out/ca.key" 0600
quiet openssl req -new -x509 -config "$work/openssl.cnf" -key "$out/ca.key" \
  -subj "/CN=iot-pipeline test CA" -days "$ca_days" -sha256 \
  -set_serial "0x$(openssl rand -hex 16)" -extensions ca_ext -out "$out/ca.crt"
chmod 0644 "$out/ca.crt"

# Broker certificate: CN is the first name of BROKER_NAMES (clients check the subjectAltName).
server_cn=${broker_names%%,*}
server_cn=${server_cn#*:}
issue server "$server_cn" server_ext
issue ingest ingest client_ext
issue "$device_id" "$device_id" client_ext

# Service passwords for the invoking user (plain text, 0600).
for name in ingest gateway; do
  install -m 0600 -- "$work/$name.password" "$out/$name.password"
done

# The broker's identities and permissions: the dynamic-security plugin's file (dynsec.py),
# passwords hashed, never written in plain text outside the private work folder.
{
  printf 'ingest:%s\n' "$(cat "$work/ingest.password")"
  printf 'gateway:%s\n' "$(cat "$work/gateway.password")"
  cat "$work/devices"
} | python3 "$(dirname -- "${BASH_SOURCE[0]}")/dynsec.py" "$out/dynamic-security.json" "$device_id" \
  || die "failed: dynsec.py"

echo "gen-identities: wrote to $out: test CA (ca.crt, ca.key), server.crt/.key (SAN $broker_names)," \
  "client certs ingest and $device_id, dynamic-security.json (ingest, gateway + $devices devices, hashed)," \
  "ingest.password, gateway.password"
