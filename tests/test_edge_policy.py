"""The edge's scheduling policy as a pure function: given a snapshot, the action. No gRPC, no models."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from picospec.edge_client.stats import verdict_token_kinds
from picospec.shared.schemes import SCHEMES

from picospec.edge_client.policy import (Action, Snapshot, can_draft, cloud_owes, drafts_before_next_send, edge_owes,
                                         next_action, plan_session, should_send)

# a pipelined session mid-generation: nothing drafted, nothing in flight, plenty of budget
IDLE = Snapshot(g=4, pipelined=True, decode_ahead=False, budget=20, chain_len=0, unsent=0, in_flight=0,
                last_is_eos=False, awaiting_resolution=False, resolved=False, resolved_sent=False,
                resolution_ends=False, paused=False, predraft_open=False, predraft_wants_more=False)


def snap(**kw) -> Snapshot:
    return dataclasses.replace(IDLE, **kw)


def test_drafts_when_idle_and_below_the_lookahead():
    assert next_action(IDLE) is Action.DRAFT
    assert next_action(snap(chain_len=7, in_flight=4, unsent=3)) is Action.DRAFT  # pipelined: up to 2 g ahead
    assert next_action(snap(chain_len=8, in_flight=8)) is Action.WAIT              # lookahead full, verdicts owed


def test_the_next_batch_announced_after_a_send_is_what_the_lookahead_leaves():
    assert drafts_before_next_send(snap(chain_len=4, in_flight=4)) == 4      # a full batch of g
    assert drafts_before_next_send(snap(chain_len=6, in_flight=6)) == 2      # the lookahead (2 g) cuts it
    assert drafts_before_next_send(snap(chain_len=8, in_flight=8)) == 0      # full: next only after a verdict
    assert drafts_before_next_send(snap(chain_len=4, in_flight=4, budget=1)) == 1
    for no_plan in (snap(pipelined=False), snap(g=0), snap(paused=True), snap(budget=0), snap(last_is_eos=True)):
        assert drafts_before_next_send(no_plan) == 0


def test_sends_a_full_batch_and_in_pipeline_anything_when_nothing_is_in_flight():
    assert should_send(snap(chain_len=4, unsent=4))
    assert should_send(snap(chain_len=1, unsent=1))                     # pipelined, nothing in flight: pre-verify
    assert not should_send(snap(chain_len=5, unsent=1, in_flight=4))   # partial batch behind one in flight
    assert should_send(snap(chain_len=5, unsent=1, in_flight=4, paused=True))
    assert should_send(snap(chain_len=2, unsent=1, in_flight=1, last_is_eos=True))
    assert should_send(snap(chain_len=2, unsent=1, in_flight=1, budget=0))


def test_stop_and_wait_drafts_only_with_nothing_in_flight():
    sync = snap(pipelined=False)
    assert next_action(sync) is Action.DRAFT
    assert next_action(snap(pipelined=False, chain_len=2, unsent=2)) is Action.DRAFT
    assert next_action(snap(pipelined=False, chain_len=4, unsent=4)) is Action.SEND
    assert next_action(snap(pipelined=False, chain_len=4, in_flight=4)) is Action.WAIT


def test_no_draft_after_eos_past_the_budget_or_while_paused():
    assert not can_draft(snap(chain_len=1, in_flight=1, last_is_eos=True))
    assert not can_draft(snap(budget=0, chain_len=3, in_flight=3))
    assert not can_draft(snap(paused=True, chain_len=1, in_flight=1))
    assert not can_draft(snap(predraft_open=True, chain_len=1, in_flight=1))


def test_split_rejection_waits_for_the_correction_to_be_sampled_then_drafts_from_it():
    unsampled = snap(awaiting_resolution=True)
    assert not can_draft(unsampled)
    assert next_action(unsampled) is Action.STALL  # unreachable: the driver samples it while applying the verdict
    assert next_action(snap(awaiting_resolution=True, resolved=True)) is Action.DRAFT  # pre-verify: correction + draft


@pytest.mark.parametrize("why", ["g=0", "ends"])
def test_a_correction_goes_up_alone_when_no_draft_will_carry_it(why):
    """The hang of the split modes: draft length 0 (the cloud decodes alone) with a correction in hand. The cloud
    decodes nothing until it has the correction, so it must go up now."""
    kw = {"g=0": dict(g=0, decode_ahead=True), "ends": dict(resolution_ends=True)}[why]
    s = snap(awaiting_resolution=True, resolved=True, **kw)
    assert next_action(s) is Action.SEND
    after = dataclasses.replace(s, resolved_sent=True)
    assert next_action(after) in (Action.WAIT, Action.DRAFT)
    assert next_action(after) is not Action.STALL


def test_length_zero_with_decode_ahead_shadow_drafts_one_token_and_waits_for_the_clouds_tokens():
    """The cloud decodes alone; the edge drafts the next token to score it against the cloud's, and never sends it."""
    s = snap(g=0, decode_ahead=True)
    assert next_action(s) is Action.DRAFT and not should_send(s)
    shadowed = snap(g=0, decode_ahead=True, chain_len=1, unsent=1)
    assert next_action(shadowed) is Action.WAIT and "decode-ahead" in cloud_owes(shadowed)
    assert not should_send(dataclasses.replace(shadowed, budget=1, last_is_eos=True))
    assert next_action(snap(g=0, decode_ahead=False, pipelined=False)) is Action.STALL  # never produced by the driver
    assert next_action(snap(g=0, decode_ahead=True, shadow_due=False)) is Action.WAIT  # between shadow drafts


