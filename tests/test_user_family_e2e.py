"""The README's "your own family" path, end to end through the command line, as a new user runs
it: the docs/tasks.md Pendulum example saved as a module, listed under ``env.plugins``, trained,
exported, verified, evaluated as a bundle, flashed and run. The bundle records its plugin modules,
so ``evaluate BUNDLE`` and ``run`` import them without being told."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tasks_example import example_source

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "runtime.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_a_plugin_family_goes_from_training_to_the_device(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "pendulum_varied.py").write_text(example_source())
    config = tmp_path / "pendulum.yaml"
    config.write_text(
        f"extends: {ROOT / 'configs' / 'pearl' / 'base.yaml'}\n"
        "env: {name: pendulum-varied, plugins: [pendulum_varied], num_train_tasks: 8}\n"
        "model: {hidden: [32, 32], encoder_hidden: [32, 32], latent_dim: 2}\n"
        "train: {iterations: 2, updates_per_iter: 5, tasks_per_iter: 4, initial_episodes: 1,\n"
        "        eval_every: 2, checkpoint_every: 2, num_threads: 1}\n"
        "sac: {batch_size: 16}\n"
        "pearl: {meta_batch: 4}\n"
        "eval: {tasks: 2, episodes: 2}\n"
    )
    run = _cli("train", str(config), "--out", "run", "--no-progress", cwd=tmp_path,
               pythonpath=plugins)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert _cli("keygen", "--out", "key", cwd=tmp_path).returncode == 0
    exp = _cli("export", "run", "--out", "bundle", "--key", "key", cwd=tmp_path,
               pythonpath=plugins)  # fmt: skip
    assert exp.returncode == 0, exp.stderr
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["plugins"] == ["pendulum_varied"]
    ver = _cli("verify", "bundle", "--pubkey", "key.pub", "--json", cwd=tmp_path)
    assert ver.returncode == 0 and json.loads(ver.stdout)["ok"], ver.stdout + ver.stderr

    # Without the module on the path: one line naming the module and the bundle.
    missing = _cli("evaluate", "bundle", "--tasks", "2", cwd=tmp_path)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "pendulum_varied" in missing.stderr and "bundle" in missing.stderr

    ev = _cli("evaluate", "bundle", "--tasks", "2", "--episodes", "2", "--json", cwd=tmp_path,
              pythonpath=plugins)  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["env"] == "pendulum-varied"

    init = _cli("device", "init", "dev", "--profile", "x86-cpu", "--pubkey", "key.pub",
                cwd=tmp_path)  # fmt: skip
    assert init.returncode == 0, init.stderr
    flash = _cli("flash", "bundle", "--device-root", "dev", cwd=tmp_path, pythonpath=plugins)
    assert flash.returncode == 0, flash.stdout + flash.stderr
    field = _cli("run", "--device-root", "dev", "--episodes", "1", "--fast", "--json",
                 cwd=tmp_path, pythonpath=plugins)  # fmt: skip
    assert field.returncode == 0, field.stderr
    summary = json.loads(field.stdout)
    assert summary["steps"] == 200 and all(map(lambda r: r == r, summary["returns"]))
