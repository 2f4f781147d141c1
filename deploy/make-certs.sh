#!/usr/bin/env bash
# Generate what a TLS + SuperNode-authenticated fedlora deployment needs:
#
#   OUT/ca.crt                  CA certificate: copy to every host (public)
#   OUT/ca.key                  CA private key: keep it off the hosts (signs new certs)
#   OUT/server/superlink.crt    SuperLink certificate (server host only), SANs:
#   OUT/server/superlink.key      superlink, localhost, 127.0.0.1 and every --san
#   OUT/supernode-K/supernode.key      SuperNode K's private key (client host K only)
#   OUT/supernode-K/supernode.key.pub  its public key, registered with the SuperLink:
#                                      flwr supernode register OUT/supernode-K/supernode.key.pub CONN
#   OUT/trainer-K/secret        the secret node K's ClientApp presents to its warm
#                               trainer (client host K only; 64 hex characters)
#
# SuperNode keys are OpenSSH ECDSA P-384 keys: Flower 1.41 reads the private key with
# `load_ssh_private_key` (flower-supernode --auth-supernode-private-key) and
# `flwr supernode register` accepts only NIST-curve EC public keys in OpenSSH format.
#
# Re-running keeps what exists (the CA, the server certificate, existing node keys)
# and adds what is missing, so `-n 4` after `-n 3` adds supernode-4 only. Delete
# OUT/server to re-issue the server certificate (e.g. with a new --san).
#
# Usage: deploy/make-certs.sh [-o OUT] [-n NODES] [--san DNS:name | --san IP:addr]...
set -euo pipefail

out="$(dirname "$0")/certs"
nodes=3
sans=("DNS:superlink" "DNS:localhost" "IP:127.0.0.1")
while [ $# -gt 0 ]; do
    case "$1" in
        -o) out="$2"; shift 2 ;;
        -n) nodes="$2"; shift 2 ;;
        --san) sans+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "make-certs.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
for tool in openssl ssh-keygen; do
    command -v "$tool" >/dev/null || { echo "make-certs.sh: $tool not found" >&2; exit 1; }
done
mkdir -p "$out"
umask 077  # private keys readable by their owner only

if [ ! -f "$out/ca.key" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -days 3650 \
        -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=fedlora deployment CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    chmod 644 "$out/ca.crt"
    echo "created $out/ca.crt (CA)"
fi

if [ ! -f "$out/server/superlink.crt" ]; then
    mkdir -p "$out/server"
    san_list=$(IFS=,; echo "${sans[*]}")
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes \
        -keyout "$out/server/superlink.key" -out "$out/server/superlink.csr" \
        -subj "/CN=superlink" 2>/dev/null
    openssl x509 -req -in "$out/server/superlink.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days 825 -out "$out/server/superlink.crt" \
        -extfile <(printf '%s\n' "subjectAltName=$san_list" "basicConstraints=critical,CA:FALSE" \
                   "keyUsage=critical,digitalSignature,keyAgreement" \
                   "extendedKeyUsage=serverAuth") 2>/dev/null
    rm "$out/server/superlink.csr"
    cp "$out/ca.crt" "$out/server/ca.crt"  # the SuperLink's --ssl-ca-certfile
    chmod 644 "$out/server/superlink.crt" "$out/server/ca.crt"
    echo "created $out/server/superlink.crt (SANs: $san_list)"
fi

for k in $(seq 1 "$nodes"); do
    dir="$out/supernode-$k"
    if [ ! -f "$dir/supernode.key" ]; then
        mkdir -p "$dir"
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$k" -f "$dir/supernode.key"
        chmod 644 "$dir/supernode.key.pub"
        echo "created $dir/supernode.key and .pub (register the .pub with the SuperLink)"
    fi
    secret="$out/trainer-$k/secret"
    if [ ! -f "$secret" ]; then
        mkdir -p "$out/trainer-$k"
        openssl rand -hex 32 > "$secret"
        echo "created $secret (node $k's trainer secret)"
    fi
done
