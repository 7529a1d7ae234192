"""MAML at meta-test without torch: the policy and adapt graphs in onnxruntime (numpy only).

:class:`GradientAdaptation` holds the schedule both implementations share (the torch reference
in ``training.maml_policy`` and :class:`OnnxMAMLPolicy` here), so they differ only in how they
compute an action and an inner step. A task is flown in *phases* of ``episodes_per_step``
episodes: phase 0 with the meta-learned weights, phase k with the weights after k adaptations,
each adaptation being the adapt graph applied to the episodes of the phase before. Exploration
phases sample actions (the policy gradient needs them); the last phase flies the mean when
``deterministic_final``.

What the policy needs from the caller (:class:`runtime.evaluation.AdaptivePolicy` plus):
- episode ends: ``observe(..., done=True)`` or :meth:`GradientAdaptation.end_episode`; without
  either an episode ends after ``horizon`` observed steps (what ``rollout`` does today).
  ``end_episode`` right after an automatic end is a no-op.
- the transitions in order; the buffer records the policy's own raw Gaussian sample for each
  step (the inner step's log-density is of that sample), not the clipped action the caller
  passes back.
A row whose adaptation is not finite (``ok`` False) keeps its weights; :attr:`adapt_log` keeps
every adaptation's outputs (loss before/after, gradient and step norms, ok, time in µs).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

ADAPT_INPUTS = ("weights", "obs", "action_raw", "reward", "mask", "inner_lr")
ADAPT_OUTPUTS = ("weights_out", "ok", "loss_before", "loss_after", "grad_norm", "step_norm")


class GradientAdaptation(ABC):
    """Episode bookkeeping of gradient-based adaptation for a batch of B agents."""

    def __init__(
        self,
        theta_W: np.ndarray,
        obs_dim: int,
        act_dim: int,
        horizon: int,
        episodes_per_step: int,
        adaptations: int,
        inner_lr: float,
        rng: np.random.Generator,
        deterministic_final: bool = True,
    ) -> None:
        self.theta = np.asarray(theta_W, dtype=np.float32)
        self.obs_dim, self.act_dim, self.horizon = obs_dim, act_dim, horizon
        self.episodes_per_step = episodes_per_step
        self.adaptations = adaptations
        self.inner_lr = inner_lr
        self.rng = rng
        self.deterministic_final = deterministic_final
        self.adapt_log: list[dict[str, list[float]]] = []

    # -- to implement -----------------------------------------------------------------------
    @abstractmethod
    def _sample(self, obs_BO: np.ndarray, noise_BA: np.ndarray) -> np.ndarray:
        """Raw action ``mean + std * noise`` ``(B, A)`` under ``self.weights``."""

    @abstractmethod
    def _inner_step(self, buffers: tuple[np.ndarray, ...], lr_B1: np.ndarray) -> dict:
        """Adapt outputs (``weights_out``, ``ok``, stats) for the buffers of every row."""

    # -- the AdaptivePolicy protocol ----------------------------------------------------------
    def begin_task(self, tasks_BK: np.ndarray) -> None:
        """Back to the meta-learned weights; empty buffer; phase 0."""
        b, n = len(tasks_BK), self.episodes_per_step * self.horizon
        self.weights = np.tile(self.theta, (b, 1))
        self.phase, self.episode, self.t = 0, 0, 0
        self.buf_obs = np.zeros((b, n, self.obs_dim), np.float32)
        self.buf_act = np.zeros((b, n, self.act_dim), np.float32)
        self.buf_rew = np.zeros((b, n), np.float32)
        self.buf_mask = np.zeros((b, n), np.float32)

    def begin_episode(self) -> None:
        """Episodes end through ``observe(..., done=True)`` or the horizon: nothing to do."""
        return None

    def act(self, obs_BO: np.ndarray) -> np.ndarray:
        """Normalized action in [-1, 1]; remembers the raw sample for :meth:`observe`."""
        shape = (len(obs_BO), self.act_dim)
        if self.exploring or not self.deterministic_final:
            noise = self.rng.standard_normal(shape).astype(np.float32)
        else:
            noise = np.zeros(shape, np.float32)
        self._raw = self._sample(np.asarray(obs_BO, np.float32), noise).astype(np.float32)
        return np.clip(self._raw, -1.0, 1.0)

    def observe(
        self,
        obs_BO: np.ndarray,
        action_BA: np.ndarray,
        reward_B: np.ndarray,
        next_obs_BO: np.ndarray,
        done: bool = False,
    ) -> None:
        """Record the step in its episode slot; end the episode on ``done`` or at the horizon."""
        slot = self.episode * self.horizon + self.t
        if slot < self.buf_mask.shape[1]:
            self.buf_obs[:, slot] = obs_BO
            self.buf_act[:, slot] = self._raw
            self.buf_rew[:, slot] = reward_B
            self.buf_mask[:, slot] = 1.0
        self.t += 1
        if np.any(done) or self.t >= self.horizon:
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

    @property
    def exploring(self) -> bool:
        return self.phase < self.adaptations

    def _adapt(self) -> None:
        lr = np.full((len(self.weights), 1), self.inner_lr, np.float32)
        start = time.perf_counter_ns()
        out = self._inner_step((self.buf_obs, self.buf_act, self.buf_rew, self.buf_mask), lr)
        elapsed_us = (time.perf_counter_ns() - start) / 1e3
        ok = np.asarray(out["ok"], bool)
        self.weights = np.where(ok[:, None], out["weights_out"], self.weights).astype(np.float32)
        log = {
            k: np.asarray(v).astype(float).tolist() for k, v in out.items() if k != "weights_out"
        }
        log["time_us"] = [elapsed_us]
        self.adapt_log.append(log)


class OnnxMAMLPolicy(GradientAdaptation):
    """The device's MAML policy: ``maml_policy`` and ``maml_adapt`` graphs in onnxruntime.

    The adapt graph has a static batch of one row; rows are adapted one call each.
    """

    def __init__(self, policy_graph: Path, adapt_graph: Path, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        cpu = ["CPUExecutionProvider"]
        self.policy = ort.InferenceSession(str(policy_graph), opts, providers=cpu)
        self.adapter = ort.InferenceSession(str(adapt_graph), opts, providers=cpu)

    def _sample(self, obs_BO: np.ndarray, noise_BA: np.ndarray) -> np.ndarray:
        feed = {"obs": obs_BO, "weights": self.weights, "noise": noise_BA}
        return self.policy.run(["action_raw"], feed)[0]

    def _inner_step(self, buffers: tuple[np.ndarray, ...], lr_B1: np.ndarray) -> dict:
        rows = []
        for b in range(len(self.weights)):
            values = (self.weights[b : b + 1], *(x[b : b + 1] for x in buffers), lr_B1[b : b + 1])
            rows.append(self.adapter.run(None, dict(zip(ADAPT_INPUTS, values, strict=True))))
        return {name: np.concatenate([r[i] for r in rows]) for i, name in enumerate(ADAPT_OUTPUTS)}
