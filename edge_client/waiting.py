"""Waiting for the cloud to come up, or for a slot on a full one: the retry schedules and what the user is told, as
pure values.

The edge connects before its first generation. Each attempt is a short Info call that fails at once while nothing
listens; between attempts the edge sleeps `retry_delay_s(attempt)` (0.25 s doubling to 2 s), and after each
failure the caller (the CLI) can say what is going on instead of sitting silent.
"""
from __future__ import annotations

from dataclasses import dataclass

ATTEMPT_TIMEOUT_S = 5.0  # one Info call: enough for a loaded cloud to answer, short enough to report progress


def retry_delay_s(attempt: int) -> float:
    """Seconds to sleep after failed attempt number `attempt` (1-based)."""
    return min(0.25 * 2 ** (attempt - 1), 2.0)


def admission_delay_s(attempt: int, hint_s: float | None, left_s: float, jitter: float) -> float:
    """Seconds to wait before asking a full cloud (RESOURCE_EXHAUSTED) again, after refusal number `attempt`
    (1-based): its hint if it gave one, else the backoff above, spread by `jitter` in [0.8, 1.2] (edges refused
    together do not all come back together), and never past the time left."""
    base = hint_s if hint_s is not None else retry_delay_s(attempt)
    return max(0.0, min(left_s, base * jitter))


@dataclass(frozen=True)
class WaitProgress:
    server: str
    attempts: int
    elapsed_s: float
    last_error: str

    def first_message(self) -> str:
        return f"waiting for the cloud at {self.server} (retrying, Ctrl-C to stop)"

    def progress_message(self) -> str:
        return (f"still waiting for the cloud at {self.server}: {self.elapsed_s:.0f} s, {self.attempts} attempts; "
                f"last error: {self.last_error}")

    def give_up_message(self) -> str:
        return (f"cloud at {self.server} is not reachable after {self.elapsed_s:.0f} s ({self.attempts} attempts; "
                f"last error: {self.last_error}). Is picospec-cloud running there? Check --server "
                f"(PICOSPEC_SERVER) and --wait-ready-s (PICOSPEC_WAIT_READY_S)")


def should_report(progress: WaitProgress, last_reported_s: float | None, every_s: float = 5.0) -> bool:
    """Tell the user at the first failure, then every `every_s` seconds."""
    return last_reported_s is None or progress.elapsed_s - last_reported_s >= every_s
