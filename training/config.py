"""Typed, validated configuration of one training run (loaded from ``configs/``).

Every field is documented where it is declared. Unknown keys and wrong types fail at load time
(``extra="forbid"``) with the file, the dotted key and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnvConfig(_Section):
    name: str = Field("point-nav", description="task family name (see `edgeadapt envs`)")
    plugins: tuple[str, ...] = Field(
        (), description="modules imported first; they call runtime.tasks.register_family"
    )
    num_train_tasks: int = Field(
        0, ge=0, description="distinct train tasks to meta-train on; 0 = every task of the split"
    )


class ModelConfig(_Section):
    latent_dim: int = Field(5, ge=1, le=64, description="size of the task latent z")
    encoder_hidden: tuple[int, ...] = Field(
        (200, 200, 200), description="hidden widths of the per-transition context encoder"
    )
    hidden: tuple[int, ...] = Field((256, 256), description="hidden widths of actor and critics")
    critic_hidden: tuple[int, ...] | None = Field(
        None, description="hidden widths of the critics if not `hidden` (critics are not exported)"
    )
    critic_layer_norm: bool = Field(
        False, description="LayerNorm after each hidden layer of the critics (steadier at high lr)"
    )
    factor_rank: int = Field(
        0,
        ge=0,
        le=4,
        description=(
            "0: diagonal per-transition factors (PEARL); r > 0: each factor adds r rank-one "
            "precision directions, giving a full-covariance posterior"
        ),
    )
    factor_diagonal: bool = Field(
        True,
        description=(
            "with factor_rank > 0, false drops the diagonal part: each transition is then "
            "factor_rank linear measurements of z (cheaper belief update on the device)"
        ),
    )
    factor_var: Literal["per_transition", "shared"] = Field(
        "per_transition",
        description=(
            "the diagonal part's variance: computed from each transition (PEARL), or one learned "
            "variance per latent coordinate shared by every transition"
        ),
    )
    prior_var: float = Field(1.0, gt=0, description="variance of the N(0, prior_var I) prior")
    min_var: float = Field(
        1e-4, gt=0, description="floor on each factor's variance (softplus + min_var)"
    )

    @model_validator(mode="after")
    def _factor_has_precision(self) -> ModelConfig:
        if not self.factor_diagonal and self.factor_rank == 0:
            raise ValueError(
                "factor_diagonal: false needs factor_rank >= 1 (a factor needs some precision)"
            )
        if self.factor_var == "shared" and not self.factor_diagonal:
            raise ValueError(
                "factor_var: shared is the diagonal part's variance: it needs factor_diagonal: true"
            )
        return self

    @field_validator("encoder_hidden", "hidden", "critic_hidden")
    @classmethod
    def _positive(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and (not v or any(w < 1 for w in v)):
            raise ValueError("expected a non-empty list of positive widths")
        return v


class SACConfig(_Section):
    gamma: float = Field(0.99, gt=0, le=1, description="discount factor")
    tau: float = Field(0.005, gt=0, le=1, description="Polyak factor of the target critics")
    lr_actor: float = Field(3e-4, gt=0, description="actor learning rate")
    lr_critic: float = Field(3e-4, gt=0, description="critic (and encoder) learning rate")
    lr_alpha: float = Field(3e-4, gt=0, description="entropy temperature learning rate")
    alpha: float | Literal["auto"] = Field(
        "auto", description="entropy temperature, or 'auto' to tune it toward target_entropy"
    )
    init_alpha: float = Field(0.1, gt=0, description="initial temperature when alpha is 'auto'")
    target_entropy: float | None = Field(
        None, description="target policy entropy (nats); None = -act_dim"
    )
    reward_scale: float = Field(1.0, gt=0, description="rewards are multiplied by this")
    batch_size: int = Field(256, ge=1, description="transitions per task in each SAC batch")


class PEARLConfig(_Section):
    kl_weight: float = Field(0.1, ge=0, description="weight of KL(q(z|c) || prior)")
    lr_encoder: float | None = Field(
        None, gt=0, description="context encoder learning rate; None = sac.lr_critic"
    )
    context_size: int = Field(
        64, ge=1, description="most transitions in a training context (each draws U{1..C} of them)"
    )
    context_sampling: Literal["episodes", "uniform", "mixed"] = Field(
        "episodes",
        description=(
            "'episodes': a context is the first k transitions from the start of a recent "
            "episode, what the online belief has seen k steps into a task at meta-test; "
            "'uniform': k transitions drawn anywhere in the task's buffer (official PEARL); "
            "'mixed': each task of a meta-batch draws one of the two at random"
        ),
    )
    context_episodes: int = Field(
        4, ge=1, description="'episodes' sampling: starts are drawn among this many newest episodes"
    )
    meta_batch: int = Field(16, ge=1, description="tasks per gradient step")
    forget: float = Field(1.0, gt=0, le=1, description="belief forgetting factor at deployment")


class LoopConfig(_Section):
    """What every family's ``train`` section shares (read by :func:`training.progress.run_loop`
    with the family's own ``iterations``, ``eval_every`` and ``checkpoint_every``)."""

    max_minutes: float | None = Field(
        None,
        gt=0,
        description="wall-clock budget (min): stop after the iteration that passes it and "
        "checkpoint; None = run all iterations",
    )


