"""Resuming a generation after the connection to the cloud broke (docs/design.md §4.6), as pure values.

A resumed piece is a new session whose prompt is the original prompt plus every token already yielded, asking for
the budget that remains, with the same seed and settings. Every coin is keyed by its absolute position (prompt
included, shared/rng.py) and each side's state is a function of the committed tokens, so the piece goes on with the
very coins the broken session would have used: the law is the target's, and wherever the uninterrupted run is a
function of the seed alone (greedy; coupled; sync and early-exit with their fixed draft length; cloud mode), the
tokens are identical. The pieces' tokens reach the user through one iterator: no gap, no duplicate.
"""
from __future__ import annotations

from typing import Sequence

from picospec.edge_client.waiting import WaitProgress


def resume_plan(prompt: Sequence[int], committed: Sequence[int], max_new_tokens: int) -> tuple[list[int], int]:
    """The next piece's prompt and token budget, after `committed` tokens were yielded."""
    if len(committed) > max_new_tokens:
        raise ValueError(f"{len(committed)} tokens committed, more than the {max_new_tokens} asked for")
    return list(prompt) + list(committed), max_new_tokens - len(committed)


def finished_before_break(finish_reason: str | None) -> bool:
    """Whether the broken piece had already ended on its own (its last token committed): nothing to resume."""
    return finish_reason in ("eos", "length")


def gave_up_message(server: str, reconnect_s: float, lost: str, progress: WaitProgress, committed: int) -> str:
    return (f"lost the connection to the cloud at {server} after {committed} tokens and could not resume within "
            f"--reconnect-s {reconnect_s:g} s ({progress.attempts} attempts; last error: {progress.last_error}); "
            f"the break: {lost}")
