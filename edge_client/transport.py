"""The edge's side of one Speculate stream: a reader task that pumps the cloud's messages into an inbox as they
arrive (so drafting never waits on the network), writes, test hooks around both, and byte counts.

Protobuf goes in and out here; the session driver sees the cloud's messages by kind and never touches the call.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Protocol, Sequence

import grpc

from picospec.edge_client.stats import GenerationStats
from picospec.edge_client.waiting import ATTEMPT_TIMEOUT_S, WaitProgress, retry_delay_s
from picospec.shared.config import EdgeConfig
from picospec.shared.connection import (ConnectionSettingsError, channel_credentials, edge_keepalive_options,
                                        is_loopback, retry_hint_s, ServerTarget, server_target)
from picospec.shared.protocol import ProtocolError
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.rpc import picospec_pb2_grpc as pb_grpc

GRPC_FRAME_OVERHEAD = 5  # gRPC's length-prefixed message header; HTTP/2 and TCP/IP headers are not counted
log = logging.getLogger("picospec.edge")
_warned_cleartext: set[str] = set()  # servers already warned about, once per process


class EdgeHooks(Protocol):
    """Test hooks around the wire (e.g. to delay messages and reorder their timing against drafting).

    Optional: `steer_draft_len(chosen, awaiting_resolution) -> int` replaces the online draft-length choice, so a
    test can force the decisions that lead to a rare interleaving (e.g. length 0 while a correction is owed)."""

    async def before_send(self, msg: pb.EdgeMessage) -> None: ...
    async def after_receive(self, msg: pb.CloudMessage) -> None: ...


class EdgeError(RuntimeError):
    """A generation failed: the cloud refused it, vanished, or broke the protocol. `status`: the gRPC status name
    the cloud ended the call with (e.g. "RESOURCE_EXHAUSTED"), "" when the failure was not a call's status."""

    def __init__(self, message: str, status: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s  # the cloud's hint with a RESOURCE_EXHAUSTED refusal


class CloudLost(EdgeError):
    """The connection to the cloud broke during a generation (its process died, the network went away). The
    tokens already yielded stand: each was committed by both sides before it was yielded."""


class CloudUnreachable(EdgeError):
    """The cloud did not answer within the wait's budget (wait_for_cloud gave up); `progress` says how it went."""

    def __init__(self, message: str, progress: WaitProgress) -> None:
        super().__init__(message)
        self.progress = progress


def went_silent(e: grpc.aio.AioRpcError) -> bool:
    """Whether gRPC dropped the connection because the peer stopped answering keepalive pings."""
    details = (e.details() or "").lower()
    return e.code() is grpc.StatusCode.UNAVAILABLE and ("keepalive" in details or "ping timeout" in details)


CORE_INTERNAL = "Internal error from Core"


def masked_break(e: grpc.aio.AioRpcError) -> bool:
    """gRPC asyncio's own INTERNAL status for a write that failed because the stream had just ended: it replaces the
    real status (grpc/grpc#36066), e.g. UNAVAILABLE when the cloud's process died while the edge was sending. No
    cloud sends it; it is taken as the break it almost always hides."""
    return e.code() is grpc.StatusCode.INTERNAL and (e.details() or "") == CORE_INTERNAL


def call_error(server: str, e: grpc.aio.AioRpcError, peer_timeout_s: float | None = None) -> EdgeError:
    """What a failed call means to the user, naming the cloud: UNAVAILABLE on an open call is a connection that
    broke (gRPC's code for a closed or reset socket; a cloud that went silent is said so), anything else is the
    status the cloud ended the call with."""
    if peer_timeout_s is not None and went_silent(e):
        return CloudLost(f"no answer from the cloud at {server} for {peer_timeout_s:g} s: it stopped answering "
                         "keepalive pings (frozen, overloaded or cut off; --peer-timeout-s)", e.code().name)
    if e.code() is grpc.StatusCode.UNAVAILABLE or masked_break(e):
        return CloudLost(f"lost the connection to the cloud at {server} during the generation: "
                         f"{e.code().name}: {e.details()}", e.code().name)
    return EdgeError(f"cloud at {server} refused or failed the generation: {e.code().name}: {e.details()}",
                     e.code().name, retry_hint_s(e.trailing_metadata()))


def open_channel(config: EdgeConfig, target: ServerTarget | None = None) -> grpc.aio.Channel:
    """The edge's channel to the cloud at config.server: TLS when asked for (shared/connection.py), keepalive pings
    that notice a silent cloud within --peer-timeout-s. Several replicas (a comma-separated list, a dns:/// name)
    are balanced with gRPC's round_robin: each call goes to the next replica that is up, so each generation's
    stream, and each resumed piece of it, to one replica; a dead one is left out until it answers again.

    Receive: the cloud's messages are small (verdicts, residuals), 64 MiB bounds a hostile one. Send: gRPC's
    default, unlimited: what the cloud accepts is its own limit, which admits every batch its max_draft_len allows
    (cloud_server/grpc_setup.py:message_limit); a local cap would only add a failure. Reconnect backoff capped at 2 s
    (gRPC's default grows to 120 s): a cloud that comes up is seen at once. `target`: config.server already
    parsed (and its names resolved), where the caller has it."""
    target = target or server_target(config.server)
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000),
        *edge_keepalive_options(config.peer_timeout_s)]
    if target.balanced:
        # subchannels of this channel's own: not shared through gRPC's global pool with other channels to the same
        # replicas, whose reconnect backoff (a replica seen dead a moment ago) would hold this one's back
        options += [("grpc.lb_policy_name", "round_robin"), ("grpc.use_local_subchannel_pool", 1)]
    credentials = channel_credentials(config.tls, config.tls_ca, config.tls_cert, config.tls_key)
    if credentials is None:
        if config.tls_server_name:
            raise ConnectionSettingsError("--tls-server-name needs TLS (--tls or --tls-ca)")
        if config.token and not all(map(is_loopback, target.hosts)) and config.server not in _warned_cleartext:
            _warned_cleartext.add(config.server)
            log.warning("sending the access token to %s without TLS, readable on the way: pass --tls-ca (deploy/tls.md)",
                        config.server)
        return grpc.aio.insecure_channel(target.target, options=options)
    options += tls_name_options(config.tls_server_name, target.authority, target.hosts)
    return grpc.aio.secure_channel(target.target, credentials, options=options)


