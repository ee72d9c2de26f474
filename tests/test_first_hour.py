"""The first hour of a new user (issue 29): every bad input a one-line error before anything loads, Ctrl-C and
SIGTERM as one line with the cloud's session freed, a cloud that owns its port, a --server parsed strictly, unknown
model names refused at once, prompts from files and stdin, and a serve log free of errors. The console scripts run as
real processes on the tiny built-in models (no weights to download), so the whole file takes well under a minute."""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from picospec.edge_client.cli import read_prompt
from picospec.shared.config import (CloudConfig, ConfigError, EdgeConfig, Range, check_cloud_config,
                                    check_edge_config, check_edge_startup, edge_modes)
from picospec.shared.connection import ConnectionSettingsError, check_server
from picospec.shared.interrupt import exit_status
from picospec.shared.model_names import model_name_problem
from tests.proc_util import cloud_process, free_port

BIN = Path(sys.executable).parent
QUICK_S = 5.0  # a usage error comes before torch's import: well under this even on a loaded machine


# ---- the checks, pure ---------------------------------------------------------------------------------------------

BAD_EDGE = [  # (field, value, what the message must say)
    ("max_new_tokens", 0, "--max-new-tokens 0: must be at least 1"),
    ("max_new_tokens", -5, "--max-new-tokens -5: must be at least 1"),
    ("temperature", -1.0, "--temperature -1.0: must be 0 or in [0.0001, 100]"),
    ("temperature", float("nan"), "--temperature nan"),
    ("top_p", 0.0, "--top-p 0.0: must be in (0, 1]"),
    ("top_p", 1.5, "--top-p 1.5: must be in (0, 1]"),
    ("top_k", -3, "--top-k -3: must be in 0..1048576"),
    ("seed", -1, "--seed -1: must be in 0..18446744073709551615"),
    ("seed", 1 << 64, "--seed 18446744073709551616"),
    ("wait_ready_s", -1.0, "--wait-ready-s -1.0: must be at least 0"),
    ("mode", "sync,fast", "--mode 'fast': choose from cloud, edge"),
]


@pytest.mark.parametrize("field,value,message", BAD_EDGE)
def test_check_edge_config_names_the_flag_the_value_and_the_range(field, value, message):
    with pytest.raises(ConfigError) as e:
        check_edge_config(dataclasses.replace(EdgeConfig(), **{field: value}))
    assert str(e.value).startswith(message) and e.value.field == field and isinstance(e.value, ValueError)


def test_check_edge_config_takes_the_defaults_and_the_edges_of_each_range():
    check_edge_config(EdgeConfig())
    for field, value in (("max_new_tokens", 1), ("temperature", 0.0), ("temperature", 1e-4), ("temperature", 100.0),
                         ("top_p", 1.0), ("top_k", 0), ("seed", (1 << 64) - 1), ("mode", "cloud,sync,edge")):
        check_edge_config(dataclasses.replace(EdgeConfig(), **{field: value}))
    assert edge_modes(" cloud, sync ") == ["cloud", "sync"]
    with pytest.raises(ConfigError, match="takes one mode here"):
        check_edge_config(dataclasses.replace(EdgeConfig(), mode="cloud,sync"), one_mode=True)
    with pytest.raises(ConnectionSettingsError, match="--peer-timeout-s"):
        check_edge_config(dataclasses.replace(EdgeConfig(), peer_timeout_s=0.5))


def test_range_descriptions():
    assert Range(1).describe() == "must be at least 1"
    assert Range(0.0, 1.0, low_open=True).describe() == "must be in (0, 1]"
    assert Range(1e-4, 100.0, or_zero=True).describe() == "must be 0 or in [0.0001, 100]"
    assert Range(0, 65535).describe() == "must be in 0..65535"
    assert not Range(0.0).admits(float("nan")) and Range(1e-4, 1.0, or_zero=True).admits(0)


