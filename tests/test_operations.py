"""Operations of the cloud: Prometheus metrics checked against the generations' own statistics, the gRPC health
service and reflection (callable without a token, PicoSpec methods still not), the health probe, and the SIGTERM
drain of a real cloud process (a session that fits in --grace-s finishes, one that does not is ended with a clear
status; new sessions are refused UNAVAILABLE and health says NOT_SERVING at once; the process exits 0)."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from picospec.cloud_server import health_probe
from picospec.cloud_server.auth import exempt_from_tokens
from picospec.cloud_server.drain import StopSignals, shutdown_message
from picospec.cloud_server.metrics import CloudMetrics, SessionMeter, finish_label
from picospec.cloud_server.handshake import Refusal
from picospec.cloud_server.slots import SessionSlots
from picospec.edge_client.transport import EdgeError
from picospec.shared.protocol import FinishReason, SessionState
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.rpc import picospec_pb2_grpc as pb_grpc
from tests.conftest import PassBeforeDecodeAhead, edge, run, serving
from tests.proc_util import cloud_process, free_port
from tests.test_auth import ALICE
from tests.test_refusals import _exchange, _hello

HEALTH = "grpc.health.v1.Health"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


# ---- pure helpers ------------------------------------------------------------------------------------------------

def test_finish_label_says_how_a_session_ended():
    assert finish_label(FinishReason.EOS, None) == "eos"
    assert finish_label(FinishReason.LENGTH, RuntimeError()) == "length"  # it got that far
    assert finish_label(None, Refusal(grpc.StatusCode.UNAVAILABLE, "x", reason="shutdown")) == "shutdown"
    assert finish_label(None, asyncio.CancelledError()) == "cancelled"
    assert finish_label(None, GeneratorExit()) == "cancelled"
    assert finish_label(None, ValueError("bad batch")) == "error"


def test_only_health_and_reflection_are_exempt_from_tokens():
    assert exempt_from_tokens("/grpc.health.v1.Health/Check")
    assert exempt_from_tokens("/grpc.health.v1.Health/Watch")
    assert exempt_from_tokens("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert exempt_from_tokens("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    for method in ("/picospec.v1.PicoSpec/Info", "/picospec.v1.PicoSpec/Speculate", "/grpc.health.v1.HealthX/Check",
                   "/x.grpc.health.v1.Health/Check", ""):
        assert not exempt_from_tokens(method)


def test_shutdown_message_names_the_grace():
    assert shutdown_message(30.0) == "the cloud is shutting down (--grace-s 30 elapsed)"
    assert "second signal" in shutdown_message(30.0, second_signal=True)


def test_stop_signals_first_drains_second_stops():
    async def scenario():
        s = StopSignals()
        s.received(signal.SIGTERM)
        first = (s.first.is_set(), s.again.is_set())
        s.received(signal.SIGINT)
        return first, s.again.is_set(), s.names
    assert run(scenario()) == ((True, False), True, ["SIGTERM", "SIGINT"])


def test_disabled_metrics_hold_nothing_and_meter_nothing():
    m = CloudMetrics(enabled=False)
    assert not hasattr(m, "registry")
    m.serve("127.0.0.1", free_port())
    assert m.http is None
    with m.session("dense", SessionState([1], 4, frozenset(), 10)) as meter:
        assert type(meter) is SessionMeter
        meter.on_pass(3, 2, 3, 0.1, 0.01)
        meter.received(object())  # not even looked at


def test_probe_tls_dir_fills_in_what_the_flags_leave_out():
    args = health_probe.build_parser().parse_args(["h:1", "--tls-dir", "/tls", "--tls-cert", "/x/me.pem"])
    assert health_probe.tls_files(args) == ("/tls/ca.pem", "/x/me.pem", "/tls/client.key")
    assert health_probe.tls_files(health_probe.build_parser().parse_args(["h:1"])) == ("", "", "")


def test_draining_slots_refuse_new_sessions_and_say_when_idle():
    async def scenario():
        slots = SessionSlots(2)
        async with slots.hold("a"):
            slots.drain()
            with pytest.raises(Refusal) as refused:
                async with slots.hold("b"):
                    pass
            busy = await slots.wait_idle(0.01)
        return refused.value, busy, await slots.wait_idle(0.01)

    refused, busy, idle = run(scenario())
    assert (refused.code, refused.reason, busy, idle) == (grpc.StatusCode.UNAVAILABLE, "draining", False, True)


# ---- metrics against the generations' own statistics ---------------------------------------------------------------

def scrape(port: int) -> dict[str, float]:
    """The metrics endpoint's samples as {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum over the samples of metric `name` whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for key, v in samples.items()
               if re.fullmatch(re.escape(name) + r"(\{.*\})?", key) and all(w in key for w in want))


