"""Read-only queries behind the dashboard pages (SQLite or PostgreSQL, same SQL).

Everything returned here is JSON-ready: telemetry comes as columns (what the chart library
draws), with ``null`` where a device sent nothing usable.
"""

from __future__ import annotations

import json
from typing import Any

from devices.telemetry.collector_db import birth_facts, device_birth, record_bodies
from devices.telemetry.database import Database
from devices.telemetry.series import (
    dimension_names,
    entropy_label,
    number,
    spread_label,
    summary_label,
    telemetry_point,
)

#: Event types the fleet page counts as alarms and as fallbacks to safe behaviour.
ALARM_EVENTS = ("ood_alarm",)
FALLBACK_EVENTS = ("fallback_used",)


def fleet(conn: Database) -> list[dict[str, Any]]:
    """One row per device: state, birth facts, counters, alarms.

    ``gaps`` is computed as (max - min + 1) - received, which is exact while no sequence number
    is stored under two boots (``telemetry stats`` shows that case separately).
    """
    rows: dict[str, dict[str, Any]] = {}
    for (
        device,
        fleet_name,
        online,
        boot_n,
        birth,
        last_seen,
        dups,
        malformed,
        dropped,
    ) in conn.execute(
        "SELECT device, fleet, online, boot_n, birth, last_seen, duplicates_dropped, "
        "malformed, dropped_at_source FROM devices ORDER BY device"
    ):
        rows[device] = {
            "device": device, "fleet": fleet_name, "online": bool(online), "boot_n": boot_n,
            **birth_facts(birth), "last_seen": last_seen, "duplicates": dups,
            "malformed": malformed, "dropped": dropped, "received": 0, "max_seq": None,
            "gaps": 0, "alarms": 0, "fallbacks": 0, "events": 0,
        }  # fmt: skip
    for device, n, lo, hi in conn.execute(
        "SELECT device, COUNT(*), MIN(seq), MAX(seq) FROM records GROUP BY device"
    ):
        if device in rows:
            rows[device].update(received=n, max_seq=hi, gaps=max(hi - lo + 1 - n, 0))
    for device, etype, n in conn.execute("SELECT device, type, n FROM event_counts"):
        if device in rows:
            row = rows[device]
            row["events"] += n
            row["alarms"] += n if etype in ALARM_EVENTS else 0
            row["fallbacks"] += n if etype in FALLBACK_EVENTS else 0
    return list(rows.values())


def device_meta(conn: Database, device: str) -> dict[str, Any] | None:
    """Facts and chart labels of one device; None if the database does not know it."""
    row = conn.execute(
        "SELECT fleet, online, boot, boot_n, last_seen FROM devices WHERE device = ?", (device,)
    ).fetchone()
    if row is None:
        return None
    birth = device_birth(conn, device) or {}
    facts = birth_facts(json.dumps(birth) if birth else None)
    alg = facts["alg"]
    dims = _summary_dims(conn, device)
    return {
        "device": device, "fleet": row[0], "online": bool(row[1]), "boot": row[2],
        "boot_n": row[3], "last_seen": row[4], **facts,
        "labels": {"summary": summary_label(alg), "spread": spread_label(alg),
                   "entropy": entropy_label(alg)},
        "dims": dimension_names(alg, dims, birth.get("summary")),
        "ood_thresholds": ood_thresholds(birth),
    }  # fmt: skip


def ood_thresholds(birth: dict[str, Any]) -> dict[str, float | None]:
    """The OOD warn/alarm thresholds a device announced (``birth.ood.{warn,alarm}``), if any."""
    ood = birth.get("ood")
    ood = ood if isinstance(ood, dict) else {}
    return {"warn": number(ood.get("warn")), "alarm": number(ood.get("alarm"))}


def series(conn: Database, device: str, after_seq: int = 0, limit: int = 2000) -> dict[str, Any]:
    """Telemetry after ``after_seq`` as columns; with ``after_seq == 0`` the newest ``limit``."""
    rows = record_bodies(conn, device, 0, after_seq=after_seq, limit=limit,
                         newest=after_seq == 0)  # fmt: skip
    points = [telemetry_point(seq, rec) for _, seq, _, _, rec in rows]
    points = [p for p in points if p.t == p.t]  # drop records without a usable time
    n_action = max((len(p.action) for p in points), default=0)
    n_summary = max((len(p.summary) for p in points), default=0)
    return {
        "seq": [p.seq for p in points], "t": [p.t for p in points],
        "reward": [p.reward for p in points], "ood": [p.ood for p in points],
        "latency_us": [p.latency_us for p in points], "entropy": [p.entropy for p in points],
        "count": [p.count for p in points],
        "action": [[_at(p.action, i) for p in points] for i in range(n_action)],
        "summary": [[_at(p.summary, i) for p in points] for i in range(n_summary)],
        "last_seq": max((seq for _, seq, *_ in rows), default=after_seq),
    }  # fmt: skip


def events(conn: Database, device: str, after_seq: int = 0, limit: int = 100) -> dict[str, Any]:
    """Events and acks after ``after_seq`` (the newest ``limit`` of them), in seq order."""
    rows = []
    for kind in (1, 2):
        rows += record_bodies(conn, device, kind, after_seq=after_seq, limit=limit, newest=True)
    rows.sort(key=lambda row: row[1])
    rows = rows[-limit:]
    items = [_event_row(seq, received, rec, kind="event" if "type" in rec else "ack")
             for _, seq, _, received, rec in rows if isinstance(rec, dict)]  # fmt: skip
    return {"items": items, "last_seq": max((r[1] for r in rows), default=after_seq)}


def _event_row(seq: int, received: float, rec: dict[str, Any], kind: str) -> dict[str, Any]:
    is_ack = kind == "ack"
    detail = rec.get("detail") if is_ack else rec.get("data")
    return {
        "seq": seq, "t": number(rec.get("t")), "received": received,
        "kind": kind,
        "type": str(rec.get("cmd") if is_ack else rec.get("type"))[:64],
        "status": str(rec.get("status"))[:32] if is_ack else None,
        "detail": json.dumps(detail, default=str)[:300] if detail is not None else "",
    }  # fmt: skip


def _summary_dims(conn: Database, device: str) -> int:
    rows = record_bodies(conn, device, 0, limit=1, newest=True)
    return len(telemetry_point(0, rows[0][4]).summary) if rows else 0


def _at(values: list[float | None], i: int) -> float | None:
    return values[i] if i < len(values) else None
