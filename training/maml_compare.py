"""``edgeadapt bench maml``: MAML against the MAML paper's baselines on held-out tasks.

For the MAML run and a *pretrained* run (same policy, trained by plain policy gradient on the
task mixture: ``maml.pretrain``), on the same tasks, seeds and number of exploration episodes:

- ``explore``: mean return of the exploration episodes (sampled actions, initial weights);
- ``before``: the deterministic policy of the initial weights (0 inner steps);
- ``after[k]``: the deterministic policy after ``k`` inner steps, all on those same exploration
  episodes (the device's adapt function with ``steps = k``).

MAML adapts with its own (meta-learned) step size. The pretrained policy is fine-tuned with
each step size of ``pretrained_lrs``; every one is reported and ``best`` picks the best
one-step result on the evaluation tasks themselves, which favours the baseline. Random is the 0
of the normalized scores, the privileged oracle the 1 (nav2d: closed form; else an oracle run).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from runtime.evaluation import held_out_tasks, random_policy_return, rollout
from runtime.tasks import make_family
from training.maml import MAMLState, load_maml_run
from training.maml_policy import MAMLPolicy, analytic_oracle_return

DEFAULT_STEPS = (1, 2, 3)
DEFAULT_PRETRAINED_LRS = (0.01, 0.1, 1.0)


def compare(
    maml_run: str | Path,
    pretrained_run: str | Path | None,
    split: str = "test",
    n_tasks: int = 20,
    seed: int = 0,
    steps: tuple[int, ...] = DEFAULT_STEPS,
    oracle_run: str | Path | None = None,
    pretrained_lrs: tuple[float, ...] = DEFAULT_PRETRAINED_LRS,
) -> dict[str, Any]:
    """Every number of ``bench maml`` as one JSON-able dict (returns per episode)."""
    maml = load_maml_run(maml_run)
    env = maml.cfg.env.name
    episodes = maml.cfg.maml.episodes_per_step
    tasks = held_out_tasks(make_family(env, 1), split, n_tasks, seed)
    rand = random_policy_return(env, tasks, seed)
    oracle = _oracle_return(maml, tasks, seed, oracle_run)
    ctx = _Context(env, tasks, seed, episodes, rand, oracle)
    out: dict[str, Any] = {
        "env": env,
        "split": split,
        "tasks": len(tasks),
        "exploration_episodes": episodes,
        "seed": seed,
        "random_return": rand,
        "oracle_return": oracle,
        "maml": {"run": str(maml_run), **_curve(maml, maml.inner_lr, steps, ctx)},
    }
    if pretrained_run is not None:
        out["pretrained"] = _pretrained(load_maml_run(pretrained_run), steps, ctx, pretrained_lrs)
        out["pretrained"]["run"] = str(pretrained_run)
    out["random"] = {"return": rand, "normalized": 0.0 if oracle is not None else None}
    out["load_average"] = os.getloadavg()[0]
    return out


class _Context:
    """The evaluation protocol shared by every policy of one comparison."""

    def __init__(
        self,
        env: str,
        tasks_TK: np.ndarray,
        seed: int,
        episodes: int,
        rand: float,
        oracle: float | None,
    ) -> None:
        self.env, self.tasks, self.seed = env, tasks_TK, seed
        self.episodes, self.rand, self.oracle = episodes, rand, oracle

    def normalized(self, ret: float) -> float | None:
        if self.oracle is None or abs(self.oracle - self.rand) < 1e-9:
            return None
        return (ret - self.rand) / (self.oracle - self.rand)


def _curve(
    state: MAMLState, inner_lr: float, steps: tuple[int, ...], ctx: _Context
) -> dict[str, Any]:
    """Returns before and after ``k`` inner steps for every k of ``steps``."""
    before = _phases(state, inner_lr, 1, 0, ctx)[0]
    explore = None
    after: dict[str, float] = {}
    for k in steps:
        phases = _phases(state, inner_lr, k, 1, ctx)
        explore, after[str(k)] = phases[0], phases[1]
    rets = {"explore": explore, "before": before, **{f"after_{k}": v for k, v in after.items()}}
    rets = {k: _finite(v) for k, v in rets.items()}
    return {
        "inner_lr": inner_lr,
        "meta_sgd": state.per_weight,
        "return": rets,
        "normalized": {k: None if v is None else ctx.normalized(v) for k, v in rets.items()},
    }


def _finite(value: float | None) -> float | None:
    """None for a diverged (non-finite) return: valid JSON, and never picked as the best."""
    return None if value is None or not np.isfinite(value) else float(value)


def _phases(
    state: MAMLState, inner_lr: float, steps: int, adaptations: int, ctx: _Context
) -> list[float]:
    """Mean return per phase of a policy adapting ``adaptations`` times with ``steps`` inner
    steps each; the exploration noise is seeded alike for every call (the same episodes)."""
    settings = state.settings._replace(steps=steps)
    policy = MAMLPolicy(
        state.theta.detach().clone(),
        settings,
        state.spec,
        ctx.episodes,
        adaptations,
        inner_lr,
        np.random.default_rng(ctx.seed + 1),
        deterministic_final=True,
    )
    if adaptations == 0:
        policy.episodes_per_step = 1  # one episode of the mean policy
    e = policy.episodes_per_step
    res = rollout(policy, ctx.env, ctx.tasks, episodes=(adaptations + 1) * e, seed=ctx.seed)
    return res.returns_TE.reshape(len(ctx.tasks), adaptations + 1, e).mean(axis=(0, 2)).tolist()


def _pretrained(
    state: MAMLState, steps: tuple[int, ...], ctx: _Context, lrs: tuple[float, ...]
) -> dict[str, Any]:
    """The pretrained policy fine-tuned with each step size; ``best`` by the one-step return."""
    by_lr = {str(lr): _curve(state, lr, steps, ctx) for lr in lrs}
    first = f"after_{steps[0]}"
    best = max(by_lr, key=lambda k: _or_worst(by_lr[k]["return"][first]))
    return {"by_lr": by_lr, "best_lr": float(best), "best": by_lr[best]}


def _or_worst(value: float | None) -> float:
    return -np.inf if value is None else value


def _oracle_return(
    state: MAMLState, tasks_TK: np.ndarray, seed: int, oracle_run: str | Path | None
) -> float | None:
    env = state.cfg.env.name
    analytic = analytic_oracle_return(env, tasks_TK, seed)
    if analytic is not None:
        return analytic
    oracle_run = oracle_run or state.cfg.eval.oracle_run
    if not oracle_run or not Path(oracle_run).is_dir():
        return None
    from training.evaluate import oracle_return_on

    return oracle_return_on(oracle_run, env, tasks_TK, seed)
