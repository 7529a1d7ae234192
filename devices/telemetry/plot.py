"""``telemetry plot``: reward, belief mean with its uncertainty band, and OOD score over time.

matplotlib is imported only here and only when plotting; it belongs to the ``train`` extra, not
to the device-side core dependencies.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

from devices.telemetry.collector_db import record_bodies
from runtime.errors import EdgeadaptError

BAND_SIGMAS = 2.0


def plot_device(conn: sqlite3.Connection, device: str, out: str | Path) -> int:
    """Write the PNG ``out`` for ``device``; return the number of telemetry records drawn."""
    plt = _pyplot()
    tele = _records(conn, device, kind=0)
    if not tele:
        raise EdgeadaptError(f"no telemetry stored for device {device!r}")
    t0 = tele[0][0]
    t = [row[0] - t0 for row in tele]
    recs = [row[1] for row in tele]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    axes[0].plot(t, [_f(r.get("r")) for r in recs], lw=0.8)
    axes[0].set_ylabel("reward")
    _belief(axes[1], t, recs)
    axes[2].plot(t, [_f(r.get("ood")) for r in recs], lw=0.8, color="tab:red")
    axes[2].set_ylabel("OOD score")
    axes[2].set_xlabel("time since first record (s)")
    _events(axes, _records(conn, device, kind=1), t0)
    fig.suptitle(f"{device}: {len(recs)} telemetry records")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return len(recs)


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


def _records(conn: sqlite3.Connection, device: str, kind: int) -> list[tuple[float, dict]]:
    return [(float(rec["t"]), rec) for *_, rec in record_bodies(conn, device, kind)]


def _belief(ax: Any, t: list[float], recs: list[dict[str, Any]]) -> None:
    dims = max((len(r.get("bm") or []) for r in recs), default=0)
    for d in range(dims):
        mean = [_f(_at(r.get("bm"), d)) for r in recs]
        std = [math.sqrt(max(_f(_at(r.get("bv"), d)), 0.0)) for r in recs]
        lo = [m - BAND_SIGMAS * s for m, s in zip(mean, std, strict=True)]
        hi = [m + BAND_SIGMAS * s for m, s in zip(mean, std, strict=True)]
        (line,) = ax.plot(t, mean, lw=0.8, label=f"z{d}")
        ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_ylabel(f"belief mean ± {BAND_SIGMAS:g}σ")
    if dims:
        ax.legend(loc="upper right", fontsize="small", ncol=min(dims, 8))


def _events(axes: Any, events: list[tuple[float, dict]], t0: float) -> None:
    for t, rec in events:
        for ax in axes:
            ax.axvline(t - t0, color="grey", lw=0.6, ls="--")
        label = str(rec.get("type", ""))
        where = ("data", "axes fraction")
        axes[0].annotate(label, (t - t0, 1.0), xycoords=where, fontsize="x-small", rotation=90)


def _at(values: list[Any] | None, i: int) -> Any:
    return values[i] if values and i < len(values) else None


def _f(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else math.nan
