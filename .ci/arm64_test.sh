#!/usr/bin/env bash
# The edge on arm64, on an x86 machine under emulation (issue 16, item 3), as root on Debian 12 with no container
# registry: register qemu-user-static for aarch64 with binfmt_misc (fix-binary flag, so it works inside
# containers), build an arm64 Debian 12 base image with debootstrap, fill an aarch64 wheelhouse on the host,
# build deploy/Dockerfile.edge for linux/arm64 offline from it, then run the x86 cloud image (picospec-cloud:ci,
# from .ci/docker_test.sh) and the arm64 edge on one docker network over a shaped link (RTT 50 ms, 10 Mbit/s each
# way; the cloud shapes its eth0 with deploy/shape.sh as in docker-compose.yml; the edge's eth0 gets the same
# shaping from the host, in its network namespace, as arm64 tc/iptables cannot use netlink under qemu-user) and check
#   - the edge image is arm64, its processes run as aarch64, and its torch is a CPU build that computes;
#   - the measured RTT and rate between the x86 cloud and the arm64 edge are within 15 % of what was configured;
#   - greedy generation from the arm64 edge in sync and pipeline modes equals the target's own (the cloud-mode
#     run), and sync made rounds with accepted drafts.
# Nothing is skipped: a kernel without binfmt_misc (or without a way to shape the link) fails with the reason.
# Containers and the network are always removed; dockerd is stopped again only if this script started it.
#
# torch: PyPI's aarch64 torch 2.11 and later (2.13.0 included) are CUDA 13 builds (torch 2.13.0+cu130, 427 MB,
# libtorch_cpu.so itself needs libcudart.so.13, and its pinned nvidia-nccl-cu13==2.29.7 has no aarch64 wheel on
# PyPI), so the image takes torch 2.10.0, PyPI's newest aarch64 CPU build (2.10.0+cpu, 146 MB), through the
# Dockerfile's TORCH_SPEC. netfilterqueue (the delay stage on kernels without netem) has no wheels: its aarch64
# wheel is compiled once inside the arm64 base under emulation.
#
# Cached between runs (under $WORK, default /var/tmp/picospec-arm64, and docker's image store): the arm64 base
# image (skipped when it exists), the wheelhouse, the netfilterqueue wheel. Usage: bash .ci/arm64_test.sh
# Environment: PICOSPEC_ARM64_DRAFT (default smollm2-135m-instruct:layers=8), PICOSPEC_ARM64_TORCH (torch==2.10.0).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DOCKER=/usr/bin/docker            # by full path: another, newer client may come first on PATH
PY=${PICOSPEC_VENV:-$REPO/.venv}/bin/python
WORK=${PICOSPEC_ARM64_WORK:-/var/tmp/picospec-arm64}
BASE_IMAGE=picospec-base:bookworm-arm64
CLOUD_IMAGE=picospec-cloud:ci     # x86, built by .ci/docker_test.sh
EDGE_IMAGE=picospec-edge:arm64
NET=picoarm-net$$
CLOUD_NAME=picoarm-cloud$$
EDGE_NAME=picoarm-edge$$
TORCH_SPEC=${PICOSPEC_ARM64_TORCH:-torch==2.10.0}
NFQ_VERSION=1.1.0
RTT_MS=50
RATE_MBIT=10
TOL=0.15
TARGET=smollm2-135m-instruct
# :int8 (dynamic quantisation) dies under qemu with SIGILL (torch's aarch64 oneDNN/xbyak JIT; "Can't open MIDR_EL1
# sysfs entry"), so the emulated run drafts with the fp32 layer-truncated draft; set PICOSPEC_ARM64_DRAFT to retry.
DRAFT=${PICOSPEC_ARM64_DRAFT:-smollm2-135m-instruct:layers=8}
N_NEW=24
PROMPT="The capital of France is"
MODELS=${PICOSPEC_CACHE:-${HOME:-/root}/.cache/picospec}
T0=$(date +%s)

PASSED=0 FAILED=0  # checks: the arm64 image, the link measurement, generation equality
PHASES=()          # "name seconds" per phase, printed at the end
say() { echo "arm64_test: $*"; }
die() { say "FAIL: $*"; FAILED=$((FAILED + 1)); exit 1; }
elapsed() { echo "$(( $(date +%s) - T0 )) s"; }
PHASE_NAME="" PHASE_T=0
phase() {  # phase NAME: closes the previous phase (recording its time) and opens the next
  local now; now=$(date +%s)
  if [ -n "$PHASE_NAME" ]; then PHASES+=("$PHASE_NAME $((now - PHASE_T))"); fi
  PHASE_NAME=$1 PHASE_T=$now
  if [ -n "$1" ]; then say "== $1 ($(elapsed))"; fi
}

