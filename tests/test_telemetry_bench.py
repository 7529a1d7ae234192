"""Smoke test of ``edgeadapt bench telemetry`` with tiny sizes (the figures come from the CLI)."""

from __future__ import annotations

from mqtt_fixtures import require_mosquitto

from devices.telemetry.bench import BenchOptions, run_bench


def test_bench_runs_every_part_and_reports_the_required_keys() -> None:
    require_mosquitto()
    opts = BenchOptions(records=2000, latency_seconds=0.5, devices=4, fleet_rate_hz=20.0,
                        fleet_seconds=1.0, processes=2, enqueue_calls=500,
                        cpu_seconds=0.5)  # fmt: skip
    out = run_bench(opts)
    for key in ("records_per_s", "latency_ms_p99", "lost", "duplicates", "enqueue_us_median",
                "collector_ingest_rows_per_s", "latency_ms_p50"):  # fmt: skip
        assert key in out, key
    assert out["lost"] == 0 and out["duplicates"] == 0
    assert out["records_per_s"] > 0 and out["latency_ms_p99"] > 0
    assert out["fleet"]["records_expected"] == 4 * 20 and out["fleet"]["all_drained"]
    assert out["throughput"]["records"] == 2000 and out["latency"]["records"] == 50
    cpu = {r["rate_hz"]: r for r in out["worker_cpu"]}
    assert cpu[0.0]["records"] == 0 and cpu[100.0]["records"] >= 40
    assert cpu[100.0]["commits_per_s"] > 0 and cpu[100.0]["cpu_ms_per_s"] > 0
