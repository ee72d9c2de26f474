"""Link shaping: detect what the kernel offers, build the tc/iptables commands, apply them on one side of a link.

A link joins an edge side and a cloud side. Each side shapes its own end:
- rate on its egress with tbf (edge egress = uplink, cloud egress = downlink);
- delay and loss: with netem, on its egress (netem as root, tbf as its child); without netem (the CI kernel
  has tbf/htb but no netem), on its INGRESS with an iptables NFQUEUE rule and the `nfq_delay` process, half
  the RTT each way. Holding packets on the sender's egress instead starves TCP (its small-queue limit counts
  the held bytes, measured 1.8 of 10 Mbit/s); on the receiver's ingress the skb is already orphaned.

The command builders are pure (argv lists) so they can be unit-tested without root; `probe_*` and `apply_side`
run them. `method` strings name what was used: "netem", "tbf+nfqueue", "tbf", "nfqueue" or "none".
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import select
import shutil
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Literal, Sequence

from picospec.netlab.procs import stop_process

Side = Literal["edge", "cloud"]
Argv = list[str]

# The delay stage runs as `python -m picospec.netlab.nfq_delay`; this directory makes that work even where netlab is
# not installed (a source checkout, a container that only copied the tree).
SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)

MTU_FRAME = 1514  # what tbf counts per full-size packet on an Ethernet-like device (veth, docker's eth0)


class ShapingUnsupported(RuntimeError):
    """The kernel or the userland lacks what a link spec needs; the message says what."""


@dataclass(frozen=True)
class LinkSpec:
    """What the link should look like end to end. Rates in Mbit/s (None or 0: unlimited); loss per direction."""

    rtt_ms: float = 0.0
    up_mbit: float | None = None    # edge -> cloud
    down_mbit: float | None = None  # cloud -> edge
    loss: float = 0.0

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or not math.isfinite(self.rtt_ms):
            raise ValueError(f"rtt_ms must be finite and >= 0, got {self.rtt_ms}")
        for name in ("up_mbit", "down_mbit"):
            v = getattr(self, name)
            if v is not None and (v < 0 or not math.isfinite(v)):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss is a probability in [0, 1), got {self.loss}")

    def side(self, side: Side) -> SideSpec:
        """One end's share: its egress rate, and half the RTT (applied on egress or ingress by the method)."""
        rate = self.up_mbit if side == "edge" else self.down_mbit
        return SideSpec(rate_mbit=rate or None, one_way_ms=self.rtt_ms / 2.0, loss=self.loss, rtt_ms=self.rtt_ms)


@dataclass(frozen=True)
class SideSpec:
    rate_mbit: float | None  # this side's egress rate
    one_way_ms: float        # delay each packet travelling towards (nfqueue) or away from (netem) this side gets
    loss: float
    rtt_ms: float            # the whole RTT, to size queues


@dataclass(frozen=True)
class Features:
    """What this kernel and userland can do; `notes` says why something is missing."""

    netem: bool = False
    tbf: bool = False
    nfqueue: bool = False         # the iptables NFQUEUE target works (kernel xt_NFQUEUE + iptables binary)
    netfilterqueue: bool = False  # the Python binding the delay stage needs is importable
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def delay_stage(self) -> bool:
        return self.nfqueue and self.netfilterqueue


def choose_method(spec: SideSpec, features: Features) -> str:
    """The shaping method for one side, or ShapingUnsupported naming what is missing. Pure."""
    wants_delay = spec.one_way_ms > 0 or spec.loss > 0
    wants_rate = spec.rate_mbit is not None
    if not wants_delay and not wants_rate:
        return "none"
    if features.netem:
        return "netem"
    if wants_rate and not features.tbf:
        raise ShapingUnsupported("no netem and no tbf qdisc in this kernel: cannot limit the rate; "
                                 + "; ".join(features.notes))
    if not wants_delay:
        return "tbf"
    if not features.delay_stage:
        raise ShapingUnsupported("no netem, and the NFQUEUE delay stage is unavailable: " + "; ".join(features.notes))
    return "tbf+nfqueue" if wants_rate else "nfqueue"


# ----------------------------------------------------------------------------------------------- pure builders

def _rate_bytes(mbit: float) -> float:
    return mbit * 1e6 / 8


