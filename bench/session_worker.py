"""An edge worker of `picospec-bench serve` and `soak`: one process that loads the draft once and runs many
concurrent sessions, each with its own EdgeClient (its own gRPC channel and draft thread: separate edges that
happen to share one copy of the draft's weights). One JSON request per line on stdin, one JSON line per finished
generation (and one when a run is done) on stdout.

    python -m picospec.bench.session_worker --draft MODEL --worker I

Requests: {"op": "run", "run": ID, "server": "H:P", "sessions": [ids], "plan": PLAN} and {"op": "quit"}.
PLAN: {"kind": "fixed", "gens": G, "spec": SPEC}: G generations per session, back to back, seed spec.seed +
1000 x session + k (and, where the plan lists "prompts", session s the s-th of them in turn); {"kind": "soak", "seed": S, "duration_s": D, "max_tokens": M, "timeout_s": T}: generations as
bench.soak.soak_spec picks them, started until D seconds have passed. "start_at" in a plan: a time.monotonic()
value (CLOCK_MONOTONIC, one clock for every process of the machine): sessions connect, then wait for it. SPEC: prompt, chat, mode, overrides
(EdgeConfig fields), seed, fresh_client (a new client, hence a new channel, for this generation).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

# per-generation statistics the orchestrators use (the whole stats dict would be ~2 KB a generation)
KEPT_STATS = ("generated_tokens", "finish_reason", "ttft_s", "decode_tokens_per_s", "tokens_per_s", "wall_s", "rounds",
              "mean_accepted_len", "acceptance_rate", "admission_retries", "admission_wait_s", "reconnects", "exact")


def _claim_stdout() -> Any:
    """Replies go to a private copy of stdout; fd 1 then points at stderr, so library prints cannot corrupt them."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def spec_for(plan: dict[str, Any], session: int, k: int) -> dict[str, Any]:
    """The k-th generation of a session under `plan` (see the module docstring)."""
    if plan["kind"] == "fixed":
        spec = dict(plan["spec"])
        spec["seed"] = spec.get("seed", 0) + 1000 * session + k
        if plan.get("prompts"):  # each session its own prompt, in turn
            spec["prompt"] = plan["prompts"][session % len(plan["prompts"])]
        return spec
    from picospec.bench.soak import soak_spec

    spec = soak_spec(plan["seed"], session, k, plan.get("max_tokens", 64))
    if plan.get("timeout_s"):  # a loaded cloud serving many sessions is slow, not broken: a deadline to match
        spec["overrides"]["timeout_s"] = plan["timeout_s"]
    return spec


def more(plan: dict[str, Any], k: int, deadline: float | None) -> bool:
    """Whether a session starts its k-th generation."""
    if plan["kind"] == "fixed":
        return k < plan["gens"]
    return deadline is not None and time.monotonic() < deadline


class Worker:
    def __init__(self, draft_name: str, worker: int, out: Any) -> None:
        import torch

        from picospec.shared.config import EdgeConfig
        from picospec.shared.models import load_model

        torch.set_num_threads(1)
        self.id, self.out = worker, out
        self.draft = load_model(draft_name, progress=False)
        self.base = EdgeConfig(draft=draft_name, threads=1, wait_ready_s=30.0)
        self.encoded: dict[tuple[str, bool], list[int]] = {}

    def emit(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj) + "\n")

    def ids(self, prompt: str, chat: bool) -> list[int]:
        from picospec.edge_client.text import encode_prompt

        if (prompt, chat) not in self.encoded:
            self.encoded[(prompt, chat)] = encode_prompt(self.draft.tokenizer, prompt, chat=chat)
        return self.encoded[(prompt, chat)]

    async def run(self, req: dict[str, Any]) -> None:
        plan = req["plan"]
        deadline = time.monotonic() + plan["duration_s"] if plan.get("duration_s") else None
        await asyncio.gather(*(self.session(req["run"], req["server"], s, plan, deadline) for s in req["sessions"]))
        self.emit({"event": "done", "run": req["run"]})

    async def session(self, run: Any, server: str, session: int, plan: dict[str, Any], deadline: float | None) -> None:
        """One edge: generations back to back; a failure is recorded and the next generation starts afresh."""
        from picospec.edge_client.client import EdgeClient

        client: EdgeClient | None = None
        k = 0
        try:
            if plan.get("start_at") is not None:  # every session of every worker starts at once (a shared clock)
                client = EdgeClient(dataclasses.replace(self.base, server=server), self.draft)
                await client.connect()
                await asyncio.sleep(max(0.0, plan["start_at"] - time.monotonic()))
            while more(plan, k, deadline):
                spec = spec_for(plan, session, k)
                if client is not None and spec.get("fresh_client"):
                    await client.close()
                    client = None
                if client is None:
                    client = EdgeClient(dataclasses.replace(self.base, server=server), self.draft)
                rec = await self.generation(client, spec)
                if rec["error"]:
                    await client.close()  # whatever state the failure left the channel in
                    client = None
                self.emit({"event": "gen", "run": run, "session": session, "k": k, **rec})
                k += 1
        finally:
            if client is not None:
                await client.close()

    async def generation(self, client: Any, spec: dict[str, Any]) -> dict[str, Any]:
        """Connect (if not yet) and run one generation to its end; times on the machine-wide monotonic clock."""
        t0 = time.monotonic()
        rec: dict[str, Any] = {"mode": spec["mode"], "verify": spec["overrides"].get("verify"),
                               "max_new_tokens": spec["overrides"].get("max_new_tokens"),
                               "temperature": spec["overrides"].get("temperature"), "seed": spec["seed"],
                               "start": t0, "error": None}
        gen = None
        try:
            await client.connect()
            gen = client.generate(self.ids(spec["prompt"], spec.get("chat", True)), mode=spec["mode"],
                                  seed=spec["seed"], **spec["overrides"])
            await gen.collect()
        except Exception as e:  # noqa: BLE001 - a failed generation is a result to report, not the worker's end
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rec["end"] = time.monotonic()
        st = gen.stats.to_dict() if gen is not None else {}
        rec.update({k: st.get(k) for k in KEPT_STATS})
        return rec


async def _loop(args: argparse.Namespace, out: Any) -> None:
    t0 = time.perf_counter()
    worker = Worker(args.draft, args.worker, out)
    worker.emit({"event": "ready", "load_s": time.perf_counter() - t0})
    loop = asyncio.get_running_loop()
    handlers: dict[str, Callable[[dict[str, Any]], Any]] = {"run": worker.run}
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        req = json.loads(line)
        if req["op"] == "quit":
            break
        try:
            await handlers[req["op"]](req)
        except Exception as e:  # noqa: BLE001 - said to the orchestrator, which decides
            worker.emit({"event": "error", "run": req.get("run"), "error": f"{type(e).__name__}: {e}"})


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m picospec.bench.session_worker")
    p.add_argument("--draft", required=True)
    p.add_argument("--worker", type=int, default=0)
    args = p.parse_args(argv)
    out = _claim_stdout()
    asyncio.run(_loop(args, out))


if __name__ == "__main__":
    main()
