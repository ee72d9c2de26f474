"""The OpenAI API's pure half (edge_client/openai_api.py): validation, defaults, bounds, response shapes. No server."""
from __future__ import annotations

import json

import pytest

from picospec.edge_client import openai_api as api
from picospec.edge_client.text import MAX_STOP_STRINGS

D = api.Defaults(mode="pipeline", verify="dense", temperature=0.0, top_p=1.0, top_k=0, max_tokens=128,
                 max_new_tokens=4096, max_context=1024, vocab_size=100)
MODELS = ("target",)
CHAT = {"model": "target", "messages": [{"role": "user", "content": "hi"}]}
TEXT = {"model": "target", "prompt": "hi"}


def parse(body: dict, kind: str = "chat") -> api.CompletionRequest:
    return api.parse_request(body, kind, MODELS, D)


def refused(body: dict, kind: str = "chat") -> api.ApiError:
    with pytest.raises(api.ApiError) as e:
        parse(body, kind)
    assert e.value.status == 400 and e.value.type == "invalid_request_error"
    return e.value


def test_omitted_fields_take_the_edges_defaults():
    r = parse(CHAT)
    assert (r.kind, r.model, r.mode, r.verify, r.temperature, r.top_p, r.top_k) == ("chat", "target", "pipeline", "dense",
                                                                                    0.0, 1.0, 0)
    assert r.messages == ({"role": "user", "content": "hi"},) and r.max_tokens is None and r.seed is None
    assert not r.stream and not r.include_usage and r.stop == ()


def test_fields_and_extras_are_taken():
    r = parse({**CHAT, "max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": "\n", "stream": True,
               "stream_options": {"include_usage": True}, "mode": "sync", "verify": "coupled", "top_k": 5, "n": 1,
               "user": "ignored", "frequency_penalty": 0})
    assert (r.max_tokens, r.temperature, r.top_p, r.seed, r.stop, r.stream, r.include_usage, r.mode, r.verify,
            r.top_k) == (7, 0.7, 0.9, 3, ("\n",), True, True, "sync", "coupled", 5)
    assert parse({**CHAT, "max_completion_tokens": 9}).max_tokens == 9  # chat's newer name


@pytest.mark.parametrize("change,param,code", [
    ({"model": "gpt-4"}, "model", "model_not_found"),
    ({"model": None}, "model", "missing_required_parameter"),
    ({"temperature": 2.01}, "temperature", "invalid_value"),
    ({"temperature": -0.1}, "temperature", "invalid_value"),
    ({"temperature": "hot"}, "temperature", None),
    ({"temperature": float("nan")}, "temperature", None),
    ({"top_p": 0.0}, "top_p", "invalid_value"),
    ({"top_p": 1.5}, "top_p", "invalid_value"),
    ({"top_k": 101}, "top_k", "invalid_value"),
    ({"n": 2}, "n", "invalid_value"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"max_tokens": 4097}, "max_tokens", "invalid_value"),
    ({"max_tokens": True}, "max_tokens", None),
    ({"seed": -1}, "seed", "invalid_value"),
    ({"seed": 2 ** 64}, "seed", "invalid_value"),
    ({"stop": [""]}, "stop", "invalid_value"),
    ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop", "invalid_value"),
    ({"stop": "x" * 257}, "stop", "invalid_value"),
    ({"stop": 5}, "stop", None),
    ({"stream": "yes"}, "stream", None),
    ({"stream_options": {"include_usage": True}}, "stream_options", None),  # without stream
    ({"mode": "fast"}, "mode", "invalid_value"),
    ({"verify": "trust-me"}, "verify", "invalid_value"),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
    ({"messages": []}, "messages", None),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", None),
])
def test_each_bad_field_is_refused_naming_it(change, param, code):
    e = refused({**CHAT, **change})
    assert e.param == param and e.code == code and e.message
    assert e.body() == {"error": {"message": e.message, "type": "invalid_request_error", "param": param, "code": code}}


