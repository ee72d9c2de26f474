#!/usr/bin/env bash
# The GPU measurements, one step per call, on a bare CUDA machine that has torch and transformers but not this
# project's other packages (a GPU lent for a session: docs/results/serve_gpu, docs/results/engine_gpu). Run from the
# repository root; results go to $OUT (default ./gpu_out), the log of each step beside them.
#
#   bash scripts/gpu_measure.sh wheels        # HERE, once, with network: the missing packages as wheels in .whl/
#   bash scripts/gpu_measure.sh tests         # THERE: tests/test_engine_cuda.py (graphs against eager and transformers)
#   bash scripts/gpu_measure.sh engine        # THERE: picospec-bench engine, 1.5B and 7B shapes, bf16
#   bash scripts/gpu_measure.sh serve         # THERE: picospec-bench serve, 7B shape, 1-64 sessions, batching on/off
#
# The targets are random: shape models (real shapes, random weights: timings only; the real weights are too big to
# carry). Serve runs --mode cloud: a random draft never agrees with a random target, so speculation would measure
# nothing; the figure is the cloud's decoding capacity through gRPC, the session code and the batcher.
# Each step fits in 10 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
WHEELS=(grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 zstandard==0.25.0)

there() {  # the carried wheels into /tmp/site, and this checkout importable as picospec (no install)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
    | tee -a "$OUT/gpu.txt"
}
bench() { python3 -m picospec.bench.cli "$@"; }

case "${1:-}" in
  wheels)
    echo /.whl/ >>.git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${WHEELS[@]}" ;;
  tests)
    there
    python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_engine_cuda.py 2>&1 | tee "$OUT/tests.log" ;;
  engine)
    there
    bench engine --targets random:qwen2.5-1.5b,random:qwen2.5-7b --dtypes bfloat16 \
      --out "$OUT/engine" 2>&1 | tee "$OUT/engine.log" ;;
  serve)
    there
    bench serve --target random:qwen2.5-7b --device cuda --dtype bfloat16 --draft random:qwen2.5-0.5b \
      --mode cloud --sessions "${SESSIONS:-1,4,16,32,64}" --gens 1 --max-new-tokens 64 \
      --out "$OUT/serve" 2>&1 | tee "$OUT/serve.log" ;;
  *)
    sed -n '2,13p' "$0"; exit 2 ;;
esac