def test_what_the_cloud_owes():
    assert cloud_owes(snap(chain_len=3, in_flight=3)) == "a verdict on 3 draft(s) in flight"
    assert cloud_owes(snap(awaiting_resolution=True, resolved=True, resolved_sent=True, resolution_ends=True)) \
        .startswith("the final verdict")
    assert cloud_owes(snap(awaiting_resolution=True, resolved=True, decode_ahead=True)) is None  # it waits for us
    assert cloud_owes(snap(awaiting_resolution=True, resolved=True, resolved_sent=True, decode_ahead=True))
    assert cloud_owes(IDLE) is None
    assert "correction (sampled, unsent)" in edge_owes(snap(awaiting_resolution=True, resolved=True))


BOOLS = (False, True)


def test_no_reachable_snapshot_stalls():
    """Over every combination of the snapshot's fields that the driver can produce, the policy never answers
    STALL: either the edge has something to do, or the cloud owes it a message."""
    stalls = []
    for (g, pipelined, ahead, budget, chain_len, unsent, last_eos, awaiting, resolved, sent, ends, paused, pre,
         pre_more, shadow) in itertools.product((0, 1, 4), BOOLS, BOOLS, (0, 1, 5), (0, 1, 4, 8), (0, 1, 4), BOOLS,
                                                BOOLS, BOOLS, BOOLS, BOOLS, BOOLS, BOOLS, BOOLS, BOOLS):
        if not _reachable(g, pipelined, ahead, budget, chain_len, unsent, last_eos, awaiting, resolved, sent, ends,
                          paused, pre, pre_more):
            continue
        s = Snapshot(g, pipelined, ahead, budget, chain_len, unsent, chain_len - unsent, last_eos, awaiting,
                     resolved, sent, ends, paused, pre, pre_more, shadow)
        if next_action(s) is Action.STALL:
            stalls.append(s)
    assert not stalls, f"{len(stalls)} reachable snapshots stall, e.g. {stalls[0]}"


