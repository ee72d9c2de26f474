"""What `picospec-bench serve` and `picospec-bench soak` share: one cloud process (pinned to its core, Prometheus
metrics on), a fleet of edge worker processes (bench/session_worker.py, pinned to the other core) that run many
concurrent sessions each, the cloud's metrics read as histogram totals, and the pure helpers (percentiles, how
sessions are spread over workers, whether the cloud knows a flag).
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from picospec.bench.ports import free_port
from picospec.netlab.procs import stop_process

ROOT = Path(__file__).resolve().parent.parent
CLOUD_MODULE = "picospec.cloud_server.cli"  # run as a module with this checkout on PYTHONPATH (not the installed script)


class FleetError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- pure helpers

def percentile(xs: Sequence[float | None], q: float) -> float | None:
    """The q-quantile (0..1) of the values that are not None, linear between order statistics; None if none."""
    vals = sorted(x for x in xs if x is not None)
    if not vals:
        return None
    pos = q * (len(vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def split_sessions(n: int, workers: int) -> list[list[int]]:
    """Session ids 0..n-1 dealt round-robin over at most `workers` workers (only as many lists as are used)."""
    used = max(1, min(n, workers))
    return [list(range(w, n, used)) for w in range(used)]


def flag_supported(help_text: str, flag: str) -> bool:
    """Whether `--help` output lists `flag` (as a word: --batching does not match --batching-x)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def parse_list(text: str, conv: Any = str) -> list[Any]:
    """'1,2, 4' -> [1, 2, 4] (empty items dropped)."""
    return [conv(x.strip()) for x in text.split(",") if x.strip()]


PROMPT_ROOM = 256  # tokens: more than the longest built-in prompt in a chat template (bench/grid.py PROMPTS)


def cloud_limits(sessions: int, max_new_tokens: int) -> list[str]:
    """--max-sessions and --max-context for a benchmark cloud: exactly what its sessions need, because the static
    engine (--batching on) preallocates KV slots for max-sessions x max-context (the defaults, 8 x 8192, are
    gigabytes; 128 x 8192 on SmolLM2 is ~48 GB). A stream a moment too early for a freed slot is retried by the
    edge (admission), not failed."""
    return ["--max-sessions", str(sessions), "--max-context", str(PROMPT_ROOM + max_new_tokens)]


def histogram_totals(text: str) -> dict[str, tuple[float, float]]:
    """Prometheus text exposition -> {histogram name: (sum, count)}, summed over all label sets; counters too, as
    {name_total: (value, 0)} (so that histogram_deltas gives their growth and histogram_means None)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, tuple[float, float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.type == "counter":
            out[fam.name + "_total"] = (sum(x.value for x in fam.samples if x.name == fam.name + "_total"), 0.0)
        if fam.type != "histogram":
            continue
        s = sum(x.value for x in fam.samples if x.name == fam.name + "_sum")
        c = sum(x.value for x in fam.samples if x.name == fam.name + "_count")
        out[fam.name] = (s, c)
    return out


def histogram_deltas(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
                     ) -> dict[str, tuple[float, float]]:
    """(sum, count) of each histogram over what was observed between two scrapes."""
    deltas = {}
    for name, (s1, c1) in after.items():
        s0, c0 = before.get(name, (0.0, 0.0))
        deltas[name] = (s1 - s0, c1 - c0)
    return deltas


def histogram_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float | None]:
    """Mean of each histogram over what was observed between two scrapes (None where nothing was)."""
    return {name: s / c if c > 0 else None for name, (s, c) in histogram_deltas(before, after).items()}


# ---------------------------------------------------------------------------------------------- processes

def checkout_env() -> dict[str, str]:
    """This environment with this checkout first on PYTHONPATH (the subprocesses import the tree under test)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def pinning_possible() -> bool:
    return len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset") is not None


def pin(core: int | None, argv: list[str]) -> list[str]:
    return argv if core is None else ["taskset", "-c", str(core), *argv]


def cloud_help() -> str:
    """`picospec-cloud --help` of this checkout (once per benchmark: which flags the cloud knows)."""
    r = subprocess.run([sys.executable, "-m", CLOUD_MODULE, "--help"], capture_output=True, text=True,
                       env=checkout_env(), cwd=ROOT, timeout=300)
    return r.stdout + r.stderr


@dataclass
class CloudProc:
    """A running picospec-cloud: its process, gRPC address and metrics URL."""

    proc: subprocess.Popen
    address: str
    metrics_url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> dict[str, tuple[float, float]]:
        with urllib.request.urlopen(self.metrics_url, timeout=30) as r:
            return histogram_totals(r.read().decode())


