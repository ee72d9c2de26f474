"""The edge's scheduling decision: a pure function of a snapshot of the session, no gRPC, no models.

Terms (used throughout edge_client/):
  committed     tokens both sides have agreed on (prompt + generated); never rolled back.
  chain         the edge's drafts beyond the committed prefix in the current epoch; `in_flight` of them have been
                sent and await a verdict, `unsent` have not gone up yet.
  correction    split modes: after a rejection the edge samples the token at the rejected position itself
                (`resolved`) and must send it; until it arrives the cloud can do nothing for this session.
  g             the draft length chosen for now (fixed, or online from measured costs); 0 = send nothing and let
                the cloud decode alone (only allowed with decode-ahead, where the cloud streams its own tokens).
  shadow draft  with g = 0 the edge still drafts the next token, keeps it and never sends it: the cloud's token
                scores it, so acceptance is still measured (at no cloud cost) and the online choice can find its way
                back to speculation when the text turns predictable. Not where the cloud's pass costs leave no
                acceptance at which speculation pays (a CPU target whose pass costs grow with its size): there the
                draft rests, and its cache catches up in one pass when speculation resumes.
  pre-draft     drafts made from the context an early-exit hint expects, adopted only if the verdict agrees.

The driver (edge_client/session.py) takes a `Snapshot`, asks `next_action`, carries the action out and repeats.
`Action.WAIT` is returned only when the cloud owes the edge a message (`cloud_owes`); when neither side owes the
other anything and the generation is not finished, `next_action` returns `Action.STALL`, which the driver raises
as a protocol error with the state printed: a deadlock is reported at once, never waited out.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from picospec.shared.config import HINTED_MODES, PIPELINED_MODES
from picospec.shared.schemes import VerifyScheme


class Action(Enum):
    DRAFT = "draft"          # draft one token onto the chain
    PRE_DRAFT = "pre-draft"  # draft one token from the context an early-exit hint expects
    SEND = "send"            # send the unsent drafts (and a pending correction) as one batch
    WAIT = "wait"            # wait for the cloud's next message (it owes us one)
    STALL = "stall"          # neither side owes the other a message: a protocol deadlock


@dataclass(frozen=True)
class Snapshot:
    """What the decision looks at; taken by the driver between actions."""

    g: int                     # draft length chosen for now (0 = let the cloud decode)
    pipelined: bool            # pipeline/picospec: draft ahead while batches are in flight; else stop-and-wait
    decode_ahead: bool         # the cloud decodes on its own whenever it has nothing to verify
    budget: int                # tokens the generation may still commit, less the correction and the chain
    chain_len: int
    unsent: int
    in_flight: int
    last_is_eos: bool          # the chain ends in an end-of-sequence token: nothing may follow it
    awaiting_resolution: bool  # split modes: a rejection left the position open for our correction
    resolved: bool             # ... and we have sampled that correction
    resolved_sent: bool        # ... and sent it
    resolution_ends: bool      # committing the correction ends the generation
    paused: bool               # the draft lost confidence: no more drafts until the cloud speaks
    predraft_open: bool        # an early-exit hint is being pre-drafted from
    predraft_wants_more: bool  # ... and wants more tokens
    shadow_due: bool = True    # at length 0: a shadow draft is due (one every SHADOW_EVERY tokens, and only where
                               # some acceptance could make speculation pay: DraftLenChoice.can_pay)


SHADOW_EVERY = 4  # at length 0, a shadow draft every this many committed tokens: enough to notice the text turn
                  # predictable within a few tokens, for a quarter of the draft's work (the edge's battery)


def shadowing(s: Snapshot) -> bool:
    """Draft length 0 with decode-ahead, nothing open, one due: the edge shadow-drafts a token (never sent)."""
    return s.g == 0 and s.decode_ahead and s.pipelined and not s.awaiting_resolution and s.shadow_due


def can_draft(s: Snapshot) -> bool:
    """Whether a draft onto the chain is useful now."""
    lookahead = 1 if shadowing(s) else 2 * s.g if s.pipelined else s.g
    return ((s.g > 0 or shadowing(s)) and s.budget > 0 and not s.last_is_eos and not s.resolution_ends and not s.paused
            and not s.predraft_open and not (s.awaiting_resolution and not s.resolved) and s.chain_len < lookahead
            and (s.pipelined or s.in_flight == 0))


def owes_correction(s: Snapshot) -> bool:
    """A correction must go up now: the cloud waits for it and no draft will follow it soon to carry it
    (draft length 0, paused, budget spent) or it ends the generation. Holding it back deadlocks."""
    return s.resolved and not s.resolved_sent and (s.resolution_ends or not can_draft(s))


def should_send(s: Snapshot) -> bool:
    """Send the unsent drafts: a full batch, a batch the draft lost confidence in, one at the end of the budget or
    the lookahead, or (pipelined) anything at all when nothing is in flight; and a correction that is owed. Never
    drafts at length 0 (shadow drafts stay on the edge)."""
    lookahead = 2 * s.g if s.pipelined else s.g
    full = s.chain_len >= lookahead or s.budget <= 1 or s.last_is_eos
    batch_ready = s.g > 0 and s.unsent > 0 and (s.unsent >= s.g or s.paused or full or (s.pipelined and s.in_flight == 0))
    return batch_ready or owes_correction(s)


def drafts_before_next_send(s: Snapshot) -> int:
    """Taken right after a send: how many drafts the edge will make before it sends again if no news arrives. 0 when
    no batch is planned before the cloud speaks: stop-and-wait, draft length 0, a paused or spent chain, or a full
    lookahead. The cloud schedules decode-ahead around it (cloud_server/ahead.py)."""
    if not s.pipelined or s.g == 0 or s.paused or s.budget <= 0 or s.last_is_eos or s.resolution_ends:
        return 0
    return max(0, min(s.g, 2 * s.g - s.chain_len, s.budget))


def cloud_owes(s: Snapshot) -> str | None:
    """What the cloud owes the edge, as the edge sees the protocol state; None when it owes nothing.

    The cloud answers every draft of the current epoch it receives with a verdict; with decode-ahead it streams
    a token of its own whenever it has nothing to verify, except while it waits for our correction."""
    if s.in_flight:
        return f"a verdict on {s.in_flight} draft(s) in flight"
    if s.resolved_sent and s.resolution_ends:
        return "the final verdict (our correction ends the generation)"
    if s.awaiting_resolution and not s.resolved_sent:
        return None  # it waits for our correction: the edge owes, whatever decode-ahead says
    if s.decode_ahead:
        return "a token it decodes on its own (decode-ahead)"
    return None


def next_action(s: Snapshot) -> Action:
    if can_draft(s):
        return Action.DRAFT
    if s.predraft_open and s.predraft_wants_more:
        return Action.PRE_DRAFT
    if should_send(s):
        return Action.SEND
    return Action.WAIT if cloud_owes(s) is not None else Action.STALL


def edge_owes(s: Snapshot) -> str:
    """What the edge would have to send for the session to go on (for the state dump of a stall)."""
    if s.awaiting_resolution and not s.resolved_sent:
        return "its correction" + (" (sampled, unsent)" if s.resolved else " (not yet sampled)")
    return f"drafts (draft length {s.g}, {s.unsent} unsent, budget {s.budget})"


@dataclass(frozen=True)
class SessionPlan:
    """How one speculative generation runs, fixed at its start from the mode, the settings and the cloud's limits."""

    pipelined: bool      # draft ahead while batches are in flight (pipeline, picospec); else stop-and-wait
    hints: bool          # ask the cloud for early-exit hints and pre-draft from them
    g_cap: int           # longest batch the online choice may pick
    fixed: int | None    # a fixed draft length, or None: chosen online before every decision
    decode_ahead: bool   # the cloud decodes on its own when it has nothing to verify
    confidence: float    # end a batch when the draft's top-1 probability falls under this (0 = never)
    tree_budget: int = 0  # coupled token trees: most nodes per tree (0 = chains); trees run stop-and-wait
    tree_online: bool = False  # the tree size is chosen online up to tree_budget (pipeline mode, no --draft-len)


