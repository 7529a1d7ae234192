"""PEARL's experience collection: batched episodes as a pure shard function.

:func:`collect_shard` is PEARL's (and the oracle's) seam in :mod:`training.rollouts`: the actor
and encoder weights and a job come in, step-major transitions go out, and the learner writes
them into its replay buffer (:func:`add_steps`), whether the shard ran in-process or on a Ray
actor.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from runtime.errors import NonFiniteError
from runtime.tasks import TaskFamily
from training.agent import PearlNetworks, build_networks, is_oracle, policy_latent_dim, scale_action
from training.buffer import MultiTaskReplay, TransitionBatch
from training.policy import OraclePolicy, PearlPolicy
from training.rollouts import ShardJob, WorkerCache, load_weights, shard_generators

#: Collection modes -> the policy's settings: exploration episodes with z from the prior,
#: adaptation episodes with the belief updated online.
MODES: dict[str, dict[str, Any]] = {
    "prior": {"stochastic": True, "z_mode": "sample", "adaptive": False},
    "online": {"stochastic": True, "z_mode": "mean", "adaptive": True},
}


class Collected(NamedTuple):
    """Episodes of N tasks: transitions step-major ``(S, N, ...)`` with S = episodes x horizon,
    and the per-episode return summed over the N tasks ``(E,)``."""

    steps: TransitionBatch
    return_sum: np.ndarray


def collection_weights(nets: PearlNetworks) -> dict[str, Any]:
    """What a worker needs to act: the actor's and the encoder's state dicts."""
    encoder = None if nets.encoder is None else nets.encoder.state_dict()
    return {"actor": nets.actor.state_dict(), "encoder": encoder}


def collect_shard(
    cfg: Any, weights: dict[str, Any], job: ShardJob, cache: WorkerCache
) -> Collected:
    """Fly ``job.episodes`` episodes on the job's tasks with the sent weights (PEARL or the
    oracle, ``job.mode`` one of :data:`MODES`)."""
    env = cache.env(cfg, len(job.tasks))
    nets = cache.module(("pearl", cfg.algo), lambda: build_networks(cfg, env.spec))
    load_weights(nets.actor, weights["actor"])
    if nets.encoder is not None:
        load_weights(nets.encoder, weights["encoder"])
    rng, gen = shard_generators(job)
    cls = OraclePolicy if is_oracle(cfg) else PearlPolicy
    policy = cls(
        nets, env.spec, policy_latent_dim(cfg, env.spec), cfg.model.prior_var, cfg.pearl.forget,
        generator=gen, **MODES[job.mode],
    )  # fmt: skip
    return collect_episodes(policy, env, job.tasks, job.episodes, rng)


@torch.no_grad()
def collect_episodes(
    policy: PearlPolicy,
    env: TaskFamily,
    tasks_NK: np.ndarray,
    episodes: int,
    rng: np.random.Generator,
) -> Collected:
    """Run ``episodes`` consecutive episodes on N tasks.

    The policy's belief is reset once at the start and carries over across the episodes, as in
    the meta-test protocol (a non-adaptive policy simply never updates it).
    """
    spec = env.spec
    policy.begin_task(tasks_NK)
    returns = np.zeros(episodes)
    steps: list[TransitionBatch] = []
    for ep in range(episodes):
        policy.resample()
        obs = env.reset(tasks_NK, rng)
        for _ in range(spec.horizon):
            action = policy.act(obs)
            res = env.step(scale_action(action, spec))
            check_finite(spec.name, res.obs, res.reward)
            steps.append(TransitionBatch(obs, action, res.reward, res.obs, res.terminated))
            policy.observe(obs, action, res.reward, res.obs)
            returns[ep] += float(res.reward.sum())
            obs = res.obs
    stacked = TransitionBatch(*(np.stack(x) for x in zip(*steps, strict=True)))
    return Collected(stacked, returns)


def add_steps(buffer: MultiTaskReplay, task_ids_N: np.ndarray, steps: TransitionBatch) -> None:
    """Write step-major transitions ``(S, N, ...)`` into the buffer, one step at a time (the
    order collection produced them in)."""
    for s in range(steps.obs.shape[0]):
        buffer.add(task_ids_N, TransitionBatch(*(x[s] for x in steps)))


def check_finite(env_name: str, obs: np.ndarray, reward: np.ndarray) -> None:
    """Stop training with a clear message when an environment emits NaN/inf."""
    for what, arr in (("observation", obs), ("reward", reward)):
        if not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise NonFiniteError(
                f"env {env_name!r} returned a non-finite {what} ({bad} values NaN/inf); "
                "fix the environment or clip its outputs"
            )
