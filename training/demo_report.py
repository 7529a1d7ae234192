"""The demo's report: headline numbers per flight and PNG plots (numpy + matplotlib).

The belief lives in the latent space; to draw it against the true wind, a linear *wind probe*
(least squares from belief mean to the wind acting at each step, gusts included, fitted on
train-split flights of the same bundle with the flights' adaptation params) maps it to m/s, and
its variance is propagated through the same map. On drone-track the report also draws the
tracking comparison of :func:`training.demo.compare_tracking` (error per wind, per controller,
and the error around a wind change).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.agent import Agent, AgentConfig
from runtime.tasks import make_family

WIND = (0, 1)  # task-vector columns of drone-wind and drone-track that are the wind (m/s)
WINDOW = 25  # steps in the return windows around a task change
RECOVER = 20  # steps after a change in the error window "right after" (issue #16's target)
#: Controllers drawn in the tracking plots (the rest of the comparison is in summary.json).
SHOWN = ("PID", "DOB", "oracle")


def true_wind(env_name: str, tasks: np.ndarray, step_in_episode: np.ndarray) -> np.ndarray:
    """The wind acting at each step (m/s), ``(T, 2)``: the task's (wind_x, wind_z), plus
    ``gust_amp * sin(gust_freq * t)`` on wind_x for families with gusts (drone-track)."""
    spec = make_family(env_name).spec
    wind = tasks[:, list(WIND)].copy()
    if "gust_amp" in spec.task_names:
        amp, freq = spec.task_names.index("gust_amp"), spec.task_names.index("gust_freq")
        wind[:, 0] += tasks[:, amp] * np.sin(tasks[:, freq] * step_in_episode * (spec.dt or 0.0))
    return wind


def fit_task_probe(
    bundle: Path,
    env_name: str,
    n_tasks: int = 64,
    seed: int = 7,
    params: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``wind ~ W @ belief_mean + b`` from flights on train tasks (2 episodes,
    the agent with the adaptation ``params`` the flights use)."""
    agent = Agent.load(bundle, config=AgentConfig(params=dict(params or {})))
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
                targets.append(true_wind(env_name, tasks, np.full(n_tasks, t)))
    x = np.concatenate(means)
    x1 = np.hstack([x, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(x1, np.concatenate(targets), rcond=None)
    return coef[:-1].T, coef[-1]


def write_report(
    out: Path,
    traces: dict[str, Any],
    summary: dict[str, Any],
    bundle: Path,
    params: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Plots into ``out``; returns the per-flight headline numbers for the summary.
    ``params``: the adaptation params the flights used (for the wind probe)."""
    import matplotlib

    matplotlib.use("Agg")
    env = summary["env"]
    w, b = fit_task_probe(bundle, env, params=params)
    manifest = Agent.load(bundle).manifest
    flights = {name: _flight_numbers(name, tr, w, b, env) for name, tr in traces.items()}
    _plot_belief(out / "belief_vs_wind.png", traces, w, b, env)
    _plot_returns(out / "returns.png", summary["unseen_winds"])
    _plot_ood(out / "ood_score.png", traces, manifest.ood.warn, manifest.ood.alarm)
    _plot_latency(out / "step_latency.png", traces)
    if summary.get("tracking"):
        _plot_tracking(out / "tracking_error.png", summary["tracking"])
        _plot_wind_change(out / "wind_change.png", summary["tracking"])
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


def step_in_episode(episode: np.ndarray) -> np.ndarray:
    """The step index within its episode of every trace row."""
    starts = np.r_[0, np.flatnonzero(np.diff(episode)) + 1]
    first = starts[np.searchsorted(starts, np.arange(len(episode)), side="right") - 1]
    return np.arange(len(episode)) - first


def _flight_numbers(name: str, tr: Any, w: np.ndarray, b: np.ndarray, env: str) -> dict[str, Any]:
    a = tr.arrays()
    est, _ = _estimate(tr, w, b)
    episode = a["episode"].astype(int)
    wind = true_wind(env, a["task"], step_in_episode(episode))
    # The belief's read-out against the wind at each episode's last 20 steps, per component.
    last = [np.flatnonzero(episode == e)[-RECOVER:] for e in np.unique(episode)]
    err = np.array([np.abs(est[rows] - wind[rows]).mean(axis=0) for rows in last])
    out: dict[str, Any] = {
        **tr.summary(),
        "wind_x_error_end_of_episode_mps": [round(float(e), 3) for e in err[:, 0]],
        "wind_z_error_end_of_episode_mps": [round(float(e), 3) for e in err[:, 1]],
        "ood_alarms": sum(1 for e in tr.events if e["type"] == "ood_alarm"),
    }
    cm = 100.0 * a["tracking_error_m"]  # per episode in tr.summary() for tracking families
    changes = [e["step"] for e in tr.events if e["type"] == "task_change"]
    if changes:
        out["return_windows"] = _windows(a["reward"], changes[0], episode)
        if "tracking_error_cm_by_episode" in out:
            out["error_windows_cm"] = _windows(cm, changes[0], episode, RECOVER)
    out["headline"] = _headline(name, out)
    return out


def _windows(
    values: np.ndarray, step: int, episode: np.ndarray, after: int = WINDOW
) -> dict[str, float | None]:
    """Mean per step: WINDOW steps before the change, ``after`` steps right after it, the
    episode's last WINDOW steps and the next episode."""
    ep_end = int(np.flatnonzero(episode == episode[step])[-1]) + 1
    last_end = len(values)
    return {
        "before": float(values[max(0, step - WINDOW) : step].mean()),
        "right_after": float(values[step : step + after].mean()),
        "end_of_episode": float(values[max(step, ep_end - WINDOW) : ep_end].mean()),
        "next_episode": float(values[ep_end:last_end].mean()) if ep_end < last_end else None,
    }


def _headline(name: str, f: dict[str, Any]) -> str:
    ex = ", ".join(f"{e:.2f}" for e in f["wind_x_error_end_of_episode_mps"])
    ez = ", ".join(f"{e:.2f}" for e in f["wind_z_error_end_of_episode_mps"])
    if "tracking_error_cm_by_episode" in f:
        cm = ", ".join(f"{e:.1f}" for e in f["tracking_error_cm_by_episode"])
        text = f"tracking error [{cm}] cm per episode"
    else:
        text = "returns [" + ", ".join(f"{r:.1f}" for r in f["returns"]) + "]"
    text += f"  belief error wind x [{ex}], wind z [{ez}] m/s"
    if name == "ood_storm":
        text += f"  OOD alarms {f['ood_alarms']}, safe-mode steps {f['safe_mode_steps']}"
    if "error_windows_cm" in f:
        w = f["error_windows_cm"]
        text += (
            f"  error before the change {w['before']:.1f} cm, {RECOVER} steps after "
            f"{w['right_after']:.1f}, end {w['end_of_episode']:.1f}"
        )
    elif "return_windows" in f:
        w = f["return_windows"]
        text += (
            f"  reward/step before {w['before']:.2f}, after change {w['right_after']:.2f}, "
            f"end {w['end_of_episode']:.2f}"
        )
    return text


# -- plots ----------------------------------------------------------------------------------
def _plot_belief(
    path: Path, traces: dict[str, Any], w: np.ndarray, b: np.ndarray, env: str
) -> None:
    """Per flight: the belief's read-out against the wind acting (both components) and, for
    families that track a reference, the tracking error (cm)."""
    import matplotlib.pyplot as plt

    with_error = all(np.isfinite(tr.arrays()["tracking_error_m"]).all() for tr in traces.values())
    cols = 3 if with_error else 2
    fig, axes = plt.subplots(
        len(traces), cols, figsize=(5.5 * cols, 3.2 * len(traces)), squeeze=False
    )
    for row, (name, tr) in enumerate(traces.items()):
        a = tr.arrays()
        est, std = _estimate(tr, w, b)
        wind = true_wind(env, a["task"], step_in_episode(a["episode"].astype(int)))
        # At the prior (before the first transition) the probe's read-out means nothing.
        at_prior = np.all(a["belief_mean"] == 0.0, axis=1)
        est[at_prior], std[at_prior] = np.nan, np.nan
        steps = np.arange(len(est))
        for col in range(2):
            ax = axes[row, col]
            ax.plot(steps, wind[:, col], "k-", lw=2, label="true wind (gusts included)")
            ax.plot(steps, est[:, col], "C0-", label="belief mean (probe)")
            ax.fill_between(steps, est[:, col] - 2 * std[:, col], est[:, col] + 2 * std[:, col],
                            color="C0", alpha=0.2, label="±2σ")  # fmt: skip
            _mark_episodes(ax, a["episode"])
            _mark_changes(ax, tr)
            lo = min(wind[:, col].min(), np.nanmin(est[:, col]))
            hi = max(wind[:, col].max(), np.nanmax(est[:, col]))
            ax.set_ylim(lo - 0.5 * (hi - lo) - 2.0, hi + 0.5 * (hi - lo) + 2.0)
            ax.set(title=f"{name}: wind {'xz'[col]}", xlabel="control step", ylabel="m/s")
        if with_error:
            ax = axes[row, 2]
            ax.plot(steps, 100.0 * a["tracking_error_m"], "C3-", lw=1)
            _mark_episodes(ax, a["episode"])
            _mark_changes(ax, tr)
            ax.set(yscale="log", title=f"{name}: tracking error", xlabel="control step",
                   ylabel="cm")  # fmt: skip
        axes[row, 0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_returns(path: Path, u: dict[str, Any]) -> None:
    """Returns per episode, adaptive and not; the random return is quoted in the title, not
    drawn (far below, it would squash the scale)."""
    import matplotlib.pyplot as plt

    eps = np.arange(1, u["episodes"] + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(eps - 0.2, u["return_by_episode"], 0.4, label="adaptive (belief updated every step)")
    ax.bar(eps + 0.2, u["nonadaptive_return_by_episode"], 0.4, label="non-adaptive (prior)")
    if u["oracle_return"] is not None:
        ax.axhline(u["oracle_return"], color="g", ls="--", label="privileged oracle")
    title = f"{u['env']} unseen winds ({u['tasks']} tasks); random {u['random_return']:.0f}"
    ax.set(xlabel="episode on the same task", ylabel="return", xticks=eps, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _shown(report: dict[str, Any]) -> list[str]:
    """The learned rows (adaptive, then non-adaptive) and SHOWN's classical and oracle rows."""
    ctrl = report["controllers"]
    learned = [k for k, v in ctrl.items() if v["kind"] == "bundle"]
    learned.sort(key=lambda k: not ctrl[k]["adaptive"])
    return learned + [k for k in SHOWN if k in ctrl]


def _plot_tracking(path: Path, report: dict[str, Any]) -> None:
    """Mean tracking error per wind condition and controller (bars, log scale; the whisker
    reaches the p95)."""
    import matplotlib.pyplot as plt

    names = list(report["conditions"])
    shown = _shown(report)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(shown)
    x = np.arange(len(names))
    for i, label in enumerate(shown):
        cond = report["controllers"][label]["conditions"]
        mean = np.array([cond[n]["mean_cm"] for n in names])
        p95 = np.array([cond[n]["p95_cm"] for n in names])
        pos = x - 0.4 + (i + 0.5) * width
        ax.bar(pos, mean, width, label=label, color=f"C{i}")
        ax.errorbar(pos, mean, yerr=[np.zeros_like(mean), p95 - mean], fmt="none",
                    ecolor="k", elinewidth=0.8, capsize=2)  # fmt: skip
        for px, m in zip(pos, mean, strict=True):
            ax.text(px, m * 1.05, f"{m:.1f}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(x, [f"{n} m/s" for n in names])
    ax.set(yscale="log", ylabel="tracking error (cm), mean; whisker: p95",
           title=f"figure-8 tracking error per wind ({report['tasks_per_condition']} tasks each, "
           f"episode {report['episodes']})")  # fmt: skip
    top = max(c["p95_cm"] for k in shown for c in report["controllers"][k]["conditions"].values())
    ax.set_ylim(top=top * 4.0)  # room for the legend above the bars
    ax.legend(fontsize=8, ncol=len(shown), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_wind_change(path: Path, report: dict[str, Any]) -> None:
    """Task-mean tracking error per step around the 4.2 -> 12.1 m/s wind change, per
    controller (solid), against the same controller flying 12.1 m/s all along (dotted)."""
    import matplotlib.pyplot as plt

    wc = report["wind_change"]
    at = wc["at_step"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, label in enumerate(_shown(report)):
        res = report["controllers"][label]["wind_change"]
        if "error_cm_by_step" not in res:
            continue
        err, steady = np.array(res["error_cm_by_step"]), np.array(res["steady_error_cm_by_step"])
        steps = np.arange(len(err)) - at
        ax.plot(steps, err, f"C{i}-", lw=1.5,
                label=f"{label} ({res['converge_steps_mean']:.0f} steps)")  # fmt: skip
        ax.plot(steps, steady, f"C{i}:", lw=1)
    ax.axvline(0, color="k", lw=1)
    ax.axvspan(0, 20, color="grey", alpha=0.15, label="20-step target")
    ax.set(yscale="log", xlim=(-40, 100), xlabel="control steps (0.05 s) after the change",
           ylabel="tracking error (cm), mean over tasks",
           title=f"wind change {wc['from']} -> {wc['to']} m/s (dotted: {wc['to']} m/s all along; "
           "steps to converge in the legend)")  # fmt: skip
    ax.legend(fontsize=8, ncol=2)
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


def _mark_changes(ax: Any, tr: Any) -> None:
    for e in tr.events:
        if e["type"] == "task_change":
            ax.axvline(e["step"], color="r", lw=0.8, ls="--")