def _wait_serving(log: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "picospec-cloud: serving" in text:
            return
        if proc.poll() is not None:
            raise FleetError(f"the cloud exited ({proc.returncode}) during start-up:\n{text[-3000:]}")
        time.sleep(0.2)  # polling the orchestrator's view of a log file, not inside anything measured
    raise FleetError(f"the cloud did not serve within {timeout:.0f} s (log: {log})")


@contextlib.contextmanager
def cloud_process(target: str, core: int | None, log: Path, extra: Sequence[str] = (),
                  start_s: float = 900.0) -> Iterator[CloudProc]:
    """A picospec-cloud on 127.0.0.1 (free ports for gRPC and metrics), one torch thread, pinned to `core`;
    `extra`: more flags (limits, batching, device). Stopped (SIGTERM, then SIGKILL) on exit."""
    port, mport = free_port(), free_port()
    argv = [sys.executable, "-m", CLOUD_MODULE, "--target", target, "--host", "127.0.0.1", "--port", str(port),
            "--threads", "1", "--metrics-port", str(mport), "--grace-s", "5", *extra]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        # taskset execs the command: the pid is the cloud's own (its RSS is what soak samples)
        proc = subprocess.Popen(pin(core, argv), stdout=fh, stderr=subprocess.STDOUT, env=checkout_env(), cwd=ROOT)
    try:
        _wait_serving(log, proc, start_s)
        yield CloudProc(proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics", log)
    finally:
        stop_process(proc, 20.0)


@dataclass
class Fleet:
    """Edge worker processes, each answering JSON lines; every line any of them writes lands on one queue
    (a reader thread per worker), so the orchestrator waits on all at once and can sample between lines."""

    procs: list[subprocess.Popen] = field(default_factory=list)
    events: "queue.Queue[dict[str, Any]]" = field(default_factory=queue.Queue)
    logdir: Path = Path(".")
    ready: set[int] = field(default_factory=set)

    def send(self, worker: int, obj: dict[str, Any]) -> None:
        p = self.procs[worker]
        assert p.stdin is not None
        p.stdin.write(json.dumps(obj) + "\n")
        p.stdin.flush()

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait_ready(self, timeout: float = 900.0) -> None:
        """Until every worker has loaded its draft (at once after the first call)."""
        deadline = time.monotonic() + timeout
        while len(self.ready) < len(self.procs):
            ev = self.next_event(max(0.1, deadline - time.monotonic()))
            if ev is None:
                raise FleetError(f"edge workers not ready within {timeout:.0f} s (logs in {self.logdir})")
            if ev.get("event") == "exit":
                raise FleetError(f"edge worker {ev['worker']} exited during start-up "
                                 f"(see {self.logdir}/edge_worker{ev['worker']}.log)")
            if ev.get("event") == "ready":
                self.ready.add(ev["worker"])

    def _pump(self, i: int, p: subprocess.Popen) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self.events.put({**json.loads(line), "worker": i})
        self.events.put({"event": "exit", "worker": i, "returncode": p.wait()})


@contextlib.contextmanager
def edge_fleet(n: int, draft: str, core: int | None, logdir: Path) -> Iterator[Fleet]:
    """n session workers pinned to `core`, started (loading the draft) but not waited for: call
    `wait_ready` before the first run, so that the cloud can load meanwhile."""
    fleet = Fleet(logdir=logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    logs = []
    try:
        for i in range(n):
            logs.append((logdir / f"edge_worker{i}.log").open("w"))
            argv = [sys.executable, "-m", "picospec.bench.session_worker", "--draft", draft, "--worker", str(i)]
            p = subprocess.Popen(pin(core, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[-1],
                                 text=True, env=checkout_env(), cwd=ROOT)
            fleet.procs.append(p)
            threading.Thread(target=fleet._pump, args=(i, p), daemon=True).start()
        yield fleet
    finally:
        for i, p in enumerate(fleet.procs):
            with contextlib.suppress(Exception):
                if p.poll() is None:
                    fleet.send(i, {"op": "quit"})
        for p in fleet.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
            stop_process(p, 10.0)
        for f in logs:
            f.close()


def process_rss(pid: int) -> int | None:
    """Resident memory of a process in bytes (None once it is gone)."""
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def drive(fleet: Fleet, run: Any, server: str, groups: Sequence[Sequence[int]], plan: dict[str, Any],
          on_gen: Any, tick: Any = None, tick_s: float = 1.0, timeout_s: float = 3600.0) -> list[str]:
    """Run `plan` on every worker with its group of sessions and wait for all to finish: `on_gen(record)` for
    each finished generation as it arrives, `tick()` about every `tick_s` seconds meanwhile. Returns what went
    wrong with whole workers (an error, an exit, the timeout), empty when nothing did."""
    busy = {w for w, g in enumerate(groups) if g}
    for w in busy:
        fleet.send(w, {"op": "run", "run": run, "server": server, "sessions": list(groups[w]), "plan": plan})
    problems: list[str] = []
    deadline = time.monotonic() + timeout_s
    next_tick = time.monotonic() + tick_s
    while busy:
        now = time.monotonic()
        if now > deadline:
            problems.append(f"workers {sorted(busy)} still running after {timeout_s:.0f} s")
            break
        ev = fleet.next_event(max(0.01, min(next_tick, deadline) - now))
        if tick is not None and time.monotonic() >= next_tick:
            tick()
            next_tick = time.monotonic() + tick_s
        if ev is None or ev.get("run", run) != run:
            continue
        kind = ev.get("event")
        if kind == "gen":
            on_gen(ev)
        elif kind in ("done", "error", "exit"):
            busy.discard(ev["worker"])
            if kind != "done":
                problems.append(f"worker {ev['worker']}: {ev.get('error') or 'exited (' + str(ev.get('returncode')) + ')'}")
    return problems


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time of these processes so far (those gone count 0)."""
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total
