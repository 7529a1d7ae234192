"""The RL² agent as a :class:`runtime.evaluation.AdaptivePolicy` (torch, for evaluation).

The hidden state is the belief: zeros at :meth:`RL2Policy.begin_task`, one GRU step per
observed transition, kept across the episodes of the task. ``adaptive=False`` holds ``h`` at
its initial value (zeros) forever: the non-adaptive reference.
"""

from __future__ import annotations

import numpy as np
import torch

from runtime.tasks.base import FamilySpec
from runtime.transition import encode_transition
from training.rl2_networks import RL2Agent


class RL2Policy:
    """A batch of B RL² agents; actions are normalized to [-1, 1].

    The episode-end flag that the recurrence consumes comes from ``observe(..., done=...)``
    when the caller knows it; otherwise it is inferred from the family's fixed horizon (the
    ``spec.horizon``-th transition after :meth:`begin_task` / :meth:`begin_episode` ends the
    episode), which is what :func:`runtime.evaluation.rollout` needs today.
    """

    def __init__(
        self,
        agent: RL2Agent,
        spec: FamilySpec,
        *,
        adaptive: bool = True,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.agent = agent
        self.spec = spec
        self.adaptive = adaptive
        self.stochastic = stochastic
        self.generator = generator
        self.h = agent.initial_state(1)
        self.steps = np.zeros(1, dtype=np.int64)

    def begin_task(self, tasks_BK: np.ndarray) -> None:
        """A new task: the hidden state returns to zeros."""
        self.h = self.agent.initial_state(len(tasks_BK))
        self.steps = np.zeros(len(tasks_BK), dtype=np.int64)

    def begin_episode(self) -> None:
        """A new episode of the same task: ``h`` is kept, the step counter restarts."""
        self.steps[:] = 0

    @torch.no_grad()
    def act(self, obs_BO: np.ndarray) -> np.ndarray:
        obs = torch.from_numpy(np.asarray(obs_BO, dtype=np.float32))
        if self.stochastic:
            return torch.tanh(self.agent.dist(obs, self.h).sample(self.generator)).numpy()
        return self.agent.act_mean(obs, self.h).numpy()

    @torch.no_grad()
    def observe(
        self,
        obs_BO: np.ndarray,
        action_BA: np.ndarray,
        reward_B: np.ndarray,
        next_obs_BO: np.ndarray,
        done: np.ndarray | bool = False,
    ) -> None:
        """Absorb one transition per agent; ``done`` marks ``next_obs`` as an episode's last."""
        self.steps += 1
        done_B = np.asarray(done, dtype=bool) | (self.steps >= self.spec.horizon)
        self.steps[done_B] = 0
        if not self.adaptive:
            return
        x = torch.from_numpy(encode_transition(obs_BO, action_BA, reward_B, next_obs_BO))
        d = torch.from_numpy(np.broadcast_to(done_B, (len(x),)).astype(np.float32)[:, None])
        self.h = self.agent.absorb(x, d, self.h)
