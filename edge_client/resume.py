"""Resuming a generation after the connection to the cloud broke (docs/design.md §4.1, "Resume" and
"Partitions"), as pure values.

A resumed piece is a new session whose prompt is the original prompt plus every token already yielded, asking for
the budget that remains, with the same seed and settings. Every coin is keyed by its absolute position (prompt
included, shared/rng.py) and each side's state is a function of the committed tokens, so the piece goes on with the
very coins the broken session would have used: the law is the target's, and wherever the uninterrupted run is a
function of the seed alone (greedy; coupled; sync and early-exit with their fixed draft length; cloud mode), the
tokens are identical. The pieces' tokens reach the user through one iterator: no gap, no duplicate.
"""
from __future__ import annotations

from typing import Literal, Sequence

from picospec.edge_client.waiting import WaitProgress
from picospec.shared.config import PARTITION_POLICIES


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


# ---- partitions (--on-partition, docs/design.md §4.1 "Partitions") ---------------------------------------------
# What a break does depends on the policy: `wait` keeps the output exact (reconnect for up to --reconnect-s, then
# fail); `edge` keeps the output flowing (the draft goes on alone, its tokens marked, while the edge reconnects in
# the background; speculation resumes from every token so far once the cloud answers). The decisions are pure values
# here; EdgeClient._resuming and EdgeClient._without_cloud carry them out.

BreakAction = Literal["done", "fail", "wait", "draft"]
RejoinState = Literal["trying", "connected", "gave_up"]
DraftStep = Literal["end", "rejoin", "draft"]


def break_action(policy: str, reconnect_s: float, finished: bool) -> BreakAction:
    """What a lost connection leads to. `finished`: the broken piece had ended on its own and every token it
    committed was yielded. `wait` keeps today's order (with --reconnect-s 0 the break is the error at once, finished
    or not); `edge` never fails: the draft can always finish the generation, with or without a cloud to rejoin."""
    if policy not in PARTITION_POLICIES:
        raise ValueError(f"unknown partition policy {policy!r}; choose from {', '.join(PARTITION_POLICIES)}")
    if policy == "wait" and reconnect_s <= 0:
        return "fail"
    if finished:
        return "done"
    return "wait" if policy == "wait" else "draft"


def rejoin_budget_s(reconnect_s: float, lost_at: float, now: float) -> float:
    """Seconds left to reconnect in: --reconnect-s counts from the break (the start of the outage), in both
    policies, so one outage is never given more than --reconnect-s however many pieces it spans."""
    return max(0.0, reconnect_s - (now - lost_at))


REJOIN_CONNECT_S = 2.0  # --on-partition edge: how long a resumed piece may wait for Info, the output standing still
MIN_CONNECT_S = 1.0     # the least wait for Info a resumed piece gets


def piece_connect_s(policy: str, wait_ready_s: float, lost_at: float | None, reconnect_s: float, now: float) -> float:
    """How long a piece may wait for the cloud before its session opens. The first piece: --wait-ready-s. A piece
    after a break (the reconnect just succeeded, but the link may have gone again): what is left of the outage's
    --reconnect-s in `wait` (one outage, one budget), at most REJOIN_CONNECT_S in `edge` (the draft could be making
    tokens instead); at least MIN_CONNECT_S, so a reconnect that succeeded at the end of the budget is not undone
    by an Info call too short to answer. Its failure is the same outage going on (EdgeClient._resuming)."""
    if lost_at is None:
        return wait_ready_s
    left = rejoin_budget_s(reconnect_s, lost_at, now)
    return max(MIN_CONNECT_S, min(left, REJOIN_CONNECT_S) if policy == "edge" else left)


def after_draft_token(draft_finished: bool, rejoin: RejoinState) -> DraftStep:
    """After each token the draft made alone: the generation ends when the draft has finished it (its budget spent
    or an end-of-sequence token), else speculation resumes once the background reconnect has connected, else the
    draft goes on (still trying, or given up after --reconnect-s: then the draft finishes alone)."""
    if draft_finished:
        return "end"
    return "rejoin" if rejoin == "connected" else "draft"


def chunk_source(spans: Sequence[tuple[int, int]], start: int, end: int) -> Literal["cloud", "draft"]:
    """Who made the generated tokens [start, end): "draft" when they lie in a draft-only span (made while the cloud
    was unreachable), else "cloud" (verified or decoded by the target). A chunk never mixes the two: the draft's
    tokens come one per chunk, a cloud session's never overlap a span."""
    return "draft" if any(s <= start and end <= e for s, e in spans) and end > start else "cloud"
