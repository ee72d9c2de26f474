"""A secured cloud as a real `picospec-cloud` process (TLS, client certificates, tokens, --peer-timeout-s 2,
--max-sessions 1), with the real edge console script and a real edge process: an edge without a token is refused
UNAUTHENTICATED, one with the token (PICOSPEC_TOKEN) and certificates generates; SIGHUP revokes a token removed
from the file (no token in the cloud's log) and reloads the TLS files; a frozen edge (SIGSTOP) loses its session and its slot within the
peer timeout; a frozen cloud is reported by the edge within the peer timeout, not at the generation's deadline.

The tests run in file order against one cloud (the frozen-cloud test is last and resumes it)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from picospec.edge_client.transport import CloudLost, EdgeError
from picospec.shared.connection import token_metadata
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.rpc import picospec_pb2_grpc as pb_grpc
from tests.conftest import edge, run
from tests.proc_util import free_port
from tests.test_auth import ALICE, BOB, make_certs

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120
PEER_TIMEOUT_S = 2.0
DETECT_BOUND_S = PEER_TIMEOUT_S + 3.0  # the peer timeout plus a margin for a loaded machine
STEP_S = 60.0

# an edge process that loads its draft, waits for a line on stdin, then generates for a long time as bob
EDGE_SCRIPT = """
import asyncio, os, sys
from picospec.edge_client.client import EdgeClient
from picospec.shared.config import EdgeConfig
from picospec.shared.models import load_model
draft = load_model("tiny-random:layers=1", progress=False)
print("loaded", flush=True)
sys.stdin.readline()
async def main():
    async with EdgeClient(EdgeConfig(server=sys.argv[1], draft=draft.name, peer_timeout_s=2.0, wait_ready_s=60,
                                     tls_ca=sys.argv[2] + "/ca.pem", tls_cert=sys.argv[2] + "/client.pem",
                                     tls_key=sys.argv[2] + "/client.key", token=os.environ["PICOSPEC_TOKEN"]),
                          draft) as client:
        async for _ in client.generate([1, 2, 3], mode="sync", max_new_tokens=4000, ignore_eos=True):
            print("generating", flush=True)
asyncio.run(main())
"""


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.pki = make_certs(tmp / "pki")
        self.tokens = tmp / "tokens"
        self.tokens.write_text(f"alice {ALICE}\nbob {BOB}\n")
        self.tokens.chmod(0o600)
        self.log = tmp / "cloud.log"
        self.address = f"127.0.0.1:{free_port()}"
        self.tls = {"tls_ca": str(self.pki / "ca.pem"), "tls_cert": str(self.pki / "client.pem"),
                    "tls_key": str(self.pki / "client.key")}
        p = self.pki
        with open(self.log, "w") as log:
            self.cloud = subprocess.Popen(
                [BIN / "picospec-cloud", "--target", "tiny-random", "--host", "127.0.0.1", "--port",
                 self.address.rsplit(":", 1)[1], "--threads", "1", "--tls-cert", p / "server.pem", "--tls-key",
                 p / "server.key", "--tls-ca", p / "ca.pem", "--auth-tokens", self.tokens, "--max-sessions", "1",
                 "--peer-timeout-s", str(PEER_TIMEOUT_S)], stdout=log, stderr=subprocess.STDOUT)
        # started now so that its imports overlap the cloud's; it generates when told to
        self.edge_log = tmp / "edge.log"
        with open(self.edge_log, "w") as log:
            self.edge = subprocess.Popen([sys.executable, "-c", EDGE_SCRIPT, self.address, str(self.pki)],
                                         stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True,
                                         env={**os.environ, "PICOSPEC_TOKEN": BOB})

    @staticmethod
    def wait_for(proc: subprocess.Popen, log: Path, marker: str, timeout: float) -> None:
        """Until `marker` is in the process's log; a process that exits or a timeout fails the test."""
        deadline = time.monotonic() + timeout
        while marker not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {marker!r} from the process:\n" + log.read_text())
            time.sleep(0.05)

    def edge_cli(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BIN / "picospec-edge", "--server", self.address, "--draft", "tiny-random", "--threads", "1",
             "--prompt", "hello", "--max-new-tokens", "4", *args],
            capture_output=True, text=True, timeout=STEP_S, env={**os.environ, "PICOSPEC_WAIT_READY_S": "30", **env})

    def stop(self) -> None:
        for proc in (self.edge, self.cloud):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("secured"))
    try:
        s.wait_for(s.cloud, s.log, "serving", START_TIMEOUT_S)
        yield s
    finally:
        s.stop()
    assert ALICE not in s.log.read_text() and BOB not in s.log.read_text()


