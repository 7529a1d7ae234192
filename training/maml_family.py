"""MAML's registry hooks (:mod:`training.registry`): train, rebuild a run's meta-learned
weights, and the deployment policy. The training loop itself is :mod:`training.maml`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.errors import CheckpointError
from runtime.tasks.base import FamilySpec
from training import maml
from training.maml_config import MAMLTrainConfig
from training.maml_policy import MAMLPolicy

__all__ = ["ADAPTATIONS", "load_networks", "nets_of", "policy_for", "train"]

#: Inner steps per task at meta-test and on the device (MAML's evaluation: one).
ADAPTATIONS = 1


def train(
    cfg: MAMLTrainConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    bar_position: int = 0,
) -> maml.MAMLState:
    """Meta-train (see :func:`training.maml.train`; one progress bar, so no position)."""
    return maml.train(cfg, Path(run_dir), resume=resume, progress=progress)


def load_networks(cfg: MAMLTrainConfig, spec: FamilySpec, data: dict[str, Any]) -> maml.MAMLState:
    """The run's meta-learned weights (and inner step size) from a checkpoint."""
    if data.get("algo") != "maml":
        raise CheckpointError("not a MAML checkpoint")
    state = maml.init_state(cfg)
    with torch.no_grad():
        state.theta.copy_(data["theta"])
        if "log_inner_lr" in data:
            state.log_inner_lr.copy_(data["log_inner_lr"])
    return state


def nets_of(state: maml.MAMLState) -> maml.MAMLState:
    return state


class SeededMAMLPolicy(MAMLPolicy):
    """The torch meta-test policy with its exploration noise restarted at every task, exactly as
    the runtime draws it (:class:`runtime.episodic.ExplorationNoise`): same seed, same flight."""

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, rng=np.random.default_rng(seed), **kwargs)
        self.seed = seed

    def begin_task(self, tasks_BK: np.ndarray) -> None:
        self.rng = np.random.default_rng(self.seed)
        super().begin_task(tasks_BK)

    def begin_episode(self) -> None:
        """Episodes end through ``observe(..., done=True)``; nothing to do at the start."""


def policy_for(run: Any, adaptive: bool = True) -> SeededMAMLPolicy:
    """Meta-test policy: ``episodes_per_step`` exploration episodes with the meta-learned
    weights, one inner step, then the adapted mean policy. ``adaptive=False``: the meta-learned
    weights' mean policy, never adapted."""
    state = run.nets
    m = state.cfg.maml
    return SeededMAMLPolicy(
        state.theta.detach().clone(),
        state.settings,
        state.spec,
        m.episodes_per_step,
        ADAPTATIONS if adaptive else 0,
        state.inner_lr,
        deterministic_final=True,
    )
