"""The performance model (docs/design.md §5) and the online draft-length choice (§4.4): pure functions and the
estimates they read.

Notation: g = draft tokens per round (a batch); a_k = P(the k-th draft of a batch is accepted | the k-1 before it
were), "acceptance at depth k"; a = the same with one value for every depth (the i.i.d. model); T_draft = edge
time per draft token; T_rtt = network round trip; T_pass(n) = the cloud's time for one pass over n drafts (n + 1
positions fed; n = 0 is a plain decode step). A round commits the accepted drafts plus the cloud's token:
E[tokens per round] = 1 + sum_k prod_{i<=k} a_i, which for one a is (1 - a^(g+1)) / (1 - a).

A pass's cost is a step, not a line: on one CPU core an fp32 1.5B target takes about as long for 8 drafts as for 2,
and on a GPU up to dozens of positions cost what one does. So T_pass is kept per size as measured (`PassCosts`),
never fitted to a line that would hide the step.
"""
from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence


def tokens_per_round(a: float, g: int) -> float:
    a = min(max(a, 0.0), 1.0)
    return float(g + 1) if a >= 1.0 else (1.0 - a ** (g + 1)) / (1.0 - a)


def expected_tokens(acc: Sequence[float]) -> float:
    """E[tokens a round commits] for a batch of len(acc) drafts with acceptance acc[k-1] at depth k."""
    total, reach = 1.0, 1.0
    for a in acc:
        reach *= min(max(a, 0.0), 1.0)
        total += reach
    return total


def stop_and_wait_time(g: int, t_draft: float, t_rtt: float, t_pass: float) -> float:
    """Seconds of one stop-and-wait round: draft g, send, wait for the verdict."""
    return g * t_draft + t_rtt + t_pass


def pipelined_time(p_all: float, g: int, t_draft: float, t_rtt: float, t_pass: float) -> float:
    """PicoSpec's E[T]: when the whole batch is accepted (probability p_all), the next one was drafted meanwhile and
    drafting overlaps the round trip; after a rejection the edge starts over from the correction."""
    return p_all * max(g * t_draft, t_rtt + t_pass) + (1.0 - p_all) * (g * t_draft + t_rtt + t_pass)


def stop_and_wait_rate(a: float, g: int, t_draft: float, t_rtt: float, t_verify: float) -> float:
    """Tokens/s of stop-and-wait under the i.i.d. model."""
    return tokens_per_round(a, g) / stop_and_wait_time(g, t_draft, t_rtt, t_verify)


def pipelined_rate(a: float, g: int, t_draft: float, t_rtt: float, t_verify: float) -> float:
    """Tokens/s of the pipeline under the i.i.d. model."""
    return tokens_per_round(a, g) / pipelined_time(a ** g, g, t_draft, t_rtt, t_verify)


def modelled_rate(acc: Sequence[float], t_draft: float, t_rtt: float, t_pass: float, *, pipelined: bool) -> float:
    """Tokens/s of batches of len(acc) drafts with per-depth acceptance acc, either way of running."""
    g = len(acc)
    p_all = math.prod(min(max(a, 0.0), 1.0) for a in acc)
    t = pipelined_time(p_all, g, t_draft, t_rtt, t_pass) if pipelined else stop_and_wait_time(g, t_draft, t_rtt, t_pass)
    return expected_tokens(acc) / t


class Ewma:
    """Exponentially weighted moving average; None until the first sample."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha, self.value, self.count = alpha, None, 0

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x
        self.count += 1


class PassCosts:
    """The cloud's seconds for one pass over n drafts, kept per size as measured (an EWMA per size seen).

    A size not yet seen is read off the sizes seen: interpolated linearly between its neighbours; below the
    smallest seen, that one's cost (a pass never costs more for fewer positions); above the largest seen, the
    largest's cost: an optimistic guess on purpose, so that the policy tries a longer batch where it would pay if
    the step is flat, and the measurement of that pass then replaces the guess (probing without a probe)."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.by_size: dict[int, Ewma] = {}

    def add(self, n: int, seconds: float) -> None:
        self.by_size.setdefault(n, Ewma(self.alpha)).add(seconds)

    def measured(self, n: int) -> float | None:
        e = self.by_size.get(n)
        return None if e is None else e.value

    def __call__(self, n: int) -> float | None:
        if not self.by_size:
            return None
        if n in self.by_size:
            return self.by_size[n].value
        sizes = sorted(self.by_size)
        i = bisect_left(sizes, n)
        if i == 0:
            return self.by_size[sizes[0]].value
        if i == len(sizes):
            return self.by_size[sizes[-1]].value
        lo, hi = sizes[i - 1], sizes[i]
        t_lo, t_hi = self.by_size[lo].value, self.by_size[hi].value
        return t_lo + (t_hi - t_lo) * (n - lo) / (hi - lo)

    def to_dict(self) -> dict[str, float]:
        return {str(n): round(self.by_size[n].value, 6) for n in sorted(self.by_size)}


