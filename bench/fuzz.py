"""picospec-bench fuzz: hostile input at scale against a live cloud over real gRPC sockets.

Sends --messages request messages (default 100,000) of six kinds (bench/fuzz_cases.py: random bytes, mutated valid
messages over every field, protocol-order violations, oversized messages, zstd bombs, abandoned calls) over every
RPC (Speculate, CloudGenerate, Info) and every verification mode the cloud offers, from --concurrency calls at once.
Every case is a pure function of (--seed, its index), so a run is reproducible and any case can be rebuilt.

By default it starts its own cloud (a tiny-random target in a subprocess, on a free loopback port, with
--max-sessions high enough for the fuzzing and the well-behaved sessions together, --max-new-tokens 32 and
--max-context 512 so that the sessions a fuzzer happens to open validly stay cheap); --server HOST:PORT (with
--token if it asks for one, and --server-pid to watch its memory) fuzzes another.

Verdict (exit status 1 on any violation):
  statuses   every call ends with a clear status: OK, INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE,
             RESOURCE_EXHAUSTED, UNIMPLEMENTED, UNAUTHENTICATED or PERMISSION_DENIED, each non-OK one with a
             non-empty message; CANCELLED only where the fuzzer cancelled the call itself. UNKNOWN and INTERNAL
             (an unmapped exception), UNAVAILABLE (a crash), DEADLINE_EXCEEDED (a hang: --call-timeout-s) are not.
  crashes    the cloud is alive at the end and answers Info (our own: its process has not exited, and its log holds
             no traceback).
  honest     every --honest-every messages a well-behaved greedy generation (the real EdgeClient and draft) runs
             beside the fuzzing, rotating over sync and pipeline x every offered verify mode; each must equal the
             reference, the target's greedy tokens from CloudGenerate computed once before the fuzzing starts.
  memory     the cloud's resident memory (VmRSS) after --warmup messages, its peak, and at the end: the end may
             exceed the warm-up value by at most max(--mem-growth x warm-up, --mem-slack-mb); bounded input must
             not leave unbounded state behind.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import grpc

from picospec.bench.fuzz_cases import KINDS, RPCS, Blobs, Case, CloudFacts, build_case
from picospec.bench.ports import free_port
from picospec.netlab.procs import stop_process
from picospec.shared.config import CloudConfig

METHODS = {rpc: f"/picospec.v1.PicoSpec/{rpc}" for rpc in RPCS}
CLEAR = frozenset({"OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED",
                   "UNIMPLEMENTED", "UNAUTHENTICATED", "PERMISSION_DENIED"})
MAX_CHUNKS = 64      # a CloudGenerate the fuzzer opened validly is cancelled after this many chunks
HONEST_MODES = ("sync", "pipeline")
CHANNELS = 4         # connections the fuzzing is spread over
OWN_CLOUD_ARGS = ("--max-new-tokens", "32", "--max-context", "512", "--threads", "1", "--log-level", "WARNING")


@dataclass
class FuzzConfig:
    messages: int = 100_000
    seed: int = 0
    server: str = ""          # empty: start our own cloud
    token: str = ""
    server_pid: int = 0       # --server: its process id, to watch its memory (0: not watched)
    target: str = "tiny-random"
    draft: str = "tiny-random:layers=1"
    concurrency: int = 16
    honest_every: int = 2000
    honest_tokens: int = 16
    call_timeout_s: float = 60.0
    warmup: int = 5000        # messages before the memory baseline is taken (capped at a tenth of --messages)
    mem_growth: float = 0.25
    mem_slack_mb: float = 200.0
    progress_s: float = 10.0
    json: Path | None = None
    quiet: bool = False
    cloud_start_s: float = 300.0

    @property
    def max_sessions(self) -> int:
        """Our own cloud's --max-sessions: every fuzzing call, the well-behaved ones, and room for sessions the
        cloud has not yet released after their calls ended (so a RESOURCE_EXHAUSTED means slots leaked)."""
        return 4 * self.concurrency + 32


# grpc python's aio client, when a write fails because the server has already ended the call, sets the call's status
# to INTERNAL itself ("Internal error from Core") and drops the server's own status (grpc/grpc#36066). The fuzzer
# counts such a call under this label instead: the server ended it; a server-side INTERNAL or UNKNOWN would leave a
# traceback in the server's log, which the verdict checks separately.
ENDED_WHILE_WRITING = "ENDED_WHILE_WRITING"


def status_label(code: str, write_failed: bool) -> str:
    """The status a call is counted under: its code, or ENDED_WHILE_WRITING for grpc python's masked status."""
    return ENDED_WHILE_WRITING if write_failed and code == "INTERNAL" else code


