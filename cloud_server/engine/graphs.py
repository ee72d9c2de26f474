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
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from picospec.cloud_server.engine.model import PassInputs, StaticEngine

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


def capture_plan(batch_buckets: Sequence[int], buckets: Sequence[int], kv_buckets: Sequence[int],
                 max_tokens: int = 0) -> list[tuple[int, int, int]]:
    """The (rows, bucket, keys read) to capture, largest first (the shared pool is sized by the first): every
    combination, but those whose padded pass (rows x bucket tokens) exceeds `max_tokens` (0 = no cap). Each graph
    keeps its own logits buffer, [rows, bucket, V] float32, so the cap bounds the memory of wide batches of long
    rows; a pass too wide for any graph runs eager, where rows of unequal length are packed, not padded."""
    return [(rows, size, kv_len)
            for rows in sorted(batch_buckets, reverse=True)
            for size in sorted(buckets, reverse=True)
            for kv_len in sorted(kv_buckets, reverse=True)
            if not max_tokens or rows * size <= max_tokens]


@torch.inference_mode()
def capture_all(engine: StaticEngine) -> dict[tuple[int, int, int], CapturedPass]:
    """Every pass of the engine's options' `capture_plan`, on one memory pool."""
    t0 = time.perf_counter()
    pool = torch.cuda.graph_pool_handle()
    opts, kv_buckets = engine.options, engine.kv_buckets()
    plan = capture_plan(opts.batch_buckets, opts.buckets, kv_buckets, opts.max_graph_tokens)
    graphs = {key: CapturedPass(engine, *key, pool) for key in plan}
    torch.cuda.synchronize()
    out_mb = sum(g.out.numel() * g.out.element_size() for g in graphs.values()) / 2**20
    log.info("captured %d CUDA graphs (rows %s x sizes %s x keys %s, at most %s tokens a pass) in %.1fs; their "
             "logits buffers hold %.0f MiB", len(graphs), opts.batch_buckets, opts.buckets, kv_buckets,
             opts.max_graph_tokens or "any", time.perf_counter() - t0, out_mb)
    return graphs
