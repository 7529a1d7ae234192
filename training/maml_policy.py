"""MAML at meta-test: explore, take an inner gradient step between episodes, fly the result.

:class:`MAMLPolicy` follows :class:`runtime.evaluation.AdaptivePolicy`. A task is flown in
*phases* of ``episodes_per_step`` episodes: phase 0 with the meta-learned weights, phase k with
the weights after k adaptations, each adaptation being ``inner_steps`` gradient steps on the
episodes of the phase before. Exploration phases sample actions (the policy gradient needs
them); the last phase flies the mean when ``deterministic_final``.

Episode ends: ``observe(..., done=True)`` or :meth:`MAMLPolicy.end_episode` mark them; without
either (today's ``runtime.evaluation.rollout`` says nothing) an episode ends after
``spec.horizon`` observed steps. ``end_episode`` right after an automatic end is a no-op.
What the policy records for the inner step is its own raw Gaussian sample, not the clipped
action handed to the environment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runtime.evaluation import held_out_tasks, random_policy_return, rollout
from runtime.tasks import make_family
from runtime.tasks.base import FamilySpec
from training.maml_inner import AdaptSettings, adapt
from training.maml_networks import policy_log_std, policy_mean


class MAMLPolicy:
    """A batch of B agents adapting by gradient steps between episodes (torch reference)."""

    def __init__(
        self,
        theta_W: torch.Tensor,
        settings: AdaptSettings,
        spec: FamilySpec,
        episodes_per_step: int,
        adaptations: int,
        inner_lr: float,
        rng: np.random.Generator,
        deterministic_final: bool = True,
    ) -> None:
        self.theta = theta_W.detach()
        self.settings = settings
        self.spec = spec
        self.episodes_per_step = episodes_per_step
        self.adaptations = adaptations
        self.inner_lr = inner_lr
        self.rng = rng
        self.deterministic_final = deterministic_final
        self.adapt_log: list[dict[str, list[float]]] = []

    # -- the AdaptivePolicy protocol ------------------------------------------------------------
    def begin_task(self, tasks_BK: np.ndarray) -> None:
        """Back to the meta-learned weights; empty buffer; phase 0."""
        b = len(tasks_BK)
        self.weights = self.theta.expand(b, -1).clone()
        self.phase, self.episode, self.t = 0, 0, 0
        spec = self.spec
        n = self.episodes_per_step * spec.horizon
        self.buf_obs = np.zeros((b, n, spec.obs_dim), np.float32)
        self.buf_act = np.zeros((b, n, spec.act_dim), np.float32)
        self.buf_rew = np.zeros((b, n), np.float32)
        self.buf_mask = np.zeros((b, n), np.float32)

    def act(self, obs_BO: np.ndarray) -> np.ndarray:
        """Normalized action in [-1, 1]; remembers the raw sample for :meth:`observe`."""
        obs = torch.as_tensor(obs_BO, dtype=torch.float32).unsqueeze(1)
        with torch.no_grad():
            mean = policy_mean(obs, self.weights, self.settings.layout).squeeze(1).numpy()
            std = torch.exp(policy_log_std(self.weights, self.settings.layout)).numpy()
        raw = mean
        if self.exploring or not self.deterministic_final:
            raw = mean + std * self.rng.standard_normal(mean.shape).astype(np.float32)
        self._raw = raw.astype(np.float32)
        return np.clip(self._raw, -1.0, 1.0)

    def observe(
        self,
        obs_BO: np.ndarray,
        action_BA: np.ndarray,
        reward_B: np.ndarray,
        next_obs_BO: np.ndarray,
        done: bool = False,
    ) -> None:
        """Record the transition in the episode's slot; end the episode on ``done`` or at the
        horizon."""
        slot = self.episode * self.spec.horizon + self.t
        if slot < self.buf_mask.shape[1]:
            self.buf_obs[:, slot] = obs_BO
            self.buf_act[:, slot] = self._raw
            self.buf_rew[:, slot] = reward_B
            self.buf_mask[:, slot] = 1.0
        self.t += 1
        if done or self.t >= self.spec.horizon:
            self.end_episode()

    def end_episode(self) -> None:
        """Close the current episode; after ``episodes_per_step`` of them, adapt."""
        if self.t == 0:
            return
        self.t = 0
        self.episode += 1
        if self.episode < self.episodes_per_step:
            return
        if self.phase < self.adaptations:
            self._adapt()
        self.phase += 1
        self.episode = 0
        self.buf_mask[:] = 0.0

    # -- internals ------------------------------------------------------------------------------
    @property
    def exploring(self) -> bool:
        return self.phase < self.adaptations

    def _adapt(self) -> None:
        lr = torch.full((len(self.weights), 1), self.inner_lr)
        bufs = (self.buf_obs, self.buf_act, self.buf_rew, self.buf_mask)
        out = adapt(self.weights, *(torch.from_numpy(x) for x in bufs), lr, self.settings)
        self.weights = out.weights.detach()
        self.adapt_log.append(
            {k: v.detach().float().tolist() for k, v in out._asdict().items() if k != "weights"}
        )


@dataclass
class MAMLEvalReport:
    """Mean return per phase (0 = before adaptation, k = after k adaptations) on a split."""

    env: str
    split: str
    tasks: int
    episodes_per_step: int
    return_by_phase: list[float]
    normalized_by_phase: list[float] | None
    random_return: float
    oracle_return: float | None


def evaluate_policy(
    policy: MAMLPolicy,
    env_name: str,
    split: str,
    n_tasks: int,
    seed: int,
    oracle_return: float | None = None,
) -> MAMLEvalReport:
    """Fly ``adaptations + 1`` phases on held-out tasks; normalized by random and oracle."""
    family = make_family(env_name, 1)
    tasks = held_out_tasks(family, split, n_tasks, seed)
    phases = policy.adaptations + 1
    e = policy.episodes_per_step
    res = rollout(policy, env_name, tasks, episodes=phases * e, seed=seed)
    by_phase = res.returns_TE.reshape(len(tasks), phases, e).mean(axis=(0, 2)).tolist()
    if oracle_return is None:
        oracle_return = analytic_oracle_return(env_name, tasks, seed)
    rand = random_policy_return(env_name, tasks, seed)
    norm = None
    if oracle_return is not None and abs(oracle_return - rand) > 1e-9:
        norm = [(r - rand) / (oracle_return - rand) for r in by_phase]
    return MAMLEvalReport(env_name, str(split), len(tasks), e, by_phase, norm, rand, oracle_return)


def analytic_oracle_return(env_name: str, tasks_TK: np.ndarray, seed: int) -> float | None:
    """The privileged oracle's mean return where one is known in closed form (nav2d)."""
    if env_name != "nav2d":
        return None
    from runtime.tasks.nav2d import oracle_action

    env = make_family(env_name, len(tasks_TK))
    obs = env.reset(tasks_TK, np.random.default_rng(seed))
    total = np.zeros(len(tasks_TK))
    for _ in range(env.spec.horizon):
        res = env.step(oracle_action(obs, tasks_TK))
        total += res.reward
        obs = res.obs
    return float(total.mean())
