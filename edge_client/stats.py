"""Per-generation statistics (docs/design.md §7), collected on the edge from what it measures and what the cloud
reports."""
from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from picospec.shared.config import EXACT_VERIFY_MODES
from picospec.shared.perf_model import Estimates


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def add_span(spans: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """`spans` (sorted, disjoint [start, end) ranges of generated positions) with [start, end) added: joined to the
    last span when it continues it, so a run of the draft's tokens is one span however many chunks it came in."""
    if end <= start:
        return list(spans)
    if spans and spans[-1][1] == start:
        return [*spans[:-1], (spans[-1][0], end)]
    if spans and spans[-1][1] > start:
        raise ValueError(f"span [{start}, {end}) overlaps or precedes the last one {spans[-1]}")
    return [*spans, (start, end)]


def clip_spans(spans: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The spans cut to the first n generated positions (what a stop string or a resume left of the output)."""
    return [(s, min(e, n)) for s, e in spans if s < n]


def inexact_reason(mode: str, verify_mode: str | None, draft_spans: list[tuple[int, int]]) -> str | None:
    """Why a generation is not the target's own output law, in words (None: it is). Derived from what ran and the
    draft-only spans, so it cannot disagree with them."""
    reasons = []
    if mode == "edge":
        reasons.append("the draft alone (--mode edge)")
    elif verify_mode is not None and verify_mode not in EXACT_VERIFY_MODES:
        reasons.append(f"{verify_mode} verification is approximate")
    if draft_spans:
        n = sum(e - s for s, e in draft_spans)
        where = ", ".join(f"{s}-{e - 1}" if e - s > 1 else str(s) for s, e in draft_spans)
        reasons.append(f"{n} tokens (positions {where}) are the draft's own, made while the cloud was unreachable "
                       "(--on-partition edge)")
    return "; ".join(reasons) or None


# what made a generated token: the cloud's first token (with its Ready), an accepted draft, the cloud's token after
# every verified draft was accepted (bonus) or at a rejected position (correction; in the split modes the edge's
# own draw from the residual), a token the cloud decoded with nothing verified (decode-ahead, the cloud alone, a
# step the verification budget capped), or the draft alone (edge mode, a partition)
TOKEN_KINDS = ("first", "draft", "bonus", "correction", "cloud", "edge")


def verdict_token_kinds(n_new: int, resolved: bool, accepted: int, verified: int, rejected: bool) -> list[str]:
    """The kinds of the n_new tokens one verdict committed on the edge: our correction first where it committed one
    (split modes), then the accepted drafts, then the cloud's own token if any."""
    kinds = ["correction"] if resolved else []
    kinds += ["draft"] * min(accepted, n_new - len(kinds))
    if n_new > len(kinds):
        kinds.append(("correction" if rejected else "bonus") if verified else "cloud")
    return kinds


@dataclass
class GenerationStats:
    mode: str
    verify_mode: str | None = None
    exact: bool = True          # False for the draft alone, the APPROXIMATE split-topk sampler, draft-only tokens
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int = 0
    generated: int = 0
    finish_reason: str | None = None
    rounds: int = 0
    drafted: int = 0            # draft tokens sent for verification
    accepted: int = 0           # of those, accepted
    wasted_draft: int = 0       # drafted but never committed: rejected, after a rejection, stale, contradicted
    bytes_up: int = 0
    bytes_down: int = 0
    draft_s: float = 0.0        # edge model time
    cloud_s: float = 0.0        # cloud model time as reported by the cloud
    prefill_edge_s: float = 0.0
    prefill_cloud_s: float = 0.0
    rejections: int = 0         # split modes: rejections whose correction the edge sampled
    residual_bytes: int = 0     # split modes: payload bytes of those corrections (top-K, tail draws)
    tail_requests: int = 0      # split-exact: times the edge asked for more tail draws
    cloud_tokens: int = 0       # pipeline: tokens the cloud decoded on its own (decode-ahead)
    prefill_tokens: int = 0     # tokens the cloud sent with its Ready: the first token at once (one per session)
    dead_chains: int = 0        # pipeline: draft chains that contradicted a cloud token
    capped_drafts: int = 0      # drafts the cloud's verification budget kept out of its passes (--verify-budget)
    # per generated token, what made it (TOKEN_KINDS), in order; not in to_dict (the law tests read it per event)
    token_kinds: list[str] = field(default_factory=list)
    bubble_s: float = 0.0       # pipeline: time the cloud had nothing to verify
    verify_waited_s: float = 0.0  # pipeline: time drafts waited on the cloud behind a decode-ahead step
    drafted_total: int = 0      # draft tokens made, sent or not
    exit_layer: int = 0         # early exits: the target layer the hints come from (0 = none)
    hints: int = 0              # hints received
    hint_hits: int = 0          # hinted passes whose verdict committed the expected context: pre-drafts adopted
    hint_misses: int = 0        # hinted passes that went otherwise: pre-drafts discarded
    predrafted_used: int = 0    # pre-drafted tokens adopted after hits
    tree_idle_forwards: int = 0  # token trees: draft forwards spent growing a tree while the cloud verified it
    tree_reused: int = 0        # token trees: expansions the next tree took from that growth (forwards saved)
    tree_alternatives: int = 0  # token trees: verdicts whose path left the main chain (an alternative was kept)
    draft_len_choices: Counter = field(default_factory=Counter)  # online draft length -> times chosen
    estimates: Estimates = field(default_factory=Estimates)
    drafter: Any = field(default=None, repr=False)  # the session's drafter (tests inspect its cache)
    accept_hist: Counter = field(default_factory=Counter)  # tokens committed per round -> count
    token_times: list[float] = field(default_factory=list)  # perf_counter at each commit, one per token
    admission_retries: int = 0  # times a full cloud refused a session (RESOURCE_EXHAUSTED) and the edge asked again
    admission_wait_s: float = 0.0  # time spent waiting for those slots
    reconnects: int = 0         # times the generation resumed after the connection broke (edge_client/resume.py)
    reconnect_s: float = 0.0    # time lost to those: from each break to the first token (or the end) after it;
    #                             with --on-partition edge, to the first token from the cloud (or the end) after it
    draft_only_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) generated positions the
    #                             draft made alone while the cloud was unreachable (--on-partition edge)

    @property
    def draft_only(self) -> int:
        return sum(e - s for s, e in self.draft_only_spans)

    def on_draft_only(self, start: int, end: int) -> None:
        """Mark generated positions [start, end) as made by the draft alone (the tokens are counted by on_tokens):
        the output is no longer the target's law, whatever the mode."""
        self.draft_only_spans = add_span(self.draft_only_spans, start, end)
        self.exact = False

    def on_tokens(self, n: int, kinds: Sequence[str] = ()) -> None:
        """n tokens committed now; `kinds` says what made each (TOKEN_KINDS; missing ones are "unknown")."""
        now = time.perf_counter()
        if n and self.first_token_at is None:
            self.first_token_at = now
        self.generated += n
        self.token_times.extend([now] * n)
        self.token_kinds.extend([*kinds[:n], *["unknown"] * (n - len(kinds))])

    def on_round(self, drafted: int, accepted: int, committed: int) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.accept_hist[committed] += 1

    def on_rejection(self, payload_bytes: int) -> None:
        self.rejections += 1
        self.residual_bytes += payload_bytes

    def on_tail_request(self, payload_bytes: int) -> None:
        self.tail_requests += 1
        self.residual_bytes += payload_bytes

    def drop_tail(self, n: int) -> None:
        """Forget the last n committed tokens (committed by the cloud, cut by a stop string on the edge)."""
        if n > 0:
            self.generated -= n
            del self.token_times[-n:]
            self.draft_only_spans = clip_spans(self.draft_only_spans, self.generated)

    def finish(self, reason: str | None) -> None:
        self.finished_at = time.perf_counter()
        self.finish_reason = reason

    def _timing(self, end: float) -> dict[str, Any]:
        """The figures of time as the user saw it, up to `end`: wall time, time to first token, rates, gaps."""
        wall = end - self.started
        decode_wall = end - self.first_token_at if self.first_token_at else None
        # inter-token gaps: tokens committed together share a timestamp, which is what the user sees
        gaps = [b - a for a, b in zip(self.token_times, self.token_times[1:])]
        return {
            "wall_s": wall,
            "ttft_s": (self.first_token_at - self.started) if self.first_token_at else None,
            "tokens_per_s": self.generated / wall if wall > 0 else None,
            # decode rate after the first token: excludes prefill, comparable across prompt lengths
            "decode_tokens_per_s": (self.generated - 1) / decode_wall if decode_wall and self.generated > 1 else None,
            "itl_p50_s": _quantile(gaps, 0.5),
            "itl_p95_s": _quantile(gaps, 0.95),
        }

    def to_dict(self) -> dict[str, Any]:
        # one flat record, a key a line in the order of docs/design.md's table of generation statistics: longer than
        # the usual function, but split it would scatter what is read as one list
        end = self.finished_at or time.perf_counter()
        wall = end - self.started
        per_tok = lambda b: b / self.generated if self.generated else None  # noqa: E731
        d: dict[str, Any] = {
            "mode": self.mode,
            "verify_mode": self.verify_mode,
            "exact": self.exact,
            "inexact_reason": inexact_reason(self.mode, self.verify_mode, self.draft_only_spans),
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated,
            "finish_reason": self.finish_reason,
            **self._timing(end),
            "rounds": self.rounds,
            "prefill_tokens": self.prefill_tokens,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            # tokens committed per verification round (accepted drafts + the cloud's token), as in the paper
            "mean_accepted_len": statistics.fmean(self.accept_hist.elements()) if self.rounds else None,
            "accepted_len_hist": {str(k): v for k, v in sorted(self.accept_hist.items())},
            "wasted_draft_tokens": self.wasted_draft,
            "residual_rejections": self.rejections,
            "residual_bytes_per_rejection": self.residual_bytes / self.rejections if self.rejections else None,
            "tail_requests": self.tail_requests,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_up_per_token": per_tok(self.bytes_up),
            "bytes_down_per_token": per_tok(self.bytes_down),
            "edge_busy_fraction": (self.draft_s + self.prefill_edge_s) / wall if wall > 0 else None,
            "cloud_busy_fraction": (self.cloud_s + self.prefill_cloud_s) / wall if wall > 0 else None,
            "cloud_tokens": self.cloud_tokens,
            "dead_chains": self.dead_chains,
            "capped_drafts": self.capped_drafts,
            "pipeline_bubble_s": self.bubble_s,
            "verify_waited_s": self.verify_waited_s,
            "admission_retries": self.admission_retries,
            "admission_wait_s": self.admission_wait_s,
            "draft_tokens_made": self.drafted_total,
            "draft_len_chosen": {str(k): v for k, v in sorted(self.draft_len_choices.items())},
            "exit_layer": self.exit_layer,
            "hints": self.hints,
            "hint_hits": self.hint_hits,
            "hint_misses": self.hint_misses,
            "hint_hit_rate": self.hint_hits / (self.hint_hits + self.hint_misses) if self.hint_hits + self.hint_misses else None,
            "predrafted_used": self.predrafted_used,
            "tree_idle_forwards": self.tree_idle_forwards,
            "tree_reused_expansions": self.tree_reused,
            "tree_alternatives_taken": self.tree_alternatives,
            "mean_draft_len": self.drafted / self.rounds if self.rounds else None,
            "estimates": self.estimates.to_dict(),
            "edge_compute_s": self.draft_s + self.prefill_edge_s,
            "cloud_compute_s": self.cloud_s + self.prefill_cloud_s,
            # what an operator pays per token: the cloud's passes and decode steps (prefill apart), per token generated
            "cloud_ms_per_token": 1e3 * self.cloud_s / self.generated if self.generated else None,
            "reconnects": self.reconnects,
            "reconnect_s": self.reconnect_s,
            "draft_only_tokens": self.draft_only,
            "draft_only_spans": [list(span) for span in self.draft_only_spans],
        }
        return d
