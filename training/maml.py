"""MAML-RL meta-training (Finn et al., 2017) with a ProMP-style outer update, top to bottom.

One iteration, for a meta-batch of M train tasks (all vectorized in one numpy family of
M x E environments):

1. fly E episodes per task with the meta-weights theta, sampling actions;
2. adapt: theta' = theta - inner_lr * grad of the policy-gradient surrogate on those episodes
   (linear baseline fitted per task; the same function the device's adapt graph runs);
3. fly E episodes per task with theta' (the post-update episodes);
4. meta-update theta with Adam on the PPO-clipped surrogate of the post-update episodes under
   theta'(theta), differentiating *through* the inner step (second order).

Why this outer update and not TRPO (the paper's): ProMP (Rothfuss et al., 2019) showed the
clipped surrogate plus the likelihood-ratio form of the inner loss (its low-variance curvature
estimator) matches or beats MAML-TRPO; it needs only first-order optimizer steps on the
meta-gradient, where TRPO needs Hessian-vector products through the inner step inside a
conjugate-gradient solve plus a line search: more code and more time on two cores.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml

from runtime.errors import CheckpointError
from runtime.tasks import Split, make_family
from runtime.tasks.base import FamilySpec
from training.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    LATEST,
    read_checkpoint,
    write_checkpoint,
)
from training.maml_config import MAMLTrainConfig
from training.maml_inner import AdaptSettings, batch_advantages, inner_update
from training.maml_networks import (
    InnerBatch,
    PolicyLayout,
    init_weights,
    log_prob,
    policy_log_std,
    policy_mean,
)
from training.maml_policy import MAMLPolicy, evaluate_policy
from training.plots import plot_learning_curve, read_metrics
from training.progress import METRICS_FILE, Progress, run_loop
from training.rollouts import (
    InProcessPool,
    RolloutPool,
    ShardJob,
    WorkerCache,
    collect_shards,
    open_pool,
    shard_generators,
)

log = logging.getLogger(__name__)

#: What the progress bar shows of each iteration.
MAML_POSTFIX = {
    "pre": ("train_pre", "{:.1f}"),
    "post": ("train_post", "{:.1f}"),
    "test_post": ("eval_post", "{:.1f}"),
}

CONFIG_FILE = "config.yaml"


@dataclass
class MAMLState:
    """Everything that changes during training (what a checkpoint restores)."""

    cfg: MAMLTrainConfig
    spec: FamilySpec
    theta: torch.Tensor  # (W,) meta-learned weights, requires grad
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator
    train_tasks: np.ndarray | None  # fixed train tasks, or None: fresh ones each iteration
    log_inner_lr: torch.Tensor  # () or (W,) (Meta-SGD) log of the inner step size(s)
    iteration: int = 0
    env_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def per_weight(self) -> bool:
        """Whether the run learns one inner step size per weight (Meta-SGD)."""
        return self.log_inner_lr.ndim == 1

    @property
    def inner_lr(self) -> float:
        """The scalar step size the device's ``inner_lr`` param holds: the learned one, or
        with Meta-SGD 1 (a multiplier of the per-weight step sizes in ``settings.lr_scale``)."""
        return 1.0 if self.per_weight else float(self.log_inner_lr.detach().exp())

    def inner_lr_rows(self, rows: int) -> torch.Tensor:
        """Step sizes for ``rows`` weight rows, ``(rows, 1)`` or ``(rows, W)``; differentiable
        with respect to the learned log step size(s)."""
        lr = self.log_inner_lr.exp().reshape(1, -1)
        return lr.expand(rows, -1)

    @property
    def layout(self) -> PolicyLayout:
        return PolicyLayout(self.spec.obs_dim, self.spec.act_dim, self.cfg.model.hidden)

    @property
    def settings(self) -> AdaptSettings:
        m = self.cfg.maml
        scale = None
        if self.per_weight:
            scale = self.log_inner_lr.detach().exp().numpy().astype(np.float32)
        return AdaptSettings(
            self.layout, self.spec.horizon, m.gamma, m.baseline_ridge, m.inner_steps, scale
        )


class Episodes(NamedTuple):
    """E episodes per task in episode-major slots, plus their sampling log-density."""

    batch: InnerBatch  # (M, E*H, ...)
    logp_MN: torch.Tensor  # log-density of each action under the weights that sampled it
    mean_return: float  # mean episode return over tasks and episodes


def train(
    cfg: MAMLTrainConfig, run_dir: Path, resume: bool = False, progress: bool = True
) -> MAMLState:
    """Meta-train and write the run directory; returns the final state."""
    torch.set_num_threads(cfg.train.num_threads)
    run_dir = Path(run_dir)
    state = init_state(cfg)
    if resume:
        restore(state, run_dir)
    else:
        write_run_config(run_dir, cfg)
    pool = open_pool(cfg)
    try:
        run_iterations(state, run_dir, pool, progress)
    finally:
        pool.close()
    plot_curve(run_dir)
    return state


def run_iterations(state: MAMLState, run_dir: Path, pool: RolloutPool, progress: bool) -> None:
    """The loop: pre-update episodes, inner step, post-update episodes (both through
    ``pool``), meta-update, log, evaluate, checkpoint."""
    cfg = state.cfg
    m = cfg.maml.meta_batch
    bar = Progress(
        progress,
        cfg.train.iterations,
        state.iteration,
        f"train {cfg.env.name} (MAML)",
        MAML_POSTFIX,
    )

    def iteration(start: float, steps_at_start: int) -> dict[str, Any]:
        tasks = sample_tasks(state)
        w_MW = state.theta.detach().expand(m, -1)
        pre = collect(state, tasks, w_MW, pool)
        if cfg.maml.pretrain:
            post, stats = pre, pretrain_update(state, pre)
        else:
            adapted = adapt_weights(state, w_MW, pre)
            post = collect(state, tasks, adapted, pool)
            stats = outer_update(state, pre, post)
        state.iteration += 1
        return metrics_row(state, pre, post, stats, time.perf_counter() - start, steps_at_start)

    run_loop(state, run_dir, bar, iteration, quick_eval, checkpoint)


# -- setup ------------------------------------------------------------------------------------
def init_state(cfg: MAMLTrainConfig) -> MAMLState:
    """Seed the RNGs, draw the (optional) fixed train tasks, initialize theta and Adam."""
    rng = np.random.default_rng(cfg.seed)
    family = make_family(cfg.env.name, 1)
    spec = family.spec
    layout = PolicyLayout(spec.obs_dim, spec.act_dim, cfg.model.hidden)
    theta = init_weights(layout, cfg.model.init_std, cfg.seed).requires_grad_(True)
    log_lr = torch.tensor(float(np.log(cfg.maml.inner_lr)))
    if cfg.maml.per_weight_inner_lr:
        log_lr = log_lr.expand(layout.num_weights).clone()
    learn_lr = cfg.maml.learn_inner_lr or cfg.maml.per_weight_inner_lr
    log_lr.requires_grad_(learn_lr)
    params = [theta, log_lr] if learn_lr else [theta]
    optimizer = torch.optim.Adam(params, lr=cfg.maml.outer_lr)
    train_tasks = None
    if cfg.env.num_train_tasks:
        train_tasks = family.sample_tasks(Split.TRAIN, cfg.env.num_train_tasks, rng)
    return MAMLState(cfg, spec, theta, optimizer, rng, train_tasks, log_lr)


def sample_tasks(state: MAMLState) -> np.ndarray:
    """A meta-batch of train tasks ``(M, K)``."""
    m = state.cfg.maml.meta_batch
    if state.train_tasks is None:
        return make_family(state.cfg.env.name, 1).sample_tasks(Split.TRAIN, m, state.rng)
    replace = m > len(state.train_tasks)
    ids = state.rng.choice(len(state.train_tasks), m, replace=replace)
    return state.train_tasks[ids]


# -- collection -------------------------------------------------------------------------------
def collect(
    state: MAMLState, tasks_MK: np.ndarray, w_MW: torch.Tensor, pool: RolloutPool | None = None
) -> Episodes:
    """E sampled episodes per task with per-task weights (in shards, through ``pool``)."""
    pool = pool or InProcessPool()
    e = state.cfg.maml.episodes_per_step
    weights = pool.put(w_MW.detach())
    _, parts = collect_shards(pool, episodes_shard, state.cfg, weights, tasks_MK, state.rng, e)
    obs, act, rew = (np.concatenate(x) for x in zip(*parts, strict=True))
    m, h = len(tasks_MK), state.spec.horizon
    state.env_steps += m * e * h
    with torch.no_grad():
        batch = InnerBatch(
            torch.from_numpy(obs.reshape(m, e * h, -1)),
            torch.from_numpy(act.reshape(m, e * h, -1)),
            torch.from_numpy(rew.reshape(m, e * h)),
            torch.ones(m, e * h),  # the families never terminate early: every slot is flown
        )
        logp = log_prob(batch.obs_BNO, batch.action_BNA, w_MW, state.layout)
    return Episodes(batch, logp, float(rew.sum(axis=2).mean()))


def episodes_shard(
    cfg: MAMLTrainConfig, w_MW: torch.Tensor, job: ShardJob, cache: WorkerCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MAML's shard function: ``job.episodes`` episodes per task of the job, each task flown
    with its row of ``w_MW``; returns obs ``(n, E, H, O)``, raw actions ``(n, E, H, A)`` and
    rewards ``(n, E, H)`` (env row ``i * E + e``)."""
    m, e = len(job.tasks), job.episodes
    env = cache.env(cfg, m * e)
    spec = env.spec
    h = spec.horizon
    layout = PolicyLayout(spec.obs_dim, spec.act_dim, cfg.model.hidden)
    w = w_MW[torch.from_numpy(job.rows)]
    rng, _ = shard_generators(job)
    obs = env.reset(np.repeat(job.tasks, e, axis=0), rng)
    buf_obs = np.zeros((m, e, h, spec.obs_dim), np.float32)
    buf_act = np.zeros((m, e, h, spec.act_dim), np.float32)
    buf_rew = np.zeros((m, e, h), np.float32)
    half = (spec.act_high - spec.act_low) / 2.0
    with torch.no_grad():
        std = torch.exp(policy_log_std(w, layout)).numpy()[:, None, :]
        for t in range(h):
            o = obs.reshape(m, e, spec.obs_dim)
            mean = policy_mean(torch.from_numpy(o), w, layout).numpy()
            raw = (mean + std * rng.standard_normal(mean.shape)).astype(np.float32)
            physical = spec.act_low + half * (np.clip(raw, -1.0, 1.0) + 1.0)
            res = env.step(physical.reshape(m * e, spec.act_dim))
            buf_obs[:, :, t], buf_act[:, :, t] = o, raw
            buf_rew[:, :, t] = res.reward.reshape(m, e)
            obs = res.obs
    return buf_obs, buf_act, buf_rew


