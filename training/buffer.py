"""Per-task replay buffers (numpy ring buffers, one slot per meta-train task)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class TransitionBatch(NamedTuple):
    """Transitions grouped by task: arrays shaped ``(M, B, ...)`` for M tasks, B samples."""

    obs: np.ndarray
    action: np.ndarray  # normalized, in [-1, 1]
    reward: np.ndarray
    next_obs: np.ndarray
    done: np.ndarray  # terminated (not truncated): no bootstrap past it


class MultiTaskReplay:
    """Fixed-capacity ring buffer per task; sampling draws from all or only recent data."""

    def __init__(self, num_tasks: int, capacity: int, obs_dim: int, act_dim: int) -> None:
        self.capacity = capacity
        self.obs = np.zeros((num_tasks, capacity, obs_dim), dtype=np.float32)
        self.action = np.zeros((num_tasks, capacity, act_dim), dtype=np.float32)
        self.reward = np.zeros((num_tasks, capacity), dtype=np.float32)
        self.next_obs = np.zeros((num_tasks, capacity, obs_dim), dtype=np.float32)
        self.done = np.zeros((num_tasks, capacity), dtype=np.float32)
        self.size = np.zeros(num_tasks, dtype=np.int64)
        self.head = np.zeros(num_tasks, dtype=np.int64)

    def add(self, task_idx: np.ndarray, batch: TransitionBatch) -> None:
        """Append one transition per entry of ``task_idx`` (arrays shaped ``(N, ...)``)."""
        slots = self.head[task_idx]
        self.obs[task_idx, slots] = batch.obs
        self.action[task_idx, slots] = batch.action
        self.reward[task_idx, slots] = batch.reward
        self.next_obs[task_idx, slots] = batch.next_obs
        self.done[task_idx, slots] = batch.done
        self.head[task_idx] = (slots + 1) % self.capacity
        self.size[task_idx] = np.minimum(self.size[task_idx] + 1, self.capacity)

    def sample(
        self, task_idx: np.ndarray, n: int, rng: np.random.Generator, recent: int | None = None
    ) -> TransitionBatch:
        """``n`` transitions per task in ``task_idx``, uniformly from the last ``recent`` ones."""
        size = self.size[task_idx]
        if np.any(size == 0):
            raise ValueError("sampling from a task with an empty buffer")
        window = size if recent is None else np.minimum(size, recent)
        back = (rng.random((len(task_idx), n)) * window[:, None]).astype(np.int64) + 1
        slots = (self.head[task_idx][:, None] - back) % self.capacity
        rows = task_idx[:, None]
        return TransitionBatch(
            self.obs[rows, slots],
            self.action[rows, slots],
            self.reward[rows, slots],
            self.next_obs[rows, slots],
            self.done[rows, slots],
        )

    def sample_episode_prefixes(
        self,
        task_idx: np.ndarray,
        length: int,
        horizon: int,
        recent_episodes: int,
        rng: np.random.Generator,
    ) -> tuple[TransitionBatch, np.ndarray]:
        """``length`` consecutive transitions per task, starting where a recent episode started.

        Collection writes whole episodes of ``horizon`` steps, so episode starts lie at
        ``head - e * horizon``. The start is one of the last ``recent_episodes`` episodes; the
        sequence may run on into the episodes after it (as the belief carries over at meta-test).
        Also returns how many of the ``length`` transitions are real (not past the newest one).
        """
        stored = self.size[task_idx] // horizon
        if np.any(stored == 0):
            raise ValueError("sampling an episode prefix from a task with no complete episode")
        back = (rng.random(len(task_idx)) * np.minimum(stored, recent_episodes)).astype(np.int64)
        start = self.head[task_idx] - (back + 1) * horizon
        slots = (start[:, None] + np.arange(length)[None, :]) % self.capacity
        rows = task_idx[:, None]
        batch = TransitionBatch(
            self.obs[rows, slots],
            self.action[rows, slots],
            self.reward[rows, slots],
            self.next_obs[rows, slots],
            self.done[rows, slots],
        )
        return batch, np.minimum((back + 1) * horizon, length)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in _FIELDS}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for k in _FIELDS:
            getattr(self, k)[...] = state[k]


_FIELDS = ("obs", "action", "reward", "next_obs", "done", "size", "head")
