"""picospec-bench soak: S sessions (default 64) for M minutes (default 10) of back-to-back generations with mixed
modes and lengths against one cloud; reports generations, failures (by reason) and the cloud's resident memory
over time, which must end within 10% of where it stood after the warm-up.

The cloud (`--threads 1`, pinned to --cloud-core, default 0) serves the target; the sessions run in --edge-procs
session workers (bench/session_worker.py, pinned to --edge-core, default 1, one torch thread each). Each session
starts generation after generation until M minutes have passed; what each one runs is a pure function of (seed,
session, k) (`soak_spec`): the mode (cloud, sync, early-exit, pipeline, picospec), the verification mode,
greedy or T=1 (top-p 0.9 half of the time), the length (1 to --max-tokens), ignore-eos or not, a fixed or
online draft length, the prompt (chat template or plain), and now and then a fresh client (a new channel).

Memory: the cloud's RSS (psutil) every --rss-every-s seconds. Its baseline is the first sample after --warmup-s
(the first passes of every mode allocate what they keep); its end is taken once every generation has finished.
The rule: |end - baseline| <= 10% (--tolerance) of the baseline. Exit status 1 on any failed generation or a
broken rule.

Writes OUT/soak.json (settings, summary, RSS samples, every generation), soak.md and soak.png (RSS over time).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from picospec.bench import fleet as fl
from picospec.bench.grid import PROMPTS
from picospec.bench.report import fmt, markdown_table, pyplot

SMOLLM2 = "smollm2-135m-instruct"
# (mode, weight): the pipeline, the default, most often; `edge` needs no cloud and is left out
SOAK_MODES = (("pipeline", 4), ("sync", 2), ("cloud", 2), ("early-exit", 1), ("picospec", 1))
SOAK_VERIFY = ("coupled", "dense", "split-exact", "split-topk")
MIB = 1024 * 1024


@dataclass
class SoakConfig:
    target: str = SMOLLM2
    draft: str = f"{SMOLLM2}:int8"
    sessions: int = 64
    minutes: float = 10.0
    warmup_s: float = 60.0
    rss_every_s: float = 5.0
    tolerance: float = 0.10
    max_tokens: int = 64
    gen_timeout_s: float = 600.0  # one generation's deadline: 64 sessions share one CPU core's target passes
    seed: int = 0
    edge_procs: int = 4
    cloud_core: int | None = 0
    edge_core: int | None = 1
    device: str | None = None
    dtype: str | None = None
    batching: str | None = None  # the cloud's --batching, where given
    progress_every_s: float = 15.0
    out: Path = Path("bench_out/soak")
    quiet: bool = False
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- pure parts

def soak_spec(seed: int, session: int, k: int, max_tokens: int) -> dict[str, Any]:
    """The k-th generation of a session: modes, sampling, length, prompt and client churn, mixed; a pure function."""
    rng = random.Random(f"soak-{seed}-{session}-{k}")
    mode = rng.choices([m for m, _ in SOAK_MODES], weights=[w for _, w in SOAK_MODES])[0]
    temperature = rng.choice((0.0, 1.0))
    lengths = sorted({1, 4, 8, 16, 32, max_tokens} & set(range(1, max_tokens + 1)))
    overrides: dict[str, Any] = {
        "verify": rng.choice(SOAK_VERIFY), "temperature": temperature,
        "top_p": 0.9 if temperature and rng.random() < 0.5 else 1.0,
        "max_new_tokens": rng.choice(lengths), "ignore_eos": rng.random() < 0.5,
        "draft_len": rng.choice((0, 0, 2, 4, 6)),
    }
    prompt = rng.choice(PROMPTS)
    return {"prompt": prompt.text, "chat": rng.random() < 0.8, "mode": mode, "overrides": overrides,
            "seed": seed * 1_000_003 + 1000 * session + k, "fresh_client": rng.random() < 0.25}


def memory_verdict(samples: Sequence[tuple[float, int]], warmup_s: float, tolerance: float) -> dict[str, Any]:
    """From (seconds since the start, RSS bytes) samples, the last one taken at the end: the baseline (the first
    sample at or after warm-up), the end, the peak, the relative change and whether it is within `tolerance`."""
    after = [rss for t, rss in samples if t >= warmup_s]
    if not samples or not after:
        return {"baseline": None, "end": samples[-1][1] if samples else None, "peak": None, "change": None,
                "ok": None, "why": f"no sample after the {warmup_s:g} s warm-up"}
    baseline, end = after[0], samples[-1][1]
    change = (end - baseline) / baseline
    return {"baseline": baseline, "end": end, "peak": max(rss for _, rss in samples), "change": change,
            "ok": abs(change) <= tolerance, "why": None}


def failure_reason(error: str) -> str:
    """An error message as a reason to count: numbers, addresses and quoted values blanked, so alike ones group."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", error)
    return re.sub(r"\d+(\.\d+)?", "N", text)[:160]


