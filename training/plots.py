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


def plot_learning_curve(run_dir: Path, title: str = "") -> Path:
    """Returns and losses against environment steps; written to ``learning_curve.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    steps = [r["env_steps"] for r in rows]
    fig, (ax_ret, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    ax_ret.plot(steps, [r["train_return"] for r in rows], label="train (online belief)", alpha=0.6)
    evals = [r for r in rows if "eval_return_ep1" in r]
    for key, label in (("eval_return_ep1", "test ep 1"), ("eval_return_ep2", "test ep 2")):
        ax_ret.plot([r["env_steps"] for r in evals], [r[key] for r in evals], "o-", label=label)
    ax_ret.set(xlabel="environment steps", ylabel="return per episode", title="returns")
    ax_ret.legend()
    for key in ("loss_critic", "loss_actor", "loss_kl"):
        if rows and key in rows[0]:
            ax_loss.plot(steps, [r[key] for r in rows], label=key)
    ax_loss.set(xlabel="environment steps", title="losses")
    ax_loss.set_yscale("symlog")
    ax_loss.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = run_dir / CURVE_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