def adapt_weights(state: MAMLState, w_MW: torch.Tensor, pre: Episodes) -> torch.Tensor:
    """The inner step for collecting post-update episodes (no meta-gradient needed)."""
    with torch.no_grad():
        adv = batch_advantages(pre.batch, state.settings)
        lr = state.inner_lr_rows(len(w_MW))
    return inner_update(w_MW, pre.batch, adv, lr, state.settings).detach()


# -- meta-update ------------------------------------------------------------------------------
def outer_update(state: MAMLState, pre: Episodes, post: Episodes) -> dict[str, float]:
    """``outer_epochs`` Adam steps on the clipped post-update surrogate through the inner step."""
    cfg = state.cfg.maml
    settings = state.settings
    with torch.no_grad():
        adv_pre = batch_advantages(pre.batch, settings)
        adv_post = batch_advantages(post.batch, settings)
    m = pre.batch.obs_BNO.shape[0]
    stats: dict[str, float] = {}
    for epoch in range(cfg.outer_epochs):
        w = state.theta.expand(m, -1)
        lr = state.inner_lr_rows(m)
        adapted = inner_update(w, pre.batch, adv_pre, lr, settings, old_logp_BN=pre.logp_MN)
        logp = log_prob(post.batch.obs_BNO, post.batch.action_BNA, adapted, state.layout)
        stats.update(_clipped_step(state, logp - post.logp_MN, adv_post))
        if epoch == 0:
            stats["loss_outer_first"] = stats["loss_outer"]
    return stats | _policy_stats(state)