def tls_name_options(tls_server_name: str, authority: str, hosts: tuple[str, ...]) -> list[tuple[str, str]]:
    """The name TLS verifies: --tls-server-name, else for an address list the host its entries share (gRPC's
    default would be the whole list). One name is verified for every replica, so a list of different hosts needs
    --tls-server-name, a name each replica's certificate holds."""
    if tls_server_name:
        return [("grpc.ssl_target_name_override", tls_server_name)]
    if authority:
        return [("grpc.default_authority", authority)]
    if len(set(hosts)) > 1:
        raise ConnectionSettingsError(f"--server lists several hosts ({', '.join(dict.fromkeys(hosts))}) and TLS "
                                      "verifies one name for all of them: pass --tls-server-name NAME, a name every "
                                      "replica's certificate holds (deploy/tls.md)")
    return []


# what a failed TLS handshake looks like in gRPC's details (the status is UNAVAILABLE, as for a cloud not up)
TLS_FAILURE_MARKERS = ("ssl", "tls", "handshake", "certificate", "verification")
# a TLS cloud that refuses this edge's handshake (no client certificate, or plaintext) just closes the socket;
# a cloud restarting can do that once or twice, not three times in a row
HANGUPS_BEFORE_TLS_HINT = 3


def connect_refusal(server: str, e: grpc.aio.AioRpcError) -> EdgeError | None:
    """An Info failure that retrying cannot fix, as the error to stop with: the cloud answered with a status of its
    own (UNAUTHENTICATED: no or a wrong token), or it is up but the TLS handshake failed (a wrong CA, a missing
    client certificate, a name the certificate does not hold). None: not up yet, keep trying."""
    details = e.details() or ""
    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return EdgeError(f"cloud at {server} refused this edge: {e.code().name}: {details}", e.code().name)
    if any(marker in details.lower() for marker in TLS_FAILURE_MARKERS):
        return EdgeError(f"TLS handshake with the cloud at {server} failed: {details} (check --tls-ca, --tls-cert/"
                         "--tls-key and --tls-server-name against the cloud's certificates; deploy/tls.md)",
                         e.code().name)
    return None