def summarize(records: Sequence[dict[str, Any]], problems: Sequence[str], rss: Sequence[tuple[float, int]],
              cfg: SoakConfig, wall_s: float) -> dict[str, Any]:
    fails = [r for r in records if r.get("error")]
    tokens = sum(r.get("generated_tokens") or 0 for r in records if not r.get("error"))
    reasons = Counter(failure_reason(r["error"]) for r in fails) + Counter(problems)
    return {"generations": len(records), "failures": len(fails) + len(problems), "tokens": tokens,
            "tokens_per_s": tokens / wall_s if wall_s > 0 else None, "wall_s": wall_s,
            "sessions_started": len({r["session"] for r in records}),
            "failure_reasons": dict(reasons.most_common()),
            "memory": memory_verdict(rss, cfg.warmup_s, cfg.tolerance), "by_mode": by_mode(records)}


def by_mode(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in records):
        rs = [r for r in records if r["mode"] == mode]
        ok = [r for r in rs if not r.get("error")]
        rates = [r["decode_tokens_per_s"] for r in ok if r.get("decode_tokens_per_s")]
        rows.append({"mode": mode, "generations": len(rs), "failures": len(rs) - len(ok),
                     "tokens": sum(r.get("generated_tokens") or 0 for r in ok),
                     "decode_tokens_per_s_p50": statistics.median(rates) if rates else None})
    return rows


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MIB:,.0f}"


def report_markdown(settings: dict[str, Any], s: dict[str, Any]) -> str:
    m = s["memory"]
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}[m["ok"]]
    head = ["sessions", "minutes", "generations", "failures", "tokens", "aggregate tok/s", "RSS loaded MiB",
            f"RSS after warm-up ({settings['warmup_s']:g} s) MiB", "RSS peak MiB", "RSS end MiB", "change",
            f"within {settings['tolerance']:.0%}"]
    body = [[str(settings["sessions"]), f"{settings['minutes']:g}", str(s["generations"]), str(s["failures"]),
             str(s["tokens"]), fmt(s["tokens_per_s"]), _mib(settings.get("rss_loaded")), _mib(m["baseline"]),
             _mib(m["peak"]), _mib(m["end"]), fmt(m["change"], "{:+.1%}"), verdict]]
    modes = markdown_table(["mode", "generations", "failures", "tokens", "decode tok/s p50"],
                           [[r["mode"], str(r["generations"]), str(r["failures"]), str(r["tokens"]),
                             fmt(r["decode_tokens_per_s_p50"])] for r in s["by_mode"]])
    reasons = "\n".join(f"- {n} x {why}" for why, n in s["failure_reasons"].items()) or "none"
    parts = [f"# picospec-bench soak\n\n{settings['target']} <- {settings['draft']}; {settings['sessions']} sessions for "
             f"{settings['minutes']:g} min, cloud on core {settings['cloud_core']}, {settings['edge_procs_used']} edge "
             f"process(es) on core {settings['edge_core']}.", markdown_table(head, body), "## By mode\n\n" + modes,
             "## Failures by reason\n\n" + reasons, *[f"**Note**: {n}" for n in settings.get("notes", [])]]
    if m["why"]:
        parts.append(f"**Memory rule not decided**: {m['why']}")
    return "\n\n".join(parts) + "\n"


