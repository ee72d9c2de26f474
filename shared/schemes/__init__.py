"""The verification schemes, found by name (see shared/schemes/base.py for the interface and its terms)."""
from __future__ import annotations

from picospec.shared.schemes.base import (MAX_TAIL_DRAWS, Q_SUM_TOLERANCE, Decision, OpenRejection, ResidualPayload,
                                 VerifyScheme)
from picospec.shared.schemes.coupled import Coupled
from picospec.shared.schemes.dense import Dense
from picospec.shared.schemes.split_exact import SplitExact
from picospec.shared.schemes.split_topk import SplitTopK

SCHEMES: dict[str, VerifyScheme] = {s.name: s for s in (Dense(), SplitTopK(), SplitExact(), Coupled())}

__all__ = ["Decision", "MAX_TAIL_DRAWS", "OpenRejection", "Q_SUM_TOLERANCE", "ResidualPayload", "SCHEMES",
           "VerifyScheme", "scheme"]


def scheme(name: str) -> VerifyScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown verify mode {name!r}; choose from {', '.join(SCHEMES)}") from None
