"""RL² and MAML through the whole pipeline from the command line, as for PEARL: a tiny training
run, export (signed), verify with torch-vs-onnxruntime parity, evaluate the bundle against the
run, flash (A/B + health gate), and a field run whose telemetry reaches a real Mosquitto and
collector carrying the family's adaptation summary (no belief variance, no entropy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mqtt_fixtures import stored, wait_for

from devices.runner import FieldRunner, RunnerOptions
from devices.telemetry.config import TelemetryConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "rl2": [
        "model.hidden_size=16", "model.embed=[16]", "model.head_hidden=[16]",
        "train.iterations=3", "train.trials_per_iter=8", "train.eval_every=3",
        "train.checkpoint_every=3", "train.normalizer_episodes=16", "eval.tasks=4",
        "eval.oracle_run=null",
    ],
    "maml": [
        "model.hidden=[16,16]", "maml.episodes_per_step=2", "maml.meta_batch=4",
        "train.iterations=2", "train.eval_every=2", "eval.tasks=4", "eval.episodes=3",
        "eval.oracle_run=null",
    ],
}  # fmt: skip
#: What the family's telemetry summary vector holds (RL²: 3 principal components of h;
#: MAML: the first 8 weights, the generic default).
SUMMARY_LEN = {"rl2": 3, "maml": 8}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "runtime.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=dict(os.environ),
                          timeout=300)  # fmt: skip


@pytest.mark.parametrize("algo", ["rl2", "maml"])
def test_family_trains_exports_verifies_flashes_and_reports(
    algo: str, tmp_path: Path, collector
) -> None:
    config = str(ROOT / "configs" / algo / "point-nav.yaml")
    sets = [x for item in TINY[algo] for x in ("--set", item)]
    res = _cli("train", config, "--out", "run", "--no-progress", *sets, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "learning_curve.png").is_file()
    assert _cli("keygen", "--out", "key", cwd=tmp_path).returncode == 0
    int8 = ["--int8"] if algo == "rl2" else []  # MAML's weights are an input: nothing to quantize
    res = _cli("export", "run", "--out", "bundle", "--key", "key", *int8, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    ad = manifest["adaptation"]
    assert ad["algorithm"] == algo
    if algo == "rl2":
        assert [s["name"] for s in ad["state"]] == ["h"] and len(ad["summary_basis"]) == 3
        assert {"step", "act", "step_int8"} <= set(manifest["graphs"])
    else:
        assert ad["state"][0]["init"] == "theta.npy" and "theta.npy" in manifest["files"]
        assert ad["episodic"]["graph"] == "adapt" and "adapt" in manifest["graphs"]

    res = _cli("verify", "bundle", "--pubkey", "key.pub", "--run", "run", "--json", cwd=tmp_path)
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["ok"], report["reasons"]
    assert report["parity"]["max_abs_err"] <= 1e-4 and report["parity"]["random_rows"] >= 10_000
    if algo == "maml":  # the inner step itself: onnxruntime vs torch autograd
        assert report["parity"]["errors"]["adapt.weights_out"] <= 1e-5

    # 3 episodes: MAML (2 episodes per inner step here) flies its adapted weights in the third.
    res = _cli("evaluate", "bundle", "--tasks", "4", "--episodes", "3", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    torch_res = _cli("evaluate", "run", "--tasks", "4", "--episodes", "3", "--json", cwd=tmp_path)
    ours, theirs = json.loads(res.stdout), json.loads(torch_res.stdout)
    for a, b in zip(ours["return_by_episode"], theirs["return_by_episode"], strict=True):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b))

    res = _cli("device", "init", "dev", "--profile", "x86-cpu", "--pubkey", "key.pub",
               cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = _cli("flash", "bundle", "--device-root", "dev", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr

    device = f"{algo}-1"
    tele = TelemetryConfig(broker=collector.broker.url, fleet="t", device=device,
                           outbox=str(tmp_path / "outbox.sqlite"))  # fmt: skip
    opts = RunnerOptions(tmp_path / "dev", episodes=3, realtime=False, telemetry=tele)
    trace = FieldRunner(opts).run()
    n = len(trace.reward)
    wait_for(lambda: len(stored(collector.db_path, device, 0)) >= n, 10, f"{algo} telemetry")
    records = [rec for *_, rec in stored(collector.db_path, device, 0)]
    assert len(records) == n
    k = SUMMARY_LEN[algo]
    assert all(len(r["bm"]) == k and r["bv"] == [] and r["bh"] is None for r in records)
    assert len({tuple(r["bm"]) for r in records}) > 1  # the summary moves as the state adapts
    if algo == "maml":  # the inner step ran on the device and was reported
        assert any(e["type"] == "adapted" for e in trace.events)
