#!/usr/bin/env bash
# Development CA, certificates and passwords for running mosquitto/mosquitto.prod.conf locally.
#
# Usage: scripts/dev-certs.sh [DIR]        (default: var/dev-certs, git-ignored; `make dev-certs`)
#
# Creates in DIR, keeping whatever already exists (run it again to fill gaps; delete DIR to
# start over):
#   ca.crt, ca.key                 a development CA (never use it beyond your machine)
#   server.crt, server.key         the broker's certificate, for localhost and 127.0.0.1 (SAN)
#   ingestd.crt, ingestd.key       an optional client certificate for ingestd (mqtt.tls.cert_file)
#   passwd                         mosquitto password file: ingestd and the devices below
#   <account>.password             each account's generated password, for INGESTD_MQTT__PASSWORD_FILE
#                                  or `mosquitto_pub -P "$(cat DIR/dev-001.password)"`
#
# Accounts: ingestd plus $DEV_DEVICES (default "dev-001 dev-002 dev-003"); a device's username is
# its device id, which is what the ACL's `pattern write sensors/%u/#` relies on.
set -euo pipefail

dir="${1:-var/dev-certs}"
devices="${DEV_DEVICES:-dev-001 dev-002 dev-003}"
days="${DEV_CERT_DAYS:-825}"

for tool in openssl mosquitto_passwd; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "dev-certs: $tool not found (apt-get install openssl mosquitto)" >&2
        exit 1
    fi
done

mkdir -p "$dir"
cd "$dir"
umask 077 # keys and passwords are private from the start; certificates are opened up below
created=()
accounts=() # whose passwd entry was (re)written

if [[ ! -s ca.key || ! -s ca.crt ]]; then
    openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out ca.key
    openssl req -x509 -new -key ca.key -sha256 -days "$days" -out ca.crt \
        -subj "/CN=ingestd development CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
    rm -f server.crt ingestd.crt # signed by a CA that no longer exists
    created+=(ca.crt ca.key)
fi

# issue NAME SUBJECT_CN EXTENSIONS: a key and a certificate signed by the development CA.
issue() {
    local name="$1" cn="$2" ext="$3"
    [[ -s "$name.key" && -s "$name.crt" ]] && return 0
    if [[ ! -s "$name.key" ]]; then
        openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$name.key"
        created+=("$name.key")
    fi
    openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr"
    printf '%s\n' "$ext" >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days "$days" -sha256 -extfile "$name.ext" -out "$name.crt" 2>&1 |
        grep -v -e '^Certificate request self-signature ok' -e '^subject=' >&2 || true
    [[ -s "$name.crt" ]] || { echo "dev-certs: could not sign $name.crt" >&2; exit 1; }
    rm -f "$name.csr" "$name.ext"
    created+=("$name.crt")
}

# Clients check the name they connected to against the SAN (the CN is ignored), so list every
# name and address the broker is reached by.
issue server localhost "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
issue ingestd ingestd "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"

[[ -f passwd ]] || : >passwd
for account in ingestd $devices; do
    new_password=0
    if [[ ! -s "$account.password" ]]; then
        openssl rand -hex 16 >"$account.password"
        created+=("$account.password")
        new_password=1
    fi
    # mosquitto_passwd -b keeps the other accounts and replaces this one's hash.
    if ((new_password)) || ! grep -q "^$account:" passwd; then
        mosquitto_passwd -b passwd "$account" "$(cat "$account.password")"
        accounts+=("$account")
    fi
done

chmod 0755 . # traversable by the broker's user; the files below keep their own modes
chmod 0644 ca.crt server.crt ingestd.crt
chmod 0600 ca.key ingestd.key ./*.password
chmod 0640 server.key passwd
# Started as root, mosquitto 2.0 drops to the `mosquitto` user before it loads the server key
# and the password file: give that group read access to them (nothing else is secret to it).
if [[ $(id -u) -eq 0 ]] && getent group mosquitto >/dev/null; then
    chgrp mosquitto server.key passwd
fi

abs="$(pwd -P)"
((${#accounts[@]})) && created+=("passwd (${accounts[*]})")
if ((${#created[@]})); then
    echo "dev-certs: created in $abs: ${created[*]}"
else
    echo "dev-certs: everything already present in $abs"
fi
cat <<EOF

Broker (copy mosquitto/mosquitto.prod.conf and point it here, or install these as
/etc/mosquitto/certs/{ca.crt,server.crt,server.key} and /etc/mosquitto/passwd):
  cafile $abs/ca.crt
  certfile $abs/server.crt
  keyfile $abs/server.key
  password_file $abs/passwd

ingestd:
  INGESTD_MQTT__URL=mqtts://localhost:8883
  INGESTD_MQTT__TLS__CA_FILE=$abs/ca.crt
  INGESTD_MQTT__USERNAME=ingestd
  INGESTD_MQTT__PASSWORD_FILE=$abs/ingestd.password

A device (username = device id):
  mosquitto_pub -h localhost -p 8883 --cafile $abs/ca.crt -u dev-001 \\
    -P "\$(cat $abs/dev-001.password)" -q 1 -t sensors/dev-001/temp -m '{"value": 21.5}'
EOF
