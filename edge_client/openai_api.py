"""The OpenAI-compatible API as pure values: request bodies in, typed requests, response bodies and errors out.

No HTTP and no models here (edge_client/openai_server.py is the thin server around it), so every rule is unit-tested
on its own (tests/test_openai_api.py). Terms, used the same way in the server and docs/openai-server.md:
  kind         "chat" (POST /v1/chat/completions: `messages` through the chat template) or "text"
               (POST /v1/completions: a plain `prompt`).
  served model the one model id the server lists and accepts: the cloud's target model name. Its output is the
               target's own (greedy: its greedy tokens; sampling: its distribution) in every exact mode.
  extras       PicoSpec's own optional request fields (`mode`, `verify`, `top_k`); omitted, the edge's defaults
               (its --mode, --verify, ...) apply.
  timings      llama.cpp's statistics convention (`predicted_n`, `predicted_per_second`, `draft_n`,
               `draft_n_accepted`, ...) plus PicoSpec's own (bytes each way, the mode): in the non-streamed response
               and in the streamed final chunk.
Every bound on what a request controls is checked here, before anything is allocated or sent to the cloud.
"""
from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from picospec.edge_client.text import check_stop_strings
from picospec.shared.config import EDGE_MODES, VERIFY_MODES

MAX_BODY_BYTES = 1024 * 1024       # a request body; the cloud's context (8,192 tokens by default) is far less text
MAX_MESSAGES = 1024
MAX_TEMPERATURE = 2.0              # OpenAI's range
MAX_SEED = 2 ** 64 - 1             # the session seed is a uint64 on the wire
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# fields that change what is generated and that we cannot honour: refused unless they hold their neutral value,
# rather than silently ignored (a client asking for logprobs or tools would otherwise get something else)
NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "logprobs": (False, 0),
           "top_logprobs": (0,), "tools": ([],), "functions": ([],), "tool_choice": ("none",), "echo": (False,),
           "suffix": ("",), "best_of": (1,), "response_format": ({"type": "text"},)}
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class ApiError(Exception):
    """A request refused with an HTTP status and OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Defaults:
    """What an omitted field means: the edge's configuration (EdgeConfig), and what the cloud allows."""

    mode: str
    verify: str
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int        # the edge's --max-new-tokens, cut to what the context leaves when omitted
    max_new_tokens: int    # the cloud's limit on one generation
    max_context: int       # the cloud's limit on prompt + generated tokens
    vocab_size: int        # token-id prompts must lie in 0..vocab_size-1


@dataclass(frozen=True)
class CompletionRequest:
    """One validated request. `max_tokens` None = not given (the default applies, see `resolve_max_tokens`);
    `seed` None = not given (the server draws one)."""

    kind: str                                  # "chat" | "text"
    model: str
    messages: tuple[dict[str, str], ...] = ()  # chat: role and text content only
    prompt: str | tuple[int, ...] = ""         # text: a string, or token ids
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    mode: str = "pipeline"
    verify: str = "dense"


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why not."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


def parse_request(body: Mapping[str, Any], kind: str, models: Sequence[str], d: Defaults) -> CompletionRequest:
    """Validate a chat ("chat") or plain ("text") completion request against the served models and the defaults."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter", "model", "missing_required_parameter")
    if model not in models:
        raise bad(f"the model {model!r} does not exist; this server serves {', '.join(map(repr, models))}",
                  "model", "model_not_found")
    _check_unsupported(body)
    _integer(body, "n", 1, 1, 1)  # one choice per request
    content = {"messages": _messages(body.get("messages"))} if kind == "chat" else {"prompt": _prompt(body.get("prompt"), d)}
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad("stream_options is only allowed when stream is true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    return CompletionRequest(
        kind=kind, model=model, **content, max_tokens=_max_tokens(body, kind, d), stream=stream,
        include_usage=options is not None and _flag(options, "include_usage", "stream_options.include_usage"),
        temperature=_number(body, "temperature", d.temperature, 0.0, MAX_TEMPERATURE),
        top_p=_number(body, "top_p", d.top_p, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", d.top_k, 0, d.vocab_size),
        seed=_integer(body, "seed", None, 0, MAX_SEED), stop=_stop(body.get("stop")),
        mode=_choice(body, "mode", d.mode, EDGE_MODES), verify=_choice(body, "verify", d.verify, VERIFY_MODES),
    )


def _check_unsupported(body: Mapping[str, Any]) -> None:
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value is not None and value not in neutral:
            raise bad(f"{name} is not supported by this server (only {neutral[0]!r})", name, "unsupported_parameter")


def _flag(body: Mapping[str, Any], name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{param or name} must be a boolean, got {value!r}", param or name)
    return value


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float, *,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{name} must be a number, got {value!r}", name)
    if value > high or value < low or (low_open and value == low):
        where = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise bad(f"{name} must be in {where}, got {value!r}", name, "invalid_value")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {value!r}", name)
    if not low <= value <= high:
        raise bad(f"{name} must be in {low}..{high}, got {value}", name, "invalid_value")
    return value


def _choice(body: Mapping[str, Any], name: str, default: str, choices: Sequence[str]) -> str:
    value = body.get(name)
    if value is None:
        return default
    if value not in choices:
        raise bad(f"{name} must be one of {', '.join(choices)}, got {value!r}", name, "invalid_value")
    return value


def _max_tokens(body: Mapping[str, Any], kind: str, d: Defaults) -> int | None:
    """max_tokens, or for chat its newer name max_completion_tokens; in 1..the cloud's limit."""
    name = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None else "max_tokens"
    return _integer(body, name, None, 1, d.max_new_tokens)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list):
        raise bad("stop must be a string or a list of strings", "stop")
    try:
        return check_stop_strings(stops)
    except ValueError as e:
        raise bad(f"stop: {e}", "stop", "invalid_value") from None


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    """Messages as {role, content} with text content; content parts other than text are refused."""
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list", "messages")
    if len(value) > MAX_MESSAGES:
        raise bad(f"at most {MAX_MESSAGES} messages, got {len(value)}", "messages")
    out = []
    for i, m in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"{param} must be an object with a role in {', '.join(ROLES)}", param)
        out.append({"role": ROLES[m["role"]], "content": _content(m.get("content"), param)})
    return tuple(out)