def _reachable(g, pipelined, ahead, budget, chain_len, unsent, last_eos, awaiting, resolved, sent, ends, paused,
               pre, pre_more) -> bool:
    """The invariants the driver and the shared state machine keep (each one says why)."""
    return all([
        unsent <= chain_len,
        g > 0 or (ahead and pipelined),            # length 0 only with decode-ahead (pipeline only)
        chain_len > 0 or not last_eos,
        resolved or not sent, resolved or not ends,
        not resolved or awaiting,                  # a correction exists only while its position is open
        not awaiting or resolved,                  # the driver samples the correction as it applies the verdict
        not awaiting or not paused,                # ... and that verdict lifts a pause
        not (ends and chain_len),                  # nothing is drafted after a correction that ends the generation
        not paused or chain_len - unsent > 0,      # a pause follows a low-confidence draft, sent at once
        not pre or (chain_len - unsent > 0),       # a hint is about a pass in flight
        not pre_more or pre,
        budget > 0 or chain_len > 0 or ends,       # out of budget with nothing drafted: the generation has ended
        pipelined or unsent == 0 or chain_len == unsent,  # stop-and-wait sends whole batches
        # pipelined: sent once nothing's in flight (at length 0, shadow drafts are never sent)
        not (pipelined and unsent and chain_len == unsent) or unsent < g or g == 0,
    ])


def test_plan_for_each_mode():
    common = dict(greedy=False, draft_len=0, max_draft_len=12, decode_ahead="auto", hints="auto",
                  draft_confidence=0.2, cloud_max_draft_len=32, cloud_exit_layer=3)
    sync = plan_session("sync", scheme=SCHEMES["dense"], **common)
    assert not sync.pipelined and sync.fixed == 4 and not sync.decode_ahead and not sync.hints and sync.confidence == 0
    pipe = plan_session("pipeline", scheme=SCHEMES["coupled"], **common)
    assert pipe.pipelined and pipe.fixed is None and pipe.decode_ahead and pipe.confidence == 0.2 and pipe.g_cap == 12
    assert not plan_session("pipeline", scheme=SCHEMES["split-exact"], **common).decode_ahead  # sampled split: off in auto
    assert plan_session("pipeline", scheme=SCHEMES["split-exact"], **{**common, "greedy": True}).decode_ahead
    assert plan_session("early-exit", scheme=SCHEMES["dense"], **common).hints
    assert not plan_session("early-exit", scheme=SCHEMES["dense"], **{**common, "cloud_exit_layer": 0}).hints
    assert plan_session("pipeline", scheme=SCHEMES["dense"], **{**common, "draft_len": 40}).fixed == 32  # the cloud's cap


def test_the_deadline_scales_with_the_work():
    from picospec.shared.config import EdgeConfig

    short, long = EdgeConfig(max_new_tokens=40), EdgeConfig(max_new_tokens=4096)
    assert short.deadline_s(9) == pytest.approx(60 + 2.0 * 40 + 0.05 * 9)   # not an hour for 40 tokens
    assert long.deadline_s(9) > 8192                                        # nor a cut-off for a long generation
    assert EdgeConfig(max_new_tokens=40, timeout_s=5.0).deadline_s(9) == 5.0  # an explicit deadline wins


def test_each_committed_token_is_labelled_with_what_made_it():
    """The law tests test some kinds of token apart (tests/law.py EVENTS): the labels must be right."""
    assert verdict_token_kinds(3, False, 2, 4, True) == ["draft", "draft", "correction"]   # rejected at depth 3
    assert verdict_token_kinds(5, False, 4, 4, False) == ["draft"] * 4 + ["bonus"]         # all accepted
    assert verdict_token_kinds(2, True, 1, 3, True) == ["correction", "draft"]             # split: ours, then a draft
    assert verdict_token_kinds(1, False, 0, 0, False) == ["cloud"]                         # decode-ahead
    assert verdict_token_kinds(2, False, 2, 2, False) == ["draft", "draft"]                # finished before a bonus
    assert verdict_token_kinds(0, False, 0, 3, True) == []                                 # split: correction to come
