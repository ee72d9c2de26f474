"""picospec-bench stress: hundreds of short generations under seeded timing jitter; reports hangs, errors, mismatches.

Terms
  cell      one combination of transport, edge mode, verification mode, sampling (greedy, or T=1 with top-p 0.9),
            draft length (fixed 3, or adaptive = draft_len 0) and decode-ahead (on, off). A cell runs --runs
            generations, each with its own session seed, jitter seeds, prompt (a chat, a code and a prose prompt in
            turn) and ignore_eos (off, on in turn; both within a cell of 2 runs or more).
  HANG      a generation that has not ended within --hang-s seconds. Its state is dumped at that moment (the edge's
            stats, the tokens so far, and gen.progress / gen.describe() where the edge offers them), then it is
            cancelled and the next one starts.
  ERROR     a generation that raised: its exception type and message are recorded.
  MISMATCH  a greedy generation whose tokens differ from the target's own greedy tokens, computed here by plain full
            forward passes of the target (no KV cache), cut after the target's first end-of-sequence token
            (inclusive) unless ignore_eos; or any generation longer than --max-new-tokens, or one that goes on past
            an end-of-sequence token while ignore_eos is off.

Transports
  inproc    cloud (PicoSpecService on 127.0.0.1:0) and edge (EdgeClient) in this process, on one event loop, with
            seeded jitter on both sides: messages are delayed by 0..--jitter-ms before they go out and after they
            arrive; the edge's online draft-length choice is sometimes steered to 0 (when decode-ahead is on: the
            interleaving behind the split-mode hang); the cloud sometimes pauses a few ms before decoding ahead, so
            drafts arrive and rounds happen.
  procs     the cloud is a separate picospec-cloud process (--threads 1) on a free loopback port, real gRPC; jitter
            and draft-length steering on the edge side only. Its log is saved in --out.

Grid, and what is skipped (meaningless combinations)
  sync, early-exit   4 verify modes x 2 samplings, draft length 3. Adaptive is skipped: it means a fixed 4 in
                     stop-and-wait modes. Decode-ahead is skipped: it exists in the pipelined modes only.
  pipeline           4 verify modes x 2 samplings x draft length {3, adaptive} x decode-ahead {on, off}.
  picospec           2 samplings only: the mode forces split-topk, draft length 4 and decode-ahead off (listed when
                     split-topk is among --verify).
  cloud, edge        not run: nothing speculates, there is no interleaving to stress.
The default run: 50 cells x 2 transports x --runs 4 = 400 generations. Exit status 1 if any hang, error or mismatch.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import torch

from picospec.bench.jitter import Jitter
from picospec.bench.ports import free_port
from picospec.cloud_server.grpc_setup import start_server
from picospec.cloud_server.server import PicoSpecService
from picospec.edge_client.client import EdgeClient, EdgeError, Generation
from picospec.edge_client.text import encode_prompt
from picospec.netlab.procs import stop_process
from picospec.shared.config import VERIFY_MODES, CloudConfig, EdgeConfig
from picospec.shared.fingerprint import eos_token_ids
from picospec.shared.models import LoadedModel, load_model

STRESS_MODES = ("sync", "early-exit", "pipeline", "picospec")
TRANSPORTS = ("inproc", "procs")
SAMPLINGS = {"greedy": (0.0, 1.0), "T=1,top-p=0.9": (1.0, 0.9)}  # name -> (temperature, top_p)
FIXED_DRAFT_LEN = 3
# (text, chat template?): a chat, a code and a prose prompt, used in turn
PROMPTS = (
    ("Hi! Can you suggest a name for my new puppy?", True),
    ("def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n", False),
    ("The lighthouse keeper climbed the stairs every evening, and on the night of the storm", False),
)
TRANSPORT_SEED_OFFSET = {"inproc": 0, "procs": 10_000_000}
CANCEL_S = 15.0  # how long a hung generation gets to unwind after it is cancelled


@dataclass
class StressConfig:
    target: str = "smollm2-135m-instruct"
    draft: str = "smollm2-135m-instruct:int8"
    modes: tuple[str, ...] = STRESS_MODES
    verify: tuple[str, ...] = VERIFY_MODES
    transports: tuple[str, ...] = TRANSPORTS
    runs: int = 4
    max_new_tokens: int = 32
    hang_s: float = 60.0
    jitter_ms: float = 4.0
    seed: int = 0
    out: Path = Path("bench_out/stress")
    cloud_start_s: float = 600.0  # procs: how long the cloud process may take to load and serve
    quiet: bool = False  # no progress lines (tests)


@dataclass(frozen=True)
class Cell:
    mode: str
    verify: str
    sampling: str
    draft_len: int  # 0 = adaptive
    decode_ahead: str  # "on", "off"; "-" where the mode has none

    def label(self) -> str:
        dl = "adaptive" if self.draft_len == 0 else str(self.draft_len)
        return f"{self.mode}/{self.verify}/{self.sampling}/len={dl}/da={self.decode_ahead}"

    def overrides(self) -> dict[str, Any]:
        temperature, top_p = SAMPLINGS[self.sampling]
        return {"verify": self.verify, "temperature": temperature, "top_p": top_p, "draft_len": self.draft_len,
                "decode_ahead": "off" if self.decode_ahead == "-" else self.decode_ahead}


def build_grid(modes: Sequence[str], verifies: Sequence[str]) -> list[Cell]:
    """Every meaningful combination (see the module docstring for what is skipped and why)."""
    cells: list[Cell] = []
    for mode in modes:
        for sampling in SAMPLINGS:
            if mode == "picospec":
                if "split-topk" in verifies:
                    cells.append(Cell(mode, "split-topk", sampling, 4, "off"))
                continue
            for verify in verifies:
                if mode == "pipeline":
                    cells += [Cell(mode, verify, sampling, dl, da) for dl in (FIXED_DRAFT_LEN, 0) for da in ("on", "off")]
                else:
                    cells.append(Cell(mode, verify, sampling, FIXED_DRAFT_LEN, "-"))
    return cells


# ---------------------------------------------------------------------------------------------- jitter hooks

class EdgeJitter(Jitter):
    """Jitter, and with decode-ahead on a draft-length choice sometimes steered to 0 (often while a split
    correction is owed: the interleaving that hung)."""

    def __init__(self, seed: int, max_s: float, zero_ok: bool) -> None:
        super().__init__(seed, max_s)
        self.zero_ok = zero_ok

    def steer_draft_len(self, chosen: int, awaiting_resolution: bool) -> int:
        if not self.zero_ok:
            return chosen
        return 0 if self.rng.random() < (0.5 if awaiting_resolution else 0.1) else chosen


class CloudJitter(Jitter):
    """Jitter, and sometimes a pause of a few ms before a decode-ahead step, so drafts arrive and rounds happen."""

    async def before_decode_ahead(self) -> None:
        if self.rng.random() < 0.5:
            await asyncio.sleep(self.rng.uniform(0.5 * self.max_s, 2 * self.max_s))


# ---------------------------------------------------------------------------------------------- greedy reference

class GreedyReference:
    """The target's greedy continuation of each prompt by full forward passes (no KV cache), cached per prompt."""

    def __init__(self, target: LoadedModel, n: int) -> None:
        self.target, self.n = target, n
        self.eos = eos_token_ids(target.model, target.tokenizer)
        self._cache: dict[tuple[int, ...], tuple[list[int], list[float]]] = {}

    def _compute(self, prompt_ids: Sequence[int]) -> tuple[list[int], list[float]]:
        seq, gaps = list(prompt_ids), []
        with torch.inference_mode():
            for _ in range(self.n):
                logits = self.target.model(torch.tensor([seq])).logits[0, -1]
                top2 = torch.topk(logits, 2).values
                gaps.append(float(top2[0] - top2[1]))  # a near-tie explains a flip from rounding, not a bug
                seq.append(int(logits.argmax()))
        return seq[len(prompt_ids):], gaps

    def expected(self, prompt_ids: Sequence[int], ignore_eos: bool) -> tuple[list[int], list[float]]:
        key = tuple(prompt_ids)
        if key not in self._cache:
            self._cache[key] = self._compute(prompt_ids)
        tokens, gaps = self._cache[key]
        if not ignore_eos:
            stop = next((i + 1 for i, t in enumerate(tokens) if t in self.eos), len(tokens))
            tokens, gaps = tokens[:stop], gaps[:stop]
        return tokens, gaps