def classify(label: str, details: str, cancelled_by_us: bool) -> str | None:
    """None when a call's final status is a clear one; otherwise what is wrong with it (a violation)."""
    if label == ENDED_WHILE_WRITING:
        return None
    if label == "CANCELLED":
        return None if cancelled_by_us else "CANCELLED although the fuzzer did not cancel the call"
    if label == "DEADLINE_EXCEEDED":
        return "no answer within the call timeout (a hang)"
    if label not in CLEAR:
        return f"unclear status {label}"
    if label != "OK" and not details.strip():
        return f"{label} without a message"
    return None


def memory_bound(baseline: int, growth: float, slack: int) -> int:
    """The largest resident size the cloud may end with: baseline + max(growth x baseline, slack)."""
    return baseline + max(int(growth * baseline), slack)


def read_rss(pid: int) -> int | None:
    """VmRSS of a process in bytes, or None if it is gone (or not on Linux)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---- one call --------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    sent: int
    code: str
    details: str
    cancelled_by_us: bool
    write_failed: bool = False  # a write was refused because the call had ended (see ENDED_WHILE_WRITING)

    @property
    def label(self) -> str:
        return status_label(self.code, self.write_failed)


class Replies:
    """Counts a call's replies as they arrive, so a case can wait for some before going on."""

    def __init__(self) -> None:
        self.count = 0
        self.ended = False
        self.changed = asyncio.Condition()

    async def read(self, call: grpc.aio.Call, limit: int | None = None) -> None:
        try:
            async for _ in call:
                async with self.changed:
                    self.count += 1
                    self.changed.notify_all()
                if limit is not None and self.count >= limit:
                    return
        except grpc.aio.AioRpcError:
            pass  # the status is read from the call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task is being cancelled, not (only) the call
        finally:
            async with self.changed:
                self.ended = True
                self.changed.notify_all()

    async def wait(self, n: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.count >= n or self.ended)


WRITE_ENDED = (grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.CancelledError)


def _refused(e: BaseException) -> bool:
    return isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.INTERNAL


async def _write(call: grpc.aio.StreamStreamCall, case: Case, replies: Replies) -> tuple[int, bool]:
    """Write the case's messages (up to its cancel point): (how many went out, whether a write was refused)."""
    limit = len(case.messages) if case.cancel_after is None else case.cancel_after
    for i, message in enumerate(case.messages[:limit]):
        if case.wait_at is not None and i == case.wait_at[0]:
            await replies.wait(case.wait_at[1])
        if case.cancel_mid_write and i == limit - 1:
            pending = asyncio.ensure_future(call.write(message))
            await asyncio.sleep(0)  # the write has begun; the call is cancelled under it
            call.cancel()
            with contextlib.suppress(*WRITE_ENDED):
                await pending
            return i + 1, True  # cancelled under a write: grpc python may report that as INTERNAL
        try:
            await call.write(message)
        except WRITE_ENDED as e:
            return i, _refused(e)
    return limit, False


async def _status(call: grpc.aio.Call) -> tuple[str, str]:
    code = await call.code()
    return code.name, (await call.details()) or ""


