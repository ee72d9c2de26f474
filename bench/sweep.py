"""picospec-bench sweep: decoding modes across a grid of network conditions (SPEC 8), on a real shaped link.

Each side runs in its own network namespace on its own core: the cloud (`picospec-cloud --threads 1`) in the
"cloud" namespace on core 1, an edge worker (the same EdgeClient that `picospec-edge` uses, the draft loaded
once) in the "edge" namespace on core 0, joined by a veth pair shaped in the kernel by netlab (netem where the
kernel has it, else tbf for the rate plus an NFQUEUE delay stage). One link serves the whole sweep: between
cells its shaping is replaced in place, so neither model is reloaded. RTT 0 is that same namespace link with
no delay stage (not plain loopback), so every cell crosses the same path.

For every cell (RTT x bandwidth), after the link's RTT has been measured (netlab.measure's TCP ping-pong from
the edge namespace), each column runs every prompt `--runs` times with --ignore-eos (every run generates the
same number of tokens); columns are interleaved per prompt so that slow drift of the machine hits all alike.
Per cell and column the median over those runs is reported. A run that exceeds --run-timeout-s is cut and its
rate taken over the part it completed (marked †); that column is then skipped in every cell with at least that
RTT and at most that bandwidth (it can only be slower there).

Columns (--modes, comma-separated): `[LABEL=]MODE[:VERIFY[:HINTS[:DRAFT_LEN]]]`, e.g. `sync` (dense),
`pipeline:coupled`, `ours=pipeline:coupled:on:0` (0 = adaptive draft length). Empty fields keep the edge's
defaults. `--preset paper-table1`: the shape of the PicoSpec paper's Table 1 on our models: cloud, sync
(vanilla, dense), picospec (APPROXIMATE) and ours (pipeline, coupled, adaptive length, hints on).

Writes OUT/sweep.json (settings, link, every run), sweep.csv (per cell and column), sweep_runs.csv, sweep.md
and PNGs (tokens/s against RTT per bandwidth, bytes per token per mode, speedup over `cloud`).
Needs root (network namespaces, tc, iptables); `--no-netns` runs unshaped on loopback (RTT 0 only).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import json
import math
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from netlab.shaping import stop_process
from shared.config import EDGE_MODES, EXACT_VERIFY_MODES, VERIFY_MODES

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # netlab is not an installed package: import it from this checkout
BIN = Path(sys.executable).parent
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct:int8"
DEFAULT_RTTS = (10.0, 50.0, 100.0, 200.0)
DEFAULT_MBITS = (0.1, 1.0, 10.0, 100.0)
DEFAULT_COLUMNS = "cloud,edge,sync,early-exit,picospec,pipeline:coupled"
PRESETS = {"paper-table1": "cloud,sync,picospec,ours=pipeline:coupled:on:0"}

PROMPTS = [
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Think step by step.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Explain what a hash map is to a beginner programmer in three sentences.",
]

# per-run statistics kept in the CSVs (all of them stay in the JSON)
METRICS = ("tokens_per_s", "decode_tokens_per_s", "ttft_s", "itl_p50_s", "itl_p95_s", "generated_tokens", "rounds",
           "mean_accepted_len", "acceptance_rate", "mean_draft_len", "bytes_up_per_token", "bytes_down_per_token",
           "edge_busy_fraction", "cloud_busy_fraction", "wasted_draft_tokens", "cloud_tokens", "pipeline_bubble_s",
           "hint_hit_rate", "wall_s")


# ----------------------------------------------------------------------------------------------- pure parts

@dataclass(frozen=True)
class Column:
    """One column of a benchmark: a decoding mode and the edge settings it overrides."""

    label: str
    mode: str
    verify: str | None = None
    hints: str | None = None
    draft_len: int | None = None

    def overrides(self) -> dict[str, Any]:
        o = {"verify": self.verify, "hints": self.hints, "draft_len": self.draft_len}
        return {k: v for k, v in o.items() if v is not None}

    @property
    def exact(self) -> bool:
        """Lossless? The draft alone is not; picospec is split-topk whatever is set; others by verify mode."""
        if self.mode == "edge":
            return False
        if self.mode == "cloud":
            return True
        return self.mode != "picospec" and (self.verify or "dense") in EXACT_VERIFY_MODES


def parse_column(spec: str) -> Column:
    """`[LABEL=]MODE[:VERIFY[:HINTS[:DRAFT_LEN]]]` -> Column; ValueError naming what is wrong."""
    label, _, body = spec.strip().rpartition("=")
    parts = body.split(":")
    if len(parts) > 4:
        raise ValueError(f"{spec!r}: at most MODE:VERIFY:HINTS:DRAFT_LEN")
    parts += [""] * (4 - len(parts))
    mode, verify, hints, draft_len = (p.strip() for p in parts)
    if mode not in EDGE_MODES:
        raise ValueError(f"{spec!r}: unknown mode {mode!r}; choose from {', '.join(EDGE_MODES)}")
    if verify and verify not in VERIFY_MODES:
        raise ValueError(f"{spec!r}: unknown verify mode {verify!r}; choose from {', '.join(VERIFY_MODES)}")
    if hints and hints not in ("on", "off", "auto"):
        raise ValueError(f"{spec!r}: hints must be on, off or auto, not {hints!r}")
    if draft_len and not (draft_len.isdigit()):
        raise ValueError(f"{spec!r}: draft length must be an integer >= 0, not {draft_len!r}")
    return Column(label.strip() or body.strip(), mode, verify or None, hints or None,
                  int(draft_len) if draft_len else None)


def parse_columns(specs: str) -> list[Column]:
    cols = [parse_column(s) for s in specs.split(",") if s.strip()]
    labels = [c.label for c in cols]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise ValueError(f"duplicate column labels: {', '.join(sorted(dup))} (name them: LABEL=MODE:...)")
    if not cols:
        raise ValueError("no columns given")
    return cols


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


@dataclass(frozen=True)
class Condition:
    """A network condition: RTT in ms and a rate each way in Mbit/s (None: unshaped)."""

    rtt_ms: float
    mbit: float | None = None

    @property
    def name(self) -> str:
        return f"RTT {fmt_num(self.rtt_ms)} ms, {bw_name(self.mbit)}"


def bw_name(mbit: float | None) -> str:
    return "unshaped" if not mbit else f"{fmt_num(mbit)} Mbit/s"


def fmt_num(x: float) -> str:
    return f"{x:g}"


def grid(rtts: Iterable[float], mbits: Iterable[float | None]) -> list[Condition]:
    """Cells in the order they run: widest bandwidth first, then rising RTT, so that a column that times out
    can be skipped in the cells that are only harder."""
    bws = sorted({(m or None) for m in mbits}, key=lambda m: -math.inf if m is None else -m)
    return [Condition(r, m) for m in bws for r in sorted(set(rtts))]


def harder_or_equal(c: Condition, than: Condition) -> bool:
    """c is at least as hard as `than`: no less RTT and no more bandwidth (unshaped = infinite)."""
    inf = lambda m: math.inf if not m else m  # noqa: E731
    return c.rtt_ms >= than.rtt_ms and inf(c.mbit) <= inf(than.mbit)


def median_or_none(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(vals) if vals else None


def cells(samples: Sequence[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Samples grouped by (RTT, bandwidth, column), first-seen order: for each, the row fields every summary
    shares (identity, measured RTT, counts, first error) and the runs that completed (timed out or not)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((s["rtt_ms"], s["mbit"], s["column"]), []).append(s)
    for (rtt, mbit, col), ss in groups.items():
        ok = [s for s in ss if not s.get("error") and not s.get("skipped")]
        yield {
            "rtt_ms": rtt, "mbit": mbit, "rtt_measured_ms": median_or_none(s.get("rtt_measured_ms") for s in ss),
            "column": col, "mode": ss[0]["mode"], "verify_mode": ss[0].get("verify_mode"), "exact": ss[0].get("exact"),
            "runs": len(ok), "timed_out": sum(bool(s.get("timed_out")) for s in ok),
            "skipped": sum(bool(s.get("skipped")) for s in ss),
            "errors": sum(bool(s.get("error")) for s in ss),
            "error": next((s["error"] for s in ss if s.get("error")), None),
        }, ok


def aggregate(samples: Sequence[dict[str, Any]], keys: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """One row per (cell, column): the median of each metric over its runs (timed-out runs included, at the
    rate of the part they completed), with counts, and the speedup over the `cloud` column of the same cell."""
    rows = []
    for row, ok in cells(samples):
        for k in keys:
            row[k] = median_or_none(s.get(k) for s in ok)
        rows.append(row)
    cloud = {(r["rtt_ms"], r["mbit"]): r["tokens_per_s"] for r in rows if r["mode"] == "cloud"}
    for r in rows:
        base = cloud.get((r["rtt_ms"], r["mbit"]))
        r["speedup_vs_cloud"] = r["tokens_per_s"] / base if base and r["tokens_per_s"] is not None else None
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Rows of dicts as CSV: columns in first-seen order, None as empty, floats to 6 significant digits,
    nested values as JSON."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]

    def cell(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, (dict, list, tuple)):
            return json.dumps(v)
        return v

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: cell(r.get(k)) for k in fields})


def markdown_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A padded Markdown table (same look as bench/verify.py's)."""
    w = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda row: "| " + " | ".join(c.ljust(n) for c, n in zip(row, w)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (n + 2) for n in w) + "|"] + [line(r) for r in body])