def tbf_sizes(rate_mbit: float, rtt_ms: float) -> tuple[int, int]:
    """(burst, limit) in bytes for tbf at this rate.

    burst: at least a few full frames and one timer tick's worth at HZ=250, or tbf undershoots at high rates.
    limit: the bytes tbf may queue. TCP only fills the pipe when the bottleneck queue can hold about a
    bandwidth-delay product, and with the delay added elsewhere (the peer's ingress) tbf holds the standing
    queue, so it is sized to 50 ms plus two RTTs of data (the 512 KB that CONTAINERS.md measured covers 10 Mbit/s
    at 50 ms three times over).
    """
    rate = _rate_bytes(rate_mbit)
    burst = max(4 * MTU_FRAME, int(rate / 250))
    limit = max(64 * 1024, burst + int(rate * (0.050 + 2 * rtt_ms / 1000.0)))
    return burst, limit


def tbf_argv(dev: str, rate_mbit: float, rtt_ms: float, parent: Sequence[str] = ("root",)) -> Argv:
    burst, limit = tbf_sizes(rate_mbit, rtt_ms)
    return ["tc", "qdisc", "replace", "dev", dev, *parent, "tbf", "rate", f"{max(1, round(rate_mbit * 1000))}kbit",
            "burst", str(burst), "limit", str(limit)]


def _pct(p: float) -> str:
    return f"{p * 100:.6g}%"


def netem_argvs(dev: str, spec: SideSpec) -> list[Argv]:
    """netem (delay, loss) as root, with tbf as its child for the rate: the netem documentation's recipe."""
    if spec.rate_mbit is not None:
        # netem's limit counts packets: enough for the delay's worth of full-size frames at this rate, twice over
        limit = max(1000, math.ceil(2 * _rate_bytes(spec.rate_mbit) * spec.one_way_ms / 1000.0 / MTU_FRAME))
    else:
        limit = 10000
    netem: Argv = ["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem", "limit", str(limit)]
    if spec.one_way_ms > 0:
        netem += ["delay", f"{spec.one_way_ms:.6g}ms"]
    if spec.loss > 0:
        netem += ["loss", _pct(spec.loss)]
    out = [netem]
    if spec.rate_mbit is not None:
        out.append(tbf_argv(dev, spec.rate_mbit, spec.rtt_ms, parent=("parent", "1:1", "handle", "10:")))
    return out


def nfqueue_rule_argv(dev: str, queue_num: int, action: Literal["-A", "-D", "-C"] = "-A") -> Argv:
    """The rule that sends every packet arriving on `dev` to the delay stage. -w: wait for the xtables lock,
    which is one file for all namespaces. No --queue-bypass: if the stage dies, traffic stops (visibly)
    instead of flowing unshaped."""
    return ["iptables", "-w", "-t", "mangle", action, "PREROUTING", "-i", dev, "-j", "NFQUEUE",
            "--queue-num", str(queue_num)]


def delay_stage_argv(python: str, queue_num: int, delay_ms: float, loss: float = 0.0, seed: int = 0) -> Argv:
    return [python, "-m", "picospec.netlab.nfq_delay", "--queue", str(queue_num), "--delay-ms", f"{delay_ms:.6g}",
            "--loss", f"{loss:.6g}", "--seed", str(seed)]


@dataclass(frozen=True)
class Plan:
    """Everything one side needs, in order: qdisc commands, then (tbf+nfqueue) the delay stage, then its rule."""

    method: str
    qdisc: list[Argv]
    delay_stage: Argv | None = None
    rule: Argv | None = None
    unrule: Argv | None = None


def plan_side(dev: str, spec: SideSpec, method: str, *, python: str = sys.executable, queue_num: int = 0,
              seed: int = 0) -> Plan:
    """The commands for `method` on `dev` (no execution). Pure."""
    if method == "none":
        return Plan(method, [])
    if method == "netem":
        return Plan(method, netem_argvs(dev, spec))
    qdisc = [tbf_argv(dev, spec.rate_mbit, spec.rtt_ms)] if spec.rate_mbit is not None else []
    if method == "tbf":
        return Plan(method, qdisc)
    if method in ("tbf+nfqueue", "nfqueue"):
        return Plan(method, qdisc, delay_stage_argv(python, queue_num, spec.one_way_ms, spec.loss, seed),
                    nfqueue_rule_argv(dev, queue_num, "-A"), nfqueue_rule_argv(dev, queue_num, "-D"))
    raise ValueError(f"unknown shaping method {method!r}")