async def run_speculate(channel: grpc.aio.Channel, case: Case, timeout: float, md: tuple) -> Outcome:
    call = channel.stream_stream(METHODS["Speculate"])(timeout=timeout, metadata=md)
    replies = Replies()
    reader = asyncio.create_task(replies.read(call))
    sent, refused = await _write(call, case, replies)
    by_us = case.cancel_mid_write
    if case.cancel_after is not None:
        by_us = call.cancel() or by_us
    else:
        try:
            await call.done_writing()
        except WRITE_ENDED as e:
            refused = refused or _refused(e)
        if case.cancel_after_replies is not None:
            await replies.wait(case.cancel_after_replies)
            by_us = call.cancel()
    await reader
    return Outcome(sent, *await _status(call), by_us, refused)


async def run_cloud_generate(channel: grpc.aio.Channel, case: Case, timeout: float, md: tuple) -> Outcome:
    call = channel.unary_stream(METHODS["CloudGenerate"])(case.messages[0], timeout=timeout, metadata=md)
    limit = MAX_CHUNKS if case.cancel_after_replies is None else case.cancel_after_replies
    by_us = call.cancel() if limit == 0 else False
    if limit:
        replies = Replies()
        await replies.read(call, limit)
        by_us = call.cancel() if replies.count >= limit else False
    return Outcome(1, *await _status(call), by_us)


async def run_info(channel: grpc.aio.Channel, case: Case, timeout: float, md: tuple) -> Outcome:
    call = channel.unary_unary(METHODS["Info"])(case.messages[0], timeout=timeout, metadata=md)
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call
    return Outcome(1, *await _status(call), False)


RUNNERS = {"Speculate": run_speculate, "CloudGenerate": run_cloud_generate, "Info": run_info}


# ---- what was seen -----------------------------------------------------------------------------------------------

@dataclass
class Tally:
    """Counts per kind (calls, messages, statuses), coverage per variant, and the violations (first 100 kept)."""

    streams: collections.Counter = field(default_factory=collections.Counter)
    messages_by_kind: collections.Counter = field(default_factory=collections.Counter)
    statuses: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    coverage: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    by_rpc: collections.Counter = field(default_factory=collections.Counter)
    by_scheme: collections.Counter = field(default_factory=collections.Counter)
    violations: list[dict[str, Any]] = field(default_factory=list)
    violation_count: int = 0

    @property
    def messages(self) -> int:
        return sum(self.messages_by_kind.values())

    def add(self, case: Case, out: Outcome) -> None:
        self.streams[case.kind] += 1
        self.messages_by_kind[case.kind] += out.sent
        self.statuses[case.kind][out.label] += 1
        self.coverage[f"{case.kind}: {case.rpc}: {case.note}"][out.label] += 1
        self.by_rpc[case.rpc] += out.sent
        self.by_scheme[case.scheme] += out.sent
        why = classify(out.label, out.details, out.cancelled_by_us)
        if why is not None:
            self.violation_count += 1
            if len(self.violations) < 100:
                self.violations.append({"case": case.index, "kind": case.kind, "rpc": case.rpc, "scheme": case.scheme,
                                        "note": case.note, "status": out.label, "details": out.details[:500],
                                        "why": why})


@dataclass
class Memory:
    """The cloud's VmRSS: the baseline after the warm-up, the peak after it, the last sample."""

    pid: int
    baseline: int | None = None
    peak: int = 0
    end: int | None = None

    def sample(self, warmed_up: bool) -> None:
        rss = read_rss(self.pid)
        if rss is None:
            return
        if warmed_up and self.baseline is None:
            self.baseline = rss
        if self.baseline is not None:
            self.peak = max(self.peak, rss)
        self.end = rss

    def verdict(self, cfg: FuzzConfig) -> str | None:
        if self.baseline is None or self.end is None:
            return None
        bound = memory_bound(self.baseline, cfg.mem_growth, int(cfg.mem_slack_mb * 2**20))
        if self.end > bound:
            return f"resident memory ended at {self.end / 2**20:.0f} MB, above the bound {bound / 2**20:.0f} MB"
        return None

    def to_dict(self, cfg: FuzzConfig) -> dict[str, Any]:
        mb = lambda b: None if b is None else round(b / 2**20, 1)  # noqa: E731
        bound = memory_bound(self.baseline, cfg.mem_growth, int(cfg.mem_slack_mb * 2**20)) if self.baseline else None
        return {"pid": self.pid, "warmup_mb": mb(self.baseline), "peak_mb": mb(self.peak or None),
                "end_mb": mb(self.end), "bound_mb": mb(bound)}


