"""deploy/k8s and deploy/envoy checked against the code they deploy (issue 12 item 4): every YAML parses; the cloud's
container args parse with picospec-cloud's own parser and its env names CloudConfig fields; the probes run our
health probe (or the kubelet's gRPC probe) against the port the container serves and a service the cloud
registers; the scrape annotations name --metrics-port; the termination budget covers the drain; the Services
select the pods and ports they claim; Envoy speaks HTTP/2 upstream, health-checks a registered service and
leaves one-generation streams alone. Each check is a function returning problems, and each is shown to fail on
a planted mistake, so a green run means the files agree with the code, not that the checks are blind.
"""
from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from picospec.cloud_server import health_probe
from picospec.cloud_server.cli import build_parser as cloud_parser
from picospec.cloud_server.drain import ENDED_S
from picospec.cloud_server.grpc_setup import HEALTH_SERVICES
from picospec.shared.config import CloudConfig, config_from_args, env_name
from picospec.shared.connection import MIN_PING_INTERVAL_MS
from tests.conftest import run, serving

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
IMAGE_ENV = {"PICOSPEC_CACHE"}  # PICOSPEC_* variables that are not CloudConfig fields (shared/models.py cache_root)

Docs = dict[str, list[dict[str, Any]]]


def load_all() -> Docs:
    return {str(p.relative_to(ROOT)): [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
            for p in sorted([*DEPLOY.rglob("*.yaml"), ROOT / "docker-compose.yml"])}


def find(docs: Docs, file: str, kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs[file] if d.get("kind") == kind and d["metadata"]["name"] == name)


def cloud_container(docs: Docs) -> dict[str, Any]:
    pod = find(docs, "deploy/k8s/cloud.yaml", "Deployment", "picospec-cloud")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "cloud")


def cloud_config(container: dict[str, Any]) -> CloudConfig:
    """The CloudConfig picospec-cloud would run with: its args through its own parser, its env as environment."""
    args = container["args"]
    assert args[0] == "picospec-cloud", args
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    return config_from_args(CloudConfig, cloud_parser().parse_args(args[1:]), env)


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, named or numbered, as the container's number (KeyError: no such port)."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


# ---- the checks ----------------------------------------------------------------------------------------------------

def cloud_problems(docs: Docs) -> list[str]:
    out: list[str] = []
    deployment = find(docs, "deploy/k8s/cloud.yaml", "Deployment", "picospec-cloud")
    pod = deployment["spec"]["template"]
    c = cloud_container(docs)
    flags = {s for a in cloud_parser()._actions for s in a.option_strings}
    out += [f"unknown flag {a}" for a in c["args"] if a.startswith("--") and a not in flags]
    try:
        config = cloud_config(c)
    except SystemExit as e:
        return out + [f"args do not parse (picospec-cloud exits {e.code}; its message is on stderr)"]
    fields = {env_name(f) for f in CloudConfig.__dataclass_fields__.values()}
    out += [f"env {e['name']} is no setting" for e in c.get("env", [])
            if e["name"].startswith("PICOSPEC_") and e["name"] not in fields | IMAGE_ENV]
    grpc_port = port_number(c, "grpc")
    if grpc_port != config.port:
        out.append(f"containerPort grpc {grpc_port} != --port {config.port}")
    if config.host not in ("0.0.0.0", "::"):
        out.append(f"--host {config.host}: not reachable from other pods")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c.get(kind)
        if probe is None:
            out.append(f"no {kind}")
            continue
        if "grpc" in probe:
            out += probe_grpc_problems(kind, probe["grpc"], c, config)
        else:
            out += probe_exec_problems(kind, probe["exec"]["command"], config, c, pod["spec"], docs)
        if "exec" in probe and probe["timeoutSeconds"] <= 3:  # health_probe's own deadline (--timeout-s 3)
            out.append(f"{kind}: timeoutSeconds {probe['timeoutSeconds']} under the probe's own 3 s deadline")
    if c["livenessProbe"].get("exec") and "--live" not in c["livenessProbe"]["exec"]["command"]:
        out.append("livenessProbe without --live: a draining cloud (NOT_SERVING) would be restarted")
    ann = pod["metadata"].get("annotations", {})
    if ann.get("prometheus.io/scrape") != "true":
        out.append("no prometheus.io/scrape annotation")
    if not config.metrics_port or str(config.metrics_port) != ann.get("prometheus.io/port"):
        out.append(f"prometheus.io/port {ann.get('prometheus.io/port')} != --metrics-port {config.metrics_port}")
    if ann.get("prometheus.io/path") != "/metrics":
        out.append("prometheus.io/path is not /metrics")
    if port_number(c, "metrics") != config.metrics_port:
        out.append("containerPort metrics != --metrics-port")
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    budget = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if budget <= pre_stop_s + config.grace_s + ENDED_S:
        out.append(f"terminationGracePeriodSeconds {budget} <= preStop {pre_stop_s} + --grace-s {config.grace_s} "
                   f"+ {ENDED_S} s: SIGKILL before the drain ends")
    for where in ("requests", "limits"):
        if "nvidia.com/gpu" not in c["resources"].get(where, {}):
            out.append(f"no nvidia.com/gpu in resources.{where}")
    out += secret_mount_problems(c, pod["spec"], docs, [e["value"] for e in c.get("env", [])
                                                        if e["name"].startswith("PICOSPEC_TLS")
                                                        or e["name"] == "PICOSPEC_AUTH_TOKENS"])
    if deployment["spec"]["selector"]["matchLabels"].items() - pod["metadata"]["labels"].items():
        out.append("the Deployment's selector does not match its pods")
    return out


