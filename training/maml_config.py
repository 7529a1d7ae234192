"""Typed, validated configuration of one MAML meta-training run (``configs/maml/``).

Same conventions as :mod:`training.config`: every field documented where it is declared,
unknown keys and wrong types fail at load time with the file and the dotted key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from runtime.configio import load_config
from training.config import LoopConfig, RunConfig, _Section


class MAMLModelConfig(_Section):
    hidden: tuple[int, ...] = Field(
        (64, 64), description="hidden widths of the tanh MLP policy (MAML: 64 x 64)"
    )
    init_std: float = Field(
        1.0, gt=0, description="initial std of the Gaussian policy (normalized action units)"
    )
    learn_std: bool = Field(
        True,
        description=(
            "the meta-update learns the log-std (false: it stays at init_std; the inner step "
            "still adapts it, like every other weight)"
        ),
    )

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(w < 1 for w in v):
            raise ValueError("expected a non-empty list of positive widths")
        return v


class MAMLAlgoConfig(_Section):
    inner_lr: float = Field(0.1, gt=0, description="inner (adaptation) step size (MAML: 0.1)")
    learn_inner_lr: bool = Field(
        False,
        description="meta-learn the inner step size (log-parameterized, starts at inner_lr)",
    )
    per_weight_inner_lr: bool = Field(
        False,
        description=(
            "Meta-SGD (Li et al., 2017): meta-learn one inner step size per weight "
            "(log-parameterized, each starting at inner_lr; implies a learned step size). The "
            "bundle's adapt graph holds them as a constant; its inner_lr param scales them (1)"
        ),
    )
    inner_steps: int = Field(
        1, ge=1, le=5, description="gradient steps per adaptation, on the same episodes"
    )
    episodes_per_step: int = Field(
        20,
        ge=1,
        description="episodes flown per task before each adaptation (MAML: 20 trajectories)",
    )
    meta_batch: int = Field(20, ge=1, description="tasks per meta-update (MAML 2D nav: 20)")
    gamma: float = Field(0.99, ge=0, le=1, description="discount of the returns-to-go")
    baseline_ridge: float = Field(
        1e-3, gt=0, description="ridge coefficient of the per-task linear baseline fit"
    )
    outer_lr: float = Field(1e-3, gt=0, description="Adam step size of the meta-update")
    outer_epochs: int = Field(
        5, ge=1, description="Adam steps per meta-batch on the clipped surrogate (ProMP: 5)"
    )
    clip_eps: float = Field(
        0.2, gt=0, lt=1, description="PPO/ProMP likelihood-ratio clip of the outer surrogate"
    )
    max_grad_norm: float = Field(
        1.0, gt=0, description="the meta-gradient is clipped to this L2 norm"
    )
    pretrain: bool = Field(
        False,
        description=(
            "train the MAML paper's 'pretrained' baseline instead: the same policy trained by "
            "plain (clipped) policy gradient on the task mixture, no inner step in training; "
            "meta-test fine-tunes it with the same inner step as MAML"
        ),
    )
    deterministic_adapted: bool = Field(
        True,
        description=(
            "evaluation: the adapted policy flies its mean action (exploration episodes are "
            "always stochastic: the inner policy gradient needs sampled actions)"
        ),
    )


class MAMLLoopConfig(LoopConfig):
    iterations: int = Field(300, ge=1, description="meta-training iterations (meta-batches)")
    eval_every: int = Field(25, ge=1, description="iterations between test-split evaluations")
    checkpoint_every: int = Field(50, ge=1, description="iterations between checkpoints")
    num_threads: int = Field(1, ge=1, description="torch intra-op threads")


class MAMLTrainConfig(RunConfig):
    """One MAML-RL meta-training run (ProMP-style clipped outer update).

    ``env.num_train_tasks``: 0 samples fresh tasks of the train split every iteration (MAML's
    setting); n > 0 fixes n train tasks drawn once with the run's seed.
    """

    algo: Literal["maml"] = "maml"
    model: MAMLModelConfig = MAMLModelConfig()
    maml: MAMLAlgoConfig = MAMLAlgoConfig()
    train: MAMLLoopConfig = MAMLLoopConfig()


def load_maml_config(path: str | Path, overrides: list[str] | None = None) -> MAMLTrainConfig:
    """Load and validate a MAML config, applying ``key.sub=value`` overrides."""
    return load_config(path, MAMLTrainConfig, overrides)
