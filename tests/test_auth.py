"""TLS, mutual TLS and access tokens in process (cloud_server/auth.py, shared/connection.py), with certificates made
at test time by scripts/make_certs.sh (openssl): the tokens file's rules, a refusal for no, a wrong and a revoked
token before any handler runs, tokens never in the logs, the per-client session limit, TLS, mutual TLS, a wrong
CA, a missing client certificate, and the start-up warning for a cloud exposed without protection."""
from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from picospec.cloud_server.auth import (MISSING_TOKEN, UNKNOWN_TOKEN, RefusalLog, TokenFileError, bearer_token,
                                        exposure_warning, parse_tokens, peer_host, permission_warning)
from picospec.edge_client.transport import EdgeError
from picospec.shared.connection import (ConnectionSettingsError, is_loopback, ping_schedule_ms, server_tls_files,
                                        split_host, token_metadata)
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.rpc import picospec_pb2_grpc as pb_grpc
from tests.conftest import edge, run, serving

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB = "a" * 20 + "-alice-token", "b" * 20 + "-bob-token"
STEP_S = 30.0


def make_certs(directory: Path, *sans: str) -> Path:
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(directory), *sans], check=True,
                   capture_output=True, text=True, timeout=60)
    return directory


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """Two unrelated CAs with their certificates, one server certificate for the name `cloud` only, and a tokens
    file of alice and bob."""
    base = tmp_path_factory.mktemp("pki")
    tokens = base / "tokens"
    tokens.write_text(f"# test clients\nalice {ALICE}\n\n  bob   {BOB}  \n")
    tokens.chmod(0o600)
    return {"a": make_certs(base / "a"), "b": make_certs(base / "b"), "named": make_certs(base / "named", "DNS:cloud"),
            "tokens": tokens}


def tls_server(d: Path, mutual: bool = False) -> dict[str, str]:
    return {"tls_cert": str(d / "server.pem"), "tls_key": str(d / "server.key"),
            **({"tls_ca": str(d / "ca.pem")} if mutual else {})}


def tls_edge(ca: Path, client: Path | None = None) -> dict[str, str]:
    cfg = {"tls_ca": str(ca / "ca.pem")}
    if client is not None:
        cfg.update(tls_cert=str(client / "client.pem"), tls_key=str(client / "client.key"))
    return cfg


async def generate(addr: str, draft, n: int = 3, **cfg) -> list[int]:
    async with edge(addr, draft, max_new_tokens=n, wait_ready_s=STEP_S, **cfg) as client:
        return await asyncio.wait_for(client.generate([1, 2, 3], mode="sync").collect(), STEP_S)


async def refusal(addr: str, draft, **cfg) -> tuple[EdgeError, float]:
    t0 = time.monotonic()
    with pytest.raises(EdgeError) as info:
        await generate(addr, draft, **cfg)
    return info.value, time.monotonic() - t0


# ---- pure rules --------------------------------------------------------------------------------------------------

def test_tokens_file_rules():
    table = parse_tokens(f"# a comment\n\n   alice\t{ALICE}   \n#bob {BOB}\nbob {BOB}\n")
    assert table.clients == ["alice", "bob"]
    assert table.lookup(ALICE) == "alice" and table.lookup(BOB) == "bob"
    assert table.lookup(ALICE[:-1]) is None and table.lookup("") is None
    assert ALICE not in repr(table)
    bad = {
        f"alice {ALICE}\nalice {BOB}\n": "line 2: client 'alice' already has a token on line 1",
        f"alice {ALICE}\n\nbob {ALICE}\n": "line 3: the token of 'bob' is the same as line 1's",
        f"alice {ALICE} extra\n": "line 1: expected 'client-name token', found 3 fields",
        "alice\n": "line 1: expected 'client-name token', found 1 fields",
        "alice short\n": "line 1: the token of 'alice' is shorter than 16 characters",
        f"-alice {ALICE}\n": "line 1: client name '-alice'",
    }
    for text, message in bad.items():
        with pytest.raises(TokenFileError, match=message) as info:
            parse_tokens(text, "tokens")
        assert ALICE not in str(info.value) and BOB not in str(info.value)


