"""RL² meta-training with PPO (Duan et al., 2016), readable top to bottom (cleanrl-like).

One iteration:
1. Collect ``trials_per_iter`` trials in parallel, each on its own train task: K episodes in a
   row with the recurrent state ``h`` carried across the episode boundaries (reset only when
   the trial, i.e. the task, changes). The GRU consumes each transition and its done flag
   (:mod:`training.rl2_networks`), so the policy sees the previous (obs, action, reward, done).
2. GAE over each whole trial: RL² treats the trial as one long episode, so values bootstrap
   *across* episode boundaries inside a trial (exploring in episode 1 is credited with what it
   earns in episode 2); the trial's end is terminal. The critic sees the fraction of the trial
   elapsed, since the returns-to-go depend on it.
3. PPO epochs over minibatches of whole trials, recomputing the GRU over each full trial
   sequence (full BPTT), plus the auxiliary reward/obs-change prediction loss that gives the
   device its surprise score.

Rewards for PPO are divided by a running std of the discounted trial return
(``ppo.normalize_reward``); the GRU always sees the raw reward (standardized by fixed input
statistics, as on the device).
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

from runtime.configio import validate
from runtime.errors import CheckpointError
from runtime.evaluation import held_out_tasks, rollout
from runtime.plugins import import_plugins
from runtime.tasks import Split, TaskFamily, make_family
from runtime.tasks.base import FamilySpec
from runtime.transition import encode_transition
from training.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    LATEST,
    checkpoint_dir,
    read_checkpoint,
    write_checkpoint,
    write_run_config,
)
from training.plots import plot_learning_curve
from training.progress import Progress, run_loop
from training.rl2_config import RL2TrainConfig
from training.rl2_networks import RL2Agent
from training.rl2_policy import RL2Policy
from training.rollouts import (
    InProcessPool,
    RolloutPool,
    ShardJob,
    WorkerCache,
    collect_shards,
    load_weights,
    open_pool,
    shard_generators,
)

log = logging.getLogger(__name__)

#: What the progress bar shows of each iteration.
RL2_POSTFIX = {
    "steps/s": ("env_steps_per_s", "{:.0f}"),
    "ret": ("train_return", "{:.2f}"),
    "Lv": ("loss_critic", "{:.3f}"),
    "kl": ("approx_kl", "{:.4f}"),
    "eval1": ("eval_return_ep1", "{:.2f}"),
    "eval2": ("eval_return_ep2", "{:.2f}"),
}


@dataclass
class RunningStd:
    """Running mean/variance of a stream of numbers (parallel Welford)."""

    count: float = 1e-4
    mean: float = 0.0
    var: float = 1.0

    def update(self, x: np.ndarray) -> None:
        n, m, v = float(x.size), float(x.mean()), float(x.var())
        total = self.count + n
        delta = m - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + v * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return float(np.sqrt(self.var + 1e-8))


@dataclass
class TrainState:
    """Everything that changes during training (what a checkpoint restores)."""

    cfg: RL2TrainConfig
    agent: RL2Agent
    optimizer: torch.optim.Optimizer
    train_tasks: np.ndarray | None  # None: fresh tasks from the train split every iteration
    rng: np.random.Generator
    gen: torch.Generator
    return_rms: RunningStd = field(default_factory=RunningStd)
    iteration: int = 0
    env_steps: int = 0
    updates: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class TrialBatch(NamedTuple):
    """``N`` trials of ``L = K * horizon`` steps; step ``l`` acts under the state that has
    absorbed transitions ``0..l-1``."""

    obs: torch.Tensor  # (N, L, O)
    u: torch.Tensor  # (N, L, A) pre-tanh action sample
    logp: torch.Tensor  # (N, L)
    value: torch.Tensor  # (N, L)
    reward: torch.Tensor  # (N, L) raw environment reward
    transition: torch.Tensor  # (N, L, D) concat(obs, tanh(u), reward, next_obs)
    done: torch.Tensor  # (N, L, 1) 1.0 where next_obs ends an episode
    progress: torch.Tensor  # (N, L, 1) fraction of the trial elapsed


def train(
    cfg: RL2TrainConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    bar_position: int = 0,
) -> TrainState:
    """Meta-train and write the run directory (config, metrics, curve, checkpoints)."""
    torch.set_num_threads(cfg.train.num_threads)
    state = init_state(cfg)
    if resume:
        restore(state, run_dir)
    else:
        write_run_config(run_dir, cfg)  # type: ignore[arg-type]  (any pydantic config)
    pool = open_pool(cfg)
    try:
        run_iterations(state, run_dir, pool, progress, bar_position)
    finally:
        pool.close()
    plot_learning_curve(run_dir, f"{cfg.env.name} (RL²)")
    return state


def run_iterations(
    state: TrainState, run_dir: Path, pool: RolloutPool, progress: bool, bar_position: int
) -> None:
    """The loop: collect trials (through ``pool``), GAE, PPO, log, evaluate, checkpoint."""
    cfg = state.cfg
    bar = Progress(
        progress,
        cfg.train.iterations,
        state.iteration,
        f"train {cfg.env.name} (RL²)",
        RL2_POSTFIX,
        bar_position,
    )

    def iteration(start: float, steps_at_start: int) -> dict[str, Any]:
        batch = collect_trials(state, sample_trial_tasks(state), pool)
        advantages, returns = compute_gae(state, batch)
        set_learning_rate(state)
        stats = ppo_update(state, batch, advantages, returns)
        state.iteration += 1
        return metrics_row(state, batch, stats, time.perf_counter() - start, steps_at_start)

    run_loop(state, run_dir, bar, iteration, quick_eval, checkpoint)


# -- setup --------------------------------------------------------------------------------
def init_state(cfg: RL2TrainConfig) -> TrainState:
    """Seed every RNG, build the agent, fix its input statistics, build the optimizer."""
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    family = make_family(cfg.env.name, 1)
    agent = build_agent(cfg, family.spec)
    train_tasks = None
    if cfg.env.num_train_tasks:
        train_tasks = family.sample_tasks(Split.TRAIN, cfg.env.num_train_tasks, rng)
    fit_normalizers(agent, cfg, rng)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.ppo.lr, eps=1e-5)
    return TrainState(cfg, agent, optimizer, train_tasks, rng, gen)


def build_agent(cfg: RL2TrainConfig, spec: FamilySpec) -> RL2Agent:
    """A fresh agent (initialized from torch's global RNG: seed it first)."""
    m = cfg.model
    return RL2Agent(
        spec.obs_dim, spec.act_dim, m.hidden_size, m.embed, m.head_hidden, m.init_log_std
    )


def fit_normalizers(agent: RL2Agent, cfg: RL2TrainConfig, rng: np.random.Generator) -> None:
    """Input statistics from uniform random actions on train tasks (one episode per env)."""
    n = cfg.train.normalizer_episodes
    env = make_family(cfg.env.name, n)
    spec = env.spec
    obs = env.reset(env.sample_tasks(Split.TRAIN, n, rng), rng)
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for _ in range(spec.horizon):
        action = rng.uniform(-1.0, 1.0, size=(n, spec.act_dim))
        res = env.step(physical_action(action, spec))
        rows.append((obs, res.reward, res.obs))
        obs = res.obs
    o, r, o2 = (
        torch.from_numpy(np.concatenate(x).astype(np.float32)) for x in zip(*rows, strict=True)
    )
    agent.set_normalizers(o, r, o2)


def sample_trial_tasks(state: TrainState) -> np.ndarray:
    """One train task per trial of this iteration."""
    n = state.cfg.train.trials_per_iter
    if state.train_tasks is None:
        family = make_family(state.cfg.env.name, 1)
        return family.sample_tasks(Split.TRAIN, n, state.rng)
    ids = state.rng.choice(len(state.train_tasks), n, replace=n > len(state.train_tasks))
    return state.train_tasks[ids]


def physical_action(action_BA: np.ndarray, spec: FamilySpec) -> np.ndarray:
    """[-1, 1] -> the family's action bounds (as :func:`runtime.evaluation.rollout`)."""
    return spec.act_low + (spec.act_high - spec.act_low) / 2.0 * (action_BA + 1.0)


# -- collection ---------------------------------------------------------------------------
class TrialShard(NamedTuple):
    """What one rollout shard returns: its trials and the auxiliary head's squared errors."""

    batch: TrialBatch
    errors: torch.Tensor  # (L * n, 1 + O)


def collect_trials(
    state: TrainState, tasks: np.ndarray, pool: RolloutPool | None = None
) -> TrialBatch:
    """K episodes per task with stochastic actions (in shards, through ``pool``).

    Also refreshes the surprise scale from the auxiliary head's errors on this fresh data
    (errors on transitions it was not yet trained on: what the device will see).
    """
    pool = pool or InProcessPool()
    cfg = state.cfg
    weights = pool.put(state.agent.state_dict())
    _, parts = collect_shards(
        pool, trial_shard, cfg, weights, tasks, state.rng, cfg.train.episodes_per_trial,
        torch_gen=state.gen,
    )  # fmt: skip
    state.agent.update_surprise_scales(torch.cat([p.errors for p in parts]), cfg.ppo.err_momentum)
    batch = TrialBatch(*(torch.cat(x) for x in zip(*(p.batch for p in parts), strict=True)))
    state.env_steps += batch.obs.shape[0] * batch.obs.shape[1]
    return batch


@torch.no_grad()
def trial_shard(
    cfg: RL2TrainConfig, weights: dict, job: ShardJob, cache: WorkerCache
) -> TrialShard:
    """RL²'s shard function: one trial per task of the job; ``h`` carries across episodes."""
    env = cache.env(cfg, len(job.tasks))
    spec, tasks = env.spec, job.tasks
    agent = load_weights(cache.module("rl2", lambda: build_agent(cfg, spec)), weights)
    rng, gen = shard_generators(job)
    k, horizon = job.episodes, spec.horizon
    length = k * horizon
    h = agent.initial_state(len(tasks))
    steps: list[dict[str, torch.Tensor]] = []
    errors = []
    for ep in range(k):
        obs = torch.from_numpy(env.reset(tasks, rng))
        for t in range(horizon):
            dist = agent.dist(obs, h)
            u = dist.sample(gen)
            action = torch.tanh(u)
            progress = torch.full((len(tasks), 1), (ep * horizon + t) / length)
            res = env.step(physical_action(action.numpy().astype(np.float64), spec))
            transition = torch.from_numpy(
                encode_transition(obs.numpy(), action.numpy(), res.reward, res.obs)
            )
            done = torch.full((len(tasks), 1), float(t == horizon - 1))
            errors.append(agent.aux_errors(transition, h))
            steps.append(
                {
                    "obs": obs,
                    "u": u,
                    "logp": dist.log_prob(u),
                    "value": agent.value(obs, h, progress),
                    "reward": torch.from_numpy(res.reward),
                    "transition": transition,
                    "done": done,
                    "progress": progress,
                }
            )
            h = agent.absorb(transition, done, h)
            obs = torch.from_numpy(res.obs)
    batch = TrialBatch(**{key: torch.stack([s[key] for s in steps], 1) for key in steps[0]})
    return TrialShard(batch, torch.cat(errors))


# -- advantages ---------------------------------------------------------------------------
def compute_gae(state: TrainState, batch: TrialBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(lambda) over each whole trial (bootstrapping across its episode boundaries; the
    trial's end is terminal). Returns ``(advantages, value targets)``, each (N, L)."""
    ppo = state.cfg.ppo
    reward = scaled_rewards(state, batch.reward)
    value = batch.value
    adv = torch.zeros_like(reward)
    last = torch.zeros(reward.shape[0])
    for t in reversed(range(reward.shape[1])):
        next_value = value[:, t + 1] if t + 1 < reward.shape[1] else torch.zeros_like(last)
        delta = reward[:, t] + ppo.gamma * next_value - value[:, t]
        last = delta + ppo.gamma * ppo.gae_lambda * last
        adv[:, t] = last
    return adv, adv + value


def scaled_rewards(state: TrainState, reward_NL: torch.Tensor) -> torch.Tensor:
    """PPO's rewards: x reward_scale, then / running std of the discounted trial return."""
    ppo = state.cfg.ppo
    reward = reward_NL * ppo.reward_scale
    if not ppo.normalize_reward:
        return reward
    ret = torch.zeros(reward.shape[0])
    discounted = []
    for t in range(reward.shape[1]):
        ret = ret * ppo.gamma + reward[:, t]
        discounted.append(ret)
    state.return_rms.update(torch.stack(discounted, 1).numpy())
    return reward / state.return_rms.std


# -- updates ------------------------------------------------------------------------------
def set_learning_rate(state: TrainState) -> None:
    """Linear decay from ``ppo.lr`` to ``lr_final`` x it (a function of the iteration only)."""
    cfg = state.cfg
    frac = min(state.iteration / max(cfg.train.iterations - 1, 1), 1.0)
    for group in state.optimizer.param_groups:
        group["lr"] = cfg.ppo.lr * (1.0 + (cfg.ppo.lr_final - 1.0) * frac)


def unroll(agent: RL2Agent, batch: TrialBatch) -> torch.Tensor:
    """Recompute the hidden states over whole trials with gradients: (N, L, H), where
    ``[:, l]`` is the state before absorbing transition ``l`` (zeros at ``l = 0``)."""
    n, length = batch.obs.shape[:2]
    x = agent.encode(batch.transition.flatten(0, 1), batch.done.flatten(0, 1))
    x = x.unflatten(0, (n, length))
    h = agent.initial_state(n)
    states = [h]
    for t in range(length - 1):
        h = agent.gru(x[:, t], h)
        states.append(h)
    return torch.stack(states, 1)


def ppo_losses(
    state: TrainState, batch: TrialBatch, adv: torch.Tensor, ret: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Clipped surrogate, value, entropy and auxiliary losses on a minibatch of trials."""
    ppo, agent = state.cfg.ppo, state.agent
    h = unroll(agent, batch).flatten(0, 1)
    obs = batch.obs.flatten(0, 1)
    dist = agent.dist(obs, h)
    logp = dist.log_prob(batch.u.flatten(0, 1))
    log_ratio = logp - batch.logp.flatten()
    ratio = log_ratio.exp()
    a = adv.flatten()
    a = (a - a.mean()) / (a.std() + 1e-8)
    loss_pg = torch.max(-a * ratio, -a * ratio.clamp(1 - ppo.clip, 1 + ppo.clip)).mean()
    value = agent.value(obs, h, batch.progress.flatten(0, 1))
    loss_v = 0.5 * (value - ret.flatten()).pow(2).mean()
    entropy = dist.entropy().mean()
    loss_aux = agent.aux_errors(batch.transition.flatten(0, 1), h).mean()
    total = loss_pg - ppo.entropy_coef * entropy + ppo.value_coef * loss_v + ppo.aux_coef * loss_aux
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1).abs() > ppo.clip).float().mean()
    return {
        "loss": total,
        "loss_actor": loss_pg,
        "loss_critic": loss_v,
        "loss_aux": loss_aux,
        "entropy": entropy,
        "approx_kl": approx_kl,
        "clipfrac": clipfrac,
    }


def ppo_update(
    state: TrainState, batch: TrialBatch, adv: torch.Tensor, ret: torch.Tensor
) -> dict[str, float]:
    """PPO epochs over minibatches of whole trials; returns the mean of each loss."""
    ppo = state.cfg.ppo
    n = batch.obs.shape[0]
    size = max(n // ppo.minibatches, 1)
    stats: list[dict[str, float]] = []
    for _ in range(ppo.epochs):
        perm = torch.randperm(n, generator=state.gen)
        for start in range(0, n - size + 1, size):
            idx = perm[start : start + size]
            mb = TrialBatch(*(x[idx] for x in batch))
            losses = ppo_losses(state, mb, adv[idx], ret[idx])
            state.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(state.agent.parameters(), ppo.max_grad_norm)
            state.optimizer.step()
            state.updates += 1
            stats.append({k: float(v.detach()) for k, v in losses.items() if k != "loss"})
        if ppo.target_kl is not None and stats[-1]["approx_kl"] > ppo.target_kl:
            break
    return {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}


# -- evaluation, metrics, checkpoints -------------------------------------------------------
def make_policy(state: TrainState, **kwargs: Any) -> RL2Policy:
    spec = make_family(state.cfg.env.name, 1).spec
    return RL2Policy(state.agent, spec, generator=state.gen, **kwargs)


def quick_eval(state: TrainState) -> dict[str, float]:
    """Deterministic returns on the test split, 2 episodes per task (``h`` carried over)."""
    cfg = state.cfg
    family = make_family(cfg.env.name, 1)
    tasks = held_out_tasks(family, Split.TEST, cfg.eval.tasks, seed=cfg.seed + 1)
    res = rollout(make_policy(state), cfg.env.name, tasks, episodes=2, seed=cfg.seed + 2)
    return res.eval_row()


def metrics_row(
    state: TrainState,
    batch: TrialBatch,
    stats: dict[str, float],
    elapsed: float,
    steps_at_start: int,
) -> dict[str, Any]:
    k = state.cfg.train.episodes_per_trial
    per_episode = batch.reward.unflatten(1, (k, -1)).sum(-1).mean(0)
    row: dict[str, Any] = {
        "iteration": state.iteration,
        "env_steps": state.env_steps,
        "updates": state.updates,
        "train_return": float(per_episode.mean()),
        **{f"train_return_ep{i + 1}": float(r) for i, r in enumerate(per_episode)},
        "log_std": float(state.agent.log_std.detach().mean()),
        "wall_s": round(elapsed, 3),
        "env_steps_per_s": (state.env_steps - steps_at_start) / max(elapsed, 1e-9),
    }
    row.update(stats)
    return row


def checkpoint(state: TrainState, run_dir: Path) -> Path:
    """Write ``checkpoints/iter_NNNNNN.pt`` and ``latest.pt`` atomically (same layout and
    format as :mod:`training.checkpoint`, with the agent under ``nets["agent"]``)."""
    rms = state.return_rms
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "algo": "rl2",
        "nets": {"agent": state.agent.state_dict()},
        "optim": state.optimizer.state_dict(),
        "iteration": state.iteration,
        "env_steps": state.env_steps,
        "updates": state.updates,
        "return_rms": torch.tensor([rms.count, rms.mean, rms.var], dtype=torch.float64),
        "rng_numpy": json.dumps(state.rng.bit_generator.state),
        "rng_torch": state.gen.get_state(),
    }
    if state.train_tasks is not None:
        payload["train_tasks"] = torch.from_numpy(state.train_tasks.copy())
    return write_checkpoint(run_dir, payload, state.iteration)


def restore(state: TrainState, run_dir: Path) -> None:
    """Continue a run from its latest checkpoint (agent, optimizer, counters, RNGs)."""
    data = read_checkpoint(checkpoint_dir(run_dir) / LATEST)
    load_agent_state(state.agent, data, run_dir)
    state.optimizer.load_state_dict(data["optim"])
    state.iteration = int(data["iteration"])
    state.env_steps = int(data["env_steps"])
    state.updates = int(data["updates"])
    count, mean, var = (float(x) for x in data["return_rms"])
    state.return_rms = RunningStd(count, mean, var)
    state.rng.bit_generator.state = json.loads(data["rng_numpy"])
    state.gen.set_state(data["rng_torch"])
    if "train_tasks" in data:
        state.train_tasks = data["train_tasks"].numpy()
    log.info("resumed %s at iteration %d", run_dir, state.iteration)


def load_agent_state(agent: RL2Agent, data: dict[str, Any], run_dir: Path) -> None:
    """Load the agent's weights and buffers, with a clear error on a mismatched checkpoint."""
    if data.get("algo") != "rl2":
        raise CheckpointError(f"{run_dir}: not an RL² checkpoint")
    try:
        agent.load_state_dict(data["nets"]["agent"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{run_dir}: checkpoint does not match the run's config ({exc})"
        ) from None


@dataclass
class LoadedRL2Run:
    """A trained RL² run ready for evaluation or export."""

    run_dir: Path
    config: RL2TrainConfig
    family: TaskFamily
    agent: RL2Agent


def load_rl2_run(run_dir: str | Path, checkpoint_path: str | Path | None = None) -> LoadedRL2Run:
    """Rebuild a run's agent from its latest (or the named) checkpoint, in eval mode."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    cfg = validate(yaml.safe_load(path.read_text()) or {}, RL2TrainConfig, source=str(path))
    import_plugins(cfg.env.plugins)
    family = make_family(cfg.env.name, 1)
    ck = Path(checkpoint_path) if checkpoint_path else checkpoint_dir(run_dir) / LATEST
    agent = build_agent(cfg, family.spec)
    load_agent_state(agent, read_checkpoint(ck), run_dir)
    return LoadedRL2Run(run_dir, cfg, family, agent.eval())
