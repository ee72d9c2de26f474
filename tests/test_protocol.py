"""The session state machine alone: positions, epochs, stopping, and the stub freshness check."""
import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

from shared.protocol import BatchStatus, FinishReason, ProtocolError, SessionState

ROOT = Path(__file__).resolve().parents[1]


def _state(**kw):
    return SessionState(**{"prompt_ids": [1, 2, 3], "max_new_tokens": 10, "eos_ids": frozenset({0}), "vocab_size": 50, **kw})


def test_accept_reject_bumps_epoch_and_positions():
    s = _state()
    assert s.classify_batch(0, 3, [5, 6, 7], 8) is BatchStatus.CURRENT
    c = s.commit([5, 6, 7], accepted=1, token=9, rejected=True)
    assert c.new_tokens == (5, 9) and s.committed_len == 5 and s.epoch == 1
    assert s.classify_batch(0, 6, [1], 8) is BatchStatus.STALE  # drafted before the rejection
    assert s.classify_batch(1, 5, [1], 8) is BatchStatus.CURRENT
    c = s.commit([1, 2], accepted=2, token=3, rejected=False)
    assert c.new_tokens == (1, 2, 3) and s.epoch == 1 and s.generated == [5, 9, 1, 2, 3]


@pytest.mark.parametrize("epoch,start,ids,match", [
    (2, 3, [1], "future epoch"), (0, 4, [1], "committed length is 3"), (0, 3, [], "allowed 1..8"),
    (0, 3, list(range(9)), "allowed 1..8"), (0, 3, [50], "outside the vocabulary"), (0, 3, [-1], "outside"),
])
def test_bad_batches(epoch, start, ids, match):
    with pytest.raises(ProtocolError, match=match):
        _state().classify_batch(epoch, start, ids, 8)


def test_stop_at_eos_inside_accepted_drafts():
    s = _state()
    c = s.commit([4, 0, 6], accepted=3, token=7, rejected=False)
    assert c.new_tokens == (4, 0) and c.finished is FinishReason.EOS and c.token is None and c.accepted == 2
    with pytest.raises(ProtocolError):
        s.classify_batch(0, 5, [1], 8)


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
        [sys.executable, "-m", "grpc_tools.protoc", "-Ishared/rpc=proto", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", "proto/picospec.proto"],
        cwd=ROOT, check=True,
    )
    for name in ("picospec_pb2.py", "picospec_pb2.pyi", "picospec_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "shared/rpc" / name, ROOT / "shared/rpc" / name, shallow=False), \
            f"shared/rpc/{name} is stale: run `make proto`"
