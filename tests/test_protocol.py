"""The session state machine alone: positions, epochs, stopping, and the stub freshness check."""
import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

from picospec.cloud_server.drafts import BatchStatus, DraftQueue
from picospec.edge_client.chain import ChainToken, EdgeChain
from picospec.shared.protocol import FinishReason, ProtocolError, SessionState

ROOT = Path(__file__).resolve().parents[1]


def _state(**kw):
    return SessionState(**{"prompt_ids": [1, 2, 3], "max_new_tokens": 10, "eos_ids": frozenset({0}), "vocab_size": 50, **kw})


def _queue(**kw):
    """The cloud's draft queue over a fresh state; tests read the shared state as `q.state`."""
    return DraftQueue(_state(**kw))


def _admit(q, epoch, start, ids, max_len=8, resolved=None):
    return q.admit(epoch, start, ids, [None] * len(ids), max_len, resolved)


def test_accept_reject_bumps_epoch_and_positions():
    q = _queue()
    s = q.state
    assert _admit(q, 0, 3, [5, 6, 7]) is BatchStatus.CURRENT
    run = q.take(8)
    assert (run.start_pos, run.token_ids) == (3, [5, 6, 7])
    c = q.finish_pass(run, accepted=1, token=9, rejected=True)
    assert c.new_tokens == (5, 9) and s.committed_len == 5 and s.epoch == 1
    assert _admit(q, 0, 6, [1]) is BatchStatus.STALE  # drafted before the rejection
    assert _admit(q, 1, 5, [1, 2]) is BatchStatus.CURRENT
    c = q.finish_pass(q.take(8), accepted=2, token=3, rejected=False)
    assert c.new_tokens == (1, 2, 3) and s.epoch == 1 and s.generated == [5, 9, 1, 2, 3]


@pytest.mark.parametrize("epoch,start,ids,match", [
    (2, 3, [1], "future epoch"), (0, 4, [1], "committed length is 3"), (0, 3, [], "allowed 1..8"),
    (0, 3, list(range(9)), "allowed 1..8"), (0, 3, [50], "outside the vocabulary"), (0, 3, [-1], "outside"),
])
def test_bad_batches(epoch, start, ids, match):
    with pytest.raises(ProtocolError, match=match):
        _admit(_queue(), epoch, start, ids)


def test_queued_batches_verify_together_and_drop_the_bonus():
    q = _queue()
    _admit(q, 0, 3, [5, 6])
    _admit(q, 0, 5, [7, 8])  # drafted ahead, before any verdict
    run = q.take(3)
    assert run.token_ids == [5, 6, 7] and q.pending.token_ids == [8]
    with pytest.raises(ProtocolError, match="drafts so far end at 7"):
        _admit(q, 0, 9, [1])  # a hole in the chain
    c = q.finish_pass(run, accepted=3, token=4, rejected=False)
    assert c.new_tokens == (5, 6, 7) and c.token is None  # draft 8 takes the bonus's place
    c = q.finish_pass(q.take(8), accepted=1, token=4, rejected=False)
    assert c.new_tokens == (8, 4) and q.cloud_tokens == 1


def test_drafts_overlapping_cloud_tokens_are_trimmed_or_end_the_chain():
    q = _queue()
    s = q.state
    q.commit_own(5)
    q.commit_own(6)  # decode-ahead: committed [.., 5, 6] before the edge's batch arrived
    _admit(q, 0, 3, [5, 6, 7])
    run = q.take(8)
    assert (run.start_pos, run.token_ids) == (5, [7])
    q.finish_pass(run, accepted=1, token=9, rejected=False)  # bonus 9 at position 6
    _admit(q, 0, 6, [8, 1])  # the chain said 8 there: dead
    assert q.take(8) is None and s.epoch == 1 and q.dead_chains == 1
    assert _admit(q, 0, 8, [1]) is BatchStatus.STALE
    assert _admit(q, 1, 7, [2]) is BatchStatus.CURRENT and q.take(8).token_ids == [2]