def test_metrics_match_the_generations(tiny_target, tiny_draft):
    port = free_port()
    prompt = tiny_target.tokenizer("metrics")["input_ids"]

    async def scenario():
        async with serving(tiny_target, metrics_port=port, max_sessions=1) as (service, addr):
            service.hooks = PassBeforeDecodeAhead()
            stats = {}
            async with edge(addr, tiny_draft, max_new_tokens=24, ignore_eos=True) as client:
                for mode, verify in (("sync", "dense"), ("pipeline", "coupled")):
                    # a fixed draft length: the online policy may let the cloud decode every token alone (no pass)
                    # when its decode step looks cheap, as it did once in a loaded full suite
                    gen = client.generate(prompt, mode=mode, verify=verify, draft_len=3)
                    await gen.collect()
                    stats[verify] = gen.stats.to_dict()
            for _ in range(100):  # the last session's slot comes back once the cloud has settled and closed it
                if service.active_sessions == 0:
                    break
                await asyncio.sleep(0.05)
            async with grpc.aio.insecure_channel(addr) as ch:  # hold the one slot, then be refused
                call = pb_grpc.PicoSpecStub(ch).Speculate()
                await call.write(pb.EdgeMessage(hello=_hello(tiny_target, verify_mode="split-topk")))
                await call.read()
                _, err = await _exchange(addr, [pb.EdgeMessage(hello=_hello(tiny_target))])
                call.cancel()
            for _ in range(100):  # the cancelled session's slot comes back
                if service.active_sessions == 0:
                    break
                await asyncio.sleep(0.05)
            return stats, err, scrape(port)

    stats, err, s = run(scenario())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert total(s, "picospec_cloud_sessions_refused_total", reason="limit") == 1
    assert total(s, "picospec_cloud_sessions_active") == 0
    for verify, st in stats.items():
        assert total(s, "picospec_cloud_tokens_emitted_total", mode=verify) == st["generated_tokens"] == 24
        assert total(s, "picospec_cloud_passes_total", mode=verify) == st["rounds"]
        assert total(s, "picospec_cloud_pass_drafts_count", mode=verify) == st["rounds"]
        assert total(s, "picospec_cloud_pass_drafts_sum", mode=verify) == st["drafted_tokens"]
        assert total(s, "picospec_cloud_draft_tokens_verified_total", mode=verify) == st["drafted_tokens"]
        assert total(s, "picospec_cloud_draft_tokens_accepted_total", mode=verify) == st["accepted_tokens"]
        assert total(s, "picospec_cloud_draft_tokens_verified_total", mode=verify, position="1") == st["rounds"]
        assert total(s, "picospec_cloud_drafts_received_total", mode=verify) >= st["drafted_tokens"]
        assert total(s, "picospec_cloud_sessions_started_total", mode=verify) == 1
        assert total(s, "picospec_cloud_sessions_finished_total", mode=verify, reason="length") == 1
        assert total(s, "picospec_cloud_pass_seconds_count", mode=verify) == st["rounds"]
        assert total(s, "picospec_cloud_queue_seconds_count", mode=verify) == st["rounds"]
        assert total(s, "picospec_cloud_bytes_received_total", mode=verify) > 0
        assert total(s, "picospec_cloud_bytes_sent_total", mode=verify) > 0
        # the cloud's compute: every verdict's model time the edge was told of, plus decode-ahead steps whose token
        # came too late to be committed (the edge never hears of those)
        compute = total(s, "picospec_cloud_compute_seconds_total", mode=verify)
        told = st["cloud_ms_per_token"] * st["generated_tokens"] / 1e3  # the verdicts' model time, prefill apart
        assert compute >= told * (1 - 1e-6) and compute > 0  # the edge's figure went through ms and back
    assert stats["dense"]["rounds"] > 0  # sync: every token after the first comes from a pass
    # sync has no decode-ahead: its compute is exactly its passes' model time, as the edge was told
    assert total(s, "picospec_cloud_compute_seconds_total", mode="dense") == pytest.approx(
        total(s, "picospec_cloud_pass_seconds_sum", mode="dense"), rel=1e-9)
    # pipeline: passes (the hooks let one come before any decode-ahead step), and tokens decoded ahead or not
    assert stats["coupled"]["rounds"] > 0
    dense = stats["dense"]
    committed = total(s, "picospec_cloud_pass_committed_tokens_sum", mode="dense")
    # every dense token after the first (sent with Ready) comes from a pass
    assert committed == dense["generated_tokens"] - 1
    assert total(s, "picospec_cloud_decode_ahead_steps_total", mode="coupled") == stats["coupled"]["cloud_tokens"]
    # the slot holder hung up; the refused session never started
    assert total(s, "picospec_cloud_sessions_started_total") == 3
    assert total(s, "picospec_cloud_sessions_finished_total", mode="split-topk", reason="cancelled") == 1


