#!/usr/bin/env bash
# The demo: a cloud server and an edge client on one core each (one thread each), one chat prompt. First the fastest
# cloud alone outside this project (llama.cpp running the target's GGUF by itself on the cloud's core), then the
# project's `cloud` (the target alone through the cloud), the default (`pipeline`) and the paper's `picospec`, text
# streamed as it commits, and the runs' statistics side by side, cloud compute per token included.
set -euo pipefail
PORT=${PICOSPEC_DEMO_PORT:-50151}
TARGET=${PICOSPEC_TARGET:-qwen2.5-coder-1.5b-instruct}
DRAFT=${PICOSPEC_DRAFT:-qwen2.5-coder-0.5b-instruct}
PROMPT=${PICOSPEC_PROMPT:-Write a Python function that checks whether a string is a palindrome.}
MAX_NEW=${PICOSPEC_MAX_NEW_TOKENS:-96}
MODES=${PICOSPEC_DEMO_MODES:-cloud,pipeline,picospec}

# one core each when there are two; both share core 0 on a single-core machine
CLOUD_CPU=$(( $(nproc) > 1 ? 1 : 0 ))
LOG=$(mktemp -t picospec-cloud.XXXXXX.log)
taskset -c "$CLOUD_CPU" picospec-cloud --target "$TARGET" --host 127.0.0.1 --port "$PORT" --threads 1 >"$LOG" 2>&1 &
CLOUD_PID=$!
trap 'kill $CLOUD_PID 2>/dev/null || true; wait $CLOUD_PID 2>/dev/null || true' EXIT

echo "demo: starting the cloud ($TARGET, core $CLOUD_CPU); log in $LOG" >&2
for _ in $(seq 1 600); do
  grep -q "serving" "$LOG" && break
  kill -0 $CLOUD_PID 2>/dev/null || { cat "$LOG" >&2; echo "demo: the cloud server died" >&2; exit 1; }
  sleep 1
done
grep -q "serving" "$LOG" || { cat "$LOG" >&2; echo "demo: the cloud did not come up in 600 s" >&2; exit 1; }

# the reference a CPU user has without this project: llama.cpp alone on the target's GGUF, the same core and prompt
if python -c "import llama_cpp" 2>/dev/null; then
  echo "demo: llama.cpp alone ($TARGET's GGUF, core $CLOUD_CPU, greedy, $MAX_NEW tokens)" >&2
  taskset -c "$CLOUD_CPU" python -m picospec.bench.llama_alone --target "$TARGET" --threads 1 \
    --max-new-tokens "$MAX_NEW" --chat-prompt "$PROMPT" --summary
fi

echo "demo: edge ($DRAFT, core 0), modes $MODES" >&2
taskset -c 0 picospec-edge --server "127.0.0.1:$PORT" --draft "$DRAFT" --threads 1 --chat \
  --prompt "$PROMPT" --max-new-tokens "$MAX_NEW" --mode "$MODES" "$@"
