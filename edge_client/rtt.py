"""Round-trip samples from the pipeline's own traffic: the time from a batch's send to the verdict that verified its
last draft, less the cloud's reported compute and idle time. No extra pings."""
from __future__ import annotations

from collections import deque


class RttTracker:
    def __init__(self, samples: deque) -> None:
        self.samples = samples                         # the estimates' sample window (shared with the policy)
        self.sends: list[tuple[int, int, float]] = []  # (first, end, send time) of batches in flight

    def on_send(self, first: int, count: int, now: float) -> None:
        if count:
            self.sends.append((first, first + count, now))

    def on_verified(self, last_pos: int, cloud_s: float, now: float) -> None:
        """A verdict verified drafts up to position last_pos, taking cloud_s of compute and idle time."""
        for first, end, t in self.sends:
            if first <= last_pos < end:
                self.samples.append(max(0.0, now - t - cloud_s))
        self.sends = [x for x in self.sends if x[1] > last_pos + 1]

    def clear(self) -> None:
        self.sends.clear()
