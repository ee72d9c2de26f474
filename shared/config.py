"""Configuration: dataclasses are the one source of defaults; CLI flags and environment variables override them.

Each field's metadata gives its help text; its environment variable is PICOSPEC_<FIELD> (upper case).
Precedence: CLI flag > environment variable > dataclass default.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import MISSING, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

VERIFY_MODES = ("dense", "split-topk", "split-exact", "coupled")
EXACT_VERIFY_MODES = ("dense", "split-exact", "coupled")  # split-topk is the paper's APPROXIMATE sampler
# cloud: target alone; edge: draft alone; sync: stop-and-wait; pipeline: ours (drafting ahead, adaptive length,
# decode-ahead); picospec: the paper's configuration (pipeline, split-topk K=10, draft length 4: APPROXIMATE)
# early-exit: stop-and-wait plus pre-drafting from the cloud's early-exit hints (the second paper's system)
EDGE_MODES = ("cloud", "edge", "sync", "early-exit", "pipeline", "picospec")
SPECULATIVE_MODES = ("sync", "early-exit", "pipeline", "picospec")
PIPELINED_MODES = ("pipeline", "picospec")  # draft ahead while batches are in flight; the others stop and wait
HINTED_MODES = ("early-exit",)               # early-exit hints on unless --hints off
PARTITION_POLICIES = ("wait", "edge")         # --on-partition: what a break in the link does (edge_client/resume.py)
DEVICE_MAPS = ("none", "auto", "balanced")     # --device-map: none = the whole target on --device


def opt(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None, secret: bool = False) -> Any:
    """A configuration field. `secret`: left out of the dataclass's repr, so a logged config never shows it."""
    return field(default=default, repr=not secret, metadata={"help": help, "choices": choices, "flag": flag})


PEER_TIMEOUT_HELP = ("seconds of silence from the peer (a frozen process, a dead link) before its connection is "
                     "dropped: gRPC keepalive pings every half of it, each answered within the other half (at least 2)")


@dataclass
class ServingLimits:
    """Bounds on what a peer may ask for; every allocation that input controls is bounded by one of these."""

    max_draft_len: int = opt(32, "most draft tokens per batch")
    max_context: int = opt(8192, "most tokens (prompt + generated) per session")
    max_new_tokens: int = opt(4096, "most generated tokens per session")
    max_sessions: int = opt(8, "concurrent sessions; more are refused with RESOURCE_EXHAUSTED")
    max_sessions_per_client: int = opt(0, "concurrent sessions of one client (its token's name, else its TLS "
                                       "certificate's common name, else its IP address); 0 = only --max-sessions")
    max_message_mb: int = opt(16, "largest gRPC message accepted, MiB; raised to fit the largest dense batch "
                              "--max-draft-len allows (32 rows over Qwen's 151,936 tokens: 18.5 MiB)")
    max_residual_top_k: int = opt(256, "most top-K entries a split-mode edge may ask for")
    max_tail_samples: int = opt(256, "most tail draws per split-exact rejection an edge may ask for")
    verify_budget: float = opt(1.0, "a session's verification budget: the most cloud compute it may spend per token, "
                               "in decode steps (the cloud alone's cost), beyond a small slack; past it the cloud "
                               "verifies fewer drafts (in coupled or greedy down to decoding the token itself, else "
                               "down to one per pass), never changing the output "
                               "(docs/design.md §4.6); 0 = unlimited")
    verify_budget_slack: int = opt(16, "decode steps of compute a session may spend beyond --verify-budget (to learn "
                                   "its acceptance before its tokens have earned it any)")