def test_permission_and_exposure_warnings():
    assert permission_warning(stat.S_IFREG | 0o600, "t") is None
    assert "chmod 600 t" in permission_warning(stat.S_IFREG | 0o644, "t")
    assert exposure_warning("127.0.0.1", False, False, False) is None
    assert exposure_warning("localhost", False, False, False) is None and exposure_warning("::1", False, False, False) is None
    assert "without TLS or tokens" in exposure_warning("0.0.0.0", False, False, False)
    assert "without TLS" in exposure_warning("10.0.0.5", False, True, False)
    assert "no client authentication" in exposure_warning("0.0.0.0", True, False, False)
    assert exposure_warning("0.0.0.0", True, True, False) is None and exposure_warning("::", True, False, True) is None
    assert not is_loopback("0.0.0.0") and not is_loopback("cloud") and is_loopback("127.0.0.2")
    assert [split_host(a) for a in ("h:1", "[::1]:5", "1.2.3.4:80")] == ["h", "::1", "1.2.3.4"]


def test_bearer_metadata_and_ping_schedule():
    assert bearer_token(token_metadata(ALICE)) == ALICE and token_metadata("") == ()
    assert bearer_token([("authorization", b"bearer  " + BOB.encode())]) == BOB
    assert bearer_token([("authorization", "Basic xyz")]) is None and bearer_token(None) is None
    assert ping_schedule_ms(5.0) == (2500, 2500) and ping_schedule_ms(2.0) == (1000, 1000)
    with pytest.raises(ConnectionSettingsError, match="at least 2"):
        ping_schedule_ms(1.0)


def test_unusable_tls_settings_name_the_flag(tmp_path, pki):
    with pytest.raises(ConnectionSettingsError, match="both --tls-cert and --tls-key"):
        server_tls_files(str(pki["a"] / "server.pem"), "", "")
    with pytest.raises(ConnectionSettingsError, match="--tls-key .*missing.key"):
        server_tls_files(str(pki["a"] / "server.pem"), str(tmp_path / "missing.key"), "")
    (tmp_path / "x.pem").write_text("not a certificate")
    with pytest.raises(ConnectionSettingsError, match="--tls-cert .*not a PEM file"):
        server_tls_files(str(tmp_path / "x.pem"), str(pki["a"] / "server.key"), "")


def test_refusal_log_says_a_flood_in_one_line_per_interval():
    now = [0.0]
    refusals = RefusalLog(interval_s=60.0, clock=lambda: now[0], max_callers=2)
    info = "/picospec.v1.PicoSpec/Info"
    assert refusals.refused(info, "ipv4:10.0.0.7:5001", UNKNOWN_TOKEN) == [
        f"refused {info} from ipv4:10.0.0.7:5001: UNAUTHENTICATED: {UNKNOWN_TOKEN}"]
    for port in range(5002, 5102):  # a flood from new connections: counted, not logged
        now[0] += 0.1
        assert refusals.refused(info, f"ipv4:10.0.0.7:{port}", UNKNOWN_TOKEN) == []
    assert len(refusals.refused(info, "ipv4:10.0.0.7:1", MISSING_TOKEN)) == 1  # another reason: its own line
    now[0] = 61.0
    assert refusals.refused(info, "ipv4:10.0.0.7:6000", UNKNOWN_TOKEN) == [
        f"100 more refusals from 10.0.0.7 (UNAUTHENTICATED: {UNKNOWN_TOKEN}) in the last 61 s"]
    now[0] = 130.0  # the flood stopped after one more: said at the next refusal from anyone, then forgotten
    assert refusals.refused(info, "ipv6:[::1]:9", UNKNOWN_TOKEN) == [
        f"1 more refusals from 10.0.0.7 (UNAUTHENTICATED: {UNKNOWN_TOKEN}) in the last 69 s",
        f"refused {info} from ipv6:[::1]:9: UNAUTHENTICATED: {UNKNOWN_TOKEN}"]
    assert len(refusals.refused(info, "ipv4:10.0.0.8:1", UNKNOWN_TOKEN)) == 1  # 2 callers tracked: the bound
    assert refusals.refused(info, "ipv4:10.0.0.9:1", UNKNOWN_TOKEN) == []  # counted as "other callers"
    now[0] = 200.0
    assert refusals.flush() == [f"1 more refusals from other callers (UNAUTHENTICATED: {UNKNOWN_TOKEN}) in the last 70 s"]
    now[0] = 300.0
    assert refusals.flush() == [] and len(refusals.refused(info, "ipv4:10.0.0.7:1", UNKNOWN_TOKEN)) == 1
    assert [peer_host(p) for p in ("ipv4:10.0.0.7:53122", "ipv6:[::1]:5", "unknown")] == ["10.0.0.7", "[::1]", "unknown"]


