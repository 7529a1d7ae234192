"""Meta-test evaluation of a trained RL² run (torch): adaptive vs non-adaptive vs random vs oracle.

Same protocol and report as :func:`training.evaluate.evaluate_run`: per held-out task the
hidden state starts at zeros and carries over the K episodes; the non-adaptive reference holds
it at zeros; the oracle is a privileged PEARL oracle run (``eval.oracle_run``).
"""

from __future__ import annotations

from pathlib import Path

from runtime.evaluation import EvalReport, held_out_tasks, meta_test
from training.evaluate import oracle_return_on
from training.rl2 import load_rl2_run
from training.rl2_policy import RL2Policy


def evaluate_rl2_run(
    run_dir: str | Path,
    split: str = "test",
    episodes: int | None = None,
    tasks: int | None = None,
    seed: int = 0,
    oracle_run: str | Path | None = None,
) -> EvalReport:
    """Run the adaptation protocol on held-out tasks and report per-episode returns."""
    run = load_rl2_run(run_dir)
    cfg, spec = run.config, run.family.spec
    task_set = held_out_tasks(run.family, split, tasks or cfg.eval.tasks, seed)
    oracle_return = None
    path = oracle_run or cfg.eval.oracle_run
    if path is not None:
        path = Path(path)
        if not path.is_absolute() and not path.exists():
            path = run.run_dir.parent / path.name  # runs moved together: look beside this run
        oracle_return = oracle_return_on(path, cfg.env.name, task_set, seed)
    return meta_test(
        RL2Policy(run.agent, spec),
        RL2Policy(run.agent, spec, adaptive=False),
        cfg.env.name,
        task_set,
        episodes or cfg.eval.episodes,
        seed,
        str(split),
        oracle_return,
        source=str(run_dir),
    )