[ "$(id -u)" = 0 ] || die "not root: binfmt_misc, docker and link shaping need root"
[ -x "$PY" ] || die "no virtualenv at ${PY%/bin/python} (run make install first)"
[ "$(uname -m)" = x86_64 ] || die "this script cross-builds on x86_64 (this machine is $(uname -m)); on an arm64 host build natively (deploy/README.md)"
mkdir -p "$WORK"

# ---------------------------------------------------------------------------------------------- tools
phase tools
need=()
[ -x "$DOCKER" ] && [ -x /usr/sbin/dockerd ] || need+=(docker.io)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  say "apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >"$WORK/apt.log" 2>&1 \
    || { tail -20 "$WORK/apt.log"; die "apt-get install ${need[*]} failed"; }
fi

# ---------------------------------------------------------------------------------------------- binfmt_misc
# The kernel runs aarch64 ELF files through qemu-aarch64-static. The F (fix-binary) flag makes the kernel open
# the interpreter when it is registered, so it also works inside containers, whose filesystems lack it.
phase binfmt
BM=/proc/sys/fs/binfmt_misc
[ -d "$BM" ] || modprobe binfmt_misc 2>/dev/null || true
if ! grep -qw binfmt_misc /proc/filesystems || [ ! -d "$BM" ]; then
  die "the kernel lacks binfmt_misc (not in /proc/filesystems, no $BM): it cannot run arm64 binaries under qemu," \
      "so the arm64 edge can be neither built nor run on this machine"
fi
if [ ! -e "$BM/register" ]; then
  mount -t binfmt_misc binfmt_misc "$BM" \
    || die "the kernel lacks binfmt_misc: mount -t binfmt_misc binfmt_misc $BM failed"
fi
handler_ok() { [ -e "$BM/qemu-aarch64" ] && grep -qx enabled "$BM/qemu-aarch64" && grep -q '^flags:.*F' "$BM/qemu-aarch64"; }
if ! handler_ok; then
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
fi
if ! handler_ok; then  # register it ourselves from qemu-user-static's systemd-binfmt line (flags OPF: F included)
  line=$(grep -h '^:qemu-aarch64:' /usr/lib/binfmt.d/qemu-aarch64.conf 2>/dev/null || true)
  [ -n "$line" ] || die "no qemu-aarch64 binfmt line in /usr/lib/binfmt.d/qemu-aarch64.conf (qemu-user-static broken?)"
  [ -e "$BM/qemu-aarch64" ] && echo -1 >"$BM/qemu-aarch64"
  echo "$line" >"$BM/register" || die "could not register qemu-aarch64 with binfmt_misc"
fi
handler_ok || die "qemu-aarch64 is not registered with binfmt_misc with the F flag: $(tr '\n' ' ' <"$BM/qemu-aarch64" 2>/dev/null)"
say "binfmt_misc: qemu-aarch64 $(sed -n 's/^interpreter //p' "$BM/qemu-aarch64"), $(grep '^flags' "$BM/qemu-aarch64")"

