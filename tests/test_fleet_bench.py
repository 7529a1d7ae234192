"""Smoke test of ``edgeadapt bench fleet`` with tiny sizes (the figures come from the CLI): a
real PostgreSQL, Mosquitto, collector processes (one SIGKILLed and restarted), fleet-sim
devices, the dashboard and headless chromium."""

from __future__ import annotations

from pathlib import Path

import pytest
from bundle_fixtures import cached_bundle, cached_keys
from dashboard_fixtures import CHROMEDRIVER, CHROMIUM
from mqtt_fixtures import require_mosquitto

from devices.telemetry.fleet_bench import FleetBenchOptions, run_fleet_bench
from devices.telemetry.pgserver import PostgresMissing, find_bindir


@pytest.mark.slow
def test_bench_fleet_runs_its_parts_and_loses_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    require_mosquitto()
    try:
        find_bindir()
    except PostgresMissing as exc:
        pytest.skip(str(exc))
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium/chromedriver missing: run `make system-deps`", pytrace=False)
    _, pub = cached_keys(tmp_path_factory)
    opts = FleetBenchOptions(
        parts=("pg", "kill", "dashboard"), bundles=(str(cached_bundle(tmp_path_factory)),),
        pubkey=str(pub), per_host=2, pg_devices=4, pg_messages=12, kill_devices=4,
        kill_rate_hz=20.0, kill_seconds=3.0, dash_devices=3, dash_records=3000,
        dash_stores=("sqlite",), dash_loads=2, latency_seconds=1.5,
    )  # fmt: skip
    out = run_fleet_bench(opts)
    for n in (1, 2):
        pg = out["pg"][f"collectors_{n}"]
        assert pg["records"] == 1200 and pg["records_per_s"] > 0
        assert (pg["lost"], pg["duplicates"]) == (0, 0)
        assert len(pg["stored_by_collector"]) == n and sum(pg["stored_by_collector"]) == 1200
    kill = out["kill"]
    assert kill["stored_by_collector"][0] is None  # SIGKILLed: no final counters
    assert len(kill["stored_by_collector"]) == 3  # two live ones, one of them the restart
    c = kill["collector"]
    assert c["stored"] == c["expected"] == kill["records"] > 0
    assert (c["lost"], c["duplicates"]) == (0, 0)
    dash = out["dashboard"]["sqlite"]
    assert dash["records"] == 3000 and len(dash["fleet_first_paint_ms"]) == 2
    assert all(ms > 0 for ms in dash["fleet_first_paint_ms"] + dash["device_first_paint_ms"])
    assert dash["latency"]["measured"] > 5 and dash["latency"]["ms_p50"] > 0
