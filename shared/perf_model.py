"""The performance model (docs/design.md §5) and the online draft-length choice (§4.4): pure functions.

Notation: a = per-token acceptance probability (i.i.d. model), g = draft tokens per round,
T_draft = edge time per draft token, T_rtt = network round trip, T_verify(n) = cloud time to verify n
drafts in one pass (n + 1 positions fed). A round commits the accepted drafts plus the cloud's token,
E[tokens per round] = (1 - a^(g+1)) / (1 - a) (the expected accepted length, counting that token too).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


def tokens_per_round(a: float, g: int) -> float:
    a = min(max(a, 0.0), 1.0)
    return float(g + 1) if a >= 1.0 else (1.0 - a ** (g + 1)) / (1.0 - a)


def stop_and_wait_rate(a: float, g: int, t_draft: float, t_rtt: float, t_verify: float) -> float:
    """Tokens/s of stop-and-wait: draft g, send, wait for the verdict."""
    return tokens_per_round(a, g) / (g * t_draft + t_rtt + t_verify)


def pipelined_round_time(a: float, g: int, t_draft: float, t_rtt: float, t_verify: float) -> float:
    """PicoSpec's E[T]: when the whole batch is accepted, the next one was drafted meanwhile and drafting
    overlaps the round trip; after a rejection the edge starts over from the correction."""
    full = a ** g
    return full * max(g * t_draft, t_rtt + t_verify) + (1.0 - full) * (g * t_draft + t_rtt + t_verify)


def pipelined_rate(a: float, g: int, t_draft: float, t_rtt: float, t_verify: float) -> float:
    return tokens_per_round(a, g) / pipelined_round_time(a, g, t_draft, t_rtt, t_verify)


class Ewma:
    """Exponentially weighted moving average; None until the first sample."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha, self.value = alpha, None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x


class LinearCost:
    """Online least squares (with forgetting) of time = fixed + per_token * n: the cloud's cost of a pass."""

    def __init__(self, forget: float = 0.95) -> None:
        self.forget = forget
        self.s = [0.0] * 5  # sum w, sum w n, sum w n^2, sum w t, sum w n t

    def add(self, n: int, t: float) -> None:
        f = self.forget
        self.s = [f * self.s[0] + 1, f * self.s[1] + n, f * self.s[2] + n * n, f * self.s[3] + t, f * self.s[4] + n * t]

    def __call__(self, n: int) -> float | None:
        w, sn, snn, st, snt = self.s
        if w == 0:
            return None
        det = w * snn - sn * sn
        if det <= 1e-9 * max(w * snn, 1e-12):  # one size seen so far: scale the mean time by size
            mean_n = max(sn / w, 1.0)
            return st / w * (n / mean_n if n else 1.0 / mean_n)
        per = (w * snt - sn * st) / det
        fixed = (st - per * sn) / w
        return max(fixed + max(per, 0.0) * n, 1e-6)


@dataclass
class Estimates:
    """The running estimates of docs/design.md §4.4; exposed in the statistics."""

    rtt_samples: deque = field(default_factory=lambda: deque(maxlen=16))
    draft_s: Ewma = field(default_factory=Ewma)       # edge seconds per draft token
    acceptance: Ewma = field(default_factory=lambda: Ewma(0.1))
    verify: LinearCost = field(default_factory=LinearCost)  # cloud seconds per pass of n drafts (n = 0: decode)

    @property
    def rtt_s(self) -> float | None:
        # the smallest recent sample: larger ones include waiting in the cloud's queue, not the network
        return min(self.rtt_samples) if self.rtt_samples else None

    def to_dict(self) -> dict[str, float | None]:
        return {"rtt_s": self.rtt_s, "draft_s_per_token": self.draft_s.value, "acceptance": self.acceptance.value,
                "verify_s_1": self.verify(1), "verify_s_4": self.verify(4), "decode_s": self.verify(0)}


def choose_draft_len(est: Estimates, g_max: int, *, pipelined: bool, allow_zero: bool, default: int) -> int:
    """The draft length with the highest modelled rate; 0 (the cloud decodes alone) where speculating
    would be slower than that and the cloud is allowed to decode ahead. `default` until estimates exist."""
    a, td, rtt = est.acceptance.value, est.draft_s.value, est.rtt_s
    if a is None or td is None or rtt is None or est.verify(1) is None:
        return default
    rate = pipelined_rate if pipelined else stop_and_wait_rate
    best_g, best = 1, -math.inf
    for g in range(1, g_max + 1):
        r = rate(a, g, td, rtt, est.verify(g))
        if r > best * 1.02:  # prefer the shorter of near-equal lengths: less waste when a is misjudged
            best_g, best = g, r
    decode = est.verify(0)
    if allow_zero and decode and best < 1.0 / decode:
        return 0
    return best_g
