"""The demo's report: headline numbers per flight and PNG plots (numpy + matplotlib).

The belief lives in the latent space; to draw it against the true wind, a linear *task probe*
(least squares from belief mean to task vector, fitted on train-split flights of the same
bundle) maps it to m/s, and its variance is propagated through the same map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.agent import Agent
from runtime.tasks import make_family

WIND = (0, 1)  # task-vector columns of drone-wind that are the wind (m/s)
WINDOW = 25  # steps in the return windows around a task change


def fit_task_probe(
    bundle: Path, env_name: str, n_tasks: int = 64, seed: int = 7
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``task ~ W @ belief_mean + b`` from flights on train tasks (2 episodes)."""
    agent = Agent.load(bundle)
    env = make_family(env_name, n_tasks)
    rng = np.random.default_rng(seed)
    tasks = env.sample_tasks("train", n_tasks, rng)
    agent.reset(n_tasks)
    means, targets = [], []
    for _ in range(2):
        obs = env.reset(tasks, rng)
        for t in range(env.spec.horizon):
            action = agent.act(obs)
            res = env.step(agent.scale(action))
            agent.observe(obs, action, res.reward, res.obs)
            obs = res.obs
            if t >= 10:  # skip the first steps, where the belief is still the prior
                means.append(agent.belief.mean.copy())
                targets.append(tasks.copy())
    x = np.concatenate(means)
    x1 = np.hstack([x, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(x1, np.concatenate(targets), rcond=None)
    return coef[:-1].T, coef[-1]


def write_report(
    out: Path, traces: dict[str, Any], summary: dict[str, Any], bundle: Path
) -> dict[str, Any]:
    """Plots into ``out``; returns the per-flight headline numbers for the summary."""
    import matplotlib

    matplotlib.use("Agg")
    w, b = fit_task_probe(bundle, summary["env"])
    manifest = Agent.load(bundle).manifest
    flights = {name: _flight_numbers(name, tr, w, b) for name, tr in traces.items()}
    _plot_belief(out / "belief_vs_wind.png", traces, w, b)
    _plot_returns(out / "returns.png", summary["unseen_winds"])
    _plot_ood(out / "ood_score.png", traces, manifest.ood.warn, manifest.ood.alarm)
    _plot_latency(out / "step_latency.png", traces)
    return flights


# -- numbers --------------------------------------------------------------------------------
def _estimate(tr: Any, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = tr.arrays()
    est = a["belief_mean"] @ w.T + b
    var = a["belief_var"]
    if var.shape[-1] != w.shape[-1]:  # a family without a spread (RL²): no band
        return est, np.full_like(est, np.nan)
    std = np.sqrt(np.einsum("kz,tz,kz->tk", w, var, w))
    return est, std


def _flight_numbers(name: str, tr: Any, w: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    a = tr.arrays()
    est, _ = _estimate(tr, w, b)
    episode = a["episode"].astype(int)
    ends = [np.flatnonzero(episode == e)[-1] for e in np.unique(episode)]
    # Per component: the horizontal wind is identifiable from a few transitions; the vertical
    # one is nearly confounded with the mass scale (both shift the hover thrust).
    err = np.abs(est[ends][:, WIND] - a["task"][ends][:, WIND])
    out: dict[str, Any] = {
        **tr.summary(),
        "wind_x_error_end_of_episode_mps": [round(float(e), 3) for e in err[:, 0]],
        "wind_z_error_end_of_episode_mps": [round(float(e), 3) for e in err[:, 1]],
        "ood_alarms": sum(1 for e in tr.events if e["type"] == "ood_alarm"),
    }
    changes = [e["step"] for e in tr.events if e["type"] == "task_change"]
    if changes:
        out["return_windows"] = _windows(a["reward"], changes[0], episode)
    out["headline"] = _headline(name, out)
    return out


def _windows(reward: np.ndarray, step: int, episode: np.ndarray) -> dict[str, float]:
    """Mean reward per step: before the change, right after it, and at the episode's end."""
    ep_end = int(np.flatnonzero(episode == episode[step])[-1]) + 1
    last_end = len(reward)
    return {
        "before": float(reward[max(0, step - WINDOW) : step].mean()),
        "right_after": float(reward[step : step + WINDOW].mean()),
        "end_of_episode": float(reward[max(step, ep_end - WINDOW) : ep_end].mean()),
        "next_episode": float(reward[ep_end:last_end].mean()) if ep_end < last_end else None,
    }


def _headline(name: str, f: dict[str, Any]) -> str:
    rets = ", ".join(f"{r:.1f}" for r in f["returns"])
    ex = ", ".join(f"{e:.2f}" for e in f["wind_x_error_end_of_episode_mps"])
    ez = ", ".join(f"{e:.2f}" for e in f["wind_z_error_end_of_episode_mps"])
    text = f"returns [{rets}]  end-of-episode error wind x [{ex}], wind z [{ez}] m/s"
    if name == "ood_storm":
        text += f"  OOD alarms {f['ood_alarms']}, safe-mode steps {f['safe_mode_steps']}"
    if "return_windows" in f:
        w = f["return_windows"]
        text += (
            f"  reward/step before {w['before']:.2f}, after change {w['right_after']:.2f}, "
            f"end {w['end_of_episode']:.2f}"
        )
    return text


# -- plots ----------------------------------------------------------------------------------
def _plot_belief(path: Path, traces: dict[str, Any], w: np.ndarray, b: np.ndarray) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(traces), 2, figsize=(12, 3.2 * len(traces)), squeeze=False)
    for row, (name, tr) in enumerate(traces.items()):
        a = tr.arrays()
        est, std = _estimate(tr, w, b)
        # At the prior (before the first transition) the probe's read-out means nothing.
        at_prior = np.all(a["belief_mean"] == 0.0, axis=1)
        est[at_prior], std[at_prior] = np.nan, np.nan
        steps = np.arange(len(est))
        for col, k in enumerate(WIND):
            ax = axes[row, col]
            ax.plot(steps, a["task"][:, k], "k-", lw=2, label="true wind")
            ax.plot(steps, est[:, k], "C0-", label="belief mean (probe)")
            ax.fill_between(steps, est[:, k] - 2 * std[:, k], est[:, k] + 2 * std[:, k],
                            color="C0", alpha=0.2, label="±2σ")  # fmt: skip
            _mark_episodes(ax, a["episode"])
            lo = min(a["task"][:, k].min(), np.nanmin(est[:, k]))
            hi = max(a["task"][:, k].max(), np.nanmax(est[:, k]))
            ax.set_ylim(lo - 0.5 * (hi - lo) - 2.0, hi + 0.5 * (hi - lo) + 2.0)
            ax.set(title=f"{name}: wind {'xz'[col]}", xlabel="control step", ylabel="m/s")
        axes[row, 0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_returns(path: Path, u: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    eps = np.arange(1, u["episodes"] + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(eps - 0.2, u["return_by_episode"], 0.4, label="adaptive (belief updated every step)")
    ax.bar(eps + 0.2, u["nonadaptive_return_by_episode"], 0.4, label="non-adaptive (prior)")
    if u["oracle_return"] is not None:
        ax.axhline(u["oracle_return"], color="g", ls="--", label="privileged oracle")
    ax.axhline(u["random_return"], color="r", ls=":", label="random")
    ax.set(xlabel="episode on the same task", ylabel="return", xticks=eps,
           title=f"{u['env']} unseen winds ({u['tasks']} tasks)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_ood(path: Path, traces: dict[str, Any], warn: float, alarm: float) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for name, tr in traces.items():
        ax.plot(np.maximum(tr.arrays()["ood"], 1e-3), label=name, alpha=0.8)
    ax.axhline(warn, color="orange", ls="--", label=f"warn {warn:.3g}")
    ax.axhline(alarm, color="r", ls="--", label=f"alarm {alarm:.3g}")
    ax.set(yscale="log", xlabel="control step", ylabel="OOD score (surprise)",
           title="out-of-distribution score per step")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_latency(path: Path, traces: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    lat = np.concatenate([tr.arrays()["latency_us"] for tr in traces.values()])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(lat, bins=np.logspace(np.log10(max(lat.min(), 1)), np.log10(lat.max() + 1), 50))
    ax.axvline(np.median(lat), color="k", ls="--", label=f"median {np.median(lat):.0f} µs")
    ax.axvline(
        np.percentile(lat, 99), color="r", ls=":", label=f"p99 {np.percentile(lat, 99):.0f} µs"
    )
    ax.set(xscale="log", xlabel="control step latency (µs): act + belief update",
           ylabel="steps", title="on-device step latency (onnxruntime, 1 thread)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _mark_episodes(ax: Any, episode: np.ndarray) -> None:
    for i in np.flatnonzero(np.diff(episode)) + 1:
        ax.axvline(i, color="grey", lw=0.8, ls=":")
