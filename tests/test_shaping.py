"""netlab's pure parts, no root needed: the tc/iptables command builders, the method choice, the delay line's
scheduling, the throughput arithmetic, the subnet pick, and the measurement protocol over loopback."""
from __future__ import annotations

import random
import threading

import pytest

from picospec.netlab import measure
from picospec.netlab.netns import pick_subnet
from picospec.netlab.nfq_delay import DelayLine
from picospec.netlab.shaping import (Features, LinkSpec, ShapingUnsupported, choose_method, delay_stage_argv, netem_argvs,
                            nfqueue_rule_argv, plan_side, tbf_argv, tbf_sizes)

FULL = Features(netem=True, tbf=True, nfqueue=True, netfilterqueue=True)
NO_NETEM = Features(netem=False, tbf=True, nfqueue=True, netfilterqueue=True, notes=("no netem qdisc",))


def _after(argv: list[str], key: str) -> str:
    return argv[argv.index(key) + 1]


def test_link_spec_splits_rtt_and_assigns_rates_per_side():
    spec = LinkSpec(rtt_ms=50, up_mbit=2, down_mbit=10, loss=0.01)
    edge, cloud = spec.side("edge"), spec.side("cloud")
    assert (edge.rate_mbit, edge.one_way_ms, edge.loss) == (2, 25.0, 0.01)  # the edge's egress is the uplink
    assert (cloud.rate_mbit, cloud.one_way_ms) == (10, 25.0)
    assert LinkSpec(rtt_ms=10, up_mbit=0).side("edge").rate_mbit is None  # 0: unlimited
    for bad in (dict(rtt_ms=-1), dict(loss=1.0), dict(up_mbit=float("nan"))):
        with pytest.raises(ValueError):
            LinkSpec(**bad)


def test_method_prefers_netem_and_falls_back_to_tbf_plus_nfqueue():
    spec = LinkSpec(rtt_ms=50, up_mbit=10, down_mbit=10).side("edge")
    assert choose_method(spec, FULL) == "netem"
    assert choose_method(spec, NO_NETEM) == "tbf+nfqueue"
    assert choose_method(LinkSpec(up_mbit=10).side("edge"), NO_NETEM) == "tbf"
    assert choose_method(LinkSpec(rtt_ms=20).side("edge"), NO_NETEM) == "nfqueue"
    assert choose_method(LinkSpec(loss=0.1).side("edge"), NO_NETEM) == "nfqueue"  # loss needs the stage too
    assert choose_method(LinkSpec().side("edge"), Features()) == "none"


def test_missing_features_are_reported_not_papered_over():
    spec = LinkSpec(rtt_ms=50, up_mbit=10).side("edge")
    with pytest.raises(ShapingUnsupported, match="delay stage.*netfilterqueue"):
        choose_method(spec, Features(tbf=True, nfqueue=True, notes=("Python package netfilterqueue missing",)))
    with pytest.raises(ShapingUnsupported, match="no tbf"):
        choose_method(LinkSpec(up_mbit=10).side("edge"), Features(nfqueue=True, netfilterqueue=True))


def test_tbf_command_rate_burst_and_a_limit_that_grows_with_the_rtt():
    argv = tbf_argv("veth0", 10, 0)
    assert argv[:7] == ["tc", "qdisc", "replace", "dev", "veth0", "root", "tbf"]
    assert _after(argv, "rate") == "10000kbit"
    burst, limit = int(_after(argv, "burst")), int(_after(argv, "limit"))
    assert burst >= 4 * 1514 and limit >= burst + 10e6 / 8 * 0.05
    assert tbf_sizes(10, 50)[1] > tbf_sizes(10, 0)[1] >= 64 * 1024
    assert tbf_sizes(100, 0)[0] >= 100e6 / 8 / 250  # one HZ=250 tick's worth at high rates
    assert _after(tbf_argv("e", 0.1, 0), "rate") == "100kbit"