# ---- tokens over the wire ----------------------------------------------------------------------------------------

def test_tokens_none_wrong_revoked_and_right_and_never_logged(tiny_target, tiny_draft, pki, tmp_path, caplog):
    tokens = tmp_path / "tokens"
    tokens.write_text(pki["tokens"].read_text())
    tokens.chmod(0o600)
    wrong = "w" * 32

    async def scenario():
        async with serving(tiny_target, auth_tokens=str(tokens)) as (service, addr):
            none, took = await refusal(addr, tiny_draft)
            assert none.status == "UNAUTHENTICATED" and MISSING_TOKEN in str(none) and took < 5, (none, took)
            bad, _ = await refusal(addr, tiny_draft, token=wrong)
            assert bad.status == "UNAUTHENTICATED" and UNKNOWN_TOKEN in str(bad)
            assert len(await generate(addr, tiny_draft, token=ALICE)) == 3
            # raw calls: Info and a Speculate stream end UNAUTHENTICATED before any handler runs
            async with grpc.aio.insecure_channel(addr) as channel:
                stub = pb_grpc.PicoSpecStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Info(pb.InfoRequest(), timeout=STEP_S)
                assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED and info.value.details() == MISSING_TOKEN
                call = stub.Speculate(timeout=STEP_S, metadata=token_metadata(wrong))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.read()
                assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED and info.value.details() == UNKNOWN_TOKEN
                assert service.active_sessions == 0
            tokens.write_text(f"bob {BOB}\n")  # alice revoked
            assert service.auth.reload()
            revoked, _ = await refusal(addr, tiny_draft, token=ALICE)
            assert revoked.status == "UNAUTHENTICATED" and UNKNOWN_TOKEN in str(revoked)
            tokens.write_text(f"bob {BOB}\ncarol {BOB}\n")  # a bad file keeps the tokens in force
            assert not service.auth.reload()
            assert len(await generate(addr, tiny_draft, token=BOB)) == 3

    with caplog.at_level(logging.DEBUG):
        run(scenario())
    assert "refused /picospec.v1.PicoSpec/Info" in caplog.text and "tokens not reloaded" in caplog.text
    for secret in (ALICE, BOB, wrong):
        assert secret not in caplog.text


def test_sessions_per_client(tiny_target, tiny_draft, pki):
    async def scenario():
        async with serving(tiny_target, auth_tokens=str(pki["tokens"]), max_sessions_per_client=1) as (_, addr), \
                edge(addr, tiny_draft, token=ALICE, wait_ready_s=STEP_S) as alice:
            first = alice.generate([1, 2, 3], mode="sync", max_new_tokens=4000, ignore_eos=True)
            await asyncio.wait_for(first.__anext__(), STEP_S)  # alice's session is open
            with pytest.raises(EdgeError) as info:
                await asyncio.wait_for(alice.generate([1, 2], mode="cloud", max_new_tokens=2, admission_wait_s=0).collect(),
                                       STEP_S)
            assert info.value.status == "RESOURCE_EXHAUSTED"
            assert "client 'alice' is at its limit of 1 concurrent sessions" in str(info.value)
            assert len(await generate(addr, tiny_draft, token=BOB)) == 3  # bob has a slot of his own
            await first.aclose()
            assert len(await generate(addr, tiny_draft, token=ALICE)) == 3  # alice's slot came back

    run(scenario())


# ---- TLS ---------------------------------------------------------------------------------------------------------

