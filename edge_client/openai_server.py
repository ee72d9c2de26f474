"""picospec-edge serve: an OpenAI-compatible HTTP server on the edge device (FastAPI on uvicorn).

    picospec-edge serve --server H:P --draft NAME [--host 127.0.0.1] [--port 8000] [--api-key KEY] [edge flags]

Terms (the API's own are in edge_client/openai_api.py):
  request      one HTTP call to /v1/chat/completions or /v1/completions; it runs one generation, its own
               speculative session through the cloud, on the one EdgeClient the server shares between requests.
  job          a request's generation with the watch on its client: every step of the generation races the client's
               disconnect, and a job is closed exactly once, whatever happens (its session cancelled if still
               running, so the cloud frees it at once; its statistics counted in the metrics).
  client gone  the HTTP client disconnected before the response was complete (counted with status 499, nginx's
               "client closed request"); its job is closed at once, not when the next token would have been sent.
A streamed request waits for its first text before answering, so a cloud that is down or refuses still gets a proper
HTTP status (503, 429, 400) rather than a 200 stream that fails at once. /health and /metrics share the server.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import secrets
import socket
import sys
import time
from typing import AsyncIterator, Awaitable, TypeVar

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
    from starlette.types import Receive, Scope, Send
    import uvicorn
except ModuleNotFoundError as e:  # an optional extra: say how to get it
    raise ImportError(f"picospec-edge serve needs the 'serve' extra: pip install 'picospec[serve]' ({e})") from e

from picospec.edge_client import openai_api as api
from picospec.edge_client.cli import CloudWaitReporter, draft_and_cloud
from picospec.edge_client.client import EdgeClient, EdgeError, Generation
from picospec.edge_client.stats import GenerationStats
from picospec.edge_client.text import encode_messages, encode_prompt
from picospec.shared.config import EdgeConfig, Range, add_config_args, check_edge_startup, check_ranges, config_from_args
from picospec.shared.connection import ConnectionSettingsError
from picospec.shared.interrupt import OneLineParser, usage_error
from picospec.shared.models import LoadedModel, ModelError
from picospec.shared.rpc import picospec_pb2 as pb

log = logging.getLogger("picospec.serve")
T = TypeVar("T")

# A request that finds the cloud down fails after this long (503) instead of the edge's --wait-ready-s (60 s), which
# is for starting up: an HTTP client should hear at once. The client's config gets it (`request_config`).
REQUEST_WAIT_S = 2.0
HEALTH_WAIT_S = 1.0
GRACEFUL_SHUTDOWN_S = 10.0   # in-flight requests get this long to finish on SIGINT/SIGTERM
CLIENT_GONE = 499
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


API_PARAMS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
              "seed": "seed", "mode": "mode", "verify": "verify"}  # an EdgeConfig field -> the request's field


class ClientGone(Exception):
    """The HTTP client disconnected while its generation ran."""


# ---- metrics -----------------------------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics in a registry of this app's own (two apps in one process do not mix their counts)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("picospec_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("picospec_http_requests_in_flight", "HTTP requests being served", registry=r)
        self.generations = Counter("picospec_generations", "generations by mode and PicoSpec finish reason",
                                   ["mode", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("picospec_prompt_tokens", "prompt tokens of all generations", registry=r)
        self.tokens = Counter("picospec_generated_tokens", "tokens generated (committed by the cloud)", registry=r)
        self.drafted = Counter("picospec_draft_tokens", "draft tokens sent for verification", registry=r)
        self.accepted = Counter("picospec_draft_tokens_accepted", "draft tokens the cloud accepted", registry=r)
        self.bytes = Counter("picospec_cloud_bytes", "bytes to (up) and from (down) the cloud", ["direction"],
                             registry=r)
        self.ttft = Histogram("picospec_time_to_first_token_seconds", "time from a generation's start to its first "
                              "committed token", buckets=TTFT_BUCKETS, registry=r)
        self.disconnects = Counter("picospec_client_disconnects", "requests whose client went away mid-generation "
                                   "(their sessions cancelled)", registry=r)

    def start(self, endpoint: str) -> "RequestRecord":
        self.in_flight.inc()
        return RequestRecord(self, endpoint)

    def observe(self, stats: GenerationStats, reason: str) -> None:
        s = stats.to_dict()
        self.generations.labels(s["mode"], reason).inc()
        self.prompt_tokens.inc(s["prompt_tokens"])
        self.tokens.inc(s["generated_tokens"])
        self.drafted.inc(s["drafted_tokens"])
        self.accepted.inc(s["accepted_tokens"])
        self.bytes.labels("up").inc(s["bytes_up"])
        self.bytes.labels("down").inc(s["bytes_down"])
        if s["ttft_s"] is not None:
            self.ttft.observe(s["ttft_s"])


@dataclasses.dataclass
class RequestRecord:
    """One request in the metrics: in flight until `done(status)`, which counts it once."""

    metrics: Metrics
    endpoint: str
    finished: bool = False

    def done(self, status: int) -> None:
        if self.finished:
            return
        self.finished = True
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(self.endpoint, str(status)).inc()


# ---- a request's generation ---------------------------------------------------------------------------------------

async def _until_disconnect(receive: Receive) -> None:
    # the body has been read: uvicorn's next message is http.disconnect, when the client goes (or the response ends)
    while (await receive())["type"] != "http.disconnect":
        pass


class Job:
    """A request's generation raced against its client's disconnect; `close()` ends it exactly once.

    `reason` is PicoSpec's finish reason ("cancelled" once a generation that never ended is closed)."""

    def __init__(self, gen: Generation, receive: Receive, metrics: Metrics, seed: int) -> None:
        self.gen, self.metrics, self.seed = gen, metrics, seed
        self._ended = False
        self._gone = asyncio.ensure_future(_until_disconnect(receive))
        self._closed = False

    @property
    def reason(self) -> str | None:
        return self.gen.stats.finish_reason

    async def next_piece(self) -> str | None:
        """The next released text; None at the end. ClientGone if the client left first."""
        return await self._race(self._step())

    async def text(self) -> str:
        """Run to the end; the whole text."""
        async def drain() -> None:
            while await self._step() is not None:
                pass
        await self._race(drain())
        return self.gen.text

    async def _step(self) -> str | None:
        while not self._ended:
            try:
                await self.gen.__anext__()
            except StopAsyncIteration:
                self._ended = True  # the natural end releases what was held (a stop string releases nothing)
            if self.gen.text_delta:
                return self.gen.text_delta
        return None

    async def _race(self, step: Awaitable[T]) -> T:
        task = asyncio.ensure_future(step)
        finished = False
        try:
            await asyncio.wait({task, self._gone}, return_when=asyncio.FIRST_COMPLETED)
            finished = task.done()
        finally:
            if not task.done():  # the client left, or this request was cancelled (server shutdown)
                task.cancel()  # cancels the generation where it waits: its session is closed on the way out
                await asyncio.gather(task, return_exceptions=True)
        if not finished:
            self.metrics.disconnects.inc()
            raise ClientGone()
        return task.result()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._gone.cancel()
        # shielded: a request cancelled mid-close must still end its session and count its statistics
        await asyncio.shield(self._finish())

    async def _finish(self) -> None:
        with contextlib.suppress(Exception):
            await self.gen.aclose()  # a no-op after the end; otherwise cancels the session (the cloud frees it)
        self.metrics.observe(self.gen.stats, self.reason or "cancelled")


