"""picospec-bench fuzz: its pure pieces (the cases, the mutators, the status classifier), and a 5,000-message run
against a real cloud subprocess whose verdict must be clean: no crash, only clear statuses, every well-behaved
session's tokens equal to the reference, memory bounded."""
from __future__ import annotations

import asyncio
import collections
import random
import time

import pytest
import torch
from google.protobuf.message import DecodeError

from picospec.bench.fuzz import (ENDED_WHILE_WRITING, FuzzConfig, classify, format_report, fuzz, memory_bound,
                                 read_rss, status_label)
from picospec.bench.fuzz_cases import (DRAFT_MUTATORS, HELLO_MUTATORS, KINDS, RPCS, TAIL_MUTATORS, Blobs, CloudFacts,
                                       build_case, edge, mutate_payload, open_session, raw_edit, raw_field, valid_draft,
                                       varint, wrap,
                                       zstd_bomb)
from picospec.shared.codec import PayloadError, decode_probs
from picospec.shared.config import VERIFY_MODES
from picospec.shared.rpc import picospec_pb2 as pb

FACTS = CloudFacts(vocab=64, num_tokens=64, sha256="ab" * 32, modes=VERIFY_MODES, max_draft_len=32, max_context=512,
                   max_new_tokens=32, num_layers=2, message_limit=1 << 20)  # a small limit: cheap blobs in unit tests


@pytest.fixture(scope="module")
def blobs() -> Blobs:
    return Blobs.make(FACTS, seed=0, bomb_mib=(64,))


# ---- the status classifier -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("label, details, by_us, clear", [
    ("OK", "", False, True),
    ("INVALID_ARGUMENT", "malformed message: ...", False, True),
    ("FAILED_PRECONDITION", "tokenizer mismatch", False, True),
    ("RESOURCE_EXHAUSTED", "Received message larger than max", False, True),
    ("INVALID_ARGUMENT", "  ", False, False),      # a refusal must say why
    ("UNKNOWN", "Unexpected <class 'DecodeError'>", False, False),
    ("INTERNAL", "boom", False, False),
    ("UNAVAILABLE", "Socket closed", False, False),  # the server went away
    ("DEADLINE_EXCEEDED", "Deadline Exceeded", False, False),  # a hang
    ("CANCELLED", "Locally cancelled by application!", True, True),
    ("CANCELLED", "cancelled", False, False),      # nobody asked for it
    (ENDED_WHILE_WRITING, "Internal error from Core", False, True),
])
def test_classify(label: str, details: str, by_us: bool, clear: bool) -> None:
    why = classify(label, details, by_us)
    assert (why is None) == clear, why


def test_status_label_only_relabels_internal_after_a_refused_write() -> None:
    assert status_label("INTERNAL", write_failed=True) == ENDED_WHILE_WRITING
    assert status_label("INTERNAL", write_failed=False) == "INTERNAL"
    assert status_label("INVALID_ARGUMENT", write_failed=True) == "INVALID_ARGUMENT"


def test_memory_bound_is_the_larger_of_the_two_allowances() -> None:
    mib = 2**20
    assert memory_bound(400 * mib, 0.25, 200 * mib) == 600 * mib    # +200 MB beats +25 %
    assert memory_bound(2000 * mib, 0.25, 200 * mib) == 2500 * mib  # +25 % beats +200 MB


def test_read_rss_of_this_process() -> None:
    import os
    rss = read_rss(os.getpid())
    assert rss is not None and rss > 10 * 2**20
    assert read_rss(2**22 + 12345) is None  # no such process


# ---- the cases -------------------------------------------------------------------------------------------------------

def test_cases_are_a_pure_function_of_seed_and_index(blobs: Blobs) -> None:
    again = Blobs.make(FACTS, seed=0, bomb_mib=(64,))
    for i in range(200):
        a, b = build_case(7, i, FACTS, blobs), build_case(7, i, FACTS, again)
        assert (a.kind, a.rpc, a.note, a.messages, a.cancel_after) == (b.kind, b.rpc, b.note, b.messages, b.cancel_after)
    assert [build_case(7, i, FACTS, blobs).messages for i in range(50)] != \
        [build_case(8, i, FACTS, blobs).messages for i in range(50)]


def test_cases_cover_every_kind_rpc_scheme_and_field(blobs: Blobs) -> None:
    cases = [build_case(0, i, FACTS, blobs) for i in range(3000)]
    assert {c.kind for c in cases} == set(KINDS)
    assert {c.rpc for c in cases} == set(RPCS)
    assert {c.scheme for c in cases} >= set(VERIFY_MODES)
    notes = {c.note for c in cases if c.kind == "mutated"}
    fields = [f"hello.{n}" for n in HELLO_MUTATORS] + [f"draft.{n}" for n in DRAFT_MUTATORS] + list(TAIL_MUTATORS)
    assert set(fields) <= notes, set(fields) - notes
    assert {"raw.negative_varint", "raw.wrong_wire_type", "raw.bit_flips", "raw.truncated"} <= notes
    by_kind = collections.Counter(c.kind for c in cases)
    assert by_kind["oversized"] < by_kind["mutated"] / 20  # the expensive kind stays rare


