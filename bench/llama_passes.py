"""What one llama.cpp pass costs by size: the verifier's cost curve that decides whether speculation can pay.

A pass of n tokens appended after a --context-token prefix (n = 1 is a decode step), each size timed --repeats
times after two untimed passes (bench/engine.py's `time_passes`, as for the torch engines), median in ms, on the
engine the project runs (shared/llama_backend.py, one thread, all logits kept as a verification keeps them). With it, which of llama.cpp's CPU code ran: the same GGUF
decodes 1.2x faster with AVX-512 code than with AVX2 code on the same CPU (docs/results/llama_cpu_variants).

    taskset -c 1 python -m picospec.bench.llama_passes --models qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from picospec.bench.engine import time_passes


def measure(name: str, sizes: Sequence[int], context: int, repeats: int, threads: int) -> dict[int, float]:
    """Median ms of a pass of n tokens after `context` cached ones, per n."""
    from picospec.shared.models import load_gguf_model

    model = load_gguf_model(name, threads=threads, progress=False).model
    backend = model.backend(n_ctx=context + max(sizes) + 1)
    backend.reset()
    backend.forward(list(range(1000, 1000 + context)), num_logits=1)
    seconds = time_passes(backend.forward, backend.truncate, context, sizes, repeats, sync=lambda: None,
                          vocab=model.config.vocab_size)
    return {n: 1e3 * s for n, s in seconds.items()}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m picospec.bench.llama_passes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct",
                   help="comma-separated built-in names or .gguf paths")
    p.add_argument("--sizes", default="1,2,3,4,5,8", help="comma-separated pass sizes (1 = decode)")
    p.add_argument("--context", type=int, default=100, help="tokens cached before each timed pass")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the table as JSON here")
    args = p.parse_args(argv)
    from picospec.shared.llama_backend import cpu_features

    sizes = [int(s) for s in args.sizes.split(",")]
    features = " ".join(cpu_features())
    print(f"llama.cpp's CPU code: {features}\n\n| model | " + " | ".join(f"pass of {n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    rows = {}
    for name in args.models.split(","):
        rows[name] = measure(name, sizes, args.context, args.repeats, args.threads)
        print(f"| {name} | " + " | ".join(f"{rows[name][n]:.0f}" for n in sizes) + " |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"llama_cpp_cpu": features, "settings": vars(args), "ms": rows},
                                             indent=1))


if __name__ == "__main__":
    sys.exit(main())
