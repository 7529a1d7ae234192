"""RL² through the whole pipeline from the command line, as for PEARL: a tiny training run,
export (signed, INT8 variant), verify with torch-vs-onnxruntime parity, evaluate the bundle,
flash (A/B + health gate), and a field run whose telemetry reaches a real Mosquitto and
collector carrying RL²'s adaptation summary (no belief variance, no entropy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mqtt_fixtures import stored, wait_for

from devices.runner import FieldRunner, RunnerOptions
from devices.telemetry.config import TelemetryConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--set", "model.hidden_size=16", "--set", "model.embed=[16]", "--set", "model.head_hidden=[16]",
    "--set", "train.iterations=3", "--set", "train.trials_per_iter=8",
    "--set", "train.eval_every=3", "--set", "train.checkpoint_every=3",
    "--set", "train.normalizer_episodes=16", "--set", "eval.tasks=4",
    "--set", "eval.oracle_run=null",
]  # fmt: skip


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "runtime.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=dict(os.environ),
                          timeout=300)  # fmt: skip


def test_rl2_trains_exports_verifies_flashes_and_reports(tmp_path: Path, collector) -> None:
    config = str(ROOT / "configs" / "rl2" / "point-nav.yaml")
    res = _cli("train", config, "--out", "run", "--no-progress", *TINY, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "learning_curve.png").is_file()
    assert _cli("keygen", "--out", "key", cwd=tmp_path).returncode == 0
    res = _cli("export", "run", "--out", "bundle", "--key", "key", "--int8", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    ad = manifest["adaptation"]
    assert ad["algorithm"] == "rl2" and [s["name"] for s in ad["state"]] == ["h"]
    assert len(ad["summary_basis"]) == 3 and {"step", "act", "step_int8"} <= set(manifest["graphs"])

    res = _cli("verify", "bundle", "--pubkey", "key.pub", "--run", "run", "--json", cwd=tmp_path)
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["ok"], report["reasons"]
    assert report["parity"]["errors"]["step.h_out"] <= 1e-5
    assert report["parity"]["random_rows"] >= 10_000

    res = _cli("evaluate", "bundle", "--tasks", "4", "--episodes", "2", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    torch_res = _cli("evaluate", "run", "--tasks", "4", "--episodes", "2", "--json", cwd=tmp_path)
    ours, theirs = json.loads(res.stdout), json.loads(torch_res.stdout)
    for a, b in zip(ours["return_by_episode"], theirs["return_by_episode"], strict=True):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b))

    res = _cli("device", "init", "dev", "--profile", "x86-cpu", "--pubkey", "key.pub",
               cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = _cli("flash", "bundle", "--device-root", "dev", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr

    tele = TelemetryConfig(broker=collector.broker.url, fleet="t", device="rl2-1",
                           outbox=str(tmp_path / "outbox.sqlite"))  # fmt: skip
    opts = RunnerOptions(tmp_path / "dev", episodes=2, realtime=False, telemetry=tele)
    trace = FieldRunner(opts).run()
    n = len(trace.reward)
    wait_for(lambda: len(stored(collector.db_path, "rl2-1", 0)) >= n, 10, "rl2 telemetry")
    records = [rec for *_, rec in stored(collector.db_path, "rl2-1", 0)]
    assert len(records) == n
    assert all(len(r["bm"]) == 3 and r["bv"] == [] and r["bh"] is None for r in records)
    assert len({tuple(r["bm"]) for r in records}) > 1  # the summary moves as h adapts
