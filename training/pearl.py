"""PEARL meta-training (SAC + probabilistic context encoder), readable top to bottom.

One iteration: pick train tasks, collect episodes with z from the prior (exploration) and with
the belief updated online (adaptation data), then run gradient updates on meta-batches of
tasks: context -> posterior -> z -> critic (trains the encoder) / actor (z detached). The
privileged oracle (registry entry ``oracle``) is the same loop with z = the normalized true task
vector.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.errors import CheckpointError
from runtime.evaluation import held_out_tasks, rollout
from runtime.tasks import FamilySpec, Split, TaskFamily, make_family
from runtime.transition import transition_dim
from training.agent import (
    PearlNetworks,
    build_networks,
    is_oracle,
    normalize_task,
    policy_latent_dim,
)
from training.buffer import MultiTaskReplay, TransitionBatch
from training.checkpoint import (
    LATEST,
    LoadedRun,
    checkpoint_dir,
    read_checkpoint,
    save_checkpoint,
    write_run_config,
)
from training.collect import add_steps, collect_shard, collection_weights
from training.config import PearlConfig as TrainConfig
from training.losses import TorchBatch, actor_losses, critic_losses, soft_update
from training.policy import OraclePolicy, PearlPolicy
from training.progress import Progress, run_loop
from training.rollouts import InProcessPool, RolloutPool, collect_shards, open_pool

log = logging.getLogger(__name__)

#: What the progress bar shows of each iteration.
PEARL_POSTFIX = {
    "steps/s": ("env_steps_per_s", "{:.0f}"),
    "ret": ("train_return", "{:.2f}"),
    "Lq": ("loss_critic", "{:.3f}"),
    "Lpi": ("loss_actor", "{:.3f}"),
    "eval1": ("eval_return_ep1", "{:.2f}"),
}

BUFFER_FILE = "buffer.npz"


@dataclass
class TrainState:
    """Everything that changes during training (what a checkpoint restores)."""

    cfg: TrainConfig
    nets: PearlNetworks
    optimizers: dict[str, torch.optim.Optimizer]
    buffer: MultiTaskReplay
    train_tasks: np.ndarray
    rng: np.random.Generator
    gen: torch.Generator
    #: The family's spec, looked up once: building a family per gradient step cost 5 ms
    #: (cheetah-vel) to 190 ms (ml1-reach, a Meta-World env per call).
    spec: FamilySpec
    iteration: int = 0
    env_steps: int = 0
    updates: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    #: ``train.average_decay`` > 0: moving averages of the deployed modules (actor, encoder).
    averaged: dict[str, torch.nn.Module] = field(default_factory=dict)


def train(
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    bar_position: int = 0,
) -> TrainState:
    """Meta-train and write the run directory; returns the final state.

    ``bar_position`` is the progress bar's terminal line (two runs side by side use 0 and 1).
    """
    torch.set_num_threads(cfg.train.num_threads)
    state = init_state(cfg)
    if resume:
        restore(state, run_dir)
    else:
        write_run_config(run_dir, cfg)
    pool = open_pool(cfg)
    try:
        run_iterations(state, run_dir, pool, progress, bar_position)
    finally:
        pool.close()
    return state


def run_iterations(
    state: TrainState, run_dir: Path, pool: RolloutPool, progress: bool, bar_position: int
) -> None:
    """The loop: collect (through ``pool``), update, log, evaluate, checkpoint."""
    cfg = state.cfg
    if state.iteration == 0 and cfg.train.initial_episodes:
        collect_initial(state, pool)
    bar = Progress(
        progress,
        cfg.train.iterations,
        state.iteration,
        f"train {cfg.env.name}{' (oracle)' if is_oracle(cfg) else ''}",
        PEARL_POSTFIX,
        bar_position,
    )

    def iteration(start: float, steps_at_start: int) -> dict[str, Any]:
        ids = state.rng.choice(len(state.train_tasks), cfg.train.tasks_per_iter, replace=False)
        train_return = collect_iteration(state, pool, ids)
        set_learning_rates(state)
        stats = [update(state) for _ in range(cfg.train.updates_per_iter)]
        state.iteration += 1
        return metrics_row(state, stats, train_return, time.perf_counter() - start, steps_at_start)

    run_loop(state, run_dir, bar, iteration, quick_eval, checkpoint)


# -- setup --------------------------------------------------------------------------------
def init_state(cfg: TrainConfig) -> TrainState:
    """Seed every RNG, sample the train tasks, build networks, optimizers and buffers."""
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    family = make_family(cfg.env.name, 1)
    spec = family.spec
    train_tasks = train_task_set(family, cfg, rng)
    nets = build_networks(cfg, spec)
    # The encoder is optimized with the critic: the Bellman loss (+ KL) is what trains it.
    critic_groups: list[dict[str, Any]] = [{"params": list(nets.critic.parameters())}]
    if nets.encoder is not None:
        lr_encoder = cfg.pearl.lr_encoder or cfg.sac.lr_critic
        critic_groups.append({"params": list(nets.encoder.parameters()), "lr": lr_encoder})
    optimizers = {
        "actor": torch.optim.Adam(nets.actor.parameters(), lr=cfg.sac.lr_actor),
        "critic": torch.optim.Adam(critic_groups, lr=cfg.sac.lr_critic),
    }
    if cfg.sac.alpha == "auto":
        optimizers["alpha"] = torch.optim.Adam([nets.log_alpha], lr=cfg.sac.lr_alpha)
    buffer = MultiTaskReplay(len(train_tasks), cfg.train.buffer_size, spec.obs_dim, spec.act_dim)
    state = TrainState(cfg, nets, optimizers, buffer, train_tasks, rng, gen, spec)
    if cfg.train.average_decay > 0:
        state.averaged = {name: _frozen_copy(m) for name, m in averaged_modules(cfg, nets).items()}
    return state


def averaged_modules(cfg: TrainConfig, nets: PearlNetworks) -> dict[str, torch.nn.Module]:
    """The deployed modules ``train.average_decay`` averages (``train.average_modules``; the
    oracle has no encoder)."""
    return {k: m for k, m in nets.modules().items() if k in cfg.train.average_modules}


def _frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def update_averages(state: TrainState) -> None:
    """One EMA step of every averaged module toward the trained one."""
    live = averaged_modules(state.cfg, state.nets)
    averages = [p for avg in state.averaged.values() for p in avg.parameters()]
    trained = [p for name in state.averaged for p in live[name].parameters()]
    torch._foreach_lerp_(averages, trained, 1.0 - state.cfg.train.average_decay)


def deployed_nets(state: TrainState) -> PearlNetworks:
    """The networks as they would be exported: the averages where there are some."""
    return dataclasses.replace(state.nets, **state.averaged) if state.averaged else state.nets


def train_task_set(family: TaskFamily, cfg: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """The fixed set of meta-train tasks: the whole finite train pool, or ``num_train_tasks``."""
    pool = getattr(family, "task_pool", None)
    if pool is not None and cfg.env.num_train_tasks == 0:
        return pool(Split.TRAIN)
    n = cfg.env.num_train_tasks or 100
    return family.sample_tasks(Split.TRAIN, n, rng)


def make_policy(state: TrainState, nets: PearlNetworks | None = None, **kwargs: Any) -> PearlPolicy:
    cfg, spec = state.cfg, state.spec
    cls = OraclePolicy if is_oracle(cfg) else PearlPolicy
    return cls(
        nets or state.nets,
        spec,
        policy_latent_dim(cfg, spec),
        cfg.model.prior_var,
        cfg.pearl.forget,
        generator=state.gen,
        **kwargs,
    )


# -- collection ---------------------------------------------------------------------------
def collect_initial(state: TrainState, pool: RolloutPool | None = None) -> None:
    """Prior-latent episodes on every train task so each buffer has data before updates."""
    pool = pool or InProcessPool()
    n = len(state.train_tasks)
    weights = pool.put(collection_weights(state.nets))
    collect(state, pool, weights, np.arange(n), state.cfg.train.initial_episodes, "prior")


def collect_iteration(state: TrainState, pool: RolloutPool, ids: np.ndarray) -> float:
    """Prior-z exploration episodes, then online-belief episodes; returns the latter's mean.

    The weights go to the workers once for both collections (they do not change in between).
    """
    cfg = state.cfg.train
    weights = pool.put(collection_weights(state.nets))
    ret = float("nan")
    if cfg.episodes_prior:
        collect(state, pool, weights, ids, cfg.episodes_prior, "prior")
    if cfg.episodes_posterior:
        ret = float(collect(state, pool, weights, ids, cfg.episodes_posterior, "online").mean())
    return ret


def collect(
    state: TrainState, pool: RolloutPool, weights: Any, ids: np.ndarray, episodes: int, mode: str
) -> np.ndarray:
    """``episodes`` episodes on train tasks ``ids`` (in shards), written into the buffer;
    returns the per-episode mean return over the tasks."""
    tasks = state.train_tasks[ids]
    jobs, parts = collect_shards(
        pool, collect_shard, state.cfg, weights, tasks, state.rng, episodes, mode, state.gen
    )
    for job, part in zip(jobs, parts, strict=True):
        add_steps(state.buffer, ids[job.rows], part.steps)
        state.env_steps += part.steps.obs.shape[0] * len(job.rows)
    return sum(p.return_sum for p in parts) / len(ids)


# -- updates ------------------------------------------------------------------------------
def sample_batch(state: TrainState) -> TorchBatch:
    """A meta-batch: transitions for the RL losses and a variable-size context per task."""
    cfg, spec_env = state.cfg, state.spec
    m = min(cfg.pearl.meta_batch, len(state.train_tasks))
    ids = state.rng.choice(len(state.train_tasks), m, replace=False)
    rl = state.buffer.sample(ids, cfg.sac.batch_size, state.rng)
    flat = [torch.from_numpy(x.reshape(m * cfg.sac.batch_size, -1)) for x in rl]
    context = weight = task_z = None
    if is_oracle(cfg):
        task_z = torch.from_numpy(normalize_task(state.train_tasks[ids], spec_env))
    else:
        context, weight = sample_context(state, ids, spec_env.horizon)
        assert context.shape[-1] == transition_dim(spec_env.obs_dim, spec_env.act_dim)
    return TorchBatch(
        obs=flat[0],
        action=flat[1],
        reward=flat[2].squeeze(-1),
        next_obs=flat[3],
        done=flat[4].squeeze(-1),
        context=context,
        context_weight=weight,
        task_z=task_z,
        per_task=cfg.sac.batch_size,
    )


def sample_context(
    state: TrainState, ids: np.ndarray, horizon: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded contexts ``(M, C, D)`` and per-transition weights ``(M, C)`` (0 = unused).

    Variable sizes because on a device the belief starts from 1 transition, not C. With
    'episodes' sampling a context stands for the first k transitions after a recent episode
    started: exactly the evidence the online belief holds k steps into a task at meta-test
    (k may exceed C and the horizon; see ``MultiTaskReplay.sample_episode_context``). Random
    transitions from the whole buffer (official PEARL) cover far more of the task than an
    agent's own first steps do, and an encoder trained only on them can be confidently wrong
    on those steps (measured on point-nav: z from 64 buffer transitions gives near-oracle
    returns, the online belief after a whole episode does not).
    """
    cfg = state.cfg.pearl
    c = cfg.context_size
    if cfg.context_sampling == "uniform":
        ctx, weight = _uniform_context(state, ids)
    else:
        ctx, weight = state.buffer.sample_episode_context(
            ids, c, horizon, cfg.context_episodes, state.rng
        )
    if cfg.context_sampling == "mixed":
        anywhere = state.rng.random(len(ids)) < 0.5
        uniform, uniform_weight = _uniform_context(state, ids)
        pairs = zip(ctx, uniform, strict=True)
        ctx = TransitionBatch(*(np.where(_rows(anywhere, a), u, a) for a, u in pairs))
        weight = np.where(anywhere[:, None], uniform_weight, weight)
    context = np.concatenate(
        [ctx.obs, ctx.action, ctx.reward[..., None], ctx.next_obs], axis=-1
    ).astype(np.float32)
    return torch.from_numpy(context), torch.from_numpy(weight)