# ---------------------------------------------------------------------------------------------- engine
DOCKERD_PID=""
cleanup() {
  local rc=$?
  if [ -n "${EDGE_DELAY_PID:-}" ]; then kill "$EDGE_DELAY_PID" 2>/dev/null || true; fi  # the host-side delay stage
  for c in "$EDGE_NAME-check" "$EDGE_NAME" "$CLOUD_NAME" picoarm-nfqbuild$$; do
    $DOCKER rm -f "$c" >/dev/null 2>&1 || true
  done
  $DOCKER network rm "$NET" >/dev/null 2>&1 || true
  rm -rf "$WORK/ctx" "$WORK/basectx"
  if [ -n "$DOCKERD_PID" ]; then
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
  fi
  phase ""
  if [ ${#PHASES[@]} -gt 0 ]; then
    say "phase times:"
    for p in "${PHASES[@]}"; do printf 'arm64_test:   %-22s %5s s\n' "${p% *}" "${p##* }"; done
  fi
  say "finished in $(elapsed) (exit $rc)"
  say "$PASSED passed, $FAILED failed"
}
trap cleanup EXIT

if ! $DOCKER info >/dev/null 2>&1; then
  say "starting dockerd (log: $WORK/dockerd.log)"
  /usr/sbin/dockerd >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 60); do $DOCKER info >/dev/null 2>&1 && break; kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
  $DOCKER info >/dev/null 2>&1 || { tail -15 "$WORK/dockerd.log"; die "dockerd does not start on this machine"; }
fi
say "docker $($DOCKER version --format '{{.Server.Version}}')"

# ---------------------------------------------------------------------------------------------- base image
# A minimal arm64 Debian 12 (Python 3.11) with what deploy/shape.sh needs, the same package list as
# .ci/docker_test.sh's amd64 base: debootstrap's first stage here, its second stage chrooted under qemu. It becomes
# an image with `FROM scratch` + ADD built for linux/arm64, which records the architecture (docker 20.10's
# `docker import --platform` does not: the image would say amd64 and BuildKit would not take it as an arm64 base).
phase base-image
arch_of() { $DOCKER image inspect -f '{{.Architecture}}' "$1" 2>/dev/null || true; }
if [ "$(arch_of "$BASE_IMAGE")" != arm64 ]; then
  say "building $BASE_IMAGE with debootstrap under qemu (about 7 minutes, once)"
  ROOTFS="$WORK/rootfs"
  rm -rf "$ROOTFS"
  debootstrap --arch=arm64 --foreign --variant=minbase \
    --include=python3,python3-venv,python3-pip,iproute2,iptables,libnetfilter-queue1,ca-certificates \
    bookworm "$ROOTFS" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; die "debootstrap (first stage) failed"; }
  chroot "$ROOTFS" /debootstrap/debootstrap --second-stage >>"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; die "debootstrap second stage (arm64, under qemu) failed"; }
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  rm -rf "$WORK/basectx" && mkdir -p "$WORK/basectx"
  tar -C "$ROOTFS" -cf "$WORK/basectx/rootfs.tar" .
  rm -rf "$ROOTFS"
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["bash"]\n' >"$WORK/basectx/Dockerfile"
  DOCKER_BUILDKIT=1 $DOCKER build --platform linux/arm64 --progress=plain -t "$BASE_IMAGE" "$WORK/basectx" \
    >"$WORK/build-base.log" 2>&1 || { tail -20 "$WORK/build-base.log"; die "importing the arm64 rootfs failed"; }
  rm -rf "$WORK/basectx"
  [ "$(arch_of "$BASE_IMAGE")" = arm64 ] || die "$BASE_IMAGE has architecture '$(arch_of "$BASE_IMAGE")', not arm64"
else
  say "$BASE_IMAGE exists (arm64), reused"
fi
got=$($DOCKER run --rm --platform linux/arm64 "$BASE_IMAGE" uname -m) || die "an arm64 container does not start"
[ "$got" = aarch64 ] || die "uname -m in the arm64 base prints '$got', not aarch64"
say "arm64 base runs: uname -m = $got"

# ---------------------------------------------------------------------------------------------- wheelhouse
# The host's pip downloads aarch64 wheels (--platform, --only-binary). pip evaluates environment markers against
# the interpreter that runs it, not --platform, so without help it would add torch's x86_64-only CUDA
# requirements (nvidia-*-cu12, triton: 3 GB); platform.machine() is made to say aarch64 for the resolution.
phase wheelhouse
PYVER=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[ "$PYVER" = 3.11 ] || die "the venv's Python is $PYVER; the arm64 base's is 3.11 and the wheels must match"
WHEELS="$WORK/wheels"
mkdir -p "$WHEELS"
$PY -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(d for d in p['dependencies'] + p['optional-dependencies']['torch'] \
if not d.replace(' ', '').startswith('torch')))" >"$WORK/requirements.txt"
plat=()
for t in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014; do plat+=(--platform "${t}_aarch64"); done
$PY - download -q --disable-pip-version-check "${plat[@]}" --python-version 3.11 --implementation cp \
    --only-binary=:all: -d "$WHEELS" "$TORCH_SPEC" setuptools wheel -r "$WORK/requirements.txt" \
    >"$WORK/wheels.log" 2>&1 <<'EOF' || { grep -v 'is ignored' "$WORK/wheels.log" | tail -20; die "pip download (aarch64) failed"; }
import platform, runpy, sys
platform.machine = lambda: "aarch64"   # environment markers as on the arm64 image
sys.argv = ["pip", *sys.argv[1:]]
runpy.run_module("pip", run_name="__main__", alter_sys=True)
EOF
if ls "$WHEELS" | grep -qiE '^(nvidia|cuda|triton)'; then
  die "the aarch64 wheelhouse has CUDA packages ($(ls "$WHEELS" | grep -iE '^(nvidia|cuda|triton)' | tr '\n' ' '))"
