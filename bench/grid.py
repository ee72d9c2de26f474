"""What a network benchmark runs: its columns (decoding modes and the edge settings they override), its cells
(network conditions, in the order they run), the built-in prompts, presets and defaults. Pure."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

from picospec.shared.config import EDGE_MODES, EXACT_VERIFY_MODES, VERIFY_MODES, EdgeConfig

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
# the three network conditions the goals name (RTT ms x Mbit/s each way); --rtt-ms/--mbit give a cross product
DEFAULT_CELLS = "50x10,200x1,10x100"
# used for a cross product when only one of --rtt-ms and --mbit is given
DEFAULT_RTTS = (10.0, 50.0, 100.0, 200.0)
DEFAULT_MBITS = (0.1, 1.0, 10.0, 100.0)
DEFAULT_TEMPERATURES = "0,1"  # the goals are stated for greedy and for T=1
# `default` is the edge with no overrides at all (EdgeConfig's defaults, whatever they are when it runs);
# `best` the best exact configuration: pipeline, coupled, draft length chosen online
DEFAULT_COLUMNS = "llama.cpp,cloud,sync=sync:dense,picospec,default,best=pipeline:coupled::0"
PRESETS = {"paper-table1": "cloud,sync,picospec,ours=pipeline:coupled:on:0"}
DEFAULT_MODE = "default"  # a column MODE: the edge's default mode, nothing overridden that the spec does not name
# a column MODE outside this project: llama.cpp running the target's GGUF alone on the cloud's core (bench/llama_alone.py),
# the fastest way a CPU user gets the target's output today. With `cloud` it is a baseline: every ratio is taken
# against the faster of the two in the same cell (report.aggregate)
LLAMA_ALONE = "llama.cpp"
BASELINE_MODES = ("cloud", LLAMA_ALONE)


class Prompt(NamedTuple):
    """A built-in prompt and what kind of text it asks for (acceptance differs a lot between chat, code, prose)."""

    label: str
    text: str


PROMPTS: tuple[Prompt, ...] = (  # the first three: one of each kind, so that --prompts 3 covers them
    Prompt("chat", "Hi! I have one free evening in Lisbon. What would you suggest I do?"),
    Prompt("code", "Write a Python function that merges two sorted lists into one sorted list."),
    Prompt("prose", "Write a short paragraph describing a quiet harbour town at dawn."),
    Prompt("math", "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May? Think step by step."),
    Prompt("code-2", "Write a Python function that returns the n-th Fibonacci number iteratively."),
    Prompt("explain", "Explain what a hash map is to a beginner programmer in three sentences."),
)


# ----------------------------------------------------------------------------------------------- columns

@dataclass(frozen=True)
class Column:
    """One column of a benchmark: a decoding mode (or `default`, the edge's own) and the edge settings it overrides."""

    label: str
    mode: str
    verify: str | None = None
    hints: str | None = None
    draft_len: int | None = None

    def overrides(self) -> dict[str, Any]:
        o = {"verify": self.verify, "hints": self.hints, "draft_len": self.draft_len}
        return {k: v for k, v in o.items() if v is not None}

    @property
    def request_mode(self) -> str | None:
        """The mode the edge is asked for; None lets it use its configured default."""
        return None if self.mode == DEFAULT_MODE else self.mode

    @property
    def resolved_mode(self) -> str:
        """The mode that runs: `default` read from EdgeConfig now, so the column follows the defaults."""
        return EdgeConfig().mode if self.mode == DEFAULT_MODE else self.mode

    @property
    def exact(self) -> bool:
        """Lossless? The draft alone is not; picospec is split-topk whatever is set; others by verify mode."""
        mode = self.resolved_mode
        if mode == LLAMA_ALONE:
            return True
        if mode == "edge":
            return False
        if mode == "cloud":
            return True
        return mode != "picospec" and (self.verify or EdgeConfig().verify) in EXACT_VERIFY_MODES


def parse_column(spec: str) -> Column:
    """`[LABEL=]MODE[:VERIFY[:HINTS[:DRAFT_LEN]]]` -> Column; ValueError naming what is wrong. MODE `default`
    is the edge's default mode; empty fields override nothing."""
    label, _, body = spec.strip().rpartition("=")
    parts = body.split(":")
    if len(parts) > 4:
        raise ValueError(f"{spec!r}: at most MODE:VERIFY:HINTS:DRAFT_LEN")
    parts += [""] * (4 - len(parts))
    mode, verify, hints, draft_len = (p.strip() for p in parts)
    if mode not in (*EDGE_MODES, DEFAULT_MODE, LLAMA_ALONE):
        raise ValueError(f"{spec!r}: unknown mode {mode!r}; choose from "
                         f"{', '.join((*EDGE_MODES, DEFAULT_MODE, LLAMA_ALONE))}")
    if mode == LLAMA_ALONE and (verify or hints or draft_len):
        raise ValueError(f"{spec!r}: {LLAMA_ALONE} (the target's GGUF alone) takes no verify, hints or draft length")
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


def parse_temperatures(text: str) -> list[float]:
    """`0,1` -> [0.0, 1.0], first-seen order, duplicates dropped; ValueError on a negative or an empty list."""
    temps = list(dict.fromkeys(parse_floats(text)))
    if not temps or any(t < 0 or math.isnan(t) for t in temps):
        raise ValueError(f"--temperatures {text!r}: one or more temperatures >= 0, comma-separated")
    return temps


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


def order_cells(conds: Iterable[Condition]) -> list[Condition]:
    """Cells in the order they run: widest bandwidth first, then rising RTT, so that a column that times out
    can be skipped in the cells that are only harder. Duplicates dropped."""
    return sorted(set(conds), key=lambda c: (-math.inf if c.mbit is None else -c.mbit, c.rtt_ms))


def grid(rtts: Iterable[float], mbits: Iterable[float | None]) -> list[Condition]:
    """Every RTT with every bandwidth (0 = unshaped), in running order."""
    return order_cells(Condition(r, m or None) for m in mbits for r in rtts)


def parse_cells(text: str) -> list[Condition]:
    """`50x10,200x1` -> the cells (RTT ms x Mbit/s each way; Mbit 0 = unshaped), in running order: explicit
    cells where a cross product would run conditions nobody asked for."""
    conds = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        rtt, sep, mbit = part.lower().partition("x")
        try:
            r, m = float(rtt), float(mbit)
        except ValueError:
            r = m = math.nan
        if not sep or not (r >= 0 and m >= 0):
            raise ValueError(f"--cells: {part!r} is not RTT_MSxMBIT (e.g. 50x10; 0x0 = no delay, unshaped)")
        conds.append(Condition(r, m or None))
    if not conds:
        raise ValueError("--cells: no cells given")
    return order_cells(conds)


def conditions(cells: str | None, rtts: str | None, mbits: str | None) -> list[Condition]:
    """What to run from the sweep's flags: --cells, or the cross product of --rtt-ms and --mbit (either one
    alone crossed with the other's default list), or by default DEFAULT_CELLS."""
    if cells is not None and (rtts is not None or mbits is not None):
        raise ValueError("give --cells or --rtt-ms/--mbit (a cross product), not both")
    if rtts is None and mbits is None:
        return parse_cells(cells or DEFAULT_CELLS)
    return grid(parse_floats(rtts) if rtts is not None else DEFAULT_RTTS,
                parse_floats(mbits) if mbits is not None else DEFAULT_MBITS)


def harder_or_equal(c: Condition, than: Condition) -> bool:
    """c is at least as hard as `than`: no less RTT and no more bandwidth (unshaped = infinite)."""
    inf = lambda m: math.inf if not m else m  # noqa: E731
    return c.rtt_ms >= than.rtt_ms and inf(c.mbit) <= inf(than.mbit)


# ----------------------------------------------------------------------------------------------- prompts

def pick_prompts(n: int) -> list[Prompt]:
    if not 1 <= n <= len(PROMPTS):
        raise SystemExit(f"--prompts: 1 to {len(PROMPTS)}")
    return list(PROMPTS[:n])