def _uniform_context(state: TrainState, ids: np.ndarray) -> tuple[TransitionBatch, np.ndarray]:
    """k ~ U{1..C} transitions from anywhere in each task's buffer (weights 1, then 0)."""
    c = state.cfg.pearl.context_size
    ctx = state.buffer.sample(ids, c, state.rng)
    sizes = (state.rng.random(len(ids)) * c).astype(np.int64) + 1
    return ctx, (np.arange(c)[None, :] < sizes[:, None]).astype(np.float32)


def _rows(mask_M: np.ndarray, like: np.ndarray) -> np.ndarray:
    return mask_M.reshape((-1,) + (1,) * (like.ndim - 1))


def set_learning_rates(state: TrainState) -> None:
    """Linear decay from each group's start rate to ``lr_final`` x it (a function of the
    iteration only, so a resumed run follows the same schedule)."""
    cfg = state.cfg.train
    frac = state.iteration / max(cfg.iterations - 1, 1)
    factor = 1.0 + (cfg.lr_final - 1.0) * min(frac, 1.0)
    for opt in state.optimizers.values():
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * factor


def update(state: TrainState) -> dict[str, float]:
    """One gradient step on critic+encoder, actor and temperature; Polyak-update targets."""
    cfg, nets, opt = state.cfg, state.nets, state.optimizers
    batch = sample_batch(state)
    spec = state.spec
    target_entropy = (
        cfg.sac.target_entropy if cfg.sac.target_entropy is not None else -float(spec.act_dim)
    )
    crit = critic_losses(
        nets,
        batch,
        gamma=cfg.sac.gamma,
        reward_scale=cfg.sac.reward_scale,
        kl_weight=cfg.pearl.kl_weight,
        prior_var=cfg.model.prior_var,
        generator=state.gen,
    )
    opt["critic"].zero_grad(set_to_none=True)
    crit.loss_critic.backward()
    opt["critic"].step()

    act = actor_losses(
        nets, batch.obs, crit.z_det, target_entropy=target_entropy, generator=state.gen
    )
    opt["actor"].zero_grad(set_to_none=True)
    act.loss_actor.backward()
    opt["actor"].step()
    if "alpha" in opt:
        opt["alpha"].zero_grad(set_to_none=True)
        act.loss_alpha.backward()
        opt["alpha"].step()
    soft_update(nets.critic_target, nets.critic, cfg.sac.tau)
    if state.averaged:
        update_averages(state)
    state.updates += 1
    return {
        "loss_critic": float(crit.loss_critic.detach()),
        "loss_actor": float(act.loss_actor.detach()),
        "loss_kl": float(crit.loss_kl),
        "q_mean": float(crit.q_mean),
        "entropy": float(act.entropy),
    }


