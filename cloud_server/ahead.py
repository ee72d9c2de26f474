"""When decode-ahead may start a step: never when a batch of drafts is due before the step would end.

Terms: a decode-ahead step is the cloud decoding one token alone from the committed prefix while it has nothing to
verify (docs/design.md §4.3). The edge says with each batch when it expects to send the next one
(`DraftBatch.next_batch_in_s`, from its draft time per token and the drafts it will make before its next send;
0 = none planned before it hears from the cloud). On the cloud, that batch is *due* at the sending batch's
arrival plus that interval (one-way delays cancel between consecutive batches). A step that would still run when
the batch arrives makes the verification wait behind it; a step that ends first costs nothing. If the batch is
late by a whole step's time, the edge's estimate was off: the expectation lapses and decode-ahead goes on.
Pure functions of numbers, unit-tested in tests/test_decode_ahead.py.
"""
from __future__ import annotations

import math

MAX_NEXT_BATCH_S = 3600.0  # the largest announced interval the cloud accepts (beyond it, a malformed message)


def check_next_batch_in(seconds: float) -> float:
    """The announced interval, or ValueError for one no edge would send (negative, not finite, absurdly long)."""
    if not (math.isfinite(seconds) and 0.0 <= seconds <= MAX_NEXT_BATCH_S):
        raise ValueError(f"next_batch_in_s must be in [0, {MAX_NEXT_BATCH_S:g}], got {seconds!r}")
    return seconds


def batch_due_at(arrived_at: float, next_batch_in_s: float) -> float | None:
    """When the next batch is due on the cloud's clock; None when the edge planned none."""
    return arrived_at + next_batch_in_s if next_batch_in_s > 0 else None


def decode_hold_s(now: float, due_at: float | None, step_s: float | None, contended: bool = False) -> float:
    """How long to hold off the next decode-ahead step: 0 to start it now; otherwise wait at most this long (a batch
    arriving meanwhile is verified at once). Starts now when nothing is due, when the step time is not yet known,
    when the step ends before the batch is due, or when the batch is a whole step late (the expectation lapsed).

    `contended`: another session wants the model now. Decode-ahead runs only on capacity nobody else needs, so
    while the edge's batch is due (and has not lapsed) it waits for the batch rather than take a step that the
    batch would most likely make worthless; an edge that plans no batch still gets its tokens decoded."""
    if due_at is None or step_s is None:
        return 0.0
    if now >= due_at + step_s:
        return 0.0
    if contended:
        return due_at + step_s - now
    if now + step_s <= due_at:
        return 0.0
    return due_at + step_s - now