class SSEResponse(StreamingResponse):
    """Server-sent events from a job: `data: {json}` chunks and `data: [DONE]`. Closes the job and counts the
    request however the stream ends (at the end, on an error, when the client leaves)."""

    def __init__(self, events: AsyncIterator[bytes], job: Job, record: RequestRecord) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job, self.record = job, record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 200
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientGone, OSError):
            status = CLIENT_GONE
        finally:
            await self.body_iterator.aclose()
            await self.job.close()
            self.record.done(status)


# ---- the app ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ServerContext:
    """What the handlers share: one EdgeClient, the draft's tokenizer, the cloud's limits, the metrics."""

    client: EdgeClient
    draft: LoadedModel
    info: pb.InfoReply
    defaults: api.Defaults
    metrics: Metrics
    api_key: str | None
    created: int

    @property
    def models(self) -> tuple[str, ...]:
        return (self.info.target_model,)

    def authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise api.ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")

    def encode(self, req: api.CompletionRequest) -> list[int]:
        tok = self.draft.tokenizer
        if req.kind == "text":
            return list(req.prompt) if isinstance(req.prompt, tuple) else encode_prompt(tok, req.prompt, chat=False)
        if not getattr(tok, "chat_template", None):
            raise api.bad(f"{self.info.target_model} has no chat template: use /v1/completions", "messages",
                          "no_chat_template")
        try:
            return encode_messages(tok, req.messages)
        except Exception as e:  # noqa: BLE001 - the template refused the conversation (e.g. roles out of order)
            raise api.bad(f"the chat template refused the messages: {e}", "messages") from None

    def start(self, req: api.CompletionRequest, prompt_ids: list[int], request: Request) -> Job:
        max_tokens = api.resolve_max_tokens(req, len(prompt_ids), self.defaults)
        seed = req.seed if req.seed is not None else secrets.randbits(63)  # omitted: a fresh draw, as OpenAI's
        gen = self.client.generate(prompt_ids, mode=req.mode, stop=req.stop, max_new_tokens=max_tokens,
                                   temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=seed,
                                   verify=req.verify)
        return Job(gen, request.receive, self.metrics, seed)


