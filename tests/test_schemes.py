"""Each verification scheme through its interface alone: extras up and back, the cloud's decision, the split modes'
rejection payloads and the edge's resolution. No gRPC, no models."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from picospec.shared.config import EXACT_VERIFY_MODES, VERIFY_MODES
from picospec.shared.protocol import ProtocolError
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.schemes import SCHEMES, scheme
from picospec.shared.verify import verify_coupled, verify_dense, verify_split

pytestmark = pytest.mark.parallel  # make test runs these two at a time (pyproject.toml: markers)

V = 12


def _dists(seed: int, k: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(k + 1, V, generator=g) * 2, -1)  # [k+1, V]
    q = torch.softmax(torch.randn(k, V, generator=g) * 2, -1)      # [k, V]
    draft = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)]
    return p, q, draft


async def _run_model(fn, *args):
    return fn(*args)


def test_the_registry_is_the_config_s_list_and_says_which_are_exact():
    assert tuple(SCHEMES) == VERIFY_MODES
    assert tuple(n for n, s in SCHEMES.items() if s.exact) == EXACT_VERIFY_MODES
    assert [n for n, s in SCHEMES.items() if s.gumbel_drafts] == ["coupled"]
    with pytest.raises(ValueError, match="unknown verify mode 'magic'; choose from dense, split-topk"):
        scheme("magic")


@pytest.mark.parametrize("name", VERIFY_MODES)
def test_extras_go_up_and_come_back(name):
    s = scheme(name)
    _, q, draft = _dists(1, 3)
    batch = pb.DraftBatch(token_ids=draft)
    s.encode_extras(batch, draft, list(q), compress=True)
    back = s.decode_extras(pb.DraftBatch.FromString(batch.SerializeToString()), V)
    assert len(back) == 3
    if name == "dense":
        assert torch.allclose(torch.stack(back), q, atol=1e-6) and not batch.draft_probs
    elif name.startswith("split"):
        assert back == pytest.approx([float(q[i, x]) for i, x in enumerate(draft)]) and not batch.q_payload
    else:
        assert back == [None] * 3 and batch.ByteSize() == pb.DraftBatch(token_ids=draft).ByteSize()  # ids only


@pytest.mark.parametrize("name", ["dense", "split-exact"])
def test_extras_that_do_not_match_the_drafts_are_refused(name):
    s = scheme(name)
    _, q, draft = _dists(2, 3)
    batch = pb.DraftBatch(token_ids=draft)
    s.encode_extras(batch, draft[:2], list(q[:2]), compress=False)  # one row short
    with pytest.raises(ValueError, match="for 3 draft tokens"):
        s.decode_extras(batch, V)


@pytest.mark.parametrize("name", VERIFY_MODES)
def test_the_decision_is_the_verification_rule_s(name):
    s = scheme(name)
    for trial in range(40):
        p, q, draft = _dists(100 + trial, 1 + trial % 4)
        extras = list(q) if name == "dense" else [float(q[i, x]) for i, x in enumerate(draft)]
        d = s.decide(p, extras, draft, seed=trial, start_pos=9)
        if name == "dense":
            v = verify_dense(p, q, draft, trial, 9)
            assert (d.accepted, d.token, d.rejected) == (v.accepted, v.token, v.rejected)
        elif name == "coupled":
            v = verify_coupled(p, draft, trial, 9)
            assert (d.accepted, d.token, d.rejected) == (v.accepted, v.token, v.rejected)
        else:
            sv = verify_split(p, extras, draft, trial, 9)
            assert (d.accepted, d.token, d.rejected) == (sv.accepted, sv.bonus, sv.bonus is None)


def _resolutions(name: str, p_row: torch.Tensor, q_row: torch.Tensor, n: int, top_k: int) -> Counter:
    """Corrections the edge samples over n seeds, through the scheme's cloud and edge halves (tail requests too)."""
    s = scheme(name)

    async def one(seed: int) -> int:
        r = s.open_rejection(p_row, 5, seed, top_k, 1)
        v = pb.Verdict(residual_payload=r.payload.topk, tail_mass=r.payload.tail_mass, tail_payload=r.payload.tail)

        async def more_tail(have: int):
            from picospec.shared.codec import decode_list
            return decode_list(s.more_tail(r, 5, have, seed, 1), vocab_size=V, max_len=4096)
        token = await s.resolve(v, q_row, seed, 5, V, _run_model, more_tail)
        r.check(token)  # the cloud accepts it: it is among the candidates it sent
        return token

    async def all_seeds() -> Counter:
        return Counter([await one(seed) for seed in range(n)])
    return asyncio.run(all_seeds())


def test_split_exact_samples_the_residual_exactly():
    """Top-K of 2 and one tail draw per request: most corrections need tail draws, some need more of them."""
    p, q, _ = _dists(7, 1)
    residual = torch.clamp(p[0].double() - q[0].double(), min=0)
    residual /= residual.sum()
    n = 3000
    seen = _resolutions("split-exact", p[0], q[0], n, top_k=2)
    expected = residual * n
    keep = expected >= 5
    obs = [seen.get(i, 0) for i in range(V) if keep[i]]
    exp = expected[keep].tolist()
    assert sum(seen.get(i, 0) for i in range(V) if residual[i] == 0) == 0  # never where p <= q
    stat = chisquare(obs, [e * sum(obs) / sum(exp) for e in exp])
    assert stat.pvalue > 1e-3, (seen, residual)


def test_split_topk_corrections_stay_inside_the_top_k():
    p, q, _ = _dists(8, 1)
    seen = _resolutions("split-topk", p[0], q[0], 300, top_k=3)
    top3 = set(torch.topk(p[0], 3).indices.tolist())
    assert set(seen) <= top3 and len(seen) >= 1


def test_split_exact_tail_requests_must_follow_in_order():
    s = scheme("split-exact")
    p, _, _ = _dists(9, 1)
    r = s.open_rejection(p[0], 5, 0, 2, 2)
    assert r.tails_sent == 2
    with pytest.raises(ProtocolError, match="edge has 0 tail draws, cloud sent 2"):
        s.more_tail(r, 5, 0, 0, 2)
    with pytest.raises(ProtocolError, match="no open split-exact rejection"):
        scheme("split-topk").more_tail(r, 5, 2, 0, 2)
    with pytest.raises(ProtocolError, match="not among the candidates"):
        r.check(max(set(range(V)) - r.allowed))


@pytest.mark.parametrize("name", ["dense", "coupled"])
def test_schemes_whose_cloud_sends_the_correction_have_nothing_to_resolve(name):
    with pytest.raises(ProtocolError, match="nothing to resolve"):
        asyncio.run(scheme(name).resolve(pb.Verdict(), torch.ones(V) / V, 0, 0, V, _run_model, None))
