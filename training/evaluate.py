"""Meta-test evaluation of a trained run (torch): adaptive vs non-adaptive vs random vs oracle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from runtime.configio import apply_override
from runtime.errors import CheckpointError, ConfigError
from runtime.evaluation import AdaptivePolicy, EvalReport, held_out_tasks, meta_test, rollout
from runtime.tasks import make_family
from training.checkpoint import LoadedRun, load_run
from training.registry import entry_of, validate_run_config


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    episodes: int | None = None,
    tasks: int | None = None,
    seed: int = 0,
    oracle_run: str | Path | None = None,
    params: dict[str, float] | None = None,
) -> EvalReport:
    """Run the adaptation protocol on held-out tasks and report per-episode returns
    (``params``: adaptation params set for this evaluation, e.g. PEARL's ``forget``)."""
    run, episodes, task_set = load_protocol(run_dir, split, episodes, tasks, seed)
    run = with_params(run, params or {})
    oracle_return = oracle_return_for(run, oracle_run, task_set, seed)
    return meta_test(
        policy_for(run, adaptive=True),
        policy_for(run, adaptive=False),
        run.config.env.name,
        task_set,
        episodes,
        seed,
        str(split),
        oracle_return,
        source=str(run_dir),
    )


def with_params(run: LoadedRun, params: dict[str, float]) -> LoadedRun:
    """The run with adaptation params set for evaluation: each name its algorithm declares
    (:attr:`training.registry.Algorithm.params`) overrides its config key, validated as
    there (PEARL's ``forget`` in (0, 1])."""
    if not params:
        return run
    entry = entry_of(run.config)
    raw = run.config.model_dump(mode="json")
    for name, value in params.items():
        if name not in entry.params:
            declared = ", ".join(sorted(entry.params)) or "none"
            raise ConfigError(
                f"{run.run_dir}: {entry.label or entry.name} runs have no adaptation param "
                f"{name!r}; they declare: {declared}"
            )
        apply_override(raw, f"{entry.params[name]}={value}")
    return replace(run, config=validate_run_config(raw, source=f"{run.run_dir} --param"))


def load_protocol(
    run_dir: str | Path, split: str, episodes: int | None, tasks: int | None, seed: int
) -> tuple[LoadedRun, int, np.ndarray]:
    """The run, its episode count and its held-out tasks (the config's defaults where None)."""
    run = load_run(run_dir)
    cfg = run.config
    n = tasks or cfg.eval.tasks
    tasks_TK = held_out_tasks(make_family(cfg.env.name, 1), split, n, seed)
    return run, episodes or cfg.eval.episodes, tasks_TK


def policy_for(run: LoadedRun, adaptive: bool = True) -> AdaptivePolicy:
    """The deterministic deployment policy of a loaded run, whatever its algorithm
    (``adaptive=False``: its state held at the initial value, the non-adaptive reference)."""
    return entry_of(run.config).impl().policy_for(run, adaptive)


def oracle_return_on(oracle_dir: str | Path, env: str, tasks_TK: np.ndarray, seed: int) -> float:
    """Mean return per episode of the privileged oracle on exactly these tasks."""
    oracle = load_run(oracle_dir)
    if not entry_of(oracle.config).privileged:
        raise CheckpointError(
            f"{oracle_dir}: not an oracle run (algo is {oracle.config.algo!r}, not 'oracle')"
        )
    if oracle.config.env.name != env:
        raise CheckpointError(
            f"{oracle_dir}: oracle was trained on {oracle.config.env.name!r}, not {env!r}"
        )
    return float(rollout(policy_for(oracle), env, tasks_TK, 1, seed).returns_TE.mean())


def oracle_return_for(
    run: LoadedRun, oracle_run: str | Path | None, tasks_TK: np.ndarray, seed: int
) -> float | None:
    """The privileged oracle's return on these tasks for ``run``: the run itself if it is an
    oracle, else ``oracle_run`` or the run's ``eval.oracle_run`` (None when neither is set)."""
    cfg = run.config
    if entry_of(cfg).privileged:
        return float(rollout(policy_for(run), cfg.env.name, tasks_TK, 1, seed).returns_TE.mean())
    path = oracle_run or cfg.eval.oracle_run
    if path is None:
        return None
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = run.run_dir.parent / path.name  # runs moved together: look beside this run
    return oracle_return_on(path, cfg.env.name, tasks_TK, seed)
