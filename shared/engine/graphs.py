"""CUDA graphs of the static engine's passes, one per (rows, bucket, keys read), as gpt-fast's `--compile` captures
decode. Keys read come in powers of two, so a short sequence does not pay for reading the whole cache.

A captured pass owns static input buffers (a PassInputs) and one output buffer; a call copies the inputs
in, replays, and returns the output buffer (overwritten by the next replay: callers copy what they keep). All
graphs share one memory pool, so their activations cost the largest one's memory, not the sum. Capture runs the
pass on the scratch slot, whose contents nobody reads.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from picospec.shared.engine.model import PassInputs, StaticEngine

log = logging.getLogger("picospec.engine")
WARMUP_PASSES = 3  # on a side stream before capture: cuBLAS handles and workspaces exist before the graph records


class CapturedPass:
    def __init__(self, engine: StaticEngine, rows: int, size: int, kv_len: int, pool: object) -> None:
        self.rows, self.size, self.kv_len = rows, size, kv_len
        self.inputs = engine._padded([], rows, size)  # static buffers: scratch rows of padding

        def pass_() -> torch.Tensor:
            return engine.forward(self.inputs, kv_len)                                           # [B, n, V_own]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_PASSES):
                pass_()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = pass_()

    def __call__(self, inputs: "PassInputs") -> torch.Tensor:
        for static, given in zip(self.inputs, inputs):
            static.copy_(given, non_blocking=True)
        self.graph.replay()
        return self.out


@torch.inference_mode()
def capture_all(engine: StaticEngine) -> dict[tuple[int, int, int], CapturedPass]:
    """Every (rows, bucket, keys read) of the engine's options, largest first (the pool is sized by the first)."""
    t0 = time.perf_counter()
    pool = torch.cuda.graph_pool_handle()
    graphs = {}
    kv_buckets = engine.kv_buckets()
    for rows in sorted(engine.options.batch_buckets, reverse=True):
        for size in sorted(engine.options.buckets, reverse=True):
            for kv_len in sorted(kv_buckets, reverse=True):
                graphs[(rows, size, kv_len)] = CapturedPass(engine, rows, size, kv_len, pool)
    torch.cuda.synchronize()
    log.info("captured %d CUDA graphs (rows %s x sizes %s x keys %s) in %.1fs", len(graphs),
             engine.options.batch_buckets, engine.options.buckets, kv_buckets, time.perf_counter() - t0)
    return graphs