def fmt(v: Any, f: str = "{:.2f}") -> str:
    return "-" if v is None else f.format(v)


def rate_cell(r: dict[str, Any] | None, with_speedup: bool = True) -> str:
    """tokens/s of one (cell, column) with its speedup over cloud; † timed out, 'skip' or 'error'."""
    if r is None:
        return "-"
    if r["runs"] == 0:
        return "error" if r["errors"] else "skip" if r["skipped"] else "-"
    s = fmt(r["tokens_per_s"]) + ("†" if r["timed_out"] else "")
    if with_speedup and r.get("speedup_vs_cloud") is not None and r["mode"] != "cloud":
        s += f" ({r['speedup_vs_cloud']:.2f}x)"
    return s


def column_title(label: str, rows: Sequence[dict[str, Any]]) -> str:
    r = next((x for x in rows if x["column"] == label), None)
    return label + (" APPROX." if r is not None and r.get("exact") is False and r["mode"] != "edge" else "")


def pivot_table(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Rows: network conditions; columns: modes; cells: median tokens/s (speedup over cloud)."""
    by = {(r["rtt_ms"], r["mbit"], r["column"]): r for r in rows}
    conds = list(dict.fromkeys((r["rtt_ms"], r["mbit"]) for r in rows))
    head = ["RTT ms (measured)", "bandwidth"] + [column_title(lb, rows) for lb in labels]
    body = []
    for rtt, mbit in conds:
        meas = next((r["rtt_measured_ms"] for r in rows if (r["rtt_ms"], r["mbit"]) == (rtt, mbit)), None)
        body.append([f"{fmt_num(rtt)} ({fmt(meas, '{:.1f}')})", bw_name(mbit)]
                    + [rate_cell(by.get((rtt, mbit, lb))) for lb in labels])
    return markdown_table(head, body)


def bytes_table(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Bytes up/down per generated token per column (median over cells: they hardly depend on the network)."""
    body = []
    for lb in labels:
        rs = [r for r in rows if r["column"] == lb and r["runs"]]
        body.append([column_title(lb, rows), fmt(median_or_none(r["bytes_up_per_token"] for r in rs), "{:,.1f}"),
                     fmt(median_or_none(r["bytes_down_per_token"] for r in rs), "{:,.1f}"),
                     fmt(median_or_none(r["acceptance_rate"] for r in rs), "{:.3f}"),
                     fmt(median_or_none(r["mean_accepted_len"] for r in rs)),
                     fmt(median_or_none(r["mean_draft_len"] for r in rs))])
    return markdown_table(["column", "B up/token", "B down/token", "acceptance", "mean acc. len", "mean draft len"], body)


def detail_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = [("tokens_per_s", "{:.2f}"), ("speedup_vs_cloud", "{:.2f}"), ("ttft_s", "{:.2f}"), ("itl_p50_s", "{:.3f}"),
            ("itl_p95_s", "{:.3f}"), ("acceptance_rate", "{:.3f}"), ("mean_accepted_len", "{:.2f}"),
            ("mean_draft_len", "{:.2f}"), ("bytes_up_per_token", "{:,.0f}"), ("bytes_down_per_token", "{:,.0f}"),
            ("edge_busy_fraction", "{:.2f}"), ("cloud_busy_fraction", "{:.2f}"), ("wasted_draft_tokens", "{:.0f}"),
            ("cloud_tokens", "{:.0f}"), ("hint_hit_rate", "{:.2f}")]
    head = ["RTT ms", "bandwidth", "column", "runs", "tok/s", "x cloud", "TTFT s", "ITL p50 s", "ITL p95 s", "accept.",
            "acc. len", "draft len", "B up/tok", "B down/tok", "edge busy", "cloud busy", "wasted", "cloud tok", "hint hit"]
    body = [[fmt_num(r["rtt_ms"]), bw_name(r["mbit"]), r["column"], f"{r['runs']}" + (f" ({r['timed_out']}†)" if r["timed_out"] else "")]
            + [fmt(r.get(k), f) for k, f in cols] for r in rows]
    return markdown_table(head, body)


# ----------------------------------------------------------------------------------------------- the edge worker

def _claim_stdout() -> Any:
    """The worker answers on its own copy of stdout; fd 1 then points at stderr, so that nothing a library
    prints can corrupt the JSON replies."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


async def _worker_loop(args: argparse.Namespace, out: Any) -> None:
    import torch

    from edge_client.cli import encode_prompt
    from edge_client.client import EdgeClient
    from netlab.measure import rtt_samples_ms
    from shared.config import EdgeConfig
    from shared.models import load_model

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    draft = load_model(args.draft, progress=False)
    base = EdgeConfig(draft=args.draft, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      ignore_eos=True, threads=1, wait_ready_s=120.0)
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
    """One generation, cut at the timeout; stats plus the component times the SPEC 3.5 model needs."""
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
             # the cloud's online cost fit (n drafts per pass; 0 = a plain decode step), for fractional draft lengths
             "verify_at": {str(n): st.estimates.verify(n) for n in range(0, 13)},
             # per-token acceptance as SPEC 3.5's i.i.d. model means it: accepted / (accepted + rejections); the
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


def worker_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sweep --edge-worker")
    p.add_argument("--draft", required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--temperature", type=float, required=True)
    args = p.parse_args(argv)
    out = _claim_stdout()
    asyncio.run(_worker_loop(args, out))


# ----------------------------------------------------------------------------------------------- the testbed

class BenchError(RuntimeError):
    pass


def _env() -> dict[str, str]:
    # the subprocesses import bench/netlab from this checkout even where it is not installed
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _pin(core: int | None, argv: list[str]) -> list[str]:
    return argv if core is None else ["taskset", "-c", str(core), *argv]


def _wait_in_file(path: Path, marker: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if marker in text:
            return
        if proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited ({proc.returncode}) during start-up:\n{text[-3000:]}")
        time.sleep(0.2)  # polling the *log file* of the orchestrator, not inside any program under test
    raise BenchError(f"no {marker!r} in {path} within {timeout:.0f} s")


@dataclass
class BenchSettings:
    target: str
    draft: str
    max_new_tokens: int
    temperature: float
    port: int = 50471
    edge_core: int | None = 0
    cloud_core: int | None = 1
    run_timeout_s: float = 120.0
    netns: bool = True
    out: Path = Path("bench_out")


class Testbed:
    """The cloud server, the edge worker and (with netns) the shaped link between them, for a whole sweep."""

    def __init__(self, s: BenchSettings, logdir: Path) -> None:
        self.s, self.logdir = s, logdir
        self.stack = contextlib.ExitStack()
        self.link: Any = None
        self.features: Any = None
        self.shaping_log: Any = None
        self.cond: Condition | None = None
        self.worker: subprocess.Popen | None = None
        self.cloud_host = "127.0.0.1"
        self.info: dict[str, Any] = {}

    # -- set-up
    def __enter__(self) -> "Testbed":
        try:
            self._start()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.worker is not None and self.worker.poll() is None:
            with contextlib.suppress(Exception):
                self.ask({"op": "quit"}, timeout=10)
        self.stack.close()

    def _argv(self, side: str, argv: list[str]) -> list[str]:
        return self.link.argv(side, argv) if self.link is not None else argv

    def _popen(self, side: str, argv: list[str], **kw: Any) -> subprocess.Popen:
        p = subprocess.Popen(self._argv(side, argv), env=_env(), cwd=ROOT, **kw)
        self.stack.callback(stop_process, p, 20.0)
        return p

    def _start(self) -> None:
        s = self.s
        self.logdir.mkdir(parents=True, exist_ok=True)
        if len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None:
            s.edge_core = s.cloud_core = None  # nothing to pin to: both share what there is (noted in the JSON)
        if s.netns:
            from netlab.netns import shaped_link
            from netlab.shaping import LinkSpec, netns_usable, probe_host

            ok, why = netns_usable()
            if not ok:
                raise BenchError(f"cannot build the namespace link: {why} (run as root, or --no-netns for RTT 0 only)")
            self.features = probe_host()
            self.shaping_log = self.stack.enter_context(open(self.logdir / "shaping.log", "a"))
            self.link = self.stack.enter_context(shaped_link(LinkSpec(0.0), features=self.features, log=self.shaping_log))
            self.cloud_host = self.link.cloud_ip
            self.info["link"] = {"edge_ip": self.link.edge_ip, "cloud_ip": self.link.cloud_ip}
            # the RTT probe's echo server lives beside the cloud (idle except during the probe)
            ms = self._popen("cloud", _pin(s.cloud_core, [sys.executable, "-m", "netlab.measure", "serve", "--host",
                                                          self.cloud_host, "--port", "5201"]),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if "ready" not in (ms.stdout.readline() if ms.stdout else ""):
                raise BenchError("the RTT probe's echo server did not start")
        elif s.port == BenchSettings.port:
            s.port = _free_port()
        cloud_log = self.logdir / "cloud.log"
        cloud_out = self.stack.enter_context(open(cloud_log, "w"))
        cloud = self._popen("cloud", _pin(s.cloud_core, [str(BIN / "picospec-cloud"), "--target", s.target, "--host",
                                                         self.cloud_host, "--port", str(s.port), "--threads", "1"]),
                            stdout=cloud_out, stderr=subprocess.STDOUT)
        worker_log = self.stack.enter_context(open(self.logdir / "edge_worker.log", "w"))
        self.worker = self._popen("edge", _pin(s.edge_core, [sys.executable, "-m", "bench.sweep", "--edge-worker", "--draft",
                                                             s.draft, "--max-new-tokens", str(s.max_new_tokens),
                                                             "--temperature", str(s.temperature)]),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=worker_log, text=True)
        ready = self.read(timeout=900)  # loads the draft while the cloud loads the target
        self.info["draft_load_s"] = ready.get("load_s")
        _wait_in_file(cloud_log, "serving", cloud, 900)

    # -- talking to the worker
    def ask(self, req: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        assert self.worker is not None and self.worker.stdin is not None
        self.worker.stdin.write(json.dumps(req) + "\n")
        self.worker.stdin.flush()
        return self.read(timeout)

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.worker is not None and self.worker.stdout is not None
        ready, _, _ = select.select([self.worker.stdout], [], [], timeout)
        line = self.worker.stdout.readline() if ready else ""
        if not line:
            raise BenchError(f"the edge worker {'exited' if self.worker.poll() is not None else 'stopped answering'}; "
                             f"see {self.logdir / 'edge_worker.log'}")
        return json.loads(line)

    @property
    def server(self) -> str:
        return f"{self.cloud_host}:{self.s.port}"

    # -- network conditions
    def shape(self, cond: Condition) -> dict[str, Any]:
        """Give the link `cond` (in place), connect afresh and measure the RTT. Returns what was measured."""
        if self.link is None:
            if cond.rtt_ms or cond.mbit:
                raise BenchError(f"{cond.name} needs the namespace link (drop --no-netns)")
        else:
            self.ask({"op": "close"})
            self._reshape(cond)
        self.cond = cond
        r = self.ask({"op": "connect", "server": self.server})
        if not r.get("ok"):
            raise BenchError(f"the edge could not connect: {r.get('error')}")
        if self.link is None:
            return {"rtt_measured_ms": None, "method": "loopback"}
        m = self.ask({"op": "rtt", "host": self.cloud_host, "port": 5201, "n": 20})
        if not m.get("ok"):
            raise BenchError(f"RTT probe failed: {m.get('error')}")
        return {"rtt_measured_ms": m["rtt_ms"], "rtt_samples_ms": m["samples"], "method": self.link.method}

    def _reshape(self, cond: Condition) -> None:
        from netlab.shaping import LinkSpec, apply_side

        spec = LinkSpec(cond.rtt_ms, cond.mbit, cond.mbit)
        for a in self.link.applied:
            a.stop()
        self.link.applied.clear()
        methods = []
        for side, dev in (("edge", self.link.edge_dev), ("cloud", self.link.cloud_dev)):
            prefix = ["ip", "netns", "exec", self.link.ns(side)]
            subprocess.run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)  # none: fine
            applied = apply_side(dev, spec.side(side), features=self.features, prefix=prefix, python=sys.executable,
                                 seed=int(side == "cloud"), log=self.shaping_log)
            self.link.applied.append(applied)
            methods.append(applied.method)
        self.link.spec = spec
        self.link.method = methods[0] if methods[0] == methods[1] else f"edge={methods[0]},cloud={methods[1]}"

    def flush(self) -> None:
        """After a cut run: drop the connection and let what it still had queued drain over an unshaped link,
        so the next run does not wait behind it."""
        if self.link is None or self.cond is None:
            return
        cond = self.cond
        self.ask({"op": "close"})
        self._reshape(Condition(0.0, None))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._queued_bytes() > 0:
            time.sleep(0.2)  # orchestrator-side wait for the kernel queues; nothing under test sleeps
        self.shape(cond)

    def _queued_bytes(self) -> int:
        total = 0
        for side in ("edge", "cloud"):
            r = subprocess.run(self._argv(side, ["ss", "-tnH"]), capture_output=True, text=True)
            for line in r.stdout.splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    total += int(parts[2])
        return total

    def run(self, col: Column, prompt: str, seed: int) -> dict[str, Any]:
        req = {"op": "run", "prompt": prompt, "mode": col.mode, "overrides": col.overrides(), "seed": seed,
               "timeout_s": self.s.run_timeout_s}
        r = self.ask(req, timeout=self.s.run_timeout_s + 300)
        if r.get("timed_out"):
            self.flush()
        elif not r.get("ok"):
            with contextlib.suppress(BenchError):
                self.shape(self.cond)  # a fresh channel after a failure
        return r


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- the engine

class Progress:
    """tqdm on stderr where installed, else one line per run."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        try:
            from tqdm import tqdm

            self.bar: Any = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def step(self, desc: str, note: str = "", n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_description(desc, refresh=False)
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
        else:
            print(f"[{self.done}/{self.total}] {desc} {note}", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else lambda m: print(m, file=sys.stderr, flush=True))(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def sample_record(cond: Condition, link: dict[str, Any], col: Column, run: int, prompt_i: int, seed: int,
                  r: dict[str, Any]) -> dict[str, Any]:
    """One run as a flat record (stats keys at the top level, the whole stats dict kept under `stats`)."""
    st = r.get("stats") or {}
    rec: dict[str, Any] = {
        "rtt_ms": cond.rtt_ms, "mbit": cond.mbit, "rtt_measured_ms": link.get("rtt_measured_ms"),
        "link_method": link.get("method"), "column": col.label, "mode": col.mode,
        "verify_mode": st.get("verify_mode", col.verify), "exact": st.get("exact", col.exact),
        "run": run, "prompt": prompt_i, "seed": seed, "timed_out": bool(r.get("timed_out")),
        "error": None if r.get("ok") else r.get("error", "failed"),
    }
    rec.update({k: st.get(k) for k in METRICS})
    rec["extra"] = r.get("extra")
    rec["stats"] = st
    return rec


def run_grid(bed: Testbed, conds: Sequence[Condition], cols: Sequence[Column], prompts: Sequence[str], runs: int,
             seed: int, samples: list[dict[str, Any]],
             on_cell: Callable[[Condition, dict[str, Any]], None] | None = None) -> None:
    """Every column on every prompt `runs` times in every cell; appends one record per run (skipped ones too)
    to `samples` as it goes, so that the caller keeps what was measured when a long sweep is interrupted."""
    cut: list[tuple[Condition, str]] = []  # (cell, column) where a run timed out
    bar = Progress(len(conds) * len(cols) * len(prompts) * runs)
    try:
        for cond in conds:
            link = bed.shape(cond)
            bar.write(f"{cond.name}: link {link['method']}, measured RTT "
                      f"{fmt(link.get('rtt_measured_ms'), '{:.1f}')} ms")
            if on_cell:
                on_cell(cond, link)
            for run in range(runs):
                for pi, prompt in enumerate(prompts):
                    for col in cols:
                        sd = seed + 1000 * run + pi  # the same seed for every column: same coins, fair comparison
                        desc = f"{fmt_num(cond.rtt_ms)}ms {bw_name(cond.mbit)} {col.label}"
                        if any(lb == col.label and harder_or_equal(cond, c) for c, lb in cut):
                            samples.append({**sample_record(cond, link, col, run, pi, sd, {"ok": True}), "skipped": True})
                            bar.step(desc, "skipped (timed out here or where easier)")
                            continue
                        r = bed.run(col, prompt, sd)
                        rec = sample_record(cond, link, col, run, pi, sd, r)
                        samples.append(rec)
                        if rec["timed_out"]:
                            cut.append((cond, col.label))
                        note = (f"error: {rec['error'][:60]}" if rec["error"] else
                                f"{fmt(rec['tokens_per_s'])} tok/s" + (" (timed out)" if rec["timed_out"] else ""))
                        if rec["error"]:
                            bar.write(f"{desc}: {rec['error']}")
                        bar.step(desc, note)
    finally:
        bar.close()


@contextlib.contextmanager
def keep_partial(settings: dict[str, Any]) -> Iterator[None]:
    """Ctrl-C or a broken testbed ends the runs, not the report: what was measured is still written."""
    try:
        yield
    except (KeyboardInterrupt, BenchError) as e:
        settings["interrupted"] = f"{type(e).__name__}: {e}"
        print(f"\nstopped early ({settings['interrupted']}); writing what was measured", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- plots

def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_sweep(rows: Sequence[dict[str, Any]], labels: Sequence[str], out: Path, title: str,
               name: str = "sweep") -> list[Path]:
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    bws = list(dict.fromkeys(r["mbit"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ok = [r for r in rows if r["runs"] and r["tokens_per_s"] is not None]

    def per_bw(key: str, ylabel: str, fname: str, skip_cloud: bool = False, log: bool = False) -> None:
        fig, axes = plt.subplots(1, len(bws), figsize=(4.2 * len(bws), 3.8), sharey=True, squeeze=False)
        for ax, bw in zip(axes[0], bws):
            for i, lb in enumerate(labels):
                pts = sorted((r["rtt_ms"], r[key]) for r in ok if r["mbit"] == bw and r["column"] == lb
                             and r.get(key) is not None and not (skip_cloud and r["mode"] == "cloud"))
                if pts:  # one colour per column in every figure
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lb, color=colors[i % len(colors)])
            if skip_cloud:
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_title(bw_name(bw))
            ax.set_xlabel("RTT (ms)")
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)

    per_bw("tokens_per_s", "tokens/s (median)", f"{name}_tps_vs_rtt.png")
    per_bw("speedup_vs_cloud", "speedup over cloud", f"{name}_speedup.png", skip_cloud=True)

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
    xs = range(len(labels))
    up = [median_or_none(r["bytes_up_per_token"] for r in ok if r["column"] == lb) for lb in labels]
    down = [median_or_none(r["bytes_down_per_token"] for r in ok if r["column"] == lb) for lb in labels]
    ax.bar([i - 0.2 for i in xs], [u or 0 for u in up], 0.4, label="up")
    ax.bar([i + 0.2 for i in xs], [d or 0 for d in down], 0.4, label="down")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xticks(list(xs), list(labels), rotation=20)
    ax.set_ylabel("bytes per generated token")
    ax.set_title("Wire bytes per generated token (median over cells)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}_bytes.png", dpi=110)
    plt.close(fig)
    written.append(out / f"{name}_bytes.png")
    return written


# ----------------------------------------------------------------------------------------------- CLI

def add_common_args(p: argparse.ArgumentParser, *, rtts: str, mbits: str, prompts: int, max_new_tokens: int,
                    runs: int) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--draft", default=DEFAULT_DRAFT)
    p.add_argument("--rtt-ms", default=rtts, help=f"comma-separated RTTs in ms (default {rtts}); 0 = no delay stage")
    p.add_argument("--mbit", default=mbits, help=f"comma-separated rates each way in Mbit/s (default {mbits}); 0 = unshaped")
    p.add_argument("--runs", type=int, default=runs, help="runs per prompt, column and cell (the median is reported)")
    p.add_argument("--prompts", type=int, default=prompts, help=f"how many of the {len(PROMPTS)} built-in prompts")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (default 1: dense then ships whole distributions, as in the papers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-timeout-s", type=float, default=120.0, help="cut a run after this long (rate over the part done)")
    p.add_argument("--port", type=int, default=BenchSettings.port)
    p.add_argument("--edge-core", type=int, default=0)
    p.add_argument("--cloud-core", type=int, default=1)
    p.add_argument("--no-netns", action="store_true", help="plain loopback, no shaping (only RTT 0, unshaped)")
    p.add_argument("--out", default="bench_out")


def settings_from(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(target=args.target, draft=args.draft, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, port=args.port, edge_core=args.edge_core,
                         cloud_core=args.cloud_core, run_timeout_s=args.run_timeout_s, netns=not args.no_netns,
                         out=Path(args.out))


def pick_prompts(n: int) -> list[str]:
    if not 1 <= n <= len(PROMPTS):
        raise SystemExit(f"--prompts: 1 to {len(PROMPTS)}")
    return PROMPTS[:n]


def settings_json(args: argparse.Namespace, bed: Testbed) -> dict[str, Any]:
    s = {k: v for k, v in vars(args).items()}
    s.update({"edge_core": bed.s.edge_core, "cloud_core": bed.s.cloud_core, "ignore_eos": True,
              "cpus": sorted(os.sched_getaffinity(0)), **bed.info})
    return s


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--edge-worker"]:
        return worker_main(argv[1:])
    p = argparse.ArgumentParser(prog="picospec-bench sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, rtts=",".join(map(fmt_num, DEFAULT_RTTS)), mbits=",".join(map(fmt_num, DEFAULT_MBITS)),
                    prompts=2, max_new_tokens=48, runs=1)
    p.add_argument("--modes", default=None, help=f"columns, [LABEL=]MODE[:VERIFY[:HINTS[:DRAFT_LEN]]] (default {DEFAULT_COLUMNS})")
    p.add_argument("--preset", choices=sorted(PRESETS), help="paper-table1: cloud, sync, picospec and ours side by side")
    args = p.parse_args(argv)
    if args.preset and args.modes:
        p.error("--preset chooses the columns: give --preset or --modes, not both")
    try:
        cols = parse_columns(PRESETS[args.preset] if args.preset else (args.modes or DEFAULT_COLUMNS))
        conds = grid(parse_floats(args.rtt_ms), parse_floats(args.mbit))
    except ValueError as e:
        p.error(str(e))
    if args.no_netns and any(c.rtt_ms or c.mbit for c in conds):
        p.error("--no-netns is plain loopback: only --rtt-ms 0 --mbit 0")
    prompts = pick_prompts(args.prompts)
    name = "paper_table1" if args.preset == "paper-table1" else "sweep"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    samples: list[dict[str, Any]] = []
    settings = dict(vars(args))
    with keep_partial(settings), Testbed(settings_from(args), out / f"{name}_logs") as bed:
        settings.update(settings_json(args, bed))
        run_grid(bed, conds, cols, prompts, args.runs, args.seed, samples)
    settings["elapsed_s"] = time.perf_counter() - t0
    if not samples:
        sys.exit(f"picospec-bench sweep: nothing measured ({settings.get('interrupted', 'no runs')})")
    rows = aggregate(samples)
    report(name, settings, cols, rows, samples, out)


def report(name: str, settings: dict[str, Any], cols: Sequence[Column], rows: list[dict[str, Any]],
           samples: list[dict[str, Any]], out: Path) -> None:
    labels = [c.label for c in cols]
    (out / f"{name}.json").write_text(json.dumps({"settings": settings, "columns": [asdict(c) for c in cols],
                                                  "rows": rows, "runs": samples}, indent=1, default=str))
    write_csv(rows, out / f"{name}.csv")
    write_csv([{k: v for k, v in s.items() if k not in ("stats", "extra")} for s in samples], out / f"{name}_runs.csv")
    title = (f"{settings['target']} <- {settings['draft']}, {settings['max_new_tokens']} tokens, T={settings['temperature']:g}, "
             f"{settings['prompts']} prompt(s) x {settings['runs']} run(s)")
    md = "\n\n".join([
        f"# picospec-bench {name.replace('_', ' ')}\n\n{title}; median tokens/s (speedup over cloud), "
        "each side in its own namespace on its own core.",
        pivot_table(rows, labels),
        *([f"**Incomplete**: stopped early ({settings['interrupted']})."] if settings.get("interrupted") else []),
        "† a run exceeded the run timeout: the rate over the part it completed. skip: not run, it timed out in an "
        "easier cell. APPROX.: not lossless (split-topk; the draft alone).",
        "## Bytes on the wire\n\n" + bytes_table(rows, labels),
        "## Details (medians)\n\n" + detail_table(rows),
    ])
    (out / f"{name}.md").write_text(md + "\n")
    print(pivot_table(rows, labels))
    print()
    print(bytes_table(rows, labels))
    pngs = plot_sweep(rows, labels, out, title, name)
    print(f"\nwrote {', '.join(str(x) for x in [out / f'{name}.json', out / f'{name}.csv', out / f'{name}_runs.csv', out / f'{name}.md', *pngs])}")


if __name__ == "__main__":
    main()