def pretrain_update(state: MAMLState, batch: Episodes) -> dict[str, float]:
    """The pretrained baseline's update: ``outer_epochs`` Adam steps on the clipped surrogate
    of the episodes under theta itself (plain policy gradient on the task mixture)."""
    cfg = state.cfg.maml
    with torch.no_grad():
        adv = batch_advantages(batch.batch, state.settings)
    m = batch.batch.obs_BNO.shape[0]
    stats: dict[str, float] = {}
    for _ in range(cfg.outer_epochs):
        w = state.theta.expand(m, -1)
        logp = log_prob(batch.batch.obs_BNO, batch.batch.action_BNA, w, state.layout)
        stats.update(_clipped_step(state, logp - batch.logp_MN, adv))
    return stats | _policy_stats(state)


def _clipped_step(state: MAMLState, log_ratio: torch.Tensor, adv: torch.Tensor) -> dict[str, float]:
    """One Adam step on the PPO-clipped surrogate (the log-std frozen unless learned)."""
    cfg = state.cfg.maml
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    loss = -torch.minimum(ratio * adv, clipped * adv).mean()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if not state.cfg.model.learn_std:
        state.theta.grad[-state.spec.act_dim :] = 0.0  # log-std is the last A weights
    grad_norm = torch.nn.utils.clip_grad_norm_([state.theta], cfg.max_grad_norm)
    state.optimizer.step()
    return {
        "loss_outer": float(loss.detach()),
        "meta_grad_norm": float(grad_norm),
        "ratio_dev": float((ratio.detach() - 1.0).abs().mean()),
    }


