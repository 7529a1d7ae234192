"""`edgeadapt demo --quick`: the whole pipeline end to end (tiny training, real broker)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mqtt_fixtures import require_mosquitto

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_mosquitto()
    out = tmp_path_factory.mktemp("demo") / "report"
    cmd = [sys.executable, "-m", "runtime.cli", "demo", "--quick", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=480)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "edgeadapt demo: pearl on drone-track-residual" in res.stdout
    assert "tracking error on the figure-8" in res.stdout
    return out


def test_demo_writes_every_plot(demo_out: Path) -> None:
    names = ("belief_vs_wind", "returns", "ood_score", "step_latency", "tracking_error",
             "wind_change")  # fmt: skip
    for name in names:
        png = demo_out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_demo_summary_reports_the_pipeline(demo_out: Path) -> None:
    s = json.loads((demo_out / "summary.json").read_text())
    assert s["bundle"]["signature"] == "ok"
    assert s["flash"]["active_slot"] == "A"
    assert s["train_pearl"]["updates"] > 0
    u = s["unseen_winds"]
    assert len(u["return_by_episode"]) == u["episodes"] == 3
    assert u["oracle_return"] is not None
    assert set(s["flights"]) == {"unseen_wind", "ood_storm", "wind_change"}
    change = s["flights"]["wind_change"]
    assert set(change["return_windows"]) >= {"before", "right_after", "end_of_episode"}
    assert set(change["error_windows_cm"]) >= {"before", "right_after", "end_of_episode"}
    for flight in s["flights"].values():
        assert len(flight["tracking_error_cm_by_episode"]) == flight["episodes"]
        assert all(0.0 <= e < 600.0 for e in flight["tracking_error_cm_by_episode"])


def test_demo_compares_tracking_error_with_classical_controllers_and_the_oracle(
    demo_out: Path,
) -> None:
    t = json.loads((demo_out / "summary.json").read_text())["tracking"]
    ctrl = t["controllers"]
    assert {"PID", "DOB", "oracle", "pearl (forget=0.9)", "pearl (forget=1)"} <= set(ctrl)
    assert "pearl, non-adaptive" in ctrl
    assert ctrl["oracle"]["kind"] == "oracle" and ctrl["pearl, non-adaptive"]["adaptive"] is False
    for res in ctrl.values():
        curve = res["wind_change"]["error_cm_by_step"]
        assert len(curve) == 200 and all(0.0 <= e < 600.0 for e in curve)
    # the demo's classical rows are bench tracking's (same protocol, same seed)
    from runtime.tasks import tracking

    bench = tracking.run_benchmark([], t["tasks_per_condition"], t["episodes"], 2.0, 0)
    assert bench["controllers"]["PID"]["conditions"] == ctrl["PID"]["conditions"]
    assert set(t["targets"]["pearl (forget=0.9)"]) >= {"vs_nonadaptive_met", "vs_oracle_met"}


def test_demo_flies_drone_track_residual_where_the_family_has_a_config() -> None:
    from runtime.tasks import tracking
    from training.demo import TRACKING_FAMILIES, env_for

    assert env_for("pearl") == env_for("rl2") == env_for("maml") == "drone-track-residual"
    assert set(TRACKING_FAMILIES) == set(tracking.FAMILIES)


def test_demo_telemetry_arrived_complete(demo_out: Path) -> None:
    s = json.loads((demo_out / "summary.json").read_text())
    devices = s["telemetry"]["devices"]
    assert set(devices) == {"drone-1", "drone-2", "drone-3"}
    for name, flight in zip(sorted(devices), s["flights"].values(), strict=True):
        st = devices[name]
        assert st["gaps"] == 0
        assert st["received"] >= flight["steps"], name


def test_demo_runs_the_rl2_family_end_to_end(tmp_path: Path) -> None:
    """`demo --algo rl2`: the same pipeline and report for another family (family-neutral)."""
    require_mosquitto()
    out = tmp_path / "rl2"
    cmd = [sys.executable, "-m", "runtime.cli", "demo", "--quick", "--algo", "rl2", "--out",
           str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=480)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "edgeadapt demo: rl2 on drone-track-residual" in res.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["algo"] == "rl2" and s["train_rl2"]["env_steps"] > 0
    assert all(st["gaps"] == 0 for st in s["telemetry"]["devices"].values())
    assert (out / "belief_vs_wind.png").read_bytes()[:4] == b"\x89PNG"
    assert "rl2" in s["tracking"]["controllers"] and "oracle" in s["tracking"]["controllers"]