def test_a_new_epoch_from_the_edge_drops_the_old_chain_even_mid_verification():
    q = _queue()
    s = q.state
    q.commit_own(5)  # one cloud token: the edge may start one new epoch on its own
    _admit(q, 0, 4, [6, 7])
    run = q.take(1)
    _admit(q, 1, 4, [8])
    assert q.finish_pass(run, accepted=1, token=2, rejected=False) is None  # stale when it came back
    assert q.take(8).token_ids == [8] and s.committed_len == 4
    with pytest.raises(ProtocolError, match="future epoch"):
        _admit(q, 3, 4, [1])


def test_edge_chain_follows_verdicts():
    s = _state()
    e = EdgeChain(s)
    e.chain = [ChainToken(t, sent=True) for t in (5, 6, 7)] + [ChainToken(8)]
    a = e.apply(start_pos=3, verified=2, accepted=2, token=None, rejected=False, committed_len=5, finished=False, epoch=0)
    assert a.new_tokens == (5, 6) and [c.token for c in e.chain] == [7, 8] and e.epoch == 0
    a = e.apply(start_pos=5, verified=0, accepted=0, token=7, rejected=False, committed_len=6, finished=False, epoch=0)
    assert a.new_tokens == (7,) and a.from_chain == 1 and [c.token for c in e.chain] == [8]
    a = e.apply(start_pos=6, verified=0, accepted=0, token=9, rejected=False, committed_len=7, finished=False, epoch=0)
    assert a.chain_died and a.dropped == 1 and e.chain == [] and e.epoch == 1
    e.chain = [ChainToken(t, sent=True) for t in (1, 2)]
    a = e.apply(start_pos=7, verified=2, accepted=0, token=4, rejected=True, committed_len=8, finished=False, epoch=1)
    assert a.new_tokens == (4,) and a.dropped == 2 and e.epoch == 2
    with pytest.raises(ProtocolError, match="verified 1 drafts, 0 were sent"):
        e.apply(start_pos=8, verified=1, accepted=1, token=None, rejected=False, committed_len=9, finished=False, epoch=2)


def test_stop_at_eos_inside_accepted_drafts():
    q = _queue()
    s = q.state
    c = s.commit([4, 0, 6], accepted=3, token=7, rejected=False)
    assert c.new_tokens == (4, 0) and c.finished is FinishReason.EOS and c.token is None and c.accepted == 2
    with pytest.raises(ProtocolError):
        _admit(q, 0, 5, [1])


def test_stop_at_length_truncates_and_drops_the_token():
    s = _state(max_new_tokens=2)
    c = s.commit([4, 5, 6], accepted=3, token=7, rejected=False)
    assert c.new_tokens == (4, 5) and c.finished is FinishReason.LENGTH and c.token is None
    s = _state(max_new_tokens=2)
    c = s.commit([4], accepted=1, token=7, rejected=False)
    assert c.new_tokens == (4, 7) and c.finished is FinishReason.LENGTH and c.token == 7


def test_commit_validates():
    with pytest.raises(ProtocolError, match="accepted"):
        _state().commit([4], accepted=2, token=1, rejected=False)
    with pytest.raises(ProtocolError, match="outside"):
        _state().commit([4], accepted=1, token=99, rejected=False)
    with pytest.raises(ProtocolError, match="empty prompt"):
        _state(prompt_ids=[])


def test_committed_stubs_match_the_proto(tmp_path):
    """The generated stubs are committed; regenerating them from proto/ must change nothing."""
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Ipicospec/shared/rpc=proto", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", "proto/picospec.proto"],
        cwd=ROOT, check=True,
    )
    for name in ("picospec_pb2.py", "picospec_pb2.pyi", "picospec_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "picospec/shared/rpc" / name, ROOT / "shared/rpc" / name, shallow=False), \
            f"shared/rpc/{name} is stale: run `make proto`"
