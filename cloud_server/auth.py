"""Who may call the cloud: access tokens (`--auth-tokens FILE`), checked on every call before any handler runs.

The file has one `client-name token` a line; `#` starts a comment line. `parse_tokens` is pure and refuses what
would be ambiguous (a repeated name or token, a line that is not two fields) naming the line, never echoing a
token. `TokenAuth` holds the table in force and reloads it (the CLI calls `reload` on SIGHUP; a bad file keeps
the old table). `AuthInterceptor` answers a call without a known token with UNAUTHENTICATED before the service
sees it. Handlers learn the caller's name from `client_identity` (the per-client session limit counts by it): it
looks the token up again in the call's metadata rather than passing state from the interceptor, which works the
same for unary and streaming handlers and needs no context variable.

Tokens are secrets: no message, log line or repr here contains one.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import grpc

from picospec.shared.connection import METADATA_KEY, is_loopback

log = logging.getLogger("picospec.cloud")

MIN_TOKEN_CHARS = 16
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MISSING_TOKEN = "missing token: pass --token / PICOSPEC_TOKEN"
# Services callable without a token: load balancers, kubelets and compose probe health without credentials, and
# reflection describes only the API's shape. TLS, and client certificates with --tls-ca, still apply to them.
TOKEN_EXEMPT_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                                   "grpc.reflection.v1.ServerReflection"})
UNKNOWN_TOKEN = "unknown token"


class TokenFileError(ValueError):
    """A tokens file that cannot be used; the message names the file's line, never a token."""


@dataclass(frozen=True)
class TokenTable:
    """client name by token digest: sha256 makes every comparison the same length, compare_digest constant-time."""
    _by_digest: dict[bytes, str] = field(default_factory=dict, repr=False)

    @property
    def clients(self) -> list[str]:
        return sorted(self._by_digest.values())

    def lookup(self, token: str) -> str | None:
        """The client the token belongs to, or None. Every entry is compared, so the time does not say which
        (or whether one) matched."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, name in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                found = name
        return found


def parse_tokens(text: str, source: str = "tokens file") -> TokenTable:
    """`client-name token` lines into a table; blank lines and lines starting with # are skipped."""
    by_digest: dict[bytes, str] = {}
    line_of_name: dict[str, int] = {}
    line_of_digest: dict[bytes, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        where = f"{source} line {number}"
        if len(fields) != 2:
            raise TokenFileError(f"{where}: expected 'client-name token', found {len(fields)} fields")
        name, token = fields
        if not NAME_RE.fullmatch(name):
            raise TokenFileError(f"{where}: client name {name!r} is not 1-64 letters, digits or ._@- (first a letter "
                                 "or digit)")
        if len(token) < MIN_TOKEN_CHARS:
            raise TokenFileError(f"{where}: the token of {name!r} is shorter than {MIN_TOKEN_CHARS} characters "
                                 "(make one with `openssl rand -hex 32`)")
        if name in line_of_name:
            raise TokenFileError(f"{where}: client {name!r} already has a token on line {line_of_name[name]}")
        digest = hashlib.sha256(token.encode()).digest()
        if digest in line_of_digest:
            raise TokenFileError(f"{where}: the token of {name!r} is the same as line {line_of_digest[digest]}'s "
                                 "(each client needs its own)")
        by_digest[digest] = name
        line_of_name[name], line_of_digest[digest] = number, number
    return TokenTable(by_digest)


def permission_warning(mode: int, path: str) -> str | None:
    """A warning for a tokens file that others than its owner may read or write."""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"tokens file {path} is accessible to others than its owner (mode {stat.S_IMODE(mode):04o}): "
                f"chmod 600 {path}")
    return None


def load_tokens(path: str) -> TokenTable:
    """The table in a tokens file, warning about loose permissions and about a file without tokens."""
    try:
        with open(path, encoding="utf-8") as f:
            warning = permission_warning(os.fstat(f.fileno()).st_mode, path)
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenFileError(f"--auth-tokens {path}: {getattr(e, 'strerror', None) or e}") from None
    if warning:
        log.warning("%s", warning)
    table = parse_tokens(text, path)
    if not table.clients:
        log.warning("tokens file %s holds no tokens: every call is refused", path)
    return table


class TokenAuth:
    """The token table in force, from one file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.table = load_tokens(path)

    def reload(self) -> bool:
        """Read the file again; on any error keep the table in force and say why."""
        try:
            table = load_tokens(self.path)
        except TokenFileError as e:
            log.error("tokens not reloaded, the previous %d stay in force: %s", len(self.table.clients), e)
            return False
        self.table = table
        log.info("tokens reloaded from %s: %d clients (%s)", self.path, len(table.clients), ", ".join(table.clients))
        return True

    def check(self, metadata: Sequence[tuple[str, Any]] | None) -> tuple[str | None, str]:
        """(client name, "") for a known token in the call's metadata, else (None, why it is refused)."""
        token = bearer_token(metadata)
        if token is None:
            return None, MISSING_TOKEN
        name = self.table.lookup(token)
        return (name, "") if name is not None else (None, UNKNOWN_TOKEN)


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, or None."""
    for key, value in metadata or ():
        if key.lower() != METADATA_KEY:
            continue
        value = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def client_identity(context: grpc.aio.ServicerContext, auth: TokenAuth | None) -> str:
    """Whom a call counts against for --max-sessions-per-client: the token's client name, else the common name of
    the client's TLS certificate, else its IP address."""
    if auth is not None:
        name, _ = auth.check(context.invocation_metadata())
        if name is not None:
            return name
    common_name = (context.auth_context() or {}).get("x509_common_name")
    if common_name:
        return "cn=" + common_name[0].decode(errors="replace")
    return peer_host(context.peer() or "unknown")  # "ipv4:127.0.0.1:5678", "ipv6:[::1]:5678"


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def peer_host(peer: str) -> str:
    """The address part of gRPC's peer string ("ipv4:10.0.0.7:53122" -> "10.0.0.7", "ipv6:[::1]:5" -> "[::1]"):
    one caller reconnecting from new ports is still one caller."""
    return peer.split(":", 1)[-1].rsplit(":", 1)[0]