def error_response(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def read_body(request: Request) -> bytes:
    """The body, refused (413) past MAX_BODY_BYTES before it is all read."""
    too_big = api.ApiError(413, f"the request body exceeds {api.MAX_BODY_BYTES} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > api.MAX_BODY_BYTES:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > api.MAX_BODY_BYTES:
            raise too_big
        parts.append(part)
    return b"".join(parts)


async def complete(ctx: ServerContext, request: Request, kind: str, record: RequestRecord) -> Response:
    """POST /v1/chat/completions ("chat") and /v1/completions ("text")."""
    try:
        ctx.authorize(request)
        req = api.parse_request(api.parse_json(await read_body(request)), kind, ctx.models, ctx.defaults)
        job = ctx.start(req, ctx.encode(req), request)
    except api.ApiError as e:
        return error_response(e)
    except ValueError as e:  # a setting the generation refuses: the CLI's and the API's rule (config.check_edge_config)
        return error_response(api.bad(str(e), API_PARAMS.get(getattr(e, "field", ""), None), "invalid_value"))
    except ClientDisconnect:
        return Response(status_code=CLIENT_GONE)
    rid, created = api.new_id(kind), int(time.time())
    try:
        # streamed: wait for the first text before answering, so a failure before it gets its own status
        first = await job.next_piece() if req.stream else await job.text()
    except ClientGone:
        await job.close()
        return Response(status_code=CLIENT_GONE)
    except EdgeError as e:
        await job.close()
        return error_response(api.cloud_error(str(e), e.status))
    except BaseException:
        await job.close()
        raise
    if req.stream:
        return SSEResponse(events(job, req, rid, created, first), job, record)
    await job.close()
    gen = job.gen
    body = api.completion_body(req, rid, created, gen.text, job.reason,
                               api.usage(gen.stats.prompt_tokens, len(gen.token_ids)),
                               api.timings(gen.stats.to_dict(), job.seed))
    return JSONResponse(body)


async def events(job: Job, req: api.CompletionRequest, rid: str, created: int, first: str | None) -> AsyncIterator[bytes]:
    """The SSE stream of a request whose first text (None: none before the end) has arrived."""
    if req.kind == "chat":  # the first chunk names the role
        yield api.sse(api.chunk_body(req, rid, created, "", first=True))
    piece = first
    try:
        while piece is not None:
            yield api.sse(api.chunk_body(req, rid, created, piece))
            piece = await job.next_piece()
    except EdgeError as e:  # after a 200 the error can only be an event (OpenAI's clients raise it)
        log.warning("generation %s failed mid-stream: %s", rid, e)
        yield api.sse(api.cloud_error(str(e), e.status).body())
        yield api.SSE_DONE
        return
    gen = job.gen
    final = api.chunk_body(req, rid, created, None, reason=job.reason)
    final["timings"] = api.timings(gen.stats.to_dict(), job.seed)
    yield api.sse(final)
    if req.include_usage:
        yield api.sse(api.usage_chunk(req, rid, created, api.usage(gen.stats.prompt_tokens, len(gen.token_ids))))
    yield api.SSE_DONE


def defaults_for(config: EdgeConfig, info: pb.InfoReply, draft: LoadedModel) -> api.Defaults:
    return api.Defaults(mode=config.mode, verify=config.verify, temperature=config.temperature, top_p=config.top_p,
                        top_k=config.top_k, max_tokens=config.max_new_tokens, max_new_tokens=info.max_new_tokens,
                        max_context=info.max_context, vocab_size=int(draft.model.config.vocab_size))


def create_app(client: EdgeClient, draft: LoadedModel, info: pb.InfoReply, config: EdgeConfig, *,
               api_key: str | None = None) -> FastAPI:
    """The app over a connected client (`info` is what its connect() returned). The app closes the client when it
    shuts down. `config` gives the defaults of omitted request fields (mode, verify, temperature, ...)."""
    ctx = ServerContext(client, draft, info, defaults_for(config, info, draft), Metrics(), api_key, int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.close()

    app = FastAPI(title="PicoSpec edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    _add_routes(app, ctx)
    _add_error_handlers(app)
    return app


def _add_routes(app: FastAPI, ctx: ServerContext) -> None:
    async def counted(handler: Awaitable[Response], record: RequestRecord) -> Response:
        try:
            response = await handler
        except BaseException:
            record.done(500)
            raise
        if not isinstance(response, SSEResponse):  # a stream counts itself when it ends
            record.done(response.status_code)
        return response

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        record = ctx.metrics.start("/v1/chat/completions")
        return await counted(complete(ctx, request, "chat", record), record)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        record = ctx.metrics.start("/v1/completions")
        return await counted(complete(ctx, request, "text", record), record)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        record = ctx.metrics.start("/v1/models")
        return await counted(_models(ctx, request, None), record)

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Response:
        record = ctx.metrics.start("/v1/models/{model}")
        return await counted(_models(ctx, request, model_id), record)

    @app.get("/health")
    async def health() -> Response:
        try:
            await ctx.client.connect(wait_s=HEALTH_WAIT_S)
        except EdgeError as e:
            return JSONResponse({"status": "unavailable", "error": str(e)}, status_code=503)
        return JSONResponse({"status": "ok", "model": ctx.info.target_model, "draft": ctx.draft.name,
                             "cloud": ctx.client.config.server})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        try:
            ctx.authorize(request)
        except api.ApiError as e:
            return error_response(e)
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _models(ctx: ServerContext, request: Request, model_id: str | None) -> Response:
    try:
        ctx.authorize(request)
    except api.ApiError as e:
        return error_response(e)
    cards = [api.model_card(m, ctx.created, ctx.draft.name) for m in ctx.models]
    if model_id is None:
        return JSONResponse({"object": "list", "data": cards})
    for card in cards:
        if card["id"] == model_id:
            return JSONResponse(card)
    return error_response(api.ApiError(404, f"the model {model_id!r} does not exist", param="model",
                                       code="model_not_found"))


def _add_error_handlers(app: FastAPI) -> None:
    """Unknown paths, wrong methods and our own bugs in OpenAI's error shape too."""

    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        return JSONResponse(api.error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    async def server_error(_: Request, e: Exception) -> Response:
        log.exception("internal error", exc_info=e)
        return JSONResponse(api.error_body(f"internal error: {type(e).__name__}", type="server_error"), status_code=500)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)


# ---- the subcommand -----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="picospec-edge serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on [default 127.0.0.1]")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0 = any free one) [default 8000]")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                   "[env PICOSPEC_API_KEY; default none]")
    p.add_argument("--log-level", default="INFO")
    add_config_args(p, EdgeConfig)
    return p


def request_config(config: EdgeConfig) -> EdgeConfig:
    """The client's config while serving: a request finding the cloud down fails within REQUEST_WAIT_S."""
    return dataclasses.replace(config, wait_ready_s=min(config.wait_ready_s, REQUEST_WAIT_S))


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts (so the port is known, and taken, when we say so)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def uvicorn_server(app: FastAPI, log_level: str = "info") -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level.lower(), timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                                         lifespan="on"))


async def serve(config: EdgeConfig, host: str, port: int, api_key: str | None, log_level: str) -> None:
    # the cloud found meanwhile, and a tokenizer it would refuse refused before the weights load
    draft, _ = await draft_and_cloud(config, announce=False)
    client = EdgeClient(request_config(config), draft)
    try:
        info = await client.connect(wait_s=config.wait_ready_s, on_retry=CloudWaitReporter())
        sock = bind(host, port)
        app = create_app(client, draft, info, config, api_key=api_key)
        shown = f"[{host}]" if ":" in host else host
        print(f"picospec-edge: serving {info.target_model} (draft {draft.name}, cloud {config.server}) at "
              f"http://{shown}:{sock.getsockname()[1]}/v1", file=sys.stderr, flush=True)
        await uvicorn_server(app, log_level).serve(sockets=[sock])
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    config = config_from_args(EdgeConfig, args)
    try:  # one default mode for requests (the CLI's comma lists do not apply here)
        check_edge_startup(config, one_mode=True)
        check_ranges(args, {"port": Range(0, 65535)})
    except ValueError as e:
        usage_error("picospec-edge serve", e)
    api_key = args.api_key or os.environ.get("PICOSPEC_API_KEY") or None
    try:
        asyncio.run(serve(config, args.host, args.port, api_key, args.log_level))
    except (EdgeError, ModelError, OSError, ConnectionSettingsError) as e:
        sys.exit(f"picospec-edge serve: {e}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
