"""Learning-curve figure of a run (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

CURVE_FILE = "learning_curve.png"


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of ``metrics.jsonl`` (one per iteration)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


Series = tuple[tuple[str, str], ...]  # (metrics key, legend label)


def plot_learning_curve(
    run_dir: Path,
    title: str = "",
    train: Series = (("train_return", "train (online belief)"),),
    evals: Series = (("eval_return_ep1", "test ep 1"), ("eval_return_ep2", "test ep 2")),
    losses: Series = (("loss_critic", "loss_critic"), ("loss_actor", "loss_actor"),
                      ("loss_kl", "loss_kl")),
    loss_title: str = "losses",
    symlog: bool = True,
) -> Path:  # fmt: skip
    """Returns (``train`` per iteration, ``evals`` where logged) and ``losses`` (those the run
    logs) against environment steps; written to ``learning_curve.png``. The defaults are the
    SAC families' metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    steps = [r["env_steps"] for r in rows]
    fig, (ax_ret, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in train:
        ax_ret.plot(steps, [r[key] for r in rows], label=label, alpha=0.6)
    logged = [r for r in rows if evals[0][0] in r]
    for key, label in evals:
        ax_ret.plot([r["env_steps"] for r in logged], [r[key] for r in logged], "o-", label=label)
    ax_ret.set(xlabel="environment steps", ylabel="return per episode", title="returns")
    ax_ret.legend()
    for key, label in losses:
        if rows and key in rows[0]:
            ax_loss.plot(steps, [r[key] for r in rows], label=label)
    ax_loss.set(xlabel="environment steps", title=loss_title)
    if symlog:
        ax_loss.set_yscale("symlog")
    ax_loss.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = run_dir / CURVE_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
