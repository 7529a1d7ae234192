"""``edgeadapt fleet-sim``: real field devices (runtime Agent, telemetry client and outbox, each
its own flashed device root) of all three families, hosted by Ray actors on a local Ray
(``ray.init(num_cpus=2)``) or by local processes, publishing through a real Mosquitto into a real
collector: every record arrives once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bundle_fixtures import cached_bundle, cached_keys
from test_family_contract import bundle_of

from devices.fleet_sim import FleetOptions, collector_check, run_fleet
from devices.telemetry.collector import Collector
from devices.telemetry.collector_db import connect, device_stats
from devices.telemetry.mosquitto import Mosquitto
from runtime.cli import main as cli_main

FAMILIES = ("pearl", "rl2", "maml")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """A local Ray with two CPUs, shared by the module's tests."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'edgeadapt[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_mixed_family_fleet_on_ray_actors_loses_and_duplicates_nothing(
    local_ray: Any, broker: Mosquitto, collector: Collector,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    bundles = tuple(str(bundle_of(f, tmp_path_factory)) for f in FAMILIES)
    opts = FleetOptions(devices=6, bundles=bundles, broker=broker.url, rate_hz=20.0,
                        duration_s=2.0, per_host=3, ray="auto", prefix="ray")  # fmt: skip
    res = run_fleet(opts)
    assert (res.mode, res.hosts, res.devices) == ("ray", 2, 6)
    assert res.failed == [] and res.all_drained
    assert res.algorithms == {"pearl": 2, "rl2": 2, "maml": 2}
    assert all(n > 10 for n in res.last_seq.values()), res.last_seq  # every device reported
    check = collector_check(collector.db_path, res.last_seq, 20)
    assert check["stored"] == check["expected"] == res.records
    assert (check["lost"], check["duplicates"], check["gaps"]) == (0, 0, 0), check
    with connect(collector.db_path, readonly=True) as conn:
        stats = device_stats(conn)
    algs = {d: stats[d]["alg"] for d in res.last_seq}  # each family's birth reached the backend
    assert algs == {f"ray-{k:04d}": FAMILIES[k % 3] for k in range(6)}


def test_cli_with_local_processes_and_a_private_backend(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    bundle = cached_bundle(tmp_path_factory)  # signed: the devices require the key
    _, pub = cached_keys(tmp_path_factory)
    db = tmp_path / "c.sqlite"
    code = cli_main(["fleet-sim", "--devices", "3", "--per-host", "2", "--bundle", str(bundle),
                     "--pubkey", str(pub), "--rate", "20", "--duration", "1.5", "--db", str(db),
                     "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert (out["mode"], out["hosts"], out["devices"]) == ("processes", 2, 3)
    c = out["collector"]
    assert c["expected"] == out["records"] > 3 * 10 and (c["lost"], c["duplicates"]) == (0, 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "0", "--bundle", "."], "--devices must be >= 1"),
        (["--devices", "2", "--bundle", "no/such/bundle"], "no bundle directory"),
        (["--devices", "2", "--bundle", ".", "--broker", "nohost"], "expected HOST:PORT"),
    ],
)
def test_bad_input_is_a_one_line_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["fleet-sim", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_without_ray_the_ray_mode_is_a_one_line_error(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['ray'] = None\n"  # an import of ray now fails
            "from runtime.cli import main\n"
            f"sys.exit(main(['fleet-sim', '--devices', '1', '--bundle', {str(tmp_path)!r}, "
            "'--broker', '127.0.0.1:1', '--ray']))")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == "error: fleet-sim --ray needs Ray: pip install 'edgeadapt[ray]'"