@dataclass
class _Burst:
    started: float
    more: int = 0  # refusals since `started` not logged one by one


class RefusalLog:
    """Which refusals to log, so a caller hammering the cloud with bad tokens cannot flood its log: per (caller's
    address, reason), the first refusal is logged in full; the next ones within `interval_s` are only counted, and
    said in one line ("N more refusals from X in the last T s") at the first refusal from there after the interval,
    or at `flush` (the interceptor calls it on every refusal, so a burst that stopped is still reported once
    another caller is refused). A caller quiet for a whole interval is forgotten: its next refusal is logged in
    full. At most `max_callers` are tracked; beyond that, new ones share one entry named "other callers".

    Pure: the clock is injected, and lines are returned for the caller to log. The reason is one of the fixed
    refusal texts (MISSING_TOKEN, UNKNOWN_TOKEN), never a token."""

    OTHERS = "other callers"

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_callers: int = 1024) -> None:
        self.interval_s, self.clock, self.max_callers = interval_s, clock, max_callers
        self._bursts: dict[tuple[str, str], _Burst] = {}

    def refused(self, method: str, peer: str, why: str) -> list[str]:
        """Lines to log for one refused call (none while its caller's burst is being counted)."""
        now = self.clock()
        lines = self.flush(now)
        key = (peer_host(peer), why)
        if key not in self._bursts and len(self._bursts) >= self.max_callers:
            key = (self.OTHERS, why)
        burst = self._bursts.get(key)
        if burst is not None:
            burst.more += 1
            return lines
        self._bursts[key] = _Burst(now)
        return lines + [f"refused {method} from {peer}: UNAUTHENTICATED: {why}"]

    def flush(self, now: float | None = None) -> list[str]:
        """Summaries of the bursts whose interval is over; a burst with nothing to say is forgotten, one with
        refusals counted starts a new interval (so a steady flood is one line per interval)."""
        now = self.clock() if now is None else now
        lines = []
        for (host, why), burst in list(self._bursts.items()):
            if now - burst.started < self.interval_s:
                continue
            if burst.more:
                lines.append(f"{burst.more} more refusals from {host} (UNAUTHENTICATED: {why}) in the last "
                             f"{now - burst.started:.0f} s")
                self._bursts[(host, why)] = _Burst(now)
            else:
                del self._bursts[(host, why)]
        return lines


def exempt_from_tokens(method: str) -> bool:
    """Whether a call to `method` ("/package.Service/Method") needs no token: health and reflection only."""
    return method.lstrip("/").split("/", 1)[0] in TOKEN_EXEMPT_SERVICES


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every call carries a known token, or ends UNAUTHENTICATED before its handler runs (Info included), except
    health and reflection (`exempt_from_tokens`). Refusals are logged through a RefusalLog (a hostile caller
    cannot flood the log) and reported to `on_refused` (the metrics)."""

    def __init__(self, auth: TokenAuth, refusals: RefusalLog | None = None,
                 on_refused: Callable[[], None] | None = None) -> None:
        self.auth = auth
        self.refusals = refusals if refusals is not None else RefusalLog()
        self.on_refused = on_refused

    async def intercept_service(self, continuation: Continuation,
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None  # an unknown method: gRPC's own UNIMPLEMENTED
        if exempt_from_tokens(details.method):
            return handler
        name, why = self.auth.check(details.invocation_metadata)
        if name is not None:
            return handler
        if self.on_refused is not None:
            self.on_refused()
        return refusing_handler(handler, details.method, why, self.refusals)


def refusing_handler(handler: grpc.RpcMethodHandler, method: str, why: str,
                     refusals: RefusalLog) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED without reading a request
    message it does not have to (no parsing of an unauthenticated caller's input: no deserializer)."""

    async def refuse(_request: object, context: grpc.aio.ServicerContext) -> None:
        for line in refusals.refused(method, context.peer() or "unknown", why):
            log.warning("%s", line)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[(bool(handler.request_streaming), bool(handler.response_streaming))](refuse)


def exposure_warning(host: str, tls: bool, tokens: bool, client_certs: bool) -> str | None:
    """What the cloud should warn about at start-up: listening beyond loopback without TLS, or without a way to
    tell callers apart (tokens or client certificates). Loopback stays quiet."""
    if is_loopback(host):
        return None
    if not tls and not tokens:
        return (f"listening on {host or '*'} without TLS or tokens: anyone who reaches this port can use the model "
                "and read the traffic; pass --tls-cert/--tls-key and --auth-tokens (deploy/tls.md), or --host 127.0.0.1")
    if not tls:
        return (f"listening on {host} without TLS: tokens and prompts cross the network in cleartext; pass "
                "--tls-cert/--tls-key (deploy/tls.md)")
    if not tokens and not client_certs:
        return (f"listening on {host} with TLS but no client authentication: anyone who reaches this port can use "
                "the model; pass --auth-tokens or --tls-ca (deploy/tls.md)")
    return None
