#!/usr/bin/env bash
# A private CA, a server certificate, a client certificate and a tokens file for a test deployment of PicoSpec
# (deploy/tls.md). Needs only openssl.
#
#   scripts/make_certs.sh DIR [SAN ...]
#
# DIR gets (keys and tokens mode 600):
#   ca.pem, ca.key             the private CA (keep ca.key off both machines once the certificates are made)
#   server.pem, server.key     the cloud's: picospec-cloud --tls-cert server.pem --tls-key server.key
#   client.pem, client.key     the edge's, for mutual TLS: picospec-edge --tls-cert client.pem --tls-key client.key
#                              (the cloud trusts them with --tls-ca ca.pem)
#   tokens                     "client-name token" lines: picospec-cloud --auth-tokens tokens
#   edge.token                 the client's token alone: PICOSPEC_TOKEN=$(cat edge.token) picospec-edge ...
# SANs of the server certificate: the arguments after DIR (DNS:name or IP:address), default
# DNS:cloud DNS:localhost IP:127.0.0.1 IP:::1 (`cloud` is the compose stack's service name). The edge verifies
# the name in --server against them (or --tls-server-name).
# Environment: PICOSPEC_CLIENT_NAME (default edge: the client certificate's CN and its name in tokens),
# PICOSPEC_CERT_DAYS (default 365). An existing CA in DIR is reused (new server and client certificates are
# signed by it, so edges that trust it keep working); a new DIR gets a new CA.
set -euo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
DIR=$1
shift
SANS=("$@")
[ ${#SANS[@]} -gt 0 ] || SANS=(DNS:cloud DNS:localhost IP:127.0.0.1 IP:::1)
CLIENT=${PICOSPEC_CLIENT_NAME:-edge}
DAYS=${PICOSPEC_CERT_DAYS:-365}
command -v openssl >/dev/null || { echo "make_certs: openssl is not installed" >&2; exit 1; }

mkdir -p "$DIR"
umask 077
cd "$DIR"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ -f ca.key ] && [ -f ca.pem ]; then
  echo "make_certs: reusing the CA in $DIR"
else
  key ca.key
  openssl req -x509 -new -key ca.key -sha256 -days "$DAYS" -subj "/CN=PicoSpec test CA" -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
fi

# sign NAME CN EXTENSIONS: NAME.key (new) and NAME.pem signed by the CA
sign() {
  key "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$2" -out "$TMP/$1.csr"
  printf '%s\n' "$3" >"$TMP/$1.ext"
  openssl x509 -req -in "$TMP/$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -CAserial "$TMP/ca.srl" -sha256 \
    -days "$DAYS" -extfile "$TMP/$1.ext" -out "$1.pem" 2>/dev/null
}
SAN_LIST=$(IFS=,; echo "${SANS[*]}")
sign server "${SANS[0]#*:}" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$SAN_LIST"
sign client "$CLIENT" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"

TOKEN=$(openssl rand -hex 32)
printf '%s\n' "$TOKEN" >edge.token
{
  echo "# client-name token (picospec-cloud --auth-tokens; reloaded on SIGHUP). Made by scripts/make_certs.sh."
  echo "$CLIENT $TOKEN"
} >tokens
chmod 644 ca.pem server.pem client.pem
echo "make_certs: wrote ca.pem server.pem server.key client.pem client.key tokens edge.token to $DIR" \
     "(server names: $SAN_LIST; client: $CLIENT)"