def check_output(tokens: list[int], greedy: bool, ignore_eos: bool, prompt_ids: Sequence[int],
                 ref: GreedyReference) -> str | None:
    """None if the output is right; else what is wrong (a MISMATCH)."""
    if len(tokens) > ref.n:
        return f"{len(tokens)} tokens, more than max_new_tokens={ref.n}"
    if not ignore_eos:
        early = [i for i, t in enumerate(tokens[:-1]) if t in ref.eos]
        if early:
            return f"end-of-sequence token at position {early[0]} of {len(tokens)}, generation went on"
    if not greedy:
        return None
    expected, gaps = ref.expected(prompt_ids, ignore_eos)
    if tokens == expected:
        return None
    i = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected)))
    gap = f"{gaps[i]:.3g}" if i < len(gaps) else "-"
    return (f"differs from the target's greedy tokens at position {i} (got {tokens[i:i + 4]}, expected "
            f"{expected[i:i + 4]}; {len(tokens)} vs {len(expected)} tokens; reference top-2 logit gap there {gap})")


# ---------------------------------------------------------------------------------------------- one generation

def _plain(x: Any) -> Any:
    """Something json.dumps can write: dataclasses as dicts, containers recursively, anything else as its repr."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _plain(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return repr(x)


def state_dump(gen: Generation, service: PicoSpecService | None) -> dict[str, Any]:
    """What the edge (and, in process, the cloud) exposes while a generation hangs."""
    dump: dict[str, Any] = {"tokens_so_far": list(gen.token_ids), "stats": _plain(gen.stats.to_dict())}
    for owner, obj in (("edge", gen), ("cloud", service)):
        if obj is None:
            continue
        progress = getattr(obj, "progress", None)
        if progress is not None:
            dump[f"{owner}_progress"] = _plain(progress() if callable(progress) else progress)
        describe = getattr(obj, "describe", None)
        if callable(describe):
            dump[f"{owner}_describe"] = _plain(describe())
    if service is not None:
        dump["cloud_active_sessions"] = service.active_sessions
    return dump


@dataclass
class Ctx:
    """One transport's running pieces."""

    transport: str
    client: EdgeClient
    service: PicoSpecService | None  # inproc only
    cfg: StressConfig
    ref: GreedyReference
    prompts: list[list[int]]


