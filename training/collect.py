"""Experience collection for meta-training: batched episodes written into the replay buffer."""

from __future__ import annotations

import numpy as np

from runtime.errors import NonFiniteError
from runtime.tasks import TaskFamily
from training.agent import scale_action
from training.buffer import MultiTaskReplay, TransitionBatch
from training.policy import PearlPolicy


def collect_episodes(
    policy: PearlPolicy,
    env: TaskFamily,
    tasks_NK: np.ndarray,
    task_ids_N: np.ndarray,
    buffer: MultiTaskReplay,
    episodes: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Run ``episodes`` consecutive episodes on N tasks; return per-episode mean returns.

    The policy's belief is reset once at the start and carries over across the episodes, as in
    the meta-test protocol (a non-adaptive policy simply never updates it).
    """
    spec = env.spec
    policy.begin_task(tasks_NK)
    returns = np.zeros(episodes)
    for ep in range(episodes):
        policy.resample()
        obs = env.reset(tasks_NK, rng)
        for _ in range(spec.horizon):
            action = policy.act(obs)
            res = env.step(scale_action(action, spec))
            check_finite(spec.name, res.obs, res.reward)
            buffer.add(
                task_ids_N,
                TransitionBatch(obs, action, res.reward, res.obs, res.terminated),
            )
            policy.observe(obs, action, res.reward, res.obs)
            returns[ep] += float(res.reward.mean())
            obs = res.obs
    return returns


def check_finite(env_name: str, obs: np.ndarray, reward: np.ndarray) -> None:
    """Stop training with a clear message when an environment emits NaN/inf."""
    for what, arr in (("observation", obs), ("reward", reward)):
        if not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise NonFiniteError(
                f"env {env_name!r} returned a non-finite {what} ({bad} values NaN/inf); "
                "fix the environment or clip its outputs"
            )
