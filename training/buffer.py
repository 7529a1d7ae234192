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

    def sample_episode_context(
        self,
        task_idx: np.ndarray,
        size: int,
        horizon: int,
        recent_episodes: int,
        rng: np.random.Generator,
    ) -> tuple[TransitionBatch, np.ndarray]:
        """What an online belief holds k steps after a recent episode started, in ``size`` slots.

        Collection writes whole episodes of ``horizon`` steps, so episode starts lie at
        ``head - e * horizon``. A start is drawn among the last ``recent_episodes`` episodes and
        k ~ U{1..transitions from there to the newest} (runs on into later episodes, as the
        belief carries over at meta-test). When k <= size the context is those k transitions
        (weight 1, the rest weight 0). When k > size, ``size`` distinct ones are drawn uniformly
        among the k and weighted k / size: the posterior's natural parameters are sums over
        transitions, so the weighted sums are unbiased for the full k-transition belief, at a
        fixed cost whatever the horizon.

        Returns transitions ``(M, size, ...)`` and weights ``(M, size)``.
        """
        stored = self.size[task_idx] // horizon
        if np.any(stored == 0):
            raise ValueError("sampling an episode context from a task with no complete episode")
        m = len(task_idx)
        back = (rng.random(m) * np.minimum(stored, recent_episodes)).astype(np.int64) + 1
        k = (rng.random(m) * back * horizon).astype(np.int64) + 1
        slot = np.arange(size)[None, :]
        # A uniform subset of `size` distinct offsets among the first k: sort random keys.
        keys = rng.random((m, max(int(k.max()), size)))
        keys[np.arange(keys.shape[1])[None, :] >= k[:, None]] = np.inf
        subset = np.sort(np.argsort(keys, axis=1)[:, :size], axis=1)
        long = (k > size)[:, None]
        offset = np.where(long, subset, slot)
        weight = np.where(long, k[:, None] / size, (slot < k[:, None]).astype(np.float64))
        slots = (self.head[task_idx][:, None] - back[:, None] * horizon + offset) % self.capacity
        rows = task_idx[:, None]
        batch = TransitionBatch(
            self.obs[rows, slots],
            self.action[rows, slots],
            self.reward[rows, slots],
            self.next_obs[rows, slots],
            self.done[rows, slots],
        )
        return batch, weight.astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in _FIELDS}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for k in _FIELDS:
            getattr(self, k)[...] = state[k]


_FIELDS = ("obs", "action", "reward", "next_obs", "done", "size", "head")