fi
$PY - "$WHEELS" "$TORCH_SPEC" <<'EOF' || die "the wheelhouse's torch is not an aarch64 CPU build"
import glob, re, sys, zipfile
ver = sys.argv[2].split("==")[-1]
whl = glob.glob(f"{sys.argv[1]}/torch-{ver}-cp311-*aarch64*.whl")
assert whl, f"no aarch64 torch {ver} wheel"
z = zipfile.ZipFile(whl[0])
v = z.read("torch/version.py").decode()
cuda = re.search(r"^cuda: .*= (.*)$", v, re.M).group(1)
meta = z.read(f"torch-{ver}.dist-info/METADATA").decode().splitlines()
hard = [l for l in meta if l.startswith("Requires-Dist: nvidia") and "x86_64" not in l]
print(f"arm64_test: torch wheel {whl[0].rsplit('/', 1)[-1]}: version {re.search(r'__version__ = (.*)', v).group(1)}, "
      f"cuda {cuda}; CUDA requirements on aarch64: {len(hard)}")
sys.exit(0 if cuda == "None" and not hard else 1)
EOF

# netfilterqueue (the delay stage where the kernel has no netem) publishes no wheels: compiled once in the arm64
# base under qemu (gcc, Debian's Cython: the sdist's pregenerated C is too old for Python 3.11 and would be
# used as it is newer than the .pyx, so it is deleted first), cached.
phase netfilterqueue
NFQ_WHEEL=$(ls "$WHEELS"/[Nn]etfilter[Qq]ueue-$NFQ_VERSION-*aarch64*.whl 2>/dev/null | head -1 || true)
if [ -z "$NFQ_WHEEL" ]; then
  say "compiling netfilterqueue $NFQ_VERSION for aarch64 under qemu (a few minutes, once)"
  mkdir -p "$WORK/sdist"
  # the sdist itself (pip download would run its build backend just to read metadata): PyPI's JSON simple API
  $PY - "$WORK/sdist" "$NFQ_VERSION" >"$WORK/nfq.log" 2>&1 <<'EOF' || { tail -20 "$WORK/nfq.log"; die "could not download the netfilterqueue $NFQ_VERSION sdist"; }