@pytest.mark.parametrize("name", sorted(HELLO_MUTATORS))
def test_each_hello_mutator_changes_its_field(name: str) -> None:
    changed = 0
    for seed in range(20):
        r = random.Random(seed)
        s = open_session(r, FACTS, "dense", drafts=0)
        before = s.hello.SerializeToString()
        HELLO_MUTATORS[name](r, FACTS, s.hello)
        changed += s.hello.SerializeToString() != before
    assert changed >= 10  # a random pick may land on the valid value now and then, not mostly


@pytest.mark.parametrize("name", sorted(DRAFT_MUTATORS) + sorted(TAIL_MUTATORS))
def test_each_draft_and_tail_mutator_changes_its_message(name: str) -> None:
    changed = 0
    for seed in range(20):
        r = random.Random(seed)
        s = open_session(r, FACTS, "dense", drafts=1)
        msg = valid_draft(r, FACTS, "dense", s.end, 2) if name in DRAFT_MUTATORS else pb.TailRequest(position=s.end)
        before = msg.SerializeToString()
        (DRAFT_MUTATORS.get(name) or TAIL_MUTATORS[name])(r, FACTS, msg)
        changed += msg.SerializeToString() != before
    assert changed >= 10


def test_mutated_payloads_fail_only_with_payload_error() -> None:
    """Whatever a payload mutation does, the codec refuses it with PayloadError (which the server maps to
    INVALID_ARGUMENT) or decodes it: no other exception type, which would reach the client as UNKNOWN."""
    refused = 0
    for seed in range(1500):
        r = random.Random(seed)
        b = valid_draft(r, FACTS, "dense", 5, r.randint(1, 3))
        data = mutate_payload(r, FACTS, b)
        try:
            decode_probs(data, vocab_size=FACTS.vocab, max_rows=len(b.token_ids), max_sum_error=1e-3)
        except PayloadError:
            refused += 1
    assert refused > 1300


def test_a_zstd_bomb_is_small_and_refused_without_inflating() -> None:
    frame = zstd_bomb(1024 * 2**20, content_size=True)
    assert len(frame) < 64 * 1024
    header = (1).to_bytes(1, "little") + bytes([1, 1, 1]) + (2).to_bytes(4, "little") + (64).to_bytes(4, "little") + \
        (2 * 64 * 4).to_bytes(4, "little")
    t0 = time.process_time()  # CPU time, not wall time: a loaded machine cannot stretch it
    with pytest.raises(PayloadError, match="decompressed body"):
        decode_probs(header + frame, vocab_size=64, max_rows=2)
    assert time.process_time() - t0 < 0.05  # even streaming the 1 GiB through without keeping it takes 0.17 s


def test_negative_varints_reach_unsigned_fields_as_huge_values() -> None:
    assert len(varint(-1)) == 10 and varint(300) == b"\xac\x02"
    s = open_session(random.Random(3), FACTS, "coupled", drafts=1)
    for seed in range(40):
        name, data = raw_edit(random.Random(seed), s, edge(s.drafts[-1]))
        try:
            pb.EdgeMessage.FromString(data)
        except DecodeError:
            assert name in ("raw.wrong_wire_type", "raw.bit_flips", "raw.truncated"), name
    inner = pb.DraftBatch(start_pos=5, token_ids=[1]).SerializeToString() + raw_field(2, 0, varint(-1))
    assert pb.EdgeMessage.FromString(wrap(2, inner)).draft.start_pos == 2**32 - 1  # last value wins, truncated


# ---- a short run against a real cloud ------------------------------------------------------------------------------

def test_fuzz_5000_messages_against_a_cloud_process(tmp_path) -> None:
    torch.set_num_threads(1)
    cfg = FuzzConfig(messages=5000, seed=1, honest_every=500, honest_tokens=12, concurrency=16, warmup=1000,
                     quiet=True, json=tmp_path / "fuzz.json")
    t0 = time.perf_counter()
    report = asyncio.run(fuzz(cfg))
    text = format_report(report)
    assert not report.failures, text
    t = report.tally
    assert t.messages >= 5000 and t.violation_count == 0, text
    assert all(t.messages_by_kind[k] > 0 for k in KINDS), text
    assert all(t.by_rpc[r] > 0 for r in RPCS) and all(t.by_scheme[s] > 0 for s in VERIFY_MODES), text
    assert report.server["alive"] and report.server["info_answers"] and not report.server["tracebacks"], text
    assert len(report.honest) >= 9 and all(r["ok"] for r in report.honest), text
    m = report.memory
    assert m is not None and m["warmup_mb"] and m["end_mb"] <= m["bound_mb"], text
    print(f"\n{text}\nwhole test run: {time.perf_counter() - t0:.1f} s")
