#!/bin/sh
# Container entrypoint: shape this container's end of the link, then exec the command (the server or the edge).
#
#   PICOSPEC_SIDE       edge | cloud: which rate is this side's egress (edge: uplink, cloud: downlink)
#   PICOSPEC_RTT_MS     round-trip time to add; half is added on each side           (default 0: none)
#   PICOSPEC_UP_MBIT    edge -> cloud rate in Mbit/s                                  (default 0: unlimited)
#   PICOSPEC_DOWN_MBIT  cloud -> edge rate in Mbit/s                                  (default 0: unlimited)
#   PICOSPEC_LOSS       drop probability per packet, each direction, e.g. 0.01        (default 0)
#   PICOSPEC_SHAPE_DEV  the device to shape                                           (default eth0)
#   PICOSPEC_SHAPE_REQUIRED  1 (default): exit if the shaping cannot be applied; 0: warn and run unshaped
#
# Needs cap NET_ADMIN (compose: cap_add: [NET_ADMIN]) and tc. Uses netem where the kernel has it (delay and loss
# on egress, tbf below it for the rate); else tbf for the rate plus an iptables NFQUEUE rule on this side's
# ingress feeding netlab.nfq_delay, which holds each arriving packet for half the RTT (kernels without netem,
# like the CI machine's). It prints which method it used, and leaves it in /tmp/picospec-shaping.
set -eu

SIDE=${PICOSPEC_SIDE:-}
RTT=${PICOSPEC_RTT_MS:-0}
UP=${PICOSPEC_UP_MBIT:-0}
DOWN=${PICOSPEC_DOWN_MBIT:-0}
LOSS=${PICOSPEC_LOSS:-0}
DEV=${PICOSPEC_SHAPE_DEV:-eth0}
REQUIRED=${PICOSPEC_SHAPE_REQUIRED:-1}
SRC=$(cd "$(dirname "$0")/.." && pwd)  # the source tree: netlab is importable from here even if not installed

is_zero() { case "$1" in ""|0|0.0|0.00) return 0 ;; *) return 1 ;; esac; }

if is_zero "$RTT" && is_zero "$UP" && is_zero "$DOWN" && is_zero "$LOSS"; then
  echo "shape: no shaping requested (PICOSPEC_RTT_MS/_UP_MBIT/_DOWN_MBIT/_LOSS unset)" >&2
  echo "method=none" > /tmp/picospec-shaping
else
  case "$SIDE" in
    edge|cloud) ;;
    *) echo "shape: set PICOSPEC_SIDE to edge or cloud (got '$SIDE')" >&2; exit 2 ;;
  esac
  # --detach: the delay stage keeps running after this script has exec'd the command below
  if out=$(PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" python3 -m picospec.netlab.shaping apply --detach --dev "$DEV" \
             --side "$SIDE" --rtt-ms "$RTT" --up-mbit "$UP" --down-mbit "$DOWN" --loss "$LOSS" \
             --log /tmp/nfq_delay.log 2>&1); then
    echo "$out" >&2
    echo "$out" | sed -n 's/.*method=\([^ ]*\).*/method=\1/p' > /tmp/picospec-shaping
  else
    echo "$out" >&2
    if [ "$REQUIRED" = "1" ]; then
      echo "shape: could not shape $DEV (needs cap NET_ADMIN, and netem or tbf + iptables NFQUEUE +" \
           "netfilterqueue); set PICOSPEC_SHAPE_REQUIRED=0 to run unshaped" >&2
      exit 1
    fi
    echo "shape: WARNING: running UNSHAPED" >&2
    echo "method=unshaped" > /tmp/picospec-shaping
  fi
fi

exec "$@"
