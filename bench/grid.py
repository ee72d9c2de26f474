"""What a network benchmark runs: its columns (decoding modes and the edge settings they override), its cells
(network conditions, in the order they run), the built-in prompts, presets and defaults. Pure."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from picospec.shared.config import EDGE_MODES, EXACT_VERIFY_MODES, VERIFY_MODES

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


# ----------------------------------------------------------------------------------------------- columns

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


# ----------------------------------------------------------------------------------------------- cells

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


# ----------------------------------------------------------------------------------------------- prompts

def pick_prompts(n: int) -> list[str]:
    if not 1 <= n <= len(PROMPTS):
        raise SystemExit(f"--prompts: 1 to {len(PROMPTS)}")
    return PROMPTS[:n]