async def _await_or_hang(gen: Generation, ctx: Ctx) -> tuple[str, Any]:
    """("ok", tokens), ("error", exception) or ("hang", state dump). The dump is taken before the cancellation,
    which would otherwise finish the stats as "cancelled" (hence asyncio.wait rather than asyncio.wait_for)."""
    task = asyncio.ensure_future(gen.collect())
    done, _ = await asyncio.wait({task}, timeout=ctx.cfg.hang_s)
    if not done:
        dump = state_dump(gen, ctx.service)
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_S)
        return "hang", dump
    if task.exception() is not None:
        return "error", task.exception()
    return "ok", task.result()


async def run_one(ctx: Ctx, cell: Cell, cell_index: int, r: int) -> dict[str, Any]:
    cfg = ctx.cfg
    seed = cfg.seed + 1000 * cell_index + r
    jseed = 2 * (seed + TRANSPORT_SEED_OFFSET[ctx.transport])
    prompt_index, ignore_eos = (cell_index + r) % len(ctx.prompts), (cell_index + r) % 2 == 1
    ctx.client.hooks = EdgeJitter(jseed, cfg.jitter_ms / 1e3, zero_ok=cell.decode_ahead == "on")
    if ctx.service is not None:
        ctx.service.hooks = CloudJitter(jseed + 1, cfg.jitter_ms / 1e3)
    prompt_ids = ctx.prompts[prompt_index]
    t0 = time.perf_counter()
    gen = ctx.client.generate(prompt_ids, mode=cell.mode, seed=seed, ignore_eos=ignore_eos, **cell.overrides())
    outcome, result = await _await_or_hang(gen, ctx)
    rec: dict[str, Any] = {"transport": ctx.transport, "cell": cell.label(), **dataclasses.asdict(cell), "run": r,
                           "seed": seed, "edge_jitter_seed": jseed, "cloud_jitter_seed": jseed + 1 if ctx.service else None,
                           "prompt": prompt_index, "ignore_eos": ignore_eos, "seconds": time.perf_counter() - t0,
                           "token_ids": list(gen.token_ids), "details": None}
    st = gen.stats.to_dict()
    rec["stats"] = {k: st[k] for k in ("generated_tokens", "finish_reason", "tokens_per_s", "rounds", "cloud_tokens",
                                       "residual_rejections", "draft_len_chosen", "dead_chains")}
    if outcome == "hang":
        rec["details"], rec["state"] = f"no end within {cfg.hang_s:g} s", result
    elif outcome == "error":
        rec["details"] = f"{type(result).__name__}: {result}"
    else:
        bad = check_output(result, cell.sampling == "greedy", ignore_eos, prompt_ids, ctx.ref)
        outcome, rec["details"] = ("mismatch", bad) if bad else ("ok", None)
    rec["outcome"] = outcome
    return rec


