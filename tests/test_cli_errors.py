"""Bad input on the command line: a clear one-line error and a non-zero exit, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "pearl" / "point-nav.yaml"
FAST = ["--set", "train.iterations=1", "--set", "train.updates_per_iter=1", "--no-progress"]


def edgeadapt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests" / "plugins"))
    cmd = [sys.executable, "-m", "runtime.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def assert_clean_error(res: subprocess.CompletedProcess[str], needle: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0]


def test_malformed_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(CONFIG) + "\nsac: [unclosed\n")
    assert_clean_error(edgeadapt("train", str(bad), cwd=tmp_path), "malformed YAML")


def test_unknown_key(tmp_path: Path) -> None:
    res = edgeadapt("train", str(CONFIG), "--set", "pearl.klweight=1", cwd=tmp_path)
    assert_clean_error(res, "pearl.klweight")


def test_unknown_env_lists_available(tmp_path: Path) -> None:
    res = edgeadapt("train", str(CONFIG), "--set", "env.name=mars", cwd=tmp_path)
    assert_clean_error(res, "available: ")


@pytest.mark.parametrize("content", [None, b"not a checkpoint", b"PK\x03\x04trunc"])
def test_missing_or_corrupt_checkpoint(tmp_path: Path, content: bytes | None) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    if content is not None:
        (run / "checkpoints" / "latest.pt").write_bytes(content)
    res = edgeadapt("evaluate", str(run), cwd=tmp_path)
    assert_clean_error(res, "checkpoint")


def test_non_finite_values_from_a_user_env(tmp_path: Path) -> None:
    res = edgeadapt(
        "train",
        str(CONFIG),
        "--set",
        "env.name=nan-point-nav",
        "--set",
        "env.plugins=[nan_env]",
        "--set",
        "env.num_train_tasks=4",
        "--out",
        str(tmp_path / "run"),
        *FAST,
        cwd=tmp_path,
    )
    assert_clean_error(res, "non-finite reward")
