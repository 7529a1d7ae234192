"""MAML at meta-test in torch: the reference of the device's policy, and its evaluation.

:class:`MAMLPolicy` runs the schedule of :class:`runtime.maml_policy.GradientAdaptation`
(exploration episodes, an inner step between episodes, the adapted policy) with the torch
functions the ONNX graphs are traced from; :func:`evaluate_policy` reports the mean return per
phase, normalized between a random policy (0) and the privileged oracle (1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runtime.evaluation import held_out_tasks, random_policy_return, rollout
from runtime.maml_policy import GradientAdaptation
from runtime.tasks import make_family
from runtime.tasks.base import FamilySpec
from training.maml_inner import AdaptSettings, adapt
from training.maml_networks import policy_log_std, policy_mean


class MAMLPolicy(GradientAdaptation):
    """The torch reference of :class:`runtime.maml_policy.OnnxMAMLPolicy` (same schedule)."""

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
        super().__init__(
            theta_W.detach().numpy(),
            spec.obs_dim,
            spec.act_dim,
            spec.horizon,
            episodes_per_step,
            adaptations,
            inner_lr,
            rng,
            deterministic_final,
        )
        self.settings = settings

    def _sample(self, obs_BO: np.ndarray, noise_BA: np.ndarray) -> np.ndarray:
        layout = self.settings.layout
        w = torch.from_numpy(self.weights)
        with torch.no_grad():
            mean = policy_mean(torch.from_numpy(obs_BO).unsqueeze(1), w, layout).squeeze(1)
            std = torch.exp(policy_log_std(w, layout))
        return (mean + std * torch.from_numpy(noise_BA)).numpy()

    def _inner_step(self, buffers: tuple[np.ndarray, ...], lr_B1: np.ndarray) -> dict:
        tensors = (torch.from_numpy(x) for x in (self.weights, *buffers, lr_B1))
        out = adapt(*tensors, self.settings)
        return {
            ("weights_out" if k == "weights" else k): v.detach().numpy()
            for k, v in out._asdict().items()
        }


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
