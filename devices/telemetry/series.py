"""Stored records as clean values for views (plots, the dashboard, MCAP export).

A stored record is what a device sent: fields may be missing, ``null`` (non-finite floats), of
the wrong type, or empty vectors (a family without a belief sends ``bm: []`` and ``bh: null``).
Everything that draws or exports a record goes through :func:`telemetry_point`, which never
raises: numbers become ``float`` or ``None``, vectors become lists of those (at most
``MAX_DIMS`` entries).

Every meta-RL family reports through the same record: ``bm`` is its adaptation summary vector
(PEARL: the belief mean), ``bv`` its spread (PEARL: the belief variance), ``bh`` a scalar
(PEARL: the belief entropy, nats). :func:`summary_label` names them for the device's algorithm.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

MAX_DIMS = 64  # vectors longer than this are cut for display


class TelemetryPoint(NamedTuple):
    """One telemetry record, cleaned: floats or None; t in unix seconds; lat in µs."""

    seq: int
    t: float
    step: int | None
    reward: float | None
    action: list[float | None]
    summary: list[float | None]
    spread: list[float | None]
    entropy: float | None
    count: int | None
    ood: float | None
    latency_us: float | None


def telemetry_point(seq: int, rec: Any) -> TelemetryPoint:
    """Clean a stored telemetry record (see the module docstring); never raises."""
    r = rec if isinstance(rec, dict) else {}
    t = number(r.get("t"))
    step, count = r.get("step"), r.get("bn")
    return TelemetryPoint(
        seq=int(seq), t=t if t is not None else math.nan,
        step=step if type(step) is int else None, reward=number(r.get("r")),
        action=vector(r.get("a")), summary=vector(r.get("bm")), spread=vector(r.get("bv")),
        entropy=number(r.get("bh")), count=count if type(count) is int else None,
        ood=number(r.get("ood")), latency_us=number(r.get("lat")),
    )  # fmt: skip


def number(x: Any) -> float | None:
    """A finite float, or None for anything else (null, strings, bools, inf)."""
    if type(x) not in (int, float):
        return None
    try:
        f = float(x)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def vector(x: Any) -> list[float | None]:
    """A list of :func:`number` values, or ``[]`` if ``x`` is not a list."""
    return [number(v) for v in x[:MAX_DIMS]] if isinstance(x, list) else []


def summary_label(alg: str | None) -> str:
    """Name of the ``bm`` vector: ``belief mean`` for PEARL, ``adaptation state`` otherwise."""
    return "belief mean" if alg == "pearl" else "adaptation state"


def spread_label(alg: str | None) -> str:
    """Name of the ``bv`` vector."""
    return "belief variance" if alg == "pearl" else "adaptation spread"


def entropy_label(alg: str | None) -> str:
    """Name of the ``bh`` scalar."""
    return "belief entropy (nats)" if alg == "pearl" else "adaptation scalar"


def dimension_names(alg: str | None, n: int, names: Any = None) -> list[str]:
    """Names of the ``n`` summary dimensions: the birth's ``summary`` names when it sent them."""
    if isinstance(names, list) and len(names) == n and all(isinstance(s, str) for s in names):
        return [s[:32] for s in names]
    prefix = "z" if alg == "pearl" else "s"
    return [f"{prefix}{i}" for i in range(n)]
