"""How one transition is laid out for the context encoder (shared by training and runtime).

``transition = concat(obs, action, reward, next_obs)`` where ``action`` is the policy's
*normalized* action in [-1, 1] (before scaling to the family's bounds) and ``reward`` is the raw
environment reward. Width = 2 * obs_dim + act_dim + 1.
"""

from __future__ import annotations

import numpy as np


def transition_dim(obs_dim: int, act_dim: int) -> int:
    """Width of one encoded transition."""
    return 2 * obs_dim + act_dim + 1


def encode_transition(
    obs_BO: np.ndarray, action_BA: np.ndarray, reward_B: np.ndarray, next_obs_BO: np.ndarray
) -> np.ndarray:
    """Concatenate a batch of transitions into encoder input, float32 ``(B, D)``."""
    return np.concatenate(
        [obs_BO, action_BA, np.asarray(reward_B).reshape(-1, 1), next_obs_BO], axis=1
    ).astype(np.float32)