def test_chat_content_parts_and_roles():
    r = parse({**CHAT, "messages": [{"role": "developer", "content": "be brief"},
                                    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert r.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"})


def test_prompts_strings_or_token_ids_one_at_a_time():
    assert parse(TEXT, "text").prompt == "hi"
    assert parse({**TEXT, "prompt": ["hi"]}, "text").prompt == "hi"
    assert parse({**TEXT, "prompt": [1, 2, 3]}, "text").prompt == (1, 2, 3)
    assert parse({**TEXT, "prompt": [[4, 5]]}, "text").prompt == (4, 5)
    for bad in ("", [], ["a", "b"], [1, 100], [1, -1], [True], None, {"text": "hi"}):
        assert refused({**TEXT, "prompt": bad}, "text").param == "prompt"


def test_max_tokens_against_the_context():
    text = parse(TEXT, "text")
    assert api.resolve_max_tokens(text, 10, D) == 128                      # the edge's default
    assert api.resolve_max_tokens(text, 1000, D) == 24                     # cut to what the context leaves
    assert api.resolve_max_tokens(text, 1023, D) == 1
    assert api.resolve_max_tokens(parse({**TEXT, "max_tokens": 24}, "text"), 1000, D) == 24
    for prompt_tokens, body in ((1024, TEXT), (2000, TEXT), (1000, {**TEXT, "max_tokens": 25})):
        with pytest.raises(api.ApiError) as e:
            api.resolve_max_tokens(parse(body, "text"), prompt_tokens, D)
        assert e.value.status == 400 and e.value.code == "context_length_exceeded" and "1024" in e.value.message


def test_json_bodies():
    assert api.parse_json(b'{"a": 1}') == {"a": 1}
    for raw in (b'{"a": ', b"[1]", b"\xff", b""):
        with pytest.raises(api.ApiError) as e:
            api.parse_json(raw)
        assert e.value.status == 400 and e.value.code == "invalid_json"


STATS = {"mode": "sync", "verify_mode": "dense", "exact": True, "prompt_tokens": 5, "generated_tokens": 4,
         "wall_s": 2.0, "ttft_s": 0.5, "tokens_per_s": 2.0, "decode_tokens_per_s": 2.0, "drafted_tokens": 6,
         "accepted_tokens": 3, "rounds": 2, "mean_accepted_len": 2.0, "cloud_tokens": 0, "bytes_up": 100,
         "bytes_down": 50, "cloud_ms_per_token": 80.5}


def test_timings_follow_llama_cpp_and_add_ours():
    t = api.timings(STATS, seed=7)
    assert (t["prompt_n"], t["prompt_ms"], t["predicted_n"], t["predicted_ms"], t["predicted_per_token_ms"],
            t["predicted_per_second"]) == (5, 500.0, 4, 2000.0, 500.0, 2.0)
    assert (t["draft_n"], t["draft_n_accepted"], t["bytes_up"], t["bytes_down"], t["mode"], t["seed"]) == \
        (6, 3, 100, 50, "sync", 7)
    assert t["cloud_ms_per_token"] == 80.5
    empty = api.timings({**STATS, "generated_tokens": 0, "ttft_s": None, "tokens_per_s": 0.0}, seed=0)
    assert empty["predicted_per_token_ms"] is None and empty["prompt_ms"] is None


def test_finish_reasons_map_to_openais():
    assert [api.finish_reason(r) for r in ("eos", "stop", "length", "cancelled", None)] == \
        ["stop", "stop", "length", None, None]


def test_response_and_chunk_shapes():
    chat, text = parse(CHAT), parse(TEXT, "text")
    use = api.usage(5, 4)
    assert use == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    body = api.completion_body(chat, "chatcmpl-1", 10, "Hi!", "eos", use, {})
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant", "content": "Hi!"}
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"] == use and body["model"] == "target"
    body = api.completion_body(text, "cmpl-1", 10, "Hi!", "length", use, {})
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "Hi!"
    assert body["choices"][0]["finish_reason"] == "length"

    first = api.chunk_body(chat, "c", 1, "", first=True)["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""} and first["finish_reason"] is None
    assert api.chunk_body(chat, "c", 1, "Hi")["choices"][0]["delta"] == {"content": "Hi"}
    final = api.chunk_body(chat, "c", 1, None, reason="stop")
    assert final["object"] == "chat.completion.chunk" and final["choices"][0]["delta"] == {}
    assert final["choices"][0]["finish_reason"] == "stop"
    assert api.chunk_body(text, "c", 1, "Hi")["choices"][0] == {"index": 0, "text": "Hi", "logprobs": None,
                                                                 "finish_reason": None}
    assert api.usage_chunk(chat, "c", 1, use) == {"id": "c", "object": "chat.completion.chunk", "created": 1,
                                                  "model": "target", "choices": [], "usage": use}


def test_sse_framing():
    assert api.sse({"a": "b\nc"}) == b'data: {"a":"b\\nc"}\n\n'  # a newline in text never breaks an event
    assert api.SSE_DONE == b"data: [DONE]\n\n"
    assert json.loads(api.sse({"x": 1})[6:]) == {"x": 1}


def test_cloud_errors_map_to_statuses():
    down = api.cloud_error("cloud at h:1 is not reachable after 2 s")
    assert (down.status, down.code, down.type) == (503, "cloud_unavailable", "server_error")
    assert api.cloud_error("refused: server is at its limit", "RESOURCE_EXHAUSTED").status == 429
    assert api.cloud_error("refused: prompt too long", "INVALID_ARGUMENT").status == 400
    assert api.cloud_error("refused: tokenizer mismatch", "FAILED_PRECONDITION").status == 400
    assert api.cloud_error("lost the connection", "UNAVAILABLE").status == 503