# -- evaluation, metrics, checkpoints ---------------------------------------------------------
def quick_eval(state: TrainState) -> dict[str, float]:
    """Deterministic online-adaptation returns on the test split (2 episodes per task)."""
    cfg = state.cfg
    family = make_family(cfg.env.name, 1)
    tasks = held_out_tasks(family, Split.TEST, cfg.eval.tasks, seed=cfg.seed + 1)
    policy = make_policy(
        state, deployed_nets(state), stochastic=False, z_mode="mean", adaptive=True
    )
    res = rollout(policy, cfg.env.name, tasks, episodes=2, seed=cfg.seed + 2)
    return res.eval_row()


def metrics_row(
    state: TrainState,
    stats: list[dict[str, float]],
    train_return: float,
    elapsed: float,
    steps_at_start: int,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "iteration": state.iteration,
        "env_steps": state.env_steps,
        "updates": state.updates,
        "train_return": train_return,
        "alpha": float(state.nets.log_alpha.detach().exp()),
        "wall_s": round(elapsed, 3),
        "env_steps_per_s": (state.env_steps - steps_at_start) / max(elapsed, 1e-9),
    }
    for key in stats[0]:
        row[key] = float(np.mean([s[key] for s in stats]))
    return row


def checkpoint(state: TrainState, run_dir: Path) -> None:
    """Save networks, optimizers, counters and RNG states; the replay buffer goes beside it."""
    extra = {
        "iteration": state.iteration,
        "env_steps": state.env_steps,
        "updates": state.updates,
        "optim": {k: o.state_dict() for k, o in state.optimizers.items()},
        "rng_numpy": json.dumps(state.rng.bit_generator.state),
        "rng_torch": state.gen.get_state(),
        "train_tasks": torch.from_numpy(state.train_tasks.copy()),
    }
    extra["log_alpha"] = state.nets.log_alpha.detach().clone()
    if state.averaged:
        extra["averaged"] = {name: m.state_dict() for name, m in state.averaged.items()}
    save_checkpoint(run_dir, state.nets.modules(), extra)
    tmp = checkpoint_dir(run_dir) / "buffer.tmp.npz"
    np.savez(tmp, **state.buffer.state_dict())
    tmp.replace(checkpoint_dir(run_dir) / BUFFER_FILE)


