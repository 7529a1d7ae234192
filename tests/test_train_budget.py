"""``train.max_minutes``: every family's training loop stops at its wall-clock budget, after a
whole iteration, with a checkpoint and an evaluation of that last iteration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.checkpoint import load_run
from training.config import load_train_config
from training.registry import entry_of

ROOT = Path(__file__).resolve().parent.parent
#: Tiny sizes per family; 1000 iterations would take minutes, the budget stops them at once.
TINY = {
    "pearl": [
        "model.encoder_hidden=[16]", "model.hidden=[16]", "sac.batch_size=8",
        "pearl.meta_batch=2", "train.initial_episodes=1", "train.tasks_per_iter=2",
        "train.updates_per_iter=2", "eval.tasks=2",
    ],
    "rl2": [
        "model.hidden_size=8", "model.embed=[8]", "model.head_hidden=[8]",
        "train.trials_per_iter=4", "train.normalizer_episodes=4", "eval.tasks=2",
    ],
    "maml": [
        "model.hidden=[8]", "maml.episodes_per_step=1", "maml.meta_batch=2", "eval.tasks=2",
    ],
}  # fmt: skip


@pytest.mark.parametrize("algo", ["pearl", "rl2", "maml"])
def test_max_minutes_stops_after_one_iteration_with_checkpoint(algo: str, tmp_path: Path) -> None:
    overrides = [
        *TINY[algo], "train.iterations=1000", "train.eval_every=500",
        "train.checkpoint_every=500", "train.num_threads=1", "train.max_minutes=1e-6",
        "eval.oracle_run=null",
    ]  # fmt: skip
    cfg = load_train_config(ROOT / "configs" / algo / "point-nav.yaml", overrides)
    state = entry_of(cfg).impl().train(cfg, tmp_path, progress=False)
    assert state.iteration == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1]
    assert any(k.startswith("eval_") for k in rows[0])  # the stopped run's last row is evaluated
    assert (tmp_path / "checkpoints" / "latest.pt").is_file()
    assert load_run(tmp_path).config.train.max_minutes == pytest.approx(1e-6)


def test_max_minutes_must_be_positive() -> None:
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="max_minutes"):
        load_train_config(ROOT / "configs/pearl/point-nav.yaml", ["train.max_minutes=0"])


def test_the_progress_bar_shows_the_budget_left(capsys: pytest.CaptureFixture[str]) -> None:
    """Under ``train.max_minutes`` the iteration total rarely ends the run: the bar says how
    much of the wall-clock budget is left."""
    from training.progress import Deadline, Progress

    bar = Progress(True, 100_000, 0, "train", {"ret": ("return", "{:.1f}")})
    bar.advance({"return": -3.25}, budget_left_s=90.0)
    assert bar.bar is not None and bar.bar.postfix == "ret=-3.2, budget left=1.5 min"
    bar.advance({"return": -3.0}, budget_left_s=None)  # no budget: nothing about it
    assert bar.bar.postfix == "ret=-3.0"
    bar.close()
    assert "ret=-3.0" in capsys.readouterr().err
    assert Deadline(None).left_s() is None
    assert 0 < Deadline(2.0).left_s() <= 120.0