@dataclass
class CloudConfig(ServingLimits):
    target: str = opt("qwen2.5-coder-1.5b-instruct", "target model name (see README: models)")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0: every interface; then use TLS and tokens, "
                    "deploy/tls.md)")
    port: int = opt(50051, "port to listen on")
    device: str = opt("cpu", "torch device", choices=("cpu", "cuda"))
    device_map: str = opt("none", "spread the target over every GPU, layer by layer, for a model too big for one "
                          "(transformers' device_map via accelerate: auto, or balanced; none = all of it on --device, "
                          "which a map replaces); not with :int8", choices=DEVICE_MAPS)
    dtype: str = opt("float32", "weights dtype", choices=("float32", "float16", "bfloat16"))
    threads: int = opt(0, "torch intra-op threads, or llama.cpp's (0 = torch default; llama.cpp: the cores this process "
                       "may use)")
    engine: str = opt("auto", "target backend: static (preallocated KV slots, CUDA graphs per pass size on a GPU), hf "
                      "(transformers' own cache), llama.cpp (the GGUF as shipped, on the CPU: a built-in name or a .gguf "
                      "path; each session its own llama.cpp context, or with --batching on a sequence of one shared "
                      "context), auto = static on cuda or with --batching on, llama.cpp on a cpu for a GGUF target "
                      "when llama-cpp-python is installed, else hf",
                      choices=("auto", "static", "hf", "llama.cpp"))
    batching: str = opt("auto", "verify every session's ready drafts in one pass of the static engine or one llama.cpp "
                        "decode call (on), or each session's passes one after another (off); auto = on with the static "
                        "engine", choices=("auto", "on", "off"))
    max_batch_tokens: int = opt(512, "batching: most tokens in one pass across sessions (a longer row runs alone)")
    max_wait_ms: float = opt(250.0, "batching: a session's work should wait at most this long for a pass; waits "
                             "past it are counted (picospec_cloud_batch_wait_seconds)")
    batch_hold: float = opt(0.1, "batching: while fewer rows are queued than sessions are open, a free engine waits "
                            "up to this fraction of its last pass (and --max-wait-ms at most) for the sessions it "
                            "just served to submit again, so that they share the next pass (0 = never wait)")
    verify_modes: str = opt(",".join(VERIFY_MODES), "verification modes this server offers (comma-separated)")
    residual_top_k: int = opt(10, "split modes: top-K entries of p sent on a rejection, unless the edge asks")
    tail_samples: int = opt(4, "split-exact: tail draws sent with each rejection, unless the edge asks")
    exit_layer: int = opt(0, "early-exit hints: default exit layer for edges that do not name one "
                          "(0 = three quarters of the target's depth)")
    tls_cert: str = opt("", "PEM certificate chain to serve TLS with (with --tls-key; both, and --tls-ca, "
                       "reloaded on SIGHUP); empty = plaintext")
    tls_key: str = opt("", "PEM private key of --tls-cert")
    tls_ca: str = opt("", "PEM CA certificates: require every client to present a certificate they signed (mutual TLS)")
    auth_tokens: str = opt("", "file of 'client-name token' lines: every call must carry one of the tokens "
                           "(reloaded on SIGHUP; deploy/tls.md)")
    peer_timeout_s: float = opt(5.0, PEER_TIMEOUT_HELP)
    metrics_port: int = opt(0, "port for Prometheus metrics over plain HTTP (/metrics) on --host; 0 = off "
                            "(docs/design.md §14)")
    grace_s: float = opt(30.0, "on SIGTERM: seconds running sessions get to finish while no new ones start; the "
                         "rest are then ended UNAVAILABLE (a second SIGTERM or SIGINT stops at once)")
    download: bool = opt(False, "let a model name that is a Hugging Face hub id (ORG/NAME) be fetched from the hub; "
                         "without it only the built-ins, tiny-random, random:SHAPE, local directories and .gguf files "
                         "are taken, and a typo is refused at once")

    @property
    def device_mapped(self) -> bool:
        """--device-map spreads the target over devices (its weights then are not all on --device)."""
        return self.device_map not in ("", "none")

    @property
    def offered_modes(self) -> tuple[str, ...]:
        modes = tuple(m.strip() for m in self.verify_modes.split(",") if m.strip())
        unknown = [m for m in modes if m not in VERIFY_MODES]
        if unknown:
            raise ValueError(f"unknown verify mode {unknown[0]!r}; choose from {', '.join(VERIFY_MODES)}")
        return modes