class HonestSessions:
    """Well-behaved generations beside the fuzzing: one every `every` messages, each checked against the reference."""

    def __init__(self, client: Any, prompt: list[int], reference: list[int], facts: CloudFacts, cfg: FuzzConfig) -> None:
        self.client, self.prompt, self.reference, self.cfg = client, prompt, reference, cfg
        self.tokens = len(reference)
        self.combos = [(m, v) for v in facts.modes for m in HONEST_MODES]
        self.next_at = cfg.honest_every
        self.tasks: list[asyncio.Task] = []
        self.results: list[dict[str, Any]] = []

    def maybe_start(self, messages: int) -> None:
        while messages >= self.next_at:
            self.tasks.append(asyncio.create_task(self._one(len(self.tasks))))
            self.next_at += self.cfg.honest_every

    async def _one(self, i: int) -> None:
        mode, verify = self.combos[i % len(self.combos)]
        rec: dict[str, Any] = {"session": i, "mode": mode, "verify": verify}
        t0 = time.perf_counter()
        try:
            gen = self.client.generate(self.prompt, mode=mode, verify=verify, temperature=0.0,
                                        max_new_tokens=self.tokens, ignore_eos=True)
            tokens = await asyncio.wait_for(gen.collect(), self.cfg.call_timeout_s * 2)
            rec["ok"] = tokens == self.reference
            rec["details"] = "" if rec["ok"] else f"tokens {tokens} != reference {self.reference}"
        except Exception as e:  # noqa: BLE001 - any failure of a well-behaved session is recorded as one
            rec["ok"], rec["details"] = False, f"{type(e).__name__}: {e}"
        rec["s"] = round(time.perf_counter() - t0, 2)
        self.results.append(rec)

    async def finish(self) -> None:
        await asyncio.gather(*self.tasks)

    @property
    def counts(self) -> tuple[int, int]:
        ok = sum(r["ok"] for r in self.results)
        return ok, len(self.results) - ok


# ---- the cloud ---------------------------------------------------------------------------------------------------

@dataclass
class Cloud:
    address: str
    pid: int = 0                       # 0: not ours and not given
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None if self.proc is not None else True

    def tracebacks(self) -> list[str]:
        """Tracebacks our own cloud logged (an exception nothing mapped): the first line after each."""
        if self.log is None:
            return []
        lines = self.log.read_text(errors="replace").splitlines()
        return [" | ".join(lines[i:i + 12])[-600:] for i, line in enumerate(lines) if line.startswith("Traceback")]