# ---------------------------------------------------------------------------------------------- transports

@contextlib.asynccontextmanager
async def inproc_cloud(target: LoadedModel) -> AsyncIterator[tuple[str, PicoSpecService]]:
    service = PicoSpecService(target, CloudConfig(target=target.name))
    server, port = await start_server(service, "127.0.0.1:0")
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        await server.stop(grace=None)
        for name in ("worker", "executor"):  # the model thread's owner: `worker` now, `executor` in older trees
            pool = getattr(service, name, None)
            if pool is not None:
                pool.shutdown(wait=True)


def cloud_command(target: str, port: int) -> list[str]:
    exe = Path(sys.executable).with_name("picospec-cloud")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "picospec.cloud_server.cli"]
    return base + ["--target", target, "--host", "127.0.0.1", "--port", str(port), "--threads", "1"]


async def _wait_for_cloud(proc: subprocess.Popen, client: EdgeClient, log: Path, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"the cloud process exited ({proc.returncode}) during start-up:\n" + "\n".join(tail))
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cloud process did not serve within {wait_s:g} s (log: {log})")
        with contextlib.suppress(EdgeError):
            await client.connect(wait_s=2.0)
            return


@contextlib.asynccontextmanager
async def procs_cloud(cfg: StressConfig) -> AsyncIterator[tuple[str, Path, subprocess.Popen]]:
    port = free_port()
    cfg.out.mkdir(parents=True, exist_ok=True)
    log = cfg.out / "cloud_procs.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cloud_command(cfg.target, port), stdout=fh, stderr=subprocess.STDOUT)
    try:
        yield f"127.0.0.1:{port}", log, proc
    finally:
        stop_process(proc, 15)


@contextlib.asynccontextmanager
async def edge_client(address: str, draft: LoadedModel, cfg: StressConfig) -> AsyncIterator[EdgeClient]:
    # the call deadline outlasts --hang-s: a stuck generation is found (and dumped) as a hang, not a deadline error
    ecfg = EdgeConfig(server=address, draft=draft.name, max_new_tokens=cfg.max_new_tokens, wait_ready_s=30.0,
                      timeout_s=cfg.hang_s + 60.0)
    async with EdgeClient(ecfg, draft) as client:
        yield client


# ---------------------------------------------------------------------------------------------- the run

def _cell_line(i: int, n: int, transport: str, cell: Cell, recs: list[dict[str, Any]], dt: float) -> str:
    c = {o: sum(r["outcome"] == o for r in recs) for o in ("hang", "error", "mismatch")}
    return (f"[{i}/{n}] {transport:<6} {cell.label():<48} runs {len(recs)}  hangs {c['hang']}  errors {c['error']}  "
            f"mismatches {c['mismatch']}  {dt:.1f}s")


async def run_cells(ctx: Ctx, cells: list[Cell], counter: list[int], total: int) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for index, cell in enumerate(cells):
        t0 = time.perf_counter()
        recs = [await run_one(ctx, cell, index, r) for r in range(ctx.cfg.runs)]
        records += recs
        counter[0] += 1
        if not ctx.cfg.quiet:
            print(_cell_line(counter[0], total, ctx.transport, cell, recs, time.perf_counter() - t0), file=sys.stderr, flush=True)
    return records