def test_edge_cli_without_a_token_is_refused_and_with_one_generates(stack):
    t0 = time.monotonic()
    r = stack.edge_cli("--tls-ca", stack.tls["tls_ca"], "--tls-cert", stack.tls["tls_cert"], "--tls-key",
                       stack.tls["tls_key"])
    assert r.returncode != 0 and time.monotonic() - t0 < 30
    assert "UNAUTHENTICATED: missing token: pass --token / PICOSPEC_TOKEN" in r.stderr, r.stderr
    r = stack.edge_cli("--json", "--mode", "cloud,sync", PICOSPEC_TOKEN=ALICE,
                       **{f"PICOSPEC_{k.upper()}": v for k, v in stack.tls.items()})
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert out[0]["token_ids"] == out[1]["token_ids"] and len(out[0]["token_ids"]) == 4


def test_sighup_revokes_a_removed_token(stack):
    async def info(token: str) -> grpc.StatusCode:
        creds = grpc.ssl_channel_credentials(*(Path(stack.tls[k]).read_bytes() for k in ("tls_ca", "tls_key", "tls_cert")))
        async with grpc.aio.secure_channel(stack.address, creds) as channel:
            try:
                await pb_grpc.PicoSpecStub(channel).Info(pb.InfoRequest(), timeout=10, metadata=token_metadata(token))
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                return e.code()

    assert run(info(ALICE)) is grpc.StatusCode.OK
    stack.tokens.write_text(f"bob {BOB}\n")
    os.kill(stack.cloud.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while run(info(ALICE)) is not grpc.StatusCode.UNAUTHENTICATED:
        assert time.monotonic() < deadline, "alice's token still accepted 10 s after SIGHUP"
        time.sleep(0.1)
    assert run(info(BOB)) is grpc.StatusCode.OK
    assert "tokens reloaded" in stack.log.read_text()
    assert "TLS certificate reloaded" in stack.log.read_text()  # the same signal reloads the TLS files


def test_a_frozen_edge_loses_its_session_within_the_peer_timeout(stack, tiny_draft):
    stack.wait_for(stack.edge, stack.edge_log, "loaded", START_TIMEOUT_S)
    stack.edge.stdin.write("go\n")
    stack.edge.stdin.flush()
    stack.wait_for(stack.edge, stack.edge_log, "generating", STEP_S)
    os.kill(stack.edge.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()

    async def next_session() -> float:
        """Seconds from the freeze until the cloud (--max-sessions 1) takes a new session."""
        # admission_wait_s=0: each refusal comes back at once, and this loop asks again every 0.1 s
        async with edge(stack.address, tiny_draft, token=BOB, max_new_tokens=2, admission_wait_s=0, **stack.tls) as client:
            while True:
                try:
                    await asyncio.wait_for(client.generate([1, 2], mode="cloud").collect(), STEP_S)
                    return time.monotonic() - frozen_at
                except EdgeError as e:
                    assert e.status == "RESOURCE_EXHAUSTED", e
                    assert time.monotonic() - frozen_at < STEP_S, "the frozen edge's session never ended"
                    await asyncio.sleep(0.1)

    took = run(next_session())
    print(f"frozen edge: its slot was free again after {took:.2f} s (peer timeout {PEER_TIMEOUT_S:g} s)")
    assert took < DETECT_BOUND_S
    assert "ended by the edge's side" in stack.log.read_text()


def test_a_frozen_cloud_is_reported_within_the_peer_timeout(stack, tiny_draft):
    async def scenario() -> tuple[BaseException, float]:
        # reconnect_s=0: the detection itself (a resume would go on waiting for the frozen cloud: test_resume.py)
        async with edge(stack.address, tiny_draft, token=BOB, peer_timeout_s=PEER_TIMEOUT_S, reconnect_s=0.0,
                        **stack.tls) as client:
            gen = client.generate([1, 2, 3], mode="pipeline", max_new_tokens=4000, ignore_eos=True)
            got: list[int] = []
            while len(got) < 8:
                got += await asyncio.wait_for(gen.__anext__(), STEP_S)
            os.kill(stack.cloud.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            try:
                while True:
                    await asyncio.wait_for(gen.__anext__(), STEP_S)
            except Exception as e:  # noqa: BLE001 - examined below
                return e, time.monotonic() - frozen_at

    try:
        error, took = run(scenario())
    finally:
        os.kill(stack.cloud.pid, signal.SIGCONT)
    print(f"frozen cloud: the edge failed after {took:.2f} s (peer timeout {PEER_TIMEOUT_S:g} s)")
    assert isinstance(error, CloudLost), f"{type(error).__name__}: {error}"
    assert f"no answer from the cloud at {stack.address} for {PEER_TIMEOUT_S:g} s" in str(error)
    assert took < DETECT_BOUND_S
