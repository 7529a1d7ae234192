"""``edgeadapt evaluate RUN --param NAME=VALUE``: adaptation params set for one evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_fixtures import make_run

from runtime.cli import main
from runtime.errors import ConfigError
from training.evaluate import evaluate_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained point-nav PEARL run (its belief still moves z, so forget matters)."""
    return make_run(tmp_path_factory.mktemp("run"))


def test_forget_changes_only_the_adaptive_agent(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = evaluate_run(run, tasks=2, episodes=1)
    args = ["evaluate", str(run), "--tasks", "2", "--episodes", "1", "--json"]
    assert main([*args, "--param", "forget=0.5"]) == 0  # the CLI passes it on
    forgetful = json.loads(capsys.readouterr().out)
    assert forgetful["return_by_episode"] != base.return_by_episode
    assert forgetful["nonadaptive_return_by_episode"] == base.nonadaptive_return_by_episode


def test_undeclared_or_out_of_range_params_are_refused(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="no adaptation param 'gain'; they declare: forget"):
        evaluate_run(run, tasks=1, episodes=1, params={"gain": 2.0})
    with pytest.raises(ConfigError, match=r"pearl\.forget"):
        evaluate_run(run, tasks=1, episodes=1, params={"forget": 1.5})
    assert main(["evaluate", str(run), "--param", "gain=2"]) != 0  # one line, no traceback
    assert "error:" in capsys.readouterr().err