def test_tls_mutual_tls_and_wrong_authorities(tiny_target, tiny_draft, pki, caplog):
    a, b = pki["a"], pki["b"]

    async def scenario():
        async with serving(tiny_target, **tls_server(a)) as (_, addr):
            assert len(await generate(addr, tiny_draft, **tls_edge(a))) == 3
            assert len(await generate(addr.replace("127.0.0.1", "localhost"), tiny_draft, **tls_edge(a))) == 3
            wrong_ca, took = await refusal(addr, tiny_draft, **tls_edge(b))
            assert "TLS handshake with the cloud" in str(wrong_ca) and "CERTIFICATE_VERIFY_FAILED" in str(wrong_ca)
            assert took < 5
            plain, took = await refusal(addr, tiny_draft)
            assert "probably requires TLS" in str(plain) and took < 5
        async with serving(tiny_target, **tls_server(a, mutual=True)) as (_, addr):
            assert len(await generate(addr, tiny_draft, **tls_edge(a, client=a))) == 3
            for client in (None, b):  # no client certificate, one from another CA
                refused, took = await refusal(addr, tiny_draft, **tls_edge(a, client=client))
                assert "client certificate" in str(refused) and took < 5, (client, refused)
        named = pki["named"]  # a certificate for `cloud` only, reached at 127.0.0.1
        async with serving(tiny_target, **tls_server(named)) as (_, addr):
            mismatch, _ = await refusal(addr, tiny_draft, **tls_edge(named))
            assert "TLS handshake" in str(mismatch)
            assert len(await generate(addr, tiny_draft, tls_server_name="cloud", **tls_edge(named))) == 3

    with caplog.at_level(logging.WARNING, logger="picospec"):
        run(scenario())
    assert "listening" not in caplog.text  # loopback: no exposure warning


def test_exposed_plaintext_cloud_warns(tiny_target, caplog):
    async def scenario():
        async with serving(tiny_target):  # loopback: quiet
            pass
        from picospec.cloud_server.grpc_setup import start_server
        from picospec.cloud_server.server import PicoSpecService
        from picospec.shared.config import CloudConfig
        service = PicoSpecService(tiny_target, CloudConfig(target=tiny_target.name))
        server, _ = await start_server(service, "0.0.0.0:0")
        await server.stop(grace=None)
        service.worker.shutdown(wait=True)

    with caplog.at_level(logging.WARNING, logger="picospec.cloud"):
        run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "listening on 0.0.0.0 without TLS or tokens" in warnings[0], warnings


def test_world_readable_tokens_file_warns(tiny_target, tmp_path, caplog):
    loose = tmp_path / "tokens"
    loose.write_text(f"alice {ALICE}\n")
    os.chmod(loose, 0o644)
    from picospec.cloud_server.auth import TokenAuth
    with caplog.at_level(logging.WARNING, logger="picospec.cloud"):
        TokenAuth(str(loose))
    assert f"chmod 600 {loose}" in caplog.text and ALICE not in caplog.text


def test_certificates_reload_on_sighup_for_new_connections(tiny_target, tiny_draft, pki, tmp_path, caplog):
    """Mutual TLS from CA a's files; the files replaced by CA b's and reloaded (the SIGHUP handler itself): new
    connections get b's certificate and need b's client certificates; a broken file on reload keeps b's."""
    from picospec.cloud_server.cli import reload_on_sighup
    a, b = pki["a"], pki["b"]
    live = tmp_path / "live"
    live.mkdir()

    def install(d: Path) -> None:
        for name in ("server.pem", "server.key", "ca.pem"):
            (live / name).write_bytes((d / name).read_bytes())

    install(a)

    async def scenario():
        async with serving(tiny_target, **tls_server(live, mutual=True)) as (service, addr):
            assert len(await generate(addr, tiny_draft, **tls_edge(a, client=a))) == 3
            install(b)
            reload_on_sighup(service)
            assert len(await generate(addr, tiny_draft, **tls_edge(b, client=b))) == 3
            old_ca, _ = await refusal(addr, tiny_draft, **tls_edge(a, client=b))
            assert "CERTIFICATE_VERIFY_FAILED" in str(old_ca), old_ca
            old_client, _ = await refusal(addr, tiny_draft, **tls_edge(b, client=a))
            assert "client certificate" in str(old_client), old_client
            (live / "server.key").write_bytes((a / "server.key").read_bytes())  # a key that is not the certificate's
            assert not service.certificates.reload()
            (live / "server.pem").write_text("half-copied")
            assert not service.certificates.reload()
            assert len(await generate(addr, tiny_draft, **tls_edge(b, client=b))) == 3

    with caplog.at_level(logging.INFO, logger="picospec.cloud"):
        run(scenario())
    assert "TLS certificate reloaded" in caplog.text and "TLS certificate not reloaded" in caplog.text
