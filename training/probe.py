"""Latent probe: how much of a run's gap to the oracle is task inference, how much the actor.

For each held-out task a cross-entropy search looks for the *fixed* latent z (no belief updates)
whose deterministic episode earns the most. It scores candidates with the task's true reward, so
it is a privileged diagnostic, not a policy a device could run. Its return estimates what a
perfect belief could earn with this actor, and splits the gap to the privileged oracle:

    oracle - adaptive_k  =  (oracle - probe)  +  (probe - adaptive_k)
                             actor gap            inference gap, episode k

A large inference gap says the belief is the bottleneck (encoder, belief model, exploration); a
large actor gap says the policy cannot act well even when told the right latent. The actor gap
can be negative: the oracle is a trained policy too, and a latent chosen per task with the true
reward may drive this actor better than the oracle drives itself.

The search starts from the adaptive agent's belief mean after the evaluated episodes, draws
``population`` candidates per task around the current search mean (candidate 0 is that mean
itself), refits mean and spread to the best ``elite`` share, and keeps the best candidate seen.
The probe's return is that candidate's episode under the evaluation's own protocol and seed, so
it is comparable with ``edgeadapt evaluate``; with random initial states the search scored its
candidates from other start states than that final episode (all but task 0's first candidate),
so picking the best of noisy scores does not inflate the reported return. It is a lower bound
of the best fixed-latent return (the search may miss the optimum).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from runtime.errors import CheckpointError, ConfigError
from runtime.evaluation import normalize, random_policy_return, rollout
from training.evaluate import load_protocol, oracle_return_for, policy_for


class LatentActor(Protocol):
    def deterministic(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor: ...


class FixedLatentPolicy:
    """:class:`runtime.evaluation.AdaptivePolicy` that acts on a fixed z per task, never adapts."""

    def __init__(self, actor: LatentActor, z_BZ: np.ndarray) -> None:
        self.actor = actor
        self.z = torch.from_numpy(np.ascontiguousarray(z_BZ, dtype=np.float32))

    def begin_task(self, tasks_BK: np.ndarray) -> None:
        if len(tasks_BK) != len(self.z):
            raise ValueError(f"{len(tasks_BK)} tasks for {len(self.z)} fixed latents")

    def begin_episode(self) -> None:
        return None

    @torch.no_grad()
    def act(self, obs_BO: np.ndarray) -> np.ndarray:
        obs = torch.from_numpy(np.asarray(obs_BO, dtype=np.float32))
        return self.actor.deterministic(obs, self.z).numpy()

    def observe(self, obs_BO, action_BA, reward_B, next_obs_BO, done_B=False) -> None:
        return None


@dataclass
class ProbeReport:
    """What ``edgeadapt bench latent-probe --json`` prints (returns are per-episode means)."""

    env: str
    split: str
    tasks: int
    episodes: int
    adaptive_return_by_episode: list[float]
    probe_return: float
    oracle_return: float | None
    random_return: float
    adaptive_normalized_by_episode: list[float] | None
    probe_normalized: float | None
    actor_gap: float | None  # oracle - probe
    inference_gap_by_episode: list[float]  # probe - adaptive, per episode index
    population: int
    iterations: int
    wall_s: float
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def search_latents(
    actor: LatentActor,
    env: str,
    tasks_TK: np.ndarray,
    start_TZ: np.ndarray,
    spread: float,
    seed: int,
    population: int = 64,
    iterations: int = 12,
    elite: float = 0.125,
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-entropy search for each task's best fixed latent: ``(z_TZ, score_T)``, the best
    candidate seen and its one-episode return (scored with ``rollout`` at ``seed``)."""
    if population < 2 or iterations < 1 or not 0.0 < elite <= 1.0:
        raise ConfigError(
            f"latent probe: need population >= 2, iterations >= 1 and 0 < elite <= 1; got "
            f"{population}, {iterations} and {elite}"
        )
    t, z = start_TZ.shape
    rng = np.random.default_rng(seed)
    n_elite = max(1, round(elite * population))
    mean, std = start_TZ.astype(np.float64), np.full((t, z), float(spread))
    best_z, best_score = mean.copy(), np.full(t, -np.inf)
    tasks_rep, rows = np.repeat(tasks_TK, population, axis=0), np.arange(t)
    for _ in range(iterations):
        cand = mean[:, None] + std[:, None] * rng.standard_normal((t, population, z))
        cand[:, 0] = mean  # the current mean is always scored (the search never loses it)
        flat = cand.reshape(t * population, z)
        score = _episode_returns(actor, env, tasks_rep, flat, seed).reshape(t, population)
        top = np.argsort(-score, axis=1)[:, :n_elite]
        elites = np.take_along_axis(cand, top[..., None], axis=1)
        mean, std = elites.mean(axis=1), np.maximum(elites.std(axis=1), 1e-4)
        better = score[rows, top[:, 0]] > best_score
        best_z = np.where(better[:, None], cand[rows, top[:, 0]], best_z)
        best_score = np.where(better, score[rows, top[:, 0]], best_score)
    return best_z.astype(np.float32), best_score


def latent_probe(
    run_dir: str | Path,
    split: str = "test",
    episodes: int | None = None,
    tasks: int | None = None,
    seed: int = 0,
    oracle_run: str | Path | None = None,
    population: int = 64,
    iterations: int = 12,
) -> ProbeReport:
    """Evaluate a run as ``edgeadapt evaluate`` does, then probe each task's best fixed latent."""
    start = time.perf_counter()
    run, episodes, tasks_TK = load_protocol(run_dir, split, episodes, tasks, seed)
    cfg = run.config
    if cfg.algo != "pearl":
        raise CheckpointError(
            f"{run_dir}: the latent probe needs a PEARL run (a task latent to search); this "
            f"run is {cfg.algo!r}"
        )
    env = cfg.env.name
    adaptive = policy_for(run, adaptive=True)
    res = rollout(adaptive, env, tasks_TK, episodes, seed)
    spread = float(np.sqrt(cfg.model.prior_var))
    z_TZ, _ = search_latents(
        run.nets.actor, env, tasks_TK, adaptive.belief.mean, spread, seed, population, iterations
    )
    probe_return = float(_episode_returns(run.nets.actor, env, tasks_TK, z_TZ, seed).mean())
    oracle = oracle_return_for(run, oracle_run, tasks_TK, seed)
    random_return = random_policy_return(env, tasks_TK, seed)
    norm_probe = normalize([probe_return], random_return, oracle)
    return ProbeReport(
        env=env,
        split=str(split),
        tasks=len(tasks_TK),
        episodes=episodes,
        adaptive_return_by_episode=res.by_episode,
        probe_return=probe_return,
        oracle_return=oracle,
        random_return=random_return,
        adaptive_normalized_by_episode=normalize(res.by_episode, random_return, oracle),
        probe_normalized=None if norm_probe is None else norm_probe[0],
        actor_gap=None if oracle is None else oracle - probe_return,
        inference_gap_by_episode=[probe_return - r for r in res.by_episode],
        population=population,
        iterations=iterations,
        wall_s=round(time.perf_counter() - start, 2),
        source=str(run_dir),
    )


def _episode_returns(
    actor: LatentActor, env: str, tasks_NK: np.ndarray, z_NZ: np.ndarray, seed: int
) -> np.ndarray:
    return rollout(FixedLatentPolicy(actor, z_NZ), env, tasks_NK, 1, seed).returns_TE[:, 0]