def _policy_stats(state: MAMLState) -> dict[str, float]:
    std = torch.exp(policy_log_std(state.theta.detach()[None], state.layout))
    return {
        "policy_std": float(std.mean()),
        "inner_lr": float(state.log_inner_lr.detach().exp().mean()),
    }


# -- evaluation, metrics, checkpoints ----------------------------------------------------------
def make_eval_policy(state: MAMLState, adaptations: int = 1, seed: int = 0) -> MAMLPolicy:
    """The meta-test policy of the current theta (exploration, then ``adaptations`` steps)."""
    cfg = state.cfg.maml
    return MAMLPolicy(
        state.theta.detach().clone(),
        state.settings,
        state.spec,
        cfg.episodes_per_step,
        adaptations,
        state.inner_lr,
        np.random.default_rng(seed),
        cfg.deterministic_adapted,
    )


def quick_eval(state: MAMLState) -> dict[str, float]:
    """Test-split returns before and after one adaptation (normalized where an oracle is known)."""
    cfg = state.cfg
    policy = make_eval_policy(state, 1, seed=cfg.seed + 2)
    rep = evaluate_policy(policy, cfg.env.name, "test", cfg.eval.tasks, seed=cfg.seed + 1)
    row = {"eval_pre": rep.return_by_phase[0], "eval_post": rep.return_by_phase[1]}
    if rep.normalized_by_phase is not None:
        row.update(
            eval_pre_norm=rep.normalized_by_phase[0], eval_post_norm=rep.normalized_by_phase[1]
        )
    return row