# ---- health, reflection and tokens -----------------------------------------------------------------------------------

async def health_status(ch: grpc.aio.Channel, service: str = "") -> int:
    return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service))).status


async def reflected_services(ch: grpc.aio.Channel) -> set[str]:
    call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    async for reply in call:
        return {s.name for s in reply.list_services_response.service}
    return set()


def test_health_and_reflection_need_no_token_but_picospec_does(tiny_target, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {ALICE}\n")
    tokens.chmod(0o600)

    async def scenario():
        async with serving(tiny_target, auth_tokens=str(tokens), metrics_port=free_port()) as (service, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                statuses = [await health_status(ch, name) for name in ("", "picospec.v1.PicoSpec")]
                services = await reflected_services(ch)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await pb_grpc.PicoSpecStub(ch).Info(pb.InfoRequest())
                unauthenticated = service.metrics.registry.get_sample_value(
                    "picospec_cloud_sessions_refused_total", {"reason": "unauthenticated"})
                await service.begin_drain()
                draining = [await health_status(ch, name) for name in ("", "picospec.v1.PicoSpec")]
            probe = await asyncio.to_thread(health_probe.main, [addr])
            return statuses, services, (refused.value.code(), unauthenticated), draining, probe

    statuses, services, code, draining, probe = run(scenario())
    assert statuses == [SERVING, SERVING]
    assert {"picospec.v1.PicoSpec", HEALTH, "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert code == (grpc.StatusCode.UNAUTHENTICATED, 1.0)
    assert draining == [NOT_SERVING, NOT_SERVING]
    assert probe == 1  # NOT_SERVING


def test_probe_speaks_tls_to_a_mutual_tls_cloud(tiny_target, tmp_path):
    from tests.test_auth import make_certs
    pki = make_certs(tmp_path / "pki")

    async def scenario():
        async with serving(tiny_target, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                           tls_ca=str(pki / "ca.pem")) as (_, addr):
            with_tls = await asyncio.to_thread(health_probe.main, [addr, "--tls-dir", str(pki)])
            plaintext = await asyncio.to_thread(health_probe.main, [addr, "--timeout-s", "2"])
            return with_tls, plaintext

    assert run(scenario()) == (0, 1)


# ---- the drain of a real cloud process -------------------------------------------------------------------------------

def probe(address: str) -> tuple[bool, str]:
    return health_probe.check(address, "", 5.0)


async def generate_until_drain(address: str, draft, proc, mode: str,
                               max_new_tokens: int) -> tuple[list[int], EdgeError | None, dict[str, object]]:
    """Start a generation, SIGTERM the cloud after its first tokens, and meanwhile ask for its health and open a new
    session: (the generation's tokens, the error it ended with or None, {"health": ..., "new_session": error})."""
    tokens: list[int] = []
    seen: dict[str, object] = {}
    async with edge(address, draft, max_new_tokens=max_new_tokens, ignore_eos=True, reconnect_s=0.0) as client:
        try:
            async for chunk in client.generate([1, 2, 3], mode=mode):
                tokens.extend(chunk)
                if len(tokens) >= 3 and not seen:
                    os.kill(proc.pid, signal.SIGTERM)
                    seen["health"] = await asyncio.to_thread(health_probe.check, address, "", 5.0)
                    _, seen["new_session"] = await _exchange(address, [pb.EdgeMessage(hello=_hello(draft))])
        except EdgeError as e:
            return tokens, e, seen
    return tokens, None, seen


def assert_draining(seen: dict[str, object]) -> None:
    assert seen["health"] == (False, "NOT_SERVING")
    refused = seen["new_session"]
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.details(), refused


def test_sigterm_drain_lets_a_session_within_the_grace_finish(tiny_draft):
    with cloud_process("tiny-random", "--grace-s", "30") as (proc, address):
        tokens, error, seen = run(generate_until_drain(address, tiny_draft, proc, "cloud", 40))
        assert proc.wait(timeout=30) == 0
    assert error is None and len(tokens) == 40
    assert_draining(seen)


def test_sigterm_drain_ends_a_session_past_the_grace(tiny_draft):
    """500 tokens in sync mode take the tiny pair well over 10 s (the target's context is 512); the grace is 1 s."""
    with cloud_process("tiny-random", "--grace-s", "1") as (proc, address):
        tokens, error, seen = run(generate_until_drain(address, tiny_draft, proc, "sync", 500))
        assert proc.wait(timeout=30) == 0
    assert error is not None and "the cloud is shutting down (--grace-s 1 elapsed)" in str(error), error
    assert error.status == "UNAVAILABLE" and 3 <= len(tokens) < 500
    assert_draining(seen)