async def wait_for_cloud(stub: pb_grpc.PicoSpecStub, server: str, budget_s: float,
                         on_retry: Callable[[WaitProgress], None] | None = None,
                         metadata: Sequence[tuple[str, str]] = ()) -> pb.InfoReply:
    """The cloud's Info, retrying for up to budget_s. Each attempt fails fast while nothing listens, so `on_retry`
    hears about every failed one at once; the final error names the server, the attempts and the last error. A
    refusal (connect_refusal) ends the wait at once."""
    started, attempts, closed_in_a_row = time.monotonic(), 0, 0
    while True:
        attempts += 1
        left = budget_s - (time.monotonic() - started)
        try:
            return await stub.Info(pb.InfoRequest(), timeout=max(0.05, min(left, ATTEMPT_TIMEOUT_S)),
                                   metadata=tuple(metadata))
        except grpc.aio.AioRpcError as e:
            refusal = connect_refusal(server, e)
            if refusal is not None:
                raise refusal from None
            last_error = e.details() or e.code().name
            closed_in_a_row = closed_in_a_row + 1 if "socket closed" in last_error.lower() else 0
            if closed_in_a_row >= HANGUPS_BEFORE_TLS_HINT:
                raise EdgeError(f"the cloud at {server} accepts connections and closes them at once "
                                f"({closed_in_a_row} times): it probably requires TLS (--tls-ca) or a client "
                                "certificate (--tls-cert/--tls-key) that this edge did not present, or one it does "
                                f"not trust (deploy/tls.md); last error: {last_error}", e.code().name) from None
        progress = WaitProgress(server, attempts, time.monotonic() - started, last_error)
        if progress.elapsed_s >= budget_s:
            raise CloudUnreachable(progress.give_up_message(), progress)
        if on_retry is not None:
            on_retry(progress)
        await asyncio.sleep(min(retry_delay_s(attempts), budget_s - progress.elapsed_s))


def wire_size(msg) -> int:
    return msg.ByteSize() + GRPC_FRAME_OVERHEAD


class StreamTransport:
    """One bidirectional call: `send` a message, `next` message of the kinds expected, `close` at the end."""

    def __init__(self, call, stats: GenerationStats, hooks: "EdgeHooks | None", server: str,
                 peer_timeout_s: float | None = None) -> None:
        self.call, self.stats, self.hooks = call, stats, hooks
        self.server = server  # named in every error, so a user with several clouds knows which one failed
        self.peer_timeout_s = peer_timeout_s
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.closing: asyncio.Future | None = None  # the half-close's write (half_close), held so it is not collected
        self.pump = asyncio.create_task(self._pump())

    def has_news(self) -> bool:
        return not self.inbox.empty()

    async def send(self, msg: pb.EdgeMessage) -> None:
        if self.hooks is not None:
            await self.hooks.before_send(msg)
        try:
            await self.call.write(msg)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # the cloud ended the stream (it finished on its own, or failed): what it said last is in the
            # inbox, the final verdict or the error status, and the reader reports it
            return
        self.stats.bytes_up += wire_size(msg)

    async def next(self, *expected: str) -> pb.CloudMessage:
        """The next message of one of the expected kinds. Hints are advice: dropped where none is expected."""
        while True:
            msg = await self.inbox.get()
            if isinstance(msg, BaseException):
                raise msg
            kind = msg.WhichOneof("kind")
            if kind == "hint" and "hint" not in expected:
                continue
            if kind not in expected:
                raise ProtocolError(f"expected {' or '.join(expected)}, got {kind}")
            return msg

    def half_close(self) -> None:
        """The edge sends nothing more. Not awaited: the generation ends at its last token (the write of the
        half-close goes on in the background; the cloud may have ended the call already, which is no error)."""
        self.closing = asyncio.ensure_future(self._done_writing())

    async def _done_writing(self) -> None:
        """The half-close's write, which nobody awaits: every failure ends here, none is left to the loop's "Task
        exception was never retrieved" (8 in 60 requests of `serve`, mostly after clients disconnected: the call
        was cancelled under the write, and gRPC's core raised its own InternalError/ExecuteBatchError)."""
        try:
            await self.call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.BaseError, asyncio.InvalidStateError) as e:
            log.debug("half-close to %s after the call ended: %s: %s", self.server, type(e).__name__, e)
        except Exception as e:  # noqa: BLE001 - a half-close the call no longer needs; never an unretrieved error
            log.debug("half-close to %s failed: %s: %s", self.server, type(e).__name__, e)

    def close(self, *, cancel: bool) -> None:
        self.pump.cancel()
        if cancel:
            self.call.cancel()

    async def _pump(self) -> None:
        try:
            while True:
                msg = await self.call.read()
                if msg is grpc.aio.EOF:
                    self.inbox.put_nowait(EdgeError(f"cloud at {self.server} closed the stream mid-generation"))
                    return
                self.stats.bytes_down += wire_size(msg)
                if self.hooks is not None:
                    await self.hooks.after_receive(msg)
                self.inbox.put_nowait(msg)
        except grpc.aio.AioRpcError as e:
            self.inbox.put_nowait(call_error(self.server, e, self.peer_timeout_s))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - surfaced to the generation
            self.inbox.put_nowait(e)
