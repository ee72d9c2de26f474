"""Several cloud replicas behind one edge (issue 13 item 1): `--server host:port,host:port` (or a dns:/// target) is
balanced with gRPC's round_robin, one stream per generation. Pure parsing of --server into a gRPC target; then two
real `picospec-cloud` processes on loopback: one edge's generations spread over both (each cloud logs every
session's start), and a replica SIGKILLed mid-generation is left behind: the generation resumes on the other one at
once, without waiting for the dead one, with the uninterrupted run's tokens (greedy pipeline, and sync/dense at T = 1
with a fixed seed: modes whose resume is token-identical, tests/test_resume.py and edge_client/resume.py say why).
"""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from picospec.edge_client.transport import tls_name_options
from picospec.shared.connection import ConnectionSettingsError, server_target
from tests.conftest import edge, run, serving
from tests.proc_util import free_port
from tests.test_resume import TOKENS_BEFORE_KILL, next_chunk, the_rest

START_TIMEOUT_S = 120
STEP_S = 60.0
NEW_TOKENS = 100
SESSION_RE = re.compile(r"session \w+: (\d+) prompt tokens")  # the cloud's log line at each session's start


# ---- --server as a gRPC target -------------------------------------------------------------------------------------

def fake_resolve(host: str, port: str) -> list[str]:
    return {"localhost": ["::1", "127.0.0.1"], "gpu": ["10.0.0.5", "10.0.0.6"], "v6": ["2001:db8::1"]}[host]


def test_server_lists_become_grpc_targets():
    t = server_target("127.0.0.1:5001,127.0.0.1:5002", fake_resolve)
    assert (t.target, t.hosts, t.balanced, t.authority) == (
        "ipv4:127.0.0.1:5001,127.0.0.1:5002", ("127.0.0.1", "127.0.0.1"), True, "127.0.0.1:5001")
    t = server_target(" localhost:1, localhost:2 ", fake_resolve)  # names resolved, one family for all
    assert (t.target, t.authority) == ("ipv4:127.0.0.1:1,127.0.0.1:2", "localhost:1")
    t = server_target("gpu:1,localhost:2", fake_resolve)
    assert (t.target, t.hosts, t.authority) == ("ipv4:10.0.0.5:1,10.0.0.6:1,127.0.0.1:2", ("gpu", "localhost"), "")
    assert server_target("v6:1,[::1]:2", fake_resolve).target == "ipv6:[2001:db8::1]:1,[::1]:2"
    assert server_target("[::1]:1,[::1]:2", fake_resolve).authority == "[::1]:1"
    single = server_target("gpu:50051", fake_resolve)  # one address: as before (gRPC resolves it, pick_first)
    assert (single.target, single.hosts, single.balanced) == ("gpu:50051", ("gpu",), False)
    for given, host in (("dns:///svc.example:50051", "svc.example"), ("dns://10.0.0.2/svc:1", "svc"),
                        ("unix:/run/picospec.sock", "localhost")):
        t = server_target(given, fake_resolve)
        assert (t.target, t.hosts, t.balanced, t.authority) == (given, (host,), True, "")
    t = server_target("ipv4:10.0.0.5:1,10.0.0.6:1", fake_resolve)
    assert (t.target, t.hosts, t.authority) == ("ipv4:10.0.0.5:1,10.0.0.6:1", ("10.0.0.5", "10.0.0.6"), "")
    for bad, why in (("a:1,b", "expected host:port"), ("127.0.0.1:1,::1:2", "expected host:port"),
                     ("127.0.0.1:1,[::1]:2", "no address family"), ("gpu:1,v6:2", "no address family")):
        with pytest.raises(ConnectionSettingsError, match=why):
            server_target(bad, fake_resolve)


def test_tls_verifies_one_name_for_every_replica():
    assert tls_name_options("cloud", "localhost:1", ("localhost",)) == [("grpc.ssl_target_name_override", "cloud")]
    assert tls_name_options("", "localhost:1", ("localhost", "localhost")) == [("grpc.default_authority", "localhost:1")]
    assert tls_name_options("", "", ("svc",)) == []  # one host: gRPC's own (the dns: name)
    with pytest.raises(ConnectionSettingsError, match="--tls-server-name NAME, a name every replica's certificate"):
        tls_name_options("", "", ("gpu", "localhost"))


def test_tls_over_a_list_of_replicas_in_process(tiny_target, tiny_draft, tmp_path):
    """Two TLS clouds (certificates for localhost and 127.0.0.1) behind one list: the shared host is verified."""
    from tests.test_auth import make_certs
    pki = make_certs(tmp_path / "pki")
    tls = {"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key")}

    async def scenario():
        async with serving(tiny_target, **tls) as (_, a), serving(tiny_target, **tls) as (_, b):
            for server in (f"{a},{b}", f"{a},{b}".replace("127.0.0.1", "localhost")):
                async with edge(server, tiny_draft, tls_ca=str(pki / "ca.pem")) as client:
                    for _ in range(4):
                        got = await asyncio.wait_for(client.generate([1, 2, 3], mode="cloud", max_new_tokens=2)
                                                     .collect(), STEP_S)
                        assert len(got) == 2

    run(scenario())  # the spread itself: the process tests below


# ---- two real replicas ---------------------------------------------------------------------------------------------

