"""picospec-edge serve end to end: the official `openai` package against a real uvicorn server on loopback, over a
real gRPC cloud (in process, so the tests can watch its session slots), and curl against the console scripts.

The reference for "the target's own output" is a `cloud`-mode generation (the target alone) through the Python API.
One stack per module (loading the int8 draft takes ~10 s); every test uses 16-24 tokens.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from picospec.cloud_server.server import PicoSpecService
from picospec.edge_client.client import EdgeClient
from picospec.edge_client.openai_server import bind, create_app, request_config, uvicorn_server
from picospec.edge_client.text import encode_messages
from picospec.shared.config import EdgeConfig
from picospec.shared.models import LoadedModel, load_model
from tests.conftest import serving
from tests.proc_util import free_port, read_until

KEY = "sk-picospec-test"
TARGET = "smollm2-135m-instruct"
N = 16
MAX_CONTEXT = 1024  # the cloud's, small: a prompt too long is cheap to make
BIN = Path(sys.executable).parent


class Stack:
    """A cloud, one EdgeClient and the HTTP server on one event loop in a background thread; a second HTTP server
    whose client points at a port where nothing listens (the cloud is down)."""

    def __init__(self, target: LoadedModel, draft: LoadedModel) -> None:
        self.target, self.draft = target, draft
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.servers: list = []
        self.service: PicoSpecService | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    def start(self) -> "Stack":
        self.thread.start()
        if not self.ready.wait(120) or self.error is not None:
            raise RuntimeError(f"the stack did not start: {self.error!r}")
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.should_exit = True
        self.thread.join(30)

    async def _main(self) -> None:
        try:
            async with serving(self.target, max_context=MAX_CONTEXT) as (service, addr):
                self.service, self.loop = service, asyncio.get_running_loop()
                config = EdgeConfig(server=addr, draft=self.draft.name, max_new_tokens=N, wait_ready_s=30.0)
                self.client = EdgeClient(request_config(config), self.draft)
                info = await self.client.connect(wait_s=30.0)
                self.url = await self._serve(create_app(self.client, self.draft, info, config, api_key=KEY))
                down = EdgeConfig(server=f"127.0.0.1:{free_port()}", draft=self.draft.name, wait_ready_s=0.3)
                self.down_url = await self._serve(create_app(EdgeClient(request_config(down), self.draft), self.draft,
                                                             info, down))
                self.ready.set()
                await asyncio.gather(*self.tasks)
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self.error = e
            self.ready.set()

    async def _serve(self, app) -> str:
        sock = bind("127.0.0.1", 0)
        server = uvicorn_server(app, "warning")
        self.servers.append(server)
        self.tasks = getattr(self, "tasks", []) + [asyncio.create_task(server.serve(sockets=[sock]))]
        while not server.started:
            await asyncio.sleep(0.01)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def reference(self, prompt_ids: list[int], n: int = N, **kw) -> tuple[str, list[int], str]:
        """The target alone (cloud mode) through the Python API: text, token ids, finish reason."""
        async def go():
            gen = self.client.generate(prompt_ids, mode="cloud", max_new_tokens=n, **kw)
            await gen.collect()
            return gen.text, gen.token_ids, gen.stats.finish_reason
        return self.call(go())

    def openai(self, key: str = KEY, url: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=(url or self.url) + "/v1", api_key=key, max_retries=0, timeout=120)


class Scripts:
    """`picospec-cloud` and `picospec-edge serve` as processes (tiny models), started before the in-process stack
    loads so that their start-up overlaps its (the int8 draft's ~10 s)."""

    def __init__(self) -> None:
        self.cloud_port, self.http_port = free_port(), free_port()
        self.cloud = subprocess.Popen([BIN / "picospec-cloud", "--target", "tiny-random", "--host", "127.0.0.1", "--port",
                                       str(self.cloud_port), "--threads", "1"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # started together: the edge waits for the cloud (and says so) while both load
        self.edge = subprocess.Popen([BIN / "picospec-edge", "serve", "--server", f"127.0.0.1:{self.cloud_port}",
                                      "--draft", "tiny-random:layers=1", "--port", str(self.http_port), "--threads", "1",
                                      "--max-new-tokens", "8"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "PICOSPEC_WAIT_READY_S": "120"})

    def stop(self) -> None:
        for proc in (self.edge, self.cloud):
            if proc.poll() is None:
                proc.terminate()
        for proc in (self.edge, self.cloud):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def scripts():
    s = Scripts()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stack(scripts):
    s = Stack(load_model(TARGET, progress=False), load_model(f"{TARGET}:int8", progress=False)).start()
    yield s
    s.stop()


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    status, data = r.status, r.read()
    conn.close()
    return status, data


def chat_ids(stack: Stack, text: str) -> list[int]:
    return encode_messages(stack.draft.tokenizer, [{"role": "user", "content": text}])


# ---- models, chat and completions ------------------------------------------------------------------------------

def test_lists_the_target_model(stack):
    c = stack.openai()
    assert [m.id for m in c.models.list().data] == [TARGET]
    assert c.models.retrieve(TARGET).id == TARGET
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")


def test_chat_greedy_is_the_targets_own_streamed_or_not(stack):
    prompt = "What is the capital of France? Answer in one sentence."
    ref_text, ref_ids, ref_reason = stack.reference(chat_ids(stack, prompt))
    c = stack.openai()
    messages = [{"role": "user", "content": prompt}]
    r = c.chat.completions.create(model=TARGET, messages=messages, max_tokens=N, temperature=0,
                                  extra_body={"mode": "sync"})
    assert r.choices[0].message.content == ref_text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[ref_reason]
    assert r.usage.prompt_tokens == len(chat_ids(stack, prompt)) and r.usage.completion_tokens == len(ref_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    t = r.model_extra["timings"]
    assert t["mode"] == "sync" and t["predicted_n"] == len(ref_ids) and t["draft_n"] > 0 and t["draft_n_accepted"] > 0
    assert t["bytes_up"] > 0 and t["bytes_down"] > 0 and t["exact"] and t["predicted_per_second"] > 0

    chunks = list(c.chat.completions.create(model=TARGET, messages=messages, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref_text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref_ids)
    assert chunks[-2].model_extra["timings"]["mode"] == "pipeline"  # the edge's default mode


def test_plain_completion_greedy_is_the_targets_own_streamed_or_not(stack):
    prompt = "The three primary colours are"
    ids = stack.draft.tokenizer(prompt)["input_ids"]
    ref_text, ref_ids, _ = stack.reference(ids)
    c = stack.openai()
    r = c.completions.create(model=TARGET, prompt=prompt, max_tokens=N, temperature=0)
    assert r.choices[0].text == ref_text and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref_ids))
    streamed = list(c.completions.create(model=TARGET, prompt=prompt, max_tokens=N, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == ref_text
    assert streamed[-1].choices[0].finish_reason == r.choices[0].finish_reason
    r2 = c.completions.create(model=TARGET, prompt=ids, max_tokens=N, extra_body={"verify": "coupled"})  # token ids
    assert r2.choices[0].text == ref_text and r2.model_extra["timings"]["verify_mode"] == "coupled"


def _spanning_stop(tokenizer, ids: list[int]) -> tuple[str, int, int]:
    """A stop string made of the last 2 characters of one token and the first 2 of the next, occurring first there:
    (stop, where it starts in the text, tokens up to and including the one that completes it)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for k in range(2, len(ids) - 1):
        b = len(tokenizer.decode(ids[:k], skip_special_tokens=True))
        if len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) - b < 2 or \
                b - len(tokenizer.decode(ids[: k - 1], skip_special_tokens=True)) < 2:
            continue
        stop = text[b - 2: b + 2]
        if text.find(stop) == b - 2 and stop.strip():
            return stop, b - 2, k + 1
    raise AssertionError(f"no stop string spans a token boundary in {text!r}")


def test_stop_string_across_a_token_boundary_stops_where_the_target_would(stack):
    prompt = "Write one sentence about the sea."
    _, ref_ids, _ = stack.reference(chat_ids(stack, prompt))
    ref_text = stack.draft.tokenizer.decode(ref_ids, skip_special_tokens=True)
    stop, at, kept = _spanning_stop(stack.draft.tokenizer, ref_ids)
    c = stack.openai()
    messages = [{"role": "user", "content": prompt}]
    for mode in ("sync", "pipeline"):
        r = c.chat.completions.create(model=TARGET, messages=messages, max_tokens=N, stop=[stop, "never seen"],
                                      extra_body={"mode": mode})
        assert r.choices[0].message.content == ref_text[:at], (mode, stop)
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == kept
    streamed = c.chat.completions.create(model=TARGET, messages=messages, max_tokens=N, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ref_text[:at]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_each_get_the_targets_own_text(stack):
    prompts, n = ["Name a fruit.", "Name a planet.", "Say hi."], 10
    refs = [stack.reference(chat_ids(stack, p), n)[0] for p in prompts]
    c = stack.openai()
    out: dict[int, str] = {}

    def ask(i: int) -> None:
        r = c.chat.completions.create(model=TARGET, messages=[{"role": "user", "content": prompts[i]}], max_tokens=n)
        out[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [out.get(i) for i in range(len(prompts))] == refs


# ---- errors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,param,code", [
    ({"model": "gpt-4"}, "model", "model_not_found"),
    ({"temperature": 2.5}, "temperature", "invalid_value"),
    ({"top_p": 0}, "top_p", "invalid_value"),
    ({"n": 2}, "n", "invalid_value"),
    ({"max_tokens": 100_000}, "max_tokens", "invalid_value"),
    ({"stop": ["x"] * 17}, "stop", "invalid_value"),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"extra_body": {"mode": "fast"}}, "mode", "invalid_value"),
    ({"messages": [{"role": "user", "content": "word " * MAX_CONTEXT}]}, "messages", "context_length_exceeded"),
])
def test_bad_requests_get_openai_shaped_400s(stack, change, param, code):
    args = {"model": TARGET, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **change}
    with pytest.raises(openai.BadRequestError) as e:
        stack.openai().chat.completions.create(**args)
    assert e.value.status_code == 400 and e.value.param == param and e.value.code == code
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]
    if code == "context_length_exceeded":
        assert str(MAX_CONTEXT) in e.value.body["message"]


def test_bad_json_too_large_bodies_and_unknown_paths_are_refused_in_openai_shape(stack):
    auth = {"Authorization": f"Bearer {KEY}"}
    status, body = raw(stack.url, "POST", "/v1/chat/completions", b'{"model": ', auth)
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, body = raw(stack.url, "POST", "/v1/completions", b"[1, 2]", auth)
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, body = raw(stack.url, "POST", "/v1/completions", b" " * (3 << 20), auth)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    status, body = raw(stack.url, "GET", "/v1/nothing", None, auth)
    assert status == 404 and "error" in json.loads(body)


def test_api_key_is_required_except_for_health(stack):
    with pytest.raises(openai.AuthenticationError) as e:
        stack.openai(key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert raw(stack.url, "GET", "/metrics")[0] == 401
    status, body = raw(stack.url, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_a_cloud_that_is_down_gets_503(stack):
    c = stack.openai(url=stack.down_url)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=TARGET, prompt="hi", max_tokens=4, stream=stream)
        assert e.value.status_code == 503 and e.value.code == "cloud_unavailable"
        assert "not reachable" in e.value.body["message"]
    assert raw(stack.down_url, "GET", "/health")[0] == 503


class FailingCloud:
    """Cloud hook: the cloud fails its third message of a session (after Ready and a first verdict)."""

    def __init__(self) -> None:
        self.sent = 0

    async def before_send(self, msg) -> None:
        self.sent += 1
        if self.sent == 3:
            raise RuntimeError("the cloud fails mid-generation")


def test_a_cloud_failing_mid_stream_ends_the_stream_with_an_error_event(stack):
    stack.service.hooks = FailingCloud()
    try:
        stream = stack.openai().completions.create(model=TARGET, prompt="Once upon a time", max_tokens=N, stream=True,
                                                   extra_body={"mode": "sync"})
        texts = []
        with pytest.raises(openai.APIError) as e:
            for chunk in stream:
                texts.append(chunk.choices[0].text)
    finally:
        stack.service.hooks = None
    assert texts and "cloud" in e.value.message and e.value.body["code"] == "cloud_unavailable"


# ---- disconnects and metrics --------------------------------------------------------------------------------

class SlowCloud:
    """Cloud hook: every outgoing message waits, so a generation is still running when its client leaves."""

    async def before_send(self, msg) -> None:
        await asyncio.sleep(0.2)


def _wait_for(predicate, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_cancels_its_cloud_session(stack, stream):
    service = stack.service
    before = metrics(stack)
    service.hooks = SlowCloud()
    host, port = stack.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        body = {"model": TARGET, "prompt": "Count from 1 to 100:", "max_tokens": 200, "stream": stream}
        conn.request("POST", "/v1/completions", body=json.dumps(body),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        if stream:
            r = conn.getresponse()
            assert r.status == 200 and r.readline().startswith(b"data: ")  # tokens are flowing
        _wait_for(lambda: service.active_sessions == 1, 30)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        # 200 tokens at 0.2 s a message would take many seconds: the session must end at once
        assert _wait_for(lambda: service.active_sessions == 0, 5) < 5
    finally:
        conn.close()
        service.hooks = None
    # the HTTP side counts the request once its job is closed (just after the cloud freed the session)
    cancelled = 'picospec_generations_total{finish_reason="cancelled",mode="pipeline"}'
    _wait_for(lambda: metrics(stack).get(cancelled, 0) == before.get(cancelled, 0) + 1, 5)
    after = metrics(stack)
    gone = 'picospec_http_requests_total{endpoint="/v1/completions",status="499"}'
    assert after[gone] == before.get(gone, 0) + 1
    assert after["picospec_client_disconnects_total"] == before.get("picospec_client_disconnects_total", 0) + 1
    assert after["picospec_http_requests_in_flight"] == 0


def metrics(stack: Stack) -> dict[str, float]:
    status, text = raw(stack.url, "GET", "/metrics", None, {"Authorization": f"Bearer {KEY}"})
    assert status == 200
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines()
            if line and not line.startswith("#")}


def test_metrics_count_requests_tokens_drafts_and_bytes(stack):
    stack.openai().completions.create(model=TARGET, prompt="Hello", max_tokens=4)
    values = metrics(stack)
    assert values['picospec_http_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert values["picospec_generated_tokens_total"] > 0 and values["picospec_draft_tokens_total"] > 0
    assert values["picospec_draft_tokens_accepted_total"] > 0
    assert values['picospec_cloud_bytes_total{direction="up"}'] > 0
    assert values['picospec_cloud_bytes_total{direction="down"}'] > 0
    assert values["picospec_time_to_first_token_seconds_count"] > 0
    assert "picospec_http_requests_in_flight" in values


# ---- the console scripts, and curl -N --------------------------------------------------------------------------

def test_console_script_serves_sse_that_curl_sees(scripts):
    lines, ok = read_until(scripts.edge, "serving tiny-random", 180)
    assert ok, "picospec-edge serve did not start:\n" + "".join(lines)
    url = f"http://127.0.0.1:{scripts.http_port}/v1/completions"
    body = {"model": "tiny-random", "prompt": "hello", "max_tokens": 12, "temperature": 0}
    curl = ["curl", "-sS", "-H", "Content-Type: application/json", url, "-d"]
    sse = subprocess.run(["curl", "-N", *curl[1:], json.dumps({**body, "stream": True,
                                                               "stream_options": {"include_usage": True}})],
                         capture_output=True, text=True, timeout=60).stdout
    plain = json.loads(subprocess.run([*curl, json.dumps(body)], capture_output=True, text=True, timeout=60).stdout)
    events = sse.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", sse
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1]), sse
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert "timings" in chunks[-2] and plain["usage"]["completion_tokens"] == plain["timings"]["predicted_n"]
    # a graceful stop: SIGTERM ends the server (uvicorn finishes, the app closes its client)
    scripts.edge.terminate()
    assert scripts.edge.wait(30) is not None