def metrics_row(
    state: MAMLState,
    pre: Episodes,
    post: Episodes,
    stats: dict[str, float],
    elapsed: float,
    steps_at_start: int,
) -> dict[str, Any]:
    return {
        "iteration": state.iteration,
        "env_steps": state.env_steps,
        "train_pre": pre.mean_return,
        "train_post": post.mean_return,
        "wall_s": round(elapsed, 3),
        "env_steps_per_s": (state.env_steps - steps_at_start) / max(elapsed, 1e-9),
        **stats,
    }


def write_run_config(run_dir: Path, cfg: MAMLTrainConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (run_dir / METRICS_FILE).write_text("")


def checkpoint(state: MAMLState, run_dir: Path) -> Path:
    """theta, Adam, counters, the numpy RNG and the fixed train tasks (``latest.pt`` too)."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "algo": "maml",
        "theta": state.theta.detach().clone(),
        "log_inner_lr": state.log_inner_lr.detach().clone(),
        "optim": state.optimizer.state_dict(),
        "iteration": state.iteration,
        "env_steps": state.env_steps,
        "rng_numpy": json.dumps(state.rng.bit_generator.state),
        "train_tasks": None if state.train_tasks is None else torch.from_numpy(state.train_tasks),
    }
    return write_checkpoint(run_dir, payload, state.iteration)


def read_maml_checkpoint(path: Path) -> dict[str, Any]:
    """Load a MAML checkpoint safely (the shared format, tensors and plain data only)."""
    data = read_checkpoint(path)
    if data.get("algo") != "maml":
        raise CheckpointError(f"{path}: not an edgeadapt MAML checkpoint")
    return data


def restore(state: MAMLState, run_dir: Path) -> None:
    """Continue a run from its latest checkpoint; the metrics beyond it are dropped."""
    data = read_maml_checkpoint(run_dir / "checkpoints" / LATEST)
    with torch.no_grad():
        state.theta.copy_(data["theta"])
        if "log_inner_lr" in data:  # runs from before maml.learn_inner_lr keep the config's
            state.log_inner_lr.copy_(data["log_inner_lr"])
    state.optimizer.load_state_dict(data["optim"])
    state.iteration = int(data["iteration"])
    state.env_steps = int(data["env_steps"])
    state.rng.bit_generator.state = json.loads(data["rng_numpy"])
    tasks = data["train_tasks"]
    state.train_tasks = None if tasks is None else tasks.numpy()
    rows = [r for r in read_metrics(run_dir) if r["iteration"] <= state.iteration]
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    state.history = rows
    log.info("resumed %s at iteration %d", run_dir, state.iteration)


def load_maml_run(run_dir: str | Path) -> MAMLState:
    """A trained run's state (config + latest theta) for evaluation or export."""
    from runtime.configio import validate

    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    cfg = validate(yaml.safe_load(path.read_text()) or {}, MAMLTrainConfig, source=str(path))
    state = init_state(cfg)
    data = read_maml_checkpoint(run_dir / "checkpoints" / LATEST)
    with torch.no_grad():
        state.theta.copy_(data["theta"])
        if "log_inner_lr" in data:
            state.log_inner_lr.copy_(data["log_inner_lr"])
    return state


def plot_curve(run_dir: Path) -> Path:
    """Train returns before/after the inner step and test evaluations, against env steps."""
    return plot_learning_curve(
        run_dir,
        f"MAML, {len(read_metrics(run_dir))} iterations",
        train=(("train_pre", "train, before adapt"), ("train_post", "train, after 1 step")),
        evals=(("eval_pre", "test, before"), ("eval_post", "test, after 1 step")),
        losses=(("loss_outer", "outer surrogate"), ("policy_std", "policy std")),
        loss_title="meta-update",
        symlog=False,
    )
