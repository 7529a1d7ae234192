"""RL²'s registry hooks (:mod:`training.registry`): train, rebuild a run's networks, and the
deployment policy. The training loop itself is :mod:`training.rl2`."""

from __future__ import annotations

from typing import Any

from runtime.errors import CheckpointError
from runtime.tasks.base import FamilySpec
from training.rl2 import TrainState, build_agent, train
from training.rl2_config import RL2TrainConfig
from training.rl2_networks import RL2Agent
from training.rl2_policy import RL2Policy

__all__ = ["build_networks", "load_networks", "policy_for", "train"]


def build_networks(cfg: RL2TrainConfig, spec: FamilySpec) -> RL2Agent:
    """A fresh agent (initialized from torch's global RNG: seed it first)."""
    return build_agent(cfg, spec)


def load_networks(cfg: RL2TrainConfig, spec: FamilySpec, state: dict[str, Any]) -> RL2Agent:
    """The run's agent with a checkpoint's weights and input statistics, in eval mode."""
    if state.get("algo") != "rl2":
        raise CheckpointError("not an RL² checkpoint")
    agent = build_agent(cfg, spec)
    try:
        agent.load_state_dict(state["nets"]["agent"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint does not match the run's config ({exc})") from None
    return agent.eval()


def policy_for(run: Any, adaptive: bool = True) -> RL2Policy:
    """Deterministic deployment policy (tanh of the mean action); ``adaptive=False`` holds the
    hidden state at its initial value (the non-adaptive reference)."""
    return RL2Policy(run.nets, run.family.spec, adaptive=adaptive)


def nets_of(state: TrainState) -> RL2Agent:
    """The networks of an in-memory training state."""
    return state.agent
