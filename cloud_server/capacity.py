"""What the cloud knows of its own capacity (shared by its sessions), and each session's verification budget.

Terms:
  compute     model seconds of verification passes and decode steps (prefill apart), as the cloud measures them.
  decode_s    one decode step: the cloud alone's compute per generated token, the reference every session is held to.
  others_load compute spent on the other sessions over the last WINDOW_S seconds, per second: about the share of the
              model they keep busy (with batching, rows that share a pass each count the pass, so it may exceed 1).
  budget      a session may spend at most `factor` x decode_s per token it committed, plus `slack_steps` decode
              steps to learn its acceptance (--verify-budget, --verify-budget-slack). Enforced by capping the drafts
              its next pass verifies: down to none where the cloud's own token is the one verification would emit
              (coupled, greedy; the cloud then decodes it and the waiting drafts are checked against it), down to
              one draft per pass elsewhere (CloudSession._drafts_allowed). Never by changing a token: an edge whose
              drafts are always wrong, buggy or hostile, costs about what the cloud alone would (docs/design.md §4.6).

The budget decision is a pure function (`drafts_allowed`), unit-tested without gRPC or models.
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Iterator

from picospec.shared.perf_model import PassCosts

WINDOW_S = 5.0            # others_load looks back this far
BUDGET_SLACK_STEPS = 16   # decode steps of compute a session may spend beyond factor x its tokens (the default)


def drafts_allowed(spent_s: float, tokens: int, waiting: int, decode_s: float | None,
                   pass_s: Callable[[int], float | None], factor: float, slack_steps: int = BUDGET_SLACK_STEPS) -> int:
    """How many of the `waiting` drafts the session's next pass may verify: the most whose pass keeps its compute
    within factor x decode_s x (tokens + 1) + slack_steps x decode_s. A pass commits at least one token, so only one
    is credited in advance; 0 means the cloud decodes the next token itself (which costs the one step credited).
    Everything waiting while the costs are unknown (no pass or step measured yet) or the budget is off (factor 0)."""
    if factor <= 0 or decode_s is None or waiting <= 0:
        return waiting
    allowance = factor * decode_s * (tokens + 1) + slack_steps * decode_s - spent_s
    allowed = 0
    for n in range(1, waiting + 1):
        cost = pass_s(n)
        if cost is None:
            return waiting
        if cost > allowance:
            break
        allowed = n
    return allowed


@dataclass
class VerifyBudget:
    """One session's account: compute spent on it and the tokens that compute committed."""

    factor: float
    slack_steps: int = BUDGET_SLACK_STEPS
    spent_s: float = 0.0
    tokens: int = 0

    def charge(self, seconds: float, tokens: int) -> None:
        self.spent_s += seconds
        self.tokens += tokens


class CloudCapacity:
    """The cloud's model: pass costs per size and decode step as measured over every session, recent compute per
    session (others_load), and who has model work queued or running now (demand for the model)."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self.passes = PassCosts()  # seconds per pass of n drafts (n = 0: a decode step), all sessions
        self._recent: deque[tuple[float, str, float]] = deque()  # (when, session, seconds)
        self._working: Counter[str] = Counter()  # session -> model jobs submitted and not finished

    def on_compute(self, sid: str, drafts: int, seconds: float) -> None:
        """A pass over `drafts` drafts (0: a decode step) took `seconds` of model time for session `sid`."""
        self.passes.add(drafts, seconds)
        self._recent.append((self.clock(), sid, seconds))

    def pass_costs(self) -> dict[int, float]:
        """Seconds per pass over n drafts (n = 0: a decode step) as measured so far, by n: what a new session's edge
        starts its draft-length choice from (Ready.pass_s)."""
        return {n: self.passes.measured(n) for n in sorted(self.passes.by_size)}

    @property
    def decode_s(self) -> float | None:
        """One decode step as measured; until one is, the least it can be: a pass over n drafts feeds n + 1
        positions and never costs more than n + 1 decode steps (strict on purpose: a session held by it gets a
        decode step, which measures the real cost)."""
        measured = self.passes.measured(0)
        if measured is not None or not self.passes.by_size:
            return measured
        return max(self.passes.measured(n) / (n + 1) for n in self.passes.by_size)

    def others_load(self, sid: str) -> float:
        now = self.clock()
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
        return sum(s for _, who, s in self._recent if who != sid) / self.window_s

    def others_working(self, sid: str) -> bool:
        """Another session has model work queued or running now."""
        return any(n > 0 for who, n in self._working.items() if who != sid)

    @contextlib.contextmanager
    def working(self, sid: str) -> Iterator[None]:
        """Around a session's model job: it wants the model until the job ends."""
        self._working[sid] += 1
        try:
            yield
        finally:
            self._working[sid] -= 1
            if self._working[sid] <= 0:
                del self._working[sid]