async def run_transport(transport: str, cfg: StressConfig, models: dict[str, Any], cells: list[Cell],
                        counter: list[int], total: int) -> list[dict[str, Any]]:
    draft, target = models["draft"], models["target"]
    if transport == "inproc":
        async with inproc_cloud(target) as (address, service), edge_client(address, draft, cfg) as client:
            await client.connect()
            ctx = Ctx(transport, client, service, cfg, models["ref"], models["prompts"])
            return await run_cells(ctx, cells, counter, total)
    async with procs_cloud(cfg) as (address, log, proc), edge_client(address, draft, cfg) as client:
        await _wait_for_cloud(proc, client, log, cfg.cloud_start_s)
        ctx = Ctx(transport, client, None, cfg, models["ref"], models["prompts"])
        return await run_cells(ctx, cells, counter, total)


def load_models(cfg: StressConfig, greedy: bool) -> dict[str, Any]:
    """The draft, the target (for the greedy reference and the end-of-sequence ids; inproc also serves it), the
    prompts, and (with greedy cells) the reference computed up front, so it is not timed as part of a cell."""
    draft = load_model(cfg.draft, progress=False)
    target = load_model(cfg.target, progress=False)
    prompts = [encode_prompt(draft.tokenizer, text, chat=chat) for text, chat in PROMPTS]
    ref = GreedyReference(target, cfg.max_new_tokens)
    for ids in prompts if greedy else ():
        ref.expected(ids, ignore_eos=True)
    return {"draft": draft, "target": target, "ref": ref, "prompts": prompts}


@dataclass
class StressReport:
    config: StressConfig
    records: list[dict[str, Any]]
    wall_s: float
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.counts = {o: sum(r["outcome"] == o for r in self.records) for o in ("ok", "hang", "error", "mismatch")}

    @property
    def failures(self) -> int:
        return self.counts["hang"] + self.counts["error"] + self.counts["mismatch"]


def validate(cfg: StressConfig) -> None:
    bad = [m for m in cfg.modes if m not in STRESS_MODES] + [v for v in cfg.verify if v not in VERIFY_MODES] + \
        [t for t in cfg.transports if t not in TRANSPORTS]
    if bad:
        raise ValueError(f"unknown mode, verify mode or transport {bad[0]!r}")
    if cfg.runs < 1 or cfg.max_new_tokens < 1 or cfg.hang_s <= 0 or cfg.jitter_ms < 0:
        raise ValueError("--runs, --max-new-tokens and --hang-s must be positive, --jitter-ms not negative")


def run_stress(cfg: StressConfig) -> StressReport:
    """The whole grid over every transport asked for; writes stress.json and stress.md into cfg.out."""
    validate(cfg)
    t0 = time.perf_counter()
    cells = build_grid(cfg.modes, cfg.verify)
    models = load_models(cfg, any(c.sampling == "greedy" for c in cells))
    counter, total = [0], len(cells) * len(cfg.transports)

    async def all_transports() -> list[dict[str, Any]]:
        recs: list[dict[str, Any]] = []
        for transport in cfg.transports:
            recs += await run_transport(transport, cfg, models, cells, counter, total)
        return recs

    report = StressReport(cfg, asyncio.run(all_transports()), time.perf_counter() - t0)
    write_outputs(report)
    return report


# ---------------------------------------------------------------------------------------------- tables, files

