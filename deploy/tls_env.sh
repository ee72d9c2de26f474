#!/bin/sh
# Container entrypoint, second stage (after deploy/shape.sh): with PICOSPEC_TLS_DIR set, run the command with TLS
# and an access token from the directory scripts/make_certs.sh wrote, which docker-compose.yml mounts read-only
# at /tls; unset or empty, run it as it is (plaintext: the compose stack's default on its private network).
#
#   cloud (PICOSPEC_SIDE=cloud): --tls-cert server.pem --tls-key server.key --tls-ca ca.pem --auth-tokens tokens
#   edge  (PICOSPEC_SIDE=edge):  --tls-ca ca.pem --tls-cert client.pem --tls-key client.key, token from edge.token
# Each is passed as its environment variable (PICOSPEC_TLS_CERT, ...), so flags on the command line still win;
# PICOSPEC_TOKEN already set wins over edge.token.
set -eu

if [ -z "${PICOSPEC_TLS_DIR:-}" ]; then
  exec "$@"
fi
D=${PICOSPEC_TLS_MOUNT:-/tls}
need() {
  for f in "$@"; do
    [ -r "$D/$f" ] || { echo "tls_env: PICOSPEC_TLS_DIR is set but $D/$f is missing (run scripts/make_certs.sh" \
                             "DIR and point PICOSPEC_TLS_DIR at DIR)" >&2; exit 2; }
  done
}
case "${PICOSPEC_SIDE:-}" in
  cloud)
    need server.pem server.key ca.pem tokens
    export PICOSPEC_TLS_CERT="$D/server.pem" PICOSPEC_TLS_KEY="$D/server.key" PICOSPEC_TLS_CA="$D/ca.pem" \
           PICOSPEC_AUTH_TOKENS="$D/tokens"
    ;;
  edge)
    need ca.pem client.pem client.key edge.token
    export PICOSPEC_TLS_CA="$D/ca.pem" PICOSPEC_TLS_CERT="$D/client.pem" PICOSPEC_TLS_KEY="$D/client.key"
    PICOSPEC_TOKEN=${PICOSPEC_TOKEN:-$(cat "$D/edge.token")}
    export PICOSPEC_TOKEN
    ;;
  *) echo "tls_env: set PICOSPEC_SIDE to edge or cloud (got '${PICOSPEC_SIDE:-}')" >&2; exit 2 ;;
esac
echo "tls_env: $PICOSPEC_SIDE uses TLS and a token from $D" >&2
exec "$@"