import hashlib, json, sys, urllib.request
out, ver = sys.argv[1:3]
req = urllib.request.Request("https://pypi.org/simple/netfilterqueue/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(req, timeout=60))["files"]
f = next(f for f in files if f["filename"].lower() == f"netfilterqueue-{ver}.tar.gz")
data = urllib.request.urlopen(f["url"], timeout=120).read()
assert hashlib.sha256(data).hexdigest() == f["hashes"]["sha256"], "sha256 mismatch"
open(f"{out}/{f['filename']}", "wb").write(data)
print(f"downloaded {f['filename']} ({len(data)} bytes, sha256 ok)")
EOF
  SDIST=$(ls "$WORK"/sdist/*etfilter*ueue-$NFQ_VERSION.tar.gz | head -1)
  $DOCKER run --rm --platform linux/arm64 --name picoarm-nfqbuild$$ -v "$WORK/sdist:/src:ro" -v "$WHEELS:/out" \
    "$BASE_IMAGE" sh -c "set -e; apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends gcc libc6-dev python3-dev libnetfilter-queue-dev python3-setuptools python3-wheel cython3 \
      >/dev/null; mkdir /build; tar -C /build -xzf /src/$(basename "$SDIST"); cd /build/*; rm -f netfilterqueue/_impl.c; \
      python3 -m pip wheel -q --no-deps --no-build-isolation -w /out ." \
    >>"$WORK/nfq.log" 2>&1 || { tail -30 "$WORK/nfq.log"; die "compiling netfilterqueue for aarch64 failed"; }
  NFQ_WHEEL=$(ls "$WHEELS"/[Nn]etfilter[Qq]ueue-$NFQ_VERSION-*aarch64*.whl | head -1)
fi
say "wheelhouse: $(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1), netfilterqueue: $(basename "$NFQ_WHEEL")"

# ---------------------------------------------------------------------------------------------- the edge image
# deploy/Dockerfile.edge unchanged, for linux/arm64; the context is a copy of the tracked and new files plus the
# wheelhouse, so pip in the image runs with --no-index. Its RUN steps execute under qemu.
phase edge-image
CTX="$WORK/ctx"
rm -rf "$CTX"
mkdir -p "$CTX/wheels"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$CTX"
cp -l "$WHEELS"/*.whl "$CTX/wheels/" 2>/dev/null || cp "$WHEELS"/*.whl "$CTX/wheels/"
DOCKER_BUILDKIT=1 $DOCKER build --platform linux/arm64 --progress=plain --build-arg BASE="$BASE_IMAGE" \
  --build-arg EXTRAS=torch --build-arg TORCH_SPEC="$TORCH_SPEC" -f "$CTX/deploy/Dockerfile.edge" -t "$EDGE_IMAGE" "$CTX" \
  >"$WORK/build-edge.log" 2>&1 || { tail -30 "$WORK/build-edge.log"; die "docker build (edge, linux/arm64) failed"; }
rm -rf "$CTX"
grep -q "Successfully installed netfilterqueue" "$WORK/build-edge.log" || $DOCKER run --rm --platform linux/arm64 \
  --entrypoint python3 "$EDGE_IMAGE" -c "import netfilterqueue" || die "netfilterqueue did not install in the arm64 image"
[ "$(arch_of "$EDGE_IMAGE")" = arm64 ] || die "$EDGE_IMAGE has architecture '$(arch_of "$EDGE_IMAGE")', not arm64"

phase edge-check
if $DOCKER run --rm --platform linux/arm64 --name "$EDGE_NAME-check" --entrypoint sh "$EDGE_IMAGE" -c '
  uname -m; python3 - <<EOF
import platform, time, torch, netfilterqueue, picospec
x = torch.randn(256, 256)
t = time.perf_counter(); y = x @ x; dt = time.perf_counter() - t
print(f"python {platform.python_version()} {platform.machine()}; torch {torch.__version__} (cuda {torch.version.cuda},"
      f" cuda available {torch.cuda.is_available()}); quantized engines {torch.backends.quantized.supported_engines};"
      f" 256x256 matmul {dt * 1e3:.1f} ms, finite {bool(torch.isfinite(y).all())}")
EOF' >"$WORK/edge-check.out" 2>&1 && [ "$(head -1 "$WORK/edge-check.out")" = aarch64 ] \
   && grep -q "cuda None, cuda available False" "$WORK/edge-check.out" && grep -q "finite True" "$WORK/edge-check.out"; then
  sed 's/^/arm64_test: edge image: /' "$WORK/edge-check.out"
  PASSED=$((PASSED + 1))
else
  cat "$WORK/edge-check.out"
  die "the arm64 edge image does not run aarch64 with a working CPU torch"
fi

# ---------------------------------------------------------------------------------------------- the link
phase cloud-up
if [ "$(arch_of "$CLOUD_IMAGE")" != amd64 ]; then
  say "$CLOUD_IMAGE is missing: building it with .ci/docker_test.sh"
  bash "$REPO/.ci/docker_test.sh" || die ".ci/docker_test.sh failed, so there is no $CLOUD_IMAGE"
fi
for m in "$TARGET" "${DRAFT%%:*}"; do
  [ -f "$MODELS/models/$m/picospec_manifest.json" ] || die "$m is not prepared in $MODELS (make models)"
done
FEATURES=$($PY -m picospec.netlab.shaping detect) || die "could not probe the kernel's shaping features"
say "kernel: $FEATURES"
SHAPING=$($PY -c "import json, sys; f = json.loads(sys.argv[1]); \
print('netem' if f['netem'] else 'tbf+nfqueue' if f['tbf'] and f['nfqueue'] else '')" "$FEATURES")
[ -n "$SHAPING" ] || die "link shaping: the kernel has neither netem nor tbf + iptables NFQUEUE"
LINK=(-e PICOSPEC_RTT_MS=$RTT_MS -e PICOSPEC_UP_MBIT=$RATE_MBIT -e PICOSPEC_DOWN_MBIT=$RATE_MBIT -e PICOSPEC_LOSS=0)
$DOCKER network create "$NET" >/dev/null
$DOCKER run -d --name "$CLOUD_NAME" --network "$NET" --network-alias cloud --init --cap-add NET_ADMIN "${LINK[@]}" \
  -e PICOSPEC_SIDE=cloud -v "$MODELS:/models:ro" "$CLOUD_IMAGE" \
  picospec-cloud --target "$TARGET" --host 0.0.0.0 --port 50051 --threads 1 >/dev/null
up=""
for _ in $(seq 1 180); do
  st=$($DOCKER inspect -f '{{.State.Status}}' "$CLOUD_NAME")
  [ "$st" = running ] || { $DOCKER logs "$CLOUD_NAME" 2>&1 | tail -30; die "the cloud container is $st"; }
  if $DOCKER exec "$CLOUD_NAME" python3 -m picospec.cloud_server.health_probe 127.0.0.1:50051 >/dev/null 2>&1; then
    up=1; break
  fi
  sleep 1
done
[ -n "$up" ] || { $DOCKER logs "$CLOUD_NAME" 2>&1 | tail -30; die "the cloud was not SERVING (gRPC health) within 180 s"; }
say "cloud ($(arch_of "$CLOUD_IMAGE")) serving $TARGET; its shaping: $($DOCKER exec "$CLOUD_NAME" cat /tmp/picospec-shaping)"
# The edge's end of the link is shaped from the host: under qemu-user, the arm64 tc and iptables cannot open
# netlink sockets ("Cannot talk to rtnetlink: Operation not supported"), so deploy/shape.sh cannot shape from
# inside the arm64 container. The same code (netlab.shaping apply --side edge: tbf on its egress, the NFQUEUE delay
# stage on its ingress) runs natively with the host's tc, iptables and venv inside the container's network
# namespace (nsenter -n), before anything is sent. The edge container idles (no PICOSPEC_RTT_MS: its entrypoint
# shapes nothing) and the commands run in it with docker exec.
$DOCKER run -d --platform linux/arm64 --name "$EDGE_NAME" --network "$NET" --cap-add NET_ADMIN \
  -e PICOSPEC_WAIT_READY_S=300 -v "$MODELS:/models:ro" "$EDGE_IMAGE" sleep infinity >/dev/null
EDGE_PID=$($DOCKER inspect -f '{{.State.Pid}}' "$EDGE_NAME")
nsenter -t "$EDGE_PID" -n $PY -m picospec.netlab.shaping apply --detach --dev eth0 --side edge --rtt-ms "$RTT_MS" \
  --up-mbit "$RATE_MBIT" --down-mbit "$RATE_MBIT" --loss 0 --log "$WORK/nfq_delay-edge.log" >"$WORK/shape-edge.out" 2>&1 \
  || { cat "$WORK/shape-edge.out"; die "could not shape the edge container's eth0 from the host"; }
EDGE_DELAY_PID=$(sed -n 's/.*delay stage pid \([0-9]*\).*/\1/p' "$WORK/shape-edge.out")
say "edge (arm64) $(grep -h 'method=' "$WORK/shape-edge.out") [applied from the host in its network namespace]"
EDGE_EXEC=($DOCKER exec "$EDGE_NAME")

phase link-measure
$DOCKER exec -d "$CLOUD_NAME" python3 -m picospec.netlab.measure serve --port 5201
"${EDGE_EXEC[@]}" python3 -m picospec.netlab.measure client --host cloud \
  --port 5201 --json --expect-up-mbit "$RATE_MBIT" --expect-down-mbit "$RATE_MBIT" \
  >"$WORK/measure.out" 2>"$WORK/measure.err" || { cat "$WORK/measure.err"; die "the measurement failed"; }
if $PY .ci/checks.py link "$WORK/measure.out" --rtt-ms "$RTT_MS" --rate-mbit "$RATE_MBIT" --tol "$TOL" --prefix arm64_test
then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi

# ---------------------------------------------------------------------------------------------- generation
phase generation
say "arm64 edge, draft $DRAFT: cloud, sync, pipeline"
timeout 1500 "${EDGE_EXEC[@]}" picospec-edge --server cloud:50051 \
  --draft "$DRAFT" --threads 1 --timeout-s 1200 --prompt "$PROMPT" --max-new-tokens "$N_NEW" --temperature 0 \
  --mode cloud,sync,pipeline --json >"$WORK/edge.out" 2>"$WORK/edge.err" \
  || { tail -30 "$WORK/edge.err"; die "picospec-edge (arm64, draft $DRAFT) failed"; }
say "statistics (edge: arm64 under qemu, draft $DRAFT; cloud: x86):"
# the emulated draft is too slow for the pipeline to use (decode-ahead decodes alone): only sync must speculate
if $PY .ci/checks.py greedy "$WORK/edge.out" --speculated sync --floor 0 --prefix arm64_test --table
then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi

say "shaping: $SHAPING on both sides (cloud x86: deploy/shape.sh in the container; edge arm64: the same, applied from the host)"
[ "$FAILED" = 0 ] || exit 1
