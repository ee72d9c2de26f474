"""The installed distribution: one `picospec` import namespace and nothing generic at the top of site-packages.

The wheel is built from this checkout and unpacked into a directory of its own; the checks run in a fresh
interpreter started with -S (no site: the editable install's finder is not loaded) whose path holds only that
directory and the venv's third-party packages, from a working directory outside the checkout.
"""
from __future__ import annotations

import configparser
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL_FOLDERS = ("shared", "edge_client", "cloud_server", "bench", "netlab")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-q", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("picospec-*.whl")
    return whl


def _run_isolated(site: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    third_party = sysconfig.get_paths()["purelib"]
    env = {"PYTHONPATH": f"{site}:{third_party}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_wheel_installs_everything_under_picospec(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"picospec", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops
    for folder in TOP_LEVEL_FOLDERS:
        assert f"picospec/{folder}/__init__.py" in names, f"{folder}/ is not installed as picospec.{folder}"
    assert "picospec/shared/rpc/picospec_pb2.py" in names and "picospec/shared/schemes/dense.py" in names


def test_console_scripts_point_into_the_namespace(wheel):
    with zipfile.ZipFile(wheel) as z:
        (ep,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        cp = configparser.ConfigParser()
        cp.read_string(z.read(ep).decode())
    assert dict(cp["console_scripts"]) == {
        "picospec-cloud": "picospec.cloud_server.cli:main",
        "picospec-edge": "picospec.edge_client.cli:main",
        "picospec-bench": "picospec.bench.cli:main",
    }


def test_installed_picospec_imports_and_generic_names_do_not(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = f"""
import importlib, sys
import picospec
from picospec import EdgeClient, EdgeConfig, CloudConfig, load_model, PicoSpecService
import picospec.shared.rpc.picospec_pb2_grpc, picospec.shared.schemes
from picospec.cloud_server.cli import build_parser
from picospec.edge_client import cli as edge_cli
from picospec.bench import cli as bench_cli
assert picospec.shared.codec.__file__.startswith({str(site)!r}), picospec.shared.codec.__file__
assert list(picospec.__path__) == [{str(site / 'picospec')!r}], picospec.__path__
for name in {TOP_LEVEL_FOLDERS!r}:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    sys.exit(f"import {{name}} works: {{sys.modules[name].__file__}}")
build_parser().parse_args(["--target", "tiny-random"])
print("ok")
"""
    r = _run_isolated(site, code, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr[-3000:]


def test_console_script_mains_run_from_the_installed_package(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    for module in ("picospec.cloud_server.cli", "picospec.edge_client.cli"):
        r = _run_isolated(site, f"from {module} import main; main(['--help'])", cwd=tmp_path)
        assert r.returncode == 0 and "usage:" in r.stdout, (module, r.stdout[-500:], r.stderr[-2000:])
    r = _run_isolated(site, "from picospec.bench.cli import main; main([])", cwd=tmp_path)
    assert "picospec-bench verify" in r.stderr, r.stderr[-2000:]