@contextlib.asynccontextmanager
async def own_cloud(cfg: FuzzConfig) -> AsyncIterator[Cloud]:
    """A picospec-cloud subprocess on a free loopback port, its log in a temporary file; stopped on exit."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="picospec-fuzz-cloud-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "picospec.cloud_server.cli", "--target", cfg.target, "--host", "127.0.0.1",
           "--port", str(port), "--max-sessions", str(cfg.max_sessions), *OWN_CLOUD_ARGS]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    try:
        yield Cloud(f"127.0.0.1:{port}", proc.pid, proc, log)
    finally:
        stop_process(proc, 15)


@contextlib.asynccontextmanager
async def the_cloud(cfg: FuzzConfig) -> AsyncIterator[Cloud]:
    if cfg.server:
        yield Cloud(cfg.server, cfg.server_pid)
    else:
        async with own_cloud(cfg) as cloud:
            yield cloud


async def info_answers(address: str, md: tuple, timeout: float = 10.0) -> bool:
    from picospec.shared.rpc import picospec_pb2 as pb
    from picospec.shared.rpc import picospec_pb2_grpc as pb_grpc
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            await pb_grpc.PicoSpecStub(ch).Info(pb.InfoRequest(), timeout=timeout, metadata=md)
            return True
        except grpc.aio.AioRpcError:
            return False


# ---- the run -----------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything the workers share: the plan, the channels, the counts. One event loop: no locks."""

    cfg: FuzzConfig
    facts: CloudFacts
    blobs: Blobs
    channels: list[grpc.aio.Channel]
    md: tuple
    honest: HonestSessions
    memory: Memory | None
    tally: Tally = field(default_factory=Tally)
    issued: int = 0
    t0: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> bool:
        return self.tally.messages >= self.cfg.messages

    @property
    def warmed_up(self) -> bool:
        return self.tally.messages >= min(self.cfg.warmup, self.cfg.messages // 10)

    def next_case(self) -> Case:
        self.issued += 1
        return build_case(self.cfg.seed, self.issued - 1, self.facts, self.blobs)


async def worker(run: Run) -> None:
    while not run.done:
        case = run.next_case()
        channel = run.channels[case.index % len(run.channels)]
        outcome = await RUNNERS[case.rpc](channel, case, run.cfg.call_timeout_s, run.md)
        run.tally.add(case, outcome)
        run.honest.maybe_start(run.tally.messages)


def progress_line(run: Run) -> str:
    t = run.tally
    dt = time.perf_counter() - run.t0
    ok, bad = run.honest.counts
    rss = f", cloud RSS {run.memory.end / 2**20:.0f} MB" if run.memory and run.memory.end else ""
    return (f"[fuzz] {t.messages}/{run.cfg.messages} messages in {sum(t.streams.values())} calls, {dt:.0f} s "
            f"({t.messages / max(dt, 1e-9):.0f} msg/s), violations {t.violation_count}, "
            f"well-behaved {ok} ok {bad} failed{rss}")


async def watch(run: Run) -> None:
    """Sample memory every half second and print a progress line every --progress-s, until cancelled."""
    last = time.perf_counter()
    while True:
        await asyncio.sleep(0.5)
        if run.memory is not None:
            run.memory.sample(run.warmed_up)
        if not run.cfg.quiet and time.perf_counter() - last >= run.cfg.progress_s:
            print(progress_line(run), file=sys.stderr, flush=True)
            last = time.perf_counter()


@dataclass
class FuzzReport:
    config: FuzzConfig
    facts: CloudFacts
    tally: Tally
    honest: list[dict[str, Any]]
    memory: dict[str, Any] | None
    server: dict[str, Any]
    fuzz_s: float
    failures: list[str]

    def to_dict(self) -> dict[str, Any]:
        t = self.tally
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self.config).items()
                    if k != "token"}
        return {
            "settings": settings, "cloud": dataclasses.asdict(self.facts), "fuzz_s": round(self.fuzz_s, 1),
            "messages": t.messages, "calls": sum(t.streams.values()),
            "messages_per_s": round(t.messages / max(self.fuzz_s, 1e-9), 1),
            "kinds": {k: {"calls": t.streams[k], "messages": t.messages_by_kind[k], "statuses": dict(t.statuses[k])}
                      for k in KINDS},
            "messages_by_rpc": dict(t.by_rpc), "messages_by_scheme": dict(t.by_scheme),
            "coverage": {k: dict(v) for k, v in sorted(t.coverage.items())},
            "violation_count": t.violation_count, "violations": t.violations,
            "honest": self.honest, "memory": self.memory, "server": self.server,
            "failures": self.failures, "verdict": "FAIL" if self.failures else "PASS",
        }


def prompt_ids(draft: Any) -> list[int]:
    return list(draft.tokenizer("the quick brown fox")["input_ids"])[:16] or [1]


