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
    largest's cost plus the mean growth per draft between the smallest and the largest seen (never negative). Flat
    where the measured sizes are flat (a GPU: the policy tries the longer batch, and its measurement then replaces
    the guess), steep where they are steep (llama.cpp on a CPU, where a pass of 8 costs 8 decode steps: guessing
    the largest's cost there had the policy probe batches that lost, one after the other)."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.by_size: dict[int, Ewma] = {}
        self.anchor: float | None = None  # a decode step's cost from elsewhere (the cloud's): size 0 until measured
        self.prior: dict[int, float] = {}  # passes (n >= 1) from elsewhere (the cloud's, over all its sessions),
                                           # each until this session measures that size itself

    def add(self, n: int, seconds: float) -> None:
        self.by_size.setdefault(n, Ewma(self.alpha)).add(seconds)

    def measured(self, n: int) -> float | None:
        e = self.by_size.get(n)
        return None if e is None else e.value

    def sizes(self) -> set[int]:
        """The sizes with a cost measured here or known from elsewhere."""
        return set(self.by_size) | set(self.prior)

    def __call__(self, n: int) -> float | None:
        table = {**self.prior, **{k: e.value for k, e in self.by_size.items()}}
        if not table:
            return None
        if 0 not in table and self.anchor is not None:
            table[0] = min(self.anchor, min(table.values()))  # a decode never costs more than a pass
        if n in table:
            return table[n]
        sizes = sorted(table)
        i = bisect_left(sizes, n)
        if i == 0:
            return table[sizes[0]]
        if i == len(sizes):
            lo, hi = sizes[0], sizes[-1]
            slope = max(0.0, (table[hi] - table[lo]) / (hi - lo)) if hi > lo else 0.0
            return table[hi] + slope * (n - hi)
        lo, hi = sizes[i - 1], sizes[i]
        return table[lo] + (table[hi] - table[lo]) * (n - lo) / (hi - lo)

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
    others_load: float | None = None     # model seconds per second the cloud spends on other sessions (its verdicts)
    last_choice: dict = field(default_factory=dict)   # the latest decision: g and the modelled rates behind it

    @property
    def rtt_s(self) -> float | None:
        # the smallest recent sample: larger ones include waiting in the cloud's queue, not the network
        return min(self.rtt_samples) if self.rtt_samples else None

    @property
    def decode_s(self) -> float | None:
        """The cloud alone's compute per token: one decode step, as this edge measured it or else as the cloud did."""
        measured = self.passes.measured(0)
        return measured if measured is not None else self.passes.anchor

    def to_dict(self) -> dict[str, object]:
        return {"rtt_s": self.rtt_s, "draft_s_per_token": self.draft_s.value, "acceptance": self.acceptance.value,
                "acceptance_by_depth": self.by_depth.to_dict(), "acceptance_by_confidence": self.by_confidence.to_dict(),
                "pass_s": self.passes.to_dict(), "pass_s_cloud": dict(sorted(self.passes.prior.items())),
                "decode_s": self.decode_s, "others_load": self.others_load,
                "last_choice": self.last_choice}


RATE, COST, DEFAULT = "rate", "cost", "default"  # the objective a choice served (DraftLenChoice.objective)


@dataclass(frozen=True)
class DraftLenChoice:
    g: int                      # the draft length chosen; 0 = the cloud decodes alone
    rate: float | None          # the modelled tokens/s of that choice (None: no estimates yet, the default)
    best_speculative: float | None = None  # the modelled rate of the best length with drafts the objective allows
    decode_alone: float | None = None      # 1 / the cloud's decode time
    cloud_s_per_token: float | None = None  # the modelled cloud compute per committed token of the choice
    alone_s_per_token: float | None = None  # the cloud alone's: one decode step
    objective: str = DEFAULT    # RATE: the fastest within the cloud alone's compute per token (the cloud has room);
                                # COST: the cheapest at no less than the cloud alone's rate (the cloud is loaded)
    can_pay: bool = True        # some length would qualify were every draft accepted (False: at these pass costs no
                                # acceptance makes speculation pay, so measuring it is pointless)


SPECULATION_MARGIN = 1.3  # speculate only where modelled at least this much better than the cloud decoding alone
# (1.1 until the sweep of 2026-12-07: a batch of one modelled at 1.22x the cloud alone ran at 0.80x it on one CPU core;
# the pipelined model leaves out the per-message overheads and the decode-ahead steps a batch makes worthless)
AHEAD_WAIT = 0.5  # with decode-ahead a batch arrives during one of the cloud's decode steps and waits for its end:
# half a step on average (the default pair on llama.cpp, one CPU core, measured 0.7-1 step a batch: verify_waited_s);
# left out, batches of 2-6 on code modelled at 1.35-1.41x the cloud alone ran at 0.74-0.87x it (2026-12-07)
LOADED_AT = 0.5  # the cloud is loaded when other sessions keep its model busy at least this share of the time


@dataclass(frozen=True)
class _Option:
    g: int
    rate: float  # modelled tokens/s
    cost: float  # modelled cloud seconds per committed token


def _options(est: Estimates, g_max: int, pipelined: bool, wait_s: float = 0.0,
             every_draft_accepted: bool = False) -> list[_Option]:
    """Lengths 1 .. g_max, but at most twice the largest pass measured: a length past that is extrapolated (§4.4), and
    a wrong guess costs a whole pass, so batches grow by doubling (4, 8, 16), each measured before the next. A round
    takes `wait_s` longer than its pass (time, not compute): the wait for the decode-ahead step a batch finds. With
    `every_draft_accepted`, acceptance 1 at every depth: the best any draft could do at these costs."""
    a, td, rtt = est.acceptance.value, est.draft_s.value, est.rtt_s
    g_max = min(g_max, max(2, 2 * max(est.passes.sizes(), default=1)))
    if every_draft_accepted:  # the best case: what is not measured yet costs nothing
        acc, td, rtt = [1.0] * g_max, td or 0.0, rtt or 0.0
    else:
        acc = est.by_depth.profile(g_max, a)
    out = []
    for g in range(1, g_max + 1):
        t_pass = est.passes(g)
        out.append(_Option(g, modelled_rate(acc[:g], td, rtt, t_pass + wait_s, pipelined=pipelined),
                           t_pass / expected_tokens(acc[:g])))
    return out


def _fastest(options: Sequence[_Option]) -> _Option | None:
    """The fastest option; a longer one only if more than 2 % faster (a shorter batch wastes less when acceptance
    is misjudged)."""
    best = None
    for o in options:
        if best is None or o.rate > best.rate * 1.02:
            best = o
    return best


def _qualifying(options: Sequence[_Option], alone: _Option, loaded: bool) -> tuple[_Option | None, bool]:
    """The objective's best length with drafts, and whether it beats the cloud alone by SPECULATION_MARGIN: COST when
    `loaded` (the cheapest no slower than the cloud alone), else RATE (the fastest within its compute per token)."""
    if loaded:
        fast_enough = [o for o in options if o.rate >= alone.rate]
        best = min(fast_enough, key=lambda o: o.cost) if fast_enough else None
        return best, best is not None and best.cost * SPECULATION_MARGIN <= alone.cost
    best = _fastest([o for o in options if o.cost <= alone.cost])
    return best, best is not None and best.rate >= alone.rate * SPECULATION_MARGIN


def _could_pay(est: Estimates, g_max: int, pipelined: bool, wait_s: float, alone: _Option, loaded: bool) -> bool:
    """Whether some length would qualify were every draft accepted (and, where not measured yet, drafting and the
    round trip free): False means no acceptance this session could measure changes the choice."""
    return _qualifying(_options(est, g_max, pipelined, wait_s, every_draft_accepted=True), alone, loaded)[1]


def choose_draft_len(est: Estimates, g_max: int, *, pipelined: bool, allow_zero: bool, default: int) -> DraftLenChoice:
    """The draft length for the next batch, 0 (the cloud decodes alone) included where `allow_zero` (decode-ahead).

    Objective (docs/design.md §4.4), from the modelled rate (per-depth acceptance, pass cost per size as measured)
    and the modelled cloud compute per committed token (pass cost over expected tokens), against the cloud alone's
    (1 / decode, and one decode step per token):
      RATE, while other sessions leave the cloud room (others_load < LOADED_AT): the fastest length that spends no
        more cloud compute per token than the cloud alone; speculation must be SPECULATION_MARGIN faster than the
        cloud alone, since the rates are running averages and a marginal bet loses more than it wins.
      COST, when the cloud is loaded: the cheapest length that is no slower than the cloud alone; speculation must
        be SPECULATION_MARGIN cheaper.
    Where no length with drafts qualifies and 0 is not allowed, the cheapest length. Until the cloud's decode cost
    is known, the fastest length. `default` until the other estimates exist. With decode-ahead (`allow_zero`) a
    round's pass is modelled AHEAD_WAIT of a decode step later: the cloud is always in a step when a batch comes.
    `can_pay` says whether any acceptance could make speculation qualify at the costs measured (the edge shadow-drafts
    at length 0 only where it could); where it could not at the costs known before this session's own estimates
    (PassCosts.prior: the cloud's), 0 from the start, where the default would have probed."""
    decode = est.decode_s
    wait_s = AHEAD_WAIT * decode if allow_zero and decode is not None else 0.0
    loaded = est.others_load is not None and est.others_load >= LOADED_AT
    alone = _Option(0, 1.0 / decode, decode) if decode is not None else None
    if est.acceptance.value is None or est.draft_s.value is None or est.rtt_s is None or est.passes(1) is None:
        # before this session's own estimates: where the costs known already (the cloud's, from its Ready) leave no
        # acceptance at which a length could qualify, the cloud decodes alone from the start, with no probe batch
        if allow_zero and alone is not None and est.passes(1) is not None \
                and not _could_pay(est, g_max, pipelined, wait_s, alone, loaded):
            return DraftLenChoice(0, alone.rate, None, alone.rate, decode, decode, COST if loaded else RATE, False)
        return DraftLenChoice(default, None)
    options = _options(est, g_max, pipelined, wait_s)
    if alone is None:
        best = _fastest(options)
        return DraftLenChoice(best.g, best.rate, best.rate, None, best.cost, None, RATE)
    best, wins = _qualifying(options, alone, loaded)
    # would a draft the cloud always agreed with win at these costs? If not, no acceptance measured can change the
    # choice, and drafts made only to measure it (shadow drafts) are work for nothing
    can_pay = wins or _could_pay(est, g_max, pipelined, wait_s, alone, loaded)
    if not wins and allow_zero:
        pick = alone
    elif best is not None:
        pick = best
    else:
        pick = min(options, key=lambda o: o.cost)
    return DraftLenChoice(pick.g, pick.rate, best.rate if best else None, alone.rate, pick.cost, alone.cost,
                          COST if loaded else RATE, can_pay)


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