def probe_exec_problems(kind: str, command: list[str], config: CloudConfig, c: dict[str, Any],
                        pod_spec: dict[str, Any], docs: Docs) -> list[str]:
    out = []
    if command[:3] != ["python3", "-m", "picospec.cloud_server.health_probe"]:
        return [f"{kind} runs {command[:3]}, not the health probe"]
    try:
        args = health_probe.build_parser().parse_args(command[3:])
    except SystemExit:
        return [f"{kind}: health_probe refuses {command[3:]}"]
    if args.address.rpartition(":")[2] != str(config.port):
        out.append(f"{kind} asks {args.address}, the cloud serves port {config.port}")
    if args.service not in HEALTH_SERVICES:
        out.append(f"{kind} asks about service {args.service!r}, the cloud registers {HEALTH_SERVICES}")
    if bool(config.tls_cert) != bool(args.tls_dir or args.tls_ca):
        out.append(f"{kind}: the cloud {'serves' if config.tls_cert else 'does not serve'} TLS, the probe disagrees")
    if config.tls_ca and not (args.tls_dir or args.tls_cert):
        out.append(f"{kind}: the cloud requires a client certificate, the probe has none")
    out += secret_mount_problems(c, pod_spec, docs, list(health_probe.tls_files(args)))
    return out


def probe_grpc_problems(kind: str, grpc: dict[str, Any], c: dict[str, Any], config: CloudConfig) -> list[str]:
    out = []
    if port_number(c, grpc["port"]) != config.port:
        out.append(f"{kind}: grpc probe on port {grpc['port']}, the cloud serves {config.port}")
    if grpc.get("service", "") not in HEALTH_SERVICES:
        out.append(f"{kind}: grpc probe asks about {grpc.get('service')!r}, the cloud registers {HEALTH_SERVICES}")
    if config.tls_cert:
        out.append(f"{kind}: the kubelet's grpc probe speaks plaintext, the cloud serves TLS")
    return out


def secret_mount_problems(c: dict[str, Any], pod_spec: dict[str, Any], docs: Docs, paths: list[str]) -> list[str]:
    """Each file path lies in a volume mounted from the Secret, and names one of the Secret's keys."""
    keys = set(find(docs, "deploy/k8s/examples/secret.yaml", "Secret", "picospec-cloud-tls")["stringData"])
    secrets = {v["name"] for v in pod_spec["volumes"] if v.get("secret", {}).get("secretName") == "picospec-cloud-tls"}
    mounts = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in secrets]
    out = []
    for path in filter(None, paths):
        parent, _, name = path.rpartition("/")
        if parent not in mounts or name not in keys:
            out.append(f"{path}: not a key of the Secret picospec-cloud-tls mounted at {mounts}")
    return out


