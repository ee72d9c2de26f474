"""What one llama.cpp pass costs by size: the verifier's cost curve that decides whether speculation can pay.

A pass of n tokens appended after a --context-token prefix (n = 1 is a decode step), each size timed --repeats
times after two untimed passes (bench/engine.py's `time_passes`, as for the torch engines), median in ms, on the
engine the project runs (shared/llama_backend.py, one thread, all logits kept as a verification keeps them). With it, which of llama.cpp's CPU code ran: the same GGUF
decodes 1.2x faster with AVX-512 code than with AVX2 code on the same CPU (docs/results/llama_cpu_variants).

    taskset -c 1 python -m picospec.bench.llama_passes --models qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct

With --neighbour NAME each model is timed alone, then while NAME decodes back to back on --neighbour-core (as a draft
drafting beside the cloud on the same host), then alone again: what one side's work costs the other where the two
share a machine's memory (the project's benchmarks run both sides on one host).

    taskset -c 0 python -m picospec.bench.llama_passes --models qwen2.5-coder-1.5b-instruct --sizes 1 --repeats 60 \
        --neighbour qwen2.5-coder-0.5b-instruct --neighbour-core 1
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from picospec.bench.engine import time_passes


def primed(name: str, threads: int, context: int, n_ctx: int) -> tuple[Any, Any]:
    """The GGUF model `name` on llama.cpp and a backend of `n_ctx` cells holding a `context`-token prefix."""
    from picospec.shared.models import load_gguf_model

    model = load_gguf_model(name, threads=threads, progress=False).model
    backend = model.backend(n_ctx=n_ctx)
    backend.reset()
    backend.forward(list(range(1000, 1000 + context)), num_logits=1)
    return model, backend


def measure(name: str, sizes: Sequence[int], context: int, repeats: int, threads: int) -> dict[int, float]:
    """Median ms of a pass of n tokens after `context` cached ones, per n."""
    model, backend = primed(name, threads, context, n_ctx=context + max(sizes) + 1)
    seconds = time_passes(backend.forward, backend.truncate, context, sizes, repeats, sync=lambda: None,
                          vocab=model.config.vocab_size)
    return {n: 1e3 * s for n, s in seconds.items()}


def decode_forever(name: str, threads: int) -> None:
    """The neighbour: decode steps back to back after a 100-token prefix until killed; a line on stdout once loaded."""
    _, backend = primed(name, threads, context=100, n_ctx=512)
    print("decoding", flush=True)
    while True:
        backend.forward([1234], num_logits=1)
        if backend.length >= 500:
            backend.truncate(100)


@contextlib.contextmanager
def neighbour(name: str, core: int, threads: int) -> Iterator[None]:
    """`name` decoding on `core` (another process) for as long as the block runs."""
    proc = subprocess.Popen([sys.executable, "-m", "picospec.bench.llama_passes", "--decode-forever", name,
                             "--threads", str(threads)], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    try:
        if proc.stdout.readline().strip() != "decoding":
            raise RuntimeError(f"the neighbour {name} did not start (exit status {proc.wait()})")
        yield
    finally:
        proc.kill()
        proc.wait()


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
    p.add_argument("--neighbour", help="a model decoding on --neighbour-core while each model is timed a second time")
    p.add_argument("--neighbour-core", type=int, default=1)
    p.add_argument("--decode-forever", metavar="NAME", help=argparse.SUPPRESS)  # the neighbour's own process
    args = p.parse_args(argv)
    if args.decode_forever:
        return decode_forever(args.decode_forever, args.threads)
    from picospec.shared.llama_backend import cpu_features

    sizes = [int(s) for s in args.sizes.split(",")]
    features = " ".join(cpu_features())
    print(f"llama.cpp's CPU code: {features}\n\n| model | " + " | ".join(f"pass of {n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    rows = {}
    for name in args.models.split(","):
        runs = [(name, contextlib.nullcontext())]
        if args.neighbour:
            runs = [(f"{name} (alone)", contextlib.nullcontext()),
                    (f"{name} ({args.neighbour} decoding on core {args.neighbour_core})",
                     neighbour(args.neighbour, args.neighbour_core, args.threads)),
                    (f"{name} (alone again)", contextlib.nullcontext())]
        for label, beside in runs:
            with beside:
                rows[label] = measure(name, sizes, args.context, args.repeats, args.threads)
            print(f"| {label} | " + " | ".join(f"{rows[label][n]:.0f}" for n in sizes) + " |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"llama_cpp_cpu": features, "settings": vars(args), "ms": rows},
                                             indent=1))


if __name__ == "__main__":
    sys.exit(main())
