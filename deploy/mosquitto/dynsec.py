#!/usr/bin/env python3
"""dynsec.py OUT_JSON [CERT_ONLY_ID ...] < credentials

Writes the Mosquitto dynamic-security plugin's configuration (2.0.x format), offline, from
`username:password` lines on standard input: the service identities `ingest` and `gateway`,
and one device per other line. CERT_ONLY_IDs are devices that log in with a client
certificate only (no password).

Why the plugin and not an ACL file: Mosquitto 2.0's ACL file never checks SUBSCRIBE, so any
device could join ingest's shared subscription and take (and lose) a share of all readings.
The plugin refuses it. It has no %u patterns, hence one role per device.

- Default: nothing allowed (publish, receive, subscribe, unsubscribe).
- ingest: may subscribe only to devices/+/telemetry (or, with INGEST_SHARE_GROUP=g, only to
  $share/g/devices/+/telemetry) and receive devices/+/telemetry; publishes nothing.
  (INGEST_SHARE_GROUP and INGEST_TOPIC_PREFIX in the environment change the group and
  `devices` here, as they do for ingest.)
- gateway: may publish to devices/+/telemetry (load tests; gateways fronting many sensors).
- a device: may publish only to devices/<its id>/telemetry, and must connect with its id as
  client id (so it cannot take over another client's session, such as ingest's).
- No admin client: the file is a generated artefact; regenerate and restart to change it.

Password hashes: base64 PBKDF2-HMAC-SHA512, 64 bytes, 12-byte salt, 101 iterations, what
the plugin expects (a client with other sizes is silently ignored by it).
"""
import base64
import hashlib
import json
import os
import sys

ITERATIONS = 101
# The same settings as ingest's INGEST_TOPIC_PREFIX and INGEST_SHARE_GROUP.
PREFIX = os.environ.get("INGEST_TOPIC_PREFIX") or "devices"
GROUP = os.environ.get("INGEST_SHARE_GROUP") or ""
ALL = f"{PREFIX}/+/telemetry"
INGEST_FILTER = f"$share/{GROUP}/{ALL}" if GROUP else ALL
SERVICES = {
    "ingest": [
        {"acltype": "subscribeLiteral", "topic": INGEST_FILTER, "allow": True},
        {"acltype": "unsubscribeLiteral", "topic": INGEST_FILTER, "allow": True},
        {"acltype": "publishClientReceive", "topic": ALL, "allow": True},
    ],
    "gateway": [
        {"acltype": "publishClientSend", "topic": ALL, "allow": True},
    ],
}


def hashed(password):
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS, 64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": ITERATIONS,
    }


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__.split("\n\n")[0])
    out, cert_only = sys.argv[1], sys.argv[2:]
    clients, roles = [], [{"rolename": name, "acls": acls} for name, acls in SERVICES.items()]

    def add(user, password):
        # A name with wildcards or separators would widen the topic it may publish to.
        if not user or any(c in user for c in "+#/ \t") or user.startswith("$"):
            sys.exit(f"dynsec.py: {user!r} cannot be an identity (no + # / $ or blanks)")
        if user in SERVICES:
            client = {"username": user, "roles": [{"rolename": user}]}
        else:
            role = "device-" + user
            client = {"username": user, "clientid": user, "roles": [{"rolename": role}]}
            roles.append({"rolename": role, "acls": [
                {"acltype": "publishClientSend", "topic": f"{PREFIX}/{user}/telemetry", "allow": True},
            ]})
        if password is not None:
            client.update(hashed(password))
        clients.append(client)

    seen = set()
    for line in sys.stdin:
        line = line.rstrip("\r\n")
        if not line or line.startswith("#"):
            continue
        user, password = line.split(":", 1)
        seen.add(user)
        add(user, password)
    for user in cert_only:
        if user not in seen:
            add(user, None)
    config = {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": False,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    }
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)


main()