class DepthAcceptance:
    """Acceptance at each depth k of a batch, P(draft k accepted | drafts 1..k-1 were): an EWMA per depth, fed by the
    verdicts (depths 1..accepted saw an acceptance, depth accepted+1 the rejection, deeper ones nothing). A depth
    with fewer than `min_samples` observations takes the overall acceptance instead."""

    def __init__(self, alpha: float = 0.1, min_samples: int = 4) -> None:
        self.alpha, self.min_samples = alpha, min_samples
        self.by_depth: dict[int, Ewma] = {}

    def add_verdict(self, accepted: int, rejected: bool) -> None:
        for k in range(1, accepted + 1):
            self.by_depth.setdefault(k, Ewma(self.alpha)).add(1.0)
        if rejected:
            self.by_depth.setdefault(accepted + 1, Ewma(self.alpha)).add(0.0)

    def at(self, depth: int, overall: float) -> float:
        e = self.by_depth.get(depth)
        return e.value if e is not None and e.count >= self.min_samples else overall

    def profile(self, g: int, overall: float) -> list[float]:
        """acc[k-1] for depths 1..g."""
        return [self.at(k, overall) for k in range(1, g + 1)]

    def to_dict(self) -> dict[str, float]:
        return {str(k): round(e.value, 4) for k, e in sorted(self.by_depth.items()) if e.count >= self.min_samples}


# edges of the draft-confidence buckets (the draft's top-1 probability at the token it drafted)
CONFIDENCE_EDGES = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


class ConfidenceAcceptance:
    """How often a draft made with top-1 probability in each bucket (CONFIDENCE_EDGES) was accepted, among drafts the
    cloud judged (not those dropped behind a rejection). A bucket with fewer than `min_samples` judged drafts has no
    estimate yet; the confidence stop then reads the draft's own probability as its acceptance."""

    def __init__(self, min_samples: int = 8) -> None:
        self.min_samples = min_samples
        self.accepted = [0] * (len(CONFIDENCE_EDGES) + 1)
        self.judged = [0] * (len(CONFIDENCE_EDGES) + 1)

    @staticmethod
    def bucket(confidence: float) -> int:
        return bisect_left(CONFIDENCE_EDGES, confidence)

    def add(self, confidence: float, accepted: bool) -> None:
        b = self.bucket(confidence)
        self.judged[b] += 1
        self.accepted[b] += accepted

    def estimate(self, confidence: float) -> float:
        """P(accepted) for a draft made with this top-1 probability: the bucket's rate, or the probability itself."""
        b = self.bucket(confidence)
        return self.accepted[b] / self.judged[b] if self.judged[b] >= self.min_samples else confidence

    def to_dict(self) -> dict[str, float]:
        lows = (0.0, *CONFIDENCE_EDGES)
        return {f">={lows[b]:g}": round(self.accepted[b] / self.judged[b], 4)
                for b in range(len(self.judged)) if self.judged[b] >= self.min_samples}


@dataclass
class Estimates:
    """The running estimates of docs/design.md §4.4; exposed in the statistics."""

    rtt_samples: deque = field(default_factory=lambda: deque(maxlen=16))
    draft_s: Ewma = field(default_factory=Ewma)       # edge seconds per draft token
    acceptance: Ewma = field(default_factory=lambda: Ewma(0.1))  # overall, any depth
    by_depth: DepthAcceptance = field(default_factory=DepthAcceptance)
    by_confidence: ConfidenceAcceptance = field(default_factory=ConfidenceAcceptance)
    passes: PassCosts = field(default_factory=PassCosts)  # cloud seconds per pass of n drafts (n = 0: decode)
    last_choice: dict = field(default_factory=dict)   # the latest decision: g and the modelled rates behind it

    @property
    def rtt_s(self) -> float | None:
        # the smallest recent sample: larger ones include waiting in the cloud's queue, not the network
        return min(self.rtt_samples) if self.rtt_samples else None

    def to_dict(self) -> dict[str, object]:
        return {"rtt_s": self.rtt_s, "draft_s_per_token": self.draft_s.value, "acceptance": self.acceptance.value,
                "acceptance_by_depth": self.by_depth.to_dict(), "acceptance_by_confidence": self.by_confidence.to_dict(),
                "pass_s": self.passes.to_dict(), "decode_s": self.passes(0), "last_choice": self.last_choice}