def service_problems(docs: Docs) -> list[str]:
    out = []
    headless = find(docs, "deploy/k8s/cloud.yaml", "Service", "picospec-cloud-headless")
    if headless["spec"].get("clusterIP") != "None":
        out.append("picospec-cloud-headless is not headless: gRPC would see one address and pin one replica")
    c = cloud_container(docs)
    pod_labels = find(docs, "deploy/k8s/cloud.yaml", "Deployment", "picospec-cloud")["spec"]["template"]["metadata"]["labels"]
    if headless["spec"]["selector"].items() - pod_labels.items():
        out.append("the headless Service does not select the cloud's pods")
    for p in headless["spec"]["ports"]:
        try:
            if port_number(c, p["targetPort"]) != cloud_config(c).port:
                out.append(f"headless Service targets port {p['targetPort']}, not the cloud's --port")
        except (KeyError, StopIteration):
            out.append(f"headless Service targets {p['targetPort']}, no such container port")
    envoy_pod = find(docs, "deploy/k8s/envoy.yaml", "Deployment", "picospec-envoy")["spec"]["template"]
    front = find(docs, "deploy/k8s/envoy.yaml", "Service", "picospec-cloud")
    if front["spec"]["selector"].items() - envoy_pod["metadata"]["labels"].items():
        out.append("the picospec-cloud Service does not select the Envoy pods")
    envoy_c = envoy_pod["spec"]["containers"][0]
    listener = envoy_config(docs)["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    for p in front["spec"]["ports"]:
        if port_number(envoy_c, p["targetPort"]) != listener:
            out.append(f"the picospec-cloud Service targets {p['targetPort']}, Envoy listens on {listener}")
    return out


def envoy_config(docs: Docs) -> dict[str, Any]:
    return docs["deploy/envoy/envoy.yaml"][0]


def envoy_problems(docs: Docs) -> list[str]:
    out = []
    cfg = envoy_config(docs)
    (cluster,) = cfg["static_resources"]["clusters"]
    (listener,) = cfg["static_resources"]["listeners"]
    opts = cluster.get("typed_extension_protocol_options", {}).get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
    h2 = opts.get("explicit_http_config", {}).get("http2_protocol_options")
    if h2 is None:
        out.append("the cloud cluster does not speak HTTP/2 upstream (gRPC needs it)")
    else:
        interval = str(h2.get("connection_keepalive", {}).get("interval", "0s"))
        if interval != "0s" and float(interval.rstrip("s")) * 1000 < MIN_PING_INTERVAL_MS:
            out.append(f"upstream keepalive every {interval}: the cloud answers faster pings with GOAWAY")
    if cluster["lb_policy"] != "ROUND_ROBIN":
        out.append(f"lb_policy {cluster['lb_policy']}")
    hcs = [h["grpc_health_check"] for h in cluster.get("health_checks", []) if "grpc_health_check" in h]
    if not hcs:
        out.append("no grpc_health_check")
    out += [f"health check asks about {h.get('service_name', '')!r}, the cloud registers {HEALTH_SERVICES}"
            for h in hcs if h.get("service_name", "") not in HEALTH_SERVICES]
    (endpoint,) = [e["endpoint"]["address"]["socket_address"] for group in cluster["load_assignment"]["endpoints"]
                   for e in group["lb_endpoints"]]
    headless = find(docs, "deploy/k8s/cloud.yaml", "Service", "picospec-cloud-headless")
    if cluster["type"] != "STRICT_DNS" or endpoint["address"].split(".")[0] != headless["metadata"]["name"]:
        out.append("the cluster does not resolve the headless Service to every replica (STRICT_DNS)")
    if endpoint["port_value"] not in [p["port"] for p in headless["spec"]["ports"]]:
        out.append(f"the cluster dials port {endpoint['port_value']}, the headless Service offers another")
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    if hcm.get("stream_idle_timeout") != "0s":
        out.append("stream_idle_timeout is on: a session waiting quietly for a verdict or a slot would be cut")
    for vh in hcm["route_config"]["virtual_hosts"]:
        for r in vh["routes"]:
            if r["route"].get("timeout") != "0s":
                out.append("a route keeps Envoy's default 15 s timeout: generations longer than that are cut")
    # the upstream TLS name is the one the cloud's probes verify and the name of the Service in front of Envoy
    probe = cloud_container(docs)["readinessProbe"].get("exec", {}).get("command", [])
    name = probe[probe.index("--tls-server-name") + 1] if "--tls-server-name" in probe else ""
    tls = cluster["transport_socket"]["typed_config"]
    if name and tls.get("sni") != name:
        out.append(f"Envoy verifies the cloud as {tls.get('sni')!r}, the probes as {name!r}")
    return out


CHECKS: dict[str, Callable[[Docs], list[str]]] = {"cloud": cloud_problems, "services": service_problems,
                                                  "envoy": envoy_problems}


# ---- the tests -----------------------------------------------------------------------------------------------------

def test_every_yaml_parses():
    docs = load_all()
    assert {"deploy/k8s/cloud.yaml", "deploy/k8s/envoy.yaml", "deploy/envoy/envoy.yaml",
            "deploy/k8s/examples/secret.yaml", "deploy/k8s/examples/plaintext-probes.yaml"} <= set(docs)
    for file, ds in docs.items():
        assert ds, f"{file} is empty"
        if file.startswith("deploy/k8s/") and "plaintext-probes" not in file:
            assert all({"apiVersion", "kind", "metadata"} <= d.keys() for d in ds), file
            assert all("namespace" not in d["metadata"] for d in ds), f"{file}: the manifests are namespace-agnostic"


@pytest.mark.parametrize("check", CHECKS)
def test_manifests_agree_with_the_code(check):
    assert CHECKS[check](load_all()) == []


def plaintext(docs: Docs) -> Docs:
    """The cloud as examples/plaintext-probes.yaml patches it: no TLS env, the kubelet's gRPC probes."""
    docs = copy.deepcopy(docs)
    c = cloud_container(docs)
    c["env"] = [e for e in c["env"] if not e["name"].startswith(("PICOSPEC_TLS", "PICOSPEC_AUTH"))]
    patch = docs["deploy/k8s/examples/plaintext-probes.yaml"][0]["spec"]["template"]["spec"]["containers"][0]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        merged = {**c[kind], **patch[kind]}
        c[kind] = {k: v for k, v in merged.items() if v is not None}  # strategic merge: null deletes
    return docs


def test_plaintext_probe_patch_agrees_with_the_code():
    docs = plaintext(load_all())
    assert cloud_problems(docs) == []
    # and the same patch on the TLS cloud is caught: the kubelet's probe cannot do TLS
    tls = load_all()
    patched = plaintext(tls)
    cloud_container(patched)["env"] = cloud_container(tls)["env"]
    assert any("plaintext" in p for p in cloud_problems(patched))


def cloud_of(docs: Docs) -> dict[str, Any]:
    return cloud_container(docs)


def pod_of(docs: Docs) -> dict[str, Any]:
    return find(docs, "deploy/k8s/cloud.yaml", "Deployment", "picospec-cloud")["spec"]["template"]


def args_set(docs: Docs, flag: str, value: str) -> None:
    a = cloud_of(docs)["args"]
    a[a.index(flag) + 1] = value


def envoy_cluster(docs: Docs) -> dict[str, Any]:
    return envoy_config(docs)["static_resources"]["clusters"][0]


def envoy_hcm(docs: Docs) -> dict[str, Any]:
    return envoy_config(docs)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


# (what is planted, which check must catch it, the mistake)
MUTANTS: list[tuple[str, str, Callable[[Docs], None]]] = [
    ("a flag picospec-cloud lacks", "cloud", lambda d: cloud_of(d)["args"].extend(["--gpu-count", "2"])),
    ("a bad --dtype", "cloud", lambda d: args_set(d, "--dtype", "float8")),
    ("an env that is no setting", "cloud",
     lambda d: cloud_of(d)["env"].append({"name": "PICOSPEC_GRACE", "value": "30"})),
    ("--port moved, probes not", "cloud", lambda d: args_set(d, "--port", "50052")),
    ("readiness asks an unregistered service", "cloud",
     lambda d: cloud_of(d)["readinessProbe"]["exec"]["command"].__setitem__(5, "picospec.PicoSpec")),
    ("liveness without --live", "cloud", lambda d: cloud_of(d)["livenessProbe"]["exec"]["command"].remove("--live")),
    ("probes without TLS", "cloud", lambda d: [cloud_of(d)[k]["exec"]["command"].__delitem__(slice(4, None))
                                               for k in ("startupProbe", "readinessProbe", "livenessProbe")]),
    ("metrics annotation on another port", "cloud",
     lambda d: pod_of(d)["metadata"]["annotations"].__setitem__("prometheus.io/port", "9090")),
    ("--metrics-port moved", "cloud", lambda d: args_set(d, "--metrics-port", "9200")),
    ("grace longer than the termination budget", "cloud", lambda d: args_set(d, "--grace-s", "60")),
    ("termination budget short", "cloud", lambda d: pod_of(d)["spec"].__setitem__("terminationGracePeriodSeconds", 35)),
    ("a TLS file the Secret lacks", "cloud",
     lambda d: cloud_of(d)["env"].__setitem__(0, {"name": "PICOSPEC_TLS_CERT", "value": "/tls/cloud.pem"})),
    ("no GPU asked for", "cloud", lambda d: cloud_of(d)["resources"]["limits"].pop("nvidia.com/gpu")),
    ("headless Service made ClusterIP", "services",
     lambda d: find(d, "deploy/k8s/cloud.yaml", "Service", "picospec-cloud-headless")["spec"].pop("clusterIP")),
    ("headless Service targets a port the pod lacks", "services",
     lambda d: find(d, "deploy/k8s/cloud.yaml", "Service", "picospec-cloud-headless")["spec"]["ports"][0]
     .__setitem__("targetPort", "http")),
    ("Envoy Service selects nothing", "services",
     lambda d: find(d, "deploy/k8s/envoy.yaml", "Service", "picospec-cloud")["spec"]
     .__setitem__("selector", {"app": "envoy"})),
    ("Envoy upstream in HTTP/1.1", "envoy", lambda d: envoy_cluster(d).pop("typed_extension_protocol_options")),
    ("Envoy health-checks an unregistered service", "envoy",
     lambda d: envoy_cluster(d)["health_checks"][0]["grpc_health_check"].__setitem__("service_name", "grpc.health")),
    ("Envoy route with the default 15 s timeout", "envoy",
     lambda d: envoy_hcm(d)["route_config"]["virtual_hosts"][0]["routes"][0]["route"].pop("timeout")),
    ("Envoy stream idle timeout on", "envoy", lambda d: envoy_hcm(d).__setitem__("stream_idle_timeout", "300s")),
    ("Envoy pings faster than the cloud permits", "envoy",
     lambda d: envoy_cluster(d)["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
     ["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"].__setitem__("interval", "0.5s")),
    ("Envoy balancing a ClusterIP (one address)", "envoy", lambda d: envoy_cluster(d).__setitem__("type", "LOGICAL_DNS")),
]


@pytest.mark.parametrize("what,check,plant", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_a_planted_mistake_is_caught(what, check, plant):
    docs = load_all()
    plant(docs)
    assert CHECKS[check](docs), f"{what}: not caught"


def test_live_probe_passes_a_draining_cloud(tiny_target):
    """Readiness (SERVING) fails from the drain's first moment, so the replica leaves the endpoints; liveness
    (--live: any answer) still passes, so it is not restarted while its sessions finish; no answer fails both."""
    async def scenario() -> list[int]:
        async with serving(tiny_target) as (service, address):
            codes = [await asyncio.to_thread(health_probe.main, [address, *extra]) for extra in ([], ["--live"])]
            await service.health.enter_graceful_shutdown()
            codes += [await asyncio.to_thread(health_probe.main, [address, *extra]) for extra in ([], ["--live"])]
        codes.append(await asyncio.to_thread(health_probe.main, [address, "--live", "--timeout-s", "1"]))
        return codes

    assert run(scenario()) == [0, 0, 1, 0, 1]
