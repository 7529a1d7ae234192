"""The meta-test adaptation protocol, shared by torch runs and on-device bundles (numpy only).

For each held-out task the belief starts at the prior, is updated after *every* transition
(online, as on the device) and carries over across the K episodes of the task. All tasks run in
one vectorized batch. A policy implements :class:`AdaptivePolicy`; the protocol is the same for
the torch run (``training.evaluate``) and for an exported bundle (``runtime.agent``), so their
numbers are directly comparable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from runtime.tasks import Split, TaskFamily, make_family


class AdaptivePolicy(Protocol):
    """A batch of B agents acting on B tasks, with normalized actions in [-1, 1].

    The one meta-RL interface of every family (PEARL, RL², MAML, oracles, bundles): a task
    begins, episodes begin, the policy acts and observes every transition; how it adapts
    (belief, hidden state, gradient step) is its own business.
    """

    def begin_task(self, tasks_BK: np.ndarray) -> None:
        """Forget everything: the adaptation state returns to its initial value (oracles may
        read ``tasks_BK``)."""

    def begin_episode(self) -> None:
        """A new episode of the same task starts (the adaptation state carries over)."""

    def act(self, obs_BO: np.ndarray) -> np.ndarray:
        """Deterministic normalized action ``(B, A)`` for the current belief."""

    def observe(
        self,
        obs_BO: np.ndarray,
        action_BA: np.ndarray,
        reward_B: np.ndarray,
        next_obs_BO: np.ndarray,
        done_B: np.ndarray | bool = False,
    ) -> None:
        """Absorb one transition per agent; ``done_B`` marks the last one of an episode."""


class RandomPolicy:
    """Uniform random normalized actions: the 0 of normalized scores."""

    def __init__(self, act_dim: int, rng: np.random.Generator) -> None:
        self.act_dim = act_dim
        self.rng = rng

    def begin_task(self, tasks_BK: np.ndarray) -> None:
        self.batch = len(tasks_BK)

    def begin_episode(self) -> None:
        return None

    def act(self, obs_BO: np.ndarray) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, size=(len(obs_BO), self.act_dim)).astype(np.float32)

    def observe(self, obs_BO, action_BA, reward_B, next_obs_BO, done_B=False) -> None:
        return None


@dataclass
class RolloutResult:
    """Per-episode returns: ``returns_TE[t, e]`` for task t, episode e; ``success_TE`` (1 when
    any step of the episode was a success) and ``final_success_TE`` (1 when its last step was)
    for families with a success criterion."""

    returns_TE: np.ndarray
    success_TE: np.ndarray | None = None
    final_success_TE: np.ndarray | None = None

    @property
    def by_episode(self) -> list[float]:
        return [float(x) for x in self.returns_TE.mean(axis=0)]

    @property
    def success_by_episode(self) -> list[float] | None:
        """Success rate over tasks per episode index, or None without a success criterion."""
        return _rate_by_episode(self.success_TE)

    @property
    def final_success_by_episode(self) -> list[float] | None:
        """Rate of tasks whose episode *ended* in success, per episode index (None without a
        success criterion): below ``success_by_episode`` when episodes pass through success
        and leave it."""
        return _rate_by_episode(self.final_success_TE)

    def eval_row(self) -> dict[str, float]:
        """Training-log metrics: ``eval_return_ep<i>`` per episode (1-based), and
        ``eval_success_ep<i>`` for families with a success criterion."""
        row = {f"eval_return_ep{i + 1}": r for i, r in enumerate(self.by_episode)}
        for i, rate in enumerate(self.success_by_episode or []):
            row[f"eval_success_ep{i + 1}"] = rate
        return row


def held_out_tasks(family: TaskFamily, split: Split | str, n: int, seed: int) -> np.ndarray:
    """The ``n`` evaluation tasks of ``split``, deterministic in ``seed``."""
    pool = getattr(family, "task_pool", None)
    if pool is not None:
        tasks = pool(split)
        if n <= len(tasks):
            idx = np.random.default_rng(seed).choice(len(tasks), size=n, replace=False)
            return tasks[np.sort(idx)]
    return family.sample_tasks(split, n, np.random.default_rng(seed))


def rollout(
    policy: AdaptivePolicy,
    env_name: str,
    tasks_BK: np.ndarray,
    episodes: int,
    seed: int,
    scale_action: bool = True,
) -> RolloutResult:
    """Run ``episodes`` consecutive episodes per task; the adaptation state persists across
    them (``begin_episode`` before each, ``done`` on each episode's last transition)."""
    env = make_family(env_name, len(tasks_BK))
    spec = env.spec
    rng = np.random.default_rng(seed)
    half = (spec.act_high - spec.act_low) / 2.0
    policy.begin_task(tasks_BK)
    returns = np.zeros((len(tasks_BK), episodes))
    success: np.ndarray | None = None
    final: np.ndarray | None = None
    for ep in range(episodes):
        obs = env.reset(tasks_BK, rng)
        policy.begin_episode()
        for t in range(spec.horizon):
            action = policy.act(obs)
            physical = spec.act_low + half * (action + 1.0) if scale_action else action
            res = env.step(physical)
            done = np.full(len(tasks_BK), t == spec.horizon - 1)
            policy.observe(obs, action, res.reward, res.obs, done)
            returns[:, ep] += res.reward
            if res.success is not None:
                if success is None or final is None:
                    success, final = np.zeros_like(returns), np.zeros_like(returns)
                success[:, ep] = np.maximum(success[:, ep], res.success)
                final[:, ep] = res.success
            obs = res.obs
    return RolloutResult(returns, success, final)


def _rate_by_episode(flags_TE: np.ndarray | None) -> list[float] | None:
    """Mean over tasks per episode index of a 0/1 array, or None without one."""
    return None if flags_TE is None else [float(x) for x in flags_TE.mean(axis=0)]


@dataclass
class EvalReport:
    """What ``edgeadapt evaluate --json`` prints."""

    env: str
    split: str
    tasks: int
    episodes: int
    return_by_episode: list[float]
    normalized_by_episode: list[float] | None
    nonadaptive_return_by_episode: list[float]
    nonadaptive_normalized_by_episode: list[float] | None
    oracle_return: float | None
    random_return: float
    source: str = ""
    #: Fraction of tasks whose episode had a successful step, per episode index (families with
    #: a success criterion, e.g. Meta-World); None otherwise.
    success_by_episode: list[float] | None = None
    #: The same for the non-adaptive reference, and the random policy's one-episode rate.
    nonadaptive_success_by_episode: list[float] | None = None
    random_success: float | None = None
    #: Fraction of tasks whose episode's *last* step was a success (adaptive policy), per
    #: episode index: how many episodes end inside the success region, not only visit it.
    final_success_by_episode: list[float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def normalize(returns: list[float], random_return: float, oracle_return: float | None):
    """0 = random policy, 1 = privileged oracle, per episode index."""
    if oracle_return is None or abs(oracle_return - random_return) < 1e-9:
        return None
    return [(r - random_return) / (oracle_return - random_return) for r in returns]


def random_policy_return(env_name: str, tasks_TK: np.ndarray, seed: int) -> float:
    """Mean one-episode return of uniform random actions on these tasks: the 0 of normalized
    scores."""
    return float(random_policy_rollout(env_name, tasks_TK, seed).returns_TE.mean())


def random_policy_rollout(env_name: str, tasks_TK: np.ndarray, seed: int) -> RolloutResult:
    """One episode of uniform random actions per task (returns, and successes if defined)."""
    act_dim = make_family(env_name, 1).spec.act_dim
    return rollout(RandomPolicy(act_dim, np.random.default_rng(seed)), env_name, tasks_TK, 1, seed)


def meta_test(
    adaptive: AdaptivePolicy,
    fixed: AdaptivePolicy,
    env_name: str,
    tasks_TK: np.ndarray,
    episodes: int,
    seed: int,
    split: str,
    oracle_return: float | None,
    source: str = "",
) -> EvalReport:
    """Adaptive vs non-adaptive vs random on the same tasks and seeds, as one report."""
    res = rollout(adaptive, env_name, tasks_TK, episodes, seed)
    res_fixed = rollout(fixed, env_name, tasks_TK, episodes, seed)
    rand = random_policy_rollout(env_name, tasks_TK, seed)
    random_return = float(rand.returns_TE.mean())
    return EvalReport(
        env=env_name,
        split=str(split),
        tasks=len(tasks_TK),
        episodes=episodes,
        return_by_episode=res.by_episode,
        normalized_by_episode=normalize(res.by_episode, random_return, oracle_return),
        nonadaptive_return_by_episode=res_fixed.by_episode,
        nonadaptive_normalized_by_episode=normalize(
            res_fixed.by_episode, random_return, oracle_return
        ),
        oracle_return=oracle_return,
        random_return=random_return,
        source=source,
        success_by_episode=res.success_by_episode,
        nonadaptive_success_by_episode=res_fixed.success_by_episode,
        random_success=None if rand.success_by_episode is None else rand.success_by_episode[0],
        final_success_by_episode=res.final_success_by_episode,
    )