async def _fuzz_with(cfg: FuzzConfig, cloud: Cloud, client: Any) -> FuzzReport:
    from picospec.cloud_server.grpc_setup import message_limit
    info = await client.connect(wait_s=cfg.cloud_start_s)
    facts = CloudFacts.from_info(info, message_limit(CloudConfig(), info.vocab_size))
    prompt = prompt_ids(client.draft)
    n = min(cfg.honest_tokens, facts.max_new_tokens, facts.max_context - len(prompt))
    reference = await client.generate(prompt, mode="cloud", temperature=0.0, max_new_tokens=n,
                                      ignore_eos=True).collect()
    md = (("authorization", f"Bearer {cfg.token}"),) if cfg.token else ()
    options = [("grpc.max_receive_message_length", 64 * 2**20)]
    channels = [grpc.aio.insecure_channel(cloud.address, options=options) for _ in range(CHANNELS)]
    run = Run(cfg, facts, Blobs.make(facts, cfg.seed), channels, md, HonestSessions(client, prompt, reference, facts, cfg),
              Memory(cloud.pid) if cloud.pid else None)
    watcher = asyncio.create_task(watch(run))
    try:
        await asyncio.gather(*(worker(run) for _ in range(cfg.concurrency)))
        fuzz_s = time.perf_counter() - run.t0
        await run.honest.finish()
    finally:
        watcher.cancel()
        for ch in channels:
            await ch.close()
    return await _verdict(cfg, cloud, run, fuzz_s, md)


async def _verdict(cfg: FuzzConfig, cloud: Cloud, run: Run, fuzz_s: float, md: tuple) -> FuzzReport:
    """The checks after the fuzzing: statuses, the cloud alive and answering, well-behaved sessions, memory."""
    if run.memory is not None:
        run.memory.sample(True)
    server = {"address": cloud.address, "alive": cloud.alive(), "info_answers": await info_answers(cloud.address, md),
              "tracebacks": cloud.tracebacks()[:5], "log": str(cloud.log) if cloud.log else None}
    failures = []
    if run.tally.violation_count:
        failures.append(f"{run.tally.violation_count} calls ended without a clear status")
    if not server["alive"] or not server["info_answers"]:
        failures.append("the cloud crashed" if not server["alive"] else "the cloud no longer answers Info")
    if server["tracebacks"]:
        failures.append(f"the cloud logged {len(cloud.tracebacks())} tracebacks")
    ok, bad = run.honest.counts
    if bad or not ok:
        failures.append(f"well-behaved sessions: {ok} ok, {bad} failed")
    mem_why = run.memory.verdict(cfg) if run.memory is not None else None
    if mem_why:
        failures.append(mem_why)
    return FuzzReport(cfg, run.facts, run.tally, run.honest.results,
                      run.memory.to_dict(cfg) if run.memory else None, server, fuzz_s, failures)


async def fuzz(cfg: FuzzConfig) -> FuzzReport:
    """The whole run: start (or reach) the cloud, take the reference, fuzz beside well-behaved sessions, check."""
    from picospec.edge_client.client import EdgeClient
    from picospec.shared.config import EdgeConfig
    from picospec.shared.models import load_model
    draft = load_model(cfg.draft, progress=False)
    async with the_cloud(cfg) as cloud:
        ecfg = EdgeConfig(server=cloud.address, draft=draft.name, token=cfg.token, wait_ready_s=cfg.cloud_start_s,
                          reconnect_s=0.0, timeout_s=cfg.call_timeout_s * 2)
        async with EdgeClient(ecfg, draft) as client:
            return await _fuzz_with(cfg, cloud, client)


# ---- output ------------------------------------------------------------------------------------------------------

def _table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "| " + " | ".join(c.ljust(n) for c, n in zip(row, w)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (n + 2) for n in w) + "|"] + [fmt(r) for r in rows])


