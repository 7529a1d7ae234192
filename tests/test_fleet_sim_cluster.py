"""``fleet-sim`` on a simulated two-node Ray cluster (``ray.cluster_utils.Cluster``, one CPU per
node): the host actors spread over both nodes and every record still arrives once. Skipped only
where Ray is not installed."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from bundle_fixtures import cached_bundle, cached_keys

from devices.fleet_sim import FleetOptions, collector_check, run_fleet
from devices.telemetry.collector import Collector
from devices.telemetry.mosquitto import Mosquitto

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed (the ray extra)"
)


def test_hosts_spread_over_two_nodes_and_lose_nothing(
    ray_two_nodes: Any, broker: Mosquitto, collector: Collector,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    _, pub = cached_keys(tmp_path_factory)
    opts = FleetOptions(devices=4, bundles=(str(cached_bundle(tmp_path_factory)),),
                        broker=broker.url, pubkey=str(pub), rate_hz=20.0, duration_s=1.5,
                        per_host=2, ray="auto", prefix="node")  # fmt: skip
    res = run_fleet(opts)
    assert (res.hosts, res.nodes) == (2, 2)
    assert res.failed == [] and res.all_drained
    check = collector_check(collector.db_path, res.last_seq, 20)
    assert check["stored"] == check["expected"] == res.records > 4 * 10
    assert (check["lost"], check["duplicates"]) == (0, 0)