@dataclass(frozen=True)
class DraftLenChoice:
    g: int                      # the draft length chosen; 0 = the cloud decodes alone
    rate: float | None          # the modelled tokens/s of that choice (None: no estimates yet, the default)
    best_speculative: float | None = None  # the best modelled rate with drafts
    decode_alone: float | None = None      # 1 / the cloud's decode time


SPECULATION_MARGIN = 1.1  # speculate only where modelled at least this much faster than the cloud decoding alone


def choose_draft_len(est: Estimates, g_max: int, *, pipelined: bool, allow_zero: bool, default: int) -> DraftLenChoice:
    """The draft length with the highest modelled rate (per-depth acceptance, pass cost per size as measured); 0
    (the cloud decodes alone) where speculating would not be SPECULATION_MARGIN faster than that and the cloud may
    decode ahead: the modelled rate comes from running averages, and a marginal bet on it loses more (a pass that
    commits little costs up to two decode steps) than it wins.
    `default` until the estimates exist. A longer length is taken only if it is more than 2 % better: a shorter
    batch wastes less when acceptance is misjudged."""
    a, td, rtt = est.acceptance.value, est.draft_s.value, est.rtt_s
    if a is None or td is None or rtt is None or est.passes(1) is None:
        return DraftLenChoice(default, None)
    acc = est.by_depth.profile(g_max, a)
    best_g, best = 1, -math.inf
    for g in range(1, g_max + 1):
        r = modelled_rate(acc[:g], td, rtt, est.passes(g), pipelined=pipelined)
        if r > best * 1.02:
            best_g, best = g, r
    decode = est.passes.measured(0)
    alone = 1.0 / decode if decode else None
    if allow_zero and alone is not None and best < alone * SPECULATION_MARGIN:
        return DraftLenChoice(0, alone, best, alone)
    return DraftLenChoice(best_g, best, best, alone)


# ---- token trees (coupled, docs/design.md §3.7) -----------------------------------------------------------------

ALT_HIT = 0.4  # modelled share of a depth's misses that an alternative there catches (the cloud's choice is
               # often the draft's second best under the same noise); only steers the size, never the output


def tree_tokens(acc: Sequence[float], alternatives: int, hit: float = ALT_HIT) -> float:
    """E[tokens a tree's pass commits]: a main chain with per-depth acceptance acc, and one alternative at each of
    its first `alternatives` depths, which turns a share `hit` of that depth's misses into a descent."""
    return expected_tokens([a + (1.0 - a) * hit if k < alternatives else a for k, a in enumerate(acc)])


@dataclass(frozen=True)
class TreeChoice:
    nodes: int            # the node budget for the next tree
    rate: float | None    # its modelled tokens/s (None: no estimates yet, the default)


def choose_tree_nodes(est: Estimates, n_max: int, *, default: int) -> TreeChoice:
    """The tree size with the highest modelled stop-and-wait rate: E[tokens] (tree_tokens) over drafting every node,
    the round trip and the pass at that size as measured. A tree pays where a pass over more positions costs little
    more than over fewer (a GPU, a CPU at small sizes: §5); where passes grow with their size it stays a chain.
    A bigger tree is taken only if more than 2 % better. `default` (capped at n_max) until the estimates exist."""
    a, td, rtt = est.acceptance.value, est.draft_s.value, est.rtt_s
    if a is None or td is None or rtt is None or est.passes(1) is None:
        return TreeChoice(max(1, min(default, n_max)), None)
    acc = est.by_depth.profile(n_max, a)
    best_n, best = 1, -math.inf
    for n in range(1, n_max + 1):
        t = stop_and_wait_time(n, td, rtt, est.passes(n))
        # a tree of n nodes: a chain of g plus n - g alternatives, one per depth from the shallowest
        r = max(tree_tokens(acc[:g], n - g) for g in range((n + 1) // 2, n + 1)) / t
        if r > best * 1.02:
            best_n, best = n, r
    return TreeChoice(best_n, best)