def test_check_cloud_config():
    check_cloud_config(CloudConfig(target="tiny-random"))
    for field, value, message in (("port", 70000, "--port 70000: must be in 0..65535"),
                                  ("max_sessions", 0, "--max-sessions 0: must be at least 1"),
                                  ("verify_budget", float("nan"), "--verify-budget nan: must be at least 0"),
                                  ("target", "qwen2.5-coder-1.5b", "--target 'qwen2.5-coder-1.5b': unknown model "
                                                                  "(did you mean qwen2.5-coder-1.5b-instruct?)")):
        with pytest.raises(ConfigError) as e:
            check_cloud_config(dataclasses.replace(CloudConfig(target="tiny-random"), **{field: value}))
        assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("server,why", [
    ("127.0.0.1", "expected host:port"), ("localhost", "expected host:port"), (":50051", "expected host:port"),
    ("http://localhost:50051", "no URL scheme (http://)"), ("grpc://h:1", "no URL scheme"),
    ("h:99999", "port 99999 outside 1..65535"), ("h:0", "port 0 outside"), ("", "--server is empty"),
    ("a:1,,b:2", "an empty entry"), ("dns:///svc", "expected host:port"), ("unix:", "no socket path"),
    ("::1:50051", "expected host:port or [IPv6]:port"),
])
def test_check_server_refuses_what_cannot_name_a_cloud(server, why):
    with pytest.raises(ConnectionSettingsError, match=re.escape(why)):
        check_server(server)


def test_check_server_takes_every_documented_form():
    for server in ("localhost:50051", "no-such-host.invalid:1", "[::1]:50051", "a:1,b:2", "dns:///svc:50051",
                   "dns://10.0.0.2/svc:1", "ipv4:10.0.0.5:1,10.0.0.6:1", "unix:/run/picospec.sock"):
        check_server(server)  # names are not resolved: a cloud still coming up is waited for


def test_model_names(tmp_path):
    for name in ("smollm2-135m-instruct", "smollm2-135m-instruct:layers=8:int8", "tiny-random", "random:qwen2.5-7b",
                 str(tmp_path)):
        assert model_name_problem(name, download=False) is None, name
    assert "did you mean smollm2-135m-instruct?" in model_name_problem("smollm3-135m", False)
    assert "tiny-random-b" in model_name_problem("smollm3-135m", False)  # the built-ins are listed
    assert "--download" in model_name_problem("HuggingFaceTB/SmolLM2-135M", False)
    assert model_name_problem("HuggingFaceTB/SmolLM2-135M", True) is None
    assert model_name_problem(str(tmp_path / "x.gguf"), True) == f"no such file: {tmp_path / 'x.gguf'}"
    assert "bad suffix" in model_name_problem("tiny-random:int9", False)
    with pytest.raises(ConfigError, match="--draft 'smollm3-135m'"):
        check_edge_startup(dataclasses.replace(EdgeConfig(), draft="smollm3-135m"))


def test_read_prompt(tmp_path):
    (tmp_path / "p.txt").write_text("Hello there\n")
    assert read_prompt(None, str(tmp_path / "p.txt"), io.StringIO()) == "Hello there\n"
    assert read_prompt("-", None, io.StringIO("from stdin")) == "from stdin"
    assert read_prompt("as given", None, io.StringIO("unused")) == "as given"
    for prompt, path, stdin, message in (("", None, "", "--prompt: the prompt is empty"),
                                         ("-", None, " \n", "--prompt - (stdin): the prompt is empty"),
                                         (None, str(tmp_path / "missing.txt"), "", "No such file or directory")):
        with pytest.raises(ValueError, match=re.escape(message)):
            read_prompt(prompt, path, io.StringIO(stdin))


def test_exit_statuses_are_128_plus_the_signal():
    assert (exit_status(signal.SIGINT), exit_status(signal.SIGTERM)) == (130, 143)