class Replicas:
    """Two tiny-random cloud processes on fixed loopback ports, each logging to a file of its own (its sessions)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.ports = tmp, [free_port(), free_port()]
        self.procs: list[subprocess.Popen | None] = [None, None]
        self.logs: list[Path] = [tmp / "none", tmp / "none"]
        self.starts = 0
        self.server = ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, i: int) -> None:
        self.starts += 1
        self.logs[i] = self.tmp / f"cloud{i}-{self.starts}.log"
        with open(self.logs[i], "w") as log:
            self.procs[i] = subprocess.Popen(
                [Path(sys.executable).parent / "picospec-cloud", "--target", "tiny-random", "--host", "127.0.0.1",
                 "--port", str(self.ports[i]), "--threads", "1", "--log-level", "INFO"],
                stdout=log, stderr=subprocess.STDOUT)

    def wait_up(self) -> None:
        """Until every replica has said it serves (a dead one is started again first)."""
        for i, proc in enumerate(self.procs):
            if proc is None or proc.poll() is not None:
                self.start(i)
        deadline = time.monotonic() + START_TIMEOUT_S
        for i, proc in enumerate(self.procs):
            while "serving" not in self.logs[i].read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"replica {i} did not start:\n" + self.logs[i].read_text())
                time.sleep(0.05)

    def sessions(self, i: int) -> list[int]:
        """The prompt length of each session replica i started."""
        return [int(n) for n in SESSION_RE.findall(self.logs[i].read_text())]

    def kill(self, i: int) -> float:
        self.procs[i].kill()
        self.procs[i].wait(timeout=15)
        return time.monotonic()

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None:
                proc.kill()
                proc.wait(timeout=15)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Iterator[Replicas]:
    r = Replicas(tmp_path_factory.mktemp("replicas"))
    try:
        r.start(0)
        r.start(1)  # both start at once
        r.wait_up()
        yield r
    finally:
        r.stop()


def test_one_edges_generations_spread_over_the_replicas(replicas, tiny_draft):
    before = [len(replicas.sessions(i)) for i in (0, 1)]

    async def scenario():
        async with edge(replicas.server, tiny_draft, wait_ready_s=STEP_S) as client:
            for _ in range(6):
                got = await asyncio.wait_for(client.generate([1, 2, 3], mode="sync", max_new_tokens=4,
                                                             ignore_eos=True).collect(), STEP_S)
                assert len(got) == 4

    run(scenario())
    served = [len(replicas.sessions(i)) - before[i] for i in (0, 1)]
    print(f"6 generations over two replicas: {served[0]} and {served[1]} sessions")
    assert sum(served) == 6 and min(served) >= 2, served


async def killed_mid_generation(client, replicas: Replicas, prompt: list[int], **kw) -> tuple:
    """Generate; after TOKENS_BEFORE_KILL tokens SIGKILL the replica serving it (the one that logged the session)
    and read to the end. Returns the tokens, the stats, the killed replica and seconds from the kill to the first
    token after the resume."""
    before = [len(replicas.sessions(i)) for i in (0, 1)]
    gen = client.generate(prompt, **kw)
    got: list[int] = []
    while len(got) < TOKENS_BEFORE_KILL:
        got += await next_chunk(gen)
    serving = [i for i in (0, 1) if len(replicas.sessions(i)) > before[i]]
    assert len(serving) == 1, serving
    rest, recovered_s = await the_rest(gen, replicas.kill(serving[0]))
    return got + rest, gen.stats, serving[0], recovered_s


CASES = [("pipeline", "dense", 0.0), ("sync", "dense", 1.0)]  # mode, verify, temperature


@pytest.mark.parametrize("mode,verify,temperature", CASES)
def test_a_replica_killed_mid_generation_the_resume_goes_to_the_other(replicas, tiny_target, tiny_draft, mode, verify,
                                                                      temperature):
    replicas.wait_up()
    prompt = list(tiny_target.tokenizer("hello world")["input_ids"])
    # decode-ahead off: a replica decoding on its own could finish all the tokens before the kill lands
    kw = dict(mode=mode, verify=verify, temperature=temperature, seed=1234, max_new_tokens=NEW_TOKENS,
              decode_ahead="off")

    async def scenario():
        async with edge(replicas.server, tiny_draft, ignore_eos=True, reconnect_s=STEP_S, wait_ready_s=STEP_S) as client:
            got, stats, killed, recovered_s = await killed_mid_generation(client, replicas, prompt, **kw)
            assert replicas.procs[killed].poll() is not None  # finished while the killed replica was still dead
            replicas.start(killed)  # for the next case; starts while the reference runs on the survivor
            reference = await asyncio.wait_for(client.generate(prompt, **kw).collect(), STEP_S)
            return got, stats, killed, recovered_s, reference

    got, stats, killed, recovered_s, reference = run(scenario())
    assert stats.reconnects == 1 and recovered_s is not None, stats.to_dict()
    print(f"{mode}/{verify} T={temperature}: replica {killed} killed -> first token from the other "
          f"{recovered_s:.2f} s; time lost {stats.reconnect_s:.2f} s")
    survivor = 1 - killed
    resumed = [n for n in replicas.sessions(survivor) if n >= len(prompt) + TOKENS_BEFORE_KILL]
    assert resumed, f"no resumed piece on the surviving replica: {replicas.sessions(survivor)}"
    assert len(reference) == NEW_TOKENS and got == reference
    assert stats.to_dict()["finish_reason"] == "length"