@dataclass
class EdgeConfig:
    server: str = opt("localhost:50051", "cloud address host:port; several replicas of one target: host:port,host:port "
                       "or a gRPC target such as dns:///name:port, balanced round_robin (deploy/README.md)")
    draft: str = opt("qwen2.5-coder-0.5b-instruct", "draft model name (see README: models)")
    mode: str = opt("pipeline", "decoding mode: cloud, edge, sync, early-exit, pipeline, picospec (the paper's; APPROXIMATE); "
                    "a comma-separated list runs each and prints a table")
    verify: str = opt("coupled", "verification mode: coupled (the default: exact, token ids only each way), dense (exact, "
                      "the draft's whole q up: ~0.5 MB a token under sampling), split-topk (the PicoSpec paper's; "
                      "APPROXIMATE), split-exact (exact, scalars up, top-K + tail draws down)", choices=VERIFY_MODES)
    residual_top_k: int = opt(10, "split modes: top-K entries of p the cloud sends on a rejection")
    tail_samples: int = opt(4, "split-exact: tail draws the cloud sends with each rejection")
    draft_len: int = opt(0, "draft tokens per batch; 0 = chosen online in pipeline mode (docs/design.md §4.4), 4 in sync mode")
    max_draft_len: int = opt(12, "longest draft batch the online choice may pick")
    draft_confidence: float = opt(0.2, "pipeline: end a batch and wait when the token just drafted is unlikely to be "
                                  "accepted: the measured acceptance of drafts this sure (its top-1 probability "
                                  "until measured) below this")
    tree_budget: int = opt(0, "coupled: most nodes per token tree (the draft's choice plus alternatives where it is "
                           "unsure, verified in one pass; docs/design.md §3.7), capped by the cloud's --max-draft-len; "
                           "0 = chains. Trees run stop-and-wait, without decode-ahead")
    decode_ahead: str = opt("auto", "pipeline: the cloud decodes on its own when it has nothing to verify "
                            "(auto = with coupled or greedy, where its tokens match the drafts)", choices=("auto", "on", "off"))
    hints: str = opt("auto", "early-exit hints from the cloud's intermediate layer: the edge pre-drafts from the "
                     "expected outcome (auto = in early-exit mode)", choices=("auto", "on", "off"))
    exit_layer: int = opt(0, "early-exit layer of the target, 1-based (0 = the cloud's default)")
    exit_threshold: float = opt(0.5, "early-exit: least tentative top-1 probability for the cloud to send a hint")
    max_new_tokens: int = opt(128, "tokens to generate at most")
    temperature: float = opt(0.0, "sampling temperature; 0 = greedy")
    top_k: int = opt(0, "top-k cut before sampling; 0 = off")
    top_p: float = opt(1.0, "top-p (nucleus) cut before sampling; 1 = off")
    seed: int = opt(0, "session seed: randomness is a pure function of (seed, position)")
    ignore_eos: bool = opt(False, "keep generating past end-of-sequence tokens (benchmarks, tests)")
    download: bool = opt(False, "let a model name that is a Hugging Face hub id (ORG/NAME) be fetched from the hub; "
                         "without it only the built-ins, tiny-random, random:SHAPE, local directories and .gguf files "
                         "are taken, and a typo is refused at once")
    draft_engine: str = opt("auto", "what runs the draft: llama.cpp (the GGUF as shipped, no float32 copy; a built-in "
                            "name or a .gguf path), torch (transformers; needed for :int8 and :layers=N), "
                            "auto = llama.cpp where the draft is a GGUF and llama-cpp-python is installed, else torch",
                            choices=("auto", "llama.cpp", "torch"))
    device: str = opt("cpu", "torch device for the draft", choices=("cpu", "cuda"))
    threads: int = opt(0, "torch intra-op threads, or llama.cpp's (0 = torch default; llama.cpp: the cores this process "
                       "may use)")
    gpu_layers: int = opt(0, "a llama.cpp draft's layers offloaded to the GPU (a CUDA, Metal or Vulkan build of "
                          "llama-cpp-python; -1 = all); 0 = the CPU only")
    compress: bool = opt(True, "zstd-compress distribution payloads")
    tls: bool = opt(False, "talk TLS to the cloud (implied by --tls-ca; without --tls-ca the system's roots verify it)")
    tls_ca: str = opt("", "PEM CA certificates that verify the cloud's certificate")
    tls_cert: str = opt("", "PEM client certificate chain, for a cloud that requires one (with --tls-key)")
    tls_key: str = opt("", "PEM private key of --tls-cert")
    tls_server_name: str = opt("", "name to verify the cloud's certificate against when --server's host is not in "
                               "it (e.g. an IP address), or its list names several hosts")
    token: str = opt("", "access token for a cloud started with --auth-tokens (prefer the environment variable: "
                     "flags show in `ps`)", secret=True)
    peer_timeout_s: float = opt(5.0, PEER_TIMEOUT_HELP)
    wait_ready_s: float = opt(60.0, "seconds to wait for the cloud to come up, retrying and saying so on stderr")
    admission_wait_s: float = opt(60.0, "seconds to keep asking a cloud at its session limit (RESOURCE_EXHAUSTED) "
                                  "for a slot, at the interval it hints, saying so on stderr; 0 = give up at once")
    reconnect_s: float = opt(30.0, "when the connection breaks mid-generation, seconds to keep reconnecting (with "
                             "backoff) and resume from the tokens already committed; 0 = never resume, fail at once")
    on_partition: str = opt("wait", "when the cloud is unreachable mid-generation: wait = reconnect for up to "
                            "--reconnect-s, keeping the output exact, then fail; edge = the local draft goes on alone "
                            "(its tokens marked, the generation NOT exact) while the edge reconnects for up to "
                            "--reconnect-s in the background, and speculation resumes when the cloud is back; the "
                            "draft finishes the generation if it never is", choices=PARTITION_POLICIES)
    timeout_s: float = opt(0.0, "deadline for one generation, seconds; 0 = scaled to the work: "
                           "60 s + --timeout-per-token-s x max_new_tokens + 0.05 s per prompt token")
    timeout_per_token_s: float = opt(2.0, "with --timeout-s 0: seconds allowed per token asked for (a 1.5B target "
                                     "decodes ~0.5 s a token on one CPU core)")

    def deadline_s(self, prompt_tokens: int) -> float:
        """The deadline of one generation: the one set, or one that grows with the tokens asked for."""
        if self.timeout_s > 0:
            return self.timeout_s
        return 60.0 + self.timeout_per_token_s * self.max_new_tokens + 0.05 * prompt_tokens