# ----------------------------------------------------------------------------------------------- probing

def _run(argv: Sequence[str], prefix: Sequence[str] = (), check: bool = True,
         timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join([*prefix, *argv])}` failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r


def _try(argv: Sequence[str], prefix: Sequence[str]) -> tuple[bool, str]:
    try:
        r = _run(argv, prefix, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return r.returncode == 0, (r.stderr or r.stdout).strip()


def binding_importable() -> bool:
    return importlib.util.find_spec("netfilterqueue") is not None


def probe_device(dev: str, prefix: Sequence[str] = (), *, python_has_binding: bool | None = None) -> Features:
    """Try each feature on `dev` and undo it: a qdisc kind the kernel lacks fails with "unknown", an NFQUEUE
    target it lacks fails at rule insertion. Detects rather than assumes. Leaves `dev` as it found it (its root
    qdisc is replaced and deleted, so use it before shaping, not after)."""
    notes: list[str] = []
    ok: dict[str, bool] = {}
    if shutil.which("tc") is None and not prefix:
        return Features(notes=("`tc` not found (install iproute2)",))
    for kind, args in (("netem", ["netem", "delay", "1ms"]), ("tbf", ["tbf", "rate", "1mbit", "burst", "6000", "limit", "65536"])):
        good, err = _try(["tc", "qdisc", "add", "dev", dev, "root", *args], prefix)
        ok[kind] = good
        if good:
            _try(["tc", "qdisc", "del", "dev", dev, "root"], prefix)
        else:
            notes.append(f"no {kind} qdisc ({err or 'tc failed'})")
    if shutil.which("iptables") is None:
        ok["nfqueue"] = False
        notes.append("`iptables` not found (apt-get install iptables)")
    else:
        good, err = _try(nfqueue_rule_argv(dev, 0, "-A"), prefix)
        ok["nfqueue"] = good
        if good:
            _try(nfqueue_rule_argv(dev, 0, "-D"), prefix)
        else:
            notes.append(f"iptables NFQUEUE target unusable ({err})")
    binding = binding_importable() if python_has_binding is None else python_has_binding
    if not binding:
        notes.append("Python package netfilterqueue missing (make netlab-deps)")
    return Features(netem=ok["netem"], tbf=ok["tbf"], nfqueue=ok["nfqueue"], netfilterqueue=binding, notes=tuple(notes))


def netns_usable() -> tuple[bool, str]:
    """Root, the `ip` tool, and `ip netns add` working; (ok, why not)."""
    if os.geteuid() != 0:
        return False, "not root (network namespaces and tc need root)"
    if shutil.which("ip") is None:
        return False, "`ip` not found (install iproute2)"
    name = f"nlprobe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    good, err = _try(["ip", "netns", "add", name], ())
    if not good:
        return False, f"`ip netns add` failed: {err}"
    _try(["ip", "netns", "del", name], ())
    return True, ""


_HOST_FEATURES: Features | None = None


def probe_host() -> Features:
    """The host kernel's features, probed on the loopback of a scratch namespace (never on a real device);
    cached per process. Requires netns_usable()."""
    global _HOST_FEATURES
    if _HOST_FEATURES is None:
        name = f"nlprobe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        _run(["ip", "netns", "add", name])
        try:
            _run(["ip", "-n", name, "link", "set", "lo", "up"])
            _HOST_FEATURES = probe_device("lo", ["ip", "netns", "exec", name])
        finally:
            _try(["ip", "netns", "del", name], ())
    return _HOST_FEATURES


# ----------------------------------------------------------------------------------------------- applying

@dataclass
class AppliedSide:
    """What `apply_side` set up; `stop()` ends the delay stage (the namespace's deletion removes the rest)."""

    method: str
    plan: Plan
    prefix: tuple[str, ...]
    delay_proc: subprocess.Popen[str] | None = None

    def stop(self) -> None:
        if self.plan.unrule is not None:
            _try(self.plan.unrule, self.prefix)  # first, so nothing is queued to a stage that is going away
        if self.delay_proc is not None:
            stop_process(self.delay_proc, timeout=5.0)


def _start_delay_stage(argv: Argv, prefix: Sequence[str], detach: bool, log: IO[str] | None,
                       timeout: float = 30.0) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SOURCE_ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    proc = subprocess.Popen([*prefix, *argv], stdout=subprocess.PIPE, stderr=log if log is not None else None,
                            text=True, env=env, start_new_session=detach)
    # it binds the queue before saying "ready": the rule must not send packets to a queue nobody reads
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("ready"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the delay stage did not start (`{' '.join(argv)}`): {line.strip() or 'no output'}")
    return proc


def apply_side(dev: str, spec: SideSpec, *, features: Features, prefix: Sequence[str] = (), python: str = sys.executable,
               queue_num: int = 0, seed: int = 0, detach: bool = False, log: IO[str] | None = None) -> AppliedSide:
    """Shape one side. `prefix` runs the commands elsewhere (`ip netns exec NS`). `detach`: the delay stage
    outlives this process (a container entrypoint that execs the server next)."""
    method = choose_method(spec, features)
    plan = plan_side(dev, spec, method, python=python, queue_num=queue_num, seed=seed)
    applied = AppliedSide(method, plan, tuple(prefix))
    try:
        for argv in plan.qdisc:
            _run(argv, prefix)
        if plan.delay_stage is not None:
            applied.delay_proc = _start_delay_stage(plan.delay_stage, prefix, detach, log)
            assert plan.rule is not None
            _run(plan.rule, prefix)
    except BaseException:
        applied.stop()
        raise
    return applied


# ----------------------------------------------------------------------------------------------- CLI

def _spec_from_args(a: argparse.Namespace) -> LinkSpec:
    return LinkSpec(rtt_ms=a.rtt_ms, up_mbit=a.up_mbit or None, down_mbit=a.down_mbit or None, loss=a.loss)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m picospec.netlab.shaping", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    det = sub.add_parser("detect", help="probe the features (on --dev if given, else in a scratch namespace)")
    det.add_argument("--dev")
    for name in ("plan", "apply"):
        s = sub.add_parser(name, help="print the commands" if name == "plan" else "shape --dev for --side, print the method")
        s.add_argument("--dev", required=True)
        s.add_argument("--side", choices=["edge", "cloud"], required=True)
        s.add_argument("--rtt-ms", type=float, default=0.0)
        s.add_argument("--up-mbit", type=float, default=0.0, help="edge -> cloud rate; 0: unlimited")
        s.add_argument("--down-mbit", type=float, default=0.0, help="cloud -> edge rate; 0: unlimited")
        s.add_argument("--loss", type=float, default=0.0, help="drop probability per packet, each direction")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--method", help="plan: the method to print (default: netem)")
    ap = sub.choices["apply"]
    ap.add_argument("--detach", action="store_true", help="leave the delay stage running after this exits")
    ap.add_argument("--log", help="the delay stage's stderr goes here (default: this process's stderr)")
    a = p.parse_args(argv)

    if a.cmd == "detect":
        if a.dev:
            f = probe_device(a.dev)
        else:
            ok, why = netns_usable()
            if not ok:
                print(f"cannot probe: {why}", file=sys.stderr)
                return 2
            f = probe_host()
        print(json.dumps({**asdict(f), "delay_stage": f.delay_stage}))
        return 0

    spec = _spec_from_args(a).side(a.side)
    if a.cmd == "plan":
        plan = plan_side(a.dev, spec, a.method or "netem", seed=a.seed)
        for cmd in [*plan.qdisc, *([plan.delay_stage, plan.rule] if plan.delay_stage else [])]:
            print(" ".join(cmd))
        return 0

    features = probe_device(a.dev)
    try:
        log = open(a.log, "a") if a.log else None
        applied = apply_side(a.dev, spec, features=features, seed=a.seed, detach=a.detach, log=log)
    except ShapingUnsupported as e:
        print(f"shaping: unsupported: {e}", file=sys.stderr)
        return 3
    pid = f" (delay stage pid {applied.delay_proc.pid})" if applied.delay_proc else ""
    print(f"shaping: {a.dev} side={a.side} method={applied.method} rate={spec.rate_mbit or 'unlimited'} Mbit/s "
          f"one-way={spec.one_way_ms:g} ms loss={spec.loss:g}{pid}", flush=True)
    if applied.delay_proc is not None and not a.detach:
        try:
            applied.delay_proc.wait()  # foreground: shape until interrupted
        except KeyboardInterrupt:
            pass
        applied.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