def plan_session(mode: str, *, scheme: VerifyScheme, greedy: bool, draft_len: int, max_draft_len: int,
                 decode_ahead: str, hints: str, draft_confidence: float, cloud_max_draft_len: int,
                 cloud_exit_layer: int, tree_budget: int = 0) -> SessionPlan:
    # trees only where the walk is exact with ids alone (coupled); a tree's verdict is needed before the next tree
    # (its path decides where that one grows), so trees run stop-and-wait, and decode-ahead would race them
    trees = min(tree_budget, cloud_max_draft_len) if scheme.supports_trees else 0
    if trees > 0:
        return SessionPlan(pipelined=False, hints=False, g_cap=max(1, min(max_draft_len, cloud_max_draft_len)),
                           fixed=None, decode_ahead=False, confidence=0.0, tree_budget=trees,
                           tree_online=mode in PIPELINED_MODES and draft_len == 0)
    pipelined = mode in PIPELINED_MODES
    fixed = min(draft_len, cloud_max_draft_len) if draft_len > 0 else (None if pipelined else 4)
    # decode-ahead pays where the cloud's own token is the one verification would emit anyway (coupled, greedy)
    ahead = pipelined and (decode_ahead == "on" or (decode_ahead == "auto" and scheme.own_token_is_emitted(greedy)))
    return SessionPlan(
        pipelined=pipelined,
        hints=(hints == "on" or (hints == "auto" and mode in HINTED_MODES)) and cloud_exit_layer > 0,
        g_cap=max(1, min(max_draft_len, cloud_max_draft_len)),
        fixed=fixed,
        decode_ahead=ahead,
        confidence=draft_confidence if pipelined and fixed is None else 0.0,
    )