def env_name(f: dataclasses.Field) -> str:
    return "PICOSPEC_" + f.name.upper()


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {s!r}")


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field, e.g. draft_len -> --draft-len; the default shown is the dataclass default."""
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} [env {env_name(f)}; default {f.default}]"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            conv = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(flag, dest=f.name, type=conv, default=None, choices=f.metadata.get("choices"), help=help_text)


def config_from_args(cls: type[T], ns: argparse.Namespace, environ: dict[str, str] | None = None) -> T:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        cli = getattr(ns, f.name, None)
        if cli is not None:
            values[f.name] = cli
        elif env_name(f) in environ:
            raw = environ[env_name(f)]
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            try:
                values[f.name] = {"int": int, "float": float, "bool": _parse_bool}.get(kind, str)(raw)
            except ValueError as e:
                raise SystemExit(f"{env_name(f)}={raw!r}: {e}") from None
            choices = f.metadata.get("choices")
            if choices and values[f.name] not in choices:
                raise SystemExit(f"{env_name(f)}={raw!r}: choose from {', '.join(choices)}")
        elif f.default is MISSING:
            raise SystemExit(f"missing required setting --{f.name.replace('_', '-')}")
    return cls(**values)


def with_mode_preset(mode: str, cfg: "EdgeConfig") -> "EdgeConfig":
    """A mode that is a fixed configuration overrides the settings it fixes: `picospec` is the paper's (split-topk
    with K=10, draft length 4, no decode-ahead: APPROXIMATE), whatever else is set."""
    if mode == "picospec":
        return dataclasses.replace(cfg, verify="split-topk", residual_top_k=10, draft_len=4, decode_ahead="off")
    return cfg


# ---- argument checks: one place for the CLI (exit 2), the Python API (ValueError) and the OpenAI server (400) -------

MIN_TEMPERATURE = 1e-4   # below it a softmax of float32 logits overflows to one-hot (shared/sampling.py's floor)
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20
MAX_SEED = (1 << 64) - 1  # the session seed is a uint64 on the wire


class ConfigError(ValueError):
    """A setting outside what it allows. `field`: the config field (its flag is --field-name); str() names the flag,
    the value and what is allowed, in one line."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{flag_of(field)} {value!r}: {allowed}")


