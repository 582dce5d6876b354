#!/usr/bin/env bash
# Make sure the binaries the test harness (tests/harness/servers.py) runs are installed:
# mosquitto, the PostgreSQL server binaries (initdb, pg_ctl, postgres) and psql.
#
# Installs the Debian packages mosquitto and postgresql only when something is missing. It never
# starts or enables the system services: the harness runs its own servers on free ports.
#
# Usage: scripts/ensure-binaries.sh [--check] [--demo]
#   --check: report only, exit 1 if something is missing
#   --demo:  only what `ingestd demo` needs (mosquitto)
# Without --demo it also wants docker-compose (Debian's, no engine) to validate docker-compose.yml,
# and promtool (Debian's prometheus package; its server is never started) to check deploy/prometheus/.
set -euo pipefail

check_only=0
demo_only=0
for arg in "$@"; do
    case "$arg" in
        --check) check_only=1 ;;
        --demo) demo_only=1 ;;
        *) echo "usage: $0 [--check] [--demo]" >&2; exit 2 ;;
    esac
done

find_mosquitto() {
    command -v mosquitto 2>/dev/null && return 0
    local c
    for c in /usr/sbin/mosquitto /usr/local/sbin/mosquitto; do
        [[ -x "$c" ]] && { echo "$c"; return 0; }
    done
    return 1
}

find_pg_bindir() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]] && { echo "$d"; return 0; }
    done
    return 1
}

find_psql() {
    command -v psql 2>/dev/null && return 0
    local d
    d="$(find_pg_bindir)" && [[ -x "$d/psql" ]] && { echo "$d/psql"; return 0; }
    return 1
}

missing=()
packages=()
find_mosquitto >/dev/null || { missing+=("mosquitto"); packages+=(mosquitto); }
if [[ $demo_only -eq 0 ]]; then
    find_pg_bindir >/dev/null || {
        missing+=("PostgreSQL server (initdb/pg_ctl under /usr/lib/postgresql/*/bin)")
        packages+=(postgresql)
    }
    find_psql >/dev/null || { missing+=("psql"); packages+=(postgresql-client); }
    command -v docker-compose >/dev/null 2>&1 || { missing+=("docker-compose"); packages+=(docker-compose); }
    command -v promtool >/dev/null 2>&1 || { missing+=("promtool"); packages+=(prometheus); }
fi

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "ensure-binaries: ok"
    exit 0
fi

printf 'ensure-binaries: missing: %s\n' "${missing[@]}" >&2
if [[ $check_only -eq 1 ]]; then
    exit 1
fi

if [[ $(id -u) -eq 0 ]]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "ensure-binaries: not root and no sudo: install them yourself, e.g." >&2
    echo "    apt-get install -y mosquitto postgresql" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-binaries: no apt-get here: install mosquitto and postgresql yourself" >&2
    exit 1
fi

# Keep the packages' maintainer scripts from starting services: invoke-rc.d asks policy-rc.d,
# and exit code 101 means "action forbidden". A policy already there is put back afterwards.
policy=/usr/sbin/policy-rc.d
backup="$policy.ensure-binaries-backup"
had_policy=0
if [[ -e $policy ]]; then
    "${as_root[@]}" mv "$policy" "$backup"
    had_policy=1
fi
cleanup() {
    "${as_root[@]}" rm -f "$policy"
    if [[ $had_policy -eq 1 ]]; then
        "${as_root[@]}" mv "$backup" "$policy"
    fi
}
trap cleanup EXIT
printf '#!/bin/sh\n# temporary, from ingestd scripts/ensure-binaries.sh\nexit 101\n' \
    | "${as_root[@]}" tee "$policy" >/dev/null
"${as_root[@]}" chmod 755 "$policy"

"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "${packages[@]}"

# On a systemd machine the packages enable their units on install (policy-rc.d does not stop
# that); we installed them only for the harness, so undo it without touching anything running.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    "${as_root[@]}" systemctl disable mosquitto.service postgresql.service >/dev/null 2>&1 || true
    # Only when installed now: a Prometheus server the machine already runs stays enabled.
    if [[ " ${packages[*]} " == *" prometheus "* ]]; then
        "${as_root[@]}" systemctl disable prometheus.service >/dev/null 2>&1 || true
    fi
fi

still_missing=0
find_mosquitto >/dev/null || { echo "ensure-binaries: mosquitto still missing" >&2; still_missing=1; }
if [[ $demo_only -eq 0 ]]; then
    find_pg_bindir >/dev/null || { echo "ensure-binaries: postgresql still missing" >&2; still_missing=1; }
    find_psql >/dev/null || { echo "ensure-binaries: psql still missing" >&2; still_missing=1; }
    command -v docker-compose >/dev/null 2>&1 || { echo "ensure-binaries: docker-compose still missing" >&2; still_missing=1; }
    command -v promtool >/dev/null 2>&1 || { echo "ensure-binaries: promtool still missing" >&2; still_missing=1; }
fi
if [[ $still_missing -ne 0 ]]; then
    exit 1
fi
echo "ensure-binaries: installed: ${packages[*]}"