def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, verify), in grid order."""
    keys = list(dict.fromkeys((r["mode"], r["verify"]) for r in records))
    rows = []
    for mode, verify in keys:
        rs = [r for r in records if (r["mode"], r["verify"]) == (mode, verify)]
        rates = [r["stats"]["tokens_per_s"] for r in rs if r["outcome"] in ("ok", "mismatch") and r["stats"]["tokens_per_s"]]
        rows.append({"mode": mode, "verify": verify + (" (forced)" if mode == "picospec" else ""), "runs": len(rs),
                     "hangs": sum(r["outcome"] == "hang" for r in rs), "errors": sum(r["outcome"] == "error" for r in rs),
                     "mismatches": sum(r["outcome"] == "mismatch" for r in rs),
                     "tokens_per_s": statistics.fmean(rates) if rates else None,
                     "rounds": sum(r["stats"]["rounds"] for r in rs)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [("mode", "{}"), ("verify", "{}"), ("runs", "{}"), ("hangs", "{}"), ("errors", "{}"), ("mismatches", "{}"),
            ("tokens_per_s", "{:.2f}"), ("rounds", "{}")]
    head = ["mode", "verify", "runs", "hangs", "errors", "mismatches", "mean tok/s", "rounds"]
    body = [["-" if r[k] is None else f.format(r[k]) for k, f in cols] for r in rows]
    w = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda row: "| " + " | ".join(c.ljust(n) for c, n in zip(row, w)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (n + 2) for n in w) + "|"] + [fmt(r) for r in body])


def totals_text(report: StressReport) -> str:
    c = report.counts
    lines = [f"total: {len(report.records)} runs, {c['hang']} hangs, {c['error']} errors, {c['mismatch']} mismatches, "
             f"wall {report.wall_s:.0f} s"]
    for t in report.config.transports:
        rs = [r for r in report.records if r["transport"] == t]
        n = {o: sum(r["outcome"] == o for r in rs) for o in ("hang", "error", "mismatch")}
        lines.append(f"  {t}: {len(rs)} runs, {n['hang']} hangs, {n['error']} errors, {n['mismatch']} mismatches")
    return "\n".join(lines)


def failures_text(records: list[dict[str, Any]], limit: int = 20) -> str:
    bad = [r for r in records if r["outcome"] != "ok"]
    lines = [f"- {r['outcome'].upper()} {r['transport']} {r['cell']} run {r['run']} seed {r['seed']} "
             f"prompt {r['prompt']} ignore_eos {r['ignore_eos']}: {r['details']}" for r in bad[:limit]]
    return "\n".join(lines + ([f"- ... and {len(bad) - limit} more (stress.json)"] if len(bad) > limit else []))


def write_outputs(report: StressReport) -> None:
    out = report.config.out
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(report.config).items()}
    rows = summarize(report.records)
    (out / "stress.json").write_text(json.dumps({"settings": settings, "wall_s": report.wall_s, "counts": report.counts,
                                                 "rows": rows, "runs": report.records}, indent=1, default=repr))
    md = [f"# picospec-bench stress: {report.config.target} / {report.config.draft}", "", format_table(rows), "",
          totals_text(report)]
    if report.failures:
        md += ["", "## Hangs, errors and mismatches", "", failures_text(report.records)]
    hang = next((r for r in report.records if r["outcome"] == "hang"), None)
    if hang is not None:
        md += ["", f"## State dump of the first hang ({hang['transport']} {hang['cell']} seed {hang['seed']})", "",
               "```json", json.dumps(hang["state"], indent=1, default=repr), "```"]
    (out / "stress.md").write_text("\n".join(md) + "\n")


def parse_args(argv: list[str] | None) -> StressConfig:
    d = StressConfig()
    p = argparse.ArgumentParser(prog="picospec-bench stress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=d.target)
    p.add_argument("--draft", default=d.draft)
    p.add_argument("--modes", default=",".join(d.modes), help="edge modes (comma-separated) of: " + ", ".join(STRESS_MODES))
    p.add_argument("--verify", default=",".join(d.verify), help="verification modes (comma-separated)")
    p.add_argument("--transport", default=",".join(d.transports), help="inproc, procs or both (comma-separated)")
    p.add_argument("--runs", type=int, default=d.runs, help="generations per cell")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--hang-s", type=float, default=d.hang_s, help="a generation not ended after this long is a HANG")
    p.add_argument("--jitter-ms", type=float, default=d.jitter_ms, help="largest random delay around each message")
    p.add_argument("--seed", type=int, default=d.seed, help="base of the session and jitter seeds")
    p.add_argument("--out", type=Path, default=d.out, help="directory for stress.json, stress.md, cloud_procs.log")
    a = p.parse_args(argv)
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    cfg = StressConfig(target=a.target, draft=a.draft, modes=split(a.modes), verify=split(a.verify),
                       transports=split(a.transport), runs=a.runs, max_new_tokens=a.max_new_tokens, hang_s=a.hang_s,
                       jitter_ms=a.jitter_ms, seed=a.seed, out=a.out)
    try:
        validate(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    torch.set_num_threads(1)  # the edge (and in process the cloud) one thread each; the cloud process gets --threads 1
    report = run_stress(cfg)
    print(format_table(summarize(report.records)))
    print(totals_text(report))
    if report.failures:
        print("\n" + failures_text(report.records))
    print(f"\nwrote {cfg.out / 'stress.json'}, {cfg.out / 'stress.md'}")
    sys.exit(1 if report.failures else 0)