def _content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"{param}.content must be a string or a list of text parts", f"{param}.content")


def _prompt(value: Any, d: Defaults) -> str | tuple[int, ...]:
    """A string, or token ids; a list of one of either is the same. Several prompts are refused (one choice only)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise bad("prompt must not be empty", "prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if not all(0 <= t < d.vocab_size for t in value):
            raise bad(f"prompt token ids must be in 0..{d.vocab_size - 1}", "prompt", "invalid_value")
        return tuple(value)
    raise bad("prompt must be a non-empty string or list of token ids (one prompt per request)", "prompt")


def resolve_max_tokens(req: CompletionRequest, prompt_tokens: int, d: Defaults) -> int:
    """Tokens to generate at most. Given, prompt + it must fit the cloud's context; omitted, the edge's default is
    cut to what the context leaves. A prompt that leaves no room is refused, naming the limit."""
    room = d.max_context - prompt_tokens
    wanted = req.max_tokens if req.max_tokens is not None else min(d.max_tokens, max(room, 1))
    if prompt_tokens + wanted > d.max_context:
        raise bad(f"this model's maximum context length is {d.max_context} tokens; the request has {prompt_tokens} "
                  f"prompt tokens and asks for {wanted} more", "messages" if req.kind == "chat" else "prompt",
                  "context_length_exceeded")
    return wanted


# ---- responses --------------------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def finish_reason(reason: str | None) -> str | None:
    """PicoSpec's finish reason (eos, stop, length, cancelled) as OpenAI's (stop, length)."""
    return FINISH_REASONS.get(reason or "")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def timings(stats: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """GenerationStats.to_dict() in llama.cpp's `timings` convention, plus PicoSpec's own fields. prompt_ms is the
    time to the first token (both sides' prefill and a round trip); predicted_* cover the whole generation."""
    n, wall_ms = stats["generated_tokens"], stats["wall_s"] * 1e3
    ttft_ms = stats["ttft_s"] * 1e3 if stats["ttft_s"] is not None else None
    return {
        "prompt_n": stats["prompt_tokens"], "prompt_ms": ttft_ms,
        "predicted_n": n, "predicted_ms": wall_ms,
        "predicted_per_token_ms": wall_ms / n if n else None,
        "predicted_per_second": stats["tokens_per_s"],
        "decode_per_second": stats["decode_tokens_per_s"],
        "draft_n": stats["drafted_tokens"], "draft_n_accepted": stats["accepted_tokens"],
        "rounds": stats["rounds"], "mean_accepted_len": stats["mean_accepted_len"],
        "cloud_tokens": stats["cloud_tokens"],
        # what the cloud's operator pays: its compute (passes and decode steps, prefill apart) per generated token
        "cloud_ms_per_token": stats.get("cloud_ms_per_token"),
        "bytes_up": stats["bytes_up"], "bytes_down": stats["bytes_down"],
        "mode": stats["mode"], "verify_mode": stats["verify_mode"], "exact": stats["exact"], "seed": seed,
        # --on-partition edge: generated positions [start, end) the draft made alone while the cloud was unreachable
        "inexact_reason": stats.get("inexact_reason"), "draft_only_tokens": stats.get("draft_only_tokens", 0),
        "draft_only_spans": stats.get("draft_only_spans", []),
    }


def completion_body(req: CompletionRequest, rid: str, created: int, text: str, reason: str | None,
                    use: dict[str, int], times: dict[str, Any]) -> dict[str, Any]:
    """The non-streamed response: `chat.completion` or `text_completion`."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason(reason)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice],
            "usage": use, "timings": times}


def chunk_body(req: CompletionRequest, rid: str, created: int, text: str | None, *, first: bool = False,
               reason: str | None = None) -> dict[str, Any]:
    """One streamed chunk: `chat.completion.chunk` with a delta (`first`: it names the role), or `text_completion`.
    `text` None: the final chunk (an empty delta, the finish `reason`)."""
    final = text is None
    if req.kind == "chat":
        delta: dict[str, str] = {} if final else {"content": text}
        if first:
            delta = {"role": "assistant", **delta}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason(reason) if final else None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": "" if final else text, "logprobs": None,
                  "finish_reason": finish_reason(reason) if final else None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}


def usage_chunk(req: CompletionRequest, rid: str, created: int, use: dict[str, int]) -> dict[str, Any]:
    """stream_options.include_usage: the last chunk before [DONE], no choices, the usage."""
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [], "usage": use}


def sse(obj: Mapping[str, Any]) -> bytes:
    """One server-sent event: `data: {json}` and a blank line."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def model_card(model_id: str, created: int, draft: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "picospec", "draft": draft}


def cloud_error(message: str, status: str = "") -> ApiError:
    """An EdgeError at request time as an HTTP error, by the gRPC status the cloud ended the call with
    (EdgeError.status): it refused the request's arguments (400), is at its session limit (429, which OpenAI
    clients retry), or is down or failed (503)."""
    if status in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"):
        return ApiError(400, message, code="cloud_refused")
    if status == "RESOURCE_EXHAUSTED":
        return ApiError(429, message, type="server_error", code="cloud_busy")
    return ApiError(503, message, type="server_error", code="cloud_unavailable")