def plot(rss: Sequence[tuple[float, int]], records: Sequence[dict[str, Any]], t0: float, verdict: dict[str, Any],
         cfg: SoakConfig, path: Path) -> Path | None:
    """The cloud's RSS over time (warm-up end and the tolerance band marked) and generations finished."""
    plt = pyplot()
    if plt is None or not rss:
        return None
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([t for t, _ in rss], [x / MIB for _, x in rss], marker=".", label="cloud RSS")
    ax.axvline(cfg.warmup_s, color="grey", ls="--", lw=0.8, label="end of warm-up")
    if verdict["baseline"]:
        b = verdict["baseline"] / MIB
        ax.axhspan(b * (1 - cfg.tolerance), b * (1 + cfg.tolerance), color="green", alpha=0.1,
                   label=f"baseline ±{cfg.tolerance:.0%}")
    ax.set_xlabel("seconds since the soak started")
    ax.set_ylabel("cloud RSS (MiB)")
    ax.grid(alpha=0.3)
    ends = sorted(r["end"] - t0 for r in records)
    twin = ax.twinx()
    twin.plot(ends, range(1, len(ends) + 1), color="tab:orange", lw=1, label="generations finished")
    twin.set_ylabel("generations finished")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")
    ax.set_title(f"picospec-bench soak: {cfg.target} <- {cfg.draft}, {cfg.sessions} sessions, {cfg.minutes:g} min",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Monitor:
    """What the soak watches while it runs: the cloud's RSS samples and a progress line now and then."""

    def __init__(self, cfg: SoakConfig, pid: int, t0: float) -> None:
        self.cfg, self.pid, self.t0 = cfg, pid, t0
        self.rss: list[tuple[float, int]] = []
        self.records: list[dict[str, Any]] = []
        self.next_line = t0 + cfg.progress_every_s

    def sample(self) -> None:
        x = fl.process_rss(self.pid)
        if x is not None:
            self.rss.append((time.monotonic() - self.t0, x))
        if not self.cfg.quiet and time.monotonic() >= self.next_line:
            self.next_line += self.cfg.progress_every_s
            self.line()

    def on_gen(self, ev: dict[str, Any]) -> None:
        self.records.append(ev)
        if ev.get("error") and not self.cfg.quiet:
            print(f"soak: session {ev['session']} generation {ev['k']} ({ev['mode']}/{ev.get('verify')}): {ev['error']}",
                  file=sys.stderr, flush=True)

    def line(self) -> None:
        fails = sum(bool(r.get("error")) for r in self.records)
        print(f"soak {time.monotonic() - self.t0:5.0f}/{self.cfg.minutes * 60:.0f} s: {len(self.records)} generations, "
              f"{fails} failures, cloud RSS {_mib(self.rss[-1][1] if self.rss else None)} MiB", file=sys.stderr, flush=True)


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """The whole soak; writes soak.json, soak.md, soak.png into cfg.out and returns what soak.json holds."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    pinned = fl.pinning_possible()
    cloud_core, edge_core = (cfg.cloud_core, cfg.edge_core) if pinned else (None, None)
    n_procs = min(cfg.edge_procs, cfg.sessions)
    logdir = cfg.out / "soak_logs"
    extra = fl.cloud_limits(cfg.sessions, cfg.max_tokens)
    passed = (("--device", cfg.device), ("--dtype", cfg.dtype), ("--batching", cfg.batching))
    extra += [x for flag, v in passed if v for x in (flag, v)]
    with fl.edge_fleet(n_procs, cfg.draft, edge_core, logdir) as fleet, \
            fl.cloud_process(cfg.target, cloud_core, logdir / "cloud.log", extra) as cloud:
        fleet.wait_ready()
        rss_loaded = fl.process_rss(cloud.pid)
        t0 = time.monotonic()
        mon = Monitor(cfg, cloud.pid, t0)
        plan = {"kind": "soak", "seed": cfg.seed, "duration_s": cfg.minutes * 60, "max_tokens": cfg.max_tokens,
                "timeout_s": cfg.gen_timeout_s}
        problems = fl.drive(fleet, "soak", cloud.address, fl.split_sessions(cfg.sessions, n_procs), plan, mon.on_gen,
                            tick=mon.sample, tick_s=cfg.rss_every_s, timeout_s=cfg.minutes * 60 + cfg.gen_timeout_s + 300)
        wall = time.monotonic() - t0
        mon.sample()  # the end: every generation has finished
        mon.line()
    settings = {**asdict(cfg), "out": str(cfg.out), "cloud_core": cloud_core, "edge_core": edge_core,
                "edge_procs_used": n_procs, "rss_loaded": rss_loaded}
    summary = summarize(mon.records, problems, mon.rss, cfg, wall)
    result = {"settings": settings, "summary": summary, "rss": mon.rss, "generations": mon.records}
    (cfg.out / "soak.json").write_text(json.dumps(result, indent=1, default=str))
    (cfg.out / "soak.md").write_text(report_markdown(settings, summary))
    plot(mon.rss, mon.records, t0, summary["memory"], cfg, cfg.out / "soak.png")
    return result


def parse_args(argv: list[str] | None) -> SoakConfig:
    d = SoakConfig()
    p = argparse.ArgumentParser(prog="picospec-bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=d.target)
    p.add_argument("--draft", default=d.draft)
    p.add_argument("--sessions", type=int, default=d.sessions, help="concurrent sessions")
    p.add_argument("--minutes", type=float, default=d.minutes, help="how long generations keep starting")
    p.add_argument("--warmup-s", type=float, default=d.warmup_s, help="seconds before the memory baseline is taken")
    p.add_argument("--rss-every-s", type=float, default=d.rss_every_s, help="seconds between RSS samples")
    p.add_argument("--tolerance", type=float, default=d.tolerance, help="largest relative RSS change allowed")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="longest generation")
    p.add_argument("--gen-timeout-s", type=float, default=d.gen_timeout_s, help="deadline of one generation")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--edge-procs", type=int, default=d.edge_procs, help="edge worker processes (sessions dealt over them)")
    p.add_argument("--cloud-core", type=int, default=d.cloud_core)
    p.add_argument("--edge-core", type=int, default=d.edge_core)
    p.add_argument("--device", default=None, help="passed to the cloud (cpu, cuda)")
    p.add_argument("--dtype", default=None, help="passed to the cloud")
    p.add_argument("--batching", default=None, choices=("auto", "on", "off"), help="passed to the cloud")
    p.add_argument("--progress-every-s", type=float, default=d.progress_every_s)
    p.add_argument("--out", type=Path, default=d.out)
    a = p.parse_args(argv)
    if a.sessions < 1 or a.minutes <= 0 or a.max_tokens < 1 or a.rss_every_s <= 0:
        p.error("--sessions, --minutes, --max-tokens and --rss-every-s must be positive")
    return SoakConfig(**vars(a))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    result = run_soak(cfg)
    print(report_markdown(result["settings"], result["summary"]))
    print(f"wrote {cfg.out / 'soak.json'}, {cfg.out / 'soak.md'}, {cfg.out / 'soak.png'}")
    s = result["summary"]
    sys.exit(0 if s["failures"] == 0 and s["memory"]["ok"] else 1)


if __name__ == "__main__":
    main()
