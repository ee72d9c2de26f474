"""The testbed of the network benchmarks: the cloud server and the edge worker, each in its own network
namespace pinned to its own core, joined by a kernel-shaped veth link (netlab) that is reshaped in place between
cells; or, with netns off, both on plain loopback. Talks to the edge worker (bench.edge_worker) over its stdin
and stdout, one JSON line each way.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picospec.bench.grid import LLAMA_ALONE, Column, Condition
from picospec.bench.ports import free_port
from picospec.netlab.netns import shaped_link
from picospec.netlab.procs import stop_process
from picospec.netlab.shaping import LinkSpec, netns_usable, probe_host

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


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
    engine: str = "auto"        # the cloud's --engine (hf, static, llama.cpp)
    draft_engine: str = "auto"  # the edge's --draft-engine (torch, llama.cpp)
    # the `llama.cpp` column's GGUF (the target alone); "" = the target's own name (a built-in or a .gguf path)
    baseline_gguf: str = ""


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
        self.baseline: subprocess.Popen | None = None  # the `llama.cpp` column's worker, started when first asked
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
            ok, why = netns_usable()
            if not ok:
                raise BenchError(f"cannot build the namespace link: {why} (run as root, or --no-netns for RTT 0 only)")
            self.features = probe_host()
            self.shaping_log = self.stack.enter_context(open(self.logdir / "shaping.log", "a"))
            self.link = self.stack.enter_context(shaped_link(LinkSpec(0.0), features=self.features, log=self.shaping_log))
            self.cloud_host = self.link.cloud_ip
            self.info["link"] = {"edge_ip": self.link.edge_ip, "cloud_ip": self.link.cloud_ip}
            # the RTT probe's echo server lives beside the cloud (idle except during the probe)
            ms = self._popen("cloud", _pin(s.cloud_core, [sys.executable, "-m", "picospec.netlab.measure", "serve", "--host",
                                                          self.cloud_host, "--port", "5201"]),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if "ready" not in (ms.stdout.readline() if ms.stdout else ""):
                raise BenchError("the RTT probe's echo server did not start")
        elif s.port == BenchSettings.port:
            s.port = free_port()
        cloud_log = self.logdir / "cloud.log"
        cloud_out = self.stack.enter_context(open(cloud_log, "w"))
        cloud = self._popen("cloud", _pin(s.cloud_core, [str(BIN / "picospec-cloud"), "--target", s.target, "--host",
                                                         self.cloud_host, "--port", str(s.port), "--threads", "1",
                                                         "--engine", s.engine]),
                            stdout=cloud_out, stderr=subprocess.STDOUT)
        worker_log = self.stack.enter_context(open(self.logdir / "edge_worker.log", "w"))
        self.worker = self._popen("edge", _pin(s.edge_core, [sys.executable, "-m", "picospec.bench.edge_worker", "--draft", s.draft,
                                                             "--draft-engine", s.draft_engine,
                                                             "--max-new-tokens", str(s.max_new_tokens),
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
        self.link.reshape(LinkSpec(cond.rtt_ms, cond.mbit, cond.mbit), features=self.features, log=self.shaping_log)

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

    def run_baseline(self, prompt: str, temperature: float | None) -> dict[str, Any]:
        """One generation of llama.cpp alone on the cloud's core, in the cloud's namespace: no network. At T > 0 it
        samples with llama.cpp's own sampler at that temperature (its rate is what compares, not its tokens)."""
        if self.baseline is None:
            log = self.stack.enter_context(open(self.logdir / "llama_alone.log", "w"))
            gguf = self.s.baseline_gguf or self.s.target
            self.baseline = self._popen("cloud", _pin(self.s.cloud_core, [
                sys.executable, "-m", "picospec.bench.llama_alone", "--serve", "--target", gguf, "--threads", "1",
                "--max-new-tokens", str(self.s.max_new_tokens)]), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, text=True)
            self._read_from(self.baseline, 900)
        assert self.baseline.stdin is not None
        self.baseline.stdin.write(json.dumps({"prompt": prompt, "temperature": temperature or 0.0}) + "\n")
        self.baseline.stdin.flush()
        return self._read_from(self.baseline, self.s.run_timeout_s + 300)

    def _read_from(self, proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise BenchError(f"{LLAMA_ALONE} baseline worker: no reply within {timeout:.0f} s (exit {proc.poll()})")
        return json.loads(line)

    def run(self, col: Column, prompt: str, seed: int, temperature: float | None = None) -> dict[str, Any]:
        """One generation of `col`; `temperature` None: the worker's (BenchSettings.temperature)."""
        if col.mode == LLAMA_ALONE:
            return self.run_baseline(prompt, self.s.temperature if temperature is None else temperature)
        overrides = {**col.overrides(), **({} if temperature is None else {"temperature": temperature})}
        req = {"op": "run", "prompt": prompt, "mode": col.request_mode, "overrides": overrides, "seed": seed,
               "timeout_s": self.s.run_timeout_s}
        r = self.ask(req, timeout=self.s.run_timeout_s + 300)
        if r.get("timed_out"):
            self.flush()
        elif not r.get("ok"):
            with contextlib.suppress(BenchError):
                self.shape(self.cond)  # a fresh channel after a failure
        return r
