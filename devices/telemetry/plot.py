"""``telemetry plot``: reward, the adaptation summary with its spread band, and OOD score.

The middle panel is named for the device's algorithm (``belief mean`` for PEARL, ``adaptation
state`` otherwise); a family that sends empty vectors gets an empty panel with a note, not an
error. matplotlib is imported only here and only when plotting; it belongs to the ``train``
extra, not to the device-side core dependencies.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from devices.telemetry.collector_db import device_birth, record_bodies
from devices.telemetry.database import Database
from devices.telemetry.series import (
    TelemetryPoint,
    dimension_names,
    summary_label,
    telemetry_point,
)
from runtime.errors import EdgeadaptError

BAND_SIGMAS = 2.0


def plot_device(conn: Database, device: str, out: str | Path) -> int:
    """Write the PNG ``out`` for ``device``; return the number of telemetry records drawn."""
    plt = _pyplot()
    points = [telemetry_point(seq, rec) for _, seq, _, _, rec in record_bodies(conn, device, 0)]
    points = [p for p in points if math.isfinite(p.t)]
    if not points:
        raise EdgeadaptError(f"no telemetry stored for device {device!r}")
    birth = device_birth(conn, device) or {}
    alg = birth.get("alg") if isinstance(birth.get("alg"), str) else "pearl"
    t0 = points[0].t
    t = [p.t - t0 for p in points]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    axes[0].plot(t, [_f(p.reward) for p in points], lw=0.8)
    axes[0].set_ylabel("reward")
    _summary(axes[1], t, points, alg, birth.get("summary"))
    axes[2].plot(t, [_f(p.ood) for p in points], lw=0.8, color="tab:red")
    axes[2].set_ylabel("OOD score")
    axes[2].set_xlabel("time since first record (s)")
    events = [(float(rec["t"]), rec) for *_, rec in record_bodies(conn, device, 1)]
    _events(axes, events, t0)
    fig.suptitle(f"{device} ({alg}): {len(points)} telemetry records")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return len(points)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise EdgeadaptError(
            "telemetry plot needs matplotlib: pip install 'edgeadapt[train]' (or matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _summary(ax: Any, t: list[float], points: list[TelemetryPoint], alg: str, names: Any) -> None:
    label = summary_label(alg)
    dims = max((len(p.summary) for p in points), default=0)
    for d, name in enumerate(dimension_names(alg, dims, names)):
        mean = [_f(_at(p.summary, d)) for p in points]
        std = [math.sqrt(max(_f(_at(p.spread, d)), 0.0)) for p in points]
        (line,) = ax.plot(t, mean, lw=0.8, label=name)
        if any(math.isfinite(s) for s in std):
            lo = [m - BAND_SIGMAS * s for m, s in zip(mean, std, strict=True)]
            hi = [m + BAND_SIGMAS * s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_ylabel(f"{label} ± {BAND_SIGMAS:g}σ" if dims else label)
    if dims:
        ax.legend(loc="upper right", fontsize="small", ncol=min(dims, 8))
    else:
        ax.text(0.5, 0.5, f"the device reports no {label} vector", ha="center",
                va="center", transform=ax.transAxes, color="grey")  # fmt: skip


def _events(axes: Any, events: list[tuple[float, dict]], t0: float) -> None:
    for t, rec in events:
        for ax in axes:
            ax.axvline(t - t0, color="grey", lw=0.6, ls="--")
        label = str(rec.get("type", ""))
        where = ("data", "axes fraction")
        axes[0].annotate(label, (t - t0, 1.0), xycoords=where, fontsize="x-small", rotation=90)


def _at(values: list[float | None], i: int) -> float | None:
    return values[i] if i < len(values) else None


def _f(x: float | None) -> float:
    return math.nan if x is None else x