def test_the_python_api_refuses_with_the_same_rule(tiny_draft):
    from picospec.edge_client.client import EdgeClient

    client = EdgeClient(EdgeConfig(server="127.0.0.1:1", draft=tiny_draft.name), tiny_draft)
    for overrides, message in (({"max_new_tokens": 0}, "--max-new-tokens 0: must be at least 1"),
                               ({"top_p": 1.5}, "--top-p 1.5"), ({"temperature": -1.0}, "--temperature -1.0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            client.generate([5, 6], **overrides)  # refused at the call: nothing connects
    with pytest.raises(ValueError, match="--mode 'fast'"):
        client.generate([5, 6], mode="fast")


def test_a_cloud_refuses_a_port_another_cloud_serves_in_process(tiny_target):
    """SO_REUSEPORT off (gRPC turns it on): the second bind of a port fails instead of sharing it."""
    from picospec.cloud_server.grpc_setup import start_server
    from picospec.cloud_server.server import PicoSpecService

    async def go() -> None:
        first = PicoSpecService(tiny_target, CloudConfig(target=tiny_target.name))
        second = PicoSpecService(tiny_target, CloudConfig(target=tiny_target.name))
        server, port = await start_server(first, "127.0.0.1:0")
        try:
            with pytest.raises(OSError, match=f"could not listen on 127.0.0.1:{port}"):
                await start_server(second, f"127.0.0.1:{port}")
        finally:
            await server.stop(grace=None)
            for service in (first, second):
                service.metrics.close()
                service.worker.shutdown(wait=True)

    asyncio.run(go())


# ---- the console scripts: usage errors ------------------------------------------------------------------------------

def _run(cmd: list[str], stdin: str = "", timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - started


def _one_line_error(r: subprocess.CompletedProcess, elapsed: float, message: str, code: int = 2) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr and elapsed < QUICK_S, (elapsed, r.stderr)


EDGE_USAGE = [  # (flags, what the one line says): the list, each refused before the draft loads
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--max-new-tokens", "-5"], "--max-new-tokens -5: must be at least 1"),
    (["--temperature", "-1"], "--temperature -1.0: must be 0 or in [0.0001, 100]"),
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--top-k", "-3"], "--top-k -3: must be in 0..1048576"),
    (["--seed", "-1"], "--seed -1: must be in 0.."),
    (["--stop", ""], "--stop ['']: a stop string must be a non-empty string"),
    (["--mode", "sync,fast"], "--mode 'fast': choose from"),
    (["--server", "127.0.0.1"], "--server entry '127.0.0.1': expected host:port"),
    (["--server", "http://localhost:50051"], "--server 'http://localhost:50051': no URL scheme (http://)"),
    (["--server", ":99999"], "--server entry ':99999': expected host:port"),
    (["--server", "localhost:99999"], "--server entry 'localhost:99999': port 99999 outside 1..65535"),
    (["--draft", "smollm3-135m"], "--draft 'smollm3-135m': unknown model (did you mean smollm2-135m-instruct?)"),
    (["--draft", "HuggingFaceTB/SmolLM2-135M"], "--draft 'HuggingFaceTB/SmolLM2-135M': 'HuggingFaceTB/SmolLM2-135M' "
                                                "is not a built-in; as a Hugging Face hub id it is fetched only with "
                                                "--download"),
    (["--prompt", ""], "--prompt: the prompt is empty"),
    (["--gpu-layers", "-2"], "--gpu-layers -2: must be at least -1"),
    (["--gpu-layers", "4"], "--gpu-layers 4: 0 for a torch draft (it takes the GPU with --device cuda)"),
]


@pytest.mark.parametrize("flags,message", EDGE_USAGE, ids=[" ".join(f) for f, _ in EDGE_USAGE])
def test_edge_usage_errors_are_one_line_before_anything_loads(flags, message):
    prompt = [] if "--prompt" in flags else ["--prompt", "hi"]
    r, elapsed = _run([str(BIN / "picospec-edge"), "--draft", "tiny-random", *prompt, *flags])
    _one_line_error(r, elapsed, f"picospec-edge: {message}")


def test_gpu_layers_on_a_llama_cpp_build_without_a_gpu_backend_is_one_line():
    """The llama.cpp draft's --gpu-layers on the CPU build `make install` makes: refused before the draft loads, with
    what to rebuild (a GPU build of llama-cpp-python takes it: deploy/README.md)."""
    from picospec.shared.llama_backend import llama_cpp_module

    assert not llama_cpp_module().llama_supports_gpu_offload(), "this test is for the CPU build of llama-cpp-python"
    r, elapsed = _run([str(BIN / "picospec-edge"), "--draft", "smollm2-135m-instruct", "--draft-engine", "llama.cpp",
                       "--prompt", "hi", "--gpu-layers", "8"])
    _one_line_error(r, elapsed, "picospec-edge: --gpu-layers 8: 0: this llama-cpp-python build has no GPU backend")


def test_edge_prompt_from_a_missing_file_and_from_empty_stdin(tmp_path):
    edge = [str(BIN / "picospec-edge"), "--draft", "tiny-random"]
    r, elapsed = _run([*edge, "--prompt-file", str(tmp_path / "missing.txt")])
    _one_line_error(r, elapsed, f"--prompt-file {tmp_path / 'missing.txt'}: No such file or directory")
    r, elapsed = _run([*edge, "--prompt", "-"], stdin="")
    _one_line_error(r, elapsed, "--prompt - (stdin): the prompt is empty")


@pytest.mark.parametrize("sub", ["serve", "chat"])
def test_serve_and_chat_check_the_same_flags(sub):
    r, elapsed = _run([str(BIN / "picospec-edge"), sub, "--draft", "tiny-random", "--top-p", "1.5"])
    _one_line_error(r, elapsed, f"picospec-edge {sub}: --top-p 1.5: must be in (0, 1]")
    r, elapsed = _run([str(BIN / "picospec-edge"), sub, "--draft", "tiny-random", "--mode", "cloud,sync"])
    _one_line_error(r, elapsed, "--mode 'cloud,sync': takes one mode here")


CLOUD_USAGE = [
    (["--max-sessions", "0"], "--max-sessions 0: must be at least 1"),
    (["--port", "70000"], "--port 70000: must be in 0..65535"),
    (["--target", "smollm3-135m"], "--target 'smollm3-135m': unknown model (did you mean smollm2-135m-instruct?)"),
    (["--peer-timeout-s", "0.1"], "--peer-timeout-s 0.1"),
]


@pytest.mark.parametrize("flags,message", CLOUD_USAGE, ids=[" ".join(f) for f, _ in CLOUD_USAGE])
def test_cloud_usage_errors_are_one_line_before_anything_loads(flags, message):
    r, elapsed = _run([str(BIN / "picospec-cloud"), "--target", "tiny-random", "--port", "0", *flags])
    _one_line_error(r, elapsed, f"picospec-cloud: {message}")


ARGPARSE_USAGE = [  # argparse's own errors: one line too (shared/interrupt.OneLineParser)
    (["picospec-edge", "--prompt", "hi", "--max-new-tokens", "abc"], "argument --max-new-tokens: invalid int value"),
    (["picospec-edge", "--draft", "tiny-random"], "one of the arguments --prompt --prompt-file is required"),
    (["picospec-edge", "--prompt", "hi", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["picospec-edge", "serve", "--port", "abc"], "argument --port: invalid int value"),
    (["picospec-edge", "chat", "--temperature", "warm"], "argument --temperature: invalid float value"),
    (["picospec-cloud", "--port", "abc"], "argument --port: invalid int value"),
]


@pytest.mark.parametrize("cmd,message", ARGPARSE_USAGE, ids=[" ".join(c) for c, _ in ARGPARSE_USAGE])
def test_argparse_errors_are_one_line_too(cmd, message):
    r, elapsed = _run([str(BIN / cmd[0]), *cmd[1:]])
    _one_line_error(r, elapsed, message)
    assert "--help lists the flags" in r.stderr


def test_a_cloud_refuses_a_port_in_use_at_once():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r, elapsed = _run([str(BIN / "picospec-cloud"), "--target", "tiny-random", "--port", str(port)])
    _one_line_error(r, elapsed, f"picospec-cloud: cannot listen on 127.0.0.1:{port}: Address already in use", code=1)


# ---- the console scripts against a real cloud: Ctrl-C, SIGTERM, serve's log ----------------------------------------

@pytest.fixture(scope="module")
def cloud():
    metrics_port = free_port()
    with cloud_process("tiny-random", "--metrics-port", str(metrics_port)) as (proc, address):
        yield address, metrics_port


def _active_sessions(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return float(re.search(r"^picospec_cloud_sessions_active (\S+)$", text, re.M).group(1))


def _wait_until_freed(metrics_port: int, within_s: float = 10.0) -> float:
    deadline = time.monotonic() + within_s
    while (active := _active_sessions(metrics_port)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return active


def _edge_process(server: str, *flags: str, stderr: int = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen([str(BIN / "picospec-edge"), "--server", server, "--draft", "tiny-random", "--threads",
                             "1", "--prompt", "once upon a time", "--max-new-tokens", "4000", "--ignore-eos", *flags],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_generation_is_one_line_and_frees_the_cloud_session(cloud, sig, status):
    address, metrics_port = cloud
    edge = _edge_process(address, "--mode", "pipeline")
    try:
        os.set_blocking(edge.stdout.fileno(), True)
        assert edge.stdout.read(8), "no generated text before the signal"  # mid-generation: text is streaming
        assert _active_sessions(metrics_port) == 1
        edge.send_signal(sig)
        _, err = edge.communicate(timeout=30)
    finally:
        edge.kill()
    assert edge.returncode == status, err
    assert err.strip().splitlines()[-1] == "picospec-edge: interrupted" and "Traceback" not in err, err
    assert _wait_until_freed(metrics_port) == 0


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> re.Match:
    """The first match of `pattern` in the file a process writes, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while not (found := re.search(pattern, path.read_text())) and time.monotonic() < deadline:
        assert proc.poll() is None, path.read_text()
        time.sleep(0.1)
    assert found, path.read_text()
    return found


SLOW_LOAD_EDGE = """
import sys, time
from picospec.edge_client import cli

def slow_load(config, on_tokenizer=None):  # a stand-in for a draft that takes a minute to load
    print("stand-in load started", file=sys.stderr, flush=True)
    time.sleep(60)

cli.load_draft = slow_load
cli.main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_draft_loads_is_one_line_at_once(tmp_path, sig, status):
    """The draft's load runs in a thread of its own beside the wait for the cloud (edge_client/cli.py:
    draft_and_cloud): a signal mid-load ends the program at once, one line, without waiting for the load."""
    err_path = tmp_path / "edge.err"
    with open(err_path, "w") as err:
        edge = subprocess.Popen([sys.executable, "-c", SLOW_LOAD_EDGE, "--server", f"127.0.0.1:{free_port()}",
                                 "--draft", "tiny-random", "--prompt", "hi"], stderr=err, text=True)
    try:
        _wait_for(err_path, "stand-in load started", edge, timeout=30)
        signalled = time.monotonic()
        edge.send_signal(sig)
        edge.wait(timeout=30)
        took = time.monotonic() - signalled
    finally:
        edge.kill()
    text = err_path.read_text()
    assert edge.returncode == status, text
    assert text.strip().splitlines()[-1] == "picospec-edge: interrupted" and "Traceback" not in text, text
    assert took < QUICK_S, (took, text)


def test_ctrl_c_while_waiting_for_the_cloud_is_one_line(tmp_path):
    err_path = tmp_path / "edge.err"
    with open(err_path, "w") as err:  # nothing listens at the port: the edge waits, saying "Ctrl-C to stop"
        edge = _edge_process(f"127.0.0.1:{free_port()}", stderr=err)
    try:
        _wait_for(err_path, "Ctrl-C to stop", edge, timeout=30)
        edge.send_signal(signal.SIGINT)
        edge.wait(timeout=30)
    finally:
        edge.kill()
    text = err_path.read_text()
    assert edge.returncode == 130, text
    assert text.strip().splitlines()[-1] == "picospec-edge: interrupted" and "Traceback" not in text, text


def _post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def _disconnect_mid_stream(base: str, model: str) -> None:
    """A client that reads the first streamed event and hangs up."""
    host, port = base.removeprefix("http://").split("/")[0].split(":")
    body = json.dumps({"model": model, "prompt": "once upon a time", "max_tokens": 3000, "stream": True,
                       "ignore_eos": True}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while b"data:" not in received:  # the headers may come first, the first event after them
            chunk = s.recv(4096)
            assert chunk, received
            received += chunk


def test_serve_logs_no_error_in_normal_operation_client_disconnects_included(cloud, tmp_path):
    address, metrics_port = cloud
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        serve = subprocess.Popen([str(BIN / "picospec-edge"), "serve", "--server", address, "--draft", "tiny-random",
                                  "--threads", "1", "--port", "0", "--max-new-tokens", "16"],
                                 stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        base, model = _wait_for(log_path, r"at (http://\S+)/v1", serve).group(1), "tiny-random"
        for i in range(6):
            out = _post(base, "/v1/completions", {"model": model, "prompt": "the sky is", "max_tokens": 8,
                                                 "mode": ["pipeline", "sync", "cloud"][i % 3]})
            assert out["choices"][0]["text"] is not None
            _disconnect_mid_stream(base, model)
        bad = urllib.request.Request(base + "/v1/completions", data=json.dumps(
            {"model": model, "prompt": "x", "top_p": 0}).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=30)
        assert e.value.code == 400
        assert _wait_until_freed(metrics_port) == 0  # every disconnected client's session freed
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=30)
    finally:
        serve.kill()
    text = log_path.read_text()
    for bad_line in ("ERROR", "Traceback", "never retrieved"):
        assert bad_line not in text, text


# ---- the docs say what the code does --------------------------------------------------------------------------------

def test_the_docs_match_the_behaviour():
    root = Path(__file__).resolve().parent.parent
    serve_doc, readme = (root / "docs/openai-server.md").read_text(), (root / "README.md").read_text()
    assert "pip install -e '.[serve]'" in serve_doc  # what works from a clone
    assert "--admission-wait-s" in serve_doc and "found within 2 s)" not in serve_doc.replace("starts (found within 2 s)", "")
    assert "refused at connect" not in readme and "--prompt-file PATH" in readme and "exit status 2" in readme
    # the tokenizer check runs before the draft's weights load (tests/test_startup.py), and the README says so
    assert "once the draft has loaded" not in readme and "before its weights do" in readme
    from picospec.edge_client.openai_server import REQUEST_WAIT_S
    from picospec.shared.config import EdgeConfig as Defaults
    assert REQUEST_WAIT_S == 2.0 and Defaults().admission_wait_s == 60.0 and Defaults().reconnect_s == 30.0
