"""The edge worker of the network benchmarks: one process, in the edge namespace on the edge core, that loads
the draft once and runs what the orchestrator (bench.testbed.Testbed) asks, one JSON request per line on stdin,
one JSON reply per line on stdout: connect to the cloud, measure the RTT, run one generation, close, quit.

    python -m picospec.bench.edge_worker --draft MODEL --max-new-tokens N --temperature T
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Sequence


def _claim_stdout() -> Any:
    """The worker answers on its own copy of stdout; fd 1 then points at stderr, so that nothing a library
    prints can corrupt the JSON replies."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


async def _worker_loop(args: argparse.Namespace, out: Any) -> None:
    from picospec.edge_client.text import encode_prompt
    from picospec.edge_client.client import EdgeClient
    from picospec.netlab.measure import rtt_samples_ms
    from picospec.shared.config import EdgeConfig
    from picospec.edge_client.cli import leave_torch_out, load_draft

    t0 = time.perf_counter()
    base = EdgeConfig(draft=args.draft, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      ignore_eos=True, threads=1, wait_ready_s=120.0, draft_engine=args.draft_engine)
    leave_torch_out(base)  # as picospec-edge: a llama.cpp draft's process never imports torch
    draft = load_draft(base)  # on the engine --draft-engine picks, one thread (torch's too), as picospec-edge does
    client: EdgeClient | None = None
    encoded: dict[str, list[int]] = {}
    loop = asyncio.get_running_loop()

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")

    reply({"ok": True, "event": "ready", "load_s": time.perf_counter() - t0})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        req = json.loads(line)
        op = req["op"]
        try:
            if op in ("connect", "close") and client is not None:
                await client.close()
                client = None
            if op == "connect":
                client = EdgeClient(dataclasses.replace(base, server=req["server"]), draft)
                info = await client.connect()
                reply({"ok": True, "target": info.target_model})
            elif op == "close":
                reply({"ok": True})
            elif op == "rtt":
                samples = await loop.run_in_executor(None, rtt_samples_ms, req["host"], req["port"], req.get("n", 20))
                reply({"ok": True, "rtt_ms": statistics.median(samples), "samples": samples})
            elif op == "run":
                assert client is not None, "run before connect"
                if req["prompt"] not in encoded:
                    encoded[req["prompt"]] = encode_prompt(draft.tokenizer, req["prompt"], chat=True)
                ids = encoded[req["prompt"]]
                reply(await _run_one(client, ids, req))
            elif op == "quit":
                reply({"ok": True})
                break
            else:
                reply({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:  # noqa: BLE001 - one failing mode (e.g. one still being built) must not end the sweep
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
    if client is not None:
        await client.close()


async def _run_one(client: Any, ids: list[int], req: dict[str, Any]) -> dict[str, Any]:
    """One generation, cut at the timeout; stats plus the component times the performance model (docs/design.md §5) needs."""
    gen = client.generate(ids, mode=req["mode"], seed=req["seed"], **req.get("overrides", {}))
    counter = _CountingEwma.wrap(gen.stats.estimates)

    async def consume() -> None:
        async for _ in gen:
            pass

    timed_out = False
    try:
        await asyncio.wait_for(consume(), req["timeout_s"])
    except asyncio.TimeoutError:
        timed_out = True
        with contextlib.suppress(Exception):
            await gen.aclose()
    st = gen.stats
    extra = {"draft_s": st.draft_s, "prefill_edge_s": st.prefill_edge_s, "cloud_s": st.cloud_s,
             "prefill_cloud_s": st.prefill_cloud_s,
             # the cloud's pass cost per size as measured, read off for every size (n drafts; 0 = a decode step)
             "verify_at": {str(n): st.estimates.passes(n) for n in range(0, 13)},
             # per-token acceptance as the i.i.d. model of docs/design.md §5 means it: accepted / (accepted + rejections); the
             # stats' acceptance_rate divides by every token sent, counting those after a rejection as failures
             "acceptance_iid": counter.rate, "acceptance_trials": counter.trials}
    return {"ok": True, "timed_out": timed_out, "token_ids": gen.token_ids, "stats": st.to_dict(), "extra": extra}


class _CountingEwma:
    """Stands in for the client's acceptance EWMA (same value, so the draft-length choice is unchanged) and also
    counts what it is fed: 1 per accepted draft, 0 per rejection, the Bernoulli trials of the i.i.d. model."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.ones, self.trials = inner, 0.0, 0

    @classmethod
    def wrap(cls, estimates: Any) -> "_CountingEwma":
        c = cls(estimates.acceptance)
        estimates.acceptance = c
        return c

    def add(self, x: float) -> None:
        self.ones += x
        self.trials += 1
        self.inner.add(x)

    @property
    def value(self) -> float | None:
        return self.inner.value

    @property
    def alpha(self) -> float:
        return self.inner.alpha

    @property
    def rate(self) -> float | None:
        return self.ones / self.trials if self.trials else None


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m picospec.bench.edge_worker")
    p.add_argument("--draft", required=True)
    p.add_argument("--draft-engine", default="auto", choices=("auto", "llama.cpp", "torch"))
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--temperature", type=float, required=True)
    args = p.parse_args(argv)
    out = _claim_stdout()
    asyncio.run(_worker_loop(args, out))


if __name__ == "__main__":
    main()
