"""The cloud's Prometheus metrics (`--metrics-port`), in one place: the sessions call a `SessionMeter`, nothing else.

Terms: a *pass* is one verification of a run of drafts on the model worker that produced a verdict (passes whose
chain the edge abandoned meanwhile send no verdict and are not counted, so the cloud's passes are the edge's
`rounds`); its *queue time* runs from the admission of the run's first batch to the pass's start on the model
(waiting behind other sessions' work on the one model thread included); a draft's *position* is its depth in the
pass, 1 = the first draft after the committed prefix. `mode` is the session's verification mode, or `cloud` for
a CloudGenerate session (the target alone).

Metrics live in a registry of the service's own, never prometheus_client's global one: several services in one
process (the tests) keep their counts apart. With metrics off (`--metrics-port 0`, the default) every meter is
the base `SessionMeter`, whose methods do nothing: no registry, no label look-ups, no message sizes computed.
The names and their meaning are tabled in docs/design.md §14.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Iterator

from picospec.shared.protocol import FinishReason, SessionState

if TYPE_CHECKING:
    from picospec.cloud_server.engine.batcher import PassRecord

log = logging.getLogger("picospec.cloud")

PREFIX = "picospec_cloud_"
DRAFT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REFUSAL_REASONS = ("limit", "per-client", "draining", "unauthenticated")
SHUTDOWN = "shutdown"  # finish reason of a session the cloud ended because it was shutting down


def finish_label(finished: FinishReason | None, error: BaseException | None) -> str:
    """How a session ended, as the `reason` label: its own finish reason (eos, length) when it got that far,
    else `shutdown` (the cloud ended it: a Refusal whose reason says so), `cancelled` (the edge hung up or
    cancelled), or `error` (a refusal or failure mid-session)."""
    if finished is not None:
        return finished.value
    if getattr(error, "reason", "") == SHUTDOWN:
        return SHUTDOWN
    if error is None or isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return FinishReason.CANCELLED.value
    return "error"


class SessionMeter:
    """What one session reports. This base class is the disabled meter: every method is a no-op."""

    def committed(self, generated: int) -> None:
        """The session has now committed `generated` tokens in all (reported as they grow)."""

    def on_pass(self, drafts: int, accepted: int, committed: int, pass_s: float, queue_s: float) -> None:
        """One verification pass that produced a verdict."""

    def on_decode_ahead(self) -> None:
        """One decode-ahead step whose token was committed."""

    def on_compute(self, seconds: float) -> None:
        """Model time spent on a decode step (decode-ahead, committed or not, or the cloud alone's); passes count
        theirs in on_pass."""

    def on_capped(self, drafts: int) -> None:
        """The session's verification budget kept `drafts` waiting drafts out of a step (cloud_server/capacity.py)."""

    def received(self, message: Any) -> None:
        """A message from the edge (its serialized size is counted)."""

    def sent(self, message: Any) -> None:
        """A message to the edge."""


class PrometheusSessionMeter(SessionMeter):
    def __init__(self, metrics: "CloudMetrics", mode: str) -> None:
        self.m, self.mode = metrics, mode
        self.reported = 0  # tokens already counted in tokens_emitted

    def committed(self, generated: int) -> None:
        if generated > self.reported:
            self.m.tokens_emitted.labels(self.mode).inc(generated - self.reported)
            self.reported = generated

    def on_pass(self, drafts: int, accepted: int, committed: int, pass_s: float, queue_s: float) -> None:
        m, mode = self.m, self.mode
        m.passes.labels(mode).inc()
        m.batch_drafts.labels(mode).observe(drafts)
        m.pass_committed.labels(mode).observe(committed)
        m.pass_seconds.labels(mode).observe(pass_s)
        m.compute_seconds.labels(mode).inc(pass_s)
        m.queue_seconds.labels(mode).observe(max(0.0, queue_s))
        for depth in range(1, drafts + 1):
            m.verified.labels(mode, str(depth)).inc()
        for depth in range(1, accepted + 1):
            m.accepted.labels(mode, str(depth)).inc()

    def on_decode_ahead(self) -> None:
        self.m.decode_ahead.labels(self.mode).inc()

    def on_compute(self, seconds: float) -> None:
        self.m.compute_seconds.labels(self.mode).inc(seconds)

    def on_capped(self, drafts: int) -> None:
        self.m.capped_steps.labels(self.mode).inc()
        self.m.capped_drafts.labels(self.mode).inc(drafts)

    def received(self, message: Any) -> None:
        self.m.bytes_received.labels(self.mode).inc(message.ByteSize())
        if "kind" in message.DESCRIPTOR.oneofs_by_name and message.WhichOneof("kind") == "draft":
            self.m.drafts_received.labels(self.mode).inc(len(message.draft.token_ids))

    def sent(self, message: Any) -> None:
        self.m.bytes_sent.labels(self.mode).inc(message.ByteSize())


class CloudMetrics:
    """The service's metrics and their HTTP endpoint. `CloudMetrics(enabled=False)` holds nothing and hands out
    no-op meters."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.http: Any = None  # prometheus_client's WSGI server, once `serve` started it
        if enabled:
            self._create()

    def _create(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> Any:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(PREFIX + name, doc, ("mode",), buckets=buckets, registry=r)

        self.active = Gauge(PREFIX + "sessions_active", "sessions holding a slot now", registry=r)
        self.refused = counter("sessions_refused", "sessions refused before they started, by reason: limit "
                               "(--max-sessions), per-client, draining; unauthenticated counts any call", "reason")
        self.started = counter("sessions_started", "sessions started (slot taken), by mode", "mode")
        self.finished = counter("sessions_finished", "sessions ended, by mode and reason (eos, length, cancelled, "
                                "shutdown, error)", "mode", "reason")
        self.passes = counter("passes", "verification passes that produced a verdict", "mode")
        self.batch_drafts = histogram("pass_drafts", "drafts verified per pass", DRAFT_BUCKETS)
        self.pass_committed = histogram("pass_committed_tokens", "tokens committed per pass", DRAFT_BUCKETS + (33,))
        self.pass_seconds = histogram("pass_seconds", "model time of a pass", SECONDS_BUCKETS)
        self.queue_seconds = histogram("queue_seconds", "from a batch's admission to its pass's start", SECONDS_BUCKETS)
        self.decode_ahead = counter("decode_ahead_steps", "decode-ahead tokens committed", "mode")
        self.drafts_received = counter("drafts_received", "draft tokens received", "mode")
        self.verified = counter("draft_tokens_verified", "drafts verified, by depth in the pass", "mode", "position")
        self.accepted = counter("draft_tokens_accepted", "drafts accepted, by depth in the pass", "mode", "position")
        self.tokens_emitted = counter("tokens_emitted", "tokens committed (generated), by mode", "mode")
        self.compute_seconds = counter("compute_seconds", "model time in verification passes and decode steps "
                                       "(prefill apart), by mode: over tokens_emitted, the cloud's compute per "
                                       "generated token, what an operator pays", "mode")
        self.capped_steps = counter("verify_capped_steps", "steps where a session's verification budget "
                                    "(--verify-budget) verified fewer drafts than waited, down to none (the cloud "
                                    "then decoded the token itself)", "mode")
        self.capped_drafts = counter("verify_capped_drafts", "drafts those steps kept out of verification", "mode")
        self.bytes_received = counter("bytes_received", "serialized bytes of messages from edges", "mode")
        self.bytes_sent = counter("bytes_sent", "serialized bytes of messages to edges", "mode")
        # batching (--batching on): one observation per model pass of the static engine, all sessions together
        self.batch_rows = Histogram(PREFIX + "batch_rows", "sessions' rows in one model pass", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram(PREFIX + "batch_tokens", "tokens in one model pass (padding excluded)",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.batch_wait = Histogram(PREFIX + "batch_wait_seconds", "the longest wait of a pass's rows for the engine",
                                    buckets=SECONDS_BUCKETS, registry=r)
        self.batch_pass = Histogram(PREFIX + "batch_pass_seconds", "wall time of one model pass", buckets=SECONDS_BUCKETS,
                                    registry=r)
        self.batch_pass_cpu = Histogram(PREFIX + "batch_pass_cpu_seconds", "the engine thread's CPU time in one model "
                                        "pass", buckets=SECONDS_BUCKETS, registry=r)

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics on host:port (prometheus_client's own HTTP server, a daemon thread)."""
        if not self.enabled or not port:
            return
        from prometheus_client import start_http_server

        self.http, _ = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics: http://%s:%d/metrics", host if ":" not in host else f"[{host}]", port)

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None

    def on_engine_pass(self, p: PassRecord) -> None:
        """The batcher's observer (cloud_server/engine/batcher.py), called on its thread (prometheus_client is thread-safe)."""
        if self.enabled:
            self.batch_rows.observe(p.rows)
            self.batch_tokens.observe(p.tokens)
            self.batch_wait.observe(p.oldest_wait_s)
            self.batch_pass.observe(p.pass_s)
            self.batch_pass_cpu.observe(p.cpu_s)

    def on_refused(self, reason: str) -> None:
        if self.enabled:
            self.refused.labels(reason).inc()

    @contextlib.contextmanager
    def session(self, mode: str, state: SessionState) -> Iterator[SessionMeter]:
        """A session's meter, from its start (a slot held) to its end: counts it started, active and finished
        (the reason from its state and what ended it, `finish_label`), and its last tokens."""
        if not self.enabled:
            yield SessionMeter()
            return
        meter = PrometheusSessionMeter(self, mode)
        self.started.labels(mode).inc()
        self.active.inc()
        error: BaseException | None = None
        try:
            yield meter
        except BaseException as e:
            error = e
            raise
        finally:
            self.active.dec()
            meter.committed(len(state.generated))
            self.finished.labels(mode, finish_label(state.finished, error)).inc()