def restore(state: TrainState, run_dir: Path) -> None:
    """Continue a run from its latest checkpoint (networks, optimizers, RNGs, buffer)."""
    data = read_checkpoint(checkpoint_dir(run_dir) / LATEST)
    for name, module in state.nets.modules().items():
        module.load_state_dict(data["nets"][name])
    state.nets.log_alpha.data.copy_(data["log_alpha"])
    for name, avg in state.averaged.items():
        # A run that did not average yet starts its averages at the restored weights.
        saved = data.get("averaged", {}).get(name, data["nets"][name])
        avg.load_state_dict(saved)
    for k, o in state.optimizers.items():
        o.load_state_dict(data["optim"][k])
    state.iteration = int(data["iteration"])
    state.env_steps = int(data["env_steps"])
    state.updates = int(data["updates"])
    state.rng.bit_generator.state = json.loads(data["rng_numpy"])
    state.gen.set_state(data["rng_torch"])
    state.train_tasks = data["train_tasks"].numpy()
    with np.load(checkpoint_dir(run_dir) / BUFFER_FILE, allow_pickle=False) as buf:
        state.buffer.load_state_dict(dict(buf))
    log.info("resumed %s at iteration %d", run_dir, state.iteration)


# -- registry hooks (training.registry) ---------------------------------------------------------
def load_networks(cfg: TrainConfig, spec: Any, state: dict[str, Any]) -> PearlNetworks:
    """The run's networks with a checkpoint's weights."""
    nets = build_networks(cfg, spec)
    try:
        for name, module in nets.modules().items():
            module.load_state_dict(state["nets"][name])
        nets.log_alpha.data.copy_(state["log_alpha"])
        # What the run deploys: the moving averages of train.average_decay, when it kept some.
        for name, weights in state.get("averaged", {}).items():
            nets.modules()[name].load_state_dict(weights)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint does not match the run's config ({exc})") from None
    return nets


def policy_for(run: LoadedRun, adaptive: bool = True) -> PearlPolicy:
    """Deterministic deployment policy (z = posterior mean; the oracle: the true task)."""
    cfg, spec = run.config, run.family.spec
    cls = OraclePolicy if is_oracle(cfg) else PearlPolicy
    return cls(
        run.nets, spec, policy_latent_dim(cfg, spec), cfg.model.prior_var, cfg.pearl.forget,
        stochastic=False, z_mode="mean", adaptive=adaptive,
    )  # fmt: skip


def nets_of(state: TrainState) -> PearlNetworks:
    """The networks of an in-memory training state."""
    return state.nets