class TrainLoopConfig(LoopConfig):
    iterations: int = Field(200, ge=1, description="meta-training iterations")
    initial_episodes: int = Field(
        4, ge=0, description="prior-latent episodes collected per train task before training"
    )
    tasks_per_iter: int = Field(16, ge=1, description="tasks visited for collection per iteration")
    episodes_prior: int = Field(
        1, ge=0, description="episodes per visited task with z from the prior (exploration data)"
    )
    episodes_posterior: int = Field(
        1, ge=0, description="episodes per visited task with z inferred online (adapted data)"
    )
    updates_per_iter: int = Field(100, ge=1, description="gradient steps per iteration")
    lr_final: float = Field(
        1.0,
        gt=0,
        le=1,
        description=(
            "every learning rate decays linearly to lr_final x its start value over the run "
            "(1 = constant); a small final rate lets the policy settle precisely"
        ),
    )
    buffer_size: int = Field(20_000, ge=100, description="transitions kept per task")
    average_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "exponential moving average of the deployed networks' weights (average_modules), "
            "per gradient step: what the in-training evaluation flies and what export and "
            "evaluate load (the last iterate keeps training); 0 = no average, 0.999 = about "
            "the last 1000 steps"
        ),
    )
    average_modules: tuple[Literal["actor", "encoder"], ...] = Field(
        ("actor", "encoder"),
        min_length=1,
        description="which deployed networks average_decay averages (the others deploy as trained)",
    )
    eval_every: int = Field(20, ge=1, description="iterations between evaluations")
    checkpoint_every: int = Field(50, ge=1, description="iterations between checkpoints")
    num_threads: int = Field(2, ge=1, description="torch intra-op threads")


class EvalConfig(_Section):
    tasks: int = Field(20, ge=1, description="held-out tasks evaluated")
    episodes: int = Field(3, ge=1, description="episodes per task; the belief carries over")
    oracle_run: str | None = Field(
        None, description="run directory of the privileged oracle used for normalized scores"
    )
    oracle_config: str | None = Field(
        None,
        description="config that trains that oracle (for `bench training`); None: "
        "<config>-oracle.yaml beside the config",
    )


class RayConfig(_Section):
    """Rollout collection on Ray actors (``edgeadapt train --ray``; the ``ray`` extra).

    Collection is split into ``workers`` shards, each with its own RNG stream drawn from the
    learner's; one learner updates. The numbers depend on ``workers`` (the shards), not on
    where the shards run: in-process collection is one shard, so ``workers: 1`` on Ray gives
    the same numbers as no Ray at all.
    """

    address: str | None = Field(
        None,
        description=(
            "None: collect in-process (no Ray); 'local': start Ray on this machine; 'auto': "
            "join the running cluster (RAY_ADDRESS or the local head); else a cluster address "
            "(host:port or ray://host:10001)"
        ),
    )
    workers: int = Field(2, ge=1, le=4096, description="rollout actors (= shards per collection)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per rollout actor")
    timeout_s: float = Field(
        600.0, gt=0, description="a shard running longer is abandoned: its actor is replaced"
    )
    max_retries: int = Field(
        3, ge=0, description="re-collections of one shard after its worker died, then fail"
    )


class RunConfig(_Section):
    """What every algorithm's config has: the registry key, the seed, the task family and the
    meta-test protocol. Each algorithm adds its own sections (see :mod:`training.registry`)."""

    algo: str
    seed: int = Field(0, ge=0, description="seed of every RNG in the run")
    env: EnvConfig = EnvConfig()
    eval: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()


class PearlConfig(RunConfig):
    """One PEARL meta-training run (SAC + probabilistic context encoder)."""

    algo: Literal["pearl"] = "pearl"
    model: ModelConfig = ModelConfig()
    sac: SACConfig = SACConfig()
    pearl: PEARLConfig = PEARLConfig()
    train: TrainLoopConfig = TrainLoopConfig()


class OracleConfig(PearlConfig):
    """The privileged oracle: PEARL's SAC loop with the true (normalized) task vector in place
    of z. It scores what perfect task knowledge is worth (the 1 of normalized scores) and
    cannot be exported: a deployed device does not know the task. The ``pearl`` section's
    encoder settings are ignored; ``pearl.meta_batch`` still sets the tasks per update."""

    algo: Literal["oracle"] = "oracle"


#: The PEARL config under the name it had when PEARL was the only algorithm.
TrainConfig = PearlConfig


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a training config of any registered algorithm (its ``algo`` key),
    applying ``key.sub=value`` overrides."""
    from runtime.configio import apply_override, load_yaml_tree
    from training.registry import validate_run_config

    raw = load_yaml_tree(Path(path))
    for item in overrides or []:
        apply_override(raw, item)
    return validate_run_config(raw, source=str(path))
