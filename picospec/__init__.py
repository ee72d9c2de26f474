"""PicoSpec: edge-cloud speculative decoding over gRPC (a draft model on the edge, a target model in the cloud).

One import namespace for the whole project. The repository keeps the design card's folders at its top
(`shared/`, `edge_client/`, `cloud_server/`, `bench/`, `netlab/`); installed, they become `picospec.shared`,
`picospec.edge_client`, ... (pyproject.toml maps them), so nothing generic lands at the top of site-packages.

The Python API, importable from here without loading torch until first use:

    from picospec import EdgeClient, EdgeConfig, load_model

`EdgeClient`, `Generation` (picospec.edge_client.client), `EdgeConfig`, `CloudConfig` (picospec.shared.config),
`load_model` (picospec.shared.models), `PicoSpecService` (picospec.cloud_server.server), `start_server` (picospec.cloud_server.grpc_setup).
See docs/design.md for the design and README.md for the commands.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# A source checkout (editable install, PYTHONPATH pointing at a tree, the mutation harness's copies): the
# subpackages are the folders beside this one, so the package's path includes the checkout's root. Installed
# from a wheel, the folders live inside this package and the root (site-packages) is never added.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "shared" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 (a package's __path__ is set by the import system)

_API = {
    "EdgeClient": "picospec.edge_client.client",
    "Generation": "picospec.edge_client.client",
    "EdgeConfig": "picospec.shared.config",
    "CloudConfig": "picospec.shared.config",
    "load_model": "picospec.shared.models",
    "PicoSpecService": "picospec.cloud_server.server",
    "start_server": "picospec.cloud_server.grpc_setup",
}
__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'picospec' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return __all__