def flag_of(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


@dataclass(frozen=True)
class Range:
    """The values a numeric setting allows: low..high (None: unbounded), `low_open` excludes low, `or_zero` admits 0
    as an off switch besides the range. `describe()` is what the error says."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    or_zero: bool = False

    def admits(self, value: float) -> bool:
        if value != value:  # NaN passes no comparison: refused
            return False
        if self.or_zero and value == 0:
            return True
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            rule = f"above {low}" if self.low_open else f"at least {low}"
        elif isinstance(self.low, int) and isinstance(self.high, int):
            rule = f"in {low}..{high}"
        else:
            rule = f"in ({low}, {high}]" if self.low_open else f"in [{low}, {high}]"
        return "must be " + ("0 or " if self.or_zero else "") + rule


def _number(x: float | None) -> str:
    return "" if x is None else str(x) if isinstance(x, int) else f"{x:g}"


SECONDS = Range(0.0)  # a wait or deadline; 0 = its documented meaning (none, or scaled)
EDGE_RANGES: dict[str, Range] = {
    "max_new_tokens": Range(1),
    "temperature": Range(MIN_TEMPERATURE, MAX_TEMPERATURE, or_zero=True),
    "top_p": Range(0.0, 1.0, low_open=True),
    "top_k": Range(0, MAX_TOP_K),
    "seed": Range(0, MAX_SEED),
    "draft_len": Range(0), "max_draft_len": Range(1), "tree_budget": Range(0),
    "residual_top_k": Range(0), "tail_samples": Range(0), "exit_layer": Range(0),  # 0 = the cloud's default
    "exit_threshold": Range(0.0, 1.0), "draft_confidence": Range(0.0, 1.0), "threads": Range(0),
    "gpu_layers": Range(-1),
    "wait_ready_s": SECONDS, "admission_wait_s": SECONDS, "reconnect_s": SECONDS, "timeout_s": SECONDS,
    "timeout_per_token_s": SECONDS,
}
CLOUD_RANGES: dict[str, Range] = {
    "port": Range(0, 65535), "metrics_port": Range(0, 65535), "threads": Range(0), "exit_layer": Range(0),
    "max_draft_len": Range(1), "max_context": Range(2), "max_new_tokens": Range(1), "max_sessions": Range(1),
    "max_sessions_per_client": Range(0), "max_message_mb": Range(1), "max_residual_top_k": Range(1),
    "max_tail_samples": Range(1), "residual_top_k": Range(1), "tail_samples": Range(1),
    "verify_budget": Range(0.0), "verify_budget_slack": Range(0), "max_batch_tokens": Range(1),
    "max_wait_ms": Range(0.0), "batch_hold": Range(0.0, 1.0), "grace_s": SECONDS,
}


def check_ranges(config: object, ranges: dict[str, Range]) -> None:
    """ConfigError for the first field of `config` outside its range (in the table's order)."""
    for name, allowed in ranges.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not allowed.admits(value):
            raise ConfigError(name, value, allowed.describe())


def edge_modes(mode: str) -> list[str]:
    """--mode's comma-separated list, each one checked (ConfigError naming the first unknown one)."""
    modes = [m.strip() for m in mode.split(",") if m.strip()]
    for m in modes or [mode]:
        if m not in EDGE_MODES:
            raise ConfigError("mode", m, f"choose from {', '.join(EDGE_MODES)} (a comma-separated list runs each)")
    return modes


def check_edge_config(config: "EdgeConfig", *, one_mode: bool = False) -> None:
    """Every setting of an EdgeConfig that cannot work, refused before any model loads or connection opens
    (ConfigError or ConnectionSettingsError, both ValueErrors). `one_mode`: --mode must name one mode (serve, chat,
    a generation). Names in --server are not resolved here: a cloud still coming up is waited for."""
    from picospec.shared.connection import check_server, ping_schedule_ms  # grpc's import: not at config's

    check_ranges(config, EDGE_RANGES)
    modes = edge_modes(config.mode)
    if one_mode and len(modes) != 1:
        raise ConfigError("mode", config.mode, f"takes one mode here: {', '.join(EDGE_MODES)}")
    if config.verify not in VERIFY_MODES:
        raise ConfigError("verify", config.verify, f"choose from {', '.join(VERIFY_MODES)}")
    ping_schedule_ms(config.peer_timeout_s)
    check_server(config.server)


def check_model_name(config: "EdgeConfig | CloudConfig", field_name: str) -> None:
    """ConfigError where the model named by `field_name` (draft, target) cannot be found here (model_names.py)."""
    from picospec.shared.model_names import model_name_problem

    name = getattr(config, field_name)
    problem = model_name_problem(name, config.download)
    if problem is not None:
        raise ConfigError(field_name, name, problem)


def check_edge_startup(config: "EdgeConfig", *, one_mode: bool = False) -> None:
    """What a front end (the CLI, chat, serve) checks before it loads the draft: check_edge_config, the draft's name,
    and that its engine is installed (a torch draft on an edge installed without torch)."""
    from picospec.shared.model_names import TORCH_MISSING, ModelError, resolve_engine, torch_installed

    check_edge_config(config, one_mode=one_mode)
    check_model_name(config, "draft")
    try:
        engine = resolve_engine(config.draft, config.draft_engine)
    except ModelError as e:
        raise ConfigError("draft_engine", config.draft_engine, str(e)) from None
    if engine == "torch" and not torch_installed():
        raise ConfigError("draft", config.draft, f"a torch draft: it {TORCH_MISSING}")
    if config.gpu_layers and engine != "llama.cpp":
        raise ConfigError("gpu_layers", config.gpu_layers, "0 for a torch draft (it takes the GPU with --device cuda)")
    if config.gpu_layers and engine == "llama.cpp":
        from picospec.shared.llama_backend import gpu_offload_refusal

        refusal = gpu_offload_refusal(config.gpu_layers)
        if refusal:
            raise ConfigError("gpu_layers", config.gpu_layers, f"0: {refusal}")


def check_cloud_config(config: "CloudConfig") -> None:
    """The CloudConfig's numbers, mode list and target name, refused before the model loads (ConfigError, a
    ValueError)."""
    check_ranges(config, CLOUD_RANGES)
    check_model_name(config, "target")
    try:
        config.offered_modes
    except ValueError:
        raise ConfigError("verify_modes", config.verify_modes, f"a comma-separated list of {', '.join(VERIFY_MODES)}")