def format_report(report: FuzzReport) -> str:
    t = report.tally
    rows = [[k, str(t.streams[k]), str(t.messages_by_kind[k]),
             ", ".join(f"{c} {n}" for c, n in t.statuses[k].most_common())] for k in KINDS]
    rows.append(["total", str(sum(t.streams.values())), str(t.messages), ""])
    lines = [_table(["kind", "calls", "messages", "statuses"], rows), ""]
    lines.append("messages by RPC: " + ", ".join(f"{k} {v}" for k, v in t.by_rpc.most_common()))
    lines.append("messages by verify mode: " + ", ".join(f"{k} {v}" for k, v in t.by_scheme.most_common()))
    lines.append(f"time: {report.fuzz_s:.1f} s fuzzing, {t.messages / max(report.fuzz_s, 1e-9):.0f} messages/s, "
                 f"{report.config.concurrency} calls at once")
    ok = sum(r["ok"] for r in report.honest)
    lines.append(f"well-behaved sessions: {ok} ok, {len(report.honest) - ok} failed")
    s = report.server
    lines.append(f"cloud: alive {s['alive']}, answers Info {s['info_answers']}, tracebacks {len(s['tracebacks'])}")
    m = report.memory
    lines.append("cloud memory: not watched (--server without --server-pid)" if m is None else
                 f"cloud memory (VmRSS): after warm-up {m['warmup_mb']} MB, peak {m['peak_mb']} MB, end {m['end_mb']} MB, "
                 f"bound {m['bound_mb']} MB")
    lines.append(f"unclear statuses: {t.violation_count}")
    for v in t.violations[:10]:
        lines.append(f"  case {v['case']} ({v['kind']}, {v['rpc']}, {v['scheme']}, {v['note']}): {v['status']} "
                     f"{v['details'][:200]!r}: {v['why']}")
    for r in [r for r in report.honest if not r["ok"]][:10]:
        lines.append(f"  well-behaved session {r['session']} ({r['mode']}/{r['verify']}) failed: {r['details'][:300]}")
    lines.append("verdict: " + ("FAIL: " + "; ".join(report.failures) if report.failures else "PASS"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> FuzzConfig:
    d = FuzzConfig()
    p = argparse.ArgumentParser(prog="picospec-bench fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=d.messages, help="request messages to send in all")
    p.add_argument("--seed", type=int, default=d.seed, help="case i is a pure function of (seed, i)")
    p.add_argument("--server", default=d.server, help="HOST:PORT of a running cloud (plaintext); default: start one")
    p.add_argument("--token", default=os.environ.get("PICOSPEC_TOKEN", d.token),
                   help="access token for a cloud started with --auth-tokens (default: $PICOSPEC_TOKEN)")
    p.add_argument("--server-pid", type=int, default=d.server_pid, help="--server's process id, to watch its memory")
    p.add_argument("--target", default=d.target, help="our own cloud's target")
    p.add_argument("--draft", default=d.draft, help="the well-behaved sessions' draft (shares the target's tokenizer)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="fuzzing calls at once")
    p.add_argument("--honest-every", type=int, default=d.honest_every, help="a well-behaved session every N messages")
    p.add_argument("--honest-tokens", type=int, default=d.honest_tokens, help="tokens per well-behaved session")
    p.add_argument("--call-timeout-s", type=float, default=d.call_timeout_s, help="a call not ended by then is a hang")
    p.add_argument("--warmup", type=int, default=d.warmup, help="messages before the memory baseline")
    p.add_argument("--mem-growth", type=float, default=d.mem_growth, help="allowed growth over the baseline, fraction")
    p.add_argument("--mem-slack-mb", type=float, default=d.mem_slack_mb, help="allowed growth in MB, if larger")
    p.add_argument("--progress-s", type=float, default=d.progress_s, help="seconds between progress lines (stderr)")
    p.add_argument("--json", type=Path, default=None, help="write the report here as JSON")
    a = p.parse_args(argv)
    cfg = FuzzConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(FuzzConfig) if hasattr(a, f.name)})
    if cfg.messages < 1 or cfg.concurrency < 1 or cfg.honest_every < 1:
        p.error("--messages, --concurrency and --honest-every must be positive")
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    import torch
    torch.set_num_threads(1)  # the well-behaved sessions' draft: one thread, the cloud has its own
    report = asyncio.run(fuzz(cfg))
    print(format_report(report))
    if cfg.json is not None:
        cfg.json.parent.mkdir(parents=True, exist_ok=True)
        cfg.json.write_text(json.dumps(report.to_dict(), indent=1, default=repr))
        print(f"wrote {cfg.json}")
    sys.exit(1 if report.failures else 0)