def test_netem_commands_put_delay_and_loss_at_the_root_and_tbf_below():
    root, child = netem_argvs("eth0", LinkSpec(rtt_ms=50, up_mbit=10, loss=0.02).side("edge"))
    assert root[:9] == ["tc", "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "netem"]
    assert _after(root, "delay") == "25ms" and _after(root, "loss") == "2%"
    assert int(_after(root, "limit")) >= 1000
    assert child[5:9] == ["parent", "1:1", "handle", "10:"] and _after(child, "rate") == "10000kbit"
    only_delay = netem_argvs("eth0", LinkSpec(rtt_ms=20).side("cloud"))
    assert len(only_delay) == 1 and "loss" not in only_delay[0] and _after(only_delay[0], "delay") == "10ms"


def test_tbf_plus_nfqueue_plan_delays_the_ingress():
    spec = LinkSpec(rtt_ms=50, up_mbit=10, down_mbit=5, loss=0.01).side("cloud")
    plan = plan_side("vpc1", spec, "tbf+nfqueue", python="/py", queue_num=3, seed=7)
    assert plan.method == "tbf+nfqueue"
    assert [_after(q, "rate") for q in plan.qdisc] == ["5000kbit"]  # the cloud's egress is the downlink
    assert plan.rule == nfqueue_rule_argv("vpc1", 3, "-A")
    assert plan.rule[plan.rule.index("PREROUTING") - 1] == "-A" and _after(plan.rule, "-i") == "vpc1"
    assert "--queue-bypass" not in plan.rule  # a dead stage must stop traffic, not let it through unshaped
    assert plan.unrule == nfqueue_rule_argv("vpc1", 3, "-D")
    assert plan.delay_stage == delay_stage_argv("/py", 3, 25.0, 0.01, 7)
    assert plan.delay_stage[:3] == ["/py", "-m", "picospec.netlab.nfq_delay"] and _after(plan.delay_stage, "--delay-ms") == "25"
    assert plan_side("d", spec, "none").qdisc == []
    with pytest.raises(ValueError):
        plan_side("d", spec, "htb-magic")


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Pkt:
    def __init__(self, n: int, log: list) -> None:
        self.n, self.log = n, log

    def accept(self) -> None:
        self.log.append(("accept", self.n))

    def drop(self) -> None:
        self.log.append(("drop", self.n))


def test_delay_line_holds_for_the_delay_and_keeps_order():
    clock, log = _Clock(), []
    line = DelayLine(0.025, clock=clock)
    for n in range(5):
        clock.t = n * 0.001
        line.push(_Pkt(n, log))
    assert line.next_due() == pytest.approx(0.025)
    assert line.release(0.0249) == 0 and log == []
    assert line.release(0.0265) == 2 and log == [("accept", 0), ("accept", 1)]
    line.flush()
    assert log == [("accept", n) for n in range(5)] and line.next_due() is None and line.accepted == 5


def test_delay_line_loss_is_seeded_and_about_right():
    def run(seed: int) -> list:
        log: list = []
        line = DelayLine(0.0, loss=0.2, seed=seed, clock=_Clock())
        for n in range(2000):
            line.push(_Pkt(n, log))
        line.flush()
        return log

    a, b = run(1), run(1)
    assert a == b and a != run(2)
    dropped = sum(1 for v, _ in a if v == "drop")
    assert 300 < dropped < 500
    assert [n for v, n in a if v == "accept"] == sorted(n for v, n in a if v == "accept")


def test_steady_rate_ignores_the_warm_up():
    # 1 MB: the first 200 KB arrive in one burst at t=0, then 100 KB every 0.1 s: 8 Mbit/s steady
    events = [(0.0, 200_000)] + [(0.1 * k, 200_000 + 100_000 * k) for k in range(1, 9)]
    assert measure.steady_rate_mbit(events) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        measure.steady_rate_mbit([(0.0, 10), (0.0, 20)])
    assert measure.bytes_for(10, 1.5) == 1_875_000 and measure.bytes_for(0.1) == 256 * 1024


def test_pick_subnet_avoids_host_routes():
    rng = random.Random(0)
    used = ["10.0.0.0/9", "172.17.0.0/16", "192.168.1.0/24"]  # half of 10/8 taken
    for _ in range(50):
        net = pick_subnet(used, rng)
        assert net.prefixlen == 24 and net.subnet_of(__import__("ipaddress").ip_network("10.128.0.0/9"))
    with pytest.raises(RuntimeError):
        pick_subnet(["10.0.0.0/8"], rng)


def test_measurement_protocol_over_loopback():
    with measure.Server("127.0.0.1", 0) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            port = srv.server_address[1]
            m = measure.measure("127.0.0.1", port, pings=5, up_bytes=4_000_000, down_bytes=4_000_000)
        finally:
            srv.shutdown()
    assert len(m.rtt_samples_ms) == 5 and 0 < m.rtt_ms < 50 and 0 < m.connect_ms < 50
    assert m.up_mbit > 50 and m.down_mbit > 50  # loopback: far faster than any shaped link here
