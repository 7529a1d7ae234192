"""Typed, validated configuration of one RL² meta-training run (``configs/rl2/``).

Same conventions as :mod:`training.config`: every field documented where it is declared,
unknown keys and wrong types fail at load time naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from runtime.configio import load_config
from training.config import LoopConfig, RunConfig, _Section


class RL2ModelConfig(_Section):
    hidden_size: int = Field(128, ge=1, le=2048, description="GRU hidden state size H")
    embed: tuple[int, ...] = Field(
        (64,), description="widths of the transition embedding (tanh on the last) fed to the GRU"
    )
    head_hidden: tuple[int, ...] = Field(
        (128,), description="hidden widths of the policy, value and auxiliary heads"
    )
    init_log_std: float = Field(
        -0.5, ge=-5, le=1, description="initial log-std of the pre-tanh Gaussian policy"
    )

    @field_validator("embed", "head_hidden")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(w < 1 for w in v):
            raise ValueError("expected a non-empty list of positive widths")
        return v


class PPOConfig(_Section):
    lr: float = Field(
        1e-3, gt=0, description="Adam learning rate (linearly annealed to lr_final x)"
    )
    lr_final: float = Field(
        0.1, ge=0, le=1, description="learning rate at the last iteration, as a fraction of lr"
    )
    clip: float = Field(0.2, gt=0, description="PPO ratio clip epsilon")
    epochs: int = Field(4, ge=1, description="passes over each iteration's trials")
    minibatches: int = Field(4, ge=1, description="minibatches per epoch (split by whole trials)")
    gamma: float = Field(0.99, gt=0, le=1, description="discount factor (also across episodes)")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    entropy_coef: float = Field(0.0, ge=0, description="weight of the entropy bonus")
    value_coef: float = Field(0.5, ge=0, description="weight of the value loss")
    aux_coef: float = Field(
        0.1, ge=0, description="weight of the reward/obs-change prediction loss (surprise head)"
    )
    max_grad_norm: float = Field(0.5, gt=0, description="global gradient norm clip")
    target_kl: float | None = Field(
        None, gt=0, description="stop an iteration's epochs early past this approx KL; None = off"
    )
    reward_scale: float = Field(1.0, gt=0, description="rewards are multiplied by this")
    normalize_reward: bool = Field(
        True,
        description=(
            "divide rewards by a running std of the discounted return (cleanrl's "
            "NormalizeReward), so one set of PPO settings fits every family's reward scale"
        ),
    )
    err_momentum: float = Field(
        0.95, ge=0, lt=1, description="running-average momentum of the surprise scale"
    )


class RL2LoopConfig(LoopConfig):
    iterations: int = Field(1000, ge=1, description="PPO iterations")
    trials_per_iter: int = Field(64, ge=1, description="trials (tasks) collected in parallel")
    episodes_per_trial: int = Field(
        2, ge=1, description="episodes K per trial; the hidden state carries across them"
    )
    normalizer_episodes: int = Field(
        256, ge=2, description="random-action episodes used once to fix the input statistics"
    )
    eval_every: int = Field(50, ge=1, description="iterations between evaluations")
    checkpoint_every: int = Field(200, ge=1, description="iterations between checkpoints")
    num_threads: int = Field(1, ge=1, description="torch intra-op threads")


class RL2TrainConfig(RunConfig):
    """One RL² meta-training run."""

    algo: Literal["rl2"] = "rl2"
    model: RL2ModelConfig = RL2ModelConfig()
    ppo: PPOConfig = PPOConfig()
    train: RL2LoopConfig = RL2LoopConfig()


def load_rl2_config(path: str | Path, overrides: list[str] | None = None) -> RL2TrainConfig:
    """Load and validate an RL² config, applying ``key.sub=value`` overrides."""
    return load_config(path, RL2TrainConfig, overrides)
